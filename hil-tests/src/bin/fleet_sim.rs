//! The fleet simulator: `fleet_sim run [options]` starts the central side
//! (mosquitto with the shipped config, fleet bridges, Prometheus or
//! VictoriaMetrics), makes a certificate per device, runs the devices in a
//! few host processes (`fleet_sim devices SPEC`, each device the agent's
//! own store and uplink) through a scenario, and reports per device what
//! was stored and what landed, lag percentiles, backlog drain times and
//! each process's CPU and memory. docs/scaling.md.

use clap::{Parser, Subcommand};
use e2e::nats::NatsCluster;
use e2e::{Broker, Proc, Prom, Who};
use hil_tests::fleet::host::{self, write_json};
use hil_tests::fleet::report::{self, DeviceResult, HostStatus, Percentiles, ProcessUse, Report};
use hil_tests::fleet::{self, DeviceSpec, Group, HostSpec, Scenario};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(name = "fleet_sim", about = "Simulated devices (the agent's store and uplink) against the real central side")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runs a scenario end to end and prints its report.
    Run(Box<RunArgs>),
    /// A host process of devices (started by `run`).
    Devices { spec: PathBuf },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Series per window (the agent's own health series come on top).
    #[arg(long, default_value_t = 200)]
    series: usize,
    #[arg(long, default_value_t = 10_000)]
    window_ms: i64,
    /// How long devices make windows.
    #[arg(long, default_value_t = 120)]
    live_secs: u64,
    /// After that, how long to wait for every device to drain at most.
    #[arg(long, default_value_t = 600)]
    drain_secs: u64,
    /// live, storm or churn.
    #[arg(long, default_value = "live")]
    scenario: Scenario,
    /// Storm: devices that reconnect with a backlog (default: all).
    #[arg(long)]
    backlog_devices: Option<usize>,
    /// Storm: how long they were cut off.
    #[arg(long, default_value_t = 1.0)]
    backlog_hours: f64,
    /// Host processes (default: one per 250 devices).
    #[arg(long)]
    hosts: Option<usize>,
    /// Bridges (a share group when more than one; on NATS they share the
    /// JetStream consumer).
    #[arg(long, default_value_t = 1)]
    bridges: usize,
    /// mosquitto (configs/mosquitto, one broker) or nats (a three-node
    /// cluster with configs/nats; devices spread over the nodes, bridges
    /// pulling from JetStream).
    #[arg(long, default_value = "mosquitto")]
    broker: String,
    /// More `[jetstream]` keys for the bridges on NATS (TOML lines).
    #[arg(long, default_value = "")]
    jetstream: String,
    /// SIGKILL the first NATS node this many seconds after the start...
    #[arg(long)]
    kill_node_at: Option<f64>,
    /// ...and start it again this many seconds later.
    #[arg(long, default_value_t = 5.0)]
    node_down_secs: f64,
    /// SIGKILL the first bridge this many seconds after the start (it stays
    /// down: the others carry on).
    #[arg(long)]
    kill_bridge_at: Option<f64>,
    /// prometheus or victoria-metrics.
    #[arg(long, default_value = "prometheus")]
    tsdb: String,
    /// More `[remote_write]` keys for the bridges (TOML lines).
    #[arg(long, default_value = "")]
    remote_write: String,
    /// Where the central side's files and logs go (default: a new temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where the devices' stores go (default: a new dir on /dev/shm: the
    /// boxes' flash is not what is measured).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The report as JSON here too.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Windows per block on the devices (`[store] block_max_windows`;
    /// default the agent's): 1 makes a backlog many small blocks.
    #[arg(long)]
    block_windows: Option<u64>,
    /// After the run, write the backlog's number of samples straight into
    /// the store, in requests of the bridges' shape (`batch_max_samples`
    /// one-sample series each, `concurrency` at once), and compare.
    #[arg(long)]
    direct: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Devices { spec } => {
            edge_agent::init_logging("FLEET_SIM_LOG");
            let text = std::fs::read_to_string(&spec).unwrap_or_else(|e| panic!("{}: {e}", spec.display()));
            let spec: HostSpec = serde_json::from_str(&text).expect("host spec");
            match host::run(spec) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("fleet_sim devices: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Run(args) => {
            let report = run(&args);
            println!("{}", report.table());
            if let Some(out) = &args.out {
                std::fs::write(out, serde_json::to_vec_pretty(&report).expect("json")).expect("report file");
            }
            if report.exact_devices == report.devices && report.not_drained == 0 {
                ExitCode::SUCCESS
            } else {
                eprintln!("fleet_sim: not every device's data landed exactly: {:?}", report.inexact);
                ExitCode::FAILURE
            }
        }
    }
}

