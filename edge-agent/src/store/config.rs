//! The `[store]` section of the agent's configuration (docs/configuration.md):
//! its keys, defaults and validation, owned by this stage.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Upper bound of the store on disk; oldest segments go first.
    pub max_bytes: u64,
    /// A segment is closed and a new one started past this size.
    pub segment_bytes: u64,
    /// Records older than this are dropped even when there is room
    /// (0: keep until space runs out).
    pub max_age_secs: u64,
    /// Appends are durable at most this long after they are made. The agent
    /// appends once per window, so with windows longer than this every
    /// window is synced as it is stored.
    pub fsync_interval_ms: u64,
    /// A block (the unit that is compressed and sent as one message) ends
    /// after this many windows... (360: an hour of 10 s windows)
    pub block_max_windows: u64,
    /// ...or this many bytes of frames.
    pub block_max_bytes: u64,
    /// The priority lane (alarms, anomaly records) has its own budget, on
    /// top of max_bytes: routine data can never push it out.
    pub priority_max_bytes: u64,
    /// Priority records older than this are dropped (0: only for space).
    pub priority_max_age_secs: u64,
}
impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_bytes: 64 * 1024 * 1024,
            segment_bytes: 4 * 1024 * 1024,
            max_age_secs: 0,
            fsync_interval_ms: 1000,
            block_max_windows: 360,
            block_max_bytes: 1024 * 1024,
            priority_max_bytes: 8 * 1024 * 1024,
            priority_max_age_secs: 0,
        }
    }
}

impl StoreConfig {
    /// Errors name the key (`store.…`).
    pub fn validate(&self) -> Result<(), String> {
        // A segment holds whole windows: a window's frame (its series'
        // names when it starts a block, histograms included) must fit.
        if self.segment_bytes < 16 * 1024 {
            return Err("store.segment_bytes must be at least 16384 (a window must fit in a segment)".into());
        }
        if self.max_bytes < 2 * self.segment_bytes {
            return Err("store.max_bytes must be at least twice store.segment_bytes".into());
        }
        if self.block_max_windows == 0 || self.block_max_windows > edge_wire::block::MAX_FRAMES as u64 {
            return Err(format!("store.block_max_windows must be 1..={}", edge_wire::block::MAX_FRAMES));
        }
        if self.block_max_bytes < 1024 || self.block_max_bytes > (edge_wire::MAX_MESSAGE_BYTES / 2) as u64 {
            return Err(format!("store.block_max_bytes must be 1024..={}", edge_wire::MAX_MESSAGE_BYTES / 2));
        }
        if self.priority_max_bytes < 8192 {
            return Err("store.priority_max_bytes must be at least 8192".into());
        }
        if self.fsync_interval_ms > 60_000 {
            return Err("store.fsync_interval_ms must be at most 60000".into());
        }
        Ok(())
    }
}
