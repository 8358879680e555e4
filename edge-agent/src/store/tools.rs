//! Field tools for a person at the box: `edge-agent store inspect` and
//! `edge-agent store export`. They open the store read-only and without its
//! lock, so they work next to a running agent and never change the store.

use crate::store::plan::DropReason;
use crate::store::{FileStore, Lane, StoreError};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no store at {0} (is state_dir right? pass --config or --dir)")]
    Missing(String),
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
    #[error("{0}")]
    Usage(String),
}

fn open(dir: &Path) -> Result<FileStore, ToolError> {
    if !dir.is_dir() {
        return Err(ToolError::Missing(dir.display().to_string()));
    }
    Ok(FileStore::inspect_dir(dir)?)
}

/// The audit trail's records held in the priority lane (docs/audit.md),
/// one per line, oldest first, each checked against the one before it.
pub fn audit(dir: &Path) -> Result<String, ToolError> {
    use edge_wire::audit::{self as wire, AuditRecord};
    let mut o = String::new();
    let mut store = open(&Lane::Priority.dir(dir))?;
    let (mut after, mut head, mut problems) = (0, None::<wire::Head>, 0);
    loop {
        let records = store.read_after(after, 256)?;
        let Some(last) = records.last() else { break };
        after = last.seq;
        for r in records.iter().filter(|r| wire::is_audit_frame(&r.payload)) {
            let Ok(a) = AuditRecord::decode(&r.payload) else {
                problems += 1;
                let _ = writeln!(o, "seq={} undecodable audit record", r.seq);
                continue;
            };
            let hash = wire::hash(&r.payload);
            let link = wire::check(head.as_ref(), &a, &hash);
            if !matches!(link, wire::Link::First | wire::Link::Next) {
                problems += 1;
            }
            let fields: Vec<String> = a.fields.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            let _ = writeln!(
                o,
                "seq={} chain={:016x} index={} time={} link={} {} {}",
                r.seq,
                a.chain,
                a.index,
                rfc3339(a.timestamp_ms),
                link.label(),
                a.event,
                fields.join(" ")
            );
            head = Some(wire::Head { chain: a.chain, index: a.index, hash });
        }
    }
    let _ = writeln!(
        o,
        "{} records; {}",
        head.map_or(0, |h| h.index),
        if problems == 0 { "links intact".to_owned() } else { format!("{problems} records do not link (link=...)") }
    );
    Ok(o)
}

/// A summary of the store, one fact per line, lane by lane.
pub fn inspect(dir: &Path) -> Result<String, ToolError> {
    let mut o = String::new();
    for lane in [Lane::Routine, Lane::Priority] {
        let lane_dir = lane.dir(dir);
        if lane == Lane::Priority && !lane_dir.is_dir() {
            continue;
        }
        let _ = writeln!(o, "[{} lane]", lane.label());
        o.push_str(&inspect_lane(&lane_dir)?);
    }
    Ok(o)
}

fn inspect_lane(dir: &Path) -> Result<String, ToolError> {
    let store = open(dir)?;
    let s = store.stats();
    let mut o = String::new();
    let records = if s.last_seq == 0 { 0 } else { s.last_seq - s.first_seq + 1 };
    let _ = writeln!(o, "store        {}", dir.display());
    let _ = writeln!(o, "segments     {} ({} bytes)", s.segments, s.bytes);
    if records == 0 {
        let _ = writeln!(o, "records      0");
    } else {
        let _ = writeln!(o, "records      {records} (seq {}..={})", s.first_seq, s.last_seq);
        let _ = writeln!(o, "oldest       {}", rfc3339(s.oldest_ms));
        let _ = writeln!(o, "newest       {}", rfc3339(s.newest_ms));
    }
    let _ = writeln!(o, "sent up to   seq {} (confirmed by the bridge: in the central store)", s.acked_seq);
    let _ = writeln!(o, "backlog      {} records not yet sent", s.backlog());
    let by_reason: Vec<String> =
        DropReason::ALL.iter().zip(s.dropped_records).map(|(r, n)| format!("{} {n}", r.label())).collect();
    let _ = writeln!(
        o,
        "dropped      {} records ({}), {} of them unsent, {} bytes",
        s.dropped_total(),
        by_reason.join(", "),
        s.dropped_unsent_records,
        s.dropped_bytes
    );
    let _ = writeln!(
        o,
        "damage       {} corrupt records, {} bytes of torn tail, {} segments quarantined",
        s.corrupt_records, s.truncated_bytes, s.quarantined_segments
    );
    Ok(o)
}

