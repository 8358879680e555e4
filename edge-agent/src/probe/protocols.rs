//! User-space side of `ebpf/src/protocols.bpf.c`: writes the port table,
//! attaches the two cgroup_skb programs to the cgroup v2 root, and reads
//! the counts (an mmapped array of u64 cells) once per window.

use aya::maps::{HashMap as BpfHashMap, Map, MapData, PerCpuArray, RingBuf};
use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
use aya::Ebpf;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use super::tcp_lifecycle::{PortClasses, ProgramStats};
use super::ProbeError;
pub use config::ProtocolsConfig;
use std::sync::Arc;

pub mod config;
pub mod series;

pub(crate) static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/protocols.bpf.o"));

// Mirrors ebpf/include/protocols.h (a test below checks they agree).
pub const PROTOS: usize = 4;
pub const SIDES: usize = 2;
pub const PAYLOADS: usize = 3;
pub const FUNCTIONS: usize = 128;
pub const EXC_CODES: usize = 16;
pub const BUCKETS: usize = 24;
const FN_REQUESTS: usize = 0;
const FN_SUM_US: usize = 1;
const FN_BUCKET0: usize = 2;
const FN_CELLS: usize = 2 + BUCKETS;
const CELL_CONN: usize = 0;
const CELL_FN: usize = 32;
const CELL_EXC: usize = CELL_FN + SIDES * FUNCTIONS * FN_CELLS;
const CELL_UNMATCHED: usize = CELL_EXC + SIDES * FUNCTIONS * EXC_CODES;
const CELL_ABANDONED: usize = CELL_UNMATCHED + SIDES;
const CELL_VALUE_LOST: usize = CELL_ABANDONED + SIDES;
const CELL_VALUE_BAD: usize = CELL_VALUE_LOST + 1;
/// Kernel-side refusals of value capture (IPP_BAD_*), in order.
pub const VALUE_BADS: [crate::values::Refusal; 3] =
    [crate::values::Refusal::Length, crate::values::Refusal::Partial, crate::values::Refusal::CoilValue];
const CELLS: usize = CELL_VALUE_BAD + VALUE_BADS.len();
/// TCP port classes (the TCP probe's CLASSES) and byte slots per flow.
pub const CLASSES: usize = 16;
const BYTE_SLOTS: usize = 2 * CLASSES;
/// Modbus requests awaiting their reply per connection (IPP_PENDING).
pub const PENDING: usize = 8;
const _: () = assert!(PROTOS * SIDES * PAYLOADS <= CELL_FN, "connection cells overlap the function cells");

/// The probe's name in `edge_agent_probe_attached{probe}`.
pub const PROBE: &str = "protocols";
const PROGRAMS: [(&str, CgroupSkbAttachType); 2] =
    [("ipp_ingress", CgroupSkbAttachType::Ingress), ("ipp_egress", CgroupSkbAttachType::Egress)];

/// A protocol the port table can name (index = IPP_PROTO_*).
pub const PROTO_NAMES: [&str; PROTOS] = ["none", "modbus", "mqtt", "opcua"];
/// IPP_SIDE_*: the client connects to the protocol's port.
pub const SIDE_NAMES: [&str; SIDES] = ["client", "server"];
/// IPP_PAYLOAD_*: what the connection's first client bytes were.
pub const PAYLOAD_NAMES: [&str; PAYLOADS] = ["matched", "tls", "other"];

/// Modbus function code -> label (the specification's names).
pub fn function_name(code: usize) -> String {
    let name = match code {
        1 => "read_coils",
        2 => "read_discrete_inputs",
        3 => "read_holding_registers",
        4 => "read_input_registers",
        5 => "write_single_coil",
        6 => "write_single_register",
        7 => "read_exception_status",
        8 => "diagnostics",
        11 => "get_comm_event_counter",
        12 => "get_comm_event_log",
        15 => "write_multiple_coils",
        16 => "write_multiple_registers",
        17 => "report_server_id",
        20 => "read_file_record",
        21 => "write_file_record",
        22 => "mask_write_register",
        23 => "read_write_multiple_registers",
        24 => "read_fifo_queue",
        43 => "encapsulated_interface_transport",
        other => return format!("function_{other}"),
    };
    name.to_string()
}

