//! Probe stage: kernel programs and the in-kernel aggregates they keep.
//! Each probe reports whether it is attached, and why not.

pub mod buses;
pub mod config;
pub mod device_io;
pub mod loader;
pub mod metrics;
pub mod protocols;
pub mod tcp_idle;
pub mod tcp_lifecycle;
pub mod tracefs;

use crate::config::Config;
use buses::{BusReading, BusesProbe};
use device_io::{DeviceIoProbe, DeviceReading};
use protocols::{ProtocolReading, ProtocolsProbe};
use tcp_lifecycle::{TcpCounters, TcpLifecycleProbe};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Tracefs(#[from] tracefs::TracefsError),
    #[error("tracepoint {tracepoint} has a layout this probe cannot read: {message}")]
    Layout { tracepoint: String, message: String },
    #[error("loading the eBPF program failed (needs root or CAP_BPF+CAP_PERFMON): {0}")]
    Load(String),
    #[error("attaching the eBPF program failed: {0}")]
    Attach(String),
    #[error("reading the probe's maps failed: {0}")]
    Read(String),
}

/// Whether a probe runs, for `/metrics` and the logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeState {
    Attached,
    Disabled,
    /// Loaded but not attached, and why (nothing to watch yet).
    Waiting(String),
    Unavailable(String),
}

/// All probes of the agent. Owns the kernel objects.
pub struct Probes {
    pub tcp: Option<TcpLifecycleProbe>,
    pub devices: Option<DeviceIoProbe>,
    pub protocols: Option<ProtocolsProbe>,
    pub buses: Option<BusesProbe>,
    /// Every probe (tracepoint program) by name, for `/metrics`.
    pub states: Vec<(&'static str, ProbeState)>,
    /// The idle limit (ms) when the idle-connection census runs: with the
    /// TCP probe, `idle_secs` > 0, and socket diagnostics working.
    census_idle_ms: Option<u64>,
    /// Keeps the kernel's BPF run-time statistics on while the probes live
    /// (`probes.program_stats`; None: off, or refused before 5.8).
    _stats_on: Option<std::os::fd::OwnedFd>,
    /// `probes.program_stats`: for a probe attached later (bus families).
    program_stats: bool,
}

/// One reading of every attached probe.
#[derive(Debug, Clone, Default)]
pub struct ProbeReading {
    pub tcp: Option<TcpCounters>,
    pub devices: Option<DeviceReading>,
    pub protocols: Option<ProtocolReading>,
    pub buses: Option<BusReading>,
    /// Established and idle connections now (with the TCP probe).
    pub tcp_idle: Option<tcp_idle::IdleCensus>,
}

impl Probes {
    /// No probes (between a detach and the next attach).
    pub fn none() -> Probes {
        Probes {
            tcp: None,
            devices: None,
            protocols: None,
            buses: None,
            states: Vec::new(),
            census_idle_ms: None,
            _stats_on: None,
            program_stats: false,
        }
    }

    /// Attaches what the config enables. A probe that cannot attach is
    /// reported unavailable with the reason; the agent runs on without it.
    pub fn start(cfg: &Config) -> Probes {
        raise_memlock_limit();
        // Logged for the record: no program needs it (docs/probes.md).
        let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
        tracing::info!(kernel_btf = btf, "loading probes (kernel BTF is never used)");

        let mut set = Probes::none();
        let mut states = Vec::new();
        set.tcp = start(cfg, &set, &mut states);
        set.devices = start(cfg, &set, &mut states);
        // The idle census: with the TCP probe, when socket diagnostics work.
        let census = if set.tcp.is_none() || cfg.probes.tcp_lifecycle.idle_secs == 0 {
            ProbeState::Disabled
        } else {
            match tcp_idle::dump() {
                Ok(_) => ProbeState::Attached,
                Err(e) => ProbeState::Unavailable(format!("socket diagnostics (NETLINK_SOCK_DIAG) dump failed: {e}")),
            }
        };
        let census_idle_ms = (census == ProbeState::Attached).then_some(cfg.probes.tcp_lifecycle.idle_secs * 1000);
        states.push((TCP_IDLE, census));
        set.protocols = start(cfg, &set, &mut states);
        set.buses = start(cfg, &set, &mut states);
        for (name, st) in &states {
            if let ProbeState::Unavailable(why) = st {
                tracing::warn!(probe = name, reason = %why, "probe unavailable");
            }
        }
        // Statistics only while some program of ours is loaded.
        let loaded = set.tcp.is_some() || set.devices.is_some() || set.protocols.is_some() || set.buses.is_some();
        let stats_on = (cfg.probes.program_stats && loaded).then(enable_stats).flatten();
        release_loader_memory();
        Probes { states, census_idle_ms, _stats_on: stats_on, program_stats: cfg.probes.program_stats, ..set }
    }

