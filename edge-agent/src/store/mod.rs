//! Store stage: an append-only, segmented, checksummed log of window records,
//! bounded by bytes and by age, with group commit and a persisted send
//! position. Formats and recovery rules: docs/store-format.md.
//!
//! Layers:
//! * [`record`]: byte layouts (pure);
//! * [`plan`]: what recovery cuts and what bounds drop (pure);
//! * [`medium`]: the embedded-io storage seam ([`medium::FsMedium`] on
//!   files; [`sim::SimMedium`] simulates power loss);
//! * this module: carries the decisions out on a medium.
//!
//! Nothing read from the medium can make this code panic; corrupt data is
//! cut, skipped or quarantined and counted.

pub mod blocks;
pub mod config;
pub mod medium;
pub mod metrics;
pub mod plan;
pub mod record;
pub mod recorder;
pub mod sim;
pub mod tools;

use embedded_io::{Read, Seek, SeekFrom, Write};
use medium::{FsMedium, Medium, SegmentIo};
use plan::{DropReason, Entry, Recovery, Scan, SegmentSummary};
use record::SEGMENT_HEADER;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store at {place}: {what}: {message} (check that it exists, is writable, and the disk is not full)")]
    Io { place: String, what: &'static str, message: String },
    #[error("store at {place} is full and nothing older can be dropped to make room")]
    Full { place: String },
    #[error("store directory {0} is in use by another edge-agent process (each agent needs its own state_dir)")]
    Locked(PathBuf),
    #[error("record of {0} bytes is larger than a segment allows")]
    TooLarge(usize),
    #[error("the store was opened read-only")]
    ReadOnly,
}

#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    pub max_bytes: u64,
    pub segment_bytes: u64,
    /// Records older than this are dropped (0: no age limit).
    pub max_age_ms: u64,
    /// Appends are made durable at most this long after they return
    /// (0: every append is synced before it returns).
    pub fsync_interval_ms: u64,
}

impl Default for StoreLimits {
    fn default() -> Self {
        StoreLimits { max_bytes: 64 << 20, segment_bytes: 4 << 20, max_age_ms: 0, fsync_interval_ms: 1000 }
    }
}

/// Counters and gauges of the store, for `/metrics` and `store inspect`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub segments: usize,
    pub bytes: u64,
    /// Oldest and newest sequence numbers held (0 when empty).
    pub first_seq: u64,
    pub last_seq: u64,
    /// Everything up to here is durable.
    pub durable_seq: u64,
    /// The send position: everything up to here is confirmed end to end.
    /// Persisted by [`Store::ack`]; while the medium is too full to persist
    /// it, it is held here and persisting is retried, so drops and the
    /// backlog still count confirmed records as sent.
    pub acked_seq: u64,
    /// Times of the oldest and newest records held (0 when empty).
    pub oldest_ms: i64,
    pub newest_ms: i64,
    pub appended_records: u64,
    pub syncs: u64,
    /// Dropped records by [`DropReason`] (index: `DropReason::ALL`).
    pub dropped_records: [u64; 3],
    pub dropped_unsent_records: u64,
    pub dropped_bytes: u64,
    /// Found corrupt at open or on read and skipped.
    pub corrupt_records: u64,
    pub truncated_bytes: u64,
    pub quarantined_segments: u64,
    /// Records read back (to be sent, or sent again).
    pub read_records: u64,
}

impl StoreStats {
    /// Records held and not yet acknowledged.
    pub fn backlog(&self) -> u64 {
        if self.last_seq == 0 {
            return 0;
        }
        let from = self.acked_seq.max(self.first_seq.saturating_sub(1));
        self.last_seq.saturating_sub(from)
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped_records.iter().sum()
    }
}

#[derive(Debug)]
struct Segment {
    id: u64,
    entries: Vec<Entry>,
    len: u64,
    /// Ends at its last intact record (appends may follow).
    clean_tail: bool,
}

