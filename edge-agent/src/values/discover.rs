//! `edge-agent tags discover`: which servers, units, tables and address
//! ranges are read and written on the wire right now, how often, and a few
//! recent values under each plausible type and word order, so that a tag
//! map can be written without the PLC's documentation. Pure: accesses in,
//! a report (text, or a starting tag map in TOML) out. What it prints stays
//! on the box (the terminal of whoever ran it); nothing is stored or sent.

use super::tags::{Order, Table};
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;

/// Recent values kept per register or coil.
pub const RECENT: usize = 6;

/// Where an access was seen: "modbus_tcp 10.0.0.5:502 (client)" or
/// "modbus_rtu /dev/ttyUSB0 (master)".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Place {
    pub source: String,
    pub unit: u8,
    pub table: Table,
}

#[derive(Debug, Default)]
struct Span {
    /// (start, quantity) -> (reads, writes).
    requests: BTreeMap<(u16, u16), (u64, u64)>,
    /// Address -> recent (time, raw register or bit).
    recent: BTreeMap<u16, VecDeque<(i64, u16)>>,
    first_ms: i64,
    last_ms: i64,
}

#[derive(Debug, Default)]
pub struct Discovery {
    spans: BTreeMap<Place, Span>,
    /// What the TOML of each place needs to name its source.
    sources: BTreeMap<Place, SourceKeys>,
}

