//! What a run found: per device what it stored and what landed, lag
//! percentiles, backlog drain times, and each process's CPU and memory.

use super::Group;
use serde::{Deserialize, Serialize};

/// A host's progress, rewritten every second.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostStatus {
    pub t_ms: i64,
    pub connected: usize,
    pub windows: u64,
    pub backlog: u64,
    pub unconfirmed: u64,
}

/// One device at the end of a run, from its host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceResult {
    pub id: String,
    pub group: Group,
    pub windows: u64,
    /// Samples of `sim_*` series stored: windows × series.
    pub samples: u64,
    pub first_ms: i64,
    pub last_ms: i64,
    /// Each confirmed live window's lag, ms.
    pub lags_ms: Vec<u32>,
    /// Live windows never seen confirmed.
    pub unconfirmed: u64,
    /// Records left unconfirmed in its store.
    pub backlog: u64,
    pub backlog_windows: u64,
    /// Its backfilled backlog was all confirmed this long after the start.
    pub drained_after_ms: Option<i64>,
    /// Windows skipped because its host fell more than a window behind
    /// (as the agent skips them after a stall).
    pub late_windows: u64,
    /// Times its uplink sent unconfirmed blocks again after the delivery
    /// timeout (`edge_agent_uplink_resends_total`).
    #[serde(default)]
    pub resends: u64,
}

/// Percentiles of a set of values (nearest rank).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(values: &mut [f64]) -> Percentiles {
        if values.is_empty() {
            return Percentiles::default();
        }
        values.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Percentiles { count: values.len(), p50: at(0.5), p90: at(0.9), p99: at(0.99), max: values[values.len() - 1] }
    }
}

/// One process's share of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessUse {
    pub name: String,
    /// CPU time over the measured span, % of one core.
    pub cpu_pct: f64,
    pub cpu_secs: f64,
    /// Peak resident memory (VmHWM), MiB.
    pub peak_rss_mib: f64,
}

/// CPU seconds (user + system) and peak RSS of a live process, from /proc.
pub fn process_use(pid: i32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in brackets.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let hwm_kib = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    Some((ticks / hz, hwm_kib / 1024.0))
}

/// The whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub devices: usize,
    pub series: usize,
    pub window_ms: i64,
    pub live_secs: f64,
    pub hosts: usize,
    pub bridges: usize,
    pub tsdb: String,
    /// mosquitto, or nats (a three-node cluster).
    #[serde(default)]
    pub broker: String,
    /// Faults injected, with when (seconds after the start).
    #[serde(default)]
    pub faults: Vec<String>,
    /// Devices whose every stored `sim_*` sample landed, exactly once.
    pub exact_devices: usize,
    /// Devices that did not: (id, stored, landed).
    pub inexact: Vec<(String, u64, u64)>,
    pub samples_stored: u64,
    pub samples_landed: u64,
    /// Live windows' lag, seconds, devices without a backlog of their own.
    pub lag_steady_s: Percentiles,
    /// The same in windows (lag / window length).
    pub lag_steady_windows: Percentiles,
    /// Live windows' lag of churning and backlogged devices, seconds.
    pub lag_other_s: Percentiles,
    pub unconfirmed_windows: u64,
    pub late_windows: u64,
    /// Delivery timeouts on the devices (each sent its unconfirmed blocks
    /// again), and how many devices had one.
    #[serde(default)]
    pub resends: u64,
    #[serde(default)]
    pub resending_devices: usize,
    /// Copies the bridges spotted (messages with result `copy`: a block
    /// sent again while the first was in the pipeline or lately written).
    #[serde(default)]
    pub bridge_copies: f64,
    /// Backlogged devices: windows each, and when they were drained
    /// (seconds after the start).
    pub backlog_devices: usize,
    pub backlog_windows_each: u64,
    pub drained_s: Percentiles,
    pub not_drained: usize,
    /// Samples the bridges wrote (their counter), and per second over the
    /// run to the last drain.
    pub bridge_samples: f64,
    pub bridge_samples_per_s: f64,
    pub bridge_requests: f64,
    /// Device blocks the bridges wrote (messages with result `written`).
    pub bridge_blocks: f64,
    /// Of those, beyond one per live window, per backlogged device: how
    /// many messages a backlog took.
    pub backlog_blocks_per_device: f64,
    /// Backlogged samples over the time until the last backlog drained.
    pub backlog_samples_per_s: f64,
    /// `--direct`: the store's rate for the same number of samples written
    /// straight, in requests of the bridges' shape, and its CPU meanwhile.
    pub direct_samples_per_s: f64,
    pub direct_store_cpu_pct: f64,
    pub wall_secs: f64,
    pub processes: Vec<ProcessUse>,
}

