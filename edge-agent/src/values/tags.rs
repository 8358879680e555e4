//! The tag map (`[[tags]]`, docs/process-values.md): which registers and
//! coils are process values, what they are called and how they read.
//! Parsed as written ([`TagConfig`]) and validated into a [`TagMap`] whose
//! errors name the tag and the key.

use edge_wire::{ValueCodec, ValueType};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Most tags in one map.
pub const MAX_TAGS: usize = 1024;

/// One `[[tags]]` entry as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagConfig {
    /// The tag's name: the `tag` label of its series.
    pub name: String,
    /// Unit of measure (`mm/s`, `bar`, `degC`): the `unit` label; "" none.
    #[serde(default)]
    pub unit: String,
    /// `modbus_tcp` or `modbus_rtu`.
    pub source: String,
    /// Modbus/TCP: the server's address or prefix (`10.0.0.5`,
    /// `10.0.0.0/24`), or a group of `probes.tcp_lifecycle.peers`; "" any.
    #[serde(default)]
    pub server: String,
    /// Modbus/TCP: the server's port (one of `probes.protocols.modbus_ports`).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Modbus/TCP: which end of the connection this box is: `client` (the
    /// box runs the HMI, SCADA or gateway that polls the PLC) or `server`
    /// (the box serves the registers).
    #[serde(default = "default_side")]
    pub side: String,
    /// Modbus RTU: the serial device's path or glob (`/dev/ttyUSB*`).
    #[serde(default)]
    pub device: String,
    /// The Modbus unit (slave) id.
    #[serde(default = "default_unit_id")]
    pub unit_id: u8,
    /// `coil`, `discrete_input`, `holding` or `input`.
    pub table: String,
    /// The first register's (or the coil's) address, 0-based as on the wire.
    pub address: u16,
    /// bool, u16, i16, u32, i32, u64, i64, f32, f64.
    #[serde(default = "default_type", rename = "type")]
    pub kind: String,
    /// Word and byte order of multi-register values: ABCD (big-endian, the
    /// Modbus convention), CDAB (words swapped), BADC (bytes swapped in each
    /// word), DCBA (both).
    #[serde(default = "default_order")]
    pub order: String,
    #[serde(default = "default_scale")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
}

fn default_port() -> u16 {
    502
}
fn default_side() -> String {
    "client".into()
}
fn default_unit_id() -> u8 {
    1
}
fn default_type() -> String {
    "u16".into()
}
fn default_order() -> String {
    "ABCD".into()
}
fn default_scale() -> f64 {
    1.0
}

/// A Modbus data table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Coil = 0,
    DiscreteInput = 1,
    Holding = 2,
    Input = 3,
}

impl Table {
    pub const ALL: [Table; 4] = [Table::Coil, Table::DiscreteInput, Table::Holding, Table::Input];

    pub fn name(self) -> &'static str {
        match self {
            Table::Coil => "coil",
            Table::DiscreteInput => "discrete_input",
            Table::Holding => "holding",
            Table::Input => "input",
        }
    }

    pub fn from_name(s: &str) -> Option<Table> {
        Self::ALL.into_iter().find(|t| t.name() == s)
    }

    /// Coils and discrete inputs hold bits; the others 16-bit registers.
    pub fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::DiscreteInput)
    }

    /// The table a function code reads or writes (functions 1-6, 15, 16).
    pub fn of_function(function: u8) -> Option<Table> {
        match function {
            1 | 5 | 15 => Some(Table::Coil),
            2 => Some(Table::DiscreteInput),
            3 | 6 | 16 => Some(Table::Holding),
            4 => Some(Table::Input),
            _ => None,
        }
    }
}

/// Word and byte order of a value spanning registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Abcd,
    Cdab,
    Badc,
    Dcba,
}

impl Order {
    pub const ALL: [Order; 4] = [Order::Abcd, Order::Cdab, Order::Badc, Order::Dcba];