/// The tag map keys that name a place's source.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceKeys {
    Tcp { server: String, port: u16, side: &'static str },
    Rtu { device: String, side: &'static str },
}

fn bit(bytes: &[u8], i: usize) -> Option<bool> {
    bytes.get(i / 8).map(|b| (b >> (i % 8)) & 1 == 1)
}

impl Discovery {
    /// One read reply or write request of `quantity` registers or coils
    /// from `start`, `data` as on the wire.
    #[allow(clippy::too_many_arguments)]
    pub fn observe(
        &mut self,
        place: Place,
        keys: SourceKeys,
        start: u16,
        quantity: u16,
        data: &[u8],
        written: bool,
        time_ms: i64,
    ) {
        self.sources.entry(place.clone()).or_insert(keys);
        let table = place.table;
        let span = self.spans.entry(place).or_insert_with(|| Span { first_ms: time_ms, ..Default::default() });
        span.last_ms = span.last_ms.max(time_ms);
        let r = span.requests.entry((start, quantity)).or_default();
        if written {
            r.1 += 1;
        } else {
            r.0 += 1;
        }
        for i in 0..usize::from(quantity) {
            let v = if table.is_bits() {
                match bit(data, i) {
                    Some(b) => u16::from(b),
                    None => break,
                }
            } else {
                match data.get(i * 2..i * 2 + 2) {
                    Some(w) => u16::from_be_bytes([w[0], w[1]]),
                    None => break,
                }
            };
            let Some(addr) = start.checked_add(i as u16) else { break };
            let q = span.recent.entry(addr).or_default();
            if q.len() == RECENT {
                q.pop_front();
            }
            q.push_back((time_ms, v));
        }
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// The human report.
    pub fn text(&self) -> String {
        let mut out = String::new();
        if self.spans.is_empty() {
            out.push_str(
                "no Modbus reads or writes seen: is the HMI polling? (Modbus/TCP on probes.protocols.modbus_ports; \
                 Modbus RTU on serial devices matching probes.devices.watch)\n",
            );
        }
        for (place, span) in &self.spans {
            let secs = ((span.last_ms - span.first_ms) as f64 / 1000.0).max(1.0);
            let _ = writeln!(out, "{}, unit {}, {}:", place.source, place.unit, table_words(place.table));
            for ((start, qty), (reads, writes)) in &span.requests {
                let end = u32::from(*start) + u32::from(*qty) - 1;
                let what = match (reads, writes) {
                    (r, 0) => format!("read {r} times ({:.1}/s)", *r as f64 / secs),
                    (0, w) => format!("written {w} times ({:.1}/s)", *w as f64 / secs),
                    (r, w) => format!("read {r}, written {w} times"),
                };
                let _ = writeln!(out, "  addresses {start}..={end}: {what}");
            }
            for (addr, recent) in &span.recent {
                let vals: Vec<u16> = recent.iter().map(|(_, v)| *v).collect();
                if place.table.is_bits() {
                    let _ = writeln!(out, "    {addr:>5}  bool {vals:?}");
                    continue;
                }
                let i16s: Vec<i16> = vals.iter().map(|v| *v as i16).collect();
                let _ = write!(out, "    {addr:>5}  u16 {vals:?}");
                if i16s.iter().any(|v| *v < 0) {
                    let _ = write!(out, "  i16 {i16s:?}");
                }
                for (kind, order, values) in pairs(span, *addr) {
                    let _ = write!(out, "  {kind} {} {}", order.name(), short(&values));
                }
                out.push('\n');
            }
        }
        out
    }

    /// A starting tag map: one tag per register (u16, or i16 when it went
    /// negative), or per register pair that reads as a plausible f32 in
    /// one order; coils and discrete inputs as bool. Names say where.
    pub fn toml(&self) -> String {
        let mut out = String::from("# Written by `edge-agent tags discover --format toml`: a start. Rename the tags,\n# set their units, check types and orders against what the values should be.\n");
        for (place, span) in &self.spans {
            let keys = &self.sources[place];
            let mut skip = None;
            for (addr, recent) in &span.recent {
                if skip == Some(*addr) {
                    continue;
                }
                let (kind, order) = if place.table.is_bits() {
                    ("bool", None)
                } else if let Some((k, o, _)) = pairs(span, *addr).into_iter().find(|(k, _, _)| *k == "f32") {
                    skip = Some(addr + 1);
                    (k, Some(o))
                } else if recent.iter().any(|(_, v)| (*v as i16) < 0 && (*v as i16) > -1000) {
                    ("i16", None)
                } else {
                    ("u16", None)
                };
                let name = format!("u{}_{}_{}", place.unit, short_table(place.table), addr);
                let _ = writeln!(out, "\n[[tags]]\nname = \"{name}\"");
                match keys {
                    SourceKeys::Tcp { server, port, side } => {
                        let _ = writeln!(
                            out,
                            "source = \"modbus_tcp\"\nserver = \"{server}\"\nport = {port}\nside = \"{side}\""
                        );
                    }
                    SourceKeys::Rtu { device, side } => {
                        let _ = writeln!(out, "source = \"modbus_rtu\"\ndevice = \"{device}\"\nside = \"{side}\"");
                    }
                }
                let _ = writeln!(
                    out,
                    "unit_id = {}\ntable = \"{}\"\naddress = {addr}\ntype = \"{kind}\"",
                    place.unit,
                    place.table.name()
                );
                if let Some(o) = order {
                    let _ = writeln!(out, "order = \"{}\"", o.name());
                }
            }
        }
        out
    }
}

fn table_words(t: Table) -> &'static str {
    match t {
        Table::Coil => "coils",
        Table::DiscreteInput => "discrete inputs",
        Table::Holding => "holding registers",
        Table::Input => "input registers",
    }
}

fn short_table(t: Table) -> &'static str {
    match t {
        Table::Coil => "coil",
        Table::DiscreteInput => "di",
        Table::Holding => "hr",
        Table::Input => "ir",
    }
}

fn short(values: &[f64]) -> String {
    let v: Vec<String> = values.iter().map(|x| format!("{x:.4}")).collect();
    format!("[{}]", v.join(", "))
}

