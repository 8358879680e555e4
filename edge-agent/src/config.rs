//! Agent configuration: TOML, every field optional, defaults that work on a
//! real box with no file at all. `docs/configuration.md` lists every key.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
}

/// On-device anomaly detection (docs/model.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    pub enabled: bool,
    /// The model card (`*.card.json`); its .tflite file is next to it.
    pub model: PathBuf,
    /// When set: the SHA-256 (hex) the model file must have; any other
    /// model is refused, whatever its card says.
    pub model_sha256: String,
    /// Consecutive windows above the (stop) threshold that raise the alarm.
    pub raise_after: u32,
    /// Consecutive windows below it that clear the alarm.
    pub clear_after: u32,
    /// The warning level (a model card with a `warn` threshold): windows
    /// above it that raise the warning, and below it that clear it.
    pub warn_raise_after: u32,
    pub warn_clear_after: u32,
    /// For this long after the agent starts, windows are scored and
    /// exported but cannot raise the alarm: the agent's own start (loading
    /// and attaching probes, parsing the kernel's BTF) slows the box for a
    /// moment, which the model rightly sees as unusual.
    pub warmup_secs: u64,
    /// Where new models are dropped (files, or by the uplink from the
    /// device's MQTT model topic). Default: `<state_dir>/model-drop`.
    pub drop_dir: PathBuf,
    /// Ed25519 public key (PEM) that new models' cards must be signed
    /// with. Without it, only the model `model_sha256` pins is accepted.
    pub update_public_key_file: PathBuf,
    /// What to do locally when the alarm is raised (docs/model.md).
    pub action: ActionConfig,
}

/// The local action on an alarm: a command and/or a message to the line's
/// MQTT broker (plain TCP, e.g. a PLC gateway on loopback).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActionConfig {
    /// argv, run without a shell; empty: none.
    pub command: Vec<String>,
    pub mqtt_host: String,
    pub mqtt_port: u16,
    /// Empty: no message.
    pub mqtt_topic: String,
    /// Also act when the alarm clears.
    pub on_clear: bool,
    /// At most one action per this many seconds.
    pub min_interval_secs: u64,
    /// A coil or register written on the line's Modbus server (the line's
    /// e-stop or an interlock).
    pub modbus_write: ModbusWriteConfig,
    /// A command still running (or a broker not acknowledging) after this
    /// is given up (the command killed).
    pub timeout_secs: u64,
}

impl Default for ActionConfig {
    fn default() -> Self {
        ActionConfig {
            command: Vec::new(),
            mqtt_host: "127.0.0.1".into(),
            mqtt_port: 1883,
            mqtt_topic: String::new(),
            on_clear: false,
            min_interval_secs: 60,
            timeout_secs: 10,
            modbus_write: ModbusWriteConfig::default(),
        }
    }
}

/// The `modbus_write` action: one write (function 5 for a coil, 6 for a
/// holding register) to a Modbus/TCP server on the line.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModbusWriteConfig {
    /// `host:port` of the Modbus/TCP server (the PLC); empty: no write.
    pub server: String,
    pub unit: u8,
    /// `coil` or `holding`.
    pub table: String,
    pub address: u16,
    /// Written when the alarm is raised (a coil: 0 or 1).
    pub value: u16,
    /// Written when the alarm clears (with `on_clear`).
    pub clear_value: u16,
}

impl Default for ModbusWriteConfig {
    fn default() -> Self {
        ModbusWriteConfig { server: String::new(), unit: 1, table: "coil".into(), address: 0, value: 1, clear_value: 0 }
    }
}
impl DetectConfig {
    pub fn drop_dir(&self, state_dir: &Path) -> PathBuf {
        if self.drop_dir.as_os_str().is_empty() {
            state_dir.join("model-drop")
        } else {
            self.drop_dir.clone()
        }
    }
}

