//! Pump runs: the simulated pump's PLC (`pump_sim`, e2e/src/pump.rs) with
//! its HMI polling it over Modbus/TCP, the agent capturing the pump's tags
//! from the wire (configs/tags/pump.toml), and the pump's labelled process
//! faults. The faults are scheduled up front on the pump's own clock (its
//! `--fault` options), so a run is the same for a seed whatever the load.

use super::{read_agent_windows, run_until, Agent, Args};
use e2e::pump::FaultKind;
use hil_tests::evaluation::{detection_delay, false_raises, truth, Confusion, Label, Scored, Truth};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The process is back to normal after a fault when its bearing is within
/// this of the temperature it would have without the fault (°C; about the
/// spread of a window's mean in normal operation).
const RECOVERED_WITHIN_C: f64 = 0.05;

/// The probes a pump run needs.
const PROBES: &[&str] = &["tcp_lifecycle", "protocols"];

/// The simulated pump's PLC and HMI.
struct Plant {
    proc: e2e::Proc,
    /// When the pump's clock started (its second 0), ms.
    started_ms: i64,
}

impl Plant {
    fn start(args: &Args, dir: &Path, port: u16, faults: &[(FaultKind, f64, f64)]) -> Result<Plant, String> {
        let bin = args.agent.with_file_name("pump_sim");
        if !bin.exists() {
            return Err(format!("no pump_sim at {} (cargo build --release --bins)", bin.display()));
        }
        let mut a: Vec<String> = ["--port", &port.to_string(), "--hz", &args.hz.to_string(), "--seed"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.push(args.seed.to_string());
        for (kind, from, to) in faults {
            a.push("--fault".into());
            a.push(format!("{}:{from}:{to}", kind.name()));
        }
        let started_ms = e2e::now_ms();
        let mut proc = e2e::Proc::spawn("pump_sim", dir, &bin, &a, &[]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if proc.exited().is_some() || Instant::now() > deadline {
                return Err(format!("pump_sim did not listen on {port}; log {}", proc.log.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Plant { proc, started_ms })
    }

    fn check(&mut self) -> Result<(), String> {
        match self.proc.exited() {
            None => Ok(()),
            Some(st) => Err(format!("pump_sim exited ({st}); log {}", self.proc.log.display())),
        }
    }
}

fn start_agent(args: &Args, dir: &Path, port: u16, detect: &str) -> Result<Agent, String> {
    let port_s = port.to_string();
    let detect = format!("{detect}\n{}", e2e::pump::tcp_tag_map(port)?);
    Agent::start_with(args, dir, "pump-agent.toml", &[("@PLC_PORT@", &port_s), ("@DETECT@", &detect)], PROBES)
}

fn out_dir(args: &Args) -> Result<PathBuf, String> {
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let out = std::fs::canonicalize(&args.out).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(out.join("agent-state"));
    Ok(out)
}

/// `scenarios pump-record`: normal operation only, for training.
pub fn record(args: &Args) -> Result<(), String> {
    let out = out_dir(args)?;
    let port = e2e::free_port();
    let mut agent = start_agent(args, &out, port, "")?;
    let mut plant = Plant::start(args, &out, port, &[])?;
    eprintln!("scenarios: recording the pump's normal operation for {} min into {}", args.minutes, out.display());
    let end = Instant::now() + Duration::from_secs_f64(args.minutes * 60.0);
    while Instant::now() < end {
        run_until(&mut agent, (Instant::now() + Duration::from_secs(5)).min(end))?;
        plant.check()?;
    }
    agent.stop_and_export(&[("features", &out.join("features.csv"))])?;
    plant.proc.stop();
    let summary = serde_json::json!({
        "kind": "pump-normal", "minutes": args.minutes, "window_ms": args.window_ms, "hz": args.hz,
        "seed": args.seed, "started_ms": plant.started_ms, "ended_ms": e2e::now_ms(), "kernel": kernel(),
    });
    std::fs::write(out.join("run.json"), format!("{summary:#}\n")).map_err(|e| e.to_string())?;
    eprintln!("scenarios: wrote {}", out.join("features.csv").display());
    Ok(())
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned()
}

/// The fault schedule on the pump's clock (seconds): `lead_s` of normal
/// operation, then per round every class in a seeded order, each on for
/// `fault_windows` and followed by `gap_windows` of normal operation (at
/// least its recovery time); then the normal-only tail. Also the end.
fn schedule(args: &Args, classes: &[FaultKind], lead_s: f64) -> (Vec<(FaultKind, f64, f64)>, f64) {
    let w = args.window_ms as f64 / 1000.0;
    let mut rng = e2e::pump::Rng::new(args.seed);
    let mut order = classes.to_vec();
    let mut t = lead_s;
    let mut out = Vec::new();
    for _ in 0..args.rounds {
        for i in (1..order.len()).rev() {
            order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        for &k in &order {
            let to = t + f64::from(args.fault_windows) * w;
            out.push((k, t, to));
            t = to + (f64::from(args.gap_windows) * w).max(k.recovery_s(to - t, RECOVERED_WITHIN_C));
        }
    }
    (out, t + args.normal_minutes * 60.0)
}

/// `scenarios pump-evaluate`: the agent with the model, the pump's faults.
pub fn evaluate(args: &Args) -> Result<(), String> {
    let model = args.model.as_ref().ok_or("--model CARD is required")?;
    let model = std::fs::canonicalize(model).map_err(|e| format!("{}: {e}", model.display()))?;
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&model).map_err(|e| format!("{}: {e}", model.display()))?)
            .map_err(|e| format!("{}: not a model card ({e})", model.display()))?;
    let classes: Vec<FaultKind> = if args.faults.is_empty() {
        FaultKind::ALL.to_vec()
    } else {
        args.faults
            .iter()
            .map(|f| FaultKind::from_name(f).ok_or_else(|| format!("unknown fault {f:?}")))
            .collect::<Result<_, _>>()?
    };
    let out = out_dir(args)?;
    let port = e2e::free_port();
    // The agent's warm-up (no raise) covers its first windows, which
    // start before the pump does.
    let warmup_secs = (args.window_ms * 3).div_ceil(1000);
    let detect = format!("[detect]\nmodel = \"{}\"\nwarmup_secs = {warmup_secs}\n", model.display());
    let mut agent = start_agent(args, &out, port, &detect)?;
    agent.loaded(&model)?;
    // The pump runs normally for 6 windows before the first fault: the
    // agent's warm-up ends and its windows see the pump polled throughout.
    let lead_s = 6.0 * args.window_ms as f64 / 1000.0 + warmup_secs as f64;
    let (faults, end_s) = schedule(args, &classes, lead_s);
    let mut plant = Plant::start(args, &out, port, &faults)?;
    let t0 = plant.started_ms;
    let labels: Vec<Label> = faults
        .iter()
        .map(|(k, from, to)| Label {
            fault: k.name().to_owned(),
            start_ms: t0 + (from * 1000.0) as i64,
            end_ms: t0 + (to * 1000.0) as i64,
            recovered_ms: t0 + ((to + k.recovery_s(to - from, RECOVERED_WITHIN_C)) * 1000.0) as i64,
        })
        .collect();
    eprintln!(
        "scenarios: {} fault(s) over {:.1} min; pump_sim log {}",
        faults.len(),
        end_s / 60.0,
        plant.proc.log.display()
    );
    let end = Instant::now() + Duration::from_secs_f64(end_s);
    while Instant::now() < end {
        run_until(&mut agent, (Instant::now() + Duration::from_secs(5)).min(end))?;
        plant.check()?;
    }
    let memory = agent.memory();
    let (features, samples) = (out.join("features.csv"), out.join("samples.csv"));
    agent.stop_and_export(&[("features", &features), ("csv", &samples)])?;
    plant.proc.stop();
    let mut csv = String::from("start_ms,end_ms,fault,recovered_ms\n");
    for l in &labels {
        csv.push_str(&format!("{},{},{},{}\n", l.start_ms, l.end_ms, l.fault, l.recovered_ms));
    }
    std::fs::write(out.join("labels.csv"), csv).map_err(|e| e.to_string())?;
    std::fs::write(
        out.join("memory.json"),
        format!("{{\"rss_mib\": {:.2}, \"peak_mib\": {:.2}}}\n", memory.0, memory.1),
    )
    .map_err(|e| e.to_string())?;
    let run = serde_json::json!({
        "kind": "pump-evaluate", "window_ms": args.window_ms, "hz": args.hz, "seed": args.seed,
        "rounds": args.rounds, "fault_windows": args.fault_windows, "gap_windows": args.gap_windows,
        "normal_minutes": args.normal_minutes, "faults": classes.iter().map(|k| k.name()).collect::<Vec<_>>(),
        "started_ms": t0, "ended_ms": e2e::now_ms(), "kernel": kernel(),
    });
    std::fs::write(out.join("run.json"), format!("{run:#}\n")).map_err(|e| e.to_string())?;
    write_report(args, &model, &card, &out, memory)
}

/// The options a `pump-evaluate` run was made with, from its run.json
/// (those given on the command line for a run without one).
fn run_options(args: &Args, out: &Path) -> Result<Args, String> {
    let path = out.join("run.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(args.clone()) };
    let run: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let int = |k: &str| run[k].as_u64().ok_or_else(|| format!("{}: no {k}", path.display()));
    let num = |k: &str| run[k].as_f64().ok_or_else(|| format!("{}: no {k}", path.display()));
    Ok(Args {
        window_ms: int("window_ms")?,
        hz: num("hz")?,
        seed: int("seed")?,
        rounds: int("rounds")? as u32,
        fault_windows: int("fault_windows")? as u32,
        gap_windows: int("gap_windows")? as u32,
        normal_minutes: num("normal_minutes")?,
        ..args.clone()
    })
}

/// Reads a run's labels.csv.
fn read_labels(path: &Path) -> Result<Vec<Label>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let num = |i: usize| {
                f.get(i).and_then(|v| v.parse::<i64>().ok()).ok_or(format!("{}: bad line {l:?}", path.display()))
            };
            Ok(Label {
                fault: f.get(2).unwrap_or(&"").to_string(),
                start_ms: num(0)?,
                end_ms: num(1)?,
                recovered_ms: num(3)?,
            })
        })
        .collect()
}

fn write_report(
    args: &Args,
    model: &Path,
    card: &serde_json::Value,
    out: &Path,
    memory: (f64, f64),
) -> Result<(), String> {
    let windows = read_agent_windows(&out.join("samples.csv"))?;
    let labels = read_labels(&out.join("labels.csv"))?;
    let stop = card["threshold"].as_f64().ok_or("the card has no threshold")?;
    let warn = card["warn"]["threshold"].as_f64();
    let holds = clear_after(&out.join("agent.toml"))?;
    let text = report(args, model, (stop, warn), holds, &windows, &labels, memory);
    std::fs::write(out.join("report.md"), &text).map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(())
}

/// The run's `detect.clear_after` and `detect.warn_clear_after` (the
/// agent's default 3 when not set: docs/model.md).
fn clear_after(config: &Path) -> Result<(usize, usize), String> {
    let text = std::fs::read_to_string(config).map_err(|e| format!("{}: {e}", config.display()))?;
    let t: toml::Table = text.parse().map_err(|e| format!("{}: {e}", config.display()))?;
    let get = |key: &str| t.get("detect").and_then(|d| d.get(key)).and_then(|v| v.as_integer()).unwrap_or(3) as usize;
    Ok((get("clear_after"), get("warn_clear_after")))
}

/// `scenarios pump-report`: the report of a finished `pump-evaluate` run
/// again (its samples.csv, labels.csv, memory.json), for the same card.
pub fn rewrite_report(args: &Args) -> Result<(), String> {
    let model = args.model.as_ref().ok_or("--model CARD is required")?;
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model).map_err(|e| format!("{}: {e}", model.display()))?)
            .map_err(|e| format!("{}: not a model card ({e})", model.display()))?;
    let memory = std::fs::read_to_string(args.out.join("memory.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map_or((f64::NAN, f64::NAN), |m| {
            (m["rss_mib"].as_f64().unwrap_or(f64::NAN), m["peak_mib"].as_f64().unwrap_or(f64::NAN))
        });
    write_report(&run_options(args, &args.out)?, model, &card, &args.out, memory)
}

