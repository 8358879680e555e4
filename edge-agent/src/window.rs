//! Window stage: turns one reading of the probes into the batch of samples
//! stored for that window. Pure; owns only which series it has emitted.

use crate::probe::buses::{self, BusReading};
use crate::probe::device_io::{self, DeviceReading};
use crate::probe::protocols::{self, ProtocolReading};
use crate::probe::tcp_idle::IdleCensus as TcpIdleCensus;
use crate::probe::tcp_lifecycle::{
    Hist, Kind, PeerCounters, PortClasses, TcpCounters, TcpHists, CLASSES, DIRS, DIR_NAMES, PEERS, PEER_METRICS,
};
use crate::probe::ProbeReading;
use edge_wire::{Label, SeriesKey};
use std::collections::BTreeSet;

/// One window's samples, all taken at `timestamp_ms`, and the process
/// values captured during it, each at its own time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub timestamp_ms: i64,
    pub samples: Vec<(SeriesKey, f64)>,
    pub values: Vec<edge_wire::ValueSeries>,
}

/// Remembers which series have ever been non-zero, so that once a series
/// exists it gets a sample every window (no gaps for Prometheus to read as
/// staleness) while never-seen label combinations cost nothing.
#[derive(Debug, Default)]
pub struct WindowStage {
    live_tcp: BTreeSet<usize>,
    live_hist: BTreeSet<usize>,
    /// (metric, direction, class) of the connection gauges once non-zero.
    live_conns: BTreeSet<(usize, usize, usize)>,
    /// (kind, direction, group) of the peer counters, and the groups whose
    /// connect latency histogram, once non-zero.
    live_peers: BTreeSet<(usize, usize, usize)>,
    live_peer_hist: BTreeSet<usize>,
}

/// A histogram's samples: cumulative `_bucket{le}` for log2 bounds of
/// `unit` (seconds per kernel unit), `_sum`, `_count`. `labels` must be
/// sorted by name; `le` is put in its place.
fn histogram(name: &str, labels: &[Label], buckets: &[u64], sum: u64, unit: f64, out: &mut Vec<(SeriesKey, f64)>) {
    let with_le = |le: String| {
        let mut l = labels.to_vec();
        let at = l.iter().position(|x| x.name.as_str() > "le").unwrap_or(l.len());
        l.insert(at, Label::new("le", le));
        l
    };
    let count: u64 = buckets.iter().sum();
    let mut cumulative = 0;
    for (b, n) in buckets.iter().enumerate().take(buckets.len() - 1) {
        cumulative += n;
        let le = (1u64 << (b + 1)) as f64 * unit;
        out.push((SeriesKey::new(format!("{name}_bucket"), with_le(format!("{le}"))), cumulative as f64));
    }
    out.push((SeriesKey::new(format!("{name}_bucket"), with_le("+Inf".into())), count as f64));
    out.push((SeriesKey::new(format!("{name}_sum"), labels.to_vec()), sum as f64 * unit));
    out.push((SeriesKey::new(format!("{name}_count"), labels.to_vec()), count as f64));
}

impl WindowStage {
    pub fn new() -> Self {
        Self::default()
    }

    /// The samples of the window ending at `timestamp_ms`, or `None` when
    /// there is nothing to say.
    pub fn close(
        &mut self,
        timestamp_ms: i64,
        reading: &ProbeReading,
        classes: Option<&PortClasses>,
    ) -> Option<Window> {
        let mut samples = Vec::new();
        if let (Some(tcp), Some(classes)) = (&reading.tcp, classes) {
            self.tcp_series(tcp, classes, &mut samples);
        }
        if let (Some(c), Some(classes)) = (&reading.tcp_idle, classes) {
            self.conn_series(c, classes, &mut samples);
        }
        if let Some(d) = &reading.devices {
            device_series(d, &mut samples);
        }
        if let Some(b) = &reading.buses {
            bus_series(b, &mut samples);
        }
        if let Some(p) = &reading.protocols {
            protocol_series(p, &mut samples);
            if let (Some(b), Some(classes)) = (&p.tcp_bytes, classes) {
                byte_series(b, classes, &mut samples);
            }
        }
        (!samples.is_empty()).then_some(Window { timestamp_ms, samples, values: Vec::new() })
    }

