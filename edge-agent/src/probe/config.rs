//! The `[probes]` section of the agent's configuration (docs/configuration.md):
//! its keys, defaults and validation, owned by this stage.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

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
    /// How often, in seconds, the agent scans `/proc/<pid>/fd` for watched
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
pub const MAX_PORT_CLASSES: usize = 15;
pub const MAX_CLASSED_PORTS: usize = 256;
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

impl ProbesConfig {
    /// Errors name the key (`probes.…`).
    pub fn validate(&self) -> Result<(), String> {
        let d = &self.devices;
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
        let p = &self.protocols;
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
        let t = &self.tcp_lifecycle;
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
}
