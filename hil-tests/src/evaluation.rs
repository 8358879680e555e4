//! What an evaluation run measured, from the agent's own scored windows
//! and the labels of what was injected: per fault, detected and after how
//! many windows; per alarm level, the point-wise confusion counts, F1, the
//! false-alarm rate (FAR) and the missed-alarm rate (MAR). Pure: the
//! scenario runner reads the files and writes the report.

/// One window as the agent scored it (its samples export).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// The window's end, ms.
    pub ts: i64,
    pub score: f64,
    /// The stop level's alarm state after this window.
    pub alarm: bool,
    /// The warn level's state (false when the model has no warn level).
    pub warning: bool,
}

/// One injected fault: active in [start_ms, end_ms); the process is back
/// to normal at `recovered_ms` (>= end_ms).
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    pub fault: String,
    pub start_ms: i64,
    pub end_ms: i64,
    pub recovered_ms: i64,
}

/// A window's truth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truth {
    /// A fault covers at least half of it.
    Faulty(usize),
    /// Normal activity only.
    Normal,
    /// Neither: a fault covers less than half of it, or the process is
    /// still returning to normal after a fault (not counted either way).
    Excluded,
}

/// The truth of the window (ts - window_ms, ts].
pub fn truth(labels: &[Label], ts: i64, window_ms: i64) -> Truth {
    let from = ts - window_ms;
    for (i, l) in labels.iter().enumerate() {
        let covered = l.end_ms.min(ts) - l.start_ms.max(from);
        if covered * 2 >= window_ms {
            return Truth::Faulty(i);
        }
    }
    let touched = labels.iter().any(|l| l.start_ms < ts && l.recovered_ms.max(l.end_ms) > from);
    if touched {
        Truth::Excluded
    } else {
        Truth::Normal
    }
}

/// Point-wise counts of one decision (a level's alarm state, or its score
/// against the level's threshold) over the windows that count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Confusion {
    pub tp: u32,
    pub fp: u32,
    pub fn_: u32,
    pub tn: u32,
}

impl Confusion {
    pub fn of(windows: &[Scored], labels: &[Label], window_ms: i64, decide: impl Fn(&Scored) -> bool) -> Confusion {
        let mut c = Confusion::default();
        for w in windows {
            match (truth(labels, w.ts, window_ms), decide(w)) {
                (Truth::Faulty(_), true) => c.tp += 1,
                (Truth::Faulty(_), false) => c.fn_ += 1,
                (Truth::Normal, true) => c.fp += 1,
                (Truth::Normal, false) => c.tn += 1,
                (Truth::Excluded, _) => {}
            }
        }
        c
    }

    /// As `of`, for a debounced state that stays on `hold` windows after
    /// its cause is gone (the agent's `clear_after`): a normal window counts
    /// neither way while the state has been on without a break since a
    /// faulty window and at most `hold` windows separate the two. Beyond
    /// that, or when the state rises in normal time, it is a false alarm.
    pub fn of_held(
        windows: &[Scored],
        labels: &[Label],
        window_ms: i64,
        hold: usize,
        decide: impl Fn(&Scored) -> bool,
    ) -> Confusion {
        let mut c = Confusion::default();
        // Windows since the last faulty window, while the state stayed on.
        let mut since_fault: Option<usize> = None;
        for w in windows {
            let (truth, on) = (truth(labels, w.ts, window_ms), decide(w));
            since_fault = match (truth, on, since_fault) {
                (_, false, _) => None,
                (Truth::Faulty(_), true, _) => Some(0),
                (_, true, Some(k)) => Some(k + 1),
                (_, true, None) => None,
            };
            match (truth, on) {
                (Truth::Faulty(_), true) => c.tp += 1,
                (Truth::Faulty(_), false) => c.fn_ += 1,
                (Truth::Normal, true) if since_fault.is_some_and(|k| k <= hold) => {}
                (Truth::Normal, true) => c.fp += 1,
                (Truth::Normal, false) => c.tn += 1,
                (Truth::Excluded, _) => {}
            }
        }
        c
    }

    pub fn f1(&self) -> f64 {
        2.0 * f64::from(self.tp) / f64::from((2 * self.tp + self.fp + self.fn_).max(1))
    }

    /// False-alarm rate: normal windows decided faulty.
    pub fn far(&self) -> f64 {
        f64::from(self.fp) / f64::from((self.fp + self.tn).max(1))
    }

    /// Missed-alarm rate: faulty windows decided normal.
    pub fn mar(&self) -> f64 {
        f64::from(self.fn_) / f64::from((self.fn_ + self.tp).max(1))
    }
}

/// Per injection: the first window (1 = the first window ending after the
/// fault began) whose decision is true, among the windows from the fault's
/// start to one window after its end; None: not detected.
pub fn detection_delay(
    windows: &[Scored],
    label: &Label,
    window_ms: i64,
    decide: impl Fn(&Scored) -> bool,
) -> Option<usize> {
    windows.iter().filter(|w| w.ts > label.start_ms && w.ts <= label.end_ms + window_ms).position(decide).map(|k| k + 1)
}

