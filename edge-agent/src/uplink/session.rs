//! One MQTT connection's delivery protocol, without sockets or clocks:
//! what the connection reports goes in ([`Session::on`], with the time),
//! publishes and subscriptions go out through a [`Wire`], the lanes'
//! positions move, and what other stages must do comes out as [`Action`]s
//! (make the positions durable, a model for detect, a time answer for the
//! clock). The driver (`Uplink::session`) is a short loop over the MQTT
//! client that carries the actions out; the same code runs under simulated
//! time in tests.

use std::time::{Duration, Instant};

use super::cursor::{Budget, Cursor, CursorKind, PacketIds};
use super::mqtt::{Conn, Ev};
use super::{lock, LaneSend, Uplink};
use crate::clock::Shift;
use crate::store::Lane;
use edge_wire::throttle::Throttle;

/// How often a moving send position is made durable, at most.
const PERSIST_EVERY: Duration = Duration::from_millis(250);
/// Payload bytes read from the store for one round of publishing.
const READ_BYTES: usize = 4 << 20;
/// Requests again after this long without an answer (QoS 0 may be lost).
const TIME_ASK_EVERY: Duration = Duration::from_secs(5);
/// Answers slower than this are not precise enough to use.
const TIME_MAX_RTT: Duration = Duration::from_secs(5);

/// What the session needs of a connection.
pub trait Wire {
    /// Queues a publish (QoS 1 or 0); false: the client's queue is full,
    /// try again later.
    fn publish(&self, topic: &str, qos1: bool, retain: bool, payload: Vec<u8>) -> bool;
    fn subscribe(&self, topics: &[String]) -> bool;
}

impl Wire for Conn {
    fn publish(&self, topic: &str, qos1: bool, retain: bool, payload: Vec<u8>) -> bool {
        Conn::publish(self, topic, qos1, retain, payload)
    }

    fn subscribe(&self, topics: &[String]) -> bool {
        Conn::subscribe(self, topics)
    }
}

/// What the session asks of the other stages; the driver carries it out
/// ([`super::Uplink::carry_out`]) after each call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// The lanes' confirmed positions moved: make them durable (store).
    Persist,
    /// A model message of a layer (`device`, `group-<g>`; layers.rs),
    /// for the detect stage's inbox.
    Model { layer: String, payload: Vec<u8> },
    /// A probe program pack of a layer, for the probe programs' inbox.
    Programs { layer: String, payload: Vec<u8> },
    /// A configuration document for a layer (`device`, `group-<g>`), for
    /// the remote configuration stage's inbox.
    Config { layer: String, payload: Vec<u8> },
    /// A bridge's wall clock (`bridge_ms`) when our request, sent at
    /// `sent`, arrived; its answer came at `received` (clock stage).
    TrueTime { bridge_ms: i64, sent: Instant, received: Instant },
    /// A message on the device's certificate topic (renewal.rs).
    Certificate(Vec<u8>),
    /// The certificate request was published, or (`cleared`) the answered
    /// one's retained message cleared.
    Request { cleared: bool },
}

/// The topics of a retained kind and their layers (`device`,
/// `group-<g>`; layers.rs), when the kind is taken at all.
fn layered_topics(
    on: bool,
    groups: &[String],
    device: String,
    group: impl Fn(&str) -> String,
) -> Vec<(String, String)> {
    if !on {
        return Vec::new();
    }
    std::iter::once((device, super::layers::DEVICE.to_owned()))
        .chain(groups.iter().map(|g| (group(g), super::layers::group_layer(g))))
        .collect()
}

/// The layer of `topic` among `topics`.
fn layer_of(topics: &[(String, String)], topic: &str) -> Option<String> {
    topics.iter().find(|(t, _)| t == topic).map(|(_, l)| l.clone())
}

/// Whether the connection goes on after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Go,
    End,
}

/// Time requests of one connection.
#[derive(Default)]
struct TimeAsk {
    /// The outstanding request: its nonce and when it went.
    pending: Option<(u64, Instant)>,
    /// The next request's nonce (starts from the uplink's, so that no two
    /// connections of a run share one).
    nonce: u64,
    last: Option<Instant>,
    connected_at: Option<Instant>,
    /// Gave up waiting for an answer on this connection.
    gave_up: bool,
}

