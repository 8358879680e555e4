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

use super::tcp_lifecycle::{
    Kind, PortClasses, ProgramStats, TcpCounters, CLASSES, DIRS, DIR_NAMES, PEERS, PEER_METRICS,
};
use super::{ProbeReading, ProbeState, Probes};
use crate::metrics::advance_to;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub probe: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub direction: String,
    pub port_class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub direction: String,
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HowLabels {
    pub how: String,
}

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
    pub tcp: TcpMetrics,
    pub devices: DeviceMetrics,
    pub buses: BusMetrics,
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
        self.tcp.register(r);
        self.devices.register(r);
        self.buses.register(r);
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

    /// One window's reading: the TCP counters against the previous
    /// reading's (`prev`, then replaced), the device and bus probes'
    /// health, the programs' statistics. Returns the probes whose first
    /// missed events this shows.
    pub fn observe(&self, probes: &Probes, reading: &ProbeReading, prev: &mut TcpCounters) -> Vec<&'static str> {
        if let (Some(now), Some(p)) = (&reading.tcp, &probes.tcp) {
            self.tcp.observe(prev, now, p.classes());
            *prev = now.clone();
        }
        if let Some(d) = &reading.devices {
            self.devices.observe(d);
        }
        if let Some(b) = &reading.buses {
            self.buses.observe(b);
        }
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

/// The TCP probe's (tcp_lifecycle).
#[derive(Clone, Debug)]
pub struct TcpMetrics {
    /// By [`Kind`], in `Kind::ALL` order.
    pub counts: Vec<Family<TcpLabels, Counter>>,
    pub sock_map_full: Counter,
    pub tracked: Gauge,
    pub close_wait: Family<TcpLabels, Gauge>,
    /// Per peer group, by PEER_METRICS order.
    pub peers: Vec<Family<PeerLabels, Counter>>,
    pub tracked_capacity: Gauge,
}

impl Default for TcpMetrics {
    fn default() -> Self {
        TcpMetrics {
            counts: Kind::ALL.iter().map(|_| Family::default()).collect(),
            sock_map_full: Counter::default(),
            tracked: Gauge::default(),
            close_wait: Family::default(),
            peers: PEER_METRICS.iter().map(|_| Family::default()).collect(),
            tracked_capacity: Gauge::default(),
        }
    }
}

impl TcpMetrics {
    fn register(&self, r: &mut Registry) {
        for kind in Kind::ALL.into_iter().filter(|k| k.is_counter()) {
            let help = match kind {
                Kind::Opened => "TCP connections established, by direction and port class",
                Kind::Failed => "TCP connection attempts that failed during the handshake (refused included)",
                Kind::Closed => "Established TCP connections closed",
                Kind::Refused => "Outbound TCP connection attempts answered with a reset",
                Kind::Retransmits => "TCP segments retransmitted",
                Kind::ResetsSent => "TCP resets sent",
                Kind::ResetsReceived => "TCP resets received",
                Kind::CloseWaitEntered | Kind::CloseWaitLeft => continue,
            };
            let name = kind.metric().trim_end_matches("_total");
            r.register(name, help, self.counts[kind as usize].clone());
        }
        let peer_help = [
            "TCP connections established, by direction and peer group",
            "TCP connection attempts that failed during the handshake, by direction and peer group",
            "Outbound TCP connection attempts answered with a reset, by peer group",
            "Established TCP connections closed, by direction and peer group",
        ];
        for (i, metric) in PEER_METRICS.iter().enumerate() {
            r.register(metric.trim_end_matches("_total"), peer_help[i], self.peers[i].clone());
        }
        r.register(
            "edge_tcp_connections_close_wait",
            "TCP connections the peer closed and our application has not (CLOSE_WAIT) now",
            self.close_wait.clone(),
        );
        r.register(
            "edge_agent_tcp_connections_tracked",
            "Connections the kernel's connection map holds now (map fill)",
            self.tracked.clone(),
        );
        r.register(
            "edge_agent_tcp_connections_tracked_capacity",
            "Capacity of the kernel's connection map",
            self.tracked_capacity.clone(),
        );
        r.register(
            "edge_agent_tcp_sock_map_full",
            "Connections whose open the kernel map could not remember",
            self.sock_map_full.clone(),
        );
    }

