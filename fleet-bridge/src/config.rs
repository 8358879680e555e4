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
    pub jetstream: JetStreamConfig,
    pub remote_write: RemoteWriteConfig,
    pub metrics: MetricsConfig,
    pub audit: AuditConfig,
}

/// The devices' audit trails (docs/audit.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Where the audit log's files go (`<YYYY-MM-DD>.<mqtt.client_id>.jsonl`),
    /// created at start if needed. Bridges may share it (a shared volume),
    /// each with its own `mqtt.client_id`.
    pub dir: PathBuf,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig { dir: PathBuf::from("/var/lib/fleet-bridge/audit") }
    }
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

/// Taking the devices' messages from a NATS cluster's JetStream instead of
/// over MQTT (docs/scaling.md, "A clustered broker: NATS"): the devices
/// still speak MQTT, to the cluster's MQTT listeners; their messages land
/// in a work-queue stream, and every bridge pulls from one durable
/// consumer, so each message goes to one bridge and is acknowledged after
/// its samples are written. `mqtt.topic_prefix` and
/// `mqtt.dead_letter_prefix` still name the devices' topics and the dead
/// letters; the other `[mqtt]` keys are not used.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JetStreamConfig {
    /// The cluster's NATS URLs (`tls://host:4222`), any number of its
    /// nodes. Empty (the default): the bridge uses `[mqtt]`.
    pub servers: Vec<String>,
    /// The stream of the devices' messages, created if it does not exist
    /// (subjects `<prefix>.*.metrics` and `<prefix>.*.presence`, work
    /// queue, file storage).
    pub stream: String,
    /// Copies of the stream, on as many nodes (at most the cluster's size).
    pub replicas: usize,
    /// The stream's size bound in bytes (0: none). When full it takes no
    /// more messages: a device's message is then not confirmed and sent
    /// again later, nothing is dropped.
    pub max_bytes: u64,
    /// The durable consumer every bridge pulls from.
    pub consumer: String,
    /// A message taken by a bridge and not acknowledged within this is
    /// handed out again (a bridge killed mid-write): longer than a write
    /// takes while the store is slow, short enough to wait for.
    pub ack_wait_secs: u64,
    /// Messages handed out and not yet acknowledged, for all bridges
    /// together: the cluster's bound on what the bridges hold.
    pub max_ack_pending: i64,
    /// TLS to the cluster's NATS port: on by default, with the files of
    /// /etc/fleet-bridge/tls (ca.crt, bridge.crt, bridge.key).
    pub tls: edge_wire::tls::TlsConfig,
}

