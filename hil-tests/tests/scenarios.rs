//! The scenario runner works end to end (a smoke run, short windows): it
//! starts the box's workload and the agent with the shipped model, injects
//! every fault class (nftables included), and writes labels, features, the
//! agent's scores and a report. The evaluation itself (10 s windows, long
//! normal runs) is a command in the README; its results are in the shipped
//! model's card and BENCHMARKS.md.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `scenarios` with `args`, the card and the output directory, on
/// the workspace's agent; fails the test unless it succeeds.
fn run_scenarios(command: &str, model: &Path, out: &Path, args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_scenarios"))
        .args([command, "--model", &model.display().to_string(), "--out", &out.display().to_string()])
        .args(args)
        .args(["--agent", &e2e::bin_dir().join("edge-agent").display().to_string()])
        .output()
        .expect("scenarios");
    assert!(o.status.success(), "scenarios failed:\n{}", String::from_utf8_lossy(&o.stderr));
}

/// The workspace's binaries a test needs that are not built.
fn unbuilt(bins: &[&str]) -> Vec<String> {
    bins.iter()
        .map(|b| e2e::bin_dir().join(b))
        .filter(|p: &PathBuf| !p.exists())
        .map(|p| format!("{} (cargo build --workspace --bins)", p.display()))
        .collect()
}

#[test]
fn runner_injects_every_fault_and_reports() {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (probes, port 502, nftables)".to_string());
    }
    if e2e::which("nft").is_none() {
        missing.push("nft (apt-get install nftables)".into());
    }
    missing.extend(unbuilt(&["edge-agent"]));
    if !e2e::require("scenario runner test", &missing) {
        return;
    }
    let out = e2e::tempdir("scenarios");
    let model = e2e::repo_dir().join("model/shipped/anomaly.card.json");
    run_scenarios(
        "evaluate",
        &model,
        &out,
        &["--window-ms", "1000", "--fault-windows", "2", "--gap-windows", "2", "--normal-minutes", "0.2"],
    );
    let labels = std::fs::read_to_string(out.join("labels.csv")).unwrap();
    for fault in hil_tests::workload::FAULTS {
        assert!(labels.contains(&format!(",{fault}\n")), "{fault} not injected:\n{labels}");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for part in ["## Per fault class", "## Windows", "## False alarms", "## Goals", "RSS at the end"] {
        assert!(report.contains(part), "report lacks {part}:\n{report}");
    }
    let samples = std::fs::read_to_string(out.join("samples.csv")).unwrap();
    let scored = samples.lines().filter(|l| l.contains(",edge_anomaly_score,")).count();
    assert!(scored >= 20, "{scored} scored windows");
    // The serial sensor was watched under its stable name.
    let features = std::fs::read_to_string(out.join("features.csv")).unwrap();
    assert!(features
        .lines()
        .next()
        .unwrap()
        .contains(&format!("dev_ops_per_s{{{}}}", hil_tests::workload::SENSOR_LINK)));
    // The packet-loss rule is gone.
    let t = Command::new("nft").args(["list", "tables"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&t.stdout).contains("edge_scenarios"));
    println!("{report}");
}

/// The pump runner end to end (a smoke run): the simulated pump's PLC
/// polled at 10 Hz, the agent capturing its tags from the wire with the
/// shipped pump model (model/pump/), two process fault classes injected;
/// the agent's stop alarm catches both, and the report has its parts.
/// The long evaluation (every class, rounds, normal hours) is the README's
/// command; its report is model/pump/report/.
#[test]
fn pump_runner_detects_two_process_fault_classes_through_the_agent() {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (probes)".to_string());
    }
    missing.extend(unbuilt(&["edge-agent", "pump_sim"]));
    if !e2e::require("pump scenario runner test", &missing) {
        return;
    }
    let out = e2e::tempdir("pump-scenarios");
    let model = e2e::repo_dir().join("model/pump/anomaly.card.json");
    run_scenarios(
        "pump-evaluate",
        &model,
        &out,
        &[
            "--faults",
            "sensor_dropout,valve_closure",
            "--window-ms",
            "5000",
            "--fault-windows",
            "8",
            "--gap-windows",
            "4",
            "--normal-minutes",
            "0.5",
            "--seed",
            "3",
        ],
    );
    let labels = std::fs::read_to_string(out.join("labels.csv")).unwrap();
    for fault in ["sensor_dropout", "valve_closure"] {
        assert!(labels.contains(&format!(",{fault},")), "{fault} not injected:\n{labels}");
    }
    // The run's options, for `pump-report` to write the report again.
    let run: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!((run["window_ms"].as_u64(), run["fault_windows"].as_u64()), (Some(5000), Some(8)), "{run}");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for part in
        ["## Per fault class", "## Point-wise", "## False alarms", "## Goals", "RSS at the end", "without its hold"]
    {
        assert!(report.contains(part), "report lacks {part}:\n{report}");
    }
    assert!(report.contains("every fault class detected at the stop level (the agent's alarm): **met**"), "{report}");
    // The model saw the pump's values (its tags all captured).
    let features = std::fs::read_to_string(out.join("features.csv")).unwrap();
    assert!(features.lines().next().unwrap().contains("value_mean{discharge_pressure}"));
    println!("{report}");
}
