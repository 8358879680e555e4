//! End-to-end drain benchmark (issue 5): a device's full backlog, from its
//! store through TLS mosquitto and fleet-bridge into Prometheus, against a
//! direct remote-write load of the same samples into the same Prometheus in
//! the same run. Prints a table; results go to BENCHMARKS.md.
//!
//!   cargo build --release --bins && cargo bench -p edge-agent --bench drain
//!
//! Needs root and the tools of the end-to-end tests (scripts/setup.sh).

#[path = "common/mod.rs"]
mod common;

use common::{windows, SERIES, WINDOW_MS};
use e2e::{Agent, AgentSetup, Who};
use edge_agent::config::Config;
use edge_agent::store::Lanes;
use fleet_bridge::remote_write::{self, WriteRequest};
use std::time::{Duration, Instant};

/// Windows of backlog: 10 hours of 1,000 series at 10 s.
const WINDOWS: usize = 3600;
/// Windows per block (the store's default block_max_windows).
const BLOCK: usize = 360;
/// Concurrent requests of the direct load.
const SENDERS: usize = 2;

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is 3rd.
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 here.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz
}

struct Cpu<'a>(Vec<(&'a str, i32, f64)>);

impl<'a> Cpu<'a> {
    fn start(procs: &[(&'a str, i32)]) -> Self {
        Cpu(procs.iter().map(|(n, p)| (*n, *p, cpu_secs(*p))).collect())
    }

    fn used(&self) -> Vec<(&'a str, f64)> {
        self.0.iter().map(|(n, p, s)| (*n, cpu_secs(*p) - s)).collect()
    }
}

fn direct_load(prom: &e2e::Prom, t0: i64) -> (usize, f64, Vec<(&'static str, f64)>) {
    // Requests like the bridge's: one block (360 windows) of every series,
    // encoded before the clock starts.
    let ws = windows(WINDOWS, t0);
    let mut bodies = Vec::new();
    let mut samples = 0;
    for chunk in ws.chunks(BLOCK) {
        let mut enc = edge_wire::BlockEncoder::new();
        let frames: Vec<Vec<u8>> = chunk.iter().map(|w| enc.frame(w.timestamp_ms, &w.samples).unwrap()).collect();
        let batch = edge_wire::block::decode_block(frames.iter().map(Vec::as_slice)).unwrap();
        let req = WriteRequest { timeseries: remote_write::to_timeseries("direct", &batch) };
        samples += batch.sample_count();
        bodies.push(remote_write::encode(&req));
    }
    let url = prom.write_url();
    let cpu = Cpu::start(&[("prometheus", prom.proc.pid())]);
    let start = Instant::now();
    e2e::post_all(&url, &bodies, SENDERS, &remote_write::HEADERS);
    (samples, start.elapsed().as_secs_f64(), cpu.used())
}

struct Drain {
    samples: usize,
    secs: f64,
    cpu: Vec<(&'static str, f64)>,
    store_bytes: u64,
    wire_bytes: f64,
    in_prom: Option<f64>,
}

/// One device's full backlog through the pipeline, with a bridge writing
/// `concurrency` requests at once.
fn drain(dir: &std::path::Path, broker: &e2e::Broker, prom: &e2e::Prom, t0: i64, concurrency: usize) -> Drain {
    let device = format!("drain-c{concurrency}");
    let ddir = dir.join(&device);
    std::fs::create_dir_all(&ddir).unwrap();
    let cfg = Config { device_id: device.clone(), state_dir: ddir.join("agent-state"), ..Default::default() };
    let (store_bytes, samples) = {
        let mut lanes = Lanes::open(&cfg.store_dir(), cfg.store_limits(), cfg.priority_limits()).unwrap();
        let mut writer = cfg.block_writer();
        let mut n = 0;
        for w in windows(WINDOWS, t0) {
            n += w.samples.len();
            writer.write(&mut lanes.routine, &w).unwrap();
        }
        lanes.routine.sync().unwrap();
        (lanes.routine.stats().bytes, n)
    };
    let rw = format!("concurrency = {concurrency}");
    let (mut bridge, metrics) =
        e2e::bridge_full(dir, broker, &prom.write_url(), &format!("bridge-c{concurrency}"), "", &rw);
    let before = e2e::scrape(metrics, "fleet_bridge_samples_written_total").unwrap().unwrap_or(0.0);
    let procs = [
        ("mosquitto", broker.proc.as_ref().map_or(0, |p| p.pid())),
        ("fleet-bridge", bridge.pid()),
        ("prometheus", prom.proc.pid()),
    ];
    let cpu = Cpu::start(&procs);
    let start = Instant::now();
    let setup = AgentSetup {
        broker: Some(broker),
        identity: Some(Who::Device(&device)),
        window_ms: 10_000,
        ..AgentSetup::offline(&device, "[probes.tcp_lifecycle]\nenabled = false\n")
    };
    let mut agent = Agent::launch(&ddir, &setup);
    let agent_cpu0 = cpu_secs(agent.proc.pid());
    e2e::wait_for("the whole backlog written", Duration::from_secs(600), || {
        bridge.assert_running();
        agent.proc.assert_running();
        let w = e2e::scrape(metrics, "fleet_bridge_samples_written_total").ok().flatten().unwrap_or(0.0);
        if w - before >= samples as f64 {
            Ok(())
        } else {
            Err(w)
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let mut used = cpu.used();
    used.insert(0, ("edge-agent", cpu_secs(agent.proc.pid()) - agent_cpu0));
    let wire_bytes = ["backlog", "live"]
        .iter()
        .map(|s| agent.metric(&format!("edge_agent_uplink_published_bytes_total{{stream=\"{s}\"}}")).unwrap_or(0.0))
        .sum();
    // Only the generated series (not presence or the agent's own telemetry).
    let q = format!("sum(count_over_time({{device=\"{device}\",__name__=~\"edge_dev_.*|edge_tcp_.*\"}}[12h]))");
    let in_prom = prom.scalar(&q).ok().flatten();
    // Stop this bridge before the next run: its subscription would take the
    // next device's messages too.
    bridge.stop();
    Drain { samples, secs, cpu: used, store_bytes, wire_bytes, in_prom }
}

fn main() {
    if !e2e::require_root_and_tools() {
        return;
    }
    let dir = e2e::tempdir("bench-drain");
    let broker = e2e::Broker::start(&dir);
    let prom = e2e::Prom::start(&dir);
    let t0 = (e2e::now_ms() / 1000 - (WINDOWS as i64 + 60) * WINDOW_MS / 1000) * 1000;

    let (direct_samples, direct_secs, direct_cpu) = direct_load(&prom, t0);
    let runs = [1, 2].map(|c| (c, drain(&dir, &broker, &prom, t0, c)));

    let direct_rate = direct_samples as f64 / direct_secs;
    println!(
        "## End-to-end drain: {} samples per run ({SERIES} series x {WINDOWS} windows, blocks of {BLOCK})\n",
        direct_samples
    );
    println!("| path | seconds | samples/s | vs direct |");
    println!("|---|---|---|---|");
    println!("| direct remote write ({SENDERS} senders, {BLOCK} samples/series/request) | {direct_secs:.2} | {direct_rate:.0} | 1.00 |");
    for (c, r) in &runs {
        let rate = r.samples as f64 / r.secs;
        println!(
            "| store -> MQTT (TLS) -> bridge (concurrency {c}) -> remote write | {:.2} | {rate:.0} | {:.2} |",
            r.secs,
            rate / direct_rate
        );
    }
    println!("\n| process | CPU s, direct load | CPU s, drain c=1 | CPU s, drain c=2 | share of drain CPU, c=2 |");
    println!("|---|---|---|---|---|");
    let total: f64 = runs[1].1.cpu.iter().map(|x| x.1).sum();
    for (i, (name, s2)) in runs[1].1.cpu.iter().enumerate() {
        let direct = direct_cpu.iter().find(|x| x.0 == *name).map_or("-".to_string(), |x| format!("{:.2}", x.1));
        let s1 = runs[0].1.cpu[i].1;
        println!("| {name} | {direct} | {s1:.2} | {s2:.2} | {:.0} % |", 100.0 * s2 / total.max(1e-9));
    }
    for (c, r) in &runs {
        println!(
            "\nconcurrency {c}: bytes per sample: store {:.3}, wire (MQTT payloads) {:.3}, wire/store {:.3}; \
             samples in Prometheus {:?} of {}",
            r.store_bytes as f64 / r.samples as f64,
            r.wire_bytes / r.samples as f64,
            r.wire_bytes / r.store_bytes as f64,
            r.in_prom,
            r.samples
        );
    }
}