fn yes(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

fn report(
    args: &Args,
    model: &Path,
    (stop, warn): (f64, Option<f64>),
    (stop_hold, warn_hold): (usize, usize),
    w: &[Scored],
    labels: &[Label],
    memory: (f64, f64),
) -> String {
    let win = args.window_ms as i64;
    let warn_thr = warn.unwrap_or(stop);
    let by_alarm = |s: &Scored| s.alarm;
    let by_warning = |s: &Scored| if warn.is_some() { s.warning || s.alarm } else { s.alarm };
    let stop_score = |s: &Scored| s.score > stop;
    let warn_score = |s: &Scored| s.score > warn_thr;
    // Per class and per injection.
    // Per class: (stop, warn) windows to detect of each injection.
    type Delays = Vec<(Option<usize>, Option<usize>)>;
    let mut classes: std::collections::BTreeMap<&str, Delays> = Default::default();
    let mut rows = String::new();
    for l in labels {
        let (s, v) = (detection_delay(w, l, win, by_alarm), detection_delay(w, l, win, by_warning));
        let first = detection_delay(w, l, win, stop_score);
        let peak =
            w.iter().filter(|x| x.ts > l.start_ms && x.ts <= l.end_ms + win).map(|x| x.score).fold(0.0, f64::max);
        classes.entry(&l.fault).or_default().push((s, v));
        let show = |d: Option<usize>| d.map_or("no".to_owned(), |k| format!("window {k}"));
        rows.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.3} |\n",
            l.fault,
            (l.start_ms - labels[0].start_ms) / 1000,
            (l.end_ms - l.start_ms) / win,
            show(s),
            show(v),
            first.map_or("-".to_owned(), |k| k.to_string()),
            peak
        ));
    }
    let list = |v: &[Option<usize>]| {
        v.iter().map(|d| d.map_or("-".to_owned(), |k| k.to_string())).collect::<Vec<_>>().join(", ")
    };
    let mut class_rows = String::new();
    let mut every_class = true;
    for (name, d) in &classes {
        let (s, v): (Vec<_>, Vec<_>) = d.iter().copied().unzip();
        let (ns, nv) = (s.iter().flatten().count(), v.iter().flatten().count());
        every_class &= ns > 0;
        class_rows.push_str(&format!("| {name} | {} | {ns} | {} | {nv} | {} |\n", d.len(), list(&s), list(&v)));
    }
    // Point-wise.
    let levels = [
        ("stop", "the agent's alarm".to_owned(), Confusion::of(w, labels, win, by_alarm)),
        ("stop", format!("score > {stop:.4} (no debounce)"), Confusion::of(w, labels, win, stop_score)),
        (
            "stop",
            format!("the agent's alarm, its hold after a fault ({stop_hold} windows) not counted"),
            Confusion::of_held(w, labels, win, stop_hold, by_alarm),
        ),
        ("warn", "the agent's warning (or alarm)".to_owned(), Confusion::of(w, labels, win, by_warning)),
        (
            "warn",
            format!("the agent's warning, its hold after a fault ({warn_hold} windows) not counted"),
            Confusion::of_held(w, labels, win, warn_hold, by_warning),
        ),
        ("warn", format!("score > {warn_thr:.4} (no debounce)"), Confusion::of(w, labels, win, warn_score)),
    ];
    let mut point = String::new();
    for (level, how, c) in &levels {
        point.push_str(&format!(
            "| {level} | {how} | {} | {} | {} | {} | **{:.3}** | {:.2} % | {:.2} % |\n",
            c.tp,
            c.fp,
            c.fn_,
            c.tn,
            c.f1(),
            100.0 * c.far(),
            100.0 * c.mar()
        ));
    }
    let (normal, excluded) = w.iter().fold((0u32, 0u32), |(n, e), x| match truth(labels, x.ts, win) {
        Truth::Normal => (n + 1, e),
        Truth::Excluded => (n, e + 1),
        Truth::Faulty(_) => (n, e),
    });
    let hours = f64::from(normal) * args.window_ms as f64 / 3_600_000.0;
    let raises = (false_raises(w, labels, win, by_alarm), false_raises(w, labels, win, by_warning));
    let per_day = |n: u32| if hours > 0.0 { f64::from(n) * 24.0 / hours } else { f64::NAN };
    let (stop_c, stop_score_c, stop_held_c, warn_c, warn_held_c, warn_score_c) =
        (levels[0].2, levels[1].2, levels[2].2, levels[3].2, levels[4].2, levels[5].2);
    format!(
        "# Pump evaluation: process faults through the agent\n\n\
         Model {model}: stop threshold {stop:.4}, warn threshold {}. The simulated pump (e2e/src/pump.rs, seed {}) \
         polled at {} Hz over Modbus/TCP; the agent captures its tags from the wire, {} ms windows. {} round(s) of \
         {} fault class(es), each on for {} windows, then at least {} windows of normal operation (longer while the \
         process recovers: the bearing's heat after a fault of the process); then {:.1} min of normal operation only. Kernel {}.\n\n\
         Truth per window: faulty when a fault covers at least half of it; windows a fault covers less, and those \
         while the process returns to normal after a fault, count neither way ({excluded} windows).\n\n\
         ## Per fault class\n\n\
         Windows to detect: 1 = the first window ending after the fault began; - = not detected.\n\n\
         | fault | injected | stop: detected | stop: windows to detect | warn: detected | warn: windows to detect |\n\
         |---|---|---|---|---|---|\n{class_rows}\n\
         ## Per injection\n\n\
         | fault | start (s) | windows | stop alarm | warning | first window above the stop threshold | peak score |\n\
         |---|---|---|---|---|---|---|\n{rows}\n\
         ## Point-wise, every window scored ({} windows: {normal} normal)\n\n\
         | level | decision | tp | fp | fn | tn | F1 | FAR | MAR |\n|---|---|---|---|---|---|---|---|---|\n{point}\n\
         FAR: normal windows decided faulty; MAR: faulty windows decided normal. The agent's alarm comes \
         `raise_after` windows into a fault and stays on until `clear_after` windows were below the threshold: \
         its rows count both; the rows without the hold leave out the windows after a fault while the state, \
         on without a break since the fault, is within `clear_after` windows of the fault's last window (one \
         alarm, as the operator sees it, ends that late by design; any longer or any raise in normal time \
         counts as false).\n\n\
         ## False alarms\n\n\
         In {normal} normal windows ({hours:.2} h): the stop alarm raised {} time(s) ({:.2} per 24 h), the warning \
         {} time(s) ({:.2} per 24 h).\n\n\
         ## Agent memory with the model loaded\n\n\
         RSS at the end {:.1} MiB, peak {:.1} MiB.\n\n\
         ## Goals\n\n\
         Point-wise at each level's threshold (the operating point, every window on its own) and with the agent's \
         debounced states, with and without their hold after a fault.\n\n\
         - every fault class detected at the stop level (the agent's alarm): **{}**\n\
         - stop: F1 >= 0.85 with FAR <= 5 %: score **{}** (F1 {:.3}, FAR {:.2} %); the agent's alarm **{}** \
         (F1 {:.3}, FAR {:.2} %), without its hold **{}** (F1 {:.3}, FAR {:.2} %)\n\
         - warn: F1 >= 0.9: score **{}** (F1 {:.3}); the agent's warning **{}** (F1 {:.3}), without its hold \
         **{}** (F1 {:.3})\n",
        warn.map_or("none".to_owned(), |t| format!("{t:.4}")),
        args.seed,
        args.hz,
        args.window_ms,
        args.rounds,
        classes.len(),
        args.fault_windows,
        args.gap_windows,
        args.normal_minutes,
        kernel(),
        w.len(),
        raises.0,
        per_day(raises.0),
        raises.1,
        per_day(raises.1),
        memory.0,
        memory.1,
        yes(every_class),
        yes(stop_score_c.f1() >= 0.85 && stop_score_c.far() <= 0.05),
        stop_score_c.f1(),
        100.0 * stop_score_c.far(),
        yes(stop_c.f1() >= 0.85 && stop_c.far() <= 0.05),
        stop_c.f1(),
        100.0 * stop_c.far(),
        yes(stop_held_c.f1() >= 0.85 && stop_held_c.far() <= 0.05),
        stop_held_c.f1(),
        100.0 * stop_held_c.far(),
        yes(warn_score_c.f1() >= 0.9),
        warn_score_c.f1(),
        yes(warn_c.f1() >= 0.9),
        warn_c.f1(),
        yes(warn_held_c.f1() >= 0.9),
        warn_held_c.f1(),
        model = model.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_keeps_each_fault_apart_and_waits_for_the_process_to_recover() {
        let args = Args {
            window_ms: 5000,
            rounds: 2,
            fault_windows: 4,
            gap_windows: 2,
            normal_minutes: 1.0,
            ..super::super::default_args()
        };
        let (f, end) = schedule(&args, &FaultKind::ALL, 30.0);
        assert_eq!(f.len(), 12);
        assert_eq!(f[0].1, 30.0);
        for k in FaultKind::ALL {
            assert_eq!(f.iter().filter(|x| x.0 == k).count(), 2);
        }
        for p in f.windows(2) {
            assert_eq!(p[0].2 - p[0].1, 20.0);
            let gap = p[1].1 - p[0].2;
            let recovery = p[0].0.recovery_s(20.0, RECOVERED_WITHIN_C);
            assert!((gap - recovery.max(10.0)).abs() < 1e-9, "{p:?}");
            assert_eq!(recovery > 10.0, p[0].0 == FaultKind::BearingWear || p[0].0 == FaultKind::Cavitation, "{p:?}");
        }
        let last = f.last().unwrap();
        assert!((end - (last.2 + 10f64.max(last.0.recovery_s(20.0, RECOVERED_WITHIN_C)) + 60.0)).abs() < 1e-9);
        // Seeded: the same order again; another seed, another order.
        assert_eq!(schedule(&args, &FaultKind::ALL, 30.0).0, f);
        let other = Args { seed: 2, ..args };
        assert_ne!(schedule(&other, &FaultKind::ALL, 30.0).0, f);
    }
}
