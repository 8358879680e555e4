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
pub mod metrics;
pub mod mqtt;
mod session;
#[cfg(test)]
mod sim;

use mqtt::Conn;
use rumqttc::{TlsConfiguration, Transport};
use session::{Flow, Session};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::AgentMetrics;
use crate::store::{Lane, Lanes};
use delivery::Delivery;
use edge_wire::throttle::Throttle;

const POLL: Duration = Duration::from_millis(100);

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
    /// The clock-before-floor warning was given (once a run).
    said_floor: AtomicBool,
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
        Uplink { cfg, store, clock, boot, metrics, shutdown, models: None, said_floor: AtomicBool::new(false) }
    }

    /// Model messages (`<prefix>/<device>/model`) are subscribed to and
    /// handed to `inbox` (the detect stage's).
    pub fn with_models(mut self, inbox: Option<crate::detect::update::Inbox>) -> Self {
        self.models = inbox;
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
                // are read again on the next attempt.
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
        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                conn.disconnect();
                break;
            }
            session.publish(&conn, lanes, Instant::now());
            let ev = conn.recv(POLL);
            if session.on(ev, &conn, lanes, failures, Instant::now()) == Flow::End {
                break;
            }
            session.watch(lanes, Instant::now());
        }
        session.end(lanes, self.shutdown.load(Ordering::Relaxed))
    }

    /// TLS and credentials, read from their files on every connection, so
    /// renewed certificates are picked up without a restart.
    #[allow(clippy::type_complexity)]
    fn secure(&self) -> Result<(Option<Transport>, Option<(String, String)>), edge_wire::tls::TlsError> {
        let m = &self.cfg.mqtt;
        let transport = if m.tls.enabled {
            let floor = lock(&self.clock).time_floor();
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            if now < floor && !self.said_floor.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    clock_behind_secs = floor - now,
                    floor,
                    "this box's clock is before this build's time or the last true time it knew: the broker's \
                     certificate is checked at that time instead, until the clock is right (docs/clock.md)"
                );
            }
            Some(Transport::tls_with_config(TlsConfiguration::Rustls(m.tls.client_config_with_floor(Some(floor))?)))
        } else {
            None
        };
        Ok((transport, m.auth.load()?))
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