/// Modbus exception code -> label. Code 0 collects codes 0 and >= 16.
pub fn exception_name(code: usize) -> String {
    let name = match code {
        0 => "other",
        1 => "illegal_function",
        2 => "illegal_data_address",
        3 => "illegal_data_value",
        4 => "server_device_failure",
        5 => "acknowledge",
        6 => "server_device_busy",
        7 => "negative_acknowledge",
        8 => "memory_parity_error",
        10 => "gateway_path_unavailable",
        11 => "gateway_target_failed",
        other => return format!("code_{other}"),
    };
    name.to_string()
}

/// One Modbus (side, function) with any request or reply.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModbusSeries {
    pub side: usize,
    pub function: usize,
    pub requests: u64,
    /// Replies matched to their request: latency sum and log2 buckets (us).
    pub sum_us: u64,
    pub buckets: [u64; BUCKETS],
}

/// Everything the probe counted since it was attached (cumulative).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProtocolReading {
    /// Connections by (protocol, side, payload), non-zero only.
    pub connections: Vec<(usize, usize, usize, u64)>,
    pub modbus: Vec<ModbusSeries>,
    /// Exception replies by (side, function, exception code), non-zero only.
    pub exceptions: Vec<(usize, usize, usize, u64)>,
    /// Per side: replies no pending request matched; requests given up
    /// without a reply (their transaction id used again, or pushed out by
    /// newer requests pending on the same connection).
    pub unmatched: [u64; SIDES],
    pub abandoned: [u64; SIDES],
    /// TCP payload bytes [sent, received] by the TCP probe's port class
    /// (with the TCP probe on), and those classes.
    pub tcp_bytes: Option<([[u64; CLASSES]; 2], Arc<PortClasses>)>,
    /// Value events lost to a full ring, and ADUs with mapped registers
    /// refused in the kernel (VALUE_BADS order).
    pub values_lost: u64,
    pub values_bad: [u64; 3],
}

/// One value event of the kernel (struct ipp_value), borrowed from the ring.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueEvent<'a> {
    /// CLOCK_MONOTONIC, ns.
    pub ts_ns: u64,
    pub cookie: u64,
    pub server: [u8; 16],
    pub server_port: u16,
    pub tid: u16,
    pub start: u16,
    pub quantity: u16,
    pub kind: u8,
    pub unit: u8,
    pub function: u8,
    pub side: u8,
    pub data: &'a [u8],
    pub mask: &'a [u8],
}

/// IPP_VALUE_*.
pub const VALUE_READ: u8 = 0;
pub const VALUE_WRITE: u8 = 1;
pub const VALUE_WRITE_OK: u8 = 2;
pub const VALUE_WRITE_FAILED: u8 = 3;
/// IPP_VALUE_DATA (data bytes used at most), and struct ipp_value's
/// layout: a 48-byte header, then data and mask of 256 bytes each.
pub const VALUE_DATA: usize = 252;
const VALUE_ARRAY: usize = 256;
const VALUE_MASK_AT: usize = 48 + VALUE_ARRAY;
pub const VALUE_EVENT_BYTES: usize = VALUE_MASK_AT + VALUE_ARRAY;
/// Entries of ipp_tags (its max_entries).
pub const MAX_TAG_CHUNKS: usize = 4096;

impl<'a> ValueEvent<'a> {
    pub fn parse(b: &'a [u8]) -> Option<ValueEvent<'a>> {
        if b.len() < VALUE_EVENT_BYTES {
            return None;
        }
        let u16_at = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let len = usize::from(b[44]).min(VALUE_DATA);
        let mut server = [0u8; 16];
        server.copy_from_slice(&b[16..32]);
        Some(ValueEvent {
            ts_ns: u64_at(0),
            cookie: u64_at(8),
            server,
            server_port: u16_at(32),
            tid: u16_at(34),
            start: u16_at(36),
            quantity: u16_at(38),
            kind: b[40],
            unit: b[41],
            function: b[42],
            side: b[43],
            data: &b[48..48 + len],
            mask: &b[VALUE_MASK_AT..VALUE_MASK_AT + usize::from(u16_at(38)).div_ceil(8).min(VALUE_ARRAY)],
        })
    }
}

/// The system's page size: the smallest ring buffer.
pub fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u32
    } else {
        4096
    }
}