    fn tcp_series(&mut self, c: &TcpCounters, classes: &PortClasses, out: &mut Vec<(SeriesKey, f64)>) {
        for e in c.entries() {
            if e.value == 0 && !self.live_tcp.contains(&e.index) {
                continue;
            }
            let Some(class_name) = classes.name(e.class) else {
                continue;
            };
            self.live_tcp.insert(e.index);
            let labels = vec![Label::new("direction", e.direction), Label::new("port_class", class_name)];
            // CLOSE_WAIT: one gauge from the entries (sent with them) and exits.
            let value = match e.kind {
                Kind::CloseWaitLeft => continue,
                Kind::CloseWaitEntered => c.close_wait(e.index / CLASSES % DIRS, e.class),
                _ => e.value,
            };
            out.push((SeriesKey::new(e.kind.metric(), labels), value as f64));
        }
        self.hist_series(&c.hists, classes, out);
        if let Some(p) = &c.peers {
            self.peer_series(p, out);
        }
    }

    /// Per peer group: connections opened, failed, refused (outbound) and
    /// closed by direction, and the outbound connect latency. At most 15
    /// named groups plus "other" (the config's cap): a bounded number of
    /// series whatever the box talks to.
    fn peer_series(&mut self, p: &PeerCounters, out: &mut Vec<(SeriesKey, f64)>) {
        for (kind, metric) in PEER_METRICS.iter().enumerate() {
            for (dir, direction) in DIR_NAMES.iter().enumerate().take(2) {
                for group in 0..PEERS {
                    let v = p.values[dir * PEERS + group][kind];
                    if v == 0 && !self.live_peers.contains(&(kind, dir, group)) {
                        continue;
                    }
                    let Some(name) = p.names.get(group) else { continue };
                    self.live_peers.insert((kind, dir, group));
                    let labels = vec![Label::new("direction", *direction), Label::new("peer", name)];
                    out.push((SeriesKey::new(*metric, labels), v as f64));
                }
            }
        }
        for (group, slot) in p.connect.iter().enumerate() {
            if slot.count() == 0 && !self.live_peer_hist.contains(&group) {
                continue;
            }
            let Some(name) = p.names.get(group) else { continue };
            self.live_peer_hist.insert(group);
            let labels = [Label::new("direction", "outbound"), Label::new("peer", name)];
            histogram("edge_tcp_peer_connect_latency_seconds", &labels, &slot.buckets, slot.sum, 1e-6, out);
        }
    }

    /// Gauges of established and idle connections: a series once non-zero
    /// is sent every window after, 0 included (a gauge that vanished would
    /// read as "no data", not as "none idle").
    fn conn_series(&mut self, c: &TcpIdleCensus, classes: &PortClasses, out: &mut Vec<(SeriesKey, f64)>) {
        let metrics = [("edge_tcp_connections_established", &c.established), ("edge_tcp_connections_idle", &c.idle)];
        for (m, (name, values)) in metrics.iter().enumerate() {
            for (dir, row) in values.iter().enumerate() {
                for (class, &v) in row.iter().enumerate() {
                    if v == 0 && !self.live_conns.contains(&(m, dir, class)) {
                        continue;
                    }
                    let Some(class_name) = classes.name(class) else { continue };
                    self.live_conns.insert((m, dir, class));
                    let labels = vec![Label::new("direction", DIR_NAMES[dir]), Label::new("port_class", class_name)];
                    out.push((SeriesKey::new(*name, labels), v as f64));
                }
            }
        }
    }

    /// Prometheus histograms: cumulative `_bucket{le}` (log2 bounds), `_sum`
    /// in seconds, `_count`.
    fn hist_series(&mut self, h: &TcpHists, classes: &PortClasses, out: &mut Vec<(SeriesKey, f64)>) {
        for hist in Hist::ALL {
            for (dir, direction) in DIR_NAMES.iter().enumerate().take(2) {
                for class in 0..CLASSES {
                    let i = TcpHists::index(hist, dir, class);
                    let slot = &h.slots[i];
                    let count = slot.count();
                    if count == 0 && !self.live_hist.contains(&i) {
                        continue;
                    }
                    let Some(class_name) = classes.name(class) else { continue };
                    self.live_hist.insert(i);
                    let labels = [Label::new("direction", *direction), Label::new("port_class", class_name)];
                    histogram(hist.metric(), &labels, &slot.buckets, slot.sum, hist.unit(), out);
                }
            }
        }
    }
}