/// One connection's state.
pub struct Session<'a> {
    up: &'a Uplink,
    topic: String,
    presence: String,
    ack_topic: String,
    reply_topic: String,
    /// Model topics and their layers (layers.rs), when model
    /// updates are on.
    model_topics: Vec<(String, String)>,
    /// Probe program pack topics and their layers (layers.rs).
    program_topics: Vec<(String, String)>,
    /// The certificate request topic and what goes on it at this
    /// connection (renewal.rs); the certificate topic, listened to while a
    /// request waits.
    request_topic: String,
    renewal: Option<super::renewal::Publish>,
    certificate_topic: String,
    /// Config topics and their layers (remote.rs), when remote
    /// configuration is on.
    config_topics: Vec<(String, String)>,
    /// Made once the broker accepted the connection: a failed attempt
    /// neither cuts the store's open block nor says anything of a backlog.
    cursors: Vec<Cursor>,
    pkids: PacketIds,
    budget: Budget,
    forged: Throttle,
    time: TimeAsk,
    connected: bool,
    /// Why the attempt failed before the broker accepted it.
    failure: Option<(&'static str, Option<&'static str>)>,
    refusals: u32,
    /// The broker acknowledged something on this connection (the birth
    /// message at least, on a healthy one).
    acked_any: bool,
    /// The bridge confirmed a block on this connection.
    confirmed_any: bool,
    persisted_at: Instant,
    last_live: Instant,
    actions: Vec<Action>,
}

impl<'a> Session<'a> {
    pub fn new(up: &'a Uplink, now: Instant) -> Session<'a> {
        let m = &up.cfg.mqtt;
        let device = &up.cfg.device_id;
        Session {
            up,
            topic: edge_wire::metrics_topic(&m.topic_prefix, device),
            presence: edge_wire::presence_topic(&m.topic_prefix, device),
            ack_topic: edge_wire::ack_topic(&m.topic_prefix, device),
            reply_topic: edge_wire::time_reply_topic(&m.topic_prefix, device),
            model_topics: layered_topics(
                up.models.is_some(),
                &up.cfg.remote_config.groups,
                edge_wire::model_topic(&m.topic_prefix, device),
                |g| edge_wire::group_model_topic(&m.topic_prefix, g),
            ),
            program_topics: layered_topics(
                up.programs.is_some(),
                &up.cfg.remote_config.groups,
                edge_wire::probe_programs_topic(&m.topic_prefix, device),
                |g| edge_wire::group_probe_programs_topic(&m.topic_prefix, g),
            ),
            request_topic: edge_wire::certificate_request_topic(&m.topic_prefix, device),
            renewal: super::lock(&up.renewal).to_publish(now),
            certificate_topic: edge_wire::certificate_topic(&m.topic_prefix, device),
            config_topics: layered_topics(
                up.configs.is_some(),
                &up.cfg.remote_config.groups,
                edge_wire::config_doc::device_topic(&m.topic_prefix, device),
                |g| edge_wire::config_doc::group_topic(&m.topic_prefix, g),
            ),
            cursors: Vec::new(),
            pkids: PacketIds::default(),
            budget: Budget::new(m.drain_bytes_per_sec, now),
            forged: Throttle::new(Duration::from_secs(60)),
            time: TimeAsk {
                nonce: up.nonces.fetch_add(1 << 20, std::sync::atomic::Ordering::Relaxed),
                ..Default::default()
            },
            connected: false,
            failure: None,
            refusals: 0,
            acked_any: false,
            confirmed_any: false,
            persisted_at: now,
            // Send the open routine block at once on connecting.
            last_live: now.checked_sub(Duration::from_millis(m.live_interval_ms)).unwrap_or(now),
            actions: Vec::new(),
        }
    }

    /// What the other stages must do, in order, since the last call.
    /// Whether the broker accepted the connection (CONNACK).
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// What this connection says of the identity it used (rotation.rs).
    pub fn identity_outcome(&self) -> super::rotation::Outcome {
        use super::rotation::Outcome;
        match self.failure {
            _ if self.connected => Outcome::Accepted,
            Some((reason, tls)) => Outcome::of_failure(reason, tls),
            None => Outcome::Unknown,
        }
    }

    pub fn actions(&mut self) -> std::vec::Drain<'_, Action> {
        self.actions.drain(..)
    }