/// The kernel's tag filter: per (side, unit, table, address / 64) the
/// mapped addresses' bits, for the Modbus/TCP tags.
pub fn tag_chunks(map: &crate::values::tags::TagMap) -> std::collections::BTreeMap<[u8; 8], u64> {
    use crate::values::tags::Source;
    let mut out = std::collections::BTreeMap::new();
    for t in map.tcp() {
        let Source::Tcp { side, .. } = t.source else { continue };
        for a in u32::from(t.address)..u32::from(t.address) + u32::from(t.width()) {
            let chunk = (a >> 6).to_ne_bytes();
            let key = [side, t.unit_id, t.table as u8, 0, chunk[0], chunk[1], chunk[2], chunk[3]];
            *out.entry(key).or_insert(0u64) |= 1 << (a & 63);
        }
    }
    out
}

/// The mmapped cells, read-only for the agent.
struct Cells {
    mem: super::MappedArray,
}

impl Cells {
    fn map(map: &MapData) -> Result<Cells, ProbeError> {
        Ok(Cells { mem: super::MappedArray::map(map, CELLS * 8, false, "protocol counters")? })
    }

    fn get(&self, i: usize) -> u64 {
        assert!(i < CELLS && (i + 1) * 8 <= self.mem.len());
        // SAFETY: within the mapping, 8-byte aligned (page start + 8 i);
        // the kernel only adds to cells atomically.
        unsafe { (*(self.mem.ptr() as *const AtomicU64).add(i)).load(Ordering::Relaxed) }
    }
}

pub struct ProtocolsProbe {
    cells: Cells,
    /// The value events (with Modbus/TCP tags).
    values: Option<RingBuf<MapData>>,
    /// TCP payload bytes by the TCP probe's classes, with those classes.
    bytes: Option<(PerCpuArray<MapData, u64>, Arc<PortClasses>)>,
    /// Where the programs are attached, for the logs and `edge-agent probes`.
    pub cgroup: PathBuf,
    _cells_map: MapData,
    // Owns the programs and their links; dropping it detaches them.
    ebpf: Ebpf,
}

/// The causes below an error's own message (aya's name the call only).
fn source_text(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

/// The port table the kernel side reads (index: port, value: IPP_PROTO_*).
pub fn port_table(cfg: &ProtocolsConfig) -> Box<[u8; 65536]> {
    let mut t = Box::new([0u8; 65536]);
    for (proto, ports) in [(1u8, &cfg.modbus_ports), (2, &cfg.mqtt_ports), (3, &cfg.opcua_ports)] {
        for p in ports {
            t[*p as usize] = proto;
        }
    }
    t
}

/// The cgroup v2 root: where /proc/self/mountinfo says it is mounted (a
/// mount of the hierarchy's root), or a new mount under /run/edge-agent.
pub fn cgroup2_root() -> Result<PathBuf, ProbeError> {
    let mounted = || find_cgroup2(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    if let Some(p) = mounted() {
        return Ok(p);
    }
    let dir = PathBuf::from("/run/edge-agent/cgroup2");
    std::fs::create_dir_all(&dir)
        .map_err(|e| ProbeError::Attach(format!("no cgroup v2 mount, and creating {} failed: {e}", dir.display())))?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let target = c(dir.to_str().unwrap_or_default());
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(c("cgroup2").as_ptr(), target.as_ptr(), c("cgroup2").as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        // Another process (a second agent, `edge-agent probes`) may have
        // mounted it between our look and our mount (then EBUSY): use its.
        let err = std::io::Error::last_os_error();
        if let Some(p) = mounted() {
            return Ok(p);
        }
        return Err(ProbeError::Attach(format!(
            "no cgroup v2 mount, and mounting one at {} failed: {} (needs CAP_SYS_ADMIN, or set probes.protocols.cgroup)",
            dir.display(),
            err
        )));
    }
    tracing::info!(at = %dir.display(), "mounted the cgroup v2 hierarchy");
    Ok(dir)
}

/// The mount point of the cgroup v2 hierarchy's root in a mountinfo text.
fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let f: Vec<&str> = pre.split(' ').collect();
        let mount = f.get(4)?;
        (post.split(' ').next() == Some("cgroup2") && f.get(3) == Some(&"/")).then(|| PathBuf::from(mount))
    })
}

