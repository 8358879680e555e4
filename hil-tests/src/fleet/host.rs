//! A host process of simulated devices (`fleet_sim devices SPEC`): opens
//! them (and stores their backlogs), says it is ready, waits for the
//! common start, then runs every device's plan on one thread: windows at
//! each device's own phase, uplinks connected and cut as planned (each
//! uplink on its own thread, as in the agent), confirmations polled. After
//! the live phase every device is connected until all it stored is
//! confirmed, or the drain time is up. Writes what happened per device.

use super::device::{mix, Shape, SimDevice};
use super::report::{DeviceResult, HostStatus};
use super::{now_ms, HostSpec};
use std::path::{Path, PathBuf};
use std::time::Duration;

const POLL_MS: i64 = 200;
const STATUS_MS: i64 = 1000;

pub fn ready_file(run_dir: &Path, host: usize) -> PathBuf {
    run_dir.join(format!("ready-{host}"))
}
pub fn status_file(run_dir: &Path, host: usize) -> PathBuf {
    run_dir.join(format!("status-{host}.json"))
}
pub fn report_file(run_dir: &Path, host: usize) -> PathBuf {
    run_dir.join(format!("report-{host}.json"))
}
/// Written by the driver: the common start, ms since the epoch.
pub fn start_file(run_dir: &Path) -> PathBuf {
    run_dir.join("start")
}

/// When a device's next window closes after the one due at `due` closed
/// at `now`, and how many windows it skips: one window later, or, after a
/// stall of more than a window, one window from now, as the agent's window
/// loop does (edge-agent/src/lib.rs). Closing the missed windows in a
/// burst would give them one time: the store would hold two windows at
/// the same millisecond, and the TSDB keeps one of them.
fn after_window(due: i64, now: i64, window_ms: i64) -> (i64, u64) {
    let next = due + window_ms;
    if next > now {
        return (next, 0);
    }
    (now + window_ms, ((now - next) / window_ms + 1) as u64)
}

struct Running {
    dev: SimDevice,
    /// The next planned link change.
    link: usize,
    /// When its next window closes (ms since the epoch).
    next_window: i64,
    /// Windows skipped: the host fell more than a window behind.
    late: u64,
}

