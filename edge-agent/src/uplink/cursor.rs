//! A connection's cursors over the lanes, without sockets or clocks: the
//! time is always the caller's (`now`), so the same code runs under the
//! driver and under simulated time in tests.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::delivery::Delivery;
use super::inflight::InFlight;

/// A cursor over a run of one lane's records, with its own flow-control
/// window. A connection has one per lane, or two for a routine lane with a
/// backlog: live data (records from the connection on) first, the backlog
/// behind it, paced by `mqtt.drain_bytes_per_sec`. Prometheus takes the
/// backlog's older samples after newer ones within its out-of-order
/// window; within each cursor a series' samples stay in order.
pub struct Cursor {
    /// Index into the lanes.
    pub lane: usize,
    /// The cursor's records are after `base`...
    pub base: u64,
    /// ...and before `until`.
    pub until: u64,
    pub kind: CursorKind,
    /// Flow control: what the broker has acknowledged.
    pub win: InFlight,
    /// Since when blocks the broker took wait for confirmation (restarts
    /// whenever a confirmation moves this cursor's confirmed run).
    waiting_since: Option<Instant>,
    /// The confirmed run's end when last looked at.
    confirmed_seen: u64,
    /// The first record of a block held back until this boot's true time
    /// is known (session.rs): not read from the store again until then.
    pub held: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CursorKind {
    Priority,
    Live,
    Backlog,
}

impl CursorKind {
    /// Its name in `edge_agent_uplink_published_bytes_total{stream}`.
    pub fn label(self) -> &'static str {
        match self {
            CursorKind::Priority => "priority",
            CursorKind::Live => "live",
            CursorKind::Backlog => "backlog",
        }
    }
}

/// A cursor gave up waiting for confirmations and goes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resend {
    /// Sends again after this record: the end of the confirmed run.
    pub from: u64,
    /// What the broker had acknowledged.
    pub broker_acked: u64,
    pub waited: Duration,
}

impl Cursor {
    pub fn new(lane: usize, kind: CursorKind, base: u64, until: u64, max_inflight: usize) -> Cursor {
        Cursor {
            lane,
            base,
            until,
            kind,
            win: InFlight::new(base, max_inflight),
            waiting_since: None,
            confirmed_seen: base,
            held: None,
        }
    }

    /// Looks at the lane's confirmations at `now`. Blocks the broker took
    /// wait for the bridge's confirmation; when none moved this cursor's
    /// confirmed run for the lane's delivery timeout, the cursor goes back
    /// to the end of that run (and the timeout doubles). Any progress
    /// starts the wait over.
    pub fn watch(&mut self, delivery: &mut Delivery, now: Instant) -> Option<Resend> {
        let confirmed = delivery.confirmed_from(self.base);
        let waiting = self.win.acked() > confirmed;
        let progress = confirmed > self.confirmed_seen;
        self.confirmed_seen = confirmed;
        match self.waiting_since {
            _ if !waiting || progress => {
                // Progress restarts the wait; a wait starts at the next look.
                self.waiting_since = waiting.then_some(now);
                None
            }
            None => {
                self.waiting_since = Some(now);
                None
            }
            Some(t) if now.saturating_duration_since(t) >= delivery.timeout() => {
                let resend = Resend { from: confirmed, broker_acked: self.win.acked(), waited: delivery.timeout() };
                self.win.reset_to(confirmed);
                delivery.expired();
                self.waiting_since = None;
                Some(resend)
            }
            Some(_) => None,
        }
    }
}

impl Cursor {
    /// When this cursor gives up waiting for confirmations, if it waits.
    pub fn deadline(&self, delivery: &Delivery) -> Option<Instant> {
        self.waiting_since.map(|t| t + delivery.timeout())
    }
}

/// Bytes per second for the backlog, as a token bucket that may go into
/// debt by one block (blocks are not split), with one second of burst.
pub struct Budget {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Budget {
    /// `bytes_per_sec` 0: no limit.
    pub fn new(bytes_per_sec: u64, now: Instant) -> Self {
        Budget { rate: bytes_per_sec as f64, tokens: bytes_per_sec as f64, at: now }
    }

    pub fn allows(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        self.tokens = (self.tokens + self.rate * now.saturating_duration_since(self.at).as_secs_f64()).min(self.rate);
        self.at = self.at.max(now);
        self.tokens > 0.0
    }