/// Device-file I/O: per (device, op, process) a latency histogram (its
/// `_count` is the number of operations), bytes for reads and writes, and
/// errors by errno. The kernel never drops a series once made, so every
/// series seen is in every later reading of the same probe.
fn device_series(d: &DeviceReading, out: &mut Vec<(SeriesKey, f64)>) {
    for s in &d.series {
        // "device" is the bridge's label (the box); the file is "file".
        let labels = [Label::new("file", &s.device), Label::new("op", s.op.name()), Label::new("process", &s.process)];
        histogram("edge_device_operation_seconds", &labels, &s.buckets, s.sum_us, 1e-6, out);
        if matches!(s.op, device_io::Op::Read | device_io::Op::Write) {
            out.push((SeriesKey::new("edge_device_bytes_total", labels.to_vec()), s.bytes as f64));
        }
    }
    for e in &d.errors {
        let labels = vec![
            Label::new("errno", device_io::errno_name(e.errno)),
            Label::new("file", &e.device),
            Label::new("op", e.op.name()),
            Label::new("process", &e.process),
        ];
        out.push((SeriesKey::new("edge_device_errors_total", labels), e.count as f64));
    }
}

/// Sensor buses (docs/metrics.md, "Sensor buses"): per i2c adapter and
/// address, SPI bus and chip select, and regmap device, a latency
/// histogram (its `_count` is the operations), bytes (regmap: registers)
/// and errors by errno; per GPIO line its reads and writes by level and
/// its direction changes. Every cell is cumulative and the kernel never
/// drops one while attached, so a series once seen is in every later
/// reading; zero cells are left out.
fn bus_series(b: &BusReading, out: &mut Vec<(SeriesKey, f64)>) {
    use buses::Kind;
    for s in &b.series {
        let (prefix, mut labels, bytes) = match s.kind {
            Kind::I2c => (
                "edge_i2c_transfer",
                vec![Label::new("adapter", s.bus.to_string()), Label::new("addr", format!("0x{:02x}", s.target))],
                Some("edge_i2c_bytes_total"),
            ),
            Kind::Smbus => (
                "edge_smbus_transfer",
                vec![Label::new("adapter", s.bus.to_string()), Label::new("addr", format!("0x{:02x}", s.target))],
                None,
            ),
            Kind::Spi => (
                "edge_spi_message",
                vec![Label::new("bus", s.bus.to_string()), Label::new("chip_select", s.target.to_string())],
                Some("edge_spi_bytes_total"),
            ),
            Kind::Regmap => {
                ("edge_regmap_access", vec![Label::new("regmap", &s.regmap)], Some("edge_regmap_registers_total"))
            }
            Kind::Gpio => continue,
        };
        if s.kind != Kind::Spi {
            labels.push(Label::new("op", s.op.name()));
        }
        labels.sort_by(|a, b| a.name.cmp(&b.name));
        histogram(&format!("{prefix}_seconds"), &labels, &s.buckets, s.sum_us, 1e-6, out);
        if let Some(name) = bytes.filter(|_| s.bytes > 0) {
            out.push((SeriesKey::new(name, labels.clone()), s.bytes as f64));
        }
    }
    for e in &b.errors {
        let (name, bus, target) = match e.kind {
            Kind::I2c => {
                ("edge_i2c_errors_total", ("adapter", e.bus.to_string()), ("addr", format!("0x{:02x}", e.target)))
            }
            Kind::Smbus => {
                ("edge_smbus_errors_total", ("adapter", e.bus.to_string()), ("addr", format!("0x{:02x}", e.target)))
            }
            Kind::Spi => ("edge_spi_errors_total", ("bus", e.bus.to_string()), ("chip_select", e.target.to_string())),
            Kind::Regmap | Kind::Gpio => continue,
        };
        let mut labels =
            vec![Label::new(bus.0, bus.1), Label::new(target.0, target.1), Label::new("errno", e.errno.as_str())];
        labels.sort_by(|a, b| a.name.cmp(&b.name));
        out.push((SeriesKey::new(name, labels), e.count as f64));
    }
    for g in &b.gpio {
        let line = [Label::new("chip", &g.chip), Label::new("line", g.line.to_string())];
        let ops = [("get", "0"), ("get", "1"), ("set", "0"), ("set", "1")];
        for (i, (op, value)) in ops.iter().enumerate() {
            if g.counts[i] > 0 {
                let labels = vec![line[0].clone(), line[1].clone(), Label::new("op", *op), Label::new("value", *value)];
                out.push((SeriesKey::new("edge_gpio_operations_total", labels), g.counts[i] as f64));
            }
        }
        for (i, direction) in [(4, "in"), (5, "out")] {
            if g.counts[i] > 0 {
                let labels = vec![line[0].clone(), Label::new("direction", direction), line[1].clone()];
                out.push((SeriesKey::new("edge_gpio_direction_changes_total", labels), g.counts[i] as f64));
            }
        }
        if g.counts[6] > 0 {
            out.push((SeriesKey::new("edge_gpio_direction_errors_total", line.to_vec()), g.counts[6] as f64));
        }
    }
}

