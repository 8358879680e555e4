//! Kernel cost of the Modbus/TCP value capture (docs/process-values.md).
//! Needs root. Prints a table; results go to BENCHMARKS.md.
//!
//!   cargo bench -p edge-agent --bench value_capture
//!
//! In one run, states in turn, repeated (kernel BPF statistics: the time
//! inside the programs, summed over ingress and egress):
//! - empty: two cgroup_skb programs that only let the packet pass (the
//!   floor of any program on this hook);
//! - probe: the protocol probe, no tag map (what every agent ran before);
//! - filtered: a tag map on other addresses: each request looks its range
//!   up in the tag filter and is not captured;
//! - captured: a tag map with 3 of the 16 registers read: each reply is
//!   copied into the ring with the 13 others zeroed (the agent's side
//!   drains the ring meanwhile).
//!
//! Workload, on loopback over one connection each: a pump-like poll, read
//! input registers 0..16 (12-byte request, 41-byte reply), one round trip
//! at a time, on the Modbus port; and the same bytes on an unwatched port
//! (packets the probe only rejects).

mod measure;

use aya::programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType};
use edge_agent::config::ProtocolsConfig;
use edge_agent::probe::protocols::{cgroup2_root, ProtocolsProbe};
use edge_agent::values::tags::{Context, TagConfig, TagMap};
use measure::median;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

static EMPTY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/empty.bpf.o"));

const ROUND_TRIPS: usize = 20_000;
const ROUNDS: usize = 5;

/// Answers every read of 16 input registers.
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
                    let mut reply = vec![req[0], req[1], 0, 0, 0, 35, req[6], 4, 32];
                    for i in 0..16u16 {
                        reply.extend_from_slice(&(1000 + i).to_be_bytes());
                    }
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

fn round_trips(c: &mut TcpStream, n: usize, mut between: impl FnMut()) {
    let mut reply = [0u8; 41];
    for i in 0..n {
        let tid = (i as u16).to_be_bytes();
        c.write_all(&[tid[0], tid[1], 0, 0, 0, 6, 1, 4, 0, 0, 0, 16]).unwrap();
        c.read_exact(&mut reply).unwrap();
        if i % 200 == 0 {
            between();
        }
    }
}

fn tags(port: u16, addresses: &[u16]) -> TagMap {
    let tags: Vec<TagConfig> = addresses
        .iter()
        .map(|a| {
            toml::from_str(&format!(
                "name = \"t{a}\"\nsource = \"modbus_tcp\"\nport = {port}\ntable = \"input\"\naddress = {a}\n"
            ))
            .unwrap()
        })
        .collect();
    TagMap::build(&tags, &Context { modbus_ports: &[port], peers: &Default::default() }).unwrap()
}

/// (runs, ns) of a set of cgroup_skb programs so far.
fn stats<'a>(progs: impl Iterator<Item = Option<&'a aya::programs::Program>>) -> (u64, u64) {
    progs
        .filter_map(|p| <&CgroupSkb>::try_from(p?).ok()?.info().ok())
        .fold((0, 0), |(r, t), i| (r + i.run_count(), t + i.run_time().as_nanos() as u64))
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("value_capture benchmark: needs root (eBPF); skipped");
        return;
    }
    let cgroup = cgroup2_root().expect("cgroup v2");
    let _stats_on = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let (watched, unwatched) = (responder(), responder());
    let cfg = ProtocolsConfig { modbus_ports: vec![watched], ..Default::default() };
    let (mut w, mut u) = (client(watched), client(unwatched));
    round_trips(&mut w, 2000, || {});
    let states =
        ["empty programs (floor)", "probe, no tag map", "tag map elsewhere (filtered)", "3 of 16 registers captured"];
    // Per state: ns per watched exchange, ns per unwatched packet run.
    let mut per_exchange: Vec<Vec<f64>> = vec![Vec::new(); states.len()];
    let mut per_unwatched: Vec<Vec<f64>> = vec![Vec::new(); states.len()];
    let mut events = 0u64;
    for _ in 0..ROUNDS {
        for (s, _) in states.iter().enumerate() {
            let names = match s {
                0 => ["empty_skb_ingress", "empty_skb_egress"],
                _ => ["ipp_ingress", "ipp_egress"],
            };
            let (mut empty, mut probe) = (None, None);
            match s {
                0 => {
                    let mut e = aya::Ebpf::load(EMPTY).expect("load empty programs");
                    let dir = std::fs::File::open(&cgroup).unwrap();
                    for (prog, t) in [(names[0], CgroupSkbAttachType::Ingress), (names[1], CgroupSkbAttachType::Egress)]
                    {
                        let p: &mut CgroupSkb = e.program_mut(prog).unwrap().try_into().unwrap();
                        p.load().unwrap();
                        p.attach(&dir, t, CgroupAttachMode::Single).unwrap();
                    }
                    empty = Some(e);
                }
                1 => probe = Some(ProtocolsProbe::attach(&cfg, None, &TagMap::default()).unwrap()),
                2 => probe = Some(ProtocolsProbe::attach(&cfg, None, &tags(watched, &[1000, 1001, 1010])).unwrap()),
                _ => probe = Some(ProtocolsProbe::attach(&cfg, None, &tags(watched, &[1, 5, 9])).unwrap()),
            }
            let read = |empty: &Option<aya::Ebpf>, probe: &Option<ProtocolsProbe>| match (empty, probe) {
                (Some(e), _) => stats(names.iter().map(|n| e.program(n))),
                (_, Some(p)) => p.program_stats().first().map_or((0, 0), |s| (s.runs, s.run_ns)),
                _ => (0, 0),
            };
            let a = read(&empty, &probe);
            let probe_cell = std::cell::RefCell::new(probe);
            round_trips(&mut w, ROUND_TRIPS, || {
                if let Some(p) = probe_cell.borrow_mut().as_mut() {
                    p.drain_values(|_| events += 1);
                }
            });
            let probe = probe_cell.into_inner();
            let b = read(&empty, &probe);
            round_trips(&mut u, ROUND_TRIPS, || {});
            let c = read(&empty, &probe);
            if let Some(mut p) = probe {
                p.drain_values(|_| events += 1);
                assert_eq!(p.read().unwrap().values_lost, 0, "no event lost");
            }
            per_exchange[s].push((b.1 - a.1) as f64 / ROUND_TRIPS as f64);
            per_unwatched[s].push((c.1 - b.1) as f64 / (c.0 - b.0).max(1) as f64);
        }
    }
    assert_eq!(events, (ROUNDS * ROUND_TRIPS) as u64, "one event per reply (the tags' side: the client's socket)");
    println!(
        "## Value capture in the kernel (loopback; medians of {ROUNDS} runs of {ROUND_TRIPS} polls of 16 input \
         registers; kernel BPF statistics)\n"
    );
    println!("| state | ns per Modbus exchange (4 packets, both ends) | ratio to no tag map | ns per unwatched packet | ratio to the floor |");
    println!("|---|---|---|---|---|");
    let base = median(per_exchange[1].clone());
    let floor = median(per_unwatched[0].clone());
    for (s, name) in states.iter().enumerate() {
        let (x, un) = (median(per_exchange[s].clone()), median(per_unwatched[s].clone()));
        println!("| {name} | {x:.0} | {:.2} | {un:.0} | {:.2} |", x / base, un / floor);
    }
}
