//! Remote configuration end to end (docs/remote-config.md), through the
//! real broker (the operator's identity on the central listener), bridge
//! and Prometheus: documents made by `fleet-bridge config pack` and signed;
//! a group's document that keeps the uplink healthy is kept; a device's
//! document that breaks the uplink (a closed port) is reverted by the box
//! itself within the deadline; an unsigned one and one that would turn TLS
//! off are refused. Every step is in the bridge's audit log. Canary
//! rollouts (`fleet-bridge rollout`) of a configuration and of a model:
//! promoted from healthy canaries, rolled back on a regression, the
//! canaries' own topics put back as they were.

use e2e::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const GROUP: &str = "line-1";

fn remote(a: &Agent, result: &str) -> f64 {
    a.metric(&format!("edge_agent_remote_configs_total{{result=\"{result}\"}}")).unwrap_or(0.0)
}

fn wait_remote(a: &mut Agent, result: &str, n: f64, what: &str, secs: u64) {
    wait_for(what, Duration::from_secs(secs), || {
        a.proc.assert_running();
        match remote(a, result) {
            x if x == n => Ok(()),
            x => Err(format!(
                "{x}; log tail: {}",
                a.proc.log_text().lines().rev().take(5).collect::<Vec<_>>().join(" | ")
            )),
        }
    });
}

/// `fleet-bridge config pack`: the document's payload.
fn pack(dir: &Path, target: &str, id: &str, toml: &str, key: Option<&Path>) -> Vec<u8> {
    let (file, out) = (dir.join(format!("{id}.toml")), dir.join(format!("{id}.doc")));
    std::fs::write(&file, toml).unwrap();
    let mut cmd = Command::new(bin_dir().join("fleet-bridge"));
    cmd.args(["config", "pack", "--target", target, "--id", id]);
    if let Some(k) = key {
        cmd.arg("--key").arg(k);
    }
    let o = cmd.arg(&file).arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

/// Publishes retained as the operator (fleet-admin).
fn publish(broker: &Broker, topic: &str, payload: Vec<u8>) {
    let (client, mut conn) = rumqttc::Client::new(broker.mqtt_options("operator", Who::Admin), 10);
    client.publish(topic, rumqttc::QoS::AtLeastOnce, true, payload).unwrap();
    for ev in conn.iter() {
        match ev {
            Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("operator's publish: {e}"),
        }
    }
}

/// The retained message of `topic`, read as the operator.
fn retained(broker: &Broker, topic: &str) -> Option<Vec<u8>> {
    let (client, mut conn) = rumqttc::Client::new(broker.mqtt_options("operator-read", Who::Admin), 10);
    client.subscribe(topic, rumqttc::QoS::AtLeastOnce).unwrap();
    let mut subscribed = None;
    loop {
        match conn.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))) if p.topic == topic => {
                return Some(p.payload.to_vec())
            }
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)))) => {
                assert!(
                    !a.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)),
                    "the operator may not read {topic}"
                );
                subscribed = Some(std::time::Instant::now());
            }
            Ok(Err(e)) => panic!("operator's subscription: {e}"),
            _ => {}
        }
        if subscribed.is_some_and(|t| t.elapsed() > Duration::from_secs(1)) {
            return None;
        }
    }
}

