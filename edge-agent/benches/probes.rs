//! Probe overhead benchmarks (issue 3). Prints a table; results go to
//! BENCHMARKS.md. Needs root (loads the eBPF programs).
//!
//!   cargo build --release --bins && cargo bench -p edge-agent --bench probes
//!
//! Every cost is a difference measured in the same run: the same workload
//! with the probes attached and detached (detached measured before and
//! after, to bracket drift).

mod measure;

use edge_agent::config::{Config, TcpLifecycleConfig};
use edge_agent::probe::tcp_lifecycle::TcpLifecycleProbe;
use edge_agent::probe::tracefs;
use measure::{agent_under_load, lifecycle, lifecycles, median, stream};
use std::io::Read;
use std::net::TcpListener;
use std::time::Instant;

const LIFECYCLES: usize = 20_000;
const READS: usize = 2_000_000;
const STREAM_MIB: usize = 256;

/// ns per read(2) of one byte from /dev/null (a syscall no probe watches).
fn reads(n: usize) -> f64 {
    let mut f = std::fs::File::open("/dev/null").unwrap();
    let mut b = [0u8; 1];
    let start = Instant::now();
    for _ in 0..n {
        let _ = f.read(&mut b).unwrap();
    }
    start.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("probes benchmark: needs root (eBPF); skipped");
        return;
    }
    // Run-time statistics on for the whole run, as the agent has them by
    // default (probes.program_stats): the per-program figures below.
    let _stats_on = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let root = tracefs::ensure_mounted().expect("tracefs");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let mut cfg = TcpLifecycleConfig::default();
    cfg.port_classes.insert("bench".into(), vec![port]);
    // RTT (tcp:tcp_probe) is off by default; measured both ways.
    let cfg_rtt = TcpLifecycleConfig { rtt: true, ..cfg.clone() };
    // Peer groups: the most the config allows (15 groups, 64 prefixes), and
    // the benchmark's own address in one of them, so that every connection
    // pays the trie lookups (connect and accept) and the per-peer counts.
    let mut cfg_peers = cfg.clone();
    for g in 0..15 {
        let list = (0..4).map(|i| format!("10.{g}.{i}.0/24")).collect();
        cfg_peers.peers.insert(format!("group{g:02}"), list);
    }
    cfg_peers.peers.get_mut("group00").unwrap()[0] = "127.0.0.1/32".into();

    // Warm up the TCP stack and the allocator.
    lifecycles(&l, 2000);
    let (mut off, mut on, mut r_off, mut r_on) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut s_off, mut s_on, mut u_off, mut u_on) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut d_on = Vec::new();
    let (mut p_on, mut prog_peers) = (Vec::new(), Vec::new());
    // An unwatched port: tcp_probe leaves after its two lookups.
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut prog = Vec::new();
    for _ in 0..3 {
        off.push(lifecycles(&l, LIFECYCLES));
        r_off.push(reads(READS));
        s_off.push(stream(&l, STREAM_MIB));
        u_off.push(stream(&other, STREAM_MIB));
        let probe = TcpLifecycleProbe::attach(&root, &cfg).expect("attach");
        let before = probe.program_stats();
        on.push(lifecycles(&l, LIFECYCLES));
        let after = probe.program_stats();
        r_on.push(reads(READS));
        d_on.push(stream(&l, STREAM_MIB));
        for (a, b) in after.iter().zip(&before) {
            prog.push((a.probe, a.runs - b.runs, a.run_ns - b.run_ns));
        }
        drop(probe);
        let probe = TcpLifecycleProbe::attach(&root, &cfg_peers).expect("attach with peers");
        let before = probe.program_stats();
        p_on.push(lifecycles(&l, LIFECYCLES));
        let after = probe.program_stats();
        for (a, b) in after.iter().zip(&before).filter(|(a, _)| a.probe == "tcp_lifecycle") {
            prog_peers.push((a.runs - b.runs, a.run_ns - b.run_ns));
        }
        drop(probe);
        let probe = TcpLifecycleProbe::attach(&root, &cfg_rtt).expect("attach with rtt");
        let before = probe.program_stats();
        s_on.push(stream(&l, STREAM_MIB));
        let after = probe.program_stats();
        u_on.push(stream(&other, STREAM_MIB));
        for (a, b) in after.iter().zip(&before).filter(|(a, _)| a.probe == "tcp_rtt") {
            prog.push((a.probe, a.runs - b.runs, a.run_ns - b.run_ns));
        }
        drop(probe);
    }
    off.push(lifecycles(&l, LIFECYCLES));
    r_off.push(reads(READS));
    s_off.push(stream(&l, STREAM_MIB));
    u_off.push(stream(&other, STREAM_MIB));
    let (off, on, r_off, r_on) = (median(off), median(on), median(r_off), median(r_on));
    let (s_off, s_on, u_off, u_on) = (median(s_off), median(s_on), median(u_off), median(u_on));
    let d_on = median(d_on);
    let p_on = median(p_on);

    println!("## Probe overhead ({LIFECYCLES} loopback TCP lifecycles and {READS} reads of /dev/null per run; medians of 3 runs attached, 4 detached)\n");
    println!("| workload | detached | attached | added | ratio |");
    println!("|---|---|---|---|---|");
    println!("| connect + accept + close, both ends (ns) | {off:.0} | {on:.0} | {:.0} | {:.3} |", on - off, on / off);
    println!(
        "| connect + accept + close, both ends, 15 peer groups, 64 prefixes, peer matched (ns) | {off:.0} | {p_on:.0} | {:.0} | {:.3} |",
        p_on - off,
        p_on / off
    );
    println!(
        "| read(2) of /dev/null, an unwatched syscall (ns) | {r_off:.1} | {r_on:.1} | {:.1} | {:.3} |",
        r_on - r_off,
        r_on / r_off
    );
    println!(
        "| stream over loopback, watched port, default probes (ns per MiB) | {s_off:.0} | {d_on:.0} | {:.0} | {:.3} |",
        d_on - s_off,
        d_on / s_off
    );
    println!(
        "| stream over loopback, watched port, with rtt (tcp_probe) (ns per MiB) | {s_off:.0} | {s_on:.0} | {:.0} | {:.3} |",
        s_on - s_off,
        s_on / s_off
    );
    println!(
        "| stream over loopback, unwatched port, with rtt (tcp_probe) (ns per MiB) | {u_off:.0} | {u_on:.0} | {:.0} | {:.3} |",
        u_on - u_off,
        u_on / u_off
    );
    println!("\n| program (kernel BPF statistics, attached runs) | runs per lifecycle | ns per run |");
    println!("|---|---|---|");
    for name in [
        "tcp_lifecycle",
        "tcp_retransmits",
        "tcp_synack_retransmits",
        "tcp_resets_received",
        "tcp_resets_sent",
        "tcp_rtt",
    ] {
        let (runs, ns): (u64, u64) =
            prog.iter().filter(|p| p.0 == name).fold((0, 0), |acc, p| (acc.0 + p.1, acc.1 + p.2));
        let per = if runs > 0 { format!("{:.0}", ns as f64 / runs as f64) } else { "-".into() };
        // tcp_rtt's runs were counted over the streams, not the lifecycles.
        let per_unit = if name == "tcp_rtt" {
            format!("{:.1} per MiB", runs as f64 / (3 * STREAM_MIB) as f64)
        } else {
            format!("{:.2}", runs as f64 / (3 * LIFECYCLES) as f64)
        };
        println!("| {name} | {per_unit} | {per} |");
    }

    let (runs, ns) = prog_peers.iter().fold((0, 0), |acc, p| (acc.0 + p.0, acc.1 + p.1));
    if runs > 0 {
        println!(
            "| tcp_lifecycle with peer groups | {:.2} | {:.0} |",
            runs as f64 / (3 * LIFECYCLES) as f64,
            ns as f64 / runs as f64
        );
    }

    // The agent itself (release binary), probes on, at 1,000 connections/s.
    let bin = std::env::current_exe().unwrap().parent().and_then(|d| d.parent()).unwrap().join("edge-agent");
    if !bin.exists() {
        println!("\n(agent CPU and RSS: build the release binaries first: cargo build --release --bins)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("agent.toml");
    let c = Config { state_dir: dir.path().join("state"), ..Default::default() };
    std::fs::write(
        &conf,
        format!(
            "state_dir = \"{}\"\n[window]\nmillis = 1000\n[mqtt]\nport = 1\n[mqtt.tls]\nenabled = false\n\
             [metrics]\nlisten = \"\"\n[probes.tcp_lifecycle.port_classes]\nbench = [{port}]\n",
            c.state_dir.display()
        ),
    )
    .unwrap();
    let secs = 10;
    let (cpu, rss) = agent_under_load(&bin, &conf, secs, || {
        for _ in 0..1000 {
            lifecycle(&l, port);
        }
    });
    println!("\n| agent (release), probes on, 1,000 TCP connections/s for {secs} s | value |");
    println!("|---|---|");
    println!("| CPU, % of one core | {cpu:.2} % |");
    println!("| resident memory | {:.1} MB |", rss as f64 / 1e6);
}
