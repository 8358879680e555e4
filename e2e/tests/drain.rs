//! After an outage, live data goes first and the backlog drains behind it
//! at `mqtt.drain_bytes_per_sec`; everything arrives, also when the agent
//! is SIGKILLed in the middle of the drain.

use e2e::*;
use std::time::{Duration, Instant};

const WINDOW_MS: i64 = 200;
const RATE: f64 = 1500.0; // bytes per second
const SEL: &str = "edge_agent_store_bytes{device=\"drainer\",lane=\"priority\"}";

/// An agent with a backlog of about 40 windows recorded while the broker was
/// down, and the broker just back.
struct Outage {
    _broker: Broker,
    prom: Prom,
    bridge: Proc,
    agent: Agent,
    t_down: i64,
    t_online: i64,
    started: Instant,
}

fn outage(name: &str) -> Outage {
    let dir = tempdir(name);
    let mut broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (bridge, _) = bridge(&dir, &broker, &prom.write_url(), &format!("bridge-{name}"));
    let server = Server::start();
    let ports = [server.port];
    let extra = "[store]\nblock_max_windows = 4\n";
    let mut agent = Agent::start(
        &dir,
        &AgentSetup {
            device: "drainer",
            broker: Some(&broker),
            identity: None,
            mqtt: "",
            window_ms: WINDOW_MS as u64,
            class_ports: &ports,
            state_dir: None,
            extra,
            top: "",
            connection: None,
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
    Outage { _broker: broker, prom, bridge, agent, t_down, t_online, started: Instant::now() }
}

impl Outage {
    /// Waits until the device's backlog is confirmed; returns the backlog
    /// bytes it published, checking the budget all along.
    fn wait_drained(&mut self) -> f64 {
        let (agent, started) = (&mut self.agent, self.started);
        wait_for("the whole backlog", Duration::from_secs(120), || {
            agent.proc.assert_running();
            let sent = agent.metric("edge_agent_uplink_published_bytes_total{stream=\"backlog\"}").unwrap_or(0.0);
            // One second of burst plus one block of debt (blocks are not
            // split). A block is 4 windows of every series on the box: a
            // busy box (other TCP traffic, other devices) makes them over
            // 4 KiB (failed once at 36818 B against 36797 allowed).
            let allowed = RATE * (started.elapsed().as_secs_f64() + 1.0) + 8192.0;
            assert!(sent <= allowed, "backlog sent {sent} B, budget allows {allowed:.0}");
            match agent.metric("edge_agent_store_backlog_records{lane=\"routine\"}") {
                Some(n) if n <= 2.0 => Ok(sent),
                other => Err(other),
            }
        })
    }

    /// Nothing is missing: one sample per window from the outage on.
    fn assert_complete(&self) {
        let s = self.prom.raw_samples(SEL, 600).unwrap();
        let outage: Vec<i64> = s.iter().map(|x| x.0).filter(|t| *t > self.t_down && *t < self.t_online).collect();
        // (The backlog count included a few windows from before the outage.)
        assert!(outage.len() >= 35, "{} outage windows in Prometheus", outage.len());
        assert!(self.t_online - outage[outage.len() - 1] < 3 * WINDOW_MS, "the last outage windows are missing");
        for w in outage.windows(2) {
            assert!(w[1] - w[0] < 3 * WINDOW_MS, "gap between {} and {}", w[0], w[1]);
        }
    }
}

#[test]
fn live_data_first_and_the_backlog_within_its_budget() {
    if !require_root_and_tools() {
        return;
    }
    let mut o = outage("drain");
    // Live data arrives while most of the backlog is still on the device.
    let (prom, bridge, t_down, t_online) = (&o.prom, &mut o.bridge, o.t_down, o.t_online);
    let backlog_when_live = wait_for("a live sample", Duration::from_secs(60), || {
        bridge.assert_running();
        let s = prom.raw_samples(SEL, 600).map_err(|e| e.to_string())?;
        if s.iter().any(|(t, _)| *t > t_online) {
            Ok(s.iter().filter(|(t, _)| *t > t_down && *t < t_online).count())
        } else {
            Err(format!("{} samples", s.len()))
        }
    });
    assert!(backlog_when_live < 30, "live data waited for {backlog_when_live} backlog windows");
    let sent = o.wait_drained();
    o.assert_complete();
    eprintln!(
        "backlog: {sent} B in {:.1} s ({:.0} B/s, budget {RATE}); live data came with {backlog_when_live} backlog windows in",
        o.started.elapsed().as_secs_f64(),
        sent / o.started.elapsed().as_secs_f64()
    );
}

#[test]
fn agent_killed_mid_drain_loses_nothing() {
    if !require_root_and_tools() {
        return;
    }
    let mut o = outage("drainkill");
    // Part of the backlog confirmed, part not yet sent.
    wait_for("the drain under way", Duration::from_secs(60), || {
        o.agent.proc.assert_running();
        match o.agent.metric("edge_agent_uplink_confirmed_blocks_total") {
            Some(n) if n >= 2.0 => Ok(()),
            other => Err(other),
        }
    });
    let left = o.agent.metric("edge_agent_store_backlog_records{lane=\"routine\"}").unwrap();
    assert!(left >= 10.0, "killed too late: {left} records left");
    o.agent.proc.kill();
    o.agent.restart();
    o.started = Instant::now();
    o.wait_drained();
    o.assert_complete();
}