#[test]
fn a_config_that_breaks_the_uplink_is_reverted_by_the_box_and_every_step_is_audited() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("remote-config");
    let device = format!("e2e-remote-{}", std::process::id());
    let (key, public) = ed25519_key_pair(&dir, "config");
    let broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (_bridge, _) = bridge(&dir, &broker, &prom.write_url(), &format!("bridge-{device}"));
    let log = dir.join("audit");
    let extra = format!(
        "{QUIET}[remote_config]\nenabled = true\ngroups = [\"{GROUP}\"]\npublic_key_file = \"{}\"\ndeadline_secs = 10\n",
        public.display()
    );
    let mut agent = Agent::launch(&dir, &AgentSetup { broker: Some(&broker), ..AgentSetup::offline(&device, &extra) });
    let audited = |e: &str| audit_events(&log, &device).iter().filter(|(x, _)| x == e).count();
    wait_for("the agent's start in the audit log", Duration::from_secs(30), || {
        (audited("agent_started") == 1).then_some(()).ok_or(audit_events(&log, &device))
    });

    // 1. The group's document: a new keep-alive, the uplink restarted with
    //    it, a block confirmed: kept.
    let doc = pack(&dir, &format!("group:{GROUP}"), "keepalive-20", "[mqtt]\nkeep_alive_secs = 20\n", Some(&key));
    publish(&broker, &format!("edge/group/{GROUP}/config"), doc);
    wait_remote(&mut agent, "kept", 1.0, "the group's document kept", 30);
    assert!(agent.proc.log_text().contains("uplink restarted with new [mqtt] settings"));

    // 2. The device's document: a port where no broker listens. The box
    //    cannot deliver, goes back by itself after 10 s, and delivers again.
    let closed = free_port();
    let doc = pack(&dir, &format!("device:{device}"), "bad-port", &format!("[mqtt]\nport = {closed}\n"), Some(&key));
    publish(&broker, &format!("edge/{device}/config"), doc);
    wait_remote(&mut agent, "applied", 2.0, "the bad document applied", 30);
    wait_remote(&mut agent, "reverted", 1.0, "the bad document reverted", 40);
    wait_for("the revert in the bridge's audit log", Duration::from_secs(30), || {
        agent.proc.assert_running();
        (audited("config_reverted") == 1).then_some(()).ok_or(audit_events(&log, &device))
    });
    let lines: Vec<serde_json::Value> =
        audit_log(&log).into_iter().filter(|l| l["device"] == device.as_str()).collect();
    let reverted = lines.iter().find(|l| l["event"] == "config_reverted").unwrap();
    assert_eq!(reverted["fields"]["id"], "bad-port");
    assert!(reverted["fields"]["reason"].as_str().unwrap().contains("within 10 s"), "{reverted}");
    let kept = lines.iter().find(|l| l["event"] == "config_kept").unwrap();
    assert_eq!(kept["fields"]["id"], "keepalive-20");
    assert!(lines.iter().all(|l| l["link"] == "first" || l["link"] == "next"), "{lines:?}");
    // The retained bad document comes again with every connection: it is
    // not tried again.
    assert_eq!(remote(&agent, "applied"), 2.0);

    // 3. Refused: unsigned; signed but turning TLS off.
    let unsigned = pack(&dir, &format!("device:{device}"), "unsigned", "[mqtt]\nkeep_alive_secs = 30\n", None);
    publish(&broker, &format!("edge/{device}/config"), unsigned);
    wait_remote(&mut agent, "refused", 1.0, "the unsigned document refused", 30);
    let no_tls = pack(&dir, &format!("device:{device}"), "no-tls", "[mqtt.tls]\nenabled = false\n", Some(&key));
    publish(&broker, &format!("edge/{device}/config"), no_tls);
    wait_remote(&mut agent, "refused", 2.0, "the TLS-off document refused", 30);
    wait_for("the refusals in the bridge's audit log", Duration::from_secs(30), || {
        (audited("config_refused") == 2).then_some(()).ok_or(audit_events(&log, &device))
    });
    let errors: Vec<String> = audit_log(&log)
        .iter()
        .filter(|l| l["device"] == device.as_str() && l["event"] == "config_refused")
        .map(|l| l["fields"]["error"].as_str().unwrap().to_owned())
        .collect();
    assert!(errors[0].contains("not signed"), "{errors:?}");
    assert!(errors[1].contains("mqtt.tls"), "{errors:?}");
    assert_eq!(remote(&agent, "applied"), 2.0, "nothing refused was applied");
}

/// An agent of group `GROUP` with the TCP probe attached, in `dir`.
fn grouped_agent(dir: &Path, broker: &Broker, device: &str, public: &Path) -> Agent {
    std::fs::create_dir_all(dir).unwrap();
    let extra = format!(
        "[probes.devices]\nenabled = false\n[probes.protocols]\nenabled = false\n[probes.buses]\nenabled = false\n\
         [detect]\nenabled = false\n[remote_config]\nenabled = true\ngroups = [\"{GROUP}\"]\n\
         public_key_file = \"{}\"\ndeadline_secs = 10\n",
        public.display()
    );
    Agent::start(dir, &AgentSetup { broker: Some(broker), ..AgentSetup::offline(device, &extra) })
}

