//! fleet-bridge against a real mosquitto and a real Prometheus, fed with
//! crafted messages: refused samples are isolated instead of voiding their
//! block, and garbage never stops it or other devices' data.

use e2e::*;
use edge_wire::{BlockEncoder, Envelope, Label, SeriesKey};
use rumqttc::{Client, Event, Packet, QoS};
use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

struct Rig {
    broker: Broker,
    prom: Prom,
    bridge: Proc,
    bridge_metrics: u16,
    /// One MQTT client per device, each with its own certificate: the
    /// broker's ACL lets a device publish only on its own topic.
    devices: RefCell<HashMap<String, Client>>,
    dead: std::sync::mpsc::Receiver<String>,
}

impl Rig {
    /// Publishes `payload` on `device`'s metrics topic, as that device.
    fn publish(&self, device: &str, payload: Vec<u8>) {
        let mut devices = self.devices.borrow_mut();
        let client = devices.entry(device.to_owned()).or_insert_with(|| {
            let mut opts = self.broker.mqtt_options(device, Who::Device(device));
            opts.set_max_packet_size(1 << 22, 1 << 22);
            connect(opts)
        });
        client.publish(edge_wire::metrics_topic("edge", device), QoS::AtLeastOnce, false, payload).unwrap();
    }
}

/// A client whose connection is driven by its own thread; each incoming
/// publish goes to `incoming`.
fn connect_with(opts: rumqttc::MqttOptions, mut incoming: impl FnMut(rumqttc::Publish) + Send + 'static) -> Client {
    let (client, mut conn) = Client::new(opts, 64);
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::Publish(p))) => incoming(p),
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    client
}

/// [`connect_with`], the publishes' topics to `tx`.
fn connect_topics(opts: rumqttc::MqttOptions, tx: std::sync::mpsc::Sender<String>) -> Client {
    connect_with(opts, move |p| {
        let _ = tx.send(p.topic);
    })
}

fn connect(opts: rumqttc::MqttOptions) -> Client {
    connect_with(opts, |_| {})
}

fn rig(name: &str) -> Rig {
    rig_with(name, "")
}

fn rig_with(name: &str, mqtt: &str) -> Rig {
    rig_full(name, mqtt, "")
}

/// A rig whose bridge has more `[mqtt]` and `[remote_write]` settings.
fn rig_full(name: &str, mqtt: &str, remote_write: &str) -> Rig {
    let dir = tempdir(name);
    let broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (bridge, bridge_metrics) =
        bridge_full(&dir, &broker, &prom.write_url(), &format!("bridge-{name}"), mqtt, remote_write);
    // Dead letters are readable with a bridge certificate (configs/mosquitto/acl).
    let (tx, dead) = std::sync::mpsc::channel();
    let reader = connect_topics(broker.mqtt_options(&format!("dead-{name}"), Who::Bridge), tx);
    reader.subscribe("fleet/deadletter/#", QoS::AtLeastOnce).unwrap();
    std::mem::forget(reader); // lives as long as the test process
    Rig { broker, prom, bridge, bridge_metrics, devices: RefCell::default(), dead }
}

fn block(device: &str, series: &[(&str, Vec<(i64, f64)>)]) -> Vec<u8> {
    // One frame per distinct timestamp, each series present when it has a
    // sample then.
    let mut times: Vec<i64> = series.iter().flat_map(|(_, s)| s.iter().map(|p| p.0)).collect();
    times.sort_unstable();
    times.dedup();
    let mut enc = BlockEncoder::new();
    let frames: Vec<Vec<u8>> = times
        .iter()
        .map(|t| {
            let samples: Vec<(SeriesKey, f64)> = series
                .iter()
                .filter_map(|(n, s)| {
                    s.iter().find(|p| p.0 == *t).map(|p| (SeriesKey::new(*n, vec![Label::new("k", "v")]), p.1))
                })
                .collect();
            enc.frame(*t, &samples).unwrap()
        })
        .collect();
    Envelope { device, lane: 0, first_seq: 1, clock_shift_ms: 0, frames: frames.iter().map(Vec::as_slice).collect() }
        .encode()
}

