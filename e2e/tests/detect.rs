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

/// Steady normal activity: a connection every 50 ms to the class port,
/// paced by deadlines (not by sleeps after each connection), so a busy
/// machine that delays one connection does not lower the window's rate.
fn normal_activity(server: Arc<Server>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let period = Duration::from_millis(50);
        let mut next = std::time::Instant::now();
        while !stop.load(Ordering::Relaxed) {
            server.connections(1);
            next += period;
            let now = std::time::Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            } else if now - next > period * 10 {
                // Stalled for longer than a window: start afresh, no burst.
                next = now;
            }
        }
    })
}

/// Subscribes to `line/#` on a plain broker on loopback; messages arrive
/// on the channel.
fn line_subscriber(port: u16) -> (std::sync::mpsc::Receiver<Vec<u8>>, std::thread::JoinHandle<()>) {
    let (tx, rx) = std::sync::mpsc::channel();
    let (subscribed_tx, subscribed) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        for _ in 0..50 {
            let (client, mut conn) = rumqttc::Client::new(rumqttc::MqttOptions::new("line-plc", "127.0.0.1", port), 10);
            client.subscribe("line/#", rumqttc::QoS::AtLeastOnce).unwrap();
            for ev in conn.iter() {
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if tx.send(p.payload.to_vec()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    subscribed.recv_timeout(Duration::from_secs(15)).expect("subscribed to the line broker");
    (rx, h)
}

/// The agent's warm-up after its start (no raise): its debug build's start
/// slows this box for a few 500 ms windows (connect times up), which the
/// model, trained on a steady minute, sees as unusual.
const WARMUP_SECS: u64 = 6;

fn detect_section(card: &Path, extra: &str) -> String {
    format!(
        "[detect]\nmodel = \"{}\"\nraise_after = 2\nclear_after = 3\nwarmup_secs = {WARMUP_SECS}\n{extra}\n",
        card.display()
    )
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
///
/// The threshold's margin is 1000 (the pipeline's default is 1.5): 45 s of
/// perfectly paced loopback connections give a model that sees a 10 %
/// slower window (a CI machine busy with something else) as far outside
/// normal, which it is, for that data. (The agent's own start is covered
/// by its warm-up, WARMUP_SECS.) With a margin of 100 an idle machine
/// still raised the alarm once on normal activity: two windows of slower
/// loopback connects (p50 and p99 connect time) scored 1.6 times that
/// threshold. This test checks the pipeline's mechanics (load, score,
/// debounce, action, records, updates), not the model's quality
/// (`hil-tests` scenarios evaluate that); the refusals it injects score
/// about 10^5 times the default threshold, ~150 times this one.
fn train(dir: &Path, features: &Path) -> PathBuf {
    let out = dir.join("model");
    let o = Command::new(repo_dir().join("model/run.sh"))
        .args(["train", "--name", "e2e", "--margin", "1000", "--warn-margin", "300", "--out"])
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
    e2e::settled(&dir, 90);
    agent.proc.stop();
    let normal = dir.join("normal.csv");
    export(&dir, "features", &normal);

    // 2. Train on it.
    let card = train(&dir, &normal);

    // 3. The agent with the model: loaded, quiet while normal. Its local
    // action: a command, and a message to the line's broker (a plain
    // mosquitto on loopback: no uplink involved).
    // The command runs as the agent's user (it gives up root): a directory
    // anyone may write.
    let actions_dir = dir.join("actions");
    std::fs::create_dir_all(&actions_dir).unwrap();
    std::fs::set_permissions(&actions_dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let actions = actions_dir.join("actions.log");
    let line_port = free_port();
    let _line_broker = Proc::spawn(
        "line-broker",
        &dir,
        &which("mosquitto").expect("mosquitto"),
        &["-p".into(), line_port.to_string()],
        &[],
    );
    let (line_rx, line_msgs) = line_subscriber(line_port);
    // And the line's PLC (the simulated pump, not polled): its e-stop coil.
    let writes = dir.join("plc-writes.log");
    let plc_port = free_port();
    let _plc = Proc::spawn(
        "plc",
        &dir,
        &e2e::bin_dir().join("pump_sim"),
        &[
            "--port".into(),
            plc_port.to_string(),
            "--no-poll".into(),
            "--writes-log".into(),
            writes.display().to_string(),
        ],
        &[],
    );
    let action = format!(
        "[detect.action]\ncommand = [\"sh\", \"-c\", \"env | grep ^EDGE_ | sort >> {0}; grep CapAmb /proc/self/status >> {0}\"]\n\
         mqtt_port = {line_port}\nmqtt_topic = \"line/3/stop\"\non_clear = true\nmin_interval_secs = 600\n\n\
         [detect.action.modbus_write]\nserver = \"127.0.0.1:{plc_port}\"\ntable = \"coil\"\naddress = 7\n",
        actions.display()
    );
    let plc_writes = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&writes)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    };
    let extra = format!("{}{action}", detect_section(&card, ""));
    setup.extra = &extra;
    let mut agent = Agent::start(&dir, &setup);
    assert_eq!(model_state(&agent).as_deref(), Some("loaded"), "log:\n{}", agent.proc.log_text());
    let scored = |a: &Agent| a.metric("edge_agent_detect_windows_scored_total").unwrap_or(0.0);
    // Past the warm-up, then 8 more windows: quiet.
    let warm = (WARMUP_SECS * 1000 / WINDOW_MS + 8) as f64;
    wait_for("the warm-up and 8 scored windows", Duration::from_secs(40), || {
        if scored(&agent) >= warm {
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
    // Alarm records: the priority lane's, less the audit trail's (read
    // until no audit record came between the two readings).
    let priority = |a: &Agent| loop {
        let audit = || a.metric("edge_agent_audit_records_total{result=\"stored\"}").unwrap_or(0.0);
        let before = audit();
        let all = a.metric("edge_agent_store_appended_records_total{lane=\"priority\"}").unwrap_or(0.0);
        if audit() == before {
            break all - before;
        }
    };
    assert_eq!(priority(&agent), 0.0, "a record on normal activity; log:\n{}", agent.proc.log_text());

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
    // The warn level (30 times the base, the stop 100 times) rose with it,
    // in the same window: one record for both.
    assert_eq!(agent.metric("edge_agent_anomaly_warnings_total"), Some(1.0));
    let anomaly_lines = |a: &Agent| {
        a.proc
            .log_text()
            .lines()
            .filter(|l| l.contains("anomaly") || l.contains("audited"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(priority(&agent), 1.0, "the raised record:\n{}", anomaly_lines(&agent));
    assert!(agent.proc.log_text().contains("anomaly alarm raised"));
    // The command ran with the event, without the agent's capabilities.
    let ran = wait_for("the action command", Duration::from_secs(10), || {
        std::fs::read_to_string(&actions).ok().filter(|t| t.contains("CapAmb")).ok_or(())
    });
    for want in [
        "EDGE_ANOMALY_EVENT=raised",
        "EDGE_DEVICE_ID=detect",
        "EDGE_ANOMALY_TOP_FEATURES=",
        "CapAmb:\t0000000000000000",
    ] {
        assert!(ran.contains(want), "{want} not in:\n{ran}");
    }
    // The line's broker got the stop message.
    // The PLC's e-stop coil was set, once (function 5, coil 7, on).
    let set = wait_for("the e-stop write", Duration::from_secs(10), || {
        let w = plc_writes();
        if w.is_empty() {
            Err(())
        } else {
            Ok(w)
        }
    });
    assert_eq!(set.len(), 1, "{set:?}");
    assert_eq!(
        (set[0]["function"].as_u64(), set[0]["address"].as_u64(), set[0]["values"].to_string()),
        (Some(5), Some(7), "[1]".to_string())
    );
    let msg = line_rx.recv_timeout(Duration::from_secs(10)).expect("a message on line/3/stop");
    let v: serde_json::Value = serde_json::from_slice(&msg).unwrap();
    assert_eq!((v["event"].as_str(), v["device"].as_str()), (Some("raised"), Some("detect")));
    assert!(v["score"].as_f64().unwrap() > v["threshold"].as_f64().unwrap());

    // 5. The fault ends: cleared after 3 quiet windows, a second record.
    fault.store(false, Ordering::Relaxed);
    refuser.join().unwrap();
    wait_for("the alarm to clear", Duration::from_secs(10), || {
        agent.metric("edge_anomaly_alarm").filter(|&v| v == 0.0).ok_or(agent.metric("edge_anomaly_score"))
    });
    assert_eq!(priority(&agent), 2.0, "the cleared record");
    // on_clear: the clear goes too (the rate limit holds back raises only).
    let msg = line_rx.recv_timeout(Duration::from_secs(10)).expect("the clear message");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&msg).unwrap()["event"].as_str(), Some("cleared"));
    // Counted by the action's thread once both parts are done (the
    // message may arrive here a moment before).
    wait_for("both actions counted", Duration::from_secs(5), || {
        agent.metric("edge_agent_anomaly_actions_total{result=\"ok\"}").filter(|&v| v == 2.0).ok_or(())
    });
    // The coil once set and once reset: one write per alarm event.
    let w = plc_writes();
    assert_eq!(w.len(), 2, "{w:?}");
    assert_eq!((w[1]["function"].as_u64(), w[1]["values"].to_string()), (Some(5), "[0]".to_string()));
    drop(line_msgs);
    agent.proc.stop();
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();

    // Scores went with the windows into the store (and so to Prometheus).
    let csv = dir.join("samples.csv");
    export(&dir, "csv", &csv);
    let text = std::fs::read_to_string(&csv).unwrap();
    let scores = text.lines().filter(|l| l.contains("edge_anomaly_score")).count();
    assert!(scores >= 15, "{scores} scores stored");
    // Each firing of the local action is in the records, by level.
    // (CSV: the labels quoted, their quotes doubled.)
    let plain = text.replace("\"\"", "\"");
    for (what, want) in [
        ("edge_anomaly_action,\"{event=\"raised\",result=\"started\"}", 1),
        ("edge_anomaly_action,\"{event=\"cleared\",result=\"started\"}", 1),
        ("edge_anomaly_event,\"{event=\"raised\",level=\"stop\"", 1),
        ("edge_anomaly_event,\"{event=\"raised\",level=\"warn\"", 1),
    ] {
        let n = plain.lines().filter(|l| l.contains(what)).count();
        assert_eq!(n, want, "{what} in the export:\n{text}");
    }

    refusals(&dir, &card);
    updates(&dir, &card);
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

fn openssl(args: &[&str]) {
    let st = Command::new("openssl").args(args).status().expect("openssl");
    assert!(st.success(), "openssl {args:?}");
}

fn sign(key: &Path, card: &Path) {
    let sig = format!("{}.sig", card.display());
    openssl(&[
        "pkeyutl",
        "-sign",
        "-rawin",
        "-inkey",
        &key.display().to_string(),
        "-in",
        &card.display().to_string(),
        "-out",
        &sig,
    ]);
}

/// `model/run.sh sign`: the card signed, `model.bundle` (the MQTT message).
fn pack(model_dir: &Path, key: &Path) {
    let o = Command::new(repo_dir().join("model/run.sh"))
        .args(["sign", "--model", &model_dir.display().to_string(), "--key", &key.display().to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Waits until the agent counted `n` model changes with `result`.
fn wait_change(a: &Agent, state: &Path, result: &str, n: f64, what: &str, secs: u64) {
    let metric = format!("edge_agent_detect_model_changes_total{{result=\"{result}\"}}");
    wait_for(what, Duration::from_secs(secs), || if a.metric(&metric) == Some(n) { Ok(()) } else { Err(audit(state)) });
}

fn audit(state: &Path) -> String {
    std::fs::read_to_string(state.join("model/audit.log")).unwrap_or_default()
}

fn running_sha(a: &Agent) -> Option<String> {
    let text = ureq::get(&format!("http://127.0.0.1:{}/metrics", a.metrics_port))
        .call()
        .ok()?
        .into_body()
        .read_to_string()
        .ok()?;
    let line = text.lines().find(|l| l.starts_with("edge_agent_detect_model_info{"))?;
    let at = line.find("sha256=\"")? + 8;
    Some(line[at..at + 64].to_owned())
}

fn sha_of(card: &Path) -> String {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(card).unwrap()).unwrap();
    v["model_sha256"].as_str().unwrap().to_owned()
}

/// Model updates without a restart: the factory model is the shipped one;
/// the test's trained model comes by file drop (unsigned: refused; signed:
/// installed), a rollback goes back, the same model comes again over MQTT
/// (retained, signed, packed by `model/run.sh sign`), a validly signed
/// model that fails its self-test is refused with the running one kept,
/// and at start a damaged installed model falls back to the previous one.
/// Every step is in the audit log.
fn updates(dir: &Path, trained: &Path) {
    let shipped = repo_dir().join("model/shipped/anomaly.card.json");
    let (shipped_sha, trained_sha) = (sha_of(&shipped), sha_of(trained));
    let d = dir.join("updates");
    std::fs::create_dir_all(&d).unwrap();
    let (key, public) = ed25519_key_pair(&d, "signing");
    let broker = Broker::start(&d);
    let state = d.join("agent-state");
    let drop_dir = state.join("model-drop");
    let section = detect_section(&shipped, &format!("update_public_key_file = \"{}\"", public.display()));
    let mut setup = AgentSetup::offline("detect-upd", &section);
    setup.window_ms = WINDOW_MS;
    setup.broker = Some(&broker);
    let mut a = Agent::start(&d, &setup);
    assert_eq!(running_sha(&a).as_deref(), Some(shipped_sha.as_str()), "log:\n{}", a.proc.log_text());
    // The agent made its drop directory (its own, after giving up root).
    assert!(drop_dir.is_dir());
    let drop_model = |signed: bool| {
        let staged = d.join("drop-staging");
        let card = copy_model(trained, &staged);
        if signed {
            sign(&key, &card);
            std::fs::copy(format!("{}.sig", card.display()), drop_dir.join("anomaly.card.json.sig")).unwrap();
        }
        // The card last: the agent looks for it.
        std::fs::copy(staged.join("anomaly.tflite"), drop_dir.join("anomaly.tflite")).unwrap();
        std::fs::copy(&card, drop_dir.join("anomaly.card.json")).unwrap();
    };

    // Unsigned: refused, kept aside in rejected/.
    drop_model(false);
    wait_change(&a, &state, "refused", 1.0, "the refusal", 10);
    assert!(audit(&state).contains("updates must be signed"), "{}", audit(&state));
    assert!(drop_dir.join("rejected/anomaly.card.json").exists());
    assert_eq!(running_sha(&a).as_deref(), Some(shipped_sha.as_str()));

    // Signed: installed without a restart.
    drop_model(true);
    wait_change(&a, &state, "installed", 1.0, "the install", 10);
    assert_eq!(running_sha(&a).as_deref(), Some(trained_sha.as_str()));
    assert_eq!(model_state(&a).as_deref(), Some("loaded"));
    assert!(!drop_dir.join("anomaly.card.json").exists(), "the drop is consumed");

    // Rollback: back to the shipped model.
    std::fs::write(drop_dir.join("ROLLBACK"), "").unwrap();
    wait_change(&a, &state, "rolled_back", 1.0, "the rollback", 10);
    assert_eq!(running_sha(&a).as_deref(), Some(shipped_sha.as_str()));

    // Over MQTT: the operator publishes the signed message, retained.
    let m = d.join("mqtt-model");
    copy_model(trained, &m);
    pack(&m, &key);
    let publish = |payload: Vec<u8>| {
        let mut o = broker.mqtt_options("operator", Who::Admin);
        o.set_max_packet_size(2 << 20, 2 << 20);
        let (client, mut conn) = rumqttc::Client::new(o, 10);
        client.publish("edge/detect-upd/model", rumqttc::QoS::AtLeastOnce, true, payload).unwrap();
        for ev in conn.iter() {
            match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("operator's publish: {e}"),
            }
        }
    };
    publish(std::fs::read(m.join("model.bundle")).unwrap());
    wait_change(&a, &state, "installed", 2.0, "the MQTT install", 15);
    assert_eq!(running_sha(&a).as_deref(), Some(trained_sha.as_str()));

    // Signed, but it computes differently from its golden vectors.
    let bad = d.join("bad-model");
    let bad_card = copy_model(trained, &bad);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&bad_card).unwrap()).unwrap();
    let x = v["golden"][1]["output"][2].as_f64().unwrap();
    v["golden"][1]["output"][2] = serde_json::json!(x + 1.0);
    // A different model file too, so it is not the running one.
    let mut tfl = std::fs::read(bad.join("anomaly.tflite")).unwrap();
    tfl.extend_from_slice(&[0u8; 16]);
    v["model_sha256"] = serde_json::json!(sha256_hex(&tfl));
    std::fs::write(bad.join("anomaly.tflite"), &tfl).unwrap();
    std::fs::write(&bad_card, serde_json::to_vec(&v).unwrap()).unwrap();
    pack(&bad, &key);
    publish(std::fs::read(bad.join("model.bundle")).unwrap());
    wait_change(&a, &state, "refused", 2.0, "the self-test refusal", 15);
    assert!(audit(&state).contains("golden self-test"), "{}", audit(&state));
    assert_eq!(running_sha(&a).as_deref(), Some(trained_sha.as_str()), "the running model stays");

    // Restarts keep the installed model; a damaged one falls back.
    a.proc.stop();
    let mut a = Agent::start(&d, &setup);
    assert_eq!(running_sha(&a).as_deref(), Some(trained_sha.as_str()));
    a.proc.stop();
    let current = state.join("model/current/anomaly.tflite");
    let mut b = std::fs::read(&current).unwrap();
    b[100] ^= 0x55;
    std::fs::write(&current, b).unwrap();
    let mut a = Agent::start(&d, &setup);
    assert_eq!(running_sha(&a).as_deref(), Some(shipped_sha.as_str()), "log:\n{}", a.proc.log_text());
    a.proc.stop();
    let log = audit(&state);
    let events: Vec<&str> = log.lines().map(|l| l.split(' ').nth(1).unwrap_or("")).collect();
    assert_eq!(
        events,
        ["refused", "installed", "rolled_back", "installed", "refused", "refused", "rolled_back"],
        "audit log:\n{log}"
    );
}

fn sha256_hex(data: &[u8]) -> String {
    let out = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(data)?;
            c.wait_with_output()
        });
    String::from_utf8_lossy(&out.unwrap().stdout).split_whitespace().next().unwrap().to_owned()
}
