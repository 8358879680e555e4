//! The values stage's metrics (docs/metrics.md, docs/process-values.md).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::{advance_to, RefusalLabels, TransportLabels};

#[derive(Clone, Debug, Default)]
pub struct ValuesMetrics {
    pub tags: Gauge,
    pub captured: Family<TransportLabels, Counter>,
    pub refused: Family<RefusalLabels, Counter>,
}

impl ValuesMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register("edge_agent_value_tags", "Tags in the tag map (docs/process-values.md)", self.tags.clone());
        r.register(
            "edge_agent_values_captured",
            "Process values captured, by transport (modbus_tcp, modbus_rtu)",
            self.captured.clone(),
        );
        r.register(
            "edge_agent_values_refused",
            "Process values (or frames and replies carrying them) not kept, by reason (docs/process-values.md)",
            self.refused.clone(),
        );
    }

    /// Brings them up to the stage's (cumulative) counts.
    pub fn observe(&self, v: &super::ValuesStage) {
        self.tags.set(v.map.tags.len() as i64);
        for (t, n) in ["modbus_tcp", "modbus_rtu"].iter().zip(v.captured) {
            advance_to(&self.captured.get_or_create(&TransportLabels { transport: (*t).into() }), n);
        }
        for (r, n) in super::Refusal::ALL.iter().zip(v.refused) {
            advance_to(&self.refused.get_or_create(&RefusalLabels { reason: r.label().into() }), n);
        }
    }
}
