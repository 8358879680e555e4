//! The `[mqtt]` section of the agent's configuration (docs/configuration.md):
//! its keys, defaults and validation, owned by this stage.

use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// "5" (default) or "3.1.1".
    pub protocol: crate::uplink::mqtt::Protocol,
    pub host: String,
    pub port: u16,
    /// Default: `edge-agent-<device_id>`.
    pub client_id: Option<String>,
    /// Topics are `<topic_prefix>/<device_id>/metrics`.
    pub topic_prefix: String,
    pub keep_alive_secs: u64,
    /// Records published and not yet acknowledged, at most.
    pub max_inflight: u16,
    /// While connected and caught up, the block being written is sent at
    /// most this often (0: every window, lowest latency). Longer intervals
    /// send fewer, better-compressed messages on metered links.
    pub live_interval_ms: u64,
    /// How long to wait for the bridge's end-to-end confirmation of blocks
    /// the broker took before sending them again; doubles (up to 32x) while
    /// nothing is confirmed.
    pub delivery_timeout_ms: u64,
    /// Reconnect back-off bounds, in milliseconds.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Pace of the backlog drain after a reconnect, bytes of messages per
    /// second (0: as fast as the broker takes them). Live data and the
    /// priority lane are not paced.
    pub drain_bytes_per_sec: u64,
    /// TLS to the broker. Default: on, with the files of
    /// /etc/edge-agent/tls (ca.crt, device.crt, device.key).
    pub tls: edge_wire::tls::TlsConfig,
    /// User name and password (e.g. without a client certificate).
    pub auth: edge_wire::tls::Credentials,
    /// When the client certificate expires within this many days, a new
    /// key and a certificate request are made and sent over the uplink
    /// (uplink/renewal.rs; 0: never).
    pub renew_certificate_days: u32,
}
/// Where the default config looks for the device's TLS files.
pub const DEFAULT_TLS_DIR: &str = "/etc/edge-agent/tls";
impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            protocol: crate::uplink::mqtt::Protocol::V5,
            host: "127.0.0.1".into(),
            port: 8883,
            client_id: None,
            topic_prefix: "edge".into(),
            keep_alive_secs: 30,
            max_inflight: 32,
            live_interval_ms: 0,
            delivery_timeout_ms: 30_000,
            reconnect_min_ms: 200,
            reconnect_max_ms: 30_000,
            drain_bytes_per_sec: 0,
            tls: edge_wire::tls::TlsConfig::in_dir(Path::new(DEFAULT_TLS_DIR), "device"),
            auth: edge_wire::tls::Credentials::default(),
            renew_certificate_days: 45,
        }
    }
}

impl MqttConfig {
    /// Errors name the key (`mqtt.…`).
    pub fn validate(&self) -> Result<(), String> {
        if self.delivery_timeout_ms < 500 {
            return Err("mqtt.delivery_timeout_ms must be at least 500".into());
        }
        self.tls.validate("mqtt.tls")?;
        if self.port == 0 {
            return Err("mqtt.port must be 1 .. 65535".into());
        }
        if self.renew_certificate_days > 3650 {
            return Err("mqtt.renew_certificate_days must be 0 (never) .. 3650".into());
        }
        if self.max_inflight == 0 {
            return Err("mqtt.max_inflight must be at least 1".into());
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            return Err("mqtt.reconnect_min_ms must be > 0 and <= mqtt.reconnect_max_ms".into());
        }
        if self.topic_prefix.is_empty() || self.topic_prefix.contains(['+', '#']) || self.topic_prefix.ends_with('/') {
            return Err("mqtt.topic_prefix must be non-empty, without + # or a trailing /".into());
        }
        Ok(())
    }
}
