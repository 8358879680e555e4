//! User-space side of `ebpf/src/tcp_lifecycle.bpf.c`: fills in the tracepoint
//! layout, loads and attaches the program, writes the port classes, and reads
//! the in-kernel counters once per window.

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::TracePoint;
use aya::{Ebpf, EbpfLoader};
use std::path::Path;

use super::tracefs::{self, Layout};
use super::ProbeError;
use crate::config::TcpLifecycleConfig;

static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tcp_lifecycle.bpf.o"));

// Mirrors ebpf/include/tcp_lifecycle.h (a test below checks they agree).
pub const KINDS: usize = 3;
pub const DIRS: usize = 3;
pub const CLASSES: usize = 16;
pub const COUNTERS: usize = KINDS * DIRS * CLASSES;
const STAT_SOCK_MAP_FULL: u32 = 0;
const REC_MAX: usize = 128;

pub const GROUP: &str = "sock";
pub const EVENT: &str = "inet_sock_set_state";

/// What happened to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Opened = 0,
    Failed = 1,
    Closed = 2,
}

impl Kind {
    pub const ALL: [Kind; KINDS] = [Kind::Opened, Kind::Failed, Kind::Closed];
    pub fn metric(self) -> &'static str {
        match self {
            Kind::Opened => "edge_tcp_connections_opened_total",
            Kind::Failed => "edge_tcp_connections_failed_total",
            Kind::Closed => "edge_tcp_connections_closed_total",
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
}

/// Cumulative counters since the probe was attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpCounters {
    pub values: [u64; COUNTERS],
    /// Sockets whose open could not be remembered (kernel map full).
    pub sock_map_full: u64,
}

impl Default for TcpCounters {
    fn default() -> Self {
        TcpCounters { values: [0; COUNTERS], sock_map_full: 0 }
    }
}

