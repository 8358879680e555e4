//! The devices' audit trails at the centre (docs/audit.md): each audit
//! record checked against the last one this bridge knows of its device's
//! chain (edge_wire::audit::check), written to an append-only log, and
//! counted by how it fits (`fleet_bridge_audit_records_total{device,link}`).
//!
//! The log: one JSON object per line, in `<audit.dir>/<YYYY-MM-DD>.<bridge>.jsonl`
//! (the day the bridge received it, UTC), each batch of lines written by
//! one `write` in append mode and fsynced before the device is confirmed.
//! A line carries the record's frame, byte for byte (hex), so
//! `fleet-bridge audit verify` can check every line again from the frames
//! alone: a line edited, deleted or inserted in the log shows.
//!
//! The heads (the last record of each device's chain) live in memory and
//! are read back from the log directory at start. Several bridges writing
//! one directory see each other's lines only at their next start: between
//! them, a record handled by another bridge shows here as a gap that
//! `audit verify` over the whole directory finds filled.

use edge_wire::audit::{self as wire, AuditRecord, Head, Link};
use edge_wire::{DecodeError, Envelope};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// An audit block as it came: the records' frames and where they sit.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub first_seq: u64,
    pub clock_shift_ms: i64,
    pub frames: Vec<(AuditRecord, Vec<u8>)>,
}

impl Block {
    /// Every frame of the envelope must be an audit record.
    pub fn decode(env: &Envelope<'_>) -> Result<Block, DecodeError> {
        let frames = env
            .frames
            .iter()
            .map(|f| Ok((AuditRecord::decode(f)?, f.to_vec())))
            .collect::<Result<Vec<_>, DecodeError>>()?;
        Ok(Block { first_seq: env.first_seq, clock_shift_ms: env.clock_shift_ms, frames })
    }
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    /// When the bridge took it (its clock, ms since the epoch).
    pub received_ms: i64,
    pub bridge: String,
    pub device: String,
    /// The record's place in the device's priority lane.
    pub seq: u64,
    /// The chain's id, 16 hex digits.
    pub chain: String,
    pub index: u64,
    /// The record's time with the envelope's clock shift applied.
    pub time_ms: i64,
    pub clock_shift_ms: i64,
    pub event: String,
    pub fields: BTreeMap<String, String>,
    /// SHA-256 of the previous record's frame, and of this one's (hex).
    pub prev: String,
    pub hash: String,
    /// How the record fitted what the bridge knew: next, first, gap,
    /// break, fork or new_chain (`seen` records are not written again).
    pub link: String,
    /// The record's frame, hex.
    pub frame: String,
}

/// The log and the heads.
pub struct AuditLog {
    dir: PathBuf,
    bridge: String,
    heads: HashMap<String, Head>,
}

/// What became of one block's records.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// By link label, with the records missing in gaps.
    pub links: Vec<Link>,
}

impl AuditLog {
    /// Opens `dir` (created if needed) and reads the heads back from the
    /// lines in it.
    pub fn open(dir: &Path, bridge: &str) -> std::io::Result<AuditLog> {
        std::fs::create_dir_all(dir)?;
        let mut heads = HashMap::new();
        let mut unreadable = 0u64;
        for path in log_files(dir)? {
            for line in std::io::BufRead::lines(std::io::BufReader::new(std::fs::File::open(&path)?)) {
                match line
                    .ok()
                    .and_then(|l| serde_json::from_str::<Line>(&l).ok())
                    .and_then(|l| head_of(&l).map(|h| (l.device, h)))
                {
                    Some((device, h)) => {
                        heads.insert(device, h);
                    }
                    None => unreadable += 1,
                }
            }
        }
        if unreadable > 0 {
            tracing::warn!(dir = %dir.display(), lines = unreadable, "audit log lines not understood (fleet-bridge audit verify names them)");
        }
        tracing::info!(dir = %dir.display(), devices = heads.len(), "audit log opened");
        Ok(AuditLog { dir: dir.to_owned(), bridge: bridge.to_owned(), heads })
    }

    /// Checks and logs `block` of `device`; returns each record's link.
    /// Nothing is remembered unless the lines are durable (an error: the
    /// device is not confirmed and sends the block again).
    pub fn append(&mut self, device: &str, block: &Block, now_ms: i64) -> std::io::Result<Vec<Link>> {
        let mut heads = self.heads.get(device).copied();
        let mut links = Vec::new();
        let mut text = String::new();
        for (i, (r, frame)) in block.frames.iter().enumerate() {
            let hash = wire::hash(frame);
            let link = wire::check(heads.as_ref(), r, &hash);
            links.push(link);
            if link.advances() {
                heads = Some(Head { chain: r.chain, index: r.index, hash });
            }
            if link == Link::Seen {
                continue;
            }
            let line = Line {
                received_ms: now_ms,
                bridge: self.bridge.clone(),
                device: device.to_owned(),
                seq: block.first_seq + i as u64,
                chain: format!("{:016x}", r.chain),
                index: r.index,
                time_ms: r.timestamp_ms.saturating_add(block.clock_shift_ms),
                clock_shift_ms: block.clock_shift_ms,
                event: r.event.clone(),
                fields: r.fields.iter().cloned().collect(),
                prev: wire::hex(&r.prev),
                hash: wire::hex(&hash),
                link: link.label().into(),
                frame: wire::hex(frame),
            };
            // Serializing strings and numbers cannot fail.
            text.push_str(&serde_json::to_string(&line).unwrap_or_default());
            text.push('\n');
        }
        if !text.is_empty() {
            let path = self.dir.join(format!("{}.{}.jsonl", day(now_ms), self.bridge));
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
            f.write_all(text.as_bytes())?;
            f.sync_data()?;
        }
        if let Some(h) = heads {
            self.heads.insert(device.to_owned(), h);
        }
        Ok(links)
    }
}