impl Report {
    /// A table for people (BENCHMARKS.md takes it as it is).
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| t.push_str(&format!("| {k:<34} | {v:<44} |\n"));
        row("scenario", format!("{} ({} s live, wall {:.0} s)", self.scenario, self.live_secs, self.wall_secs));
        row(
            "devices × series, window",
            format!("{} × {}, {} ms, {} hosts", self.devices, self.series, self.window_ms, self.hosts),
        );
        row("central", format!("{} → {} bridge(s) → {}", self.broker, self.bridges, self.tsdb));
        for f in &self.faults {
            row("fault", f.clone());
        }
        row(
            "exact (stored = landed)",
            format!(
                "{}/{} devices; {} / {} samples",
                self.exact_devices, self.devices, self.samples_landed, self.samples_stored
            ),
        );
        let l = &self.lag_steady_s;
        row(
            "lag steady p50/p90/p99/max (s)",
            format!("{:.2} / {:.2} / {:.2} / {:.2} (n={})", l.p50, l.p90, l.p99, l.max, l.count),
        );
        row("lag steady p99 (windows)", format!("{:.2}", self.lag_steady_windows.p99));
        let o = &self.lag_other_s;
        if o.count > 0 {
            row("lag others p50/p99/max (s)", format!("{:.2} / {:.2} / {:.2} (n={})", o.p50, o.p99, o.max, o.count));
        }
        row(
            "unconfirmed / skipped windows (host behind)",
            format!("{} / {}", self.unconfirmed_windows, self.late_windows),
        );
        row(
            "delivery timeouts (devices), copies",
            format!(
                "{} ({} devices), bridge spotted {:.0} copies",
                self.resends, self.resending_devices, self.bridge_copies
            ),
        );
        if self.backlog_devices > 0 {
            let d = &self.drained_s;
            row(
                "backlogs drained p50/p99/max (s)",
                format!(
                    "{:.1} / {:.1} / {:.1} ({} devices × {} windows, {} not)",
                    d.p50, d.p99, d.max, self.backlog_devices, self.backlog_windows_each, self.not_drained
                ),
            );
        }
        row(
            "bridge samples, requests",
            format!(
                "{:.0} ({:.0}/s), {:.0} requests, {:.0} blocks",
                self.bridge_samples, self.bridge_samples_per_s, self.bridge_requests, self.bridge_blocks
            ),
        );
        if self.backlog_devices > 0 {
            row("backlog blocks per device", format!("{:.1}", self.backlog_blocks_per_device));
            row("backlog drain samples/s", format!("{:.0}", self.backlog_samples_per_s));
        }
        if self.direct_samples_per_s > 0.0 {
            row(
                "direct remote write samples/s",
                format!("{:.0} (store CPU {:.0} %)", self.direct_samples_per_s, self.direct_store_cpu_pct),
            );
            row("drain vs direct", format!("{:.2}", self.backlog_samples_per_s / self.direct_samples_per_s));
        }
        for p in &self.processes {
            row(
                &format!("{} CPU %, peak RSS", p.name),
                format!("{:.1} % ({:.1} s), {:.1} MiB", p.cpu_pct, p.cpu_secs, p.peak_rss_mib),
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!((p.count, p.p50, p.p90, p.p99, p.max), (100, 50.0, 90.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
        let p = Percentiles::of(&mut [3.0]);
        assert_eq!((p.p50, p.p99), (3.0, 3.0));
    }
}
