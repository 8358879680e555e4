//! Values stage (docs/process-values.md): the registers and coils of the
//! tag map, captured passively from Modbus/TCP (the protocol probe's value
//! events) and Modbus RTU (the serial bytes of watched devices), become
//! samples at their capture time, held until the window closes; then each
//! tag's samples go to the store as a value series, with the window's
//! statistics per tag.
//!
//! Pure: events in, samples and counts out; the probe reads the kernel.

pub mod discover;
pub mod discover_driver;
pub mod metrics;
pub mod rtu;
pub mod tags;

use edge_wire::{Label, SeriesKey, ValueSeries};
use std::collections::HashMap;
use tags::{Source, Table, TagMap};

/// The series of every captured value: `edge_process_value{tag, unit}`.
pub const VALUE_SERIES: &str = "edge_process_value";
/// Per window and tag: how many values were captured, and their mean,
/// min, max and last (scaled as the series).
pub const STAT_SERIES: [(&str, Stat); 5] = [
    ("edge_process_value_count", Stat::Count),
    ("edge_process_value_mean", Stat::Mean),
    ("edge_process_value_min", Stat::Min),
    ("edge_process_value_max", Stat::Max),
    ("edge_process_value_last", Stat::Last),
];
/// Values captured, by transport (`modbus_tcp`, `modbus_rtu`).
pub const CAPTURED_SERIES: &str = "edge_agent_values_captured_total";
/// Values (or frames that would have carried values) refused, by reason.
pub const REFUSED_SERIES: &str = "edge_agent_values_refused_total";

/// Most samples one tag keeps in one window (500 a second over 10 s).
pub const MAX_PER_TAG: usize = 5000;
/// Most samples held across all tags until the window closes.
pub const MAX_HELD: usize = 100_000;
/// Captured writes awaiting their reply.
pub const MAX_PENDING_WRITES: usize = 1024;
/// A captured write with no reply after this long is given up.
pub const WRITE_REPLY_MS: i64 = 30_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stat {
    Count,
    Mean,
    Min,
    Max,
    Last,
}

/// Why a value (or a frame or reply that would carry one) was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Byte count, quantity and length of a Modbus ADU or RTU frame disagree.
    Length,
    /// A Modbus/TCP ADU continued in the next TCP segment.
    Partial,
    /// A write single coil with a value other than FF00 or 0000.
    CoilValue,
    /// The kernel's event ring was full.
    RingFull,
    /// A write the server answered with an exception (the write did not
    /// happen), or an RTU reply that is an exception.
    Exception,
    /// A write whose reply never came.
    NoReply,
    /// A second value of the tag with the same millisecond.
    SameTime,
    /// More than MAX_PER_TAG values of one tag in a window.
    TagRate,
    /// More than MAX_HELD values held in a window.
    BufferFull,
    /// An RTU frame whose CRC is wrong.
    Crc,
    /// An RTU reply that follows no request it answers (unit, function).
    Unpaired,
}

impl Refusal {
    pub const ALL: [Refusal; 11] = [
        Refusal::Length,
        Refusal::Partial,
        Refusal::CoilValue,
        Refusal::RingFull,
        Refusal::Exception,
        Refusal::NoReply,
        Refusal::SameTime,
        Refusal::TagRate,
        Refusal::BufferFull,
        Refusal::Crc,
        Refusal::Unpaired,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refusal::Length => "length",
            Refusal::Partial => "partial",
            Refusal::CoilValue => "coil_value",
            Refusal::RingFull => "ring_full",
            Refusal::Exception => "exception",
            Refusal::NoReply => "no_reply",
            Refusal::SameTime => "same_time",
            Refusal::TagRate => "tag_rate",
            Refusal::BufferFull => "buffer_full",
            Refusal::Crc => "crc",
            Refusal::Unpaired => "unpaired",
        }
    }
}

/// Where a capture came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transport<'a> {
    /// Modbus/TCP: the server's address (IPv4-mapped IPv6) and port, and
    /// which end this box is (0 client, 1 server).
    Tcp { server: [u8; 16], port: u16, side: u8 },
    /// Modbus RTU on the serial device at this path.
    Rtu { device: &'a str },
}

/// One read reply or write request: `quantity` registers or coils of
/// `table` from `start`, in `data` as on the wire (registers two bytes
/// each, high first; coils one bit each, LSB first), `mask` (bit per
/// register or coil) saying which are there (None: all).
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    pub time_ms: i64,
    pub transport: Transport<'a>,
    pub unit: u8,
    pub table: Table,
    pub start: u16,
    pub quantity: u16,
    pub data: &'a [u8],
    pub mask: Option<&'a [u8]>,
}

