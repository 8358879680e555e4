//! Writes the seed corpora of the fuzz targets (fuzz/corpus/*) from valid
//! encodings. Run by hand when a format changes:
//!   cargo test -p edge-agent --test fuzz_seeds -- --ignored

use edge_agent::store::blocks::BlockWriter;
use edge_agent::store::sim::SimMedium;
use edge_agent::store::{record, Store, StoreLimits};
use edge_agent::window::Window;
use edge_wire::{Envelope, Label, SeriesKey};
use std::path::Path;

#[test]
#[ignore]
fn write_fuzz_seeds() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let limits = StoreLimits { max_bytes: 1 << 20, segment_bytes: 2048, max_age_ms: 0, fsync_interval_ms: 0 };
    let mut store = Store::open(SimMedium::new(3), limits).unwrap();
    let mut writer = BlockWriter::new(8, 1 << 20);
    for w in 0..40i64 {
        let samples = (0..6)
            .map(|i| {
                let v = if i % 2 == 0 { (w * i) as f64 } else { 20.0 + (w % 7) as f64 * 0.25 };
                (SeriesKey::new("edge_m_total", vec![Label::new("i", i.to_string())]), v)
            })
            .collect();
        writer
            .write(&mut store, &Window { timestamp_ms: 1_700_000_000_000 + w * 10_000, samples, values: Vec::new() })
            .unwrap();
    }
    let blocks = store.read_blocks(0, usize::MAX, usize::MAX, true).unwrap();
    for (n, b) in blocks.iter().enumerate() {
        let env = Envelope {
            device: "press-1",
            lane: (n % 2) as u8,
            first_seq: b[0].seq,
            clock_shift_ms: 0,
            frames: b.iter().map(|r| r.payload.as_slice()).collect(),
        };
        write(&corpus.join("block"), n, &env.encode());
        // Segment images for the record and store targets.
        let mut seg = record::encode_segment_header(b[0].seq).to_vec();
        for r in b {
            record::encode_record(
                r.seq,
                r.time_ms,
                if r.seq == b[0].seq { record::FLAG_BLOCK_START } else { 0 },
                &r.payload,
                &mut seg,
            );
        }
        write(&corpus.join("record"), n, &seg);
        let mut img = vec![((b[0].seq - 1) * 2) as u8];
        img.extend_from_slice(&(seg.len() as u16 - 16).to_le_bytes());
        img.extend_from_slice(&seg[16..]);
        write(&corpus.join("store_open"), n, &img);
    }
}

fn write(dir: &Path, n: usize, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(format!("seed-{n:03}")), bytes).unwrap();
}
