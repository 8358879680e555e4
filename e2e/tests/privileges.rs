//! Started as root, the agent becomes `run_as` once its probes are loaded,
//! with only the capabilities reloads need (edge-agent/src/privileges.rs):
//! checked in /proc, and then the probes are disabled, reloaded with
//! another filter and counted again on SIGHUP, all without root.

use e2e::*;
use std::time::Duration;

const USER: &str = "edge-e2e";

fn status_field(pid: i32, field: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix(&format!("{field}:"))).map(|v| v.trim().to_owned()).unwrap_or_default()
}

#[test]
fn root_is_dropped_after_load_and_reloads_still_work() {
    if !require_root_and_tools() {
        return;
    }
    let (uid, _) = system_user(USER);
    let dir = tempdir("privileges");
    let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let second = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (p1, p2) = (first.local_addr().unwrap().port(), second.local_addr().unwrap().port());
    let top = format!("run_as = \"{USER}\"");
    let mut agent =
        Agent::start(&dir, &AgentSetup { class_ports: &[p1], top: &top, ..AgentSetup::offline("privileges-1", "") });
    let pid = agent.proc.pid();
    wait_for("the agent to give up root", Duration::from_secs(10), || {
        agent.proc.assert_running();
        if agent.proc.log_text().contains("no longer root") {
            Ok(())
        } else {
            Err(agent.proc.log_text())
        }
    });

    // No root left: every uid is the user's, only the kept capabilities,
    // none to hand on, and no way back through exec of a setuid binary.
    assert_eq!(status_field(pid, "Uid"), format!("{uid}\t{uid}\t{uid}\t{uid}"));
    let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap").unwrap().trim().parse().unwrap();
    let kept = edge_agent_kept_mask(last_cap);
    for field in ["CapEff", "CapPrm"] {
        assert_eq!(u64::from_str_radix(&status_field(pid, field), 16).unwrap(), kept, "{field}");
    }
    for field in ["CapInh", "CapAmb"] {
        assert_eq!(u64::from_str_radix(&status_field(pid, field), 16).unwrap(), 0, "{field}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    // The store is the user's now, and the agent keeps writing to it.
    let store = dir.join("agent-state/store");
    let meta = std::fs::metadata(&store).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), uid, "store directory not handed over");

    let count = |a: &Agent| {
        a.metric("edge_tcp_connections_opened_total{direction=\"outbound\",port_class=\"e2e\"}").unwrap_or(0.0)
    };
    let connect = |l: &std::net::TcpListener, n: usize| {
        for _ in 0..n {
            let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
            let (s, _) = l.accept().unwrap();
            drop((c, s));
        }
    };
    connect(&first, 3);
    wait_for("3 connections counted", Duration::from_secs(10), || match count(&agent) {
        3.0 => Ok(()),
        n => Err(n),
    });

    // SIGHUP without root: every probe off (programs freed), then on again
    // with another port watched: load, attach and count with the kept
    // capabilities only.
    let attached = |a: &Agent, p: &str| a.metric(&format!("edge_agent_probe_attached{{probe=\"{p}\"}}"));
    let conf = agent.config_path().to_owned();
    let original = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(
        &conf,
        format!("{original}\n[probes.tcp_lifecycle]\nenabled = false\n[probes.protocols]\nenabled = false\n"),
    )
    .unwrap();
    agent.proc.signal(libc::SIGHUP);
    wait_for("the probes detached", Duration::from_secs(10), || {
        agent.proc.assert_running();
        match (attached(&agent, "tcp_lifecycle"), attached(&agent, "protocols")) {
            (Some(0.0), Some(0.0)) => Ok(()),
            other => Err(other),
        }
    });
    std::fs::write(&conf, original.replace(&format!("e2e = [{p1}]"), &format!("e2e = [{p2}]"))).unwrap();
    agent.proc.signal(libc::SIGHUP);
    wait_for("the probes attached again without root", Duration::from_secs(10), || {
        agent.proc.assert_running();
        match (attached(&agent, "tcp_lifecycle"), attached(&agent, "protocols")) {
            (Some(1.0), Some(1.0)) => Ok(()),
            other => Err(format!("{other:?}\n{}", agent.proc.log_text())),
        }
    });
    connect(&second, 2);
    connect(&first, 1);
    // The agent's counters run on across reloads: 3 before, 2 now.
    wait_for("connections to the newly watched port", Duration::from_secs(10), || match count(&agent) {
        5.0 => Ok(()),
        n => Err(n),
    });
    assert_eq!(status_field(pid, "Uid"), format!("{uid}\t{uid}\t{uid}\t{uid}"), "root came back");
    // The programs' missed events are still read (their fdinfo) without root.
    wait_for("missed runs exported without root", Duration::from_secs(10), || {
        match agent.metric("edge_agent_probe_missed_runs_total{probe=\"tcp_lifecycle\"}") {
            Some(_) => Ok(()),
            None => Err(agent.proc.log_text()),
        }
    });
    assert!(stored(&dir, "edge_agent_store_bytes", &["lane=\"routine\""]).is_some(), "nothing stored");
}

#[test]
fn an_unknown_user_keeps_root_and_says_so() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("privileges-unknown");
    let agent = Agent::start(
        &dir,
        &AgentSetup { top: "run_as = \"no-such-user-e2e\"", ..AgentSetup::offline("privileges-2", "") },
    );
    let pid = agent.proc.pid();
    wait_for("the warning", Duration::from_secs(10), || {
        let log = agent.proc.log_text();
        if log.contains("still running as root") && log.contains("no-such-user-e2e") {
            Ok(())
        } else {
            Err(log)
        }
    });
    assert_eq!(status_field(pid, "Uid"), "0\t0\t0\t0");
}

/// edge_agent::privileges::kept_mask, restated: the test states what it
/// expects rather than asking the code under test.
fn edge_agent_kept_mask(last_cap: u32) -> u64 {
    let base = 1u64 << 2 | 1 << 12 | 1 << 19; // DAC_READ_SEARCH, NET_ADMIN, SYS_PTRACE
    if last_cap >= 39 {
        base | 1 << 38 | 1 << 39 // PERFMON, BPF
    } else {
        base | 1 << 21 // SYS_ADMIN
    }
}
