//! The bus probe's own metrics on the agent's `/metrics` (docs/metrics.md):
//! its kernel tables' health.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::advance_to;
use crate::probe::metrics::MapLabels;

/// The bus probe's (buses).
#[derive(Clone, Debug, Default)]
pub struct BusMetrics {
    pub map_full: Family<MapLabels, Counter>,
    pub map_entries: Family<MapLabels, Gauge>,
    pub untimed: Counter,
}

impl BusMetrics {
    pub fn register(&self, r: &mut Registry) {
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
