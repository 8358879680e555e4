//! Bytes per process-value sample on disk and on the wire
//! (docs/process-values.md; the goal: at most 2 B per sample).
//!
//!   cargo bench -p edge-agent --bench value_bytes
//!
//! The simulated pump's process (e2e/src/pump.rs: correlated sensors with
//! their own noise and slow drift) polled for an hour at 1 Hz and at 10 Hz
//! with 1 ms (sd) of polling jitter; its 13 tags (configs/tags/pump.toml:
//! every type and word order) decoded by the agent's tag map, closed into
//! 10 s windows by the values stage, encoded into blocks as the store does
//! (360 windows per block, a new block when a series would pass 10,000
//! samples). A frame is stored as one record and sent byte for byte, so the
//! bytes a sample adds to a frame are what it costs on disk and on the
//! wire; the record header (28 B) and the envelope are per window, paid
//! with or without values. Baseline in the same run: the same values as
//! one window series each, sampled once per window (what the agent did
//! before: one sample per window, the rest lost), and a naive 16 B
//! (timestamp + f64) per sample.

#[path = "../../e2e/src/pump.rs"]
#[allow(dead_code, unused_imports)]
mod pump;

use edge_agent::values::tags::{Context, Table, TagConfig, TagMap};
use edge_agent::values::{Access, Transport, ValuesStage};
use edge_wire::{BlockEncoder, EncodeError, SeriesKey};

const WINDOW_MS: i64 = 10_000;
const HOUR_S: i64 = 3600;
const BLOCK_WINDOWS: usize = 360;

fn tag_map() -> TagMap {
    #[derive(serde::Deserialize)]
    struct F {
        tags: Vec<TagConfig>,
    }
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/tags/pump.toml")).unwrap();
    let f: F = toml::from_str(&text).unwrap();
    let tcp: Vec<TagConfig> = f.tags.into_iter().filter(|t| t.source == "modbus_tcp").collect();
    TagMap::build(&tcp, &Context { modbus_ports: &[502], peers: &Default::default() }).unwrap()
}

/// A window: its time, its series, its value series.
type Window = (i64, Vec<(SeriesKey, f64)>, Vec<edge_wire::ValueSeries>);

/// Frames of one hour, encoded as the store does; returns their bytes.
fn encode(windows: &[Window]) -> usize {
    let mut enc = BlockEncoder::new();
    let mut bytes = 0;
    for (ts, samples, values) in windows {
        if enc.frames() >= BLOCK_WINDOWS {
            enc = BlockEncoder::new();
        }
        let frame = match enc.frame_with_values(*ts, samples, values) {
            Err(EncodeError::Full) => {
                enc = BlockEncoder::new();
                enc.frame_with_values(*ts, samples, values).unwrap()
            }
            other => other.unwrap(),
        };
        bytes += frame.len();
    }
    bytes
}

