//! End-to-end delivery confirmation, without sockets: which blocks the
//! central store has confirmed, and how far the durable send position may
//! move. Confirmations arrive per block, possibly out of order (several
//! bridges share a fleet) and possibly twice; the position only covers an
//! unbroken run from where it stood.

use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Delivery {
    delivered: u64,
    /// Confirmed ranges beyond a gap: first -> last.
    ahead: BTreeMap<u64, u64>,
    timeout: Duration,
    base_timeout: Duration,
    max_timeout: Duration,
}

impl Delivery {
    /// `delivered`: the persisted send position.
    pub fn new(delivered: u64, base_timeout: Duration) -> Self {
        Delivery {
            delivered,
            ahead: BTreeMap::new(),
            timeout: base_timeout,
            base_timeout,
            max_timeout: base_timeout * 32,
        }
    }

    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Records `first..=last` as delivered; returns the new position when it
    /// moved.
    pub fn confirm(&mut self, first: u64, last: u64) -> Option<u64> {
        if last <= self.delivered || first > last {
            return None;
        }
        // Any new confirmation is progress: the wait starts over.
        self.timeout = self.base_timeout;
        let e = self.ahead.entry(first).or_insert(last);
        *e = (*e).max(last);
        let before = self.delivered;
        while let Some((&f, &l)) = self.ahead.first_key_value() {
            if f > self.delivered + 1 {
                break;
            }
            self.delivered = self.delivered.max(l);
            self.ahead.remove(&f);
        }
        (self.delivered != before).then_some(self.delivered)
    }

    /// The end of the unbroken run of confirmed records after `pos` (`pos`
    /// itself when the next one is not confirmed), counting everything up
    /// to the delivered position as confirmed. A cursor that started at
    /// `pos` may resend from here.
    pub fn confirmed_from(&self, pos: u64) -> u64 {
        let mut end = pos.max(self.delivered);
        for (&f, &l) in &self.ahead {
            if f > end + 1 {
                break;
            }
            end = end.max(l);
        }
        end
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    pub fn expired(&mut self) {
        self.timeout = (self.timeout * 2).min(self.max_timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1);

    #[test]
    fn in_order_confirmations_move_the_position() {
        let mut d = Delivery::new(0, T);
        assert_eq!(d.confirm(1, 5), Some(5));
        assert_eq!(d.confirm(6, 6), Some(6));
        assert_eq!(d.confirm(3, 6), None, "a repeat changes nothing");
    }

    #[test]
    fn a_cursor_ahead_of_the_position_sees_its_own_run() {
        let mut d = Delivery::new(10, T);
        assert_eq!(d.confirmed_from(20), 20);
        d.confirm(21, 25);
        d.confirm(26, 30);
        d.confirm(40, 41);
        assert_eq!(d.confirmed_from(20), 30, "the live cursor's run");
        assert_eq!(d.confirmed_from(10), 10, "the backlog cursor: nothing yet");
        assert_eq!(d.confirmed_from(5), 10);
        d.confirm(11, 20);
        assert_eq!(d.delivered(), 30);
        assert_eq!(d.confirmed_from(20), 30);
    }

    #[test]
    fn a_gap_holds_the_position_until_filled() {
        let mut d = Delivery::new(10, T);
        assert_eq!(d.confirm(16, 20), None);
        assert_eq!(d.confirm(21, 25), None);
        assert_eq!(d.delivered(), 10);
        assert_eq!(d.confirm(11, 15), Some(25));
    }

    #[test]
    fn timeout_backs_off_and_resets_on_progress() {
        let mut d = Delivery::new(0, T);
        d.expired();
        d.expired();
        assert_eq!(d.timeout(), T * 4);
        for _ in 0..20 {
            d.expired();
        }
        assert_eq!(d.timeout(), T * 32);
        d.confirm(1, 1);
        assert_eq!(d.timeout(), T);
    }
}
