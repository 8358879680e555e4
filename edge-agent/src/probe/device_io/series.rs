//! The device-file probe's window samples (docs/metrics.md, "Device files").

use super::{errno_name, DeviceReading, Op};
use crate::probe::series::{histogram, Samples};
use edge_wire::{Label, SeriesKey};

/// Device-file I/O: per (device, op, process) a latency histogram (its
/// `_count` is the number of operations), bytes for reads and writes, and
/// errors by errno. The kernel never drops a series once made, so every
/// series seen is in every later reading of the same probe.
pub fn series(d: &DeviceReading, out: &mut Samples) {
    for s in &d.series {
        // "device" is the bridge's label (the box); the file is "file".
        let labels = [Label::new("file", &s.device), Label::new("op", s.op.name()), Label::new("process", &s.process)];
        histogram("edge_device_operation_seconds", &labels, &s.buckets, s.sum_us, 1e-6, out);
        if matches!(s.op, Op::Read | Op::Write) {
            out.push((SeriesKey::new("edge_device_bytes_total", labels.to_vec()), s.bytes as f64));
        }
    }
    for e in &d.errors {
        let labels = vec![
            Label::new("errno", errno_name(e.errno)),
            Label::new("file", &e.device),
            Label::new("op", e.op.name()),
            Label::new("process", &e.process),
        ];
        out.push((SeriesKey::new("edge_device_errors_total", labels), e.count as f64));
    }
}
