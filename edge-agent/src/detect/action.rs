//! The local action on an anomaly alarm: the factory floor's "stop the
//! line" hook. It works with no uplink: a command run on the box, and/or a
//! message to an MQTT broker on the line (a PLC gateway's, usually on
//! loopback or the machine network), never the fleet's.
//!
//! Rate limited: at most one action on a raised alarm per
//! `min_interval_secs`; raises in between are counted as suppressed (a
//! clear, with `on_clear`, always goes). Each action runs on its own thread
//! with a timeout, so a hung command or broker never holds up the windows.

use crate::config::ActionConfig;
use prometheus_client::metrics::counter::Counter;
use std::time::{Duration, Instant};

/// What one alarm event hands to the action.
#[derive(Debug, Clone)]
pub struct Event {
    /// `raised` or `cleared`.
    pub event: &'static str,
    pub score: f64,
    pub threshold: f64,
    pub timestamp_ms: i64,
    pub model_sha256: String,
    pub top: Vec<(String, f64)>,
}

impl Event {
    /// The MQTT payload (JSON, docs/model.md).
    pub fn json(&self, device: &str) -> String {
        let top: Vec<serde_json::Value> =
            self.top.iter().map(|(f, s)| serde_json::json!({"feature": f, "share": s})).collect();
        serde_json::json!({
            "device": device,
            "event": self.event,
            "score": self.score,
            "threshold": self.threshold,
            "timestamp_ms": self.timestamp_ms,
            "model_sha256": self.model_sha256,
            "top_features": top,
        })
        .to_string()
    }
}

/// Where the action's results are counted, as they happen: the handles of
/// `edge_agent_anomaly_actions_total{result}` (`AgentMetrics::action_counts`;
/// the default counts into counters nobody exports).
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub ok: Counter,
    pub failed: Counter,
    pub suppressed: Counter,
}

pub struct Action {
    cfg: ActionConfig,
    device: String,
    last: Option<Instant>,
    pub counts: Counts,
}

impl Action {
    pub fn new(cfg: &ActionConfig, device: &str) -> Action {
        Action { cfg: cfg.clone(), device: device.to_owned(), last: None, counts: Counts::default() }
    }

    pub fn configured(&self) -> bool {
        !self.cfg.command.is_empty() || !self.cfg.mqtt_topic.is_empty()
    }

    /// Starts the action for `e` unless the rate limit holds it back.
    pub fn fire(&mut self, e: &Event) {
        if !self.configured() || (e.event == "cleared" && !self.cfg.on_clear) {
            return;
        }
        // The rate limit holds back raises; a clear always follows its raise
        // (a "stop the line" needs its "line may run again").
        let interval = Duration::from_secs(self.cfg.min_interval_secs);
        if e.event == "raised" && self.last.is_some_and(|t| t.elapsed() < interval) {
            self.counts.suppressed.inc();
            tracing::warn!(
                event = e.event,
                min_interval_secs = self.cfg.min_interval_secs,
                "anomaly action suppressed (rate limit)"
            );
            return;
        }
        if e.event == "raised" {
            self.last = Some(Instant::now());
        }
        let (cfg, device, e, counts) = (self.cfg.clone(), self.device.clone(), e.clone(), self.counts.clone());
        let spawned = std::thread::Builder::new().name("anomaly-action".into()).spawn(move || {
            let mut ok = true;
            if !cfg.command.is_empty() {
                match run_command(&cfg, &device, &e) {
                    Ok(()) => tracing::info!(command = ?cfg.command, event = e.event, "anomaly action: command ran"),
                    Err(err) => {
                        ok = false;
                        tracing::error!(command = ?cfg.command, error = %err, "anomaly action: command failed");
                    }
                }
            }
            if !cfg.mqtt_topic.is_empty() {
                match publish(&cfg, &e.json(&device)) {
                    Ok(()) => {
                        tracing::info!(topic = %cfg.mqtt_topic, event = e.event, "anomaly action: message published")
                    }
                    Err(err) => {
                        ok = false;
                        tracing::error!(topic = %cfg.mqtt_topic, error = %err, "anomaly action: message not published");
                    }
                }
            }
            if ok { &counts.ok } else { &counts.failed }.inc();
        });
        if let Err(err) = spawned {
            self.counts.failed.inc();
            tracing::error!(error = %err, "anomaly action: cannot start its thread");
        }
    }
}

/// Runs the command (no shell) with the event in its environment; killed
/// after the timeout. It inherits none of the agent's capabilities.
fn run_command(cfg: &ActionConfig, device: &str, e: &Event) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let top: Vec<String> = e.top.iter().map(|(f, _)| f.clone()).collect();
    let mut cmd = std::process::Command::new(&cfg.command[0]);
    cmd.args(&cfg.command[1..])
        .env("EDGE_ANOMALY_EVENT", e.event)
        .env("EDGE_ANOMALY_SCORE", e.score.to_string())
        .env("EDGE_ANOMALY_THRESHOLD", e.threshold.to_string())
        .env("EDGE_ANOMALY_TIMESTAMP_MS", e.timestamp_ms.to_string())
        .env("EDGE_ANOMALY_TOP_FEATURES", top.join(" "))
        .env("EDGE_MODEL_SHA256", &e.model_sha256)
        .env("EDGE_DEVICE_ID", device)
        .stdin(std::process::Stdio::null());
    // SAFETY: prctl in the forked child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|err| format!("cannot start {:?}: {err}", cfg.command[0]))?;
    let deadline = Instant::now() + Duration::from_secs(cfg.timeout_secs.max(1));
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => return Ok(()),
            Ok(Some(st)) => return Err(format!("exited with {st}")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("still running after {} s: killed", cfg.timeout_secs));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(err) => return Err(err.to_string()),
        }
    }
}

/// One QoS 1 message to the line's broker: connect, publish, PUBACK, go.
fn publish(cfg: &ActionConfig, payload: &str) -> Result<(), String> {
    let id = format!("edge-agent-action-{}", std::process::id());
    let mut o = rumqttc::MqttOptions::new(id, cfg.mqtt_host.clone(), cfg.mqtt_port);
    o.set_keep_alive(Duration::from_secs(5)).set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut conn) = rumqttc::Client::new(o, 4);
    client
        .publish(cfg.mqtt_topic.clone(), rumqttc::QoS::AtLeastOnce, false, payload.as_bytes().to_vec())
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(cfg.timeout_secs.max(1));
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => {
                let _ = client.disconnect();
                return Ok(());
            }
            Ok(Ok(_)) | Err(rumqttc::RecvTimeoutError::Timeout) => {}
            Ok(Err(e)) => return Err(format!("{}:{}: {e}", cfg.mqtt_host, cfg.mqtt_port)),
            Err(rumqttc::RecvTimeoutError::Disconnected) => return Err("connection closed".into()),
        }
    }
    Err(format!("no acknowledgement from {}:{} within {} s", cfg.mqtt_host, cfg.mqtt_port, cfg.timeout_secs))
}
