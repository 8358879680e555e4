//! What the bridge does with one MQTT message, without I/O: decide whether it
//! is a device's valid batch, and build the remote-write body for it.

use crate::remote_write::{self, WriteRequest};
use edge_wire::{Batch, DecodeError, Envelope};

/// A message ready to be written.
#[derive(Debug)]
pub struct Write {
    pub device: String,
    pub lane: u8,
    /// Store sequence numbers of the block's first and last frames.
    pub first_seq: u64,
    pub last_seq: u64,
    /// Samples to write (those within the time bounds).
    pub samples: usize,
    /// Samples the bridge will not write: outside [`TimeBounds`].
    pub out_of_bounds: OutOfBounds,
    /// What to write: the block's series within the time bounds (the
    /// bridge adds its `device` label when it encodes them,
    /// [`remote_write::DeviceSeries`]).
    pub batch: Batch,
    /// An audit block's records (then `batch` is empty): for the audit log,
    /// not the store (audit.rs).
    pub audit: Option<crate::audit::Block>,
}

/// The span of sample times the bridge writes, around its own wall clock:
/// no later than `now + max_ahead`, no earlier than `now - max_age`.
///
/// Why the upper bound matters (docs/threat-model.md): Prometheus's
/// out-of-order window is relative to the newest sample it holds, not to
/// the wall clock. One sample dated a year ahead moves its head a year
/// ahead, and from then on every device's current samples are "too old".
/// Bounding at the bridge keeps the head within `max_ahead` of true time
/// whatever a device sends. The lower bound spares the store samples it
/// would refuse anyway (older than its out-of-order window) and counts
/// them per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeBounds {
    pub oldest_ms: i64,
    pub newest_ms: i64,
}

impl TimeBounds {
    pub fn around(now_ms: i64, max_age_ms: i64, max_ahead_ms: i64) -> TimeBounds {
        TimeBounds { oldest_ms: now_ms.saturating_sub(max_age_ms), newest_ms: now_ms.saturating_add(max_ahead_ms) }
    }

    /// Wide open: every representable time (tests of the other checks).
    pub const ANY: TimeBounds = TimeBounds { oldest_ms: i64::MIN, newest_ms: i64::MAX };
}

/// Samples of a message left out because of their time, by side.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutOfBounds {
    /// Later than the bridge's clock plus `max_sample_ahead_secs`.
    pub ahead: usize,
    /// Earlier than the bridge's clock minus `max_sample_age_secs`.
    pub too_old: usize,
    /// The first time left out (for the log).
    pub example_ms: Option<i64>,
}

impl OutOfBounds {
    pub fn total(&self) -> usize {
        self.ahead + self.too_old
    }
}

/// Removes the samples outside `bounds` from `batch` (and the series left
/// empty); returns what was removed.
pub fn keep_within(batch: &mut Batch, bounds: TimeBounds) -> OutOfBounds {
    let mut out = OutOfBounds::default();
    for series in &mut batch.series {
        series.samples.retain(|p| {
            let t = p.timestamp_ms;
            let keep = (bounds.oldest_ms..=bounds.newest_ms).contains(&t);
            if !keep {
                if t > bounds.newest_ms {
                    out.ahead += 1;
                } else {
                    out.too_old += 1;
                }
                out.example_ms.get_or_insert(t);
            }
            keep
        });
    }
    batch.series.retain(|s| !s.samples.is_empty());
    out
}

/// Why a message will never be written. Such messages are acknowledged (so
/// they cannot block the device's stream) and counted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Topic not of the form `<prefix>/<device>/metrics`.
    BadTopic,
    /// Envelope or batch could not be decoded or failed validation.
    Undecodable(String),
    /// The envelope names a different device than the topic.
    WrongDevice { topic: String, claimed: String },
    /// The payload is over [`edge_wire::MAX_MESSAGE_BYTES`]: it reached
    /// the bridge through a broker without the shipped size limit.
    TooLarge(usize),
}

impl Refusal {
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::BadTopic => "bad_topic",
            Refusal::Undecodable(_) => "undecodable",
            Refusal::WrongDevice { .. } => "wrong_device",
            Refusal::TooLarge(_) => "too_large",
        }
    }
}

