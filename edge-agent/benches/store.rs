//! Store benchmarks (issue 4). Prints a table; results go to BENCHMARKS.md.
//!
//!   cargo bench -p edge-agent --bench store
//!
//! Every number is compared with a baseline measured in the same run:
//! * bytes per sample: the blocks vs a naive encoding of the same samples
//!   (postcard of name, labels, timestamp, value per sample, as the first
//!   wire format did);
//! * append throughput: encode + append + fsync every second, vs appending
//!   the same number of pre-encoded bytes (the I/O floor);
//! * recovery of a full 64 MiB store vs reading its files;
//! * write amplification: bytes the process wrote (/proc/self/io wchar) per
//!   encoded byte.

use edge_agent::store::blocks::BlockWriter;
use edge_agent::store::{FileStore, StoreLimits};
use edge_agent::window::Window;
use edge_wire::Label;
use std::time::Instant;

/// Timestamps of the generated windows start here.
const T0: i64 = 1_700_000_000_000;

#[path = "common/mod.rs"]
mod common;
use common::{windows, Rng, SERIES, WINDOW_MS};

fn naive_bytes(w: &Window) -> usize {
    #[derive(serde::Serialize)]
    struct S<'a> {
        name: &'a str,
        labels: &'a [Label],
        ts: i64,
        value: f64,
    }
    w.samples
        .iter()
        .map(|(k, v)| {
            postcard::to_allocvec(&S { name: &k.name, labels: &k.labels, ts: w.timestamp_ms, value: *v })
                .map_or(0, |b| b.len())
        })
        .sum()
}

fn wchar() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("wchar: ").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(0)
}

fn row(what: &str, value: String, baseline: String, ratio: String, goal: &str) {
    println!("| {what} | {value} | {baseline} | {ratio} | {goal} |");
}

