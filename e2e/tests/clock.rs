//! A device whose wall clock is 3 hours behind (and not synchronized), with
//! a backlog recorded offline: once it reaches a bridge it learns the true
//! time, and every sample lands at the time it was really taken.

use e2e::*;
use std::time::Duration;

const THREE_HOURS_MS: i64 = 3 * 3_600_000;

#[test]
fn a_clock_three_hours_behind_lands_at_the_true_time() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("clock");
    let mut broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (mut bridge, _) = bridge(&dir, &broker, &prom.write_url(), "bridge-clock");
    // Offline first: the backlog is stamped 3 h behind.
    broker.stop();
    let server = Server::start();
    let t_start = now_ms();
    let extra = format!("[clock]\ntest_offset_ms = {}\n", -THREE_HOURS_MS);
    let ports = [server.port];
    let mut agent = Agent::start(
        &dir,
        &AgentSetup {
            device: "skewed",
            broker: Some(&broker),
            identity: None,
            mqtt: "",
            window_ms: 500,
            class_ports: &ports,
            state_dir: None,
            extra: &extra,
            top: "",
            connection: None,
        },
    );
    server.connections(3);
    wait_for("a backlog of windows", Duration::from_secs(30), || {
        agent.proc.assert_running();
        match agent.metric("edge_agent_store_appended_records_total{lane=\"routine\"}") {
            Some(n) if n >= 6.0 => Ok(()),
            other => Err(other),
        }
    });
    let t_online = now_ms();
    broker.restart();
    server.connections(2);

    let sel = "edge_tcp_connections_opened_total{device=\"skewed\",direction=\"outbound\",port_class=\"e2e\"}";
    // Live data goes first: wait for it and for the backlog to be confirmed.
    let samples = wait_for("all 5 connections and the backlog in Prometheus", Duration::from_secs(60), || {
        agent.proc.assert_running();
        bridge.assert_running();
        let s = prom.raw_samples(sel, 4 * 3600).map_err(|e| e.to_string())?;
        let left = agent.metric("edge_agent_store_backlog_records{lane=\"routine\"}").unwrap_or(f64::MAX);
        match s.last() {
            Some((_, v)) if *v == 5.0 && left <= 2.0 => Ok(s),
            other => Err(format!("{other:?}, backlog {left}")),
        }
    });
    let t_end = now_ms();
    // Every sample at its true time (the correction's error is half a
    // loopback round trip, under the 1 s tolerance), none 3 h back.
    for (t, v) in &samples {
        assert!((t_start - 1000..=t_end + 1000).contains(t), "sample {v} at {t}, test ran {t_start}..{t_end}");
    }
    assert!(
        samples.iter().any(|(t, v)| *t < t_online && *v == 3.0),
        "the backlog recorded offline is there, corrected: {samples:?}"
    );
    let error = agent.metric("edge_agent_clock_error_ms").unwrap();
    assert!((error - THREE_HOURS_MS as f64).abs() < 1000.0, "learned clock error {error}");
    assert!(agent.metric("edge_agent_clock_time_replies_total").unwrap() >= 1.0);
    assert_eq!(agent.metric("edge_agent_clock_uncorrected_blocks_total"), Some(0.0));
}

/// libfaketime for multi-threaded programs (Debian's `faketime` package).
fn libfaketime() -> Option<std::path::PathBuf> {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketimeMT.so.1"))
        .find(|p| p.exists());
    if found.is_none() {
        require("the clock-years-behind test", &["libfaketime (scripts/setup.sh installs faketime)"]);
    }
    found
}

/// A box that knew the true time once (its clock journal says so) reboots
/// with its clock three years behind (no RTC; libfaketime here), before its
/// broker's certificate was issued. It used to never connect ("not yet
/// valid"), so it could never learn the true time. Now it checks the
/// certificate at the last true time it knew, says so at WARN, learns the
/// time from the bridge, and its windows land at their true time.
#[test]
fn a_clock_years_behind_still_connects_and_lands_at_the_true_time() {
    if !require_root_and_tools() {
        return;
    }
    let Some(lib) = libfaketime() else { return };
    let dir = tempdir("clock-years");
    let broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (mut bridge, _) = bridge(&dir, &broker, &prom.write_url(), "bridge-clock-years");
    let quiet = "[probes.devices]\nenabled = false\n[probes.protocols]\nenabled = false\n\
                 [probes.buses]\nenabled = false\n[detect]\nenabled = false\n";
    let mut setup = AgentSetup::offline("years-behind", quiet);
    setup.broker = Some(&broker);
    setup.window_ms = 300;
    let mut agent = Agent::start(&dir, &setup);
    // A first run with a right clock: the journal learns the true time.
    wait_for("a first confirmed block", Duration::from_secs(60), || {
        agent.proc.assert_running();
        match agent.metric("edge_agent_uplink_confirmed_blocks_total") {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(other),
        }
    });
    agent.proc.stop();

    let t_start = now_ms();
    let lib = lib.display().to_string();
    let env = [("LD_PRELOAD", lib.as_str()), ("FAKETIME", "-1095d"), ("DONT_FAKE_MONOTONIC", "1")];
    agent.restart_with(&env);
    let sel = "edge_agent_store_bytes{device=\"years-behind\",lane=\"routine\"}";
    let landed = wait_for("windows of the run three years behind", Duration::from_secs(60), || {
        agent.proc.assert_running();
        bridge.assert_running();
        let s = prom.raw_samples(sel, 3600).map_err(|e| e.to_string())?;
        let after: Vec<_> = s.into_iter().filter(|(t, _)| *t >= t_start - 1000).collect();
        if after.len() >= 5 {
            Ok(after)
        } else {
            Err(format!("{} windows of the second run", after.len()))
        }
    });
    let t_end = now_ms();
    for (t, v) in &landed {
        assert!(*t <= t_end + 1000, "window {v} at {t}, after the test's end {t_end}");
    }
    let log = agent.proc.log_text();
    assert!(log.contains("this box's clock is before"), "said at WARN:\n{log}");
    // The clock error travels with every window (the boot's true time was
    // learned in the first run: same boot, so no new request is needed).
    let errors = prom.raw_samples("edge_agent_clock_error_ms{device=\"years-behind\"}", 3600).unwrap();
    let (_, error) = errors.last().copied().expect("the clock error in Prometheus");
    let three_years = 1095.0 * 86_400_000.0;
    assert!((error - three_years).abs() < 5_000.0, "clock error {error}");
    let _ = std::fs::remove_dir_all(dir);
}
