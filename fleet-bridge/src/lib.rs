//! fleet-bridge: MQTT (devices' stored batches) -> Prometheus remote write.
//!
//! Stateless: the broker holds everything not yet written (persistent
//! session, QoS 1, manual acknowledgements; or a NATS cluster's JetStream
//! work queue, nats.rs). A message is acknowledged only
//! after the remote-write endpoint answered 2xx, or when it can never be
//! written (then it is counted); on 5xx, 429 or network errors the bridge
//! retries with back-off and acknowledges nothing meanwhile.

pub mod audit;
pub mod batch;
pub mod certificates;
pub mod config;
pub mod handle;
pub mod metrics;
pub mod nats;
pub mod operator;
pub mod remote_write;
pub mod rollout;

use rumqttc::{Client, MqttOptions, Packet, Publish, QoS, TlsConfiguration, Transport};
use std::sync::mpsc;
use std::time::Duration;

use batch::{Batch, CopyKey, Finished, Limits, PartOutcome, Pipeline, Recent, Seen};
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
    #[error("cannot start: the audit log directory {dir} (audit.dir): {source}")]
    Audit { dir: String, source: std::io::Error },
}

/// The audit log, shared by the pipeline threads of one run.
type SharedAudit = std::sync::Arc<std::sync::Mutex<audit::AuditLog>>;

pub fn run(cfg: Config) -> Result<(), RunError> {
    let (metrics, registry) = BridgeMetrics::new();
    let audit = audit::AuditLog::open(&cfg.audit.dir, &cfg.mqtt.client_id)
        .map_err(|source| RunError::Audit { dir: cfg.audit.dir.display().to_string(), source })?;
    let audit: SharedAudit = std::sync::Arc::new(std::sync::Mutex::new(audit));
    if !cfg.metrics.listen.is_empty() {
        let listener = std::net::TcpListener::bind(&cfg.metrics.listen)?;
        tracing::info!(addr = %cfg.metrics.listen, "serving /metrics");
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || edge_wire::exposition::serve(listener, registry))?;
    }
    if cfg.jetstream.enabled() {
        run_jetstream(cfg, metrics, audit)
    } else {
        run_mqtt(cfg, metrics, audit)
    }
}

/// The pipeline fed from a NATS cluster's JetStream (nats.rs).
fn run_jetstream(cfg: Config, metrics: BridgeMetrics, audit: SharedAudit) -> Result<(), RunError> {
    let (tx, rx) = mpsc::channel::<Event>();
    let credits = std::sync::Arc::new(Credits::new(TAKEN_BYTES));
    let events = tx.clone();
    let (pipeline_metrics, pipeline_credits, pipeline_cfg) = (metrics.clone(), credits.clone(), cfg.clone());
    nats::run(&cfg, metrics, credits, tx, move |link| {
        let writer = std::sync::Arc::new(Writer::new(
            &pipeline_cfg,
            link,
            pipeline_metrics,
            Default::default(),
            pipeline_credits,
            audit,
        ));
        if let Err(e) = std::thread::Builder::new().name("pipeline".into()).spawn(move || writer.run(rx, events)) {
            tracing::error!(error = %e, "cannot start the pipeline thread");
        }
    })
}

/// TLS and credentials of `[mqtt]` into `opts`. Read once at start: a
/// bridge with unusable TLS files stops at once, naming the file, instead
/// of retrying forever.
pub fn secure(m: &config::MqttConfig, opts: &mut MqttOptions) -> Result<(), RunError> {
    if m.tls.plain_to_remote(&m.host) {
        tracing::warn!(
            host = %m.host,
            "mqtt.tls.enabled = false: plain TCP to a broker that is not on this machine; credentials and \
             every device's data cross the network in clear"
        );
    }
    if m.tls.enabled {
        let tls = m.tls.client_config()?;
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    }
    if let Some((user, password)) = m.auth.load()? {
        opts.set_credentials(user, password);
    }
    Ok(())
}

