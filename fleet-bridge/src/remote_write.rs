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

/// A series the bridge writes, encoded straight into a request's body:
/// the pipeline thread appends each series' protobuf bytes to the request
/// of its shard, so no series is built as a value (a label vector of
/// strings per series, made on one thread and freed on another, was most
/// of the bridge's CPU: BENCHMARKS.md, "Bridge throughput").
pub trait Encode {
    /// A hash of the series' identity (its labels, sorted by name): the
    /// same series hashes the same whatever it comes as.
    fn identity(&self) -> u64;
    /// Samples in it.
    fn samples(&self) -> usize;
    /// Appends the series as one entry of a `WriteRequest`'s `timeseries`
    /// field: a request's body is the concatenation of its entries.
    fn encode_entry(&self, out: &mut Vec<u8>);
}

/// A series of a device's block with the bridge-owned `device` label: the
/// labels of [`to_timeseries`] without building them.
#[derive(Debug, Clone, Copy)]
pub struct DeviceSeries<'a> {
    pub device: &'a str,
    pub series: &'a edge_wire::Series,
}

impl<'a> DeviceSeries<'a> {
    /// The labels sorted by name: the block's own (sorted, none of them
    /// reserved: edge_wire's decoders check) merged with `__name__` and
    /// `device`, which go first among equals as in [`to_timeseries`].
    fn labels(&self) -> Labels<'a> {
        Labels {
            reserved: [("__name__", self.series.name.as_str()), ("device", self.device)],
            next: 0,
            own: &self.series.labels,
        }
    }
}

/// A device series' labels in order ([`DeviceSeries::labels`]).
#[derive(Clone)]
struct Labels<'a> {
    reserved: [(&'a str, &'a str); 2],
    /// How many of `reserved` were taken.
    next: usize,
    own: &'a [edge_wire::Label],
}

impl<'a> Iterator for Labels<'a> {
    type Item = (&'a str, &'a str);
    fn next(&mut self) -> Option<Self::Item> {
        let reserved = self.reserved.get(self.next).copied();
        match (reserved, self.own.split_first()) {
            (Some(r), Some((l, rest))) if l.name.as_str() < r.0 => {
                self.own = rest;
                Some((&l.name, &l.value))
            }
            (Some(r), _) => {
                self.next += 1;
                Some(r)
            }
            (None, Some((l, rest))) => {
                self.own = rest;
                Some((&l.name, &l.value))
            }
            (None, None) => None,
        }
    }
}

impl Encode for DeviceSeries<'_> {
    fn identity(&self) -> u64 {
        identity(self.labels())
    }

    fn samples(&self) -> usize {
        self.series.samples.len()
    }

    fn encode_entry(&self, out: &mut Vec<u8>) {
        let labels = self.labels();
        let samples = || self.series.samples.iter().map(|p| (p.value, p.timestamp_ms));
        let len: usize = labels.clone().map(|(n, v)| entry_len(label_len(n, v))).sum::<usize>()
            + samples().map(|(v, t)| entry_len(sample_len(v, t))).sum::<usize>();
        out.reserve(entry_len(len));
        out.push(TAG_LEN_1);
        put_varint(out, len as u64);
        for (n, v) in labels {
            out.push(TAG_LEN_1);
            put_varint(out, label_len(n, v) as u64);
            put_string(out, TAG_LEN_1, n);
            put_string(out, TAG_LEN_2, v);
        }
        for (v, t) in samples() {
            out.push(TAG_LEN_2);
            put_varint(out, sample_len(v, t) as u64);
            if v != 0.0 {
                out.push(TAG_FIXED64_1);
                out.extend_from_slice(&v.to_le_bytes());
            }
            if t != 0 {
                out.push(TAG_VARINT_2);
                put_varint(out, t as u64);
            }
        }
    }
}

impl Encode for TimeSeries {
    fn identity(&self) -> u64 {
        identity(self.labels.iter().map(|l| (l.name.as_str(), l.value.as_str())))
    }

    fn samples(&self) -> usize {
        self.samples.len()
    }

    fn encode_entry(&self, out: &mut Vec<u8>) {
        out.push(TAG_LEN_1);
        prost::Message::encode_length_delimited(self, out).unwrap_or_default(); // a Vec always has room
    }
}

impl<T: Encode> Encode for &T {
    fn identity(&self) -> u64 {
        (*self).identity()
    }
    fn samples(&self) -> usize {
        (*self).samples()
    }
    fn encode_entry(&self, out: &mut Vec<u8>) {
        (*self).encode_entry(out)
    }
}

