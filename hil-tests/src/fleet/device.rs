//! One simulated device: the agent's own store (both lanes, on a directory
//! of its own), clock journal, block recorder and uplink (its MQTT client,
//! TLS identity and delivery protocol), driven through the same functions
//! as the agent's window loop ([`edge_agent::clock_era`],
//! [`edge_agent::store_window`]). What it does not have: probes and the
//! model. Its windows are made up by [`Shape`] instead.

use edge_agent::clock::Clock;
use edge_agent::config::Config;
use edge_agent::metrics::AgentMetrics;
use edge_agent::store::recorder::Recorder;
use edge_agent::store::Lanes;
use edge_agent::uplink::Uplink;
use edge_agent::window::Window;
use edge_wire::{Label, SeriesKey};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The made-up windows: `series` series in the probes' shapes. A quarter
/// each: byte counters by port class and direction (the TCP probe's),
/// operation counters by device path (the device probe's), cumulative
/// latency buckets (a histogram's), gauges (open connections, queue
/// depths). Every name starts with `sim_`, so what landed is counted
/// apart from the agent's own health series.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub series: usize,
}

/// `le` bounds of the made-up histograms.
const BUCKETS: [&str; 8] = ["0.001", "0.005", "0.01", "0.05", "0.1", "0.5", "1", "+Inf"];

