//! The bridge's `/metrics` (docs/metrics.md).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

impl ResultLabels {
    pub fn new(r: &str) -> Self {
        ResultLabels { result: r.into() }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceReasonLabels {
    pub device: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkLabels {
    pub link: String,
}

impl LinkLabels {
    pub fn new(l: &str) -> Self {
        LinkLabels { link: l.into() }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

#[derive(Clone, Default)]
pub struct BridgeMetrics {
    pub messages: Family<ResultLabels, Counter>,
    pub samples: Counter,
    pub samples_refused: Family<ReasonLabels, Counter>,
    pub samples_out_of_bounds: Family<DeviceReasonLabels, Counter>,
    pub connection_failures: Family<ReasonLabels, Counter>,
    pub requests: Family<StatusLabels, Counter>,
    pub retries: Counter,
    pub mqtt_connected: Gauge,
    pub subscribed: Gauge,
    pub pending_bytes: Gauge,
    pub waiting_messages: Gauge,
    pub audit_records: Family<LinkLabels, Counter>,
    pub audit_problems: Family<DeviceReasonLabels, Counter>,
    pub audit_missing: Family<DeviceLabels, Counter>,
}

impl BridgeMetrics {
    pub fn new() -> (BridgeMetrics, Arc<Registry>) {
        let m = BridgeMetrics::default();
        let mut r = Registry::default();
        r.register("fleet_bridge_messages", "MQTT messages handled, by result", m.messages.clone());
        r.register("fleet_bridge_samples_written", "Samples the store accepted", m.samples.clone());
        r.register(
            "fleet_bridge_samples_refused",
            "Samples the store refused for good, isolated by splitting requests, by reason",
            m.samples_refused.clone(),
        );
        r.register(
            "fleet_bridge_samples_out_of_bounds",
            "Samples never written because of their time, by device and reason (ahead: later than the bridge's \
             clock plus remote_write.max_sample_ahead_secs; too_old: earlier than its clock minus max_sample_age_secs)",
            m.samples_out_of_bounds.clone(),
        );
        r.register(
            "fleet_bridge_mqtt_connection_failures",
            "Failed or lost broker connections, by reason (tls, refused, dns, timeout, not_authorized, \
             refused_by_broker, closed, other)",
            m.connection_failures.clone(),
        );
        r.register(
            "fleet_bridge_remote_write_requests",
            "Remote-write requests, by HTTP status class",
            m.requests.clone(),
        );
        r.register(
            "fleet_bridge_remote_write_retries",
            "Remote-write attempts that will be retried",
            m.retries.clone(),
        );
        r.register(
            "fleet_bridge_pending_bytes",
            "Bytes the samples taken from the broker and not yet written or refused take, encoded for remote write \
             (at most remote_write.max_pending_bytes and one message)",
            m.pending_bytes.clone(),
        );
        r.register(
            "fleet_bridge_waiting_messages",
            "Messages taken from the broker and not yet decoded (bounded by the broker's in-flight window)",
            m.waiting_messages.clone(),
        );
        r.register(
            "fleet_bridge_audit_records",
            "Devices' audit records, by how each fitted its device's chain (next, first, gap, break, fork, \
             new_chain, seen: a re-send, not logged again; not_logged: the log could not take it, not confirmed)",
            m.audit_records.clone(),
        );
        r.register(
            "fleet_bridge_audit_problems",
            "Audit records that did not extend their chain, by device and reason (gap, break, fork, new_chain)",
            m.audit_problems.clone(),
        );
        r.register(
            "fleet_bridge_audit_missing_records",
            "Audit records missing in gaps of a device's chain, by device",
            m.audit_missing.clone(),
        );
        r.register("fleet_bridge_mqtt_connected", "1 while connected to the broker", m.mqtt_connected.clone());
        r.register(
            "fleet_bridge_subscribed",
            "1 once the broker confirmed the subscription (SUBACK) on the current connection",
            m.subscribed.clone(),
        );
        (m, Arc::new(r))
    }
}

pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        2 => "2xx",
        4 => "4xx",
        5 => "5xx",
        _ => "other",
    }
}