/// Label pairs -> samples `(timestamp_ms, value)` of one metric name.
type Family = BTreeMap<Vec<(String, String)>, Vec<(i64, f64)>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Csv,
    /// One row per window: its feature vector (docs/features.md), the
    /// training data of the anomaly model.
    Features,
}

/// Writes every sample with `from_ms <= t < to_ms`.
pub fn export(dir: &Path, from_ms: i64, to_ms: i64, format: Format, out: &mut dyn Write) -> Result<u64, ToolError> {
    let mut stores = vec![open(dir)?];
    // Features come from the windows (the routine lane) only.
    if format != Format::Features && Lane::Priority.dir(dir).is_dir() {
        stores.push(open(&Lane::Priority.dir(dir))?);
    }
    // name -> labels -> samples: OpenMetrics wants each family together and
    // each series' samples in time order.
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    let mut undecodable = 0u64;
    for store in &mut stores {
        let mut after = 0;
        loop {
            let blocks = store.read_blocks(after, 64, 4 << 20, true)?;
            let Some(last) = blocks.last().and_then(|b| b.last()) else { break };
            after = last.seq;
            for block in blocks {
                // The audit trail's records are not samples (`store audit`).
                if block.first().is_some_and(|r| edge_wire::audit::is_audit_frame(&r.payload)) {
                    continue;
                }
                let Ok(batch) = edge_wire::block::decode_block(block.iter().map(|r| r.payload.as_slice())) else {
                    undecodable += block.len() as u64;
                    continue;
                };
                for s in batch.series {
                    let labels = s.labels.into_iter().map(|l| (l.name, l.value)).collect();
                    let dst = families.entry(s.name).or_default().entry(labels).or_default();
                    dst.extend(
                        s.samples
                            .iter()
                            .filter(|p| p.timestamp_ms >= from_ms && p.timestamp_ms < to_ms)
                            .map(|p| (p.timestamp_ms, p.value)),
                    );
                }
            }
        }
    }
    if undecodable > 0 {
        tracing::warn!(records = undecodable, "records whose payload this build cannot decode were skipped");
    }
    if format == Format::Features {
        return write_features(&families, out);
    }
    let mut n = 0;
    if format == Format::Csv {
        writeln!(out, "timestamp_ms,time,metric,labels,value")?;
    }
    for (name, series) in &families {
        let (family, kind) = match name.strip_suffix("_total") {
            Some(f) => (f, "counter"),
            None => (name.as_str(), "unknown"),
        };
        if format == Format::OpenMetrics && series.values().any(|v| !v.is_empty()) {
            writeln!(out, "# TYPE {family} {kind}")?;
        }
        for (labels, samples) in series {
            let mut samples = samples.clone();
            samples.sort_by_key(|s| s.0);
            samples.dedup_by_key(|s| s.0);
            let sel = selector(labels);
            for (t, v) in samples {
                n += 1;
                match format {
                    Format::OpenMetrics => {
                        writeln!(out, "{name}{sel} {} {}.{:03}", fmt_f64(v), t.div_euclid(1000), t.rem_euclid(1000))?
                    }
                    Format::Csv | Format::Features => {
                        writeln!(out, "{t},{},{name},\"{}\",{}", rfc3339(t), sel.replace('"', "\"\""), fmt_f64(v))?
                    }
                }
            }
        }
    }
    if format == Format::OpenMetrics {
        writeln!(out, "# EOF")?;
    }
    Ok(n)
}