fn main() {
    let dir = std::env::var_os("BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let base = dir.join(format!("edge-store-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);

    println!("| measure | edge-agent | baseline (same run) | ratio | goal |");
    println!("|---|---|---|---|---|");

    // 1. Bytes per sample on disk: 360 windows (an hour at 10 s) in blocks.
    let ws = windows(2160, T0);
    let limits = StoreLimits { max_bytes: 1 << 30, segment_bytes: 4 << 20, max_age_ms: 0, fsync_interval_ms: 1000 };
    let d1 = base.join("size");
    let mut store = FileStore::open_dir(&d1, limits).unwrap();
    let mut writer = BlockWriter::new(360, 1 << 20);
    let w0 = wchar();
    let mut payload = 0u64;
    for w in &ws {
        let before = store.stats().bytes;
        writer.write(&mut store, w).unwrap();
        payload += store.stats().bytes - before;
    }
    store.sync().unwrap();
    let written = wchar() - w0;
    let samples = (ws.len() * SERIES) as f64;
    let disk = store.stats().bytes as f64;
    let naive: usize = ws.iter().map(naive_bytes).sum();
    row(
        "bytes per sample on disk (1,000 series, 6 h of 10 s windows, blocks of 360)",
        format!("{:.3} B", disk / samples),
        format!("{:.2} B naive", naive as f64 / samples),
        format!("{:.3}", disk / naive as f64),
        "≤ 1.5 B",
    );
    // Frames without the 28-byte record headers: what travels on the wire.
    let frames: u64 = store.read_after(0, usize::MAX).unwrap().iter().map(|r| r.payload.len() as u64).sum();
    row(
        "  vs (timestamp, value) pairs, the issue's naive 16 B",
        format!("{:.3} B", disk / samples),
        "16.00 B".into(),
        format!("{:.3}", disk / samples / 16.0),
        "-",
    );
    row(
        "  of which frame payload (= bytes on the wire)",
        format!("{:.3} B", frames as f64 / samples),
        "-".into(),
        format!("{:.3} of disk", frames as f64 / disk),
        "wire within 10 % of disk",
    );
    row(
        "write amplification (wchar / bytes stored)",
        format!("{:.3}", written as f64 / disk),
        format!("{:.3} vs frame bytes", written as f64 / frames as f64),
        "-".into(),
        "≤ 1.2",
    );
    let _ = payload;
    drop(store);

    // 2. Append throughput, fsync every second, one thread.
    let ws = windows(3000, T0);
    let d2 = base.join("speed");
    let mut store = FileStore::open_dir(&d2, StoreLimits { max_bytes: 256 << 20, ..limits }).unwrap();
    let mut writer = BlockWriter::new(360, 1 << 20);
    let t = Instant::now();
    for w in &ws {
        writer.write(&mut store, w).unwrap();
    }
    store.sync().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let rate = (ws.len() * SERIES) as f64 / secs;
    // Baseline: the same records, pre-encoded, appended with the same policy.
    let recs: Vec<Vec<u8>> = store.read_after(0, usize::MAX).unwrap().into_iter().map(|r| r.payload).collect();
    drop(store);
    let d3 = base.join("floor");
    let mut floor = FileStore::open_dir(&d3, StoreLimits { max_bytes: 256 << 20, ..limits }).unwrap();
    let t = Instant::now();
    for r in &recs {
        floor.append(r, 0).unwrap();
    }
    floor.sync().unwrap();
    let floor_secs = t.elapsed().as_secs_f64();
    row(
        "append throughput, encode + store, fsync every 1 s (samples/s, one core)",
        format!("{:.2} M/s", rate / 1e6),
        format!("{:.2} M/s appending pre-encoded frames", (ws.len() * SERIES) as f64 / floor_secs / 1e6),
        format!("{:.2}", secs / floor_secs),
        "≥ 1 M/s",
    );
    drop(floor);

    // 3. Recovery of a full 64 MiB store.
    let d4 = base.join("recovery");
    let full = StoreLimits { max_bytes: 64 << 20, segment_bytes: 4 << 20, max_age_ms: 0, fsync_interval_ms: 1000 };
    let mut store = FileStore::open_dir(&d4, full).unwrap();
    let mut writer = BlockWriter::new(360, 1 << 20);
    let big = windows(360, T0);
    let mut i = 0i64;
    while store.stats().bytes < (62 << 20) {
        for w in &big {
            let mut w = w.clone();
            w.timestamp_ms += i * 360 * WINDOW_MS;
            writer.write(&mut store, &w).unwrap();
        }
        i += 1;
    }
    store.sync().unwrap();
    let (bytes, records) = (store.stats().bytes, store.stats().last_seq - store.stats().first_seq + 1);
    drop(store);
    let t = Instant::now();
    let mut read = 0;
    for e in std::fs::read_dir(&d4).unwrap() {
        read += std::fs::read(e.unwrap().path()).map_or(0, |b| b.len());
    }
    let read_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let store = FileStore::open_dir(&d4, full).unwrap();
    let open_secs = t.elapsed().as_secs_f64();
    assert_eq!(store.stats().bytes, bytes);
    row(
        &format!("recovery (open) of a full store: {:.1} MiB, {records} records", bytes as f64 / 1048576.0),
        format!("{:.3} s", open_secs),
        format!("{:.3} s reading its {:.1} MiB", read_secs, read as f64 / 1048576.0),
        format!("{:.2}", open_secs / read_secs),
        "≤ 0.5 s",
    );
    drop(store);

    // 4. Loss window on power cut: a writer appending every 2 ms with an
    //    fsync interval of 100 ms on the simulated medium; power is cut at
    //    random moments; how much of the most recent data is gone?
    let mut losses = Vec::new();
    let mut rng = Rng(0xDEAD_BEEF);
    for _ in 0..30 {
        let sim = edge_agent::store::sim::SimMedium::new(rng.next());
        let l = StoreLimits { max_bytes: 64 << 20, segment_bytes: 1 << 20, max_age_ms: 0, fsync_interval_ms: 100 };
        let mut st = edge_agent::store::Store::open(sim.clone(), l).unwrap();
        let t0 = Instant::now();
        let run_ms = 300 + rng.next() % 400;
        let mut last = 0i64;
        while t0.elapsed().as_millis() < u128::from(run_ms) {
            last = t0.elapsed().as_millis() as i64;
            st.append(&[0u8; 200], last).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        drop(st);
        sim.power_cut();
        let st = edge_agent::store::Store::open(sim, l).unwrap();
        losses.push(last - st.stats().newest_ms);
    }
    losses.sort_unstable();
    row(
        "data lost on a power cut, fsync interval 100 ms (30 cuts at random moments)",
        format!("median {} ms, max {} ms", losses[losses.len() / 2], losses[losses.len() - 1]),
        "100 ms interval".into(),
        format!("{:.2} (max / interval)", losses[losses.len() - 1] as f64 / 100.0),
        "≤ the fsync interval",
    );

    // 5. Derived: days of 1,000 series at 10 s in 64 MiB.
    let per_day = 1000.0 * 8640.0 * disk / samples;
    row(
        "days of 1,000 series at 10 s that fit in 64 MiB (derived from row 1)",
        format!("{:.1} days", (64u64 << 20) as f64 / per_day),
        format!("{:.1} days naive", (64u64 << 20) as f64 / (1000.0 * 8640.0 * naive as f64 / samples)),
        "-".into(),
        "-",
    );
    let _ = std::fs::remove_dir_all(&base);
}