fn head_of(l: &Line) -> Option<Head> {
    if !matches!(l.link.as_str(), "next" | "first" | "gap" | "break" | "new_chain") {
        return None;
    }
    Some(Head {
        chain: u64::from_str_radix(&l.chain, 16).ok()?,
        index: l.index,
        hash: wire::unhex(&l.hash)?.try_into().ok()?,
    })
}

/// The `.jsonl` files of `dir`, by name (so by day).
/// The records' files in `dir`, `<YYYY-MM-DD>.<client_id>.jsonl`; not the
/// operators' logs beside them (`rollout-…`, `certificates-…`).
fn log_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit())))
        .collect();
    files.sort();
    Ok(files)
}

/// `YYYY-MM-DD` (UTC) of a time in ms.
pub(crate) fn day(ms: i64) -> String {
    let (y, m, d) = edge_wire::civil_from_days(ms.div_euclid(86_400_000));
    format!("{y:04}-{m:02}-{d:02}")
}

/// What `audit verify` found for one device.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeviceReport {
    pub records: u64,
    pub chains: u64,
    /// Records missing: between ones in the log, and before the first.
    pub missing: u64,
    /// Records whose `prev` is not the hash of the record before them.
    pub breaks: u64,
    /// Two different records at one place of a chain.
    pub forks: u64,
}

/// What `audit verify` found.
#[derive(Debug, Default)]
pub struct Report {
    pub devices: BTreeMap<String, DeviceReport>,
    /// Lines that are not a record as logged (edited, or not a line of
    /// this log): file, line number, why.
    pub bad_lines: Vec<(PathBuf, usize, String)>,
}

impl Report {
    pub fn clean(&self) -> bool {
        self.bad_lines.is_empty() && self.devices.values().all(|d| d.missing == 0 && d.breaks == 0 && d.forks == 0)
    }
}

/// A chain's records as logged: index -> the records at it, with hashes.
type Chain = BTreeMap<u64, Vec<(AuditRecord, [u8; 32])>>;

/// Checks the log files (or directories of them) again from the frames:
/// each line against its frame, each chain's links, by device.
pub fn verify(paths: &[PathBuf]) -> std::io::Result<Report> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            files.extend(log_files(p)?);
        } else {
            files.push(p.clone());
        }
    }
    let mut report = Report::default();
    let mut chains: BTreeMap<(String, u64), Chain> = BTreeMap::new();
    for path in &files {
        let reader = std::io::BufReader::new(std::fs::File::open(path)?);
        for (n, line) in std::io::BufRead::lines(reader).enumerate() {
            let line = line?;
            match check_line(&line) {
                Ok((device, r, hash)) => {
                    let at = chains.entry((device, r.chain)).or_default().entry(r.index).or_default();
                    if !at.iter().any(|(_, h)| *h == hash) {
                        at.push((r, hash));
                    }
                }
                Err(why) => report.bad_lines.push((path.clone(), n + 1, why)),
            }
        }
    }
    for ((device, _), records) in chains {
        let d = report.devices.entry(device).or_default();
        d.chains += 1;
        let mut before: Option<(u64, Vec<[u8; 32]>)> = None;
        for (index, at) in records {
            d.records += at.len() as u64;
            d.forks += at.len() as u64 - 1;
            if let Some((i, hashes)) = &before {
                if index > i + 1 {
                    d.missing += index - i - 1;
                } else if at.iter().any(|(r, _)| !hashes.contains(&r.prev)) {
                    d.breaks += 1;
                }
            } else {
                // Every chain begins at 1, and the bridge logs from the
                // first record it gets: records before the first line are
                // missing too (a log pruned by age must be verified with
                // its files since the chain began).
                d.missing += index - 1;
            }
            before = Some((index, at.iter().map(|(_, h)| *h).collect()));
        }
    }
    Ok(report)
}

