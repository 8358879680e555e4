//! Window stage: turns one reading of the probes into the batch of samples
//! stored for that window. Pure; owns only which series it has emitted
//! (each probe makes its own samples: `probe/<name>/series.rs`).

use crate::probe::{ProbeReading, SeenSeries};

/// One window's samples, all taken at `timestamp_ms`, and the process
/// values captured during it, each at its own time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub timestamp_ms: i64,
    pub samples: Vec<(edge_wire::SeriesKey, f64)>,
    pub values: Vec<edge_wire::ValueSeries>,
}

/// Remembers which series have ever been non-zero, so that once a series
/// exists it gets a sample every window (no gaps for Prometheus to read as
/// staleness) while never-seen label combinations cost nothing.
#[derive(Debug, Default)]
pub struct WindowStage {
    seen: SeenSeries,
}

impl WindowStage {
    pub fn new() -> Self {
        Self::default()
    }

    /// The samples of the window ending at `timestamp_ms`, or `None` when
    /// there is nothing to say.
    pub fn close(&mut self, timestamp_ms: i64, reading: &ProbeReading) -> Option<Window> {
        let mut samples = Vec::new();
        self.seen.series(reading, &mut samples);
        (!samples.is_empty()).then_some(Window { timestamp_ms, samples, values: Vec::new() })
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
    use crate::probe::buses::BusReading;
    use crate::probe::device_io::{self, DeviceReading};
    use crate::probe::protocols::{self, ProtocolReading};
    use crate::probe::tcp_idle::IdleCensus as TcpIdleCensus;
    use crate::probe::tcp_lifecycle::{
        Hist, Kind, PeerCounters, PortClasses, TcpCounters, TcpHists, TcpReading, PEERS,
    };
    use edge_wire::Label;
    use std::sync::Arc;

    /// A reading of the TCP probe alone.
    fn tcp(counters: TcpCounters, idle: Option<TcpIdleCensus>) -> ProbeReading {
        let classes = Arc::new(PortClasses::from_config(&TcpLifecycleConfig::default()));
        ProbeReading { tcp_lifecycle: Some(TcpReading { counters, idle, classes }), ..Default::default() }
    }

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
        let mut w = WindowStage::new();
        let mut c = TcpCounters::default();
        assert!(w.close(1, &tcp(c.clone(), None),).is_none());

        c.values[TcpCounters::index(Kind::Opened, 0, 0)] = 3;
        let b = w.close(2, &tcp(c.clone(), None)).unwrap();
        assert_eq!(b.timestamp_ms, 2);
        assert_eq!(b.samples.len(), 1);
        let (key, v) = &b.samples[0];
        assert_eq!(key.name, "edge_tcp_connections_opened_total");
        assert_eq!(key.labels, vec![Label::new("direction", "outbound"), Label::new("port_class", "other")]);
        assert_eq!(*v, 3.0);
        key.validate().unwrap();

        // Counter reset (agent restart, new kernel map): the series stays.
        let b = w.close(3, &tcp(TcpCounters::default(), None)).unwrap();
        assert_eq!(b.samples[0].1, 0.0);
    }

    #[test]
    fn close_wait_is_one_gauge_of_entries_minus_exits() {
        let mut w = WindowStage::new();
        let mut c = TcpCounters::default();
        c.values[TcpCounters::index(Kind::CloseWaitEntered, 1, 0)] = 5;
        c.values[TcpCounters::index(Kind::CloseWaitLeft, 1, 0)] = 3;
        let b = w.close(1, &tcp(c, None)).unwrap();
        assert_eq!(b.samples.len(), 1);
        assert_eq!(b.samples[0].0.name, "edge_tcp_connections_close_wait");
        assert_eq!(b.samples[0].1, 2.0);
    }

    #[test]
    fn histograms_are_cumulative_with_log2_bounds_in_seconds() {
        let mut w = WindowStage::new();
        let mut c = TcpCounters::default();
        let slot = &mut c.hists.slots[TcpHists::index(Hist::ConnectLatency, 0, 0)];
        slot.buckets[5] = 2; // 32..64 us
        slot.buckets[7] = 1; // 128..256 us
        slot.sum = 40 + 50 + 200;
        let b = w.close(1, &tcp(c, None)).unwrap();
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
        let b = w.close(1, &ProbeReading { devices: Some(d), ..Default::default() }).unwrap();
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
        let out = w.close(1, &reading).unwrap();
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
        let b = w.close(1, &ProbeReading { protocols: Some(p), ..Default::default() }).unwrap();
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
        let mut w = WindowStage::new();
        let mut c = TcpIdleCensus::default();
        c.established[1][0] = 2;
        c.idle[1][0] = 1;
        let reading = |c: &TcpIdleCensus| tcp(TcpCounters::default(), Some(c.clone()));
        let b = w.close(1, &reading(&c)).unwrap();
        assert_eq!(b.samples.len(), 2);
        assert_eq!(sample(&b, "edge_tcp_connections_idle", None), Some(1.0));
        c.idle[1][0] = 0;
        let b = w.close(2, &reading(&c)).unwrap();
        assert_eq!(sample(&b, "edge_tcp_connections_idle", None), Some(0.0), "sent as 0, not dropped");
        assert_eq!(sample(&b, "edge_tcp_connections_established", None), Some(2.0));
        let idle = b.samples.iter().find(|(k, _)| k.name == "edge_tcp_connections_idle").unwrap();
        assert_eq!(idle.0.labels, vec![Label::new("direction", "inbound"), Label::new("port_class", "other")]);
    }

    #[test]
    fn peer_series_carry_the_group_name_and_stay_once_seen() {
        use crate::probe::tcp_lifecycle::{HistSlot, PEER_KINDS, PEER_SLOTS};
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
        let reading = |c: &TcpCounters| tcp(c.clone(), None);
        let b = w.close(1, &reading(&c)).unwrap();
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
        let b2 = w.close(2, &reading(&c)).unwrap();
        assert_eq!(b.samples.len(), b2.samples.len());
    }
}
