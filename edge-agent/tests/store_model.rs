//! Model-based test of the store on the simulated flash medium: random
//! operations (append, sync, acknowledge, process crash, power cut, bit
//! flips, reads) checked against an in-memory reference after every step.
//!
//! What must hold, whatever the sequence:
//! * opening never fails and nothing panics;
//! * a record read back is byte-for-byte what was appended under its
//!   sequence number (never a corrupt or foreign payload);
//! * records that were durable when power was cut survive, unless the bounds
//!   dropped them (and then they are counted);
//! * of the records not yet durable, a power cut keeps at most an in-order
//!   prefix;
//! * the store never exceeds its byte bound;
//! * the send position survives restarts, and sequence numbers never go
//!   back at or below it.

use edge_agent::store::sim::SimMedium;
use edge_agent::store::{Store, StoreLimits};
use proptest::prelude::*;
use std::collections::BTreeMap;

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Sync,
    /// Acknowledge this fraction (0..=100 %) of what is held.
    Ack(u8),
    Crash,
    PowerCut,
    /// Flip a bit somewhere in the oldest segment (data already durable).
    FlipBit(u64),
    Read,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (0usize..600).prop_map(Op::Append),
        2 => Just(Op::Sync),
        2 => (0u8..=100).prop_map(Op::Ack),
        1 => Just(Op::Crash),
        1 => Just(Op::PowerCut),
        1 => any::<u64>().prop_map(Op::FlipBit),
        2 => Just(Op::Read),
    ]
}

const LIMITS: StoreLimits =
    StoreLimits { max_bytes: 16 * 1024, segment_bytes: 4 * 1024, max_age_ms: 0, fsync_interval_ms: 60_000 };

fn payload(seq: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seq as usize * 31 + i * 7) as u8).collect()
}

struct Model {
    /// What the store may hold, by sequence number.
    records: BTreeMap<u64, Vec<u8>>,
    durable: u64,
    acked: u64,
    /// Records lost to bit flips: they may vanish, never come back wrong.
    damaged: bool,
}

fn check_contents(store: &mut Store<SimMedium>, m: &mut Model) -> Result<(), TestCaseError> {
    let st = store.stats().clone();
    prop_assert!(st.bytes <= LIMITS.max_bytes, "over the bound: {st:?}");
    let got = store.read_after(0, usize::MAX).unwrap();
    let mut prev = 0;
    for r in &got {
        prop_assert!(r.seq > prev, "sequence numbers not rising");
        prev = r.seq;
        match m.records.get(&r.seq) {
            Some(p) => prop_assert_eq!(&r.payload, p, "payload of {} differs", r.seq),
            None => prop_assert!(false, "record {} was never appended (or was lost before)", r.seq),
        }
    }
    if !m.damaged {
        // Everything the model holds from the store's first record on is there.
        let expected: Vec<u64> = m.records.keys().copied().filter(|s| *s >= st.first_seq && st.first_seq > 0).collect();
        let seqs: Vec<u64> = got.iter().map(|r| r.seq).collect();
        prop_assert_eq!(seqs, expected);
    }
    // Forget what the store no longer has (dropped by the bound or damaged).
    let have: std::collections::BTreeSet<u64> = got.iter().map(|r| r.seq).collect();
    m.records.retain(|s, _| have.contains(s));
    Ok(())
}

