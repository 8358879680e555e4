//! Wire formats shared by `edge-agent` and `fleet-bridge`.
//!
//! Two layers (byte-by-byte description: `docs/wire-format.md`):
//!
//! * [`block`]: the measurements of a run of windows, Gorilla-compressed.
//!   The agent stores one *frame* per window as a store record; a block is a
//!   start frame and the continuation frames after it.
//! * [`Envelope`]: one MQTT message: device id, the store sequence number of
//!   the first frame, and the frames of one block, byte for byte as stored.
//!
//! Decoding is strict: every size, count, name and version is checked, so the
//! bridge can hand the result to Prometheus without further validation.

#![forbid(unsafe_code)]

#[cfg(feature = "audit")]
pub mod audit;
pub mod bits;
pub mod block;
#[cfg(feature = "config-doc")]
pub mod config_doc;
#[cfg(feature = "exposition")]
pub mod exposition;
pub mod throttle;
#[cfg(feature = "tls")]
pub mod tls;
pub mod values;

pub use block::{BlockDecoder, BlockEncoder, EncodeError, SeriesKey};
pub use values::{ValueCodec, ValueSeries, ValueType};

use serde::{Deserialize, Serialize};

/// Version byte of [`Envelope`] encodings produced by this crate.
pub const ENVELOPE_VERSION: u8 = 3;

/// Largest accepted MQTT payload (envelope), in bytes.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// Largest MQTT packet a message may travel in: [`MAX_MESSAGE_BYTES`] plus
/// room for the fixed header, the topic, the packet id and MQTT 5
/// properties. The one size limit of the whole path: the agent never
/// builds a larger one (its blocks are at most half the payload limit),
/// the shipped broker refuses larger ones (`max_packet_size` in
/// configs/mosquitto/mosquitto.conf, checked by a test), and the bridge
/// dead-letters a payload over [`MAX_MESSAGE_BYTES`] that reaches it
/// through a broker without that limit.
pub const MAX_PACKET_BYTES: usize = MAX_MESSAGE_BYTES + 1024;
/// Device ids starting with this are refused: the identities of the
/// central side (`fleet-bridge`, `fleet-admin`) live there, so that no
/// device certificate or user name can ever carry one of them.
pub const RESERVED_ID_PREFIX: &str = "fleet-";
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

/// One MQTT message: a stored block on its way to the fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<'a> {
    /// The sending device. The bridge checks it against the topic (and, with
    /// authentication, against the client identity).
    pub device: &'a str,
    /// 0: routine measurements; 1: priority (alarms, anomaly records). Each
    /// lane has its own sequence numbers.
    pub lane: u8,
    /// Sequence number of the store record holding the first frame; frame
    /// `i` was record `first_seq + i`.
    pub first_seq: u64,
    /// Add this to every timestamp of the block: the device's correction
    /// of a wall clock that was wrong when the block was recorded (before
    /// NTP, after an RTC reset; docs/clock.md). 0 when the clock was right.
    pub clock_shift_ms: i64,
    /// The block's frames, each exactly as stored.
    #[serde(borrow)]
    pub frames: Vec<&'a [u8]>,
}

impl<'a> Envelope<'a> {
    /// Encodes `[ENVELOPE_VERSION][postcard(self)]`.
    pub fn encode(&self) -> Vec<u8> {
        let size: usize = self.frames.iter().map(|f| f.len() + 3).sum();
        let mut out = Vec::with_capacity(size + self.device.len() + 16);
        out.push(ENVELOPE_VERSION);
        // Serializing borrowed strings and bytes to a Vec cannot fail.
        out.extend_from_slice(&postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    /// Decodes and validates an envelope (not yet the frames inside).
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
        if env.lane > 1 {
            return Err(DecodeError::Invalid(format!("unknown lane {}", env.lane)));
        }
        if env.frames.is_empty() || env.frames.len() > block::MAX_FRAMES {
            return Err(DecodeError::Invalid(format!("an envelope carries 1..={} frames", block::MAX_FRAMES)));
        }
        if env.clock_shift_ms.unsigned_abs() > MAX_CLOCK_SHIFT_MS as u64 {
            return Err(DecodeError::Invalid(format!("clock shift of {} ms is beyond 100 years", env.clock_shift_ms)));
        }
        Ok(env)
    }

    /// Decodes the block the frames make up, with the clock shift applied.
    pub fn block(&self) -> Result<Batch, DecodeError> {
        let mut batch = block::decode_block(self.frames.iter().copied())?;
        if self.clock_shift_ms != 0 {
            for s in &mut batch.series {
                for p in &mut s.samples {
                    p.timestamp_ms = p.timestamp_ms.saturating_add(self.clock_shift_ms);
                }
            }
        }
        Ok(batch)
    }
}

/// Largest clock correction an envelope may carry (100 years).
pub const MAX_CLOCK_SHIFT_MS: i64 = 100 * 366 * 86_400_000;

/// Version byte of [`TimeRequest`] and [`TimeReply`] encodings.
pub const TIME_VERSION: u8 = 1;

/// Sent by a device on `<prefix>/<device>/time` (QoS 0) when it does not
/// trust its wall clock; any bridge answers with a [`TimeReply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeRequest {
    /// Echoed back: the device matches the reply to its request.
    pub nonce: u64,
}

