//! The NATS cluster's permissions (configs/nats, scripts/nats-users.sh)
//! hold a device to its own subjects as the shipped mosquitto ACL does: a
//! publish on another device's topic is refused and logged, subscriptions
//! to others' data and confirmations are refused, the bridge certificate
//! cannot log in on the MQTT listener; the operator's (CN=fleet-admin) can,
//! publishes a device's retained configuration document, which the device
//! reads on another node, and may not publish a device's data; the
//! device's own block lands and its confirmation comes back through
//! another node.

use e2e::nats::NatsCluster;
use e2e::*;
use edge_wire::{BlockEncoder, Envelope, Label, SeriesKey};
use rumqttc::{Client, QoS, SubscribeReasonCode};
use std::sync::mpsc;
use std::time::Duration;

fn block(device: &str, t: i64, v: f64) -> Vec<u8> {
    let mut enc = BlockEncoder::new();
    let frame = enc.frame(t, &[(SeriesKey::new("nats_identity", vec![Label::new("k", "v")]), v)]).unwrap();
    Envelope { device, lane: 0, first_seq: 1, clock_shift_ms: 0, frames: vec![&frame] }.encode()
}

fn client(opts: rumqttc::MqttOptions) -> (Client, mpsc::Receiver<Seen>) {
    watched_client(opts)
}

fn next(rx: &mpsc::Receiver<Seen>) -> Seen {
    rx.recv_timeout(Duration::from_secs(15)).expect("the cluster answers within 15 s")
}

