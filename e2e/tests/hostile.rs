//! One device cannot harm another (docs/threat-model.md): two honest agents
//! run against the shipped broker config, a real bridge and a real
//! Prometheus while a hostile device sends every kind of bad input it can:
//! samples a year ahead and in 1970, oversized and malformed payloads,
//! payloads in another device's name or on its topics, replays, and forged
//! delivery confirmations, also under a device certificate that carries the
//! bridge's name. The invariant: every window the honest agents stored
//! lands in Prometheus exactly once, at its own time, within a stated
//! delay, and every hostile input is counted where it was refused.

use e2e::*;
use edge_wire::{BlockEncoder, Envelope, Label, SeriesKey};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

const WINDOW_MS: u64 = 200;
/// How long after the hostile device's last input every honest window up
/// to then must be in Prometheus.
const LANDING: Duration = Duration::from_secs(60);
const YEAR_MS: i64 = 366 * 86_400_000;

/// What a test client's connection answered to one publish.
#[derive(Debug, PartialEq)]
enum Answer {
    /// The broker took it (PUBACK).
    Taken,
    /// The broker closed the connection (ACL denial, size limit).
    Closed(String),
}

/// Connects with `opts`, publishes once at QoS 1, and returns what the
/// broker did, on a connection of its own (mosquitto closes a connection
/// that broke its rules).
fn publish_once(opts: MqttOptions, topic: &str, payload: Vec<u8>) -> Answer {
    publish(opts, topic, payload, false)
}

/// A publish the broker must refuse: mosquitto drops it and closes the
/// connection, with or without a PUBACK first (MQTT 3.1.1 has no refusal
/// code), so after a PUBACK the close must follow.
fn publish_denied(opts: MqttOptions, topic: &str, payload: Vec<u8>) -> Answer {
    publish(opts, topic, payload, true)
}

fn publish(mut opts: MqttOptions, topic: &str, payload: Vec<u8>, denied: bool) -> Answer {
    opts.set_max_packet_size(32 << 20, 32 << 20);
    let (client, mut conn) = Client::new(opts, 8);
    client.publish(topic, QoS::AtLeastOnce, false, payload).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            let answer = match ev {
                Ok(Event::Incoming(Packet::PubAck(_))) => Answer::Taken,
                Ok(_) => continue,
                Err(e) => Answer::Closed(e.to_string()),
            };
            let closed = matches!(answer, Answer::Closed(_));
            if tx.send(answer).is_err() || closed {
                return;
            }
        }
    });
    let next = || rx.recv_timeout(Duration::from_secs(30)).expect("the broker answers within 30 s");
    let answer = match next() {
        // Taken, and the connection stays open: the broker allowed it.
        Answer::Taken if denied => rx.recv_timeout(Duration::from_secs(10)).unwrap_or(Answer::Taken),
        other => other,
    };
    let _ = client.try_disconnect();
    answer
}

/// An envelope of one block: one series `name` with a sample at each of
/// `times` (its value the time), one frame each.
fn envelope(device: &str, first_seq: u64, name: &str, times: &[i64]) -> Vec<u8> {
    let mut enc = BlockEncoder::new();
    let key = SeriesKey::new(name, vec![Label::new("k", "v")]);
    let frames: Vec<Vec<u8>> = times.iter().map(|&t| enc.frame(t, &[(key.clone(), t as f64)]).unwrap()).collect();
    of_frames(device, first_seq, &frames)
}

/// An envelope of `frames` (a block: the first a start frame).
fn of_frames(device: &str, first_seq: u64, frames: &[Vec<u8>]) -> Vec<u8> {
    Envelope { device, lane: 0, first_seq, clock_shift_ms: 0, frames: frames.iter().map(Vec::as_slice).collect() }
        .encode()
}

