//! Batching, without I/O: the series of many devices' messages dealt into
//! remote-write requests of bounded size and age, one stream of requests
//! per shard, and which message is done when.
//!
//! * A series always goes to the same shard (a hash of its labels, the
//!   bridge's `device` label among them), and a shard's requests are
//!   written one after the other: every series' samples reach the store in
//!   the order the device sent them, while the shards' requests are in
//!   flight together.
//! * A request closes when it holds `max_samples` samples or its oldest
//!   part is `max_age` old.
//! * A message is done when every request holding a part of it is written
//!   (or refused for good): only then is it confirmed to its device. MQTT
//!   acknowledgements go in the order the messages came
//!   ([`Pipeline::take_acks`]), as MQTT 3.1.1 (4.6) asks.

use crate::remote_write::{Encode, WriteRequest};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A message's number in the pipeline (in arrival order).
pub type MsgId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests in flight at once (`remote_write.concurrency`).
    pub shards: usize,
    /// Samples per request (`remote_write.batch_max_samples`).
    pub max_samples: usize,
    /// How long a request waits for more (`remote_write.batch_max_age_ms`).
    pub max_age: Duration,
}

/// One remote-write request: runs of series, each run one message's,
/// already encoded (the request's protobuf bytes, not yet compressed).
#[derive(Debug)]
pub struct Batch {
    pub shard: usize,
    /// The `WriteRequest`'s protobuf bytes: its series' entries, one
    /// after the other ([`Encode::encode_entry`]).
    pub body: Vec<u8>,
    /// Each message's run of entries in `body`, in order.
    pub parts: Vec<Part>,
    pub samples: usize,
    opened: Instant,
}

/// One message's series in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub msg: MsgId,
    pub device: Arc<str>,
    /// Where its run of entries ends in [`Batch::body`] (it starts where
    /// the one before ends).
    pub end: usize,
    pub samples: usize,
}

impl Batch {
    fn new(shard: usize, now: Instant, capacity: usize) -> Batch {
        Batch { shard, body: Vec::with_capacity(capacity), parts: Vec::new(), samples: 0, opened: now }
    }

    /// What it holds in memory: its bytes, counted against
    /// `remote_write.max_pending_bytes` from admission to its write.
    pub fn bytes(&self) -> usize {
        self.body.len()
    }

    /// Each message's samples in this request: the outcome of writing it
    /// whole.
    pub fn written_whole(&self) -> Vec<PartOutcome> {
        self.parts.iter().map(|p| PartOutcome { msg: p.msg, written: p.samples, refused: 0 }).collect()
    }

    /// Each message's part with its bytes: a request of its own (written
    /// apart after the store refused the whole request, so a refusal is
    /// counted against the device whose samples it was).
    pub fn parts(&self) -> impl Iterator<Item = (&Part, &[u8])> {
        let starts = std::iter::once(0).chain(self.parts.iter().map(|p| p.end));
        self.parts.iter().zip(starts).map(|(p, start)| (p, &self.body[start..p.end]))
    }

    /// The request as values (for splitting a refused part down to the
    /// samples the store refuses, and for tests).
    pub fn request(body: &[u8]) -> Result<WriteRequest, prost::DecodeError> {
        prost::Message::decode(body)
    }
}

/// What became of one message's part of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartOutcome {
    pub msg: MsgId,
    pub written: usize,
    pub refused: usize,
}

/// A message that has every part written: confirm it to its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub msg: MsgId,
    pub written: usize,
    pub refused: usize,
}

struct Entry<M> {
    meta: M,
    /// Copies of this message (the same topic and payload) that came while
    /// it was in the pipeline: done when it is.
    followers: Vec<MsgId>,
    /// Requests holding a part of it that are not yet written.
    parts_left: usize,
    written: usize,
    refused: usize,
    finished: bool,
}

pub struct Pipeline<M> {
    limits: Limits,
    open: Vec<Option<Batch>>,
    /// Messages not yet acknowledged, in arrival order; the first is
    /// number `first`.
    msgs: VecDeque<Entry<M>>,
    first: MsgId,
    /// Bytes (encoded) taken in and not yet written or refused.
    pending: usize,
    /// Room a shard's next request gets from the start: the size of its
    /// last full one.
    capacity: Vec<usize>,
}

/// Room a shard's first request gets.
const INITIAL_CAPACITY: usize = 64 * 1024;