fn bit(bytes: &[u8], i: usize) -> Option<bool> {
    bytes.get(i / 8).map(|b| (b >> (i % 8)) & 1 == 1)
}

impl TagMap {
    /// The (tag, raw value) pairs an access carries: every tag of its
    /// source wholly inside the range with all its registers present.
    pub fn values_of(&self, a: &Access) -> Vec<(usize, i64)> {
        let rtu = matches!(a.transport, Transport::Rtu { .. });
        let mut out = Vec::new();
        for i in self.covered(rtu, a.unit, a.table, a.start, a.quantity) {
            let t = &self.tags[i];
            let from_here = match (&t.source, a.transport) {
                (Source::Tcp { servers, port, side }, Transport::Tcp { server, port: p, side: s }) => {
                    *port == p && *side == s && tags::server_matches(servers, &server)
                }
                (Source::Rtu { device, .. }, Transport::Rtu { device: d }) => glob_matches(device, d),
                _ => false,
            };
            if !from_here {
                continue;
            }
            let first = usize::from(t.address - a.start);
            let width = usize::from(t.width());
            if let Some(mask) = a.mask {
                if !(first..first + width).all(|k| bit(mask, k) == Some(true)) {
                    continue;
                }
            }
            let raw = if a.table.is_bits() {
                match bit(a.data, first) {
                    Some(b) => i64::from(b),
                    None => continue,
                }
            } else {
                let Some(bytes) = a.data.get(first * 2..(first + width) * 2) else { continue };
                let words: heapless::Vec<u16, 4> =
                    bytes.chunks_exact(2).map(|w| u16::from_be_bytes([w[0], w[1]])).collect();
                t.codec.kind.raw_of_bits(t.order.assemble(&words))
            };
            out.push((i, raw));
        }
        out
    }
}

/// fnmatch(3) with FNM_PATHNAME: the tag's device glob against a path.
pub fn glob_matches(pattern: &str, path: &str) -> bool {
    if pattern == path {
        return true;
    }
    let (Ok(p), Ok(s)) = (std::ffi::CString::new(pattern), std::ffi::CString::new(path)) else {
        return false;
    };
    // SAFETY: two NUL-terminated strings that outlive the call.
    unsafe { libc::fnmatch(p.as_ptr(), s.as_ptr(), libc::FNM_PATHNAME) == 0 }
}

/// A write request's values, kept until the server's reply says it took.
#[derive(Debug)]
struct PendingWrite {
    time_ms: i64,
    values: Vec<(usize, i64)>,
}

/// What the stage hands to the store when a window closes.
#[derive(Debug, Default)]
pub struct Closed {
    /// One series per tag with values, in tag order.
    pub series: Vec<ValueSeries>,
    /// Per tag statistics, and the stage's own counters.
    pub samples: Vec<(SeriesKey, f64)>,
}

#[derive(Debug, Default)]
pub struct ValuesStage {
    pub map: TagMap,
    held: Vec<Vec<(i64, i64)>>,
    held_total: usize,
    writes: HashMap<(u64, u16, u8, u8), PendingWrite>,
    /// Values captured since start: [modbus_tcp, modbus_rtu].
    pub captured: [u64; 2],
    /// Refusals since start, by reason (Refusal::ALL order).
    pub refused: [u64; Refusal::ALL.len()],
    kernel_prev: (u64, [u64; 3]),
    serial_prev: (u64, u64),
    /// Serial lines by (device, process).
    links: HashMap<(String, u32), rtu::Link>,
}

/// Serial lines followed at once (device, process); past it all start over.
pub const MAX_LINKS: usize = 256;

/// CLOCK_REALTIME - CLOCK_MONOTONIC now, in ns: what turns a BPF
/// timestamp (bpf_ktime_get_ns) into wall-clock time.
pub fn wall_minus_mono_ns() -> i64 {
    let ns = |id| {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(id, &mut ts) };
        ts.tv_sec * 1_000_000_000 + ts.tv_nsec
    };
    ns(libc::CLOCK_REALTIME) - ns(libc::CLOCK_MONOTONIC)
}

impl ValuesStage {
    pub fn new(map: TagMap) -> Self {
        let n = map.tags.len();
        ValuesStage { map, held: vec![Vec::new(); n], ..Default::default() }
    }

    pub fn refuse(&mut self, why: Refusal, n: u64) {
        let i = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.refused[i] += n;
    }

    pub fn refused(&self, why: Refusal) -> u64 {
        Refusal::ALL.iter().position(|r| *r == why).map_or(0, |i| self.refused[i])
    }

