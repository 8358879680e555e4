//! Wire formats shared by `edge-agent` and `fleet-bridge`.
//!
//! Two layers, each with its own version byte so they can evolve separately
//! (byte-by-byte description: `docs/wire-format.md`):
//!
//! * [`Batch`]: the measurements of one window. The agent encodes it once and
//!   stores exactly these bytes as a store record's payload; the uplink sends
//!   the same bytes, never re-encoding them.
//! * [`Envelope`]: what travels as one MQTT message: device id, the store
//!   sequence number of the record, and the batch bytes.
//!
//! Decoding is strict: every size, count, name and version is checked, so the
//! bridge can hand the result to Prometheus without further validation.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

/// Version byte of [`Envelope`] encodings produced by this crate.
pub const ENVELOPE_VERSION: u8 = 1;
/// Version byte of [`Batch`] encodings produced by this crate.
pub const BATCH_VERSION: u8 = 1;

/// Largest accepted MQTT payload (envelope), in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest device id, in bytes.
pub const MAX_DEVICE_ID: usize = 64;
/// Most series in one batch.
pub const MAX_SERIES: usize = 20_000;
/// Most samples per series in one batch.
pub const MAX_SAMPLES_PER_SERIES: usize = 10_000;
/// Most labels per series (the metric name not counted).
pub const MAX_LABELS: usize = 16;
/// Longest metric name, label name or label value, in bytes.
pub const MAX_NAME: usize = 128;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE: usize = 256;