impl Segment {
    fn summary(&self) -> SegmentSummary {
        SegmentSummary { bytes: self.len, newest_ms: self.entries.last().map(|e| e.time_ms) }
    }
}

/// A record read back from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub seq: u64,
    pub time_ms: i64,
    pub payload: Vec<u8>,
}

pub struct Store<M: Medium> {
    medium: M,
    limits: StoreLimits,
    segments: Vec<Segment>,
    active: Option<M::Segment>,
    next_seq: u64,
    last_sync: Instant,
    read_only: bool,
    /// The uplink sent the open block: the next record must start a new one.
    block_start_requested: bool,
    /// Drop counters changed and are not yet persisted.
    drops_dirty: bool,
    /// Drops not yet taken by the audit trail ([`Store::take_drops`]).
    drops: Vec<Dropped>,
    /// The send position last persisted (`stats.acked_seq` may be ahead).
    persisted_ack: u64,
    stats: StoreStats,
    scratch: Vec<u8>,
    // flock on <dir>/LOCK for file stores; released on drop.
    _lock: Option<std::fs::File>,
}

/// A segment the store dropped: what went and why (the audit trail's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub reason: DropReason,
    pub records: u64,
    /// Of them, not yet confirmed by the fleet.
    pub unsent: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// Drops kept for the audit trail between two takes; beyond, the last
/// entry covers the rest.
const MAX_PENDING_DROPS: usize = 64;

const CURSOR: &str = "acked";
const DROPS: &str = "dropped";

/// The store the agent runs: segments as files in a directory.
pub type FileStore = Store<FsMedium>;

/// A class of data with its own store and bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Window measurements.
    Routine = 0,
    /// Alarms and anomaly records: their own, separate byte and age budget,
    /// so no amount of routine data can push them out, and sent first.
    Priority = 1,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Priority, Lane::Routine];

    pub fn label(self) -> &'static str {
        match self {
            Lane::Routine => "routine",
            Lane::Priority => "priority",
        }
    }

    /// Where the lane lives under the store directory.
    pub fn dir(self, store_dir: &Path) -> PathBuf {
        match self {
            Lane::Routine => store_dir.to_owned(),
            Lane::Priority => store_dir.join("priority"),
        }
    }
}

/// Both lanes of the agent's store.
pub struct Lanes {
    pub routine: FileStore,
    pub priority: FileStore,
}

/// Series describing both lanes, added to every window.
pub fn self_telemetry(lanes: &Lanes) -> Vec<(edge_wire::SeriesKey, f64)> {
    use edge_wire::{Label, SeriesKey};
    let mut out = Vec::new();
    for (lane, st) in [(Lane::Routine, lanes.routine.stats()), (Lane::Priority, lanes.priority.stats())] {
        let l = || vec![Label::new("lane", lane.label())];
        out.push((SeriesKey::new(metrics::BACKLOG_RECORDS, l()), st.backlog() as f64));
        out.push((SeriesKey::new(metrics::BYTES, l()), st.bytes as f64));
        for (reason, n) in plan::DropReason::ALL.iter().zip(st.dropped_records) {
            let labels = vec![Label::new("lane", lane.label()), Label::new("reason", reason.label())];
            out.push((SeriesKey::new(metrics::DROPPED_RECORDS_TOTAL, labels), n as f64));
        }
    }
    out
}

impl Lanes {
    pub fn open(store_dir: &Path, routine: StoreLimits, priority: StoreLimits) -> Result<Lanes, StoreError> {
        Ok(Lanes {
            routine: FileStore::open_dir(&Lane::Routine.dir(store_dir), routine)?,
            priority: FileStore::open_dir(&Lane::Priority.dir(store_dir), priority)?,
        })
    }

    pub fn get(&mut self, lane: Lane) -> &mut FileStore {
        match lane {
            Lane::Routine => &mut self.routine,
            Lane::Priority => &mut self.priority,
        }
    }
}

