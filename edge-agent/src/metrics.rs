//! The agent's own `/metrics` endpoint (prometheus-client, OpenMetrics text),
//! on loopback by default. Every metric is listed in docs/metrics.md.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::probe::tcp_lifecycle::{
    Kind, PortClasses, ProgramStats, TcpCounters, CLASSES, DIRS, DIR_NAMES, PEERS, PEER_METRICS,
};
use crate::probe::ProbeState;
use crate::store::StoreStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub probe: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    pub stream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LaneLabels {
    pub lane: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub lane: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabels {
    pub transport: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: String,
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

/// Handles to every metric; cheap to clone (atomics behind `Arc`s).
#[derive(Clone, Default)]
pub struct AgentMetrics {
    pub probe_attached: Family<ProbeLabels, Gauge>,
    pub windows: Counter,
    pub window_errors: Counter,
    /// By [`Kind`], in `Kind::ALL` order.
    pub tcp: Vec<Family<TcpLabels, Counter>>,
    pub tcp_sock_map_full: Counter,
    pub tcp_tracked: Gauge,
    pub tcp_close_wait: Family<TcpLabels, Gauge>,
    /// Per peer group, by PEER_METRICS order.
    pub tcp_peer: Vec<Family<PeerLabels, Counter>>,
    pub tcp_tracked_capacity: Gauge,
    pub probe_runs: Family<ProbeLabels, Counter>,
    pub probe_run_seconds: Family<ProbeLabels, Counter<f64, AtomicU64>>,
    pub probe_missed_runs: Family<ProbeLabels, Counter>,
    /// The programs' last cumulative readings, by probe: the kernel's
    /// counts start again at 0 when a reload loads the programs anew.
    program_last: Arc<std::sync::Mutex<std::collections::HashMap<&'static str, ProgramStats>>>,
    pub cpu_seconds: Counter<f64, AtomicU64>,
    pub rss_bytes: Gauge,
    /// The store stage's (store/metrics.rs).
    pub store: crate::store::metrics::StoreMetrics,
    /// The uplink stage's (uplink/metrics.rs).
    pub uplink: crate::uplink::metrics::UplinkMetrics,
    /// The clock's (clock.rs).
    pub clock: crate::clock::ClockMetrics,
    pub devices_watched: Gauge,
    pub devices_over_cap: Gauge,
    pub device_files_open: Gauge,
    pub device_files_found: Family<HowLabels, Counter>,
    pub device_map_full: Family<MapLabels, Counter>,
    pub device_inflight_stale: Counter,
    pub device_inflight_spilled: Counter,
    pub bus_map_full: Family<MapLabels, Counter>,
    pub bus_map_entries: Family<MapLabels, Gauge>,
    pub bus_untimed: Counter,
    /// The detect stage's (detect/metrics.rs).
    pub detect: crate::detect::metrics::DetectMetrics,
    /// The values stage's (values/metrics.rs).
    pub values: crate::values::metrics::ValuesMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub name: String,
    pub sha256: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HowLabels {
    pub how: String,
}

impl AgentMetrics {
    pub fn new() -> (AgentMetrics, Arc<Registry>) {
        let m = AgentMetrics {
            tcp: Kind::ALL.iter().map(|_| Family::default()).collect(),
            tcp_peer: PEER_METRICS.iter().map(|_| Family::default()).collect(),
            ..Default::default()
        };
        let mut r = Registry::default();
        m.store.register(&mut r);
        m.values.register(&mut r);
        m.clock.register(&mut r);
        m.detect.register(&mut r);
        m.uplink.register(&mut r);
        r.register(
            "edge_agent_probe_attached",
            "1 if the probe is attached, 0 if disabled or unavailable",
            m.probe_attached.clone(),
        );
        r.register("edge_agent_windows", "Windows closed", m.windows.clone());
        r.register("edge_agent_window_errors", "Windows whose record could not be stored", m.window_errors.clone());
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
            r.register(name, help, m.tcp[kind as usize].clone());
        }
        let peer_help = [
            "TCP connections established, by direction and peer group",
            "TCP connection attempts that failed during the handshake, by direction and peer group",
            "Outbound TCP connection attempts answered with a reset, by peer group",
            "Established TCP connections closed, by direction and peer group",
        ];
        for (i, metric) in PEER_METRICS.iter().enumerate() {
            r.register(metric.trim_end_matches("_total"), peer_help[i], m.tcp_peer[i].clone());
        }
        r.register(
            "edge_tcp_connections_close_wait",
            "TCP connections the peer closed and our application has not (CLOSE_WAIT) now",
            m.tcp_close_wait.clone(),
        );
        r.register(
            "edge_agent_tcp_connections_tracked",
            "Connections the kernel's connection map holds now (map fill)",
            m.tcp_tracked.clone(),
        );
        r.register(
            "edge_agent_tcp_connections_tracked_capacity",
            "Capacity of the kernel's connection map",
            m.tcp_tracked_capacity.clone(),
        );
        r.register(
            "edge_agent_probe_runs",
            "Times the probe's eBPF program ran (kernel BPF statistics)",
            m.probe_runs.clone(),
        );
        r.register(
            "edge_agent_probe_run_seconds",
            "Time spent in the probe's eBPF program (kernel BPF statistics)",
            m.probe_run_seconds.clone(),
        );
        r.register(
            "edge_agent_probe_missed_runs",
            "Events the probe's eBPF program missed: the kernel skipped it because a BPF program was already running on that CPU (5.12+)",
            m.probe_missed_runs.clone(),
        );
        r.register("edge_agent_cpu_seconds", "CPU time of the agent process (user + system)", m.cpu_seconds.clone());
        r.register("edge_agent_resident_memory_bytes", "Resident memory of the agent process", m.rss_bytes.clone());
        r.register(
            "edge_agent_tcp_sock_map_full",
            "Connections whose open the kernel map could not remember",
            m.tcp_sock_map_full.clone(),
        );
        r.register(
            "edge_agent_devices_watched",
            "Watched devices present now (probes.devices.watch matches)",
            m.devices_watched.clone(),
        );
        r.register(
            "edge_agent_devices_over_cap",
            "Devices matched past the probe's cap of 128, not watched",
            m.devices_over_cap.clone(),
        );
        r.register(
            "edge_agent_device_files_open",
            "Watched device files open now, over all processes (kernel table entries)",
            m.device_files_open.clone(),
        );
        r.register(
            "edge_agent_device_files_found",
            "Watched open files registered, by how: open (the open hook) or scan (/proc)",
            m.device_files_found.clone(),
        );
        r.register(
            "edge_agent_device_map_full",
            "Device events a bounded kernel table could not hold, by map: files, inflight, series, errors",
            m.device_map_full.clone(),
        );
        r.register(
            "edge_agent_bus_map_full",
            "Bus events a bounded kernel table could not hold, by map: series, errors, gpio",
            m.bus_map_full.clone(),
        );
        r.register(
            "edge_agent_bus_map_entries",
            "Entries in the bus probe's kernel tables now, by map: series (capacity 128), errors (64), gpio (256)",
            m.bus_map_entries.clone(),
        );
        r.register(
            "edge_agent_bus_untimed",
            "Bus operations whose start the probe did not see (attached mid-operation, adapter number >= 64): \
             counted without latency (i2c: not counted)",
            m.bus_untimed.clone(),
        );
        r.register(
            "edge_agent_device_inflight_stale",
            "Device operations dropped: the exit's thread held the record of another call, whose exit was never seen",
            m.device_inflight_stale.clone(),
        );
        r.register(
            "edge_agent_device_inflight_spilled",
            "Device operations timed in the overflow table: another thread held the thread's slot",
            m.device_inflight_spilled.clone(),
        );
        (m, Arc::new(r))
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
            self.probe_runs.get_or_create(&l).inc_by(grown(s.runs, before.map(|b| b.runs)));
            let ns = grown(s.run_ns, before.map(|b| b.run_ns));
            self.probe_run_seconds.get_or_create(&l).inc_by(ns as f64 / 1e9);
            if let Some(missed) = s.missed {
                let c = self.probe_missed_runs.get_or_create(&l);
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

    /// The device probe's own health: devices and open files watched, and
    /// what its bounded kernel tables could not hold (cumulative counts).
    pub fn observe_devices(&self, d: &crate::probe::device_io::DeviceReading) {
        self.devices_watched.set(d.devices_present as i64);
        self.devices_over_cap.set(d.devices_over_cap as i64);
        self.device_files_open.set(d.files_open as i64);
        advance_to(&self.device_files_found.get_or_create(&HowLabels { how: "open".into() }), d.files_from_open);
        advance_to(&self.device_files_found.get_or_create(&HowLabels { how: "scan".into() }), d.files_from_scan);
        for (map, v) in
            [("files", d.fds_full), ("inflight", d.inflight_full), ("series", d.series_full), ("errors", d.errors_full)]
        {
            advance_to(&self.device_map_full.get_or_create(&MapLabels { map: map.into() }), v);
        }
        advance_to(&self.device_inflight_stale, d.stale_records);
        advance_to(&self.device_inflight_spilled, d.spilled);
    }

    /// The bus probe's own health (cumulative counts of the kernel side;
    /// they start over when the probe is attached again).
    pub fn observe_buses(&self, b: &crate::probe::buses::BusReading) {
        for (map, full, entries) in [
            ("series", b.series_full, b.series.len()),
            ("errors", b.errors_full, b.errors.len()),
            ("gpio", b.gpio_full, b.gpio.len()),
        ] {
            advance_to(&self.bus_map_full.get_or_create(&MapLabels { map: map.into() }), full);
            self.bus_map_entries.get_or_create(&MapLabels { map: map.into() }).set(entries as i64);
        }
        advance_to(&self.bus_untimed, b.untimed);
    }

    /// The values stage's counts (cumulative in the stage).
    pub fn observe_values(&self, v: &crate::values::ValuesStage) {
        self.values.observe(v);
    }

    /// The agent's own CPU time and resident memory (/proc/self).
    pub fn observe_process(&self) {
        // SAFETY: sysconf has no preconditions.
        let (hz, page) = unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // After the command name (which may hold spaces): utime, stime
            // are the 12th and 13th fields.
            let f: Vec<&str> = stat.rsplit_once(')').map_or("", |x| x.1).split_whitespace().collect();
            let ticks: f64 = [11, 12].iter().filter_map(|&i| f.get(i)?.parse::<f64>().ok()).sum();
            let secs = ticks / hz.max(1) as f64;
            if secs > self.cpu_seconds.get() {
                self.cpu_seconds.inc_by(secs - self.cpu_seconds.get());
            }
        }
        if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
            if let Some(pages) = statm.split_whitespace().nth(1).and_then(|v| v.parse::<i64>().ok()) {
                self.rss_bytes.set(pages * page);
            }
        }
    }

    pub fn set_probe(&self, name: &str, state: &ProbeState) {
        let v = i64::from(matches!(state, ProbeState::Attached));
        self.probe_attached.get_or_create(&ProbeLabels { probe: name.into() }).set(v);
    }

    /// Moves the TCP counters forward to a new cumulative reading.
    pub fn observe_tcp(&self, prev: &TcpCounters, now: &TcpCounters, classes: &PortClasses) {
        for (was, e) in prev.entries().zip(now.entries()) {
            let Some(name) = classes.name(e.class) else {
                continue;
            };
            if e.kind == Kind::CloseWaitEntered && e.value > 0 {
                let dir = e.index / CLASSES % DIRS;
                let l = TcpLabels { direction: e.direction.into(), port_class: name.into() };
                self.tcp_close_wait.get_or_create(&l).set(now.close_wait(dir, e.class) as i64);
            }
            if e.value <= was.value || !e.kind.is_counter() {
                continue;
            }
            let fam = &self.tcp[e.kind as usize];
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
                        self.tcp_peer[kind].get_or_create(&l).inc_by(v - was);
                    }
                }
            }
        }
        self.tcp_sock_map_full.inc_by(now.sock_map_full.saturating_sub(prev.sock_map_full));
        self.tcp_tracked.set(now.socks_tracked as i64);
        self.tcp_tracked_capacity.set(crate::probe::tcp_lifecycle::MAX_SOCKS as i64);
    }

    /// Brings a lane's store metrics (and its persisted send position) up
    /// to date with its statistics.
    pub fn observe_store(&self, lane: crate::store::Lane, s: &StoreStats) {
        self.store.observe(lane, s);
        self.uplink.acked_seq.get_or_create(&LaneLabels { lane: lane.label().into() }).set(s.acked_seq as i64);
    }

    pub fn observe_lanes(&self, lanes: &crate::store::Lanes) {
        self.observe_store(crate::store::Lane::Routine, lanes.routine.stats());
        self.observe_store(crate::store::Lane::Priority, lanes.priority.stats());
    }
}

