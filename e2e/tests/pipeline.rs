//! End to end on the real kernel, with a real mosquitto and a real
//! Prometheus: TCP connections made by the test -> eBPF probe -> store ->
//! MQTT -> fleet-bridge -> Prometheus, checked through Prometheus's query
//! API for exact counts and original timestamps.

use e2e::*;
use std::path::PathBuf;
use std::time::Duration;

const WINDOW_MS: u64 = 500;
const ARRIVAL: Duration = Duration::from_secs(60);

struct Stack {
    dir: PathBuf,
    device: String,
    broker: Broker,
    prom: Prom,
    bridge: Proc,
    agent: Agent,
    server: Server,
    closed_port: u16,
}

impl Stack {
    fn start(name: &str) -> Stack {
        Stack::start_on(name, Tsdb::Prometheus)
    }

    /// With the bridge writing into `tsdb`.
    fn start_on(name: &str, tsdb: Tsdb) -> Stack {
        let dir = tempdir(name);
        let device = format!("e2e-{name}-{}", std::process::id());
        let broker = Broker::start(&dir);
        let prom = match tsdb {
            Tsdb::Prometheus => Prom::start(&dir),
            Tsdb::VictoriaMetrics => Prom::start_victoria(&dir),
        };
        let (bridge, _) = bridge(&dir, &broker, &prom.write_url(), &format!("bridge-{device}"));
        let server = Server::start();
        let closed_port = free_port();
        let agent = Agent::start(
            &dir,
            &AgentSetup {
                device: &device,
                broker: Some(&broker),
                window_ms: WINDOW_MS,
                class_ports: &[server.port, closed_port],
                state_dir: None,
                identity: None,
                mqtt: "",
                extra: "",
                top: "",
                connection: None,
            },
        );
        Stack { dir, device, broker, prom, bridge, agent, server, closed_port }
    }

    fn selector(&self, metric: &str, direction: &str) -> String {
        format!("{metric}{{device=\"{}\",direction=\"{direction}\",port_class=\"e2e\"}}", self.device)
    }

    fn samples(&self, metric: &str, direction: &str) -> Vec<(i64, f64)> {
        self.prom.raw_samples(&self.selector(metric, direction), 600).unwrap_or_default()
    }

    /// Waits until the newest sample of the series in Prometheus is `value`.
    fn wait_latest(&mut self, metric: &str, direction: &str, value: f64) -> Vec<(i64, f64)> {
        let sel = self.selector(metric, direction);
        let (agent, bridge) = (&mut self.agent.proc, &mut self.bridge);
        wait_for(&format!("{sel} == {value} in Prometheus"), ARRIVAL, || {
            agent.assert_running();
            bridge.assert_running();
            let s = self.prom.raw_samples(&sel, 600).map_err(|e| e.to_string())?;
            match s.last() {
                Some(&(_, v)) if v == value => Ok(s),
                other => Err(format!("latest {other:?}")),
            }
        })
    }

