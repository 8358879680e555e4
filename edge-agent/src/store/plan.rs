//! The store's decisions, as pure functions of what is on the medium and
//! the limits: how to read a segment's bytes back (and where to cut), and
//! which segments to drop. No I/O here; `mod.rs` carries the decisions out.

use super::record::{self, Decoded, RECORD_HEADER, SEGMENT_HEADER};

/// One intact record found in a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub time_ms: i64,
    pub flags: u8,
    pub offset: u64,
    pub len: u32,
}

/// What reading a segment's bytes found.
#[derive(Debug, PartialEq, Eq)]
pub enum Scan {
    /// The header cannot be read or names another segment.
    BadHeader(&'static str),
    Read {
        entries: Vec<Entry>,
        /// Bytes up to the end of the last intact record.
        valid_len: u64,
        /// The first byte that is not an intact, in-sequence record, and
        /// why; everything from there on is unreadable.
        bad: Option<(u64, &'static str)>,
    },
}

/// Reads a segment image. `id` is the first sequence number the segment's
/// name promises.
pub fn scan(bytes: &[u8], id: u64) -> Scan {
    match record::decode_segment_header(bytes) {
        Ok(first) if first == id => {}
        Ok(_) => return Scan::BadHeader("header names another segment"),
        Err(why) => return Scan::BadHeader(why),
    }
    let mut entries = Vec::new();
    let mut off = SEGMENT_HEADER;
    let mut next_seq = id;
    let mut bad = None;
    while off < bytes.len() {
        match record::decode_record(&bytes[off..]) {
            Decoded::Record { seq, time_ms, flags, total } if seq == next_seq => {
                entries.push(Entry { seq, time_ms, flags, offset: off as u64, len: total as u32 });
                next_seq = seq + 1;
                off += total;
            }
            Decoded::Record { .. } => {
                bad = Some((off as u64, "sequence number out of order"));
                break;
            }
            Decoded::Incomplete => {
                bad = Some((off as u64, "incomplete record"));
                break;
            }
            Decoded::Corrupt(why) => {
                bad = Some((off as u64, why));
                break;
            }
        }
    }
    Scan::Read { entries, valid_len: off as u64, bad }
}

/// What recovery does with one scanned segment.
#[derive(Debug, PartialEq, Eq)]
pub enum Recovery {
    Keep,
    /// Cut the newest segment at this length (a torn write).
    Truncate(u64),
    /// An older segment with unreadable bytes: keep the intact prefix,
    /// count the rest as lost.
    KeepPrefix,
    /// Crashed while creating it: nothing was stored; delete it.
    Remove,
    Quarantine,
}

pub fn recovery(scan: &Scan, is_newest: bool, size: u64) -> Recovery {
    match scan {
        Scan::BadHeader(_) if is_newest && size < SEGMENT_HEADER as u64 => Recovery::Remove,
        Scan::BadHeader(_) => Recovery::Quarantine,
        Scan::Read { bad: None, .. } => Recovery::Keep,
        Scan::Read { valid_len, .. } if is_newest => Recovery::Truncate(*valid_len),
        Scan::Read { .. } => Recovery::KeepPrefix,
    }
}

/// Why data left the store before it was sent (or after).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Over `max_bytes`.
    Capacity,
    /// Older than `max_age`.
    Age,
    /// The medium reported no space left.
    DiskFull,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [DropReason::Capacity, DropReason::Age, DropReason::DiskFull];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::Capacity => "capacity",
            DropReason::Age => "age",
            DropReason::DiskFull => "disk_full",
        }
    }
}

/// A segment as far as dropping is concerned.
#[derive(Debug, Clone, Copy)]
pub struct SegmentSummary {
    pub bytes: u64,
    /// Time of its newest record (None: empty).
    pub newest_ms: Option<i64>,
}