    /// Before waiting for the connection: ask for the time, publish what
    /// the flow control allows.
    pub fn publish(&mut self, wire: &impl Wire, lanes: &mut [LaneSend], now: Instant) {
        if !self.connected {
            return;
        }
        self.ask_time(wire, now);
        if let Err(e) = self.publish_more(wire, lanes, now) {
            tracing::error!(error = %e, "reading the store failed");
        }
        self.publish_request(wire);
    }

    /// The waiting certificate request, or an empty message clearing an
    /// answered one (retained, so a signer that starts later finds it):
    /// only once the bridge confirmed a block on this connection. A broker
    /// whose ACL does not let the device publish there (an older shipped
    /// ACL) ends the connection at the refusal: data goes first, and the
    /// request is repeated at most once an hour (renewal.rs).
    fn publish_request(&mut self, wire: &impl Wire) {
        if !self.confirmed_any || self.renewal.is_none() {
            return;
        }
        let cleared = matches!(self.renewal, Some(super::renewal::Publish::Clear));
        let payload = match self.renewal.take() {
            Some(super::renewal::Publish::Request(csr)) => csr,
            _ => Vec::new(),
        };
        if wire.publish(&self.request_topic, true, true, payload) {
            self.pkids.queued(None);
            self.actions.push(Action::Request { cleared });
        }
    }

    /// What the connection reported, at `now`. `failures` throttles what
    /// is said of failed connection attempts.
    pub fn on(
        &mut self,
        ev: Ev,
        wire: &impl Wire,
        lanes: &mut [LaneSend],
        failures: &mut Throttle,
        now: Instant,
    ) -> Flow {
        let up = self.up;
        let m = &up.cfg.mqtt;
        match ev {
            Ev::ConnAck => {
                self.connected = true;
                failures.reset();
                // Resend everything not confirmed end to end.
                self.cursors = self.cursors(lanes);
                up.metrics.uplink.connects.inc();
                up.metrics.uplink.connected.set(1);
                // QoS 0: a lost confirmation only means a re-send, a lost
                // time reply another request.
                // Models are published retained: one comes with every
                // connection, and is installed once.
                let mut topics = vec![self.ack_topic.clone(), self.reply_topic.clone()];
                topics.extend(self.model_topics.iter().map(|(t, _)| t.clone()));
                super::lock(&up.model_layers).connected();
                topics.extend(self.program_topics.iter().map(|(t, _)| t.clone()));
                super::lock(&up.program_layers).connected();
                // Retained too: the documents in force come with every
                // connection; the stage ignores the ones it has.
                topics.extend(self.config_topics.iter().map(|(t, _)| t.clone()));
                // The answer to a waiting certificate request (retained).
                if matches!(self.renewal, Some(super::renewal::Publish::Request(_))) {
                    topics.push(self.certificate_topic.clone());
                }
                if !wire.subscribe(&topics) {
                    tracing::error!("cannot subscribe to delivery confirmations");
                }
                self.time.connected_at = Some(now);
                // Birth message. It takes a packet id like the blocks do:
                // hold its place in the publish order with no block.
                if wire.publish(&self.presence, true, true, b"online".to_vec()) {
                    self.pkids.queued(None);
                }
                tracing::info!(host = %m.host, port = m.port, protocol = ?m.protocol, "connected to broker");
            }
            Ev::OutgoingPublish(pkid) => self.pkids.numbered(pkid),
            Ev::PubAck { pkid, refused } => {
                let sent = self.pkids.acked(pkid);
                self.acked_any |= refused.is_none();
                if let Some(reason) = &refused {
                    // mosquitto then closes the connection; reconnect
                    // with growing back-off rather than at once.
                    self.refusals += 1;
                    up.metrics.uplink.refused.inc();
                    let what = if sent.is_some_and(|s| s.is_some()) { "a block" } else { "presence" };
                    tracing::error!(
                        reason,
                        what,
                        device = %up.cfg.device_id,
                        "broker refused a publish: with the shipped ACL, device_id must equal the \
                         certificate's CN or the user name (docs/configuration.md)"
                    );
                }
                if let Some(Some((i, seq))) = sent {
                    if refused.is_none() {
                        up.metrics.uplink.acked.inc();
                    }
                    // A refused block stays unconfirmed and goes again
                    // after the delivery timeout (doubling).
                    self.cursors[i].win.ack(seq);
                }
            }
            // To the detect stage: it verifies and installs it at its next
            // window.
            Ev::Publish { topic: t, payload } if layer_of(&self.model_topics, &t).is_some() => {
                let layer = layer_of(&self.model_topics, &t).unwrap_or_default();
                self.actions.push(Action::Model { layer, payload });
            }
            Ev::Publish { topic: t, payload } if layer_of(&self.program_topics, &t).is_some() => {
                let layer = layer_of(&self.program_topics, &t).unwrap_or_default();
                self.actions.push(Action::Programs { layer, payload });
            }
            Ev::Publish { topic: t, payload } if t == self.certificate_topic => {
                self.actions.push(Action::Certificate(payload))
            }
            Ev::Publish { topic: t, payload } if layer_of(&self.config_topics, &t).is_some() => {
                let layer = layer_of(&self.config_topics, &t).unwrap_or_default();
                self.actions.push(Action::Config { layer, payload });
            }
            Ev::Publish { topic: t, payload } if t == self.reply_topic => self.time_reply(&payload, now),
            Ev::Publish { topic: t, payload } if t == self.ack_topic => self.confirmation(&payload, lanes),
            Ev::Publish { .. } | Ev::Other | Ev::Timeout => {}
            Ev::Error { message, reason, tls } => {
                up.metrics.uplink.errors.inc();
                if let Some(why) = tls {
                    let labels = crate::metrics::RefusalLabels { reason: why.into() };
                    up.metrics.uplink.handshake_failures.get_or_create(&labels).inc();
                }
                if !self.connected {
                    self.failure = Some((reason, tls));
                }
                if self.connected {
                    tracing::warn!(error = message, reason, "connection to broker lost");
                } else if let Some(suppressed) = failures.due() {
                    let (what, hint) = failure_hint(reason);
                    tracing::warn!(
                        error = message,
                        reason,
                        host = %m.host,
                        port = m.port,
                        device = %up.cfg.device_id,
                        suppressed,
                        "{what}: {hint} (docs/configuration.md; said at most once a minute)"
                    );
                }
                return Flow::End;
            }
            Ev::Closed => return Flow::End,
        }
        Flow::Go
    }

