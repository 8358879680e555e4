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

use rumqttc::{Client, Event, MqttOptions, Packet, Publish, QoS, TlsConfiguration, Transport};
use std::sync::mpsc;
use std::time::Duration;

use config::Config;
use edge_wire::throttle::Throttle;
use handle::{TimeBounds, Verdict};
use metrics::BridgeMetrics;
use remote_write::WriteRequest;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start: {0}")]
    Start(#[from] std::io::Error),
    #[error("cannot start: {0}")]
    Tls(#[from] edge_wire::tls::TlsError),
}

pub fn run(cfg: Config) -> Result<(), RunError> {
    let (metrics, registry) = BridgeMetrics::new();
    if !cfg.metrics.listen.is_empty() {
        let listener = std::net::TcpListener::bind(&cfg.metrics.listen)?;
        tracing::info!(addr = %cfg.metrics.listen, "serving /metrics");
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || edge_wire::exposition::serve(listener, registry))?;
    }

    let mut opts = MqttOptions::new(cfg.mqtt.client_id.clone(), cfg.mqtt.host.clone(), cfg.mqtt.port);
    opts.set_keep_alive(Duration::from_secs(cfg.mqtt.keep_alive_secs.max(5)))
        .set_clean_session(false)
        .set_manual_acks(true)
        // Incoming: MQTT's own maximum, not ours. A message over our limit
        // that reaches us (a broker without the shipped `max_packet_size`)
        // must be read, to be dead-lettered and acknowledged: refusing it
        // here would drop the connection, the broker would deliver it
        // again, and the bridge would reconnect in a loop forever.
        .set_max_packet_size(MQTT_MAX_PACKET, edge_wire::MAX_PACKET_BYTES);
    // Read once at start: a bridge with unusable TLS files stops at once,
    // naming the file, instead of retrying forever.
    if cfg.mqtt.tls.plain_to_remote(&cfg.mqtt.host) {
        tracing::warn!(
            host = %cfg.mqtt.host,
            "mqtt.tls.enabled = false: plain TCP to a broker that is not on this machine; credentials and \
             every device's data cross the network in clear"
        );
    }
    if cfg.mqtt.tls.enabled {
        let tls = cfg.mqtt.tls.client_config()?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    if let Some((user, password)) = cfg.mqtt.auth.load()? {
        opts.set_credentials(user, password);
    }
    let (client, mut connection) = Client::new(opts, 64);
    // With a share group, the broker hands each message to one bridge of the
    // group; the topic of the message stays the device's.
    let share =
        if cfg.mqtt.share_group.is_empty() { String::new() } else { format!("$share/{}/", cfg.mqtt.share_group) };
    let filter = format!("{share}{}/+/metrics", cfg.mqtt.topic_prefix);
    let presence_filter = format!("{share}{}/+/presence", cfg.mqtt.topic_prefix);
    let time_filter = format!("{share}{}/+/time", cfg.mqtt.topic_prefix);

    let (tx, rx) = mpsc::channel::<Publish>();
    let writer = Writer::new(&cfg, client.clone(), metrics.clone());
    std::thread::Builder::new().name("writer".into()).spawn(move || writer.run(rx))?;

    let mut failures = 0u32;
    let mut said = Throttle::new(Duration::from_secs(60));
    for event in connection.iter() {
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                said.reset();
                metrics.mqtt_connected.set(1);
                tracing::info!(session_present = ack.session_present, filter, "connected to broker");
                let filters = [
                    (filter.clone(), QoS::AtLeastOnce),
                    (presence_filter.clone(), QoS::AtLeastOnce),
                    // Time requests are answered at once or not at all.
                    (time_filter.clone(), QoS::AtMostOnce),
                ]
                .map(|(f, q)| rumqttc::SubscribeFilter::new(f, q));
                if let Err(e) = client.try_subscribe_many(filters) {
                    tracing::error!(error = %e, "subscribe failed");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                metrics.subscribed.set(1);
            }
            Ok(Event::Incoming(Packet::Publish(p)))
                if edge_wire::device_of(&cfg.mqtt.topic_prefix, &p.topic, "time").is_some() =>
            {
                // Answered here, not behind the writer's queue: the device
                // measures the round trip.
                answer_time(&client, &cfg.mqtt.topic_prefix, &p, &metrics);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(p).is_err() {
                    break; // writer gone
                }
            }
            Ok(_) => {}
            Err(e) => {
                metrics.mqtt_connected.set(0);
                metrics.subscribed.set(0);
                failures = failures.saturating_add(1);
                let reason = edge_wire::tls::connection_failure(&e);
                metrics.connection_failures.get_or_create(&metrics::ReasonLabels { reason: reason.into() }).inc();
                if let Some(suppressed) = said.due() {
                    tracing::warn!(
                        error = %e,
                        reason,
                        host = %cfg.mqtt.host,
                        port = cfg.mqtt.port,
                        failures,
                        suppressed,
                        "broker connection failed; retrying (said at most once a minute)"
                    );
                }
                // rumqttc reconnects on the next poll; pace it.
                std::thread::sleep(Duration::from_millis((100u64 << failures.min(6)).min(5_000)));
            }
        }
    }
    Ok(())
}