impl<M> Pipeline<M> {
    pub fn new(limits: Limits) -> Pipeline<M> {
        let limits = Limits { shards: limits.shards.max(1), max_samples: limits.max_samples.max(1), ..limits };
        Pipeline {
            open: (0..limits.shards).map(|_| None).collect(),
            capacity: vec![INITIAL_CAPACITY; limits.shards],
            limits,
            msgs: VecDeque::new(),
            first: 0,
            pending: 0,
        }
    }

    /// Takes a message in: its series encoded into the shards' open
    /// requests. Returns its number and the requests that filled up.
    pub fn admit<S: Encode>(
        &mut self,
        meta: M,
        device: &Arc<str>,
        series: impl IntoIterator<Item = S>,
        now: Instant,
    ) -> (MsgId, Vec<Batch>) {
        let id = self.first + self.msgs.len() as MsgId;
        self.msgs.push_back(Entry {
            meta,
            followers: Vec::new(),
            parts_left: 0,
            written: 0,
            refused: 0,
            finished: false,
        });
        let mut full = Vec::new();
        let mut parts = 0;
        for ts in series {
            let shard = self.shard_of(&ts);
            let n = ts.samples();
            let capacity = self.capacity[shard];
            let batch = self.open[shard].get_or_insert_with(|| Batch::new(shard, now, capacity));
            let before = batch.body.len();
            ts.encode_entry(&mut batch.body);
            let end = batch.body.len();
            match batch.parts.last_mut() {
                Some(p) if p.msg == id => {
                    p.end = end;
                    p.samples += n;
                }
                _ => {
                    batch.parts.push(Part { msg: id, device: device.clone(), end, samples: n });
                    parts += 1;
                }
            }
            batch.samples += n;
            self.pending += end - before;
            if batch.samples >= self.limits.max_samples {
                // The next request of this shard gets room for as much
                // from the start: its body is not grown (copied) as it
                // fills.
                self.capacity[shard] = end + end / 8;
                full.extend(self.open[shard].take());
            }
        }
        let entry = self.msgs.back_mut().expect("just pushed");
        entry.parts_left = parts;
        entry.finished = parts == 0;
        (id, full)
    }

    /// Takes in a copy of message `leader` (a device's resend of a block
    /// still in the pipeline): nothing to write, done when the leader is
    /// (at once when it already is). Returns its number and whether it is
    /// done now.
    pub fn follow(&mut self, meta: M, leader: MsgId) -> (MsgId, bool) {
        let id = self.first + self.msgs.len() as MsgId;
        let leader_done = match leader.checked_sub(self.first).and_then(|i| self.msgs.get_mut(i as usize)) {
            Some(e) if !e.finished => {
                e.followers.push(id);
                false
            }
            _ => true,
        };
        self.msgs.push_back(Entry {
            meta,
            followers: Vec::new(),
            parts_left: usize::from(!leader_done),
            written: 0,
            refused: 0,
            finished: leader_done,
        });
        (id, leader_done)
    }

    fn shard_of(&self, ts: &impl Encode) -> usize {
        if self.limits.shards == 1 {
            return 0;
        }
        (ts.identity() % self.limits.shards as u64) as usize
    }

    /// The open requests whose oldest part is `max_age` old.
    pub fn due(&mut self, now: Instant) -> Vec<Batch> {
        (0..self.open.len()).filter_map(|s| self.take_due(s, now)).collect()
    }

    /// Shard `shard`'s open request, if its oldest part is `max_age` old.
    pub fn take_due(&mut self, shard: usize, now: Instant) -> Option<Batch> {
        let age = self.limits.max_age;
        let slot = self.open.get_mut(shard)?;
        if slot.as_ref().is_some_and(|b| now.saturating_duration_since(b.opened) >= age) {
            slot.take()
        } else {
            None
        }
    }

    /// When the next open request of a shard for which `free` holds comes
    /// due.
    pub fn next_due(&self, free: impl Fn(usize) -> bool) -> Option<Instant> {
        self.open
            .iter()
            .enumerate()
            .filter(|(s, _)| free(*s))
            .filter_map(|(_, b)| b.as_ref())
            .map(|b| b.opened + self.limits.max_age)
            .min()
    }