#[test]
fn a_device_on_the_nats_cluster_can_only_write_and_read_its_own_subjects() {
    if !require_root_and_tools() {
        return;
    }
    if !require_tools("the NATS identity test", &["nats-server"]) {
        return;
    }
    let dir = tempdir("nats-identity");
    let ids = ["dev-victim".to_string(), "dev-mallory".to_string()];
    let cluster = NatsCluster::start(&dir, &ids);
    let prom = Prom::start(&dir);
    let (_bridge, bridge_metrics) = bridge_on_nats(&dir, &cluster, &prom.write_url(), "fleet-bridge-0", "", "", "info");
    let now = now_ms();

    let mallory = |node: usize| {
        let (c, seen) = client(cluster.mqtt_options(node, "mallory", "dev-mallory"));
        let s = next(&seen);
        assert!(matches!(s, Seen::ConnAck), "{s:?}");
        (c, seen)
    };
    // 1. On the victim's topic: refused by the node (NATS logs a publish
    //    violation; MQTT 3.1.1 has no refusal code for a publish).
    let (c, _seen) = mallory(0);
    c.publish("edge/dev-victim/metrics", QoS::AtLeastOnce, false, block("dev-victim", now - 3000, 666.0)).unwrap();
    wait_for("the node to refuse mallory's publish", Duration::from_secs(15), || {
        let log = cluster.log_text();
        if log.contains("Publish Violation")
            && log.contains("CN=dev-mallory")
            && log.contains("edge.dev-victim.metrics")
        {
            Ok(())
        } else {
            Err("no publish violation logged")
        }
    });
    // 2. Subscribing to other devices' data or confirmations: refused in
    //    the SUBACK, filter by filter.
    let (spy, spy_seen) = mallory(1);
    spy.subscribe_many(
        ["edge/+/metrics", "edge/dev-victim/ack", "edge/#"]
            .map(|t| rumqttc::SubscribeFilter::new(t.into(), QoS::AtLeastOnce)),
    )
    .unwrap();
    match next(&spy_seen) {
        Seen::SubAck(codes) => {
            assert_eq!(codes, vec![SubscribeReasonCode::Failure; 3], "mallory may subscribe to others' subjects")
        }
        other => panic!("{other:?}"),
    }
    // 3. The bridge's certificate (bridge CA, as the operators') on the
    //    MQTT listener: the handshake passes, the user may not use MQTT.
    let (_sneaky, sneaky_seen) = client(cluster.mqtt_options(2, "sneaky", "fleet-bridge"));
    match next(&sneaky_seen) {
        Seen::Error(e) => assert!(e.contains("NotAuthorized") || e.contains("not authorized"), "{e}"),
        other => panic!("a bridge certificate logged in on the MQTT listener: {other:?}"),
    }

    // 4. The operator (CN=fleet-admin, bridge CA) publishes a device's
    //    configuration document retained; the device, on another node,
    //    gets it. The operator may not publish a device's data.
    let (admin, admin_seen) = client(cluster.mqtt_options(0, "fleet-admin-e2e", "fleet-admin"));
    assert!(matches!(next(&admin_seen), Seen::ConnAck), "the operator logs in on the MQTT listener");
    admin.publish("edge/dev-victim/config", QoS::AtLeastOnce, true, b"a document".to_vec()).unwrap();
    assert!(matches!(next(&admin_seen), Seen::PubAck));
    let (reader, reader_seen) = client(cluster.mqtt_options(1, "victim-config", "dev-victim"));
    assert!(matches!(next(&reader_seen), Seen::ConnAck));
    reader.subscribe("edge/dev-victim/config", QoS::AtLeastOnce).unwrap();
    let mut got = None;
    while got.is_none() {
        match next(&reader_seen) {
            Seen::SubAck(codes) => assert!(codes.iter().all(|c| *c != SubscribeReasonCode::Failure), "{codes:?}"),
            Seen::Publish(topic, payload) if topic == "edge/dev-victim/config" => got = Some(payload),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got.unwrap(), b"a document");
    reader.disconnect().unwrap();
    admin.publish("edge/dev-victim/metrics", QoS::AtLeastOnce, false, block("dev-victim", now - 2000, 667.0)).unwrap();
    wait_for("the node to refuse the operator's publish of data", Duration::from_secs(15), || {
        let log = cluster.log_text();
        let refused = log.lines().any(|l| {
            l.contains("Publish Violation") && l.contains("CN=fleet-admin") && l.contains("edge.dev-victim.metrics")
        });
        refused.then_some(()).ok_or("no publish violation logged")
    });

    // The victim's own block lands, and its confirmation comes back to it
    // on another node than the one it published to.
    let (listener, heard) = client(cluster.mqtt_options(2, "victim-ack", "dev-victim"));
    assert!(matches!(next(&heard), Seen::ConnAck));
    listener.subscribe("edge/dev-victim/ack", QoS::AtLeastOnce).unwrap();
    match next(&heard) {
        Seen::SubAck(codes) => assert!(codes.iter().all(|c| *c != SubscribeReasonCode::Failure), "{codes:?}"),
        other => panic!("{other:?}"),
    }
    let (victim, victim_seen) = client(cluster.mqtt_options(0, "victim", "dev-victim"));
    assert!(matches!(next(&victim_seen), Seen::ConnAck));
    victim.publish("edge/dev-victim/metrics", QoS::AtLeastOnce, false, block("dev-victim", now - 1000, 42.0)).unwrap();
    let ack = loop {
        match next(&heard) {
            Seen::Publish(topic, payload) if topic == "edge/dev-victim/ack" => break payload,
            Seen::Error(e) => panic!("the victim's listener lost its connection: {e}"),
            _ => {}
        }
    };
    let ack = edge_wire::DeliveryAck::decode(&ack).expect("a delivery confirmation");
    assert_eq!((ack.lane, ack.first_seq, ack.last_seq), (0, 1, 1));
    let values = prom.raw_samples("nats_identity{device=\"dev-victim\"}", 600).unwrap();
    assert_eq!(values.iter().map(|v| v.1).collect::<Vec<_>>(), vec![42.0], "only the victim's own sample landed");
    assert_eq!(scrape(bridge_metrics, "fleet_bridge_messages_total{result=\"written\"}").unwrap(), Some(1.0));
}

/// The operator's tools over the NATS cluster: a box whose certificate
/// expires in 20 days asks for a new one (retained on its `csr` topic);
/// `fleet-bridge certificates sign` as the operator (CN=fleet-admin, on
/// another node's MQTT listener) answers it; the box installs the new
/// certificate and delivers on with it through the cluster.
#[test]
fn the_operator_renews_a_box_certificate_over_the_nats_cluster() {
    if !require_root_and_tools() {
        return;
    }
    if !require_tools("the NATS operator test", &["nats-server"]) {
        return;
    }
    let dir = tempdir("nats-operator");
    let device = format!("e2e-nats-renewal-{}", std::process::id());
    let mut cluster = NatsCluster::start(&dir, &[]);
    let made = std::process::Command::new(repo_dir().join("scripts/fleet-certs.sh"))
        .arg(&cluster.pki)
        .args(["device", &device])
        .env("FLEET_CERT_DAYS", "20")
        .status()
        .unwrap();
    assert!(made.success());
    cluster.add_devices(std::slice::from_ref(&device));
    let prom = Prom::start(&dir);
    let (_bridge, _) = bridge_on_nats(&dir, &cluster, &prom.write_url(), "fleet-bridge-0", "", "", "info");
    let keys = cluster.device_toml(0, &device);
    let mut agent = Agent::launch(&dir, &AgentSetup { connection: Some(&keys), ..AgentSetup::offline(&device, QUIET) });
    let renewals =
        |a: &Agent, r: &str| a.metric(&format!("edge_agent_tls_renewals_total{{result=\"{r}\"}}")).unwrap_or(0.0);
    wait_for("the certificate request", Duration::from_secs(60), || {
        agent.proc.assert_running();
        (renewals(&agent, "requested") == 1.0).then_some(()).ok_or(renewals(&agent, "requested"))
    });

    let conf = dir.join("operator.toml");
    std::fs::write(&conf, format!("{}[audit]\ndir = \"{}\"\n", cluster.operator_toml(1), dir.join("audit").display()))
        .unwrap();
    wait_for("the signer to answer the request", Duration::from_secs(60), || {
        agent.proc.assert_running();
        match certificates_sign(&conf, &cluster.pki) {
            (Some(0), out) if out.contains("1 signed") => Ok(()),
            other => Err(other),
        }
    });
    let rotations = |a: &Agent| a.metric("edge_agent_tls_rotations_total{result=\"installed\"}").unwrap_or(0.0);
    wait_for("the signed certificate installed", Duration::from_secs(60), || {
        agent.proc.assert_running();
        (rotations(&agent) == 1.0).then_some(()).ok_or(rotations(&agent))
    });
    let expiry = agent.metric("edge_agent_tls_certificate_expiry_timestamp_seconds").unwrap_or(0.0);
    assert!(expiry > (now_ms() / 1000 + 300 * 86_400) as f64, "the new certificate's expiry: {expiry}");
    // Delivering with it: a block confirmed after the installation.
    let confirmed = agent.metric("edge_agent_uplink_confirmed_blocks_total").unwrap_or(0.0);
    wait_for("a block confirmed with the new certificate", Duration::from_secs(30), || {
        agent.proc.assert_running();
        let now = agent.metric("edge_agent_uplink_confirmed_blocks_total").unwrap_or(0.0);
        (now > confirmed).then_some(()).ok_or(now)
    });
}