    /// Once per window, before [`Probes::read`]: lets the device probe
    /// follow devices that appeared or vanished, and the bus probe attach
    /// families whose tracepoints appeared. Returns whether any
    /// probe's state changed.
    pub fn refresh(&mut self) -> bool {
        let mut changed = false;
        if let Some(b) = self.buses.as_mut() {
            match b.should_reload().then(|| b.reload()).transpose() {
                Ok(None) => {}
                Ok(Some(new)) => {
                    tracing::info!(probes = ?new.states, "bus tracepoints appeared: bus probes attached again");
                    for (name, state) in &new.states {
                        if let Some(slot) = self.states.iter_mut().find(|(n, _)| n == name) {
                            slot.1 = state.clone();
                        }
                    }
                    *b = new;
                    changed = true;
                    if self.program_stats && self._stats_on.is_none() {
                        self._stats_on = enable_stats();
                    }
                }
                Err(e) => tracing::warn!(error = %e, "bus probes not reloaded"),
            }
        }
        let Some(d) = self.devices.as_mut() else { return changed };
        d.refresh();
        let Some(slot) = self.states.iter_mut().find(|(n, _)| *n == DEVICE_IO) else { return changed };
        if slot.1 == d.state {
            return changed;
        }
        slot.1 = d.state.clone();
        true
    }

    pub fn read(&self) -> ProbeReading {
        let tcp = self.tcp.as_ref().and_then(|p| usable("tcp_lifecycle", p.read()));
        let devices = self.devices.as_ref().and_then(|p| usable(DEVICE_IO, p.read()));
        let protocols = self.protocols.as_ref().and_then(|p| usable(protocols::PROBE, p.read()));
        let buses = self.buses.as_ref().and_then(|p| usable("buses", p.read()));
        let tcp_idle = self.tcp.as_ref().zip(self.census_idle_ms).and_then(|(p, idle_ms)| {
            let (conns, listening) = usable(TCP_IDLE, tcp_idle::dump().map_err(|e| ProbeError::Read(e.to_string())))?;
            Some(tcp_idle::census(&conns, &listening, p.classes(), idle_ms))
        });
        ProbeReading { tcp, devices, protocols, buses, tcp_idle }
    }

