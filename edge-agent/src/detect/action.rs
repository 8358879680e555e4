//! The local action on an anomaly alarm (the stop level): the factory
//! floor's "stop the line" hook. It works with no uplink: a command run on
//! the box, a message to an MQTT broker on the line (a PLC gateway's,
//! usually on loopback or the machine network), never the fleet's, and/or
//! a coil or register written on the line's Modbus/TCP server (its e-stop
//! or an interlock).
//!
//! Rate limited: at most one action on a raised alarm per
//! `min_interval_secs`; raises in between are counted as suppressed (a
//! clear, with `on_clear`, always goes). Each action runs on its own thread
//! with a timeout, so a hung command or broker never holds up the windows.

use crate::config::{ActionConfig, ModbusWriteConfig};
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
/// `edge_agent_anomaly_actions_total{result}` (`DetectMetrics::action_counts`;
/// the default counts into counters nobody exports).
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub ok: Counter,
    pub failed: Counter,
    pub suppressed: Counter,
}

/// What `Action::fire` did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fired {
    /// No action configured for it.
    Nothing,
    /// Started (its result is counted when it is done).
    Started,
    /// Held back by the rate limit.
    Suppressed,
}

impl Fired {
    pub fn label(self) -> Option<&'static str> {
        match self {
            Fired::Nothing => None,
            Fired::Started => Some("started"),
            Fired::Suppressed => Some("suppressed"),
        }
    }
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
        !self.cfg.command.is_empty() || !self.cfg.mqtt_topic.is_empty() || !self.cfg.modbus_write.server.is_empty()
    }

    /// Starts the action for `e` unless the rate limit holds it back;
    /// returns what happened (for the alarm's record).
    pub fn fire(&mut self, e: &Event) -> Fired {
        if !self.configured() || (e.event == "cleared" && !self.cfg.on_clear) {
            return Fired::Nothing;
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
            return Fired::Suppressed;
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
            let mw = &cfg.modbus_write;
            if !mw.server.is_empty() {
                let value = if e.event == "raised" { mw.value } else { mw.clear_value };
                match modbus_write(mw, value, Duration::from_secs(cfg.timeout_secs.max(1))) {
                    Ok(()) => tracing::info!(
                        server = %mw.server, table = %mw.table, address = mw.address, value, event = e.event,
                        "anomaly action: Modbus write acknowledged"
                    ),
                    Err(err) => {
                        ok = false;
                        tracing::error!(server = %mw.server, error = %err, "anomaly action: Modbus write failed");
                    }
                }
            }
            if ok { &counts.ok } else { &counts.failed }.inc();
        });
        if let Err(err) = spawned {
            self.counts.failed.inc();
            tracing::error!(error = %err, "anomaly action: cannot start its thread");
        }
        Fired::Started
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

