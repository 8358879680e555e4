//! Agent configuration: TOML, every field optional, defaults that work on a
//! real box with no file at all. `docs/configuration.md` lists every key.
//!
//! Each section is its stage's: its keys, defaults and validation live with
//! the stage (`detect/config.rs`, `store/config.rs`, `uplink/config.rs`,
//! `probe/config.rs`, `window.rs`, `metrics.rs`, `clock.rs`) and are
//! re-exported here; this file composes them, loads the file and checks
//! what spans sections.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::clock::ClockConfig;
pub use crate::detect::config::{ActionConfig, DetectConfig, ModbusWriteConfig, DEFAULT_MODEL};
pub use crate::metrics::MetricsConfig;
pub use crate::probe::config::{
    parse_prefix, BusesConfig, DevicesConfig, ProbesConfig, ProtocolsConfig, TcpLifecycleConfig, MAX_CLASSED_PORTS,
    MAX_DEVICE_PATTERNS, MAX_PEER_GROUPS, MAX_PEER_PREFIXES, MAX_PORT_CLASSES, MAX_PROTOCOL_PORTS,
};
pub use crate::store::config::StoreConfig;
pub use crate::uplink::config::{MqttConfig, DEFAULT_TLS_DIR};
pub use crate::window::WindowConfig;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {origin}: {message}")]
    Invalid { origin: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This box's id in topics and labels. Default: the host name.
    pub device_id: String,
    /// Where the ring store and the send position live.
    pub state_dir: PathBuf,
    /// Started as root, become this user once the probes are loaded, keeping
    /// only the capabilities probe reloads need (privileges.rs). "" stays
    /// root. A user that does not exist: the agent stays root and says so.
    pub run_as: String,
    pub window: WindowConfig,
    pub store: StoreConfig,
    pub mqtt: MqttConfig,
    pub metrics: MetricsConfig,
    pub probes: ProbesConfig,
    pub clock: ClockConfig,
    pub detect: DetectConfig,
    /// The tag map: process values (docs/process-values.md).
    pub tags: Vec<crate::values::tags::TagConfig>,
    /// Remote configuration (docs/remote-config.md).
    pub remote_config: crate::remote::RemoteSettings,
    /// Who may sign probe program packs (docs/probes.md).
    pub probe_programs: crate::probe_programs::ProgramsSettings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            device_id: default_device_id(),
            state_dir: PathBuf::from("/var/lib/edge-agent"),
            run_as: "edge-agent".into(),
            window: WindowConfig::default(),
            store: StoreConfig::default(),
            mqtt: MqttConfig::default(),
            metrics: MetricsConfig::default(),
            probes: ProbesConfig::default(),
            clock: ClockConfig::default(),
            detect: DetectConfig::default(),
            tags: Vec::new(),
            remote_config: crate::remote::RemoteSettings::default(),
            probe_programs: crate::probe_programs::ProgramsSettings::default(),
        }
    }
}

fn default_device_id() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let id: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .take(edge_wire::MAX_DEVICE_ID)
        .collect();
    if id.is_empty() {
        "edge-device".into()
    } else {
        id
    }
}

