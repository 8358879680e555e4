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
//! and a new one resumes from the send position. The pure acknowledgement
//! logic lives in [`window::SendWindow`].

pub mod cursor;
pub mod delivery;
pub mod mqtt;
pub mod window;

use cursor::{Budget, Cursor, CursorKind, PacketIds};
use mqtt::{Conn, Ev};
use rumqttc::{TlsConfiguration, Transport};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::{Clock, Shift};
use crate::config::Config;
use crate::metrics::AgentMetrics;
use crate::store::{Lane, Lanes};
use delivery::Delivery;
use edge_wire::throttle::Throttle;

/// How often a moving send position is made durable, at most.
const PERSIST_EVERY: Duration = Duration::from_millis(250);
const POLL: Duration = Duration::from_millis(100);
/// Payload bytes read from the store for one round of publishing.
const READ_BYTES: usize = 4 << 20;

pub struct Uplink {
    cfg: Config,
    store: Arc<Mutex<Lanes>>,
    clock: Arc<Mutex<Clock>>,
    /// This boot's id: blocks of an unsynchronized era of this boot wait
    /// for the true time (crate::clock).
    boot: String,
    metrics: AgentMetrics,
    shutdown: Arc<AtomicBool>,
    /// The clock-before-floor warning was given (once a run).
    said_floor: AtomicBool,
}

/// Time requests of one connection.
#[derive(Default)]
struct TimeAsk {
    /// Nonce (= monotonic ms when sent) of the outstanding request.
    pending: Option<i64>,
    last: Option<Instant>,
    connected_at: Option<Instant>,
    /// Gave up waiting for an answer on this connection.
    gave_up: bool,
}