/// One write to the line's Modbus/TCP server: function 5 (a coil) or 6 (a
/// holding register), and its echo; an exception reply or no reply within
/// `timeout` fails.
pub fn modbus_write(cfg: &ModbusWriteConfig, value: u16, timeout: Duration) -> Result<(), String> {
    use rmodbus::{client::ModbusRequest, guess_response_frame_len, ModbusProto};
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let deadline = Instant::now() + timeout;
    let addr = cfg
        .server
        .to_socket_addrs()
        .map_err(|e| format!("{}: {e}", cfg.server))?
        .next()
        .ok_or_else(|| format!("{}: no address", cfg.server))?;
    let mut req = ModbusRequest::new(cfg.unit, ModbusProto::TcpUdp);
    let mut frame = Vec::new();
    let generated = match cfg.table.as_str() {
        "coil" => req.generate_set_coil(cfg.address, u8::from(value > 0), &mut frame),
        _ => req.generate_set_holding(cfg.address, value, &mut frame),
    };
    generated.map_err(|e| format!("request: {e:?}"))?;
    let mut c = std::net::TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    c.set_nodelay(true).ok();
    let left = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    c.set_write_timeout(Some(left())).ok();
    c.write_all(&frame).map_err(|e| format!("{addr}: {e}"))?;
    // The MBAP header says how long the rest is.
    let mut reply = vec![0u8; 6];
    c.set_read_timeout(Some(left())).ok();
    c.read_exact(&mut reply).map_err(|e| format!("{addr}: no reply: {e}"))?;
    let len = usize::from(guess_response_frame_len(&reply, ModbusProto::TcpUdp).map_err(|e| format!("reply: {e:?}"))?);
    if !(6..=260).contains(&len) {
        return Err(format!("reply of {len} bytes"));
    }
    reply.resize(len, 0);
    c.set_read_timeout(Some(left())).ok();
    c.read_exact(&mut reply[6..]).map_err(|e| format!("{addr}: reply cut: {e}"))?;
    req.parse_ok(&reply).map_err(|e| format!("{addr} answered {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmodbus::server::context::ModbusContext;
    use rmodbus::server::{storage::ModbusStorageSmall, ModbusFrame};
    use rmodbus::ModbusProto;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// A Modbus/TCP server (rmodbus's, unit 1) on loopback, answering one
    /// connection after another; `silent` reads and never answers.
    fn server(silent: bool) -> (String, Arc<Mutex<ModbusStorageSmall>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let storage = Arc::new(Mutex::new(ModbusStorageSmall::default()));
        let s = storage.clone();
        std::thread::spawn(move || {
            for mut c in l.incoming().flatten() {
                let mut buf = [0u8; 256];
                let mut h = [0u8; 6];
                if c.read_exact(&mut h).is_err() {
                    continue;
                }
                let len = usize::from(u16::from_be_bytes([h[4], h[5]]));
                buf[..6].copy_from_slice(&h);
                if c.read_exact(&mut buf[6..6 + len]).is_err() || silent {
                    std::thread::sleep(Duration::from_secs(3));
                    continue;
                }
                let mut reply = Vec::new();
                let mut frame = ModbusFrame::new(1, &buf, ModbusProto::TcpUdp, &mut reply);
                frame.parse().unwrap();
                if frame.processing_required {
                    let mut st = s.lock().unwrap();
                    if frame.readonly { frame.process_read(&*st) } else { frame.process_write(&mut *st) }.unwrap();
                }
                if frame.response_required {
                    frame.finalize_response().unwrap();
                    c.write_all(&reply).unwrap();
                }
            }
        });
        (addr, storage)
    }

    fn cfg(server: &str, table: &str, address: u16) -> ModbusWriteConfig {
        ModbusWriteConfig { server: server.into(), table: table.into(), address, ..Default::default() }
    }

    #[test]
    fn modbus_write_sets_a_coil_or_a_register_and_waits_for_the_echo() {
        let (addr, storage) = server(false);
        let t = Duration::from_secs(2);
        modbus_write(&cfg(&addr, "coil", 7), 1, t).unwrap();
        assert!(storage.lock().unwrap().get_coil(7).unwrap());
        modbus_write(&cfg(&addr, "coil", 7), 0, t).unwrap();
        assert!(!storage.lock().unwrap().get_coil(7).unwrap());
        modbus_write(&cfg(&addr, "holding", 3), 900, t).unwrap();
        assert_eq!(storage.lock().unwrap().get_holding(3).unwrap(), 900);
        // Past the server's table: its exception reply is the error.
        let e = modbus_write(&cfg(&addr, "holding", 60_000), 1, t).unwrap_err();
        assert!(e.contains("answered"), "{e}");
    }

    #[test]
    fn modbus_write_gives_up_at_its_timeout() {
        let (addr, _) = server(true);
        let started = Instant::now();
        let e = modbus_write(&cfg(&addr, "coil", 0), 1, Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("no reply"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        // Nothing listening.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let e = modbus_write(&cfg(&format!("127.0.0.1:{port}"), "coil", 0), 1, Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("127.0.0.1"), "{e}");
    }

    #[test]
    fn firing_says_what_it_did() {
        let (addr, storage) = server(false);
        let ac = ActionConfig { modbus_write: cfg(&addr, "coil", 2), min_interval_secs: 600, ..Default::default() };
        let mut a = Action::new(&ac, "press-1");
        let e = |event| Event {
            event,
            score: 9.0,
            threshold: 1.0,
            timestamp_ms: 0,
            model_sha256: String::new(),
            top: vec![],
        };
        assert_eq!(a.fire(&e("raised")), Fired::Started);
        assert_eq!(a.fire(&e("raised")), Fired::Suppressed, "within min_interval_secs");
        assert_eq!(a.fire(&e("cleared")), Fired::Nothing, "on_clear is off");
        let deadline = Instant::now() + Duration::from_secs(5);
        while a.counts.ok.get() < 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(a.counts.ok.get(), 1);
        assert!(storage.lock().unwrap().get_coil(2).unwrap());
        let none = Action::new(&ActionConfig::default(), "press-1");
        assert!(!none.configured());
    }
}