    fn dump_logs(&self) -> String {
        [&self.agent.proc, &self.bridge]
            .iter()
            .map(|p| format!("--- {} ({})\n{}", p.name, p.command(), tail(&p.log_text(), 40)))
            .collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Keep the logs of a failed test for reading; clean up after a pass.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<_> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// First sample whose value is at least `v`.
fn first_reaching(samples: &[(i64, f64)], v: f64) -> (i64, f64) {
    *samples.iter().find(|s| s.1 >= v).unwrap_or_else(|| panic!("no sample reaches {v}: {samples:?}"))
}

/// No window missing: consecutive samples at most ~2 windows apart.
fn assert_no_gaps(samples: &[(i64, f64)], from: i64, to: i64) {
    let inside: Vec<_> = samples.iter().filter(|s| s.0 >= from && s.0 <= to).collect();
    for w in inside.windows(2) {
        let gap = w[1].0 - w[0].0;
        assert!(gap > 0 && gap < 2 * WINDOW_MS as i64, "gap of {gap} ms between {:?} and {:?}", w[0], w[1]);
    }
}

/// Counter values never go down and never pass `max` (nothing counted twice).
fn assert_monotonic_up_to(samples: &[(i64, f64)], max: f64) {
    for w in samples.windows(2) {
        assert!(w[1].1 >= w[0].1, "counter went down: {:?} -> {:?}", w[0], w[1]);
    }
    assert!(samples.iter().all(|s| s.1 <= max), "a value above {max}: {samples:?}");
}

#[test]
fn exact_counts_arrive_with_the_time_they_happened() {
    if !require_root_and_tools() {
        return;
    }
    let mut s = Stack::start("counts");
    let t0 = now_ms();
    s.server.connections(7);
    refused(s.closed_port, 3);
    let t1 = now_ms();

    let out = s.wait_latest("edge_tcp_connections_opened_total", "outbound", 7.0);
    s.wait_latest("edge_tcp_connections_opened_total", "inbound", 7.0);
    s.wait_latest("edge_tcp_connections_failed_total", "outbound", 3.0);
    s.wait_latest("edge_tcp_connections_closed_total", "outbound", 7.0);
    s.wait_latest("edge_tcp_connections_closed_total", "inbound", 7.0);
    assert!(s.samples("edge_tcp_connections_failed_total", "inbound").is_empty());
    // The 3 attempts on the closed port: refused (a reset answered the SYN),
    // one reset sent by the box's closed port, one received by the client.
    s.wait_latest("edge_tcp_connections_refused_total", "outbound", 3.0);
    s.wait_latest("edge_tcp_resets_sent_total", "inbound", 3.0);
    s.wait_latest("edge_tcp_resets_received_total", "outbound", 3.0);
    // Every handshake timed, every connection's duration observed.
    s.wait_latest("edge_tcp_connect_latency_seconds_count", "outbound", 7.0);
    s.wait_latest("edge_tcp_connection_duration_seconds_count", "outbound", 7.0);
    s.wait_latest("edge_tcp_connection_duration_seconds_count", "inbound", 7.0);
    let le_inf = format!(
        "edge_tcp_connect_latency_seconds_bucket{{device=\"{}\",direction=\"outbound\",le=\"+Inf\",port_class=\"e2e\"}}",
        s.device
    );
    assert_eq!(s.prom.raw_samples(&le_inf, 600).unwrap().last().map(|x| x.1), Some(7.0));
    let latency_sum = format!(
        "edge_tcp_connect_latency_seconds_sum{{device=\"{}\",direction=\"outbound\",port_class=\"e2e\"}}",
        s.device
    );
    let sum = s.prom.raw_samples(&latency_sum, 600).unwrap().last().map(|x| x.1).unwrap();
    assert!(sum > 0.0 && sum < 7.0, "7 loopback handshakes took {sum} s in all");

    // Stamped when counted on the device, not when Prometheus got them.
    let (ts, _) = first_reaching(&out, 7.0);
    assert!(
        ts >= t0 && ts <= t1 + 2 * WINDOW_MS as i64 + 200,
        "sample stamped {ts}, connections made in [{t0}, {t1}]\n{}",
        s.dump_logs()
    );
    assert_monotonic_up_to(&out, 7.0);
    // The agent's own health arrives with the measurements (for the fleet's
    // alert rules).
    let health = format!("edge_agent_store_backlog_records{{device=\"{}\",lane=\"routine\"}}", s.device);
    assert!(!s.prom.raw_samples(&health, 600).unwrap_or_default().is_empty(), "no self-telemetry in Prometheus");
    // So does its client certificate's expiry (EdgeCertificateExpiresSoon):
    // openssl's notAfter, on the agent's /metrics and in Prometheus.
    let (cert, _) = s.broker.device_cert(&s.device);
    let end = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-enddate", "-in"])
        .arg(&cert)
        .output()
        .expect("openssl");
    let end = String::from_utf8_lossy(&end.stdout).trim().trim_start_matches("notAfter=").to_string();
    let secs = std::process::Command::new("date").args(["-d", &end, "+%s"]).output().expect("date");
    let not_after: f64 = String::from_utf8_lossy(&secs.stdout).trim().parse().expect("notAfter as seconds");
    assert_eq!(s.agent.metric("edge_agent_tls_certificate_expiry_timestamp_seconds"), Some(not_after));
    let expiry = format!("edge_agent_tls_certificate_expiry_timestamp_seconds{{device=\"{}\"}}", s.device);
    wait_for("the certificate's expiry in Prometheus", ARRIVAL, || {
        match s.prom.raw_samples(&expiry, 600).map_err(|e| e.to_string())?.last() {
            Some(&(_, v)) if v == not_after => Ok(()),
            other => Err(format!("latest {other:?}, want {not_after}")),
        }
    });
}

#[test]
fn broker_outage_loses_nothing_and_keeps_timestamps() {
    if !require_root_and_tools() {
        return;
    }
    broker_outage(Stack::start("outage"));
}

/// The same outage with VictoriaMetrics as the remote-write store: live
/// data first, then the backlog with its past timestamps (out of order for
/// each series), the same exact counts.
#[test]
fn broker_outage_into_victoria_metrics_loses_nothing_and_keeps_timestamps() {
    if !require_root_and_tools() {
        return;
    }
    broker_outage(Stack::start_on("outage-vm", Tsdb::VictoriaMetrics));
}

fn broker_outage(mut s: Stack) {
    s.server.connections(2);
    s.wait_latest("edge_tcp_connections_opened_total", "outbound", 2.0);

    s.broker.stop();
    let t_down = now_ms();
    s.server.connections(5);
    let t_made = now_ms();
    // Let several windows be stored while the broker is away: four more
    // records, and (the agent's counter is read from its /metrics, which
    // may lag a loaded machine) four windows' time, so that at least four
    // windows are stamped in the outage.
    s.wait_appended(4);
    wait_for("four windows' time in the outage", Duration::from_secs(30), || {
        let since = now_ms() - t_down;
        if since > 4 * WINDOW_MS as i64 + 100 {
            Ok(())
        } else {
            Err(since)
        }
    });
    let t_up = now_ms();
    s.broker.restart();

    // Drained: a window stamped after the broker came back has arrived
    // (live data goes first), and the agent's backlog is confirmed.
    let sel = s.selector("edge_tcp_connections_opened_total", "outbound");
    let backlog = "edge_agent_store_backlog_records{lane=\"routine\"}";
    let out = wait_for("the backlog to drain into Prometheus", ARRIVAL, || {
        let v = s.prom.raw_samples(&sel, 600).map_err(|e| e.to_string())?;
        let left = s.agent.metric(backlog).unwrap_or(f64::MAX);
        match v.last() {
            Some(&(ts, 7.0)) if ts > t_up && left <= 2.0 => Ok(v),
            other => Err(format!("latest {other:?}, backlog {left}")),
        }
    });
    let (ts, _) = first_reaching(&out, 7.0);
    assert!(
        ts >= t_down && ts <= t_made + 2 * WINDOW_MS as i64 + 200 && ts < t_up,
        "the count of 7 is stamped {ts}; connections made in [{t_down}, {t_made}], broker back at {t_up}\n{}",
        s.dump_logs()
    );
    // Every window of the outage arrived, in order, once.
    let first_7 = ts;
    let last = out.last().map(|x| x.0).unwrap_or(0);
    assert!(out.iter().filter(|x| x.0 > t_down && x.0 < t_up).count() >= 4, "outage windows missing: {out:?}");
    assert_no_gaps(&out, out[0].0, last);
    assert_monotonic_up_to(&out, 7.0);
    assert!(first_7 > out[0].0);
}

#[test]
fn broker_killed_mid_drain_loses_nothing() {
    if !require_root_and_tools() {
        return;
    }
    let mut s = Stack::start("brokerkill");
    s.wait_for_uplink();
    s.broker.stop();
    let t_down = now_ms();
    // A backlog: connections spread over many windows while the broker is away.
    s.backlog_windows(12);
    let t_backlog = now_ms();
    // The bridge is gone (its session stays with the broker): the backlog
    // can only sit in the broker's queue.
    s.bridge.kill();
    s.broker.restart();
    s.wait_broker_took(s.agent.metric("edge_agent_uplink_acked_records_total").unwrap_or(0.0));
    // The broker acknowledged it but saves its queue only once a second:
    // killed now, it loses the backlog. An agent that trusted the broker's
    // PUBACK would have let go of it.
    s.broker.kill();
    s.broker.restart();
    s.new_bridge();
    // Everything stored arrives: no gap from the outage to the end, and the
    // count reaches all 12 connections.
    let out = s.wait_count_after(12.0, t_down);
    // The windows stored during the outage, one by one, counting up to 12.
    let outage = s.outage_windows(&out, t_down, t_backlog, 12);
    assert_eq!(outage.last().map(|x| x.1), Some(12.0), "{outage:?}");
    assert_no_gaps(&out, outage[0].0, out[out.len() - 1].0);
    assert_monotonic_up_to(&out, 12.0);
    // And the agent's send position caught up: nothing left unconfirmed.
    wait_for("the agent's backlog to clear", Duration::from_secs(30), || {
        match s.agent.metric("edge_agent_store_backlog_records{lane=\"routine\"}") {
            Some(v) if v <= 1.0 => Ok(()),
            other => Err(other),
        }
    });
}

#[test]
fn prometheus_down_then_back_loses_nothing() {
    if !require_root_and_tools() {
        return;
    }
    let mut s = Stack::start("promdown");
    s.wait_for_uplink();
    s.server.connections(1);
    s.wait_latest("edge_tcp_connections_opened_total", "outbound", 1.0);
    s.prom.stop();
    let t_down = now_ms();
    s.backlog_windows(5);
    let t_back = now_ms();
    s.prom.restart();
    let out = s.wait_count_after(6.0, t_back);
    s.outage_windows(&out, t_down, t_back, 5);
    assert_no_gaps(&out, out[0].0, out[out.len() - 1].0);
    assert_monotonic_up_to(&out, 6.0);
}

#[test]
fn bridge_killed_mid_drain_loses_nothing() {
    if !require_root_and_tools() {
        return;
    }
    let mut s = Stack::start("bridgekill");
    s.wait_for_uplink();
    s.broker.stop();
    let t_down = now_ms();
    s.backlog_windows(6);
    let t_backlog = now_ms();
    s.broker.restart();
    // Kill the bridge as the backlog reaches it, then start a new one with
    // the same session.
    s.wait_broker_took(0.0);
    s.bridge.kill();
    s.new_bridge();
    let out = s.wait_count_after(6.0, t_backlog);
    let outage = s.outage_windows(&out, t_down, t_backlog, 6);
    assert_no_gaps(&out, outage[0].0, out[out.len() - 1].0);
    assert_monotonic_up_to(&out, 6.0);
}

#[test]
fn device_presence_follows_the_agent() {
    if !require_root_and_tools() {
        return;
    }
    let mut s = Stack::start("presence");
    let sel = format!("edge_device_online{{device=\"{}\"}}", s.device);
    let latest = |s: &Stack| s.prom.raw_samples(&sel, 600).ok().and_then(|v| v.last().map(|x| x.1));
    wait_for("online (the retained birth message)", ARRIVAL, || match latest(&s) {
        Some(1.0) => Ok(()),
        other => Err(other),
    });
    // No goodbye: the broker notices after 1.5 keep-alives (5 s here) and
    // publishes the agent's last will.
    s.agent.proc.kill();
    wait_for("offline (the last will)", ARRIVAL, || match latest(&s) {
        Some(0.0) => Ok(()),
        other => Err(other),
    });
    s.agent.restart();
    wait_for("online again", ARRIVAL, || match latest(&s) {
        Some(1.0) => Ok(()),
        other => Err(other),
    });
}

#[test]
fn agent_killed_while_offline_still_delivers_what_it_stored() {
    if !require_root_and_tools() {
        return;
    }
    let mut s = Stack::start("sigkill");
    s.wait_for_uplink();
    s.broker.stop();
    s.server.connections(4);
    // The window that counted 4 has been stored (appended and fsynced).
    let counted = "edge_tcp_connections_opened_total{direction=\"outbound\",port_class=\"e2e\"}";
    wait_for("the agent to count 4 connections", Duration::from_secs(30), || match s.agent.metric(counted) {
        Some(4.0) => Ok(()),
        other => Err(other),
    });
    s.wait_appended(2);
    let t_stored = now_ms();
    let t_kill = now_ms();
    s.agent.proc.kill();

    s.agent.restart();
    s.broker.restart();
    // One more connection: the restarted agent (counters from 0) sends a
    // sample stamped after the kill. Records go out in order, so once it is
    // in Prometheus everything stored before the kill is there too.
    s.server.connections(1);
    let sel = s.selector("edge_tcp_connections_opened_total", "outbound");
    let out = wait_for("a post-restart sample in Prometheus", ARRIVAL, || {
        let v = s.prom.raw_samples(&sel, 600).map_err(|e| e.to_string())?;
        match v.last() {
            Some(&(ts, 1.0)) if ts > t_kill => Ok(v),
            other => Err(format!("latest {other:?}")),
        }
    });
    let before: Vec<_> = out.iter().copied().filter(|x| x.0 < t_kill).collect();
    assert!(before.len() >= 2, "pre-kill samples missing: {out:?}\n{}", s.dump_logs());
    let last = before[before.len() - 1];
    assert_eq!(last.1, 4.0, "{out:?}");
    assert!(
        last.0 >= t_stored - WINDOW_MS as i64,
        "the newest stored windows before the kill did not arrive: last pre-kill sample {last:?}, stored by {t_stored}"
    );
    assert_no_gaps(&before, before[0].0, last.0);
    assert_monotonic_up_to(&before, 4.0);
}

impl Stack {
    /// One connection in each of `n` windows, each window stored before the
    /// next: a backlog while something downstream is away.
    fn backlog_windows(&self, n: usize) {
        for _ in 0..n {
            self.server.connections(1);
            self.wait_appended(1);
        }
    }

    /// Waits until the broker has acknowledged more blocks than `before`.
    fn wait_broker_took(&self, before: f64) {
        let acked = "edge_agent_uplink_acked_records_total";
        wait_for("the broker to take the backlog", Duration::from_secs(30), || match self.agent.metric(acked) {
            Some(v) if v > before => Ok(()),
            other => Err(other),
        });
    }

    /// A new bridge with the old one's session (client id).
    fn new_bridge(&mut self) {
        self.bridge = bridge(&self.dir, &self.broker, &self.prom.write_url(), &format!("bridge-{}", self.device)).0;
    }

    /// Waits until the outbound opened counter reads `count` in a sample
    /// stamped after `after`, and returns the series' samples.
    /// Live data goes first after an outage: also waits until the agent's
    /// backlog is confirmed (all but the newest windows), so the outage's
    /// windows are in Prometheus too.
    fn wait_count_after(&self, count: f64, after: i64) -> Vec<(i64, f64)> {
        let sel = self.selector("edge_tcp_connections_opened_total", "outbound");
        let backlog = "edge_agent_store_backlog_records{lane=\"routine\"}";
        wait_for(&format!("{sel} == {count} after {after}, backlog drained"), ARRIVAL, || {
            let v = self.prom.raw_samples(&sel, 600).map_err(|e| e.to_string())?;
            let left = self.agent.metric(backlog).unwrap_or(f64::MAX);
            match v.last() {
                Some(&(ts, c)) if c == count && ts > after && left <= 2.0 => Ok(v),
                other => Err(format!("latest {other:?}, backlog {left}")),
            }
        })
    }

    /// The samples stamped during `(from, to)`: at least `min` of them.
    fn outage_windows(&self, out: &[(i64, f64)], from: i64, to: i64, min: usize) -> Vec<(i64, f64)> {
        let outage: Vec<_> = out.iter().copied().filter(|x| x.0 > from && x.0 < to).collect();
        assert!(outage.len() >= min, "windows of the outage missing: {outage:?}\n{}", self.dump_logs());
        outage
    }

    /// Waits until `n` more windows have been stored (appended and fsynced).
    fn wait_appended(&self, n: u64) {
        let series = "edge_agent_store_appended_records_total{lane=\"routine\"}";
        let a0 = self.agent.metric(series).unwrap_or(0.0);
        wait_for(&format!("{n} more windows stored"), Duration::from_secs(30), || match self.agent.metric(series) {
            Some(v) if v >= a0 + n as f64 => Ok(()),
            other => Err(other),
        });
    }

    /// Waits for the steady state: connected, and a block confirmed end to
    /// end (so an unsynchronized clock has learned the true time from the
    /// bridge: docs/clock.md).
    fn wait_for_uplink(&self) {
        wait_for("the agent's first confirmed block", Duration::from_secs(30), || {
            match self.agent.metric("edge_agent_uplink_confirmed_blocks_total") {
                Some(n) if n >= 1.0 => Ok(()),
                other => Err(other),
            }
        });
    }
}

/// An agent 150 ms (one way) from its broker: TCP, TLS and CONNECT take
/// four round trips, about 1.2 s. The uplink once gave a connection
/// attempt no more than its 100 ms poll before dropping it and starting
/// over: over such a link it never connected, and a fleet reconnecting at
/// once kept its broker busy with attempts that could not finish (found
/// by the fleet simulator: 1,000 devices, 39 abandoned connections each).
#[test]
fn an_agent_behind_a_slow_link_connects_and_delivers() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("slow-link");
    let device = format!("e2e-slow-link-{}", std::process::id());
    let mut broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (_bridge, _) = bridge(&dir, &broker, &prom.write_url(), &format!("bridge-{device}"));
    let proxy = LatencyProxy::start(broker.port, Duration::from_millis(150));
    broker.port = proxy.port; // the agent's config names the far end of the link
    let mut agent = Agent::launch(&dir, &AgentSetup { broker: Some(&broker), ..AgentSetup::offline(&device, QUIET) });
    wait_for("the agent's windows in Prometheus, over the slow link", ARRIVAL, || {
        agent.proc.assert_running();
        match prom.scalar(&format!("count({{device=\"{device}\"}})")) {
            Ok(Some(n)) if n > 0.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(agent.metric("edge_agent_uplink_connected"), Some(1.0));
}