/// Alarms raised (a rising edge of `decide`) in normal windows.
pub fn false_raises(windows: &[Scored], labels: &[Label], window_ms: i64, decide: impl Fn(&Scored) -> bool) -> u32 {
    let mut prev = false;
    let mut n = 0;
    for w in windows {
        let now = decide(w);
        if now && !prev && truth(labels, w.ts, window_ms) == Truth::Normal {
            n += 1;
        }
        prev = now;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(fault: &str, start_ms: i64, end_ms: i64, recovered_ms: i64) -> Label {
        Label { fault: fault.into(), start_ms, end_ms, recovered_ms }
    }

    fn w(ts: i64, score: f64, alarm: bool) -> Scored {
        Scored { ts, score, alarm, warning: false }
    }

    #[test]
    fn windows_are_faulty_when_half_covered_and_excluded_while_the_process_recovers() {
        let l = [label("bearing_wear", 10_500, 30_000, 50_000), label("cavitation", 60_000, 70_000, 70_000)];
        assert_eq!(truth(&l, 10_000, 10_000), Truth::Normal);
        assert_eq!(truth(&l, 20_000, 10_000), Truth::Faulty(0)); // 9.5 s of 10
        assert_eq!(truth(&l, 15_500, 10_000), Truth::Faulty(0)); // exactly half
        assert_eq!(truth(&l, 15_499, 10_000), Truth::Excluded);
        assert_eq!(truth(&l, 11_000, 10_000), Truth::Excluded); // 0.5 s of 10
        assert_eq!(truth(&l, 40_000, 10_000), Truth::Excluded); // recovering
        assert_eq!(truth(&l, 60_000, 10_000), Truth::Normal); // recovered at 50 s
        assert_eq!(truth(&l, 70_000, 10_000), Truth::Faulty(1));
        assert_eq!(truth(&l, 80_000, 10_000), Truth::Normal); // no recovery time
    }

    #[test]
    fn confusion_rates_and_delays() {
        let l = [label("valve_closure", 30_000, 70_000, 70_000)];
        // Windows of 10 s ending at 10..=100 s; faulty: 40, 50, 60, 70.
        let scores = [0.1, 0.2, 0.1, 0.5, 2.0, 3.0, 2.5, 1.5, 0.1, 0.2];
        let alarm = [false, false, false, false, false, true, true, true, true, false];
        let ws: Vec<Scored> = (0..10).map(|i| w(10_000 * (i + 1), scores[i as usize], alarm[i as usize])).collect();
        let by_alarm = Confusion::of(&ws, &l, 10_000, |w| w.alarm);
        assert_eq!(by_alarm, Confusion { tp: 2, fp: 2, fn_: 2, tn: 4 });
        assert_eq!(by_alarm.far(), 2.0 / 6.0);
        assert_eq!(by_alarm.mar(), 0.5);
        assert_eq!(by_alarm.f1(), 0.5);
        let by_score = Confusion::of(&ws, &l, 10_000, |w| w.score > 1.0);
        assert_eq!(by_score, Confusion { tp: 3, fp: 1, fn_: 1, tn: 5 });
        assert_eq!(detection_delay(&ws, &l[0], 10_000, |w| w.alarm), Some(3));
        assert_eq!(detection_delay(&ws, &l[0], 10_000, |w| w.score > 1.0), Some(2));
        assert_eq!(detection_delay(&ws, &l[0], 10_000, |w| w.score > 5.0), None);
        // The alarm raised once, inside the fault: no false raise; a raise
        // in normal time is one.
        assert_eq!(false_raises(&ws, &l, 10_000, |w| w.alarm), 0);
        // Above 0.15: raised at 20 s and again at 100 s (normal), and at
        // 40 s (faulty).
        assert_eq!(false_raises(&ws, &l, 10_000, |w| w.score > 0.15), 2);
    }

    #[test]
    fn a_held_state_after_a_fault_counts_neither_way_up_to_its_hold() {
        let l = [label("stuck_sensor", 20_000, 40_000, 40_000)];
        // Windows of 10 s ending at 10..=100 s; faulty: 30, 40.
        let alarm = [false, false, true, true, true, true, true, false, true, false];
        let ws: Vec<Scored> = (0..10).map(|i| w(10_000 * (i + 1), 0.0, alarm[i as usize])).collect();
        // Strict: on at 50, 60, 70 and 90 s in normal time.
        assert_eq!(Confusion::of(&ws, &l, 10_000, |w| w.alarm), Confusion { tp: 2, fp: 4, fn_: 0, tn: 4 });
        // A hold of 2: 50 and 60 s are the hold; 70 s is beyond it; 90 s rose
        // in normal time.
        assert_eq!(Confusion::of_held(&ws, &l, 10_000, 2, |w| w.alarm), Confusion { tp: 2, fp: 2, fn_: 0, tn: 4 });
        assert_eq!(Confusion::of_held(&ws, &l, 10_000, 3, |w| w.alarm), Confusion { tp: 2, fp: 1, fn_: 0, tn: 4 });
        assert_eq!(Confusion::of_held(&ws, &l, 10_000, 0, |w| w.alarm), Confusion::of(&ws, &l, 10_000, |w| w.alarm));
    }
}
