//! Probe program packs (docs/probes.md, "New programs without a new
//! agent"): the probes' kernel objects replaced at run time by a signed
//! pack, tried, and kept only if every probe attached before attaches
//! again; otherwise the box goes back to the programs before by itself.
//!
//! A pack is one message (file or MQTT: `<prefix>/<device>/probes`, or a
//! group's `<prefix>/group/<g>/probes`, retained):
//!
//! ```text
//! "EDGE-PROBES-1\n"
//! u32 BE length, card (JSON: format, version, programs: [{name, sha256}])
//! u32 BE length, signature (Ed25519 of the card's bytes, 64 bytes)
//! per program of the card, in its order: u32 BE length, the object
//! ```
//!
//! A pack arrives in `<state_dir>/probe-programs-drop/pack` (written there
//! by the uplink, or copied there). At the next window it is verified with
//! `probe_programs.public_key_file` (no key: packs are refused), every
//! object against the card's SHA-256, then the probes start again with its
//! objects. Every probe attached before must attach again: then the pack
//! is installed (`<state_dir>/probe-programs/current`, the one before kept
//! as `previous`); else the programs before are put back and the probes
//! started again with them. Each decision is a record of the audit trail
//! and counted (`edge_agent_probe_programs_total{result}`). At start an
//! installed pack is verified again and used; one that no longer verifies
//! is moved aside and the built-in programs run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;

use crate::metrics::ResultLabels;
use crate::probe::objects;
use crate::store::medium::replace_file;

/// How a pack message starts.
pub const MAGIC: &[u8] = b"EDGE-PROBES-1\n";
/// Largest pack taken (as a model message).
pub const MAX_PACK_BYTES: usize = edge_wire::MODEL_MESSAGE_MAX_BYTES;
/// The counter of decisions, also in every window (what a rollout watches).
pub const PROGRAMS_TOTAL: &str = "edge_agent_probe_programs_total";
pub const RESULTS: [&str; 3] = ["installed", "rolled_back", "refused"];
const CARD_FORMAT: &str = "edge-agent-probe-programs";

