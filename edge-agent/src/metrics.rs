//! The agent's own `/metrics` endpoint (prometheus-client, OpenMetrics text),
//! on loopback by default. Every metric is listed in docs/metrics.md.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::store::StoreStats;

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

/// Handles to every metric, each stage's in its own struct; cheap to
/// clone (atomics behind `Arc`s).
#[derive(Clone, Default)]
pub struct AgentMetrics {
    /// The probe stage's (probe/metrics.rs).
    pub probes: crate::probe::metrics::ProbeMetrics,
    /// The window stage's (window.rs).
    pub window: crate::window::WindowMetrics,
    /// The agent process's own CPU time and memory.
    pub cpu_seconds: Counter<f64, AtomicU64>,
    pub rss_bytes: Gauge,
    /// The store stage's (store/metrics.rs).
    pub store: crate::store::metrics::StoreMetrics,
    /// The uplink stage's (uplink/metrics.rs).
    pub uplink: crate::uplink::metrics::UplinkMetrics,
    /// The clock's (clock.rs).
    pub clock: crate::clock::ClockMetrics,
    /// The detect stage's (detect/metrics.rs).
    pub detect: crate::detect::metrics::DetectMetrics,
    /// The values stage's (values/metrics.rs).
    pub values: crate::values::metrics::ValuesMetrics,
    /// Audit records, by result: stored or not_stored (audit.rs).
    pub audit_records: ResultCounts,
    /// Remote configuration documents, by result (remote.rs).
    pub remote_configs: ResultCounts,
    /// Probe program packs by result (probe_programs.rs).
    pub probe_programs: ResultCounts,
}

/// Counters by `result`.
pub type ResultCounts =
    prometheus_client::metrics::family::Family<ResultLabels, prometheus_client::metrics::counter::Counter>;

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

impl AgentMetrics {
    pub fn new() -> (AgentMetrics, Arc<Registry>) {
        let m = AgentMetrics::default();
        let mut r = Registry::default();
        m.probes.register(&mut r);
        m.window.register(&mut r);
        m.store.register(&mut r);
        m.values.register(&mut r);
        m.clock.register(&mut r);
        m.detect.register(&mut r);
        m.uplink.register(&mut r);
        r.register(
            "edge_agent_audit_records",
            "Audit trail records, by result: stored (in the priority lane) or not_stored (docs/audit.md)",
            m.audit_records.clone(),
        );
        r.register(
            "edge_agent_remote_configs",
            "Remote configuration documents, by result: applied (on trial), kept, reverted, refused \
             (docs/remote-config.md)",
            m.remote_configs.clone(),
        );
        r.register(
            "edge_agent_probe_programs",
            "Probe program packs, by result: installed, rolled_back (a probe attached before did not attach with \
             it, or the installed pack no longer verified at start), refused (docs/probes.md)",
            m.probe_programs.clone(),
        );
        r.register("edge_agent_cpu_seconds", "CPU time of the agent process (user + system)", m.cpu_seconds.clone());
        r.register("edge_agent_resident_memory_bytes", "Resident memory of the agent process", m.rss_bytes.clone());
        (m, Arc::new(r))
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

    /// Docs equal code: every metric family the agent registers is in
    /// docs/metrics.md, by its exposed name (counters with `_total`).
    #[test]
    fn every_registered_metric_is_documented() {
        let (m, registry) = AgentMetrics::new();
        // The stages' labelled families, encoded once they have a child.
        m.observe_store(crate::store::Lane::Routine, &StoreStats::default());
        let _ = m.uplink.published_bytes("live");
        let _ = m.audit_records.get_or_create(&ResultLabels { result: "stored".into() });
        let _ = m.remote_configs.get_or_create(&ResultLabels { result: "kept".into() });
        let _ = m.probe_programs.get_or_create(&ResultLabels { result: "installed".into() });
        let _ = m.uplink.renewals.get_or_create(&ResultLabels { result: "requested".into() });
        let _ = m.detect.action_counts();
        m.detect.model_changed("installed");
        let _ = m.detect.model_state.get_or_create(&StateLabels { state: "loaded".into() });
        let _ = m.detect.model_info.get_or_create(&ModelLabels { name: "m".into(), sha256: "s".into() });
        let _ = m.values.captured.get_or_create(&TransportLabels { transport: "modbus_tcp".into() });
        let _ = m.values.refused.get_or_create(&RefusalLabels { reason: "length".into() });
        let _ = m.uplink.handshake_failures.get_or_create(&RefusalLabels { reason: "expired".into() });
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        let mut names: Vec<String> =
            text.lines().filter_map(|l| Some(l.strip_prefix("# TYPE ")?.split(' ').next()?.to_string())).collect();
        // The probe stage's labelled families are encoded only once they
        // have a child: their names from its registrations (the set's, and
        // every probe's own `<probe>/metrics.rs`).
        let probe_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/probe");
        let mut sources = vec![probe_dir.join("metrics.rs")];
        for entry in std::fs::read_dir(&probe_dir).unwrap() {
            let own = entry.unwrap().path().join("metrics.rs");
            if own.exists() {
                sources.push(own);
            }
        }
        assert!(sources.len() >= 4, "{sources:?}");
        for path in sources {
            let src = std::fs::read_to_string(&path).unwrap();
            for part in src.split("r.register(").skip(1) {
                if let Some(name) = part.trim_start().strip_prefix("\"edge_").and_then(|p| p.split('"').next()) {
                    names.push(format!("edge_{name}"));
                }
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