    /// Moves the TCP counters forward to a new cumulative reading.
    pub fn observe(&self, prev: &TcpCounters, now: &TcpCounters, classes: &PortClasses) {
        for (was, e) in prev.entries().zip(now.entries()) {
            let Some(name) = classes.name(e.class) else {
                continue;
            };
            if e.kind == Kind::CloseWaitEntered && e.value > 0 {
                let dir = e.index / CLASSES % DIRS;
                let l = TcpLabels { direction: e.direction.into(), port_class: name.into() };
                self.close_wait.get_or_create(&l).set(now.close_wait(dir, e.class) as i64);
            }
            if e.value <= was.value || !e.kind.is_counter() {
                continue;
            }
            let fam = &self.counts[e.kind as usize];
            let l = TcpLabels { direction: e.direction.into(), port_class: name.into() };
            fam.get_or_create(&l).inc_by(e.value - was.value);
        }
        if let Some(p) = &now.peers {
            for (slot, values) in p.values.iter().enumerate() {
                let (dir, group) = (slot / PEERS, slot % PEERS);
                let Some(name) = p.names.get(group) else { continue };
                for (kind, &v) in values.iter().enumerate() {
                    let was = prev.peers.as_ref().map_or(0, |q| q.values[slot][kind]);
                    if v > was {
                        let l = PeerLabels { direction: DIR_NAMES[dir].into(), peer: name.clone() };
                        self.peers[kind].get_or_create(&l).inc_by(v - was);
                    }
                }
            }
        }
        self.sock_map_full.inc_by(now.sock_map_full.saturating_sub(prev.sock_map_full));
        self.tracked.set(now.socks_tracked as i64);
        self.tracked_capacity.set(crate::probe::tcp_lifecycle::MAX_SOCKS as i64);
    }
}

/// The device probe's (device_io).
#[derive(Clone, Debug, Default)]
pub struct DeviceMetrics {
    pub watched: Gauge,
    pub over_cap: Gauge,
    pub files_open: Gauge,
    pub files_found: Family<HowLabels, Counter>,
    pub map_full: Family<MapLabels, Counter>,
    pub inflight_stale: Counter,
    pub inflight_spilled: Counter,
}

impl DeviceMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "edge_agent_devices_watched",
            "Watched devices present now (probes.devices.watch matches)",
            self.watched.clone(),
        );
        r.register(
            "edge_agent_devices_over_cap",
            "Devices matched past the probe's cap of 128, not watched",
            self.over_cap.clone(),
        );
        r.register(
            "edge_agent_device_files_open",
            "Watched device files open now, over all processes (kernel table entries)",
            self.files_open.clone(),
        );
        r.register(
            "edge_agent_device_files_found",
            "Watched open files registered, by how: open (the open hook) or scan (/proc)",
            self.files_found.clone(),
        );
        r.register(
            "edge_agent_device_map_full",
            "Device events a bounded kernel table could not hold, by map: files, inflight, series, errors",
            self.map_full.clone(),
        );
        r.register(
            "edge_agent_device_inflight_stale",
            "Device operations dropped: the exit's thread held the record of another call, whose exit was never seen",
            self.inflight_stale.clone(),
        );
        r.register(
            "edge_agent_device_inflight_spilled",
            "Device operations timed in the overflow table: another thread held the thread's slot",
            self.inflight_spilled.clone(),
        );
    }

    /// The device probe's own health: devices and open files watched, and
    /// what its bounded kernel tables could not hold (cumulative counts).
    pub fn observe(&self, d: &crate::probe::device_io::DeviceReading) {
        self.watched.set(d.devices_present as i64);
        self.over_cap.set(d.devices_over_cap as i64);
        self.files_open.set(d.files_open as i64);
        advance_to(&self.files_found.get_or_create(&HowLabels { how: "open".into() }), d.files_from_open);
        advance_to(&self.files_found.get_or_create(&HowLabels { how: "scan".into() }), d.files_from_scan);
        for (map, v) in
            [("files", d.fds_full), ("inflight", d.inflight_full), ("series", d.series_full), ("errors", d.errors_full)]
        {
            advance_to(&self.map_full.get_or_create(&MapLabels { map: map.into() }), v);
        }
        advance_to(&self.inflight_stale, d.stale_records);
        advance_to(&self.inflight_spilled, d.spilled);
    }
}

/// The bus probe's (buses).
#[derive(Clone, Debug, Default)]
pub struct BusMetrics {
    pub map_full: Family<MapLabels, Counter>,
    pub map_entries: Family<MapLabels, Gauge>,
    pub untimed: Counter,
}

impl BusMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "edge_agent_bus_map_full",
            "Bus events a bounded kernel table could not hold, by map: series, errors, gpio",
            self.map_full.clone(),
        );
        r.register(
            "edge_agent_bus_map_entries",
            "Entries in the bus probe's kernel tables now, by map: series (capacity 128), errors (64), gpio (256)",
            self.map_entries.clone(),
        );
        r.register(
            "edge_agent_bus_untimed",
            "Bus operations whose start the probe did not see (attached mid-operation, adapter number >= 64): \
             counted without latency (i2c: not counted)",
            self.untimed.clone(),
        );
    }

    /// The bus probe's own health (cumulative counts of the kernel side;
    /// they start over when the probe is attached again).
    pub fn observe(&self, b: &crate::probe::buses::BusReading) {
        for (map, full, entries) in [
            ("series", b.series_full, b.series.len()),
            ("errors", b.errors_full, b.errors.len()),
            ("gpio", b.gpio_full, b.gpio.len()),
        ] {
            advance_to(&self.map_full.get_or_create(&MapLabels { map: map.into() }), full);
            self.map_entries.get_or_create(&MapLabels { map: map.into() }).set(entries as i64);
        }
        advance_to(&self.untimed, b.untimed);
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
