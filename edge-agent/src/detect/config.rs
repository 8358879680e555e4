//! The `[detect]` section of the agent's configuration (docs/configuration.md):
//! its keys, defaults and validation, owned by this stage.

use serde::Deserialize;
use std::path::{Path, PathBuf};

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

impl DetectConfig {
    /// Errors name the key (`detect.…`).
    pub fn validate(&self) -> Result<(), String> {
        if self.action.command.first().is_some_and(|c| c.is_empty()) {
            return Err("detect.action.command: the first element is the program, and it is empty".into());
        }
        let mw = &self.action.modbus_write;
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
        let levels = [self.raise_after, self.clear_after, self.warn_raise_after, self.warn_clear_after];
        if levels.iter().any(|n| !(1..=100).contains(n)) {
            return Err(
                "detect.raise_after, clear_after, warn_raise_after and warn_clear_after must be between 1 and 100 \
                 windows"
                    .into(),
            );
        }
        if self.warmup_secs > 3600 {
            return Err("detect.warmup_secs must be at most 3600 (an hour without alarms after each start)".into());
        }
        if !self.model_sha256.is_empty()
            && (self.model_sha256.len() != 64 || !self.model_sha256.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err("detect.model_sha256 must be 64 hex digits (sha256sum of the .tflite file), or empty".into());
        }
        Ok(())
    }
}