impl Store<FsMedium> {
    /// Opens (creating if needed) the store in `dir`, taking its lock.
    pub fn open_dir(dir: &Path, limits: StoreLimits) -> Result<Self, StoreError> {
        let medium = FsMedium::new(dir).map_err(|e| io_error(dir.display().to_string(), "create", e))?;
        let lock = lock_dir(dir)?;
        let mut s = Store::open(medium, limits)?;
        s._lock = Some(lock);
        Ok(s)
    }

    /// Reads a store without changing anything on disk and without the
    /// lock, so it can look at the store of a running agent.
    pub fn inspect_dir(dir: &Path) -> Result<Self, StoreError> {
        let medium = FsMedium::new(dir).map_err(|e| io_error(dir.display().to_string(), "open", e))?;
        Store::open_with(medium, StoreLimits::default(), true)
    }
}

fn io_error(place: String, what: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io { place, what, message: e.to_string() }
}

impl<M: Medium> Store<M> {
    /// Opens the store on `medium` and recovers it (plan::recovery).
    pub fn open(medium: M, limits: StoreLimits) -> Result<Self, StoreError> {
        Self::open_with(medium, limits, false)
    }

    fn open_with(mut medium: M, limits: StoreLimits, read_only: bool) -> Result<Self, StoreError> {
        let place = medium.describe();
        let err = |what| {
            let place = place.clone();
            move |e: M::Error| io_error(place, what, e)
        };
        let cursor = read_cursor(&mut medium);
        let mut stats = StoreStats { acked_seq: cursor.unwrap_or(0), ..Default::default() };
        if let Ok(Some(b)) = medium.read_meta(DROPS) {
            match record::decode_drops(&b) {
                Ok([cap, age, full, unsent, bytes]) => {
                    stats.dropped_records = [cap, age, full];
                    stats.dropped_unsent_records = unsent;
                    stats.dropped_bytes = bytes;
                }
                Err(why) => tracing::warn!(store = %place, why, "drop counters unreadable; starting them at 0"),
            }
        }
        let mut ids = medium.segments().map_err(err("list segments"))?;
        // A crash while creating a segment leaves it shorter than its header:
        // nothing was ever stored there. Remove such leftovers first, so that
        // "newest" below means the newest segment that holds data.
        while let Some(&id) = ids.last() {
            // Unreadable (a directory, no permission): the loop below
            // quarantines it.
            let Ok(size) = medium.open(id).and_then(|mut f| f.size()) else { break };
            if size >= SEGMENT_HEADER as u64 {
                break; // the common case: nothing to read twice
            }
            let Ok(bytes) = read_all(&mut medium, id) else { break };
            if plan::recovery(&plan::scan(&bytes, id), true, bytes.len() as u64) != Recovery::Remove {
                break;
            }
            stats.truncated_bytes += bytes.len() as u64;
            if !read_only {
                medium.remove(id).map_err(err("remove segment"))?;
            }
            ids.pop();
        }
        let mut segments: Vec<Segment> = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let is_newest = i + 1 == ids.len();
            let bytes = match read_all(&mut medium, id) {
                Ok(b) => b,
                // Whatever sits where a segment should (a directory, a
                // file this user cannot read, a medium error) never stops
                // the agent: set aside, counted, the other segments kept.
                Err(e) => {
                    stats.quarantined_segments += 1;
                    let moved = if read_only { Ok(()) } else { medium.quarantine(id) };
                    tracing::warn!(
                        store = %place,
                        segment = id,
                        error = %e,
                        set_aside = moved.is_ok(),
                        quarantine_error = moved.err().map(|e| e.to_string()),
                        "segment cannot be read; quarantined (renamed *.corrupt) or skipped, the rest of the store kept"
                    );
                    continue;
                }
            };
            let scanned = plan::scan(&bytes, id);
            let action = plan::recovery(&scanned, is_newest, bytes.len() as u64);
            // Sequence numbers must keep rising across segments.
            let prev_last = segments.last().and_then(|s| s.entries.last()).map(|e| e.seq);
            let backwards = prev_last.is_some_and(|p| id <= p);
            let (entries, valid_len, bad) = match scanned {
                Scan::Read { entries, valid_len, bad } if !backwards => (entries, valid_len, bad),
                // (Crash leftovers, the only segments to remove, went above.)
                other => {
                    tracing::error!(store = %place, segment = id, found = ?other, backwards, "segment unreadable; quarantined");
                    stats.quarantined_segments += 1;
                    if !read_only {
                        medium.quarantine(id).map_err(err("quarantine segment"))?;
                    }
                    continue;
                }
            };
            let mut len = bytes.len() as u64;
            let clean_tail = matches!(action, Recovery::Keep | Recovery::Truncate(_));
            match action {
                Recovery::Truncate(at) => {
                    let cut = len - at;
                    tracing::warn!(store = %place, segment = id, at, bytes = cut, why = ?bad, "cut torn tail");
                    stats.truncated_bytes += cut;
                    if !read_only {
                        medium.open(id).and_then(|mut s| s.truncate(at)).map_err(err("truncate segment"))?;
                    }
                    len = at;
                }
                Recovery::KeepPrefix => {
                    tracing::error!(store = %place, segment = id, at = valid_len, why = ?bad, "corrupt record; rest of segment skipped");
                    stats.corrupt_records += 1;
                }
                _ => {}
            }
            segments.push(Segment { id, entries, len, clean_tail });
        }

