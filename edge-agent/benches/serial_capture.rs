//! Kernel cost of the Modbus RTU byte capture (docs/process-values.md):
//! the device probe's read/write programs with a watched device whose bytes
//! are captured, against the same device watched without capture, in one
//! run. Needs root. Prints a table; results go to BENCHMARKS.md.
//!
//!   cargo bench -p edge-agent --bench serial_capture
//!
//! Watched device: /dev/zero, read in 8-byte calls (an RTU request's size)
//! and 256-byte calls (a long reply); unrelated calls: 8-byte reads of
//! /dev/null (not watched). Kernel BPF statistics (time inside the
//! programs); the ring is drained between batches.

mod measure;

use edge_agent::config::DevicesConfig;
use edge_agent::probe::device_io::DeviceIoProbe;
use edge_agent::probe::tracefs;
use measure::median;
use std::io::Read;

const READS: usize = 200_000;
const ROUNDS: usize = 5;

fn reads(f: &mut std::fs::File, size: usize, n: usize, mut between: impl FnMut()) {
    let mut b = vec![0u8; size];
    for i in 0..n {
        let _ = f.read(&mut b).unwrap();
        if i % 200 == 0 {
            between();
        }
    }
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("serial_capture benchmark: needs root (eBPF); skipped");
        return;
    }
    let _stats_on = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let root = tracefs::ensure_mounted().expect("tracefs");
    let zero = DevicesConfig { watch: vec!["/dev/zero".into()], ..Default::default() };
    // (state, workload) -> ns per call inside the programs.
    let workloads =
        ["/dev/zero, 8 B reads (watched)", "/dev/zero, 256 B reads (watched)", "/dev/null, 8 B reads (unrelated)"];
    let mut per_call = vec![vec![Vec::new(); workloads.len()]; 2];
    let mut bytes = 0u64;
    for _ in 0..ROUNDS {
        for (s, capture) in [false, true].into_iter().enumerate() {
            let globs: Vec<String> = if capture { vec!["/dev/zero".into()] } else { vec![] };
            let p = std::cell::RefCell::new(DeviceIoProbe::load_capturing(&root, &zero, &globs).expect("load"));
            let mut z = std::fs::File::open("/dev/zero").unwrap();
            let mut null = std::fs::File::open("/dev/null").unwrap();
            for (w, size) in [8usize, 256, 8].into_iter().enumerate() {
                let file = if w < 2 { &mut z } else { &mut null };
                let before = p.borrow().program_stats().unwrap();
                reads(file, size, READS, || p.borrow_mut().drain_bytes(|e| bytes += e.data.len() as u64));
                let after = p.borrow().program_stats().unwrap();
                per_call[s][w].push((after.run_ns - before.run_ns) as f64 / READS as f64);
            }
            p.borrow_mut().drain_bytes(|e| bytes += e.data.len() as u64);
            let r = p.borrow().read().unwrap();
            assert_eq!((r.bytes_lost, r.bytes_cut), (0, 0), "no event lost or cut");
        }
    }
    assert_eq!(bytes, (ROUNDS * READS * (8 + 256)) as u64, "every watched byte captured once");
    println!(
        "## Serial byte capture in the kernel ({READS} calls per workload, medians of {ROUNDS} runs; BPF statistics)\n"
    );
    println!("| workload | ns per call in the programs, watched | with capture | added | ratio |");
    println!("|---|---|---|---|---|");
    for (w, name) in workloads.iter().enumerate() {
        let (off, on) = (median(per_call[0][w].clone()), median(per_call[1][w].clone()));
        println!("| {name} | {off:.0} | {on:.0} | {:+.0} | {:.2} |", on - off, on / off.max(1.0));
    }
}