/// MQTT's largest packet (remaining length of 268,435,455 bytes).
const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

/// Answers a device's time request with this bridge's wall clock.
fn answer_time(client: &Client, prefix: &str, p: &Publish, metrics: &BridgeMetrics) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64);
    let device = edge_wire::device_of(prefix, &p.topic, "time").unwrap_or_default();
    let result = match (edge_wire::validate_device_id(device), edge_wire::TimeRequest::decode(&p.payload), now) {
        (Ok(()), Ok(req), Ok(bridge_ms)) => {
            let reply = edge_wire::TimeReply { nonce: req.nonce, bridge_ms }.encode();
            match client.try_publish(edge_wire::time_reply_topic(prefix, device), QoS::AtMostOnce, false, reply) {
                Ok(()) => "time",
                Err(_) => "time_dropped",
            }
        }
        _ => "bad_time_request",
    };
    metrics.messages.get_or_create(&metrics::ResultLabels::new(result)).inc();
}

struct Writer {
    prefix: String,
    url: String,
    agent: ureq::Agent,
    client: Client,
    metrics: BridgeMetrics,
    retry_min: Duration,
    retry_max: Duration,
    dead_letter_prefix: String,
    concurrency: usize,
    max_ahead_ms: i64,
    max_age_ms: i64,
    /// Retryable failures of one request before the store is probed.
    isolate_after: u32,
    client_id: String,
    /// Refusal warnings, at most one a minute per kind.
    said: std::sync::Mutex<std::collections::HashMap<&'static str, Throttle>>,
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
            dead_letter_prefix: cfg.mqtt.dead_letter_prefix.clone(),
            concurrency: cfg.remote_write.concurrency,
            max_ahead_ms: (cfg.remote_write.max_sample_ahead_secs * 1000) as i64,
            max_age_ms: (cfg.remote_write.max_sample_age_secs * 1000) as i64,
            isolate_after: cfg.remote_write.isolate_after_failures,
            client_id: cfg.mqtt.client_id.clone(),
            said: Default::default(),
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

