//! Client certificate rotation (edge-agent/src/uplink/rotation.rs): a new
//! certificate and key dropped in `<state_dir>/tls-drop/` are checked,
//! tried on the next connection, installed once the broker accepted them
//! and used from then on; one from another CA or for another device is
//! refused and moved aside, the agent delivering on with the identity it
//! had; a box offline when the certificate comes takes it when the broker
//! is back. Every decision is a line in `<state_dir>/tls/audit.log`.
//! A certificate near its expiry is renewed over the uplink
//! (uplink/renewal.rs): a request out, `fleet-bridge certificates sign`
//! answers it, the answer is rotated in like a dropped one.

use e2e::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A certificate and key for `id` from the CA in `ca_dir` (ca.crt,
/// ca.key), made in a directory of its own: (cert, key).
fn certificate(ca_dir: &Path, out: &Path, id: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(out).unwrap();
    for f in ["ca.crt", "ca.key"] {
        if ca_dir.join(f).exists() {
            std::fs::copy(ca_dir.join(f), out.join(f)).unwrap();
        }
    }
    let script = repo_dir().join("scripts/fleet-certs.sh");
    if !out.join("ca.crt").exists() {
        assert!(Command::new(&script).arg(out).arg("ca").status().unwrap().success());
    }
    assert!(Command::new(&script).arg(out).args(["device", id]).status().unwrap().success());
    (out.join("devices").join(format!("{id}.crt")), out.join("devices").join(format!("{id}.key")))
}

/// Drops a candidate as an operator must: each file written under
/// another name and renamed in place, the key first, the certificate last
/// (the agent looks for the certificate).
fn drop_in(state: &Path, (cert, key): &(PathBuf, PathBuf)) {
    let d = state.join("tls-drop");
    for (from, name) in [(key, "device.key"), (cert, "device.crt")] {
        std::fs::copy(from, d.join(format!(".{name}.new"))).unwrap();
        std::fs::rename(d.join(format!(".{name}.new")), d.join(name)).unwrap();
    }
}

fn audit(state: &Path) -> String {
    std::fs::read_to_string(state.join("tls/audit.log")).unwrap_or_default()
}

fn rotations(a: &Agent, result: &str) -> f64 {
    a.metric(&format!("edge_agent_tls_rotations_total{{result=\"{result}\"}}")).unwrap_or(0.0)
}

/// Until the agent counted `n` rotations with `result` (the audit log
/// says why not yet).
fn wait_rotations(agent: &mut Agent, state: &Path, result: &str, n: f64, what: &str, secs: u64) {
    wait_for(what, Duration::from_secs(secs), || {
        agent.proc.assert_running();
        if rotations(agent, result) == n {
            Ok(())
        } else {
            Err(audit(state))
        }
    });
}

/// The time of the device's newest window in Prometheus (Unix seconds):
/// its certificate's expiry goes with every window.
fn newest(prom: &Prom, device: &str) -> f64 {
    let q = format!("max(timestamp(edge_agent_tls_certificate_expiry_timestamp_seconds{{device=\"{device}\"}}))");
    prom.scalar(&q).ok().flatten().unwrap_or(0.0)
}

/// Until a window of the device made after now has landed.
fn wait_more_landed(prom: &Prom, device: &str, agent: &mut Agent, what: &str) {
    let since = now_ms() as f64 / 1000.0;
    wait_for(what, Duration::from_secs(60), || {
        agent.proc.assert_running();
        let newest = newest(prom, device);
        if newest > since {
            Ok(())
        } else {
            Err(format!("newest sample at {newest}, waiting for one after {since}"))
        }
    });
}

#[test]
fn a_dropped_certificate_is_tried_then_installed_and_bad_ones_are_refused() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("rotation");
    let device = format!("e2e-rotation-{}", std::process::id());
    let mut broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (_bridge, _) = bridge(&dir, &broker, &prom.write_url(), &format!("bridge-{device}"));
    let state = dir.join("agent-state");
    let mut agent = Agent::launch(&dir, &AgentSetup { broker: Some(&broker), ..AgentSetup::offline(&device, QUIET) });
    wait_more_landed(&prom, &device, &mut agent, "the agent's windows with its first certificate");

    // 1. From another CA: refused before it is tried, moved aside.
    let foreign = certificate(&dir.join("foreign-ca"), &dir.join("foreign"), &device);
    drop_in(&state, &foreign);
    wait_rotations(&mut agent, &state, "refused", 1.0, "the foreign certificate refused", 30);
    assert!(audit(&state).contains("not_from_ca"), "{}", audit(&state));
    assert!(!state.join("tls-drop/device.crt").exists(), "a refused candidate is moved aside");
    assert!(std::fs::read_dir(state.join("tls-drop/refused")).unwrap().count() == 2);

    // 2. The fleet CA's, for another device: refused (a rotation never
    //    changes the identity).
    let other = certificate(&broker.pki, &dir.join("other"), "e2e-someone-else");
    drop_in(&state, &other);
    wait_rotations(&mut agent, &state, "refused", 2.0, "the other device's certificate refused", 30);
    assert!(audit(&state).contains("other_identity"), "{}", audit(&state));
    wait_more_landed(&prom, &device, &mut agent, "windows still landing with the first certificate");

    // 3. A new one from the fleet CA for this device: tried, installed.
    let renewed = certificate(&broker.pki, &dir.join("renewed"), &device);
    drop_in(&state, &renewed);
    wait_rotations(&mut agent, &state, "installed", 1.0, "the renewed certificate installed", 30);
    let installed = std::fs::read_to_string(state.join("tls/identity.pem")).unwrap();
    assert!(installed.starts_with(&std::fs::read_to_string(&renewed.0).unwrap()), "identity.pem holds the new chain");
    assert!(installed.contains("PRIVATE KEY"), "and its key");
    assert!(!state.join("tls-drop/device.crt").exists() && !state.join("tls-drop/device.key").exists());
    let log = audit(&state);
    assert!(log.contains("certificate trying") && log.contains("certificate installed"), "{log}");
    wait_more_landed(&prom, &device, &mut agent, "windows landing with the renewed certificate");

    // 4. Offline when the next one comes: taken once the broker is back,
    //    and used after a restart of the agent too.
    broker.stop();
    wait_for("the agent to see the broker gone", Duration::from_secs(30), || {
        if agent.metric("edge_agent_uplink_connected") == Some(0.0) {
            Ok(())
        } else {
            Err("still connected")
        }
    });
    let offline = certificate(&broker.pki, &dir.join("offline"), &device);
    drop_in(&state, &offline);
    broker.restart();
    wait_rotations(&mut agent, &state, "installed", 2.0, "the certificate dropped while offline installed", 60);
    assert!(std::fs::read_to_string(state.join("tls/identity.pem"))
        .unwrap()
        .starts_with(&std::fs::read_to_string(&offline.0).unwrap()));
    assert!(state.join("tls/identity.pem.old").exists(), "the identity before is kept");
    agent.proc.kill();
    agent.relaunch();
    wait_more_landed(&prom, &device, &mut agent, "windows landing after a restart, with the installed certificate");
    assert_eq!(rotations(&agent, "refused"), 0.0, "nothing to decide after the restart");
}

