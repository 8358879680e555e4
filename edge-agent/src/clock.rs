//! Device clock: which stored records were stamped by a wall clock that was
//! wrong, and by how much (docs/clock.md).
//!
//! Every window is stamped with the wall clock. Alongside, the agent keeps a
//! journal of clock *eras*: runs of records during which `wall - monotonic`
//! stayed put (monotonic = CLOCK_BOOTTIME, which never jumps and counts
//! suspend) within one boot. An era also records whether the kernel said
//! the clock was synchronized (NTP) then. A step of the wall clock (NTP's
//! first sync, someone running `date`), a change of the sync state or a
//! reboot starts a new era; the window writer starts a new block there, so
//! a block never spans two eras. So each record's (boot id, monotonic time,
//! wall time) is known: its wall time is in the record, the rest in its era.
//!
//! Once the true offset of a boot is known (the offset of a synchronized era
//! of that boot, or a bridge's answer to a time request), every record of an
//! unsynchronized era of that boot is corrected at send time by
//! `true offset - era offset`, carried in the envelope's `clock_shift_ms`.
//! Until then the uplink holds those blocks back. A boot that ended without
//! ever learning its true offset cannot be corrected: its records go as
//! stamped and are counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Journal entries kept at most (oldest dropped first).
const MAX_ERAS: usize = 1024;
/// A change of `wall - monotonic` beyond this is a step of the wall clock.
const STEP_MS: i64 = 1000;

/// One look at the clocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    pub boot_id: String,
    /// CLOCK_BOOTTIME, ms.
    pub mono_ms: i64,
    /// CLOCK_REALTIME (plus the configured test offset), Unix ms.
    pub wall_ms: i64,
    /// The kernel considers the wall clock synchronized (adjtimex).
    pub synced: bool,
}

impl Reading {
    pub fn offset_ms(&self) -> i64 {
        self.wall_ms - self.mono_ms
    }
}

/// Reads the clocks. `test_offset_ms` != 0 pretends the wall clock is that
/// far off and not synchronized (`clock.test_offset_ms`, for tests).
pub fn read(test_offset_ms: i64) -> Reading {
    Reading {
        boot_id: boot_id().to_owned(),
        mono_ms: mono_ms(),
        wall_ms: clock_ms(libc::CLOCK_REALTIME) + test_offset_ms,
        synced: test_offset_ms == 0 && kernel_synced(),
    }
}

fn clock_ms(id: libc::clockid_t) -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec * 1000 + ts.tv_nsec / 1_000_000
}

/// adjtimex(2) with no modes only reads: TIME_ERROR or STA_UNSYNC mean the
/// kernel's clock is not synchronized to anything.
fn kernel_synced() -> bool {
    // SAFETY: zeroed timex is a valid argument; modes = 0 changes nothing.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: adjtimex reads into our timex.
    let state = unsafe { libc::adjtimex(&mut tx) };
    state >= 0 && state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0
}

/// CLOCK_BOOTTIME in ms: never stepped, counts suspend.
pub fn mono_ms() -> i64 {
    clock_ms(libc::CLOCK_BOOTTIME)
}

/// This boot's id; it cannot change while the process lives, so it is read
/// once.
pub fn boot_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".into())
    })
}

/// A run of records with one clock offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Era {
    pub boot_id: String,
    /// First record of the era in each lane (routine, priority): the lane's
    /// next sequence number when the era began.
    pub first_seq: [u64; 2],
    /// wall - monotonic, ms.
    pub offset_ms: i64,
    pub synced: bool,
}

/// How to stamp a block when it is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shift {
    /// Add this (0: the clock was right).
    Known(i64),
    /// This boot's true time is not known yet: hold the block.
    Pending,
    /// Recorded in an earlier boot whose true time was never learned (or
    /// before the journal begins): send as stamped.
    Unknowable,
}

/// The journal, persisted in `<state_dir>/clock-eras`.
#[derive(Debug)]
pub struct Clock {
    path: PathBuf,
    eras: Vec<Era>,
    /// True `wall - monotonic` per boot, learned from a time source.
    learned: BTreeMap<String, i64>,
    /// The latest true wall time (Unix ms) the journal saw: a synchronized
    /// reading or a learned time; 0 when none.
    known_ms: i64,
    /// Offsets within this much of the truth are left alone.
    tolerance_ms: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("clock journal {path}: {message}")]
