//! User-space side of `ebpf/src/device_io.bpf.c`: resolves the watched
//! device globs, keeps the kernel's table of watched paths and open files
//! in step with the box, attaches the syscall hooks only while a watched
//! device exists, and reads the per-(device, operation, process) aggregates
//! once per window.

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, Queue};
use aya::programs::trace_point::TracePointLinkId;
use aya::programs::TracePoint;
use aya::Ebpf;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::tracefs::{self, Layout};
use super::{ProbeError, ProbeState};
pub use config::DevicesConfig;

pub mod config;
pub mod metrics;
pub mod series;

pub(crate) static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/device_io.bpf.o"));

// Mirrors ebpf/include/device_io.h (a test below checks they agree).
pub const OPS: usize = 4;
pub const BUCKETS: usize = super::AGG_BUCKETS;
const COMM_LEN: usize = 16;
pub const PATH_MAX: usize = 128;
pub const MAX_DEVICES: usize = 128;
pub const MAX_PATHS: usize = 512;
pub const MAX_FDS: usize = 4096;
pub const MAX_SERIES: usize = 64;
const PID_SLOTS: usize = 4096;
const FD_SLOTS: usize = 1024;
const TID_SLOTS: usize = 1024;
const STAT_FDS_FULL: u32 = 0;
const STAT_INFLIGHT_FULL: u32 = 1;
const STAT_AGG_FULL: u32 = 2;
const STAT_ERRS_FULL: u32 = 3;
const STAT_FDS_ADDED: u32 = 4;
const STAT_STALE: u32 = 5;
const STAT_SPILLED: u32 = 6;
const STAT_BYTES_LOST: u32 = 7;
const STAT_BYTES_CUT: u32 = 8;
#[cfg(test)]
const STATS: usize = 9;
/// Serial bytes per event (DIO_BYTES) and struct dio_bytes_event's size.
pub const BYTES: usize = 512;
const BYTES_EVENT: usize = 24 + BYTES;
/// struct dio_op: an in-flight record (a thread slot of the filter).
const OP_RECORD: usize = 32;
const REC_MAX: u32 = 48;

/// An operation on a device file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Op {
    Read = 0,
    Write = 1,
    Ioctl = 2,
    Open = 3,
}

impl Op {
    pub const ALL: [Op; OPS] = [Op::Read, Op::Write, Op::Ioctl, Op::Open];
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Ioctl => "ioctl",
            Op::Open => "open",
        }
    }
    fn from_raw(v: u32) -> Option<Op> {
        Op::ALL.get(v as usize).copied()
    }
}

/// One syscall tracepoint and the program attached to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hook {
    pub event: &'static str,
    pub program: &'static str,
    /// The record field the program reads (its offset must be the one the
    /// program was loaded with).
    pub field: &'static str,
    /// Exists on every architecture; the others (dup2: not on arm64 or
    /// riscv64, which have only dup3) are used where they exist.
    pub required: bool,
}

const fn hook(event: &'static str, program: &'static str, field: &'static str) -> Hook {
    Hook { event, program, field, required: true }
}

const fn optional(event: &'static str, program: &'static str, field: &'static str) -> Hook {
    Hook { event, program, field, required: false }
}

/// Every hook, all in group `syscalls`. pread64/readv count as reads,
/// pwrite64/writev as writes. One exit program serves every call.
pub const HOOKS: [Hook; 21] = [
    hook("sys_enter_read", "dio_enter_read", "fd"),
    hook("sys_enter_pread64", "dio_enter_readx", "fd"),
    hook("sys_enter_readv", "dio_enter_readx", "fd"),
    hook("sys_enter_write", "dio_enter_write", "fd"),
    hook("sys_enter_pwrite64", "dio_enter_writex", "fd"),
    hook("sys_enter_writev", "dio_enter_writex", "fd"),
    hook("sys_enter_ioctl", "dio_enter_ioctl", "fd"),
    hook("sys_enter_openat", "dio_enter_openat", "filename"),
    hook("sys_enter_close", "dio_enter_close", "fd"),
    hook("sys_enter_dup3", "dio_enter_dup", "oldfd"),
    optional("sys_enter_dup2", "dio_enter_dup", "oldfd"),
    hook("sys_exit_read", "dio_exit", "ret"),
    hook("sys_exit_pread64", "dio_exit", "ret"),
    hook("sys_exit_readv", "dio_exit", "ret"),
    hook("sys_exit_write", "dio_exit", "ret"),
    hook("sys_exit_pwrite64", "dio_exit", "ret"),
    hook("sys_exit_writev", "dio_exit", "ret"),
    hook("sys_exit_ioctl", "dio_exit", "ret"),
    hook("sys_exit_openat", "dio_exit", "ret"),
    hook("sys_exit_dup3", "dio_exit", "ret"),
    optional("sys_exit_dup2", "dio_exit", "ret"),
];

const PROGRAMS: [&str; 9] = [
    "dio_enter_read",
    "dio_enter_readx",
    "dio_enter_write",
    "dio_enter_writex",
    "dio_enter_ioctl",
    "dio_enter_openat",
    "dio_enter_close",
    "dio_enter_dup",
    "dio_exit",
];