/// A line's record, checked against its frame.
fn check_line(text: &str) -> Result<(String, AuditRecord, [u8; 32]), String> {
    let l: Line = serde_json::from_str(text).map_err(|e| format!("not a log line: {e}"))?;
    let frame = wire::unhex(&l.frame).ok_or("frame is not hex")?;
    let r = AuditRecord::decode(&frame).map_err(|e| format!("frame: {e}"))?;
    let hash = wire::hash(&frame);
    let same = l.chain == format!("{:016x}", r.chain)
        && l.index == r.index
        && l.event == r.event
        && l.prev == wire::hex(&r.prev)
        && l.hash == wire::hex(&hash)
        && l.time_ms == r.timestamp_ms.saturating_add(l.clock_shift_ms)
        && l.fields == r.fields.iter().cloned().collect::<BTreeMap<_, _>>();
    if !same {
        return Err("the line does not say what its frame says (edited)".into());
    }
    Ok((l.device, r, hash))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(chain: u64, n: u64) -> Vec<(AuditRecord, Vec<u8>)> {
        let mut prev = wire::GENESIS;
        (1..=n)
            .map(|index| {
                let r = AuditRecord {
                    chain,
                    index,
                    prev,
                    timestamp_ms: 1_780_000_000_000 + index as i64,
                    event: "config_applied".into(),
                    fields: vec![("sha256".into(), format!("{index:064x}"))],
                };
                let f = r.encode();
                prev = wire::hash(&f);
                (r, f)
            })
            .collect()
    }

    fn block(first_seq: u64, frames: &[(AuditRecord, Vec<u8>)]) -> Block {
        Block { first_seq, clock_shift_ms: 0, frames: frames.to_vec() }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bridge-audit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn days_are_utc_calendar_days() {
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(951_782_400_000), "2000-02-29");
        assert_eq!(day(1_796_428_799_999), "2026-12-04");
        assert_eq!(day(-1), "1969-12-31");
    }

    #[test]
    fn the_log_keeps_heads_across_restarts_and_verify_finds_each_kind_of_damage() {
        let dir = tmp("log");
        let rs = records(0xabc, 6);
        let now = 1_780_000_000_000;
        let mut log = AuditLog::open(&dir, "b1").unwrap();
        assert_eq!(log.append("d1", &block(1, &rs[..2]), now).unwrap(), [Link::First, Link::Next]);
        // A re-send is not logged again.
        assert_eq!(log.append("d1", &block(2, &rs[1..2]), now).unwrap(), [Link::Seen]);
        drop(log);
        // The heads come back from the log.
        let mut log = AuditLog::open(&dir, "b1").unwrap();
        assert_eq!(log.append("d1", &block(3, &rs[2..3]), now).unwrap(), [Link::Next]);
        // Record 4 deleted on the box: 5 comes after 3.
        assert_eq!(log.append("d1", &block(5, &rs[4..5]), now).unwrap(), [Link::Gap { missing: 1 }]);
        // Record 6 arrives edited: its hash differs, but it links; a
        // seventh built on the original would break. Edit 6's field and
        // re-encode (the device recomputed nothing after it).
        let mut edited = rs[5].0.clone();
        edited.fields[0].1 = "edited".into();
        let f = edited.encode();
        assert_eq!(log.append("d1", &block(6, &[(edited, f)]), now).unwrap(), [Link::Next]);
        // The operators' logs beside the records are not records.
        std::fs::write(dir.join("rollout-2026-01-01.jsonl"), "{\"step\":\"start\"}\n").unwrap();
        std::fs::write(dir.join("certificates-2026-01-01.jsonl"), "{\"step\":\"signed\"}\n").unwrap();
        let report = verify(std::slice::from_ref(&dir)).unwrap();
        let d = &report.devices["d1"];
        assert_eq!((d.records, d.missing, d.breaks, d.forks), (5, 1, 0, 0), "{report:?}");
        assert!(report.bad_lines.is_empty(), "{:?}", report.bad_lines);
        assert!(!report.clean());

        // A line of the log edited, and one deleted: verify names both.
        let file = log_files(&dir).unwrap().pop().unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines[0] = lines[0].replace("config_applied", "config_reverted");
        lines.remove(1);
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        let report = verify(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(report.bad_lines.len(), 1, "{report:?}");
        assert_eq!(report.bad_lines[0].1, 1);
        assert_eq!(report.devices["d1"].missing, 3, "records 1, 2 (line 1 not counted), 4: {report:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn verify_finds_a_break_and_a_fork() {
        let dir = tmp("break");
        let rs = records(7, 3);
        let mut log = AuditLog::open(&dir, "b").unwrap();
        log.append("d", &block(1, &rs[..1]), 0).unwrap();
        // Record 2 replaced by another at the same place, then 3 (which
        // links to the original 2).
        let mut other = rs[1].0.clone();
        other.event = "model_installed".into();
        let f = other.encode();
        assert_eq!(log.append("d", &block(2, &[(other, f)]), 0).unwrap(), [Link::Next]);
        assert_eq!(log.append("d", &block(3, &rs[1..3]), 0).unwrap(), [Link::Fork, Link::Break]);
        let d = verify(std::slice::from_ref(&dir)).unwrap().devices["d"].clone();
        assert_eq!((d.records, d.forks, d.breaks), (4, 1, 0), "3 links to one of the two at 2: {d:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