/// The documented recovery of a box whose certificate expired while it was
/// away: the broker refuses it (the agent counts why and keeps storing);
/// a new certificate dropped in is tried, installed, and the backlog
/// stored meanwhile lands.
#[test]
fn a_box_whose_certificate_expired_is_recovered_by_dropping_a_new_one() {
    if !require_root_and_tools() {
        return;
    }
    if !require_tools("the expired-certificate test", &["faketime"]) {
        return;
    }
    let dir = tempdir("rotation-expired");
    let device = format!("e2e-expired-{}", std::process::id());
    let broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (_bridge, _) = bridge(&dir, &broker, &prom.write_url(), &format!("bridge-{device}"));
    // Its certificate: from the fleet CA, valid for one day in 2020. The
    // broker's certificate files hold it where the agent's config points.
    let made = Command::new("faketime")
        .args(["2020-01-01 00:00:00", &repo_dir().join("scripts/fleet-certs.sh").display().to_string()])
        .arg(&broker.pki)
        .args(["device", &device])
        .env("FLEET_CERT_DAYS", "1")
        .status()
        .unwrap();
    assert!(made.success(), "an expired certificate made under faketime");
    let state = dir.join("agent-state");
    let mut agent = Agent::launch(&dir, &AgentSetup { broker: Some(&broker), ..AgentSetup::offline(&device, QUIET) });
    wait_for("the broker to refuse the expired certificate", Duration::from_secs(60), || {
        agent.proc.assert_running();
        let refused = agent
            .metric("edge_agent_tls_handshake_failures_total{reason=\"client_certificate_expired\"}")
            .unwrap_or(0.0);
        // Several refused attempts: windows wait in the store meanwhile.
        if refused >= 4.0 {
            Ok(())
        } else {
            Err(agent.proc.log_text().lines().rev().take(3).collect::<Vec<_>>().join("\n"))
        }
    });
    assert_eq!(newest(&prom, &device), 0.0, "nothing landed with the expired certificate");

    let dropped_at = now_ms() as f64 / 1000.0;
    drop_in(&state, &certificate(&broker.pki, &dir.join("renewed"), &device));
    wait_rotations(&mut agent, &state, "installed", 1.0, "the new certificate installed", 60);
    // The windows stored while it could not connect land too.
    wait_for("the backlog stored before the new certificate", Duration::from_secs(60), || {
        let selector = format!("edge_agent_tls_certificate_expiry_timestamp_seconds{{device=\"{device}\"}}");
        let samples = prom.raw_samples(&selector, 600).map_err(|e| e.to_string())?;
        let before = samples.iter().filter(|(t, _)| (*t as f64) / 1000.0 < dropped_at).count();
        if before >= 3 {
            Ok(())
        } else {
            Err(format!("{before} of {} samples from before the drop", samples.len()))
        }
    });
}

