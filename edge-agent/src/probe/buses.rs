//! User-space side of `ebpf/src/buses.bpf.c`: the sensor buses as the
//! kernel's own tracepoints see them (i2c, SMBus, SPI, GPIO, regmap).
//! Each family attaches when all of its tracepoints exist on this kernel
//! and is reported unavailable, with the reason, otherwise; a family whose
//! tracepoints appear later (a bus driver's module loaded) is picked up by
//! [`BusesProbe::should_reload`] and [`BusesProbe::reload`].

use aya::maps::{MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::TracePoint;
use aya::Ebpf;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::device_io::fit_label;
use super::tracefs::{self, Layout};
use super::{ProbeError, ProbeState};
pub use config::BusesConfig;

pub mod config;
pub mod metrics;
pub mod series;

pub(crate) static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/buses.bpf.o"));

// Mirrors ebpf/include/buses.h (a test below checks they agree).
pub const BUCKETS: usize = super::AGG_BUCKETS;
const NAME_LEN: usize = 32;
pub const MAX_SERIES: usize = 128;
pub const MAX_ERRS: usize = 64;
pub const MAX_GPIO: usize = 256;
pub const GPIO_COUNTERS: usize = 7;
const STAT_SERIES_FULL: u32 = 0;
const STAT_ERRS_FULL: u32 = 1;
const STAT_GPIO_FULL: u32 = 2;
const STAT_UNTIMED: u32 = 3;
/// errno label of an SPI message that moved fewer bytes than it framed.
const ERR_SHORT: u32 = 0;

/// A bus family: one probe state, all of its tracepoints or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    I2c = 0,
    Smbus = 1,
    Spi = 2,
    Regmap = 3,
    /// Not an aggregate kind in the kernel (its own map).
    Gpio = 4,
}

impl Kind {
    pub const ALL: [Kind; 5] = [Kind::I2c, Kind::Smbus, Kind::Spi, Kind::Gpio, Kind::Regmap];

    /// The probe's name in `edge_agent_probe_attached{probe}`.
    pub fn probe(self) -> &'static str {
        match self {
            Kind::I2c => "i2c",
            Kind::Smbus => "smbus",
            Kind::Spi => "spi",
            Kind::Regmap => "regmap",
            Kind::Gpio => "gpio",
        }
    }

    fn from_raw(v: u32) -> Option<Kind> {
        [Kind::I2c, Kind::Smbus, Kind::Spi, Kind::Regmap].get(v as usize).copied()
    }

    /// The tracepoints, their programs and the fields each program reads:
    /// (global, field name, allowed sizes).
    fn events(self) -> &'static [Event] {
        match self {
            Kind::I2c => &I2C,
            Kind::Smbus => &SMBUS,
            Kind::Spi => &SPI,
            Kind::Gpio => &GPIO,
            Kind::Regmap => &REGMAP,
        }
    }

    /// What the kernel needs for this family's tracepoints.
    fn needs(self) -> &'static str {
        match self {
            Kind::I2c | Kind::Smbus => "CONFIG_I2C (or the i2c-core module loaded)",
            Kind::Spi => "CONFIG_SPI",
            Kind::Gpio => "CONFIG_GPIOLIB",
            Kind::Regmap => "CONFIG_REGMAP (selected by the drivers that use it)",
        }
    }

    fn enabled(self, cfg: &BusesConfig) -> bool {
        match self {
            Kind::I2c => cfg.i2c,
            Kind::Smbus => cfg.smbus,
            Kind::Spi => cfg.spi,
            Kind::Gpio => cfg.gpio,
            Kind::Regmap => cfg.regmap,
        }
    }
}

/// One tracepoint and the fields its program reads.
#[derive(Debug)]
pub struct Event {
    pub group: &'static str,
    pub event: &'static str,
    pub program: &'static str,
    fields: &'static [(&'static str, &'static str, &'static [u32])],
}

const INT: &[u32] = &[4];
const SHORT: &[u32] = &[2];
const SMALL: &[u32] = &[1, 2, 4];
const PTR: &[u32] = &[8, 4];
const DATA_LOC: &[u32] = &[4];

