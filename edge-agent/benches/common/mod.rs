//! What the benchmarks feed the store and the pipeline: 1,000 series shaped
//! like the probes' output, 10 s windows.

use edge_agent::window::Window;
use edge_wire::{Label, SeriesKey};

pub const SERIES: usize = 1000;
pub const WINDOW_MS: i64 = 10_000;

pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Poisson-like small counts with the given mean.
    pub fn count(&mut self, mean: f64) -> u64 {
        let mut n = 0;
        let mut p = self.unit();
        let l = (-mean).exp();
        while p > l {
            n += 1;
            p *= self.unit();
        }
        n
    }
}

#[derive(Clone, Copy)]
enum Kind {
    /// A counter that rarely moves (failed connects, resets, errors).
    QuietCounter,
    /// A busy counter with a noisy rate (opens, bytes in ops).
    BusyCounter(f64),
    /// A cumulative log2 histogram bucket (latencies): bucket b gets a share.
    Bucket(u32),
    /// A noisy gauge with two decimals (RTT ms, temperature).
    NoisyGauge,
    /// A gauge that holds still (cwnd, state).
    FlatGauge,
}

/// 1,000 series shaped like the probes' output: 40 % quiet counters,
/// 25 % busy counters, 20 % histogram buckets, 10 % noisy gauges,
/// 5 % flat gauges.
fn mix() -> Vec<(SeriesKey, Kind)> {
    let mut v = Vec::with_capacity(SERIES);
    for i in 0..SERIES {
        let dev = format!("dev{}", i / 20);
        let kind = match i % 20 {
            0..=7 => Kind::QuietCounter,
            8..=12 => Kind::BusyCounter(1.0 + (i % 7) as f64 * 3.0),
            13..=16 => Kind::Bucket((i % 4) as u32),
            17 | 18 => Kind::NoisyGauge,
            _ => Kind::FlatGauge,
        };
        let name = match kind {
            Kind::QuietCounter => "edge_dev_errors_total",
            Kind::BusyCounter(_) => "edge_dev_ops_total",
            Kind::Bucket(_) => "edge_dev_latency_seconds_bucket",
            Kind::NoisyGauge => "edge_tcp_rtt_milliseconds",
            Kind::FlatGauge => "edge_tcp_cwnd_segments",
        };
        let labels = vec![Label::new("device_file", dev), Label::new("slot", (i % 20).to_string())];
        v.push((SeriesKey::new(name, labels), kind));
    }
    v
}

/// `n` windows of the mix, 10 s apart from `t0`, with a few ms of timer jitter.
pub fn windows(n: usize, t0: i64) -> Vec<Window> {
    let m = mix();
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut state: Vec<f64> = m.iter().map(|(_, k)| if matches!(k, Kind::FlatGauge) { 10.0 } else { 0.0 }).collect();
    (0..n)
        .map(|w| {
            for ((_, kind), v) in m.iter().zip(state.iter_mut()) {
                *v = match kind {
                    Kind::QuietCounter => *v + if rng.unit() < 0.02 { 1.0 } else { 0.0 },
                    Kind::BusyCounter(mean) => *v + rng.count(*mean) as f64,
                    Kind::Bucket(b) => *v + rng.count(4.0 / f64::from(1 << b)) as f64,
                    Kind::NoisyGauge => ((12.0 + rng.unit() * 3.0) * 100.0).round() / 100.0,
                    Kind::FlatGauge => {
                        if rng.unit() < 0.01 {
                            *v + 1.0
                        } else {
                            *v
                        }
                    }
                };
            }
            // Timer jitter of a few ms, as a real window loop has.
            let ts = t0 + w as i64 * WINDOW_MS + (rng.next() % 5) as i64;
            Window {
                timestamp_ms: ts,
                samples: m.iter().zip(&state).map(|((k, _), v)| (k.clone(), *v)).collect(),
                values: Vec::new(),
            }
        })
        .collect()
}