/// Decodes and checks a message on `topic`, and builds what to write:
/// the samples within `bounds` (the rest counted in
/// [`Write::out_of_bounds`]).
pub fn prepare(prefix: &str, topic: &str, payload: &[u8], bounds: TimeBounds) -> Result<Write, Refusal> {
    let device = edge_wire::device_of_topic(prefix, topic).ok_or(Refusal::BadTopic)?;
    edge_wire::validate_device_id(device).map_err(|_| Refusal::BadTopic)?;
    let env = Envelope::decode(payload).map_err(|e| match e {
        DecodeError::TooLarge(n) => Refusal::TooLarge(n),
        e => Refusal::Undecodable(e.to_string()),
    })?;
    if env.device != device {
        return Err(Refusal::WrongDevice { topic: device.into(), claimed: env.device.into() });
    }
    let last_seq = env.first_seq + env.frames.len() as u64 - 1;
    if env.frames.iter().any(|f| edge_wire::audit::is_audit_frame(f)) {
        let block = crate::audit::Block::decode(&env).map_err(|e| Refusal::Undecodable(e.to_string()))?;
        return Ok(Write {
            device: device.into(),
            lane: env.lane,
            first_seq: env.first_seq,
            last_seq,
            samples: 0,
            out_of_bounds: OutOfBounds::default(),
            batch: Batch { series: Vec::new() },
            audit: Some(block),
        });
    }
    let mut batch = env.block().map_err(|e| Refusal::Undecodable(e.to_string()))?;
    let out_of_bounds = keep_within(&mut batch, bounds);
    Ok(Write {
        device: device.into(),
        lane: env.lane,
        first_seq: env.first_seq,
        last_seq,
        samples: batch.sample_count(),
        out_of_bounds,
        batch,
        audit: None,
    })
}

impl Write {
    /// What it writes, as a request of values (tests and simulations; the
    /// bridge encodes the series straight from [`Write::batch`]).
    pub fn request(&self) -> WriteRequest {
        WriteRequest { timeseries: remote_write::to_timeseries(&self.device, &self.batch) }
    }
}

/// The request that asks whether the store takes writes at all: one
/// sample `fleet_bridge_store_probe{bridge="<client id>"} 1` at `now_ms`.
pub fn store_probe(bridge: &str, now_ms: i64) -> WriteRequest {
    let labels = [("__name__", "fleet_bridge_store_probe"), ("bridge", bridge)]
        .map(|(name, value)| remote_write::Label { name: name.into(), value: value.into() })
        .to_vec();
    WriteRequest {
        timeseries: vec![remote_write::TimeSeries {
            labels,
            samples: vec![remote_write::Sample { value: 1.0, timestamp: now_ms }],
        }],
    }
}

/// Samples in a request.
pub fn sample_count(req: &WriteRequest) -> usize {
    req.timeseries.iter().map(|t| t.samples.len()).sum()
}

/// Splits a request of two or more samples into two halves: by series when
/// there are several, else by the one series' samples. Used to isolate the
/// samples a store refuses: Prometheus rejects a whole request for one
/// out-of-order or too-old sample.
pub fn split(mut req: WriteRequest) -> (WriteRequest, WriteRequest) {
    if req.timeseries.len() > 1 {
        let tail = req.timeseries.split_off(req.timeseries.len() / 2);
        return (req, WriteRequest { timeseries: tail });
    }
    let mut ts = req.timeseries.pop().unwrap_or_default();
    let tail = ts.samples.split_off(ts.samples.len() / 2);
    let other = remote_write::TimeSeries { labels: ts.labels.clone(), samples: tail };
    (WriteRequest { timeseries: vec![ts] }, WriteRequest { timeseries: vec![other] })
}

