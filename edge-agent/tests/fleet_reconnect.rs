//! 50 devices, each with an hour of backlog in its store (1,000 series at
//! 10 s windows is the production shape; here 20 series each, 360 windows),
//! reconnect at once through the shipped broker config: every sample lands
//! in Prometheus exactly once, at its original time.

use e2e::{Agent, AgentSetup, Who};
use edge_agent::config::Config;
use edge_agent::store::Lanes;
use edge_agent::window::Window;
use edge_wire::{Label, SeriesKey};
use std::time::Duration;

const DEVICES: usize = 50;
const WINDOWS: i64 = 360; // one hour of 10 s windows
const SERIES: usize = 20;

fn fill(cfg: &Config, t0: i64) {
    let mut lanes = Lanes::open(&cfg.store_dir(), cfg.store_limits(), cfg.priority_limits()).unwrap();
    let mut writer = cfg.block_writer();
    let keys: Vec<SeriesKey> =
        (0..SERIES).map(|k| SeriesKey::new("fleet_sim", vec![Label::new("k", k.to_string())])).collect();
    for i in 0..WINDOWS {
        let samples = keys.iter().enumerate().map(|(k, key)| (key.clone(), (i * k as i64) as f64)).collect();
        writer
            .write(&mut lanes.routine, &Window { timestamp_ms: t0 + i * 10_000, samples, values: Vec::new() })
            .unwrap();
    }
    lanes.routine.sync().unwrap();
}

#[test]
fn fifty_devices_with_an_hour_of_backlog_reconnect_at_once() {
    if !e2e::require_root_and_tools() {
        return;
    }
    let dir = e2e::tempdir("fleet50");
    let broker = e2e::Broker::start(&dir);
    let prom = e2e::Prom::start(&dir);
    let (mut bridge, _) = e2e::bridge(&dir, &broker, &prom.write_url(), "bridge-fleet50");
    // Whole seconds, an hour ago: the windows' timestamps.
    let t0 = (e2e::now_ms() / 1000 - 3700) * 1000;
    // The uplink is under test: no probes (50 agents' programs on every
    // packet of the box would only slow the run).
    let probe_off = "[probes.tcp_lifecycle]\nenabled = false\n[probes.devices]\nenabled = false\n\
                     [probes.protocols]\nenabled = false\n";
    let mut agents = Vec::new();
    let mut setups = Vec::new();
    for d in 0..DEVICES {
        let device = format!("sim-{d:02}");
        let ddir = dir.join(&device);
        std::fs::create_dir_all(&ddir).unwrap();
        let cfg = Config { device_id: device.clone(), state_dir: ddir.join("agent-state"), ..Default::default() };
        fill(&cfg, t0);
        broker.device_cert(&device);
        setups.push((device, ddir));
    }
    // All at once.
    for (device, ddir) in &setups {
        let setup = AgentSetup {
            broker: Some(&broker),
            identity: Some(Who::Device(device)),
            window_ms: 10_000,
            ..AgentSetup::offline(device, probe_off)
        };
        agents.push(Agent::launch(ddir, &setup));
    }
    let expected = (DEVICES * SERIES) as f64 * WINDOWS as f64;
    let per_device_sum: i64 = (0..WINDOWS).map(|i| (0..SERIES as i64).map(|k| i * k).sum::<i64>()).sum();
    let got = e2e::wait_for("every device's hour in Prometheus", Duration::from_secs(180), || {
        bridge.assert_running();
        for a in agents.iter_mut() {
            a.proc.assert_running();
        }
        match prom.scalar("sum(count_over_time(fleet_sim[2h]))") {
            Ok(Some(n)) if n >= expected => Ok(n),
            other => Err(format!("{other:?} of {expected}")),
        }
    });
    assert_eq!(got, expected, "samples counted once each");
    let sum = prom.scalar("sum(sum_over_time(fleet_sim[2h]))").unwrap().unwrap();
    assert_eq!(sum, (per_device_sum * DEVICES as i64) as f64, "values");
    for d in [0, DEVICES - 1] {
        let sel = format!("fleet_sim{{device=\"sim-{d:02}\",k=\"1\"}}");
        let s = prom.raw_samples(&sel, 7200).unwrap();
        assert_eq!(s.len(), WINDOWS as usize, "{sel}");
        assert_eq!(s[0], (t0, 0.0), "original timestamps");
        assert_eq!(s[s.len() - 1], (t0 + (WINDOWS - 1) * 10_000, (WINDOWS - 1) as f64));
    }
}
