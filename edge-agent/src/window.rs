//! Window stage: turns one reading of the probes into the batch of samples
//! stored for that window. Pure; owns only which series it has emitted.

use crate::probe::tcp_lifecycle::{PortClasses, TcpCounters};
use crate::probe::ProbeReading;
use edge_wire::{Batch, Label, Sample, Series};
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

    /// The batch for the window ending at `timestamp_ms`, or `None` when
    /// there is nothing to say.
    pub fn close(&mut self, timestamp_ms: i64, reading: &ProbeReading, classes: Option<&PortClasses>) -> Option<Batch> {
        let mut series = Vec::new();
        if let (Some(tcp), Some(classes)) = (&reading.tcp, classes) {
            self.tcp_series(timestamp_ms, tcp, classes, &mut series);
        }
        (!series.is_empty()).then_some(Batch { series })
    }

    fn tcp_series(&mut self, ts: i64, c: &TcpCounters, classes: &PortClasses, out: &mut Vec<Series>) {
        for e in c.entries() {
            if e.value == 0 && !self.live_tcp.contains(&e.index) {
                continue;
            }
            let Some(class_name) = classes.name(e.class) else {
                continue;
            };
            self.live_tcp.insert(e.index);
            out.push(Series {
                name: e.kind.metric().to_string(),
                labels: vec![Label::new("direction", e.direction), Label::new("port_class", class_name)],
                samples: vec![Sample { timestamp_ms: ts, value: e.value as f64 }],
            });
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
        assert_eq!(b.series.len(), 1);
        let s = &b.series[0];
        assert_eq!(s.name, "edge_tcp_connections_opened_total");
        assert_eq!(s.labels, vec![Label::new("direction", "outbound"), Label::new("port_class", "other")]);
        assert_eq!(s.samples, vec![Sample { timestamp_ms: 2, value: 3.0 }]);
        b.validate().unwrap();

        // Counter reset (agent restart, new kernel map): the series stays.
        let b = w.close(3, &ProbeReading { tcp: Some(TcpCounters::default()) }, Some(&classes)).unwrap();
        assert_eq!(b.series[0].samples[0].value, 0.0);
    }
}
