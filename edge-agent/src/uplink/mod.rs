//! Uplink stage: publishes stored blocks to MQTT (QoS 1), one message per
//! block. The broker's PUBACK only frees a slot in the in-flight window; the
//! persisted send position advances only over blocks the fleet bridge
//! confirmed (on `<prefix>/<device>/ack`) after writing them to the central
//! store, so a broker that crashes with messages in its queue loses nothing:
//! what is not confirmed is sent again, on reconnect or after
//! `mqtt.delivery_timeout_ms` (doubling while nothing is confirmed).
//!
//! rumqttc drives its connection on a private tokio runtime, so this stage
//! runs on its own thread, beside the smol executor. The store is the only
//! source of truth for what still has to be sent: on any connection error the
//! rumqttc client is thrown away (with its in-memory retransmission queue)
//! and a new one resumes from the send position.
//!
//! Layers, each without sockets or clocks except the last: [`inflight`] (what
//! the broker acknowledged), [`delivery`] (what the bridge confirmed, how
//! far the durable position may move), [`cursor`] (a connection's cursors,
//! their confirmation waits, the backlog budget, packet ids), `session`
//! (one connection's protocol: events in with the time, publishes out
//! through a `Wire`); this module is the driver: the MQTT client, TLS,
//! reconnection with back-off.

pub mod config;
pub mod cursor;
pub mod delivery;
pub mod inflight;
pub mod layers;
pub mod metrics;
pub mod mqtt;
pub mod renewal;
pub mod rotation;
mod session;
#[cfg(test)]
mod sim;

use mqtt::Conn;
use rumqttc::{TlsConfiguration, Transport};
use session::{Action, Flow, Session};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::AgentMetrics;
use crate::store::{Lane, Lanes};
use delivery::Delivery;
use edge_wire::throttle::Throttle;

const POLL: Duration = Duration::from_millis(100);
/// How long a connection attempt may take: rumqttc's connect timeout
/// (5 s, `MqttOptions::connection_timeout`) and a margin; it gives up first.
const CONNECTING: Duration = Duration::from_secs(6);

/// How often a connected uplink looks for a client certificate dropped in
/// (rotation.rs).
const CANDIDATE_LOOK: Duration = Duration::from_secs(2);

/// A client certificate this close to its expiry is said at WARN (the
/// fleet's alert fires at the same distance).
const EXPIRY_WARN_DAYS: i64 = 30;

pub struct Uplink {
    cfg: Config,
    store: Arc<Mutex<Lanes>>,
    clock: Arc<Mutex<Clock>>,
    /// This boot's id: blocks of an unsynchronized era of this boot wait
    /// for the true time (crate::clock).
    boot: String,
    metrics: AgentMetrics,
    shutdown: Arc<AtomicBool>,
    /// Where model messages go (detect's; None: no model updates).
    models: Option<crate::detect::update::Inbox>,
    /// Where configuration documents go (remote.rs; None: remote
    /// configuration is off).
    configs: Option<crate::remote::Inbox>,
    /// The clock-before-floor warning was given (once a run).
    said_floor: AtomicBool,
    /// The certificate-expires-soon warning was given (once a run).
    said_expiry: AtomicBool,
    /// A new client certificate dropped in: checked, tried, installed or
    /// refused (rotation.rs).
    rotation: Mutex<rotation::Rotation>,
    /// A new certificate asked for over the uplink when this one nears its
    /// expiry (renewal.rs).
    renewal: Mutex<renewal::Renewal>,
    /// The model messages of the device's and its groups' topics, and which
    /// one the detect stage gets (layers.rs).
    model_layers: Mutex<layers::Layers>,
    /// Where probe program packs go (probe_programs.rs), and which one
    /// (layers.rs).
    programs: Option<crate::probe_programs::Inbox>,
    program_layers: Mutex<layers::Layers>,
    /// Time requests' nonces: each connection takes a range, from this
    /// boot's clock at the start, so that no late answer to another
    /// connection's (or run's) request is taken for one to ours.
    nonces: AtomicU64,
}

