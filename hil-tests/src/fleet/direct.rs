//! The store's own rate, for the ratio the bridge is measured by: the
//! same number of samples written straight into it, in requests of the
//! shape the bridge makes of many small blocks.

use e2e::Prom;
use std::time::Instant;

/// The bridges' request shape after batching many small blocks: one
/// sample per series, `per_request` series per request. Writes `samples`
/// such samples of made-up devices (`direct-<k>`, the simulator's series
/// shape, times in the last hour) with `senders` requests at once, all
/// encoded before the clock starts. Returns (samples, seconds, the
/// store's CPU seconds).
pub fn load(tsdb: &Prom, samples: usize, per_request: usize, senders: usize, series: usize) -> (usize, f64, f64) {
    use fleet_bridge::remote_write::{self, Label, Sample, TimeSeries, WriteRequest};
    let shape = super::device::Shape { series };
    let now = super::now_ms();
    let devices = per_request.div_ceil(series).max(1);
    let windows = samples.div_ceil(devices * series).max(1);
    let mut bodies = Vec::new();
    let mut written = 0;
    let mut group = 0;
    'outer: for w in 0..windows {
        let ts = now - 3_600_000 + (w as i64 * 3_600_000 / windows as i64);
        let mut req = WriteRequest { timeseries: Vec::new() };
        for d in 0..devices {
            let device = format!("direct-{}", group * devices + d);
            for (key, value) in shape.samples(d as u64, w as u64) {
                let mut labels = vec![
                    Label { name: "__name__".into(), value: key.name.clone() },
                    Label { name: "device".into(), value: device.clone() },
                ];
                labels.extend(key.labels.iter().map(|l| Label { name: l.name.clone(), value: l.value.clone() }));
                labels.sort_by(|a, b| a.name.cmp(&b.name));
                req.timeseries.push(TimeSeries { labels, samples: vec![Sample { value, timestamp: ts }] });
                written += 1;
                if written >= samples {
                    bodies.push(remote_write::encode(&req));
                    break 'outer;
                }
            }
        }
        bodies.push(remote_write::encode(&req));
        group = (group + 1) % 16;
    }
    let url = tsdb.write_url();
    let cpu0 = super::report::process_use(tsdb.proc.pid()).map_or(0.0, |u| u.0);
    let start = Instant::now();
    e2e::post_all(&url, &bodies, senders, &remote_write::HEADERS);
    let secs = start.elapsed().as_secs_f64();
    let cpu = super::report::process_use(tsdb.proc.pid()).map_or(0.0, |u| u.0) - cpu0;
    (written, secs, cpu)
}
