//! `[probes.protocols]` (docs/configuration.md): the protocol probe's keys,
//! defaults and validation.

use super::super::config::Section;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;

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

impl Section for ProtocolsConfig {
    /// Errors name the key (`probes.protocols.…`).
    fn validate(&self) -> Result<(), String> {
        let p = self;
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
        Ok(())
    }
}