/// One lane's end-to-end state.
struct LaneSend {
    lane: Lane,
    /// What the bridge confirmed; `delivered()` is the persisted position.
    delivery: Delivery,
    /// The send position moved and is not yet persisted.
    dirty: bool,
    /// Failures to persist it (a full disk: retried every 250 ms), said at
    /// most once a minute.
    persist_failures: Throttle,
}

impl Uplink {
    pub fn new(
        cfg: Config,
        store: Arc<Mutex<Lanes>>,
        clock: Arc<Mutex<Clock>>,
        metrics: AgentMetrics,
        shutdown: Arc<AtomicBool>,
    ) -> Self {
        let boot = crate::clock::boot_id().to_owned();
        let nonces = AtomicU64::new((crate::clock::mono_ms().max(0) as u64) << 20);
        let rotation = Mutex::new(rotation::Rotation::new(&cfg.state_dir, metrics.uplink.rotations.clone()));
        let renewal = Mutex::new(renewal::Renewal::new(
            &cfg.state_dir,
            &cfg.device_id,
            cfg.mqtt.renew_certificate_days,
            metrics.uplink.renewals.clone(),
        ));
        Uplink {
            model_layers: Mutex::new(layers::Layers::new(&cfg.remote_config.groups)),
            program_layers: Mutex::new(layers::Layers::new(&cfg.remote_config.groups)),
            programs: None,
            rotation,
            renewal,
            cfg,
            store,
            clock,
            boot,
            metrics,
            shutdown,
            models: None,
            configs: None,
            said_floor: AtomicBool::new(false),
            said_expiry: AtomicBool::new(false),
            nonces,
        }
    }

    /// Model messages (`<prefix>/<device>/model`) are subscribed to and
    /// handed to `inbox` (the detect stage's).
    pub fn with_models(mut self, inbox: Option<crate::detect::update::Inbox>) -> Self {
        self.models = inbox;
        self
    }

    /// Configuration documents (`<prefix>/<device>/config`, the groups'
    /// `<prefix>/group/<g>/config`) are subscribed to and handed to `inbox`.
    pub fn with_configs(mut self, inbox: Option<crate::remote::Inbox>) -> Self {
        self.configs = inbox;
        self
    }

    /// Probe program packs (`<prefix>/<device>/probes`, the groups'
    /// `<prefix>/group/<g>/probes`) are subscribed to and handed to `inbox`.
    pub fn with_programs(mut self, inbox: Option<crate::probe_programs::Inbox>) -> Self {
        self.programs = inbox;
        self
    }