/// The device's certificate from the fleet CA, valid `days` (where the
/// agent's config points: made before the broker's helper makes one).
fn expiring_certificate(broker: &Broker, device: &str, days: u32) {
    let made = Command::new(repo_dir().join("scripts/fleet-certs.sh"))
        .arg(&broker.pki)
        .args(["device", device])
        .env("FLEET_CERT_DAYS", days.to_string())
        .status()
        .unwrap();
    assert!(made.success());
}

fn renewals(a: &Agent, result: &str) -> f64 {
    a.metric(&format!("edge_agent_tls_renewals_total{{result=\"{result}\"}}")).unwrap_or(0.0)
}

/// A box whose certificate expires in 20 days (renewed 45 days before, the
/// default) makes a new key and request at once; the operator's signer
/// answers it through the broker; the box tries the certificate, installs
/// it, clears its request, and delivers on with it. The signer run again
/// finds nothing to do. Every step is in the box's audit trail.
#[test]
fn a_certificate_near_its_expiry_is_renewed_over_the_uplink() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("renewal");
    let device = format!("e2e-renewal-{}", std::process::id());
    let broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (_bridge, _) = bridge(&dir, &broker, &prom.write_url(), &format!("bridge-{device}"));
    expiring_certificate(&broker, &device, 20);
    let state = dir.join("agent-state");
    let mut agent = Agent::launch(&dir, &AgentSetup { broker: Some(&broker), ..AgentSetup::offline(&device, QUIET) });
    wait_for("the certificate request", Duration::from_secs(30), || {
        agent.proc.assert_running();
        if renewals(&agent, "requested") == 1.0 {
            Ok(())
        } else {
            Err(agent.proc.log_text().lines().rev().take(3).collect::<Vec<_>>().join("\n"))
        }
    });
    let csr = std::fs::read_to_string(state.join("tls/request.csr")).unwrap();
    assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"), "{csr}");

    let conf = operator_config(&dir, &broker);
    let sign = || certificates_sign(&conf, &broker.pki);
    // The request is on the broker once the agent is connected.
    wait_for("the signer to answer the request", Duration::from_secs(60), || {
        agent.proc.assert_running();
        match sign() {
            (Some(0), out) if out.contains("1 signed") => Ok(()),
            other => Err(other),
        }
    });
    wait_rotations(&mut agent, &state, "installed", 1.0, "the signed certificate installed", 60);
    assert_eq!(renewals(&agent, "delivered"), 1.0);
    let expiry = agent.metric("edge_agent_tls_certificate_expiry_timestamp_seconds").unwrap_or(0.0);
    assert!(expiry > (now_ms() / 1000 + 300 * 86_400) as f64, "the new certificate's expiry: {expiry}");
    // The key was made on the box and stays there: it is the one of the
    // installed identity, and no request waits any more.
    assert!(!state.join("tls/request.key").exists() && !state.join("tls/request.csr").exists());
    wait_more_landed(&prom, &device, &mut agent, "windows landing with the renewed certificate");
    // The answered request is cleared: nothing to sign.
    wait_for("the request cleared", Duration::from_secs(30), || match sign() {
        (Some(0), out) if out.contains("0 signed, 0 already answered, 0 refused") => Ok(()),
        other => Err(other),
    });
    assert_eq!(renewals(&agent, "requested"), 1.0, "one request");
    let audited: Vec<String> = {
        let mut a = Vec::new();
        wait_for("the renewal in the audit trail", Duration::from_secs(60), || {
            a = audit_events(&dir.join("audit"), &device).into_iter().map(|(e, _)| e).collect::<Vec<_>>();
            if a.iter().any(|e| e == "certificate_installed") {
                Ok(())
            } else {
                Err(a.clone())
            }
        });
        a
    };
    let steps: Vec<&String> = audited.iter().filter(|e| e.starts_with("certificate_")).collect();
    assert_eq!(
        steps,
        ["certificate_requested", "certificate_delivered", "certificate_trying", "certificate_installed"],
        "{audited:?}"
    );
    let log = std::fs::read_dir(dir.join("audit"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("certificates-"))
        .expect("the signer's log");
    let text = std::fs::read_to_string(log).unwrap();
    assert!(text.contains("\"step\":\"signed\"") && text.contains(&device), "{text}");
}