/// The pipeline fed over MQTT.
fn run_mqtt(cfg: Config, metrics: BridgeMetrics, audit: SharedAudit) -> Result<(), RunError> {
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
    secure(&cfg.mqtt, &mut opts)?;
    let (client, mut connection) = Client::new(opts, 64);
    // With a share group, the broker hands each message to one bridge of the
    // group; the topic of the message stays the device's.
    let share =
        if cfg.mqtt.share_group.is_empty() { String::new() } else { format!("$share/{}/", cfg.mqtt.share_group) };
    let filter = format!("{share}{}/+/metrics", cfg.mqtt.topic_prefix);
    let presence_filter = format!("{share}{}/+/presence", cfg.mqtt.topic_prefix);
    answer_time_requests(&cfg, &share, metrics.clone())?;

    // Unbounded on purpose: what the broker sends us unacknowledged is
    // bounded by its in-flight window, and the pipeline stops taking
    // messages in (decoding them) past remote_write.max_pending_bytes.
    let (tx, rx) = mpsc::channel::<Event>();
    // The connection a message came on: a packet id means something only
    // on its own connection. After a reconnection the broker sends again
    // what was not acknowledged, under new ids; acknowledging an old id on
    // the new connection would acknowledge some other message (or make the
    // broker close the connection).
    let connection_no = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let credits = std::sync::Arc::new(Credits::new(TAKEN_BYTES));
    let writer = std::sync::Arc::new(Writer::new(
        &cfg,
        Link::Mqtt(client.clone()),
        metrics.clone(),
        connection_no.clone(),
        credits.clone(),
        audit,
    ));
    // How long the reader waits for room before it takes a message anyway:
    // while it waits, the client sends nothing, not even its keep-alive.
    let credit_wait = Duration::from_secs(cfg.mqtt.keep_alive_secs.max(5) / 3);
    let events = tx.clone();
    std::thread::Builder::new().name("pipeline".into()).spawn(move || writer.run(rx, events))?;

    let mut failures = 0u32;
    let mut said = Throttle::new(Duration::from_secs(60));
    // Subscribing waits for room in the client's request queue (which
    // acknowledgements may fill): tried again on every event until taken.
    let mut subscribe = false;
    for event in connection.iter() {
        match event {
            Ok(rumqttc::Event::Incoming(Packet::ConnAck(ack))) => {
                failures = 0;
                said.reset();
                connection_no.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                metrics.mqtt_connected.set(1);
                tracing::info!(session_present = ack.session_present, filter, "connected to broker");
                subscribe = true;
            }
            Ok(rumqttc::Event::Incoming(Packet::SubAck(_))) => {
                metrics.subscribed.set(1);
            }
            Ok(rumqttc::Event::Incoming(Packet::Publish(p)))
                if edge_wire::device_of(&cfg.mqtt.topic_prefix, &p.topic, "time").is_some() =>
            {
                // Only on a persistent session an older bridge subscribed
                // to time requests too: answered, if late.
                answer_time(&Link::Mqtt(client.clone()), &cfg.mqtt.topic_prefix, &p.topic, &p.payload, &metrics);
            }
            Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                // Backpressure: no more than TAKEN_BYTES of messages taken
                // from the broker and not yet done with; past that the
                // client stops reading and the broker keeps them.
                credits.take(p.payload.len(), credit_wait);
                let connection = connection_no.load(std::sync::atomic::Ordering::SeqCst);
                let ack = Ack::Mqtt { pkid: p.pkid, qos: p.qos, connection };
                if tx.send(self::Event::Publish(Incoming { topic: p.topic, payload: p.payload, ack })).is_err() {
                    break; // pipeline gone
                }
            }
            Ok(_) => {}
            Err(e) => {
                metrics.mqtt_connected.set(0);
                metrics.subscribed.set(0);
                subscribe = false;
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
                std::thread::sleep(reconnect_pause(failures));
            }
        }
        if subscribe {
            let filters = [(filter.clone(), QoS::AtLeastOnce), (presence_filter.clone(), QoS::AtLeastOnce)]
                .map(|(f, q)| rumqttc::SubscribeFilter::new(f, q));
            subscribe = client.try_subscribe_many(filters).is_err();
        }
    }
    Ok(())
}

/// How long to wait before the next connection attempt after `failures`
/// failed ones in a row: 0.2 s doubling, up to 5 s.
fn reconnect_pause(failures: u32) -> Duration {
    Duration::from_millis((100u64 << failures.min(6)).min(5_000))
}

/// Answers the devices' time requests on a connection of their own
/// (client id `<client_id>-time`, clean session, QoS 0), on a thread of its
/// own. Not on the blocks' connection: the broker delivers a connection's
/// messages in order, so a request would wait behind every block queued
/// for the bridge (a fleet's backlog after an outage: tens of seconds), the
/// device would discard the late answer (it measures the round trip) and
/// hold its backlog until `clock.sync_wait_secs`, then send it uncorrected.
fn answer_time_requests(cfg: &Config, share: &str, metrics: BridgeMetrics) -> Result<(), RunError> {
    let m = &cfg.mqtt;
    let mut opts = MqttOptions::new(format!("{}-time", m.client_id), m.host.clone(), m.port);
    opts.set_keep_alive(Duration::from_secs(m.keep_alive_secs.max(5)))
        .set_clean_session(true)
        // As the blocks' connection: a request over any smaller limit would
        // end the connection (and the answers to every other device).
        .set_max_packet_size(MQTT_MAX_PACKET, edge_wire::MAX_PACKET_BYTES);
    secure(m, &mut opts)?;
    let (client, mut connection) = Client::new(opts, 64);
    let filter = format!("{share}{}/+/time", m.topic_prefix);
    let (prefix, host, port) = (m.topic_prefix.clone(), m.host.clone(), m.port);
    std::thread::Builder::new().name("time".into()).spawn(move || {
        let link = Link::Mqtt(client.clone());
        let mut failures = 0u32;
        let mut said = Throttle::new(Duration::from_secs(60));
        let mut subscribe = false;
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                    failures = 0;
                    said.reset();
                    subscribe = true;
                }
                Ok(rumqttc::Event::Incoming(Packet::Publish(p))) => {
                    answer_time(&link, &prefix, &p.topic, &p.payload, &metrics);
                }
                Ok(_) => {}
                Err(e) => {
                    subscribe = false;
                    failures = failures.saturating_add(1);
                    if let Some(suppressed) = said.due() {
                        tracing::warn!(
                            error = %e,
                            host = %host,
                            port,
                            failures,
                            suppressed,
                            "time requests' broker connection failed; retrying (said at most once a minute)"
                        );
                    }
                    std::thread::sleep(reconnect_pause(failures));
                }
            }
            // Requests are answered at once or not at all: QoS 0.
            if subscribe {
                subscribe = client.try_subscribe(filter.clone(), QoS::AtMostOnce).is_err();
            }
        }
    })?;
    Ok(())
}

