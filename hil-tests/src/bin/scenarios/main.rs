//! The scenario runner: a factory box's normal activity and labelled faults
//! (hil-tests/src/workload.rs), generated for real on this machine while
//! the agent watches it with its probes, offline.
//!
//! ```text
//! scenarios record --minutes M --out DIR [--window-ms MS] [--seed N]
//! ```
//! Normal activity only, for `model/`: writes DIR/features.csv (the
//! agent's `store export --format features`) and DIR/run.json.
//!
//! ```text
//! scenarios evaluate --model CARD --out DIR [--rounds R] [--fault-windows F]
//!                    [--gap-windows G] [--normal-minutes N] [--window-ms MS] [--seed N]
//! ```
//! The agent with the model: R rounds of every fault class (each on for F
//! windows, then G windows of normal activity), then N minutes of normal
//! activity only. Writes DIR/labels.csv (what was injected when),
//! DIR/features.csv, DIR/samples.csv (the agent's own scores and alarms)
//! and DIR/report.md: per fault, detected by the agent's alarm or not and
//! after how many windows; window-level F1 of the score against the
//! threshold; false alarms in the normal-only time, per 24 hours.
//!
//! ```text
//! scenarios tail --out DIR --model CARD [--window-ms MS]
//! ```
//! The false-alarm rate extrapolated from the tail of the scores in
//! DIR/samples.csv (a normal-only `evaluate` run): DIR/tail.md.
//!
//! ```text
//! scenarios pump-record --minutes M --out DIR [--window-ms MS] [--hz H] [--seed N]
//! scenarios pump-evaluate --model CARD --out DIR [--faults A,B,..] [--rounds R]
//!     [--fault-windows F] [--gap-windows G] [--normal-minutes N] [--window-ms MS] [--hz H] [--seed N]
//! ```
//! The same on the simulated pump (pump.rs): its PLC polled at H Hz (10 by
//! default), the agent capturing its tags; the pump's process faults (all
//! six by default). `pump-evaluate` also writes labels.csv with the time
//! the process had recovered, and a report with per-fault delays at the
//! stop and warn levels and point-wise F1, FAR and MAR. `pump-report`
//! writes a finished run's report again (the same options).
//!
//! Runs as root (probes, port 502, nftables); `tail` does not.

mod pump;