const I2C: [Event; 3] = [
    Event {
        group: "i2c",
        event: "i2c_write",
        program: "bus_i2c_write",
        fields: &[
            ("i2c_w_adapter", "adapter_nr", INT),
            ("i2c_w_msg_nr", "msg_nr", SHORT),
            ("i2c_w_addr", "addr", SHORT),
            ("i2c_w_len", "len", SHORT),
        ],
    },
    Event {
        group: "i2c",
        event: "i2c_read",
        program: "bus_i2c_read",
        fields: &[
            ("i2c_r_adapter", "adapter_nr", INT),
            ("i2c_r_msg_nr", "msg_nr", SHORT),
            ("i2c_r_addr", "addr", SHORT),
            ("i2c_r_len", "len", SHORT),
        ],
    },
    Event {
        group: "i2c",
        event: "i2c_result",
        program: "bus_i2c_result",
        fields: &[
            ("i2c_res_adapter", "adapter_nr", INT),
            ("i2c_res_nr_msgs", "nr_msgs", SHORT),
            ("i2c_res_ret", "ret", SHORT),
        ],
    },
];

const SMBUS: [Event; 3] = [
    Event {
        group: "smbus",
        event: "smbus_write",
        program: "bus_smbus_write",
        fields: &[("smb_w_adapter", "adapter_nr", INT), ("smb_w_addr", "addr", SHORT)],
    },
    Event {
        group: "smbus",
        event: "smbus_read",
        program: "bus_smbus_read",
        fields: &[("smb_r_adapter", "adapter_nr", INT), ("smb_r_addr", "addr", SHORT)],
    },
    Event {
        group: "smbus",
        event: "smbus_result",
        program: "bus_smbus_result",
        fields: &[
            ("smb_res_adapter", "adapter_nr", INT),
            ("smb_res_addr", "addr", SHORT),
            ("smb_res_rw", "read_write", SMALL),
            ("smb_res_res", "res", SMALL),
        ],
    },
];

const SPI: [Event; 2] = [
    Event { group: "spi", event: "spi_message_start", program: "bus_spi_start", fields: &[("spi_s_msg", "msg", PTR)] },
    Event {
        group: "spi",
        event: "spi_message_done",
        program: "bus_spi_done",
        fields: &[
            ("spi_d_bus", "bus_num", INT),
            ("spi_d_cs", "chip_select", SMALL),
            ("spi_d_msg", "msg", PTR),
            ("spi_d_frame", "frame", INT),
            ("spi_d_actual", "actual", INT),
        ],
    },
];

const GPIO: [Event; 2] = [
    Event {
        group: "gpio",
        event: "gpio_value",
        program: "bus_gpio_value",
        fields: &[("gpio_v_gpio", "gpio", INT), ("gpio_v_get", "get", INT), ("gpio_v_value", "value", INT)],
    },
    Event {
        group: "gpio",
        event: "gpio_direction",
        program: "bus_gpio_direction",
        fields: &[("gpio_d_gpio", "gpio", INT), ("gpio_d_in", "in", INT), ("gpio_d_err", "err", INT)],
    },
];

const REGMAP: [Event; 4] = [
    Event { group: "regmap", event: "regmap_hw_read_start", program: "bus_regmap_read_start", fields: &[] },
    Event {
        group: "regmap",
        event: "regmap_hw_read_done",
        program: "bus_regmap_read_done",
        fields: &[("rm_rd_name", "name", DATA_LOC), ("rm_rd_count", "count", INT)],
    },
    Event { group: "regmap", event: "regmap_hw_write_start", program: "bus_regmap_write_start", fields: &[] },
    Event {
        group: "regmap",
        event: "regmap_hw_write_done",
        program: "bus_regmap_write_done",
        fields: &[("rm_wd_name", "name", DATA_LOC), ("rm_wd_count", "count", INT)],
    },
];

/// The globals of one tracepoint's fields, `offset | size << 16 | signed
/// << 24`, from its format file.
pub fn event_globals(ev: &Event, layout: &Layout) -> Result<Vec<(&'static str, u32)>, String> {
    ev.fields
        .iter()
        .map(|&(global, name, sizes)| {
            let f = layout.field(name).ok_or_else(|| format!("field {name} missing"))?;
            if !sizes.contains(&f.size) || f.offset > 0xffff {
                return Err(format!("field {name} at offset {} has size {} (expected {sizes:?})", f.offset, f.size));
            }
            Ok((global, f.offset | f.size << 16 | u32::from(f.signed) << 24))
        })
        .collect()
}