/// A certificate from the *device* CA whose name is the bridge's: what the
/// issue found granted bridge rights. Made with openssl directly: the
/// shipped tooling refuses to (checked below).
fn device_ca_cert_named(pki: &Path, cn: &str) -> (PathBuf, PathBuf) {
    let (crt, key) = (pki.join(format!("rogue-{cn}.crt")), pki.join(format!("rogue-{cn}.key")));
    let ext = pki.join("rogue.ext");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    let sh = format!(
        "openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {key} 2>/dev/null && \
         openssl req -new -key {key} -subj /CN={cn} 2>/dev/null | openssl x509 -req -CA {ca} -CAkey {cakey} \
         -CAcreateserial -days 30 -extfile {ext} -out {crt} 2>/dev/null",
        key = key.display(),
        crt = crt.display(),
        ca = pki.join("ca.crt").display(),
        cakey = pki.join("ca.key").display(),
        ext = ext.display(),
    );
    assert!(Command::new("sh").args(["-c", &sh]).status().unwrap().success(), "openssl");
    (crt, key)
}

fn options_with_cert(broker: &Broker, client_id: &str, port: u16, cert: &Path, key: &Path) -> MqttOptions {
    let tls = edge_wire::tls::TlsConfig {
        enabled: true,
        ca_file: broker.pki.join("ca.crt"),
        cert_file: cert.to_owned(),
        key_file: key.to_owned(),
    };
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    let cfg = tls.client_config().expect("rogue TLS files");
    o.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(cfg)));
    o
}

fn bridge_metric(port: u16, series: &str) -> f64 {
    scrape(port, series).ok().flatten().unwrap_or(0.0)
}

fn wait_metric(what: &str, port: u16, series: &str, want: f64) {
    wait_for(what, Duration::from_secs(30), || match scrape(port, series) {
        Ok(Some(v)) if v == want => Ok(()),
        other => Err(format!("{series}: {other:?}")),
    });
}

/// The store's own health travels in every window: one sample per window.
const EVERY_WINDOW: &str = "edge_agent_store_bytes";