impl ProtocolsProbe {
    /// Loads both programs with the port table and attaches them to the
    /// configured cgroup (default: the v2 root, i.e. every socket). With
    /// the TCP probe's `classes`, they count TCP payload bytes by class too.
    pub fn attach(
        cfg: &ProtocolsConfig,
        classes: Option<&PortClasses>,
        tags: &crate::values::tags::TagMap,
    ) -> Result<Self, ProbeError> {
        Self::attach_with(cfg, classes, tags, false)
    }

    /// For `edge-agent tags discover`: every register of every Modbus/TCP
    /// read and write reaches the ring, mapped or not.
    pub fn attach_discovering(cfg: &ProtocolsConfig) -> Result<Self, ProbeError> {
        Self::attach_with(cfg, None, &Default::default(), true)
    }

    fn attach_with(
        cfg: &ProtocolsConfig,
        classes: Option<&PortClasses>,
        tags: &crate::values::tags::TagMap,
        discover: bool,
    ) -> Result<Self, ProbeError> {
        let cgroup = match &cfg.cgroup {
            Some(p) => p.clone(),
            None => cgroup2_root()?,
        };
        let dir = std::fs::File::open(&cgroup)
            .map_err(|e| ProbeError::Attach(format!("cgroup {}: {e}", cgroup.display())))?;
        let table = port_table(cfg);
        let mut loader = super::loader::new();
        // No CO-RE in this object: it loads on kernels without BTF.
        loader.btf(None);
        loader.override_global("ipp_port_proto", table.as_ref(), true);
        let mut class_table = Box::new([0u8; 65536]);
        for (port, class) in classes.map_or(&[][..], |c| c.ports()) {
            class_table[*port as usize] = *class;
        }
        loader.override_global("ipp_port_class", class_table.as_ref(), true);
        let count_bytes = u32::from(classes.is_some());
        loader.override_global("ipp_count_bytes", &count_bytes, true);
        let chunks = tag_chunks(tags);
        if chunks.len() > MAX_TAG_CHUNKS {
            return Err(ProbeError::Load(format!(
                "the Modbus/TCP tags span {} blocks of 64 addresses, at most {MAX_TAG_CHUNKS}",
                chunks.len()
            )));
        }
        let capture = u32::from(!chunks.is_empty() || discover);
        loader.override_global("ipp_capture", &capture, true);
        let discovering = u32::from(discover);
        loader.override_global("ipp_discover", &discovering, true);
        if capture == 0 {
            // No tags: the ring stays one page (the programs never use it).
            loader.map_max_entries("ipp_values", page_size());
        }
        let mut ebpf =
            loader.load(&super::objects::object("protocols", OBJECT)).map_err(|e| ProbeError::Load(e.to_string()))?;
        if !chunks.is_empty() {
            let mut filter: BpfHashMap<_, [u8; 8], u64> = BpfHashMap::try_from(
                ebpf.map_mut("ipp_tags").ok_or_else(|| ProbeError::Load("map ipp_tags missing".into()))?,
            )
            .map_err(|e| ProbeError::Load(e.to_string()))?;
            for (k, bits) in &chunks {
                filter.insert(k, bits, 0).map_err(|e| ProbeError::Load(format!("ipp_tags: {e}")))?;
            }
        }
        for (name, attach_type) in PROGRAMS {
            let prog: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or_else(|| ProbeError::Load(format!("program {name} missing from object")))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| ProbeError::Load(e.to_string()))?;
            prog.load().map_err(|e| ProbeError::Load(super::tcp_lifecycle::verifier_text(&e)))?;
            // On 5.7+ aya attaches with a bpf_link, which always runs
            // alongside whatever else is attached there (systemd's own
            // programs, container runtimes') and takes no flags: the kernel
            // refuses BPF_F_ALLOW_MULTI on a link with EINVAL, so "Single"
            // is the mode that works. Before 5.7 it would be an exclusive
            // attach; the oldest kernel we target (Jetson's 5.10) has links.
            prog.attach(&dir, attach_type, CgroupAttachMode::Single)
                .map_err(|e| ProbeError::Attach(format!("cgroup {}: {e}: {}", cgroup.display(), source_text(&e))))?;
        }
        let cells_map = match ebpf.take_map("ipp_cells") {
            Some(Map::Array(m)) => m,
            _ => return Err(ProbeError::Load("map ipp_cells missing or not an array".into())),
        };
        let cells = Cells::map(&cells_map)?;
        let bytes = match (classes, ebpf.take_map("ipp_bytes")) {
            (None, _) => None,
            (Some(c), Some(m)) => {
                Some((PerCpuArray::try_from(m).map_err(|e| ProbeError::Load(e.to_string()))?, Arc::new(c.clone())))
            }
            (Some(_), None) => return Err(ProbeError::Load("map ipp_bytes missing".into())),
        };
        let values = match capture {
            0 => None,
            _ => Some(
                RingBuf::try_from(
                    ebpf.take_map("ipp_values").ok_or_else(|| ProbeError::Load("map ipp_values missing".into()))?,
                )
                .map_err(|e| ProbeError::Load(e.to_string()))?,
            ),
        };
        Ok(ProtocolsProbe { cells, values, bytes, cgroup, _cells_map: cells_map, ebpf })
    }

    /// A descriptor that is readable when value events wait (None without
    /// Modbus/TCP tags).
    pub fn values_fd(&self) -> Option<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        self.values.as_ref().and_then(|r| r.as_fd().try_clone_to_owned().ok())
    }

    /// Hands every waiting value event to `f`.
    pub fn drain_values(&mut self, mut f: impl FnMut(&ValueEvent)) {
        let Some(ring) = self.values.as_mut() else { return };
        while let Some(item) = ring.next() {
            if let Some(ev) = ValueEvent::parse(&item) {
                f(&ev);
            }
        }
    }

    /// Run statistics of both programs together.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        ProgramStats::of(PROBE, PROGRAMS.iter().map(|(name, _)| self.ebpf.program(name))).into_iter().collect()
    }

    pub fn read(&self) -> Result<ProtocolReading, ProbeError> {
        let mut r = read_cells(|i| self.cells.get(i));
        if let Some((map, classes)) = &self.bytes {
            let mut b = [[0u64; CLASSES]; 2];
            for slot in 0..BYTE_SLOTS {
                let per_cpu = map.get(&(slot as u32), 0).map_err(|e| ProbeError::Read(e.to_string()))?;
                b[slot / CLASSES][slot % CLASSES] = per_cpu.iter().sum();
            }
            r.tcp_bytes = Some((b, classes.clone()));
        }
        Ok(r)
    }
}

