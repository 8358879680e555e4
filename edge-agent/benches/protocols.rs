//! Protocol probe overhead (issue 3). Prints a table; results go to
//! BENCHMARKS.md. Needs root (loads the eBPF programs).
//!
//!   cargo bench -p edge-agent --bench protocols
//!
//! Every cost is a difference measured in the same run, states in turn and
//! repeated (medians):
//! - detached: no program on the cgroup root but what the system has;
//! - empty: two cgroup_skb programs that only let the packet pass, the
//!   floor of any program on this hook;
//! - attached: the protocol probe, one port configured as Modbus/TCP, and
//!   the TCP probe's default port classes (TCP payload bytes counted).
//!
//! Workloads, all on loopback over connections opened once: a Modbus/TCP
//! request/reply (12-byte read-holding-registers request, 11-byte reply)
//! on the watched port and the same bytes on an unwatched port, one round
//! trip at a time; a bulk stream on the unwatched port; and connection
//! lifecycles (connect, accept, close) to the unwatched port.

mod measure;

use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
use edge_agent::config::{ProtocolsConfig, TcpLifecycleConfig};
use edge_agent::probe::protocols::{cgroup2_root, ProtocolsProbe};
use edge_agent::probe::tcp_lifecycle::PortClasses;
use measure::{lifecycles, median, stream};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

static EMPTY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/empty.bpf.o"));

const ROUND_TRIPS: usize = 40_000;
const LIFECYCLES: usize = 5_000;
const STREAM_MIB: usize = 128;
const ROUNDS: usize = 5;

