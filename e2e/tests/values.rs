//! Process values end to end (docs/process-values.md): a simulated PLC
//! serving a pump over Modbus/TCP and Modbus RTU on a pseudo-terminal
//! (`pump_sim`, rmodbus on both ends), polled by its HMI at 10 Hz on this
//! box; the agent captures every value of the shipped tag map
//! (configs/tags/pump.toml) from the wire (the protocol probe) and from the
//! serial line's bytes (the device probe); store -> MQTT -> fleet-bridge ->
//! Prometheus. Every value the HMI read or wrote lands, exactly, at its own
//! time; nothing else.

use e2e::*;
use std::collections::BTreeMap;
use std::time::Duration;

/// The shipped tag map with every TCP tag on the simulator's port and
/// every RTU tag on its serial line.
fn tags_on(port: u16, serial: &std::path::Path) -> String {
    let text = std::fs::read_to_string(repo_dir().join("configs/tags/pump.toml")).expect("configs/tags/pump.toml");
    text.replace("source = \"modbus_tcp\"", &format!("source = \"modbus_tcp\"\nport = {port}"))
        .replace("/run/pump-sim/ttyPLC", &serial.display().to_string())
}

/// The simulator's log: per tag, (time ms, value) in order.
fn served(log: &std::path::Path) -> BTreeMap<String, Vec<(i64, f64)>> {
    let mut out: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    for line in std::fs::read_to_string(log).expect("simulator log").lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("log line");
        if let Some(tag) = v["tag"].as_str() {
            let bits = v["bits"].as_u64().expect("bits");
            out.entry(tag.into()).or_default().push((v["t"].as_i64().unwrap(), f64::from_bits(bits)));
        }
    }
    out
}

#[test]
fn every_value_the_hmi_read_or_wrote_lands_exactly_at_its_time() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("values");
    let device = format!("e2e-values-{}", std::process::id());
    let broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (mut bridge, _) = bridge(&dir, &broker, &prom.write_url(), &format!("bridge-{device}"));
    let port = free_port();
    let serial = dir.join("ttyPLC");
    // The device probe watches nothing else: it attaches when the line
    // appears.
    let extra = format!(
        "[probes.protocols]\nmodbus_ports = [{port}]\n[probes.devices]\nwatch = []\nrescan_secs = 1\n{}",
        tags_on(port, &serial)
    );
    let mut agent = Agent::start(
        &dir,
        &AgentSetup { broker: Some(&broker), window_ms: 1000, ..AgentSetup::offline(&device, &extra) },
    );
    wait_for("the protocol probe", Duration::from_secs(30), || {
        agent.proc.assert_running();
        match scrape(agent.metrics_port, "edge_agent_probe_attached{probe=\"protocols\"}") {
            Ok(Some(1.0)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(agent.metric("edge_agent_value_tags"), Some(26.0));

    // The PLC and its HMI, for 8 s at 10 Hz, started after the protocol
    // probe attached: everything they exchange on TCP is on the wire while
    // it watches. The serial line appears with the simulator: the HMI
    // waits until the device probe watches it (--wait-watched).
    let log = dir.join("pump.log");
    let mut sim = std::process::Command::new(bin_dir().join("pump_sim"))
        .args(["--port", &port.to_string(), "--hz", "10", "--seconds", "8", "--seed", "7"])
        .arg("--log")
        .arg(&log)
        .arg("--rtu")
        .arg(&serial)
        .arg("--wait-file")
        .arg(dir.join("go"))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("pump_sim");
    wait_for("the device probe to watch the serial line", Duration::from_secs(30), || {
        agent.proc.assert_running();
        match agent.metric("edge_agent_device_files_open") {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    std::fs::write(dir.join("go"), b"").unwrap();
    let status = sim.wait().expect("pump_sim");
    assert!(status.success(), "pump_sim failed");
    let want = served(&log);
    assert_eq!(want.len(), 26, "the simulator served every tag: {:?}", want.keys());
    let total: usize = want.values().map(Vec::len).sum();

    // All of them in Prometheus.
    let selector = |tag: &str| format!("edge_process_value{{device=\"{device}\",tag=\"{tag}\"}}");
    wait_for("every served value in Prometheus", Duration::from_secs(90), || {
        agent.proc.assert_running();
        bridge.assert_running();
        let mut n = 0;
        for tag in want.keys() {
            n += prom.raw_samples(&selector(tag), 600).map_err(|e| e.to_string())?.len();
        }
        if n >= total {
            Ok(())
        } else {
            Err(format!(
                "{n} of {total}; agent captured {:?}",
                agent.metric("edge_agent_values_captured_total{transport=\"modbus_tcp\"}")
            ))
        }
    });
    for (tag, served) in &want {
        let got = prom.raw_samples(&selector(tag), 600).unwrap();
        assert_eq!(got.len(), served.len(), "{tag}: samples in Prometheus vs served");
        for (i, ((gt, gv), (st, sv))) in got.iter().zip(served).enumerate() {
            assert_eq!(gv.to_bits(), sv.to_bits(), "{tag} sample {i}: {gv} in Prometheus, {sv} served");
            // The kernel stamps the packet; the HMI its own read or send.
            assert!((gt - st).abs() <= 50, "{tag} sample {i}: at {gt} in Prometheus, served at {st}");
        }
    }
    // Only the tags: the unmapped diagnostics (inputs 10..15, coils and
    // discrete inputs 1..7) are not series of any name.
    let series = prom.scalar(&format!("count(count by (tag) (edge_process_value{{device=\"{device}\"}}))")).unwrap();
    assert_eq!(series, Some(26.0));
    // The window statistics count the same values.
    let counted = prom
        .scalar(&format!("sum(sum_over_time(edge_process_value_count{{device=\"{device}\"}}[10m]))"))
        .unwrap()
        .unwrap_or(0.0);
    assert_eq!(counted, total as f64, "edge_process_value_count over all windows");
    for reason in ["length", "partial", "same_time", "ring_full", "no_reply", "crc", "unpaired", "exception"] {
        assert_eq!(
            agent.metric(&format!("edge_agent_values_refused_total{{reason=\"{reason}\"}}")),
            Some(0.0),
            "{reason}"
        );
    }
    agent.proc.stop();
    bridge.stop();

    // The model's view (`store export --format features`, version 2):
    // every served value counted in one window, the windows' means
    // weighing up to the served values' sum.
    let rows = export_features(&dir);
    assert!(rows.iter().all(|r| r["feature_version"] == 2.0));
    for (tag, served) in &want {
        let col = |f: &str| format!("{f}{{{tag}}}");
        let count: f64 = rows.iter().map(|r| r[&col("value_count")]).sum();
        assert_eq!(count, served.len() as f64, "{tag}: values counted in the feature rows");
        let sum: f64 = rows.iter().map(|r| r[&col("value_mean")] * r[&col("value_count")]).sum();
        let want_sum: f64 = served.iter().map(|(_, v)| v).sum();
        assert!((sum - want_sum).abs() <= 1e-9 * want_sum.abs().max(1.0), "{tag}: {sum} vs {want_sum}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