/// Bytes of messages taken from the broker and not yet done with (written
/// or refused, and ready to be acknowledged), at most (then the client stops reading; the broker keeps the rest):
/// with the decoded samples (`remote_write.max_pending_bytes`), what bounds
/// the bridge's memory whatever the fleet's backlog. mosquitto 2.0 was seen
/// sending a resuming bridge its whole queue regardless of
/// `max_inflight_messages`.
const TAKEN_BYTES: usize = 64 << 20;

/// A budget of bytes, taken by the reader as messages come and given back
/// by the pipeline when it is done with them.
struct Credits {
    /// Below zero after a message larger than what was left, or taken
    /// anyway (see `take`).
    free: std::sync::Mutex<isize>,
    freed: std::sync::Condvar,
}

impl Credits {
    fn new(n: usize) -> Credits {
        Credits { free: std::sync::Mutex::new(n as isize), freed: std::sync::Condvar::new() }
    }

    /// Takes `n` bytes once any are free, waiting up to `wait`; after that
    /// takes them anyway (the bound is soft: a reader stuck longer would
    /// miss the broker's keep-alive).
    fn take(&self, n: usize, wait: Duration) {
        let free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let (mut free, _) = self.freed.wait_timeout_while(free, wait, |f| *f <= 0).unwrap_or_else(|p| p.into_inner());
        *free -= n as isize;
    }

    /// Takes `n` bytes if any are free now.
    fn try_take(&self, n: usize) -> bool {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if *free <= 0 {
            return false;
        }
        *free -= n as isize;
        true
    }

    fn give(&self, n: usize) {
        *self.free.lock().unwrap_or_else(|p| p.into_inner()) += n as isize;
        self.freed.notify_one();
    }
}

/// Requests handed to a shard's writer at once: the one it writes and the
/// next one, ready for when the store answers.
const QUEUED_PER_WRITER: usize = 2;

/// Written blocks remembered to spot a device's copies (batch::Recent):
/// at 1,000 devices sending one block a window, 10 minutes of blocks;
/// about 10 MB.
const REMEMBERED_BLOCKS: usize = 65_536;

/// MQTT's largest packet (remaining length of 268,435,455 bytes).
const MQTT_MAX_PACKET: usize = 268_435_455 + 5;

/// Answers a device's time request with this bridge's wall clock.
fn answer_time(link: &Link, prefix: &str, topic: &str, payload: &[u8], metrics: &BridgeMetrics) {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64);
    let device = edge_wire::device_of(prefix, topic, "time").unwrap_or_default();
    let result = match (edge_wire::validate_device_id(device), edge_wire::TimeRequest::decode(payload), now) {
        (Ok(()), Ok(req), Ok(bridge_ms)) => {
            let reply = edge_wire::TimeReply { nonce: req.nonce, bridge_ms }.encode();
            if link.try_publish(&edge_wire::time_reply_topic(prefix, device), reply) {
                "time"
            } else {
                "time_dropped"
            }
        }
        _ => "bad_time_request",
    };
    metrics.messages.get_or_create(&metrics::ResultLabels::new(result)).inc();
}

/// What became of a request ([`Writer::send`]), with the store's answer.
enum Sent {
    Written,
    /// Refused for good (4xx, or a per-sample error Prometheus answers
    /// with 5xx).
    Refused(String),
    /// Failing again and again while the store takes other writes.
    Failing(String),
}

/// A device's message as the bridge took it: from the broker over MQTT,
/// or from the cluster's JetStream (nats.rs).
struct Incoming {
    topic: String,
    payload: bytes::Bytes,
    ack: Ack,
}

/// How a message is acknowledged once the pipeline is done with it.
enum Ack {
    /// MQTT: its packet, on the connection it came on (a packet id means
    /// something only on its own connection).
    Mqtt { pkid: u16, qos: QoS, connection: u64 },
    /// JetStream: acknowledged to the consumer (any connection).
    JetStream(Box<async_nats::jetstream::message::Acker>),
}

