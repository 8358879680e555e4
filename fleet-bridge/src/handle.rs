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
    /// Snappy-compressed protobuf WriteRequest.
    pub body: Vec<u8>,
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
        body: remote_write::encode(&req),
    })
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

pub fn verdict(status: u16) -> Verdict {
    match status {
        200..=299 => Verdict::Written,
        429 => Verdict::Retry,
        400..=499 => Verdict::Refused,
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
        Envelope { device, lane: 0, first_seq: 3, frames: frames.iter().map(Vec::as_slice).collect() }.encode()
    }

    #[test]
    fn valid_message_becomes_a_write() {
        let w = prepare("edge", "edge/d1/metrics", &payload("d1")).unwrap();
        assert_eq!((w.device.as_str(), w.first_seq, w.last_seq, w.samples), ("d1", 3, 4, 2));
        let req = remote_write::decode(&w.body).unwrap();
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

    #[test]
    fn statuses() {
        assert_eq!(verdict(204), Verdict::Written);
        assert_eq!(verdict(400), Verdict::Refused);
        assert_eq!(verdict(429), Verdict::Retry);
        assert_eq!(verdict(503), Verdict::Retry);
    }
}
