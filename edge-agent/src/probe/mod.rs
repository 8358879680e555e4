//! Probe stage: kernel programs and the in-kernel aggregates they keep.
//! Each probe reports whether it is attached, and why not.
//!
//! A probe is one module: its kernel side's loader, its `[probes.<name>]`
//! section (`<name>/config.rs`), its window samples (`<name>/series.rs`),
//! its own metrics, and its [`Probe`] implementation; and one line in
//! [`probe_set!`]'s list at the end of this file, which makes the probe
//! set, its reading, its config section and its metrics from that list
//! (docs/probes.md, "Adding a probe").

pub mod buses;
pub mod config;
pub mod device_io;
pub mod loader;
pub mod metrics;
pub mod objects;
pub mod protocols;
pub mod series;
pub mod tcp_idle;
pub mod tcp_lifecycle;
pub mod tracefs;

use crate::config::Config;
use buses::BusesProbe;
use device_io::DeviceIoProbe;
use prometheus_client::registry::Registry;
use protocols::ProtocolsProbe;
use series::Samples;
use tcp_lifecycle::{ProgramStats, TcpLifecycleProbe};

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

/// Everything the agent knows of a probe goes through this interface:
/// when it runs, how it starts, what it reads each window, the samples and
/// metrics that reading makes. Its reading, metrics and config section are
/// its own types; the probe set holds one of each per probe.
pub trait Probe: Sized {
    /// Its name in the logs.
    const NAME: &'static str;
    /// Its sub-section of `[probes]`.
    type Config: config::Section;
    /// One window's reading of its in-kernel aggregates.
    type Reading: Clone + std::fmt::Debug;
    /// Its own metrics on `/metrics` (besides the probe set's).
    type Metrics: Clone + std::fmt::Debug + Default;
    /// What the window stage remembers of its series between windows.
    type Seen: std::fmt::Debug + Default;

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
    fn program_stats(&self) -> Vec<ProgramStats>;
    /// Once per window, before reading: follows what appeared or vanished
    /// (devices, bus tracepoints). True when its states changed.
    fn refresh(&mut self) -> bool {
        false
    }
    /// This window's reading.
    fn reading(&self) -> Result<Self::Reading, ProbeError>;
    fn register(metrics: &Self::Metrics, registry: &mut Registry);
    /// Moves its metrics to this window's reading.
    fn observe(&mut self, _reading: &Self::Reading, _metrics: &Self::Metrics) {}
    /// The window's samples from its reading.
    fn series(reading: &Self::Reading, seen: &mut Self::Seen, out: &mut Samples);
}

/// Starts `P` when the config enables it; its states go into the set's.
fn start<P: Probe>(cfg: &Config, set: &mut Probes) -> Option<P> {
    if !P::enabled(cfg) {
        set.states.extend(P::not_loaded(cfg, &ProbeState::Disabled));
        return None;
    }
    match P::start(cfg, set) {
        Ok(p) => {
            set.states.extend(p.states());
            Some(p)
        }
        Err(e) => {
            set.states.extend(P::not_loaded(cfg, &ProbeState::Unavailable(e.to_string())));
            None
        }
    }
}