    /// Run count and time of every attached program, by probe.
    pub fn program_stats(&self) -> Vec<tcp_lifecycle::ProgramStats> {
        let mut s = Vec::new();
        s.extend(self.tcp.iter().flat_map(Probe::program_stats));
        s.extend(self.devices.iter().flat_map(Probe::program_stats));
        s.extend(self.protocols.iter().flat_map(Probe::program_stats));
        s.extend(self.buses.iter().flat_map(Probe::program_stats));
        s
    }
}

/// What the probe set needs of each probe: when it runs, how it starts,
/// what it reports. A probe's reading stays its own type (the window stage
/// reads it).
pub trait Probe: Sized {
    /// Whether the config turns it on.
    fn enabled(cfg: &Config) -> bool;
    /// Its programs' names and states while it is not loaded (off: every
    /// one `Disabled`; failed: `why`).
    fn not_loaded(cfg: &Config, why: &ProbeState) -> Vec<(&'static str, ProbeState)>;
    /// Loads and attaches it; `started` holds the probes started before
    /// it (the protocol probe counts bytes by the TCP probe's classes).
    fn start(cfg: &Config, started: &Probes) -> Result<Self, ProbeError>;
    /// Its programs' states once loaded.
    fn states(&self) -> Vec<(&'static str, ProbeState)>;
    /// Run count and time of its attached programs.
    fn program_stats(&self) -> Vec<tcp_lifecycle::ProgramStats>;
}

/// Starts `P` when the config enables it; its states go into `states`.
fn start<P: Probe>(cfg: &Config, started: &Probes, states: &mut Vec<(&'static str, ProbeState)>) -> Option<P> {
    if !P::enabled(cfg) {
        states.extend(P::not_loaded(cfg, &ProbeState::Disabled));
        return None;
    }
    match P::start(cfg, started) {
        Ok(p) => {
            states.extend(p.states());
            Some(p)
        }
        Err(e) => {
            states.extend(P::not_loaded(cfg, &ProbeState::Unavailable(e.to_string())));
            None
        }
    }
}

impl Probe for TcpLifecycleProbe {
    fn enabled(cfg: &Config) -> bool {
        cfg.probes.tcp_lifecycle.enabled
    }

    fn not_loaded(cfg: &Config, why: &ProbeState) -> Vec<(&'static str, ProbeState)> {
        let peers = if cfg.probes.tcp_lifecycle.peers.is_empty() { ProbeState::Disabled } else { why.clone() };
        tcp_lifecycle::TRACEPOINTS
            .iter()
            .map(|t| (t.probe, why.clone()))
            .chain(std::iter::once((tcp_lifecycle::PEERS_PROBE, peers)))
            .collect()
    }

    fn start(cfg: &Config, _: &Probes) -> Result<Self, ProbeError> {
        let p = TcpLifecycleProbe::attach(&tracefs::ensure_mounted()?, &cfg.probes.tcp_lifecycle)?;
        let attached: Vec<&str> =
            p.states.iter().filter(|(_, s)| *s == ProbeState::Attached).map(|(n, _)| *n).collect();
        tracing::info!(probes = ?attached, "TCP probes attached");
        Ok(p)
    }

    fn states(&self) -> Vec<(&'static str, ProbeState)> {
        self.states.clone()
    }

    fn program_stats(&self) -> Vec<tcp_lifecycle::ProgramStats> {
        TcpLifecycleProbe::program_stats(self)
    }
}

impl Probe for DeviceIoProbe {
    fn enabled(cfg: &Config) -> bool {
        cfg.probes.devices.enabled
    }

    fn not_loaded(_: &Config, why: &ProbeState) -> Vec<(&'static str, ProbeState)> {
        vec![(DEVICE_IO, why.clone())]
    }

    fn start(cfg: &Config, _: &Probes) -> Result<Self, ProbeError> {
        let rtu = cfg.tag_map().unwrap_or_default().rtu_devices();
        DeviceIoProbe::load_capturing(&tracefs::ensure_mounted()?, &cfg.probes.devices, &rtu)
    }

    fn states(&self) -> Vec<(&'static str, ProbeState)> {
        vec![(DEVICE_IO, self.state.clone())]
    }

    fn program_stats(&self) -> Vec<tcp_lifecycle::ProgramStats> {
        DeviceIoProbe::program_stats(self).into_iter().collect()
    }
}

impl Probe for ProtocolsProbe {
    fn enabled(cfg: &Config) -> bool {
        cfg.probes.protocols.enabled
    }

    fn not_loaded(_: &Config, why: &ProbeState) -> Vec<(&'static str, ProbeState)> {
        vec![(protocols::PROBE, why.clone())]
    }

    fn start(cfg: &Config, started: &Probes) -> Result<Self, ProbeError> {
        // The TCP probe's port classes, for TCP payload bytes: counted only
        // when the TCP probe runs (the window labels them with its classes).
        let tags = cfg.tag_map().unwrap_or_default();
        let p =
            ProtocolsProbe::attach(&cfg.probes.protocols, started.tcp.as_ref().map(TcpLifecycleProbe::classes), &tags)?;
        tracing::info!(cgroup = %p.cgroup.display(), "protocol probe attached");
        Ok(p)
    }

    fn states(&self) -> Vec<(&'static str, ProbeState)> {
        vec![(protocols::PROBE, ProbeState::Attached)]
    }

    fn program_stats(&self) -> Vec<tcp_lifecycle::ProgramStats> {
        ProtocolsProbe::program_stats(self)
    }
}

impl Probe for BusesProbe {
    fn enabled(cfg: &Config) -> bool {
        cfg.probes.buses.enabled
    }

    fn not_loaded(_: &Config, why: &ProbeState) -> Vec<(&'static str, ProbeState)> {
        buses::Kind::ALL.iter().map(|k| (k.probe(), why.clone())).collect()
    }

    fn start(cfg: &Config, _: &Probes) -> Result<Self, ProbeError> {
        let rescan = std::time::Duration::from_secs(cfg.probes.devices.rescan_secs);
        BusesProbe::attach(&tracefs::ensure_mounted()?, &cfg.probes.buses, rescan)
    }

    fn states(&self) -> Vec<(&'static str, ProbeState)> {
        self.states.clone()
    }

    fn program_stats(&self) -> Vec<tcp_lifecycle::ProgramStats> {
        BusesProbe::program_stats(self)
    }
}

/// The kernel's BPF run-time statistics, on while the descriptor lives.
fn enable_stats() -> Option<std::os::fd::OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .inspect_err(|e| {
            tracing::warn!(error = %e, "no BPF run-time statistics (kernel before 5.8, or CAP_SYS_ADMIN given up with root)")
        })
        .ok()
}

/// `recursion_misses` of a loaded program, from `/proc/self/fdinfo` (5.12+):
/// how often the kernel skipped it because a BPF program (ours or anyone's)
/// was already running on that CPU, e.g. a retransmit timer's softirq
/// arriving while a syscall tracepoint program ran. None when the kernel
/// does not say.
fn recursion_misses(fd: std::os::fd::BorrowedFd<'_>) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    fdinfo_field(&info, "recursion_misses")
}

fn fdinfo_field(info: &str, name: &str) -> Option<u64> {
    info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
}

/// The value of `#define name <number>` in a C header of ebpf/include
/// (tests: the Rust mirrors of the kernel side's constants).
#[cfg(test)]
pub(crate) fn header_define(header: &str, name: &str) -> usize {
    header
        .lines()
        .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in header"))
}

/// Buckets of the device and bus programs' latency histograms (log2 of
/// microseconds).
pub const AGG_BUCKETS: usize = 24;

/// One operation's cumulative aggregate as the device and bus programs
/// keep it per CPU (`struct dio_agg`, `struct bus_agg`: the same layout):
/// count, bytes, errors, latency sum and log2 histogram in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub(crate) struct OpAgg {
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    pub sum_us: u64,
    pub buckets: [u64; AGG_BUCKETS],
}
// SAFETY: plain old data laid out as struct dio_agg / struct bus_agg.
unsafe impl aya::Pod for OpAgg {}

impl OpAgg {
    /// The sum of the per-CPU values.
    pub(crate) fn total<'a>(per_cpu: impl IntoIterator<Item = &'a OpAgg>) -> OpAgg {
        let mut t = OpAgg::default();
        for v in per_cpu {
            t.ops += v.ops;
            t.bytes += v.bytes;
            t.errors += v.errors;
            t.sum_us += v.sum_us;
            for (a, b) in t.buckets.iter_mut().zip(v.buckets) {
                *a += b;
            }
        }
        t
    }
}

/// A BPF array created with `BPF_F_MMAPABLE`, mapped into the agent's
/// memory (shared with the kernel programs); unmapped on drop.
pub(crate) struct MappedArray {
    ptr: *mut u8,
    len: usize,
}

impl MappedArray {
    /// Maps the first `bytes` of `map` (rounded up to pages, as the kernel
    /// requires); `what` names it in the error.
    pub(crate) fn map(map: &aya::maps::MapData, bytes: usize, writable: bool, what: &str) -> Result<Self, ProbeError> {
        use std::os::fd::{AsFd, AsRawFd};
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = bytes.div_ceil(page) * page;
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: maps `len` bytes of an mmapable BPF array's descriptor;
        // unmapped exactly so in Drop.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(ProbeError::Load(format!(
                "mmap of the {what} map failed: {} (kernel before 5.5?)",
                std::io::Error::last_os_error()
            )));
        }
        Ok(MappedArray { ptr: ptr.cast(), len })
    }

    /// The mapping's start; `len()` bytes are valid while `self` lives.
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `map` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A probe's reading for this window, or `None` (logged) when it failed.
fn usable<T>(probe: &str, r: Result<T, ProbeError>) -> Option<T> {
    r.inspect_err(|e| tracing::warn!(probe, error = %e, "read failed; window skipped")).ok()
}

