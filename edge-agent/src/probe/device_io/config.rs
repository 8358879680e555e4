//! `[probes.devices]` (docs/configuration.md): the device-file probe's keys,
//! defaults and validation.

use super::super::config::Section;
use serde::Deserialize;

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

impl Section for DevicesConfig {
    /// Errors name the key (`probes.devices.…`).
    fn validate(&self) -> Result<(), String> {
        let d = self;
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
        Ok(())
    }
}