pub struct ClockError {
    pub path: PathBuf,
    pub message: String,
}

impl Clock {
    /// Opens the journal. A damaged file is reported and replaced: the eras
    /// it held are lost (their records go as stamped), nothing else.
    pub fn open(state_dir: &Path, tolerance_ms: i64) -> (Clock, Option<ClockError>) {
        let path = state_dir.join("clock-eras");
        let mut c = Clock { path, eras: Vec::new(), learned: BTreeMap::new(), known_ms: 0, tolerance_ms };
        let err = match std::fs::read_to_string(&c.path) {
            Ok(text) => c.parse(&text).err(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => Some(e.to_string()),
        }
        .map(|message| {
            c.eras.clear();
            c.learned.clear();
            ClockError { path: c.path.clone(), message: format!("{message}; starting a new journal") }
        });
        (c, err)
    }

    fn parse(&mut self, text: &str) -> Result<(), String> {
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err("unknown header".into());
        }
        for (n, line) in lines.enumerate() {
            let f: Vec<&str> = line.split(' ').collect();
            let bad = || format!("line {}: {line:?} is not understood", n + 2);
            match f.as_slice() {
                ["era", boot, r, p, off, synced] => self.eras.push(Era {
                    boot_id: boot.to_string(),
                    first_seq: [r.parse().map_err(|_| bad())?, p.parse().map_err(|_| bad())?],
                    offset_ms: off.parse().map_err(|_| bad())?,
                    synced: match *synced {
                        "1" => true,
                        "0" => false,
                        _ => return Err(bad()),
                    },
                }),
                ["true", boot, off] => {
                    self.learned.insert(boot.to_string(), off.parse().map_err(|_| bad())?);
                }
                ["known", ms] => self.known_ms = ms.parse().map_err(|_| bad())?,
                _ => return Err(bad()),
            }
        }
        Ok(())
    }

    fn render(&self) -> String {
        let mut s = format!("{HEADER}\n");
        for e in &self.eras {
            let synced = u8::from(e.synced);
            s += &format!("era {} {} {} {} {synced}\n", e.boot_id, e.first_seq[0], e.first_seq[1], e.offset_ms);
        }
        for (boot, off) in &self.learned {
            s += &format!("true {boot} {off}\n");
        }
        if self.known_ms > 0 {
            s += &format!("known {}\n", self.known_ms);
        }
        s
    }

    /// Writes the journal atomically (temporary file, fsync, rename).
    fn save(&self) -> Result<(), ClockError> {
        crate::store::medium::replace_file(&self.path, self.render().as_bytes())
            .map_err(|e| ClockError { path: self.path.clone(), message: e.to_string() })
    }

    pub fn eras(&self) -> &[Era] {
        &self.eras
    }

    /// Called before each window is stored, with the lanes' next sequence
    /// numbers. Returns true when a new era begins here (the writer must
    /// start a new block).
    pub fn observe(&mut self, r: &Reading, next_seq: [u64; 2]) -> Result<bool, ClockError> {
        let same = self.eras.last().is_some_and(|e| {
            e.boot_id == r.boot_id && e.synced == r.synced && (e.offset_ms - r.offset_ms()).abs() <= STEP_MS
        });
        if same {
            return Ok(false);
        }
        self.eras.push(Era {
            boot_id: r.boot_id.clone(),
            first_seq: next_seq,
            offset_ms: r.offset_ms(),
            synced: r.synced,
        });
        if r.synced {
            // The kernel's synchronized clock is the truth for this boot.
            self.learned.insert(r.boot_id.clone(), r.offset_ms());
            self.known_ms = self.known_ms.max(r.wall_ms);
        }
        if self.eras.len() > MAX_ERAS {
            self.eras.remove(0);
        }
        let boots: Vec<&String> = self.eras.iter().map(|e| &e.boot_id).collect();
        self.learned.retain(|b, _| boots.contains(&b));
        self.save()?;
        Ok(true)
    }