/// Requests again after this long without an answer (QoS 0 may be lost).
const TIME_ASK_EVERY: Duration = Duration::from_secs(5);
/// Answers slower than this are not precise enough to use.
const TIME_MAX_RTT_MS: i64 = 5_000;

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
        Uplink { cfg, store, clock, boot, metrics, shutdown, said_floor: AtomicBool::new(false) }
    }

    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("uplink".into()).spawn(move || self.run())
    }

    fn run(self) {
        let topic = edge_wire::metrics_topic(&self.cfg.mqtt.topic_prefix, &self.cfg.device_id);
        // Priority first: every round serves it before routine data.
        let mut lanes: Vec<LaneSend> = {
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
        };
        let mut backoff = Backoff::new(self.cfg.mqtt.reconnect_min_ms, self.cfg.mqtt.reconnect_max_ms);
        // Connection failures: said at WARN at once, then once a minute.
        let mut failures = Throttle::new(Duration::from_secs(60));
        while !self.shutdown.load(Ordering::Relaxed) {
            let connected = self.session(&topic, &mut lanes, &mut failures);
            self.metrics.uplink_connected.set(0);
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

    /// One MQTT connection, from connect to error or shutdown. Returns
    /// whether the broker accepted the connection and its publishes.
    fn session(&self, topic: &str, lanes: &mut [LaneSend], failures: &mut Throttle) -> bool {
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
                self.metrics.uplink_errors.inc();
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
            will: (presence.clone(), "offline"),
            transport,
            credentials,
        };
        let mut conn = Conn::open(m.protocol, settings, m.max_inflight as usize + 8);
        // Made once the broker accepted the connection: a failed attempt
        // neither cuts the store's open block nor says anything of a backlog.
        let mut cursors: Vec<Cursor> = Vec::new();
        let mut forged = Throttle::new(Duration::from_secs(60));
        let mut budget = Budget::new(m.drain_bytes_per_sec, Instant::now());
        let ack_topic = edge_wire::ack_topic(&m.topic_prefix, &self.cfg.device_id);
        let reply_topic = edge_wire::time_reply_topic(&m.topic_prefix, &self.cfg.device_id);
        let model_topic = edge_wire::model_topic(&m.topic_prefix, &self.cfg.device_id);
        let mut time = TimeAsk::default();
        let mut pkids = PacketIds::default();
        let mut connected = false;
        let mut refusals = 0u32;
        // The broker acknowledged something on this connection (the birth
        // message at least, on a healthy one).
        let mut acked_any = false;
        let mut persisted_at = Instant::now();
        // Send the open routine block at once on connecting.
        let now = Instant::now();
        let mut last_live = now.checked_sub(Duration::from_millis(m.live_interval_ms)).unwrap_or(now);

        loop {
            if self.shutdown.load(Ordering::Relaxed) {
                conn.disconnect();
                break;
            }
            if connected {
                self.ask_time(&conn, &mut time);
                let mut out = Outbox { conn: &conn, topic, pkids: &mut pkids, budget: &mut budget };
                if let Err(e) = self.publish_more(&mut out, &mut cursors, lanes, &mut last_live, &mut time) {
                    tracing::error!(error = %e, "reading the store failed");
                }
            }
            match conn.recv(POLL) {
                Ev::ConnAck => {
                    connected = true;
                    failures.reset();
                    // Resend everything not confirmed end to end.
                    cursors = self.cursors(lanes);
                    self.metrics.uplink_connects.inc();
                    self.metrics.uplink_connected.set(1);
                    // QoS 0: a lost confirmation only means a re-send, a lost
                    // time reply another request.
                    // Models are published retained: one comes with every
                    // connection, and is installed once.
                    let topics = if self.cfg.detect.enabled {
                        vec![ack_topic.clone(), reply_topic.clone(), model_topic.clone()]
                    } else {
                        vec![ack_topic.clone(), reply_topic.clone()]
                    };
                    if !conn.subscribe(&topics) {
                        tracing::error!("cannot subscribe to delivery confirmations");
                    }
                    time.connected_at = Some(Instant::now());
                    // Birth message. It takes a packet id like the blocks do:
                    // hold its place in the publish order with no block.
                    if conn.publish(&presence, true, true, b"online".to_vec()) {
                        pkids.queued(None);
                    }
                    tracing::info!(host = %m.host, port = m.port, protocol = ?m.protocol, "connected to broker");
                }
                Ev::OutgoingPublish(pkid) => pkids.numbered(pkid),
                Ev::PubAck { pkid, refused } => {
                    let sent = pkids.acked(pkid);
                    acked_any |= refused.is_none();
                    if let Some(reason) = &refused {
                        // mosquitto then closes the connection; reconnect
                        // with growing back-off rather than at once.
                        refusals += 1;
                        self.metrics.uplink_refused.inc();
                        let what = if sent.is_some_and(|s| s.is_some()) { "a block" } else { "presence" };
                        tracing::error!(
                            reason,
                            what,
                            device = %self.cfg.device_id,
                            "broker refused a publish: with the shipped ACL, device_id must equal the \
                             certificate's CN or the user name (docs/configuration.md)"
                        );
                    }
                    if let Some(Some((i, seq))) = sent {
                        if refused.is_none() {
                            self.metrics.uplink_acked.inc();
                        }
                        // A refused block stays unconfirmed and goes again
                        // after the delivery timeout (doubling).
                        cursors[i].win.ack(seq);
                    }
                }
                Ev::Publish { topic: t, payload } if t == model_topic => {
                    // Into the drop directory: the detect stage verifies and
                    // installs it at its next window.
                    let dir = self.cfg.detect.drop_dir(&self.cfg.state_dir);
                    match crate::detect::update::drop_message(&dir, &payload) {
                        Ok(()) => tracing::info!(bytes = payload.len(), "model message received"),
                        Err(e) => tracing::error!(error = %e, topic = %t, "model message ignored"),
                    }
                }
                Ev::Publish { topic: t, payload } if t == reply_topic => {
                    self.time_reply(&payload, &mut time);
                }
                Ev::Publish { topic: t, payload } if t == ack_topic => {
                    let confirmed = edge_wire::DeliveryAck::decode(&payload).map_err(|e| e.to_string()).and_then(|a| {
                        let l = lanes.iter_mut().find(|l| l.lane as u8 == a.lane).ok_or("unknown lane")?;
                        if l.delivery.confirm(a.first_seq, a.last_seq).map_err(|e| e.to_string())?.is_some() {
                            l.dirty = true;
                        }
                        Ok(())
                    });
                    if let Err(why) = confirmed {
                        // Never trusted: the send position stays where it
                        // is, so nothing stored is skipped.
                        self.metrics.uplink_confirmations_ignored.inc();
                        if let Some(suppressed) = forged.due() {
                            tracing::warn!(why, suppressed, "delivery confirmation ignored");
                        }
                    } else {
                        self.metrics.uplink_confirmed.inc();
                    }
                }
                Ev::Publish { .. } | Ev::Other | Ev::Timeout => {}
                Ev::Error { message, reason } => {
                    self.metrics.uplink_errors.inc();
                    if connected {
                        tracing::warn!(error = message, reason, "connection to broker lost");
                    } else if let Some(suppressed) = failures.due() {
                        let (what, hint) = match reason {
                            "tls" => (
                                "TLS handshake with the broker failed",
                                "check mqtt.tls (CA, certificate, key) against the broker's certificate, and this \
                                 box's clock against the certificates' validity",
                            ),
                            "not_authorized" | "refused_by_broker" => (
                                "broker refused the connection",
                                "check mqtt.tls / mqtt.auth against the broker's certificates, password file and ACL",
                            ),
                            "dns" => ("cannot connect to the broker", "mqtt.host does not resolve"),
                            "refused" => ("cannot connect to the broker", "nothing listens at mqtt.host:mqtt.port"),
                            _ => ("cannot connect to the broker", "the agent keeps storing and retries with back-off"),
                        };
                        tracing::warn!(
                            error = message,
                            reason,
                            host = %m.host,
                            port = m.port,
                            device = %self.cfg.device_id,
                            suppressed,
                            "{what}: {hint} (docs/configuration.md; said at most once a minute)"
                        );
                    }
                    break;
                }
                Ev::Closed => break,
            }
            let now = Instant::now();
            for c in cursors.iter_mut() {
                if let Some(r) = c.watch(&mut lanes[c.lane].delivery, now) {
                    tracing::warn!(
                        stream = c.kind.label(),
                        confirmed = r.from,
                        broker_acked = r.broker_acked,
                        waited = ?r.waited,
                        "no delivery confirmation; sending again from the confirmed position"
                    );
                    self.metrics.uplink_resends.inc();
                }
            }
            if persisted_at.elapsed() >= PERSIST_EVERY {
                self.persist(lanes);
                persisted_at = Instant::now();
            }
        }
        self.persist(lanes);
        // mosquitto closes a connection right after refusing a publish, often
        // before its PUBACK (with the reason) is read: a connection that
        // ended before the broker acknowledged anything is counted, and like
        // one with refusals it does not reset the back-off.
        let stopping = self.shutdown.load(Ordering::Relaxed);
        if connected && !acked_any && !stopping {
            self.metrics.uplink_unacknowledged.inc();
            tracing::warn!(
                device = %self.cfg.device_id,
                "connection ended before the broker acknowledged anything: refused by its ACL? \
                 (device_id must equal the certificate's CN or the user name)"
            );
        }
        connected && refusals == 0 && acked_any
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

    /// The cursors of a new connection, from the confirmed positions: the
    /// priority lane; the routine lane's live data, and behind it its
    /// backlog (when there is one). The store's open block is closed, so
    /// live data starts a block of its own.
    fn cursors(&self, lanes: &[LaneSend]) -> Vec<Cursor> {
        let max = self.cfg.mqtt.max_inflight as usize;
        let mut store = lock(&self.store);
        let mut out = Vec::new();
        for (i, l) in lanes.iter().enumerate() {
            let d = l.delivery.delivered();
            let cursor = |kind, base, until| Cursor::new(i, kind, base, until, max);
            if l.lane == Lane::Priority {
                out.push(cursor(CursorKind::Priority, d, u64::MAX));
                continue;
            }
            let routine = store.get(Lane::Routine);
            let live_from = routine.next_seq();
            if live_from > d + 1 {
                routine.end_open_block();
                out.push(cursor(CursorKind::Live, live_from - 1, u64::MAX));
                out.push(cursor(CursorKind::Backlog, d, live_from));
                tracing::info!(backlog_from = d + 1, live_from, "draining the backlog behind live data");
            } else {
                out.push(cursor(CursorKind::Live, d, u64::MAX));
            }
        }
        out
    }

    /// Publishes whole blocks, one message each, while the in-flight budget
    /// (shared by the cursors) has room: the priority lane first, its open
    /// block at once; then live routine data, its open block only when
    /// `live_interval_ms` has passed since it last went out; then the
    /// backlog within the drain budget. Taking an open block closes it.
    fn publish_more(
        &self,
        out: &mut Outbox<'_>,
        cursors: &mut [Cursor],
        lanes: &mut [LaneSend],
        last_live: &mut Instant,
        time: &mut TimeAsk,
    ) -> Result<(), crate::store::StoreError> {
        let max = self.cfg.mqtt.max_inflight as usize;
        for i in 0..cursors.len() {
            let inflight: usize = cursors.iter().map(|s| s.win.inflight()).sum();
            let room = max.saturating_sub(inflight).min(cursors[i].win.room());
            if room == 0 {
                return Ok(());
            }
            let s = &mut cursors[i];
            if s.kind == CursorKind::Backlog && (s.win.last_sent() + 1 >= s.until || !out.budget.allows(Instant::now()))
            {
                continue;
            }
            let lane = if s.kind == CursorKind::Priority { Lane::Priority } else { Lane::Routine };
            let live_due = last_live.elapsed() >= Duration::from_millis(self.cfg.mqtt.live_interval_ms);
            let include_open = s.kind != CursorKind::Live || live_due;
            let blocks = lock(&self.store).get(lane).read_blocks(s.win.last_sent(), room, READ_BYTES, include_open)?;
            if s.kind == CursorKind::Live && include_open && !blocks.is_empty() {
                *last_live = Instant::now();
            }
            for block in blocks {
                let (Some(first), Some(last)) = (block.first(), block.last()) else { continue };
                if first.seq >= s.until || (s.kind == CursorKind::Backlog && !out.budget.allows(Instant::now())) {
                    break;
                }
                let Some(clock_shift_ms) = self.shift_for(lane, first.seq, time) else {
                    break; // this boot's true time is not known yet: hold the lane
                };
                let env = edge_wire::Envelope {
                    device: &self.cfg.device_id,
                    lane: lane as u8,
                    first_seq: first.seq,
                    clock_shift_ms,
                    frames: block.iter().map(|r| r.payload.as_slice()).collect(),
                };
                let payload = env.encode();
                let bytes = payload.len();
                if !out.conn.publish(out.topic, true, false, payload) {
                    // Request queue full: the block is read again next turn.
                    return Ok(());
                }
                s.win.sent(last.seq);
                lanes[s.lane].delivery.published(last.seq);
                out.pkids.queued(Some((i, last.seq)));
                if s.kind == CursorKind::Backlog {
                    out.budget.spend(bytes);
                }
                self.metrics.uplink_published.inc();
                self.metrics.published_bytes(s.kind.label()).inc_by(bytes as u64);
            }
        }
        Ok(())
    }

    /// The clock correction for the block starting at `seq`, or `None`
    /// while it must wait for this boot's true time.
    fn shift_for(&self, lane: Lane, seq: u64, time: &mut TimeAsk) -> Option<i64> {
        let shift = lock(&self.clock).shift(lane as usize, seq, &self.boot);
        match shift {
            Shift::Known(d) => Some(d),
            Shift::Pending if !time.gave_up => {
                let waited = time.connected_at.map_or(Duration::ZERO, |t| t.elapsed());
                if waited < Duration::from_secs(self.cfg.clock.sync_wait_secs) {
                    return None;
                }
                tracing::warn!(
                    waited = ?waited,
                    "no answer to time requests (is the bridge older than this agent?): \
                     sending blocks of the unsynchronized clock as stamped"
                );
                time.gave_up = true;
                self.metrics.clock_uncorrected.inc();
                Some(0)
            }
            Shift::Pending | Shift::Unknowable => {
                self.metrics.clock_uncorrected.inc();
                Some(0)
            }
        }
    }

    /// Asks any bridge for the time while this boot's true time is unknown
    /// and the wall clock is not synchronized.
    fn ask_time(&self, conn: &Conn, time: &mut TimeAsk) {
        if !lock(&self.clock).needs_time(&self.boot) {
            return;
        }
        if time.last.is_some_and(|t| t.elapsed() < TIME_ASK_EVERY) {
            return;
        }
        let nonce = crate::clock::mono_ms();
        let topic = edge_wire::time_topic(&self.cfg.mqtt.topic_prefix, &self.cfg.device_id);
        let msg = edge_wire::TimeRequest { nonce: nonce as u64 }.encode();
        if conn.publish(&topic, false, false, msg) {
            time.pending = Some(nonce);
            time.last = Some(Instant::now());
        }
    }

    /// A bridge's answer: its wall clock when our request arrived, which
    /// was between sending and now on our monotonic clock.
    fn time_reply(&self, payload: &[u8], time: &mut TimeAsk) {
        let reply = match edge_wire::TimeReply::decode(payload) {
            Ok(r) => r,
            Err(e) => return tracing::warn!(error = %e, "malformed time reply ignored"),
        };
        let Some(sent) = time.pending.filter(|n| *n as u64 == reply.nonce) else {
            return; // an answer to an earlier request, or to another bridge's copy
        };
        let now = crate::clock::read(self.cfg.clock.test_offset_ms);
        let rtt = now.mono_ms - sent;
        if !(0..=TIME_MAX_RTT_MS).contains(&rtt) {
            return tracing::debug!(rtt, "time reply too slow to use");
        }
        time.pending = None;
        let truth = reply.bridge_ms - (sent + now.mono_ms) / 2;
        self.metrics.clock_replies.inc();
        self.metrics.clock_error_ms.set(truth - now.offset_ms());
        match lock(&self.clock).learn(&self.boot, truth) {
            Ok(true) => tracing::info!(
                error_ms = truth - now.offset_ms(),
                round_trip_ms = rtt,
                "learned the true time from the bridge; blocks of this boot are corrected"
            ),
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "clock journal not saved"),
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

/// Where `publish_more` puts blocks.
struct Outbox<'a> {
    conn: &'a Conn,
    topic: &'a str,
    pkids: &'a mut PacketIds,
    budget: &'a mut Budget,
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
