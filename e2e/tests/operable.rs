//! Failures an operator can act on: a bridge setting that would break at
//! run time stops it at start, naming the file and the key; an agent that
//! cannot reach its broker says so at WARN with the reason, once a minute,
//! and does not claim to drain a backlog it never reached the broker with.

use e2e::*;
use std::process::Command;
use std::time::Duration;

#[test]
fn bridge_settings_that_fail_at_run_time_stop_it_at_start() {
    let dir = tempdir("bridge-config");
    for (key, toml) in [
        ("remote_write.timeout_ms", "[remote_write]\ntimeout_ms = 0\n"),
        ("mqtt.dead_letter_prefix", "[mqtt]\ndead_letter_prefix = \"fleet/+/dead\"\n"),
        ("remote_write.max_sample_ahead_secs", "[remote_write]\nmax_sample_ahead_secs = 999999\n"),
    ] {
        let file = dir.join("bridge.toml");
        std::fs::write(&file, toml).unwrap();
        let out = Command::new(bin_dir().join("fleet-bridge")).arg("--config").arg(&file).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: {err}");
        assert!(err.contains(&file.display().to_string()) && err.contains(key), "{key}: {err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_unreachable_broker_is_said_at_warn_once_with_the_reason() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("unreachable");
    // No broker: a closed loopback port (plain TCP, loopback: no warning).
    let quiet = "[probes.devices]\nenabled = false\n[probes.protocols]\nenabled = false\n\
                 [probes.buses]\nenabled = false\n[detect]\nenabled = false\n";
    let mut agent = Agent::start(&dir, &AgentSetup::offline("unreachable", quiet));
    wait_for("five failed connection attempts", Duration::from_secs(60), || {
        agent.proc.assert_running();
        match agent.metric("edge_agent_uplink_errors_total") {
            Some(n) if n >= 5.0 => Ok(()),
            other => Err(other),
        }
    });
    let log = agent.proc.log_text();
    let warned: Vec<&str> =
        log.lines().filter(|l| l.contains("WARN") && l.contains("cannot connect to the broker")).collect();
    assert_eq!(warned.len(), 1, "once a minute, not once an attempt:\n{log}");
    assert!(warned[0].contains("reason") && warned[0].contains("\"refused\""), "{}", warned[0]);
    assert!(!log.contains("draining the backlog"), "no backlog is drained without a broker:\n{log}");
    assert!(!log.contains("plain TCP to a broker"), "loopback is not warned about");
    let _ = std::fs::remove_dir_all(dir);
}
