//! The uplink stage's metrics (docs/metrics.md), registered by the stage
//! under `edge_agent_uplink_`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::metrics::{LaneLabels, RefusalLabels, ResultLabels, StreamLabels};

/// Its names' common prefix on `/metrics`.
pub const PREFIX: &str = "edge_agent_uplink";

/// When the client certificate expires (Unix seconds): on `/metrics` and,
/// as a series of every window, to the fleet (configs/rules/: an alert 30
/// days before).
pub const CERTIFICATE_EXPIRY: &str = "edge_agent_tls_certificate_expiry_timestamp_seconds";

#[derive(Clone, Debug, Default)]
pub struct UplinkMetrics {
    pub connected: Gauge,
    pub published: Counter,
    pub acked: Counter,
    pub confirmed: Counter,
    pub resends: Counter,
    pub connects: Counter,
    pub errors: Counter,
    pub refused: Counter,
    pub unacknowledged: Counter,
    pub confirmations_ignored: Counter,
    pub acked_seq: Family<LaneLabels, Gauge>,
    pub bytes: Family<StreamLabels, Counter>,
    /// [`CERTIFICATE_EXPIRY`]; 0 until a certificate was read.
    pub certificate_expiry: Gauge,
    /// TLS handshakes with the broker that failed, by reason
    /// (`edge_wire::tls::handshake_failure`).
    pub handshake_failures: Family<RefusalLabels, Counter>,
    /// Client certificate rotations, by result (rotation.rs).
    pub rotations: Family<ResultLabels, Counter>,
    /// Certificate renewal steps over the uplink (renewal.rs).
    pub renewals: Family<ResultLabels, Counter>,
}

impl UplinkMetrics {
    /// Registers every one in a sub-registry of `registry` (prefix
    /// [`PREFIX`]).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix(PREFIX);
        r.register("connected", "1 while connected to the MQTT broker", self.connected.clone());
        r.register("published_records", "Records published (including re-sends)", self.published.clone());
        r.register("acked_records", "Records acknowledged by the broker", self.acked.clone());
        r.register(
            "confirmed_blocks",
            "Blocks the fleet bridge confirmed as written to the central store",
            self.confirmed.clone(),
        );
        r.register(
            "resends",
            "Times unconfirmed blocks were sent again after the delivery timeout",
            self.resends.clone(),
        );
        r.register("connects", "Successful MQTT connections", self.connects.clone());
        r.register("errors", "MQTT connection errors", self.errors.clone());
        r.register(
            "confirmations_ignored",
            "Delivery confirmations not trusted: malformed, of an unknown lane, or covering records this agent \
             never published (the send position does not move)",
            self.confirmations_ignored.clone(),
        );
        r.register(
            "unacknowledged_sessions",
            "Connections that ended before the broker acknowledged anything (e.g. refused by its ACL)",
            self.unacknowledged.clone(),
        );
        r.register(
            "refused",
            "Blocks the broker refused (MQTT 5 PUBACK reason code, e.g. not authorized)",
            self.refused.clone(),
        );
        r.register("acked_seq", "Persisted send position (store sequence number)", self.acked_seq.clone());
        r.register(
            "published_bytes",
            "Message bytes published, by stream: priority, live, backlog (re-sends included)",
            self.bytes.clone(),
        );
        registry.register(
            CERTIFICATE_EXPIRY,
            "When this device's client certificate expires (Unix seconds; read on every connection attempt)",
            self.certificate_expiry.clone(),
        );
        registry.register(
            "edge_agent_tls_handshake_failures",
            "TLS handshakes with the broker that failed, by reason: expired, not_yet_valid, unknown_ca, wrong_name, \
             bad_certificate (the broker's), client_certificate_expired, client_certificate_refused (ours), other",
            self.handshake_failures.clone(),
        );
        registry.register(
            "edge_agent_tls_rotations",
            "Client certificates dropped in <state_dir>/tls-drop, by result: installed (the broker accepted it), \
             refused (unusable, not from the CA, another identity, expired, or refused by the broker)",
            self.rotations.clone(),
        );
        registry.register(
            "edge_agent_tls_renewals",
            "Client certificate renewal over the uplink, by step: requested (a new key and request made), \
             delivered (a certificate for it came: into tls-drop, tried as a rotation), ignored (a certificate \
             message for no waiting request or another key), not_requested (the request could not be written)",
            self.renewals.clone(),
        );
    }

    /// The uplink's series of every window: the client certificate's
    /// expiry, once known.
    pub fn window_samples(&self) -> Option<(edge_wire::SeriesKey, f64)> {
        let at = self.certificate_expiry.get();
        (at > 0).then(|| (edge_wire::SeriesKey::new(CERTIFICATE_EXPIRY, vec![]), at as f64))
    }

    /// The bytes counter of one stream (`priority`, `live`, `backlog`).
    pub fn published_bytes(&self, stream: &str) -> Counter {
        self.bytes.get_or_create(&StreamLabels { stream: stream.into() }).clone()
    }
}