/// The offsets the programs are loaded with, from the tracefs format files
/// of every hook; they must agree across hooks of the same field.
pub fn layout_globals(layouts: &[(Hook, Layout)]) -> Result<Vec<(&'static str, u32)>, String> {
    let mut off: BTreeMap<&'static str, u32> = BTreeMap::new();
    for (h, l) in layouts {
        let f = l.field(h.field).ok_or_else(|| format!("syscalls:{}: field {} missing", h.event, h.field))?;
        if f.size != 8 || f.offset % 8 != 0 || f.offset < 8 || f.offset + 8 > REC_MAX {
            return Err(format!(
                "syscalls:{}: field {} at offset {} size {} cannot be read",
                h.event, h.field, f.offset, f.size
            ));
        }
        match off.insert(h.field, f.offset) {
            Some(prev) if prev != f.offset => {
                return Err(format!(
                    "syscalls:{}: field {} at offset {}, other calls have it at {prev}",
                    h.event, h.field, f.offset
                ))
            }
            _ => {}
        }
    }
    // The call's number, in every record: checked at exit against the
    // record of the call that began (0: not checked).
    let nr: BTreeSet<Option<u32>> = layouts
        .iter()
        .map(|(_, l)| l.field("__syscall_nr").filter(|f| f.size == 4 && f.offset + 4 <= REC_MAX).map(|f| f.offset))
        .collect();
    let off_nr = match nr.into_iter().collect::<Vec<_>>()[..] {
        [Some(o)] => o,
        _ => 0,
    };
    let g = |name: &'static str, field: &str| off.get(field).map(|o| (name, *o));
    Ok([g("off_fd", "fd"), g("off_filename", "filename"), g("off_oldfd", "oldfd"), g("off_ret", "ret")]
        .into_iter()
        .flatten()
        .chain([("off_nr", off_nr)])
        .collect())
}

#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct FileVal {
    dev: u32,
    /// 1 + the series number of (dev, process name); 0: none (cap).
    series: u32,
}
// SAFETY: plain old data laid out as struct dio_file.
unsafe impl aya::Pod for FileVal {}

#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct PathKey([u8; PATH_MAX]);
// SAFETY: plain old data laid out as struct dio_path.
unsafe impl aya::Pod for PathKey {}

#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct SeriesKey {
    dev: u32,
    comm: [u8; COMM_LEN],
}
// SAFETY: plain old data laid out as struct dio_series_key.
unsafe impl aya::Pod for SeriesKey {}

#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct ErrKey {
    series: u32,
    op: u32,
    err: u32,
}
// SAFETY: plain old data laid out as struct dio_err_key.
unsafe impl aya::Pod for ErrKey {}

/// Operations of one (device, operation, process name) since the probe
/// was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSeries {
    pub device: String,
    pub op: Op,
    pub process: String,
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    /// Sum of the latencies, microseconds.
    pub sum_us: u64,
    /// log2 buckets of microseconds: bucket b < BUCKETS-1 counts latencies
    /// below 2^(b+1) us.
    pub buckets: [u64; BUCKETS],
}

/// Failed operations of one (device, operation, process, errno).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceErrors {
    pub device: String,
    pub op: Op,
    pub process: String,
    pub errno: i32,
    pub count: u64,
}

/// One reading of the device probe.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceReading {
    pub series: Vec<DeviceSeries>,
    pub errors: Vec<DeviceErrors>,
    /// Watched devices present now.
    pub devices_present: u64,
    /// Devices matched past the MAX_DEVICES cap (not watched).
    pub devices_over_cap: u64,
    /// Watched files open now (kernel table entries).
    pub files_open: u64,
    /// Cumulative: a watched open not remembered (table full), an operation
    /// not timed, not counted (series cap), an error not counted by errno.
    pub fds_full: u64,
    pub inflight_full: u64,
    pub series_full: u64,
    pub errors_full: u64,
    /// Cumulative: an exit whose thread's in-flight record began another
    /// call (that call's exit never seen): dropped. Operations timed in the
    /// overflow hash because another thread held the thread's slot.
    pub stale_records: u64,
    pub spilled: u64,
    /// Watched files registered by the open hook / by the /proc scan.
    pub files_from_open: u64,
    pub files_from_scan: u64,
    /// Cumulative: serial byte events lost (ring full), reads or writes
    /// cut to BYTES (Modbus RTU capture).
    pub bytes_lost: u64,
    pub bytes_cut: u64,
}

/// The bytes one read() or write() of a captured device moved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BytesEvent<'a> {
    /// CLOCK_MONOTONIC, ns, when the call returned.
    pub ts_ns: u64,
    /// The device's label (the path its watch pattern matched).
    pub device: &'a str,
    pub tgid: u32,
    pub written: bool,
    pub data: &'a [u8],
}

/// The kernel's filter array, mapped into the agent: one byte per tgid
/// slot and per fd slot (both sides only store whole bytes), then the
/// count of spilled operations and the threads' in-flight slots (the
/// kernel's alone while the hooks are attached).
struct Filter {
    mem: super::MappedArray,
}

impl Filter {
    const INFLIGHT: usize = PID_SLOTS + FD_SLOTS;
    const SIZE: usize = Self::INFLIGHT + 8 + OP_RECORD * TID_SLOTS;

    fn map(map: &MapData) -> Result<Filter, ProbeError> {
        Ok(Filter { mem: super::MappedArray::map(map, Self::SIZE, true, "device filter")? })
    }

    /// Frees every thread slot and the spilled count: only with the hooks
    /// detached.
    fn clear_inflight(&self) {
        // SAFETY: within the mapping (SIZE bytes); no program writes there
        // while detached, and the agent holds no reference into it.
        unsafe { std::ptr::write_bytes(self.mem.ptr().add(Self::INFLIGHT), 0, Self::SIZE - Self::INFLIGHT) }
    }

    fn byte(&self, i: usize) -> &std::sync::atomic::AtomicU8 {
        assert!(i < PID_SLOTS + FD_SLOTS);
        // SAFETY: within the mapping; AtomicU8 has the layout of u8 and the
        // kernel side only stores whole bytes too.
        unsafe { &*(self.mem.ptr().add(i) as *const std::sync::atomic::AtomicU8) }
    }

    /// Marks the slots of a watched (tgid << 32 | fd).
    fn mark(&self, key: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        let (tgid, fd) = ((key >> 32) as usize, (key & 0xffff_ffff) as usize);
        self.byte(tgid % PID_SLOTS).store(1, SeqCst);
        self.byte(PID_SLOTS + fd % FD_SLOTS).store(1, SeqCst);
    }