struct Run {
    samples: usize,
    values_only: f64,
    with_stats: f64,
    one_per_window: f64,
    /// Per tag alone: (name, type, B/sample).
    per_tag: Vec<(String, &'static str, f64)>,
}

fn run(hz: i64) -> Run {
    let map = tag_map();
    let mut stage = ValuesStage::new(map);
    let mut p = pump::Pump::new(11);
    let mut rng = pump::Rng::new(5);
    let period_ms = 1000 / hz;
    let t0 = 1_800_000_000_000i64;
    let mut windows_values = Vec::new();
    let mut windows_stats = Vec::new();
    let mut windows_last = Vec::new();
    let mut next_close = t0 + WINDOW_MS;
    let mut samples = 0;
    let server = {
        let mut s = [0u8; 16];
        s[10] = 0xff;
        s[11] = 0xff;
        s[12..].copy_from_slice(&[127, 0, 0, 1]);
        s
    };
    for poll in 0..HOUR_S * hz {
        let t = t0 + poll * period_ms + (rng.normal() * 1.0).round() as i64;
        let r = p.step(1.0 / hz as f64);
        let inputs = pump::input_registers(&r, p.diagnostics());
        let mut holdings = [0u16; pump::map::HOLDINGS as usize];
        holdings[0] = 1450;
        pump::put32(&mut holdings, 1, 8.5f32.to_bits(), "BADC");
        pump::put64(&mut holdings, 4, p.run_seconds(), "ABCD");
        pump::put64(&mut holdings, 8, r.efficiency.to_bits(), "CDAB");
        pump::put64(&mut holdings, 12, p.energy_delta() as u64, "DCBA");
        let transport = Transport::Tcp { server, port: 502, side: 0 };
        for (table, regs) in [(Table::Input, &inputs[..]), (Table::Holding, &holdings[..])] {
            let data: Vec<u8> = regs.iter().flat_map(|w| w.to_be_bytes()).collect();
            let a = Access {
                time_ms: t,
                transport,
                unit: 1,
                table,
                start: 0,
                quantity: regs.len() as u16,
                data: &data,
                mask: None,
            };
            stage.access(&a);
        }
        for (table, bits) in [(Table::Coil, 0b1u8), (Table::DiscreteInput, 0b1)] {
            let a =
                Access { time_ms: t + 1, transport, unit: 1, table, start: 0, quantity: 8, data: &[bits], mask: None };
            stage.access(&a);
        }
        if t >= next_close {
            samples += stage.held();
            let closed = stage.close(next_close);
            let stats: Vec<(SeriesKey, f64)> =
                closed.samples.iter().filter(|(k, _)| k.name.starts_with("edge_process_value_")).cloned().collect();
            let last: Vec<(SeriesKey, f64)> = closed
                .series
                .iter()
                .map(|s| (s.key.clone(), s.codec.value(s.samples.last().map_or(0, |x| x.1))))
                .collect();
            windows_values.push((next_close, vec![], closed.series.clone()));
            windows_stats.push((next_close, stats, closed.series));
            windows_last.push((next_close, last, vec![]));
            next_close += WINDOW_MS;
        }
    }
    let empty: Vec<_> = windows_values.iter().map(|(t, _, _)| (*t, vec![], vec![])).collect();
    let base = encode(&empty);
    let per = |b: usize| (b - base) as f64 / samples as f64;
    let names: Vec<(String, &'static str)> =
        stage.map.tags.iter().map(|t| (t.name.clone(), t.codec.kind.name())).collect();
    let per_tag = names
        .into_iter()
        .map(|(name, kind)| {
            let only: Vec<Window> = windows_values
                .iter()
                .map(|(t, _, v)| (*t, vec![], v.iter().filter(|s| s.key.labels[0].value == name).cloned().collect()))
                .collect();
            let n: usize = only.iter().map(|w| w.2.iter().map(|s| s.samples.len()).sum::<usize>()).sum();
            let bytes = encode(&only) - base;
            (name, kind, bytes as f64 / n as f64)
        })
        .collect();
    Run {
        samples,
        per_tag,
        values_only: per(encode(&windows_values)),
        with_stats: per(encode(&windows_stats)),
        one_per_window: per(encode(&windows_last)),
    }
}

fn main() {
    let runs: Vec<(i64, Run)> = [1, 10].into_iter().map(|hz| (hz, run(hz))).collect();
    println!("## Bytes per process-value sample (the pump's 13 tags, 1 h, 10 s windows)\n");
    println!("| polling | samples | value section B/sample | with window stats B/sample | one sample per window instead (B/kept sample) | naive ts+f64 |");
    println!("|---|---|---|---|---|---|");
    for (hz, r) in &runs {
        let hz = *hz;
        let kept = r.samples as f64 / hz as f64 / (WINDOW_MS as f64 / 1000.0);
        println!(
            "| {hz} Hz | {} | {:.2} | {:.2} | {:.2} ({:.0} samples kept) | 16.00 |",
            r.samples,
            r.values_only,
            r.with_stats,
            r.one_per_window * r.samples as f64 / kept,
            kept
        );
    }
    println!("\nEach tag alone (its own time table; B/sample):\n");
    println!("| tag | type | 1 Hz | 10 Hz |");
    println!("|---|---|---|---|");
    for (i, (name, kind, b1)) in runs[0].1.per_tag.iter().enumerate() {
        println!("| {name} | {kind} | {b1:.2} | {:.2} |", runs[1].1.per_tag[i].2);
    }
}
