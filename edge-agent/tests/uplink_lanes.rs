//! The uplink against a real mosquitto, fleet-bridge and Prometheus: a
//! routine backlog and one priority block wait in the store; the priority
//! block must arrive first, and every block must be confirmed end to end and
//! the send positions persisted.

use edge_agent::config::Config;
use edge_agent::metrics::AgentMetrics;
use edge_agent::store::blocks::BlockWriter;
use edge_agent::store::{Lane, Lanes};
use edge_agent::window::Window;
use edge_wire::{Envelope, Label, SeriesKey};
use rumqttc::{Client, Event, Packet, QoS};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn window(ts: i64, name: &str) -> Window {
    Window {
        timestamp_ms: ts,
        samples: vec![(SeriesKey::new(name, vec![Label::new("k", "v")]), ts as f64)],
        values: Vec::new(),
    }
}

#[test]
fn priority_blocks_go_first_and_everything_is_confirmed() {
    if !e2e::require_root_and_tools() {
        return;
    }
    let dir = e2e::tempdir("lanes");
    let broker = e2e::Broker::start(&dir);
    // The send positions move only on the bridge's end-to-end confirmations.
    let prom = e2e::Prom::start(&dir);
    let (_bridge, _) = e2e::bridge(&dir, &broker, &prom.write_url(), "lanes-bridge");
    let mut cfg = Config { device_id: "lanes-test".into(), state_dir: dir.join("state"), ..Default::default() };
    cfg.mqtt.port = broker.port;
    let (cert_file, key_file) = broker.device_cert("lanes-test");
    cfg.mqtt.tls = edge_wire::tls::TlsConfig { enabled: true, ca_file: broker.pki.join("ca.crt"), cert_file, key_file };
    cfg.mqtt.max_inflight = 1; // one message at a time: the order is observable
    cfg.mqtt.live_interval_ms = 0;

    let mut lanes = Lanes::open(&cfg.store_dir(), cfg.store_limits(), cfg.priority_limits()).unwrap();
    let mut routine = BlockWriter::new(5, 1 << 20);
    for w in 0..50 {
        routine.write(&mut lanes.routine, &window(1_000_000 + w * 1000, "routine_m")).unwrap();
    }
    let mut priority = BlockWriter::new(5, 1 << 20);
    priority.write(&mut lanes.priority, &window(1_049_500, "edge_alarm")).unwrap();
    let store = Arc::new(Mutex::new(lanes));

    // Subscribe before the uplink starts.
    let mut opts = broker.mqtt_options("lanes-sub", e2e::Who::Bridge);
    opts.set_max_packet_size(1 << 22, 1 << 16);
    let (sub, mut conn) = Client::new(opts, 16);
    sub.subscribe("edge/+/metrics", QoS::AtLeastOnce).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for ev in conn.iter() {
            match ev {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let env = Envelope::decode(&p.payload).unwrap();
                    let _ = tx.send((env.lane, env.first_seq, env.frames.len()));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send((u8::MAX, 0, 0));
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap().0, u8::MAX, "no SUBACK");

    let shutdown = Arc::new(AtomicBool::new(false));
    let clock = Arc::new(Mutex::new(edge_agent::clock::Clock::open(&cfg.state_dir, 1000).0));
    let (metrics, _) = AgentMetrics::new();
    let uplink =
        edge_agent::uplink::Uplink::new(cfg.clone(), store.clone(), clock, metrics, shutdown.clone()).spawn().unwrap();

    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.iter().map(|g: &(u8, u64, usize)| g.2).sum::<usize>() < 51 && Instant::now() < deadline {
        if let Ok(m) = rx.recv_timeout(Duration::from_millis(200)) {
            got.push(m);
        }
    }
    assert_eq!(got.first().map(|g| g.0), Some(1), "the priority block must go first: {got:?}");
    let routine_frames: usize = got.iter().filter(|g| g.0 == 0).map(|g| g.2).sum();
    assert_eq!(routine_frames, 50, "{got:?}");
    assert_eq!(got.iter().filter(|g| g.0 == 0).count(), 10, "routine blocks of 5 frames: {got:?}");

    // Confirmed end to end and persisted: both lanes' backlogs drain to zero.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (r, p) = {
            let l = store.lock().unwrap();
            (l.routine.stats().backlog(), l.priority.stats().backlog())
        };
        if r == 0 && p == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "backlogs stuck at routine {r}, priority {p}");
        std::thread::sleep(Duration::from_millis(50));
    }
    shutdown.store(true, std::sync::atomic::Ordering::Relaxed);
    uplink.join().unwrap();
    drop(store);
    let lanes = Lanes::open(&cfg.store_dir(), cfg.store_limits(), cfg.priority_limits()).unwrap();
    assert_eq!((lanes.routine.stats().acked_seq, lanes.priority.stats().acked_seq), (50, 1));
    let _ = Lane::ALL;
    let _ = std::fs::remove_dir_all(&dir);
}
