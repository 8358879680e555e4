//! Authentication and confinement with the shipped broker config
//! (configs/mosquitto/: TLS only, client certificates or passwords, ACL by
//! identity): a device can write and read only its own topics, a payload
//! claiming another device is refused by the bridge and counted, and the
//! password path delivers like the certificate path.

use e2e::*;
use edge_wire::{BlockEncoder, Envelope, Label, SeriesKey};
use rumqttc::{Client, QoS};
use std::sync::mpsc;
use std::time::Duration;

fn block(device: &str, name: &str, t: i64, v: f64) -> Vec<u8> {
    let mut enc = BlockEncoder::new();
    let frame = enc.frame(t, &[(SeriesKey::new(name, vec![Label::new("k", "v")]), v)]).unwrap();
    Envelope { device, lane: 0, first_seq: 1, clock_shift_ms: 0, frames: vec![&frame] }.encode()
}

fn client(opts: rumqttc::MqttOptions) -> (Client, mpsc::Receiver<Seen>) {
    watched_client(opts)
}

fn next(rx: &mpsc::Receiver<Seen>) -> Seen {
    rx.recv_timeout(Duration::from_secs(10)).expect("the broker answers within 10 s")
}

#[test]
fn a_device_can_only_write_and_read_its_own_topics() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("identity");
    let broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (mut bridge, bridge_metrics) = bridge(&dir, &broker, &prom.write_url(), "bridge-identity");
    let now = now_ms();

    // Each step on a fresh connection: mosquitto 2.0 closes a connection
    // right after refusing one of its publishes.
    let mallory = || {
        let (c, seen) = client(broker.mqtt_options("mallory", Who::Device("dev-mallory")));
        let s = next(&seen);
        assert!(matches!(s, Seen::ConnAck), "{s:?}");
        (c, seen)
    };
    // 1. On the victim's topic: the broker's ACL drops it and closes the
    //    connection (MQTT 3.1.1 has no refusal code for a publish), with or
    //    without a PUBACK first.
    let (c, seen) = mallory();
    c.publish("edge/dev-victim/metrics", QoS::AtLeastOnce, false, block("dev-victim", "m", now - 3000, 666.0)).unwrap();
    let s = match next(&seen) {
        Seen::PubAck => next(&seen),
        other => other,
    };
    assert!(matches!(s, Seen::Error(_)), "{s:?}");
    // 2. On its own topic, claiming to be the victim: passed on by the
    //    broker, refused by the bridge.
    let (c, seen) = mallory();
    c.publish("edge/dev-mallory/metrics", QoS::AtLeastOnce, false, block("dev-victim", "m", now - 2000, 667.0))
        .unwrap();
    let s = next(&seen);
    assert!(matches!(s, Seen::PubAck), "{s:?}");
    // 3. Reading other devices' data or confirmations: mosquitto grants the
    //    subscription but delivers only what the ACL lets it read (checked
    //    below: nothing).
    let (spy, spy_seen) = mallory();
    spy.subscribe_many(
        ["edge/+/metrics", "edge/dev-victim/ack", "edge/#"]
            .map(|t| rumqttc::SubscribeFilter::new(t.into(), QoS::AtLeastOnce)),
    )
    .unwrap();
    assert!(matches!(next(&spy_seen), Seen::SubAck(_)));
    // 4. A device certificate on the bridges' listener: refused in the TLS
    //    handshake (that listener trusts only the bridge CA).
    let mut on_bridge_port = rumqttc::MqttOptions::new("sneaky", "127.0.0.1", broker.bridge_port);
    on_bridge_port.set_transport(broker.mqtt_options("sneaky", Who::Device("dev-mallory")).transport());
    let (_sneaky, sneaky_seen) = client(on_bridge_port);
    assert!(matches!(next(&sneaky_seen), Seen::Error(_)), "a device certificate logged in as a bridge");

    // The victim's own message lands; nothing of mallory's does.
    let (victim, victim_seen) = client(broker.mqtt_options("victim", Who::Device("dev-victim")));
    assert!(matches!(next(&victim_seen), Seen::ConnAck));
    victim.subscribe("edge/dev-victim/ack", QoS::AtMostOnce).unwrap();
    assert!(matches!(next(&victim_seen), Seen::SubAck(_)));
    victim
        .publish("edge/dev-victim/metrics", QoS::AtLeastOnce, false, block("dev-victim", "m", now - 1000, 1.0))
        .unwrap();
    let sel = "m{device=\"dev-victim\"}";
    wait_for("the victim's sample", Duration::from_secs(30), || {
        bridge.assert_running();
        prom.raw_samples(sel, 600).map_err(|e| e.to_string()).and_then(|v| {
            if v.is_empty() {
                Err("none".into())
            } else {
                Ok(v)
            }
        })
    });
    wait_for("the bridge to count the impersonation", Duration::from_secs(30), || {
        match scrape(bridge_metrics, "fleet_bridge_messages_total{result=\"wrong_device\"}") {
            Ok(Some(1.0)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(prom.raw_samples(sel, 600).unwrap(), [(now - 1000, 1.0)], "only the victim's own sample");
    let written = scrape(bridge_metrics, "fleet_bridge_messages_total{result=\"written\"}").unwrap();
    assert_eq!(written, Some(1.0), "the broker passed mallory's message on the victim's topic");
    assert!(
        prom.raw_samples("m{device=\"dev-mallory\"}", 600).unwrap().is_empty(),
        "nothing is written under the publisher's name either"
    );
    // The victim got the bridge's confirmation; the spy got nothing at all.
    wait_for("the victim's delivery confirmation", Duration::from_secs(10), || match victim_seen.try_recv() {
        Ok(Seen::Publish(t, _)) if t == "edge/dev-victim/ack" => Ok(()),
        other => Err(format!("{other:?}")),
    });
    let spied: Vec<Seen> = spy_seen.try_iter().collect();
    assert!(spied.iter().all(|s| !matches!(s, Seen::Publish(..))), "a device read others' topics: {spied:?}");
}

#[test]
fn a_device_with_a_password_delivers_and_a_wrong_password_is_refused() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("password");
    let mut broker = Broker::start(&dir);
    broker.add_password("dev-pw", "correct horse");
    broker.add_password("dev-bad-pw", "battery staple");
    let prom = Prom::start(&dir);
    let (_bridge, _) = bridge(&dir, &broker, &prom.write_url(), "bridge-password");
    let server = Server::start();
    let ports = [server.port];
    let setup = |device, identity, mqtt| AgentSetup {
        device,
        broker: Some(&broker),
        identity: Some(identity),
        mqtt,
        window_ms: 500,
        class_ports: &ports,
        state_dir: None,
        extra: "",
        top: "",
        connection: None,
    };
    let good_dir = dir.join("good");
    let bad_dir = dir.join("bad");
    std::fs::create_dir_all(&good_dir).unwrap();
    std::fs::create_dir_all(&bad_dir).unwrap();
    // The good one speaks MQTT 3.1.1 (for brokers without 5), the other 5.
    let v311 = "protocol = \"3.1.1\"";
    let mut good = Agent::start(&good_dir, &setup("dev-pw", Who::User("dev-pw", "correct horse"), v311));
    let mut bad = Agent::start(&bad_dir, &setup("dev-bad-pw", Who::User("dev-bad-pw", "wrong"), ""));
    server.connections(4);
    // Both agents count the 4 outbound connections; only one may deliver.
    let sel = |d: &str| {
        format!("edge_tcp_connections_opened_total{{device=\"{d}\",direction=\"outbound\",port_class=\"e2e\"}}")
    };
    wait_for("the password device's counters", Duration::from_secs(60), || {
        good.proc.assert_running();
        match prom.raw_samples(&sel("dev-pw"), 600).map(|v| v.last().map(|s| s.1)) {
            Ok(Some(4.0)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    wait_for("the wrong password to be refused twice", Duration::from_secs(30), || {
        bad.proc.assert_running();
        match bad.metric("edge_agent_uplink_errors_total") {
            Some(n) if n >= 2.0 => Ok(()),
            other => Err(other),
        }
    });
    assert_eq!(bad.metric("edge_agent_uplink_connects_total"), Some(0.0));
    assert!(prom.raw_samples(&sel("dev-bad-pw"), 600).unwrap().is_empty());
    // It keeps measuring and storing meanwhile.
    wait_for("the refused device to store windows", Duration::from_secs(30), || {
        match bad.metric("edge_agent_store_appended_records_total{lane=\"routine\"}") {
            Some(n) if n > 0.0 => Ok(()),
            other => Err(other),
        }
    });
    assert!(bad.proc.log_text().contains("broker refused the connection"), "the refusal is reported");
}

#[test]
fn an_agent_publishing_as_another_device_is_refused_and_counts_it() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("impostor");
    let broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (_bridge, bridge_metrics) = bridge(&dir, &broker, &prom.write_url(), "bridge-impostor");
    // Configured as dev-victim, holding dev-mallory's certificate: the ACL
    // refuses its publishes, MQTT 5 tells it so (PUBACK "not authorized"),
    // and mosquitto closes the connection.
    let mut agent = Agent::start(
        &dir,
        &AgentSetup {
            device: "dev-victim",
            broker: Some(&broker),
            identity: Some(Who::Device("dev-mallory")),
            mqtt: "",
            window_ms: 300,
            class_ports: &[],
            state_dir: None,
            extra: "",
            top: "",
            connection: None,
        },
    );
    // mosquitto closes the connection right after its refusal, mostly
    // before the PUBACK carrying the reason is read: each such connection
    // is counted as ending unacknowledged (and, when the reason was read,
    // as refused).
    wait_for("three unacknowledged connections", Duration::from_secs(30), || {
        agent.proc.assert_running();
        match agent.metric("edge_agent_uplink_unacknowledged_sessions_total") {
            Some(n) if n >= 3.0 => Ok(()),
            other => Err(other),
        }
    });
    let log = agent.proc.log_text();
    assert!(log.contains("refused by its ACL?") || log.contains("broker refused a publish"), "reported in the log");
    assert_eq!(agent.metric("edge_agent_uplink_confirmed_blocks_total"), Some(0.0));
    let written = scrape(bridge_metrics, "fleet_bridge_messages_total{result=\"written\"}").unwrap();
    assert_eq!(written.unwrap_or(0.0), 0.0, "nothing reached the bridge");
    // It keeps its data: the backlog only grows.
    assert!(agent.metric("edge_agent_store_backlog_records{lane=\"routine\"}").unwrap_or(0.0) >= 1.0);
}

/// A broker whose certificate this device cannot trust (the agent given a
/// CA of its own instead of the fleet's): every connection attempt fails
/// its TLS handshake, counted by reason (`unknown_ca`); the client
/// certificate's expiry is exported all the same.
#[test]
fn a_broker_certificate_from_another_ca_is_counted_by_reason() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("tls-reason");
    let broker = Broker::start(&dir);
    let other_ca = dir.join("other-ca.crt");
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"])
        .args(["-subj", "/CN=another CA", "-keyout"])
        .arg(dir.join("other-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .status()
        .expect("openssl");
    assert!(made.success());
    let mut s = AgentSetup::offline("dev-untrusting", QUIET);
    s.broker = Some(&broker);
    let mut agent = Agent::launch(&dir, &s);
    // The same config with the other CA in place of the fleet's.
    let conf = std::fs::read_to_string(agent.config_path()).unwrap();
    let fleet_ca = broker.client_toml(Who::Device("dev-untrusting"));
    let fleet_ca = fleet_ca.lines().find_map(|l| l.strip_prefix("ca_file = ")).unwrap().to_string();
    let conf = conf.replace(&format!("ca_file = {fleet_ca}"), &format!("ca_file = \"{}\"", other_ca.display()));
    assert!(conf.contains("other-ca.crt"), "{conf}");
    std::fs::write(agent.config_path(), conf).unwrap();
    agent.relaunch();
    let failures = wait_for("handshakes refused for the broker's unknown CA", Duration::from_secs(20), || {
        agent.proc.assert_running();
        match agent.metric("edge_agent_tls_handshake_failures_total{reason=\"unknown_ca\"}") {
            Some(n) if n >= 2.0 => Ok(n),
            other => Err(other),
        }
    });
    assert_eq!(agent.metric("edge_agent_uplink_connects_total"), Some(0.0), "{failures} failures");
    let (cert, _) = broker.device_cert("dev-untrusting");
    let not_after = edge_wire::tls::certificate_expiry(&cert).unwrap();
    assert!(not_after > now_ms() / 1000, "a fresh certificate");
    assert_eq!(agent.metric("edge_agent_tls_certificate_expiry_timestamp_seconds"), Some(not_after as f64));
}