/// Decodes the cells (`get(i)` is cell i) into a reading.
pub fn read_cells(get: impl Fn(usize) -> u64) -> ProtocolReading {
    let mut r = ProtocolReading::default();
    for proto in 1..PROTOS {
        for side in 0..SIDES {
            for payload in 0..PAYLOADS {
                let n = get(CELL_CONN + (proto * SIDES + side) * PAYLOADS + payload);
                if n > 0 {
                    r.connections.push((proto, side, payload, n));
                }
            }
        }
    }
    for side in 0..SIDES {
        for function in 0..FUNCTIONS {
            let base = CELL_FN + (side * FUNCTIONS + function) * FN_CELLS;
            let mut s = ModbusSeries {
                side,
                function,
                requests: get(base + FN_REQUESTS),
                sum_us: get(base + FN_SUM_US),
                ..Default::default()
            };
            for (b, v) in s.buckets.iter_mut().enumerate() {
                *v = get(base + FN_BUCKET0 + b);
            }
            if s.requests > 0 || s.buckets.iter().any(|&b| b > 0) {
                r.modbus.push(s);
            }
            for code in 0..EXC_CODES {
                let n = get(CELL_EXC + (side * FUNCTIONS + function) * EXC_CODES + code);
                if n > 0 {
                    r.exceptions.push((side, function, code, n));
                }
            }
        }
        r.unmatched[side] = get(CELL_UNMATCHED + side);
        r.abandoned[side] = get(CELL_ABANDONED + side);
    }
    r.values_lost = get(CELL_VALUE_LOST);
    for (i, v) in r.values_bad.iter_mut().enumerate() {
        *v = get(CELL_VALUE_BAD + i);
    }
    r
}