    /// Returns once the message may be acknowledged: every sample is either
    /// written or refused for good by the store (and counted).
    fn handle(&self, publish: &Publish) {
        if let Some(device) = edge_wire::device_of(&self.prefix, &publish.topic, "presence") {
            self.presence(device, &publish.payload);
            return;
        }
        let bounds = TimeBounds::around(now_ms(), self.max_age_ms, self.max_ahead_ms);
        let w = match handle::prepare(&self.prefix, &publish.topic, &publish.payload, bounds) {
            Ok(w) => w,
            Err(refusal) => {
                self.metrics.messages.get_or_create(&metrics::ResultLabels::new(refusal.label())).inc();
                if let Some(suppressed) = self.said(refusal.label()) {
                    tracing::warn!(topic = %publish.topic, why = ?refusal, suppressed, "message refused (dead-lettered)");
                }
                self.dead_letter(publish, refusal.label());
                return;
            }
        };
        let mut refused = 0;
        let (device, lane, first_seq, last_seq) = (w.device.clone(), w.lane, w.first_seq, w.last_seq);
        let oob = w.out_of_bounds;
        if oob.total() > 0 {
            for (reason, n) in [("ahead", oob.ahead), ("too_old", oob.too_old)] {
                if n > 0 {
                    let labels = metrics::DeviceReasonLabels { device: device.clone(), reason: reason.into() };
                    self.metrics.samples_out_of_bounds.get_or_create(&labels).inc_by(n as u64);
                }
            }
            // Its own throttle key: "out_of_bounds" is also a reason the
            // store gives for refusing a sample (Writer::refuse).
            if let Some(suppressed) = self.said("time_bounds") {
                tracing::warn!(
                    device,
                    ahead = oob.ahead,
                    too_old = oob.too_old,
                    example_ms = ?oob.example_ms,
                    oldest_ms = bounds.oldest_ms,
                    newest_ms = bounds.newest_ms,
                    suppressed,
                    "samples outside the accepted times not written (the message is dead-lettered; \
                     remote_write.max_sample_ahead_secs / max_sample_age_secs)"
                );
            }
            self.dead_letter(publish, "out_of_bounds");
        }
        let written = if w.samples == 0 { 0 } else { self.write_parallel(w.req, &device, &mut refused) };
        // Every sample is now in the store or refused by it for good: confirm
        // the block end to end, so the device may let go of it. QoS 0 (see
        // dead_letter): a lost confirmation only means a re-send.
        let ack = edge_wire::DeliveryAck { lane, first_seq, last_seq }.encode();
        let topic = edge_wire::ack_topic(&self.prefix, &device);
        if let Err(e) = self.client.publish(topic, QoS::AtMostOnce, false, ack) {
            tracing::warn!(error = %e, "delivery confirmation not sent");
        }
        let result = match (refused, oob.total()) {
            (0, 0) => "written",
            (0, _) if written == 0 => "out_of_bounds",
            (0, _) => "partly_out_of_bounds",
            _ => "partly_refused",
        };
        self.metrics.messages.get_or_create(&metrics::ResultLabels::new(result)).inc();
        tracing::debug!(device, lane, first_seq, last_seq, written, refused, "block handled");
    }

    /// Writes a block's request as up to `remote_write.concurrency`
    /// requests at once, each with a share of the series: a series is in
    /// one part only, so its samples still arrive in order, and a block is
    /// confirmed only after every part is written. One device's drain then
    /// keeps several of the store's cores busy.
    fn write_parallel(&self, req: WriteRequest, device: &str, refused: &mut usize) -> usize {
        let parts = handle::split_series(req, self.concurrency);
        if parts.len() == 1 {
            return parts.into_iter().map(|p| self.write(p, device, refused)).sum();
        }
        let results: Vec<(usize, usize)> = std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|p| {
                    s.spawn(move || {
                        let mut r = 0;
                        (self.write(p, device, &mut r), r)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or((0, 0))).collect()
        });
        *refused += results.iter().map(|r| r.1).sum::<usize>();
        results.iter().map(|r| r.0).sum()
    }

    /// Writes a request; on a refusal (4xx) splits it and writes the halves,
    /// down to single samples, so that only the samples the store refuses are
    /// lost. Retries 429, 5xx and network errors with back-off until they
    /// succeed. Returns the samples written.
    fn write(&self, req: WriteRequest, device: &str, refused: &mut usize) -> usize {
        let n = handle::sample_count(&req);
        let body = remote_write::encode(&req);
        let mut wait = self.retry_min;
        let mut failures = 0u32;
        loop {
            let outcome = self.post(&body);
            let label = match &outcome {
                Ok(s) => metrics::status_class(s.0),
                Err(_) => "error",
            };
            self.metrics.requests.get_or_create(&metrics::StatusLabels { status: label.into() }).inc();
            let text = match outcome {
                Ok((status, text)) => match handle::verdict(status, &text) {
                    Verdict::Written => {
                        self.metrics.samples.inc_by(n as u64);
                        return n;
                    }
                    Verdict::Refused if n > 1 => return self.write_halves(req, device, refused),
                    Verdict::Refused => {
                        let reason = handle::refusal_reason(&text);
                        return self.refuse(&req, device, reason, &format!("{status} {text}"), refused);
                    }
                    Verdict::Retry => format!("{status} {text}"),
                },
                Err(e) => e.to_string(),
            };
            failures += 1;
            // A retryable failure that goes on while the store takes other
            // writes is this request's own: isolate it (halves, down to
            // single samples) instead of retrying it forever, which would
            // hold every other device's messages behind it. While the store
            // takes nothing (down, overloaded), keep retrying: nothing is
            // lost.
            if failures >= self.isolate_after && self.store_takes_writes() {
                if n > 1 {
                    return self.write_halves(req, device, refused);
                }
                return self.refuse(&req, device, "persistent_error", &text, refused);
            }
            if let Some(suppressed) = self.said("retry") {
                tracing::warn!(device, failures, answer = %text, suppressed, "store busy or failing; retrying");
            }
            self.metrics.retries.inc();
            std::thread::sleep(wait);
            wait = (wait * 2).min(self.retry_max);
        }
    }

