//! End-to-end delivery confirmation, without sockets: which blocks the
//! central store has confirmed, and how far the durable send position may
//! move. Confirmations arrive per block, possibly out of order (several
//! bridges share a fleet) and possibly twice; the position only covers an
//! unbroken run from where it stood, and never passes what was published:
//! a confirmation of records this agent never handed to the broker (forged,
//! or from a bridge confused about another device) is refused.

use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Delivery {
    delivered: u64,
    /// The highest sequence number published (since start; everything up
    /// to `delivered` counts as published).
    published: u64,
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
            published: delivered,
            ahead: BTreeMap::new(),
            timeout: base_timeout,
            base_timeout,
            max_timeout: base_timeout * 32,
        }
    }

    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// The highest record handed to the broker (or delivered).
    pub fn highest_published(&self) -> u64 {
        self.published
    }

    /// Records up to `last` were handed to the broker.
    pub fn published(&mut self, last: u64) {
        self.published = self.published.max(last);
    }

    /// Records `first..=last` as delivered; returns the new position when it
    /// moved, or `Err` (changing nothing) when the range reaches past what
    /// was ever published.
    pub fn confirm(&mut self, first: u64, last: u64) -> Result<Option<u64>, NeverPublished> {
        if last > self.published {
            return Err(NeverPublished { last, published: self.published });
        }
        if last <= self.delivered || first > last {
            return Ok(None);
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
        Ok((self.delivered != before).then_some(self.delivered))
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

/// A confirmation of records that were never published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("confirmation up to record {last}, but only records up to {published} were published")]
pub struct NeverPublished {
    pub last: u64,
    pub published: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1);

    /// A delivery whose records up to `published` were handed to the broker.
    fn sent(delivered: u64, published: u64) -> Delivery {
        let mut d = Delivery::new(delivered, T);
        d.published(published);
        d
    }

    #[test]
    fn in_order_confirmations_move_the_position() {
        let mut d = sent(0, 6);
        assert_eq!(d.confirm(1, 5), Ok(Some(5)));
        assert_eq!(d.confirm(6, 6), Ok(Some(6)));
        assert_eq!(d.confirm(3, 6), Ok(None), "a repeat changes nothing");
    }

    /// A forged confirmation (a device certificate with the bridge's name
    /// once published one up to 10^9) must not move the position past what
    /// was stored and sent: the next outage's records would never go out.
    #[test]
    fn a_confirmation_of_records_never_published_is_refused() {
        let mut d = sent(10, 20);
        assert_eq!(d.confirm(11, 1_000_000_000), Err(NeverPublished { last: 1_000_000_000, published: 20 }));
        assert_eq!(d.confirm(21, 21), Err(NeverPublished { last: 21, published: 20 }));
        assert_eq!(d.delivered(), 10);
        assert_eq!(d.confirmed_from(10), 10, "nothing recorded ahead either");
        assert_eq!(d.confirm(11, 20), Ok(Some(20)));
        // Publishing never moves backwards (a resend from the confirmed position).
        d.published(15);
        assert_eq!(d.confirm(21, 25), Err(NeverPublished { last: 25, published: 20 }));
    }

    #[test]
    fn a_cursor_ahead_of_the_position_sees_its_own_run() {
        let mut d = sent(10, 41);
        assert_eq!(d.confirmed_from(20), 20);
        d.confirm(21, 25).unwrap();
        d.confirm(26, 30).unwrap();
        d.confirm(40, 41).unwrap();
        assert_eq!(d.confirmed_from(20), 30, "the live cursor's run");
        assert_eq!(d.confirmed_from(10), 10, "the backlog cursor: nothing yet");
        assert_eq!(d.confirmed_from(5), 10);
        d.confirm(11, 20).unwrap();
        assert_eq!(d.delivered(), 30);
        assert_eq!(d.confirmed_from(20), 30);
    }

    #[test]
    fn a_gap_holds_the_position_until_filled() {
        let mut d = sent(10, 25);
        assert_eq!(d.confirm(16, 20), Ok(None));
        assert_eq!(d.confirm(21, 25), Ok(None));
        assert_eq!(d.delivered(), 10);
        assert_eq!(d.confirm(11, 15), Ok(Some(25)));
    }

    #[test]
    fn timeout_backs_off_and_resets_on_progress() {
        let mut d = sent(0, 1);
        d.expired();
        d.expired();
        assert_eq!(d.timeout(), T * 4);
        for _ in 0..20 {
            d.expired();
        }
        assert_eq!(d.timeout(), T * 32);
        d.confirm(1, 1).unwrap();
        assert_eq!(d.timeout(), T);
    }
}