/// A Modbus/TCP responder: every 12-byte request gets an 11-byte reply
/// with the same transaction id.
fn responder() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { return };
            s.set_nodelay(true).unwrap();
            std::thread::spawn(move || {
                let mut req = [0u8; 12];
                while s.read_exact(&mut req).is_ok() {
                    let reply = [req[0], req[1], 0, 0, 0, 5, req[6], 3, 2, 0, 42];
                    if s.write_all(&reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

fn client(port: u16) -> TcpStream {
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_nodelay(true).unwrap();
    c
}

/// ns per request/reply round trip.
fn round_trips(c: &mut TcpStream, n: usize) -> f64 {
    let mut reply = [0u8; 11];
    let start = Instant::now();
    for i in 0..n {
        let tid = (i as u16).to_be_bytes();
        c.write_all(&[tid[0], tid[1], 0, 0, 0, 6, 1, 3, 0, 0, 0, 1]).unwrap();
        c.read_exact(&mut reply).unwrap();
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

/// Runs and run time (ns) of the empty programs so far.
fn empty_stats(e: &aya::Ebpf) -> (u64, u64) {
    ["empty_skb_ingress", "empty_skb_egress"]
        .iter()
        .filter_map(|n| <&CgroupSkb>::try_from(e.program(n)?).ok()?.info().ok())
        .fold((0, 0), |(r, t), i| (r + i.run_count(), t + i.run_time().as_nanos() as u64))
}

fn empty_programs(cgroup: &std::path::Path) -> aya::Ebpf {
    let mut e = aya::Ebpf::load(EMPTY).expect("load empty programs");
    let dir = std::fs::File::open(cgroup).unwrap();
    for (prog, t) in
        [("empty_skb_ingress", CgroupSkbAttachType::Ingress), ("empty_skb_egress", CgroupSkbAttachType::Egress)]
    {
        let p: &mut CgroupSkb = e.program_mut(prog).unwrap().try_into().unwrap();
        p.load().unwrap();
        p.attach(&dir, t, CgroupAttachMode::Single).unwrap();
    }
    e
}

#[derive(Default)]
struct Runs {
    watched: Vec<f64>,
    unwatched: Vec<f64>,
    stream: Vec<f64>,
    lifecycle: Vec<f64>,
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("protocols benchmark: needs root (eBPF); skipped");
        return;
    }
    let cgroup = cgroup2_root().expect("cgroup v2");
    // The kernel's run-time statistics, on for the whole run (every state
    // pays their two clock reads per program run alike).
    let _stats_on = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let (watched_port, unwatched_port) = (responder(), responder());
    let cfg = ProtocolsConfig { modbus_ports: vec![watched_port], ..Default::default() };
    // As in the agent by default: the TCP probe's classes, so TCP payload
    // bytes are counted too (on every packet).
    let classes = PortClasses::from_config(&TcpLifecycleConfig::default());
    let (mut w, mut u) = (client(watched_port), client(unwatched_port));
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink = TcpListener::bind("127.0.0.1:0").unwrap(); // the stream's unwatched port

    let measure = |runs: &mut Runs, w: &mut TcpStream, u: &mut TcpStream| {
        runs.watched.push(round_trips(w, ROUND_TRIPS));
        runs.unwatched.push(round_trips(u, ROUND_TRIPS));
        runs.stream.push(stream(&sink, STREAM_MIB));
        runs.lifecycle.push(lifecycles(&l, LIFECYCLES));
    };
    let (mut detached, mut empty, mut attached) = (Runs::default(), Runs::default(), Runs::default());
    // Kernel BPF statistics (runs, ns): the probe over the watched round
    // trips, over everything unwatched; the empty programs over everything.
    let (mut prog, mut unwatched_prog, mut floor) = ((0u64, 0u64), (0u64, 0u64), (0u64, 0u64));
    round_trips(&mut w, ROUND_TRIPS); // warm up
    for _ in 0..ROUNDS {
        measure(&mut detached, &mut w, &mut u);

        let e = empty_programs(&cgroup);
        let before = empty_stats(&e);
        measure(&mut empty, &mut w, &mut u);
        let after = empty_stats(&e);
        floor.0 += after.0 - before.0;
        floor.1 += after.1 - before.1;
        drop(e);

        let p = ProtocolsProbe::attach(&cfg, Some(&classes), &Default::default()).expect("attach");
        let before = p.program_stats()[0].clone();
        attached.watched.push(round_trips(&mut w, ROUND_TRIPS));
        let after = p.program_stats()[0].clone();
        prog.0 += after.runs - before.runs;
        prog.1 += after.run_ns - before.run_ns;
        attached.unwatched.push(round_trips(&mut u, ROUND_TRIPS));
        attached.stream.push(stream(&sink, STREAM_MIB));
        attached.lifecycle.push(lifecycles(&l, LIFECYCLES));
        let end = p.program_stats()[0].clone();
        unwatched_prog.0 += end.runs - after.runs;
        unwatched_prog.1 += end.run_ns - after.run_ns;
        let r = p.read().unwrap();
        let replies: u64 = r.modbus.iter().filter(|s| s.function == 3).map(|s| s.buckets.iter().sum::<u64>()).sum();
        assert_eq!(replies, 2 * ROUND_TRIPS as u64, "every exchange timed on both sides");
        drop(p);
    }
    measure(&mut detached, &mut w, &mut u);

    println!(
        "## Protocol probe overhead (loopback; medians of {ROUNDS} runs, detached {}; {ROUND_TRIPS} round trips, \
         {STREAM_MIB} MiB, {LIFECYCLES} lifecycles per run)\n",
        ROUNDS + 1
    );
    // Wall clock: these loopback workloads wait on thread wake-ups, whose
    // spread on a shared 2-core VM is larger than the programs' cost; the
    // kernel's own statistics below measure the programs exactly.
    println!("| workload (wall clock) | detached | empty programs (floor) | probe attached | attached / detached |");
    println!("|---|---|---|---|---|");
    let row = |what: &str, unit: &str, d: Vec<f64>, e: Vec<f64>, a: Vec<f64>| {
        let (d, e, a) = (median(d), median(e), median(a));
        println!("| {what} | {d:.0} {unit} | {e:.0} {unit} | {a:.0} {unit} | {:.3} |", a / d);
    };
    row(
        "Modbus request/reply, watched port (ns per round trip)",
        "ns",
        detached.watched,
        empty.watched,
        attached.watched,
    );
    row(
        "same bytes, unwatched port (ns per round trip)",
        "ns",
        detached.unwatched,
        empty.unwatched,
        attached.unwatched,
    );
    row("bulk stream, unwatched port (ns per MiB)", "ns", detached.stream, empty.stream, attached.stream);
    row("connect + accept + close (ns)", "ns", detached.lifecycle, empty.lifecycle, attached.lifecycle);
    let per_run = |(runs, ns): (u64, u64)| ns as f64 / runs.max(1) as f64;
    println!("\n| kernel BPF statistics (run time inside the programs) | runs | ns per run |");
    println!("|---|---|---|");
    println!("| empty programs, all workloads (floor) | {} | {:.0} |", floor.0, per_run(floor));
    println!(
        "| probe, unwatched workloads (packets of other ports) | {} | {:.0} ({:.2}x the floor) |",
        unwatched_prog.0,
        per_run(unwatched_prog),
        per_run(unwatched_prog) / per_run(floor)
    );
    println!(
        "| probe, watched round trips ({:.2} runs per round trip) | {} | {:.0} (+{:.0} ns per Modbus exchange) |",
        prog.0 as f64 / (ROUNDS * ROUND_TRIPS) as f64,
        prog.0,
        per_run(prog),
        prog.1 as f64 / (ROUNDS * ROUND_TRIPS) as f64
    );
}