pub const DEFAULT_MODEL: &str = "/usr/share/edge-agent/model/anomaly.card.json";

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            enabled: true,
            model: PathBuf::from(DEFAULT_MODEL),
            model_sha256: String::new(),
            raise_after: 2,
            clear_after: 3,
            warn_raise_after: 2,
            warn_clear_after: 3,
            warmup_secs: 20,
            drop_dir: PathBuf::new(),
            update_public_key_file: PathBuf::new(),
            action: ActionConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockConfig {
    /// Corrections smaller than this are not applied (the time request's
    /// own error is half a round trip).
    pub tolerance_ms: u64,
    /// Connected this long without an answer to time requests, blocks of an
    /// unsynchronized clock go as stamped (counted) instead of waiting.
    pub sync_wait_secs: u64,
    /// For tests: pretend the wall clock is this far off (and not
    /// synchronized). 0 in production.
    pub test_offset_ms: i64,
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig { tolerance_ms: 1000, sync_wait_secs: 60, test_offset_ms: 0 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    /// Length of one aggregation window, in milliseconds.
    pub millis: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Upper bound of the store on disk; oldest segments go first.
    pub max_bytes: u64,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// Records older than this are dropped even when there is room
    /// (0: keep until space runs out).
    pub max_age_secs: u64,
    /// Appends are durable at most this long after they are made. The agent
    /// appends once per window, so with windows longer than this every
    /// window is synced as it is stored.
    pub fsync_interval_ms: u64,
    /// A block (the unit that is compressed and sent as one message) ends
    /// after this many windows... (360: an hour of 10 s windows)
    pub block_max_windows: u64,
    /// ...or this many bytes of frames.
    pub block_max_bytes: u64,
    /// The priority lane (alarms, anomaly records) has its own budget, on
    /// top of max_bytes: routine data can never push it out.
    pub priority_max_bytes: u64,
    /// Priority records older than this are dropped (0: only for space).
    pub priority_max_age_secs: u64,
}

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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Local `/metrics` endpoint. Empty string: disabled.
    pub listen: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbesConfig {
    /// The kernel's BPF run-time statistics (`BPF_ENABLE_STATS`) while the
    /// agent runs: per-program run counts and run time in
    /// `edge_agent_probe_runs_total` / `_run_seconds_total`. They cost two
    /// clock reads per program run, for every BPF program on the box: about
    /// +130-200 ns on each system call the device probe hooks
    /// (BENCHMARKS.md). Turn off where the watched devices are busy.
    pub program_stats: bool,
    pub tcp_lifecycle: TcpLifecycleConfig,
    pub devices: DevicesConfig,
    pub protocols: ProtocolsConfig,
    pub buses: BusesConfig,
}

impl Default for ProbesConfig {
    fn default() -> Self {
        ProbesConfig {
            program_stats: true,
            tcp_lifecycle: TcpLifecycleConfig::default(),
            devices: DevicesConfig::default(),
            protocols: ProtocolsConfig::default(),
            buses: BusesConfig::default(),
        }
    }
}

/// Sensor buses from the kernel's own tracepoints (docs/probes.md, "Sensor
/// buses"): i2c transfers, SMBus transactions, SPI messages, GPIO line
/// operations and regmap hardware accesses, whoever drives them (a
/// process through /dev/i2c-*, or a kernel driver). A family attaches when
/// its tracepoints exist; a family whose tracepoints appear later (a bus
/// driver's module loaded) is attached then, checked every
/// `probes.devices.rescan_secs`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusesConfig {
    pub enabled: bool,
    pub i2c: bool,
    pub smbus: bool,
    pub spi: bool,
    /// Every read and write of every GPIO line: a bit-banged bus (i2c-gpio,
    /// spi-gpio) makes a dozen per bit.
    pub gpio: bool,
    pub regmap: bool,
}

impl Default for BusesConfig {
    fn default() -> Self {
        BusesConfig { enabled: true, i2c: true, smbus: true, spi: true, gpio: true, regmap: true }
    }
}

/// Industrial protocols on TCP (docs/probes.md, "Industrial protocols"):
/// the ports each protocol is expected on. A connection to one of them is
/// checked by its first client bytes; Modbus/TCP requests and replies are
/// timed and counted by function code.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProtocolsConfig {
    pub enabled: bool,
    pub modbus_ports: Vec<u16>,
    pub mqtt_ports: Vec<u16>,
    pub opcua_ports: Vec<u16>,
    /// The cgroup v2 directory the programs attach to: they see the
    /// sockets of every process in it and below. Default: the root of the
    /// cgroup v2 hierarchy (found in /proc/self/mountinfo, mounted under
    /// /run/edge-agent when nothing mounts it), i.e. the whole box.
    pub cgroup: Option<PathBuf>,
}

pub const MAX_PROTOCOL_PORTS: usize = 64;

impl Default for ProtocolsConfig {
    fn default() -> Self {
        ProtocolsConfig {
            enabled: true,
            modbus_ports: vec![502],
            mqtt_ports: vec![1883, 8883],
            opcua_ports: vec![4840],
            cgroup: None,
        }
    }
}

