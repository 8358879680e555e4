//! Store stage: an append-only, segmented, checksummed log of window records
//! on flash, bounded by bytes, with a persisted send position.
//!
//! This is the first, honest version (issue 2): one fsync per append (one
//! append per window), whole segments dropped oldest first when over the
//! byte bound and counted. Formats: docs/store-format.md.
//!
//! Recovery rules on open:
//! * the last segment is cut at its first torn or corrupt record (a write
//!   interrupted by a crash or power cut) and the cut is counted;
//! * in an older segment, records after the first corrupt one cannot be
//!   found again (lengths are untrustworthy past it); they are counted as
//!   corrupt and skipped, the intact prefix is kept;
//! * a segment whose header is unreadable is renamed `*.corrupt` and left
//!   for inspection;
//! * a missing or corrupt send-position file means "nothing acknowledged":
//!   records are sent again (duplicates are harmless downstream), never lost.
//!
//! Nothing on this path panics on what it reads from disk.

pub mod record;

use record::{Decoded, RECORD_HEADER, SEGMENT_HEADER};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store directory {path}: {source} (check that it exists, is writable, and the disk is not full)")]
    Io { path: PathBuf, source: io::Error },
    #[error("store directory {0} is in use by another edge-agent process (each agent needs its own state_dir)")]
    Locked(PathBuf),
    #[error("record of {0} bytes is larger than a segment allows")]
    TooLarge(usize),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    pub max_bytes: u64,
    pub segment_bytes: u64,
}

/// Counters and gauges of the store, for `/metrics` and `store inspect`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    pub segments: usize,
    pub bytes: u64,
    /// Oldest and newest sequence numbers held (0 when empty).
    pub first_seq: u64,
    pub last_seq: u64,
    pub acked_seq: u64,
    pub appended_records: u64,
    /// Dropped to stay under the byte bound.
    pub dropped_records: u64,
    pub dropped_unsent_records: u64,
    pub dropped_bytes: u64,
    /// Found corrupt at open or read and skipped.
    pub corrupt_records: u64,
    pub truncated_bytes: u64,
    pub quarantined_segments: u64,
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
}

#[derive(Debug)]
struct Segment {
    path: PathBuf,
    #[allow(dead_code)] // kept for `store inspect` (issue 4)
    first_seq: u64,
    /// (seq, offset of record, total length) of every intact record.
    index: Vec<(u64, u64, u32)>,
    len: u64,
}

/// A record read back from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub seq: u64,
    pub payload: Vec<u8>,
}

pub struct Store {
    dir: PathBuf,
    limits: StoreLimits,
    segments: Vec<Segment>,
    active: Option<File>,
    next_seq: u64,
    stats: StoreStats,
    scratch: Vec<u8>,
    // Held for the store's lifetime: flock(LOCK_EX) on `LOCK`.
    _lock: File,
}

const CURSOR_FILE: &str = "acked";