/// Refreshes `p`; its states in `states` follow when they changed.
fn refresh<P: Probe>(p: &mut P, states: &mut [(&'static str, ProbeState)]) -> bool {
    if !p.refresh() {
        return false;
    }
    for (name, state) in p.states() {
        if let Some(slot) = states.iter_mut().find(|(n, _)| *n == name) {
            slot.1 = state;
        }
    }
    true
}

/// Makes the probe set from its list: `field: ProbeType` in start order
/// (a probe may look at those started before it). For each probe, a field
/// of [`Probes`], of [`ProbeReading`], of [`ProbesConfig`] (its section,
/// `[probes.<field>]`), of [`EachProbeMetrics`] and of [`SeenSeries`].
macro_rules! probe_set {
    ($($field:ident: $probe:ty),+ $(,)?) => {
        /// All probes of the agent. Owns the kernel objects.
        pub struct Probes {
            $(pub $field: Option<$probe>,)+
            /// Every probe (program) by name, for `/metrics`.
            pub states: Vec<(&'static str, ProbeState)>,
            /// Keeps the kernel's BPF run-time statistics on while the
            /// probes live (`probes.program_stats`; None: off, or refused
            /// before 5.8).
            stats_on: Option<std::os::fd::OwnedFd>,
            /// `probes.program_stats`: for a probe attached later.
            program_stats: bool,
        }

        /// One reading of every attached probe.
        #[derive(Debug, Clone, Default)]
        pub struct ProbeReading {
            $(pub $field: Option<<$probe as Probe>::Reading>,)+
        }

        /// The `[probes]` section: `program_stats` and each probe's own.
        #[derive(Debug, Clone, PartialEq, serde::Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct ProbesConfig {
            /// The kernel's BPF run-time statistics (`BPF_ENABLE_STATS`)
            /// while the agent runs: per-program run counts and run time in
            /// `edge_agent_probe_runs_total` / `_run_seconds_total`. They
            /// cost two clock reads per program run, for every BPF program
            /// on the box: about +130-200 ns on each system call the device
            /// probe hooks (BENCHMARKS.md). Turn off where the watched
            /// devices are busy.
            pub program_stats: bool,
            $(pub $field: <$probe as Probe>::Config,)+
        }

        impl Default for ProbesConfig {
            fn default() -> Self {
                ProbesConfig { program_stats: true, $($field: Default::default(),)+ }
            }
        }

        impl ProbesConfig {
            /// Each probe's section; errors name the key (`probes.…`).
            pub fn validate(&self) -> Result<(), String> {
                $(config::Section::validate(&self.$field)?;)+
                Ok(())
            }
        }

        /// Each probe's own metrics.
        #[derive(Clone, Debug, Default)]
        pub struct EachProbeMetrics {
            $(pub $field: <$probe as Probe>::Metrics,)+
        }

        impl EachProbeMetrics {
            pub fn register(&self, r: &mut Registry) {
                $(<$probe as Probe>::register(&self.$field, r);)+
            }
        }

        /// What the window stage remembers of each probe's series.
        #[derive(Debug, Default)]
        pub struct SeenSeries {
            $($field: <$probe as Probe>::Seen,)+
        }

        impl SeenSeries {
            /// Every probe's samples from its reading, in the list's order.
            pub fn series(&mut self, reading: &ProbeReading, out: &mut Samples) {
                $(if let Some(r) = &reading.$field {
                    <$probe as Probe>::series(r, &mut self.$field, out);
                })+
            }
        }

        impl Probes {
            /// No probes (between a detach and the next attach).
            pub fn none() -> Probes {
                Probes { $($field: None,)+ states: Vec::new(), stats_on: None, program_stats: false }
            }

            fn start_each(&mut self, cfg: &Config) {
                $(self.$field = start::<$probe>(cfg, self);)+
            }

            fn any_loaded(&self) -> bool {
                false $(|| self.$field.is_some())+
            }

            fn refresh_each(&mut self) -> bool {
                let mut changed = false;
                $(if let Some(p) = self.$field.as_mut() {
                    changed |= refresh(p, &mut self.states);
                })+
                changed
            }

            pub fn read(&self) -> ProbeReading {
                ProbeReading {
                    $($field: self.$field.as_ref().and_then(|p| usable(<$probe as Probe>::NAME, p.reading())),)+
                }
            }

            /// Each probe's metrics moved to this window's reading.
            pub fn observe(&mut self, reading: &ProbeReading, metrics: &EachProbeMetrics) {
                $(if let (Some(p), Some(r)) = (self.$field.as_mut(), &reading.$field) {
                    p.observe(r, &metrics.$field);
                })+
            }

            /// Run count and time of every attached program, by probe.
            pub fn program_stats(&self) -> Vec<ProgramStats> {
                let mut s = Vec::new();
                $(s.extend(self.$field.iter().flat_map(Probe::program_stats));)+
                s
            }
        }
    };
}

// The probe set, in start order.
probe_set! {
    tcp_lifecycle: TcpLifecycleProbe,
    devices: DeviceIoProbe,
    protocols: ProtocolsProbe,
    buses: BusesProbe,
}

impl Probes {
    /// Attaches what the config enables. A probe that cannot attach is
    /// reported unavailable with the reason; the agent runs on without it.
    pub fn start(cfg: &Config) -> Probes {
        raise_memlock_limit();
        // Logged for the record: no program needs it (docs/probes.md).
        let btf = std::path::Path::new("/sys/kernel/btf/vmlinux").exists();
        tracing::info!(kernel_btf = btf, "loading probes (kernel BTF is never used)");
        let mut set = Probes::none();
        set.start_each(cfg);
        for (name, st) in &set.states {
            if let ProbeState::Unavailable(why) = st {
                tracing::warn!(probe = name, reason = %why, "probe unavailable");
            }
        }
        // Statistics only while some program of ours is loaded.
        set.program_stats = cfg.probes.program_stats;
        set.stats_on = (set.program_stats && set.any_loaded()).then(enable_stats).flatten();
        // aya 0.14's loader parses BTF (several MB, in many small
        // allocations) and frees it at once: seen on the riscv64 board, 23
        // MiB resident afterwards instead of 5 until handed back.
        crate::release_free_heap();
        set
    }

    /// Once per window, before [`Probes::read`]: lets the probes follow
    /// what appeared or vanished (devices, bus tracepoints). Returns
    /// whether any probe's state changed.
    pub fn refresh(&mut self) -> bool {
        let changed = self.refresh_each();
        if changed && self.program_stats && self.stats_on.is_none() && self.any_loaded() {
            self.stats_on = enable_stats();
        }
        changed
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
