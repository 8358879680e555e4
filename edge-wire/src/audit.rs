//! Audit records: frame kind 3 of the frame format's version 2 (first
//! byte [`FRAME_AUDIT`]), a hash chain of the events that change what data
//! a device has or what it means (docs/wire-format.md, "Audit records").
//!
//! Each record carries the SHA-256 of the previous record's frame bytes,
//! so a record deleted, edited or inserted after the centre has seen the
//! ones around it breaks the chain. The agent keeps the records in its
//! priority lane; the bridge checks each device's chain ([`check`]) and
//! writes the records to its audit log.

use crate::DecodeError;
use serde::{Deserialize, Serialize};

/// First byte of an audit record frame (version 2, kind 3).
pub const FRAME_AUDIT: u8 = 0x23;
/// Most fields in one record.
pub const MAX_FIELDS: usize = 16;
/// Longest event or field name, in bytes.
pub const MAX_KEY: usize = 64;
/// Longest field value, in bytes.
pub const MAX_VALUE: usize = 1024;
/// The `prev` of a chain's first record.
pub const GENESIS: [u8; 32] = [0; 32];

/// One event in a device's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Chosen at random when the device began its chain (a new state
    /// directory begins a new one); the bridge tells chains apart by it.
    pub chain: u64,
    /// Position in the chain: 1 for its first record, then +1 each.
    pub index: u64,
    /// SHA-256 of the previous record's frame; [`GENESIS`] for index 1.
    pub prev: [u8; 32],
    /// The device's wall clock when it happened (the envelope's clock
    /// shift applies, as to samples).
    pub timestamp_ms: i64,
    /// What happened: `[a-z0-9_]`, starting with a letter.
    pub event: String,
    /// Details, names as the event's; values free text.
    pub fields: Vec<(String, String)>,
}

impl AuditRecord {
    /// The frame: `[FRAME_AUDIT][postcard(self)]`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FRAME_AUDIT];
        // Serializing to a Vec cannot fail.
        out.extend_from_slice(&postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    /// Decodes and validates a frame.
    pub fn decode(frame: &[u8]) -> Result<AuditRecord, DecodeError> {
        let body = crate::versioned(frame, "audit frame", FRAME_AUDIT)?;
        let bad = |reason: String| DecodeError::Malformed { what: "audit record", reason };
        let (r, rest): (AuditRecord, _) = postcard::take_from_bytes(body).map_err(|e| bad(e.to_string()))?;
        if !rest.is_empty() {
            return Err(DecodeError::Trailing(rest.len(), "audit record"));
        }
        if r.index == 0 {
            return Err(bad("index 0 (a chain begins at 1)".into()));
        }
        if (r.index == 1) != (r.prev == GENESIS) {
            return Err(bad("only a chain's first record has the all-zero previous hash".into()));
        }
        if !is_key(&r.event) {
            return Err(bad(format!("event {:?} is not [a-z][a-z0-9_]* of at most {MAX_KEY} bytes", r.event)));
        }
        if r.fields.len() > MAX_FIELDS {
            return Err(bad(format!("{} fields (at most {MAX_FIELDS})", r.fields.len())));
        }
        for (k, v) in &r.fields {
            if !is_key(k) {
                return Err(bad(format!("field {k:?} is not [a-z][a-z0-9_]* of at most {MAX_KEY} bytes")));
            }
            if v.len() > MAX_VALUE {
                return Err(bad(format!("field {k:?} has {} bytes (at most {MAX_VALUE})", v.len())));
            }
        }
        Ok(r)
    }

    /// The value of field `key`.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Whether `frame` is an audit record's (by its first byte).
pub fn is_audit_frame(frame: &[u8]) -> bool {
    frame.first() == Some(&FRAME_AUDIT)
}

fn is_key(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_KEY
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

/// A frame's hash: the next record's `prev`.
pub fn hash(frame: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, frame);
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// What the centre last saw of a device's chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub chain: u64,
    pub index: u64,
    pub hash: [u8; 32],
}

/// How a record fits the chain seen so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// The next record: index one more, `prev` the head's hash.
    Next,
    /// The first record seen of this chain (nothing to compare with).
    First,
    /// Records between the head and this one never arrived (deleted, or
    /// dropped by a full store: the device audits its drops).
    Gap { missing: u64 },
    /// The index follows but `prev` is not the head's hash: the record
    /// before it was edited or replaced.
    Break,
    /// Already seen: the head itself again (a re-send) or an older index.
    Seen,
    /// The head's index with another hash: two different records claim
    /// the same place.
    Fork,
    /// Another chain than the head's: the device began a new one (a new
    /// state directory).
    NewChain,
}

impl Link {
    /// Label of the `fleet_bridge_audit_records_total` result.
    pub fn label(self) -> &'static str {
        match self {
            Link::Next => "next",
            Link::First => "first",
            Link::Gap { .. } => "gap",
            Link::Break => "break",
            Link::Seen => "seen",
            Link::Fork => "fork",
            Link::NewChain => "new_chain",
        }
    }