    pub fn name(self) -> &'static str {
        match self {
            Order::Abcd => "ABCD",
            Order::Cdab => "CDAB",
            Order::Badc => "BADC",
            Order::Dcba => "DCBA",
        }
    }

    fn words_swapped(self) -> bool {
        matches!(self, Order::Cdab | Order::Dcba)
    }

    fn bytes_swapped(self) -> bool {
        matches!(self, Order::Badc | Order::Dcba)
    }

    /// The value's bits from its registers in address order (each as the
    /// two bytes on the wire, first byte high).
    pub fn assemble(self, words: &[u16]) -> u64 {
        let word = |w: u16| if self.bytes_swapped() { w.swap_bytes() } else { w };
        let mut bits = 0u64;
        if self.words_swapped() {
            for w in words.iter().rev() {
                bits = bits << 16 | u64::from(word(*w));
            }
        } else {
            for w in words {
                bits = bits << 16 | u64::from(word(*w));
            }
        }
        bits
    }
}

/// Where a tag's values are captured.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Tcp {
        /// Address prefixes the server must be in (IPv4-mapped IPv6 with
        /// the prefix length); empty: any server.
        servers: Vec<([u8; 16], u32)>,
        port: u16,
        /// 0 client, 1 server (the protocol probe's sides).
        side: u8,
    },
    Rtu {
        /// The device path or glob.
        device: String,
        /// `side = "client"`: the box is the master (writes requests).
        master: bool,
    },
}

/// A validated tag.
#[derive(Debug, Clone, PartialEq)]
pub struct Tag {
    pub name: String,
    pub unit: String,
    pub source: Source,
    pub unit_id: u8,
    pub table: Table,
    pub address: u16,
    pub order: Order,
    pub codec: ValueCodec,
}

impl Tag {
    /// Registers (or coils: 1) the tag spans.
    pub fn width(&self) -> u16 {
        if self.table.is_bits() {
            1
        } else {
            self.codec.kind.registers()
        }
    }

    /// The series its values go to.
    pub fn key(&self) -> edge_wire::SeriesKey {
        self.key_named(super::VALUE_SERIES)
    }

    pub fn key_named(&self, name: &str) -> edge_wire::SeriesKey {
        let mut labels = vec![edge_wire::Label::new("tag", self.name.clone())];
        if !self.unit.is_empty() {
            labels.push(edge_wire::Label::new("unit", self.unit.clone()));
        }
        edge_wire::SeriesKey::new(name, labels)
    }
}

/// The validated tag map, indexed by (unit id, table) for capture.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TagMap {
    pub tags: Vec<Tag>,
    /// (is RTU, unit id, table) -> tag indexes sorted by address.
    index: BTreeMap<(bool, u8, Table), Vec<usize>>,
}

/// What the tag map is checked against: the rest of the config.
pub struct Context<'a> {
    pub modbus_ports: &'a [u16],
    pub peers: &'a BTreeMap<String, Vec<String>>,
}

fn valid_tag_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

impl TagMap {
    pub fn build(configs: &[TagConfig], cx: &Context) -> Result<TagMap, String> {
        if configs.len() > MAX_TAGS {
            return Err(format!("tags: {} tags, at most {MAX_TAGS}", configs.len()));
        }
        let mut tags = Vec::with_capacity(configs.len());
        let mut names = BTreeMap::new();
        for (i, c) in configs.iter().enumerate() {
            let tag = build_tag(c, cx).map_err(|(key, e)| format!("tags[{i}] ({}): {key}: {e}", c.name))?;
            if let Some(prev) = names.insert(c.name.clone(), i) {
                return Err(format!("tags[{i}] ({}): name: already used by tags[{prev}]", c.name));
            }
            tags.push(tag);
        }
        // Two tags on the same registers of the same source would each
        // read half of what the other means, or the same twice: refused.
        for (i, a) in tags.iter().enumerate() {
            for (j, b) in tags.iter().enumerate().skip(i + 1) {
                let same_place = a.source == b.source && a.unit_id == b.unit_id && a.table == b.table;
                let overlap =
                    a.address < b.address.saturating_add(b.width()) && b.address < a.address.saturating_add(a.width());
                if same_place && overlap {
                    return Err(format!(
                        "tags[{j}] ({}): address: registers {}..{} overlap tags[{i}] ({})",
                        b.name,
                        b.address,
                        u32::from(b.address) + u32::from(b.width()),
                        a.name
                    ));
                }
            }
        }
        let mut index: BTreeMap<(bool, u8, Table), Vec<usize>> = BTreeMap::new();
        for (i, t) in tags.iter().enumerate() {
            index.entry((matches!(t.source, Source::Rtu { .. }), t.unit_id, t.table)).or_default().push(i);
        }
        for v in index.values_mut() {
            v.sort_by_key(|&i| tags[i].address);
        }
        Ok(TagMap { tags, index })
    }

