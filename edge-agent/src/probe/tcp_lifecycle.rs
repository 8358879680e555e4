//! User-space side of `ebpf/src/tcp_lifecycle.bpf.c`: fills in the four
//! tracepoints' layouts, loads and attaches the programs, writes the port
//! classes, and reads the in-kernel counters and histograms once per window.

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::{Program, TracePoint};
use aya::Ebpf;
use std::os::fd::AsFd;
use std::path::Path;

use super::tracefs::{self, Layout};
use super::{ProbeError, ProbeState};
pub use config::TcpLifecycleConfig;
use std::sync::Arc;

pub mod config;
pub mod metrics;
pub mod series;

pub(crate) static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tcp_lifecycle.bpf.o"));

// Mirrors ebpf/include/tcp_lifecycle.h (a test below checks they agree).
pub const KINDS: usize = 9;
pub const DIRS: usize = 3;
pub const CLASSES: usize = 16;
pub const SLOTS: usize = DIRS * CLASSES;
pub const COUNTERS: usize = KINDS * DIRS * CLASSES;
pub const HISTS: usize = 4;
pub const BUCKETS: usize = 24;
pub const HIST_SLOTS: usize = HISTS * 2 * CLASSES;
/// Peer groups (0 is "other") and the counters kept per (direction, group).
pub const PEERS: usize = 16;
pub const PEER_KINDS: usize = 4;
pub const PEER_SLOTS: usize = 2 * PEERS;
/// The peer allowlist's state in `edge_agent_probe_attached{probe}`.
pub const PEERS_PROBE: &str = "tcp_peers";
const STAT_SOCK_MAP_FULL: u32 = 0;
const STAT_SOCKS_ADDED: u32 = 1;
const STAT_SOCKS_REMOVED: u32 = 2;
/// Capacity of the kernel's connection map (TCPL_MAX_SOCKS).
pub const MAX_SOCKS: u64 = 65536;
const REC_MAX: usize = 160;

/// The tracepoints, each with its program. The first is the baseline:
/// without it the probe is unavailable; the others report on their own.
pub const TRACEPOINTS: [Tracepoint; 6] = [
    Tracepoint { probe: "tcp_lifecycle", group: "sock", event: "inet_sock_set_state", program: "tcp_lifecycle" },
    Tracepoint { probe: "tcp_retransmits", group: "tcp", event: "tcp_retransmit_skb", program: "tcp_retransmit" },
    Tracepoint {
        probe: "tcp_synack_retransmits",
        group: "tcp",
        event: "tcp_retransmit_synack",
        program: "tcp_retransmit_synack",
    },
    Tracepoint { probe: "tcp_resets_received", group: "tcp", event: "tcp_receive_reset", program: "tcp_receive_reset" },
    Tracepoint { probe: "tcp_rtt", group: "tcp", event: "tcp_probe", program: "tcp_rtt" },
    Tracepoint { probe: "tcp_resets_sent", group: "tcp", event: "tcp_send_reset", program: "tcp_send_reset" },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracepoint {
    /// Name in `edge_agent_probe_attached{probe}`.
    pub probe: &'static str,
    pub group: &'static str,
    pub event: &'static str,
    pub program: &'static str,
}

/// What happened to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Opened = 0,
    Failed = 1,
    Closed = 2,
    Refused = 3,
    Retransmits = 4,
    ResetsSent = 5,
    ResetsReceived = 6,
    /// Entered CLOSE_WAIT (not exported alone: see [`TcpCounters::close_wait`]).
    CloseWaitEntered = 7,
    CloseWaitLeft = 8,
}

impl Kind {
    pub const ALL: [Kind; KINDS] = [
        Kind::Opened,
        Kind::Failed,
        Kind::Closed,
        Kind::Refused,
        Kind::Retransmits,
        Kind::ResetsSent,
        Kind::ResetsReceived,
        Kind::CloseWaitEntered,
        Kind::CloseWaitLeft,
    ];
    /// The kinds exported as counters.
    pub fn is_counter(self) -> bool {
        !matches!(self, Kind::CloseWaitEntered | Kind::CloseWaitLeft)
    }
    pub fn metric(self) -> &'static str {
        match self {
            Kind::Opened => "edge_tcp_connections_opened_total",
            Kind::Failed => "edge_tcp_connections_failed_total",
            Kind::Closed => "edge_tcp_connections_closed_total",
            Kind::Refused => "edge_tcp_connections_refused_total",
            Kind::Retransmits => "edge_tcp_retransmits_total",
            Kind::ResetsSent => "edge_tcp_resets_sent_total",
            Kind::ResetsReceived => "edge_tcp_resets_received_total",
            Kind::CloseWaitEntered | Kind::CloseWaitLeft => "edge_tcp_connections_close_wait",
        }
    }
}

/// The histograms, in the kernel's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hist {
    /// SYN_SENT -> ESTABLISHED, microseconds.
    ConnectLatency = 0,
    /// ESTABLISHED -> CLOSE, milliseconds.
    Duration = 1,
    /// Smoothed RTT at each received segment, microseconds.
    Rtt = 2,
    /// Congestion window at each received segment, segments.
    Cwnd = 3,
}