fn run(ops: Vec<Op>, seed: u64) -> Result<(), TestCaseError> {
    let sim = SimMedium::new(seed);
    let mut store = Store::open(sim.clone(), LIMITS).unwrap();
    let mut m = Model { records: BTreeMap::new(), durable: 0, acked: 0, damaged: false };
    let mut n = 0u64;
    let mut flipped = std::collections::HashSet::new();
    for op in ops {
        match op {
            Op::Append(len) => {
                n += 1;
                let data = payload(n, len);
                let before = store.stats().clone();
                let seq = store.append(&data, 0).unwrap();
                // Next after everything held and after the send position.
                prop_assert_eq!(seq, before.last_seq.max(m.acked) + 1);
                m.records.insert(seq, data);
                if store.stats().dropped_total() > before.dropped_total() {
                    let first = store.stats().first_seq;
                    m.records.retain(|s, _| *s >= first);
                }
            }
            Op::Sync => {
                store.sync().unwrap();
                m.durable = store.stats().last_seq;
            }
            Op::Ack(pct) => {
                let held: Vec<u64> = m.records.keys().copied().collect();
                if let Some(&s) = held.get(held.len() * pct as usize / 100) {
                    store.ack(s).unwrap();
                    m.acked = m.acked.max(s);
                }
            }
            Op::Crash => {
                drop(store);
                sim.process_crash();
                store = Store::open(sim.clone(), LIMITS).unwrap();
                m.durable = store.stats().last_seq;
            }
            Op::PowerCut => {
                // What the store claims is durable must survive.
                m.durable = store.stats().durable_seq;
                drop(store);
                sim.power_cut();
                store = Store::open(sim.clone(), LIMITS).unwrap();
                // Durable records must all still be there...
                let got: Vec<u64> = store.read_after(0, usize::MAX).unwrap().iter().map(|r| r.seq).collect();
                if !m.damaged {
                    for s in m.records.keys().filter(|s| **s <= m.durable) {
                        prop_assert!(got.contains(s), "durable record {s} lost in a power cut");
                    }
                }
                // ...and of the others at most an in-order prefix.
                let kept_unsynced: Vec<u64> = got.iter().copied().filter(|s| *s > m.durable).collect();
                let expected_prefix: Vec<u64> =
                    m.records.keys().copied().filter(|s| *s > m.durable).take(kept_unsynced.len()).collect();
                if !m.damaged {
                    prop_assert_eq!(kept_unsynced, expected_prefix);
                }
                m.records.retain(|s, _| got.contains(s));
                m.durable = store.stats().last_seq;
            }
            Op::FlipBit(r) => {
                if let Some(id) = sim_first_segment(&sim) {
                    let len = sim.segment_len(id).unwrap_or(0);
                    let (byte, bit) = ((r % len.max(1) as u64) as usize, (r >> 32) as u8 % 8);
                    // A second flip of the same bit would repair the damage.
                    if len > 0 && flipped.insert((id, byte, bit)) && sim.flip_bit(id, byte, bit) {
                        m.damaged = true;
                    }
                }
            }
            Op::Read => {}
        }
        prop_assert_eq!(store.stats().acked_seq, m.acked, "send position lost");
        check_contents(&mut store, &mut m)?;
    }
    Ok(())
}

fn sim_first_segment(sim: &SimMedium) -> Option<u64> {
    let mut m = sim.clone();
    edge_agent::store::medium::Medium::segments(&mut m).ok()?.first().copied()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
    #[test]
    fn store_matches_the_model(ops in prop::collection::vec(op(), 1..120), seed in any::<u64>()) {
        run(ops, seed)?;
    }
}

/// A medium with room for little more than one segment: the store must
/// keep accepting records by dropping even the segment it was writing.
#[test]
fn a_medium_full_with_one_segment_keeps_accepting_newest_data() {
    let sim = SimMedium::new(7);
    sim.set_capacity(Some(5000));
    let limits = StoreLimits { max_bytes: 1 << 20, segment_bytes: 4096, max_age_ms: 0, fsync_interval_ms: 0 };
    let mut store = Store::open(sim.clone(), limits).unwrap();
    for i in 0..500u64 {
        let seq = store.append(&payload(i, 100), 0).unwrap_or_else(|e| panic!("append {i}: {e}"));
        assert_eq!(seq, i + 1);
    }
    let st = store.stats().clone();
    assert!(st.dropped_records[2] > 0, "{st:?}");
    assert_eq!(st.last_seq, 500);
    let held = store.read_after(0, usize::MAX).unwrap();
    assert_eq!(held.last().map(|r| r.seq), Some(500));
    assert_eq!(held.last().map(|r| r.payload.clone()), Some(payload(499, 100)));
}