    fn clear_all(&self) {
        for i in 0..PID_SLOTS + FD_SLOTS {
            self.byte(i).store(0, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Slots set now, as (pid slots, fd slots).
    fn set_slots(&self) -> (BTreeSet<usize>, BTreeSet<usize>) {
        let on = |i: usize| self.byte(i).load(std::sync::atomic::Ordering::SeqCst) != 0;
        ((0..PID_SLOTS).filter(|&i| on(i)).collect(), (0..FD_SLOTS).filter(|&i| on(PID_SLOTS + i)).collect())
    }
}

/// The watched devices: a stable index per device (its label), and the
/// names each present device may be opened by.
#[derive(Debug, Default)]
struct DeviceTable {
    /// Index -> label (the path the glob matched).
    labels: Vec<String>,
    /// Canonical path -> index.
    index: HashMap<PathBuf, u32>,
    /// Names of present devices (matches, targets, links) -> index.
    names: BTreeMap<PathBuf, u32>,
    over_cap: BTreeSet<PathBuf>,
}

/// What the globs match now: canonical path -> (label, every name).
pub fn resolve(patterns: &[String]) -> BTreeMap<PathBuf, (String, BTreeSet<PathBuf>)> {
    let mut out: BTreeMap<PathBuf, (String, BTreeSet<PathBuf>)> = BTreeMap::new();
    for p in patterns {
        for m in glob(p) {
            let Ok(canon) = std::fs::canonicalize(&m) else { continue };
            if canon.is_dir() {
                continue;
            }
            let e = out.entry(canon.clone()).or_insert_with(|| (m.display().to_string(), BTreeSet::new()));
            e.1.insert(m);
            e.1.insert(canon);
        }
    }
    // udev's names for the same device: /dev/<link>, /dev/serial/by-*.
    if out.keys().any(|c| c.starts_with("/dev")) {
        for dir in ["/dev", "/dev/serial/by-id", "/dev/serial/by-path"] {
            let Ok(rd) = std::fs::read_dir(dir) else { continue };
            for e in rd.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_symlink()) {
                    continue;
                }
                if let Some(entry) = std::fs::canonicalize(e.path()).ok().and_then(|c| out.get_mut(&c)) {
                    entry.1.insert(e.path());
                }
            }
        }
    }
    out
}

/// glob(3): the paths matching an absolute pattern now.
fn glob(pattern: &str) -> Vec<PathBuf> {
    let Ok(c) = CString::new(pattern) else { return Vec::new() };
    // SAFETY: glob_t is plain data; zeroed is its documented initial state.
    let mut g: libc::glob_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pattern pointer and glob_t; freed with globfree below.
    let rc = unsafe { libc::glob(c.as_ptr(), 0, None, &mut g) };
    let mut out = Vec::new();
    if rc == 0 {
        for i in 0..g.gl_pathc {
            // SAFETY: glob filled gl_pathv with gl_pathc valid C strings.
            let s = unsafe { CStr::from_ptr(*g.gl_pathv.add(i)) };
            out.push(PathBuf::from(std::ffi::OsStr::from_bytes(s.to_bytes())));
        }
    }
    // SAFETY: g was filled by glob (or zeroed: globfree accepts that).
    unsafe { libc::globfree(&mut g) };
    out
}

use std::os::unix::ffi::OsStrExt;

fn comm_bytes(name: &str) -> [u8; COMM_LEN] {
    let mut c = [0u8; COMM_LEN];
    for (d, s) in c.iter_mut().zip(name.bytes().take(COMM_LEN - 1)) {
        *d = s;
    }
    c
}

fn comm_str(c: &[u8; COMM_LEN]) -> String {
    let end = c.iter().position(|b| *b == 0).unwrap_or(COMM_LEN);
    let s = String::from_utf8_lossy(&c[..end]).into_owned();
    if s.is_empty() {
        "unknown".into()
    } else {
        s
    }
}

/// The device file an open descriptor refers to, as /proc shows it.
fn fd_target(tgid: u32, fd: u32) -> Option<PathBuf> {
    let t = std::fs::read_link(format!("/proc/{tgid}/fd/{fd}")).ok()?;
    // A removed device node (a USB adapter unplugged) still counts.
    let b = t.as_os_str().as_bytes();
    Some(match b.strip_suffix(b" (deleted)") {
        Some(s) => PathBuf::from(std::ffi::OsStr::from_bytes(s)),
        None => t,
    })
}

/// The probe: loaded once; its syscall hooks attached only while a watched
/// device is present. Dropping it detaches everything and frees the maps.
pub struct DeviceIoProbe {
    patterns: Vec<String>,
    /// The hooks this kernel has.
    hooks: Vec<Hook>,
    rescan: Duration,
    last_scan: Option<Instant>,
    table: DeviceTable,
    links: Vec<(&'static str, TracePointLinkId)>,
    filter: Filter,
    _filter_map: MapData,
    fds: BpfHashMap<MapData, u64, FileVal>,
    /// Operations of threads whose slot another held: tid -> record.
    inflight: BpfHashMap<MapData, u32, [u8; OP_RECORD]>,
    paths: BpfHashMap<MapData, PathKey, u32>,
    /// (device, process name) -> 1 + series number.
    series: BpfHashMap<MapData, SeriesKey, u32>,
    /// Series numbers not handed out yet (filled at load).
    series_free: Queue<MapData, u32>,
    /// (series - 1) * OPS + op -> aggregate.
    agg: PerCpuArray<MapData, super::OpAgg>,
    errs: PerCpuHashMap<MapData, ErrKey, u64>,
    stats: PerCpuArray<MapData, u64>,
    /// Device index -> 1 when its bytes are captured.
    capture: aya::maps::Array<MapData, u32>,
    /// Globs of the devices whose bytes are captured (Modbus RTU tags).
    capture_globs: Vec<String>,
    bytes: aya::maps::RingBuf<MapData>,
    files_from_scan: u64,
    /// Names too long for the open hook, warned about once.
    long_names: BTreeSet<PathBuf>,
    pub state: ProbeState,
    // Owns the programs; must outlive the links and maps.
    ebpf: Ebpf,
}

impl DeviceIoProbe {
    /// Checks every hook's layout, loads the programs (not attached yet)
    /// and resolves the watched devices, attaching when one is present.
    pub fn load(tracefs_root: &Path, cfg: &DevicesConfig) -> Result<Self, ProbeError> {
        Self::load_capturing(tracefs_root, cfg, &[])
    }

