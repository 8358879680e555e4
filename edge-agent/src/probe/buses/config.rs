//! `[probes.buses]` (docs/configuration.md): the bus probe's keys and
//! defaults.

use super::super::config::Section;
use serde::Deserialize;

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

impl Section for BusesConfig {
    /// Errors name the key (`probes.buses.…`).
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}