/// The globals of every tracepoint of `kind`, or why it cannot be used.
fn family_globals(root: &Path, kind: Kind) -> Result<Vec<(&'static str, u32)>, String> {
    let mut g = Vec::new();
    for ev in kind.events() {
        let layout = tracefs::layout(root, ev.group, ev.event).map_err(|e| match e {
            tracefs::TracefsError::NoTracepoint(..) => {
                format!("tracepoint {}:{} does not exist on this kernel (needs {})", ev.group, ev.event, kind.needs())
            }
            other => other.to_string(),
        })?;
        g.extend(event_globals(ev, &layout).map_err(|m| format!("tracepoint {}:{}: {m}", ev.group, ev.event))?);
    }
    Ok(g)
}

#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct BusKey {
    kind: u32,
    op: u32,
    bus: u32,
    target: u32,
    name: [u8; NAME_LEN],
}
// SAFETY: plain old data laid out as struct bus_key.
unsafe impl aya::Pod for BusKey {}

#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct ErrKey {
    kind: u32,
    bus: u32,
    target: u32,
    err: u32,
}
// SAFETY: plain old data laid out as struct bus_err_key.
unsafe impl aya::Pod for ErrKey {}

#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct GpioVal([u64; GPIO_COUNTERS]);
// SAFETY: plain old data laid out as struct gpio_counts.
unsafe impl aya::Pod for GpioVal {}

/// An operation on a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    Read,
    Write,
    Transfer,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Transfer => "transfer",
        }
    }
}

/// Cumulative aggregates of one (kind, bus, target, operation, regmap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusSeries {
    pub kind: Kind,
    pub op: Op,
    /// i2c/SMBus adapter number, SPI bus number (regmap: 0).
    pub bus: u32,
    /// i2c address, SPI chip select (regmap: 0).
    pub target: u32,
    /// regmap: the device's name.
    pub regmap: String,
    pub ops: u64,
    pub errors: u64,
    /// Bytes moved (i2c: of transfers that completed; regmap: registers).
    pub bytes: u64,
    pub sum_us: u64,
    pub buckets: [u64; BUCKETS],
}

/// Failed operations by errno (SPI: `short`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusError {
    pub kind: Kind,
    pub bus: u32,
    pub target: u32,
    pub errno: String,
    pub count: u64,
}

/// One GPIO line's counts: gets low/high, sets low/high, direction
/// changes to input/output, failed direction changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpioLine {
    /// The controller's label (`/sys/class/gpio/gpiochipN/label`), or ""
    /// when the kernel does not say (no GPIO sysfs).
    pub chip: String,
    /// The line's offset on its chip, or the global number when the chip
    /// is unknown.
    pub line: u32,
    pub counts: [u64; GPIO_COUNTERS],
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BusReading {
    pub series: Vec<BusSeries>,
    pub errors: Vec<BusError>,
    pub gpio: Vec<GpioLine>,
    /// Operations not counted (series cap), errors not counted by errno,
    /// GPIO events not counted (line cap), ends whose start was not seen.
    pub series_full: u64,
    pub errors_full: u64,
    pub gpio_full: u64,
    pub untimed: u64,
}

/// A GPIO controller: its first global line number, line count, label.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GpioChip {
    base: u32,
    ngpio: u32,
    label: String,
}

/// The GPIO controllers in `/sys/class/gpio` (absent without GPIO sysfs).
fn gpio_chips(dir: &Path) -> Vec<GpioChip> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut chips: Vec<GpioChip> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("gpiochip"))
        .filter_map(|e| {
            let read = |f: &str| std::fs::read_to_string(e.path().join(f)).ok().map(|s| s.trim().to_owned());
            Some(GpioChip {
                base: read("base")?.parse().ok()?,
                ngpio: read("ngpio")?.parse().ok()?,
                label: read("label")?,
            })
        })
        .collect();
    chips.sort_by_key(|c| c.base);
    chips
}

/// (chip label, offset) of a global GPIO number.
fn gpio_line(chips: &[GpioChip], gpio: u32) -> (String, u32) {
    chips
        .iter()
        .find(|c| gpio >= c.base && gpio - c.base < c.ngpio)
        .map_or((String::new(), gpio), |c| (fit_label(&c.label), gpio - c.base))
}