    pub fn spend(&mut self, bytes: usize) {
        if self.rate > 0.0 {
            self.tokens -= bytes as f64;
        }
    }
}

/// What a publish carried: a block (its cursor and last record) or not
/// (the presence birth message).
pub type Sent = Option<(usize, u64)>;

/// Packet ids: the MQTT client numbers publishes after they are queued,
/// in queue order; their acknowledgements name the number.
#[derive(Default)]
pub struct PacketIds {
    /// Queued publishes whose packet id the client has not reported, in order.
    awaiting: VecDeque<Sent>,
    by_id: HashMap<u16, Sent>,
}

impl PacketIds {
    /// A publish was queued.
    pub fn queued(&mut self, sent: Sent) {
        self.awaiting.push_back(sent);
    }

    /// The client gave the oldest queued publish this packet id.
    pub fn numbered(&mut self, pkid: u16) {
        if let Some(sent) = self.awaiting.pop_front() {
            self.by_id.insert(pkid, sent);
        }
    }

    /// The broker acknowledged `pkid`: what it carried (None: unknown id,
    /// or one acknowledged before).
    pub fn acked(&mut self, pkid: u16) -> Option<Sent> {
        self.by_id.remove(&pkid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(10);

    /// A cursor from 0 whose records 1..=10 the broker took.
    fn taken(delivery: &mut Delivery) -> Cursor {
        let mut c = Cursor::new(0, CursorKind::Live, 0, u64::MAX, 16);
        for seq in 1..=10 {
            c.win.sent(seq);
            delivery.published(seq);
            c.win.ack(seq);
        }
        c
    }

    #[test]
    fn a_cursor_goes_back_to_its_confirmed_run_after_the_timeout() {
        let t0 = Instant::now();
        let mut d = Delivery::new(0, T);
        let mut c = taken(&mut d);
        assert_eq!(c.watch(&mut d, t0), None, "the wait starts");
        d.confirm(1, 3).unwrap();
        assert_eq!(c.deadline(&d), Some(t0 + T), "the driver wakes then");
        assert_eq!(c.watch(&mut d, t0 + T / 2), None);
        assert_eq!(c.deadline(&d), Some(t0 + T + T / 2), "progress moved it");
        assert_eq!(c.watch(&mut d, t0 + T + T / 4), None, "progress at T/2 restarted the wait");
        let r = c.watch(&mut d, t0 + T + T / 2).expect("a full timeout since the last progress");
        assert_eq!((r.from, r.broker_acked, r.waited), (3, 10, T));
        assert_eq!(c.deadline(&d), None, "nothing waits until the resent blocks are acknowledged");
        assert_eq!(c.win.last_sent(), 3, "sends again after the confirmed run");
        assert_eq!(d.timeout(), T * 2, "and waits twice as long next time");
    }

    #[test]
    fn a_cursor_with_nothing_waiting_never_goes_back() {
        let t0 = Instant::now();
        let mut d = Delivery::new(0, T);
        let mut c = taken(&mut d);
        d.confirm(1, 10).unwrap();
        for k in 0..10 {
            assert_eq!(c.watch(&mut d, t0 + T * k), None);
        }
    }

    #[test]
    fn the_backlog_budget_refills_at_its_rate_with_a_second_of_burst() {
        let t0 = Instant::now();
        let mut b = Budget::new(1000, t0);
        assert!(b.allows(t0));
        b.spend(3000); // one block may overdraw
        assert!(!b.allows(t0 + Duration::from_secs(1)));
        assert!(b.allows(t0 + Duration::from_millis(2001)));
        assert!(b.allows(t0 + Duration::from_secs(100)));
        b.spend(1000);
        assert!(!b.allows(t0 + Duration::from_secs(100)), "a long idle time is one second of burst");
        let mut free = Budget::new(0, t0);
        free.spend(usize::MAX);
        assert!(free.allows(t0));
    }

    #[test]
    fn packet_ids_follow_the_queue_order() {
        let mut p = PacketIds::default();
        p.queued(None);
        p.queued(Some((0, 5)));
        p.queued(Some((1, 9)));
        p.numbered(1);
        p.numbered(2);
        assert_eq!(p.acked(2), Some(Some((0, 5))));
        assert_eq!(p.acked(2), None, "once");
        assert_eq!(p.acked(1), Some(None));
        assert_eq!(p.acked(7), None);
        p.numbered(3);
        assert_eq!(p.acked(3), Some(Some((1, 9))));
    }
}