impl super::Probe for ProtocolsProbe {
    const NAME: &'static str = PROBE;
    type Config = ProtocolsConfig;
    type Reading = ProtocolReading;
    type Metrics = ();
    type Seen = ();

    fn enabled(cfg: &crate::config::Config) -> bool {
        cfg.probes.protocols.enabled
    }

    fn not_loaded(_: &crate::config::Config, why: &super::ProbeState) -> Vec<(&'static str, super::ProbeState)> {
        vec![(PROBE, why.clone())]
    }

    fn start(cfg: &crate::config::Config, started: &super::Probes) -> Result<Self, ProbeError> {
        // The TCP probe's port classes, for TCP payload bytes: counted only
        // when the TCP probe runs (the window labels them with its classes).
        let tags = cfg.tag_map().unwrap_or_default();
        let classes = started.tcp_lifecycle.as_ref().map(super::TcpLifecycleProbe::classes);
        let p = ProtocolsProbe::attach(&cfg.probes.protocols, classes, &tags)?;
        tracing::info!(cgroup = %p.cgroup.display(), "protocol probe attached");
        Ok(p)
    }

    fn states(&self) -> Vec<(&'static str, super::ProbeState)> {
        vec![(PROBE, super::ProbeState::Attached)]
    }

    fn program_stats(&self) -> Vec<ProgramStats> {
        ProtocolsProbe::program_stats(self)
    }

    fn reading(&self) -> Result<ProtocolReading, ProbeError> {
        self.read()
    }

    fn register(_: &(), _: &mut prometheus_client::registry::Registry) {}