/// The bus families: programs loaded from one object, each family
/// attached when its tracepoints exist. Nothing is loaded into the kernel
/// while no family can attach.
pub struct BusesProbe {
    pub states: States,
    /// Families waiting for their tracepoints (enabled, not on this kernel).
    missing: Vec<Kind>,
    cfg: BusesConfig,
    root: PathBuf,
    rescan: Duration,
    last_check: Instant,
    chips: Vec<GpioChip>,
    kernel: Option<Loaded>,
}

/// The loaded object and the maps the agent reads.
struct Loaded {
    agg: PerCpuHashMap<MapData, BusKey, super::OpAgg>,
    errs: PerCpuHashMap<MapData, ErrKey, u64>,
    gpio: PerCpuHashMap<MapData, u32, GpioVal>,
    stats: PerCpuArray<MapData, u64>,
    // Owns the programs and their links.
    ebpf: Ebpf,
}

/// Where GPIO sysfs lists the controllers.
const GPIO_SYSFS: &str = "/sys/class/gpio";

impl BusesProbe {
    /// Loads the object with the layouts of every family whose tracepoints
    /// exist and attaches those. Fails only when the object cannot load.
    pub fn attach(root: &Path, cfg: &BusesConfig, rescan: Duration) -> Result<Self, ProbeError> {
        let mut states = Vec::new();
        let mut missing = Vec::new();
        let mut usable = Vec::new();
        let mut globals = Vec::new();
        for kind in Kind::ALL {
            if !kind.enabled(cfg) {
                states.push((kind.probe(), ProbeState::Disabled));
                continue;
            }
            match family_globals(root, kind) {
                Ok(g) => {
                    globals.extend(g);
                    usable.push(kind);
                }
                Err(why) => {
                    missing.push(kind);
                    states.push((kind.probe(), ProbeState::Unavailable(why)));
                }
            }
        }
        let kernel = if usable.is_empty() {
            None
        } else {
            let (loaded, attached) = load(&globals, &usable)?;
            states.extend(attached);
            Some(loaded)
        };
        // The order of Kind::ALL, whatever happened.
        states.sort_by_key(|(n, _)| Kind::ALL.iter().position(|k| k.probe() == *n));
        Ok(BusesProbe {
            states,
            missing,
            cfg: cfg.clone(),
            root: root.to_owned(),
            rescan,
            last_check: Instant::now(),
            chips: gpio_chips(Path::new(GPIO_SYSFS)),
            kernel,
        })
    }

    /// Whether a family that was missing now has its tracepoints (a bus
    /// driver's module was loaded): checked every `rescan`. The caller
    /// then attaches the probe again (its counts start over).
    /// Every `rescan` the GPIO controllers are listed again as well (one
    /// may appear later: an expander's driver probing).
    pub fn should_reload(&mut self) -> bool {
        if self.last_check.elapsed() < self.rescan {
            return false;
        }
        self.last_check = Instant::now();
        self.chips = gpio_chips(Path::new(GPIO_SYSFS));
        self.missing.iter().any(|k| family_globals(&self.root, *k).is_ok())
    }

    /// The probe loaded again from scratch (after [`Self::should_reload`]).
    pub fn reload(&self) -> Result<Self, ProbeError> {
        BusesProbe::attach(&self.root, &self.cfg, self.rescan)
    }

    /// Run statistics of the attached families.
    pub fn program_stats(&self) -> Vec<super::tcp_lifecycle::ProgramStats> {
        let Some(k) = &self.kernel else { return Vec::new() };
        Kind::ALL
            .iter()
            .filter(|kind| self.states.iter().any(|(n, s)| *n == kind.probe() && *s == ProbeState::Attached))
            .filter_map(|kind| {
                super::tcp_lifecycle::ProgramStats::of(
                    kind.probe(),
                    kind.events().iter().map(|e| k.ebpf.program(e.program)),
                )
            })
            .collect()
    }

