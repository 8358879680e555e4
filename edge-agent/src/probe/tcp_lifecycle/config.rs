//! `[probes.tcp_lifecycle]` (docs/configuration.md): the TCP probe's keys,
//! defaults and validation.

use super::super::config::Section;
use serde::Deserialize;
use std::collections::BTreeMap;

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

impl Section for TcpLifecycleConfig {
    /// Errors name the key (`probes.tcp_lifecycle.…`).
    fn validate(&self) -> Result<(), String> {
        let t = self;
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
