//! Inputs the fuzzers found, kept as tests.
//!
//! store_open-569d2dd7: a crash-leftover newest segment was removed at open,
//! which made an older segment with a bad tail the newest; new records were
//! appended after its unreadable bytes and could not be found again.

use edge_agent::store::sim::SimMedium;
use edge_agent::store::{Store, StoreLimits};

const LIMITS: StoreLimits =
    StoreLimits { max_bytes: 1 << 16, segment_bytes: 4096, max_age_ms: 0, fsync_interval_ms: 0 };

fn append_survives_reopen(data: &[u8]) {
    let sim = SimMedium::from_fuzz_input(data);
    let mut store = Store::open(sim.clone(), LIMITS).unwrap();
    let seq = store.append(b"after", 0).unwrap();
    drop(store);
    let mut again = Store::open(sim, LIMITS).unwrap();
    let got = again.read_after(seq - 1, 1).unwrap();
    assert_eq!(got.first().map(|r| (r.seq, r.payload.as_slice())), Some((seq, &b"after"[..])), "{:?}", again.stats());
}

#[test]
fn fuzz_store_open_569d2dd7() {
    append_survives_reopen(include_bytes!("regressions/store_open-569d2dd7.bin"));
}