impl Hist {
    pub const ALL: [Hist; HISTS] = [Hist::ConnectLatency, Hist::Duration, Hist::Rtt, Hist::Cwnd];
    pub fn metric(self) -> &'static str {
        match self {
            Hist::ConnectLatency => "edge_tcp_connect_latency_seconds",
            Hist::Duration => "edge_tcp_connection_duration_seconds",
            Hist::Rtt => "edge_tcp_rtt_seconds",
            Hist::Cwnd => "edge_tcp_cwnd_segments",
        }
    }
    /// The exported unit (seconds, segments) per unit the kernel counts in.
    pub fn unit(self) -> f64 {
        match self {
            Hist::ConnectLatency | Hist::Rtt => 1e-6,
            Hist::Duration => 1e-3,
            Hist::Cwnd => 1.0,
        }
    }
}

pub const DIR_NAMES: [&str; DIRS] = ["outbound", "inbound", "unknown"];

/// Port class names by class index; index 0 is "other".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortClasses {
    names: Vec<String>,
    ports: Vec<(u16, u8)>,
}

impl PortClasses {
    pub fn from_config(cfg: &TcpLifecycleConfig) -> Self {
        let mut names = vec!["other".to_string()];
        let mut ports = Vec::new();
        // BTreeMap order: stable class indices for the same config.
        for (i, (name, list)) in cfg.port_classes.iter().enumerate().take(CLASSES - 1) {
            names.push(name.clone());
            ports.extend(list.iter().map(|p| (*p, (i + 1) as u8)));
        }
        PortClasses { names, ports }
    }

    pub fn name(&self, class: usize) -> Option<&str> {
        self.names.get(class).map(String::as_str)
    }

    /// Every classed port with its class.
    pub fn ports(&self) -> &[(u16, u8)] {
        &self.ports
    }

    /// The class of a port (0, "other", when unclassed).
    pub fn class_of(&self, port: u16) -> usize {
        self.ports.iter().find(|(p, _)| *p == port).map_or(0, |(_, c)| usize::from(*c))
    }
}

/// Peer group names by index (0 is "other") and the prefixes of each, from
/// `probes.tcp_lifecycle.peers` (validated by the config).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerGroups {
    pub names: Vec<String>,
    /// (IPv6 or IPv4-mapped address, prefix length, group index).
    pub prefixes: Vec<([u8; 16], u32, u8)>,
}

impl PeerGroups {
    pub fn from_config(cfg: &TcpLifecycleConfig) -> Self {
        let mut g = PeerGroups { names: vec!["other".to_string()], prefixes: Vec::new() };
        // BTreeMap order: stable indices for the same config.
        for (i, (name, list)) in cfg.peers.iter().enumerate().take(PEERS - 1) {
            g.names.push(name.clone());
            for text in list {
                if let Ok((addr, len)) = crate::config::parse_prefix(text) {
                    g.prefixes.push((addr, len, (i + 1) as u8));
                }
            }
        }
        g
    }

    /// The group of an address (longest prefix), as the kernel's trie finds
    /// it: what the unit test checks the table against.
    #[cfg(test)]
    fn group_of(&self, addr: std::net::IpAddr) -> usize {
        let bytes = match addr {
            std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            std::net::IpAddr::V6(a) => a.octets(),
        };
        let bits = |a: &[u8; 16], n: u32| -> u128 {
            let v = u128::from_be_bytes(*a);
            if n == 0 {
                0
            } else {
                v >> (128 - n)
            }
        };
        self.prefixes
            .iter()
            .filter(|(p, len, _)| bits(p, *len) == bits(&bytes, *len))
            .max_by_key(|(_, len, _)| *len)
            .map_or(0, |(_, _, g)| usize::from(*g))
    }
}

/// Per peer group: connections opened, failed, refused, closed by
/// direction, and the outbound connect latency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCounters {
    /// Group names, index 0 "other".
    pub names: Vec<String>,
    /// Indexed by `dir * PEERS + group`, dir 0 (outbound) or 1 (inbound).
    pub values: Vec<[u64; PEER_KINDS]>,
    /// Connect latency (microseconds) per group.
    pub connect: Vec<HistSlot>,
}

/// The counters of [`PeerCounters::values`], in the kernel's order.
pub const PEER_METRICS: [&str; PEER_KINDS] = [
    "edge_tcp_peer_connections_opened_total",
    "edge_tcp_peer_connections_failed_total",
    "edge_tcp_peer_connections_refused_total",
    "edge_tcp_peer_connections_closed_total",
];

/// Cumulative counters and histograms since the probe was attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpCounters {
    pub values: [u64; COUNTERS],
    pub hists: TcpHists,
    /// Sockets whose open could not be remembered (kernel map full).
    pub sock_map_full: u64,
    /// Connections the kernel map holds now.
    pub socks_tracked: u64,
    /// Per peer group, when peer groups are configured and the kernel
    /// gives the addresses.
    pub peers: Option<PeerCounters>,
}

impl Default for TcpCounters {
    fn default() -> Self {
        TcpCounters {
            values: [0; COUNTERS],
            hists: TcpHists::default(),
            sock_map_full: 0,
            socks_tracked: 0,
            peers: None,
        }
    }
}