/// The feature rows of every window after the first: `timestamp_ms`,
/// `time`, `feature_version`, `window_s`, then every feature any window has,
/// in name order (0 where a window lacks it). A process value belongs to
/// the first window ending at or after its capture time. Returns the rows
/// written.
fn write_features(families: &BTreeMap<String, Family>, out: &mut dyn Write) -> Result<u64, ToolError> {
    use crate::features::TagValues;
    let mut windows: BTreeMap<i64, (Vec<(edge_wire::SeriesKey, f64)>, TagValues)> = BTreeMap::new();
    for (name, series) in families {
        if name == crate::values::VALUE_SERIES {
            continue;
        }
        for (labels, samples) in series {
            let key = edge_wire::SeriesKey::new(
                name.clone(),
                labels.iter().map(|(n, v)| edge_wire::Label::new(n.clone(), v.clone())).collect(),
            );
            for (t, v) in samples {
                windows.entry(*t).or_default().0.push((key.clone(), *v));
            }
        }
    }
    for (labels, samples) in families.get(crate::values::VALUE_SERIES).into_iter().flatten() {
        let Some((_, tag)) = labels.iter().find(|(n, _)| n == "tag") else { continue };
        for &(t, v) in samples {
            // Values after the last window belong to one not exported.
            if let Some((_, (_, tags))) = windows.range_mut(t..).next() {
                tags.entry(tag.clone()).or_default().push((t, v));
            }
        }
    }
    let mut stage = crate::features::FeatureStage::new();
    let rows: Vec<crate::features::Features> = windows
        .iter_mut()
        .filter_map(|(t, (s, tags))| {
            tags.values_mut().for_each(|v| v.sort_by_key(|p| p.0));
            stage.next(*t, s, tags)
        })
        .collect();
    let names: std::collections::BTreeSet<&String> = rows.iter().flat_map(|r| r.values.keys()).collect();
    let quote = |n: &str| format!("\"{}\"", n.replace('"', "\"\""));
    let header: Vec<String> = names.iter().map(|n| quote(n)).collect();
    writeln!(out, "timestamp_ms,time,feature_version,window_s,{}", header.join(","))?;
    for r in &rows {
        let cells: Vec<String> = names.iter().map(|n| fmt_f64(r.values.get(*n).copied().unwrap_or(0.0))).collect();
        writeln!(
            out,
            "{},{},{},{},{}",
            r.timestamp_ms,
            rfc3339(r.timestamp_ms),
            crate::features::VERSION,
            fmt_f64(r.window_s),
            cells.join(",")
        )?;
    }
    Ok(rows.len() as u64)
}

fn selector(labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")))
        .collect();
    format!("{{{}}}", inner.join(","))
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = edge_wire::civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, ms.rem_euclid(1000))
}

/// Parses a time for `--from`/`--to`: RFC 3339 in UTC (`2026-11-21T10:00:00Z`,
/// fractional seconds allowed), Unix seconds, or a time relative to `now_ms`
/// such as `-2h`, `-30m`, `-7d`, `-90s`.
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, String> {
    let bad = || format!("cannot read time {s:?}: use 2026-11-21T10:00:00Z, Unix seconds, or -2h / -30m / -7d");
    if let Some(rel) = s.strip_prefix('-') {
        let (num, unit) = rel.split_at(rel.len().saturating_sub(1));
        let n: i64 = num.parse().map_err(|_| bad())?;
        let mult = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        return Ok(now_ms - n * mult);
    }
    if s.bytes().all(|b| b.is_ascii_digit()) && !s.is_empty() {
        return s.parse::<i64>().map(|v| v * 1000).map_err(|_| bad());
    }
    let s2 = s.strip_suffix('Z').or_else(|| s.strip_suffix("+00:00")).ok_or_else(bad)?;
    let (date, time) = s2.split_once('T').ok_or_else(bad)?;
    let d: Vec<i64> = date.split('-').map(|x| x.parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(|x| x.parse().map_err(|_| bad())).collect::<Result<_, _>>()?;
    if d.len() != 3
        || t.len() != 3
        || !(1..=12).contains(&d[1])
        || !(1..=31).contains(&d[2])
        || t[0] > 23
        || t[1] > 59
        || t[2] > 60
    {
        return Err(bad());
    }
    let ms: i64 = format!("{:0<3}", &frac[..frac.len().min(3)]).parse().map_err(|_| bad())?;
    Ok((days_from_civil(d[0], d[1], d[2]) * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1000 + ms)
}

// Howard Hinnant's civil calendar algorithms (public domain).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        // Checked with `date -u -d @1795262384.718`.
        assert_eq!(rfc3339(1_795_262_384_718), "2026-11-21T11:59:44.718Z");
        for ms in [0, 951_782_400_000, 1_795_262_384_718, 4_102_444_800_000, -86_400_000] {
            assert_eq!(parse_time(&rfc3339(ms), 0), Ok(ms), "{}", rfc3339(ms));
        }
        assert_eq!(parse_time("2000-02-29T00:00:00Z", 0), Ok(951_782_400_000));
        assert_eq!(parse_time("1700000000", 0), Ok(1_700_000_000_000));
        assert_eq!(parse_time("-2h", 10_000_000), Ok(10_000_000 - 7_200_000));
        assert!(parse_time("yesterday", 0).unwrap_err().contains("yesterday"));
        assert!(parse_time("2026-13-01T00:00:00Z", 0).is_err());
    }

    #[test]
    fn label_values_are_escaped() {
        let l = vec![("a".to_string(), "x\"y\\z\n".to_string())];
        assert_eq!(selector(&l), "{a=\"x\\\"y\\\\z\\n\"}");
    }
}