/// A bridge's answer on `<prefix>/<device>/time/reply`: its wall clock when
/// the request arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeReply {
    pub nonce: u64,
    /// Unix milliseconds.
    pub bridge_ms: i64,
}

impl TimeRequest {
    pub fn encode(&self) -> Vec<u8> {
        with_version(TIME_VERSION, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        exact(versioned(bytes, "time request", TIME_VERSION)?, "time request")
    }
}

impl TimeReply {
    pub fn encode(&self) -> Vec<u8> {
        with_version(TIME_VERSION, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let r: TimeReply = exact(versioned(bytes, "time reply", TIME_VERSION)?, "time reply")?;
        if r.bridge_ms <= 0 {
            return Err(DecodeError::Invalid(format!("time reply with bridge time {}", r.bridge_ms)));
        }
        Ok(r)
    }
}

/// `[version][postcard(value)]`. Serializing plain values into a Vec
/// cannot fail.
fn with_version<T: Serialize>(version: u8, value: &T) -> Vec<u8> {
    let mut out = vec![version];
    out.extend_from_slice(&postcard::to_allocvec(value).unwrap_or_default());
    out
}

/// A postcard value that must fill `body` exactly.
fn exact<T: serde::de::DeserializeOwned>(body: &[u8], what: &'static str) -> Result<T, DecodeError> {
    let (v, rest): (T, _) =
        postcard::take_from_bytes(body).map_err(|e| DecodeError::Malformed { what, reason: e.to_string() })?;
    if !rest.is_empty() {
        return Err(DecodeError::Trailing(rest.len(), what));
    }
    Ok(v)
}

/// Where a device asks for the time, and where the answer goes.
pub fn time_topic(prefix: &str, device: &str) -> String {
    format!("{prefix}/{device}/time")
}

pub fn time_reply_topic(prefix: &str, device: &str) -> String {
    format!("{prefix}/{device}/time/reply")
}

/// Version byte of [`DeliveryAck`] encodings.
pub const ACK_VERSION: u8 = 1;

/// Sent by the bridge to `<prefix>/<device>/ack` once the samples of a block
/// are in the central store (or refused by it for good): the end-to-end
/// confirmation the agent's send position waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryAck {
    pub lane: u8,
    pub first_seq: u64,
    pub last_seq: u64,
}

impl DeliveryAck {
    /// `[ACK_VERSION][postcard(self)]`.
    pub fn encode(&self) -> Vec<u8> {
        with_version(ACK_VERSION, self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let ack: DeliveryAck = exact(versioned(bytes, "delivery ack", ACK_VERSION)?, "delivery ack")?;
        if ack.lane > 1 || ack.first_seq == 0 || ack.first_seq > ack.last_seq {
            return Err(DecodeError::Invalid(format!("delivery ack {ack:?} is not a valid range")));
        }
        Ok(ack)
    }
}

/// The topic a device receives new anomaly models on (operators publish,
/// retained; docs/model.md).
pub fn model_topic(prefix: &str, device: &str) -> String {
    format!("{prefix}/{device}/model")
}

/// The next part of a message of length-prefixed parts (a model message,
/// a probe program pack): a u32 big-endian length and that many bytes,
/// taken off the front of `rest`. `message` and `what` name it in errors.
pub fn take_part<'a>(rest: &mut &'a [u8], message: &str, what: &str) -> Result<&'a [u8], String> {
    if rest.len() < 4 {
        return Err(format!("{message} cut short before its {what}"));
    }
    let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    if rest.len() - 4 < n {
        return Err(format!("{message} cut short in its {what} ({n} bytes announced)"));
    }
    let (p, r) = rest[4..].split_at(n);
    *rest = r;
    Ok(p)
}