impl Incoming {
    /// Whether it came on a connection that is gone (then the broker sends
    /// it again on the new one).
    fn stale(&self, connection_now: u64) -> bool {
        matches!(self.ack, Ack::Mqtt { connection, .. } if connection != connection_now)
    }
}

/// Where the bridge sends confirmations, time answers and dead letters:
/// the MQTT client, or the NATS client (whose messages the cluster hands to
/// MQTT subscribers at QoS 0).
#[derive(Clone)]
enum Link {
    Mqtt(Client),
    Nats { client: async_nats::Client, rt: tokio::runtime::Handle },
}

impl Link {
    /// Sends at most once, never blocking; false when the client has no
    /// room now.
    fn try_publish(&self, topic: &str, payload: Vec<u8>) -> bool {
        match self {
            Link::Mqtt(c) => c.try_publish(topic, QoS::AtMostOnce, false, payload).is_ok(),
            Link::Nats { client, rt } => {
                let (client, subject) = (client.clone(), nats::subject_of(topic));
                rt.spawn(async move {
                    if let Err(e) = client.publish(subject, payload.into()).await {
                        tracing::debug!(error = %e, "NATS publish failed");
                    }
                });
                true
            }
        }
    }

    /// Sends at most once, waiting for room in the client's queue.
    fn publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Link::Mqtt(c) => c.publish(topic, QoS::AtMostOnce, false, payload).map_err(|e| e.to_string()),
            Link::Nats { .. } => {
                self.try_publish(topic, payload);
                Ok(())
            }
        }
    }
}

/// What the pipeline thread hears.
enum Event {
    /// A message from the broker or the stream.
    Publish(Incoming),
    /// A shard's request was written (or refused for good).
    Written { shard: usize, bytes: usize, outcomes: Vec<PartOutcome> },
}

/// A message in the pipeline.
struct Msg {
    incoming: Incoming,
    kind: MsgKind,
}

enum MsgKind {
    /// Refused or not understood: counted when it came, acknowledged in
    /// its turn.
    Settled,
    /// A device's block: confirmed to it once written.
    Block { lane: u8, first_seq: u64, last_seq: u64, out_of_bounds: usize, key: Option<CopyKey> },
    /// A device's audit records, logged (audit.rs): confirmed in turn.
    Audit { lane: u8, first_seq: u64, last_seq: u64 },
    /// A copy of a block in the pipeline (done with it) or lately written
    /// (confirmed again: `confirm`), batch::Recent.
    Copy { confirm: Option<(u8, u64, u64)> },
    /// A device's retained birth (`online`) or last will (`offline`): a
    /// sample of `edge_device_online{device}`, 1 or 0, stamped when it
    /// arrived. Written on every change and every bridge (re)subscription,
    /// so query it with `last_over_time(edge_device_online[1d])`.
    Presence { online: bool },
}

struct Writer {
    prefix: String,
    url: String,
    agent: ureq::Agent,
    link: Link,
    metrics: BridgeMetrics,
    retry_min: Duration,
    retry_max: Duration,
    dead_letter_prefix: String,
    limits: Limits,
    max_pending_bytes: usize,
    max_ahead_ms: i64,
    max_age_ms: i64,
    /// Retryable failures of one request before the store is probed.
    isolate_after: u32,
    client_id: String,
    /// The broker connection now (run() counts them).
    connection_no: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Room for messages taken from the broker and not yet done with.
    credits: std::sync::Arc<Credits>,
    /// Delivery confirmations not yet handed to the client: (topic, payload).
    outbox: std::sync::Mutex<std::collections::VecDeque<(String, Vec<u8>)>>,
    /// Keys of the payload hash that spots copies (two seeds drawn at
    /// random per process).
    copy_keys: (foldhash::quality::RandomState, foldhash::quality::RandomState),
    /// Refusal warnings, at most one a minute per kind.
    said: std::sync::Mutex<std::collections::HashMap<&'static str, Throttle>>,
    /// The devices' audit trails (audit.rs).
    audit: SharedAudit,
}

