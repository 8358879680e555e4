//! The probe stage's metrics (docs/metrics.md): whether each probe runs,
//! its programs' run counts and time, and each probe's own health and
//! counts. Registered by the stage ([`ProbeMetrics::register`]), moved once
//! per window from the probes' reading ([`ProbeMetrics::observe`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use super::tcp_lifecycle::ProgramStats;
use super::{EachProbeMetrics, ProbeReading, ProbeState, Probes};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub probe: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

/// 1 while a probe is attached (also sent with every window; the name
/// registered below, where docs/metrics.md's test reads it).
pub const ATTACHED: &str = "edge_agent_probe_attached";

/// The probe set's metrics; cheap to clone (atomics behind `Arc`s).
#[derive(Clone, Debug, Default)]
pub struct ProbeMetrics {
    pub attached: Family<ProbeLabels, Gauge>,
    pub runs: Family<ProbeLabels, Counter>,
    pub run_seconds: Family<ProbeLabels, Counter<f64, AtomicU64>>,
    pub missed_runs: Family<ProbeLabels, Counter>,
    /// The programs' last cumulative readings, by probe: the kernel's
    /// counts start again at 0 when a reload loads the programs anew.
    program_last: Arc<Mutex<HashMap<&'static str, ProgramStats>>>,
    /// Each probe's own, by its name in the probe set.
    pub each: EachProbeMetrics,
}

impl ProbeMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "edge_agent_probe_attached",
            "1 if the probe is attached, 0 if disabled or unavailable",
            self.attached.clone(),
        );
        r.register(
            "edge_agent_probe_runs",
            "Times the probe's eBPF program ran (kernel BPF statistics)",
            self.runs.clone(),
        );
        r.register(
            "edge_agent_probe_run_seconds",
            "Time spent in the probe's eBPF program (kernel BPF statistics)",
            self.run_seconds.clone(),
        );
        r.register(
            "edge_agent_probe_missed_runs",
            "Events the probe's eBPF program missed: the kernel skipped it because a BPF program was already running on that CPU (5.12+)",
            self.missed_runs.clone(),
        );
        self.each.register(r);
    }

    /// Every probe's state, as `edge_agent_probe_attached`.
    pub fn set_states(&self, probes: &Probes) {
        for (name, state) in &probes.states {
            self.set_state(name, state);
        }
    }

    pub fn set_state(&self, name: &str, state: &ProbeState) {
        let v = i64::from(matches!(state, ProbeState::Attached));
        self.attached.get_or_create(&ProbeLabels { probe: name.into() }).set(v);
    }

    /// One window's reading: each probe's own metrics, the programs'
    /// statistics. Returns the probes whose first missed events this shows.
    pub fn observe(&self, probes: &mut Probes, reading: &ProbeReading) -> Vec<&'static str> {
        probes.observe(reading, &self.each);
        self.observe_programs(&probes.program_stats())
    }

    /// Adds what the programs' cumulative counts grew by since the last
    /// reading (all of a count that went down: the programs were loaded
    /// again). Returns the probes whose first missed events this shows.
    pub fn observe_programs(&self, stats: &[ProgramStats]) -> Vec<&'static str> {
        let mut first_misses = Vec::new();
        let mut last = self.program_last.lock().unwrap_or_else(|p| p.into_inner());
        for s in stats {
            let before = last.get(s.probe);
            let grown = |now: u64, then: Option<u64>| now.checked_sub(then.unwrap_or(0)).unwrap_or(now);
            let l = ProbeLabels { probe: s.probe.into() };
            self.runs.get_or_create(&l).inc_by(grown(s.runs, before.map(|b| b.runs)));
            let ns = grown(s.run_ns, before.map(|b| b.run_ns));
            self.run_seconds.get_or_create(&l).inc_by(ns as f64 / 1e9);
            if let Some(missed) = s.missed {
                let c = self.missed_runs.get_or_create(&l);
                let add = grown(missed, before.and_then(|b| b.missed));
                if c.get() == 0 && add > 0 {
                    first_misses.push(s.probe);
                }
                c.inc_by(add);
            }
            last.insert(s.probe, s.clone());
        }
        first_misses
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_counters_add_growth_and_survive_a_reload() {
        let m = ProbeMetrics::default();
        let stats = |runs, missed| ProgramStats { probe: "tcp_retransmits", runs, run_ns: runs * 100, missed };
        let l = ProbeLabels { probe: "tcp_retransmits".into() };
        let read = || (m.runs.get_or_create(&l).get(), m.missed_runs.get_or_create(&l).get());
        assert!(m.observe_programs(&[stats(10, Some(0))]).is_empty());
        assert_eq!(read(), (10, 0));
        assert_eq!(m.observe_programs(&[stats(15, Some(2))]), ["tcp_retransmits"], "first misses are told");
        assert!(m.observe_programs(&[stats(16, Some(3))]).is_empty(), "told once");
        assert_eq!(read(), (16, 3));
        // A SIGHUP loaded the program again: its kernel counts restart.
        m.observe_programs(&[stats(4, Some(1))]);
        assert_eq!(read(), (20, 4));
        assert!((m.run_seconds.get_or_create(&l).get() - 2000e-9).abs() < 1e-12);
        // A kernel without recursion_misses: the counter is left alone.
        m.observe_programs(&[stats(5, None)]);
        assert_eq!(read(), (21, 4));
    }
}
