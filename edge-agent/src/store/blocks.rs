//! The store stage's encoder: each window becomes one frame of the current
//! block (edge_wire::block), appended as one store record. A new block
//! starts when the uplink has taken the open one, when the store begins a
//! new segment (a block never spans segments), after a failed append (the
//! frame the encoder counted on is not stored), or at the block limits.

use super::medium::Medium;
use super::record::FLAG_BLOCK_START;
use super::{Store, StoreError};
use crate::window::Window;
use edge_wire::{BlockEncoder, EncodeError};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("window not encodable: {0}")]
    Encode(#[from] EncodeError),
}

#[derive(Debug)]
pub struct BlockWriter {
    enc: BlockEncoder,
    bytes: usize,
    max_frames: usize,
    max_bytes: usize,
}

impl BlockWriter {
    /// Blocks end after `max_frames` windows or `max_bytes` of frames.
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        BlockWriter { enc: BlockEncoder::new(), bytes: 0, max_frames: max_frames.max(1), max_bytes }
    }

    /// The next window starts a new block (e.g. at a clock step: a block
    /// never spans two clock eras).
    pub fn end_block(&mut self) {
        self.restart();
    }

    fn restart(&mut self) {
        self.enc = BlockEncoder::new();
        self.bytes = 0;
    }

    /// Encodes and appends `w`; returns the record's sequence number.
    pub fn write<M: Medium>(&mut self, store: &mut Store<M>, w: &Window) -> Result<u64, WriteError> {
        if store.take_block_start_request() || self.enc.frames() >= self.max_frames || self.bytes >= self.max_bytes {
            self.restart();
        }
        let mut frame = match self.enc.frame_with_values(w.timestamp_ms, &w.samples, &w.values) {
            Err(EncodeError::Full) if self.enc.frames() > 0 => {
                self.restart();
                self.enc.frame_with_values(w.timestamp_ms, &w.samples, &w.values)?
            }
            other => other?,
        };
        if self.enc.frames() > 1 && store.would_start_segment(frame.len()) {
            self.restart();
            frame = self.enc.frame_with_values(w.timestamp_ms, &w.samples, &w.values)?;
        }
        let flags = if self.enc.frames() == 1 { FLAG_BLOCK_START } else { 0 };
        match store.append_flagged(&frame, w.timestamp_ms, flags) {
            Ok(seq) => {
                self.bytes += frame.len();
                Ok(seq)
            }
            Err(e) => {
                self.restart();
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sim::SimMedium;
    use crate::store::StoreLimits;
    use edge_wire::{Label, SeriesKey};

    fn window(ts: i64, n: usize) -> Window {
        Window {
            timestamp_ms: ts,
            samples: (0..n)
                .map(|i| (SeriesKey::new("m_total", vec![Label::new("i", i.to_string())]), (ts / 10) as f64))
                .collect(),
            values: Vec::new(),
        }
    }

    fn blocks(store: &mut Store<SimMedium>) -> Vec<Vec<u64>> {
        store
            .read_blocks(0, usize::MAX, usize::MAX, true)
            .unwrap()
            .iter()
            .map(|b| b.iter().map(|r| r.seq).collect())
            .collect()
    }

    #[test]
    fn blocks_end_at_limits_segments_and_when_the_uplink_takes_them() {
        let limits = StoreLimits { max_bytes: 1 << 20, segment_bytes: 4096, max_age_ms: 0, fsync_interval_ms: 0 };
        let mut store = Store::open(SimMedium::new(1), limits).unwrap();
        let mut w = BlockWriter::new(4, usize::MAX);
        for i in 1..=6 {
            w.write(&mut store, &window(i * 10, 3)).unwrap();
        }
        assert_eq!(blocks(&mut store), vec![vec![1, 2, 3, 4], vec![5, 6]]);
        // The uplink took the open block (5, 6): 7 starts a new one.
        w.write(&mut store, &window(70, 3)).unwrap();
        assert_eq!(store.read_blocks(6, 10, usize::MAX, true).unwrap()[0][0].seq, 7);
        // Until the open block is included, it is not handed out.
        w.write(&mut store, &window(80, 3)).unwrap();
        assert!(store.read_blocks(7, 10, usize::MAX, false).unwrap().is_empty());
        // Many frames: segments rotate, and every segment begins a block.
        for i in 9..200 {
            w.write(&mut store, &window(i * 10, 40)).unwrap();
        }
        for b in blocks(&mut store) {
            let frames: Vec<Vec<u8>> =
                store.read_after(b[0] - 1, b.len()).unwrap().into_iter().map(|r| r.payload).collect();
            let batch = edge_wire::block::decode_block(frames.iter().map(Vec::as_slice)).unwrap();
            assert_eq!(batch.series[0].samples.len(), b.len());
        }
    }
}