/// Sensor I/O through device files (docs/probes.md, "Device files").
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevicesConfig {
    pub enabled: bool,
    /// Absolute glob patterns (glob(3)) of the device files to watch,
    /// resolved again every window: devices that appear are watched, those
    /// that vanish are let go. Every name a device is opened by (the match,
    /// its target, udev links in /dev and /dev/serial/by-*) is recognised.
    /// While nothing matches, no syscall hook is attached at all.
    pub watch: Vec<String>,
    /// How often, in seconds, the agent scans /proc/<pid>/fd for watched
    /// files it did not see opened (opened before the agent started,
    /// inherited by a child, duplicated with dup2, opened by a relative
    /// path). Also when the watched set changes.
    pub rescan_secs: u64,
}

pub const MAX_DEVICE_PATTERNS: usize = 32;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpLifecycleConfig {
    pub enabled: bool,
    /// RTT and congestion window histograms from tcp:tcp_probe. Off by
    /// default: that tracepoint fires on every received TCP segment of the
    /// box and the kernel fills its record before any filter can run, which
    /// slowed a loopback stream by about half (BENCHMARKS.md), watched port
    /// or not.
    pub rtt: bool,
    /// Established connections that neither sent nor received data for this
    /// many seconds count as idle (`edge_tcp_connections_idle`), read once
    /// per window from the kernel's socket diagnostics. 0: no census.
    pub idle_secs: u64,
    /// Port class name -> ports. A connection is classed by the remote port
    /// when outbound and by the local port when inbound; other ports fold
    /// into "other". At most 15 classes and 256 ports (kernel map sizes).
    pub port_classes: BTreeMap<String, Vec<u16>>,
    /// Peer group name -> address prefixes (`10.0.5.20`, `10.1.0.0/16`,
    /// `fd00:1::/64`). Connections whose remote address is in a prefix are
    /// also counted per group (`edge_tcp_peer_*`), the longest prefix
    /// winning; the rest as "other". Only the group names leave the box.
    /// Empty (the default): no per-peer series and no lookup in the kernel.
    /// At most 15 groups and 64 prefixes (kernel map sizes).
    pub peers: BTreeMap<String, Vec<String>>,
}

pub const MAX_PEER_GROUPS: usize = 15;
pub const MAX_PEER_PREFIXES: usize = 64;

