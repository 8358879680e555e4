//! Rate-limited logging for both programs: a condition that repeats (a
//! broker unreachable, a device sending garbage) is said at once, then at
//! most once per interval with the count of what went unsaid, so one
//! device's stream of bad input cannot flood a log.

use std::time::{Duration, Instant};

/// At most one message per `every`: `due` says whether to speak now, and
/// how many were held back since it last did.
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Throttle { every, last: None, suppressed: 0 }
    }

    pub fn due(&mut self) -> Option<u64> {
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Speak at once next time (the condition ended).
    pub fn reset(&mut self) {
        self.last = None;
        self.suppressed = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_once_then_counts_until_the_interval_passed() {
        let mut t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.due(), Some(0));
        assert_eq!(t.due(), None);
        assert_eq!(t.due(), None);
        t.last = Instant::now().checked_sub(Duration::from_secs(3601));
        assert_eq!(t.due(), Some(2), "the two held back are reported");
        t.reset();
        assert_eq!(t.due(), Some(0));
        let mut always = Throttle::new(Duration::ZERO);
        assert_eq!((always.due(), always.due()), (Some(0), Some(0)));
    }
}