/// TCP payload bytes sent and received by port class (cumulative, so a
/// series once non-zero stays non-zero).
fn byte_series(b: &[[u64; protocols::CLASSES]; 2], classes: &PortClasses, out: &mut Vec<(SeriesKey, f64)>) {
    for (flow, name) in [(0, "edge_tcp_bytes_sent_total"), (1, "edge_tcp_bytes_received_total")] {
        for (class, &v) in b[flow].iter().enumerate() {
            let Some(class_name) = classes.name(class) else { continue };
            if v > 0 {
                out.push((SeriesKey::new(name, vec![Label::new("port_class", class_name)]), v as f64));
            }
        }
    }
}

/// Industrial protocols: connections by what their first client bytes
/// were; Modbus/TCP requests, reply latency (its `_count` is the replies
/// matched to a request) and exception replies by function code. Cells
/// never decrease while the probe is attached, so a series once seen is in
/// every later reading.
fn protocol_series(p: &ProtocolReading, out: &mut Vec<(SeriesKey, f64)>) {
    for &(proto, side, payload, n) in &p.connections {
        let labels = vec![
            Label::new("payload", protocols::PAYLOAD_NAMES[payload]),
            Label::new("protocol", protocols::PROTO_NAMES[proto]),
            Label::new("side", protocols::SIDE_NAMES[side]),
        ];
        out.push((SeriesKey::new("edge_protocol_connections_total", labels), n as f64));
    }
    for s in &p.modbus {
        let labels = [
            Label::new("function", protocols::function_name(s.function)),
            Label::new("side", protocols::SIDE_NAMES[s.side]),
        ];
        out.push((SeriesKey::new("edge_modbus_requests_total", labels.to_vec()), s.requests as f64));
        histogram("edge_modbus_reply_seconds", &labels, &s.buckets, s.sum_us, 1e-6, out);
    }
    for &(side, function, code, n) in &p.exceptions {
        let labels = vec![
            Label::new("code", protocols::exception_name(code)),
            Label::new("function", protocols::function_name(function)),
            Label::new("side", protocols::SIDE_NAMES[side]),
        ];
        out.push((SeriesKey::new("edge_modbus_exceptions_total", labels), n as f64));
    }
    for (side, name) in protocols::SIDE_NAMES.iter().enumerate() {
        for (metric, v) in [
            ("edge_modbus_unmatched_replies_total", p.unmatched[side]),
            ("edge_modbus_abandoned_requests_total", p.abandoned[side]),
        ] {
            if v > 0 {
                out.push((SeriesKey::new(metric, vec![Label::new("side", *name)]), v as f64));
            }
        }
    }
}

/// The `[window]` section of the configuration (docs/configuration.md).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    /// Length of one aggregation window, in milliseconds.
    pub millis: u64,
}
impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig { millis: 10_000 }
    }
}

impl WindowConfig {
    /// Errors name the key (`window.…`).
    pub fn validate(&self) -> Result<(), String> {
        if self.millis < 100 || self.millis > 3_600_000 {
            return Err("window.millis must be between 100 and 3600000".into());
        }
        Ok(())
    }
}