/// A process whose CPU and memory go into the report.
struct Watched {
    name: String,
    pid: i32,
    cpu_at_start: Option<f64>,
    last: Option<(f64, f64)>,
}

fn run(a: &RunArgs) -> Report {
    host::raise_open_files();
    let wall = Instant::now();
    let dir = a.dir.clone().unwrap_or_else(|| e2e::tempdir("fleet-sim"));
    std::fs::create_dir_all(&dir).expect("run dir");
    let state = a
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/dev/shm/fleet-sim-{}-{}", std::process::id(), fleet::now_ms())));
    std::fs::create_dir_all(&state).expect("state dir");
    let run_dir = dir.join("run");
    std::fs::create_dir_all(&run_dir).expect("run dir");

    let ids: Vec<String> = (0..a.devices).map(fleet::device_id).collect();
    let mut central = match a.broker.as_str() {
        "mosquitto" => {
            let broker = Broker::start(&dir);
            e2e::device_certs(&broker.pki, &ids);
            Central::Mosquitto(broker)
        }
        "nats" => Central::Nats(NatsCluster::start(&dir, &ids)),
        other => panic!("--broker {other:?}: mosquitto or nats"),
    };
    let tsdb = match a.tsdb.as_str() {
        "prometheus" => Prom::start(&dir),
        "victoria-metrics" => Prom::start_victoria(&dir),
        other => panic!("--tsdb {other:?}: prometheus or victoria-metrics"),
    };
    let mut bridges: Vec<(Proc, u16)> = (0..a.bridges)
        .map(|b| {
            let id = format!("fleet-bridge-{b}");
            match &central {
                Central::Mosquitto(broker) => {
                    let mqtt = if a.bridges > 1 { "share_group = \"fleet\"\n" } else { "" };
                    e2e::bridge_logged(&dir, broker, &tsdb.write_url(), &id, mqtt, &a.remote_write, "info")
                }
                Central::Nats(cluster) => {
                    e2e::bridge_on_nats(&dir, cluster, &tsdb.write_url(), &id, &a.jetstream, &a.remote_write, "info")
                }
            }
        })
        .collect();

    let backlog_devices = a.backlog_devices.unwrap_or(a.devices).min(a.devices);
    let backfill = ((a.backlog_hours * 3_600_000.0) / a.window_ms as f64).round() as u64;
    let live_ms = a.live_secs as i64 * 1000;
    let hosts = a.hosts.unwrap_or(a.devices.div_ceil(250)).clamp(1, a.devices.max(1));
    let mut specs: Vec<HostSpec> = (0..hosts)
        .map(|h| HostSpec {
            run_dir: run_dir.display().to_string(),
            host: h,
            window_ms: a.window_ms,
            series: a.series,
            live_ms,
            drain_ms: a.drain_secs as i64 * 1000,
            devices: Vec::new(),
        })
        .collect();
    for (k, id) in ids.iter().enumerate() {
        let (group, plan) = fleet::plan(a.scenario, k, backlog_devices, live_ms, a.window_ms);
        let config = state.join(format!("{id}.toml"));
        std::fs::write(&config, device_config(&central, k, id, &state.join(id), a.window_ms, a.block_windows))
            .expect("device config");
        specs[k % hosts].devices.push(DeviceSpec {
            id: id.clone(),
            seed: k as u64 + 1,
            config: config.display().to_string(),
            backfill: if group == Group::Backlog { backfill } else { 0 },
            group,
            plan,
        });
    }
    let exe = std::env::current_exe().expect("own path");
    let mut host_procs: Vec<Proc> = specs
        .iter()
        .map(|s| {
            let file = run_dir.join(format!("spec-{}.json", s.host));
            write_json(&file, s).expect("host spec");
            Proc::spawn(
                &format!("host-{}", s.host),
                &dir,
                &exe,
                &["devices".into(), file.display().to_string()],
                &[("FLEET_SIM_LOG", &std::env::var("FLEET_SIM_LOG").unwrap_or_else(|_| "warn".into()))],
            )
        })
        .collect();
    e2e::wait_for("every host to open its devices", Duration::from_secs(900), || {
        for p in &mut host_procs {
            p.assert_running();
        }
        let ready = (0..hosts).filter(|&h| host::ready_file(&run_dir, h).exists()).count();
        if ready == hosts {
            Ok(())
        } else {
            Err(format!("{ready}/{hosts} ready"))
        }
    });

    let mut watched: Vec<Watched> = central
        .processes()
        .into_iter()
        .chain([(a.tsdb.clone(), tsdb.proc.pid())])
        .chain(bridges.iter().enumerate().map(|(b, (p, _))| (format!("bridge-{b}"), p.pid())))
        .chain(host_procs.iter().enumerate().map(|(h, p)| (format!("host-{h}"), p.pid())))
        .map(|(name, pid)| Watched { name, pid, cpu_at_start: None, last: None })
        .collect();
    for w in &mut watched {
        w.cpu_at_start = report::process_use(w.pid).map(|u| u.0);
    }
    let start = fleet::now_ms() + 500;
    std::fs::write(host::start_file(&run_dir), start.to_string()).expect("start file");
    let bridge_at_start: f64 = bridges.iter().map(|b| scrape_sum(b.1, "fleet_bridge_samples_written_total")).sum();
    let blocks_at_start: f64 = bridges.iter().map(|b| scrape_sum(b.1, WRITTEN_BLOCKS)).sum();
    let copies_at_start: f64 = bridges.iter().map(|b| scrape_sum(b.1, COPIES)).sum();
    let requests_at_start: f64 =
        bridges.iter().map(|b| scrape_sum(b.1, "fleet_bridge_remote_write_requests_total")).sum();

    // Until every host reported: sample the processes, say progress.
    let deadline = Instant::now() + Duration::from_secs(a.live_secs + a.drain_secs + 120);
    let mut said = Instant::now();
    let mut faults: Vec<String> = Vec::new();
    let (mut node_killed, mut bridge_killed) = (false, false);
    let mut node_down: Option<Instant> = None;
    let since_start = || (fleet::now_ms() - start) as f64 / 1000.0;
    loop {
        let t = since_start();
        if let (Some(at), Central::Nats(cluster)) = (a.kill_node_at, &mut central) {
            if t >= at && !node_killed {
                node_killed = true;
                cluster.kill(0);
                node_down = Some(Instant::now());
                faults.push(format!("node {} killed (SIGKILL) at {t:.1} s", cluster.nodes[0].name));
            }
            if node_down.is_some_and(|d| d.elapsed().as_secs_f64() >= a.node_down_secs) {
                node_down = None;
                cluster.restart(0);
                faults.push(format!("node {} started again at {:.1} s", cluster.nodes[0].name, since_start()));
            }
        }
        if let Some(at) = a.kill_bridge_at {
            if t >= at && !bridge_killed {
                bridge_killed = true;
                bridges[0].0.kill();
                faults.push(format!("bridge 0 killed (SIGKILL) at {t:.1} s, left down"));
            }
        }
        for w in &mut watched {
            if let Some(u) = report::process_use(w.pid) {
                w.last = Some(u);
            }
        }
        let done = (0..hosts).filter(|&h| host::report_file(&run_dir, h).exists()).count();
        if done == hosts {
            break;
        }
        for (h, p) in host_procs.iter_mut().enumerate() {
            if let Some(status) = p.exited() {
                if !host::report_file(&run_dir, h).exists() {
                    panic!("host {h} ended ({status}) without a report:\n{}", p.log_text());
                }
            }
        }
        assert!(Instant::now() < deadline, "hosts did not finish in time");
        if said.elapsed() > Duration::from_secs(10) {
            said = Instant::now();
            let s: Vec<HostStatus> = (0..hosts)
                .filter_map(|h| std::fs::read(host::status_file(&run_dir, h)).ok())
                .filter_map(|b| serde_json::from_slice(&b).ok())
                .collect();
            eprintln!(
                "fleet_sim: t={} s connected {} windows {} backlog {} unconfirmed {}",
                s.iter().map(|s| s.t_ms).max().unwrap_or(0) / 1000,
                s.iter().map(|s| s.connected).sum::<usize>(),
                s.iter().map(|s| s.windows).sum::<u64>(),
                s.iter().map(|s| s.backlog).sum::<u64>(),
                s.iter().map(|s| s.unconfirmed).sum::<u64>(),
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let run_secs = (fleet::now_ms() - start) as f64 / 1000.0;
    let bridge_samples =
        bridges.iter().map(|b| scrape_sum(b.1, "fleet_bridge_samples_written_total")).sum::<f64>() - bridge_at_start;
    let bridge_requests =
        bridges.iter().map(|b| scrape_sum(b.1, "fleet_bridge_remote_write_requests_total")).sum::<f64>()
            - requests_at_start;
    let bridge_blocks = bridges.iter().map(|b| scrape_sum(b.1, WRITTEN_BLOCKS)).sum::<f64>() - blocks_at_start;
    let bridge_copies = bridges.iter().map(|b| scrape_sum(b.1, COPIES)).sum::<f64>() - copies_at_start;
    let results: Vec<DeviceResult> = (0..hosts)
        .flat_map(|h| {
            let bytes = std::fs::read(host::report_file(&run_dir, h)).expect("host report");
            serde_json::from_slice::<Vec<DeviceResult>>(&bytes).expect("host report json")
        })
        .collect();
    for p in &mut host_procs {
        p.stop();
    }
    let landed = count_landed(&tsdb, &results);

    let direct = a.direct.then(|| {
        let backlog: usize = results.iter().map(|r| (r.backlog_windows as usize) * a.series).sum();
        let per_request = parse_key(&a.remote_write, "batch_max_samples").unwrap_or(10_000);
        let senders = parse_key(&a.remote_write, "concurrency").unwrap_or(2);
        let (n, secs, cpu) =
            hil_tests::fleet::direct::load(&tsdb, backlog.max(100_000), per_request, senders, a.series);
        (n as f64 / secs, cpu / secs * 100.0)
    });
    let mut inexact = Vec::new();
    for (r, &l) in results.iter().zip(&landed) {
        if r.samples != l {
            inexact.push((r.id.clone(), r.samples, l));
        }
    }
    let lags = |steady: bool| -> Vec<f64> {
        results
            .iter()
            .filter(|r| (r.group == Group::Steady) == steady)
            .flat_map(|r| r.lags_ms.iter().map(|&l| l as f64 / 1000.0))
            .collect()
    };
    let mut steady = lags(true);
    let mut windows: Vec<f64> = steady.iter().map(|s| s * 1000.0 / a.window_ms as f64).collect();
    let backlogged: Vec<&DeviceResult> = results.iter().filter(|r| r.group == Group::Backlog).collect();
    let mut drained: Vec<f64> =
        backlogged.iter().filter_map(|r| r.drained_after_ms).map(|t| t as f64 / 1000.0).collect();
    let processes = watched
        .iter()
        .filter_map(|w| {
            let (cpu, rss) = w.last?;
            let used = cpu - w.cpu_at_start.unwrap_or(0.0);
            Some(ProcessUse {
                name: w.name.clone(),
                cpu_pct: 100.0 * used / run_secs,
                cpu_secs: used,
                peak_rss_mib: rss,
            })
        })
        .collect();
    let report = Report {
        scenario: format!("{:?}", a.scenario).to_lowercase(),
        devices: a.devices,
        series: a.series,
        window_ms: a.window_ms,
        live_secs: a.live_secs as f64,
        hosts,
        bridges: a.bridges,
        tsdb: a.tsdb.clone(),
        broker: a.broker.clone(),
        faults,
        exact_devices: results.len() - inexact.len(),
        samples_stored: results.iter().map(|r| r.samples).sum(),
        samples_landed: landed.iter().sum(),
        inexact,
        lag_steady_s: Percentiles::of(&mut steady),
        lag_steady_windows: Percentiles::of(&mut windows),
        lag_other_s: Percentiles::of(&mut lags(false)),
        unconfirmed_windows: results.iter().map(|r| r.unconfirmed).sum(),
        late_windows: results.iter().map(|r| r.late_windows).sum(),
        resends: results.iter().map(|r| r.resends).sum(),
        resending_devices: results.iter().filter(|r| r.resends > 0).count(),
        bridge_copies,
        backlog_devices: backlogged.len(),
        backlog_windows_each: backlogged.first().map_or(0, |r| r.backlog_windows),
        not_drained: backlogged.iter().filter(|r| r.drained_after_ms.is_none()).count()
            + results.iter().filter(|r| r.backlog > 0).count(),
        drained_s: Percentiles::of(&mut drained),
        bridge_samples,
        bridge_samples_per_s: bridge_samples / run_secs,
        bridge_requests,
        bridge_blocks,
        backlog_blocks_per_device: if backlogged.is_empty() {
            0.0
        } else {
            let live: u64 = results.iter().map(|r| r.windows - r.backlog_windows).sum();
            (bridge_blocks - live as f64).max(0.0) / backlogged.len() as f64
        },
        backlog_samples_per_s: {
            let last = backlogged.iter().filter_map(|r| r.drained_after_ms).max().unwrap_or(0);
            let samples: u64 = backlogged.iter().map(|r| r.backlog_windows * a.series as u64).sum();
            if last > 0 {
                samples as f64 * 1000.0 / last as f64
            } else {
                0.0
            }
        },
        direct_samples_per_s: direct.map_or(0.0, |d| d.0),
        direct_store_cpu_pct: direct.map_or(0.0, |d| d.1),
        wall_secs: wall.elapsed().as_secs_f64(),
        processes,
    };
    drop(bridges);
    drop(tsdb);
    drop(central);
    if a.state_dir.is_none() {
        let _ = std::fs::remove_dir_all(&state);
    }
    report
}

/// The broker side the devices connect to.
enum Central {
    Mosquitto(Broker),
    /// Device k connects to node k % 3.
    Nats(NatsCluster),
}

impl Central {
    /// (name, pid) of its processes, for the report.
    fn processes(&self) -> Vec<(String, i32)> {
        match self {
            Central::Mosquitto(b) => vec![("mosquitto".into(), b.proc.as_ref().map_or(0, Proc::pid))],
            Central::Nats(c) => {
                c.nodes.iter().map(|n| (n.name.clone(), n.proc.as_ref().map_or(0, Proc::pid))).collect()
            }
        }
    }

    /// Device `k`'s `[mqtt]` keys and tables.
    fn device_toml(&self, k: usize, id: &str) -> String {
        match self {
            Central::Mosquitto(b) => b.client_toml(Who::Device(id)),
            Central::Nats(c) => c.device_toml(k, id),
        }
    }
}

/// A device's agent config: its identity, its state directory, the
/// window; everything else the agent's defaults.
fn device_config(
    central: &Central,
    k: usize,
    id: &str,
    state: &Path,
    window_ms: i64,
    block_windows: Option<u64>,
) -> String {
    format!(
        "device_id = \"{id}\"\nstate_dir = \"{}\"\nrun_as = \"\"\n[window]\nmillis = {window_ms}\n[mqtt]\n{}\
         [metrics]\nlisten = \"\"\n{}",
        state.display(),
        central.device_toml(k, id),
        block_windows.map_or(String::new(), |n| format!("[store]\nblock_max_windows = {n}\n")),
    )
}

/// A number key of the `--remote-write` TOML lines.
fn parse_key(toml_lines: &str, key: &str) -> Option<usize> {
    toml_lines.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Device blocks a bridge wrote whole.
const WRITTEN_BLOCKS: &str = "fleet_bridge_messages_total{result=\"written\"}";
/// Copies of blocks a bridge spotted (batch::Recent).
const COPIES: &str = "fleet_bridge_messages_total{result=\"copy\"}";

/// The sum of every series of `metric` a bridge exports.
fn scrape_sum(port: u16, metric: &str) -> f64 {
    let Ok(mut r) = ureq::get(&format!("http://127.0.0.1:{port}/metrics")).call() else { return 0.0 };
    let text = r.body_mut().read_to_string().unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(metric) && (metric.ends_with('}') || l[metric.len()..].starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Samples of `sim_*` series that landed, per device (in `results`'
/// order), counted by the store's own query API.
fn count_landed(tsdb: &Prom, results: &[DeviceResult]) -> Vec<u64> {
    let first = results.iter().filter(|r| r.windows > 0).map(|r| r.first_ms).min().unwrap_or(0);
    let range_s = ((fleet::now_ms() - first) / 1000 + 120).max(60);
    let give_up = Instant::now() + Duration::from_secs(60);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let counts: Vec<std::sync::atomic::AtomicU64> = results.iter().map(|_| Default::default()).collect();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let k = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(r) = results.get(k) else { break };
                let q = format!("sum(count_over_time({{__name__=~\"sim_.+\",device=\"{}\"}}[{range_s}s]))", r.id);
                // What was written last may take a moment to be searchable
                // (VictoriaMetrics flushes its in-memory part every few
                // seconds): counted again until it matches, or a minute
                // after the hosts ended.
                let n = loop {
                    let n =
                        e2e::wait_for(&format!("the count of {}", r.id), Duration::from_secs(60), || tsdb.scalar(&q))
                            .unwrap_or(0.0) as u64;
                    if n >= r.samples || Instant::now() > give_up {
                        break n;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                };
                counts[k].store(n, std::sync::atomic::Ordering::Relaxed);
            });
        }
    });
    counts.into_iter().map(|c| c.into_inner()).collect()
}