/// Errors a Prometheus-compatible store gives for a sample it will never
/// accept (Prometheus's wording), and the reason label each is counted
/// under. They count whatever the status code: Prometheus 2.42 answers a
/// sample older than its out-of-order window with HTTP 500 "too old sample",
/// so a sender that trusted the status alone would retry it forever and
/// block the device's stream.
const PERMANENT: [(&str, &str); 5] = [
    ("out of order", "out_of_order"),
    ("out of bounds", "out_of_bounds"),
    ("too old sample", "out_of_bounds"),
    ("duplicate sample", "duplicate_timestamp"),
    ("invalid label", "invalid_labels"),
];

/// The permanent per-sample error named in a store's answer, if any.
fn permanent_error(body: &str) -> Option<&'static str> {
    let b = body.to_ascii_lowercase();
    PERMANENT.iter().find(|(text, _)| b.contains(text)).map(|(_, reason)| *reason)
}

/// Why a store refused samples, from its error text.
pub fn refusal_reason(body: &str) -> &'static str {
    permanent_error(body).unwrap_or("other")
}

/// How to treat a remote-write HTTP status.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Verdict {
    /// Stored: acknowledge the message.
    Written,
    /// The store refuses these samples for good (bad data, too old,
    /// out of order): acknowledge, count, log.
    Refused,
    /// Try again later; do not acknowledge.
    Retry,
}