    /// A bridge's delivery confirmation: moves the lane's position, or is
    /// ignored (counted) when it confirms what was never published.
    fn confirmation(&mut self, payload: &[u8], lanes: &mut [LaneSend]) {
        let confirmed = edge_wire::DeliveryAck::decode(payload).map_err(|e| e.to_string()).and_then(|a| {
            let l = lanes.iter_mut().find(|l| l.lane as u8 == a.lane).ok_or("unknown lane")?;
            if l.delivery.confirm(a.first_seq, a.last_seq).map_err(|e| e.to_string())?.is_some() {
                l.dirty = true;
            }
            Ok(())
        });
        if let Err(why) = confirmed {
            // Never trusted: the send position stays where it is, so
            // nothing stored is skipped.
            self.up.metrics.uplink.confirmations_ignored.inc();
            if let Some(suppressed) = self.forged.due() {
                tracing::warn!(why, suppressed, "delivery confirmation ignored");
            }
        } else {
            self.up.metrics.uplink.confirmed.inc();
            self.confirmed_any = true;
        }
    }

    /// After each event: cursors that waited too long for confirmations
    /// go back; a moved position is made durable now and then.
    pub fn watch(&mut self, lanes: &mut [LaneSend], now: Instant) {
        for c in self.cursors.iter_mut() {
            if let Some(r) = c.watch(&mut lanes[c.lane].delivery, now) {
                tracing::warn!(
                    stream = c.kind.label(),
                    confirmed = r.from,
                    broker_acked = r.broker_acked,
                    waited = ?r.waited,
                    "no delivery confirmation; sending again from the confirmed position"
                );
                self.up.metrics.uplink.resends.inc();
            }
        }
        if now.saturating_duration_since(self.persisted_at) >= PERSIST_EVERY {
            if lanes.iter().any(|l| l.dirty) {
                self.actions.push(Action::Persist);
            }
            self.persisted_at = now;
        }
    }

