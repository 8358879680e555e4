//! The fleet simulator at a small scale (docs/scaling.md has the large
//! runs): many devices, each the agent's own store and uplink, through
//! mosquitto and the bridges into Prometheus or VictoriaMetrics; every
//! device's every stored sample lands exactly once.

use hil_tests::fleet::report::Report;
use std::process::Command;

fn sim(name: &str, args: &[&str]) -> Report {
    let dir = e2e::tempdir(name);
    let out = dir.join("report.json");
    let status = Command::new(env!("CARGO_BIN_EXE_fleet_sim"))
        .arg("run")
        .args(args)
        .args(["--dir", &dir.join("run").display().to_string(), "--out", &out.display().to_string()])
        .status()
        .expect("fleet_sim");
    let report: Report =
        serde_json::from_slice(&std::fs::read(&out).expect("the simulator's report")).expect("report json");
    println!("{}", report.table());
    assert!(status.success(), "fleet_sim failed: {:?}", report.inexact);
    report
}

fn exact(r: &Report) {
    assert_eq!(r.exact_devices, r.devices, "devices whose data did not land exactly: {:?}", r.inexact);
    assert_eq!(r.samples_landed, r.samples_stored);
    assert!(r.samples_stored > 0);
    assert_eq!(r.unconfirmed_windows, 0);
    assert_eq!(r.not_drained, 0);
}

/// Devices appearing, leaving and coming back, flapping, through two
/// bridges sharing the fleet (a shared subscription).
#[test]
fn churning_devices_through_two_bridges_land_exactly() {
    if !e2e::require_root_and_tools() {
        return;
    }
    let r = sim(
        "fleet-churn",
        &[
            "--scenario",
            "churn",
            "--devices",
            "24",
            "--series",
            "60",
            "--window-ms",
            "1000",
            "--live-secs",
            "24",
            "--drain-secs",
            "120",
            "--bridges",
            "2",
        ],
    );
    exact(&r);
    assert!(r.lag_other_s.count > 0, "the churning devices' windows were timed too");
}

/// Half the fleet reconnects at once with a quarter hour of backlog each
/// while the other half stays live, into VictoriaMetrics: every backlog
/// drains, exactly. (Lag goals are the benchmark's: BENCHMARKS.md.)
#[test]
fn a_reconnect_storm_into_victoria_metrics_lands_exactly() {
    if !e2e::require_root_and_tools() {
        return;
    }
    let r = sim(
        "fleet-storm",
        &[
            "--scenario",
            "storm",
            "--devices",
            "16",
            "--backlog-devices",
            "8",
            "--backlog-hours",
            "0.25",
            "--series",
            "60",
            "--window-ms",
            "1000",
            "--live-secs",
            "20",
            "--drain-secs",
            "120",
            "--tsdb",
            "victoria-metrics",
        ],
    );
    exact(&r);
    assert_eq!((r.backlog_devices, r.backlog_windows_each), (8, 900));
    assert!(r.lag_steady_s.count > 0, "the live devices' windows were timed");
}

/// The clustered broker: a three-node NATS cluster (configs/nats), the
/// devices spread over its nodes' MQTT listeners, two bridges pulling from
/// one JetStream consumer. Mid-drain the node a third of the devices use
/// is killed (SIGKILL) and started again five seconds later, and one
/// bridge is killed for good: every window still lands exactly once.
#[test]
fn a_nats_cluster_losing_a_node_and_a_bridge_mid_drain_lands_exactly() {
    if !e2e::require_root_and_tools() {
        return;
    }
    if !e2e::require_tools("the NATS cluster test", &["nats-server"]) {
        return;
    }
    let r = sim(
        "fleet-nats",
        &[
            "--broker",
            "nats",
            "--bridges",
            "2",
            "--jetstream",
            "ack_wait_secs = 10",
            "--scenario",
            "storm",
            "--devices",
            "12",
            "--backlog-devices",
            "6",
            "--backlog-hours",
            "0.25",
            "--block-windows",
            "5",
            "--series",
            "60",
            "--window-ms",
            "1000",
            "--live-secs",
            "20",
            "--drain-secs",
            "120",
            "--kill-node-at",
            "1",
            "--node-down-secs",
            "5",
            "--kill-bridge-at",
            "1.5",
        ],
    );
    exact(&r);
    assert_eq!(r.faults.len(), 3, "node killed, bridge killed, node back: {:?}", r.faults);
    // Both faults came while backlogs were draining.
    assert!(
        r.drained_s.max > 1.5,
        "the backlogs drained before the faults ({} s): nothing was tested",
        r.drained_s.max
    );
}