    pub fn is_empty(&self) -> bool {
        self.tags.is_empty()
    }

    /// The device globs of the Modbus RTU tags (each once).
    pub fn rtu_devices(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in &self.tags {
            if let Source::Rtu { device, .. } = &t.source {
                if !out.contains(device) {
                    out.push(device.clone());
                }
            }
        }
        out
    }

    /// Whether the box is the master on this serial device (the side of
    /// the first RTU tag whose glob matches it); None: no tag reads it.
    pub fn rtu_master(&self, device: &str) -> Option<bool> {
        self.tags.iter().find_map(|t| match &t.source {
            Source::Rtu { device: glob, master } if super::glob_matches(glob, device) => Some(*master),
            _ => None,
        })
    }

    /// The tags read from Modbus/TCP.
    pub fn tcp(&self) -> impl Iterator<Item = &Tag> {
        self.tags.iter().filter(|t| matches!(t.source, Source::Tcp { .. }))
    }

    /// The tags (by index) of (transport, unit, table) whose registers all
    /// lie in [start, start + quantity).
    pub fn covered(
        &self,
        rtu: bool,
        unit: u8,
        table: Table,
        start: u16,
        quantity: u16,
    ) -> impl Iterator<Item = usize> + '_ {
        let end = u32::from(start) + u32::from(quantity);
        self.index
            .get(&(rtu, unit, table))
            .map(|v| {
                let from = v.partition_point(|&i| self.tags[i].address < start);
                &v[from..]
            })
            .unwrap_or(&[])
            .iter()
            .copied()
            .take_while(move |&i| u32::from(self.tags[i].address) < end)
            .filter(move |&i| u32::from(self.tags[i].address) + u32::from(self.tags[i].width()) <= end)
    }
}