/// The window stage's metrics (docs/metrics.md).
#[derive(Clone, Debug, Default)]
pub struct WindowMetrics {
    pub closed: prometheus_client::metrics::counter::Counter,
    /// Windows whose record the store did not take.
    pub errors: prometheus_client::metrics::counter::Counter,
}

impl WindowMetrics {
    pub fn register(&self, r: &mut prometheus_client::registry::Registry) {
        r.register("edge_agent_windows", "Windows closed", self.closed.clone());
        r.register("edge_agent_window_errors", "Windows whose record could not be stored", self.errors.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TcpLifecycleConfig;

    /// The value of the first sample named `name` (with `le`, if given).
    fn sample(b: &Window, name: &str, le: Option<&str>) -> Option<f64> {
        b.samples
            .iter()
            .find(|(k, _)| {
                k.name == name && le.is_none_or(|le| k.labels.iter().any(|l| l.name == "le" && l.value == le))
            })
            .map(|(_, v)| *v)
    }

    #[test]
    fn emits_nonzero_series_and_keeps_them_once_seen() {
        let classes = PortClasses::from_config(&TcpLifecycleConfig::default());
        let mut w = WindowStage::new();
        let mut c = TcpCounters::default();
        assert!(w
            .close(
                1,
                &ProbeReading { tcp: Some(c.clone()), devices: None, protocols: None, buses: None, tcp_idle: None },
                Some(&classes)
            )
            .is_none());

        c.values[TcpCounters::index(Kind::Opened, 0, 0)] = 3;
        let b = w
            .close(
                2,
                &ProbeReading { tcp: Some(c.clone()), devices: None, protocols: None, buses: None, tcp_idle: None },
                Some(&classes),
            )
            .unwrap();
        assert_eq!(b.timestamp_ms, 2);
        assert_eq!(b.samples.len(), 1);
        let (key, v) = &b.samples[0];
        assert_eq!(key.name, "edge_tcp_connections_opened_total");
        assert_eq!(key.labels, vec![Label::new("direction", "outbound"), Label::new("port_class", "other")]);
        assert_eq!(*v, 3.0);
        key.validate().unwrap();

        // Counter reset (agent restart, new kernel map): the series stays.
        let b = w
            .close(
                3,
                &ProbeReading {
                    tcp: Some(TcpCounters::default()),
                    devices: None,
                    protocols: None,
                    buses: None,
                    tcp_idle: None,
                },
                Some(&classes),
            )
            .unwrap();
        assert_eq!(b.samples[0].1, 0.0);
    }

    #[test]
    fn close_wait_is_one_gauge_of_entries_minus_exits() {
        let classes = PortClasses::from_config(&TcpLifecycleConfig::default());
        let mut w = WindowStage::new();
        let mut c = TcpCounters::default();
        c.values[TcpCounters::index(Kind::CloseWaitEntered, 1, 0)] = 5;
        c.values[TcpCounters::index(Kind::CloseWaitLeft, 1, 0)] = 3;
        let b = w
            .close(
                1,
                &ProbeReading { tcp: Some(c), devices: None, protocols: None, buses: None, tcp_idle: None },
                Some(&classes),
            )
            .unwrap();
        assert_eq!(b.samples.len(), 1);
        assert_eq!(b.samples[0].0.name, "edge_tcp_connections_close_wait");
        assert_eq!(b.samples[0].1, 2.0);
    }

    #[test]
    fn histograms_are_cumulative_with_log2_bounds_in_seconds() {
        let classes = PortClasses::from_config(&TcpLifecycleConfig::default());
        let mut w = WindowStage::new();
        let mut c = TcpCounters::default();
        let slot = &mut c.hists.slots[TcpHists::index(Hist::ConnectLatency, 0, 0)];
        slot.buckets[5] = 2; // 32..64 us
        slot.buckets[7] = 1; // 128..256 us
        slot.sum = 40 + 50 + 200;
        let b = w
            .close(
                1,
                &ProbeReading { tcp: Some(c), devices: None, protocols: None, buses: None, tcp_idle: None },
                Some(&classes),
            )
            .unwrap();
        let get = |name: &str, le: Option<&str>| sample(&b, name, le);
        let m = "edge_tcp_connect_latency_seconds";
        assert_eq!(get(&format!("{m}_bucket"), Some("0.000032")), Some(0.0));
        assert_eq!(get(&format!("{m}_bucket"), Some("0.000064")), Some(2.0));
        assert_eq!(get(&format!("{m}_bucket"), Some("0.000256")), Some(3.0));
        assert_eq!(get(&format!("{m}_bucket"), Some("+Inf")), Some(3.0));
        assert_eq!(get(&format!("{m}_count"), None), Some(3.0));
        assert!((get(&format!("{m}_sum"), None).unwrap() - 0.00029).abs() < 1e-12);
        for (k, _) in &b.samples {
            k.validate().unwrap();
        }
        assert_eq!(b.samples.len(), 26, "23 finite buckets, +Inf, sum, count");
    }

    #[test]
    fn device_series_are_histograms_bytes_and_errors_by_errno() {
        use crate::probe::device_io::{DeviceErrors, DeviceSeries, Op};
        let mut buckets = [0; device_io::BUCKETS];
        buckets[3] = 4; // 8..16 us
        buckets[18] = 1; // ~0.26..0.52 s: a stalled sensor
        let d = DeviceReading {
            series: vec![DeviceSeries {
                device: "/dev/ttyUSB0".into(),
                op: Op::Read,
                process: "modbus-poller".into(),
                ops: 5,
                bytes: 40,
                errors: 1,
                sum_us: 4 * 10 + 300_000,
                buckets,
            }],
            errors: vec![DeviceErrors {
                device: "/dev/ttyUSB0".into(),
                op: Op::Read,
                process: "modbus-poller".into(),
                errno: libc::EAGAIN,
                count: 1,
            }],
            ..Default::default()
        };
        let mut w = WindowStage::new();
        let b = w
            .close(1, &ProbeReading { tcp: None, devices: Some(d), protocols: None, buses: None, tcp_idle: None }, None)
            .unwrap();
        for (k, _) in &b.samples {
            k.validate().unwrap();
        }
        let get = |name: &str, le: Option<&str>| sample(&b, name, le);
        let m = "edge_device_operation_seconds";
        assert_eq!(get(&format!("{m}_count"), None), Some(5.0));
        assert_eq!(get(&format!("{m}_bucket"), Some("0.000016")), Some(4.0));
        assert_eq!(get(&format!("{m}_bucket"), Some("0.262144")), Some(4.0));
        assert_eq!(get(&format!("{m}_bucket"), Some("0.524288")), Some(5.0));
        assert_eq!(get("edge_device_bytes_total", None), Some(40.0));
        let err = b.samples.iter().find(|(k, _)| k.name == "edge_device_errors_total").unwrap();
        assert!(err.0.labels.iter().any(|l| l.name == "errno" && l.value == "EAGAIN"));
        assert_eq!(err.1, 1.0);
    }

    #[test]
    fn bus_series_are_labelled_per_bus_family() {
        use crate::probe::buses::{BusError, BusSeries, GpioLine, Kind, Op as BusOp, BUCKETS as BUS_BUCKETS};
        let mut buckets = [0; BUS_BUCKETS];
        buckets[7] = 3; // 128..256 us
        let series = |kind, op, bus, target, regmap: &str, bytes| BusSeries {
            kind,
            op,
            bus,
            target,
            regmap: regmap.into(),
            ops: 3,
            errors: 0,
            bytes,
            sum_us: 600,
            buckets,
        };
        let b = BusReading {
            series: vec![
                series(Kind::I2c, BusOp::Read, 0, 0x48, "", 0),
                series(Kind::Smbus, BusOp::Read, 0, 0x48, "", 0),
                series(Kind::Spi, BusOp::Transfer, 1, 0, "", 24),
                series(Kind::Regmap, BusOp::Write, 0, 0, "0-0050", 6),
            ],
            errors: vec![
                BusError { kind: Kind::I2c, bus: 0, target: 0x48, errno: "ENXIO".into(), count: 3 },
                BusError { kind: Kind::Spi, bus: 1, target: 0, errno: "short".into(), count: 1 },
            ],
            gpio: vec![GpioLine { chip: "9030000.pl061".into(), line: 7, counts: [0, 10, 0, 0, 1, 0, 0] }],
            ..Default::default()
        };
        let mut w = WindowStage::new();
        let reading = ProbeReading { buses: Some(b), ..Default::default() };
        let out = w.close(1, &reading, None).unwrap();
        for (k, _) in &out.samples {
            k.validate().unwrap();
        }
        let find = |name: &str, labels: &[(&str, &str)]| {
            out.samples
                .iter()
                .find(|(k, _)| {
                    k.name == name
                        && k.labels.len() == labels.len()
                        && labels.iter().all(|(n, v)| k.labels.iter().any(|l| l.name == *n && l.value == *v))
                })
                .map(|(_, v)| *v)
        };
        let i2c = [("adapter", "0"), ("addr", "0x48"), ("op", "read")];
        assert_eq!(find("edge_i2c_transfer_seconds_count", &i2c), Some(3.0));
        assert_eq!(find("edge_i2c_transfer_seconds_sum", &i2c), Some(600e-6));
        // Nothing moved by failed transfers: no bytes series.
        assert_eq!(find("edge_i2c_bytes_total", &i2c), None);
        assert_eq!(find("edge_smbus_transfer_seconds_count", &i2c), Some(3.0));
        let spi = [("bus", "1"), ("chip_select", "0")];
        assert_eq!(find("edge_spi_message_seconds_count", &spi), Some(3.0));
        assert_eq!(find("edge_spi_bytes_total", &spi), Some(24.0));
        let rm = [("op", "write"), ("regmap", "0-0050")];
        assert_eq!(find("edge_regmap_access_seconds_count", &rm), Some(3.0));
        assert_eq!(find("edge_regmap_registers_total", &rm), Some(6.0));
        assert_eq!(find("edge_i2c_errors_total", &[("adapter", "0"), ("addr", "0x48"), ("errno", "ENXIO")]), Some(3.0));
        assert_eq!(find("edge_spi_errors_total", &[("bus", "1"), ("chip_select", "0"), ("errno", "short")]), Some(1.0));
        let line = [("chip", "9030000.pl061"), ("line", "7")];
        assert_eq!(find("edge_gpio_operations_total", &[line[0], line[1], ("op", "get"), ("value", "1")]), Some(10.0));
        assert_eq!(find("edge_gpio_operations_total", &[line[0], line[1], ("op", "get"), ("value", "0")]), None);
        assert_eq!(find("edge_gpio_direction_changes_total", &[line[0], ("direction", "in"), line[1]]), Some(1.0));
        assert_eq!(find("edge_gpio_direction_errors_total", &line), None);
    }

    #[test]
    fn protocol_series_carry_function_side_and_code_names() {
        use crate::probe::protocols::ModbusSeries;
        let mut buckets = [0; protocols::BUCKETS];
        buckets[6] = 2; // 64..128 us
        let p = ProtocolReading {
            connections: vec![(1, 0, 0, 3), (2, 1, 1, 1)],
            modbus: vec![ModbusSeries { side: 0, function: 3, requests: 3, sum_us: 200, buckets }],
            exceptions: vec![(0, 3, 2, 1)],
            unmatched: [0, 4],
            abandoned: [0, 0],
            tcp_bytes: None,
            ..Default::default()
        };
        let mut w = WindowStage::new();
        let b = w
            .close(1, &ProbeReading { tcp: None, devices: None, protocols: Some(p), buses: None, tcp_idle: None }, None)
            .unwrap();
        for (k, _) in &b.samples {
            k.validate().unwrap();
        }
        let find = |name: &str, labels: &[(&str, &str)]| {
            b.samples
                .iter()
                .find(|(k, _)| k.name == name && labels.iter().all(|(n, v)| k.labels.contains(&Label::new(*n, *v))))
                .map(|(_, v)| *v)
        };
        let conn = [("payload", "matched"), ("protocol", "modbus"), ("side", "client")];
        assert_eq!(find("edge_protocol_connections_total", &conn), Some(3.0));
        assert_eq!(find("edge_protocol_connections_total", &[("payload", "tls"), ("protocol", "mqtt")]), Some(1.0));
        let f = [("function", "read_holding_registers"), ("side", "client")];
        assert_eq!(find("edge_modbus_requests_total", &f), Some(3.0));
        assert_eq!(find("edge_modbus_reply_seconds_count", &f), Some(2.0));
        assert_eq!(find("edge_modbus_reply_seconds_bucket", &[("le", "0.000128")]), Some(2.0));
        assert_eq!(find("edge_modbus_exceptions_total", &[("code", "illegal_data_address")]), Some(1.0));
        assert_eq!(find("edge_modbus_unmatched_replies_total", &[("side", "server")]), Some(4.0));
        assert_eq!(find("edge_modbus_unmatched_replies_total", &[("side", "client")]), None, "zero: not sent");
    }

    #[test]
    fn idle_gauges_stay_once_seen_and_go_back_to_zero() {
        let classes = PortClasses::from_config(&TcpLifecycleConfig::default());
        let mut w = WindowStage::new();
        let mut c = TcpIdleCensus::default();
        c.established[1][0] = 2;
        c.idle[1][0] = 1;
        let reading = |c: &TcpIdleCensus| ProbeReading { tcp_idle: Some(c.clone()), ..Default::default() };
        let b = w.close(1, &reading(&c), Some(&classes)).unwrap();
        assert_eq!(b.samples.len(), 2);
        assert_eq!(sample(&b, "edge_tcp_connections_idle", None), Some(1.0));
        c.idle[1][0] = 0;
        let b = w.close(2, &reading(&c), Some(&classes)).unwrap();
        assert_eq!(sample(&b, "edge_tcp_connections_idle", None), Some(0.0), "sent as 0, not dropped");
        assert_eq!(sample(&b, "edge_tcp_connections_established", None), Some(2.0));
        let idle = b.samples.iter().find(|(k, _)| k.name == "edge_tcp_connections_idle").unwrap();
        assert_eq!(idle.0.labels, vec![Label::new("direction", "inbound"), Label::new("port_class", "other")]);
    }

    #[test]
    fn peer_series_carry_the_group_name_and_stay_once_seen() {
        use crate::probe::tcp_lifecycle::{HistSlot, PEER_KINDS, PEER_SLOTS};
        let classes = PortClasses::from_config(&TcpLifecycleConfig::default());
        let mut w = WindowStage::new();
        let mut p = PeerCounters {
            names: vec!["other".into(), "plc".into()],
            values: vec![[0; PEER_KINDS]; PEER_SLOTS],
            connect: vec![HistSlot::default(); PEERS],
        };
        p.values[1][0] = 3; // outbound, group 1: opened
        p.values[PEERS][3] = 2; // inbound, other: closed
        p.connect[1].buckets[4] = 3;
        p.connect[1].sum = 75;
        let mut c = TcpCounters { peers: Some(p.clone()), ..Default::default() };
        let reading = |c: &TcpCounters| ProbeReading { tcp: Some(c.clone()), ..Default::default() };
        let b = w.close(1, &reading(&c), Some(&classes)).unwrap();
        let find = |b: &Window, name: &str| {
            b.samples.iter().filter(|(k, _)| k.name == name).map(|(k, v)| (k.labels.clone(), *v)).collect::<Vec<_>>()
        };
        assert_eq!(
            find(&b, "edge_tcp_peer_connections_opened_total"),
            [(vec![Label::new("direction", "outbound"), Label::new("peer", "plc")], 3.0)]
        );
        assert_eq!(
            find(&b, "edge_tcp_peer_connections_closed_total"),
            [(vec![Label::new("direction", "inbound"), Label::new("peer", "other")], 2.0)]
        );
        assert_eq!(sample(&b, "edge_tcp_peer_connect_latency_seconds_count", None), Some(3.0));
        assert_eq!(sample(&b, "edge_tcp_peer_connect_latency_seconds_sum", None), Some(75e-6));
        // 16 peer groups at most: never more series than that, whatever the box talks to.
        assert!(b.samples.iter().filter(|(k, _)| k.name.starts_with("edge_tcp_peer")).count() <= 2 + 26);
        // No change: the same series again, none dropped.
        c.peers = Some(p);
        let b2 = w.close(2, &reading(&c), Some(&classes)).unwrap();
        assert_eq!(b.samples.len(), b2.samples.len());
    }
}