/// Moves a counter up to a cumulative count kept elsewhere (a kernel map, a
/// stage's statistics): never down (after a probe is attached anew it waits
/// for the new count to pass the old).
pub(crate) fn advance_to(c: &Counter, v: u64) {
    c.inc_by(v.saturating_sub(c.get()));
}

/// The `[metrics]` section of the configuration (docs/configuration.md).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Local `/metrics` endpoint. Empty string: disabled.
    pub listen: String,
}
impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: "127.0.0.1:9464".into() }
    }
}

impl MetricsConfig {
    /// Errors name the key (`metrics.…`).
    pub fn validate(&self) -> Result<(), String> {
        if !self.listen.is_empty() {
            self.listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| format!("metrics.listen {:?}: {e}", self.listen))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_counters_add_growth_and_survive_a_reload() {
        let (m, _) = AgentMetrics::new();
        let stats = |runs, missed| ProgramStats { probe: "tcp_retransmits", runs, run_ns: runs * 100, missed };
        let l = ProbeLabels { probe: "tcp_retransmits".into() };
        let read = || (m.probe_runs.get_or_create(&l).get(), m.probe_missed_runs.get_or_create(&l).get());
        assert!(m.observe_programs(&[stats(10, Some(0))]).is_empty());
        assert_eq!(read(), (10, 0));
        assert_eq!(m.observe_programs(&[stats(15, Some(2))]), ["tcp_retransmits"], "first misses are told");
        assert!(m.observe_programs(&[stats(16, Some(3))]).is_empty(), "told once");
        assert_eq!(read(), (16, 3));
        // A SIGHUP loaded the program again: its kernel counts restart.
        m.observe_programs(&[stats(4, Some(1))]);
        assert_eq!(read(), (20, 4));
        assert!((m.probe_run_seconds.get_or_create(&l).get() - 2000e-9).abs() < 1e-12);
        // A kernel without recursion_misses: the counter is left alone.
        m.observe_programs(&[stats(5, None)]);
        assert_eq!(read(), (21, 4));
    }

    /// Docs equal code: every metric family the agent registers is in
    /// docs/metrics.md, by its exposed name (counters with `_total`).
    #[test]
    fn every_registered_metric_is_documented() {
        let (m, registry) = AgentMetrics::new();
        // The stages' labelled families, encoded once they have a child.
        m.observe_store(crate::store::Lane::Routine, &StoreStats::default());
        let _ = m.uplink.published_bytes("live");
        let _ = m.detect.action_counts();
        m.detect.model_changed("installed");
        let _ = m.detect.model_state.get_or_create(&StateLabels { state: "loaded".into() });
        let _ = m.detect.model_info.get_or_create(&ModelLabels { name: "m".into(), sha256: "s".into() });
        let _ = m.values.captured.get_or_create(&TransportLabels { transport: "modbus_tcp".into() });
        let _ = m.values.refused.get_or_create(&RefusalLabels { reason: "length".into() });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let mut names: Vec<String> =
            text.lines().filter_map(|l| Some(l.strip_prefix("# TYPE ")?.split(' ').next()?.to_string())).collect();
        // This file's labelled families are encoded only once they have a
        // child: their names from its registrations.
        let src = include_str!("metrics.rs");
        for part in src.split("r.register(").skip(1) {
            if let Some(name) = part.trim_start().strip_prefix("\"edge_").and_then(|p| p.split('"').next()) {
                names.push(format!("edge_{name}"));
            }
        }
        assert!(names.len() > 60, "{names:?}");
        let docs = include_str!("../../docs/metrics.md");
        for name in names {
            let documented = docs.contains(&format!("`{name}")) || docs.contains(&format!("`{name}_total"));
            assert!(documented, "{name} is registered but not in docs/metrics.md");
        }
    }
}
