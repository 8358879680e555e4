//! Disk full, for real: the store lives on a 512 KiB tmpfs while its byte
//! bound is 4 MiB, so the file system runs out first. The store must keep
//! accepting records by dropping its oldest segments (counted as
//! `disk_full`), stay readable, and recover on reopen.

use edge_agent::store::plan::DropReason;
use edge_agent::store::{FileStore, StoreLimits};
use std::ffi::CString;
use std::path::{Path, PathBuf};

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let why = "mounting a tmpfs needs root";
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("SKIPPED (not in CI): {why}");
            return None;
        }
        let dir = std::env::temp_dir().join(format!("edge-full-{}-{size}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = CString::new(dir.to_str().unwrap()).unwrap();
        let opts = CString::new(format!("size={size}")).unwrap();
        // SAFETY: valid C strings.
        let rc = unsafe { libc::mount(c"tmpfs".as_ptr(), target.as_ptr(), c"tmpfs".as_ptr(), 0, opts.as_ptr().cast()) };
        assert_eq!(rc, 0, "mount tmpfs: {}", std::io::Error::last_os_error());
        Some(Tmpfs(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = CString::new(self.0.to_str().unwrap()).unwrap();
        // SAFETY: valid C string.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_full_file_system_drops_oldest_and_keeps_going() {
    let Some(fs) = Tmpfs::mount("512k") else { return };
    let limits = StoreLimits { max_bytes: 4 << 20, segment_bytes: 64 << 10, max_age_ms: 0, fsync_interval_ms: 0 };
    let mut store = FileStore::open_dir(fs.path(), limits).unwrap();
    let payload = vec![0x5a; 1000];
    for i in 0..3000 {
        if let Err(e) = store.append(&payload, i) {
            panic!("append {i} failed on a full disk: {e}");
        }
    }
    let st = store.stats().clone();
    let full_idx = DropReason::ALL.iter().position(|r| *r == DropReason::DiskFull).unwrap();
    assert!(st.dropped_records[full_idx] > 0, "no disk_full drops: {st:?}");
    assert_eq!(st.dropped_records[full_idx], st.dropped_total(), "only disk_full drops expected");
    assert!(st.bytes < 512 << 10);
    assert_eq!(st.last_seq, 3000);
    let held = store.read_after(0, usize::MAX).unwrap();
    assert_eq!(held.len() as u64, st.last_seq - st.first_seq + 1);
    drop(store);
    let mut store = FileStore::open_dir(fs.path(), limits).unwrap();
    assert_eq!(store.stats().last_seq, 3000);
    assert_eq!(store.stats().corrupt_records + store.stats().truncated_bytes, 0);
    assert_eq!(store.append(&payload, 0).unwrap(), 3001);
}

/// On a full disk the send position cannot be written (its file is
/// replaced through a new one). It used to stay behind in memory too, so
/// records the bridge had confirmed were counted as dropped unsent and the
/// backlog stayed wrong. Now the confirmed position holds in memory, the
/// caller retries persisting, and it lands once there is room.
#[test]
fn a_confirmation_on_a_full_disk_counts_and_is_persisted_later() {
    let Some(fs) = Tmpfs::mount("256k") else { return };
    let limits = StoreLimits { max_bytes: 4 << 20, segment_bytes: 32 << 10, max_age_ms: 0, fsync_interval_ms: 0 };
    let mut store = FileStore::open_dir(fs.path(), limits).unwrap();
    let payload = vec![0x5a; 1000];
    for i in 0..100 {
        store.append(&payload, i).unwrap();
    }
    // Fill what is left, so that nothing more can be created.
    let filler = fs.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
    }
    let last = store.stats().last_seq;
    assert!(store.ack(last).is_err(), "the disk is full: persisting fails");
    assert_eq!(store.stats().acked_seq, last, "confirmed all the same");
    assert_eq!(store.stats().backlog(), 0);
    let unsent_before = store.stats().dropped_unsent_records;
    // New records on the full disk drop the oldest (confirmed) segments.
    let full_idx = DropReason::ALL.iter().position(|r| *r == DropReason::DiskFull).unwrap();
    let full_before = store.stats().dropped_records[full_idx];
    for i in 0..40 {
        store.append(&payload, 1000 + i).unwrap();
    }
    let st = store.stats().clone();
    assert!(st.dropped_records[full_idx] > full_before, "no disk_full drops: {st:?}");
    assert_eq!(st.dropped_unsent_records, unsent_before, "confirmed records counted as unsent: {st:?}");
    assert_eq!(st.backlog(), 40);
    // Room again: the retried ack persists, and a reopen resumes there.
    std::fs::remove_file(&filler).unwrap();
    store.ack(last).unwrap();
    drop(store);
    let store = FileStore::open_dir(fs.path(), limits).unwrap();
    assert_eq!(store.stats().acked_seq, last);
    assert_eq!(store.stats().backlog(), 40);
}
