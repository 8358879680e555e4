//! Device-file probe overhead (issue 3). Prints tables; results go to
//! BENCHMARKS.md. Needs root (loads the eBPF programs).
//!
//!   cargo build --release --bins && cargo bench -p edge-agent --bench devices
//!
//! Every cost is a difference measured in the same run, states in turn and
//! repeated (medians):
//! - detached: no program anywhere;
//! - waiting: the probe loaded, no watched device present (no hook);
//! - empty: two programs that do nothing on sys_enter_read and
//!   sys_exit_read, the floor of any hook on these calls;
//! - attached: the probe with a watched device present, all hooks on.
//!
//! The unrelated call is read(2) of one byte from /dev/null; the watched one
//! is read(2) of one byte from /dev/zero with /dev/zero watched.
//!
//! The kernel's BPF run-time statistics are off (`probes.program_stats =
//! false`); `EDGE_BENCH_STATS=1` turns them on for the whole run, to
//! measure what they cost and to print the per-run figures.

mod measure;

use aya::programs::TracePoint;
use edge_agent::config::DevicesConfig;
use edge_agent::probe::device_io::DeviceIoProbe;
use edge_agent::probe::tracefs;
use measure::{agent_under_load, lifecycle, median};
use std::io::Read;
use std::net::TcpListener;
use std::time::Instant;

static EMPTY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/empty.bpf.o"));

const READS: usize = 2_000_000;
const ROUNDS: usize = 5;