impl TcpCounters {
    pub fn index(kind: Kind, dir: usize, class: usize) -> usize {
        (kind as usize * DIRS + dir) * CLASSES + class
    }
    pub fn get(&self, kind: Kind, dir: usize, class: usize) -> u64 {
        self.values[Self::index(kind, dir, class)]
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

/// The attached probe. Dropping it detaches the program and frees its maps.
pub struct TcpLifecycleProbe {
    counters: PerCpuArray<MapData, u64>,
    stats: PerCpuArray<MapData, u64>,
    classes: PortClasses,
    // Owns the program and its link; must outlive the maps' use.
    _ebpf: Ebpf,
}

/// Checks that a tracefs layout has every field the program reads, with the
/// sizes it reads them at, and returns the globals to set.
pub fn layout_globals(layout: &Layout) -> Result<[(&'static str, u32); 8], String> {
    let need = |name: &str, sizes: &[u32]| -> Result<super::tracefs::Field, String> {
        let f = layout.field(name).ok_or_else(|| format!("field {name} missing"))?;
        if !sizes.contains(&f.size) {
            return Err(format!("field {name} has size {}, expected one of {sizes:?}", f.size));
        }
        if f.offset < 8 || f.offset % f.size.min(8) != 0 {
            return Err(format!("field {name} at offset {} cannot be read", f.offset));
        }
        Ok(f)
    };
    let skaddr = need("skaddr", &[8])?;
    let oldstate = need("oldstate", &[4])?;
    let newstate = need("newstate", &[4])?;
    let sport = need("sport", &[2])?;
    let dport = need("dport", &[2])?;
    let protocol = need("protocol", &[1, 2])?;
    let rec_len =
        [skaddr, oldstate, newstate, sport, dport, protocol].iter().map(|f| f.offset + f.size).max().unwrap_or(0);
    if rec_len as usize > REC_MAX {
        return Err(format!("fields end at byte {rec_len}, past the {REC_MAX} bytes the program copies"));
    }
    Ok([
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

impl TcpLifecycleProbe {
    /// Loads and attaches the program. Needs CAP_BPF and CAP_PERFMON (or root).
    pub fn attach(tracefs_root: &Path, cfg: &TcpLifecycleConfig) -> Result<Self, ProbeError> {
        let layout = tracefs::layout(tracefs_root, GROUP, EVENT)?;
        let globals = layout_globals(&layout)
            .map_err(|m| ProbeError::Layout { tracepoint: format!("{GROUP}:{EVENT}"), message: m })?;
        let mut loader = EbpfLoader::new();
        // The baseline program has no CO-RE relocations: it must load on
        // kernels without BTF, so never ask for kernel BTF.
        loader.btf(None);
        for (name, value) in &globals {
            loader.override_global(name, value, true);
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| ProbeError::Load(e.to_string()))?;
        let prog: &mut TracePoint = ebpf
            .program_mut("tcp_lifecycle")
            .ok_or_else(|| ProbeError::Load("program tcp_lifecycle missing from object".into()))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| ProbeError::Load(e.to_string()))?;
        prog.load().map_err(|e| ProbeError::Load(verifier_text(&e)))?;
        prog.attach(GROUP, EVENT).map_err(|e| ProbeError::Attach(e.to_string()))?;

        let classes = PortClasses::from_config(cfg);
        let mut port_map: BpfHashMap<_, u16, u8> = BpfHashMap::try_from(
            ebpf.map_mut("tcpl_port_class").ok_or_else(|| ProbeError::Load("map tcpl_port_class missing".into()))?,
        )
        .map_err(|e| ProbeError::Load(e.to_string()))?;
        for (port, class) in &classes.ports {
            port_map.insert(port, class, 0).map_err(|e| ProbeError::Load(e.to_string()))?;
        }
        let take = |ebpf: &mut Ebpf, name: &str| -> Result<PerCpuArray<MapData, u64>, ProbeError> {
            let map = ebpf.take_map(name).ok_or_else(|| ProbeError::Load(format!("map {name} missing")))?;
            PerCpuArray::try_from(map).map_err(|e| ProbeError::Load(e.to_string()))
        };
        let counters = take(&mut ebpf, "tcpl_counters")?;
        let stats = take(&mut ebpf, "tcpl_stats")?;
        Ok(TcpLifecycleProbe { counters, stats, classes, _ebpf: ebpf })
    }

    pub fn classes(&self) -> &PortClasses {
        &self.classes
    }

    /// Sums the per-CPU counters: one map lookup per counter.
    pub fn read(&self) -> Result<TcpCounters, ProbeError> {
        let mut out = TcpCounters::default();
        for (i, slot) in out.values.iter_mut().enumerate() {
            let per_cpu = self.counters.get(&(i as u32), 0).map_err(|e| ProbeError::Read(e.to_string()))?;
            *slot = per_cpu.iter().sum();
        }
        out.sock_map_full =
            self.stats.get(&STAT_SOCK_MAP_FULL, 0).map_err(|e| ProbeError::Read(e.to_string()))?.iter().sum();
        Ok(out)
    }
}

fn verifier_text(e: &aya::programs::ProgramError) -> String {
    match e {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
            format!("{io_error}; verifier log:\n{verifier_log}")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_the_c_header() {
        let h = include_str!("../../../ebpf/include/tcp_lifecycle.h");
        let def = |name: &str| -> usize {
            h.lines()
                .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} not in header"))
        };
        assert_eq!(def("TCPL_KINDS"), KINDS);
        assert_eq!(def("TCPL_DIRS"), DIRS);
        assert_eq!(def("TCPL_CLASSES"), CLASSES);
        assert_eq!(def("TCPL_COUNTERS"), COUNTERS);
        assert_eq!(def("TCPL_KIND_OPENED"), Kind::Opened as usize);
        assert_eq!(def("TCPL_KIND_FAILED"), Kind::Failed as usize);
        assert_eq!(def("TCPL_KIND_CLOSED"), Kind::Closed as usize);
        assert_eq!(def("TCPL_DIR_OUT"), 0);
        assert_eq!(def("TCPL_DIR_IN"), 1);
        assert_eq!(def("TCPL_DIR_UNKNOWN"), 2);
        assert_eq!(def("TCPL_STAT_SOCK_MAP_FULL"), STAT_SOCK_MAP_FULL as usize);
        assert_eq!(def("TCPL_MAX_PORTS"), crate::config::MAX_CLASSED_PORTS);
        assert_eq!(def("TCPL_REC_MAX"), REC_MAX);
        assert_eq!(def("TCPL_CLASSES") - 1, crate::config::MAX_PORT_CLASSES);
    }

    #[test]
    fn globals_from_a_6x_layout() {
        let text = "\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;\n";
        let g = layout_globals(&Layout::parse(text)).unwrap();
        assert!(g.contains(&("off_protocol", 30)));
        assert!(g.contains(&("rec_len", 32)));
    }

    #[test]
    fn layout_checks_name_the_problem() {
        let l = Layout::parse("\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;\n");
        assert!(layout_globals(&l).unwrap_err().contains("skaddr"));
    }

    #[test]
    fn port_classes_index_from_one_in_name_order() {
        let c = PortClasses::from_config(&TcpLifecycleConfig::default());
        assert_eq!(c.name(0), Some("other"));
        assert_eq!(c.name(1), Some("dns"));
        assert!(c.ports.contains(&(53, 1)));
    }
}