impl Config {
    /// Reads `path`, or returns the defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (cfg, origin) = match path {
            None => (Config::default(), "defaults".to_string()),
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.to_owned(), source })?;
                (Self::parse(&text, p)?, p.display().to_string())
            }
        };
        cfg.validate().map_err(|message| ConfigError::Invalid { origin, message })?;
        Ok(cfg)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })
    }

    /// The validated tag map.
    pub fn tag_map(&self) -> Result<crate::values::tags::TagMap, String> {
        let cx = crate::values::tags::Context {
            modbus_ports: &self.probes.protocols.modbus_ports,
            peers: &self.probes.tcp_lifecycle.peers,
        };
        crate::values::tags::TagMap::build(&self.tags, &cx)
    }

    pub fn validate(&self) -> Result<(), String> {
        edge_wire::validate_device_id(&self.device_id).map_err(|e| format!("device_id: {e}"))?;
        let tags = self.tag_map()?;
        if tags.tcp().next().is_some() && !self.probes.protocols.enabled {
            return Err(
                "tags: modbus_tcp tags are captured by the protocol probe: set probes.protocols.enabled = true".into(),
            );
        }
        // Each stage checks its own section.
        self.detect.validate()?;
        self.window.validate()?;
        self.store.validate()?;
        self.mqtt.validate()?;
        self.metrics.validate()?;
        self.remote_config.validate()?;
        self.probes.validate()
    }

    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window.millis)
    }

    pub fn client_id(&self) -> String {
        self.mqtt.client_id.clone().unwrap_or_else(|| format!("edge-agent-{}", self.device_id))
    }

    pub fn store_limits(&self) -> crate::store::StoreLimits {
        crate::store::StoreLimits {
            max_bytes: self.store.max_bytes,
            segment_bytes: self.store.segment_bytes,
            max_age_ms: self.store.max_age_secs.saturating_mul(1000),
            fsync_interval_ms: self.store.fsync_interval_ms,
        }
    }

    /// Bounds of the priority lane: segments of at most a quarter of its
    /// budget, so dropping one never takes more than that.
    pub fn priority_limits(&self) -> crate::store::StoreLimits {
        crate::store::StoreLimits {
            max_bytes: self.store.priority_max_bytes,
            segment_bytes: self.store.segment_bytes.min(self.store.priority_max_bytes / 4).max(1024),
            max_age_ms: self.store.priority_max_age_secs.saturating_mul(1000),
            fsync_interval_ms: 0, // rare and precious: every record is synced as it is stored
        }
    }

    pub fn block_writer(&self) -> crate::store::blocks::BlockWriter {
        crate::store::blocks::BlockWriter::new(
            self.store.block_max_windows as usize,
            self.store.block_max_bytes as usize,
        )
    }

    pub fn store_dir(&self) -> PathBuf {
        self.state_dir.join("store")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    /// Every default documented in docs/configuration.md is the code's
    /// (`device_id` documented as the host name).
    #[test]
    fn documented_defaults_are_the_defaults() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md")).unwrap();
        let section = doc.split("\n## edge-agent\n").nth(1).expect("an edge-agent section");
        let block = section.split("```toml\n").nth(1).and_then(|b| b.split("\n```").next()).expect("its TOML block");
        let defaults = Config::default();
        let block = block.replace("\"<host name>\"", &format!("{:?}", defaults.device_id));
        let documented = Config::parse(&block, Path::new("docs/configuration.md")).unwrap();
        assert_eq!(format!("{documented:#?}"), format!("{defaults:#?}"));
    }

    /// The commented `[[tags]]` example of docs/configuration.md names
    /// every key of a tag (unknown keys are refused), and is a valid tag.
    #[test]
    fn the_documented_tag_has_every_key() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md")).unwrap();
        let example: String = doc
            .split("# [[tags]]\n")
            .nth(1)
            .expect("a [[tags]] example")
            .lines()
            .take_while(|l| l.starts_with('#'))
            .filter(|l| !l.starts_with("#  ") && !l.starts_with("# ["))
            .map(|l| l.trim_start_matches("# ").split(" #").next().unwrap_or("").to_string() + "\n")
            .collect();
        let c = Config::parse(&format!("[[tags]]\n{example}"), Path::new("docs/configuration.md")).unwrap();
        c.validate().unwrap();
        let keys = example.lines().filter(|l| l.contains(" = ")).count();
        assert_eq!(keys, 14, "keys of TagConfig documented: {example}");
    }

    #[test]
    fn a_tls_table_without_enabled_is_tls() {
        let c = Config::parse("[mqtt.tls]\nca_file = \"/x/ca.crt\"\n", Path::new("x.toml")).unwrap();
        assert!(c.mqtt.tls.enabled, "TLS silently off");
        c.validate().unwrap();
        let c = Config::parse("[mqtt.tls]\ncert_file = \"/x/d.crt\"\nkey_file = \"/x/d.key\"\n", Path::new("x.toml"));
        let e = c.unwrap().validate().unwrap_err();
        assert!(e.contains("mqtt.tls.ca_file"), "{e}");
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::parse("device_id = \"press-1\"\n[mqtt]\nport = 1999\n", Path::new("x.toml")).unwrap();
        assert_eq!(c.mqtt.port, 1999);
        assert_eq!(c.mqtt.host, "127.0.0.1");
        assert_eq!(c.window.millis, 10_000);
        c.validate().unwrap();
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let e = Config::parse("[mqtt]\nprot = 1\n", Path::new("/etc/edge-agent.toml")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/etc/edge-agent.toml") && msg.contains("prot"), "{msg}");
        let mut c = Config::default();
        c.probes.tcp_lifecycle.port_classes.insert("web2".into(), vec![80]);
        assert!(c.validate().unwrap_err().contains("port 80"));
        let c = Config { device_id: "a/b".into(), ..Default::default() };
        assert!(c.validate().unwrap_err().starts_with("device_id"));
    }

    #[test]
    fn detect_warmup_is_bounded() {
        let c = Config::parse("[detect]\nwarmup_secs = 0\n", Path::new("x.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(Config::default().detect.warmup_secs, 20);
        let c = Config::parse("[detect]\nwarmup_secs = 3601\n", Path::new("x.toml")).unwrap();
        assert!(c.validate().unwrap_err().contains("detect.warmup_secs"));
    }

    #[test]
    fn the_modbus_write_action_is_checked() {
        let check = |body: &str| {
            Config::parse(&format!("[detect.action.modbus_write]\n{body}"), Path::new("x.toml")).unwrap().validate()
        };
        check("").unwrap();
        check("server = \"192.168.10.5:502\"\naddress = 7\n").unwrap();
        check("server = \"plc-3:1502\"\ntable = \"holding\"\nvalue = 900\nclear_value = 0\n").unwrap();
        for (body, want) in [
            ("server = \"192.168.10.5\"\n", "modbus_write.server"),
            ("server = \":502\"\n", "modbus_write.server"),
            ("server = \"plc:70000\"\n", "modbus_write.server"),
            ("server = \"plc:502\"\ntable = \"input\"\n", "modbus_write.table"),
            ("server = \"plc:502\"\nvalue = 2\n", "0 or 1"),
        ] {
            let e = check(body).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
        let e = Config::parse("[detect.action.modbus_write]\nregister = 3\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("register"), "{e}");
        let e = Config::parse("[detect]\nwarn_raise_after = 0\n", Path::new("x.toml")).unwrap().validate().unwrap_err();
        assert!(e.contains("warn_raise_after"), "{e}");
    }

    #[test]
    fn peer_prefixes_parse_into_one_table() {
        let (a, l) = parse_prefix("10.1.0.0/16").unwrap();
        assert_eq!((a[10], a[11], a[12], a[13], a[14], l), (0xff, 0xff, 10, 1, 0, 112));
        assert_eq!(parse_prefix("192.168.3.7").unwrap().1, 128);
        let (a, l) = parse_prefix("fd00:1::/64").unwrap();
        assert_eq!((a[0], a[1], a[3], l), (0xfd, 0, 1, 64));
        assert_eq!(parse_prefix("::1").unwrap().1, 128);
        for bad in ["10.1.2.3/16", "10.0.0.0/33", "fd00::/129", "plc-7", "10.0.0.0/x", ""] {
            assert!(parse_prefix(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn peer_groups_are_checked() {
        let with = |toml: &str| {
            Config::parse(&format!("[probes.tcp_lifecycle.peers]\n{toml}"), Path::new("x.toml")).unwrap().validate()
        };
        with("plc-line-1 = [\"10.0.5.20\"]\nmes = [\"10.1.0.0/16\", \"fd00:1::/64\"]").unwrap();
        assert!(with("other = [\"10.0.0.1\"]").unwrap_err().contains("\"other\""));
        assert!(with("a = [\"10.0.0.1\"]\nb = [\"10.0.0.1/32\"]").unwrap_err().contains("both"));
        assert!(with("a = [\"10.0.0.1/8\"]").unwrap_err().contains("peers.a"));
        let many: String = (0..16).map(|i| format!("g{i} = [\"10.0.{i}.0/24\"]\n")).collect();
        assert!(with(&many).unwrap_err().contains("at most 15"));
        let prefixes: Vec<String> = (0..65).map(|i| format!("\"10.{i}.0.0/16\"")).collect();
        assert!(with(&format!("a = [{}]", prefixes.join(", "))).unwrap_err().contains("at most 64"));
    }

    #[test]
    fn bus_families_are_switched_one_by_one() {
        let d = Config::default().probes.buses;
        assert!(d.enabled && d.i2c && d.smbus && d.spi && d.gpio && d.regmap);
        let c = Config::parse("[probes.buses]\ngpio = false\n", Path::new("x.toml")).unwrap();
        assert!(!c.probes.buses.gpio && c.probes.buses.i2c && c.probes.buses.enabled);
        let e = Config::parse("[probes.buses]\nuart = true\n", Path::new("x.toml")).unwrap_err().to_string();
        assert!(e.contains("uart"), "{e}");
    }

    #[test]
    fn program_stats_can_be_turned_off() {
        assert!(Config::default().probes.program_stats);
        let c = Config::parse("[probes]\nprogram_stats = false\n", Path::new("x.toml")).unwrap();
        assert!(!c.probes.program_stats);
        assert!(c.probes.protocols.enabled, "the rest keeps its defaults");
    }

    #[test]
    fn protocol_ports_are_checked() {
        let c = Config::parse(
            "[probes.protocols]
modbus_ports = [502, 1502]
",
            Path::new("x.toml"),
        )
        .unwrap();
        assert_eq!(c.probes.protocols.mqtt_ports, vec![1883, 8883], "others keep their defaults");
        c.validate().unwrap();
        let mut c = Config::default();
        c.probes.protocols.opcua_ports.push(502);
        assert_eq!(c.validate().unwrap_err(), "probes.protocols: port 502 is in both modbus_ports and opcua_ports");
        let mut c = Config::default();
        c.probes.protocols.modbus_ports = vec![0];
        assert!(c.validate().unwrap_err().contains("port 0"));
        let mut c = Config::default();
        c.probes.protocols.modbus_ports = (1..=100).collect();
        assert!(c.validate().unwrap_err().contains("at most 64"));
        let mut c = Config::default();
        c.probes.protocols.cgroup = Some("sys/fs/cgroup".into());
        assert!(c.validate().unwrap_err().contains("absolute"));
    }
}