        let last = segments.iter().rev().find_map(|s| s.entries.last()).map(|e| e.seq);
        let next_seq = last.unwrap_or(0).max(stats.acked_seq) + 1;
        if cursor.is_none() && last.is_some_and(|l| l > stats.acked_seq) && !read_only {
            tracing::warn!(
                store = %place,
                "no send position saved (file `acked` missing or unreadable): every record held is sent, \
                 again where it was already delivered (duplicates are harmless downstream)"
            );
        }
        // Keep appending to the newest segment while it has room, but only if
        // it ends cleanly: a record after unreadable bytes could never be
        // found again.
        let active = match segments.last() {
            Some(s) if !read_only && s.clean_tail && s.len < limits.segment_bytes => {
                let mut f = medium.open(s.id).map_err(err("open segment"))?;
                f.seek(SeekFrom::Start(s.len)).map_err(err("seek segment"))?;
                Some(f)
            }
            _ => None,
        };
        let mut store = Store {
            medium,
            limits,
            segments,
            active,
            next_seq,
            last_sync: Instant::now(),
            read_only,
            block_start_requested: true,
            drops_dirty: false,
            drops: Vec::new(),
            persisted_ack: stats.acked_seq,
            stats,
            scratch: Vec::new(),
            _lock: None,
        };
        store.stats.durable_seq = next_seq - 1;
        store.refresh_stats();
        Ok(store)
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    /// The segments dropped since the last call.
    pub fn take_drops(&mut self) -> Vec<Dropped> {
        std::mem::take(&mut self.drops)
    }

    /// The next record starts a new block (the uplink's live data begins
    /// there).
    pub fn end_open_block(&mut self) {
        self.block_start_requested = true;
    }

