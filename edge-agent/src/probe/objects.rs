//! The probes' kernel objects: the ones built into the agent, or those of
//! the installed program pack (crate::probe_programs). A probe loads
//! [`object`] of its name each time it starts; a pack installed or rolled
//! back takes effect when the probes start again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The objects a pack may replace, by name (`<name>.bpf.o` in the build).
pub const NAMES: [&str; 4] = ["tcp_lifecycle", "device_io", "protocols", "buses"];

static INSTALLED: Mutex<BTreeMap<String, Arc<Vec<u8>>>> = Mutex::new(BTreeMap::new());

/// The object probe `name` loads: the installed pack's, else `built_in`.
pub fn object(name: &str, built_in: &'static [u8]) -> Arc<Vec<u8>> {
    let installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    installed.get(name).cloned().unwrap_or_else(|| Arc::new(built_in.to_vec()))
}

/// The objects from now on (empty: the built-in ones).
pub fn install(objects: BTreeMap<String, Vec<u8>>) {
    let mut installed = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    *installed = objects.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
}

/// The built-in object of `name` (`edge-agent probes export`).
pub fn built_in(name: &str) -> Option<&'static [u8]> {
    match name {
        "tcp_lifecycle" => Some(super::tcp_lifecycle::OBJECT),
        "device_io" => Some(super::device_io::OBJECT),
        "protocols" => Some(super::protocols::OBJECT),
        "buses" => Some(super::buses::OBJECT),
        _ => None,
    }
}