    /// Sums the per-CPU aggregates: one pass over each map.
    pub fn read(&self) -> Result<BusReading, ProbeError> {
        let err = |e: aya::maps::MapError| ProbeError::Read(e.to_string());
        let mut out = BusReading::default();
        let Some(kernel) = &self.kernel else { return Ok(out) };
        for item in kernel.agg.iter() {
            let (k, per_cpu) = item.map_err(err)?;
            let Some(kind) = Kind::from_raw(k.kind) else { continue };
            let op = match k.op {
                0 => Op::Read,
                1 => Op::Write,
                _ => Op::Transfer,
            };
            let t = super::OpAgg::total(per_cpu.iter());
            let s = BusSeries {
                kind,
                op,
                bus: k.bus,
                target: k.target,
                regmap: fit_label(&c_string(&k.name)),
                ops: t.ops,
                errors: t.errors,
                bytes: t.bytes,
                sum_us: t.sum_us,
                buckets: t.buckets,
            };
            out.series.push(s);
        }
        out.series.sort_by(|a, b| {
            (a.kind, a.bus, a.target, &a.regmap, a.op).cmp(&(b.kind, b.bus, b.target, &b.regmap, b.op))
        });
        for item in kernel.errs.iter() {
            let (k, per_cpu) = item.map_err(err)?;
            let Some(kind) = Kind::from_raw(k.kind) else { continue };
            let errno = if kind == Kind::Spi && k.err == ERR_SHORT {
                "short".into()
            } else {
                super::device_io::errno_name(k.err as i32)
            };
            out.errors.push(BusError { kind, bus: k.bus, target: k.target, errno, count: per_cpu.iter().sum() });
        }
        out.errors.sort_by(|a, b| (a.kind, a.bus, a.target, &a.errno).cmp(&(b.kind, b.bus, b.target, &b.errno)));
        for item in kernel.gpio.iter() {
            let (gpio, per_cpu) = item.map_err(err)?;
            let mut counts = [0u64; GPIO_COUNTERS];
            for v in per_cpu.iter() {
                for (a, b) in counts.iter_mut().zip(v.0.iter()) {
                    *a += b;
                }
            }
            let (chip, line) = gpio_line(&self.chips, gpio);
            out.gpio.push(GpioLine { chip, line, counts });
        }
        out.gpio.sort_by(|a, b| (&a.chip, a.line).cmp(&(&b.chip, b.line)));
        let stat = |i: u32| -> Result<u64, ProbeError> { Ok(kernel.stats.get(&i, 0).map_err(err)?.iter().sum()) };
        out.series_full = stat(STAT_SERIES_FULL)?;
        out.errors_full = stat(STAT_ERRS_FULL)?;
        out.gpio_full = stat(STAT_GPIO_FULL)?;
        out.untimed = stat(STAT_UNTIMED)?;
        Ok(out)
    }
}

