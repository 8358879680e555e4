//! The store on real files: restart, torn tails, corruption, the byte bound,
//! and the send position.

use edge_agent::store::{FileStore as Store, StoreLimits};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;

const LIMITS: StoreLimits =
    StoreLimits { max_bytes: 64 * 1024, segment_bytes: 8 * 1024, max_age_ms: 0, fsync_interval_ms: 0 };

fn payload(i: u64) -> Vec<u8> {
    format!("record number {i:08} ").repeat(10).into_bytes()
}

fn segments(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

#[test]
fn records_survive_restart_in_order_and_ack_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    for i in 1..=100 {
        assert_eq!(s.append(&payload(i), 0).unwrap(), i);
    }
    s.ack(40).unwrap();
    drop(s);

    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    assert_eq!(s.stats().acked_seq, 40);
    assert_eq!(s.stats().backlog(), 60);
    let recs = s.read_after(40, 1000).unwrap();
    assert_eq!(recs.len(), 60);
    for (r, i) in recs.iter().zip(41..) {
        assert_eq!((r.seq, &r.payload), (i, &payload(i)));
    }
    // Appends continue the sequence after a restart.
    assert_eq!(s.append(b"x", 0).unwrap(), 101);
}

#[test]
fn torn_tail_is_cut_and_counted_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    for i in 1..=5 {
        s.append(&payload(i), 0).unwrap();
    }
    drop(s);
    let last = segments(dir.path()).pop().unwrap();
    let good_len = fs::metadata(&last).unwrap().len();
    // Half a record, as a crash mid-write leaves it.
    let mut half = Vec::new();
    half.extend_from_slice(&[2, 0, 0, 0, 200, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0, 0, 1, 2]);
    OpenOptions::new().append(true).open(&last).unwrap().write_all(&half).unwrap();

    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    assert_eq!(s.stats().truncated_bytes, half.len() as u64);
    assert_eq!(fs::metadata(&last).unwrap().len(), good_len);
    assert_eq!(s.append(b"after", 0).unwrap(), 6);
    let recs = s.read_after(0, 100).unwrap();
    assert_eq!(recs.len(), 6);
    assert_eq!(recs[5].payload, b"after");
}

#[test]
fn a_bit_flip_in_an_old_segment_loses_only_that_segment_tail() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    for i in 1..=60 {
        s.append(&payload(i), 0).unwrap();
    }
    drop(s);
    let segs = segments(dir.path());
    assert!(segs.len() >= 2, "{segs:?}");
    // Flip a payload bit of the third record of the first segment.
    let mut bytes = fs::read(&segs[0]).unwrap();
    let rec_len = 28 + payload(1).len();
    bytes[16 + 2 * rec_len + 30] ^= 0x10;
    fs::write(&segs[0], &bytes).unwrap();

    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    assert_eq!(s.stats().corrupt_records, 1);
    let seqs: Vec<u64> = s.read_after(0, 1000).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(&seqs[..2], &[1, 2]);
    let per_segment = (LIMITS.segment_bytes as usize - 16) / rec_len;
    assert_eq!(seqs[2], per_segment as u64 + 1, "resumes at the next segment");
    assert_eq!(*seqs.last().unwrap(), 60);
}

#[test]
fn a_segment_with_a_bad_header_is_quarantined_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    for i in 1..=60 {
        s.append(&payload(i), 0).unwrap();
    }
    drop(s);
    let first = segments(dir.path()).remove(0);
    let mut bytes = fs::read(&first).unwrap();
    bytes[0] = b'X';
    fs::write(&first, &bytes).unwrap();
    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    assert_eq!(s.stats().quarantined_segments, 1);
    assert!(first.with_extension("log.corrupt").exists());
    assert_eq!(s.read_after(0, 1000).unwrap().last().unwrap().seq, 60);
}