#[test]
fn a_rollout_is_promoted_from_healthy_canaries_and_rolled_back_on_a_probe_lost() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("rollout");
    let (key, public) = ed25519_key_pair(&dir, "config");
    let broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let pid = std::process::id();
    let (canary, other) = (format!("e2e-canary-{pid}"), format!("e2e-other-{pid}"));
    let (_bridge, _) = bridge(&dir, &broker, &prom.write_url(), &format!("bridge-{canary}"));
    let mut a = grouped_agent(&dir.join("a"), &broker, &canary, &public);
    let mut b = grouped_agent(&dir.join("b"), &broker, &other, &public);
    let attached = |x: &Agent| x.metric("edge_agent_probe_attached{probe=\"tcp_lifecycle\"}").unwrap_or(0.0);
    // Both deliver their probes' state before the rollout starts.
    for d in [&canary, &other] {
        let q = format!("sum(last_over_time(edge_agent_probe_attached{{device=\"{d}\"}}[5m]))");
        wait_for("the probe's state in Prometheus", Duration::from_secs(30), || match prom.scalar(&q) {
            Ok(Some(v)) if v >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        });
    }
    // The canary has a document of its own: a rollout puts it back.
    let own_toml = "[mqtt]\nlive_interval_ms = 0\n";
    publish(
        &broker,
        &format!("edge/{canary}/config"),
        pack(&dir, &format!("device:{canary}"), "own", own_toml, Some(&key)),
    );
    wait_remote(&mut a, "kept", 1.0, "the canary's own document kept", 40);
    let conf = operator_config(&dir, &broker);
    let rollout = |id: &str, overlay: &str| {
        let file = dir.join(format!("{id}.toml"));
        std::fs::write(&file, overlay).unwrap();
        e2e::rollout(&conf, &prom, GROUP, &canary, id, &["--key".as_ref(), key.as_os_str(), file.as_os_str()])
    };

    // 1. Healthy: promoted; the other box of the group takes it too.
    let (code, out) = rollout("keepalive-20", "[mqtt]\nkeep_alive_secs = 20\n");
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("watched device:{canary}: healthy")), "{out}");
    assert!(out.contains(&format!("promoted group:{GROUP}")), "{out}");
    wait_remote(&mut b, "kept", 1.0, "the group's document kept by the other box", 40);
    let own = retained(&broker, &format!("edge/{canary}/config")).expect("the canary's document");
    let own = edge_wire::config_doc::ConfigDoc::decode(&own).unwrap().doc;
    assert_eq!((own.id.as_str(), own.toml.as_str()), ("keepalive-20-promoted", own_toml), "its own TOML put back");

    // 2. The canary keeps its uplink but loses its probe: rolled back, and
    //    the probe attached again; the other box never saw the document.
    let (code, out) = rollout("no-tcp-probe", "[probes.tcp_lifecycle]\nenabled = false\n");
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("unhealthy: 0 probes attached,"), "{out}");
    assert!(out.contains(&format!("rolled_back device:{canary}")), "{out}");
    wait_for("the canary's probe attached again", Duration::from_secs(40), || {
        a.proc.assert_running();
        (attached(&a) == 1.0).then_some(()).ok_or(attached(&a))
    });
    assert_eq!(attached(&b), 1.0);
    assert_eq!(remote(&b, "applied"), 1.0, "the other box took only the promoted document");
    let steps = std::fs::read_dir(dir.join("audit"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("rollout-"))
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect::<String>();
    for step in ["start", "canary", "watched", "promoted", "restored", "rolled_back"] {
        assert!(steps.contains(&format!("\"step\":\"{step}\"")), "{step}: {steps}");
    }
    b.proc.assert_running();
}

/// `model/run.sh sign`: the card signed, `<dir>/model.bundle` (the MQTT
/// message) made.
fn sign_model(model_dir: &Path, key: &Path) -> Vec<u8> {
    let o = Command::new(repo_dir().join("model/run.sh"))
        .args(["sign", "--model", &model_dir.display().to_string(), "--key", &key.display().to_string()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(model_dir.join("model.bundle")).unwrap()
}

/// The shipped model as `name` in `dir`, with `threshold`; `pad` bytes
/// after its .tflite make it another model file (its SHA-256 in the card).
/// Returns the card and the model's SHA-256.
fn model_variant(dir: &Path, name: &str, threshold: f64, pad: usize) -> (std::path::PathBuf, String) {
    let shipped = repo_dir().join("model/shipped");
    std::fs::create_dir_all(dir).unwrap();
    let mut tfl = std::fs::read(shipped.join("anomaly.tflite")).unwrap();
    tfl.extend(std::iter::repeat_n(0u8, pad));
    let sha = {
        let o =
            Command::new("sha256sum").stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).spawn();
        let mut child = o.unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), &tfl).unwrap();
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap().to_owned()
    };
    std::fs::write(dir.join("anomaly.tflite"), &tfl).unwrap();
    let mut card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shipped.join("anomaly.card.json")).unwrap()).unwrap();
    card["name"] = serde_json::json!(name);
    card["threshold"] = serde_json::json!(threshold);
    card["model_sha256"] = serde_json::json!(sha);
    std::fs::write(dir.join("anomaly.card.json"), serde_json::to_vec_pretty(&card).unwrap()).unwrap();
    (dir.join("anomaly.card.json"), sha)
}