impl Shape {
    /// Window `n`'s samples for the device seeded `seed`.
    pub fn samples(&self, seed: u64, n: u64) -> Vec<(SeriesKey, f64)> {
        (0..self.series)
            .map(|i| {
                let group = (i / 4) as u64;
                let h = mix(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                let step = (h % 1000) as f64;
                match i % 4 {
                    0 => (
                        SeriesKey::new(
                            "sim_tcp_bytes_total",
                            labels(&[
                                ("direction", if group.is_multiple_of(2) { "rx" } else { "tx" }),
                                ("port_class", &format!("c{group}")),
                            ]),
                        ),
                        step * n as f64,
                    ),
                    1 => (
                        SeriesKey::new("sim_device_ops_total", labels(&[("path", &format!("/dev/sim{group}"))])),
                        (step / 10.0).floor() * n as f64,
                    ),
                    2 => {
                        let le = BUCKETS[(group % BUCKETS.len() as u64) as usize];
                        let set = group / BUCKETS.len() as u64;
                        (
                            SeriesKey::new(
                                "sim_latency_seconds_bucket",
                                labels(&[("le", le), ("set", &format!("h{set}"))]),
                            ),
                            ((group % BUCKETS.len() as u64) + 1) as f64 * n as f64,
                        )
                    }
                    _ => (
                        SeriesKey::new("sim_queue_depth", labels(&[("queue", &format!("q{group}"))])),
                        (mix(h ^ n) % 64) as f64,
                    ),
                }
            })
            .collect()
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<Label> {
    pairs.iter().map(|(k, v)| Label::new(*k, *v)).collect()
}

/// splitmix64's finalizer: a cheap, fixed hash for made-up values.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub struct SimDevice {
    pub id: String,
    seed: u64,
    cfg: Config,
    store: Arc<Mutex<Lanes>>,
    clock: Arc<Mutex<Clock>>,
    metrics: AgentMetrics,
    recorder: Recorder,
    uplink: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
    /// Windows stored (each with `Shape::series` samples of `sim_*`).
    pub windows: u64,
    /// The first and last window times stored.
    pub first_ms: Option<i64>,
    pub last_ms: i64,
    /// Live windows not yet confirmed: (record, stored at, wall ms).
    pending: VecDeque<(u64, i64)>,
    /// End-to-end lag of each confirmed live window, ms: from its close to
    /// the poll that saw the bridge's confirmation (which follows the
    /// write of its samples).
    pub lags_ms: Vec<u32>,
    /// The last record of a backfilled outage, and when it was confirmed.
    backlog_end: Option<u64>,
    pub backlog_drained_ms: Option<i64>,
}

impl SimDevice {
    /// Opens (or creates) the device's store and clock journal under its
    /// config's `state_dir`; nothing connects yet.
    pub fn open(id: &str, seed: u64, config_toml: &str, config_path: &Path) -> Result<SimDevice, String> {
        let cfg = Config::parse(config_toml, config_path).map_err(|e| format!("{id}: {e}"))?;
        let store = Lanes::open(&cfg.store_dir(), cfg.store_limits(), cfg.priority_limits())
            .map_err(|e| format!("{id}: store: {e}"))?;
        let (clock, err) = Clock::open(&cfg.state_dir, cfg.clock.tolerance_ms as i64);
        if let Some(e) = err {
            return Err(format!("{id}: clock journal: {e}"));
        }
        let (metrics, _registry) = AgentMetrics::new();
        Ok(SimDevice {
            id: id.to_owned(),
            seed,
            recorder: Recorder::new(cfg.block_writer()),
            cfg,
            store: Arc::new(Mutex::new(store)),
            clock: Arc::new(Mutex::new(clock)),
            metrics,
            uplink: None,
            windows: 0,
            first_ms: None,
            last_ms: 0,
            pending: VecDeque::new(),
            lags_ms: Vec::new(),
            backlog_end: None,
            backlog_drained_ms: None,
        })
    }

    /// Stores `count` windows ending one window before now, as a device
    /// that was cut off that long stored them: the backlog it brings when
    /// it reconnects (blocks of the store's limits).
    pub fn backfill(&mut self, shape: Shape, count: u64, window_ms: i64, now_ms: i64) {
        let (_, era) = edge_agent::clock_era(&self.store, &self.clock, 0);
        if era.new {
            self.recorder.new_era();
        }
        for k in 0..count {
            let ts = now_ms - (count - k) as i64 * window_ms;
            let seq = self.store(shape, ts);
            self.backlog_end = seq.or(self.backlog_end);
        }
    }

    /// Closes a window now, as the agent's window loop does.
    pub fn close_window(&mut self, shape: Shape) {
        let (clocks, era) = edge_agent::clock_era(&self.store, &self.clock, 0);
        let ts = clocks.wall_ms;
        let new_era = era.new;
        if new_era {
            self.recorder.new_era();
        }
        if let Some(seq) = self.store(shape, ts) {
            self.pending.push_back((seq, ts));
        }
    }

    fn store(&mut self, shape: Shape, ts: i64) -> Option<u64> {
        let mut samples = shape.samples(self.seed, self.windows);
        samples.extend(self.metrics.uplink.window_samples());
        let window = Window { timestamp_ms: ts, samples, values: Vec::new() };
        let before = self.store.lock().unwrap_or_else(|p| p.into_inner()).routine.next_seq();
        edge_agent::store_window(&self.store, &self.metrics, &mut self.recorder, false, None, window);
        let after = self.store.lock().unwrap_or_else(|p| p.into_inner()).routine.next_seq();
        if after == before {
            return None; // not stored (the agent counts and logs it)
        }
        self.windows += 1;
        self.first_ms.get_or_insert(ts);
        self.last_ms = ts;
        Some(before)
    }

    /// Starts the uplink (a thread of its own, as in the agent).
    pub fn connect(&mut self) {
        if self.uplink.is_some() {
            return;
        }
        let shutdown = Arc::new(AtomicBool::new(false));
        let up = Uplink::new(
            self.cfg.clone(),
            self.store.clone(),
            self.clock.clone(),
            self.metrics.clone(),
            shutdown.clone(),
        );
        match up.spawn() {
            Ok(h) => self.uplink = Some((shutdown, h)),
            Err(e) => eprintln!("{}: uplink thread: {e}", self.id),
        }
    }

    /// Stops the uplink as the agent's shutdown does (its last will then
    /// says `offline`).
    pub fn disconnect(&mut self) {
        if let Some((flag, h)) = self.uplink.take() {
            flag.store(true, Ordering::Relaxed);
            let _ = h.join();
        }
    }

    pub fn connected(&self) -> bool {
        self.uplink.is_some()
    }

    /// Looks at the confirmed position: the live windows it passed are
    /// timed, the backlog is marked drained once it is passed.
    pub fn poll(&mut self, now_ms: i64) {
        let acked = self.store.lock().unwrap_or_else(|p| p.into_inner()).routine.stats().acked_seq;
        while let Some(&(seq, at)) = self.pending.front() {
            if seq > acked {
                break;
            }
            self.lags_ms.push((now_ms - at).clamp(0, u32::MAX as i64) as u32);
            self.pending.pop_front();
        }
        if let Some(end) = self.backlog_end {
            if self.backlog_drained_ms.is_none() && acked >= end {
                self.backlog_drained_ms = Some(now_ms);
            }
        }
    }

    /// Records stored and not yet confirmed (both lanes).
    pub fn backlog(&self) -> u64 {
        let lanes = self.store.lock().unwrap_or_else(|p| p.into_inner());
        lanes.routine.stats().backlog() + lanes.priority.stats().backlog()
    }

    /// Live windows whose confirmation has not been seen.
    pub fn unconfirmed(&self) -> usize {
        self.pending.len()
    }

    /// Delivery timeouts of its uplink so far (each sent the unconfirmed
    /// blocks again).
    pub fn resends(&self) -> u64 {
        self.metrics.uplink.resends.get()
    }
}

impl Drop for SimDevice {
    fn drop(&mut self) {
        self.disconnect();
    }
}