fn count(prom: &Prom, sel: &str) -> usize {
    prom.raw_samples(sel, 3600).map(|v| v.len()).unwrap_or(0)
}

#[test]
fn a_refused_sample_does_not_void_its_block() {
    if !require_root_and_tools() {
        return;
    }
    // The bridge's own bound on sample age set past Prometheus's window:
    // this test is about samples the store refuses.
    let mut r = rig_full("bisect", "", "max_sample_age_secs = 2592000");
    let now = now_ms();
    // Give the TSDB a recent head first, so a 10-day-old sample is out of
    // its bounds (older than the 7-day out-of-order window).
    r.publish("dev-b", block("dev-b", &[("warm", vec![(now - 1000, 1.0)])]));
    wait_for("the warm-up sample", Duration::from_secs(30), || match count(&r.prom, "warm{device=\"dev-b\"}") {
        1 => Ok(()),
        n => Err(n),
    });
    let old = now - 10 * 86_400_000;
    let msg = block(
        "dev-b",
        &[
            ("mixed", vec![(old, 1.0), (now - 30_000, 2.0), (now - 20_000, 3.0)]),
            ("other", vec![(now - 25_000, 7.0), (now - 15_000, 8.0)]),
        ],
    );
    r.publish("dev-b", msg);
    wait_for("the good samples of the mixed block", Duration::from_secs(30), || {
        r.bridge.assert_running();
        match (count(&r.prom, "mixed{device=\"dev-b\"}"), count(&r.prom, "other{device=\"dev-b\"}")) {
            (2, 2) => Ok(()),
            other => Err(other),
        }
    });
    let refused = scrape(r.bridge_metrics, "fleet_bridge_samples_refused_total{reason=\"out_of_bounds\"}").unwrap();
    assert_eq!(refused, Some(1.0), "{}", r.bridge.log_text());
}