/// Each probe's name and state.
type States = Vec<(&'static str, ProbeState)>;

/// Loads the object with `globals` and attaches the `usable` families;
/// their states.
fn load(globals: &[(&'static str, u32)], usable: &[Kind]) -> Result<(Loaded, States), ProbeError> {
    let mut loader = super::loader::new();
    loader.btf(None);
    for (name, value) in globals {
        loader.override_global(name, value, true);
    }
    let mut ebpf =
        loader.load(&super::objects::object("buses", OBJECT)).map_err(|e| ProbeError::Load(e.to_string()))?;
    let mut states = Vec::new();
    for &kind in usable {
        let state = match attach_family(&mut ebpf, kind) {
            Ok(()) => ProbeState::Attached,
            Err(e) => {
                tracing::error!(probe = kind.probe(), error = %e, "probe unavailable");
                ProbeState::Unavailable(e.to_string())
            }
        };
        states.push((kind.probe(), state));
    }
    let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| ProbeError::Load(format!("map {name} missing")));
    let map = |e: aya::maps::MapError| ProbeError::Load(e.to_string());
    let agg = PerCpuHashMap::try_from(take("bus_agg")?).map_err(map)?;
    let errs = PerCpuHashMap::try_from(take("bus_errs")?).map_err(map)?;
    let gpio = PerCpuHashMap::try_from(take("bus_gpio")?).map_err(map)?;
    let stats = PerCpuArray::try_from(take("bus_stats")?).map_err(map)?;
    Ok((Loaded { agg, errs, gpio, stats, ebpf }, states))
}

fn attach_family(ebpf: &mut Ebpf, kind: Kind) -> Result<(), ProbeError> {
    for ev in kind.events() {
        let prog: &mut TracePoint = ebpf
            .program_mut(ev.program)
            .ok_or_else(|| ProbeError::Load(format!("program {} missing from object", ev.program)))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| ProbeError::Load(e.to_string()))?;
        prog.load().map_err(|e| ProbeError::Load(super::tcp_lifecycle::verifier_text(&e)))?;
        prog.attach(ev.group, ev.event).map_err(|e| ProbeError::Attach(format!("{}:{}: {e}", ev.group, ev.event)))?;
    }
    Ok(())
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// The tracepoints of a probe name, for `edge-agent probes`.
pub fn tracepoints_of(probe: &str) -> Option<String> {
    let kind = Kind::ALL.iter().find(|k| k.probe() == probe)?;
    let events = kind.events();
    let group = events[0].group;
    let names: Vec<&str> = events.iter().map(|e| e.event).collect();
    Some(format!("{group}:{{{}}}", names.join(",")))
}

impl super::Probe for BusesProbe {
    const NAME: &'static str = "buses";
    type Config = BusesConfig;
    type Reading = BusReading;
    type Metrics = metrics::BusMetrics;
    type Seen = ();

    fn enabled(cfg: &crate::config::Config) -> bool {
        cfg.probes.buses.enabled
    }

    fn not_loaded(_: &crate::config::Config, why: &ProbeState) -> Vec<(&'static str, ProbeState)> {
        Kind::ALL.iter().map(|k| (k.probe(), why.clone())).collect()
    }

    fn start(cfg: &crate::config::Config, _: &super::Probes) -> Result<Self, ProbeError> {
        let rescan = Duration::from_secs(cfg.probes.devices.rescan_secs);
        BusesProbe::attach(&tracefs::ensure_mounted()?, &cfg.probes.buses, rescan)
    }

    fn states(&self) -> Vec<(&'static str, ProbeState)> {
        self.states.clone()
    }

    fn program_stats(&self) -> Vec<super::tcp_lifecycle::ProgramStats> {
        BusesProbe::program_stats(self)
    }

    /// Families whose tracepoints appeared since: the probe loaded again.
    fn refresh(&mut self) -> bool {
        if !self.should_reload() {
            return false;
        }
        match self.reload() {
            Ok(new) => {
                tracing::info!(probes = ?new.states, "bus tracepoints appeared: bus probes attached again");
                *self = new;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "bus probes not reloaded");
                false
            }
        }
    }

    fn reading(&self) -> Result<BusReading, ProbeError> {
        self.read()
    }

    fn register(metrics: &metrics::BusMetrics, registry: &mut prometheus_client::registry::Registry) {
        metrics.register(registry);
    }

    fn observe(&mut self, reading: &BusReading, metrics: &metrics::BusMetrics) {
        metrics.observe(reading);
    }

    fn series(reading: &BusReading, _: &mut (), out: &mut super::series::Samples) {
        series::series(reading, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_the_c_header() {
        let h = include_str!("../../../ebpf/include/buses.h");
        let def = |name: &str| crate::probe::header_define(h, name);
        assert_eq!(def("BUS_I2C"), Kind::I2c as usize);
        assert_eq!(def("BUS_SMBUS"), Kind::Smbus as usize);
        assert_eq!(def("BUS_SPI"), Kind::Spi as usize);
        assert_eq!(def("BUS_REGMAP"), Kind::Regmap as usize);
        assert_eq!(def("BUS_OP_READ"), 0);
        assert_eq!(def("BUS_OP_WRITE"), 1);
        assert_eq!(def("BUS_OP_TRANSFER"), 2);
        assert_eq!(def("BUS_BUCKETS"), BUCKETS);
        assert_eq!(def("BUS_NAME_LEN"), NAME_LEN);
        assert_eq!(def("BUS_MAX_SERIES"), MAX_SERIES);
        assert_eq!(def("BUS_MAX_ERRS"), MAX_ERRS);
        assert_eq!(def("BUS_MAX_GPIO"), MAX_GPIO);
        assert_eq!(def("GPIO_COUNTERS"), GPIO_COUNTERS);
        assert_eq!(def("BUS_ERR_SHORT"), ERR_SHORT as usize);
        assert_eq!(def("BUS_STAT_SERIES_FULL"), STAT_SERIES_FULL as usize);
        assert_eq!(def("BUS_STAT_ERRS_FULL"), STAT_ERRS_FULL as usize);
        assert_eq!(def("BUS_STAT_GPIO_FULL"), STAT_GPIO_FULL as usize);
        assert_eq!(def("BUS_STAT_UNTIMED"), STAT_UNTIMED as usize);
        assert_eq!(std::mem::size_of::<BusKey>(), 16 + NAME_LEN);
        assert_eq!(std::mem::size_of::<super::super::OpAgg>(), 8 * (4 + BUCKETS));
    }

    // Format files as Debian's 6.1 arm64 kernel prints them.
    const I2C_RESULT: &str = "name: i2c_result\nID: 1\nformat:\n\
        \tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
        \tfield:int adapter_nr;\toffset:8;\tsize:4;\tsigned:1;\n\
        \tfield:__u16 nr_msgs;\toffset:12;\tsize:2;\tsigned:0;\n\
        \tfield:__s16 ret;\toffset:14;\tsize:2;\tsigned:1;\n";
    const REGMAP_DONE: &str = "name: regmap_hw_read_done\nformat:\n\
        \tfield:__data_loc char[] name;\toffset:8;\tsize:4;\tsigned:1;\n\
        \tfield:unsigned int reg;\toffset:12;\tsize:4;\tsigned:0;\n\
        \tfield:int count;\toffset:16;\tsize:4;\tsigned:1;\n";

    #[test]
    fn field_descriptors_carry_offset_size_and_sign() {
        let g = event_globals(&I2C[2], &Layout::parse(I2C_RESULT)).unwrap();
        assert_eq!(
            g,
            vec![
                ("i2c_res_adapter", 8 | 4 << 16 | 1 << 24),
                ("i2c_res_nr_msgs", 12 | 2 << 16),
                ("i2c_res_ret", 14 | 2 << 16 | 1 << 24)
            ]
        );
        let g = event_globals(&REGMAP[1], &Layout::parse(REGMAP_DONE)).unwrap();
        assert_eq!(g, vec![("rm_rd_name", 8 | 4 << 16 | 1 << 24), ("rm_rd_count", 16 | 4 << 16 | 1 << 24)]);
    }

    #[test]
    fn a_missing_or_resized_field_is_refused_by_name() {
        let no_ret = I2C_RESULT.replace("__s16 ret;", "__s16 status;");
        let e = event_globals(&I2C[2], &Layout::parse(&no_ret)).unwrap_err();
        assert!(e.contains("field ret missing"), "{e}");
        let wide = I2C_RESULT.replace("offset:12;\tsize:2;", "offset:12;\tsize:8;");
        let e = event_globals(&I2C[2], &Layout::parse(&wide)).unwrap_err();
        assert!(e.contains("nr_msgs") && e.contains("size 8"), "{e}");
    }

    #[test]
    fn a_family_without_tracepoints_says_what_the_kernel_needs() {
        let root = std::env::temp_dir().join(format!("edge-buses-{}", std::process::id()));
        std::fs::create_dir_all(root.join("events/i2c/i2c_result")).unwrap();
        let e = family_globals(&root, Kind::Spi).unwrap_err();
        assert!(e.contains("spi:spi_message_start does not exist") && e.contains("CONFIG_SPI"), "{e}");
        let e = family_globals(&root, Kind::I2c).unwrap_err();
        assert!(e.contains("i2c:i2c_write"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn gpio_numbers_map_to_their_chip_and_offset() {
        let dir = std::env::temp_dir().join(format!("edge-gpio-{}", std::process::id()));
        for (name, base, n, label) in [("gpiochip504", 504, 8, "9030000.pl061"), ("gpiochip0", 0, 32, "tegra-gpio")] {
            let d = dir.join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("base"), format!("{base}\n")).unwrap();
            std::fs::write(d.join("ngpio"), format!("{n}\n")).unwrap();
            std::fs::write(d.join("label"), format!("{label}\n")).unwrap();
        }
        let chips = gpio_chips(&dir);
        assert_eq!(gpio_line(&chips, 511), ("9030000.pl061".into(), 7));
        assert_eq!(gpio_line(&chips, 3), ("tegra-gpio".into(), 3));
        // Between chips, or without GPIO sysfs: the global number.
        assert_eq!(gpio_line(&chips, 100), (String::new(), 100));
        assert_eq!(gpio_line(&[], 511), (String::new(), 511));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tracepoints_are_listed_per_probe() {
        assert_eq!(tracepoints_of("spi").unwrap(), "spi:{spi_message_start,spi_message_done}");
        assert_eq!(tracepoints_of("tcp_lifecycle"), None);
    }
}