/// ns per read(2) of one byte from `f`.
fn reads(f: &mut std::fs::File, n: usize) -> f64 {
    let mut b = [0u8; 1];
    let start = Instant::now();
    for _ in 0..n {
        let _ = f.read(&mut b).unwrap();
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn empty_hooks() -> aya::Ebpf {
    let mut e = aya::Ebpf::load(EMPTY).expect("load empty programs");
    for (prog, event) in [("empty_enter", "sys_enter_read"), ("empty_exit", "sys_exit_read")] {
        let p: &mut TracePoint = e.program_mut(prog).unwrap().try_into().unwrap();
        p.load().unwrap();
        p.attach("syscalls", event).unwrap();
    }
    e
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("devices benchmark: needs root (eBPF); skipped");
        return;
    }
    let stats = std::env::var_os("EDGE_BENCH_STATS").is_some();
    let _stats_on = stats.then(|| aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS"));
    let root = tracefs::ensure_mounted().expect("tracefs");
    let dir = tempfile::tempdir().unwrap();
    let nothing =
        DevicesConfig { watch: vec![dir.path().join("ttyNONE*").display().to_string()], ..Default::default() };
    let zero = DevicesConfig { watch: vec!["/dev/zero".into()], ..Default::default() };
    let mut null = std::fs::File::open("/dev/null").unwrap();

    let (mut detached, mut waiting, mut empty, mut attached) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut z_off, mut z_on) = (Vec::new(), Vec::new());
    let mut prog = (0u64, 0u64);
    reads(&mut null, READS); // warm up
    for _ in 0..ROUNDS {
        detached.push(reads(&mut null, READS));
        let mut z = std::fs::File::open("/dev/zero").unwrap();
        z_off.push(reads(&mut z, READS));
        drop(z);

        let p = DeviceIoProbe::load(&root, &nothing).expect("load");
        assert!(matches!(p.state, edge_agent::probe::ProbeState::Waiting(_)));
        waiting.push(reads(&mut null, READS));
        drop(p);

        let e = empty_hooks();
        empty.push(reads(&mut null, READS));
        drop(e);

        let p = DeviceIoProbe::load(&root, &zero).expect("load");
        assert_eq!(p.state, edge_agent::probe::ProbeState::Attached);
        attached.push(reads(&mut null, READS));
        // Opened after the hooks attached: the open hook registers it.
        let mut z = std::fs::File::open("/dev/zero").unwrap();
        let before = p.program_stats().unwrap();
        z_on.push(reads(&mut z, READS));
        let after = p.program_stats().unwrap();
        prog.0 += after.runs - before.runs;
        prog.1 += after.run_ns - before.run_ns;
        let r = p.read().unwrap();
        let counted: u64 = r.series.iter().filter(|s| s.process.starts_with("devices")).map(|s| s.ops).sum();
        assert!(counted >= READS as u64, "the watched reads were counted ({counted})");
        drop(z);
        drop(p);
    }
    detached.push(reads(&mut null, READS));
    let (d, w, e, a) = (median(detached), median(waiting), median(empty), median(attached));
    let (zo, zn) = (median(z_off), median(z_on));

    println!(
        "## Device probe overhead ({READS} one-byte reads per run; medians of {ROUNDS} runs, detached {})\n",
        ROUNDS + 1
    );
    println!("| workload | ns per call | added over detached (ns) | ratio |");
    println!("|---|---|---|---|");
    println!("| read(2) /dev/null, detached | {d:.1} | - | 1.000 |");
    println!("| read(2) /dev/null, probe waiting (no watched device) | {w:.1} | {:.1} | {:.3} |", w - d, w / d);
    println!(
        "| read(2) /dev/null, empty programs on sys_enter/exit_read (floor) | {e:.1} | {:.1} | {:.3} |",
        e - d,
        e / d
    );
    println!("| read(2) /dev/null, probe attached (unrelated call) | {a:.1} | {:.1} | {:.3} |", a - d, a / d);
    println!("| read(2) /dev/zero, detached | {zo:.1} | - | 1.000 |");
    println!("| read(2) /dev/zero, watched (one device operation) | {zn:.1} | {:.1} | {:.3} |", zn - zo, zn / zo);
    println!("\nUnrelated call, probe's added cost / empty programs' added cost: {:.2}", (a - d) / (e - d).max(0.1));
    if stats {
        println!(
            "Kernel BPF statistics over the watched reads: {:.2} runs per operation, {:.0} ns per run",
            prog.0 as f64 / (ROUNDS * READS) as f64,
            prog.1 as f64 / prog.0.max(1) as f64
        );
    } else {
        println!("(BPF run-time statistics off; EDGE_BENCH_STATS=1 turns them on)");
    }

    // The agent itself (release binary): 1,000 TCP connections/s and 10,000
    // watched device operations/s.
    let bin = std::env::current_exe().unwrap().parent().and_then(|d| d.parent()).unwrap().join("edge-agent");
    if !bin.exists() {
        println!("\n(agent CPU and RSS: build the release binaries first: cargo build --release --bins)");
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let conf = dir.path().join("agent.toml");
    std::fs::write(
        &conf,
        format!(
            "state_dir = \"{}\"\n[window]\nmillis = 1000\n[mqtt]\nport = 1\n[mqtt.tls]\nenabled = false\n\
             [metrics]\nlisten = \"\"\n[probes.tcp_lifecycle.port_classes]\nbench = [{port}]\n\
             [probes.devices]\nwatch = [\"/dev/zero\"]\n",
            dir.path().join("state").display()
        ),
    )
    .unwrap();
    let mut z = std::fs::File::open("/dev/zero").unwrap();
    let mut b = [0u8; 16];
    let secs = 10;
    let (cpu, rss) = agent_under_load(&bin, &conf, secs, || {
        for i in 0..1000 {
            lifecycle(&l, port);
            if i % 100 == 0 {
                for _ in 0..1000 {
                    z.read_exact(&mut b).unwrap();
                }
            }
        }
    });
    println!("\n| agent (release), 1,000 TCP connections/s + 10,000 watched device reads/s for {secs} s | value |");
    println!("|---|---|");
    println!("| CPU, % of one core | {cpu:.2} % |");
    println!("| resident memory | {:.1} MB |", rss as f64 / 1e6);
}
