//! The store stage's end of the window loop: a window's record into the
//! routine lane (blocks of many windows), alarm records into the priority
//! lane (a block each, synced at once, so they can go at once).

use super::blocks::{BlockWriter, WriteError};
use super::{Lanes, StoreError};
use crate::window::Window;

/// Bytes of frames a priority block may hold: one alarm record.
const PRIORITY_BLOCK_BYTES: usize = 64 * 1024;

pub struct Recorder {
    routine: BlockWriter,
    priority: BlockWriter,
}

impl Recorder {
    /// `routine`: the routine lane's block limits (`[store]`).
    pub fn new(routine: BlockWriter) -> Recorder {
        Recorder { routine, priority: BlockWriter::new(1, PRIORITY_BLOCK_BYTES) }
    }

    /// A new clock era began: the next window starts a new block (a block
    /// never spans two eras; docs/clock.md).
    pub fn new_era(&mut self) {
        self.routine.end_block();
    }

    /// An alarm's record: a block of its own, made durable now.
    pub fn priority(&mut self, lanes: &mut Lanes, record: &Window) -> Result<u64, WriteError> {
        let seq = self.priority.write(&mut lanes.priority, record)?;
        lanes.priority.sync()?;
        Ok(seq)
    }

    /// A window, with the store's own health (both lanes' backlog, bytes
    /// and drops, so the fleet can alert on them) as samples of its own.
    pub fn routine(&mut self, lanes: &mut Lanes, mut window: Window) -> Result<u64, WriteError> {
        window.samples.extend(super::self_telemetry(lanes));
        self.routine.write(&mut lanes.routine, &window)
    }

    /// The routine lane made durable when its fsync interval has passed.
    pub fn tick(&mut self, lanes: &mut Lanes) -> Result<(), StoreError> {
        lanes.routine.tick()
    }
}