/// Whatever sits where a segment should (a directory, a dangling link)
/// used to stop the agent from starting; now it is set aside and counted,
/// and every good record is still there to be sent.
#[test]
fn a_directory_or_dangling_link_in_place_of_a_segment_never_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    for i in 1..=60 {
        s.append(&payload(i), 0).unwrap();
    }
    drop(s);
    let held = segments(dir.path());
    assert!(held.len() >= 2, "{held:?}");
    // A directory named like a segment between the real ones, and a link
    // to nothing named like the next one.
    let as_dir = dir.path().join("seg-00000000000000000002.log");
    fs::create_dir(&as_dir).unwrap();
    fs::write(as_dir.join("junk"), b"x").unwrap();
    let dangling = dir.path().join("seg-00000000000000000090.log");
    std::os::unix::fs::symlink("/nonexistent/edge-agent-test", &dangling).unwrap();
    // Garbage names are not segments at all.
    fs::write(dir.path().join("seg-notanumber.log"), b"garbage").unwrap();
    let mut s = Store::open_dir(dir.path(), LIMITS).expect("the store opens whatever it finds");
    assert_eq!(s.stats().quarantined_segments, 2, "{:?}", s.stats());
    assert!(as_dir.with_extension("log.corrupt").is_dir(), "set aside, not deleted");
    assert!(!dangling.exists() && fs::symlink_metadata(&dangling).is_err());
    let got: Vec<u64> = s.read_after(0, 1000).unwrap().iter().map(|r| r.seq).collect();
    assert_eq!(got, (1..=60).collect::<Vec<_>>(), "every good record");
    assert_eq!(s.append(&payload(61), 0).unwrap(), 61);
}

#[test]
fn byte_bound_drops_oldest_segments_and_counts_unsent() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    for i in 1..=1000 {
        s.append(&payload(i), 0).unwrap();
        assert!(s.stats().bytes <= LIMITS.max_bytes, "over the bound after {i}");
    }
    s.ack(10).unwrap();
    let st = s.stats().clone();
    assert!(st.dropped_total() > 0);
    assert_eq!(st.first_seq, st.dropped_total() + 1, "oldest first");
    assert_eq!(st.last_seq, 1000);
    let recs = s.read_after(0, 10_000).unwrap();
    assert_eq!(recs.first().unwrap().seq, st.first_seq);
    assert_eq!(recs.len() as u64, 1000 - st.dropped_total());
}

#[test]
fn corrupt_send_position_resends_rather_than_skips() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    for i in 1..=10 {
        s.append(&payload(i), 0).unwrap();
    }
    s.ack(7).unwrap();
    drop(s);
    let cursor = dir.path().join("acked");
    let mut b = fs::read(&cursor).unwrap();
    b[9] ^= 0xff;
    fs::write(&cursor, &b).unwrap();
    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    assert_eq!(s.stats().acked_seq, 0);
    assert_eq!(s.read_after(s.stats().acked_seq, 100).unwrap().len(), 10);
    // Sequence numbers are never reused, even with every segment gone.
    drop(s);
    for seg in segments(dir.path()) {
        fs::remove_file(seg).unwrap();
    }
    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    s.ack(10).unwrap();
    drop(s);
    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    assert_eq!(s.append(b"y", 0).unwrap(), 11);
}

#[test]
fn garbage_files_never_panic_the_open() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("seg-00000000000000000001.log"), b"").unwrap();
    fs::write(dir.path().join("seg-00000000000000000002.log"), [0xffu8; 100]).unwrap();
    fs::write(dir.path().join("seg-00000000000000000009.log"), b"EAS").unwrap();
    fs::write(dir.path().join("acked"), b"nonsense").unwrap();
    fs::write(dir.path().join("unrelated.txt"), b"hi").unwrap();
    let mut s = Store::open_dir(dir.path(), LIMITS).unwrap();
    assert_eq!(s.append(b"ok", 0).unwrap(), 1);
    assert_eq!(s.read_after(0, 10).unwrap().len(), 1);
}

#[test]
fn a_second_opener_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let _s = Store::open_dir(dir.path(), LIMITS).unwrap();
    let e = Store::open_dir(dir.path(), LIMITS).err().expect("second open must fail");
    assert!(e.to_string().contains("in use by another edge-agent"), "{e}");
}

#[test]
fn routine_pressure_never_drops_priority_records() {
    use edge_agent::store::Lanes;
    let dir = tempfile::tempdir().unwrap();
    let priority = StoreLimits { max_bytes: 16 * 1024, segment_bytes: 4096, max_age_ms: 0, fsync_interval_ms: 0 };
    let mut lanes = Lanes::open(dir.path(), LIMITS, priority).unwrap();
    for i in 0..5 {
        lanes.priority.append(format!("alarm {i}").as_bytes(), 0).unwrap();
    }
    // Ten times the routine lane's budget.
    for i in 1..=2500 {
        lanes.routine.append(&payload(i), 0).unwrap();
    }
    assert!(lanes.routine.stats().dropped_total() > 0);
    assert_eq!(lanes.priority.stats().dropped_total(), 0);
    let alarms = lanes.priority.read_after(0, 100).unwrap();
    assert_eq!(alarms.len(), 5);
    assert_eq!(alarms[4].payload, b"alarm 4");
    assert!(dir.path().join("priority").is_dir());
}