pub fn run(spec: HostSpec) -> Result<(), String> {
    raise_open_files();
    let run_dir = PathBuf::from(&spec.run_dir);
    let shape = Shape { series: spec.series };
    let opened = now_ms();
    let mut devs = Vec::with_capacity(spec.devices.len());
    for d in &spec.devices {
        let text = std::fs::read_to_string(&d.config).map_err(|e| format!("{}: {e}", d.config))?;
        let mut dev = SimDevice::open(&d.id, d.seed, &text, Path::new(&d.config))?;
        if d.backfill > 0 {
            dev.backfill(shape, d.backfill, spec.window_ms, opened);
        }
        devs.push(Running { dev, link: 0, next_window: 0, late: 0 });
    }
    std::fs::write(ready_file(&run_dir, spec.host), b"").map_err(|e| e.to_string())?;
    let start = wait_start(&run_dir)?;
    for (r, d) in devs.iter_mut().zip(&spec.devices) {
        let phase = (mix(d.seed) % spec.window_ms as u64) as i64;
        r.next_window = start + d.plan.begin_ms + phase + spec.window_ms;
    }

    let live_end = start + spec.live_ms;
    let drain_end = live_end + spec.drain_ms;
    let (mut next_poll, mut next_status) = (start, start);
    loop {
        let now = now_ms();
        for (r, d) in devs.iter_mut().zip(&spec.devices) {
            while let Some(&(at, up)) = d.plan.links.get(r.link) {
                if start + at > now || now >= live_end {
                    break;
                }
                if up {
                    r.dev.connect();
                } else {
                    r.dev.disconnect();
                }
                r.link += 1;
            }
            if now >= live_end && !r.dev.connected() {
                r.dev.connect(); // everyone back for the drain
            }
            if r.next_window <= now && r.next_window < live_end {
                r.dev.close_window(shape);
                let skipped;
                (r.next_window, skipped) = after_window(r.next_window, now, spec.window_ms);
                r.late += skipped;
            }
        }
        if now >= next_poll {
            for r in &mut devs {
                r.dev.poll(now);
            }
            next_poll = now + POLL_MS;
        }
        let drained = now >= live_end && devs.iter().all(|r| r.dev.unconfirmed() == 0 && r.dev.backlog() == 0);
        if now >= next_status || drained {
            let status = HostStatus {
                t_ms: now - start,
                connected: devs.iter().filter(|r| r.dev.connected()).count(),
                windows: devs.iter().map(|r| r.dev.windows).sum(),
                backlog: devs.iter().map(|r| r.dev.backlog()).sum(),
                unconfirmed: devs.iter().map(|r| r.dev.unconfirmed() as u64).sum(),
            };
            write_json(&status_file(&run_dir, spec.host), &status)?;
            next_status = now + STATUS_MS;
        }
        if drained || now >= drain_end {
            break;
        }
        let next_window = devs.iter().map(|r| r.next_window).filter(|&t| t < live_end).min().unwrap_or(i64::MAX);
        let next_link = devs
            .iter()
            .zip(&spec.devices)
            .filter_map(|(r, d)| d.plan.links.get(r.link).map(|l| start + l.0))
            .min()
            .unwrap_or(i64::MAX);
        let wake = next_window.min(next_link).min(next_poll).min(if now < live_end { live_end } else { i64::MAX });
        std::thread::sleep(Duration::from_millis((wake - now_ms()).clamp(1, POLL_MS) as u64));
    }
    let now = now_ms();
    let results: Vec<DeviceResult> = devs
        .iter_mut()
        .zip(&spec.devices)
        .map(|(r, d)| {
            r.dev.poll(now);
            DeviceResult {
                id: d.id.clone(),
                group: d.group,
                windows: r.dev.windows,
                samples: r.dev.windows * spec.series as u64,
                first_ms: r.dev.first_ms.unwrap_or(0),
                last_ms: r.dev.last_ms,
                lags_ms: std::mem::take(&mut r.dev.lags_ms),
                unconfirmed: r.dev.unconfirmed() as u64,
                backlog: r.dev.backlog(),
                backlog_windows: d.backfill,
                drained_after_ms: r.dev.backlog_drained_ms.map(|t| t - start),
                late_windows: r.late,
                resends: r.dev.resends(),
            }
        })
        .collect();
    write_json(&report_file(&run_dir, spec.host), &results)?;
    drop(devs); // uplinks stopped
    Ok(())
}

fn wait_start(run_dir: &Path) -> Result<i64, String> {
    let file = start_file(run_dir);
    let give_up = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Ok(t) = text.trim().parse() {
                return Ok(t);
            }
        }
        if std::time::Instant::now() > give_up {
            return Err("no start from the driver in 10 minutes".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Written whole or not at all (rename), so the driver never reads half.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let tmp = path.with_extension("tmp");
    let text = serde_json::to_vec(value).map_err(|e| e.to_string())?;
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Every device holds a few files and a socket: open files up to the hard
/// limit.
pub fn raise_open_files() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::after_window;

    #[test]
    fn a_late_host_skips_missed_windows_instead_of_closing_them_at_one_time() {
        assert_eq!(after_window(10_000, 10_000, 10_000), (20_000, 0));
        assert_eq!(after_window(10_000, 19_999, 10_000), (20_000, 0));
        // A stall past the next window: that one is skipped, the next one
        // a window from now.
        assert_eq!(after_window(10_000, 20_000, 10_000), (30_000, 1));
        assert_eq!(after_window(10_000, 45_000, 10_000), (55_000, 3));
    }
}