    /// A request of `bytes` ([`Batch::bytes`]) was written (or refused for
    /// good), with what became of each message's part; returns the
    /// messages this finished.
    pub fn written(&mut self, bytes: usize, outcomes: &[PartOutcome]) -> Vec<Finished> {
        self.pending = self.pending.saturating_sub(bytes);
        let mut done = Vec::new();
        for o in outcomes {
            let Some(e) = o.msg.checked_sub(self.first).and_then(|i| self.msgs.get_mut(i as usize)) else {
                continue;
            };
            e.written += o.written;
            e.refused += o.refused;
            e.parts_left = e.parts_left.saturating_sub(1);
            if e.parts_left == 0 && !e.finished {
                e.finished = true;
                done.push(Finished { msg: o.msg, written: e.written, refused: e.refused });
                let followers = std::mem::take(&mut e.followers);
                for f in followers {
                    if let Some(e) = f.checked_sub(self.first).and_then(|i| self.msgs.get_mut(i as usize)) {
                        e.finished = true;
                        e.parts_left = 0;
                        done.push(Finished { msg: f, written: 0, refused: 0 });
                    }
                }
            }
        }
        done
    }

    pub fn meta(&self, msg: MsgId) -> Option<&M> {
        msg.checked_sub(self.first).and_then(|i| self.msgs.get(i as usize)).map(|e| &e.meta)
    }

    /// The finished messages at the head, in arrival order: acknowledge
    /// them to the broker.
    pub fn take_acks(&mut self) -> Vec<M> {
        let mut out = Vec::new();
        while self.msgs.front().is_some_and(|e| e.finished) {
            out.extend(self.msgs.pop_front().map(|e| e.meta));
            self.first += 1;
        }
        out
    }

    /// Bytes taken in and not yet written or refused: what the bridge
    /// holds (the backpressure bound, `remote_write.max_pending_bytes`).
    pub fn pending_bytes(&self) -> usize {
        self.pending
    }

    /// Messages taken in and not yet acknowledged.
    pub fn messages(&self) -> usize {
        self.msgs.len()
    }
}

/// A message's identity for spotting copies: its topic (so a device can
/// only ever match its own messages) and a 128-bit keyed hash of its
/// payload.
pub type CopyKey = (Arc<str>, u128);

/// The blocks this bridge wrote lately and those in its pipeline: a device
/// that did not get a confirmation in time sends a block again, and under
/// load the copy often arrives while the first is still being written.
/// A copy of a block in the pipeline is done with it; a copy of one
/// already written is confirmed again without writing (a store would
/// refuse its samples as duplicates, and finding that out costs a request
/// per sample). Soft state: forgetting it only costs a rewrite.
pub struct Recent {
    map: std::collections::HashMap<CopyKey, Seen>,
    written: VecDeque<CopyKey>,
    cap: usize,
}

/// What is known of a message with a given [`CopyKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// In the pipeline as this message.
    Pending(MsgId),
    /// Written: its confirmation (lane, first and last record).
    Written(u8, u64, u64),
}

impl Recent {
    /// Remembers up to `cap` written blocks (oldest forgotten first).
    pub fn new(cap: usize) -> Recent {
        Recent { map: Default::default(), written: VecDeque::new(), cap: cap.max(1) }
    }

    pub fn get(&self, key: &CopyKey) -> Option<Seen> {
        self.map.get(key).copied()
    }

    pub fn pending(&mut self, key: CopyKey, msg: MsgId) {
        self.map.insert(key, Seen::Pending(msg));
    }

