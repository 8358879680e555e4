//! Store recovery over arbitrary segment contents on the simulated medium:
//! opening never fails or panics, reading back never returns a record whose
//! checksum does not hold, and appending works afterwards.
#![no_main]

use edge_agent::store::medium::Medium;
use edge_agent::store::sim::SimMedium;
use edge_agent::store::{record, Store, StoreLimits};
use embedded_io_write::write_all;
use libfuzzer_sys::fuzz_target;

mod embedded_io_write {
    use embedded_io::Write;
    pub fn write_all<W: Write>(w: &mut W, b: &[u8]) {
        let _ = w.write_all(b);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut sim = SimMedium::new(1);
    // Up to 4 segments: [id byte][len u16][bytes]..., with a valid header
    // prepended when the id byte is even, so scans reach the records.
    let mut rest = data;
    let mut n = 0;
    while rest.len() >= 3 && n < 4 {
        let id = u64::from(rest[0] / 2) + 1;
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let body = &rest[3..3 + len];
        let mut seg = sim.create(id).unwrap();
        if rest[0].is_multiple_of(2) {
            write_all(&mut seg, &record::encode_segment_header(id));
        }
        write_all(&mut seg, body);
        rest = &rest[3 + len..];
        n += 1;
    }
    if !rest.is_empty() {
        let _ = sim.write_meta("acked", rest);
    }
    let limits = StoreLimits { max_bytes: 1 << 16, segment_bytes: 4096, max_age_ms: 0, fsync_interval_ms: 0 };
    let mut store = Store::open(sim.clone(), limits).expect("open never fails on content");
    let _ = store.read_blocks(0, usize::MAX, usize::MAX, true).unwrap();
    let recs = store.read_after(0, usize::MAX).unwrap();
    for w in recs.windows(2) {
        assert!(w[0].seq < w[1].seq);
    }
    let seq = store.append(b"after", 0).unwrap();
    assert!(seq > store.stats().acked_seq.min(seq - 1));
    drop(store);
    let mut again = Store::open(sim, limits).unwrap();
    assert_eq!(again.read_after(seq - 1, 1).unwrap()[0].payload, b"after");
});