    /// Like `load`; the bytes read and written on devices matching
    /// `capture` (Modbus RTU tags' device globs, watched too) reach user
    /// space (`drain_bytes`).
    pub fn load_capturing(tracefs_root: &Path, cfg: &DevicesConfig, capture: &[String]) -> Result<Self, ProbeError> {
        let mut layouts = Vec::new();
        let mut hooks = Vec::new();
        for h in HOOKS {
            match tracefs::layout(tracefs_root, "syscalls", h.event) {
                Ok(l) => {
                    layouts.push((h, l));
                    hooks.push(h);
                }
                Err(e) if h.required => return Err(e.into()),
                Err(e) => tracing::info!(hook = h.event, reason = %e, "optional device I/O hook not on this kernel"),
            }
        }
        let mut globals = layout_globals(&layouts)
            .map_err(|message| ProbeError::Layout { tracepoint: "syscalls:*".into(), message })?;
        // read/write: the buffer argument, for the serial bytes.
        let bufs: BTreeSet<Option<u32>> = layouts
            .iter()
            .filter(|(h, _)| matches!(h.event, "sys_enter_read" | "sys_enter_write"))
            .map(|(_, l)| l.field("buf").filter(|f| f.size == 8 && f.offset + 8 <= REC_MAX).map(|f| f.offset))
            .collect();
        match bufs.into_iter().collect::<Vec<_>>()[..] {
            [Some(o)] => globals.push(("off_buf", o)),
            _ => {
                return Err(ProbeError::Layout {
                    tracepoint: "syscalls:sys_enter_read/write".into(),
                    message: "field buf missing or placed differently".into(),
                })
            }
        }
        let mut loader = super::loader::new();
        loader.btf(None);
        for (name, value) in &globals {
            loader.override_global(name, value, true);
        }
        if capture.is_empty() {
            // No RTU tags: the byte ring stays one page (never written).
            loader.map_max_entries("dio_bytes", super::protocols::page_size());
        }
        let mut ebpf =
            loader.load(&super::objects::object("device_io", OBJECT)).map_err(|e| ProbeError::Load(e.to_string()))?;
        for name in PROGRAMS {
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| ProbeError::Load(format!("program {name} missing from object")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| ProbeError::Load(e.to_string()))?;
            prog.load().map_err(|e| ProbeError::Load(super::tcp_lifecycle::verifier_text(&e)))?;
        }
        let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| ProbeError::Load(format!("map {name} missing")));
        let load = |e: aya::maps::MapError| ProbeError::Load(e.to_string());
        let filter_map = match take("dio_filter")? {
            aya::maps::Map::Array(m) => m,
            _ => return Err(ProbeError::Load("map dio_filter is not an array".into())),
        };
        let filter = Filter::map(&filter_map)?;
        let fds = BpfHashMap::try_from(take("dio_fds")?).map_err(load)?;
        let inflight = BpfHashMap::try_from(take("dio_inflight")?).map_err(load)?;
        let paths = BpfHashMap::try_from(take("dio_paths")?).map_err(load)?;
        let series = BpfHashMap::try_from(take("dio_series")?).map_err(load)?;
        let mut series_free = Queue::try_from(take("dio_series_free")?).map_err(load)?;
        for n in 1..=MAX_SERIES as u32 {
            series_free.push(n, 0).map_err(load)?;
        }
        let agg = PerCpuArray::try_from(take("dio_agg")?).map_err(load)?;
        let errs = PerCpuHashMap::try_from(take("dio_errs")?).map_err(load)?;
        let stats = PerCpuArray::try_from(take("dio_stats")?).map_err(load)?;
        let capture_map = aya::maps::Array::try_from(take("dio_capture")?).map_err(load)?;
        let bytes = aya::maps::RingBuf::try_from(take("dio_bytes")?).map_err(load)?;
        let mut patterns = cfg.watch.clone();
        for c in capture {
            if !patterns.contains(c) {
                patterns.push(c.clone());
            }
        }
        let mut p = DeviceIoProbe {
            patterns,
            hooks,
            rescan: Duration::from_secs(cfg.rescan_secs),
            last_scan: None,
            table: DeviceTable::default(),
            links: Vec::new(),
            filter,
            _filter_map: filter_map,
            fds,
            inflight,
            paths,
            series,
            series_free,
            agg,
            errs,
            stats,
            capture: capture_map,
            capture_globs: capture.to_vec(),
            bytes,
            files_from_scan: 0,
            long_names: BTreeSet::new(),
            state: ProbeState::Waiting("no watched device present yet".into()),
            ebpf,
        };
        p.refresh();
        Ok(p)
    }

    /// Once per window: resolves the globs again, updates the kernel's
    /// path table, attaches or detaches the hooks, and scans /proc for
    /// watched files when due (or when the device set changed).
    pub fn refresh(&mut self) {
        let found = resolve(&self.patterns);
        let changed = self.update_devices(&found);
        if self.table.names.is_empty() {
            if !self.links.is_empty() {
                self.detach();
                tracing::info!("no watched device present: device I/O hooks detached");
            }
            self.state = ProbeState::Waiting(format!("no device matches {}", self.patterns.join(" ")));
            return;
        }
        if self.links.is_empty() {
            if let Err(e) = self.attach() {
                tracing::error!(probe = "device_io", error = %e, "attaching the syscall hooks failed");
                self.state = ProbeState::Unavailable(e.to_string());
                return;
            }
            self.state = ProbeState::Attached;
            tracing::info!(devices = found.len(), "watched device present: device I/O hooks attached");
        }
        let due = self.last_scan.is_none_or(|t| t.elapsed() >= self.rescan);
        if changed || due {
            self.scan();
        }
    }