fn build_tag(c: &TagConfig, cx: &Context) -> Result<Tag, (&'static str, String)> {
    if !valid_tag_name(&c.name) {
        return Err(("name", "must be 1..=64 of [A-Za-z0-9_.:-]".into()));
    }
    if c.unit.len() > 32 || c.unit.chars().any(|ch| ch.is_control()) {
        return Err(("unit", "at most 32 bytes, no control characters".into()));
    }
    let table = Table::from_name(&c.table)
        .ok_or(("table", format!("{:?}: must be coil, discrete_input, holding or input", c.table)))?;
    let kind = ValueType::from_name(&c.kind)
        .ok_or(("type", format!("{:?}: must be bool, u16, i16, u32, i32, u64, i64, f32 or f64", c.kind)))?;
    if table.is_bits() && kind != ValueType::Bool {
        return Err(("type", format!("a {} holds one bit: the type must be bool", table.name())));
    }
    let order = Order::ALL
        .into_iter()
        .find(|o| o.name() == c.order)
        .ok_or(("order", format!("{:?}: must be ABCD, CDAB, BADC or DCBA", c.order)))?;
    let codec = ValueCodec { kind, scale: c.scale, offset: c.offset };
    if !c.scale.is_finite() || c.scale == 0.0 {
        return Err(("scale", "must be a finite number other than 0".into()));
    }
    if !c.offset.is_finite() {
        return Err(("offset", "must be a finite number".into()));
    }
    let width = if table.is_bits() { 1 } else { kind.registers() };
    if u32::from(c.address) + u32::from(width) > 65536 {
        return Err(("address", format!("{} registers from {} pass the end of the table (65535)", width, c.address)));
    }
    let source = match c.source.as_str() {
        "modbus_tcp" => {
            if !c.device.is_empty() {
                return Err(("device", "is for modbus_rtu tags; a modbus_tcp tag names server and port".into()));
            }
            if !cx.modbus_ports.contains(&c.port) {
                return Err((
                    "port",
                    format!("{} is not in probes.protocols.modbus_ports {:?}: add it there", c.port, cx.modbus_ports),
                ));
            }
            let side = match c.side.as_str() {
                "client" => 0,
                "server" => 1,
                other => return Err(("side", format!("{other:?}: must be client or server"))),
            };
            let servers = if c.server.is_empty() {
                vec![]
            } else if let Some(list) = cx.peers.get(&c.server) {
                list.iter()
                    .map(|p| crate::config::parse_prefix(p))
                    .collect::<Result<_, _>>()
                    .map_err(|e| ("server", e))?
            } else {
                vec![crate::config::parse_prefix(&c.server)
                    .map_err(|e| ("server", format!("{e}; not a group of probes.tcp_lifecycle.peers either")))?]
            };
            Source::Tcp { servers, port: c.port, side }
        }
        "modbus_rtu" => {
            if !c.server.is_empty() {
                return Err(("server", "is for modbus_tcp tags; a modbus_rtu tag names its device".into()));
            }
            if !c.device.starts_with('/') || c.device.contains('\0') || c.device.len() >= 4096 {
                return Err(("device", format!("{:?}: must be an absolute path or glob (/dev/ttyUSB*)", c.device)));
            }
            if !(1..=247).contains(&c.unit_id) {
                return Err(("unit_id", format!("{}: a Modbus RTU slave address is 1..=247", c.unit_id)));
            }
            let master = match c.side.as_str() {
                "client" => true,
                "server" => false,
                other => return Err(("side", format!("{other:?}: must be client or server"))),
            };
            Source::Rtu { device: c.device.clone(), master }
        }
        other => return Err(("source", format!("{other:?}: must be modbus_tcp or modbus_rtu"))),
    };
    Ok(Tag {
        name: c.name.clone(),
        unit: c.unit.clone(),
        source,
        unit_id: c.unit_id,
        table,
        address: c.address,
        order,
        codec,
    })
}

