//! What the bridge does with one MQTT message, without I/O: decide whether it
//! is a device's valid batch, and build the remote-write body for it.

use crate::remote_write::{self, WriteRequest};
use edge_wire::Envelope;

/// A message ready to be written.
#[derive(Debug)]
pub struct Write {
    pub device: String,
    pub lane: u8,
    /// Store sequence numbers of the block's first and last frames.
    pub first_seq: u64,
    pub last_seq: u64,
    pub samples: usize,
    /// What to write; split on refusal (see [`split`]).
    pub req: WriteRequest,
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
}

impl Refusal {
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::BadTopic => "bad_topic",
            Refusal::Undecodable(_) => "undecodable",
            Refusal::WrongDevice { .. } => "wrong_device",
        }
    }
}

pub fn prepare(prefix: &str, topic: &str, payload: &[u8]) -> Result<Write, Refusal> {
    let device = edge_wire::device_of_topic(prefix, topic).ok_or(Refusal::BadTopic)?;
    edge_wire::validate_device_id(device).map_err(|_| Refusal::BadTopic)?;
    let env = Envelope::decode(payload).map_err(|e| Refusal::Undecodable(e.to_string()))?;
    if env.device != device {
        return Err(Refusal::WrongDevice { topic: device.into(), claimed: env.device.into() });
    }
    let batch = env.block().map_err(|e| Refusal::Undecodable(e.to_string()))?;
    let req = WriteRequest { timeseries: remote_write::to_timeseries(device, &batch) };
    Ok(Write {
        device: device.into(),
        lane: env.lane,
        first_seq: env.first_seq,
        last_seq: env.first_seq + env.frames.len() as u64 - 1,
        samples: batch.sample_count(),
        req,
    })
}

/// Samples in a request.
pub fn sample_count(req: &WriteRequest) -> usize {
    req.timeseries.iter().map(|t| t.samples.len()).sum()
}

/// Deals a request's series into at most `n` requests of about the same
/// number of samples (a series stays whole, in one of them). Small
/// requests are not split.
pub fn split_series(req: WriteRequest, n: usize) -> Vec<WriteRequest> {
    const MIN_SAMPLES_PER_PART: usize = 10_000;
    let total = sample_count(&req);
    let n = n.clamp(1, (total / MIN_SAMPLES_PER_PART).max(1)).min(req.timeseries.len().max(1));
    if n == 1 {
        return vec![req];
    }
    let mut parts: Vec<WriteRequest> = (0..n).map(|_| WriteRequest { timeseries: Vec::new() }).collect();
    let mut sizes = vec![0usize; n];
    for ts in req.timeseries {
        // The part with the fewest samples so far.
        let i = (0..n).min_by_key(|&i| sizes[i]).unwrap_or(0);
        sizes[i] += ts.samples.len();
        parts[i].timeseries.push(ts);
    }
    parts
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

    fn payload(device: &str) -> Vec<u8> {
        let k = SeriesKey::new("m", vec![Label::new("k", "v")]);
        let mut e = BlockEncoder::new();
        let frames = [e.frame(5, &[(k.clone(), 1.5)]).unwrap(), e.frame(15, &[(k, 2.5)]).unwrap()];
        Envelope {
            device,
            lane: 0,
            first_seq: 3,
            clock_shift_ms: 0,
            frames: frames.iter().map(Vec::as_slice).collect(),
        }
        .encode()
    }

    #[test]
    fn valid_message_becomes_a_write() {
        let w = prepare("edge", "edge/d1/metrics", &payload("d1")).unwrap();
        assert_eq!((w.device.as_str(), w.first_seq, w.last_seq, w.samples), ("d1", 3, 4, 2));
        let req = w.req;
        let ts: Vec<i64> = req.timeseries[0].samples.iter().map(|s| s.timestamp).collect();
        assert_eq!(ts, [5, 15]);
    }

    #[test]
    fn a_device_cannot_speak_for_another() {
        assert_eq!(
            prepare("edge", "edge/d1/metrics", &payload("d2")).unwrap_err(),
            Refusal::WrongDevice { topic: "d1".into(), claimed: "d2".into() }
        );
    }

    #[test]
    fn garbage_and_bad_topics_are_refused() {
        assert_eq!(prepare("edge", "edge/d1/x", &payload("d1")).unwrap_err(), Refusal::BadTopic);
        assert_eq!(prepare("edge", "edge/+/metrics", &payload("d1")).unwrap_err(), Refusal::BadTopic);
        let p = payload("d1");
        for n in 0..p.len() {
            assert!(prepare("edge", "edge/d1/metrics", &p[..n]).is_err());
        }
    }

    /// The request for a block of `series` series over `windows` windows.
    fn request(series: usize, windows: i64) -> WriteRequest {
        let mut e = BlockEncoder::new();
        let keys: Vec<SeriesKey> =
            (0..series).map(|i| SeriesKey::new("m", vec![Label::new("i", i.to_string())])).collect();
        let frames: Vec<Vec<u8>> = (0..windows)
            .map(|w| e.frame(w * 10, &keys.iter().map(|k| (k.clone(), w as f64)).collect::<Vec<_>>()).unwrap())
            .collect();
        let p = Envelope {
            device: "d",
            lane: 0,
            first_seq: 1,
            clock_shift_ms: 0,
            frames: frames.iter().map(Vec::as_slice).collect(),
        }
        .encode();
        prepare("edge", "edge/d/metrics", &p).unwrap().req
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
    fn split_series_keeps_each_series_whole() {
        let req = request(7, 3000);
        let parts = split_series(req.clone(), 3);
        assert_eq!(parts.len(), 2, "21,000 samples: two parts of at least 10,000");
        let mut names: Vec<String> =
            parts.iter().flat_map(|p| p.timeseries.iter().map(|t| format!("{:?}", t.labels))).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), 7, "every series exactly once");
        assert_eq!(parts.iter().map(sample_count).sum::<usize>(), 21_000);
        assert_eq!(split_series(req, 1).len(), 1);
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