    /// When the session next has something to do on its own (a
    /// confirmation wait running out, a moved position to make durable,
    /// live data due, a time request to repeat): the driver waits for the
    /// connection until then at the latest. `None`: nothing is due; only
    /// the connection moves it.
    pub fn wake_at(&self, lanes: &[LaneSend], now: Instant) -> Option<Instant> {
        if !self.connected {
            return None;
        }
        let live_every = Duration::from_millis(self.up.cfg.mqtt.live_interval_ms);
        let deadlines = self.cursors.iter().filter_map(|c| c.deadline(&lanes[c.lane].delivery));
        let persist = lanes.iter().any(|l| l.dirty).then_some(self.persisted_at + PERSIST_EVERY);
        let live = Some(self.last_live + live_every);
        let ask = self.time.pending.map(|(_, sent)| sent + TIME_ASK_EVERY);
        // Only what lies ahead: a time already past with nothing done
        // (no open block to send, say) waits for the next event.
        deadlines.chain(persist).chain(live).chain(ask).filter(|&t| t > now).min()
    }

    /// The connection is over: the positions are to be made durable
    /// (an action); whether the broker accepted the connection and its
    /// publishes (the back-off starts over then).
    pub fn end(&mut self, stopping: bool) -> bool {
        self.actions.push(Action::Persist);
        // mosquitto closes a connection right after refusing a publish, often
        // before its PUBACK (with the reason) is read: a connection that
        // ended before the broker acknowledged anything is counted, and like
        // one with refusals it does not reset the back-off.
        if self.connected && !self.acked_any && !stopping {
            self.up.metrics.uplink.unacknowledged.inc();
            tracing::warn!(
                device = %self.up.cfg.device_id,
                "connection ended before the broker acknowledged anything: refused by its ACL? \
                 (device_id must equal the certificate's CN or the user name)"
            );
        }
        self.connected && self.refusals == 0 && self.acked_any
    }

    /// The cursors of a new connection, from the confirmed positions: the
    /// priority lane; the routine lane's live data, and behind it its
    /// backlog (when there is one). The store's open block is closed, so
    /// live data starts a block of its own.
    fn cursors(&self, lanes: &[LaneSend]) -> Vec<Cursor> {
        let max = self.up.cfg.mqtt.max_inflight as usize;
        let mut store = lock(&self.up.store);
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
        &mut self,
        wire: &impl Wire,
        lanes: &mut [LaneSend],
        now: Instant,
    ) -> Result<(), crate::store::StoreError> {
        let up = self.up;
        let max = up.cfg.mqtt.max_inflight as usize;
        let live_every = Duration::from_millis(up.cfg.mqtt.live_interval_ms);
        for i in 0..self.cursors.len() {
            let inflight: usize = self.cursors.iter().map(|c| c.win.inflight()).sum();
            let room = max.saturating_sub(inflight).min(self.cursors[i].win.room());
            if room == 0 {
                return Ok(());
            }
            let c = &mut self.cursors[i];
            if c.kind == CursorKind::Backlog && (c.win.last_sent() + 1 >= c.until || !self.budget.allows(now)) {
                continue;
            }
            let lane = if c.kind == CursorKind::Priority { Lane::Priority } else { Lane::Routine };
            // A block held for the true time is not read again (every turn,
            // for nothing) until the answer comes or the wait is given up;
            // blocks before it (sent again after a delivery timeout) are.
            if let Some(seq) = c.held {
                if c.win.last_sent() + 1 >= seq && held_for_time(up, &self.time, lane, seq, now) {
                    continue;
                }
                c.held = None;
            }
            let live_due = now.saturating_duration_since(self.last_live) >= live_every;
            let include_open = c.kind != CursorKind::Live || live_due;
            let blocks = lock(&up.store).get(lane).read_blocks(c.win.last_sent(), room, READ_BYTES, include_open)?;
            if c.kind == CursorKind::Live && include_open && !blocks.is_empty() {
                self.last_live = now;
            }
            for block in blocks {
                let (Some(first), Some(last)) = (block.first(), block.last()) else { continue };
                let c = &mut self.cursors[i];
                if first.seq >= c.until || (c.kind == CursorKind::Backlog && !self.budget.allows(now)) {
                    break;
                }
                let Some(clock_shift_ms) = shift_for(up, &mut self.time, lane, first.seq, now) else {
                    // This boot's true time is not known yet: hold the lane.
                    self.cursors[i].held = Some(first.seq);
                    break;
                };
                let env = edge_wire::Envelope {
                    device: &up.cfg.device_id,
                    lane: lane as u8,
                    first_seq: first.seq,
                    clock_shift_ms,
                    frames: block.iter().map(|r| r.payload.as_slice()).collect(),
                };
                let payload = env.encode();
                let bytes = payload.len();
                if !wire.publish(&self.topic, true, false, payload) {
                    // Request queue full: the block is read again next turn.
                    return Ok(());
                }
                c.win.sent(last.seq);
                lanes[c.lane].delivery.published(last.seq);
                self.pkids.queued(Some((i, last.seq)));
                if c.kind == CursorKind::Backlog {
                    self.budget.spend(bytes);
                }
                up.metrics.uplink.published.inc();
                up.metrics.uplink.published_bytes(c.kind.label()).inc_by(bytes as u64);
            }
        }
        Ok(())
    }