    /// Whether the record extends the chain (becomes the head). A gap or
    /// break moves the head too, so that one missing record is counted
    /// once, not again with every record after it.
    pub fn advances(self) -> bool {
        !matches!(self, Link::Seen | Link::Fork)
    }
}

/// How `record` (whose frame hashes to `hash`) fits after `head`.
pub fn check(head: Option<&Head>, record: &AuditRecord, hash: &[u8; 32]) -> Link {
    let Some(h) = head else { return Link::First };
    if h.chain != record.chain {
        return Link::NewChain;
    }
    if record.index < h.index {
        return Link::Seen;
    }
    if record.index == h.index {
        return if *hash == h.hash { Link::Seen } else { Link::Fork };
    }
    if record.index > h.index + 1 {
        return Link::Gap { missing: record.index - h.index - 1 };
    }
    if record.prev == h.hash {
        Link::Next
    } else {
        Link::Break
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of lower- or upper-case hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<(AuditRecord, Vec<u8>)> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|index| {
                let r = AuditRecord {
                    chain: 7,
                    index,
                    prev,
                    timestamp_ms: 1_700_000_000_000 + index as i64,
                    event: "config_applied".into(),
                    fields: vec![("source".into(), "file".into())],
                };
                let f = r.encode();
                prev = hash(&f);
                (r, f)
            })
            .collect()
    }

    fn head(r: &AuditRecord, f: &[u8]) -> Head {
        Head { chain: r.chain, index: r.index, hash: hash(f) }
    }

    #[test]
    fn records_round_trip_and_strange_ones_are_refused() {
        let (r, f) = chain(2).pop().unwrap();
        assert_eq!(AuditRecord::decode(&f).unwrap(), r);
        let mut bad = r.clone();
        bad.event = "Config".into();
        assert!(AuditRecord::decode(&bad.encode()).is_err());
        let mut bad = r.clone();
        bad.prev = GENESIS;
        assert!(AuditRecord::decode(&bad.encode()).is_err());
        let mut bad = r.clone();
        bad.fields = (0..17).map(|i| (format!("f{i}"), String::new())).collect();
        assert!(AuditRecord::decode(&bad.encode()).is_err());
        let mut bad = r;
        bad.fields = vec![("detail".into(), "x".repeat(MAX_VALUE + 1))];
        assert!(AuditRecord::decode(&bad.encode()).is_err());
        let mut trailing = f.clone();
        trailing.push(0);
        assert!(AuditRecord::decode(&trailing).is_err());
        assert!(AuditRecord::decode(&f[..f.len() - 1]).is_err());
        assert_eq!(unhex(&hex(&f)).unwrap(), f);
    }

    #[test]
    fn the_check_tells_each_kind_of_damage_apart() {
        let c = chain(5);
        let h = |i: usize| head(&c[i].0, &c[i].1);
        let rec = |i: usize| (&c[i].0, hash(&c[i].1));
        let (r, x) = rec(0);
        assert_eq!(check(None, r, &x), Link::First);
        let (r, x) = rec(1);
        assert_eq!(check(Some(&h(0)), r, &x), Link::Next);
        // Record 3 (index 3) deleted: 4 comes after 2.
        let (r, x) = rec(3);
        assert_eq!(check(Some(&h(1)), r, &x), Link::Gap { missing: 1 });
        // Record 2 (index 2) edited before it was sent: 3 no longer links.
        let mut edited = c[1].0.clone();
        edited.fields[0].1 = "remote".into();
        let edited_head = Head { chain: 7, index: 2, hash: hash(&edited.encode()) };
        let (r, x) = rec(2);
        assert_eq!(check(Some(&edited_head), r, &x), Link::Break);
        // A re-send, an old record, a different record at the head's place.
        let (r, x) = rec(2);
        assert_eq!(check(Some(&h(2)), r, &x), Link::Seen);
        let (r, x) = rec(0);
        assert_eq!(check(Some(&h(2)), r, &x), Link::Seen);
        assert_eq!(check(Some(&edited_head), &c[1].0, &hash(&c[1].1)), Link::Fork);
        let mut other = c[0].0.clone();
        other.chain = 8;
        assert_eq!(check(Some(&h(4)), &other, &hash(&other.encode())), Link::NewChain);
    }
}