/// What the kernel says about the attached programs of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramStats {
    pub probe: &'static str,
    /// Runs and time in them (BPF_ENABLE_STATS: 0 while statistics are off).
    pub runs: u64,
    pub run_ns: u64,
    /// Runs the kernel skipped because a BPF program was already running on
    /// that CPU (`recursion_misses` in the program's fdinfo, 5.12+; None
    /// before): the events the probe never saw.
    pub missed: Option<u64>,
}

impl ProgramStats {
    /// The programs together, under one probe name; None when one of them
    /// cannot be asked (not loaded).
    pub fn of<'a>(probe: &'static str, programs: impl IntoIterator<Item = Option<&'a Program>>) -> Option<Self> {
        let mut s = ProgramStats { probe, runs: 0, run_ns: 0, missed: Some(0) };
        for prog in programs {
            let prog = prog?;
            let info = prog.info().ok()?;
            s.runs += info.run_count();
            s.run_ns += info.run_time().as_nanos() as u64;
            let missed = prog.fd().ok().and_then(|fd| super::recursion_misses(fd.as_fd()));
            s.missed = s.missed.zip(missed).map(|(a, b)| a + b);
        }
        Some(s)
    }
}

impl TcpCounters {
    pub fn index(kind: Kind, dir: usize, class: usize) -> usize {
        (kind as usize * DIRS + dir) * CLASSES + class
    }
    pub fn get(&self, kind: Kind, dir: usize, class: usize) -> u64 {
        self.values[Self::index(kind, dir, class)]
    }

    /// Connections in CLOSE_WAIT now (since the probe was attached).
    pub fn close_wait(&self, dir: usize, class: usize) -> u64 {
        self.get(Kind::CloseWaitEntered, dir, class).saturating_sub(self.get(Kind::CloseWaitLeft, dir, class))
    }

    /// Every counter with its labels.
    pub fn entries(&self) -> impl Iterator<Item = Entry> + '_ {
        Kind::ALL.into_iter().flat_map(move |kind| {
            DIR_NAMES.iter().enumerate().flat_map(move |(dir, direction)| {
                (0..CLASSES).map(move |class| {
                    let index = Self::index(kind, dir, class);
                    Entry { index, kind, direction, class, value: self.values[index] }
                })
            })
        })
    }
}

/// One counter of [`TcpCounters`] and its labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub index: usize,
    pub kind: Kind,
    pub direction: &'static str,
    /// Port class index; its name comes from [`PortClasses::name`].
    pub class: usize,
    pub value: u64,
}

/// One histogram of one (direction, port class): log2 buckets of the
/// kernel's unit (bucket b < BUCKETS-1 counts values below 2^(b+1)), and
/// the sum of the values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct HistSlot {
    pub sum: u64,
    pub buckets: [u64; BUCKETS],
}

impl Default for HistSlot {
    fn default() -> Self {
        HistSlot { sum: 0, buckets: [0; BUCKETS] }
    }
}

impl HistSlot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

// SAFETY: plain old data, laid out as the C struct tcpl_hist.
unsafe impl aya::Pod for HistSlot {}

/// The kernel's counters of one (direction, port class), by kind.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct KindSlot([u64; KINDS]);

/// The kernel's counters of one (direction, peer group), by kind.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct PeerSlot([u64; PEER_KINDS]);

// SAFETY: plain old data, laid out as the C struct tcpl_peer_kinds.
unsafe impl aya::Pod for PeerSlot {}

// SAFETY: plain old data, laid out as the C struct tcpl_kinds.
unsafe impl aya::Pod for KindSlot {}

/// Histograms since the probe was attached, indexed by
/// [`TcpHists::index`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpHists {
    pub slots: Vec<HistSlot>,
}

impl Default for TcpHists {
    fn default() -> Self {
        TcpHists { slots: vec![HistSlot::default(); HIST_SLOTS] }
    }
}

impl TcpHists {
    /// `dir` is 0 (outbound) or 1 (inbound).
    pub fn index(hist: Hist, dir: usize, class: usize) -> usize {
        (hist as usize * 2 + dir) * CLASSES + class
    }
}

/// The peer groups and their kernel maps: counters, connect latency.
struct PeerMaps {
    groups: PeerGroups,
    counters: PerCpuArray<MapData, PeerSlot>,
    hist: PerCpuArray<MapData, HistSlot>,
}