/// A broker still on an ACL from before renewal (no `csr` topic for the
/// devices, nor the groups' model topics) refuses the request and,
/// mosquitto's way, ends the connection. The box keeps delivering: it
/// publishes its request only after a block was confirmed on a connection,
/// and again at most once an hour, so the refusal costs one reconnect, not
/// the uplink; a refused subscription (its group's models) costs nothing.
#[test]
fn a_broker_refusing_the_request_costs_one_reconnect_not_the_uplink() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("renewal-old-acl");
    let device = format!("e2e-oldacl-{}", std::process::id());
    let mut broker = Broker::start(&dir);
    let acl = broker.pki.join("acl");
    let old: String = std::fs::read_to_string(&acl)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("/csr") && !l.contains("group/+/model"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&acl, old).unwrap();
    broker.stop();
    broker.restart();
    let prom = Prom::start(&dir);
    let (_bridge, _) = bridge(&dir, &broker, &prom.write_url(), &format!("bridge-{device}"));
    expiring_certificate(&broker, &device, 20);
    // Detection on (the shipped model), in a group: it subscribes to the
    // group's model topic, which that ACL does not grant.
    let extra = format!(
        "[probes.tcp_lifecycle]\nenabled = false\n[probes.devices]\nenabled = false\n[probes.protocols]\n\
         enabled = false\n[probes.buses]\nenabled = false\n[detect]\nmodel = \"{}\"\n\
         [remote_config]\ngroups = [\"line-1\"]\n",
        repo_dir().join("model/shipped/anomaly.card.json").display()
    );
    let mut agent = Agent::launch(&dir, &AgentSetup { broker: Some(&broker), ..AgentSetup::offline(&device, &extra) });
    wait_for("the request refused", Duration::from_secs(60), || {
        agent.proc.assert_running();
        match agent.metric("edge_agent_uplink_connects_total") {
            Some(n) if n >= 2.0 => Ok(()),
            other => Err(format!("connects {other:?}, requested {}", renewals(&agent, "requested"))),
        }
    });
    for what in ["windows landing after the refusal", "and still landing"] {
        wait_more_landed(&prom, &device, &mut agent, what);
    }
    assert_eq!(agent.metric("edge_agent_uplink_connects_total"), Some(2.0), "one reconnect for the refused request");
    assert!(std::fs::read_to_string(dir.join("agent-state/tls/request.csr")).is_ok(), "the request still waits");
}