/// Appends a part (its u32 big-endian length, then its bytes) to `out`.
pub fn put_part(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u32).to_be_bytes());
    out.extend_from_slice(part);
}

/// How a model message starts (docs/model.md, "The model message").
pub const MODEL_MESSAGE_MAGIC: &[u8] = b"EDGE-MODEL-1\n";
/// The largest model message a device takes.
pub const MODEL_MESSAGE_MAX_BYTES: usize = 1024 * 1024;

/// The message asking a device to go back to its built-in probe programs
/// (docs/probes.md).
pub const PROBE_PROGRAMS_BUILT_IN: &[u8] = b"EDGE-PROBES-BUILTIN\n";

/// The topic of a device's probe program packs (retained; docs/probes.md).
pub fn probe_programs_topic(prefix: &str, device: &str) -> String {
    format!("{prefix}/{device}/probes")
}

/// The topic of a group's probe program packs (retained; a device's own
/// topic wins over it).
pub fn group_probe_programs_topic(prefix: &str, group: &str) -> String {
    format!("{prefix}/group/{group}/probes")
}

/// The model message asking a device to go back to its previous model
/// (docs/model.md).
pub const MODEL_ROLLBACK: &[u8] = b"EDGE-MODEL-ROLLBACK\n";

/// The topic of a group's model messages (retained; a device's own topic
/// wins over it).
pub fn group_model_topic(prefix: &str, group: &str) -> String {
    format!("{prefix}/group/{group}/model")
}

/// The topic a device publishes its certificate request on (retained, PEM;
/// docs/configuration.md, "Certificate renewal").
pub fn certificate_request_topic(prefix: &str, device: &str) -> String {
    format!("{prefix}/{device}/csr")
}

/// The topic a device's new certificate is published on (retained, PEM).
pub fn certificate_topic(prefix: &str, device: &str) -> String {
    format!("{prefix}/{device}/certificate")
}

/// The topic the bridge confirms a device's deliveries on.
pub fn ack_topic(prefix: &str, device: &str) -> String {
    format!("{prefix}/{device}/ack")
}

/// Decoded measurements: series, each with its samples in time order.
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

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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
    /// Number of samples over all series.
    pub fn sample_count(&self) -> usize {
        self.series.iter().map(|s| s.samples.len()).sum()
    }
}

/// The (year, month, day) of a count of days since 1970-01-01 (proleptic
/// Gregorian; Howard Hinnant's civil calendar algorithm, public domain).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn versioned<'a>(bytes: &'a [u8], what: &'static str, supported: u8) -> Result<&'a [u8], DecodeError> {
    match bytes.split_first() {
        None => Err(DecodeError::Empty),
        Some((&v, body)) if v == supported => Ok(body),
        Some((&found, _)) => Err(DecodeError::Version { what, found, supported }),
    }
}

/// Device ids appear in MQTT topics and label values: 1..=64 bytes of
/// `[A-Za-z0-9._-]`, so they can never contain MQTT wildcards or separators,
/// and not starting with [`RESERVED_ID_PREFIX`] (any case).
pub fn validate_device_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_DEVICE_ID {
        return Err(format!("device id {id:?} must be 1..={MAX_DEVICE_ID} bytes"));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(format!("device id {id:?} may only contain A-Z a-z 0-9 . _ -"));
    }
    if id.to_ascii_lowercase().starts_with(RESERVED_ID_PREFIX) {
        return Err(format!(
            "device id {id:?} is reserved: ids starting with {RESERVED_ID_PREFIX:?} name the fleet's central identities"
        ));
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
    device_of(prefix, topic, "metrics")
}

/// The device id in `<prefix>/<device>/<leaf>`, if the topic has that shape.
pub fn device_of<'t>(prefix: &str, topic: &'t str, leaf: &str) -> Option<&'t str> {
    let rest = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let device = rest.strip_suffix(leaf)?.strip_suffix('/')?;
    (!device.contains('/')).then_some(device)
}

/// Retained `online` while the device is connected; its MQTT last will sets
/// `offline` when the connection dies without a goodbye.
pub fn presence_topic(prefix: &str, device: &str) -> String {
    format!("{prefix}/{device}/presence")
}