/// Globals to set for a tracepoint layout.
pub type Globals = Vec<(&'static str, u32)>;

/// The attached probe. Dropping it detaches the programs and frees their maps.
pub struct TcpLifecycleProbe {
    counters: PerCpuArray<MapData, KindSlot>,
    hists: PerCpuArray<MapData, HistSlot>,
    stats: PerCpuArray<MapData, u64>,
    /// With peer groups: their counters and connect latency histograms.
    peers: Option<PeerMaps>,
    classes: Arc<PortClasses>,
    /// Each tracepoint's state (the baseline is attached).
    pub states: Vec<(&'static str, ProbeState)>,
    /// The idle limit (ms) when the idle-connection census runs
    /// (`idle_secs` > 0, and socket diagnostics working).
    census_idle_ms: Option<u64>,
    /// The counters the metrics were last moved to (this probe's maps
    /// count from zero).
    observed: TcpCounters,
    // Owns the programs and their links; must outlive the maps' use.
    ebpf: Ebpf,
}

/// Checks that a tracefs layout has every field a program reads, with the
/// sizes it reads them at, and returns the globals to set for it.
pub fn layout_globals(tp: &Tracepoint, layout: &Layout) -> Result<Vec<(&'static str, u32)>, String> {
    let need = |name: &str, sizes: &[u32]| -> Result<super::tracefs::Field, String> {
        let f = layout.field(name).ok_or_else(|| format!("field {name} missing"))?;
        if !sizes.contains(&f.size) {
            return Err(format!("field {name} has size {}, expected one of {sizes:?}", f.size));
        }
        // Scalars must be naturally aligned; of a sockaddr we read a u16.
        let align = if f.size > 8 { 2 } else { f.size };
        if f.offset < 8 || f.offset % align != 0 {
            return Err(format!("field {name} at offset {} cannot be read", f.offset));
        }
        Ok(f)
    };
    let end = |fields: &[(u32, u32)]| -> Result<u32, String> {
        let len = fields.iter().map(|(off, size)| off + size).max().unwrap_or(0);
        if len as usize > REC_MAX {
            return Err(format!("fields end at byte {len}, past the {REC_MAX} bytes the program copies"));
        }
        Ok(len)
    };
    let at = |f: &super::tracefs::Field| (f.offset, f.size);
    match tp.program {
        "tcp_lifecycle" => {
            let skaddr = need("skaddr", &[8])?;
            let oldstate = need("oldstate", &[4])?;
            let newstate = need("newstate", &[4])?;
            let sport = need("sport", &[2])?;
            let dport = need("dport", &[2])?;
            let protocol = need("protocol", &[1, 2])?;
            let rec_len = end(&[skaddr, oldstate, newstate, sport, dport, protocol].map(|f| at(&f)))?;
            Ok(vec![
                ("off_skaddr", skaddr.offset),
                ("off_oldstate", oldstate.offset),
                ("off_newstate", newstate.offset),
                ("off_sport", sport.offset),
                ("off_dport", dport.offset),
                ("off_protocol", protocol.offset),
                ("size_protocol", protocol.size),
                ("rec_len", rec_len),
            ])
        }
        "tcp_retransmit" => {
            let skaddr = need("skaddr", &[8])?;
            let state = need("state", &[4])?;
            let sport = need("sport", &[2])?;
            let dport = need("dport", &[2])?;
            let mut fields = vec![at(&skaddr), at(&state), at(&sport), at(&dport)];
            // Since 6.x: failed attempts are traced too, with their error.
            let err = match layout.field("err") {
                Some(_) => {
                    let e = need("err", &[4])?;
                    fields.push(at(&e));
                    e.offset
                }
                None => 0,
            };
            let rec_len = end(&fields)?;
            Ok(vec![
                ("rt_off_skaddr", skaddr.offset),
                ("rt_off_state", state.offset),
                ("rt_off_sport", sport.offset),
                ("rt_off_dport", dport.offset),
                ("rt_off_err", err),
                ("rt_rec_len", rec_len),
            ])
        }
        "tcp_retransmit_synack" => {
            let sport = need("sport", &[2])?;
            Ok(vec![("ra_off_sport", sport.offset), ("ra_rec_len", end(&[at(&sport)])?)])
        }
        "tcp_rtt" => {
            let sport = need("sport", &[2])?;
            let dport = need("dport", &[2])?;
            let cwnd = need("snd_cwnd", &[4])?;
            let srtt = need("srtt", &[4])?;
            let mut fields = vec![at(&sport), at(&dport), at(&cwnd), at(&srtt)];
            let skaddr = match layout.field("skaddr") {
                Some(_) => {
                    let f = need("skaddr", &[8])?;
                    fields.push(at(&f));
                    f.offset
                }
                None => 0,
            };
            Ok(vec![
                ("tp_off_sport", sport.offset),
                ("tp_off_dport", dport.offset),
                ("tp_off_cwnd", cwnd.offset),
                ("tp_off_srtt", srtt.offset),
                ("tp_off_skaddr", skaddr),
                ("tp_rec_len", end(&fields)?),
            ])
        }
        "tcp_receive_reset" => {
            let skaddr = need("skaddr", &[8])?;
            let sport = need("sport", &[2])?;
            let dport = need("dport", &[2])?;
            let rec_len = end(&[skaddr, sport, dport].map(|f| at(&f)))?;
            Ok(vec![
                ("rr_off_skaddr", skaddr.offset),
                ("rr_off_sport", sport.offset),
                ("rr_off_dport", dport.offset),
                ("rr_rec_len", rec_len),
            ])
        }
        "tcp_send_reset" => {
            let skaddr = need("skaddr", &[8])?;
            // Kernels before 6.10 have host-order sport/dport; later ones
            // a sockaddr_in/in6 per side, port in network order at +2.
            let (sport, dport, be, fields) = match (layout.field("sport"), layout.field("dport")) {
                (Some(_), Some(_)) => {
                    let (sp, dp) = (need("sport", &[2])?, need("dport", &[2])?);
                    (sp.offset, dp.offset, 0, vec![at(&skaddr), at(&sp), at(&dp)])
                }
                _ => {
                    let (sa, da) = (need("saddr", &[28])?, need("daddr", &[28])?);
                    (sa.offset + 2, da.offset + 2, 1, vec![at(&skaddr), (sa.offset, 4), (da.offset, 4)])
                }
            };
            let rec_len = end(&fields)?;
            Ok(vec![
                ("rs_off_skaddr", skaddr.offset),
                ("rs_off_sport", sport),
                ("rs_off_dport", dport),
                ("rs_ports_be", be),
                ("rs_rec_len", rec_len),
            ])
        }
        other => Err(format!("no layout rules for program {other}")),
    }
}

/// The remote-address fields of sock:inet_sock_set_state for the peer
/// allowlist: their globals and where they end (the record must be copied
/// that far).
pub fn peer_globals(layout: &Layout) -> Result<(Globals, u32), String> {
    let field = |name: &str, size: u32| -> Result<super::tracefs::Field, String> {
        let f = layout.field(name).ok_or_else(|| format!("field {name} missing"))?;
        if f.size != size || f.offset < 8 || f.offset % size.min(2) != 0 {
            return Err(format!("field {name}: size {} at offset {}, expected size {size}", f.size, f.offset));
        }
        Ok(f)
    };
    let family = field("family", 2)?;
    let daddr = field("daddr", 4)?;
    let daddr_v6 = field("daddr_v6", 16)?;
    let end = [&family, &daddr, &daddr_v6].iter().map(|f| f.offset + f.size).max().unwrap_or(0);
    if end as usize > REC_MAX {
        return Err(format!("the address fields end at byte {end}, past the {REC_MAX} bytes the program copies"));
    }
    Ok((
        vec![
            ("peers_on", 1),
            ("off_family", family.offset),
            ("off_daddr", daddr.offset),
            ("off_daddr_v6", daddr_v6.offset),
        ],
        end,
    ))
}

impl TcpLifecycleProbe {
    /// Loads and attaches the programs. Needs CAP_BPF and CAP_PERFMON (or
    /// root). Fails only when the baseline tracepoint cannot be used; each
    /// other one is attached or reported unavailable with the reason.
    pub fn attach(tracefs_root: &Path, cfg: &TcpLifecycleConfig) -> Result<Self, ProbeError> {
        let mut usable = Vec::new();
        let mut states = Vec::new();
        let mut globals = Vec::new();
        let mut peer_state = ProbeState::Disabled;
        for tp in &TRACEPOINTS {
            if tp.program == "tcp_rtt" && !cfg.rtt {
                states.push((tp.probe, ProbeState::Disabled));
                continue;
            }
            let (layout, g) = match tracefs::layout(tracefs_root, tp.group, tp.event) {
                Ok(layout) => {
                    let g = layout_globals(tp, &layout).map_err(|m| ProbeError::Layout {
                        tracepoint: format!("{}:{}", tp.group, tp.event),
                        message: m,
                    });
                    (Some(layout), g)
                }
                Err(e) => (None, Err(ProbeError::from(e))),
            };
            match g {
                Ok(mut g) => {
                    if tp.program == "tcp_lifecycle" && !cfg.peers.is_empty() {
                        let layout = layout.as_ref().expect("the layout gave globals");
                        match peer_globals(layout) {
                            Ok((pg, end)) => {
                                for (name, value) in g.iter_mut() {
                                    if *name == "rec_len" {
                                        *value = (*value).max(end);
                                    }
                                }
                                g.extend(pg);
                                peer_state = ProbeState::Attached;
                            }
                            Err(m) => {
                                peer_state = ProbeState::Unavailable(format!(
                                    "sock:inet_sock_set_state has no usable remote address: {m}"
                                ))
                            }
                        }
                    }
                    globals.extend(g);
                    usable.push(*tp);
                }
                Err(e) if tp.program == "tcp_lifecycle" => return Err(e),
                Err(e) => states.push((tp.probe, ProbeState::Unavailable(e.to_string()))),
            }
        }
        let mut loader = super::loader::new();
        // The baseline programs have no CO-RE relocations: they must load on
        // kernels without BTF, so never ask for kernel BTF.
        loader.btf(None);
        for (name, value) in &globals {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader
            .load(&super::objects::object("tcp_lifecycle", OBJECT))
            .map_err(|e| ProbeError::Load(e.to_string()))?;
        for tp in usable {
            match attach_one(&mut ebpf, &tp) {
                Ok(()) => states.push((tp.probe, ProbeState::Attached)),
                Err(e) if tp.program == "tcp_lifecycle" => return Err(e),
                Err(e) => states.push((tp.probe, ProbeState::Unavailable(e.to_string()))),
            }
        }

        let classes = PortClasses::from_config(cfg);
        let mut port_map: BpfHashMap<_, u16, u8> = BpfHashMap::try_from(
            ebpf.map_mut("tcpl_port_class").ok_or_else(|| ProbeError::Load("map tcpl_port_class missing".into()))?,
        )
        .map_err(|e| ProbeError::Load(e.to_string()))?;
        for (port, class) in &classes.ports {
            port_map.insert(port, class, 0).map_err(|e| ProbeError::Load(e.to_string()))?;
        }
        let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| ProbeError::Load(format!("map {name} missing")));
        let load = |e: aya::maps::MapError| ProbeError::Load(e.to_string());
        let counters = PerCpuArray::try_from(take("tcpl_counters")?).map_err(load)?;
        let hists = PerCpuArray::try_from(take("tcpl_hist")?).map_err(load)?;
        let stats = PerCpuArray::try_from(take("tcpl_stats")?).map_err(load)?;
        let peers = if peer_state == ProbeState::Attached {
            let groups = PeerGroups::from_config(cfg);
            let mut trie: LpmTrie<MapData, [u8; 16], u8> = LpmTrie::try_from(take("tcpl_peers")?).map_err(load)?;
            for (addr, len, group) in &groups.prefixes {
                trie.insert(&LpmKey::new(*len, *addr), group, 0).map_err(load)?;
            }
            let counters = PerCpuArray::try_from(take("tcpl_peer_counters")?).map_err(load)?;
            let hist = PerCpuArray::try_from(take("tcpl_peer_hist")?).map_err(load)?;
            // The trie lives on in the kernel with the programs using it.
            drop(trie);
            Some(PeerMaps { groups, counters, hist })
        } else {
            None
        };
        states.push((PEERS_PROBE, peer_state));
        let classes = Arc::new(classes);
        let observed = TcpCounters::default();
        Ok(TcpLifecycleProbe { counters, hists, stats, peers, classes, states, census_idle_ms: None, observed, ebpf })
    }

    /// Run statistics of every attached program (cumulative).
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        TRACEPOINTS
            .iter()
            .filter(|tp| self.states.iter().any(|(n, s)| *n == tp.probe && *s == ProbeState::Attached))
            .filter_map(|tp| ProgramStats::of(tp.probe, [self.ebpf.program(tp.program)]))
            .collect()
    }

    pub fn classes(&self) -> &PortClasses {
        &self.classes
    }

    /// Sums the per-CPU counters and histograms: one map lookup per
    /// (direction, port class).
    pub fn read(&self) -> Result<TcpCounters, ProbeError> {
        let err = |e: aya::maps::MapError| ProbeError::Read(e.to_string());
        let mut out = TcpCounters::default();
        for slot in 0..SLOTS {
            let per_cpu = self.counters.get(&(slot as u32), 0).map_err(err)?;
            let (dir, class) = (slot / CLASSES, slot % CLASSES);
            for k in Kind::ALL {
                out.values[TcpCounters::index(k, dir, class)] = per_cpu.iter().map(|c| c.0[k as usize]).sum();
            }
        }
        for (i, h) in out.hists.slots.iter_mut().enumerate() {
            for cpu in self.hists.get(&(i as u32), 0).map_err(err)?.iter() {
                h.sum += cpu.sum;
                for (b, n) in h.buckets.iter_mut().zip(cpu.buckets) {
                    *b += n;
                }
            }
        }
        if let Some(PeerMaps { groups, counters, hist }) = &self.peers {
            let mut p = PeerCounters {
                names: groups.names.clone(),
                values: vec![[0; PEER_KINDS]; PEER_SLOTS],
                connect: vec![HistSlot::default(); PEERS],
            };
            for (slot, v) in p.values.iter_mut().enumerate() {
                for cpu in counters.get(&(slot as u32), 0).map_err(err)?.iter() {
                    for (k, n) in v.iter_mut().zip(cpu.0) {
                        *k += n;
                    }
                }
            }
            for (i, h) in p.connect.iter_mut().enumerate() {
                for cpu in hist.get(&(i as u32), 0).map_err(err)?.iter() {
                    h.sum += cpu.sum;
                    for (b, n) in h.buckets.iter_mut().zip(cpu.buckets) {
                        *b += n;
                    }
                }
            }
            out.peers = Some(p);
        }
        let stat = |i: u32| -> Result<u64, ProbeError> { Ok(self.stats.get(&i, 0).map_err(err)?.iter().sum()) };
        out.sock_map_full = stat(STAT_SOCK_MAP_FULL)?;
        out.socks_tracked = stat(STAT_SOCKS_ADDED)?.saturating_sub(stat(STAT_SOCKS_REMOVED)?);
        Ok(out)
    }
}

fn attach_one(ebpf: &mut Ebpf, tp: &Tracepoint) -> Result<(), ProbeError> {
    let prog: &mut TracePoint = ebpf
        .program_mut(tp.program)
        .ok_or_else(|| ProbeError::Load(format!("program {} missing from object", tp.program)))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| ProbeError::Load(e.to_string()))?;
    prog.load().map_err(|e| ProbeError::Load(verifier_text(&e)))?;
    prog.attach(tp.group, tp.event).map_err(|e| ProbeError::Attach(e.to_string()))?;
    Ok(())
}