impl JetStreamConfig {
    /// Whether the bridge takes its messages from JetStream.
    pub fn enabled(&self) -> bool {
        !self.servers.is_empty()
    }
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            servers: Vec::new(),
            stream: "EDGE".into(),
            replicas: 3,
            max_bytes: 0,
            consumer: "fleet-bridge".into(),
            ack_wait_secs: 60,
            max_ack_pending: 20_000,
            tls: edge_wire::tls::TlsConfig::in_dir(Path::new(DEFAULT_TLS_DIR), "bridge"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteWriteConfig {
    /// e.g. http://127.0.0.1:9090/api/v1/write
    pub url: String,
    pub timeout_ms: u64,
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    /// Remote-write requests in flight at once: the fleet's series are
    /// dealt into this many shards (by a hash of each series' labels), each
    /// shard's requests written one after the other, so every series
    /// arrives in order.
    pub concurrency: usize,
    /// A request holds the series of many devices' messages, up to this
    /// many samples...
    pub batch_max_samples: usize,
    /// ...or until its oldest part waited this long and its shard's writer
    /// has room (it holds the request it writes and the next one; past
    /// that the shard's open request keeps filling up).
    pub batch_max_age_ms: u64,
    /// Bytes the samples the bridge holds (taken from the broker, not yet
    /// written) take at most, as encoded for remote write (the requests'
    /// protobuf bytes, before compression): past it, it takes no new message
    /// in until writes catch up, and the broker keeps the rest (its
    /// in-flight window, then its queue). Backpressure, not buffering:
    /// memory stays bounded whatever the fleet's backlog.
    pub max_pending_bytes: usize,
    /// Samples dated later than the bridge's clock plus this are never
    /// written (counted per device, the message dead-lettered): one
    /// device's far-future sample would move the store's newest time and
    /// make every other device's current samples "too old".
    pub max_sample_ahead_secs: u64,
    /// Samples older than the bridge's clock minus this are never written
    /// either: the store would refuse them (Prometheus: its out-of-order
    /// window, `out_of_order_time_window: 7d` in configs/prometheus.yml).
    pub max_sample_age_secs: u64,
    /// A request that failed this many times with a retryable answer (5xx,
    /// 429, no answer) while the store takes a probe write is isolated:
    /// split down to single samples, and a sample that still fails is
    /// refused (`persistent_error`) instead of holding the fleet's other
    /// messages behind it forever. While the probe fails too (the store is
    /// down), requests are retried without end: nothing is lost.
    pub isolate_after_failures: u32,
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
            batch_max_samples: 10_000,
            batch_max_age_ms: 200,
            max_pending_bytes: 64 << 20,
            max_sample_ahead_secs: 300,
            max_sample_age_secs: 7 * 86_400,
            isolate_after_failures: 5,
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

    /// Every setting that could fail at run time is checked here, at start,
    /// with the key named.
    pub fn validate(&self) -> Result<(), String> {
        let rw = &self.remote_write;
        if !(rw.url.starts_with("http://") || rw.url.starts_with("https://")) {
            return Err(format!("remote_write.url {:?} must be an http:// or https:// URL", rw.url));
        }
        if rw.url.starts_with("https://") {
            return Err("remote_write.url: https is not built into this version yet; use a local TLS proxy".into());
        }
        match rw.url.parse::<ureq::http::Uri>() {
            Ok(u) if u.host().is_some_and(|h| !h.is_empty()) => {}
            _ => return Err(format!("remote_write.url {:?} is not a URL with a host", rw.url)),
        }
        if rw.timeout_ms == 0 {
            return Err("remote_write.timeout_ms must be > 0 (0 would time every request out at once)".into());
        }
        if rw.max_sample_ahead_secs > 86_400 {
            return Err("remote_write.max_sample_ahead_secs must be 0..=86400: a later sample moves the store's \
                        newest time past every other device's current samples"
                .into());
        }
        if !(60..=10 * 366 * 86_400).contains(&rw.max_sample_age_secs) {
            return Err("remote_write.max_sample_age_secs must be 60..=316224000 (ten years)".into());
        }
        if !(1..=100).contains(&rw.isolate_after_failures) {
            return Err("remote_write.isolate_after_failures must be 1..=100".into());
        }
        if self.mqtt.share_group.contains(['/', '+', '#']) {
            return Err("mqtt.share_group may not contain / + or #".into());
        }
        if self.mqtt.host.is_empty() {
            return Err("mqtt.host must not be empty".into());
        }
        let dl = &self.mqtt.dead_letter_prefix;
        if dl.contains(['+', '#', '\0']) || dl.starts_with(['$', '/']) || dl.ends_with('/') || dl.contains("//") {
            return Err(format!(
                "mqtt.dead_letter_prefix {dl:?} must be a plain topic (no + # or empty levels, not starting with $ \
                 or /, not ending with /), or \"\" to disable dead letters"
            ));
        }
        self.mqtt.tls.validate("mqtt.tls")?;
        if self.mqtt.client_id.is_empty() {
            return Err("mqtt.client_id must not be empty".into());
        }
        let tp = &self.mqtt.topic_prefix;
        if tp.is_empty() || tp.contains(['+', '#', '\0']) || tp.starts_with('$') || tp.ends_with('/') {
            return Err(
                "mqtt.topic_prefix must be non-empty, without + or #, not starting with $ or ending with /".into()
            );
        }
        let js = &self.jetstream;
        if js.enabled() {
            for url in &js.servers {
                let bare = url.split_once("://").map_or(url.as_str(), |(scheme, rest)| {
                    if ["nats", "tls"].contains(&scheme) {
                        rest
                    } else {
                        ""
                    }
                });
                if bare.is_empty() || bare.contains(['/', ' ']) {
                    return Err(format!(
                        "jetstream.servers: {url:?} must be host:port, nats://host:port or tls://host:port"
                    ));
                }
            }
            let name_ok = |n: &str| !n.is_empty() && n.len() <= 64 && !n.contains(['.', '*', '>', ' ', '/', '\\']);
            if !name_ok(&js.stream) || !name_ok(&js.consumer) {
                return Err("jetstream.stream and jetstream.consumer must be 1..=64 characters without . * > / \\                             or spaces"
                    .into());
            }
            if !(1..=5).contains(&js.replicas) {
                return Err("jetstream.replicas must be 1..=5".into());
            }
            if !(5..=3600).contains(&js.ack_wait_secs) {
                return Err("jetstream.ack_wait_secs must be 5..=3600".into());
            }
            if !(1..=1_000_000).contains(&js.max_ack_pending) {
                return Err("jetstream.max_ack_pending must be 1..=1000000".into());
            }
            js.tls.validate("jetstream.tls")?;
            if self.mqtt.topic_prefix.contains('.') {
                return Err("mqtt.topic_prefix may not contain '.' with jetstream (a NATS subject separator)".into());
            }
        }
        if !(1..=16).contains(&self.remote_write.concurrency) {
            return Err("remote_write.concurrency must be 1..=16".into());
        }
        if !(1..=1_000_000).contains(&self.remote_write.batch_max_samples) {
            return Err("remote_write.batch_max_samples must be 1..=1000000".into());
        }
        if self.remote_write.batch_max_age_ms > 60_000 {
            return Err("remote_write.batch_max_age_ms must be 0..=60000".into());
        }
        if !((1 << 20)..=(16 << 30)).contains(&self.remote_write.max_pending_bytes) {
            return Err("remote_write.max_pending_bytes must be 1 MiB..16 GiB".into());
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

    /// Settings that were accepted and then broke the bridge at run time.
    #[test]
    fn settings_that_fail_at_run_time_are_refused_at_start() {
        type Break = fn(&mut Config);
        let cases: [(&str, Break); 7] = [
            ("remote_write.timeout_ms", |c| c.remote_write.timeout_ms = 0),
            ("mqtt.dead_letter_prefix", |c| c.mqtt.dead_letter_prefix = "fleet/+/dead".into()),
            ("mqtt.dead_letter_prefix", |c| c.mqtt.dead_letter_prefix = "fleet/#".into()),
            ("mqtt.dead_letter_prefix", |c| c.mqtt.dead_letter_prefix = "$SYS/dead".into()),
            ("remote_write.url", |c| c.remote_write.url = "http://".into()),
            ("remote_write.max_sample_ahead_secs", |c| c.remote_write.max_sample_ahead_secs = 366 * 86_400),
            ("remote_write.max_sample_age_secs", |c| c.remote_write.max_sample_age_secs = 0),
        ];
        for (key, break_it) in cases {
            let mut c = Config::default();
            break_it(&mut c);
            let e = c.validate().unwrap_err();
            assert!(e.contains(key), "{key}: {e}");
        }
        let mut c = Config::default();
        c.mqtt.dead_letter_prefix = String::new();
        c.validate().unwrap();
    }

    /// Every default documented in docs/configuration.md is the code's.
    #[test]
    fn documented_defaults_are_the_defaults() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md")).unwrap();
        let section = doc.split("\n## fleet-bridge\n").nth(1).expect("a fleet-bridge section");
        let block = section.split("```toml\n").nth(1).and_then(|b| b.split("\n```").next()).expect("its TOML block");
        let documented: Config = toml::from_str(block).unwrap_or_else(|e| panic!("the documented config: {e}"));
        assert_eq!(format!("{documented:#?}"), format!("{:#?}", Config::default()));
        // Every key is documented: the block, parsed back to a table, has
        // as many entries as the defaults have fields.
        let keys = |v: &toml::Value| -> Vec<String> {
            fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
                if let toml::Value::Table(t) = v {
                    for (k, v) in t {
                        walk(&format!("{prefix}{k}."), v, out);
                    }
                } else {
                    out.push(prefix.trim_end_matches('.').to_owned());
                }
            }
            let mut out = Vec::new();
            walk("", v, &mut out);
            out.sort();
            out
        };
        let doc_keys = keys(&toml::from_str(block).unwrap());
        let debug = format!("{:#?}", Config::default());
        let fields = debug.lines().filter(|l| l.trim_end().ends_with(',') && l.contains(": ")).count();
        assert_eq!(doc_keys.len(), fields, "documented keys {doc_keys:?} vs the config's fields:\n{debug}");
    }
}