    /// Isolates what the store refuses: writes each half of a request of
    /// two or more samples on its own.
    fn write_halves(&self, req: WriteRequest, device: &str, refused: &mut usize) -> usize {
        let (a, b) = handle::split(req);
        self.write(a, device, refused) + self.write(b, device, refused)
    }

    /// Counts a sample the store will never take; returns 0 (written).
    fn refuse(
        &self,
        req: &WriteRequest,
        device: &str,
        reason: &'static str,
        answer: &str,
        refused: &mut usize,
    ) -> usize {
        self.metrics.samples_refused.get_or_create(&metrics::ReasonLabels { reason: reason.into() }).inc();
        *refused += 1;
        if let Some(suppressed) = self.said(reason) {
            let ts = req.timeseries.first().and_then(|t| t.samples.first()).map(|s| s.timestamp);
            tracing::warn!(device, reason, timestamp = ?ts, answer, suppressed, "store refused a sample");
        }
        0
    }

    /// Whether the store takes a write now: one sample of
    /// `fleet_bridge_store_probe{bridge}` (docs/metrics.md).
    fn store_takes_writes(&self) -> bool {
        let probe = handle::store_probe(&self.client_id, now_ms());
        matches!(self.post(&remote_write::encode(&probe)), Ok((s, _)) if (200..300).contains(&s))
    }

    /// A device's retained birth (`online`) or last will (`offline`) becomes
    /// a sample of `edge_device_online{device}`, 1 or 0, stamped when it
    /// arrived. Written on every change and every bridge (re)subscription,
    /// so query it with `last_over_time(edge_device_online[1d])`.
    fn presence(&self, device: &str, payload: &[u8]) {
        let value = match payload {
            b"online" => 1.0,
            b"offline" => 0.0,
            _ => {
                self.metrics.messages.get_or_create(&metrics::ResultLabels::new("bad_presence")).inc();
                return;
            }
        };
        if edge_wire::validate_device_id(device).is_err() {
            self.metrics.messages.get_or_create(&metrics::ResultLabels::new("bad_topic")).inc();
            return;
        }
        let req = WriteRequest { timeseries: vec![remote_write::presence(device, value, now_ms())] };
        let mut refused = 0;
        self.write(req, device, &mut refused);
        self.metrics.messages.get_or_create(&metrics::ResultLabels::new("presence")).inc();
        tracing::info!(device, online = value == 1.0, "device presence");
    }

    /// Whether to log a refusal of this kind now (at most once a minute),
    /// and how many went unlogged since.
    fn said(&self, kind: &'static str) -> Option<u64> {
        self.said
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(kind)
            .or_insert_with(|| Throttle::new(Duration::from_secs(60)))
            .due()
    }

    /// Republishes a message that can never be written on the dead-letter
    /// topic, so it can be looked at; it never blocks the device's stream.
    /// A payload over the size limit goes as an empty message (the topic
    /// still says why).
    fn dead_letter(&self, publish: &Publish, why: &str) {
        let topic = format!("{}/{}", self.dead_letter_prefix, why);
        if self.dead_letter_prefix.is_empty() {
            return;
        }
        let payload =
            if publish.payload.len() > edge_wire::MAX_MESSAGE_BYTES { Vec::new() } else { publish.payload.to_vec() };
        // QoS 0, on purpose: rumqttc takes no request at all, our manual
        // PUBACKs included, while its outgoing QoS 1 window is full
        // (eventloop.rs, `!inflight_full`), and the broker sends us nothing
        // new until we acknowledge. With QoS 1 dead letters a burst of
        // garbage could wedge the bridge on a slow broker. Dead letters are
        // diagnostics: best effort.
        if let Err(e) = self.client.publish(topic, QoS::AtMostOnce, false, payload) {
            tracing::warn!(error = %e, "dead-letter publish failed");
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
            String::new() // not read: a 2xx body says nothing we use
        } else {
            resp.body_mut().with_config().limit(4096).read_to_string().unwrap_or_default()
        };
        Ok((status, text.trim().to_owned()))
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEET_BRIDGE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
