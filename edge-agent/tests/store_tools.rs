//! `edge-agent store inspect` and `store export`, run as a person at the box
//! would: the real binary on a real store directory. The OpenMetrics export
//! is checked by backfilling it with Prometheus's own promtool.

use edge_agent::store::blocks::BlockWriter;
use edge_agent::store::{FileStore, StoreLimits};
use edge_agent::window::Window;
use edge_wire::{Label, SeriesKey};
use std::process::Command;

const T0: i64 = 1_700_000_000_000;

fn fill(dir: &std::path::Path) {
    let limits = StoreLimits { max_bytes: 1 << 20, segment_bytes: 8 << 10, max_age_ms: 0, fsync_interval_ms: 0 };
    let mut s = FileStore::open_dir(dir, limits).unwrap();
    let mut writer = BlockWriter::new(30, 1 << 20);
    for w in 0..100i64 {
        let ts = T0 + w * 10_000;
        let window = Window {
            timestamp_ms: ts,
            samples: vec![
                (
                    SeriesKey::new(
                        "edge_tcp_connections_opened_total",
                        vec![Label::new("direction", "outbound"), Label::new("port_class", "mqtt")],
                    ),
                    (w * 3) as f64,
                ),
                (SeriesKey::new("temperature_celsius", vec![Label::new("sensor", "a\"b")]), 20.5 + w as f64 / 10.0),
            ],
            values: Vec::new(),
        };
        writer.write(&mut s, &window).unwrap();
    }
    s.ack(40).unwrap();
}

fn agent(args: &[&str]) -> (String, String, bool) {
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent")).args(args).output().unwrap();
    (String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into(), out.status.success())
}

#[test]
fn inspect_tells_what_is_held() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path());
    let (out, err, ok) = agent(&["store", "inspect", "--dir", dir.path().to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("records      100 (seq 1..=100)"), "{out}");
    assert!(out.contains("oldest       2023-11-14T22:13:20.000Z"), "{out}");
    assert!(out.contains("backlog      60 records"), "{out}");
    assert!(out.contains("dropped      0 records"), "{out}");
    // It never changes the store: same answer twice, and the store opens.
    assert_eq!(agent(&["store", "inspect", "--dir", dir.path().to_str().unwrap()]).0, out);
    let (_, err, ok) = agent(&["store", "inspect", "--dir", "/nonexistent/store"]);
    assert!(!ok && err.contains("no store at /nonexistent/store"), "{err}");
}

#[test]
fn export_csv_for_a_time_range() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path());
    let d = dir.path().to_str().unwrap();
    let (out, err, ok) = agent(&[
        "store",
        "export",
        "--dir",
        d,
        "--format",
        "csv",
        "--from",
        "2023-11-14T22:13:30Z",
        "--to",
        "1700000050",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "timestamp_ms,time,metric,labels,value");
    // Windows at +10 s .. +40 s, two series each.
    assert_eq!(lines.len(), 1 + 2 * 4, "{out}");
    assert!(lines.contains(&"1700000010000,2023-11-14T22:13:30.000Z,edge_tcp_connections_opened_total,\"{direction=\"\"outbound\"\",port_class=\"\"mqtt\"\"}\",3"), "{out}");
    let (_, err, ok) = agent(&["store", "export", "--dir", d, "--from", "tomorrow"]);
    assert!(!ok && err.contains("cannot read time \"tomorrow\""), "{err}");
}

#[test]
fn openmetrics_export_backfills_into_prometheus() {
    let Some(promtool) =
        ["/usr/bin/promtool", "/usr/local/bin/promtool"].into_iter().find(|p| std::path::Path::new(p).exists())
    else {
        assert!(std::env::var_os("CI").is_none(), "promtool (Debian package prometheus) is needed");
        eprintln!("SKIPPED (not in CI): promtool not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path());
    let file = dir.path().join("export.om");
    let (_, err, ok) =
        agent(&["store", "export", "--dir", dir.path().to_str().unwrap(), "--output", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(err.contains("exported 200 samples"), "{err}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("# TYPE edge_tcp_connections_opened counter\n"), "{text}");
    assert!(text.ends_with("# EOF\n"));
    let blocks = dir.path().join("blocks");
    let out = Command::new(promtool)
        .args(["tsdb", "create-blocks-from", "openmetrics", file.to_str().unwrap(), blocks.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool refused the export: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // `tsdb dump` reads a data directory, which has a WAL.
    std::fs::create_dir_all(blocks.join("wal")).unwrap();
    let dump = Command::new(promtool).args(["tsdb", "dump", blocks.to_str().unwrap()]).output().unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert_eq!(dump.lines().filter(|l| l.contains("temperature_celsius")).count(), 100, "{dump}");
}