    /// Asks any bridge for the time while this boot's true time is unknown
    /// and the wall clock is not synchronized.
    fn ask_time(&mut self, wire: &impl Wire, now: Instant) {
        let up = self.up;
        if !lock(&up.clock).needs_time(&up.boot) {
            return;
        }
        if self.time.last.is_some_and(|t| now.saturating_duration_since(t) < TIME_ASK_EVERY) {
            return;
        }
        self.time.nonce += 1;
        let nonce = self.time.nonce;
        let topic = edge_wire::time_topic(&up.cfg.mqtt.topic_prefix, &up.cfg.device_id);
        let msg = edge_wire::TimeRequest { nonce }.encode();
        if wire.publish(&topic, false, false, msg) {
            self.time.pending = Some((nonce, now));
            self.time.last = Some(now);
        }
    }

    /// A bridge's answer: its wall clock when our request arrived, which
    /// was between sending and now; for the clock stage.
    fn time_reply(&mut self, payload: &[u8], now: Instant) {
        let reply = match edge_wire::TimeReply::decode(payload) {
            Ok(r) => r,
            Err(e) => return tracing::warn!(error = %e, "malformed time reply ignored"),
        };
        let Some((_, sent)) = self.time.pending.filter(|(n, _)| *n == reply.nonce) else {
            return; // an answer to an earlier request, or to another bridge's copy
        };
        let rtt = now.saturating_duration_since(sent);
        if rtt > TIME_MAX_RTT {
            return tracing::debug!(rtt = ?rtt, "time reply too slow to use");
        }
        self.time.pending = None;
        self.actions.push(Action::TrueTime { bridge_ms: reply.bridge_ms, sent, received: now });
    }
}

/// The clock correction for the block starting at `seq`, or `None` while
/// it must wait for this boot's true time.
fn shift_for(up: &Uplink, time: &mut TimeAsk, lane: Lane, seq: u64, now: Instant) -> Option<i64> {
    if held_for_time(up, time, lane, seq, now) {
        return None;
    }
    let shift = lock(&up.clock).shift(lane as usize, seq, &up.boot);
    match shift {
        Shift::Known(d) => Some(d),
        Shift::Pending if !time.gave_up => {
            let waited = time.connected_at.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            tracing::warn!(
                waited = ?waited,
                "no answer to time requests (is the bridge older than this agent?): \
                 sending blocks of the unsynchronized clock as stamped"
            );
            time.gave_up = true;
            up.metrics.clock.uncorrected.inc();
            Some(0)
        }
        Shift::Pending | Shift::Unknowable => {
            up.metrics.clock.uncorrected.inc();
            Some(0)
        }
    }
}

/// Whether the block starting at record `seq` of `lane` waits for this
/// boot's true time at `now`: its era is unsynchronized, of this boot, the
/// offset not learned yet, and the session has not waited
/// `clock.sync_wait_secs` for it.
fn held_for_time(up: &Uplink, time: &TimeAsk, lane: Lane, seq: u64, now: Instant) -> bool {
    let waited = time.connected_at.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
    !time.gave_up
        && waited < Duration::from_secs(up.cfg.clock.sync_wait_secs)
        && lock(&up.clock).shift(lane as usize, seq, &up.boot) == Shift::Pending
}