pub(crate) fn verifier_text(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
            format!("{io_error}; verifier log:\n{verifier_log}")
        }
        other => other.to_string(),
    }
}

/// One window's reading of the TCP probe: its counters, the idle census
/// (when it runs), and the port classes both are indexed by.
#[derive(Debug, Clone)]
pub struct TcpReading {
    pub counters: TcpCounters,
    /// Established and idle connections now.
    pub idle: Option<super::tcp_idle::IdleCensus>,
    pub classes: Arc<PortClasses>,
}

impl super::Probe for TcpLifecycleProbe {
    const NAME: &'static str = "tcp_lifecycle";
    type Config = TcpLifecycleConfig;
    type Reading = TcpReading;
    type Metrics = metrics::TcpMetrics;
    type Seen = series::TcpSeen;

    fn enabled(cfg: &crate::config::Config) -> bool {
        cfg.probes.tcp_lifecycle.enabled
    }

    fn not_loaded(cfg: &crate::config::Config, why: &ProbeState) -> Vec<(&'static str, ProbeState)> {
        let peers = if cfg.probes.tcp_lifecycle.peers.is_empty() { ProbeState::Disabled } else { why.clone() };
        TRACEPOINTS
            .iter()
            .map(|t| (t.probe, why.clone()))
            .chain([(PEERS_PROBE, peers), (super::TCP_IDLE, ProbeState::Disabled)])
            .collect()
    }