    /// A time source says the true `wall - monotonic` of `boot` is
    /// `offset_ms`. Returns whether anything changed (and was saved).
    pub fn learn(&mut self, boot: &str, offset_ms: i64) -> Result<bool, ClockError> {
        // A synchronized era of this boot is better than any estimate.
        if self.eras.iter().any(|e| e.boot_id == boot && e.synced) {
            return Ok(false);
        }
        self.known_ms = self.known_ms.max(offset_ms + mono_ms());
        let old = self.learned.insert(boot.to_owned(), offset_ms);
        if old.is_some_and(|o| (o - offset_ms).abs() <= self.tolerance_ms / 2) {
            self.learned.insert(boot.to_owned(), old.unwrap_or(offset_ms));
            return Ok(false);
        }
        self.save()?;
        Ok(true)
    }

    /// The earliest the true time can be now (Unix seconds): the later of
    /// this build's time and the latest true time the journal saw. The
    /// uplink checks the broker's certificate at no earlier time, so a box
    /// whose clock starts years behind (no RTC) can still connect and learn
    /// the true time.
    pub fn time_floor(&self) -> u64 {
        let built: u64 = env!("EDGE_AGENT_BUILT_UNIX").parse().unwrap_or(0);
        built.max((self.known_ms / 1000).max(0) as u64)
    }

    /// Whether the current era needs a time source (not synchronized and
    /// not yet learned for this boot).
    pub fn needs_time(&self, boot: &str) -> bool {
        self.eras.last().is_some_and(|e| !e.synced) && !self.learned.contains_key(boot)
    }

    /// How far the wall clock of reading `r` is from its boot's true time
    /// (true - wall), once that is known.
    pub fn error_ms(&self, r: &Reading) -> Option<i64> {
        self.learned.get(&r.boot_id).map(|truth| truth - r.offset_ms())
    }

    /// How to stamp the block starting at record `seq` of `lane`.
    pub fn shift(&self, lane: usize, seq: u64, current_boot: &str) -> Shift {
        let Some(era) = self.eras.iter().rev().find(|e| e.first_seq[lane] <= seq) else {
            return Shift::Unknowable;
        };
        if era.synced {
            return Shift::Known(0);
        }
        match self.learned.get(&era.boot_id) {
            Some(truth) => {
                let d = truth - era.offset_ms;
                Shift::Known(if d.abs() <= self.tolerance_ms { 0 } else { d })
            }
            None if era.boot_id == current_boot => Shift::Pending,
            None => Shift::Unknowable,
        }
    }
}

const HEADER: &str = "# edge-agent clock eras v1";

/// How far the wall clock was from the learned true time (true - wall), ms:
/// on `/metrics` and in every window once known.
pub const ERROR_MS: &str = "edge_agent_clock_error_ms";

/// The clock's metrics (docs/metrics.md), registered under
/// `edge_agent_clock_`.
#[derive(Clone, Debug, Default)]
pub struct ClockMetrics {
    pub replies: prometheus_client::metrics::counter::Counter,
    pub uncorrected: prometheus_client::metrics::counter::Counter,
    pub error_ms: prometheus_client::metrics::gauge::Gauge,
}

impl ClockMetrics {
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        let r = registry.sub_registry_with_prefix("edge_agent_clock");
        r.register(
            "time_replies",
            "Bridge answers to time requests used to correct the wall clock",
            self.replies.clone(),
        );
        r.register(
            "uncorrected_blocks",
            "Blocks of an unsynchronized clock sent without correction (true time never learned)",
            self.uncorrected.clone(),
        );
        r.register(
            ERROR_MS.trim_start_matches("edge_agent_clock_"),
            "How far the wall clock was from the learned true time (true - wall), ms",
            self.error_ms.clone(),
        );
    }
}

/// The `[clock]` section of the configuration (docs/configuration.md).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClockConfig {
    /// Corrections smaller than this are not applied (the time request's
    /// own error is half a round trip).
    pub tolerance_ms: u64,
    /// Connected this long without an answer to time requests, blocks of an
    /// unsynchronized clock go as stamped (counted) instead of waiting.
    pub sync_wait_secs: u64,
    /// For tests: pretend the wall clock is this far off (and not
    /// synchronized). 0 in production.
    pub test_offset_ms: i64,
}

