//! Inputs the fuzzers found, kept as tests.
//!
//! store_open-569d2dd7: a crash-leftover newest segment was removed at open,
//! which made an older segment with a bad tail the newest; new records were
//! appended after its unreadable bytes and could not be found again.

use edge_agent::store::medium::{Medium, SegmentIo};
use edge_agent::store::sim::SimMedium;
use edge_agent::store::{record, Store, StoreLimits};
use embedded_io::Write;

const LIMITS: StoreLimits =
    StoreLimits { max_bytes: 1 << 16, segment_bytes: 4096, max_age_ms: 0, fsync_interval_ms: 0 };

/// The fuzz target store_open's input format: up to 4 segments of
/// `[id byte][len u16 LE][bytes]`, a valid header prepended when the id byte
/// is even; what is left over becomes the send-position file.
fn medium(data: &[u8]) -> SimMedium {
    let mut sim = SimMedium::new(1);
    let mut rest = data;
    let mut n = 0;
    while rest.len() >= 3 && n < 4 {
        let id = u64::from(rest[0] / 2) + 1;
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let mut seg = sim.create(id).unwrap();
        if rest[0].is_multiple_of(2) {
            seg.write_all(&record::encode_segment_header(id)).unwrap();
        }
        seg.write_all(&rest[3..3 + len]).unwrap();
        let _ = seg.size();
        rest = &rest[3 + len..];
        n += 1;
    }
    if !rest.is_empty() {
        sim.write_meta("acked", rest).unwrap();
    }
    sim
}

fn append_survives_reopen(data: &[u8]) {
    let sim = medium(data);
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