/// Plausible decodings of the registers `addr`, `addr + 1` read together:
/// an f32 in an order whose every recent value is finite, zero or of a
/// physical size (1e-3..1e6), changing by at most half between samples;
/// u32 in an order where the high word stays small. Best first.
fn pairs(span: &Span, addr: u16) -> Vec<(&'static str, Order, Vec<f64>)> {
    let (Some(a), Some(b)) = (span.recent.get(&addr), addr.checked_add(1).and_then(|n| span.recent.get(&n))) else {
        return vec![];
    };
    // Samples of both registers taken together (same time).
    let both: Vec<[u16; 2]> =
        a.iter().filter_map(|(t, va)| b.iter().find(|(tb, _)| tb == t).map(|(_, vb)| [*va, *vb])).collect();
    if both.len() < 2 || both.iter().all(|w| w == &[0, 0]) {
        return vec![];
    }
    let mut out = Vec::new();
    let range = |ws: &mut dyn Iterator<Item = u16>| {
        let v: Vec<u16> = ws.collect();
        v.iter().max().unwrap_or(&0) - v.iter().min().unwrap_or(&0)
    };
    for order in Order::ALL {
        let f: Vec<f64> = both.iter().map(|w| f64::from(f32::from_bits(order.assemble(w) as u32))).collect();
        let physical = f.iter().all(|x| x.is_finite() && (*x == 0.0 || (1e-3..1e6).contains(&x.abs())));
        let smooth = f.windows(2).all(|p| (p[1] - p[0]).abs() <= 0.5 * p[0].abs().max(p[1].abs()).max(1e-3));
        // A measured float's low word is noise (it spans much of its range)
        // while its high word (sign, exponent) barely moves; a word that
        // moves by a few counts is an integer of its own.
        let (low, high) = if matches!(order, Order::Abcd | Order::Badc) { (1, 0) } else { (0, 1) };
        let varies = f.windows(2).any(|p| p[0] != p[1]);
        let low_noise = range(&mut both.iter().map(|w| w[low])) > 1000;
        let high_steady = range(&mut both.iter().map(|w| w[high].swap_bytes())) < 256
            || range(&mut both.iter().map(|w| w[high])) < 256;
        if physical && smooth && (!varies || (low_noise && high_steady)) {
            out.push(("f32", order, f));
        }
    }
    for order in [Order::Abcd, Order::Cdab] {
        let u: Vec<u64> = both.iter().map(|w| order.assemble(w)).collect();
        if u.iter().all(|v| *v >= 0x1_0000 && *v < 0x100_0000) {
            out.push(("u32", order, u.iter().map(|v| *v as f64).collect()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn place(table: Table) -> Place {
        Place { source: "modbus_tcp 127.0.0.1:502 (client)".into(), unit: 1, table }
    }

    fn keys() -> SourceKeys {
        SourceKeys::Tcp { server: "127.0.0.1".into(), port: 502, side: "client" }
    }

    #[test]
    fn a_float_in_swapped_words_is_found_and_becomes_a_tag() {
        let mut d = Discovery::default();
        for i in 0..5 {
            let f = (6.2f32 + i as f32 * 0.01).to_bits();
            // Register 0: a u16 counting; 1..2: an f32 CDAB; 3: negative i16.
            let regs = [100 + i as u16, f as u16, (f >> 16) as u16, (-5i16 - i as i16) as u16];
            let data: Vec<u8> = regs.iter().flat_map(|r| r.to_be_bytes()).collect();
            d.observe(place(Table::Holding), keys(), 0, 4, &data, false, 1000 + i * 100);
        }
        d.observe(place(Table::Coil), keys(), 0, 2, &[0b10], true, 2000);
        let text = d.text();
        assert!(text.contains("addresses 0..=3: read 5 times"), "{text}");
        assert!(text.contains("f32 CDAB [6.2000"), "{text}");
        assert!(text.contains("i16 [-5, -6"), "{text}");
        let toml_text = d.toml();
        assert!(toml_text.contains("address = 1\ntype = \"f32\"\norder = \"CDAB\""), "{toml_text}");
        assert!(!toml_text.contains("address = 2\n"), "the float's second register is not a tag");
        assert!(toml_text.contains("address = 3\ntype = \"i16\""), "{toml_text}");
        // The starting map is a valid tag map.
        #[derive(serde::Deserialize)]
        struct F {
            tags: Vec<super::super::tags::TagConfig>,
        }
        let f: F = toml::from_str(&toml_text).unwrap();
        super::super::tags::TagMap::build(
            &f.tags,
            &super::super::tags::Context { modbus_ports: &[502], peers: &Default::default() },
        )
        .unwrap();
    }
}