    /// Certificate rotations and renewals are audited in `trail` too.
    pub fn with_audit(self, trail: Arc<crate::audit::Audit>) -> Self {
        lock(&self.renewal).trail = Some(trail.clone());
        lock(&self.rotation).trail = Some(trail);
        self
    }

    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("uplink".into()).spawn(move || self.run())
    }

    /// Each lane's delivery state, from its persisted send position.
    /// Priority first: every round serves it before routine data.
    fn lane_sends(&self) -> Vec<LaneSend> {
        let mut store = lock(&self.store);
        Lane::ALL
            .iter()
            .map(|&lane| {
                let pos = store.get(lane).stats().acked_seq;
                let timeout = Duration::from_millis(self.cfg.mqtt.delivery_timeout_ms);
                LaneSend {
                    lane,
                    delivery: Delivery::new(pos, timeout),
                    dirty: false,
                    persist_failures: Throttle::new(Duration::from_secs(60)),
                }
            })
            .collect()
    }

    fn run(self) {
        let mut lanes = self.lane_sends();
        let mut backoff = Backoff::new(self.cfg.mqtt.reconnect_min_ms, self.cfg.mqtt.reconnect_max_ms);
        // Connection failures: said at WARN at once, then once a minute.
        let mut failures = Throttle::new(Duration::from_secs(60));
        while !self.shutdown.load(Ordering::Relaxed) {
            let connected = self.session(&mut lanes, &mut failures);
            self.metrics.uplink.connected.set(0);
            if connected {
                backoff.reset();
            }
            let wait = backoff.next();
            let until = Instant::now() + wait;
            while Instant::now() < until && !self.shutdown.load(Ordering::Relaxed) {
                std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
            }
        }
        tracing::info!("uplink stopped");
    }

    /// One MQTT connection, from connect to error or shutdown: the MQTT
    /// client's events into the session ([`session::Session`]). Returns
    /// whether the broker accepted the connection and its publishes.
    fn session(&self, lanes: &mut [LaneSend], failures: &mut Throttle) -> bool {
        let m = &self.cfg.mqtt;
        // Presence: the broker publishes the will (retained `offline`) when
        // this connection dies without a DISCONNECT, which includes our own
        // shutdown (we never send one): `offline` whenever we are gone.
        let presence = edge_wire::presence_topic(&m.topic_prefix, &self.cfg.device_id);
        let (transport, credentials) = match self.secure() {
            Ok(x) => x,
            Err(e) => {
                // Not fatal: the agent keeps measuring and storing; the files
                // are read again on the next attempt. A candidate
                // certificate that cannot be used is refused.
                lock(&self.rotation).after(rotation::Outcome::Refused("unusable"));
                self.metrics.uplink.errors.inc();
                tracing::error!(error = %e, "cannot connect to the broker");
                return false;
            }
        };
        let settings = mqtt::Settings {
            client_id: self.cfg.client_id(),
            host: m.host.clone(),
            port: m.port,
            keep_alive: Duration::from_secs(m.keep_alive_secs.max(5)),
            inflight: m.max_inflight,
            // Model messages are the largest a device receives.
            max_incoming: crate::detect::update::MAX_BUNDLE_BYTES + 1024,
            will: (presence, "offline"),
            transport,
            credentials,
        };
        let mut conn = Conn::open(m.protocol, settings, m.max_inflight as usize + 8);
        let mut session = Session::new(self, Instant::now());
        let mut looked_for_candidate = Instant::now();
        // Whether the identity this connection used is judged (rotation.rs):
        // at the broker's CONNACK, or at the end.
        let mut judged = false;
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                conn.disconnect();
                break;
            }
            // A new certificate dropped in while connected: end this
            // connection, so the next one tries it.
            if session.connected() && looked_for_candidate.elapsed() >= CANDIDATE_LOOK {
                looked_for_candidate = Instant::now();
                if lock(&self.rotation).waiting() {
                    tracing::info!("a new client certificate was dropped in: reconnecting to try it");
                    conn.disconnect();
                    break;
                }
            }
            session.publish(&conn, lanes, Instant::now());
            // Until the session's next deadline; the shutdown flag is
            // looked at every POLL. Before the broker's CONNACK, rumqttc is
            // connecting (TCP, TLS, CONNECT), and that is not cancel-safe:
            // a wait cut short drops the half-made connection and the next
            // starts over. Over a link slower than POLL, or to a broker busy
            // with a reconnecting fleet, no attempt would ever finish: wait
            // as long as rumqttc's own connect timeout.
            let now = Instant::now();
            let wait = if session.connected() {
                session.wake_at(lanes, now).map_or(POLL, |t| t.saturating_duration_since(now).min(POLL))
            } else {
                CONNECTING
            };
            let ev = conn.recv(wait.max(Duration::from_millis(1)));
            let flow = session.on(ev, &conn, lanes, failures, Instant::now());
            if session.connected() && !judged {
                judged = true;
                lock(&self.rotation).after(session.identity_outcome());
            }
            if flow == Flow::Go {
                session.watch(lanes, Instant::now());
            }
            self.carry_out(session.actions(), lanes);
            self.models_settled();
            if flow == Flow::End {
                break;
            }
        }
        if !judged {
            lock(&self.rotation).after(session.identity_outcome());
        }
        let healthy = session.end(self.shutdown.load(Ordering::Relaxed));
        self.carry_out(session.actions(), lanes);
        healthy
    }

    /// What a session asked of the other stages: the store keeps the
    /// confirmed positions, detect's inbox takes a model, the clock learns
    /// the true time.
    fn carry_out(&self, actions: impl Iterator<Item = Action>, lanes: &mut [LaneSend]) {
        for action in actions {
            match action {
                Action::Persist => self.persist(lanes),
                // A rollback request goes at once; a model waits for the
                // connection's model messages to settle.
                Action::Model { layer, payload } if payload == crate::detect::update::ROLLBACK_MESSAGE => {
                    self.to_detect(&layer, &payload);
                }
                Action::Model { layer, payload } => lock(&self.model_layers).set(&layer, payload, Instant::now()),
                // Back to the built-in programs: at once, as a model
                // rollback.
                Action::Programs { layer, payload } if payload == edge_wire::PROBE_PROGRAMS_BUILT_IN => {
                    if let Some(inbox) = &self.programs {
                        if let Err(e) = inbox.put(&payload) {
                            tracing::error!(layer, error = %e, "probe program request ignored");
                        }
                    }
                }
                Action::Programs { layer, payload } => lock(&self.program_layers).set(&layer, payload, Instant::now()),
                Action::Config { layer, payload } => {
                    let Some(inbox) = &self.configs else { continue };
                    match inbox.put(&layer, &payload) {
                        Ok(()) => tracing::info!(layer, bytes = payload.len(), "config message received"),
                        Err(e) => tracing::error!(layer, error = %e, "config message ignored"),
                    }
                }
                Action::TrueTime { bridge_ms, sent, received } => self.true_time(bridge_ms, sent, received),
                // Into the drop directory: the connection is ended to try
                // it within CANDIDATE_LOOK.
                Action::Certificate(payload) => {
                    lock(&self.renewal).certificate(&payload);
                }
                Action::Request { cleared } => lock(&self.renewal).published(cleared, Instant::now()),
            }
        }
    }

    /// The chosen model message, once the connection's settled.
    fn models_settled(&self) {
        let due = lock(&self.model_layers).due(Instant::now());
        if let Some((layer, payload)) = due {
            self.to_detect(&layer, &payload);
        }
        let due = lock(&self.program_layers).due(Instant::now());
        if let (Some((layer, payload)), Some(inbox)) = (due, &self.programs) {
            match inbox.put(&payload) {
                Ok(()) => tracing::info!(layer, bytes = payload.len(), "probe program pack received"),
                Err(e) => tracing::error!(layer, error = %e, "probe program pack ignored"),
            }
        }
    }

    fn to_detect(&self, layer: &str, payload: &[u8]) {
        let Some(inbox) = &self.models else { return };
        match inbox.put(payload) {
            Ok(()) => tracing::info!(layer, bytes = payload.len(), "model message received"),
            Err(e) => tracing::error!(layer, error = %e, "model message ignored"),
        }
    }

    /// A bridge's answer: its wall clock when our request arrived, which
    /// was, on this boot's clock, halfway between sending and receiving.
    fn true_time(&self, bridge_ms: i64, sent: Instant, received: Instant) {
        let rtt = received.saturating_duration_since(sent);
        let now = crate::clock::read(self.cfg.clock.test_offset_ms);
        let midway = received.checked_sub(rtt / 2).unwrap_or(sent);
        let midway_mono_ms = now.mono_ms - Instant::now().saturating_duration_since(midway).as_millis() as i64;
        let truth = bridge_ms - midway_mono_ms;
        self.metrics.clock.replies.inc();
        self.metrics.clock.error_ms.set(truth - now.offset_ms());
        match lock(&self.clock).learn(&self.boot, truth) {
            Ok(true) => tracing::info!(
                error_ms = truth - now.offset_ms(),
                round_trip_ms = rtt.as_millis() as u64,
                "learned the true time from the bridge; blocks of this boot are corrected"
            ),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "clock journal not saved"),
        }
    }

    /// TLS and credentials, read from their files on every connection, so
    /// renewed certificates are picked up without a restart.
    #[allow(clippy::type_complexity)]
    fn secure(&self) -> Result<(Option<Transport>, Option<(String, String)>), edge_wire::tls::TlsError> {
        let m = &self.cfg.mqtt;
        let transport = if m.tls.enabled {
            let floor = lock(&self.clock).time_floor();
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            // The candidate's validity is checked at the same floor as the
            // broker's certificate.
            let tls = lock(&self.rotation).identity(&m.tls, &self.cfg.device_id, now.max(floor));
            if now < floor && !self.said_floor.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    clock_behind_secs = floor - now,
                    floor,
                    "this box's clock is before this build's time or the last true time it knew: the broker's \
                     certificate is checked at that time instead, until the clock is right (docs/clock.md)"
                );
            }
            let config = tls.client_config_with_floor(Some(floor))?;
            if let Some(expiry) = tls.client_certificate_expiry() {
                self.certificate_expiry(expiry?, now as i64);
            }
            Some(Transport::tls_with_config(TlsConfiguration::Rustls(config)))
        } else {
            None
        };
        Ok((transport, m.auth.load()?))
    }

    /// The client certificate's expiry, read with the TLS files on every
    /// connection attempt: exported, said when it is near, and renewed
    /// (renewal.rs).
    fn certificate_expiry(&self, at: i64, now: i64) {
        self.metrics.uplink.certificate_expiry.set(at);
        lock(&self.renewal).check(at, now);
        let left_days = (at - now) / 86_400;
        if left_days < EXPIRY_WARN_DAYS && !self.said_expiry.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                file = %self.cfg.mqtt.tls.cert_file.display(),
                expires = at,
                left_days,
                "the client certificate expires soon (or has expired): the broker will refuse this device then; \
                 install a new one (docs/configuration.md)"
            );
        }
    }

    fn persist(&self, lanes: &mut [LaneSend]) {
        if !lanes.iter().any(|l| l.dirty) {
            return;
        }
        let mut store = lock(&self.store);
        for l in lanes.iter_mut().filter(|l| l.dirty) {
            match store.get(l.lane).ack(l.delivery.delivered()) {
                Ok(()) => {
                    l.dirty = false;
                    l.persist_failures.reset();
                }
                // Not fatal: the store counts the position as confirmed;
                // after a restart the records would be sent again.
                Err(e) => {
                    if let Some(suppressed) = l.persist_failures.due() {
                        tracing::error!(
                            lane = l.lane.label(),
                            error = %e,
                            suppressed,
                            "cannot persist the send position (retried; said at most once a minute)"
                        );
                    }
                }
            }
        }
        self.metrics.observe_lanes(&store);
    }
}

/// A poisoned lock only means another thread panicked while holding it; the
/// store's state is still consistent (every mutation is complete or not
/// applied), so carry on.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Exponential back-off with full jitter.
struct Backoff {
    min: u64,
    max: u64,
    cur: u64,
    rng: u64,
}

impl Backoff {
    fn new(min_ms: u64, max_ms: u64) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ u64::from(std::process::id()).rotate_left(32);
        Backoff { min: min_ms, max: max_ms, cur: min_ms, rng: seed | 1 }
    }

    fn reset(&mut self) {
        self.cur = self.min;
    }

    fn next(&mut self) -> Duration {
        // xorshift64: jitter only, not cryptography.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let span = self.cur.max(1);
        let wait = self.min.min(span) + self.rng % span;
        self.cur = (self.cur.saturating_mul(2)).min(self.max);
        Duration::from_millis(wait.min(self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(100, 1000);
        for _ in 0..20 {
            let d = b.next().as_millis() as u64;
            assert!((100..=1000).contains(&d), "{d}");
        }
        assert_eq!(b.cur, 1000);
        b.reset();
        assert_eq!(b.cur, 100);
    }
}