/// Whether `addr` (IPv4-mapped IPv6) is in one of the prefixes (none: any).
pub fn server_matches(servers: &[([u8; 16], u32)], addr: &[u8; 16]) -> bool {
    servers.is_empty()
        || servers.iter().any(|(p, len)| {
            let full = (*len / 8) as usize;
            let rest = *len % 8;
            p[..full] == addr[..full] && (rest == 0 || (p[full] ^ addr[full]) >> (8 - rest) == 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(toml_text: &str) -> TagConfig {
        toml::from_str(toml_text).unwrap()
    }

    fn cx() -> (Vec<u16>, BTreeMap<String, Vec<String>>) {
        let mut peers = BTreeMap::new();
        peers.insert("plc".to_string(), vec!["10.0.0.0/24".to_string()]);
        (vec![502, 1502], peers)
    }

    fn build(tags: &[TagConfig]) -> Result<TagMap, String> {
        let (ports, peers) = cx();
        TagMap::build(tags, &Context { modbus_ports: &ports, peers: &peers })
    }

    const PUMP: &str = r#"
name = "pump1_pressure"
unit = "bar"
source = "modbus_tcp"
server = "plc"
table = "holding"
address = 100
type = "f32"
order = "CDAB"
"#;

    #[test]
    fn a_tag_reads_as_written_with_defaults() {
        let m = build(&[tag(PUMP)]).unwrap();
        let t = &m.tags[0];
        assert_eq!(
            (t.unit_id, t.table, t.address, t.order, t.codec.kind),
            (1, Table::Holding, 100, Order::Cdab, ValueType::F32)
        );
        assert_eq!(t.codec.scale, 1.0);
        let Source::Tcp { servers, port, side } = &t.source else { panic!() };
        assert_eq!((*port, *side, servers.len()), (502, 0, 1));
        assert_eq!(t.key().labels.len(), 2);
    }

    #[test]
    fn errors_name_the_tag_and_the_key() {
        let cases: &[(&str, &str)] = &[
            ("table = \"holdings\"", "tags[0] (pump1_pressure): table: \"holdings\""),
            ("type = \"float\"", "tags[0] (pump1_pressure): type:"),
            ("order = \"ABDC\"", "tags[0] (pump1_pressure): order:"),
            ("port = 503", "tags[0] (pump1_pressure): port: 503 is not in probes.protocols.modbus_ports"),
            ("server = \"plcs\"", "tags[0] (pump1_pressure): server:"),
            ("scale = 0.0", "tags[0] (pump1_pressure): scale:"),
            ("address = 65535", "tags[0] (pump1_pressure): address:"),
            ("side = \"both\"", "tags[0] (pump1_pressure): side:"),
            ("source = \"modbus\"", "tags[0] (pump1_pressure): source:"),
        ];
        for (change, want) in cases {
            let key = change.split(' ').next().unwrap();
            let text: String = PUMP
                .lines()
                .filter(|l| !l.starts_with(&format!("{key} ")))
                .chain(std::iter::once(*change))
                .collect::<Vec<_>>()
                .join("\n");
            let err = build(&[tag(&text)]).unwrap_err();
            assert!(err.starts_with(want), "{change}: {err}");
        }
        let coil = tag("name = \"run\"\nsource = \"modbus_tcp\"\ntable = \"coil\"\naddress = 1\ntype = \"u16\"");
        assert!(build(&[coil]).unwrap_err().contains("type: a coil holds one bit"));
        let rtu = tag("name = \"t\"\nsource = \"modbus_rtu\"\ndevice = \"dev/tty\"\ntable = \"input\"\naddress = 1");
        assert!(build(&[rtu]).unwrap_err().contains("device:"));
        let twice = build(&[tag(PUMP), tag(PUMP)]).unwrap_err();
        assert!(twice.contains("tags[1] (pump1_pressure): name: already used by tags[0]"), "{twice}");
        let mut other = tag(PUMP);
        other.name = "x".into();
        other.address = 101;
        assert!(build(&[tag(PUMP), other]).unwrap_err().contains("overlap"));
    }

    #[test]
    fn orders_put_words_and_bytes_in_place() {
        // 0x11223344 in registers under each order.
        let cases = [
            (Order::Abcd, [0x1122, 0x3344]),
            (Order::Cdab, [0x3344, 0x1122]),
            (Order::Badc, [0x2211, 0x4433]),
            (Order::Dcba, [0x4433, 0x2211]),
        ];
        for (o, words) in cases {
            assert_eq!(o.assemble(&words), 0x1122_3344, "{}", o.name());
        }
        assert_eq!(Order::Cdab.assemble(&[0x7788, 0x5566, 0x3344, 0x1122]), 0x1122_3344_5566_7788);
        assert_eq!(Order::Badc.assemble(&[0x3412]), 0x1234);
    }

    #[test]
    fn covered_finds_whole_tags_in_a_range() {
        let mut a = tag(PUMP);
        a.address = 10; // f32: 10, 11
        let mut b = tag(PUMP);
        b.name = "b".into();
        b.address = 12;
        b.kind = "u16".into();
        let m = build(&[a, b]).unwrap();
        let got = |s, q| m.covered(false, 1, Table::Holding, s, q).collect::<Vec<_>>();
        assert_eq!(got(0, 20), vec![0, 1]);
        assert_eq!(got(11, 5), vec![1], "half of the f32 is not a value");
        assert_eq!(got(10, 2), vec![0]);
        assert!(m.covered(true, 1, Table::Holding, 0, 100).next().is_none());
    }

    #[test]
    fn servers_match_by_prefix() {
        let p = vec![crate::config::parse_prefix("10.0.0.0/24").unwrap()];
        let a = |s: &str| crate::config::parse_prefix(s).unwrap().0;
        assert!(server_matches(&p, &a("10.0.0.9")));
        assert!(!server_matches(&p, &a("10.0.1.9")));
        assert!(server_matches(&[], &a("10.0.1.9")));
    }
}
