//! The store stage's metrics (docs/metrics.md), registered by the stage
//! under `edge_agent_store_`, and the names of the store's series that
//! travel in every window ([`super::self_telemetry`]): one name each, on
//! `/metrics` and in Prometheus.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::plan::DropReason;
use super::{Lane, Lanes, StoreStats};
use crate::metrics::{advance_to, LaneLabels, ReasonLabels};

/// Its names' common prefix on `/metrics`.
pub const PREFIX: &str = "edge_agent_store";
/// Records stored and not yet confirmed, by lane (also in every window).
pub const BACKLOG_RECORDS: &str = "edge_agent_store_backlog_records";
/// Bytes on disk, by lane (also in every window).
pub const BYTES: &str = "edge_agent_store_bytes";
/// Records dropped before their time, by lane and reason; in windows as the
/// counter's sample (`_total`).
pub const DROPPED_RECORDS_TOTAL: &str = "edge_agent_store_dropped_records_total";

/// The name under [`PREFIX`] (registration adds the prefix back).
fn short(name: &str) -> &str {
    name.strip_prefix(PREFIX).and_then(|n| n.strip_prefix('_')).unwrap_or(name)
}

#[derive(Clone, Debug, Default)]
pub struct StoreMetrics {
    pub bytes: Family<LaneLabels, Gauge>,
    pub segments: Family<LaneLabels, Gauge>,
    pub backlog: Family<LaneLabels, Gauge>,
    pub appended: Family<LaneLabels, Counter>,
    pub dropped: Family<ReasonLabels, Counter>,
    pub syncs: Family<LaneLabels, Counter>,
    pub oldest_seconds: Family<LaneLabels, Gauge>,
    pub dropped_unsent: Family<LaneLabels, Counter>,
    pub corrupt: Family<LaneLabels, Counter>,
    pub truncated_bytes: Family<LaneLabels, Counter>,
}

impl StoreMetrics {
    /// Registers every one in a sub-registry of `registry` (prefix [`PREFIX`]).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix(PREFIX);
        r.register(short(BYTES), "Bytes held by the store on disk", self.bytes.clone());
        r.register("segments", "Segment files held by the store", self.segments.clone());
        r.register(
            short(BACKLOG_RECORDS),
            "Records stored and not yet confirmed by the bridge (not yet in the central store)",
            self.backlog.clone(),
        );
        r.register("appended_records", "Records appended to the store", self.appended.clone());
        r.register(
            short(DROPPED_RECORDS_TOTAL.trim_end_matches("_total")),
            "Records dropped before their time, oldest first, by reason (capacity, age, disk_full)",
            self.dropped.clone(),
        );
        r.register("syncs", "fsyncs of the store (group commit)", self.syncs.clone());
        r.register("oldest_record_timestamp_seconds", "Time of the oldest record held", self.oldest_seconds.clone());
        r.register(
            "dropped_unsent_records",
            "Dropped records that had not been acknowledged",
            self.dropped_unsent.clone(),
        );
        r.register("corrupt_records", "Records found corrupt and skipped", self.corrupt.clone());
        r.register("truncated_bytes", "Bytes of torn tails cut at recovery", self.truncated_bytes.clone());
    }

    /// Brings a lane's metrics up to date with its statistics.
    pub fn observe(&self, lane: Lane, s: &StoreStats) {
        let l = LaneLabels { lane: lane.label().into() };
        self.bytes.get_or_create(&l).set(s.bytes as i64);
        self.segments.get_or_create(&l).set(s.segments as i64);
        self.backlog.get_or_create(&l).set(s.backlog() as i64);
        self.oldest_seconds.get_or_create(&l).set(s.oldest_ms / 1000);
        for (c, v) in [
            (&self.appended, s.appended_records),
            (&self.syncs, s.syncs),
            (&self.dropped_unsent, s.dropped_unsent_records),
            (&self.corrupt, s.corrupt_records),
            (&self.truncated_bytes, s.truncated_bytes),
        ] {
            advance_to(&c.get_or_create(&l), v);
        }
        for (reason, v) in DropReason::ALL.iter().zip(s.dropped_records) {
            advance_to(
                &self.dropped.get_or_create(&ReasonLabels { lane: l.lane.clone(), reason: reason.label().into() }),
                v,
            );
        }
    }

    pub fn observe_lanes(&self, lanes: &Lanes) {
        self.observe(Lane::Routine, lanes.routine.stats());
        self.observe(Lane::Priority, lanes.priority.stats());
    }
}