impl Default for ClockConfig {
    fn default() -> Self {
        ClockConfig { tolerance_ms: 1000, sync_wait_secs: 60, test_offset_ms: 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(boot: &str, mono: i64, wall: i64, synced: bool) -> Reading {
        Reading { boot_id: boot.into(), mono_ms: mono, wall_ms: wall, synced }
    }

    const H3: i64 = 3 * 3_600_000;

    #[test]
    fn a_wrong_clock_is_corrected_once_the_truth_is_known() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, err) = Clock::open(dir.path(), 1000);
        assert!(err.is_none());
        let t0 = 1_795_000_000_000;
        // Booted 3 h behind, unsynchronized.
        assert!(c.observe(&reading("b1", 5_000, t0 - H3, false), [1, 1]).unwrap());
        assert!(!c.observe(&reading("b1", 15_000, t0 - H3 + 10_000, false), [2, 1]).unwrap());
        assert_eq!(c.shift(0, 1, "b1"), Shift::Pending);
        assert!(c.needs_time("b1"));
        // The bridge tells the truth: wall should be mono + (t0 - 5000).
        assert!(c.learn("b1", t0 - 5_000).unwrap());
        assert_eq!(c.shift(0, 2, "b1"), Shift::Known(H3));
        assert_eq!(c.error_ms(&reading("b1", 16_000, t0 - H3 + 11_000, false)), Some(H3));
        // NTP steps the clock: a new, synchronized era; no shift there.
        assert!(c.observe(&reading("b1", 25_000, t0 + 20_000, true), [3, 1]).unwrap());
        assert_eq!(c.shift(0, 3, "b1"), Shift::Known(0));
        assert_eq!(c.shift(0, 2, "b1"), Shift::Known(H3), "the older era keeps its correction");
        assert!(!c.needs_time("b1"));

        // The journal survives a restart, byte for byte.
        let (again, err) = Clock::open(dir.path(), 1000);
        assert!(err.is_none());
        assert_eq!(again.eras(), c.eras());
        assert_eq!(again.shift(0, 2, "b2"), Shift::Known(H3));
    }

    #[test]
    fn an_earlier_boot_never_corrected_goes_as_stamped() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _) = Clock::open(dir.path(), 1000);
        c.observe(&reading("b1", 1_000, 86_400_000, false), [1, 1]).unwrap(); // RTC reset to 1970
        c.observe(&reading("b2", 1_000, 1_795_000_000_000, false), [5, 1]).unwrap();
        assert_eq!(c.shift(0, 2, "b2"), Shift::Unknowable);
        assert_eq!(c.shift(0, 5, "b2"), Shift::Pending);
        assert_eq!(c.shift(0, 0, "b2"), Shift::Unknowable, "before the journal");
    }

    #[test]
    fn small_differences_are_not_corrections() {
        let dir = tempfile::tempdir().unwrap();
        let (mut c, _) = Clock::open(dir.path(), 1000);
        c.observe(&reading("b", 0, 1_795_000_000_000, false), [1, 1]).unwrap();
        c.learn("b", 1_795_000_000_400).unwrap();
        assert_eq!(c.shift(0, 1, "b"), Shift::Known(0));
        // A re-sync within half the tolerance keeps the first estimate.
        assert!(!c.learn("b", 1_795_000_000_300).unwrap());
    }

    #[test]
    fn a_damaged_journal_is_reported_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("clock-eras"), "# edge-agent clock eras v1\nera x y\n").unwrap();
        let (mut c, err) = Clock::open(dir.path(), 1000);
        let msg = err.unwrap().to_string();
        assert!(msg.contains("clock-eras") && msg.contains("line 2"), "{msg}");
        assert!(c.eras().is_empty());
        c.observe(&reading("b", 0, 1, true), [1, 1]).unwrap();
        assert!(Clock::open(dir.path(), 1000).1.is_none());
    }

    #[test]
    fn this_machine_reads_sane_clocks() {
        let r = read(0);
        assert!(r.mono_ms > 0 && r.wall_ms > 1_600_000_000_000, "{r:?}");
        assert_eq!(r.boot_id.len(), 36, "{r:?}");
        let off = read(-H3);
        assert!(!off.synced);
        assert!((off.offset_ms() - r.offset_ms() + H3).abs() < 1000);
    }
}