/// `[probe_programs]`: outside `[probes]`, so that no remote document can
/// change whose packs the box trusts.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProgramsSettings {
    /// The Ed25519 public key (PEM) packs must be signed with; "": packs
    /// are refused.
    pub public_key_file: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Card {
    format: String,
    version: String,
    programs: Vec<CardProgram>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CardProgram {
    name: String,
    sha256: String,
}

/// A verified pack: its version and objects by probe object name.
#[derive(Debug, Clone, PartialEq)]
pub struct Pack {
    pub version: String,
    pub objects: BTreeMap<String, Vec<u8>>,
    /// SHA-256 of the whole message (what is installed).
    pub sha256: String,
}

/// Reads and verifies a pack message with the Ed25519 public `key`.
pub fn verify(message: &[u8], key: &[u8]) -> Result<Pack, String> {
    if message.len() > MAX_PACK_BYTES {
        return Err(format!("{} bytes, more than {MAX_PACK_BYTES}", message.len()));
    }
    let mut rest =
        message.strip_prefix(MAGIC).ok_or("not a probe program pack (it must start with \"EDGE-PROBES-1\\n\")")?;
    let mut part = |what: &str| edge_wire::take_part(&mut rest, "pack", what);
    let card_bytes = part("card")?;
    let signature = part("signature")?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(card_bytes, signature)
        .map_err(|_| "the card's signature does not verify with probe_programs.public_key_file".to_string())?;
    let card: Card = serde_json::from_slice(card_bytes).map_err(|e| format!("the pack's card: {e}"))?;
    if card.format != CARD_FORMAT {
        return Err(format!("the card's format is {:?}, not {CARD_FORMAT:?}", card.format));
    }
    if card.programs.is_empty() {
        return Err("the card names no program".into());
    }
    let mut objects = BTreeMap::new();
    for p in &card.programs {
        if !objects::NAMES.contains(&p.name.as_str()) {
            return Err(format!("the card names {:?}, not one of {:?}", p.name, objects::NAMES));
        }
        let object = part(&p.name)?;
        if crate::detect::sha256_hex(object) != p.sha256.to_ascii_lowercase() {
            return Err(format!("{}: its object does not match the card's sha256", p.name));
        }
        if objects.insert(p.name.clone(), object.to_vec()).is_some() {
            return Err(format!("the card names {:?} twice", p.name));
        }
    }
    if !rest.is_empty() {
        return Err(format!("{} stray bytes after the last program", rest.len()));
    }
    Ok(Pack { version: card.version, objects, sha256: crate::detect::sha256_hex(message) })
}

/// Makes a pack message: the card for `objects` (name, bytes) and its
/// signature with the Ed25519 key (PKCS#8 DER). For tools and tests.
pub fn pack(version: &str, objects: &[(&str, &[u8])], pkcs8: &[u8]) -> Result<Vec<u8>, String> {
    let key = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
        .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
    let programs: Vec<serde_json::Value> =
        objects.iter().map(|(n, o)| serde_json::json!({"name": n, "sha256": crate::detect::sha256_hex(o)})).collect();
    let card =
        serde_json::to_vec(&serde_json::json!({"format": CARD_FORMAT, "version": version, "programs": programs}))
            .map_err(|e| e.to_string())?;
    let signature = key.sign(&card);
    let mut out = MAGIC.to_vec();
    for p in [card.as_slice(), signature.as_ref()].into_iter().chain(objects.iter().map(|(_, o)| *o)) {
        edge_wire::put_part(&mut out, p);
    }
    Ok(out)
}

/// Where the uplink hands pack messages to the stage.
#[derive(Debug, Clone)]
pub struct Inbox {
    file: PathBuf,
}

impl Inbox {
    pub fn put(&self, payload: &[u8]) -> Result<(), String> {
        if payload.len() > MAX_PACK_BYTES {
            return Err(format!("{} bytes, more than {MAX_PACK_BYTES}", payload.len()));
        }
        let dir = self.file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        replace_file(&self.file, payload).map_err(|e| format!("{}: {e}", self.file.display()))
    }
}

/// The stage: the installed packs and the drop file.
pub struct Programs {
    dir: PathBuf,
    drop: PathBuf,
    key: Result<Vec<u8>, String>,
    results: Family<ResultLabels, Counter>,
    trail: std::sync::Arc<crate::audit::Audit>,
}

impl Programs {
    /// Opens the stage and puts the installed pack's objects in force
    /// (before the probes first start).
    pub fn open(
        settings: &ProgramsSettings,
        state_dir: &Path,
        results: Family<ResultLabels, Counter>,
        trail: std::sync::Arc<crate::audit::Audit>,
    ) -> Programs {
        let key = if settings.public_key_file.as_os_str().is_empty() {
            Err("probe program packs need probe_programs.public_key_file; none is set".to_string())
        } else {
            crate::detect::update::read_public_key(&settings.public_key_file)
                .map_err(|e| format!("probe_programs.public_key_file: {e}"))
        };
        let p = Programs {
            dir: state_dir.join("probe-programs"),
            drop: state_dir.join("probe-programs-drop"),
            key,
            results,
            trail,
        };
        let _ = std::fs::create_dir_all(&p.drop);
        p.at_start();
        p
    }

    pub fn inbox(&self) -> Inbox {
        Inbox { file: self.drop.join("pack") }
    }

    fn slot(&self, name: &str) -> PathBuf {
        self.dir.join(name).join("pack")
    }

    /// The installed pack in force, verified again; else the built-in
    /// programs (the pack moved to `failed/`, audited).
    fn at_start(&self) {
        let current = self.slot("current");
        let Ok(message) = std::fs::read(&current) else { return };
        match self.key.as_deref().map_err(Clone::clone).and_then(|k| verify(&message, k)) {
            Ok(pack) => {
                tracing::info!(version = %pack.version, programs = ?pack.objects.keys().collect::<Vec<_>>(), "probe program pack in force");
                objects::install(pack.objects);
            }
            Err(e) => {
                tracing::error!(error = %e, "the installed probe program pack does not verify: the built-in programs run");
                let failed = self.slot("failed");
                let _ = std::fs::create_dir_all(failed.parent().unwrap_or(&self.dir));
                let _ = std::fs::rename(&current, &failed);
                self.decide("rolled_back", "-", &format!("at start: {e}"));
            }
        }
    }

    /// One look at the drop file (every window). `restart` starts the
    /// probes again with the objects in force and returns the probes that
    /// were attached before and are not now.
    pub fn poll(&self, restart: impl FnMut() -> Vec<String>) {
        let file = self.drop.join("pack");
        let Ok(message) = std::fs::read(&file) else { return };
        let _ = std::fs::remove_file(&file);
        let current = std::fs::read(self.slot("current")).ok();
        if current.as_deref() == Some(message.as_slice()) {
            return; // the pack in force (retained: it comes with every connection)
        }
        if std::fs::read(self.dir.join("last_refused")).ok().as_deref()
            == Some(crate::detect::sha256_hex(&message).as_bytes())
        {
            return; // refused once already (retained: it comes again)
        }
        if message == edge_wire::PROBE_PROGRAMS_BUILT_IN {
            return self.built_in(current, restart);
        }
        match self.key.as_deref().map_err(Clone::clone).and_then(|k| verify(&message, k)) {
            Ok(pack) => self.try_pack(pack, &message, current, restart),
            Err(e) => {
                let _ = std::fs::create_dir_all(&self.dir).and_then(|_| {
                    replace_file(&self.dir.join("last_refused"), crate::detect::sha256_hex(&message).as_bytes())
                });
                self.decide("refused", "-", &e);
            }
        }
    }

    /// Back to the built-in programs, on request (not signed: the built-in
    /// programs are trusted; the installed pack is kept as `previous`).
    fn built_in(&self, current: Option<Vec<u8>>, mut restart: impl FnMut() -> Vec<String>) {
        let Some(current) = current else { return };
        objects::install(BTreeMap::new());
        let lost = restart();
        let moved = std::fs::create_dir_all(self.dir.join("previous"))
            .and_then(|_| replace_file(&self.slot("previous"), &current))
            .and_then(|_| std::fs::remove_file(self.slot("current")));
        let mut why = "back to the built-in programs, as asked".to_string();
        if let Err(e) = moved {
            why += &format!(" (the installed pack could not be set aside: {e})");
        }
        if !lost.is_empty() {
            why += &format!("; not attached again: {}", lost.join(", "));
        }
        self.decide("rolled_back", "built-in", &why);
    }

    fn try_pack(&self, pack: Pack, message: &[u8], current: Option<Vec<u8>>, mut restart: impl FnMut() -> Vec<String>) {
        let before: BTreeMap<String, Vec<u8>> = match (&current, &self.key) {
            (Some(c), Ok(k)) => verify(c, k).map(|p| p.objects).unwrap_or_default(),
            _ => BTreeMap::new(),
        };
        objects::install(pack.objects.clone());
        let lost = restart();
        if lost.is_empty() {
            let installed = std::fs::create_dir_all(self.dir.join("current")).and_then(|_| {
                std::fs::create_dir_all(self.dir.join("previous"))?;
                if let Some(c) = &current {
                    replace_file(&self.slot("previous"), c)?;
                }
                replace_file(&self.slot("current"), message)
            });
            match installed {
                Ok(()) => self.decide(
                    "installed",
                    &pack.version,
                    &format!("programs {:?}", pack.objects.keys().collect::<Vec<_>>()),
                ),
                Err(e) => {
                    objects::install(before);
                    restart();
                    self.decide("rolled_back", &pack.version, &format!("attached, but not installed: {e}"));
                }
            }
        } else {
            // The programs before, and the probes again with them.
            objects::install(before);
            let still = restart();
            let _ = std::fs::create_dir_all(&self.dir).and_then(|_| {
                replace_file(&self.dir.join("last_refused"), crate::detect::sha256_hex(message).as_bytes())
            });
            let mut why = format!("probes attached before and not with it: {}", lost.join(", "));
            if !still.is_empty() {
                why += &format!("; not attached again with the programs before either: {}", still.join(", "));
            }
            self.decide("rolled_back", &pack.version, &why);
        }
    }

    /// A decision: audited, then counted, and said.
    fn decide(&self, result: &str, version: &str, detail: &str) {
        tracing::warn!(target: "edge_agent::audit", result, version, detail, "probe program pack");
        self.trail.record(
            &format!("probe_programs_{result}"),
            &[("version", version.to_owned()), ("detail", detail.to_owned())],
        );
        self.results.get_or_create(&ResultLabels { result: result.into() }).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> (Vec<u8>, Vec<u8>) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        use ring::signature::KeyPair;
        (pkcs8.as_ref().to_vec(), kp.public_key().as_ref().to_vec())
    }

    #[test]
    fn a_pack_verifies_only_whole_signed_and_for_known_probes() {
        let (private, public) = key();
        let m = pack("2", &[("tcp_lifecycle", b"obj-a"), ("buses", b"obj-b")], &private).unwrap();
        let p = verify(&m, &public).unwrap();
        assert_eq!(p.version, "2");
        assert_eq!(p.objects["buses"], b"obj-b");
        // Another key, a flipped object byte, a cut, an unknown probe.
        let (_, other) = key();
        assert!(verify(&m, &other).unwrap_err().contains("signature"));
        let mut bad = m.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(verify(&bad, &public).unwrap_err().contains("does not match"));
        assert!(verify(&m[..m.len() - 1], &public).unwrap_err().contains("cut short"));
        let unknown = pack("2", &[("rootkit", b"x")], &private).unwrap();
        assert!(verify(&unknown, &public).unwrap_err().contains("not one of"));
        let mut long = m.clone();
        long.push(0);
        assert!(verify(&long, &public).unwrap_err().contains("stray"));
    }

    /// The stage with a restart that "loses" a probe for one object: a
    /// pack is kept only if every probe attaches again, put back
    /// otherwise, not tried twice; the built-in programs on request.
    /// (The only test of the crate that sets the objects in force: no
    /// other loads a probe.)
    #[test]
    fn a_pack_is_kept_only_if_every_probe_attaches_again() {
        let dir = std::env::temp_dir().join(format!("edge-programs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let signing = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        std::fs::write(dir.join("programs.pub"), signing.public_key_pem()).unwrap();
        let private = signing.serialize_der();
        let audit = crate::audit::for_tests(&dir);
        let settings = ProgramsSettings { public_key_file: dir.join("programs.pub") };
        let p = Programs::open(&settings, &dir, Default::default(), audit);
        let count = |r: &str| p.results.get_or_create(&ResultLabels { result: r.into() }).get();
        let in_force = || objects::object("buses", b"built-in").to_vec();
        let good = pack("2", &[("buses", b"good")], &private).unwrap();
        let bad = pack("3", &[("buses", b"bad")], &private).unwrap();
        // Loses the i2c probe while the bad object is in force.
        let restart = || if in_force() == b"bad" { vec!["i2c".to_string()] } else { vec![] };

        p.inbox().put(&good).unwrap();
        p.poll(restart);
        assert_eq!((count("installed"), in_force()), (1, b"good".to_vec()));
        assert_eq!(std::fs::read(p.slot("current")).unwrap(), good);
        // The pack in force again (retained): nothing happens.
        p.inbox().put(&good).unwrap();
        p.poll(|| panic!("not started again"));
        // Loses a probe: put back, and not tried again.
        p.inbox().put(&bad).unwrap();
        p.poll(restart);
        assert_eq!((count("rolled_back"), in_force()), (1, b"good".to_vec()));
        assert_eq!(std::fs::read(p.slot("current")).unwrap(), good, "the pack before stays installed");
        p.inbox().put(&bad).unwrap();
        p.poll(|| panic!("a pack put back is not tried again"));
        // Not signed with the key: refused, nothing started.
        p.inbox().put(b"EDGE-PROBES-1\n").unwrap();
        p.poll(|| panic!("a refused pack starts nothing"));
        assert_eq!(count("refused"), 1);
        // The built-in programs, on request.
        p.inbox().put(edge_wire::PROBE_PROGRAMS_BUILT_IN).unwrap();
        p.poll(restart);
        assert_eq!((count("rolled_back"), in_force()), (2, b"built-in".to_vec()));
        assert!(!p.slot("current").exists());
        assert_eq!(std::fs::read(p.slot("previous")).unwrap(), good);
        // At a start, a pack that no longer verifies is set aside.
        std::fs::create_dir_all(dir.join("probe-programs/current")).unwrap();
        let mut tampered = good.clone();
        *tampered.last_mut().unwrap() ^= 1;
        std::fs::write(p.slot("current"), &tampered).unwrap();
        let again = Programs::open(&settings, &dir, Default::default(), p.trail.clone());
        assert!(again.slot("failed").exists() && !again.slot("current").exists());
        assert_eq!(in_force(), b"built-in");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