#[test]
fn garbage_never_stops_the_bridge_or_other_devices() {
    if !require_root_and_tools() {
        return;
    }
    let mut r = rig("garbage");
    let now = now_ms();
    let valid = block("dev-g", &[("g", vec![(now - 5000, 1.0), (now - 4000, 2.0)])]);
    let mut rng: u64 = 0x1234_5678_9abc_def1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut sent_good = 0;
    for i in 0..1000 {
        let garbage: Vec<u8> = if i % 2 == 0 {
            // A truncated valid message.
            valid[..(next() as usize % valid.len())].to_vec()
        } else {
            // Random bytes, never starting with the envelope version.
            let n = (next() % 300) as usize + 1;
            let mut g: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            g[0] = if g[0] == 2 { 3 } else { g[0] };
            g
        };
        r.publish("dev-bad", garbage);
        if i % 100 == 0 {
            let t = now - 100_000 + i as i64 * 10;
            let good = block("dev-good", &[("good", vec![(t, i as f64)])]);
            r.publish("dev-good", good);
            sent_good += 1;
        }
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(5)); // let the client's queue drain
        }
    }
    wait_for("every good sample", Duration::from_secs(60), || {
        r.bridge.assert_running();
        match count(&r.prom, "good{device=\"dev-good\"}") {
            n if n == sent_good => Ok(()),
            n => Err(n),
        }
    });
    wait_for("1000 refusals counted", Duration::from_secs(30), || {
        match scrape(r.bridge_metrics, "fleet_bridge_messages_total{result=\"undecodable\"}") {
            Ok(Some(1000.0)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let mut dead = 0;
    while r.dead.recv_timeout(Duration::from_secs(2)).is_ok() {
        dead += 1;
    }
    // Dead letters go out at QoS 0 (best effort, see fleet-bridge): nearly
    // all of them arrive on loopback, never more than were refused.
    assert!((990..=1000).contains(&dead), "{dead} dead-lettered");
    r.bridge.assert_running();
}

#[test]
fn bridges_in_a_share_group_split_the_fleet() {
    if !require_root_and_tools() {
        return;
    }
    let group = "share_group = \"fleet\"";
    let mut r = rig_with("share", group);
    let dir = tempdir("share2");
    let (mut second, second_metrics) = bridge_with(&dir, &r.broker, &r.prom.write_url(), "bridge-share-2", group);
    let now = now_ms();
    for d in 0..40 {
        let msg = block(&format!("dev-{d}"), &[("shared", vec![(now - 10_000, d as f64)])]);
        r.publish(&format!("dev-{d}"), msg);
    }
    wait_for("all 40 devices' samples", Duration::from_secs(60), || {
        r.bridge.assert_running();
        second.assert_running();
        match count_series(&r.prom, "shared") {
            40 => Ok(()),
            n => Err(n),
        }
    });
    let written = |port| scrape(port, "fleet_bridge_messages_total{result=\"written\"}").ok().flatten().unwrap_or(0.0);
    let (a, b) = (written(r.bridge_metrics), written(second_metrics));
    assert_eq!(a + b, 40.0, "each message written once: {a} + {b}");
    assert!(a > 0.0 && b > 0.0, "both bridges took part: {a} / {b}");
}

fn count_series(prom: &Prom, name: &str) -> usize {
    (0..40).filter(|d| count(prom, &format!("{name}{{device=\"dev-{d}\"}}")) == 1).count()
}

/// A device that missed a confirmation sends the block again (after its
/// delivery timeout, or on reconnecting). The bridge spots the copy: it
/// confirms it again without writing it (a store would refuse its samples
/// as duplicates, and the bridge would then split the request down to
/// single samples to find out which).
#[test]
fn a_resent_block_is_confirmed_again_without_a_write() {
    if !require_root_and_tools() {
        return;
    }
    let r = rig("resent");
    let device = "dev-resent";
    let (tx, acks) = std::sync::mpsc::channel();
    let client = connect_topics(r.broker.mqtt_options(device, Who::Device(device)), tx);
    client.subscribe(edge_wire::ack_topic("edge", device), QoS::AtMostOnce).unwrap();
    let now = now_ms();
    let msg = block(device, &[("resent", vec![(now - 5000, 1.0), (now - 4000, 2.0)])]);
    let requests = || {
        ["2xx", "4xx", "5xx", "error"]
            .iter()
            .map(|s| {
                scrape(r.bridge_metrics, &format!("fleet_bridge_remote_write_requests_total{{status=\"{s}\"}}"))
                    .ok()
                    .flatten()
                    .unwrap_or(0.0)
            })
            .sum::<f64>()
    };
    let result = |what: &str| {
        scrape(r.bridge_metrics, &format!("fleet_bridge_messages_total{{result=\"{what}\"}}")).ok().flatten()
    };
    client.publish(edge_wire::metrics_topic("edge", device), QoS::AtLeastOnce, false, msg.clone()).unwrap();
    wait_for("the block written and confirmed", Duration::from_secs(30), || {
        match (result("written"), acks.try_recv()) {
            (Some(1.0), Ok(_)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let before = requests();
    client.publish(edge_wire::metrics_topic("edge", device), QoS::AtLeastOnce, false, msg).unwrap();
    wait_for("the copy confirmed", Duration::from_secs(30), || match (result("copy"), acks.try_recv()) {
        (Some(1.0), Ok(_)) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    assert_eq!(requests(), before, "the copy cost no remote write");
    assert_eq!(count(&r.prom, "resent{device=\"dev-resent\"}"), 2);
    assert_eq!(result("written"), Some(1.0));
}

/// A device's time request is answered at once while the broker holds a
/// backlog for the bridge (more than the bridge takes in before the store
/// answers; here the store never does): the device measures the round trip
/// and discards answers slower than 5 s, then holds its own backlog for
/// `clock.sync_wait_secs`. On the blocks' connection the request waited
/// behind the whole backlog (a reconnect storm of 1,000 devices: half of
/// them got no usable answer).
#[test]
fn a_time_request_is_answered_at_once_while_a_backlog_waits_for_the_bridge() {
    let dir = tempdir("time-behind-backlog");
    let broker = Broker::start(&dir);
    // A store that takes connections and never answers.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/api/v1/write", hole.local_addr().unwrap());
    std::thread::spawn(move || {
        let held: Vec<_> = hole.incoming().collect();
        drop(held);
    });
    let (mut bridge, port) =
        bridge_full(&dir, &broker, &url, "bridge-time", "", "timeout_ms = 600000\nmax_pending_bytes = 1048576");

    // The device: asks, and hears answers (nonce, when).
    let (tx, replies) = std::sync::mpsc::channel();
    let mut opts = broker.mqtt_options("timer", Who::Device("timer"));
    opts.set_max_packet_size(1 << 22, 1 << 22);
    let device = connect_with(opts, move |p| {
        if let Ok(r) = edge_wire::TimeReply::decode(&p.payload) {
            let _ = tx.send((r.nonce, std::time::Instant::now()));
        }
    });
    device.subscribe(edge_wire::time_reply_topic("edge", "timer"), QoS::AtMostOnce).unwrap();
    let mut nonce = 0;
    let ask = |nonce: u64| -> Option<Duration> {
        let sent = std::time::Instant::now();
        let req = edge_wire::TimeRequest { nonce }.encode();
        device.publish(edge_wire::time_topic("edge", "timer"), QoS::AtMostOnce, false, req).unwrap();
        while let Ok((n, at)) = replies.recv_timeout(Duration::from_secs(5).saturating_sub(sent.elapsed())) {
            if n == nonce {
                return Some(at - sent);
            }
        }
        None
    };
    // Answered before the backlog (the bridge is subscribed by then).
    wait_for("a first time answer", Duration::from_secs(30), || {
        nonce += 1;
        ask(nonce).ok_or("no answer")
    });

    // 72 MiB of blocks from four devices: past what the bridge takes in
    // (its 64 MiB of messages not yet done with).
    let loaders: Vec<_> = (0..4)
        .map(|d| {
            let id = format!("backlog-{d}");
            let mut opts = broker.mqtt_options(&id, Who::Device(&id));
            opts.set_max_packet_size(1 << 22, 1 << 22).set_inflight(100);
            std::thread::spawn(move || {
                let (client, mut conn) = Client::new(opts, 64);
                let topic = edge_wire::metrics_topic("edge", &id);
                let publisher = std::thread::spawn(move || {
                    for k in 0..18u64 {
                        // 4,000 series of long unique labels: ~1 MiB.
                        let samples: Vec<(SeriesKey, f64)> = (0..4000)
                            .map(|s| {
                                let value = format!("{d}-{k}-{s}-{}", "x".repeat(230));
                                (SeriesKey::new("backlog_total", vec![Label::new("k", value)]), s as f64)
                            })
                            .collect();
                        let frame = BlockEncoder::new().frame(now_ms() - 60_000, &samples).unwrap();
                        let payload = Envelope {
                            device: &id,
                            lane: 0,
                            first_seq: k + 1,
                            clock_shift_ms: 0,
                            frames: vec![&frame],
                        }
                        .encode();
                        client.publish(&topic, QoS::AtLeastOnce, false, payload).unwrap();
                    }
                });
                let mut acked = 0;
                for ev in conn.iter() {
                    match ev {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acked += 1;
                            if acked == 18 {
                                break;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => panic!("loader: {e}"),
                    }
                }
                publisher.join().unwrap();
            })
        })
        .collect();
    for l in loaders {
        l.join().unwrap();
    }
    // The bridge has taken what it takes; the rest waits in the broker.
    wait_for("the bridge to fill up", Duration::from_secs(60), || {
        bridge.assert_running();
        match scrape(port, "fleet_bridge_waiting_messages") {
            Ok(Some(n)) if n >= 50.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    nonce += 1;
    let rtt = ask(nonce);
    assert!(rtt.is_some(), "no answer within 5 s while a backlog waits for the bridge");
    bridge.assert_running();
}