impl Writer {
    fn new(
        cfg: &Config,
        link: Link,
        metrics: BridgeMetrics,
        connection_no: std::sync::Arc<std::sync::atomic::AtomicU64>,
        credits: std::sync::Arc<Credits>,
        audit: SharedAudit,
    ) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_millis(cfg.remote_write.timeout_ms)))
            .build()
            .into();
        Writer {
            prefix: cfg.mqtt.topic_prefix.clone(),
            url: cfg.remote_write.url.clone(),
            agent,
            link,
            metrics,
            retry_min: Duration::from_millis(cfg.remote_write.retry_min_ms),
            retry_max: Duration::from_millis(cfg.remote_write.retry_max_ms),
            dead_letter_prefix: cfg.mqtt.dead_letter_prefix.clone(),
            limits: Limits {
                shards: cfg.remote_write.concurrency,
                max_samples: cfg.remote_write.batch_max_samples,
                max_age: Duration::from_millis(cfg.remote_write.batch_max_age_ms),
            },
            max_pending_bytes: cfg.remote_write.max_pending_bytes,
            max_ahead_ms: (cfg.remote_write.max_sample_ahead_secs * 1000) as i64,
            max_age_ms: (cfg.remote_write.max_sample_age_secs * 1000) as i64,
            isolate_after: cfg.remote_write.isolate_after_failures,
            client_id: cfg.mqtt.client_id.clone(),
            connection_no,
            credits,
            outbox: Default::default(),
            copy_keys: Default::default(),
            said: Default::default(),
            audit,
        }
    }

    /// The pipeline: messages in (decoded, checked, their series into the
    /// shards' requests, batch.rs), requests out to the shards' writers
    /// (one request in flight per shard, the next one queued), each message confirmed to its
    /// device once every request holding its samples is written, and
    /// acknowledged to the broker in the order it came.
    fn run(self: std::sync::Arc<Self>, rx: mpsc::Receiver<Event>, events: mpsc::Sender<Event>) {
        let mut pipe: Pipeline<Msg> = Pipeline::new(self.limits);
        let shards = self.limits.shards;
        let writers: Vec<mpsc::Sender<Batch>> = (0..shards)
            .filter_map(|shard| {
                let (tx, batches) = mpsc::channel::<Batch>();
                let (me, events) = (self.clone(), events.clone());
                let spawned = std::thread::Builder::new().name(format!("writer-{shard}")).spawn(move || {
                    for b in batches {
                        let bytes = b.bytes();
                        let outcomes = me.write_batch(b);
                        if events.send(Event::Written { shard, bytes, outcomes }).is_err() {
                            break;
                        }
                    }
                });
                match spawned {
                    Ok(_) => Some(tx),
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start a writer thread");
                        None
                    }
                }
            })
            .collect();
        drop(events);
        if writers.len() != shards {
            return;
        }
        let mut queued: Vec<std::collections::VecDeque<Batch>> = (0..shards).map(|_| Default::default()).collect();
        // Requests handed to each shard's writer and not yet written: up
        // to QUEUED_PER_WRITER, so that a writer starts its next request the
        // moment the store answers the last one, not after a round through
        // this thread (which may be decoding messages meanwhile). Still one
        // thread per shard: its requests are written one after the other.
        let mut busy = vec![0usize; shards];
        // Taken from the broker, not yet decoded: waits while the pipeline
        // holds max_pending_bytes.
        let mut waiting: std::collections::VecDeque<Incoming> = Default::default();
        let mut recent = Recent::new(REMEMBERED_BLOCKS);
        // Acknowledgements the client's request queue had no room for yet,
        // in order.
        let mut unacked: std::collections::VecDeque<(u64, Publish)> = Default::default();
        loop {
            let now = std::time::Instant::now();
            let retry = !unacked.is_empty() || !self.outbox.lock().unwrap_or_else(|p| p.into_inner()).is_empty();
            let timeout = pipe
                .next_due(|s| busy[s] < QUEUED_PER_WRITER && queued[s].is_empty())
                .map_or(Duration::from_secs(1), |t| t.saturating_duration_since(now))
                .min(if retry { Duration::from_millis(5) } else { Duration::MAX });
            match rx.recv_timeout(timeout) {
                Ok(Event::Publish(m)) => waiting.push_back(m),
                Ok(Event::Written { shard, bytes, outcomes }) => {
                    busy[shard] -= 1;
                    for f in pipe.written(bytes, &outcomes) {
                        self.finish(&pipe, &mut recent, f);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            while pipe.pending_bytes() < self.max_pending_bytes {
                let Some(m) = waiting.pop_front() else { break };
                if m.stale(self.connection()) {
                    self.credits.give(m.payload.len());
                    continue; // the broker sends it again on the new connection
                }
                for b in self.admit(&mut pipe, &mut recent, m) {
                    queued[b.shard].push_back(b);
                }
            }
            let now = std::time::Instant::now();
            for shard in 0..shards {
                while busy[shard] < QUEUED_PER_WRITER {
                    let Some(b) = queued[shard].pop_front().or_else(|| pipe.take_due(shard, now)) else { break };
                    busy[shard] += 1;
                    if writers[shard].send(b).is_err() {
                        return;
                    }
                }
            }
            self.metrics.pending_bytes.set(pipe.pending_bytes() as i64);
            self.metrics.waiting_messages.set(waiting.len() as i64);
            let now_on = self.connection();
            for m in pipe.take_acks() {
                self.credits.give(m.incoming.payload.len());
                match m.incoming.ack {
                    Ack::Mqtt { pkid, qos, connection } if connection == now_on => {
                        // Only what the acknowledgement needs: the
                        // payload's memory goes now.
                        let mut ack = Publish::new("", qos, Vec::new());
                        ack.pkid = pkid;
                        unacked.push_back((connection, ack));
                    }
                    Ack::Mqtt { .. } => {}
                    Ack::JetStream(acker) => self.ack_jetstream(acker),
                }
            }
            // Never blocking on the client's request queue: the reader may
            // be waiting for this thread (credits), and only the reader
            // empties that queue.
            while let Some((on, p)) = unacked.front() {
                if let Link::Mqtt(client) = &self.link {
                    if *on == self.connection() && client.try_ack(p).is_err() {
                        break;
                    }
                }
                unacked.pop_front();
            }
            self.send_confirmations();
        }
    }

    /// Takes a message into the pipeline: a device's block (its samples
    /// within the time bounds), a copy of a block in the pipeline or lately
    /// written (batch::Recent), a presence change, or something refused
    /// (counted, dead-lettered, acknowledged in its turn). Returns the
    /// requests it filled.
    fn admit(&self, pipe: &mut Pipeline<Msg>, recent: &mut Recent, incoming: Incoming) -> Vec<Batch> {
        let now = std::time::Instant::now();
        let key: Option<CopyKey> = edge_wire::device_of_topic(&self.prefix, &incoming.topic)
            .map(|_| (incoming.topic.as_str().into(), self.copy_hash(&incoming.payload)));
        match key.as_ref().and_then(|k| recent.get(k)) {
            Some(Seen::Pending(leader)) => {
                let (id, done) = pipe.follow(Msg { incoming, kind: MsgKind::Copy { confirm: None } }, leader);
                if done {
                    self.finish(pipe, recent, Finished { msg: id, written: 0, refused: 0 });
                }
                return Vec::new();
            }
            Some(Seen::Written(lane, first, last)) => {
                let kind = MsgKind::Copy { confirm: Some((lane, first, last)) };
                let (id, _) = pipe.admit(
                    Msg { incoming, kind },
                    &"".into(),
                    std::iter::empty::<remote_write::DeviceSeries>(),
                    now,
                );
                self.finish(pipe, recent, Finished { msg: id, written: 0, refused: 0 });
                return Vec::new();
            }
            None => {}
        }
        let (mut kind, device, batch) = self.classify(&incoming);
        if let MsgKind::Block { key: k, .. } = &mut kind {
            *k = key.clone();
        }
        let empty = batch.series.is_empty();
        let block = matches!(kind, MsgKind::Block { .. });
        let series = batch.series.iter().map(|series| remote_write::DeviceSeries { device: &device, series });
        let (id, full) = pipe.admit(Msg { incoming, kind }, &device, series, now);
        if let (true, Some(k)) = (block, key) {
            recent.pending(k, id);
        }
        if empty {
            self.finish(pipe, recent, Finished { msg: id, written: 0, refused: 0 });
        }
        full
    }

    /// A payload's 128-bit hash, seeded at random per process: a device
    /// cannot aim at a collision (and one would only ever match its own
    /// messages: the key holds the topic). foldhash, not SipHash: hashing
    /// every payload twice with SipHash was a sixth of the pipeline
    /// thread's CPU.
    fn copy_hash(&self, payload: &[u8]) -> u128 {
        use std::hash::BuildHasher;
        (u128::from(self.copy_keys.0.hash_one(payload)) << 64) | u128::from(self.copy_keys.1.hash_one(payload))
    }

    /// What a message is and the series it brings (the bridge adds their
    /// `device` label).
    fn classify(&self, publish: &Incoming) -> (MsgKind, std::sync::Arc<str>, edge_wire::Batch) {
        let settled = || (MsgKind::Settled, std::sync::Arc::<str>::from(""), edge_wire::Batch { series: Vec::new() });
        if let Some(device) = edge_wire::device_of(&self.prefix, &publish.topic, "presence") {
            let online = match &publish.payload[..] {
                b"online" => true,
                b"offline" => false,
                _ => {
                    self.metrics.messages.get_or_create(&metrics::ResultLabels::new("bad_presence")).inc();
                    return settled();
                }
            };
            if edge_wire::validate_device_id(device).is_err() {
                self.metrics.messages.get_or_create(&metrics::ResultLabels::new("bad_topic")).inc();
                return settled();
            }
            let series = vec![remote_write::presence(if online { 1.0 } else { 0.0 }, now_ms())];
            return (MsgKind::Presence { online }, device.into(), edge_wire::Batch { series });
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
                return settled();
            }
        };
        if let Some(block) = &w.audit {
            if !self.log_audit(&w.device, block) {
                // Not confirmed: the device sends the block again.
                return settled();
            }
            let kind = MsgKind::Audit { lane: w.lane, first_seq: w.first_seq, last_seq: w.last_seq };
            return (kind, w.device.as_str().into(), w.batch);
        }
        let oob = w.out_of_bounds;
        if oob.total() > 0 {
            for (reason, n) in [("ahead", oob.ahead), ("too_old", oob.too_old)] {
                if n > 0 {
                    let labels = metrics::DeviceReasonLabels { device: w.device.clone(), reason: reason.into() };
                    self.metrics.samples_out_of_bounds.get_or_create(&labels).inc_by(n as u64);
                }
            }
            // Its own throttle key: "out_of_bounds" is also a reason the
            // store gives for refusing a sample (Writer::refuse).
            if let Some(suppressed) = self.said("time_bounds") {
                tracing::warn!(
                    device = w.device,
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
        let kind = MsgKind::Block {
            lane: w.lane,
            first_seq: w.first_seq,
            last_seq: w.last_seq,
            out_of_bounds: oob.total(),
            key: None,
        };
        (kind, w.device.as_str().into(), w.batch)
    }

    /// A device's audit records into the log, each counted by how it fits
    /// its chain; false when the log could not take them (not confirmed).
    fn log_audit(&self, device: &str, block: &audit::Block) -> bool {
        let links = match self.audit.lock().unwrap_or_else(|p| p.into_inner()).append(device, block, now_ms()) {
            Ok(links) => links,
            Err(e) => {
                self.metrics
                    .audit_records
                    .get_or_create(&metrics::LinkLabels::new("not_logged"))
                    .inc_by(block.frames.len() as u64);
                tracing::error!(device, error = %e, "audit records not logged; the device will send them again");
                return false;
            }
        };
        for ((r, _), link) in block.frames.iter().zip(links) {
            self.metrics.audit_records.get_or_create(&metrics::LinkLabels::new(link.label())).inc();
            let problem = match link {
                edge_wire::audit::Link::Gap { missing } => {
                    let labels = metrics::DeviceLabels { device: device.into() };
                    self.metrics.audit_missing.get_or_create(&labels).inc_by(missing);
                    Some("gap")
                }
                edge_wire::audit::Link::Break => Some("break"),
                edge_wire::audit::Link::Fork => Some("fork"),
                edge_wire::audit::Link::NewChain => Some("new_chain"),
                _ => None,
            };
            if let Some(kind) = problem {
                let labels = metrics::DeviceReasonLabels { device: device.into(), reason: kind.into() };
                self.metrics.audit_problems.get_or_create(&labels).inc();
                tracing::warn!(device, kind, index = r.index, event = %r.event, ?link, "audit chain: {kind}");
            }
        }
        true
    }

    /// Every sample of a message is now in the store or refused by it for
    /// good: confirm a block end to end, so the device may let go of it.
    /// QoS 0 (see dead_letter): a lost confirmation only means a re-send.
    fn finish(&self, pipe: &Pipeline<Msg>, recent: &mut Recent, f: Finished) {
        let Some(m) = pipe.meta(f.msg) else { return };
        let device = edge_wire::device_of_topic(&self.prefix, &m.incoming.topic).unwrap_or_default();
        let (lane, first_seq, last_seq, out_of_bounds) = match &m.kind {
            MsgKind::Settled => return,
            MsgKind::Presence { online } => {
                let device = edge_wire::device_of(&self.prefix, &m.incoming.topic, "presence").unwrap_or_default();
                self.metrics.messages.get_or_create(&metrics::ResultLabels::new("presence")).inc();
                tracing::info!(device, online, "device presence");
                return;
            }
            MsgKind::Copy { confirm } => {
                // A copy of a block in the pipeline is confirmed with it.
                if let Some((lane, first_seq, last_seq)) = *confirm {
                    self.confirm(device, lane, first_seq, last_seq);
                }
                self.metrics.messages.get_or_create(&metrics::ResultLabels::new("copy")).inc();
                return;
            }
            MsgKind::Audit { lane, first_seq, last_seq } => {
                self.confirm(device, *lane, *first_seq, *last_seq);
                self.metrics.messages.get_or_create(&metrics::ResultLabels::new("audit")).inc();
                return;
            }
            MsgKind::Block { lane, first_seq, last_seq, out_of_bounds, key } => {
                if let Some(key) = key {
                    recent.written(key.clone(), *lane, *first_seq, *last_seq);
                }
                (*lane, *first_seq, *last_seq, *out_of_bounds)
            }
        };
        self.confirm(device, lane, first_seq, last_seq);
        let result = match (f.refused, out_of_bounds) {
            (0, 0) => "written",
            (0, _) if f.written == 0 => "out_of_bounds",
            (0, _) => "partly_out_of_bounds",
            _ => "partly_refused",
        };
        self.metrics.messages.get_or_create(&metrics::ResultLabels::new(result)).inc();
        tracing::debug!(device, lane, first_seq, last_seq, written = f.written, refused = f.refused, "block handled");
    }

    /// Tells a device its records `first_seq..=last_seq` are in the store.
    /// Queued here and sent by [`Writer::send_confirmations`], in order,
    /// without ever blocking on the client's request queue.
    fn confirm(&self, device: &str, lane: u8, first_seq: u64, last_seq: u64) {
        let ack = edge_wire::DeliveryAck { lane, first_seq, last_seq }.encode();
        let topic = edge_wire::ack_topic(&self.prefix, device);
        self.outbox.lock().unwrap_or_else(|p| p.into_inner()).push_back((topic, ack));
    }

    fn send_confirmations(&self) {
        let mut outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((topic, ack)) = outbox.front() {
            if !self.link.try_publish(topic, ack.clone()) {
                break;
            }
            outbox.pop_front();
        }
    }

    /// Writes a request of many messages' series. On a refusal, or a
    /// failure that goes on while the store takes other writes, each
    /// message's part is written on its own ([`Writer::write`]: halves down
    /// to single samples), so only what the store refuses is lost, counted
    /// against its device.
    fn write_batch(&self, b: Batch) -> Vec<PartOutcome> {
        match self.send(&remote_write::compress(&b.body), b.samples, "") {
            Sent::Written => b.written_whole(),
            Sent::Refused(_) | Sent::Failing(_) => self.write_parts(&b),
        }
    }

    /// Each message's part of a request written on its own.
    fn write_parts(&self, b: &Batch) -> Vec<PartOutcome> {
        b.parts()
            .map(|(part, body)| {
                let mut refused = 0;
                let written = match Batch::request(body) {
                    Ok(req) => self.write(req, &part.device, &mut refused),
                    // Bytes this bridge encoded itself always decode; were
                    // they not to, the part is written whole, or refused
                    // whole as the store says, never dropped uncounted.
                    Err(e) => {
                        tracing::error!(device = %part.device, error = %e, "a request part does not decode; written whole");
                        self.write_undivided(body, part.samples, &part.device, &mut refused)
                    }
                };
                PartOutcome { msg: part.msg, written, refused }
            })
            .collect()
    }

    /// Writes a part that cannot be split: all its samples written or all
    /// refused.
    fn write_undivided(&self, body: &[u8], samples: usize, device: &str, refused: &mut usize) -> usize {
        let reason = match self.send(&remote_write::compress(body), samples, device) {
            Sent::Written => return samples,
            Sent::Refused(text) => handle::refusal_reason(&text),
            Sent::Failing(_) => "persistent_error",
        };
        let counter = self.metrics.samples_refused.get_or_create(&metrics::ReasonLabels { reason: reason.into() });
        counter.inc_by(samples as u64);
        *refused += samples;
        0
    }

    /// Writes a request; on a refusal (4xx) splits it and writes the halves,
    /// down to single samples, so that only the samples the store refuses are
    /// lost. Returns the samples written.
    fn write(&self, req: WriteRequest, device: &str, refused: &mut usize) -> usize {
        let n = handle::sample_count(&req);
        match self.send(&remote_write::encode(&req), n, device) {
            Sent::Written => n,
            Sent::Refused(_) | Sent::Failing(_) if n > 1 => self.write_halves(req, device, refused),
            Sent::Refused(text) => self.refuse(&req, device, handle::refusal_reason(&text), &text, refused),
            Sent::Failing(text) => self.refuse(&req, device, "persistent_error", &text, refused),
        }
    }

    /// Posts a request body of `samples` samples until the store takes it,
    /// refuses it for good, or fails it while taking other writes. Retries
    /// 429, 5xx and network errors with back-off meanwhile.
    fn send(&self, body: &[u8], samples: usize, device: &str) -> Sent {
        let mut wait = self.retry_min;
        let mut failures = 0u32;
        loop {
            let outcome = self.post(body);
            let label = match &outcome {
                Ok(s) => metrics::status_class(s.0),
                Err(_) => "error",
            };
            self.metrics.requests.get_or_create(&metrics::StatusLabels { status: label.into() }).inc();
            let text = match outcome {
                Ok((status, text)) => match handle::verdict(status, &text) {
                    Verdict::Written => {
                        self.metrics.samples.inc_by(samples as u64);
                        return Sent::Written;
                    }
                    Verdict::Refused => return Sent::Refused(format!("{status} {text}")),
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
                return Sent::Failing(text);
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

    /// Acknowledges a JetStream message (on the client's runtime). A lost
    /// acknowledgement means the message is handed out again after
    /// `jetstream.ack_wait_secs`: a copy, confirmed without a write.
    fn ack_jetstream(&self, acker: Box<async_nats::jetstream::message::Acker>) {
        if let Link::Nats { rt, .. } = &self.link {
            rt.spawn(async move {
                if let Err(e) = acker.ack().await {
                    tracing::debug!(error = %e, "JetStream acknowledgement failed (the message comes again)");
                }
            });
        }
    }

    /// The broker connection now (a number that grows with each).
    fn connection(&self) -> u64 {
        self.connection_no.load(std::sync::atomic::Ordering::SeqCst)
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
    fn dead_letter(&self, publish: &Incoming, why: &str) {
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
        if let Err(e) = self.link.publish(&topic, payload) {
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

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLEET_BRIDGE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