    /// Brings the device table and the kernel's path table to `found`.
    /// Returns whether the set of present devices changed.
    fn update_devices(&mut self, found: &BTreeMap<PathBuf, (String, BTreeSet<PathBuf>)>) -> bool {
        let mut names = BTreeMap::new();
        for (canon, (label, aliases)) in found {
            let idx = match self.table.index.get(canon) {
                Some(i) => *i,
                None if self.table.labels.len() < MAX_DEVICES => {
                    let i = self.table.labels.len() as u32;
                    self.table.labels.push(fit_label(label));
                    self.table.index.insert(canon.clone(), i);
                    i
                }
                None => {
                    if self.table.over_cap.insert(canon.clone()) {
                        tracing::warn!(device = %canon.display(), cap = MAX_DEVICES, "more watched devices than the probe can label; narrow probes.devices.watch");
                    }
                    continue;
                }
            };
            for a in aliases {
                names.insert(a.clone(), idx);
            }
        }
        if names == self.table.names {
            return false;
        }
        // Which devices' bytes are captured: any of their names matches a
        // capture glob.
        for idx in 0..MAX_DEVICES as u32 {
            let on = names.iter().any(|(n, i)| {
                *i == idx && self.capture_globs.iter().any(|g| crate::values::glob_matches(g, &n.to_string_lossy()))
            });
            let _ = self.capture.set(idx, u32::from(on), 0);
        }
        for (old, _) in self.table.names.iter().filter(|(n, _)| !names.contains_key(*n)) {
            if let Some(k) = path_key(old) {
                let _ = self.paths.remove(&k);
            }
        }
        let mut kept = 0;
        for (name, idx) in &names {
            match path_key(name) {
                Some(k) if kept < MAX_PATHS => {
                    if let Err(e) = self.paths.insert(k, idx, 0) {
                        tracing::warn!(path = %name.display(), error = %e, "watched path not added to the open hook");
                    }
                    kept += 1;
                }
                _ => {
                    if self.long_names.insert(name.clone()) {
                        tracing::info!(path = %name.display(), "name too long for the open hook (or too many names): files opened by it are found by the /proc scan");
                    }
                }
            }
        }
        let before: BTreeSet<u32> = self.table.names.values().copied().collect();
        let after: BTreeSet<u32> = names.values().copied().collect();
        self.table.names = names;
        before != after
    }

    fn attach(&mut self) -> Result<(), ProbeError> {
        for h in self.hooks.clone() {
            let prog: &mut TracePoint = self
                .ebpf
                .program_mut(h.program)
                .ok_or_else(|| ProbeError::Load(format!("program {} missing", h.program)))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| ProbeError::Load(e.to_string()))?;
            match prog.attach("syscalls", h.event) {
                Ok(id) => self.links.push((h.program, id)),
                Err(e) => {
                    self.detach();
                    return Err(ProbeError::Attach(format!("syscalls:{}: {e}", h.event)));
                }
            }
        }
        Ok(())
    }

    /// Detaches every hook and forgets the open files (found again by the
    /// scan when hooks attach anew). Counts stay.
    fn detach(&mut self) {
        for (program, id) in std::mem::take(&mut self.links) {
            let prog: Option<&mut TracePoint> = self.ebpf.program_mut(program).and_then(|p| p.try_into().ok());
            if let Some(prog) = prog {
                if let Err(e) = prog.detach(id) {
                    tracing::warn!(program, error = %e, "detach failed");
                }
            }
        }
        let keys: Vec<u64> = self.fds.keys().flatten().collect();
        for k in keys {
            let _ = self.fds.remove(&k);
        }
        // Operations in flight now will not be seen ending: their records
        // go, or the next hooked exit of their thread would count them.
        let keys: Vec<u32> = self.inflight.keys().flatten().collect();
        for k in keys {
            let _ = self.inflight.remove(&k);
        }
        self.filter.clear_all();
        self.filter.clear_inflight();
        self.last_scan = None;
    }