    /// A read's reply (or an RTU write whose reply came): its values.
    pub fn access(&mut self, a: &Access) {
        let values = self.map.values_of(a);
        let transport = usize::from(matches!(a.transport, Transport::Rtu { .. }));
        self.keep(a.time_ms, &values, transport);
    }

    /// A Modbus/TCP write request, identified by its connection (socket
    /// cookie) and MBAP fields; its values count once its reply comes.
    pub fn write_request(&mut self, conn: (u64, u16, u8, u8), a: &Access) {
        let values = self.map.values_of(a);
        if values.is_empty() {
            return;
        }
        if self.writes.len() >= MAX_PENDING_WRITES && !self.writes.contains_key(&conn) {
            self.refuse(Refusal::NoReply, values.len() as u64);
            return;
        }
        if let Some(old) = self.writes.insert(conn, PendingWrite { time_ms: a.time_ms, values }) {
            // Its transaction id was used again before a reply came.
            self.refuse(Refusal::NoReply, old.values.len() as u64);
        }
    }

    /// The reply to a captured write: `ok` unless it was an exception.
    pub fn write_reply(&mut self, conn: (u64, u16, u8, u8), ok: bool) {
        let Some(w) = self.writes.remove(&conn) else { return };
        if ok {
            self.keep(w.time_ms, &w.values, 0);
        } else {
            self.refuse(Refusal::Exception, w.values.len() as u64);
        }
    }

    fn keep(&mut self, t: i64, values: &[(usize, i64)], transport: usize) {
        for &(tag, raw) in values {
            let held = &mut self.held[tag];
            // Events of several CPUs may arrive a little out of order.
            let at = held.partition_point(|(ht, _)| *ht < t);
            let why = if held.get(at).is_some_and(|(ht, _)| *ht == t) {
                Some(Refusal::SameTime)
            } else if held.len() >= MAX_PER_TAG {
                Some(Refusal::TagRate)
            } else if self.held_total >= MAX_HELD {
                Some(Refusal::BufferFull)
            } else {
                None
            };
            match why {
                Some(r) => self.refuse(r, 1),
                None => {
                    held.insert(at, (t, raw));
                    self.held_total += 1;
                    self.captured[transport] += 1;
                }
            }
        }
    }

    /// One value event of the protocol probe; `wall_minus_mono_ns` turns
    /// its CLOCK_MONOTONIC time into wall-clock time.
    pub fn tcp_event(&mut self, ev: &crate::probe::protocols::ValueEvent, wall_minus_mono_ns: i64) {
        use crate::probe::protocols::{VALUE_READ, VALUE_WRITE, VALUE_WRITE_FAILED, VALUE_WRITE_OK};
        let time_ms = (ev.ts_ns as i64).saturating_add(wall_minus_mono_ns).div_euclid(1_000_000);
        let Some(table) = Table::of_function(ev.function) else { return };
        let a = Access {
            time_ms,
            transport: Transport::Tcp { server: ev.server, port: ev.server_port, side: ev.side },
            unit: ev.unit,
            table,
            start: ev.start,
            quantity: ev.quantity,
            data: ev.data,
            mask: Some(ev.mask),
        };
        let conn = (ev.cookie, ev.tid, ev.unit, ev.function);
        match ev.kind {
            VALUE_READ => self.access(&a),
            VALUE_WRITE => self.write_request(conn, &a),
            VALUE_WRITE_OK => self.write_reply(conn, true),
            VALUE_WRITE_FAILED => self.write_reply(conn, false),
            _ => {}
        }
    }

    /// The bytes one read() or write() of a captured serial device moved
    /// (`written`: the process wrote them), at `time_ms`.
    pub fn serial_bytes(&mut self, device: &str, tgid: u32, written: bool, data: &[u8], time_ms: i64) {
        let Some(master) = self.map.rtu_master(device) else { return };
        if self.links.len() >= MAX_LINKS && !self.links.contains_key(&(device.to_string(), tgid)) {
            self.links.clear();
        }
        let link = self.links.entry((device.to_string(), tgid)).or_insert_with(|| rtu::Link::new(master));
        let exchanges = link.bytes(time_ms, written, data);
        let refused = link.take_refusals();
        for r in refused {
            self.refuse(r, 1);
        }
        for x in exchanges {
            let a = Access {
                time_ms: x.time_ms,
                transport: Transport::Rtu { device },
                unit: x.unit,
                table: x.table,
                start: x.start,
                quantity: x.quantity,
                data: &x.data,
                mask: None,
            };
            self.access(&a);
        }
    }