    fn start(cfg: &crate::config::Config, _: &super::Probes) -> Result<Self, ProbeError> {
        let tcp = &cfg.probes.tcp_lifecycle;
        let mut p = TcpLifecycleProbe::attach(&tracefs::ensure_mounted()?, tcp)?;
        let attached: Vec<&str> =
            p.states.iter().filter(|(_, s)| *s == ProbeState::Attached).map(|(n, _)| *n).collect();
        tracing::info!(probes = ?attached, "TCP probes attached");
        // The idle census: when socket diagnostics work.
        let census = if tcp.idle_secs == 0 {
            ProbeState::Disabled
        } else {
            match super::tcp_idle::dump() {
                Ok(_) => ProbeState::Attached,
                Err(e) => ProbeState::Unavailable(format!("socket diagnostics (NETLINK_SOCK_DIAG) dump failed: {e}")),
            }
        };
        p.census_idle_ms = (census == ProbeState::Attached).then_some(tcp.idle_secs * 1000);
        p.states.push((super::TCP_IDLE, census));
        Ok(p)
    }

    fn states(&self) -> Vec<(&'static str, ProbeState)> {
        self.states.clone()
    }

    fn program_stats(&self) -> Vec<ProgramStats> {
        TcpLifecycleProbe::program_stats(self)
    }