pub(crate) fn is_metric_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_NAME
        && (b[0].is_ascii_alphabetic() || b[0] == b'_' || b[0] == b':')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_' || *c == b':')
}

pub(crate) fn is_label_name(s: &str) -> bool {
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

    fn frames() -> Vec<Vec<u8>> {
        let k = SeriesKey::new("edge_tcp_connections_opened_total", vec![Label::new("direction", "outbound")]);
        let mut e = BlockEncoder::new();
        (0..3).map(|w| e.frame(1_700_000_000_000 + w * 10_000, &[(k.clone(), w as f64)]).unwrap()).collect()
    }

    #[test]
    fn envelope_round_trips_and_carries_stored_frames_verbatim() {
        let f = frames();
        let env = Envelope {
            device: "press-07",
            lane: 0,
            first_seq: seq_hint(),
            clock_shift_ms: 0,
            frames: f.iter().map(Vec::as_slice).collect(),
        };
        let bytes = env.encode();
        assert_eq!(bytes[0], ENVELOPE_VERSION);
        let back = Envelope::decode(&bytes).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.frames[1], &f[1][..]);
        let b = back.block().unwrap();
        assert_eq!(b.sample_count(), 3);
        assert_eq!(b.series[0].samples[2], Sample { timestamp_ms: 1_700_000_020_000, value: 2.0 });
    }

    fn seq_hint() -> u64 {
        42
    }

    #[test]
    fn unknown_versions_are_named() {
        let f = frames();
        let mut bytes =
            Envelope { device: "d", lane: 0, first_seq: 1, clock_shift_ms: 0, frames: vec![&f[0]] }.encode();
        bytes[0] = 9;
        assert_eq!(
            Envelope::decode(&bytes),
            Err(DecodeError::Version { what: "envelope", found: 9, supported: ENVELOPE_VERSION })
        );
        assert_eq!(Envelope::decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let f = frames();
        let bytes = Envelope {
            device: "d1",
            lane: 0,
            first_seq: 1,
            clock_shift_ms: 0,
            frames: f.iter().map(Vec::as_slice).collect(),
        }
        .encode();
        for n in 0..bytes.len() {
            if let Ok(env) = Envelope::decode(&bytes[..n]) {
                let _ = env.block();
            }
        }
        let mut more = bytes.clone();
        more.push(0);
        assert!(matches!(Envelope::decode(&more), Err(DecodeError::Trailing(1, "envelope"))));
    }

    #[test]
    fn bad_envelopes_are_refused() {
        let f = frames();
        let bad = Envelope { device: "a/b", lane: 0, first_seq: 1, clock_shift_ms: 0, frames: vec![&f[0]] }.encode();
        assert!(matches!(Envelope::decode(&bad), Err(DecodeError::Invalid(_))));
        let empty = Envelope { device: "a", lane: 0, first_seq: 1, clock_shift_ms: 0, frames: vec![] }.encode();
        assert!(matches!(Envelope::decode(&empty), Err(DecodeError::Invalid(_))));
    }

    #[test]
    fn the_clock_shift_moves_every_sample() {
        let f = frames();
        let env = Envelope {
            device: "d",
            lane: 0,
            first_seq: 1,
            clock_shift_ms: 3 * 3_600_000,
            frames: f.iter().map(Vec::as_slice).collect(),
        };
        let bytes = env.encode();
        let back = Envelope::decode(&bytes).unwrap();
        let ts: Vec<i64> = back.block().unwrap().series[0].samples.iter().map(|s| s.timestamp_ms).collect();
        assert_eq!(ts, [1_700_010_800_000, 1_700_010_810_000, 1_700_010_820_000]);
        let wild = Envelope { clock_shift_ms: i64::MIN, ..env };
        assert!(matches!(Envelope::decode(&wild.encode()), Err(DecodeError::Invalid(_))));
    }

    #[test]
    fn time_messages_round_trip_and_are_checked() {
        let q = TimeRequest { nonce: 77 };
        assert_eq!(TimeRequest::decode(&q.encode()), Ok(q));
        let r = TimeReply { nonce: 77, bridge_ms: 1_795_000_000_000 };
        assert_eq!(TimeReply::decode(&r.encode()), Ok(r));
        assert!(TimeReply::decode(&TimeReply { nonce: 1, bridge_ms: 0 }.encode()).is_err());
        let mut long = r.encode();
        long.push(0);
        assert!(TimeReply::decode(&long).is_err());
        assert_eq!(time_reply_topic("edge", "d1"), "edge/d1/time/reply");
    }

    #[test]
    fn delivery_acks_round_trip_and_are_checked() {
        let a = DeliveryAck { lane: 1, first_seq: 10, last_seq: 14 };
        assert_eq!(DeliveryAck::decode(&a.encode()), Ok(a));
        assert!(DeliveryAck::decode(&DeliveryAck { lane: 0, first_seq: 5, last_seq: 4 }.encode()).is_err());
        assert!(DeliveryAck::decode(&DeliveryAck { lane: 2, first_seq: 1, last_seq: 1 }.encode()).is_err());
        assert!(DeliveryAck::decode(&[1]).is_err());
        assert_eq!(ack_topic("edge", "d1"), "edge/d1/ack");
    }

    #[test]
    fn topics_name_exactly_one_device() {
        assert_eq!(metrics_topic("edge", "d1"), "edge/d1/metrics");
        assert_eq!(device_of_topic("edge", "edge/d1/metrics"), Some("d1"));
        assert_eq!(device_of_topic("edge", "edge/a/b/metrics"), None);
        assert_eq!(device_of_topic("edge", "other/d1/metrics"), None);
        assert_eq!(device_of_topic("edge", "edgex/d1/metrics"), None);
    }

    #[test]
    fn central_identities_are_not_device_ids() {
        for id in ["fleet-bridge", "fleet-admin", "FLEET-bridge", "fleet-"] {
            assert!(validate_device_id(id).unwrap_err().contains("reserved"), "{id}");
        }
        for id in ["fleet", "fleetbridge", "press-fleet-1"] {
            validate_device_id(id).unwrap();
        }
    }
}

