//! The NATS cluster's permissions (configs/nats, scripts/nats-users.sh)
//! hold a device to its own subjects as the shipped mosquitto ACL does: a
//! publish on another device's topic is refused and logged, subscriptions
//! to others' data and confirmations are refused, the bridge certificate
//! cannot log in on the devices' MQTT listener; the device's own block
//! lands and its confirmation comes back through another node.

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
    // 3. The bridge's certificate (bridge CA) on the devices' MQTT
    //    listener: refused in the TLS handshake (it trusts the fleet CA).
    let (_sneaky, sneaky_seen) = client(cluster.mqtt_options(2, "sneaky", "fleet-bridge"));
    assert!(matches!(next(&sneaky_seen), Seen::Error(_)), "a bridge certificate logged in on the MQTT listener");

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