/// The idle-connection census's name in `edge_agent_probe_attached{probe}`.
pub const TCP_IDLE: &str = "tcp_idle";

/// The device-file probe's name in `edge_agent_probe_attached{probe}`.
pub const DEVICE_IO: &str = "device_io";

/// aya 0.14's loader parses the kernel's whole BTF (several MB, in many
/// small allocations) even for programs that need none, once per probe, and
/// frees it at once. glibc keeps such freed heap mapped (seen on the riscv64
/// board: 23 MiB resident afterwards instead of 5); hand it back to the
/// system. musl returns it by itself.
fn release_loader_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK (Jetson's 5.10).
fn raise_memlock_limit() {
    let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &lim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK: {}", std::io::Error::last_os_error());
    }
}

/// `edge-agent probes`: the kernel's facts, then every probe attached (and
/// detached again) with its state and, when unavailable, the reason.
pub fn report(cfg: &Config) -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
    let mut out = format!(
        "kernel {}, BTF {} (not needed: the programs read tracefs layouts)\n",
        release.trim(),
        if btf { "present" } else { "absent" }
    );
    match tracefs::ensure_mounted() {
        Ok(root) => out += &format!("tracefs at {}\n", root.display()),
        Err(e) => out += &format!("tracefs: {e}\n"),
    }
    let probes = Probes::start(cfg);
    out += &format!("{:<24} {:<36} state\n", "probe", "tracepoint");
    for (name, state) in &probes.states {
        let tp = tcp_lifecycle::TRACEPOINTS.iter().find(|t| t.probe == *name);
        let where_ = match tp {
            Some(t) => format!("{}:{}", t.group, t.event),
            None if *name == DEVICE_IO => "syscalls:sys_{enter,exit}_{read,...}".to_string(),
            None if *name == TCP_IDLE => "NETLINK_SOCK_DIAG (once per window)".to_string(),
            None if *name == tcp_lifecycle::PEERS_PROBE => "sock:inet_sock_set_state (addresses)".to_string(),
            None if *name == protocols::PROBE => match &probes.protocols {
                Some(p) => format!("cgroup_skb {}", p.cgroup.display()),
                None => "cgroup_skb (cgroup v2 root)".to_string(),
            },
            None => buses::tracepoints_of(name).unwrap_or_default(),
        };
        let state = match state {
            ProbeState::Attached => "attached".to_string(),
            ProbeState::Disabled => "disabled (config)".to_string(),
            ProbeState::Waiting(why) => format!("waiting: {why}"),
            ProbeState::Unavailable(why) => format!("unavailable: {why}"),
        };
        out += &format!("{name:<24} {where_:<36} {state}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::fdinfo_field;

    #[test]
    fn fdinfo_fields_are_read_by_exact_name() {
        // As a 6.x kernel prints a program's fdinfo.
        let info = "pos:\t0\nflags:\t02000002\nprog_type:\t5\nrun_time_ns:\t27110\nrun_cnt:\t14\n\
                    recursion_misses:\t3\nverified_insns:\t5150\n";
        assert_eq!(fdinfo_field(info, "recursion_misses"), Some(3));
        assert_eq!(fdinfo_field(info, "run_cnt"), Some(14));
        assert_eq!(fdinfo_field(info, "run"), None);
        // 5.10: no such line.
        assert_eq!(fdinfo_field("prog_type:\t5\nrun_cnt:\t0\n", "recursion_misses"), None);
    }
}