fn model_changes(a: &Agent, result: &str) -> f64 {
    a.metric(&format!("edge_agent_detect_model_changes_total{{result=\"{result}\"}}")).unwrap_or(0.0)
}

fn runs(a: &Agent, name: &str, sha: &str) -> bool {
    a.metric(&format!("edge_agent_detect_model_info{{name=\"{name}\",sha256=\"{sha}\"}}")) == Some(1.0)
}

/// A model rollout: a model that keeps the canary quiet is promoted to the
/// group (the other box takes it from the group's topic); one that raises
/// the canary's alarm is rolled back, the canary going back to the group's
/// model, and the other box never sees it.
#[test]
fn a_model_rollout_is_promoted_and_one_raising_alarms_is_rolled_back() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("model-rollout");
    let (key, public) = ed25519_key_pair(&dir, "model");
    // The factory model never raises its alarm; so does the good one; the
    // bad one raises it at every window.
    let (factory, _) = model_variant(&dir.join("factory"), "factory", 1e9, 0);
    let (_, good_sha) = model_variant(&dir.join("good"), "good", 1e9, 16);
    let good = sign_model(&dir.join("good"), &key);
    let (_, bad_sha) = model_variant(&dir.join("bad"), "bad", 1e-9, 32);
    let bad = sign_model(&dir.join("bad"), &key);
    let broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let pid = std::process::id();
    let (canary, other) = (format!("e2e-mcanary-{pid}"), format!("e2e-mother-{pid}"));
    let (_bridge, _) = bridge(&dir, &broker, &prom.write_url(), &format!("bridge-{canary}"));
    let agent = |sub: &str, device: &str| {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).unwrap();
        let extra = format!(
            "[probes.devices]\nenabled = false\n[probes.protocols]\nenabled = false\n[probes.buses]\nenabled = false\n\
             [detect]\nmodel = \"{}\"\nupdate_public_key_file = \"{}\"\nwarmup_secs = 0\nraise_after = 2\n\
             [remote_config]\ngroups = [\"{GROUP}\"]\n",
            factory.display(),
            public.display()
        );
        Agent::start(&d, &AgentSetup { broker: Some(&broker), ..AgentSetup::offline(device, &extra) })
    };
    let mut a = agent("a", &canary);
    let mut b = agent("b", &other);
    for d in [&canary, &other] {
        let q = format!("sum(last_over_time(edge_agent_detect_model_changes_total{{device=\"{d}\"}}[5m]))");
        wait_for("the boxes' model counts in Prometheus", Duration::from_secs(30), || match prom.scalar(&q) {
            Ok(Some(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        });
    }
    let conf = operator_config(&dir, &broker);
    let rollout = |id: &str, bundle: &[u8]| {
        let file = dir.join(format!("{id}.bundle"));
        std::fs::write(&file, bundle).unwrap();
        e2e::rollout(&conf, &prom, GROUP, &canary, id, &["--model".as_ref(), file.as_os_str()])
    };

    // 1. Quiet: promoted; the other box takes it from the group's topic.
    let (code, out) = rollout("good-model", &good);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("watched device:{canary}: healthy")), "{out}");
    wait_for("the other box running the promoted model", Duration::from_secs(40), || {
        b.proc.assert_running();
        runs(&b, "good", &good_sha).then_some(()).ok_or(model_changes(&b, "installed"))
    });
    assert!(runs(&a, "good", &good_sha), "the canary runs it, from the group's topic now");
    assert_eq!(model_changes(&a, "installed"), 1.0, "the group's copy of the model it runs is not installed again");
    assert_eq!(retained(&broker, &format!("edge/{canary}/model")), None, "the canary's own topic as it was: empty");

    // 2. Alarms: rolled back; the canary goes back to the group's model.
    let (code, out) = rollout("bad-model", &bad);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("unhealthy: its anomaly alarm was raised"), "{out}");
    assert!(out.contains(&format!("rolled_back device:{canary}")), "{out}");
    wait_for("the canary back on the group's model", Duration::from_secs(40), || {
        a.proc.assert_running();
        runs(&a, "good", &good_sha).then_some(()).ok_or(model_changes(&a, "installed"))
    });
    assert_eq!(model_changes(&a, "installed"), 3.0, "good, bad, good again");
    assert!(!runs(&b, "bad", &bad_sha));
    assert_eq!(model_changes(&b, "installed"), 1.0, "the other box took only the promoted model");
    a.proc.assert_running();
}
