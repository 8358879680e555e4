//! The `[probes]` section of the agent's configuration (docs/configuration.md).
//! Each probe owns its own sub-section (`<probe>/config.rs`: keys, defaults,
//! validation); the section itself is made from the probe set's list
//! (`probe_set!` in probe/mod.rs): `program_stats` and one sub-section per
//! probe.

pub use super::buses::config::BusesConfig;
pub use super::device_io::config::{DevicesConfig, MAX_DEVICE_PATTERNS};
pub use super::protocols::config::{ProtocolsConfig, MAX_PROTOCOL_PORTS};
pub use super::tcp_lifecycle::config::{
    parse_prefix, TcpLifecycleConfig, MAX_CLASSED_PORTS, MAX_PEER_GROUPS, MAX_PEER_PREFIXES, MAX_PORT_CLASSES,
};
pub use super::ProbesConfig;

/// A probe's sub-section of `[probes]`: read from TOML (every key optional,
/// unknown keys refused), defaults that work on a real box, validated by
/// itself.
pub trait Section: Clone + std::fmt::Debug + Default + PartialEq + serde::de::DeserializeOwned {
    /// Errors name the key (`probes.<probe>.…`).
    fn validate(&self) -> Result<(), String>;
}