/// Which of the oldest segments to drop, oldest first. The newest segment
/// (being written) is never dropped. `max_age_ms` 0 means no age limit.
pub fn drops(segments: &[SegmentSummary], max_bytes: u64, max_age_ms: u64, now_ms: i64) -> Vec<(usize, DropReason)> {
    let mut out = Vec::new();
    let mut total: u64 = segments.iter().map(|s| s.bytes).sum();
    let droppable = segments.len().saturating_sub(1);
    for (i, s) in segments.iter().enumerate().take(droppable) {
        let too_old = max_age_ms > 0 && s.newest_ms.is_some_and(|t| now_ms.saturating_sub(t) > max_age_ms as i64);
        if too_old {
            out.push((i, DropReason::Age));
        } else if total > max_bytes {
            out.push((i, DropReason::Capacity));
        } else {
            break; // oldest first: a younger segment is never dropped before an older one
        }
        total -= s.bytes;
    }
    out
}

/// Size of a record with `payload` bytes.
pub fn record_size(payload: usize) -> u64 {
    (RECORD_HEADER + payload) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(id: u64, n: u64) -> Vec<u8> {
        let mut b = record::encode_segment_header(id).to_vec();
        for s in id..id + n {
            record::encode_record(s, s as i64 * 10, 0, &[s as u8; 5], &mut b);
        }
        b
    }

    #[test]
    fn scan_reads_every_record() {
        let b = segment(5, 3);
        let Scan::Read { entries, valid_len, bad } = scan(&b, 5) else { panic!() };
        assert_eq!(entries.iter().map(|e| e.seq).collect::<Vec<_>>(), [5, 6, 7]);
        assert_eq!(entries[1].time_ms, 60);
        assert_eq!((valid_len, bad), (b.len() as u64, None));
    }

    #[test]
    fn scan_stops_at_a_torn_or_out_of_sequence_record() {
        let b = segment(1, 3);
        let full = b.len();
        let Scan::Read { entries, valid_len, bad } = scan(&b[..full - 2], 1) else { panic!() };
        assert_eq!(entries.len(), 2);
        assert_eq!(bad.map(|b| b.1), Some("incomplete record"));
        assert_eq!(recovery(&scan(&b[..full - 2], 1), true, 0), Recovery::Truncate(valid_len));
        assert_eq!(recovery(&scan(&b[..full - 2], 1), false, 0), Recovery::KeepPrefix);
        // A valid record with the wrong sequence number (a stale block).
        let mut c = segment(1, 1);
        record::encode_record(9, 0, 0, b"x", &mut c);
        let Scan::Read { entries, bad, .. } = scan(&c, 1) else { panic!() };
        assert_eq!((entries.len(), bad.map(|b| b.1)), (1, Some("sequence number out of order")));
    }

    #[test]
    fn headers_decide_quarantine_or_removal() {
        assert_eq!(recovery(&scan(b"EAS", 1), true, 3), Recovery::Remove);
        assert_eq!(recovery(&scan(b"EAS", 1), false, 3), Recovery::Quarantine);
        assert_eq!(recovery(&scan(&segment(2, 1), 1), true, 99), Recovery::Quarantine);
    }

    #[test]
    fn drops_oldest_first_by_age_then_capacity_never_the_newest() {
        let s = |bytes, t| SegmentSummary { bytes, newest_ms: Some(t) };
        let segs = [s(100, 0), s(100, 500), s(100, 900), s(100, 1000)];
        assert_eq!(drops(&segs, 400, 0, 1000), vec![]);
        assert_eq!(drops(&segs, 250, 0, 1000), vec![(0, DropReason::Capacity), (1, DropReason::Capacity)]);
        assert_eq!(drops(&segs, 1000, 400, 1000), vec![(0, DropReason::Age), (1, DropReason::Age)]);
        assert_eq!(drops(&segs, 10, 0, 1000).len(), 3);
        assert_eq!(drops(&segs[..1], 10, 1, 1_000_000), vec![]);
    }
}