pub fn verdict(status: u16, body: &str) -> Verdict {
    match status {
        200..=299 => Verdict::Written,
        429 => Verdict::Retry,
        400..=499 => Verdict::Refused,
        _ if permanent_error(body).is_some() => Verdict::Refused,
        _ => Verdict::Retry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_wire::{BlockEncoder, Label, SeriesKey};

    /// An encoded envelope of `device`'s `frames`, the first record `first_seq`.
    fn envelope(device: &str, first_seq: u64, clock_shift_ms: i64, frames: &[Vec<u8>]) -> Vec<u8> {
        Envelope { device, lane: 0, first_seq, clock_shift_ms, frames: frames.iter().map(Vec::as_slice).collect() }
            .encode()
    }

    fn payload(device: &str) -> Vec<u8> {
        let k = SeriesKey::new("m", vec![Label::new("k", "v")]);
        let mut e = BlockEncoder::new();
        envelope(device, 3, 0, &[e.frame(5, &[(k.clone(), 1.5)]).unwrap(), e.frame(15, &[(k, 2.5)]).unwrap()])
    }

    #[test]
    fn valid_message_becomes_a_write() {
        let w = prepare("edge", "edge/d1/metrics", &payload("d1"), TimeBounds::ANY).unwrap();
        assert_eq!((w.device.as_str(), w.first_seq, w.last_seq, w.samples), ("d1", 3, 4, 2));
        let req = w.request();
        let ts: Vec<i64> = req.timeseries[0].samples.iter().map(|s| s.timestamp).collect();
        assert_eq!(ts, [5, 15]);
    }

    #[test]
    fn a_device_cannot_speak_for_another() {
        assert_eq!(
            prepare("edge", "edge/d1/metrics", &payload("d2"), TimeBounds::ANY).unwrap_err(),
            Refusal::WrongDevice { topic: "d1".into(), claimed: "d2".into() }
        );
    }

    #[test]
    fn garbage_and_bad_topics_are_refused() {
        let any = TimeBounds::ANY;
        assert_eq!(prepare("edge", "edge/d1/x", &payload("d1"), any).unwrap_err(), Refusal::BadTopic);
        assert_eq!(prepare("edge", "edge/+/metrics", &payload("d1"), any).unwrap_err(), Refusal::BadTopic);
        let p = payload("d1");
        for n in 0..p.len() {
            assert!(prepare("edge", "edge/d1/metrics", &p[..n], any).is_err());
        }
        let huge = vec![edge_wire::ENVELOPE_VERSION; edge_wire::MAX_MESSAGE_BYTES + 1];
        assert_eq!(
            prepare("edge", "edge/d1/metrics", &huge, any).unwrap_err(),
            Refusal::TooLarge(edge_wire::MAX_MESSAGE_BYTES + 1)
        );
    }

    #[test]
    fn samples_beyond_the_bounds_are_left_out_and_counted() {
        let now = 1_800_000_000_000;
        let year = 366 * 86_400_000;
        let mut e = BlockEncoder::new();
        let k = SeriesKey::new("m", vec![Label::new("k", "v")]);
        let only_future = SeriesKey::new("f", vec![]);
        let times = [1_000, now - 8 * 86_400_000, now - 60_000, now, now + 200_000, now + year];
        let frames: Vec<Vec<u8>> = times
            .iter()
            .map(|&t| {
                let mut s = vec![(k.clone(), 1.0)];
                if t > now + 300_000 {
                    s.push((only_future.clone(), 2.0));
                }
                e.frame(t, &s).unwrap()
            })
            .collect();
        let p = envelope("d", 9, 0, &frames);
        let bounds = TimeBounds::around(now, 7 * 86_400_000, 300_000);
        let w = prepare("edge", "edge/d/metrics", &p, bounds).unwrap();
        assert_eq!(w.out_of_bounds, OutOfBounds { ahead: 2, too_old: 2, example_ms: Some(1_000) });
        assert_eq!(w.samples, 3);
        assert_eq!((w.first_seq, w.last_seq), (9, 14), "the whole block is confirmed");
        assert_eq!(w.request().timeseries.len(), 1, "a series with nothing left is not written");
        let kept: Vec<i64> = w.request().timeseries[0].samples.iter().map(|s| s.timestamp).collect();
        assert_eq!(kept, [now - 60_000, now, now + 200_000]);
        // The bounds apply after the device's clock correction.
        let ahead = BlockEncoder::new().frame(now + year, &[(k, 1.0), (only_future, 2.0)]).unwrap();
        let shifted = envelope("d", 9, -year, &[ahead]);
        let w = prepare("edge", "edge/d/metrics", &shifted, bounds).unwrap();
        assert_eq!((w.out_of_bounds.total(), w.samples), (0, 2));
    }

    /// The request for a block of `series` series over `windows` windows.
    fn request(series: usize, windows: i64) -> WriteRequest {
        let mut e = BlockEncoder::new();
        let keys: Vec<SeriesKey> =
            (0..series).map(|i| SeriesKey::new("m", vec![Label::new("i", i.to_string())])).collect();
        let frames: Vec<Vec<u8>> = (0..windows)
            .map(|w| e.frame(w * 10, &keys.iter().map(|k| (k.clone(), w as f64)).collect::<Vec<_>>()).unwrap())
            .collect();
        prepare("edge", "edge/d/metrics", &envelope("d", 1, 0, &frames), TimeBounds::ANY).unwrap().request()
    }

    #[test]
    fn split_halves_until_one_sample() {
        let req = request(3, 5);
        assert_eq!(sample_count(&req), 15);
        // Split all the way down: every sample ends up alone, none lost.
        let mut todo = vec![req];
        let mut singles = 0;
        while let Some(r) = todo.pop() {
            if sample_count(&r) == 1 {
                singles += 1;
                assert_eq!(r.timeseries[0].labels.len(), 3);
            } else {
                let (a, b) = split(r);
                assert!(sample_count(&a) > 0 && sample_count(&b) > 0);
                todo.push(a);
                todo.push(b);
            }
        }
        assert_eq!(singles, 15);
    }

    #[test]
    fn refusal_reasons_from_prometheus_text() {
        assert_eq!(refusal_reason("out of order sample"), "out_of_order");
        assert_eq!(refusal_reason("out of bounds"), "out_of_bounds");
        assert_eq!(refusal_reason("duplicate sample for timestamp"), "duplicate_timestamp");
        assert_eq!(refusal_reason("?"), "other");
    }

    #[test]
    fn statuses() {
        assert_eq!(verdict(204, ""), Verdict::Written);
        assert_eq!(verdict(400, "x"), Verdict::Refused);
        assert_eq!(verdict(429, ""), Verdict::Retry);
        assert_eq!(verdict(503, "unavailable"), Verdict::Retry);
        // What Prometheus 2.42 actually answers for a sample beyond its
        // out-of-order window (seen in the e2e test).
        assert_eq!(verdict(500, "too old sample"), Verdict::Refused);
    }
}
