//! The audit trail: every event that changes what data the box has or
//! what it means (config applied, model installed or refused, a local
//! action fired, store drops, clock corrections, probes changed, privileges
//! dropped, certificates rotated, agent start and stop) becomes a record of
//! a hash chain (edge_wire::audit) in the priority lane: synced at once,
//! sent before the windows, confirmed like them, and checked by the bridge
//! (docs/audit.md).
//!
//! The chain's head (its id, last index and hash) is kept in
//! `<state_dir>/audit/head` and, on start, taken from the priority lane
//! when the lane holds a later record (a power cut between the record and
//! the head file). A head that cannot be read starts a new chain, which the
//! bridge counts (`new_chain`): the box never stops for its audit trail.

use crate::store::record::FLAG_BLOCK_START;
use crate::store::Lanes;
use crate::uplink::lock;
use edge_wire::audit::{self as wire, AuditRecord, GENESIS};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The chain's position: the next record links to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    chain: u64,
    index: u64,
    hash: [u8; 32],
}

impl Head {
    fn parse(text: &str) -> Option<Head> {
        let mut it = text.split_whitespace();
        let chain = u64::from_str_radix(it.next()?, 16).ok()?;
        let index = it.next()?.parse().ok()?;
        let hash: [u8; 32] = wire::unhex(it.next()?)?.try_into().ok()?;
        (it.next().is_none() && (index == 0) == (hash == GENESIS)).then_some(Head { chain, index, hash })
    }

    fn text(&self) -> String {
        format!("{:016x} {} {}\n", self.chain, self.index, wire::hex(&self.hash))
    }
}

/// Records events into the store's priority lane. Shared by the stages
/// (`Arc`); lock order: the store, then the head.
pub struct Audit {
    store: Arc<Mutex<Lanes>>,
    head: Mutex<Head>,
    dir: PathBuf,
    /// `clock.test_offset_ms`: records are stamped as windows are.
    test_offset_ms: i64,
    /// Records that could not be stored (`edge_agent_audit_records_total`).
    counts: crate::metrics::ResultCounts,
}

impl Audit {
    /// The chain of `state_dir`, continued from its head (module docs);
    /// records stamped as windows are: the wall clock plus
    /// `test_offset_ms` (`clock.test_offset_ms`).
    pub fn open(
        state_dir: &Path,
        store: Arc<Mutex<Lanes>>,
        counts: crate::metrics::ResultCounts,
        test_offset_ms: i64,
    ) -> Arc<Audit> {
        let dir = state_dir.join("audit");
        let saved = std::fs::read_to_string(dir.join("head")).ok();
        let mut head = saved.as_deref().and_then(Head::parse);
        if saved.is_some() && head.is_none() {
            tracing::error!(path = %dir.join("head").display(), "audit head unreadable: a new chain begins");
        }
        match latest_in_lane(&mut lock(&store)) {
            Ok(Some(h)) if head.is_none_or(|k| k.chain != h.chain || h.index > k.index) => head = Some(h),
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "the priority lane could not be read for the audit head"),
        }
        let head = head.unwrap_or_else(|| Head { chain: random_chain(), index: 0, hash: GENESIS });
        Arc::new(Audit { store, head: Mutex::new(head), dir, test_offset_ms, counts })
    }

    /// Marks a run begun; returns how the one before ended: `clean`,
    /// `crashed` (its mark was still there: no clean stop) or `first`.
    pub fn start_run(&self) -> &'static str {
        let mark = self.dir.join("running");
        let before = if mark.exists() {
            "crashed"
        } else if lock(&self.head).index == 0 {
            "first"
        } else {
            "clean"
        };
        let made = std::fs::create_dir_all(&self.dir).and_then(|_| std::fs::File::create(&mark)?.sync_all());
        if let Err(e) = made {
            tracing::warn!(error = %e, path = %mark.display(), "run mark not made: a crash will look like a clean stop");
        }
        before
    }

    /// Marks the run ended cleanly.
    pub fn end_run(&self) {
        let _ = std::fs::remove_file(self.dir.join("running"));
    }

    /// The configuration in force is `sha256` (of the file; `source`:
    /// start, sighup, remote): a record when it differs from the last one
    /// recorded, or when it came at run time.
    pub fn config_applied(&self, sha256: String, source: &str) {
        let path = self.dir.join("config");
        let previous = std::fs::read_to_string(&path).unwrap_or_default().trim().to_owned();
        if source == "start" && previous == sha256 {
            return;
        }
        let previous = if previous.is_empty() { "-".to_owned() } else { previous };
        self.record(
            "config_applied",
            &[("sha256", sha256.clone()), ("previous_sha256", previous), ("source", source.into())],
        );
        if let Err(e) = std::fs::create_dir_all(&self.dir).and_then(|_| std::fs::write(&path, sha256 + "\n")) {
            tracing::warn!(error = %e, path = %path.display(), "applied config's hash not saved");
        }
    }

    /// Records `event` now (the store is locked here).
    pub fn record(&self, event: &str, fields: &[(&str, String)]) {
        let mut lanes = lock(&self.store);
        self.record_in(&mut lanes, event, fields);
    }

    /// Records `event` now, the store already locked by the caller.
    pub fn record_in(&self, lanes: &mut Lanes, event: &str, fields: &[(&str, String)]) {
        let mut head = lock(&self.head);
        let now = crate::now_ms() + self.test_offset_ms;
        let record = AuditRecord {
            chain: head.chain,
            index: head.index + 1,
            prev: head.hash,
            timestamp_ms: now,
            event: event.into(),
            fields: fields
                .iter()
                .map(|(k, v)| ((*k).to_owned(), truncate(v, wire::MAX_VALUE).to_owned()))
                .take(wire::MAX_FIELDS)
                .collect(),
        };
        let frame = record.encode();
        let stored = lanes
            .priority
            .append_flagged(&frame, now, FLAG_BLOCK_START)
            .and_then(|seq| lanes.priority.sync().map(|_| seq));
        match stored {
            Ok(seq) => {
                *head = Head { chain: record.chain, index: record.index, hash: wire::hash(&frame) };
                self.save(&head);
                self.count("stored");
                tracing::info!(target: "edge_agent::audit", event, index = record.index, seq, fields = ?record.fields, "audited");
            }
            Err(e) => {
                self.count("not_stored");
                tracing::error!(target: "edge_agent::audit", event, fields = ?record.fields, error = %e, "audit record not stored");
            }
        }
        drop(head);
        self.record_drops(lanes);
    }

    /// The store's drops since the last call, each a record.
    pub fn record_drops(&self, lanes: &mut Lanes) {
        // One pass: a drop made room for these records is in the next one.
        let drops: Vec<_> = [("routine", &mut lanes.routine), ("priority", &mut lanes.priority)]
            .into_iter()
            .flat_map(|(lane, store)| store.take_drops().into_iter().map(move |d| (lane, d)))
            .collect();
        for (lane, d) in drops {
            let fields = [
                ("lane", lane.to_owned()),
                ("reason", d.reason.label().to_owned()),
                ("records", d.records.to_string()),
                ("unsent", d.unsent.to_string()),
                ("first_seq", d.first_seq.to_string()),
                ("last_seq", d.last_seq.to_string()),
            ];
            self.record_in(lanes, "store_dropped", &fields);
        }
    }

    fn save(&self, head: &Head) {
        let tmp = self.dir.join("head.tmp");
        let r = std::fs::create_dir_all(&self.dir).and_then(|_| {
            std::fs::write(&tmp, head.text())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, self.dir.join("head"))
        });
        if let Err(e) = r {
            // The lane has the record: the next start takes the head from it.
            tracing::warn!(error = %e, dir = %self.dir.display(), "audit head not saved");
        }
    }

    fn count(&self, result: &str) {
        self.counts.get_or_create(&crate::metrics::ResultLabels { result: result.into() }).inc();
    }
}