/// What a failed connection attempt means, and what to check.
fn failure_hint(reason: &str) -> (&'static str, &'static str) {
    match reason {
        "tls" => (
            "TLS handshake with the broker failed",
            "check mqtt.tls (CA, certificate, key) against the broker's certificate, and this box's clock against \
             the certificates' validity",
        ),
        "not_authorized" | "refused_by_broker" => (
            "broker refused the connection",
            "check mqtt.tls / mqtt.auth against the broker's certificates, password file and ACL",
        ),
        "dns" => ("cannot connect to the broker", "mqtt.host does not resolve"),
        "refused" => ("cannot connect to the broker", "nothing listens at mqtt.host:mqtt.port"),
        _ => ("cannot connect to the broker", "the agent keeps storing and retries with back-off"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, Reading};
    use crate::config::Config;
    use crate::store::blocks::BlockWriter;
    use crate::store::Lanes;
    use crate::window::Window;
    use edge_wire::{Label, SeriesKey};
    use std::cell::RefCell;
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Recorded(RefCell<Vec<(String, Vec<u8>)>>);

    impl Wire for Recorded {
        fn publish(&self, topic: &str, _qos1: bool, _retain: bool, payload: Vec<u8>) -> bool {
            self.0.borrow_mut().push((topic.to_owned(), payload));
            true
        }
        fn subscribe(&self, _topics: &[String]) -> bool {
            true
        }
    }

    /// A backlog of an unsynchronized era of this boot waits for the true
    /// time; meanwhile the session does not read it from the store on every
    /// turn (a fleet reconnecting after an outage, its answers slow, burnt
    /// the devices' CPU that way), and sends it once the answer comes.
    #[test]
    fn a_block_held_for_the_true_time_is_not_read_again_until_the_answer() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config { device_id: "held".into(), state_dir: dir.path().to_owned(), ..Config::default() };
        let mut lanes = Lanes::open(&cfg.store_dir(), cfg.store_limits(), cfg.priority_limits()).unwrap();
        let (mut clock, _) = Clock::open(dir.path(), 1000);
        let wall = 1_700_000_000_000;
        let unsynced =
            Reading { boot_id: crate::clock::boot_id().into(), mono_ms: 1_000, wall_ms: wall, synced: false };
        clock.observe(&unsynced, [1, 1]).unwrap();
        let mut writer = BlockWriter::new(100, usize::MAX);
        for k in 0..10 {
            let samples = vec![(SeriesKey::new("held_total", vec![Label::new("k", "v")]), k as f64)];
            let w = Window { timestamp_ms: wall + k * 1000, samples, values: Vec::new() };
            writer.write(lanes.get(Lane::Routine), &w).unwrap();
        }
        let store = Arc::new(Mutex::new(lanes));
        let (metrics, _) = crate::metrics::AgentMetrics::new();
        let clock = Arc::new(Mutex::new(clock));
        let up = Uplink::new(cfg, store.clone(), clock, metrics, Arc::new(AtomicBool::new(false)));
        let mut lanes = up.lane_sends();
        let wire = Recorded::default();
        let mut failures = Throttle::new(Duration::from_secs(60));
        let now = Instant::now();
        let mut session = Session::new(&up, now);
        session.on(Ev::ConnAck, &wire, &mut lanes, &mut failures, now);
        let read = || lock(&store).routine.stats().read_records;
        let blocks = |wire: &Recorded| wire.0.borrow().iter().filter(|(t, _)| t.ends_with("/metrics")).count();

        session.publish(&wire, &mut lanes, now);
        let first = read();
        assert!(first > 0, "the backlog is read once");
        for k in 1..50 {
            session.publish(&wire, &mut lanes, now + Duration::from_millis(k));
        }
        assert_eq!(read(), first, "a held block is not read again");
        assert_eq!(blocks(&wire), 0, "nor sent");

        // The bridge's answer to the time request.
        let request = wire.0.borrow().iter().find(|(t, _)| t.ends_with("/time")).map(|(_, p)| p.clone()).unwrap();
        let nonce = edge_wire::TimeRequest::decode(&request).unwrap().nonce;
        let reply = edge_wire::TimeReply { nonce, bridge_ms: wall + 5_000 }.encode();
        let at = now + Duration::from_millis(100);
        let topic = edge_wire::time_reply_topic(&up.cfg.mqtt.topic_prefix, &up.cfg.device_id);
        session.on(Ev::Publish { topic, payload: reply }, &wire, &mut lanes, &mut failures, at);
        up.carry_out(session.actions(), &mut lanes);
        session.publish(&wire, &mut lanes, at);
        assert!(read() > first, "read again once the time is known");
        assert_eq!(blocks(&wire), 1, "and sent");
    }
}
