//! The bus probe's window samples (docs/metrics.md, "Sensor buses").

use super::{BusReading, Kind};
use crate::probe::series::{histogram, Samples};
use edge_wire::{Label, SeriesKey};

/// Sensor buses (docs/metrics.md, "Sensor buses"): per i2c adapter and
/// address, SPI bus and chip select, and regmap device, a latency
/// histogram (its `_count` is the operations), bytes (regmap: registers)
/// and errors by errno; per GPIO line its reads and writes by level and
/// its direction changes. Every cell is cumulative and the kernel never
/// drops one while attached, so a series once seen is in every later
/// reading; zero cells are left out.
pub fn series(b: &BusReading, out: &mut Samples) {
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
