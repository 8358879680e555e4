//! Crash test: a child process appends to a store on real files as fast as
//! it can (group commit every 2 ms) and prints every sequence number it has
//! made durable; the parent SIGKILLs it at a random moment, reopens the
//! store, and checks that every record the child reported durable is there
//! and intact and that nothing corrupt is ever read back. 200 rounds on the
//! same store, so recovery runs on the debris of every earlier crash.

use edge_agent::store::{FileStore, StoreLimits};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMITS: StoreLimits =
    StoreLimits { max_bytes: 4 << 20, segment_bytes: 256 << 10, max_age_ms: 0, fsync_interval_ms: 2 };
const CHILD_ENV: &str = "EDGE_STORE_CRASH_CHILD";

/// Deterministic payload of record `seq`: its length and bytes vary.
fn payload(seq: u64) -> Vec<u8> {
    let len = 16 + (seq.wrapping_mul(2654435761) % 700) as usize;
    (0..len).map(|i| (seq as usize).wrapping_mul(131).wrapping_add(i) as u8).collect()
}

/// The child: append until killed. Payloads are keyed by sequence number,
/// so the parent can check any record without being told its contents.
fn child(dir: &Path) {
    let mut store = FileStore::open_dir(dir, LIMITS).expect("child open");
    let mut reported = store.stats().durable_seq;
    loop {
        let next = store.stats().last_seq.max(store.stats().acked_seq) + 1;
        let seq = store.append(&payload(next), 0).expect("append");
        assert_eq!(seq, next);
        let durable = store.stats().durable_seq;
        if durable > reported {
            println!("{durable}");
            reported = durable;
        }
    }
}

#[test]
fn sigkill_at_random_moments_never_loses_a_durable_record() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
    let mut rounds_with_cut_tail = 0;
    let mut rounds_with_durable = 0;
    for round in 0..200 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "sigkill_at_random_moments_never_loses_a_durable_record",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut max = 0u64;
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = line.trim().parse::<u64>() {
                    max = max.max(v);
                }
            }
            max
        });
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Let it start and write for 10..50 ms, then kill it mid-flight.
        let deadline = Instant::now() + Duration::from_millis(10 + rng % 40);
        while Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let _ = child.wait();
        let reported_durable = reader.join().unwrap();
        if reported_durable > 0 {
            rounds_with_durable += 1;
        }

        let mut store = FileStore::open_dir(dir.path(), LIMITS).expect("reopen after SIGKILL");
        let st = store.stats().clone();
        if st.truncated_bytes > 0 {
            rounds_with_cut_tail += 1;
        }
        assert!(st.last_seq >= reported_durable, "round {round}: durable {reported_durable} but store ends at {st:?}");
        let records = store.read_after(0, usize::MAX).unwrap();
        if st.last_seq == 0 {
            // Killed before its first append: nothing reported, nothing held.
            assert_eq!((reported_durable, records.len()), (0, 0), "round {round}");
            continue;
        }
        assert_eq!(store.stats().corrupt_records, 0, "round {round}: corrupt record read back");
        let mut expect = st.first_seq;
        for r in &records {
            assert_eq!(r.seq, expect, "round {round}: gap before {}", r.seq);
            assert_eq!(r.payload, payload(r.seq), "round {round}: record {} differs", r.seq);
            expect += 1;
        }
        assert_eq!(expect - 1, st.last_seq);
    }
    // Most rounds must have got as far as durable writes, or the test
    // proved nothing (a child that cannot start, say).
    assert!(rounds_with_durable >= 50, "only {rounds_with_durable} of 200 rounds made anything durable");
    eprintln!(
        "200 rounds, {rounds_with_durable} with durable records; {rounds_with_cut_tail} recoveries cut a torn tail"
    );
}
