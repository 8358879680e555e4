//! The agent's cost of process values (docs/process-values.md; the issue's
//! goals: at most 1 % of a core and 16 MB resident with the model loaded,
//! for 200 tags polled at 10 Hz). Needs root and the release binaries:
//!
//!   cargo build --release -p edge-agent && cargo bench -p e2e --bench value_load
//!
//! The simulated pump (`pump_sim --extra-inputs 200 --hz 10`: 200 more
//! input registers read in two requests of 100 every poll, besides the
//! pump's own 4 requests) runs on loopback; the release agent (offline:
//! everything stays in its store; the pump's process-value model,
//! model/pump/, loaded; its 5 s windows) runs three times in the same
//! session, in turn: without a tag map (the baseline: the same traffic, the
//! protocol probe on; the model then scores windows without its tags) and
//! with 200 tags on those registers plus the pump's own 13 (the model's:
//! every window's value features, band energies included, scored). CPU time from /proc/<pid>/stat over a measured
//! minute after a warm-up; resident memory now (VmRSS) and at its peak
//! (VmHWM).

use e2e::*;
use std::time::{Duration, Instant};

const WARMUP: Duration = Duration::from_secs(15);
const MEASURE: Duration = Duration::from_secs(60);
const TAGS: u16 = 200;

fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split(' ').collect();
    // Fields 14 and 15 of the whole line (utime, stime): 12 and 13 here.
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn status_kib(pid: i32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn tag_map(port: u16) -> String {
    (0..TAGS)
        .map(|i| {
            format!(
                "[[tags]]\nname = \"sensor_{i:03}\"\nunit = \"u\"\nsource = \"modbus_tcp\"\nport = {port}\n\
                 table = \"input\"\naddress = {}\nscale = 0.1\n",
                100 + i
            )
        })
        .collect()
}

struct Result {
    cpu_percent: f64,
    rss_kib: u64,
    hwm_kib: u64,
    captured: f64,
    scored: f64,
    missing_tags: f64,
}

fn run(dir: &std::path::Path, port: u16, tags: bool) -> Result {
    let model = repo_dir().join("model/pump/anomaly.card.json");
    let map =
        if tags { tag_map(port) + &e2e::pump::tcp_tag_map(port).expect("the pump's tag map") } else { String::new() };
    let extra = format!(
        "[probes.protocols]\nmodbus_ports = [{port}]\n[detect]\nenabled = true\nmodel = \"{}\"\n{map}",
        model.display(),
    );
    let state = dir.join(if tags { "state-tags" } else { "state-none" });
    let setup = AgentSetup { window_ms: 5_000, state_dir: Some(&state), ..AgentSetup::offline("bench-values", &extra) };
    let mut agent = Agent::start(dir, &setup);
    let pid = agent.proc.pid();
    std::thread::sleep(WARMUP);
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(MEASURE);
    let (secs, c1) = (t0.elapsed().as_secs_f64(), cpu_ticks(pid));
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let r = Result {
        cpu_percent: (c1 - c0) as f64 / hz / secs * 100.0,
        rss_kib: status_kib(pid, "VmRSS:"),
        hwm_kib: status_kib(pid, "VmHWM:"),
        captured: agent.metric("edge_agent_values_captured_total{transport=\"modbus_tcp\"}").unwrap_or(0.0),
        scored: agent.metric("edge_agent_detect_windows_scored_total").unwrap_or(0.0),
        missing_tags: agent.metric("edge_agent_detect_model_missing_tags").unwrap_or(f64::NAN),
    };
    agent.proc.stop();
    r
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !bin_dir().join("edge-agent").exists() || !bin_dir().join("pump_sim").exists()
    {
        println!(
            "value_load benchmark: needs root and release binaries in {} (cargo build --release -p edge-agent)",
            bin_dir().display()
        );
        return;
    }
    let dir = tempdir("value-load");
    let port = free_port();
    let mut sim = std::process::Command::new(bin_dir().join("pump_sim"))
        .args(["--port", &port.to_string(), "--hz", "10", "--extra-inputs", &TAGS.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("pump_sim");
    let none = run(&dir, port, false);
    let with = run(&dir, port, true);
    let none2 = run(&dir, port, false);
    let _ = sim.kill();
    let _ = sim.wait();
    let rate = with.captured / (WARMUP + MEASURE).as_secs_f64();
    println!(
        "## Agent cost of process values ({TAGS} tags + the pump's 13 at 10 Hz, release agent, the pump's value model \
         loaded, 5 s windows; {} s measured after {} s)\n",
        MEASURE.as_secs(),
        WARMUP.as_secs()
    );
    println!(
        "| agent | CPU (% of one core) | VmRSS | VmHWM | values captured | windows scored | model's tags missing |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (what, r) in [
        ("no tag map (baseline)", &none),
        (&format!("{TAGS} + 13 tags, the model scoring them") as &str, &with),
        ("no tag map, again", &none2),
    ] {
        println!(
            "| {what} | {:.2} % | {:.1} MiB | {:.1} MiB | {:.0} | {:.0} | {:.0} |",
            r.cpu_percent,
            r.rss_kib as f64 / 1024.0,
            r.hwm_kib as f64 / 1024.0,
            r.captured,
            r.scored,
            r.missing_tags
        );
    }
    let base = (none.cpu_percent + none2.cpu_percent) / 2.0;
    println!(
        "\nThe tags' own cost: {:+.2} % of a core ({:.0} values/s), {:+.1} MiB resident.",
        with.cpu_percent - base,
        rate,
        (with.rss_kib as f64 - (none.rss_kib.max(none2.rss_kib)) as f64) / 1024.0
    );
    let _ = std::fs::remove_dir_all(&dir);
}