impl Store {
    /// Opens (creating if needed) the store in `dir` and recovers it.
    pub fn open(dir: &Path, limits: StoreLimits) -> Result<Store, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock = lock_dir(dir)?;
        let mut stats = StoreStats {
            acked_seq: read_cursor(dir),
            ..Default::default()
        };

        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(seq) = name
                .strip_prefix("seg-")
                .and_then(|r| r.strip_suffix(".log"))
            {
                if let Ok(seq) = seq.parse::<u64>() {
                    names.push((seq, entry.path()));
                }
            }
        }
        names.sort();

        let mut segments: Vec<Segment> = Vec::new();
        let count = names.len();
        for (i, (name_seq, path)) in names.into_iter().enumerate() {
            let is_last = i + 1 == count;
            match scan_segment(&path, name_seq, is_last, &mut stats)? {
                Scan::Removed => {}
                Scan::Kept(seg) => {
                    // Sequence numbers must keep rising across segments.
                    let prev_last = segments.last().and_then(|s| s.index.last()).map(|r| r.0);
                    if let (Some(prev), Some(first)) = (prev_last, seg.index.first()) {
                        if first.0 <= prev {
                            tracing::error!(segment = %path.display(), "sequence numbers go backwards; quarantined");
                            quarantine(&path, &mut stats);
                            continue;
                        }
                    }
                    segments.push(seg);
                }
                Scan::Unreadable => quarantine(&path, &mut stats),
            }
        }

        let last = segments
            .iter()
            .rev()
            .find_map(|s| s.index.last())
            .map(|r| r.0);
        let next_seq = last.unwrap_or(0).max(stats.acked_seq) + 1;
        // Keep appending to the newest segment (its tail was cut clean above).
        let active = match segments.last() {
            Some(s) if s.len < limits.segment_bytes => Some(
                OpenOptions::new()
                    .append(true)
                    .open(&s.path)
                    .map_err(io_err(&s.path))?,
            ),
            _ => None,
        };
        let mut store = Store {
            dir: dir.to_owned(),
            limits,
            segments,
            active,
            next_seq,
            stats,
            scratch: Vec::new(),
            _lock: lock,
        };
        store.refresh_stats();
        if store.stats.truncated_bytes > 0 || store.stats.corrupt_records > 0 {
            tracing::warn!(
                truncated_bytes = store.stats.truncated_bytes,
                corrupt_records = store.stats.corrupt_records,
                "store recovered from an interrupted write or corruption"
            );
        }
        Ok(store)
    }

    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends a record and makes it durable (fsync) before returning its
    /// sequence number. Drops the oldest segments if over the byte bound.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, StoreError> {
        let total = RECORD_HEADER + payload.len();
        if payload.len() > record::MAX_PAYLOAD
            || (total + SEGMENT_HEADER) as u64 > self.limits.segment_bytes
        {
            return Err(StoreError::TooLarge(payload.len()));
        }
        let seq = self.next_seq;
        let needs_new = match self.segments.last() {
            None => true,
            Some(s) => self.active.is_none() || s.len + total as u64 > self.limits.segment_bytes,
        };
        if needs_new {
            self.start_segment(seq)?;
        }
        self.scratch.clear();
        record::encode_record(seq, 0, payload, &mut self.scratch);
        let seg = self.segments.last_mut().expect("start_segment pushed one");
        let file = self.active.as_mut().expect("start_segment opened it");
        let offset = seg.len;
        let res = file.write_all(&self.scratch).and_then(|_| file.sync_data());
        if let Err(e) = res {
            // Cut back what may have been written so the segment stays clean.
            let _ = file.set_len(offset);
            self.active = None;
            return Err(StoreError::Io {
                path: seg.path.clone(),
                source: e,
            });
        }
        seg.index.push((seq, offset, total as u32));
        seg.len += total as u64;
        self.next_seq += 1;
        self.stats.appended_records += 1;
        self.enforce_bound()?;
        self.refresh_stats();
        Ok(seq)
    }

    /// Up to `max` records with sequence numbers above `after`, in order.
    /// Records found corrupt are skipped and counted.
    pub fn read_after(&mut self, after: u64, max: usize) -> Result<Vec<StoredRecord>, StoreError> {
        let mut out = Vec::new();
        let start = self
            .segments
            .partition_point(|s| s.index.last().is_some_and(|r| r.0 <= after));
        let mut corrupt = 0;
        for seg in &self.segments[start..] {
            let from = seg.index.partition_point(|r| r.0 <= after);
            if from == seg.index.len() {
                continue;
            }
            let file = File::open(&seg.path).map_err(io_err(&seg.path))?;
            for &(seq, off, len) in &seg.index[from..] {
                if out.len() >= max {
                    break;
                }
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, off)
                    .map_err(io_err(&seg.path))?;
                match record::decode_record(&buf) {
                    Decoded::Record { seq: s, total, .. } if s == seq && total == buf.len() => {
                        buf.drain(..RECORD_HEADER);
                        out.push(StoredRecord { seq, payload: buf });
                    }
                    _ => {
                        tracing::error!(seq, segment = %seg.path.display(), "record corrupt on read; skipped");
                        corrupt += 1;
                    }
                }
            }
            if out.len() >= max {
                break;
            }
        }
        self.stats.corrupt_records += corrupt;
        Ok(out)
    }

    /// Persists the send position: every record up to `seq` was delivered.
    /// Atomic (write, fsync, rename, fsync directory).
    pub fn ack(&mut self, seq: u64) -> Result<(), StoreError> {
        if seq <= self.stats.acked_seq {
            return Ok(());
        }
        let tmp = self.dir.join("acked.tmp");
        let dst = self.dir.join(CURSOR_FILE);
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&record::encode_cursor(seq))?;
            f.sync_all()?;
            fs::rename(&tmp, &dst)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(io_err(&self.dir))?;
        self.stats.acked_seq = seq;
        Ok(())
    }

    fn start_segment(&mut self, first_seq: u64) -> Result<(), StoreError> {
        let path = self.dir.join(format!("seg-{first_seq:020}.log"));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        f.write_all(&record::encode_segment_header(first_seq))
            .and_then(|_| f.sync_all())
            .and_then(|_| File::open(&self.dir)?.sync_all())
            .map_err(io_err(&path))?;
        self.segments.push(Segment {
            path,
            first_seq,
            index: Vec::new(),
            len: SEGMENT_HEADER as u64,
        });
        self.active = Some(f);
        Ok(())
    }

    fn enforce_bound(&mut self) -> Result<(), StoreError> {
        while self.total_bytes() > self.limits.max_bytes && self.segments.len() > 1 {
            let seg = self.segments.remove(0);
            fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
            let n = seg.index.len() as u64;
            let unsent = seg
                .index
                .iter()
                .filter(|r| r.0 > self.stats.acked_seq)
                .count() as u64;
            self.stats.dropped_records += n;
            self.stats.dropped_unsent_records += unsent;
            self.stats.dropped_bytes += seg.len;
            tracing::warn!(
                segment = %seg.path.display(),
                records = n,
                unsent,
                "store full: dropped the oldest segment"
            );
        }
        Ok(())
    }

    fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    fn refresh_stats(&mut self) {
        self.stats.segments = self.segments.len();
        self.stats.bytes = self.total_bytes();
        self.stats.first_seq = self
            .segments
            .iter()
            .find_map(|s| s.index.first())
            .map_or(0, |r| r.0);
        self.stats.last_seq = self
            .segments
            .iter()
            .rev()
            .find_map(|s| s.index.last())
            .map_or(0, |r| r.0);
    }
}