#[cfg(test)]
mod golden {
    use super::*;

    /// The worked example of docs/wire-format.md, byte for byte.
    #[test]
    fn documented_example() {
        let k = SeriesKey::new("m", vec![Label::new("k", "v")]);
        let mut e = BlockEncoder::new();
        let f0 = e.frame(1000, &[(k.clone(), 1.0)]).unwrap();
        let f1 = e.frame(11000, &[(k.clone(), 2.0)]).unwrap();
        let f2 = e.frame(21001, &[(k, 3.0)]).unwrap();
        let env =
            Envelope { device: "d1", lane: 1, first_seq: 300, clock_shift_ms: 0, frames: vec![&f0, &f1, &f2] }.encode();
        let hex: Vec<String> = env.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex.join(" "), GOLDEN);
    }

    /// The value section's worked example of docs/wire-format.md.
    #[test]
    fn documented_value_example() {
        let vs = |samples| crate::ValueSeries {
            key: SeriesKey::new("v", vec![Label::new("tag", "p")]),
            codec: crate::ValueCodec::new(crate::ValueType::U16),
            samples,
        };
        let mut e = BlockEncoder::new();
        let f0 = e.frame_with_values(1000, &[], &[vs(vec![(900, 5), (950, 6)])]).unwrap();
        let f1 = e.frame_with_values(2000, &[], &[vs(vec![(1000, 6)])]).unwrap();
        let hex = |f: &[u8]| f.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
        assert_eq!(hex(&f0), GOLDEN_VALUES_0);
        assert_eq!(hex(&f1), GOLDEN_VALUES_1);
        let batch = block::decode_block([f0.as_slice(), f1.as_slice()]).unwrap();
        let got: Vec<(i64, f64)> = batch.series[0].samples.iter().map(|s| (s.timestamp_ms, s.value)).collect();
        assert_eq!(got, [(900, 5.0), (950, 6.0), (1000, 6.0)]);
    }

    const GOLDEN_VALUES_0: &str = "21 03 d0 0f 00 01 00 01 76 01 00 03 74 61 67 00 01 70 02 00 00 00 00 00 00 f0 3f 00 00 00 00 00 00 00 00 01 00 02 02 69 cc 62 00 00 00 00 00 00 00 05 60";
    const GOLDEN_VALUES_1: &str = "22 03 d0 0f 00 00 01 00 01 01 80";

    const GOLDEN: &str = "03 02 64 31 01 ac 02 00 03 17 21 01 d0 0f 01 00 01 6d 01 00 01 6b 00 01 76 3f f0 00 00 00 00 00 00 08 22 01 a0 9c 01 00 80 80 05 22 01 02 00 00";
}
