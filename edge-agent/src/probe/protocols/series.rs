//! The protocol probe's window samples (docs/metrics.md, "Industrial
//! protocols"), and TCP payload bytes by the TCP probe's port classes.

use super::{exception_name, function_name, ProtocolReading, CLASSES, PAYLOAD_NAMES, PROTO_NAMES, SIDE_NAMES};
use crate::probe::series::{histogram, Samples};
use crate::probe::tcp_lifecycle::PortClasses;
use edge_wire::{Label, SeriesKey};

/// The reading's samples.
pub fn series(p: &ProtocolReading, out: &mut Samples) {
    protocol_series(p, out);
    if let Some((b, classes)) = &p.tcp_bytes {
        byte_series(b, classes, out);
    }
}

/// TCP payload bytes sent and received by port class (cumulative, so a
/// series once non-zero stays non-zero).
fn byte_series(b: &[[u64; CLASSES]; 2], classes: &PortClasses, out: &mut Samples) {
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
fn protocol_series(p: &ProtocolReading, out: &mut Samples) {
    for &(proto, side, payload, n) in &p.connections {
        let labels = vec![
            Label::new("payload", PAYLOAD_NAMES[payload]),
            Label::new("protocol", PROTO_NAMES[proto]),
            Label::new("side", SIDE_NAMES[side]),
        ];
        out.push((SeriesKey::new("edge_protocol_connections_total", labels), n as f64));
    }
    for s in &p.modbus {
        let labels = [Label::new("function", function_name(s.function)), Label::new("side", SIDE_NAMES[s.side])];
        out.push((SeriesKey::new("edge_modbus_requests_total", labels.to_vec()), s.requests as f64));
        histogram("edge_modbus_reply_seconds", &labels, &s.buckets, s.sum_us, 1e-6, out);
    }
    for &(side, function, code, n) in &p.exceptions {
        let labels = vec![
            Label::new("code", exception_name(code)),
            Label::new("function", function_name(function)),
            Label::new("side", SIDE_NAMES[side]),
        ];
        out.push((SeriesKey::new("edge_modbus_exceptions_total", labels), n as f64));
    }
    for (side, name) in SIDE_NAMES.iter().enumerate() {
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
