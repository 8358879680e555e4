//! Flow control toward the broker, without sockets: which published
//! records the broker has not acknowledged yet (at most `max_inflight`),
//! and up to where it acknowledged every one. What the bridge confirmed,
//! and so the durable send position, is [`super::delivery`]'s.
//!
//! The acknowledged position only ever covers a prefix of what was sent in
//! which every record was acknowledged; a cursor goes back to it (or to the
//! confirmed run) to send again.

use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct InFlight {
    acked: u64,
    last_sent: u64,
    inflight: VecDeque<(u64, bool)>,
    max_inflight: usize,
}

impl InFlight {
    /// `acked`: the persisted send position (0: nothing acknowledged yet).
    pub fn new(acked: u64, max_inflight: usize) -> Self {
        InFlight { acked, last_sent: acked, inflight: VecDeque::new(), max_inflight: max_inflight.max(1) }
    }

    /// Everything up to here was acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Read the next records after this sequence number.
    pub fn last_sent(&self) -> u64 {
        self.last_sent
    }

    /// How many more records may be sent now.
    pub fn room(&self) -> usize {
        self.max_inflight - self.inflight.len()
    }

    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// `seq` was handed to the transport. Sequence numbers must rise; gaps
    /// (records dropped or found corrupt in the store) are allowed.
    pub fn sent(&mut self, seq: u64) {
        debug_assert!(seq > self.last_sent, "sent {seq} after {}", self.last_sent);
        debug_assert!(self.room() > 0);
        self.last_sent = seq;
        self.inflight.push_back((seq, false));
    }

    /// The transport confirmed `seq`. Returns the new send position when it
    /// advanced. Unknown or repeated acknowledgements change nothing.
    pub fn ack(&mut self, seq: u64) -> Option<u64> {
        let slot = self.inflight.iter_mut().find(|(s, _)| *s == seq)?;
        slot.1 = true;
        let before = self.acked;
        while let Some(&(s, true)) = self.inflight.front() {
            self.acked = s;
            self.inflight.pop_front();
        }
        (self.acked != before).then_some(self.acked)
    }

    /// The connection was lost: whatever was not acknowledged is sent again.
    pub fn reset(&mut self) {
        self.inflight.clear();
        self.last_sent = self.acked;
    }

    /// Forget everything after `pos` and send again from there (the
    /// end-to-end confirmed position).
    pub fn reset_to(&mut self, pos: u64) {
        self.inflight.clear();
        self.acked = pos;
        self.last_sent = pos;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_acks_advance_one_by_one() {
        let mut w = InFlight::new(0, 4);
        w.sent(1);
        w.sent(2);
        assert_eq!(w.room(), 2);
        assert_eq!(w.ack(1), Some(1));
        assert_eq!(w.ack(2), Some(2));
        assert_eq!(w.room(), 4);
    }

    #[test]
    fn out_of_order_ack_waits_for_the_gap() {
        let mut w = InFlight::new(10, 8);
        for s in 11..=13 {
            w.sent(s);
        }
        assert_eq!(w.ack(13), None);
        assert_eq!(w.ack(12), None);
        assert_eq!(w.acked(), 10);
        assert_eq!(w.ack(11), Some(13));
    }

    #[test]
    fn reset_resends_unacknowledged_from_the_position() {
        let mut w = InFlight::new(0, 8);
        for s in 1..=5 {
            w.sent(s);
        }
        w.ack(1);
        w.ack(3);
        w.reset();
        assert_eq!(w.last_sent(), 1);
        assert_eq!(w.room(), 8);
        // A late ack from the dead connection is ignored.
        assert_eq!(w.ack(2), None);
        assert_eq!(w.acked(), 1);
    }

    #[test]
    fn gaps_in_sequence_numbers_are_crossed() {
        let mut w = InFlight::new(0, 8);
        w.sent(4);
        w.sent(9);
        assert_eq!(w.ack(9), None);
        assert_eq!(w.ack(4), Some(9));
        assert_eq!(w.ack(4), None);
    }

    /// Exhaustive over every order of acknowledging 5 records with a reset
    /// at every point: the position never passes an unacknowledged record.
    #[test]
    fn position_never_passes_an_unacknowledged_record() {
        fn perms(v: &[u64]) -> Vec<Vec<u64>> {
            if v.len() <= 1 {
                return vec![v.to_vec()];
            }
            let mut out = vec![];
            for i in 0..v.len() {
                let mut rest = v.to_vec();
                let x = rest.remove(i);
                for mut p in perms(&rest) {
                    p.insert(0, x);
                    out.push(p);
                }
            }
            out
        }
        for order in perms(&[1, 2, 3, 4, 5]) {
            for cut in 0..=order.len() {
                let mut w = InFlight::new(0, 5);
                for s in 1..=5 {
                    w.sent(s);
                }
                let mut done = std::collections::BTreeSet::new();
                for &s in &order[..cut] {
                    w.ack(s);
                    done.insert(s);
                    assert!((1..=w.acked()).all(|x| done.contains(&x)));
                }
                w.reset();
                assert!((1..=w.acked()).all(|x| done.contains(&x)));
                assert_eq!(w.last_sent(), w.acked());
            }
        }
    }
}