    /// Finds watched files in /proc/<pid>/fd: adds those the kernel table
    /// lacks, removes entries that no longer point at a watched device
    /// (processes gone, descriptors reused), and clears filter slots no
    /// entry needs any more.
    fn scan(&mut self) {
        self.last_scan = Some(Instant::now());
        let canon: HashMap<&Path, u32> = self.table.index.iter().map(|(p, i)| (p.as_path(), *i)).collect();
        let mut found: BTreeMap<u64, u32> = BTreeMap::new();
        let me = std::process::id();
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(tgid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
                if tgid == me {
                    continue;
                }
                let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else { continue };
                for f in fds.flatten() {
                    let Some(fd) = f.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
                    if let Some(dev) = fd_target(tgid, fd).and_then(|t| canon.get(t.as_path()).copied()) {
                        found.insert((u64::from(tgid) << 32) | u64::from(fd), dev);
                    }
                }
            }
        }
        let mut comms: HashMap<u32, [u8; COMM_LEN]> = HashMap::new();
        for (key, dev) in &found {
            // An entry the open hook made stays as it is, with its series;
            // only files it lacks cost a comm read and a series lookup.
            if self.fds.get(key, 0).is_err() {
                let tgid = (key >> 32) as u32;
                let comm = *comms.entry(tgid).or_insert_with(|| {
                    comm_bytes(std::fs::read_to_string(format!("/proc/{tgid}/comm")).unwrap_or_default().trim())
                });
                let series = series_of(&mut self.series, &mut self.series_free, *dev, comm);
                // BPF_NOEXIST: the open hook may have made it since.
                if self.fds.insert(*key, FileVal { dev: *dev, series }, 1).is_ok() {
                    self.files_from_scan += 1;
                }
            }
            self.filter.mark(*key);
        }
        // Entries that no longer point at a watched device (checked again
        // now, so that a file opened since the scan stays).
        let stale: Vec<u64> = self
            .fds
            .keys()
            .flatten()
            .filter(|k| !found.contains_key(k))
            .filter(|k| {
                fd_target((k >> 32) as u32, (k & 0xffff_ffff) as u32).is_none_or(|t| !canon.contains_key(t.as_path()))
            })
            .collect();
        for k in &stale {
            let _ = self.fds.remove(k);
        }
        self.clear_stale_filter();
    }

    /// Clears filter slots no table entry needs. The kernel inserts its
    /// entry before it sets the slots, so reading the table again after
    /// clearing and setting what it needs cannot lose a slot for good.
    fn clear_stale_filter(&mut self) {
        let needed = |fds: &BpfHashMap<MapData, u64, FileVal>| -> (BTreeSet<usize>, BTreeSet<usize>) {
            let keys: Vec<u64> = fds.keys().flatten().collect();
            (
                keys.iter().map(|k| (k >> 32) as usize % PID_SLOTS).collect(),
                keys.iter().map(|k| (k & 0xffff_ffff) as usize % FD_SLOTS).collect(),
            )
        };
        let (pids, fds) = needed(&self.fds);
        let (set_pids, set_fds) = self.filter.set_slots();
        if set_pids.is_subset(&pids) && set_fds.is_subset(&fds) {
            return;
        }
        use std::sync::atomic::Ordering::SeqCst;
        for p in set_pids.difference(&pids) {
            self.filter.byte(*p).store(0, SeqCst);
        }
        for f in set_fds.difference(&fds) {
            self.filter.byte(PID_SLOTS + *f).store(0, SeqCst);
        }
        for k in self.fds.keys().flatten().collect::<Vec<_>>() {
            self.filter.mark(k);
        }
    }

    /// The hooks' run statistics (one entry: every program together).
    pub fn program_stats(&self) -> Option<super::tcp_lifecycle::ProgramStats> {
        if self.links.is_empty() {
            return None;
        }
        super::tcp_lifecycle::ProgramStats::of("device_io", PROGRAMS.iter().map(|name| self.ebpf.program(name)))
    }

    /// Sums the per-CPU aggregates of every series handed out.
    pub fn read(&self) -> Result<DeviceReading, ProbeError> {
        let err = |e: aya::maps::MapError| ProbeError::Read(e.to_string());
        let label = |dev: u32| self.table.labels.get(dev as usize).cloned().unwrap_or_else(|| format!("device{dev}"));
        let mut out = DeviceReading::default();
        let mut names: HashMap<u32, (String, String)> = HashMap::new();
        for item in self.series.iter() {
            let (k, n) = item.map_err(err)?;
            if n == 0 || n as usize > MAX_SERIES {
                continue;
            }
            let (device, process) = (label(k.dev), comm_str(&k.comm));
            for op in Op::ALL {
                let per_cpu = self.agg.get(&((n - 1) * OPS as u32 + op as u32), 0).map_err(err)?;
                let t = super::OpAgg::total(per_cpu.iter());
                let s = DeviceSeries {
                    device: device.clone(),
                    op,
                    process: process.clone(),
                    ops: t.ops,
                    bytes: t.bytes,
                    errors: t.errors,
                    sum_us: t.sum_us,
                    buckets: t.buckets,
                };
                if s.ops > 0 {
                    out.series.push(s);
                }
            }
            names.insert(n, (device, process));
        }
        for item in self.errs.iter() {
            let (k, per_cpu) = item.map_err(err)?;
            let (Some(op), Some((device, process))) = (Op::from_raw(k.op), names.get(&k.series)) else { continue };
            out.errors.push(DeviceErrors {
                device: device.clone(),
                op,
                process: process.clone(),
                errno: k.err as i32,
                count: per_cpu.iter().sum(),
            });
        }
        out.series.sort_by(|a, b| (&a.device, a.op, &a.process).cmp(&(&b.device, b.op, &b.process)));
        out.errors.sort_by(|a, b| (&a.device, a.op, &a.process, a.errno).cmp(&(&b.device, b.op, &b.process, b.errno)));
        let stat = |i: u32| -> Result<u64, ProbeError> { Ok(self.stats.get(&i, 0).map_err(err)?.iter().sum()) };
        out.fds_full = stat(STAT_FDS_FULL)?;
        out.inflight_full = stat(STAT_INFLIGHT_FULL)?;
        out.series_full = stat(STAT_AGG_FULL)?;
        out.errors_full = stat(STAT_ERRS_FULL)?;
        out.files_from_open = stat(STAT_FDS_ADDED)?;
        out.stale_records = stat(STAT_STALE)?;
        out.spilled = stat(STAT_SPILLED)?;
        out.bytes_lost = stat(STAT_BYTES_LOST)?;
        out.bytes_cut = stat(STAT_BYTES_CUT)?;
        out.files_from_scan = self.files_from_scan;
        out.files_open = self.fds.keys().count() as u64;
        out.devices_present = self.table.names.values().collect::<BTreeSet<_>>().len() as u64;
        out.devices_over_cap = self.table.over_cap.len() as u64;
        Ok(out)
    }
}

impl DeviceIoProbe {
    /// A descriptor readable when serial byte events wait.
    pub fn bytes_fd(&self) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        if self.capture_globs.is_empty() {
            return None;
        }
        self.bytes.as_fd().try_clone_to_owned().ok()
    }

    /// Hands every waiting serial byte event to `f`.
    pub fn drain_bytes(&mut self, mut f: impl FnMut(&BytesEvent)) {
        let labels = &self.table.labels;
        while let Some(item) = self.bytes.next() {
            let b: &[u8] = &item;
            if b.len() < BYTES_EVENT {
                continue;
            }
            let dev = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]) as usize;
            let len = usize::from(u16::from_ne_bytes([b[16], b[17]])).min(BYTES);
            let Some(device) = labels.get(dev) else { continue };
            f(&BytesEvent {
                ts_ns: u64::from_ne_bytes(b[0..8].try_into().unwrap_or_default()),
                device,
                tgid: u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
                written: b[18] == Op::Write as u8,
                data: &b[24..24 + len],
            });
        }
    }
}