/// The last audit record in the priority lane, as a head.
fn latest_in_lane(lanes: &mut Lanes) -> Result<Option<Head>, crate::store::StoreError> {
    let mut after = 0;
    let mut latest: Option<Head> = None;
    loop {
        let records = lanes.priority.read_after(after, 256)?;
        let Some(last) = records.last() else { break };
        after = last.seq;
        for r in records.iter().filter(|r| wire::is_audit_frame(&r.payload)) {
            if let Ok(a) = AuditRecord::decode(&r.payload) {
                latest = Some(Head { chain: a.chain, index: a.index, hash: wire::hash(&r.payload) });
            }
        }
    }
    Ok(latest)
}

fn random_chain() -> u64 {
    let mut b = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b) | 1
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// SHA-256 of `bytes`, hex: what a config or file is, in a record.
pub fn sha256_hex(bytes: &[u8]) -> String {
    wire::hex(&wire::hash(bytes))
}

/// An audit trail over a store of its own in `dir`, for other stages'
/// tests.
#[cfg(test)]
pub(crate) fn for_tests(dir: &Path) -> Arc<Audit> {
    let limits =
        crate::store::StoreLimits { max_bytes: 1 << 20, segment_bytes: 64 << 10, max_age_ms: 0, fsync_interval_ms: 0 };
    let lanes = crate::store::Lanes::open(&dir.join("store"), limits, limits).expect("a store for the test");
    Audit::open(dir, Arc::new(Mutex::new(lanes)), Default::default(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreLimits;

    fn lanes(dir: &Path) -> Arc<Mutex<Lanes>> {
        let limits = StoreLimits { max_bytes: 1 << 20, segment_bytes: 64 << 10, max_age_ms: 0, fsync_interval_ms: 0 };
        Arc::new(Mutex::new(Lanes::open(&dir.join("store"), limits, limits).unwrap()))
    }

    fn records(store: &Mutex<Lanes>) -> Vec<(AuditRecord, [u8; 32])> {
        let mut l = lock(store);
        let rs = l.priority.read_after(0, usize::MAX).unwrap();
        rs.iter().map(|r| (AuditRecord::decode(&r.payload).unwrap(), wire::hash(&r.payload))).collect()
    }

    #[test]
    fn the_chain_goes_on_across_restarts_and_a_lost_head_file() {
        let dir = std::env::temp_dir().join(format!("audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = lanes(&dir);
        let a = Audit::open(&dir, store.clone(), Default::default(), 0);
        a.record("agent_started", &[("version", "1".into())]);
        a.record("config_applied", &[("sha256", "ab".into())]);
        drop(a);
        // Restart: from the head file.
        let a = Audit::open(&dir, store.clone(), Default::default(), 0);
        a.record("agent_stopped", &[]);
        drop(a);
        // A power cut before the head file was written: the lane is ahead.
        std::fs::write(dir.join("audit/head"), "zz").unwrap();
        let a = Audit::open(&dir, store.clone(), Default::default(), 0);
        a.record("agent_started", &[("detail", "é".repeat(600))]);
        let rs = records(&store);
        assert_eq!(rs.iter().map(|(r, _)| r.index).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert!(rs.iter().all(|(r, _)| r.chain == rs[0].0.chain));
        let mut head = None;
        for (r, h) in &rs {
            let link = wire::check(head.as_ref(), r, h);
            assert!(matches!(link, wire::Link::First | wire::Link::Next), "{link:?}");
            head = Some(wire::Head { chain: r.chain, index: r.index, hash: *h });
        }
        assert!(rs[3].0.fields[0].1.len() <= wire::MAX_VALUE);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