/// An address prefix as the kernel's peer table keys it: IPv4 as
/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`, length + 96), so one table holds
/// both families. A bare address is a /32 (/128).
pub fn parse_prefix(text: &str) -> Result<([u8; 16], u32), String> {
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l.parse::<u32>().map_err(|_| format!("{text:?}: bad prefix length"))?)),
        None => (text, None),
    };
    let (bytes, len) = match addr.parse::<std::net::IpAddr>().map_err(|_| format!("{text:?}: not an address"))? {
        std::net::IpAddr::V4(a) => {
            let len = len.unwrap_or(32);
            if len > 32 {
                return Err(format!("{text:?}: an IPv4 prefix is at most /32"));
            }
            (a.to_ipv6_mapped().octets(), len + 96)
        }
        std::net::IpAddr::V6(a) => {
            let len = len.unwrap_or(128);
            if len > 128 {
                return Err(format!("{text:?}: an IPv6 prefix is at most /128"));
            }
            (a.octets(), len)
        }
    };
    // Host bits must be zero: "10.1.2.3/16" is more likely a typo than meant.
    let mut masked = bytes;
    for (i, b) in masked.iter_mut().enumerate() {
        let keep = len.saturating_sub(i as u32 * 8).min(8);
        *b &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
    }
    if masked != bytes {
        return Err(format!("{text:?}: bits set past the prefix length"));
    }
    Ok((bytes, len))
}

/// Where the default config looks for the device's TLS files.
pub const DEFAULT_TLS_DIR: &str = "/etc/edge-agent/tls";

pub const MAX_PORT_CLASSES: usize = 15;
pub const MAX_CLASSED_PORTS: usize = 256;

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
        }
    }
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig { millis: 10_000 }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_bytes: 64 * 1024 * 1024,
            segment_bytes: 4 * 1024 * 1024,
            max_age_secs: 0,
            fsync_interval_ms: 1000,
            block_max_windows: 360,
            block_max_bytes: 1024 * 1024,
            priority_max_bytes: 8 * 1024 * 1024,
            priority_max_age_secs: 0,
        }
    }
}

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
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: "127.0.0.1:9464".into() }
    }
}

impl Default for DevicesConfig {
    fn default() -> Self {
        // The sensor buses of Jetson and RISC-V boards. Not /dev/ttyS*: on
        // most boards and PCs those exist whether used or not (and one is
        // the console), which would keep the syscall hooks attached for
        // nothing; add them when a sensor hangs on one.
        let watch = [
            "/dev/ttyUSB*",
            "/dev/ttyACM*",
            "/dev/ttyTHS*",
            "/dev/ttyAMA*",
            "/dev/i2c-*",
            "/dev/spidev*",
            "/dev/gpiochip*",
            "/dev/iio:device*",
            "/sys/bus/iio/devices/iio:device*/in_*",
        ];
        DevicesConfig { enabled: true, watch: watch.iter().map(|s| s.to_string()).collect(), rescan_secs: 30 }
    }
}

impl Default for TcpLifecycleConfig {
    fn default() -> Self {
        let classes: [(&str, &[u16]); 6] = [
            ("modbus", &[502]),
            ("mqtt", &[1883, 8883]),
            ("opcua", &[4840]),
            ("http", &[80, 443, 8080, 8443]),
            ("ssh", &[22]),
            ("dns", &[53]),
        ];
        TcpLifecycleConfig {
            enabled: true,
            rtt: false,
            idle_secs: 300,
            port_classes: classes.iter().map(|(n, p)| (n.to_string(), p.to_vec())).collect(),
            peers: BTreeMap::new(),
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
        if self.detect.action.command.first().is_some_and(|c| c.is_empty()) {
            return Err("detect.action.command: the first element is the program, and it is empty".into());
        }
        let mw = &self.detect.action.modbus_write;
        if !mw.server.is_empty() {
            let host_port = mw.server.rsplit_once(':').filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if host_port.is_none() {
                return Err(format!(
                    "detect.action.modbus_write.server: {:?} is not host:port (e.g. \"192.168.10.5:502\")",
                    mw.server
                ));
            }
            match mw.table.as_str() {
                "coil" if mw.value > 1 || mw.clear_value > 1 => {
                    return Err("detect.action.modbus_write: a coil's value and clear_value are 0 or 1".into())
                }
                "coil" | "holding" => {}
                t => {
                    return Err(format!(
                        "detect.action.modbus_write.table: {t:?}; write a \"coil\" or a \"holding\" register"
                    ))
                }
            }
        }
        let levels = [
            self.detect.raise_after,
            self.detect.clear_after,
            self.detect.warn_raise_after,
            self.detect.warn_clear_after,
        ];
        if levels.iter().any(|n| !(1..=100).contains(n)) {
            return Err(
                "detect.raise_after, clear_after, warn_raise_after and warn_clear_after must be between 1 and 100 \
                 windows"
                    .into(),
            );
        }
        if self.detect.warmup_secs > 3600 {
            return Err("detect.warmup_secs must be at most 3600 (an hour without alarms after each start)".into());
        }
        if !self.detect.model_sha256.is_empty()
            && (self.detect.model_sha256.len() != 64
                || !self.detect.model_sha256.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err("detect.model_sha256 must be 64 hex digits (sha256sum of the .tflite file), or empty".into());
        }
        if self.window.millis < 100 || self.window.millis > 3_600_000 {
            return Err("window.millis must be between 100 and 3600000".into());
        }
        // A segment holds whole windows: a window's frame (its series'
        // names when it starts a block, histograms included) must fit.
        if self.store.segment_bytes < 16 * 1024 {
            return Err("store.segment_bytes must be at least 16384 (a window must fit in a segment)".into());
        }
        if self.store.max_bytes < 2 * self.store.segment_bytes {
            return Err("store.max_bytes must be at least twice store.segment_bytes".into());
        }
        if self.store.block_max_windows == 0 || self.store.block_max_windows > edge_wire::block::MAX_FRAMES as u64 {
            return Err(format!("store.block_max_windows must be 1..={}", edge_wire::block::MAX_FRAMES));
        }
        if self.store.block_max_bytes < 1024 || self.store.block_max_bytes > (edge_wire::MAX_MESSAGE_BYTES / 2) as u64 {
            return Err(format!("store.block_max_bytes must be 1024..={}", edge_wire::MAX_MESSAGE_BYTES / 2));
        }
        if self.store.priority_max_bytes < 8192 {
            return Err("store.priority_max_bytes must be at least 8192".into());
        }
        if self.store.fsync_interval_ms > 60_000 {
            return Err("store.fsync_interval_ms must be at most 60000".into());
        }
        if self.mqtt.delivery_timeout_ms < 500 {
            return Err("mqtt.delivery_timeout_ms must be at least 500".into());
        }
        self.mqtt.tls.validate("mqtt.tls")?;
        if self.mqtt.max_inflight == 0 {
            return Err("mqtt.max_inflight must be at least 1".into());
        }
        if self.mqtt.reconnect_min_ms == 0 || self.mqtt.reconnect_min_ms > self.mqtt.reconnect_max_ms {
            return Err("mqtt.reconnect_min_ms must be > 0 and <= mqtt.reconnect_max_ms".into());
        }
        if self.mqtt.topic_prefix.is_empty()
            || self.mqtt.topic_prefix.contains(['+', '#'])
            || self.mqtt.topic_prefix.ends_with('/')
        {
            return Err("mqtt.topic_prefix must be non-empty, without + # or a trailing /".into());
        }
        if !self.metrics.listen.is_empty() {
            self.metrics
                .listen
                .parse::<SocketAddr>()
                .map_err(|e| format!("metrics.listen {:?}: {e}", self.metrics.listen))?;
        }
        let d = &self.probes.devices;
        if d.watch.len() > MAX_DEVICE_PATTERNS {
            return Err(format!("probes.devices.watch has {} patterns, at most {MAX_DEVICE_PATTERNS}", d.watch.len()));
        }
        for w in &d.watch {
            if !w.starts_with('/') || w.contains('\0') || w.len() >= 4096 {
                return Err(format!("probes.devices.watch: {w:?} must be an absolute path or glob pattern"));
            }
        }
        if d.rescan_secs == 0 || d.rescan_secs > 86_400 {
            return Err("probes.devices.rescan_secs must be 1..=86400".into());
        }
        let p = &self.probes.protocols;
        let mut seen = BTreeMap::new();
        for (name, ports) in
            [("modbus_ports", &p.modbus_ports), ("mqtt_ports", &p.mqtt_ports), ("opcua_ports", &p.opcua_ports)]
        {
            for port in ports {
                if *port == 0 {
                    return Err(format!("probes.protocols.{name}: port 0 is not a port"));
                }
                if let Some(prev) = seen.insert(*port, name) {
                    if prev != name {
                        return Err(format!("probes.protocols: port {port} is in both {prev} and {name}"));
                    }
                }
            }
        }
        if seen.len() > MAX_PROTOCOL_PORTS {
            return Err(format!("probes.protocols lists {} ports, at most {MAX_PROTOCOL_PORTS}", seen.len()));
        }
        if let Some(c) = &p.cgroup {
            if !c.is_absolute() {
                return Err(format!("probes.protocols.cgroup {}: must be an absolute path", c.display()));
            }
        }
        let t = &self.probes.tcp_lifecycle;
        if t.idle_secs > 7 * 86_400 {
            return Err("probes.tcp_lifecycle.idle_secs must be at most 604800 (a week); 0 turns the census off".into());
        }
        if t.port_classes.len() > MAX_PORT_CLASSES {
            return Err(format!(
                "probes.tcp_lifecycle.port_classes has {} classes, at most {MAX_PORT_CLASSES}",
                t.port_classes.len()
            ));
        }
        let mut seen = BTreeMap::new();
        for (class, ports) in &t.port_classes {
            if class == "other"
                || class.is_empty()
                || class.len() > 32
                || !class.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(format!(
                    "probes.tcp_lifecycle.port_classes: class name {class:?} must be 1..=32 of [A-Za-z0-9_] and not \"other\""
                ));
            }
            for p in ports {
                if let Some(prev) = seen.insert(*p, class) {
                    return Err(format!(
                        "probes.tcp_lifecycle.port_classes: port {p} is in both {prev:?} and {class:?}"
                    ));
                }
            }
        }
        if seen.len() > MAX_CLASSED_PORTS {
            return Err(format!(
                "probes.tcp_lifecycle.port_classes lists {} ports, at most {MAX_CLASSED_PORTS}",
                seen.len()
            ));
        }
        if t.peers.len() > MAX_PEER_GROUPS {
            return Err(format!("probes.tcp_lifecycle.peers has {} groups, at most {MAX_PEER_GROUPS}", t.peers.len()));
        }
        let mut prefixes = BTreeMap::new();
        for (group, list) in &t.peers {
            if group == "other"
                || group.is_empty()
                || group.len() > 32
                || !group.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(format!(
                    "probes.tcp_lifecycle.peers: group name {group:?} must be 1..=32 of [A-Za-z0-9_-] and not \"other\""
                ));
            }
            for text in list {
                let prefix = parse_prefix(text).map_err(|e| format!("probes.tcp_lifecycle.peers.{group}: {e}"))?;
                if let Some(prev) = prefixes.insert(prefix, group) {
                    return Err(format!("probes.tcp_lifecycle.peers: {text:?} is in both {prev:?} and {group:?}"));
                }
            }
        }
        if prefixes.len() > MAX_PEER_PREFIXES {
            return Err(format!(
                "probes.tcp_lifecycle.peers lists {} prefixes, at most {MAX_PEER_PREFIXES}",
                prefixes.len()
            ));
        }
        Ok(())
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
