//! The scenario runner works end to end (a smoke run, short windows): it
//! starts the box's workload and the agent with the shipped model, injects
//! every fault class (nftables included), and writes labels, features, the
//! agent's scores and a report. The evaluation itself (10 s windows, long
//! normal runs) is a command in the README; its results are in the shipped
//! model's card and BENCHMARKS.md.

use std::process::Command;

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
    let agent = e2e::bin_dir().join("edge-agent");
    if !agent.exists() {
        missing.push(format!("{} (cargo build --workspace --bins)", agent.display()));
    }
    if !e2e::require("scenario runner test", &missing) {
        return;
    }
    let out = e2e::tempdir("scenarios");
    let model = e2e::repo_dir().join("model/shipped/anomaly.card.json");
    let o = Command::new(env!("CARGO_BIN_EXE_scenarios"))
        .args(["evaluate", "--model", &model.display().to_string(), "--out", &out.display().to_string()])
        .args(["--window-ms", "1000", "--fault-windows", "2", "--gap-windows", "2", "--normal-minutes", "0.2"])
        .args(["--agent", &agent.display().to_string()])
        .output()
        .expect("scenarios");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "scenarios failed:\n{stderr}");
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