    /// The message of `key` was written: remembered as such.
    pub fn written(&mut self, key: CopyKey, lane: u8, first: u64, last: u64) {
        if self.map.insert(key.clone(), Seen::Written(lane, first, last)) != Some(Seen::Written(lane, first, last)) {
            self.written.push_back(key);
        }
        while self.written.len() > self.cap {
            if let Some(old) = self.written.pop_front() {
                self.map.remove(&old);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote_write::{Label, Sample, TimeSeries};

    fn series(device: &str, name: &str, times: &[i64]) -> TimeSeries {
        TimeSeries {
            labels: vec![
                Label { name: "__name__".into(), value: name.into() },
                Label { name: "device".into(), value: device.into() },
            ],
            samples: times.iter().map(|&t| Sample { value: t as f64, timestamp: t }).collect(),
        }
    }

    fn limits(shards: usize, max_samples: usize) -> Limits {
        Limits { shards, max_samples, max_age: Duration::from_millis(200) }
    }

    fn all_written(b: &Batch) -> Vec<PartOutcome> {
        b.written_whole()
    }

    #[test]
    fn small_messages_of_many_devices_share_a_request_until_it_is_due() {
        let t0 = Instant::now();
        let mut p = Pipeline::new(limits(1, 1000));
        let mut ids = Vec::new();
        for d in 0..10 {
            let dev: Arc<str> = format!("d{d}").into();
            let (id, full) = p.admit(d, &dev, vec![series(&dev, "m", &[1]), series(&dev, "n", &[1])], t0);
            assert!(full.is_empty());
            ids.push(id);
        }
        assert!(p.pending_bytes() > 20 * 16);
        assert!(p.due(t0 + Duration::from_millis(199)).is_empty());
        assert_eq!(p.next_due(|_| true), Some(t0 + Duration::from_millis(200)));
        let due = p.due(t0 + Duration::from_millis(200));
        assert_eq!(due.len(), 1);
        let b = &due[0];
        assert_eq!((b.samples, Batch::request(&b.body).unwrap().timeseries.len(), b.parts.len()), (20, 20, 10));
        assert!(p.take_acks().is_empty(), "nothing is acknowledged before it is written");
        let done = p.written(b.bytes(), &all_written(b));
        assert_eq!(done.len(), 10);
        assert_eq!(done[3], Finished { msg: ids[3], written: 2, refused: 0 });
        assert_eq!(p.take_acks(), (0..10).collect::<Vec<_>>());
        assert_eq!((p.pending_bytes(), p.messages()), (0, 0));
    }

    #[test]
    fn a_full_request_closes_at_once_and_a_message_is_done_after_all_its_requests() {
        let t0 = Instant::now();
        let mut p = Pipeline::new(limits(1, 10));
        let dev: Arc<str> = "d".into();
        let big: Vec<TimeSeries> = (0..5).map(|i| series(&dev, &format!("m{i}"), &[1, 2, 3, 4])).collect();
        let (id, full) = p.admit((), &dev, big, t0);
        assert_eq!(full.len(), 1, "12 samples: one request of 12 closed, the rest open");
        assert_eq!(full[0].samples, 12);
        let rest = p.due(t0 + Duration::from_secs(1));
        assert_eq!(rest[0].samples, 8);
        assert!(p.written(full[0].bytes(), &all_written(&full[0])).is_empty(), "half of it is not written yet");
        assert_eq!(p.written(rest[0].bytes(), &all_written(&rest[0])), [Finished { msg: id, written: 20, refused: 0 }]);
    }

    #[test]
    fn a_series_always_goes_to_the_same_shard_and_acks_keep_arrival_order() {
        let t0 = Instant::now();
        let mut p = Pipeline::new(limits(4, 1_000_000));
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let names: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
        let mk = |dev: &Arc<str>, t: i64| names.iter().map(|n| series(dev, n, &[t])).collect::<Vec<_>>();
        p.admit("a1", &a, mk(&a, 1), t0);
        p.admit("b1", &b, mk(&b, 1), t0);
        let first = p.due(t0 + Duration::from_secs(1));
        p.admit("a2", &a, mk(&a, 2), t0 + Duration::from_secs(1));
        let second = p.due(t0 + Duration::from_secs(2));
        assert!(first.len() > 1, "40 series of 2 devices spread over the shards");
        let shard_of = |batches: &[Batch], dev: &str, name: &str| {
            batches
                .iter()
                .find(|b| {
                    let req = Batch::request(&b.body).unwrap();
                    req.timeseries.iter().any(|t| t.labels[0].value == name && t.labels[1].value == dev)
                })
                .map(|b| b.shard)
        };
        for n in &names {
            assert_eq!(shard_of(&first, "a", n), shard_of(&second, "a", n), "{n}: one shard, so one order");
        }
        // b1 finishes first; it is acknowledged only after a1.
        let mut outcomes_b = Vec::new();
        let mut outcomes_a = Vec::new();
        for batch in &first {
            for o in all_written(batch) {
                if o.msg == 1 {
                    outcomes_b.push(o)
                } else {
                    outcomes_a.push(o)
                }
            }
        }
        let fin = p.written(0, &outcomes_b);
        assert_eq!(fin.len(), 1);
        assert_eq!(p.meta(fin[0].msg), Some(&"b1"));
        assert!(p.take_acks().is_empty(), "a1 came first and is not done");
        p.written(0, &outcomes_a);
        assert_eq!(p.take_acks(), ["a1", "b1"]);
        for batch in &second {
            p.written(batch.bytes(), &all_written(batch));
        }
        assert_eq!(p.take_acks(), ["a2"]);
    }

    #[test]
    fn a_message_with_nothing_to_write_is_done_at_once_but_acknowledged_in_turn() {
        let t0 = Instant::now();
        let mut p = Pipeline::new(limits(2, 100));
        let dev: Arc<str> = "d".into();
        p.admit("data", &dev, vec![series(&dev, "m", &[1])], t0);
        let (_, full) = p.admit("empty", &dev, Vec::<TimeSeries>::new(), t0);
        assert!(full.is_empty());
        assert!(p.take_acks().is_empty());
        let b = p.due(t0 + Duration::from_secs(1));
        p.written(b[0].bytes(), &all_written(&b[0]));
        assert_eq!(p.take_acks(), ["data", "empty"]);
    }

    #[test]
    fn a_copy_of_a_message_in_the_pipeline_is_done_with_it_and_writes_nothing() {
        let t0 = Instant::now();
        let mut p = Pipeline::new(limits(1, 1000));
        let dev: Arc<str> = "d".into();
        let (leader, _) = p.admit("block", &dev, vec![series(&dev, "m", &[1])], t0);
        let (copy, done) = p.follow("copy", leader);
        assert!(!done);
        let b = p.due(t0 + Duration::from_secs(1)).pop().unwrap();
        assert_eq!(b.samples, 1, "the copy adds nothing to write");
        let fin = p.written(b.bytes(), &all_written(&b));
        assert_eq!(
            fin,
            [Finished { msg: leader, written: 1, refused: 0 }, Finished { msg: copy, written: 0, refused: 0 }]
        );
        assert_eq!(p.take_acks(), ["block", "copy"]);
        // A copy of a message already done is done at once.
        let (leader, _) = p.admit("again", &dev, Vec::<TimeSeries>::new(), t0);
        assert!(p.follow("late copy", leader).1);
        assert_eq!(p.take_acks(), ["again", "late copy"]);
    }

    #[test]
    fn recent_blocks_are_remembered_up_to_the_cap() {
        let mut r = Recent::new(2);
        let k = |i: u128| (Arc::<str>::from("edge/d/metrics"), i);
        r.pending(k(1), 7);
        assert_eq!(r.get(&k(1)), Some(Seen::Pending(7)));
        r.written(k(1), 0, 1, 5);
        assert_eq!(r.get(&k(1)), Some(Seen::Written(0, 1, 5)));
        r.written(k(2), 0, 6, 9);
        r.written(k(3), 0, 10, 11);
        assert_eq!((r.get(&k(1)), r.len()), (None, 2), "the oldest written is forgotten");
        assert_eq!(r.get(&k(3)), Some(Seen::Written(0, 10, 11)));
        let other_device = (Arc::<str>::from("edge/e/metrics"), 3);
        assert_eq!(r.get(&other_device), None, "the same payload hash under another topic is another message");
    }

    #[test]
    fn a_request_splits_back_into_its_messages() {
        let t0 = Instant::now();
        let mut p = Pipeline::new(limits(1, 1000));
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let a_series = vec![series(&a, "m", &[1]), series(&a, "n", &[1, 2])];
        p.admit((), &a, &a_series, t0);
        p.admit((), &b, vec![series(&b, "m", &[1])], t0);
        let batch = p.due(t0 + Duration::from_secs(1)).pop().unwrap();
        let whole = Batch::request(&batch.body).unwrap();
        assert_eq!(whole.timeseries.len(), 3);
        assert_eq!(batch.bytes(), prost::Message::encoded_len(&whole), "the body is the request's protobuf bytes");
        let parts: Vec<_> = batch.parts().map(|(part, body)| (part.clone(), Batch::request(body).unwrap())).collect();
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[0].0.msg, &*parts[0].0.device, parts[0].0.samples), (0, "a", 3));
        assert_eq!(parts[0].1.timeseries, a_series);
        assert_eq!((parts[1].0.msg, &*parts[1].0.device, parts[1].1.timeseries.len()), (1, "b", 1));
        assert_eq!(parts[1].1.timeseries[0].labels[1].value, "b");
    }

    #[test]
    fn a_full_request_makes_room_for_the_next_one_from_the_start() {
        let t0 = Instant::now();
        let mut p = Pipeline::new(limits(1, 5_000));
        let dev: Arc<str> = "d".into();
        let many: Vec<TimeSeries> = (0..5_000).map(|i| series(&dev, &format!("m{i}"), &[1])).collect();
        let (_, full) = p.admit((), &dev, &many, t0);
        assert_eq!(full.len(), 1);
        assert!(full[0].bytes() > INITIAL_CAPACITY, "a full request outgrows the first room");
        p.admit((), &dev, &many[..1], t0);
        let next = p.due(t0 + Duration::from_secs(1)).pop().unwrap();
        assert!(next.body.capacity() >= full[0].bytes());
    }
}
