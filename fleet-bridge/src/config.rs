//! Bridge configuration (TOML, every key optional). docs/configuration.md.

use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// Where the default config looks for the bridge's TLS files.
pub const DEFAULT_TLS_DIR: &str = "/etc/fleet-bridge/tls";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub remote_write: RemoteWriteConfig,
    pub metrics: MetricsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Must be stable: the broker keeps this client's session (and the
    /// messages queued for it) across bridge restarts.
    pub client_id: String,
    /// Devices publish on `<topic_prefix>/<device>/metrics`.
    pub topic_prefix: String,
    pub keep_alive_secs: u64,
    /// Messages that can never be written are republished on
    /// `<dead_letter_prefix>/<why>` ("" disables it).
    pub dead_letter_prefix: String,
    /// Bridges with the same group split the fleet's messages between them
    /// (MQTT shared subscription `$share/<group>/...`). Default "": a plain
    /// subscription, for which the broker queues messages while the bridge
    /// is away. mosquitto 2.0 does not queue for a shared subscription whose
    /// members are all offline after a broker restart: those messages come
    /// again only when the device's delivery timeout resends them.
    pub share_group: String,
    /// TLS to the broker. Default: on, with the files of
    /// /etc/fleet-bridge/tls (ca.crt, bridge.crt, bridge.key), on the
    /// broker's bridge listener (8885 in configs/mosquitto/mosquitto.conf).
    pub tls: edge_wire::tls::TlsConfig,
    pub auth: edge_wire::tls::Credentials,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteWriteConfig {
    /// e.g. http://127.0.0.1:9090/api/v1/write
    pub url: String,
    pub timeout_ms: u64,
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    /// A block's series are written by up to this many requests at once
    /// (each series whole, in one of them).
    pub concurrency: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Empty: disabled.
    pub listen: String,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            host: "127.0.0.1".into(),
            port: 8885,
            client_id: "fleet-bridge".into(),
            topic_prefix: "edge".into(),
            keep_alive_secs: 30,
            dead_letter_prefix: "fleet/deadletter".into(),
            share_group: String::new(),
            tls: edge_wire::tls::TlsConfig::in_dir(Path::new(DEFAULT_TLS_DIR), "bridge"),
            auth: edge_wire::tls::Credentials::default(),
        }
    }
}

impl Default for RemoteWriteConfig {
    fn default() -> Self {
        RemoteWriteConfig {
            url: "http://127.0.0.1:9090/api/v1/write".into(),
            timeout_ms: 30_000,
            retry_min_ms: 100,
            retry_max_ms: 30_000,
            concurrency: 2,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: "127.0.0.1:9465".into() }
    }
}

impl Config {
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (cfg, origin) = match path {
            None => (Config::default(), "defaults".to_string()),
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.to_owned(), source })?;
                let cfg: Config = toml::from_str(&text)
                    .map_err(|e| ConfigError::Parse { path: p.to_owned(), message: e.to_string() })?;
                (cfg, p.display().to_string())
            }
        };
        cfg.validate().map_err(|message| ConfigError::Invalid { origin, message })?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.remote_write.url.starts_with("http://") || self.remote_write.url.starts_with("https://")) {
            return Err(format!("remote_write.url {:?} must be an http:// or https:// URL", self.remote_write.url));
        }
        if self.remote_write.url.starts_with("https://") {
            return Err("remote_write.url: https is not built into this version yet; use a local TLS proxy".into());
        }
        if self.mqtt.share_group.contains(['/', '+', '#']) {
            return Err("mqtt.share_group may not contain / + or #".into());
        }
        self.mqtt.tls.validate("mqtt.tls")?;
        if self.mqtt.client_id.is_empty() {
            return Err("mqtt.client_id must not be empty".into());
        }
        if self.mqtt.topic_prefix.is_empty() || self.mqtt.topic_prefix.contains(['+', '#']) {
            return Err("mqtt.topic_prefix must be non-empty, without + or #".into());
        }
        if !(1..=16).contains(&self.remote_write.concurrency) {
            return Err("remote_write.concurrency must be 1..=16".into());
        }
        if self.remote_write.retry_min_ms == 0 || self.remote_write.retry_min_ms > self.remote_write.retry_max_ms {
            return Err("remote_write.retry_min_ms must be > 0 and <= retry_max_ms".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_errors_name_the_key() {
        Config::default().validate().unwrap();
        let mut c = Config::default();
        c.remote_write.url = "ftp://x".into();
        assert!(c.validate().unwrap_err().contains("remote_write.url"));
    }
}
