//! fleet-bridge: MQTT (devices' stored batches) -> Prometheus remote write.
//!
//! Stateless: the broker holds everything not yet written (persistent
//! session, QoS 1, manual acknowledgements). A message is acknowledged only
//! after the remote-write endpoint answered 2xx, or when it can never be
//! written (then it is counted); on 5xx, 429 or network errors the bridge
//! retries with back-off and acknowledges nothing meanwhile.

pub mod config;
pub mod handle;
pub mod metrics;
pub mod remote_write;

use rumqttc::{Client, Event, MqttOptions, Packet, Publish, QoS};
use std::sync::mpsc;
use std::time::Duration;

use config::Config;
use handle::Verdict;
use metrics::BridgeMetrics;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start: {0}")]
    Start(#[from] std::io::Error),
}

pub fn run(cfg: Config) -> Result<(), RunError> {
    let (metrics, registry) = BridgeMetrics::new();
    if !cfg.metrics.listen.is_empty() {
        let listener = std::net::TcpListener::bind(&cfg.metrics.listen)?;
        tracing::info!(addr = %cfg.metrics.listen, "serving /metrics");
        std::thread::Builder::new().name("metrics".into()).spawn(move || metrics::serve(listener, registry))?;
    }

    let mut opts = MqttOptions::new(cfg.mqtt.client_id.clone(), cfg.mqtt.host.clone(), cfg.mqtt.port);
    opts.set_keep_alive(Duration::from_secs(cfg.mqtt.keep_alive_secs.max(5)))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_max_packet_size(edge_wire::MAX_MESSAGE_BYTES + 1024, 64 * 1024);
    let (client, mut connection) = Client::new(opts, 64);
    let filter = format!("{}/+/metrics", cfg.mqtt.topic_prefix);

    let (tx, rx) = mpsc::channel::<Publish>();
    let writer = Writer::new(&cfg, client.clone(), metrics.clone());
    std::thread::Builder::new().name("writer".into()).spawn(move || writer.run(rx))?;

    let mut failures = 0u32;
    for event in connection.iter() {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                metrics.mqtt_connected.set(1);
                tracing::info!(session_present = ack.session_present, filter, "connected to broker");
                if let Err(e) = client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                    tracing::error!(error = %e, "subscribe failed");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(p).is_err() {
                    break; // writer gone
                }
            }
            Ok(_) => {}
            Err(e) => {
                metrics.mqtt_connected.set(0);
                failures = failures.saturating_add(1);
                tracing::warn!(error = %e, "broker connection failed; retrying");
                // rumqttc reconnects on the next poll; pace it.
                std::thread::sleep(Duration::from_millis((100u64 << failures.min(6)).min(5_000)));
            }
        }
    }
    Ok(())
}

struct Writer {
    prefix: String,
    url: String,
    agent: ureq::Agent,
    client: Client,
    metrics: BridgeMetrics,
    retry_min: Duration,
    retry_max: Duration,
}

impl Writer {
    fn new(cfg: &Config, client: Client, metrics: BridgeMetrics) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_millis(cfg.remote_write.timeout_ms)))
            .build()
            .into();
        Writer {
            prefix: cfg.mqtt.topic_prefix.clone(),
            url: cfg.remote_write.url.clone(),
            agent,
            client,
            metrics,
            retry_min: Duration::from_millis(cfg.remote_write.retry_min_ms),
            retry_max: Duration::from_millis(cfg.remote_write.retry_max_ms),
        }
    }

    fn run(self, rx: mpsc::Receiver<Publish>) {
        for publish in rx {
            self.handle(&publish);
            if let Err(e) = self.client.ack(&publish) {
                tracing::error!(error = %e, "acknowledging failed; the broker will redeliver");
            }
        }
    }

    /// Returns once the message may be acknowledged.
    fn handle(&self, publish: &Publish) {
        let w = match handle::prepare(&self.prefix, &publish.topic, &publish.payload) {
            Ok(w) => w,
            Err(refusal) => {
                self.metrics.messages.get_or_create(&metrics::ResultLabels::new(refusal.label())).inc();
                tracing::warn!(topic = %publish.topic, why = ?refusal, "message refused");
                return;
            }
        };
        let mut wait = self.retry_min;
        loop {
            let outcome = self.post(&w.body);
            let label = match &outcome {
                Ok(s) => metrics::status_class(s.0),
                Err(_) => "error",
            };
            self.metrics.requests.get_or_create(&metrics::StatusLabels { status: label.into() }).inc();
            match outcome {
                Ok(status) => match handle::verdict(status.0) {
                    Verdict::Written => {
                        self.metrics.messages.get_or_create(&metrics::ResultLabels::new("written")).inc();
                        self.metrics.samples.inc_by(w.samples as u64);
                        tracing::debug!(device = %w.device, seq = w.first_seq, samples = w.samples, "written");
                        return;
                    }
                    Verdict::Refused => {
                        self.metrics.messages.get_or_create(&metrics::ResultLabels::new("refused_by_store")).inc();
                        self.metrics.samples_refused.inc_by(w.samples as u64);
                        tracing::warn!(device = %w.device, seq = w.first_seq, status = status.0, body = %status.1, "store refused samples");
                        return;
                    }
                    Verdict::Retry => {
                        tracing::warn!(device = %w.device, seq = w.first_seq, status = status.0, body = %status.1, "store busy or failing; retrying");
                    }
                },
                Err(e) => {
                    tracing::warn!(device = %w.device, seq = w.first_seq, error = %e, "remote write failed; retrying")
                }
            }
            self.metrics.retries.inc();
            std::thread::sleep(wait);
            wait = (wait * 2).min(self.retry_max);
        }
    }

    fn post(&self, body: &[u8]) -> Result<(u16, String), ureq::Error> {
        let mut req = self.agent.post(&self.url);
        for (k, v) in remote_write::HEADERS {
            req = req.header(k, v);
        }
        let mut resp = req.send(body)?;
        let status = resp.status().as_u16();
        let text = if status / 100 == 2 {
            String::new()
        } else {
            resp.body_mut().with_config().limit(4096).read_to_string().unwrap_or_default()
        };
        Ok((status, text.trim().to_owned()))
    }
}

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEET_BRIDGE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
