//! After an outage, live data goes first and the backlog drains behind it
//! at `mqtt.drain_bytes_per_sec`; everything arrives.

use e2e::*;
use std::time::{Duration, Instant};

const WINDOW_MS: i64 = 200;
const RATE: f64 = 1500.0; // bytes per second

#[test]
fn live_data_first_and_the_backlog_within_its_budget() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("drain");
    let mut broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (mut bridge, _) = bridge(&dir, &broker, &prom.write_url(), "bridge-drain");
    let server = Server::start();
    let ports = [server.port];
    let extra = "[store]\nblock_max_windows = 4\n";
    let mut agent = Agent::start(
        &dir,
        &AgentSetup {
            device: "drainer",
            broker: Some(&broker),
            identity: None,
            window_ms: WINDOW_MS as u64,
            class_ports: &ports,
            state_dir: None,
            extra,
        },
    );
    let conf = dir.join("agent.toml");
    // Steady state first (the true time learned), then the outage.
    wait_for("a first confirmed block", Duration::from_secs(30), || {
        match agent.metric("edge_agent_uplink_confirmed_blocks_total") {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(other),
        }
    });
    agent.proc.stop();
    broker.stop();
    // The budget applies from the next start; a restart also proves the
    // backlog survives it.
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, text.replace("[mqtt]\n", &format!("[mqtt]\ndrain_bytes_per_sec = {RATE}\n"))).unwrap();
    let t_down = now_ms();
    agent.restart();
    wait_for("40 windows of backlog", Duration::from_secs(60), || {
        agent.proc.assert_running();
        match agent.metric("edge_agent_store_backlog_records{lane=\"routine\"}") {
            Some(n) if n >= 40.0 => Ok(()),
            other => Err(other),
        }
    });
    let t_online = now_ms();
    broker.restart();
    let started = Instant::now();
    let sel = "edge_agent_store_bytes{device=\"drainer\",lane=\"priority\"}";

    // Live data arrives while most of the backlog is still on the device.
    let backlog_when_live = wait_for("a live sample", Duration::from_secs(60), || {
        bridge.assert_running();
        let s = prom.raw_samples(sel, 600).map_err(|e| e.to_string())?;
        if s.iter().any(|(t, _)| *t > t_online) {
            Ok(s.iter().filter(|(t, _)| *t > t_down && *t < t_online).count())
        } else {
            Err(format!("{} samples", s.len()))
        }
    });
    assert!(backlog_when_live < 30, "live data waited for {backlog_when_live} backlog windows");

    // The backlog drains within its budget...
    let backlog_windows = wait_for("the whole backlog", Duration::from_secs(120), || {
        agent.proc.assert_running();
        let sent = agent.metric("edge_agent_uplink_published_bytes_total{stream=\"backlog\"}").unwrap_or(0.0);
        // One second of burst plus one block of debt (blocks are not split).
        let allowed = RATE * (started.elapsed().as_secs_f64() + 1.0) + 4096.0;
        assert!(sent <= allowed, "backlog sent {sent} B, budget allows {allowed:.0}");
        match agent.metric("edge_agent_store_backlog_records{lane=\"routine\"}") {
            Some(n) if n <= 2.0 => Ok(sent),
            other => Err(other),
        }
    });
    // ...and nothing is missing: one sample per window from the outage on.
    let s = prom.raw_samples(sel, 600).unwrap();
    let outage: Vec<i64> = s.iter().map(|x| x.0).filter(|t| *t > t_down && *t < t_online).collect();
    // (The backlog count included a few windows from before the outage.)
    assert!(outage.len() >= 35, "{} outage windows in Prometheus", outage.len());
    assert!(t_online - outage[outage.len() - 1] < 3 * WINDOW_MS, "the last outage windows are missing");
    for w in outage.windows(2) {
        assert!(w[1] - w[0] < 3 * WINDOW_MS, "gap between {} and {}", w[0], w[1]);
    }
    eprintln!(
        "backlog: {backlog_windows} B in {:.1} s ({:.0} B/s, budget {RATE}); live data came with {backlog_when_live} backlog windows in",
        started.elapsed().as_secs_f64(),
        backlog_windows / started.elapsed().as_secs_f64()
    );
}