    fn series(reading: &ProtocolReading, _: &mut (), out: &mut super::series::Samples) {
        series::series(reading, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::header_define;

    #[test]
    fn classes_agree_with_the_tcp_probe() {
        assert_eq!(CLASSES, crate::probe::tcp_lifecycle::CLASSES);
    }

    #[test]
    fn constants_match_the_c_header() {
        let h = include_str!("../../../ebpf/include/protocols.h");
        for (name, v) in [
            ("IPP_PROTOS", PROTOS),
            ("IPP_SIDES", SIDES),
            ("IPP_PAYLOADS", PAYLOADS),
            ("IPP_FUNCTIONS", FUNCTIONS),
            ("IPP_EXC_CODES", EXC_CODES),
            ("IPP_BUCKETS", BUCKETS),
            ("IPP_FN_REQUESTS", FN_REQUESTS),
            ("IPP_FN_SUM_US", FN_SUM_US),
            ("IPP_FN_BUCKET0", FN_BUCKET0),
            ("IPP_FN_CELLS", FN_CELLS),
            ("IPP_CELL_CONN", CELL_CONN),
            ("IPP_CELL_FN", CELL_FN),
            ("IPP_CELL_EXC", CELL_EXC),
            ("IPP_CELL_UNMATCHED", CELL_UNMATCHED),
            ("IPP_CELL_ABANDONED", CELL_ABANDONED),
            ("IPP_CELLS", CELLS),
            ("IPP_CELL_VALUE_LOST", CELL_VALUE_LOST),
            ("IPP_CELL_VALUE_BAD", CELL_VALUE_BAD),
            ("IPP_BADS", VALUE_BADS.len()),
            ("IPP_BAD_LENGTH", 0),
            ("IPP_BAD_PARTIAL", 1),
            ("IPP_BAD_VALUE", 2),
            ("IPP_VALUE_DATA", VALUE_DATA),
            ("IPP_VALUE_READ", VALUE_READ as usize),
            ("IPP_VALUE_WRITE", VALUE_WRITE as usize),
            ("IPP_VALUE_WRITE_OK", VALUE_WRITE_OK as usize),
            ("IPP_VALUE_WRITE_FAILED", VALUE_WRITE_FAILED as usize),
            ("IPP_TABLE_COIL", crate::values::tags::Table::Coil as usize),
            ("IPP_TABLE_DISCRETE_INPUT", crate::values::tags::Table::DiscreteInput as usize),
            ("IPP_TABLE_HOLDING", crate::values::tags::Table::Holding as usize),
            ("IPP_TABLE_INPUT", crate::values::tags::Table::Input as usize),
            ("IPP_PROTO_MODBUS", 1),
            ("IPP_PROTO_MQTT", 2),
            ("IPP_PROTO_OPCUA", 3),
            ("IPP_PENDING", PENDING),
            ("IPP_CLASSES", CLASSES),
            ("IPP_BYTE_SLOTS", BYTE_SLOTS),
            ("IPP_FLOW_SENT", 0),
            ("IPP_FLOW_RECEIVED", 1),
            ("IPP_SIDE_CLIENT", 0),
            ("IPP_SIDE_SERVER", 1),
            ("IPP_PAYLOAD_MATCHED", 0),
            ("IPP_PAYLOAD_TLS", 1),
            ("IPP_PAYLOAD_OTHER", 2),
        ] {
            assert_eq!(header_define(h, name), v, "{name}");
        }
    }

    #[test]
    fn port_table_marks_each_protocols_ports() {
        let t = port_table(&ProtocolsConfig::default());
        assert_eq!((t[502], t[1883], t[8883], t[4840]), (1, 2, 2, 3));
        assert_eq!(t.iter().filter(|&&p| p != 0).count(), 4);
    }

    #[test]
    fn finds_the_cgroup2_root_mount_only() {
        let info = "\
30 24 0:26 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
35 30 0:30 /machine.slice /sys/fs/cgroup/sub rw - cgroup2 cgroup2 rw
36 30 0:30 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(find_cgroup2(info), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(find_cgroup2("30 24 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"), None);
    }

    #[test]
    fn cells_decode_to_series() {
        let mut cells = vec![0u64; CELLS];
        cells[CELL_CONN + (SIDES + 1) * PAYLOADS + 2] = 4; // modbus, server, other
        let base = CELL_FN + 3 * FN_CELLS; // client, read_holding_registers
        cells[base + FN_REQUESTS] = 5;
        cells[base + FN_SUM_US] = 1234;
        cells[base + FN_BUCKET0 + 7] = 5;
        cells[CELL_EXC + (FUNCTIONS + 6) * EXC_CODES + 2] = 1; // server, fc 6, code 2
        cells[CELL_UNMATCHED + 1] = 9;
        let r = read_cells(|i| cells[i]);
        assert_eq!(r.connections, vec![(1, 1, 2, 4)]);
        assert_eq!(r.modbus.len(), 1);
        assert_eq!((r.modbus[0].side, r.modbus[0].function, r.modbus[0].requests, r.modbus[0].sum_us), (0, 3, 5, 1234));
        assert_eq!(r.modbus[0].buckets[7], 5);
        assert_eq!(r.exceptions, vec![(1, 6, 2, 1)]);
        assert_eq!(r.unmatched, [0, 9]);
        assert_eq!(function_name(3), "read_holding_registers");
        assert_eq!(function_name(100), "function_100");
        assert_eq!(exception_name(2), "illegal_data_address");
    }
}