    /// The device probe's serial capture counts (cumulative since it
    /// attached): events lost to a full ring, reads or writes cut.
    pub fn serial_kernel_counts(&mut self, lost: u64, cut: u64) {
        let (plost, pcut) = self.serial_prev;
        let d = |now: u64, prev: u64| if now >= prev { now - prev } else { now };
        self.refuse(Refusal::RingFull, d(lost, plost));
        self.refuse(Refusal::Length, d(cut, pcut));
        self.serial_prev = (lost, cut);
    }

    /// The protocol probe's own refusals (cumulative since it attached;
    /// a reloaded probe counts from 0 again).
    pub fn kernel_counts(&mut self, lost: u64, bad: [u64; 3]) {
        let (plost, pbad) = self.kernel_prev;
        let d = |now: u64, prev: u64| if now >= prev { now - prev } else { now };
        self.refuse(Refusal::RingFull, d(lost, plost));
        for (i, why) in crate::probe::protocols::VALUE_BADS.iter().enumerate() {
            self.refuse(*why, d(bad[i], pbad[i]));
        }
        self.kernel_prev = (lost, bad);
    }

    /// Values held for the window being closed.
    pub fn held(&self) -> usize {
        self.held_total
    }

    /// Closes the window at `now_ms`: the held samples as value series,
    /// their statistics, and the stage's counters.
    pub fn close(&mut self, now_ms: i64) -> Closed {
        let stale: Vec<_> =
            self.writes.iter().filter(|(_, w)| w.time_ms < now_ms - WRITE_REPLY_MS).map(|(k, _)| *k).collect();
        for k in stale {
            if let Some(w) = self.writes.remove(&k) {
                self.refuse(Refusal::NoReply, w.values.len() as u64);
            }
        }
        let mut out = Closed::default();
        for (i, tag) in self.map.tags.iter().enumerate() {
            let samples = std::mem::take(&mut self.held[i]);
            let values: Vec<f64> = samples.iter().map(|(_, r)| tag.codec.value(*r)).collect();
            for (name, stat) in STAT_SERIES {
                let v = match stat {
                    Stat::Count => values.len() as f64,
                    _ if values.is_empty() => continue,
                    Stat::Mean => values.iter().sum::<f64>() / values.len() as f64,
                    Stat::Min => values.iter().copied().fold(f64::INFINITY, f64::min),
                    Stat::Max => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    Stat::Last => values[values.len() - 1],
                };
                out.samples.push((tag.key_named(name), v));
            }
            if !samples.is_empty() {
                out.series.push(ValueSeries { key: tag.key(), codec: tag.codec, samples });
            }
        }
        self.held_total = 0;
        if !self.map.is_empty() {
            for (t, n) in ["modbus_tcp", "modbus_rtu"].iter().zip(self.captured) {
                out.samples.push((SeriesKey::new(CAPTURED_SERIES, vec![Label::new("transport", *t)]), n as f64));
            }
            for (r, n) in Refusal::ALL.iter().zip(self.refused) {
                out.samples.push((SeriesKey::new(REFUSED_SERIES, vec![Label::new("reason", r.label())]), n as f64));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::tags::{Context, TagConfig};
    use super::*;
    use std::collections::BTreeMap;

    pub(crate) fn map(text: &str) -> TagMap {
        #[derive(serde::Deserialize)]
        struct F {
            tags: Vec<TagConfig>,
        }
        let f: F = toml::from_str(text).unwrap();
        TagMap::build(&f.tags, &Context { modbus_ports: &[502], peers: &BTreeMap::new() }).unwrap()
    }

    const TAGS: &str = r#"
[[tags]]
name = "speed"
source = "modbus_tcp"
table = "holding"
address = 10
type = "i16"
scale = 0.5
[[tags]]
name = "flow"
unit = "m3/h"
source = "modbus_tcp"
server = "10.0.0.5"
table = "holding"
address = 11
type = "f32"
order = "CDAB"
[[tags]]
name = "run"
source = "modbus_tcp"
table = "coil"
address = 3
type = "bool"
"#;

    fn tcp(server: [u8; 4]) -> Transport<'static> {
        let mut s = [0u8; 16];
        s[10] = 0xff;
        s[11] = 0xff;
        s[12..].copy_from_slice(&server);
        Transport::Tcp { server: s, port: 502, side: 0 }
    }

    fn access<'a>(
        t: i64,
        table: Table,
        start: u16,
        quantity: u16,
        data: &'a [u8],
        mask: Option<&'a [u8]>,
    ) -> Access<'a> {
        Access { time_ms: t, transport: tcp([10, 0, 0, 5]), unit: 1, table, start, quantity, data, mask }
    }

