//! Prometheus remote write 1.0: the protobuf messages (prost, field numbers
//! from prometheus/prompb/types.proto and remote.proto), their snappy block
//! compression, and the conversion of a device's batch into a request.
//! Pure: no I/O.

use edge_wire::Batch;

#[derive(Clone, PartialEq, prost::Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
    // tag 2 is reserved; 3 is metadata, which we do not send.
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, prost::Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// HTTP headers a remote-write 1.0 request must carry.
pub const HEADERS: [(&str, &str); 4] = [
    ("Content-Encoding", "snappy"),
    ("Content-Type", "application/x-protobuf"),
    ("User-Agent", concat!("fleet-bridge/", env!("CARGO_PKG_VERSION"))),
    ("X-Prometheus-Remote-Write-Version", "0.1.0"),
];

/// The time series of one device's batch, with the bridge-owned `device`
/// label added. Labels come out sorted by name, as the spec requires.
/// The batch must have been validated (edge_wire's decoders do).
pub fn to_timeseries(device: &str, batch: &Batch) -> Vec<TimeSeries> {
    batch
        .series
        .iter()
        .map(|s| {
            let mut labels = Vec::with_capacity(s.labels.len() + 2);
            labels.push(Label { name: "__name__".into(), value: s.name.clone() });
            labels.push(Label { name: "device".into(), value: device.into() });
            labels.extend(s.labels.iter().map(|l| Label { name: l.name.clone(), value: l.value.clone() }));
            labels.sort_by(|a, b| a.name.cmp(&b.name));
            TimeSeries {
                labels,
                samples: s.samples.iter().map(|p| Sample { value: p.value, timestamp: p.timestamp_ms }).collect(),
            }
        })
        .collect()
}

/// A series' size in memory, estimated: its own and its labels' and
/// samples' allocations. What the bridge's backpressure bound counts: a
/// block of many one-sample series costs far more per sample than one of
/// long series.
pub fn heap_bytes(ts: &TimeSeries) -> usize {
    const OVERHEAD: usize = 16; // per allocation
    let labels: usize =
        ts.labels.iter().map(|l| std::mem::size_of::<Label>() + l.name.len() + l.value.len() + 2 * OVERHEAD).sum();
    std::mem::size_of::<TimeSeries>() + labels + OVERHEAD + ts.samples.len() * std::mem::size_of::<Sample>() + OVERHEAD
}

/// `edge_device_online{device}` = `value` at `timestamp_ms`.
pub fn presence(device: &str, value: f64, timestamp_ms: i64) -> TimeSeries {
    TimeSeries {
        labels: vec![
            Label { name: "__name__".into(), value: "edge_device_online".into() },
            Label { name: "device".into(), value: device.into() },
        ],
        samples: vec![Sample { value, timestamp: timestamp_ms }],
    }
}

/// Protobuf-encodes and snappy-compresses (block format) a request body.
pub fn encode(req: &WriteRequest) -> Vec<u8> {
    let raw = prost::Message::encode_to_vec(req);
    // Compressing an in-memory buffer only fails for inputs over ~4 GiB,
    // which MAX_MESSAGE_BYTES rules out.
    snap::raw::Encoder::new().compress_vec(&raw).unwrap_or_default()
}

/// Inverse of [`encode`], for tests and tools.
pub fn decode(body: &[u8]) -> Result<WriteRequest, String> {
    let raw = snap::raw::Decoder::new().decompress_vec(body).map_err(|e| e.to_string())?;
    prost::Message::decode(raw.as_slice()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_wire::{Label as WLabel, Sample as WSample, Series};

    fn batch() -> Batch {
        Batch {
            series: vec![Series {
                name: "edge_tcp_connections_opened_total".into(),
                labels: vec![WLabel::new("direction", "outbound"), WLabel::new("port_class", "mqtt")],
                samples: vec![WSample { timestamp_ms: 1_700_000_000_123, value: 7.0 }],
            }],
        }
    }

    #[test]
    fn labels_sorted_with_name_and_device() {
        let ts = to_timeseries("press-1", &batch());
        let names: Vec<_> = ts[0].labels.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["__name__", "device", "direction", "port_class"]);
        assert_eq!(ts[0].labels[1].value, "press-1");
        assert_eq!(ts[0].samples, vec![Sample { value: 7.0, timestamp: 1_700_000_000_123 }]);
    }

    /// The bytes for a known request, checked by hand against the protobuf
    /// encoding rules, so a prost upgrade cannot silently change the wire.
    #[test]
    fn protobuf_bytes_are_the_documented_ones() {
        let req = WriteRequest {
            timeseries: vec![TimeSeries {
                labels: vec![Label { name: "a".into(), value: "b".into() }],
                samples: vec![Sample { value: 1.0, timestamp: 2 }],
            }],
        };
        let raw = prost::Message::encode_to_vec(&req);
        let expected: Vec<u8> = vec![
            0x0a, 0x15, // field 1 (timeseries), 21 bytes
            0x0a, 0x06, 0x0a, 0x01, b'a', 0x12, 0x01, b'b', // label {name: a, value: b}
            0x12, 0x0b, 0x09, 0, 0, 0, 0, 0, 0, 0xf0, 0x3f, 0x10, 0x02, // sample {1.0, 2}
        ];
        assert_eq!(raw, expected);
        assert_eq!(decode(&encode(&req)).unwrap(), req);
    }

    #[test]
    fn snappy_is_the_block_format() {
        let body = encode(&WriteRequest { timeseries: to_timeseries("d", &batch()) });
        // Block format starts with the uncompressed length as a varint; the
        // framed format would start with the stream identifier 0xff.
        assert_ne!(body[0], 0xff);
        assert!(snap::raw::decompress_len(&body).is_ok());
    }
}