/// Label names the bridge sets itself; a batch may not carry them.
pub const RESERVED_LABELS: &[&str] = &["device", "__name__"];

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("message of {0} bytes is over the limit of {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("unsupported {what} version {found} (this build reads version {supported})")]
    Version { what: &'static str, found: u8, supported: u8 },
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("{0} trailing bytes after the {1}")]
    Trailing(usize, &'static str),
    #[error("invalid content: {0}")]
    Invalid(String),
}

/// One MQTT message: a stored batch on its way to the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<'a> {
    /// The sending device. The bridge checks it against the topic (and, with
    /// authentication, against the client identity).
    pub device: &'a str,
    /// Sequence number of the store record carrying `batch`.
    pub seq: u64,
    /// A [`Batch`] encoding, exactly as stored (version byte first).
    pub batch: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Encodes `[ENVELOPE_VERSION][postcard(self)]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.batch.len() + self.device.len() + 16);
        out.push(ENVELOPE_VERSION);
        // Serializing borrowed strings and bytes to a Vec cannot fail.
        out.extend_from_slice(&postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    /// Decodes and validates an envelope (not yet the batch inside).
    pub fn decode(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let body = versioned(bytes, "envelope", ENVELOPE_VERSION)?;
        let (env, rest): (Envelope<'a>, _) = postcard::take_from_bytes(body)
            .map_err(|e| DecodeError::Malformed { what: "envelope", reason: e.to_string() })?;
        if !rest.is_empty() {
            return Err(DecodeError::Trailing(rest.len(), "envelope"));
        }
        validate_device_id(env.device).map_err(DecodeError::Invalid)?;
        Ok(env)
    }
}

/// The measurements of one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub series: Vec<Series>,
}

/// One time series: name, labels, and samples in timestamp order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub name: String,
    /// Sorted by name, names unique.
    pub labels: Vec<Label>,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Label {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch, as Prometheus wants them.
    pub timestamp_ms: i64,
    pub value: f64,
}

impl Label {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Label { name: name.into(), value: value.into() }
    }
}

impl Batch {
    /// Encodes `[BATCH_VERSION][postcard(self)]`. Validate first: the encoder
    /// does not check what it writes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![BATCH_VERSION];
        out.extend_from_slice(&postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    /// Decodes and validates a batch.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(DecodeError::TooLarge(bytes.len()));
        }
        let body = versioned(bytes, "batch", BATCH_VERSION)?;
        let (batch, rest): (Batch, _) = postcard::take_from_bytes(body)
            .map_err(|e| DecodeError::Malformed { what: "batch", reason: e.to_string() })?;
        if !rest.is_empty() {
            return Err(DecodeError::Trailing(rest.len(), "batch"));
        }
        batch.validate().map_err(DecodeError::Invalid)?;
        Ok(batch)
    }

    /// Checks every limit and naming rule of `docs/wire-format.md`.
    pub fn validate(&self) -> Result<(), String> {
        if self.series.len() > MAX_SERIES {
            return Err(format!("{} series, limit {MAX_SERIES}", self.series.len()));
        }
        for s in &self.series {
            s.validate().map_err(|e| format!("series {:?}: {e}", s.name))?;
        }
        Ok(())
    }

    /// Number of samples over all series.
    pub fn sample_count(&self) -> usize {
        self.series.iter().map(|s| s.samples.len()).sum()
    }
}

impl Series {
    fn validate(&self) -> Result<(), String> {
        if !is_metric_name(&self.name) {
            return Err("metric name must match [a-zA-Z_:][a-zA-Z0-9_:]* (≤128 bytes)".into());
        }
        if self.labels.len() > MAX_LABELS {
            return Err(format!("{} labels, limit {MAX_LABELS}", self.labels.len()));
        }
        let mut prev: Option<&str> = None;
        for l in &self.labels {
            if !is_label_name(&l.name) {
                return Err(format!("label name {:?} is not a valid name", l.name));
            }
            if RESERVED_LABELS.contains(&l.name.as_str()) {
                return Err(format!("label {:?} is reserved for the bridge", l.name));
            }
            if l.value.is_empty() || l.value.len() > MAX_LABEL_VALUE {
                return Err(format!("label {:?}: value must be 1..={MAX_LABEL_VALUE} bytes", l.name));
            }
            if let Some(p) = prev {
                if p >= l.name.as_str() {
                    return Err("labels must be sorted by name and unique".into());
                }
            }
            prev = Some(&l.name);
        }
        if self.samples.is_empty() || self.samples.len() > MAX_SAMPLES_PER_SERIES {
            return Err(format!("sample count must be 1..={MAX_SAMPLES_PER_SERIES}"));
        }
        let mut last = i64::MIN;
        for s in &self.samples {
            if s.timestamp_ms <= last {
                return Err("sample timestamps must be strictly increasing".into());
            }
            last = s.timestamp_ms;
        }
        Ok(())
    }
}

fn versioned<'a>(bytes: &'a [u8], what: &'static str, supported: u8) -> Result<&'a [u8], DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Empty),
        Some((&v, body)) if v == supported => Ok(body),
        Some((&found, _)) => Err(DecodeError::Version { what, found, supported }),
    }
}

/// Device ids appear in MQTT topics and label values: 1..=64 bytes of
/// `[A-Za-z0-9._-]`, so they can never contain MQTT wildcards or separators.
pub fn validate_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_DEVICE_ID {
        return Err(format!("device id {id:?} must be 1..={MAX_DEVICE_ID} bytes"));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(format!("device id {id:?} may only contain A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

/// The MQTT topic a device publishes its metrics on.
pub fn metrics_topic(prefix: &str, device: &str) -> String {
    format!("{prefix}/{device}/metrics")
}

/// The device id in a metrics topic `<prefix>/<device>/metrics`, if the topic
/// has that shape.
pub fn device_of_topic<'t>(prefix: &str, topic: &'t str) -> Option<&'t str> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let device = rest.strip_suffix("/metrics")?;
    (!device.contains('/')).then_some(device)
}

fn is_metric_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME
        && (b[0].is_ascii_alphabetic() || b[0] == b'_' || b[0] == b':')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b':')
}

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && !s.starts_with("__")
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> Batch {
        Batch {
            series: vec![Series {
                name: "edge_tcp_connections_opened_total".into(),
                labels: vec![Label::new("direction", "outbound"), Label::new("port_class", "mqtt")],
                samples: vec![
                    Sample { timestamp_ms: 1_700_000_000_000, value: 3.0 },
                    Sample { timestamp_ms: 1_700_000_010_000, value: 5.0 },
                ],
            }],
        }
    }

    #[test]
    fn batch_round_trips_with_version_first() {
        let b = batch();
        let bytes = b.encode();
        assert_eq!(bytes[0], BATCH_VERSION);
        assert_eq!(Batch::decode(&bytes).unwrap(), b);
    }

    #[test]
    fn envelope_round_trips_and_carries_stored_bytes_verbatim() {
        let stored = batch().encode();
        let env = Envelope { device: "press-07", seq: 42, batch: &stored };
        let bytes = env.encode();
        assert_eq!(bytes[0], ENVELOPE_VERSION);
        let back = Envelope::decode(&bytes).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.batch, &stored[..]);
    }

    #[test]
    fn unknown_versions_are_named() {
        let mut bytes = batch().encode();
        bytes[0] = 9;
        assert_eq!(Batch::decode(&bytes), Err(DecodeError::Version { what: "batch", found: 9, supported: 1 }));
        assert_eq!(Envelope::decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let stored = batch().encode();
        let bytes = Envelope { device: "d1", seq: 1, batch: &stored }.encode();
        for n in 0..bytes.len() {
            assert!(Envelope::decode(&bytes[..n]).is_err(), "prefix {n} decoded");
        }
        for n in 0..stored.len() {
            assert!(Batch::decode(&stored[..n]).is_err(), "prefix {n} decoded");
        }
    }

    #[test]
    fn trailing_bytes_are_rejected() {
        let mut stored = batch().encode();
        stored.push(0);
        assert!(matches!(Batch::decode(&stored), Err(DecodeError::Trailing(1, "batch"))));
    }

    #[test]
    fn invalid_content_is_rejected() {
        let mut b = batch();
        b.series[0].labels.reverse();
        assert!(b.validate().unwrap_err().contains("sorted"));
        let mut b = batch();
        b.series[0].labels[0].name = "device".into();
        assert!(b.validate().unwrap_err().contains("reserved"));
        let mut b = batch();
        b.series[0].samples[1].timestamp_ms = b.series[0].samples[0].timestamp_ms;
        assert!(b.validate().unwrap_err().contains("increasing"));
        let mut b = batch();
        b.series[0].name = "1bad".into();
        assert!(b.validate().is_err());
        let bad = Envelope { device: "a/b", seq: 1, batch: &[1] }.encode();
        assert!(matches!(Envelope::decode(&bad), Err(DecodeError::Invalid(_))));
    }

    #[test]
    fn topics_name_exactly_one_device() {
        assert_eq!(metrics_topic("edge", "d1"), "edge/d1/metrics");
        assert_eq!(device_of_topic("edge", "edge/d1/metrics"), Some("d1"));
        assert_eq!(device_of_topic("edge", "edge/a/b/metrics"), None);
        assert_eq!(device_of_topic("edge", "other/d1/metrics"), None);
        assert_eq!(device_of_topic("edge", "edgex/d1/metrics"), None);
    }
}

#[cfg(test)]
mod golden {
    use super::*;

    /// The worked example of docs/wire-format.md, byte for byte.
    #[test]
    fn documented_example() {
        let batch = Batch {
            series: vec![Series {
                name: "m".into(),
                labels: vec![Label::new("k", "v")],
                samples: vec![Sample { timestamp_ms: 1000, value: 1.0 }],
            }],
        }
        .encode();
        assert_eq!(
            batch,
            [
                0x01, // batch version
                0x01, // 1 series
                0x01, b'm', // name
                0x01, 0x01, b'k', 0x01, b'v', // 1 label: k=v
                0x01, 0xd0, 0x0f, // 1 sample, timestamp 1000 (zigzag varint 2000)
                0, 0, 0, 0, 0, 0, 0xf0, 0x3f, // value 1.0 (f64 LE)
            ]
        );
        let env = Envelope { device: "d1", seq: 300, batch: &batch }.encode();
        let mut expected = vec![
            0x01, // envelope version
            0x02,
            b'd',
            b'1', // device
            0xac,
            0x02,              // seq 300 (varint)
            batch.len() as u8, // batch length
        ];
        expected.extend_from_slice(&batch);
        assert_eq!(env, expected);
    }
}