    #[test]
    fn a_reply_gives_every_mapped_tag_it_covers() {
        let mut st = ValuesStage::new(map(TAGS));
        let f = 12.5f32.to_bits();
        let (hi, lo) = ((f >> 16) as u16, f as u16);
        // Registers 10..14: speed = -4 (raw), flow (CDAB: low word first), 0.
        let mut data = vec![];
        for w in [(-4i16) as u16, lo, hi, 0] {
            data.extend_from_slice(&w.to_be_bytes());
        }
        st.access(&access(1000, Table::Holding, 10, 4, &data, Some(&[0b0111])));
        // Another server: flow is not its tag; speed (any server) is.
        let mut other = access(2000, Table::Holding, 10, 4, &data, None);
        other.transport = tcp([10, 0, 0, 6]);
        st.access(&other);
        // Only the first register masked: flow is not all there.
        st.access(&access(3000, Table::Holding, 10, 4, &data, Some(&[0b0011])));
        st.access(&access(4000, Table::Coil, 0, 8, &[0b0000_1000], Some(&[0b0000_1000])));
        let closed = st.close(5000);
        let got: Vec<(&str, Vec<(i64, f64)>)> = closed
            .series
            .iter()
            .map(|s| (s.key.labels[0].value.as_str(), s.samples.iter().map(|(t, r)| (*t, s.codec.value(*r))).collect()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("speed", vec![(1000, -2.0), (2000, -2.0), (3000, -2.0)]),
                ("flow", vec![(1000, 12.5)]),
                ("run", vec![(4000, 1.0)])
            ]
        );
        let stat = |name: &str, tag: &str| {
            closed.samples.iter().find(|(k, _)| k.name == name && k.labels[0].value == tag).map(|(_, v)| *v)
        };
        assert_eq!(stat("edge_process_value_count", "speed"), Some(3.0));
        assert_eq!(stat("edge_process_value_mean", "flow"), Some(12.5));
        assert_eq!(st.captured, [5, 0]);
        // The next window starts empty; count 0 is still reported.
        let next = st.close(6000);
        assert!(next.series.is_empty());
        assert!(next.samples.iter().any(|(k, v)| k.name == "edge_process_value_count" && *v == 0.0));
        assert!(!next.samples.iter().any(|(k, _)| k.name == "edge_process_value_mean"));
    }

    #[test]
    fn writes_count_once_the_server_took_them() {
        let mut st = ValuesStage::new(map(TAGS));
        let w = access(1000, Table::Holding, 10, 1, &[0, 8], Some(&[1]));
        st.write_request((7, 1, 1, 6), &w);
        st.write_request((7, 2, 1, 6), &access(1100, Table::Holding, 10, 1, &[0, 9], Some(&[1])));
        st.write_request((7, 3, 1, 6), &access(1200, Table::Holding, 10, 1, &[0, 10], Some(&[1])));
        st.write_reply((7, 1, 1, 6), true);
        st.write_reply((7, 2, 1, 6), false);
        st.write_reply((8, 3, 1, 6), true); // another connection: not this write
        let c = st.close(1300);
        assert_eq!(c.series[0].samples, vec![(1000, 8)]);
        assert_eq!(st.refused(Refusal::Exception), 1);
        st.close(1200 + WRITE_REPLY_MS + 1);
        assert_eq!(st.refused(Refusal::NoReply), 1);
    }

    #[test]
    fn a_tag_never_has_two_values_at_one_time_and_out_of_order_events_sort() {
        let mut st = ValuesStage::new(map(TAGS));
        for t in [3000, 1000, 2000, 2000] {
            st.access(&access(t, Table::Holding, 10, 1, &[0, (t / 1000) as u8], None));
        }
        let c = st.close(4000);
        assert_eq!(c.series[0].samples, vec![(1000, 1), (2000, 2), (3000, 3)]);
        assert_eq!(st.refused(Refusal::SameTime), 1);
        for t in 0..(MAX_PER_TAG as i64 + 3) {
            st.access(&access(t, Table::Holding, 10, 1, &[0, 1], None));
        }
        assert_eq!(st.refused(Refusal::TagRate), 3);
    }

    #[test]
    fn globs_match_device_paths() {
        assert!(glob_matches("/dev/ttyUSB*", "/dev/ttyUSB0"));
        assert!(!glob_matches("/dev/ttyUSB*", "/dev/ttyS0"));
        assert!(glob_matches("/dev/pts/3", "/dev/pts/3"));
    }
}
