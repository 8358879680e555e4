//! Window stage: turns one reading of the probes into the batch of samples
//! stored for that window. Pure; owns only which series it has emitted.

use crate::probe::tcp_lifecycle::{PortClasses, TcpCounters};
use crate::probe::ProbeReading;
use crate::store::blocks::Window;
use edge_wire::{Label, SeriesKey};
use std::collections::BTreeSet;

/// Remembers which series have ever been non-zero, so that once a series
/// exists it gets a sample every window (no gaps for Prometheus to read as
/// staleness) while never-seen label combinations cost nothing.
#[derive(Debug, Default)]
pub struct WindowStage {
    live_tcp: BTreeSet<usize>,
}

impl WindowStage {
    pub fn new() -> Self {
        Self::default()
    }

    /// The samples of the window ending at `timestamp_ms`, or `None` when
    /// there is nothing to say.
    pub fn close(
        &mut self,
        timestamp_ms: i64,
        reading: &ProbeReading,
        classes: Option<&PortClasses>,
    ) -> Option<Window> {
        let mut samples = Vec::new();
        if let (Some(tcp), Some(classes)) = (&reading.tcp, classes) {
            self.tcp_series(tcp, classes, &mut samples);
        }
        (!samples.is_empty()).then_some(Window { timestamp_ms, samples })
    }

    fn tcp_series(&mut self, c: &TcpCounters, classes: &PortClasses, out: &mut Vec<(SeriesKey, f64)>) {
        for e in c.entries() {
            if e.value == 0 && !self.live_tcp.contains(&e.index) {
                continue;
            }
            let Some(class_name) = classes.name(e.class) else {
                continue;
            };
            self.live_tcp.insert(e.index);
            let labels = vec![Label::new("direction", e.direction), Label::new("port_class", class_name)];
            out.push((SeriesKey::new(e.kind.metric(), labels), e.value as f64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TcpLifecycleConfig;
    use crate::probe::tcp_lifecycle::Kind;

    #[test]
    fn emits_nonzero_series_and_keeps_them_once_seen() {
        let classes = PortClasses::from_config(&TcpLifecycleConfig::default());
        let mut w = WindowStage::new();
        let mut c = TcpCounters::default();
        assert!(w.close(1, &ProbeReading { tcp: Some(c.clone()) }, Some(&classes)).is_none());

        c.values[TcpCounters::index(Kind::Opened, 0, 0)] = 3;
        let b = w.close(2, &ProbeReading { tcp: Some(c.clone()) }, Some(&classes)).unwrap();
        assert_eq!(b.timestamp_ms, 2);
        assert_eq!(b.samples.len(), 1);
        let (key, v) = &b.samples[0];
        assert_eq!(key.name, "edge_tcp_connections_opened_total");
        assert_eq!(key.labels, vec![Label::new("direction", "outbound"), Label::new("port_class", "other")]);
        assert_eq!(*v, 3.0);
        key.validate().unwrap();

        // Counter reset (agent restart, new kernel map): the series stays.
        let b = w.close(3, &ProbeReading { tcp: Some(TcpCounters::default()) }, Some(&classes)).unwrap();
        assert_eq!(b.samples[0].1, 0.0);
    }
}
