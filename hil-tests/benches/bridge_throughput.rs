//! Bridge throughput with many small blocks (issue 21): a fleet's backlog
//! of one-window blocks queued in mosquitto for the bridge, then drained by
//! it into Prometheus, against the same number of samples written straight
//! into the same Prometheus in the same run (half before the drain, half
//! after), in requests of the shape the bridge makes
//! (`hil_tests::fleet::direct`). Twice, with backlogs of two
//! sizes: the bridge's peak memory must not follow the backlog.
//!
//!   cargo build --release --workspace --bins
//!   cargo bench -p hil-tests --bench bridge_throughput
//!
//! `FLEET_BRIDGE_BIN` runs another bridge binary (an older one, for a
//! before/after table); `BRIDGE_REMOTE_WRITE` adds `[remote_write]` keys
//! (TOML lines). Needs root and the e2e tools (scripts/setup.sh).
//! The broker's and the store's files are on tmpfs: what is measured is
//! the bridge and the store's CPU, not this machine's disk (mosquitto's
//! persistence rewrites its whole database every `autosave_interval`).

use e2e::{Broker, Proc, Prom, Who};
use edge_wire::{BlockEncoder, Envelope};
use hil_tests::fleet::device::Shape;
use hil_tests::fleet::report::process_use;
use std::time::{Duration, Instant};

const DEVICES: usize = 1000;
const SERIES: usize = 200;

fn main() {
    if !e2e::require_root_and_tools() {
        return;
    }
    println!("| backlog (blocks x samples) | bridge s | bridge samples/s | direct samples/s (before / after the bridge) | bridge / direct | bridge CPU s per M samples | bridge peak RSS MiB | most messages waiting | requests |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for windows in [10, 40] {
        run(windows);
    }
}

fn run(windows: usize) {
    std::env::set_var("E2E_TMP", "/dev/shm");
    let dir = e2e::tempdir("bridge-throughput");
    let mut broker = Broker::start(&dir);
    // The loader publishes every device's blocks under the operator's
    // identity: this run's broker lets it write every metrics topic.
    let acl = broker.pki.join("acl-central");
    let mut text = std::fs::read_to_string(&acl).expect("acl-central");
    text.push_str("\nuser fleet-admin\ntopic write edge/+/metrics\n");
    std::fs::write(&acl, text).expect("acl-central");
    broker.stop();
    broker.restart();
    let prom = Prom::start(&dir);

    // The bridge subscribes once (a persistent session) and goes away:
    // the backlog queues for it.
    let (mut bridge, _) = start_bridge(&dir, &broker, &prom);
    bridge.stop();
    let samples = load(&broker, windows);

    // The store's own rate, half of it measured before the bridge's drain
    // and half after: one measurement next to the bridge's varied by a
    // quarter from run to run here.
    let (direct_a, direct_a_secs, _) = hil_tests::fleet::direct::load(&prom, samples / 2, 10_000, 2, SERIES);

    let (mut bridge, port) = start_bridge(&dir, &broker, &prom);
    let t0 = Instant::now();
    let cpu0 = process_use(bridge.pid()).map_or(0.0, |u| u.0);
    let mut peak = 0.0f64;
    let mut most_waiting = 0.0f64;
    e2e::wait_for("the bridge to write the backlog", Duration::from_secs(1800), || {
        bridge.assert_running();
        peak = peak.max(process_use(bridge.pid()).map_or(0.0, |u| u.1));
        let waiting = e2e::scrape(port, "fleet_bridge_waiting_messages").ok().flatten().unwrap_or(0.0);
        most_waiting = most_waiting.max(waiting);
        match e2e::scrape(port, "fleet_bridge_samples_written_total") {
            Ok(Some(n)) if n as usize >= samples => Ok(()),
            other => {
                std::thread::sleep(Duration::from_millis(50));
                Err(format!("{other:?}"))
            }
        }
    });
    let secs = t0.elapsed().as_secs_f64();
    let (cpu, hwm) = process_use(bridge.pid()).unwrap_or((cpu0, peak));
    let requests = e2e::scrape(port, "fleet_bridge_remote_write_requests_total{status=\"2xx\"}").ok().flatten();
    bridge.stop();
    let (direct_b, direct_b_secs, _) = hil_tests::fleet::direct::load(&prom, samples / 2, 10_000, 2, SERIES);
    let (direct, direct_secs) = (direct_a + direct_b, direct_a_secs + direct_b_secs);
    let (rate, direct_rate) = (samples as f64 / secs, direct as f64 / direct_secs);
    println!(
        "| {} x {SERIES} | {secs:.1} | {rate:.0} | {direct_rate:.0} ({:.0} / {:.0}) | {:.2} | {:.2} | {:.1} | {most_waiting:.0} | {} |",
        DEVICES * windows,
        direct_a as f64 / direct_a_secs,
        direct_b as f64 / direct_b_secs,
        rate / direct_rate,
        (cpu - cpu0) / (samples as f64 / 1e6),
        peak.max(hwm),
        requests.map_or("?".into(), |r| format!("{r:.0}")),
    );
    drop(prom);
    drop(broker);
    let _ = std::fs::remove_dir_all(&dir);
}

fn start_bridge(dir: &std::path::Path, broker: &Broker, prom: &Prom) -> (Proc, u16) {
    let remote_write = std::env::var("BRIDGE_REMOTE_WRITE").unwrap_or_default();
    e2e::bridge_logged(dir, broker, &prom.write_url(), "fleet-bridge-bench", "", &remote_write, "info")
}

/// Every device's `windows` one-window blocks, as QoS 1 messages on the
/// devices' topics; returns the samples in them.
fn load(broker: &Broker, windows: usize) -> usize {
    let shape = Shape { series: SERIES };
    let mut opts = broker.mqtt_options("fleet-loader", Who::Admin);
    opts.set_inflight(1000).set_max_packet_size(1 << 22, 1 << 22);
    let (client, mut conn) = rumqttc::Client::new(opts, 1024);
    let total = DEVICES * windows;
    let acked = std::thread::spawn(move || {
        let mut acked = 0;
        for ev in conn.iter() {
            match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    acked += 1;
                    if acked == total {
                        return;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("loader: {e}"),
            }
        }
    });
    let now = e2e::now_ms();
    let mut samples = 0;
    for w in 0..windows {
        let ts = now - 3_600_000 + (w as i64) * 10_000;
        for d in 0..DEVICES {
            let device = hil_tests::fleet::device_id(d);
            let window = shape.samples(d as u64 + 1, w as u64);
            samples += window.len();
            let frame = BlockEncoder::new().frame(ts, &window).expect("frame");
            let payload = Envelope {
                device: &device,
                lane: 0,
                first_seq: w as u64 + 1,
                clock_shift_ms: 0,
                frames: vec![frame.as_slice()],
            }
            .encode();
            client
                .publish(edge_wire::metrics_topic("edge", &device), rumqttc::QoS::AtLeastOnce, false, payload)
                .expect("publish");
        }
    }
    acked.join().expect("loader");
    samples
}
