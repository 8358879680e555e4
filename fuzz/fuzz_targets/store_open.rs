//! Store recovery over arbitrary segment contents on the simulated medium:
//! opening never fails or panics, reading back never returns a record whose
//! checksum does not hold, and appending works afterwards.
#![no_main]

use edge_agent::store::sim::SimMedium;
use edge_agent::store::{Store, StoreLimits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The input format is documented on SimMedium::from_fuzz_input.
    let sim = SimMedium::from_fuzz_input(data);
    let limits = StoreLimits { max_bytes: 1 << 16, segment_bytes: 4096, max_age_ms: 0, fsync_interval_ms: 0 };
    let mut store = Store::open(sim.clone(), limits).expect("open never fails on content");
    let _ = store.read_blocks(0, usize::MAX, usize::MAX, true).unwrap();
    let recs = store.read_after(0, usize::MAX).unwrap();
    for w in recs.windows(2) {
        assert!(w[0].seq < w[1].seq);
    }
    let seq = store.append(b"after", 0).unwrap();
    assert!(seq > store.stats().acked_seq, "sequence numbers must follow the send position");
    drop(store);
    let mut again = Store::open(sim, limits).unwrap();
    assert_eq!(again.read_after(seq - 1, 1).unwrap()[0].payload, b"after");
});