    /// The sequence number the next append will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn limits(&self) -> &StoreLimits {
        &self.limits
    }

    pub fn describe(&self) -> String {
        self.medium.describe()
    }

    fn err(&self, what: &'static str) -> impl FnOnce(M::Error) -> StoreError + '_ {
        move |e| io_error(self.medium.describe(), what, e)
    }

    /// Appends a record stamped `time_ms` and returns its sequence number.
    /// Durable before returning when `fsync_interval_ms` is 0 or has
    /// elapsed since the last sync; otherwise within that interval, by a
    /// later append, [`Store::tick`] or [`Store::sync`].
    pub fn append(&mut self, payload: &[u8], time_ms: i64) -> Result<u64, StoreError> {
        self.append_flagged(payload, time_ms, 0)
    }

    /// Whether a record with `payload_len` bytes would begin a new segment.
    /// A block never spans segments (dropping a segment must not orphan the
    /// rest of a block), so the writer starts a block then.
    pub fn would_start_segment(&self, payload_len: usize) -> bool {
        match self.segments.last() {
            None => true,
            Some(s) => self.active.is_none() || s.len + plan::record_size(payload_len) > self.limits.segment_bytes,
        }
    }

    /// True once after the uplink has taken the open block for sending (or
    /// after a restart): the next frame written must start a new block.
    pub fn take_block_start_request(&mut self) -> bool {
        std::mem::take(&mut self.block_start_requested)
    }

    /// Appends a record with header `flags` (see [`record::FLAG_BLOCK_START`]).
    pub fn append_flagged(&mut self, payload: &[u8], time_ms: i64, flags: u8) -> Result<u64, StoreError> {
        if self.read_only {
            return Err(StoreError::ReadOnly);
        }
        let size = plan::record_size(payload.len());
        if payload.len() > record::MAX_PAYLOAD || size + SEGMENT_HEADER as u64 > self.limits.segment_bytes {
            return Err(StoreError::TooLarge(payload.len()));
        }
        self.enforce_bounds(time_ms, size)?;
        let seq = self.next_seq;
        self.scratch.clear();
        record::encode_record(seq, time_ms, flags, payload, &mut self.scratch);
        // A full medium: drop oldest segments (the active one too, if it is
        // all that is left) until the record fits or nothing is left.
        loop {
            match self.write_record(seq) {
                Ok(()) => break,
                Err((e, true)) => {
                    if !self.drop_oldest(DropReason::DiskFull)? {
                        tracing::error!(error = %e, "medium full and the store holds nothing more to drop");
                        return Err(StoreError::Full { place: self.medium.describe() });
                    }
                    tracing::warn!(error = %e, "medium full; dropped the oldest segment and retrying");
                }
                Err((e, false)) => return Err(e),
            }
        }
        let seg = self.segments.last_mut().expect("write_record ensured a segment");
        seg.entries.push(Entry { seq, time_ms, flags, offset: seg.len, len: self.scratch.len() as u32 });
        seg.len += self.scratch.len() as u64;
        self.next_seq += 1;
        self.stats.appended_records += 1;
        if std::mem::take(&mut self.drops_dirty) {
            self.persist_drops();
        }
        if self.limits.fsync_interval_ms == 0
            || self.last_sync.elapsed() >= Duration::from_millis(self.limits.fsync_interval_ms)
        {
            self.sync()?;
        }
        self.refresh_stats();
        Ok(seq)
    }

    /// Writes `self.scratch` as record `seq`, starting a segment if needed.
    /// On failure the segment is cut back to where it was. The flag says
    /// whether the medium was full.
    fn write_record(&mut self, seq: u64) -> Result<(), (StoreError, bool)> {
        // A segment holds consecutive sequence numbers from its id on (that
        // is how recovery tells a stale or foreign record from a good one).
        // After a power cut lost records that had been acknowledged, the
        // next number skips ahead: start a new segment then.
        let needs_new = match self.segments.last() {
            None => true,
            Some(s) => {
                let expected = s.entries.last().map_or(s.id, |e| e.seq + 1);
                self.active.is_none()
                    || expected != seq
                    || s.len + self.scratch.len() as u64 > self.limits.segment_bytes
            }
        };
        if needs_new {
            self.start_segment(seq)?;
        }
        let (Some(seg), Some(file)) = (self.segments.last(), self.active.as_mut()) else {
            return Err((
                StoreError::Io { place: self.medium.describe(), what: "write", message: "no active segment".into() },
                false,
            ));
        };
        let offset = seg.len;
        if let Err(e) = file.write_all(&self.scratch) {
            let full = M::is_full(&e);
            // Cut back whatever part was written so the segment stays clean.
            let _ = file.truncate(offset);
            let _ = file.seek(SeekFrom::Start(offset));
            return Err((io_error(self.medium.describe(), "append", e), full));
        }
        Ok(())
    }

    /// Makes every append so far durable.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.stats.durable_seq + 1 == self.next_seq {
            return Ok(());
        }
        if let Some(f) = self.active.as_mut() {
            f.flush().map_err(|e| io_error(String::new(), "sync", e))?;
        }
        self.last_sync = Instant::now();
        self.stats.syncs += 1;
        self.stats.durable_seq = self.next_seq - 1;
        Ok(())
    }

    /// Syncs if appends are waiting and the interval has passed.
    pub fn tick(&mut self) -> Result<(), StoreError> {
        if self.last_sync.elapsed() >= Duration::from_millis(self.limits.fsync_interval_ms) {
            self.sync()?;
        }
        Ok(())
    }

    /// Up to `max` records with sequence numbers above `after`, in order.
    /// Records found corrupt are skipped and counted.
    pub fn read_after(&mut self, after: u64, max: usize) -> Result<Vec<StoredRecord>, StoreError> {
        let mut out = Vec::new();
        let start = self.segments.partition_point(|s| s.entries.last().is_some_and(|e| e.seq <= after));
        let mut corrupt = 0;
        let place = self.medium.describe();
        for seg in &self.segments[start..] {
            if out.len() >= max {
                break;
            }
            let from = seg.entries.partition_point(|e| e.seq <= after);
            if from == seg.entries.len() {
                continue;
            }
            let mut file = self.medium.open(seg.id).map_err(|e| io_error(place.clone(), "open segment", e))?;
            for e in &seg.entries[from..] {
                if out.len() >= max {
                    break;
                }
                let mut buf = vec![0u8; e.len as usize];
                file.seek(SeekFrom::Start(e.offset)).map_err(|x| io_error(place.clone(), "seek", x))?;
                if file.read_exact(&mut buf).is_err() {
                    corrupt += 1;
                    continue;
                }
                self.stats.read_records += 1;
                match record::decode_record(&buf) {
                    record::Decoded::Record { seq, time_ms, total, .. } if seq == e.seq && total == buf.len() => {
                        buf.drain(..record::RECORD_HEADER);
                        out.push(StoredRecord { seq, time_ms, payload: buf });
                    }
                    _ => {
                        tracing::error!(store = %place, seq = e.seq, "record corrupt on read; skipped");
                        corrupt += 1;
                    }
                }
            }
        }
        self.stats.corrupt_records += corrupt;
        Ok(out)
    }

    /// Whole blocks after record `after`, oldest first: at most `max_blocks`
    /// and, beyond the first block, at most `max_bytes` of payload. The
    /// block still being written is included only with `include_open`, and
    /// is then closed: the next record will start a new block. A block with
    /// a record that reads back corrupt is cut before that record (the frames
    /// after it cannot be decoded without it); the rest is counted corrupt.
    pub fn read_blocks(
        &mut self,
        after: u64,
        max_blocks: usize,
        max_bytes: usize,
        include_open: bool,
    ) -> Result<Vec<Vec<StoredRecord>>, StoreError> {
        // Plan from the index: the records of each block, in order.
        let mut plan: Vec<Vec<Entry>> = Vec::new();
        let mut bytes = 0usize;
        let mut open = false;
        let last_seq = self.stats.last_seq;
        // Called on every uplink poll: skip straight to the first record after
        // `after` rather than walking the whole index.
        let start = self.segments.partition_point(|s| s.entries.last().is_some_and(|e| e.seq <= after));
        'segments: for seg in &self.segments[start..] {
            let from = seg.entries.partition_point(|e| e.seq <= after);
            for e in &seg.entries[from..] {
                if e.flags & record::FLAG_BLOCK_START != 0 {
                    if plan.len() == max_blocks || (!plan.is_empty() && bytes >= max_bytes) {
                        break 'segments;
                    }
                    plan.push(Vec::new());
                }
                match plan.last_mut() {
                    Some(block) if block.last().is_none_or(|p| p.seq + 1 == e.seq) => {
                        block.push(*e);
                        bytes += e.len as usize;
                    }
                    // A continuation without its block start (skipped as
                    // corrupt before): undecodable.
                    _ => self.stats.corrupt_records += 1,
                }
            }
        }
        if let Some(last) = plan.last() {
            // The newest block may still grow unless a start follows it.
            open = last.last().map(|e| e.seq) == Some(last_seq);
        }
        if open && !include_open {
            plan.pop();
        }
        let mut out = Vec::with_capacity(plan.len());
        for block in plan {
            let first = block[0].seq;
            let recs = self.read_after(first - 1, block.len())?;
            let whole = recs.iter().zip(&block).take_while(|(r, e)| r.seq == e.seq).count();
            if whole < block.len() {
                self.stats.corrupt_records += (block.len() - whole) as u64;
            }
            if whole > 0 {
                out.push(recs.into_iter().take(whole).collect());
            }
        }
        if open && include_open {
            self.block_start_requested = true;
        }
        Ok(out)
    }

    /// Persists the send position: every record up to `seq` was delivered.
    pub fn ack(&mut self, seq: u64) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::ReadOnly);
        }
        if seq <= self.persisted_ack {
            return Ok(());
        }
        // Confirmed end to end whether or not it can be persisted now (a
        // full medium): drops and the backlog count it as sent at once; the
        // caller retries persisting. A crash before then only resends.
        if seq > self.stats.acked_seq {
            self.stats.acked_seq = seq;
            self.refresh_stats();
        }
        self.medium.write_meta(CURSOR, &record::encode_cursor(seq)).map_err(self.err("persist send position"))?;
        self.persisted_ack = seq;
        Ok(())
    }

    /// Starts segment `first_seq`. Errors carry whether the medium was full;
    /// a segment that could not be set up is removed again.
    fn start_segment(&mut self, first_seq: u64) -> Result<(), (StoreError, bool)> {
        // The previous segment is finished: make all of it durable first.
        self.sync().map_err(|e| (e, false))?;
        let place = self.medium.describe();
        let mut f = self
            .medium
            .create(first_seq)
            .map_err(|e| (io_error(place.clone(), "create segment", &e), M::is_full(&e)))?;
        if let Err(e) = f.write_all(&record::encode_segment_header(first_seq)).and_then(|_| f.flush()) {
            let full = M::is_full(&e);
            drop(f);
            let _ = self.medium.remove(first_seq);
            return Err((io_error(place, "write segment header", e), full));
        }
        self.segments.push(Segment {
            id: first_seq,
            entries: Vec::new(),
            len: SEGMENT_HEADER as u64,
            clean_tail: true,
        });
        self.active = Some(f);
        Ok(())
    }

    /// Drops what the bounds require before `incoming` more bytes arrive.
    fn enforce_bounds(&mut self, now_ms: i64, incoming: u64) -> Result<(), StoreError> {
        let mut summaries: Vec<SegmentSummary> = self.segments.iter().map(Segment::summary).collect();
        // Count the record about to be written against the byte bound, and a
        // new segment if it will not fit in the active one.
        match summaries.last_mut() {
            Some(last) if self.active.is_some() && last.bytes + incoming <= self.limits.segment_bytes => {
                last.bytes += incoming
            }
            _ => summaries.push(SegmentSummary { bytes: SEGMENT_HEADER as u64 + incoming, newest_ms: Some(now_ms) }),
        }
        let plan = plan::drops(&summaries, self.limits.max_bytes, self.limits.max_age_ms, now_ms);
        for (_, reason) in plan {
            self.drop_oldest(reason)?;
        }
        Ok(())
    }

    /// Drops the oldest segment unless it is the only one being written.
    fn drop_oldest(&mut self, reason: DropReason) -> Result<bool, StoreError> {
        // The segment being written goes only when the medium is full and it
        // is all that is left: it holds the oldest data then.
        if self.segments.is_empty() || (self.segments.len() < 2 && reason != DropReason::DiskFull) {
            return Ok(false);
        }
        if self.segments.len() == 1 {
            self.active = None;
        }
        let seg = self.segments.remove(0);
        self.medium.remove(seg.id).map_err(self.err("remove segment"))?;
        let n = seg.entries.len() as u64;
        let unsent = seg.entries.iter().filter(|e| e.seq > self.stats.acked_seq).count() as u64;
        let idx = DropReason::ALL.iter().position(|r| *r == reason).unwrap_or(0);
        self.stats.dropped_records[idx] += n;
        self.stats.dropped_unsent_records += unsent;
        self.stats.dropped_bytes += seg.len;
        let (first, last) = (seg.entries.first().map(|e| e.seq), seg.entries.last().map(|e| e.seq));
        // Persisted after the next record is written: on a full medium the
        // counters' file must not take the room just made.
        self.drops_dirty = true;
        let dropped =
            Dropped { reason, records: n, unsent, first_seq: first.unwrap_or(0), last_seq: last.unwrap_or(0) };
        let full = self.drops.len() >= MAX_PENDING_DROPS;
        match self.drops.last_mut() {
            Some(d) if full => (d.records, d.unsent, d.last_seq) = (d.records + n, d.unsent + unsent, dropped.last_seq),
            _ => self.drops.push(dropped),
        }
        // The audit line: what went, why, and whether it had been sent.
        tracing::warn!(
            target: "edge_agent::audit",
            store = %self.medium.describe(),
            reason = reason.label(),
            segment = seg.id,
            records = n,
            unsent,
            first_seq = ?first,
            last_seq = ?last,
            bytes = seg.len,
            "store dropped its oldest segment"
        );
        self.refresh_stats();
        Ok(true)
    }

    fn persist_drops(&mut self) {
        let [cap, age, full] = self.stats.dropped_records;
        let counters =
            record::encode_drops([cap, age, full, self.stats.dropped_unsent_records, self.stats.dropped_bytes]);
        if let Err(e) = self.medium.write_meta(DROPS, &counters) {
            tracing::error!(error = %e, "cannot persist the drop counters");
            self.drops_dirty = true;
        }
    }

    fn refresh_stats(&mut self) {
        let s = &mut self.stats;
        s.segments = self.segments.len();
        s.bytes = self.segments.iter().map(|x| x.len).sum();
        let first = self.segments.iter().find_map(|x| x.entries.first());
        let last = self.segments.iter().rev().find_map(|x| x.entries.last());
        s.first_seq = first.map_or(0, |e| e.seq);
        s.last_seq = last.map_or(0, |e| e.seq);
        s.oldest_ms = first.map_or(0, |e| e.time_ms);
        s.newest_ms = last.map_or(0, |e| e.time_ms);
    }
}

fn read_all<M: Medium>(medium: &mut M, id: u64) -> Result<Vec<u8>, M::Error> {
    let mut f = medium.open(id)?;
    let len = f.size()? as usize;
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        match f.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// The persisted send position; `None` when there is none (a new store,
/// or the file was deleted or is unreadable: said at open).
fn read_cursor<M: Medium>(medium: &mut M) -> Option<u64> {
    match medium.read_meta(CURSOR) {
        Ok(None) => None,
        Ok(Some(b)) => record::decode_cursor(&b)
            .map_err(|why| tracing::error!(store = %medium.describe(), why, "send position unreadable"))
            .ok(),
        Err(e) => {
            tracing::error!(store = %medium.describe(), error = %e, "send position unreadable");
            None
        }
    }
}

fn lock_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::fd::AsRawFd;
    let path = dir.join("LOCK");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| io_error(path.display().to_string(), "open lock", e))?;
    // SAFETY: flock on a descriptor we own; released when `f` is closed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Err(StoreError::Locked(dir.to_owned()));
        }
        return Err(io_error(path.display().to_string(), "lock", e));
    }
    Ok(f)
}
