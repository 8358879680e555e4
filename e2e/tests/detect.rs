//! On-device detection end to end, offline: the agent records normal
//! activity, `model/run.sh train` (pinned TensorFlow) trains a model on the
//! agent's own export, and the agent loads it (golden self-test), scores
//! every window, raises an alarm within the debounce when connections are
//! refused, writes the alarm to the priority lane, clears it when the fault
//! ends. Damaged, unapproved and miscomputing models are refused with the
//! agent running on.

use e2e::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WINDOW_MS: u64 = 500;

/// Steady normal activity: a connection every 50 ms to the class port.
fn normal_activity(server: Arc<Server>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            server.connections(1);
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

fn detect_section(card: &Path, extra: &str) -> String {
    format!("[detect]\nmodel = \"{}\"\nraise_after = 2\nclear_after = 3\n{extra}\n", card.display())
}

fn model_state(a: &Agent) -> Option<String> {
    ["loaded", "missing", "refused", "disabled"]
        .into_iter()
        .find(|s| a.metric(&format!("edge_agent_detect_model_state{{state=\"{s}\"}}")) == Some(1.0))
        .map(str::to_owned)
}

fn export(dir: &Path, format: &str, out: &Path) {
    let st = Command::new(bin_dir().join("edge-agent"))
        .args(["store", "export", "--dir", &dir.join("agent-state/store").display().to_string(), "--format", format])
        .arg("--output")
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Trains a model on `features` with the pipeline; its card's path.
fn train(dir: &Path, features: &Path) -> PathBuf {
    let out = dir.join("model");
    let o = Command::new(repo_dir().join("model/run.sh"))
        .args(["train", "--name", "e2e", "--out"])
        .arg(&out)
        .arg("--normal")
        .arg(features)
        .output()
        .expect("model/run.sh");
    assert!(
        o.status.success(),
        "model/run.sh train failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    out.join("anomaly.card.json")
}

fn copy_model(from: &Path, to: &Path) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for f in ["anomaly.card.json", "anomaly.tflite"] {
        std::fs::copy(from.parent().unwrap().join(f), to.join(f)).unwrap();
    }
    to.join("anomaly.card.json")
}

#[test]
fn trained_model_scores_windows_and_alarms_offline() {
    if !require_root_and_tools() {
        return;
    }
    if !require("detection test", &if which("python3").is_none() { vec!["python3"] } else { vec![] }) {
        return;
    }
    let dir = tempdir("detect");
    let server = Arc::new(Server::start());
    let closed = Server::start().port;
    // Nothing listens on `closed` once its listener is dropped (above).
    let ports = [server.port, closed];
    let stop = Arc::new(AtomicBool::new(false));
    let load = normal_activity(server.clone(), stop.clone());

    // 1. Record normal activity (no model yet: state missing).
    let missing = dir.join("no-such-model/anomaly.card.json");
    let extra = detect_section(&missing, "");
    let mut setup = AgentSetup::offline("detect", &extra);
    setup.window_ms = WINDOW_MS;
    setup.class_ports = &ports;
    let mut agent = Agent::start(&dir, &setup);
    assert_eq!(model_state(&agent).as_deref(), Some("missing"));
    std::thread::sleep(Duration::from_millis(WINDOW_MS * 90));
    agent.proc.stop();
    let normal = dir.join("normal.csv");
    export(&dir, "features", &normal);

    // 2. Train on it.
    let card = train(&dir, &normal);

    // 3. The agent with the model: loaded, quiet while normal.
    let extra = detect_section(&card, "");
    setup.extra = &extra;
    let mut agent = Agent::start(&dir, &setup);
    assert_eq!(model_state(&agent).as_deref(), Some("loaded"), "log:\n{}", agent.proc.log_text());
    let scored = |a: &Agent| a.metric("edge_agent_detect_windows_scored_total").unwrap_or(0.0);
    wait_for("10 scored windows", Duration::from_secs(30), || {
        if scored(&agent) >= 10.0 {
            Ok(())
        } else {
            Err(scored(&agent))
        }
    });
    assert_eq!(
        agent.metric("edge_anomaly_alarm"),
        Some(0.0),
        "an alarm on normal activity; log:\n{}",
        agent.proc.log_text()
    );
    let priority = |a: &Agent| a.metric("edge_agent_store_appended_records_total{lane=\"priority\"}").unwrap_or(0.0);
    assert_eq!(priority(&agent), 0.0);

    // 4. Refused connections: raised within the debounce (2 windows above
    // the threshold; 3 windows allowed), one record in the priority lane.
    let before = scored(&agent);
    let fault = Arc::new(AtomicBool::new(true));
    let f2 = fault.clone();
    let refuser = std::thread::spawn(move || {
        while f2.load(Ordering::Relaxed) {
            refused(closed, 5);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    wait_for("the alarm", Duration::from_millis(WINDOW_MS * 6), || {
        agent.metric("edge_anomaly_alarm").filter(|&v| v == 1.0).ok_or(agent.metric("edge_anomaly_score"))
    });
    let took = scored(&agent) - before;
    assert!(took <= 4.0, "alarm after {took} windows");
    assert_eq!(agent.metric("edge_agent_anomaly_alarms_total"), Some(1.0));
    assert_eq!(priority(&agent), 1.0, "the raised record");
    assert!(agent.proc.log_text().contains("anomaly alarm raised"));

    // 5. The fault ends: cleared after 3 quiet windows, a second record.
    fault.store(false, Ordering::Relaxed);
    refuser.join().unwrap();
    wait_for("the alarm to clear", Duration::from_secs(10), || {
        agent.metric("edge_anomaly_alarm").filter(|&v| v == 0.0).ok_or(agent.metric("edge_anomaly_score"))
    });
    assert_eq!(priority(&agent), 2.0, "the cleared record");
    agent.proc.stop();
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();

    // Scores went with the windows into the store (and so to Prometheus).
    let csv = dir.join("samples.csv");
    export(&dir, "csv", &csv);
    let text = std::fs::read_to_string(&csv).unwrap();
    let scores = text.lines().filter(|l| l.contains("edge_anomaly_score")).count();
    assert!(scores >= 15, "{scores} scores stored");

    refusals(&dir, &card);
}

/// Models the agent must refuse, each with the agent running on.
fn refusals(dir: &Path, card: &Path) {
    let run = |name: &str, card: &Path, extra: &str| -> String {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let section = detect_section(card, extra);
        let mut setup = AgentSetup::offline("detect", &section);
        setup.window_ms = WINDOW_MS;
        let mut a = Agent::start(&d, &setup);
        assert_eq!(model_state(&a).as_deref(), Some("refused"), "{name}: log:\n{}", a.proc.log_text());
        // Windows go on being stored, unscored.
        wait_for("windows", Duration::from_secs(10), || {
            a.metric("edge_agent_windows_total").filter(|&v| v >= 3.0).ok_or(())
        });
        assert_eq!(a.metric("edge_agent_detect_windows_scored_total"), Some(0.0));
        a.proc.stop();
        a.proc.log_text()
    };

    // A damaged model file: its hash is not the card's.
    let damaged = copy_model(card, &dir.join("damaged-model"));
    let tfl = damaged.parent().unwrap().join("anomaly.tflite");
    let mut bytes = std::fs::read(&tfl).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&tfl, bytes).unwrap();
    let log = run("damaged", &damaged, "");
    assert!(log.contains("is not the card's"), "{log}");

    // Not the approved model (pinned hash).
    let log = run("unapproved", card, &format!("model_sha256 = \"{}\"", "ab".repeat(32)));
    assert!(log.contains("not the approved model"), "{log}");

    // A model that computes differently from the reference: the card's
    // golden outputs no longer match what TF Lite gives.
    let wrong = copy_model(card, &dir.join("golden-model"));
    let text = std::fs::read_to_string(&wrong).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let out = &mut v["golden"][0]["output"][0];
    *out = serde_json::json!(out.as_f64().unwrap() + 0.5);
    std::fs::write(&wrong, serde_json::to_string(&v).unwrap()).unwrap();
    let log = run("golden", &wrong, "");
    assert!(log.contains("failed its golden self-test"), "{log}");

    // Not a model card at all.
    let junk = dir.join("junk.card.json");
    std::fs::write(&junk, "{\"format\": 1}").unwrap();
    let log = run("junk", &junk, "");
    assert!(log.contains("not a model card"), "{log}");
}