use hil_tests::evaluation::Scored;
use hil_tests::workload;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: scenarios record --minutes M --out DIR [--window-ms MS] [--seed N] [--agent PATH]\n       \
     scenarios tail --out DIR --model CARD [--window-ms MS]\n       \
     scenarios evaluate --model CARD --out DIR [--rounds R] [--fault-windows F] [--gap-windows G] \
     [--normal-minutes N] [--window-ms MS] [--seed N] [--agent PATH]\n       \
     scenarios pump-record --minutes M --out DIR [--window-ms MS] [--hz H] [--seed N] [--agent PATH]\n       \
     scenarios pump-evaluate --model CARD --out DIR [--faults A,B,..] [--rounds R] [--fault-windows F] \
     [--gap-windows G] [--normal-minutes N] [--window-ms MS] [--hz H] [--seed N] [--agent PATH]\n       \
     scenarios pump-report --model CARD --out DIR   (the run's options from its run.json)";

#[derive(Clone)]
struct Args {
    command: String,
    minutes: f64,
    out: PathBuf,
    window_ms: u64,
    seed: u64,
    agent: PathBuf,
    model: Option<PathBuf>,
    rounds: u32,
    fault_windows: u32,
    gap_windows: u32,
    normal_minutes: f64,
    /// Pump runs: the HMI's polls per second.
    hz: f64,
    /// Pump runs: the fault classes injected (default: all).
    faults: Vec<String>,
}

fn default_args() -> Args {
    let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_default();
    Args {
        command: String::new(),
        minutes: 10.0,
        out: PathBuf::new(),
        window_ms: 10_000,
        seed: 1,
        agent: exe_dir.join("edge-agent"),
        model: None,
        rounds: 1,
        fault_windows: 6,
        gap_windows: 9,
        normal_minutes: 10.0,
        hz: 10.0,
        faults: Vec::new(),
    }
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let command = it.next().ok_or("no command")?;
    let mut a = Args { command, ..default_args() };
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        let num = |s: String| s.parse::<f64>().map_err(|_| format!("{k}: not a number: {s:?}"));
        match k.as_str() {
            "--minutes" => a.minutes = num(v()?)?,
            "--out" => a.out = PathBuf::from(v()?),
            "--window-ms" => a.window_ms = num(v()?)? as u64,
            "--seed" => a.seed = num(v()?)? as u64,
            "--agent" => a.agent = PathBuf::from(v()?),
            "--model" => a.model = Some(PathBuf::from(v()?)),
            "--rounds" => a.rounds = num(v()?)? as u32,
            "--fault-windows" => a.fault_windows = num(v()?)? as u32,
            "--gap-windows" => a.gap_windows = num(v()?)? as u32,
            "--normal-minutes" => a.normal_minutes = num(v()?)?,
            "--hz" => a.hz = num(v()?)?,
            "--faults" => a.faults = v()?.split(',').map(str::to_owned).collect(),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if a.out.as_os_str().is_empty() {
        return Err("--out DIR is required".into());
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("scenarios: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let r = match args.command.as_str() {
        "record" => record(&args),
        "evaluate" => evaluate(&args),
        "tail" => tail(&args),
        "pump-record" => pump::record(&args),
        "pump-evaluate" => pump::evaluate(&args),
        "pump-report" => pump::rewrite_report(&args),
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scenarios: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The agent, started on the runner's config with the sensor's link watched.
struct Agent {
    proc: e2e::Proc,
    state: PathBuf,
    config: PathBuf,
    bin: PathBuf,
    metrics_port: u16,
}

impl Agent {
    /// The workload box's agent: the sensor's link watched.
    fn start(args: &Args, dir: &Path, sensor: &Path, detect: &str) -> Result<Agent, String> {
        let sensor = sensor.display().to_string();
        Agent::start_with(
            args,
            dir,
            "agent.toml",
            &[("@SENSOR@", &sensor), ("@DETECT@", detect)],
            &["tcp_lifecycle", "device_io"],
        )
    }

    /// The agent on hil-tests/scenarios/`template` with `values` filled in,
    /// once its `probes` are attached (and the model loaded, if any).
    fn start_with(
        args: &Args,
        dir: &Path,
        template: &str,
        values: &[(&str, &str)],
        probes: &[&str],
    ) -> Result<Agent, String> {
        let template = e2e::repo_dir().join("hil-tests/scenarios").join(template);
        let t = std::fs::read_to_string(&template).map_err(|e| format!("{}: {e}", template.display()))?;
        let state = dir.join("agent-state");
        let metrics_port = e2e::free_port();
        let mut conf = t
            .replace("@STATE_DIR@", &state.display().to_string())
            .replace("@WINDOW_MS@", &args.window_ms.to_string())
            .replace("@METRICS_PORT@", &metrics_port.to_string())
            .replace("@CLOSED_PORT@", &e2e::free_port().to_string());
        for (k, v) in values {
            conf = conf.replace(k, v);
        }
        let config = dir.join("agent.toml");
        std::fs::write(&config, conf).map_err(|e| e.to_string())?;
        if !args.agent.exists() {
            return Err(format!(
                "no agent at {} (cargo build --release --bins, or --agent PATH)",
                args.agent.display()
            ));
        }
        let proc = e2e::Proc::spawn(
            "edge-agent",
            dir,
            &args.agent,
            &["--config".into(), config.display().to_string()],
            &[("EDGE_AGENT_LOG", "info")],
        );
        let mut a = Agent { proc, state, config, bin: args.agent.clone(), metrics_port };
        let attached = |what: &str| {
            e2e::scrape(metrics_port, &format!("edge_agent_probe_attached{{probe=\"{what}\"}}")).ok().flatten()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while probes.iter().any(|p| attached(p) != Some(1.0)) {
            a.check()?;
            if Instant::now() > deadline {
                return Err(format!("the agent's probes did not attach in 60 s; log {}", a.proc.log.display()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(a)
    }

    /// The agent's resident memory now and at its peak, MiB (the peak
    /// includes loading the probes, which parses the kernel's BTF).
    fn memory(&self) -> (f64, f64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).unwrap_or_default();
        let mib = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
                .map_or(f64::NAN, |k| k / 1024.0)
        };
        (mib("VmRSS:"), mib("VmHWM:"))
    }

    /// Fails unless the agent loaded `model`.
    fn loaded(&self, model: &Path) -> Result<(), String> {
        let state = e2e::scrape(self.metrics_port, "edge_agent_detect_model_state{state=\"loaded\"}").ok().flatten();
        if state != Some(1.0) {
            return Err(format!("the agent did not load {}; log {}", model.display(), self.proc.log.display()));
        }
        Ok(())
    }

    fn check(&mut self) -> Result<(), String> {
        match self.proc.exited() {
            None => Ok(()),
            Some(st) => Err(format!("the agent exited ({st}); log {}", self.proc.log.display())),
        }
    }

    /// Stops the agent (its last window stored) and exports what it
    /// stored, in each (format, file).
    fn stop_and_export(mut self, exports: &[(&str, &Path)]) -> Result<(), String> {
        self.proc.stop();
        for (format, out) in exports {
            let st = Command::new(&self.bin)
                .args(["--config", &self.config.display().to_string(), "store", "export", "--format", format])
                .arg("--output")
                .arg(out)
                .status()
                .map_err(|e| e.to_string())?;
            if !st.success() {
                return Err(format!("store export of {} failed: {st}", self.state.display()));
            }
        }
        Ok(())
    }
}

fn record(args: &Args) -> Result<(), String> {
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let out = std::fs::canonicalize(&args.out).map_err(|e| e.to_string())?;
    workload::nft_remove();
    let b = workload::Box::start(args.seed)?;
    let mut agent = Agent::start(args, &out, &b.sensor_link, "")?;
    let started = e2e::now_ms();
    let run = Duration::from_secs_f64(args.minutes * 60.0);
    let t0 = Instant::now();
    eprintln!("scenarios: recording normal activity for {} min into {}", args.minutes, out.display());
    while t0.elapsed() < run {
        std::thread::sleep(Duration::from_secs(1).min(run.saturating_sub(t0.elapsed())));
        agent.check()?;
    }
    let (timeouts, bad) = b.serial_trouble();
    // The agent first: its last window is not the workload's teardown.
    agent.stop_and_export(&[("features", &out.join("features.csv"))])?;
    b.stop();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let summary = format!(
        "{{\"kind\": \"normal\", \"minutes\": {}, \"window_ms\": {}, \"seed\": {}, \"started_ms\": {started}, \
         \"ended_ms\": {}, \"kernel\": \"{}\", \"serial_timeouts\": {timeouts}, \"serial_bad_frames\": {bad}}}\n",
        args.minutes,
        args.window_ms,
        args.seed,
        e2e::now_ms(),
        kernel.trim()
    );
    std::fs::write(out.join("run.json"), summary).map_err(|e| e.to_string())?;
    eprintln!("scenarios: wrote {}", out.join("features.csv").display());
    Ok(())
}

/// One injected fault: [start, end) in wall-clock ms.
struct Injection {
    fault: &'static str,
    start_ms: i64,
    end_ms: i64,
}

/// Sleeps until `deadline`, checking the agent every second.
fn run_until(agent: &mut Agent, deadline: Instant) -> Result<(), String> {
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1).min(deadline.saturating_duration_since(Instant::now())));
        agent.check()?;
    }
    Ok(())
}

fn evaluate(args: &Args) -> Result<(), String> {
    let model = args.model.as_ref().ok_or("--model CARD is required")?;
    let model = std::fs::canonicalize(model).map_err(|e| format!("{}: {e}", model.display()))?;
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let out = std::fs::canonicalize(&args.out).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(out.join("agent-state"));
    workload::nft_remove();
    let mut b = workload::Box::start(args.seed)?;
    // The agent's warm-up after its start (no raise) ends within the
    // runner's own (4 windows, below) before any fault is injected.
    let warmup_secs = (args.window_ms * 3).div_ceil(1000);
    let detect = format!("[detect]\nmodel = \"{}\"\nwarmup_secs = {warmup_secs}\n", model.display());
    let mut agent = Agent::start(args, &out, &b.sensor_link, &detect)?;
    agent.loaded(&model)?;
    let window = Duration::from_millis(args.window_ms);
    // Warm-up: the first window has no features; the next ones settle.
    run_until(&mut agent, Instant::now() + window * 4)?;
    let mut injections = Vec::new();
    let mut faults: Vec<&'static str> = workload::FAULTS.to_vec();
    let mut rng = workload::Rng::new(args.seed);
    for round in 0..args.rounds {
        // A different order every round (Fisher-Yates).
        for i in (1..faults.len()).rev() {
            faults.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        for &fault in &faults {
            eprintln!("scenarios: round {}, {fault} for {} windows", round + 1, args.fault_windows);
            let start_ms = e2e::now_ms();
            b.set_fault(fault, true)?;
            let r = run_until(&mut agent, Instant::now() + window * args.fault_windows);
            b.set_fault(fault, false)?;
            r?;
            injections.push(Injection { fault, start_ms, end_ms: e2e::now_ms() });
            run_until(&mut agent, Instant::now() + window * args.gap_windows)?;
        }
    }
    let normal_from = e2e::now_ms();
    eprintln!("scenarios: normal activity only for {} min", args.normal_minutes);
    run_until(&mut agent, Instant::now() + Duration::from_secs_f64(args.normal_minutes * 60.0))?;
    let normal_to = e2e::now_ms();
    let memory = agent.memory();
    let (features, samples) = (out.join("features.csv"), out.join("samples.csv"));
    agent.stop_and_export(&[("features", &features), ("csv", &samples)])?;
    b.stop();
    let mut labels = String::from("start_ms,end_ms,fault\n");
    for i in &injections {
        labels.push_str(&format!("{},{},{}\n", i.start_ms, i.end_ms, i.fault));
    }
    std::fs::write(out.join("labels.csv"), labels).map_err(|e| e.to_string())?;
    let windows = read_agent_windows(&samples)?;
    let threshold = card_threshold(&model)?;
    let report = report(args, &model, threshold, &windows, &injections, (normal_from, normal_to), memory);
    std::fs::write(out.join("report.md"), &report).map_err(|e| e.to_string())?;
    println!("{report}");
    Ok(())
}

/// The alarm threshold of a model card.
fn card_threshold(model: &Path) -> Result<f64, String> {
    let card = std::fs::read_to_string(model).map_err(|e| format!("{}: {e}", model.display()))?;
    serde_json::from_str::<serde_json::Value>(&card)
        .map_err(|e| format!("{}: not a model card ({e})", model.display()))?["threshold"]
        .as_f64()
        .ok_or_else(|| format!("{}: no threshold in the card", model.display()))
}

/// The agent's scores and alarm states, by window, from its samples export.
fn read_agent_windows(samples: &Path) -> Result<Vec<Scored>, String> {
    let text = std::fs::read_to_string(samples).map_err(|e| format!("{}: {e}", samples.display()))?;
    // By window: its score, alarm state and warning state.
    type Window = (Option<f64>, Option<f64>, Option<f64>);
    let mut by_ts: std::collections::BTreeMap<i64, Window> = Default::default();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() < 5 {
            continue;
        }
        let (Ok(ts), Ok(v)) = (f[0].parse::<i64>(), f[f.len() - 1].parse::<f64>()) else { continue };
        match f[2] {
            "edge_anomaly_score" => by_ts.entry(ts).or_default().0 = Some(v),
            "edge_anomaly_alarm" => by_ts.entry(ts).or_default().1 = Some(v),
            "edge_anomaly_warning" => by_ts.entry(ts).or_default().2 = Some(v),
            _ => {}
        }
    }
    Ok(by_ts
        .into_iter()
        .filter_map(|(ts, (s, a, w))| {
            Some(Scored { ts, score: s?, alarm: a? == 1.0, warning: w.unwrap_or(0.0) == 1.0 })
        })
        .collect())
}

/// The report; `memory`: the agent's RSS and peak RSS, MiB.
fn report(
    args: &Args,
    model: &Path,
    threshold: f64,
    w: &[Scored],
    inj: &[Injection],
    normal: (i64, i64),
    memory: (f64, f64),
) -> String {
    let win_ms = args.window_ms as i64;
    // A window (ts - window, ts] is faulty when a fault covers half of it.
    let fault_of =
        |ts: i64| inj.iter().find(|i| (i.end_ms.min(ts) - i.start_ms.max(ts - win_ms)) * 2 >= win_ms).map(|i| i.fault);
    let (mut tp, mut fp, mut fn_, mut tn) = (0u32, 0u32, 0u32, 0u32);
    for x in w {
        match (fault_of(x.ts).is_some(), x.score > threshold) {
            (true, true) => tp += 1,
            (false, true) => fp += 1,
            (true, false) => fn_ += 1,
            (false, false) => tn += 1,
        }
    }
    let f1 = 2.0 * f64::from(tp) / f64::from((2 * tp + fp + fn_).max(1));
    let mut rows = String::new();
    let mut all_within_3 = true;
    let mut classes: std::collections::BTreeMap<&str, (u32, u32, Vec<String>)> = Default::default();
    for i in inj {
        // Windows from the fault's first (ending after its start) on; the
        // alarm may come up to one window after the fault ends.
        let after: Vec<&Scored> = w.iter().filter(|x| x.ts > i.start_ms && x.ts <= i.end_ms + win_ms).collect();
        let hit = after.iter().position(|x| x.alarm);
        let first_above = after.iter().position(|x| x.score > threshold);
        let e = classes.entry(i.fault).or_default();
        e.0 += 1;
        match hit {
            Some(k) => {
                e.1 += 1;
                e.2.push((k + 1).to_string());
                all_within_3 &= k < 3;
            }
            None => {
                e.2.push("-".into());
                all_within_3 = false;
            }
        }
        let peak = after.iter().map(|x| x.score).fold(0.0, f64::max);
        rows.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} |\n",
            i.fault,
            hit.map_or("no".into(), |k| format!("yes, window {}", k + 1)),
            first_above.map_or("-".into(), |k| (k + 1).to_string()),
            after.len(),
            peak
        ));
    }
    // False alarms: raised while only normal activity ran (the normal-only
    // tail, and the gaps once a fault's after-effects had a window to pass).
    let mut false_alarms = 0u32;
    let mut normal_windows = 0u32;
    let mut normal_scores = Vec::new();
    let mut prev = false;
    for x in w {
        let near_fault = inj.iter().any(|i| x.ts > i.start_ms && x.ts <= i.end_ms + 2 * win_ms);
        if !near_fault {
            normal_windows += 1;
            normal_scores.push(x.score);
            if x.alarm && !prev {
                false_alarms += 1;
            }
        }
        prev = x.alarm;
    }
    let normal_hours = f64::from(normal_windows) * args.window_ms as f64 / 3_600_000.0;
    let per_day = if normal_hours > 0.0 { f64::from(false_alarms) * 24.0 / normal_hours } else { f64::NAN };
    let tail_hours = (normal.1 - normal.0) as f64 / 3_600_000.0;
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut class_rows = String::new();
    for (name, (n, d, k)) in &classes {
        class_rows.push_str(&format!("| {name} | {n} | {d} | {} |\n", k.join(", ")));
    }
    format!(
        "# Scenario evaluation\n\n\
         Model {model}, threshold {threshold:.4}; {} ms windows; {} round(s) of {} fault classes, each on for {} \
         windows with {} normal windows after it; then {:.2} h of normal activity only. Seed {}, kernel {}.\n\n\
         ## Per fault class (the agent's alarm)\n\n\
         | fault | injected | detected | windows to detect |\n|---|---|---|---|\n{class_rows}\n\
         ## Per injection\n\n\
         | fault | alarm | first window above threshold | windows | peak score |\n|---|---|---|---|---|\n{rows}\n\
         ## Windows (score against the threshold, every window scored)\n\n\
         {} windows: tp {tp}, fp {fp}, fn {fn_}, tn {tn}; **F1 {f1:.3}**.\n\n\
         ## False alarms\n\n\
         {false_alarms} alarm(s) raised in {normal_windows} normal windows ({normal_hours:.2} h of normal activity, \
         the gaps' first two windows after each fault excluded): **{per_day:.2} per 24 h** (extrapolated).\n\n\
         {tail}\n\n\
         ## Agent memory with the model loaded\n\n\
         RSS at the end {:.1} MiB, peak {:.1} MiB (the peak is at start: loading the probes parses the kernel's BTF).\n\n\
         ## Goals\n\n\
         - every fault class detected within 3 windows: **{}**\n\
         - F1 >= 0.9 over all windows: **{}**\n\
         - <= 1 false alarm per 24 h: **{}** (from {normal_hours:.2} h; longer normal runs give a tighter bound)\n",
        args.window_ms,
        args.rounds,
        workload::FAULTS.len(),
        args.fault_windows,
        args.gap_windows,
        tail_hours,
        args.seed,
        kernel.trim(),
        w.len(),
        memory.0,
        memory.1,
        if all_within_3 { "met" } else { "NOT met" },
        if f1 >= 0.9 { "met" } else { "NOT met" },
        if per_day <= 1.0 { "met" } else { "NOT met" },
        model = model.display(),
        tail = tail_text(&normal_scores, threshold, args.window_ms),
    )
}

/// The runner's agent raises the alarm after this many windows above the
/// threshold in a row (`detect.raise_after`'s default; the runner's config
/// keeps it).
const RAISE_AFTER: i32 = 2;

/// Peaks over a threshold (extreme value theory) of the normal windows'
/// scores: how often a window would score above the model's threshold,
/// extrapolated from the highest 5 % of the scores seen.
#[derive(Debug, Clone, PartialEq)]
struct Tail {
    windows: usize,
    /// Scores above `u`, the tail fitted.
    exceedances: usize,
    u: f64,
    /// Windows actually above the threshold.
    above: usize,
    /// Exponential tail (Gumbel domain): its scale.
    exp_scale: f64,
    /// Generalised Pareto by the method of moments: shape and scale.
    shape: f64,
    scale: f64,
    /// P(a window's score > threshold) under each fit.
    p_exp: f64,
    p_gpd: f64,
}

fn tail_estimate(scores: &[f64], threshold: f64) -> Option<Tail> {
    let n = scores.len();
    if n < 200 {
        return None;
    }
    let mut s = scores.to_vec();
    s.sort_by(f64::total_cmp);
    let k = (n / 20).max(20);
    let u = s[n - k - 1];
    let y: Vec<f64> = s[n - k..].iter().map(|x| x - u).collect();
    let m = y.iter().sum::<f64>() / k as f64;
    let v = y.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (k - 1) as f64;
    let above = s.iter().filter(|x| **x > threshold).count();
    let rate = k as f64 / n as f64;
    let d = threshold - u;
    let (shape, scale) = if v > 0.0 && m > 0.0 {
        let r = m * m / v;
        (0.5 * (1.0 - r), 0.5 * m * (r + 1.0))
    } else {
        (0.0, m)
    };
    let (p_exp, p_gpd) = if d <= 0.0 || m <= 0.0 {
        (above as f64 / n as f64, above as f64 / n as f64)
    } else {
        let p_exp = rate * (-d / m).exp();
        let z = 1.0 + shape * d / scale;
        let p_gpd = if shape.abs() < 1e-9 {
            rate * (-d / scale).exp()
        } else if z <= 0.0 {
            0.0 // a bounded tail ending below the threshold
        } else {
            rate * z.powf(-1.0 / shape)
        };
        (p_exp, p_gpd)
    };
    Some(Tail { windows: n, exceedances: k, u, above, exp_scale: m, shape, scale, p_exp, p_gpd })
}

/// The tail extrapolation as a report paragraph: of the single window's
/// score, and of the alarm's own statistic, the lowest of each
/// `RAISE_AFTER` consecutive windows' scores (the alarm is raised when it
/// exceeds the threshold), so that no independence between windows is
/// assumed.
fn tail_text(scores: &[f64], threshold: f64, window_ms: u64) -> String {
    let run = RAISE_AFTER as usize;
    let alarm_stat: Vec<f64> = scores.windows(run).map(|w| w.iter().copied().fold(f64::INFINITY, f64::min)).collect();
    let (Some(one), Some(alarm)) = (tail_estimate(scores, threshold), tail_estimate(&alarm_stat, threshold)) else {
        return format!("Tail extrapolation: too few normal windows ({}; 200 at least).", scores.len());
    };
    let per_day = 86_400_000.0 / window_ms as f64;
    let highest = alarm_stat.iter().copied().fold(0.0, f64::max);
    format!(
        "Tail extrapolation (peaks over threshold: the highest 5 %, fitted by an exponential tail and a generalised \
         Pareto by moments; the larger probability kept). The alarm statistic, the lower score of each {RAISE_AFTER} \
         consecutive windows (the alarm rises when it exceeds the threshold {threshold:.4}), peaked at {highest:.4} \
         ({:.0} % of the threshold) over {} windows; its tail (over u = {:.4}, exponential scale {:.4}, Pareto shape \
         {:.3}) gives P = {:.2e} per window: **{:.2e} false alarms per 24 h** (extrapolated, {per_day:.0} windows a \
         day; the fit reaches far past the data). A single window's score (without the debounce): {} of {} windows \
         above the threshold, tail P = {:.2e}, {:.3} windows above it per 24 h.",
        100.0 * highest / threshold,
        alarm.windows,
        alarm.u,
        alarm.exp_scale,
        alarm.shape,
        alarm.p_exp.max(alarm.p_gpd),
        alarm.p_exp.max(alarm.p_gpd) * per_day,
        one.above,
        one.windows,
        one.p_exp.max(one.p_gpd),
        one.p_exp.max(one.p_gpd) * per_day,
    )
}

/// `scenarios tail`: the extrapolation over DIR/samples.csv.
fn tail(args: &Args) -> Result<(), String> {
    let threshold = card_threshold(args.model.as_ref().ok_or("--model CARD is required")?)?;
    let windows = read_agent_windows(&args.out.join("samples.csv"))?;
    let alarms = windows.windows(2).filter(|w| w[1].alarm && !w[0].alarm).count()
        + usize::from(windows.first().is_some_and(|w| w.alarm));
    let scores: Vec<f64> = windows.iter().map(|w| w.score).collect();
    let hours = scores.len() as f64 * args.window_ms as f64 / 3_600_000.0;
    let highest = scores.iter().copied().fold(0.0, f64::max);
    let text = format!(
        "# Normal-only run: false alarms\n\n{} windows ({hours:.2} h), {alarms} alarm(s) raised, highest score \
         {highest:.4} (threshold {threshold:.4}).\n\n{}\n",
        scores.len(),
        tail_text(&scores, threshold, args.window_ms)
    );
    std::fs::write(args.out.join("tail.md"), &text).map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores at the quantiles of an exponential distribution (mean 0.1):
    /// the fits recover its tail.
    #[test]
    fn the_tail_of_exponential_scores_is_extrapolated_to_its_true_probability() {
        let n = 10_000;
        let scores: Vec<f64> = (0..n).map(|i| -0.1 * (1.0 - (i as f64 + 0.5) / n as f64).ln()).collect();
        let t = tail_estimate(&scores, 2.0).unwrap();
        let truth = (-2.0f64 / 0.1).exp(); // 2.1e-9
        assert_eq!(t.above, 0);
        assert!((t.p_exp / truth).ln().abs() < 1.0, "{t:?} vs {truth:e}");
        assert!((t.p_gpd / truth).ln().abs() < 2.0, "{t:?} vs {truth:e}");
        assert!(t.shape.abs() < 0.1, "{t:?}");
    }

    #[test]
    fn lone_spikes_do_not_lift_the_alarm_statistic() {
        // A busy box: one window in 50 spikes far over the threshold, alone.
        let scores: Vec<f64> =
            (0..1000).map(|i| if i % 50 == 25 { 5.0 } else { 0.05 + (i % 7) as f64 * 0.01 }).collect();
        let text = tail_text(&scores, 1.0, 10_000);
        assert!(text.contains("peaked at 0.1100 (11 % of the threshold)"), "{text}");
        assert!(text.contains("20 of 1000 windows above the threshold"), "{text}");
    }

    #[test]
    fn a_bounded_tail_below_the_threshold_extrapolates_to_zero_and_few_windows_to_nothing() {
        let scores: Vec<f64> = (0..1000).map(|i| (i % 100) as f64 / 100.0).collect(); // uniform on [0, 1)
        let t = tail_estimate(&scores, 2.0).unwrap();
        assert!(t.shape < 0.0 && t.p_gpd == 0.0, "{t:?}");
        assert!(tail_estimate(&scores[..100], 2.0).is_none());
        // Windows already above the threshold count as they are.
        let t = tail_estimate(&scores, 0.5).unwrap();
        assert_eq!(t.p_exp, t.above as f64 / 1000.0);
    }
}