fn lock_dir(dir: &Path) -> Result<File, StoreError> {
    use std::os::fd::AsRawFd;
    let path = dir.join("LOCK");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    // SAFETY: flock on a descriptor we own; released when `f` is closed.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(StoreError::Locked(dir.to_owned()));
        }
        return Err(StoreError::Io { path, source: e });
    }
    Ok(f)
}

fn read_cursor(dir: &Path) -> u64 {
    let path = dir.join(CURSOR_FILE);
    match fs::read(&path) {
        Ok(b) => match record::decode_cursor(&b) {
            Ok(seq) => seq,
            Err(why) => {
                tracing::error!(file = %path.display(), why, "send position unreadable; resending everything held");
                0
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, "send position unreadable; resending everything held");
            0
        }
    }
}

fn quarantine(path: &Path, stats: &mut StoreStats) {
    let mut to = path.as_os_str().to_owned();
    to.push(".corrupt");
    if let Err(e) = fs::rename(path, &to) {
        tracing::error!(segment = %path.display(), error = %e, "cannot quarantine corrupt segment");
    }
    stats.quarantined_segments += 1;
}

enum Scan {
    Kept(Segment),
    /// An empty segment left by a crash during its creation; deleted.
    Removed,
    /// Header unreadable: quarantine it.
    Unreadable,
}

/// Reads a segment's records, cutting a torn tail if it is the last one.
fn scan_segment(
    path: &Path,
    name_seq: u64,
    is_last: bool,
    stats: &mut StoreStats,
) -> Result<Scan, StoreError> {
    let data = fs::read(path).map_err(io_err(path))?;
    match record::decode_segment_header(&data) {
        Ok(seq) if seq == name_seq => {}
        _ if is_last && data.len() < SEGMENT_HEADER => {
            // Crashed while creating it: nothing was ever stored here.
            fs::remove_file(path).map_err(io_err(path))?;
            stats.truncated_bytes += data.len() as u64;
            return Ok(Scan::Removed);
        }
        _ => {
            tracing::error!(segment = %path.display(), "unreadable segment header");
            return Ok(Scan::Unreadable);
        }
    }
    let mut index = Vec::new();
    let mut off = SEGMENT_HEADER;
    let mut expected = None;
    while off < data.len() {
        match record::decode_record(&data[off..]) {
            Decoded::Record { seq, total, .. } if expected.is_none_or(|e| e == seq) => {
                index.push((seq, off as u64, total as u32));
                expected = Some(seq + 1);
                off += total;
            }
            other => {
                let rest = (data.len() - off) as u64;
                if is_last {
                    // Torn or corrupt tail of the segment being written.
                    let f = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(io_err(path))?;
                    f.set_len(off as u64)
                        .and_then(|_| f.sync_all())
                        .map_err(io_err(path))?;
                    stats.truncated_bytes += rest;
                    tracing::warn!(segment = %path.display(), cut_at = off, bytes = rest, what = ?other, "cut torn tail");
                } else {
                    stats.corrupt_records += 1;
                    tracing::error!(segment = %path.display(), at = off, bytes = rest, what = ?other, "corrupt record; rest of segment skipped");
                }
                break;
            }
        }
    }
    let len = if is_last {
        off as u64
    } else {
        data.len() as u64
    };
    Ok(Scan::Kept(Segment {
        path: path.to_owned(),
        first_seq: name_seq,
        index,
        len,
    }))
}