    fn reading(&self) -> Result<TcpReading, ProbeError> {
        let counters = self.read()?;
        let idle = self.census_idle_ms.and_then(|idle_ms| {
            let dump = super::tcp_idle::dump().map_err(|e| ProbeError::Read(e.to_string()));
            let (conns, listening) = super::usable(super::TCP_IDLE, dump)?;
            Some(super::tcp_idle::census(&conns, &listening, &self.classes, idle_ms))
        });
        Ok(TcpReading { counters, idle, classes: self.classes.clone() })
    }

    fn register(metrics: &metrics::TcpMetrics, registry: &mut prometheus_client::registry::Registry) {
        metrics.register(registry);
    }

    fn observe(&mut self, reading: &TcpReading, metrics: &metrics::TcpMetrics) {
        metrics.observe(&self.observed, &reading.counters, &reading.classes);
        self.observed = reading.counters.clone();
    }

    fn series(reading: &TcpReading, seen: &mut series::TcpSeen, out: &mut super::series::Samples) {
        seen.series(reading, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_the_c_header() {
        let h = include_str!("../../../ebpf/include/tcp_lifecycle.h");
        let def = |name: &str| crate::probe::header_define(h, name);
        assert_eq!(def("TCPL_KINDS"), KINDS);
        assert_eq!(def("TCPL_SLOTS"), SLOTS);
        assert_eq!(def("TCPL_HISTS"), HISTS);
        assert_eq!(def("TCPL_BUCKETS"), BUCKETS);
        assert_eq!(def("TCPL_HIST_SLOTS"), HIST_SLOTS);
        assert_eq!(def("TCPL_HIST_CONNECT_US"), Hist::ConnectLatency as usize);
        assert_eq!(def("TCPL_HIST_DURATION_MS"), Hist::Duration as usize);
        assert_eq!(def("TCPL_HIST_RTT_US"), Hist::Rtt as usize);
        assert_eq!(def("TCPL_HIST_CWND"), Hist::Cwnd as usize);
        assert_eq!(def("TCPL_KIND_REFUSED"), Kind::Refused as usize);
        assert_eq!(def("TCPL_KIND_RETRANS"), Kind::Retransmits as usize);
        assert_eq!(def("TCPL_KIND_RST_SENT"), Kind::ResetsSent as usize);
        assert_eq!(def("TCPL_KIND_RST_RECV"), Kind::ResetsReceived as usize);
        assert_eq!(def("TCPL_KIND_CW_ENTERED"), Kind::CloseWaitEntered as usize);
        assert_eq!(def("TCPL_KIND_CW_LEFT"), Kind::CloseWaitLeft as usize);
        assert_eq!(def("TCPL_DIRS"), DIRS);
        assert_eq!(def("TCPL_CLASSES"), CLASSES);
        assert_eq!(def("TCPL_KIND_OPENED"), Kind::Opened as usize);
        assert_eq!(def("TCPL_KIND_FAILED"), Kind::Failed as usize);
        assert_eq!(def("TCPL_KIND_CLOSED"), Kind::Closed as usize);
        assert_eq!(def("TCPL_DIR_OUT"), 0);
        assert_eq!(def("TCPL_DIR_IN"), 1);
        assert_eq!(def("TCPL_DIR_UNKNOWN"), 2);
        assert_eq!(def("TCPL_STAT_SOCK_MAP_FULL"), STAT_SOCK_MAP_FULL as usize);
        assert_eq!(def("TCPL_STAT_SOCKS_ADDED"), STAT_SOCKS_ADDED as usize);
        assert_eq!(def("TCPL_STAT_SOCKS_REMOVED"), STAT_SOCKS_REMOVED as usize);
        assert_eq!(def("TCPL_MAX_SOCKS") as u64, MAX_SOCKS);
        assert_eq!(def("TCPL_MAX_PORTS"), crate::config::MAX_CLASSED_PORTS);
        assert_eq!(def("TCPL_REC_MAX"), REC_MAX);
        assert_eq!(def("TCPL_CLASSES") - 1, crate::config::MAX_PORT_CLASSES);
        assert_eq!(def("TCPL_PEERS"), PEERS);
        assert_eq!(def("TCPL_PEERS") - 1, crate::config::MAX_PEER_GROUPS);
        assert_eq!(def("TCPL_PEER_KINDS"), PEER_KINDS);
        assert_eq!(def("TCPL_PEER_SLOTS"), PEER_SLOTS);
        assert_eq!(def("TCPL_MAX_PEER_PREFIXES"), crate::config::MAX_PEER_PREFIXES);
        for (i, m) in PEER_METRICS.iter().enumerate() {
            let kind = ["OPENED", "FAILED", "REFUSED", "CLOSED"][i];
            assert_eq!(def(&format!("TCPL_PEER_KIND_{kind}")), i, "{m}");
        }
    }

    #[test]
    fn peer_fields_from_a_6x_layout() {
        let text = "\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;\n";
        let (g, end) = peer_globals(&Layout::parse(text)).unwrap();
        assert_eq!(end, 72);
        assert!(g.contains(&("off_daddr", 36)) && g.contains(&("off_daddr_v6", 56)) && g.contains(&("peers_on", 1)));
        let e = peer_globals(&Layout::parse("\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;\n")).unwrap_err();
        assert!(e.contains("daddr"), "{e}");
    }

    #[test]
    fn peer_groups_longest_prefix_wins() {
        let mut cfg = TcpLifecycleConfig::default();
        cfg.peers.insert("mes".into(), vec!["10.1.0.0/16".into(), "fd00:1::/64".into()]);
        cfg.peers.insert("plc".into(), vec!["10.1.5.20".into()]);
        let g = PeerGroups::from_config(&cfg);
        assert_eq!(g.names, ["other", "mes", "plc"]);
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(g.group_of(ip("10.1.5.20")), 2);
        assert_eq!(g.group_of(ip("10.1.5.21")), 1);
        assert_eq!(g.group_of(ip("::ffff:10.1.9.9")), 1, "an IPv4 peer on an IPv6 socket");
        assert_eq!(g.group_of(ip("fd00:1::7")), 1);
        assert_eq!(g.group_of(ip("10.2.0.1")), 0);
    }

    #[test]
    fn globals_from_a_6x_layout() {
        let text = "\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;\n";
        let g = layout_globals(&TRACEPOINTS[0], &Layout::parse(text)).unwrap();
        assert!(g.contains(&("off_protocol", 30)));
        assert!(g.contains(&("rec_len", 32)));
    }

    #[test]
    fn layout_checks_name_the_problem() {
        let l = Layout::parse("\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;\n");
        assert!(layout_globals(&TRACEPOINTS[0], &l).unwrap_err().contains("skaddr"));
    }

    #[test]
    fn send_reset_layouts_old_and_new() {
        // 6.10+: sockaddr per side, ports in network order.
        let new = "\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u8 saddr[28];\toffset:32;\tsize:28;\tsigned:0;
\tfield:__u8 daddr[28];\toffset:60;\tsize:28;\tsigned:0;\n";
        let g = layout_globals(&TRACEPOINTS[5], &Layout::parse(new)).unwrap();
        assert_eq!(
            g,
            [("rs_off_skaddr", 16), ("rs_off_sport", 34), ("rs_off_dport", 62), ("rs_ports_be", 1), ("rs_rec_len", 64)]
        );
        // 5.10: sport/dport fields, host order.
        let old = "\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;\n";
        let g = layout_globals(&TRACEPOINTS[5], &Layout::parse(old)).unwrap();
        assert!(g.contains(&("rs_ports_be", 0)) && g.contains(&("rs_off_dport", 26)), "{g:?}");
    }

    #[test]
    fn port_classes_index_from_one_in_name_order() {
        let c = PortClasses::from_config(&TcpLifecycleConfig::default());
        assert_eq!(c.name(0), Some("other"));
        assert_eq!(c.name(1), Some("dns"));
        assert!(c.ports.contains(&(53, 1)));
    }
}