/// A label set's hash: fixed (the same in every process), fast, not keyed:
/// it only spreads series over a bridge's shards.
fn identity<'a>(labels: impl Iterator<Item = (&'a str, &'a str)>) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = foldhash::fast::FixedState::with_seed(0).build_hasher();
    for (n, v) in labels {
        n.hash(&mut h);
        v.hash(&mut h);
    }
    h.finish()
}

// Protobuf keys (field number << 3 | wire type) of the messages above.
const TAG_LEN_1: u8 = 0x0a; // field 1, length-delimited
const TAG_LEN_2: u8 = 0x12; // field 2, length-delimited
const TAG_FIXED64_1: u8 = 0x09; // field 1, 64-bit
const TAG_VARINT_2: u8 = 0x10; // field 2, varint

use prost::encoding::encoded_len_varint as varint_len;

fn put_varint(out: &mut Vec<u8>, v: u64) {
    prost::encoding::encode_varint(v, out)
}

/// A field of `len` bytes with its key and length.
fn entry_len(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// A proto3 string field: left out when empty, as prost does.
fn string_len(s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        entry_len(s.len())
    }
}

fn put_string(out: &mut Vec<u8>, tag: u8, s: &str) {
    if !s.is_empty() {
        out.push(tag);
        put_varint(out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }
}

fn label_len(name: &str, value: &str) -> usize {
    string_len(name) + string_len(value)
}

/// A `Sample`'s bytes; zero fields are left out, as prost does.
fn sample_len(value: f64, timestamp: i64) -> usize {
    let v = if value != 0.0 { 9 } else { 0 };
    let t = if timestamp != 0 { 1 + varint_len(timestamp as u64) } else { 0 };
    v + t
}

/// `edge_device_online` = `value` at `timestamp_ms`: a series the bridge
/// writes like a device's own (it gets the `device` label when encoded,
/// [`DeviceSeries`]).
pub fn presence(value: f64, timestamp_ms: i64) -> edge_wire::Series {
    edge_wire::Series {
        name: "edge_device_online".into(),
        labels: Vec::new(),
        samples: vec![edge_wire::Sample { timestamp_ms, value }],
    }
}

/// Protobuf-encodes and snappy-compresses (block format) a request body.
pub fn encode(req: &WriteRequest) -> Vec<u8> {
    compress(&prost::Message::encode_to_vec(req))
}

/// Snappy-compresses (block format) a request's protobuf bytes.
pub fn compress(raw: &[u8]) -> Vec<u8> {
    // Compressing an in-memory buffer only fails for inputs over ~4 GiB,
    // which the batches' sample limit rules out.
    snap::raw::Encoder::new().compress_vec(raw).unwrap_or_default()
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

    /// A series encoded straight from a device's block is, byte for byte,
    /// what prost makes of the series built as values, whatever the labels
    /// (names sorting before and after the reserved ones, empty and long
    /// values), values (zero, negative zero, NaN) and times (zero,
    /// negative, far ahead); and it has the same identity.
    #[test]
    fn a_series_encoded_from_a_block_is_the_series_prost_encodes() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let names = ["A", "Zone", "_x", "a", "dev", "devicf", "z", "port_class", "ß"];
        let values = [0.0, -0.0, 1.5, -3.25, f64::NAN, f64::INFINITY, 1e300, 7.0];
        let times = [0, 1, -1, 127, 128, 1_700_000_000_123, i64::MAX, i64::MIN];
        for round in 0..2_000 {
            let mut label_names: Vec<&str> = names.iter().copied().filter(|_| next() % 3 == 0).collect();
            label_names.sort();
            let labels = label_names
                .iter()
                .map(|n| {
                    let len = [0, 1, 5, 127, 128, 300][(next() % 6) as usize];
                    WLabel::new(*n, "v".repeat(len))
                })
                .collect();
            let samples = (0..next() % 5)
                .map(|_| WSample { value: values[(next() % 8) as usize], timestamp_ms: times[(next() % 8) as usize] })
                .collect();
            let series = Series { name: format!("m{round}"), labels, samples };
            let device = ["d", "press-1", "a-very-long-device-name-0123456789"][round % 3];
            let ours = DeviceSeries { device, series: &series };
            let mut body = Vec::new();
            ours.encode_entry(&mut body);
            let batch = Batch { series: vec![series.clone()] };
            let theirs = WriteRequest { timeseries: to_timeseries(device, &batch) };
            assert_eq!(body, prost::Message::encode_to_vec(&theirs), "{series:?}");
            assert_eq!(ours.identity(), theirs.timeseries[0].identity());
            assert_eq!(ours.samples(), theirs.timeseries[0].samples.len());
            // A series built as a value (the batching tests' path) makes the
            // same entry.
            let mut again = Vec::new();
            theirs.timeseries[0].encode_entry(&mut again);
            assert_eq!(again, body);
        }
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