/// 1 + the series number of (dev, comm), handed out here if the kernel
/// has not yet; 0 when every number is taken.
fn series_of(
    series: &mut BpfHashMap<MapData, SeriesKey, u32>,
    free: &mut Queue<MapData, u32>,
    dev: u32,
    comm: [u8; COMM_LEN],
) -> u32 {
    let key = SeriesKey { dev, comm };
    if let Ok(n) = series.get(&key, 0) {
        return n;
    }
    let Ok(n) = free.pop(0) else { return 0 };
    // BPF_NOEXIST: a racing insert by a program wins (n goes back).
    if series.insert(key, n, 1).is_ok() {
        return n;
    }
    let _ = free.push(n, 0);
    series.get(&key, 0).unwrap_or(0)
}

impl Drop for DeviceIoProbe {
    fn drop(&mut self) {
        self.detach();
    }
}

/// A label value fits the wire format (at most MAX_LABEL_VALUE bytes): a
/// longer path keeps its end, which names the device.
pub(crate) fn fit_label(s: &str) -> String {
    let max = edge_wire::MAX_LABEL_VALUE;
    if s.len() <= max {
        return s.to_string();
    }
    let mut start = s.len() - (max - 3);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

fn path_key(p: &Path) -> Option<PathKey> {
    let b = p.as_os_str().as_bytes();
    if b.len() >= PATH_MAX {
        return None;
    }
    let mut k = [0u8; PATH_MAX];
    k[..b.len()].copy_from_slice(b);
    Some(PathKey(k))
}

/// The symbolic name of an errno ("EIO"), or `"E<n>"` for the rare ones.
pub fn errno_name(e: i32) -> String {
    let known = [
        (libc::EPERM, "EPERM"),
        (libc::ENOENT, "ENOENT"),
        (libc::EINTR, "EINTR"),
        (libc::EIO, "EIO"),
        (libc::ENXIO, "ENXIO"),
        (libc::EBADF, "EBADF"),
        (libc::EAGAIN, "EAGAIN"),
        (libc::ENOMEM, "ENOMEM"),
        (libc::EACCES, "EACCES"),
        (libc::EFAULT, "EFAULT"),
        (libc::EBUSY, "EBUSY"),
        (libc::ENODEV, "ENODEV"),
        (libc::EINVAL, "EINVAL"),
        (libc::ENOTTY, "ENOTTY"),
        (libc::ENOSPC, "ENOSPC"),
        (libc::EPIPE, "EPIPE"),
        (libc::ERANGE, "ERANGE"),
        (libc::ENOSYS, "ENOSYS"),
        (libc::ENODATA, "ENODATA"),
        (libc::ETIME, "ETIME"),
        (libc::EPROTO, "EPROTO"),
        (libc::EOVERFLOW, "EOVERFLOW"),
        (libc::EOPNOTSUPP, "EOPNOTSUPP"),
        (libc::ETIMEDOUT, "ETIMEDOUT"),
        (libc::EREMOTEIO, "EREMOTEIO"),
        (libc::ESHUTDOWN, "ESHUTDOWN"),
        (libc::ECOMM, "ECOMM"),
        (libc::ENOLINK, "ENOLINK"),
        (libc::ERESTART, "ERESTART"),
    ];
    known.iter().find(|(n, _)| *n == e).map_or_else(|| format!("E{e}"), |(_, s)| s.to_string())
}

impl super::Probe for DeviceIoProbe {
    const NAME: &'static str = super::DEVICE_IO;
    type Config = DevicesConfig;
    type Reading = DeviceReading;
    type Metrics = metrics::DeviceMetrics;
    type Seen = ();

    fn enabled(cfg: &crate::config::Config) -> bool {
        cfg.probes.devices.enabled
    }

    fn not_loaded(_: &crate::config::Config, why: &ProbeState) -> Vec<(&'static str, ProbeState)> {
        vec![(super::DEVICE_IO, why.clone())]
    }

    fn start(cfg: &crate::config::Config, _: &super::Probes) -> Result<Self, ProbeError> {
        let rtu = cfg.tag_map().unwrap_or_default().rtu_devices();
        DeviceIoProbe::load_capturing(&tracefs::ensure_mounted()?, &cfg.probes.devices, &rtu)
    }

    fn states(&self) -> Vec<(&'static str, ProbeState)> {
        vec![(super::DEVICE_IO, self.state.clone())]
    }

    fn program_stats(&self) -> Vec<super::tcp_lifecycle::ProgramStats> {
        DeviceIoProbe::program_stats(self).into_iter().collect()
    }

    fn refresh(&mut self) -> bool {
        let before = self.state.clone();
        DeviceIoProbe::refresh(self);
        self.state != before
    }

    fn reading(&self) -> Result<DeviceReading, ProbeError> {
        self.read()
    }

    fn register(metrics: &metrics::DeviceMetrics, registry: &mut prometheus_client::registry::Registry) {
        metrics.register(registry);
    }

    fn observe(&mut self, reading: &DeviceReading, metrics: &metrics::DeviceMetrics) {
        metrics.observe(reading);
    }

    fn series(reading: &DeviceReading, _: &mut (), out: &mut super::series::Samples) {
        series::series(reading, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_the_c_header() {
        let h = include_str!("../../../ebpf/include/device_io.h");
        let def = |name: &str| crate::probe::header_define(h, name);
        assert_eq!(def("DIO_OPS"), OPS);
        assert_eq!(def("DIO_OP_READ"), Op::Read as usize);
        assert_eq!(def("DIO_OP_WRITE"), Op::Write as usize);
        assert_eq!(def("DIO_OP_IOCTL"), Op::Ioctl as usize);
        assert_eq!(def("DIO_OP_OPEN"), Op::Open as usize);
        assert_eq!(def("DIO_OP_DUP"), OPS);
        assert_eq!(def("DIO_BUCKETS"), BUCKETS);
        assert_eq!(def("DIO_COMM_LEN"), COMM_LEN);
        assert_eq!(def("DIO_PATH_MAX"), PATH_MAX);
        assert_eq!(def("DIO_MAX_DEVICES"), MAX_DEVICES);
        assert_eq!(def("DIO_MAX_PATHS"), MAX_PATHS);
        assert_eq!(def("DIO_MAX_FDS"), MAX_FDS);
        assert_eq!(def("DIO_MAX_SERIES"), MAX_SERIES);
        assert_eq!(def("DIO_PID_SLOTS"), PID_SLOTS);
        assert_eq!(def("DIO_FD_SLOTS"), FD_SLOTS);
        assert_eq!(def("DIO_TID_SLOTS"), TID_SLOTS);
        assert_eq!(def("DIO_STAT_FDS_FULL"), STAT_FDS_FULL as usize);
        assert_eq!(def("DIO_STAT_INFLIGHT_FULL"), STAT_INFLIGHT_FULL as usize);
        assert_eq!(def("DIO_STAT_AGG_FULL"), STAT_AGG_FULL as usize);
        assert_eq!(def("DIO_STAT_ERRS_FULL"), STAT_ERRS_FULL as usize);
        assert_eq!(def("DIO_STAT_FDS_ADDED"), STAT_FDS_ADDED as usize);
        assert_eq!(def("DIO_STAT_STALE"), STAT_STALE as usize);
        assert_eq!(def("DIO_STAT_SPILLED"), STAT_SPILLED as usize);
        assert_eq!(def("DIO_STAT_BYTES_LOST"), STAT_BYTES_LOST as usize);
        assert_eq!(def("DIO_STAT_BYTES_CUT"), STAT_BYTES_CUT as usize);
        assert_eq!(def("DIO_STATS"), STATS);
        assert_eq!(def("DIO_BYTES"), BYTES);
        assert_eq!(def("DIO_REC_MAX"), REC_MAX as usize);
    }

    fn layout(field: &str, offset: u32) -> Layout {
        Layout::parse(&format!("\tfield:unsigned int {field};\toffset:{offset};\tsize:8;\tsigned:0;\n"))
    }

    #[test]
    fn offsets_come_from_the_format_files_and_must_agree() {
        let all: Vec<(Hook, Layout)> = HOOKS.iter().map(|h| (*h, layout(h.field, 16))).collect();
        let mut g = layout_globals(&all).unwrap();
        g.sort();
        assert_eq!(g, [("off_fd", 16), ("off_filename", 16), ("off_nr", 0), ("off_oldfd", 16), ("off_ret", 16)]);

        // The call's number: checked at exit when every record has it at
        // the same place, as every kernel's have (at 8).
        let nr = |h: &Hook, at: u32| {
            Layout::parse(&format!(
                "\tfield:int __syscall_nr;\toffset:{at};\tsize:4;\tsigned:1;\n\
                 \tfield:unsigned int {};\toffset:16;\tsize:8;\tsigned:0;\n",
                h.field
            ))
        };
        let with_nr: Vec<(Hook, Layout)> = HOOKS.iter().map(|h| (*h, nr(h, 8))).collect();
        assert!(layout_globals(&with_nr).unwrap().contains(&("off_nr", 8)));
        let mut one_differs = with_nr.clone();
        one_differs[5].1 = nr(&HOOKS[5], 12);
        assert!(layout_globals(&one_differs).unwrap().contains(&("off_nr", 0)));

        // A PREEMPT_RT-style shift applies to every call alike.
        let shifted: Vec<(Hook, Layout)> = HOOKS.iter().map(|h| (*h, layout(h.field, 24))).collect();
        assert!(layout_globals(&shifted).unwrap().contains(&("off_fd", 24)));

        let mut mixed = all.clone();
        mixed[3].1 = layout("fd", 24);
        let e = layout_globals(&mixed).unwrap_err();
        assert!(e.contains("sys_enter_write") && e.contains("16"), "{e}");

        let mut missing = all;
        missing[0].1 = layout("count", 16);
        assert!(layout_globals(&missing).unwrap_err().contains("field fd missing"));
    }

    #[test]
    fn globs_resolve_to_devices_with_all_their_names() {
        let dir = std::env::temp_dir().join(format!("dio-resolve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ttyX0"), "").unwrap();
        std::fs::write(dir.join("ttyX1"), "").unwrap();
        std::os::unix::fs::symlink(dir.join("ttyX1"), dir.join("ttyLINK")).unwrap();
        std::fs::create_dir(dir.join("ttyXdir")).unwrap();
        let pats = [format!("{}/ttyX*", dir.display()), format!("{}/ttyLINK", dir.display())];
        let r = resolve(&pats);
        assert_eq!(r.len(), 2, "{r:?}");
        let x1 = &r[&dir.join("ttyX1")];
        assert_eq!(x1.0, dir.join("ttyX1").display().to_string());
        assert!(x1.1.contains(&dir.join("ttyLINK")));
        std::fs::remove_file(dir.join("ttyX0")).unwrap();
        assert_eq!(resolve(&pats).len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(libc::EAGAIN), "EAGAIN");
        assert_eq!(errno_name(libc::EIO), "EIO");
        assert_eq!(errno_name(4095), "E4095");
    }

    #[test]
    fn comm_round_trip() {
        assert_eq!(comm_str(&comm_bytes("modbus-reader")), "modbus-reader");
        assert_eq!(comm_str(&comm_bytes("a-very-long-process-name")), "a-very-long-pro");
        assert_eq!(comm_str(&[0; COMM_LEN]), "unknown");
    }
}