#[test]
fn no_device_can_lose_delay_or_corrupt_another_devices_data() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("hostile");
    let broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let (mut bridge, bm) = bridge(&dir, &broker, &prom.write_url(), "bridge-hostile");
    let (spied_tx, spied) = mpsc::channel::<String>();

    // Two honest devices: real agents, probes off (their store health is
    // in every window), each in a directory of its own.
    let honest = ["honest-a", "honest-b"].map(|id| {
        let d = dir.join(id);
        std::fs::create_dir_all(&d).unwrap();
        let mut s = AgentSetup::offline(id, QUIET);
        s.broker = Some(&broker);
        s.window_ms = WINDOW_MS;
        (id, d.clone(), Agent::launch(&d, &s))
    });
    let mut honest = honest;
    for (id, _, a) in &mut honest {
        let port = a.metrics_port;
        wait_for(&format!("{id}'s first confirmed block"), Duration::from_secs(60), || {
            a.proc.assert_running();
            match scrape(port, "edge_agent_uplink_confirmed_blocks_total") {
                Ok(Some(v)) if v >= 1.0 => Ok(()),
                other => Err(format!("{other:?}")),
            }
        });
    }

    // The hostile device, on its own topic with its own certificate.
    let hostile = "dev-hostile";
    let as_hostile = || broker.mqtt_options(&format!("{hostile}-{}", now_ms()), Who::Device(hostile));
    let own = edge_wire::metrics_topic("edge", hostile);
    let now = now_ms();

    // 1. A year ahead (what moved Prometheus's head and lost 30 of 31
    //    windows of another device), in 1970, and a block mixing good and
    //    bad times: only the good one is written.
    let future = envelope(hostile, 1, "hostile_m", &[now + YEAR_MS, now + YEAR_MS + 10_000]);
    assert_eq!(publish_once(as_hostile(), &own, future.clone()), Answer::Taken);
    assert_eq!(publish_once(as_hostile(), &own, envelope(hostile, 3, "hostile_m", &[1_000, 2_000])), Answer::Taken);
    let mixed = envelope(hostile, 5, "hostile_mixed", &[now - 3 * 86_400_000 * 4, now - 5_000, now + 2 * YEAR_MS]);
    assert_eq!(publish_once(as_hostile(), &own, mixed), Answer::Taken);
    // 2. Replays: the same far-future block again, twice (the bridge spots
    //    them as copies).
    for _ in 0..2 {
        assert_eq!(publish_once(as_hostile(), &own, future.clone()), Answer::Taken);
    }
    // 3. Over the size limit: 10 MB is refused by the broker (its
    //    max_packet_size), the hostile connection closed; just over the
    //    payload limit (under the packet limit) reaches the bridge, which
    //    dead-letters and acknowledges it.
    let big = publish_denied(as_hostile(), &own, vec![edge_wire::ENVELOPE_VERSION; 10 << 20]);
    assert!(matches!(big, Answer::Closed(_)), "10 MB: {big:?}");
    let over = vec![edge_wire::ENVELOPE_VERSION; edge_wire::MAX_MESSAGE_BYTES + 100];
    assert_eq!(publish_once(as_hostile(), &own, over), Answer::Taken);
    // 4. Malformed payloads.
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let malformed = 20;
    for i in 0..malformed {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let payload = if i % 2 == 0 {
            future[..(rng as usize % future.len())].to_vec()
        } else {
            (0..(rng % 200 + 1)).map(|k| (rng >> (k % 56)) as u8 | 0x80).collect()
        };
        assert_eq!(publish_once(as_hostile(), &own, payload), Answer::Taken);
    }
    // 5. Spoofing: another device's name on its own topic (the bridge
    //    refuses it), and another device's topics (the broker's ACL).
    assert_eq!(publish_once(as_hostile(), &own, envelope("honest-a", 1, "spoof", &[now - 1000])), Answer::Taken);
    let on_victim = publish_denied(as_hostile(), "edge/honest-a/metrics", envelope("honest-a", 1, "spoof", &[now]));
    assert!(matches!(on_victim, Answer::Closed(_)), "on another device's topic: {on_victim:?}");
    let forged = edge_wire::DeliveryAck { lane: 0, first_seq: 1, last_seq: 1_000_000_000 }.encode();
    let confirm = publish_denied(as_hostile(), "edge/honest-a/ack", forged.clone());
    assert!(matches!(confirm, Answer::Closed(_)), "a confirmation for another device: {confirm:?}");
    // 6. A device certificate named like the bridge: on the device
    //    listener it has a device's rights only, and the bridge listener
    //    does not take it at all.
    let (rogue_crt, rogue_key) = device_ca_cert_named(&broker.pki, "fleet-bridge");
    let rogue = || options_with_cert(&broker, "fleet-bridge", broker.port, &rogue_crt, &rogue_key);
    let forged_by_rogue = publish_denied(rogue(), "edge/honest-b/ack", forged.clone());
    assert!(matches!(forged_by_rogue, Answer::Closed(_)), "rogue bridge confirmed: {forged_by_rogue:?}");
    let spy = {
        let (client, mut conn) = Client::new(rogue(), 16);
        client.subscribe("edge/+/metrics", QoS::AtLeastOnce).unwrap();
        let tx = spied_tx.clone();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Packet::Publish(p))) => drop(tx.send(p.topic.clone())),
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        client
    };
    let on_bridge_port = options_with_cert(&broker, "rogue-2", broker.bridge_port, &rogue_crt, &rogue_key);
    let as_bridge = publish_denied(on_bridge_port, "edge/honest-b/ack", forged.clone());
    assert!(matches!(as_bridge, Answer::Closed(_)), "rogue on the bridge listener: {as_bridge:?}");
    // 7. The one identity that may confirm (a real bridge) confirming what
    //    a device never published: the agent does not trust it.
    let ignored_before = honest[0].2.metric("edge_agent_uplink_confirmations_ignored_total").unwrap_or(0.0);
    let answer = publish_once(broker.mqtt_options("bridge-forger", Who::Bridge), "edge/honest-a/ack", forged);
    assert_eq!(answer, Answer::Taken);
    let agent_a = honest[0].2.metrics_port;
    wait_metric(
        "the forged confirmation counted",
        agent_a,
        "edge_agent_uplink_confirmations_ignored_total",
        ignored_before + 1.0,
    );

    // Every honest window stored until a cut 20 windows after the hostile
    // device's last input lands exactly once, at its time (without the
    // bridge's time bounds, the year-ahead sample made Prometheus refuse
    // all of these as too old).
    let cut = now_ms() + 20 * WINDOW_MS as i64;
    for (id, d, a) in &mut honest {
        wait_for(&format!("{id} storing windows past the cut"), LANDING, || {
            a.proc.assert_running();
            let newest = stored_samples(d, EVERY_WINDOW, &["lane=\"routine\""]).last().map(|s| s.0);
            if newest.is_some_and(|t| t > cut) {
                Ok(())
            } else {
                Err(newest)
            }
        });
    }
    for (id, d, a) in &mut honest {
        let sel = format!("{EVERY_WINDOW}{{device=\"{id}\",lane=\"routine\"}}");
        let landed = wait_for(&format!("every window of {id} up to the cut"), LANDING, || {
            a.proc.assert_running();
            bridge.assert_running();
            let stored: Vec<(i64, f64)> =
                stored_samples(d, EVERY_WINDOW, &["lane=\"routine\""]).into_iter().filter(|s| s.0 <= cut).collect();
            let landed: Vec<(i64, f64)> =
                prom.raw_samples(&sel, 3600).unwrap_or_default().into_iter().filter(|s| s.0 <= cut).collect();
            if landed == stored && !stored.is_empty() {
                Ok(landed)
            } else {
                Err(format!("stored {} windows, landed {}", stored.len(), landed.len()))
            }
        });
        // Dense: a window every WINDOW_MS, none lost while the hostile
        // device was at work.
        assert!(landed.len() >= 20, "{id}: only {} windows", landed.len());
        for w in landed.windows(2) {
            assert!(w[1].0 - w[0].0 < 3 * WINDOW_MS as i64, "{id}: a gap {:?} -> {:?}", w[0], w[1]);
        }
        assert_eq!(
            a.metric("edge_agent_uplink_confirmations_ignored_total").unwrap_or(0.0),
            f64::from(*id == "honest-a")
        );
    }
    // Every hostile input counted where it was refused.
    wait_metric(
        "the year-ahead samples counted",
        bm,
        "fleet_bridge_samples_out_of_bounds_total{device=\"dev-hostile\",reason=\"ahead\"}",
        2.0 + 1.0,
    );
    // The replays are copies of a block already handled: confirmed again,
    // counted as copies (honest agents' resends may add to that count),
    // nothing of them written or counted twice.
    wait_for("the replays counted as copies", Duration::from_secs(30), || {
        match scrape(bm, "fleet_bridge_messages_total{result=\"copy\"}") {
            Ok(Some(v)) if v >= 2.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    wait_metric(
        "the 1970 samples counted",
        bm,
        "fleet_bridge_samples_out_of_bounds_total{device=\"dev-hostile\",reason=\"too_old\"}",
        2.0 + 1.0,
    );
    wait_metric(
        "the malformed payloads counted",
        bm,
        "fleet_bridge_messages_total{result=\"undecodable\"}",
        malformed as f64,
    );
    wait_metric("the spoofed name counted", bm, "fleet_bridge_messages_total{result=\"wrong_device\"}", 1.0);
    wait_metric("the oversized payload counted", bm, "fleet_bridge_messages_total{result=\"too_large\"}", 1.0);
    assert_eq!(bridge_metric(bm, "fleet_bridge_messages_total{result=\"partly_out_of_bounds\"}"), 1.0);
    // The mixed block's good sample is in, at its time; nothing else of the
    // hostile device's times is.
    let mixed_in = prom.raw_samples("hostile_mixed{device=\"dev-hostile\"}", 3600).unwrap();
    assert_eq!(mixed_in, vec![(now - 5_000, (now - 5_000) as f64)]);
    assert!(prom.raw_samples("hostile_m{device=\"dev-hostile\"}", 3600).unwrap().is_empty());
    assert!(prom.raw_samples("spoof", 3600).unwrap().is_empty(), "a spoofed sample landed");
    // Prometheus's newest time stayed near the true time.
    let head_max = scrape(prom.port, "prometheus_tsdb_head_max_time").unwrap().unwrap_or(0.0);
    assert!(head_max < (now_ms() + 600_000) as f64, "Prometheus's head moved to {head_max}");

    // The rogue spy saw nothing of the honest devices' data.
    drop(spy);
    let seen: Vec<String> = spied.try_iter().collect();
    assert!(seen.is_empty(), "a device certificate named fleet-bridge read {seen:?}");
    bridge.assert_running();
    let _ = std::fs::remove_dir_all(dir); // kept for reading when a check fails
}

/// The shipped tooling issues no device certificate with a central name.
#[test]
fn fleet_certs_refuses_reserved_device_names() {
    let dir = tempdir("reserved-names");
    let certs = repo_dir().join("scripts/fleet-certs.sh");
    let run = |args: &[&str]| Command::new(&certs).arg(&dir).args(args).output().unwrap();
    assert!(run(&["ca"]).status.success());
    for name in ["fleet-bridge", "fleet-admin", "FLEET-BRIDGE"] {
        let out = run(&["device", name]);
        assert_eq!(out.status.code(), Some(2), "{name}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("reserved"), "{name}");
        assert!(!dir.join("devices").join(format!("{name}.crt")).exists());
    }
    assert!(run(&["device", "press-7"]).status.success());
    let _ = std::fs::remove_dir_all(dir);
}

/// One size limit end to end: the shipped broker's `max_packet_size` is
/// the wire format's packet limit, and the agent's largest block fits.
#[test]
fn one_size_limit_from_agent_to_broker_to_bridge() {
    let conf = std::fs::read_to_string(repo_dir().join("configs/mosquitto/mosquitto.conf")).unwrap();
    let limit: usize = conf
        .lines()
        .find_map(|l| l.strip_prefix("max_packet_size "))
        .expect("max_packet_size in the shipped broker config")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(limit, edge_wire::MAX_PACKET_BYTES);
    let doc = std::fs::read_to_string(repo_dir().join("docs/wire-format.md")).unwrap();
    assert!(doc.contains(&format!("{}", edge_wire::MAX_PACKET_BYTES)), "docs/wire-format.md names the limit");
}

/// A sample the store answers with a retryable error (5xx) every time,
/// while it takes everything else: it used to be retried forever, holding
/// every device's messages behind it. Now the bridge probes the store,
/// isolates the failing sample (halves down to one), refuses and counts
/// it, and the rest of its block and every other device's data land.
#[test]
fn a_sample_that_always_fails_never_wedges_the_bridge() {
    if !require_root_and_tools() {
        return;
    }
    let dir = tempdir("poison");
    let broker = Broker::start(&dir);
    let prom = Prom::start(&dir);
    let faulty = FaultyStore::start(&prom.write_url(), "ZQXJ7f3a");
    let (mut bridge, bm) =
        bridge_full(&dir, &broker, &faulty.url(), "bridge-poison", "", "isolate_after_failures = 2\n");
    let now = now_ms();
    let mut enc = BlockEncoder::new();
    let series = |v: &str| SeriesKey::new("isolated_m", vec![Label::new("k", v)]);
    let frames: Vec<Vec<u8>> = (0..4)
        .map(|i| {
            let t = now - 10_000 + i * 1000;
            enc.frame(t, &[(series("ok-a"), 1.0), (series("ZQXJ7f3a"), 2.0), (series("ok-b"), 3.0)]).unwrap()
        })
        .collect();
    let block = of_frames("dev-poison", 1, &frames);
    assert_eq!(
        publish_once(broker.mqtt_options("dev-poison", Who::Device("dev-poison")), "edge/dev-poison/metrics", block),
        Answer::Taken
    );
    // Another device right behind it.
    let other = envelope("dev-other", 1, "other_m", &[now - 5_000]);
    assert_eq!(
        publish_once(broker.mqtt_options("dev-other", Who::Device("dev-other")), "edge/dev-other/metrics", other),
        Answer::Taken
    );
    wait_for("the other device's sample behind the poisoned block", LANDING, || {
        bridge.assert_running();
        match prom.raw_samples("other_m{device=\"dev-other\"}", 3600) {
            Ok(v) if v.len() == 1 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    for ok in ["ok-a", "ok-b"] {
        let got = prom.raw_samples(&format!("isolated_m{{device=\"dev-poison\",k=\"{ok}\"}}"), 3600).unwrap();
        assert_eq!(got.len(), 4, "{ok}: the block's other samples are written");
    }
    assert!(prom.raw_samples("isolated_m{k=\"ZQXJ7f3a\"}", 3600).unwrap().is_empty());
    wait_metric(
        "the failing samples counted",
        bm,
        "fleet_bridge_samples_refused_total{reason=\"persistent_error\"}",
        4.0,
    );
    assert!(faulty.injected.load(std::sync::atomic::Ordering::Relaxed) >= 4 * 2);
    let _ = std::fs::remove_dir_all(dir);
}
