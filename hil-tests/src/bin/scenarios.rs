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
//! Runs as root (probes, port 502, nftables).

use hil_tests::workload;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: scenarios record --minutes M --out DIR [--window-ms MS] [--seed N] [--agent PATH]";

struct Args {
    command: String,
    minutes: f64,
    out: PathBuf,
    window_ms: u64,
    seed: u64,
    agent: PathBuf,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let command = it.next().ok_or("no command")?;
    let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_default();
    let mut a = Args {
        command,
        minutes: 10.0,
        out: PathBuf::new(),
        window_ms: 10_000,
        seed: 1,
        agent: exe_dir.join("edge-agent"),
    };
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        let num = |s: String| s.parse::<f64>().map_err(|_| format!("{k}: not a number: {s:?}"));
        match k.as_str() {
            "--minutes" => a.minutes = num(v()?)?,
            "--out" => a.out = PathBuf::from(v()?),
            "--window-ms" => a.window_ms = num(v()?)? as u64,
            "--seed" => a.seed = num(v()?)? as u64,
            "--agent" => a.agent = PathBuf::from(v()?),
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
}

impl Agent {
    fn start(args: &Args, dir: &Path, sensor: &Path, detect: &str) -> Result<Agent, String> {
        let template = e2e::repo_dir().join("hil-tests/scenarios/agent.toml");
        let t = std::fs::read_to_string(&template).map_err(|e| format!("{}: {e}", template.display()))?;
        let state = dir.join("agent-state");
        let metrics_port = e2e::free_port();
        let conf = t
            .replace("@STATE_DIR@", &state.display().to_string())
            .replace("@WINDOW_MS@", &args.window_ms.to_string())
            .replace("@METRICS_PORT@", &metrics_port.to_string())
            .replace("@CLOSED_PORT@", &e2e::free_port().to_string())
            .replace("@SENSOR@", &sensor.display().to_string())
            .replace("@DETECT@", detect);
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
        let mut a = Agent { proc, state, config, bin: args.agent.clone() };
        let attached = |what: &str| {
            e2e::scrape(metrics_port, &format!("edge_agent_probe_attached{{probe=\"{what}\"}}")).ok().flatten()
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while attached("tcp_lifecycle") != Some(1.0) || attached("device_io") != Some(1.0) {
            a.check()?;
            if Instant::now() > deadline {
                return Err(format!("the agent's probes did not attach in 60 s; log {}", a.proc.log.display()));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(a)
    }

    fn check(&mut self) -> Result<(), String> {
        match self.proc.exited() {
            None => Ok(()),
            Some(st) => Err(format!("the agent exited ({st}); log {}", self.proc.log.display())),
        }
    }

    /// Stops the agent (its last window stored) and exports what it stored.
    fn stop_and_export(mut self, format: &str, out: &Path) -> Result<(), String> {
        self.proc.stop();
        let st = Command::new(&self.bin)
            .args(["--config", &self.config.display().to_string(), "store", "export", "--format", format])
            .arg("--output")
            .arg(out)
            .status()
            .map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("store export of {} failed: {st}", self.state.display()));
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
    b.stop();
    agent.stop_and_export("features", &out.join("features.csv"))?;
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
