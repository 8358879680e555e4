//! Model updates without a restart (docs/model.md, "Updates").
//!
//! A new model arrives as files in the drop directory (copied there, or
//! written there by the uplink from the device's MQTT model topic): the
//! card, its .tflite, and the card's Ed25519 signature. It is verified
//! (signature with the configured public key, or the configured SHA-256
//! pin), then loaded and self-tested from a staging copy, and only then
//! replaces the running model; the old one is kept as `previous`. A model
//! that fails any step is refused and the running one stays. `ROLLBACK` in
//! the drop directory (or on the MQTT topic) goes back to `previous`. At
//! start an installed model that no longer loads falls back to `previous`,
//! then to the factory model (`detect.model`). Every change and refusal is
//! a line in `<state_dir>/model/audit.log`.

use super::{Card, Model, ModelError};
use crate::config::DetectConfig;
use crate::store::medium::replace_file;
use std::path::{Path, PathBuf};

pub const CARD: &str = "anomaly.card.json";
pub const SIGNATURE: &str = "anomaly.card.json.sig";
pub const ROLLBACK_FILE: &str = "ROLLBACK";
/// An MQTT model message: this line, then the card, the signature and the
/// model, each as a 4-byte big-endian length and its bytes.
pub const BUNDLE_MAGIC: &[u8] = edge_wire::MODEL_MESSAGE_MAGIC;
/// An MQTT message asking for the previous model.
pub const ROLLBACK_MESSAGE: &[u8] = edge_wire::MODEL_ROLLBACK;
/// Largest model message accepted.
pub const MAX_BUNDLE_BYTES: usize = edge_wire::MODEL_MESSAGE_MAX_BYTES;

/// How a change came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Start,
    Drop,
}

/// A model message's parts.
#[derive(Debug)]
pub struct Bundle<'a> {
    pub card: &'a [u8],
    pub signature: &'a [u8],
    pub model: &'a [u8],
}

/// Splits an MQTT model message; `None` for a rollback request.
pub fn unpack(payload: &[u8]) -> Result<Option<Bundle<'_>>, String> {
    if payload == ROLLBACK_MESSAGE {
        return Ok(None);
    }
    let mut rest = payload
        .strip_prefix(BUNDLE_MAGIC)
        .ok_or("not a model message (it must start with \"EDGE-MODEL-1\\n\", or be \"EDGE-MODEL-ROLLBACK\\n\")")?;
    let mut part = |what: &str| edge_wire::take_part(&mut rest, "model message", what);
    let b = Bundle { card: part("card")?, signature: part("signature")?, model: part("model")? };
    if !rest.is_empty() {
        return Err(format!("{} stray bytes after the model", rest.len()));
    }
    Ok(Some(b))
}

pub fn pack(card: &[u8], signature: &[u8], model: &[u8]) -> Vec<u8> {
    let mut v = BUNDLE_MAGIC.to_vec();
    for p in [card, signature, model] {
        edge_wire::put_part(&mut v, p);
    }
    v
}

/// Renames in `dir` made durable; best effort (a failure shows at the
/// next write into it).
fn sync_dir(dir: &Path) {
    let _ = crate::store::medium::sync_dir(dir);
}

/// Where the uplink hands model messages to the detect stage: its drop
/// directory, which only this stage names. The uplink holds one when
/// model updates are on.
#[derive(Debug, Clone)]
pub struct Inbox {
    dir: PathBuf,
}

impl Inbox {
    /// The inbox of `detect` (None: detection is off, no models come).
    pub fn of(cfg: &crate::config::DetectConfig, state_dir: &Path) -> Option<Inbox> {
        cfg.enabled.then(|| Inbox { dir: cfg.drop_dir(state_dir) })
    }

    /// Takes a model message (a model or a rollback); the stage verifies
    /// and installs it at its next window.
    pub fn put(&self, payload: &[u8]) -> Result<(), String> {
        drop_message(&self.dir, payload)
    }
}

/// Writes a model message into the drop directory: the model and the
/// signature first, the card (what the detect stage looks for) last.
pub fn drop_message(drop_dir: &Path, payload: &[u8]) -> Result<(), String> {
    std::fs::create_dir_all(drop_dir).map_err(|e| format!("{}: {e}", drop_dir.display()))?;
    let io = |e: std::io::Error| format!("cannot write into {}: {e}", drop_dir.display());
    match unpack(payload)? {
        None => replace_file(&drop_dir.join(ROLLBACK_FILE), b"").map_err(io)?,
        Some(b) => {
            let card: Card = serde_json::from_slice(b.card).map_err(|e| format!("the message's card: {e}"))?;
            plain_name(&card.model_file)?;
            replace_file(&drop_dir.join(&card.model_file), b.model).map_err(io)?;
            replace_file(&drop_dir.join(SIGNATURE), b.signature).map_err(io)?;
            replace_file(&drop_dir.join(CARD), b.card).map_err(io)?;
        }
    }
    Ok(())
}

/// A card's model file must be a plain name in the card's directory.
pub fn plain_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(format!("model_file {name:?} must be a plain file name next to the card"))
    }
}

/// An Ed25519 public key from a PEM file (`openssl pkey -pubout`), read by
/// rustls' PEM parser.
pub fn read_public_key(path: &Path) -> Result<Vec<u8>, String> {
    use rustls::pki_types::{pem::PemObject, SubjectPublicKeyInfoDer};
    const MAKE_ONE: &str =
        "make one with: openssl genpkey -algorithm ed25519 -out key.pem; openssl pkey -in key.pem -pubout -out key.pub";
    let spki = SubjectPublicKeyInfoDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::Io(e) => format!("{}: {e}", path.display()),
        e => format!("{}: no PEM public key in it ({e:?}; {MAKE_ONE})", path.display()),
    })?;
    // SubjectPublicKeyInfo of Ed25519 (RFC 8410): a fixed 12-byte prefix.
    const PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    match spki.strip_prefix(&PREFIX[..]) {
        Some(key) if key.len() == 32 => Ok(key.to_vec()),
        _ => Err(format!("{}: not an Ed25519 public key ({MAKE_ONE})", path.display())),
    }
}

/// What the manager did at a poll.
pub enum Change {
    /// A new model runs (and the old one is `previous`).
    Installed(Box<Model>),
    /// Back to the previous (or factory) model.
    RolledBack(Option<Box<Model>>),
    Refused(String),
}

/// The installed models and the drop directory.
pub struct Updates {
    pub drop_dir: PathBuf,
    dir: PathBuf,
    key: Option<Vec<u8>>,
    key_error: Option<String>,
    pin: String,
    factory: PathBuf,
    /// The last refused card (modified time, size), when it could not be
    /// moved out of the way: not tried again until it changes.
    refused: Option<(std::time::SystemTime, u64)>,
    /// The audit trail each decision also goes to (set after the start:
    /// the model the agent starts with is in its `agent_started` record).
    pub trail: Option<std::sync::Arc<crate::audit::Audit>>,
}

impl Updates {
    pub fn new(cfg: &DetectConfig, state_dir: &Path) -> Updates {
        let (key, key_error) = if cfg.update_public_key_file.as_os_str().is_empty() {
            (None, None)
        } else {
            match read_public_key(&cfg.update_public_key_file) {
                Ok(k) => (Some(k), None),
                Err(e) => (None, Some(e)),
            }
        };
        let drop_dir = cfg.drop_dir(state_dir);
        // Created by the agent (after it gave up root): its own to write.
        if let Err(e) = std::fs::create_dir_all(&drop_dir) {
            tracing::warn!(dir = %drop_dir.display(), error = %e, "model drop directory not created: no updates by file or MQTT");
        }
        Updates {
            drop_dir,
            dir: state_dir.join("model"),
            key,
            key_error,
            pin: cfg.model_sha256.clone(),
            factory: cfg.model.clone(),
            refused: None,
            trail: None,
        }
    }

    pub fn current_card(&self) -> PathBuf {
        self.dir.join("current").join(CARD)
    }

    /// The model to run at start: the installed one, else the previous,
    /// else the factory model; each failure audited. An installed model
    /// that fails moves to `model/failed/` and the previous one becomes
    /// current, so that `current` is always what runs.
    pub fn load_at_start(&self) -> Result<Model, ModelError> {
        let (current, previous) = (self.dir.join("current"), self.dir.join("previous"));
        for slot in [&current, &previous] {
            let card = slot.join(CARD);
            if !card.exists() {
                continue;
            }
            match Model::load(&card, Some(&self.pin)) {
                Ok(mut m) => {
                    if slot == &previous {
                        if std::fs::rename(&previous, &current).is_ok() {
                            m.card_path = current.join(CARD);
                        }
                        sync_dir(&self.dir);
                        self.audit(
                            "rolled_back",
                            &m.sha256,
                            &m.card.name,
                            Source::Start,
                            "the installed model failed to load",
                        );
                    }
                    return Ok(m);
                }
                Err(e) => {
                    let name = slot.file_name().and_then(|n| n.to_str()).unwrap_or("?");
                    self.audit("refused", "-", name, Source::Start, &e.to_string());
                    tracing::error!(error = %e, slot = name, "installed anomaly model does not load; trying the next one");
                    let failed = self.dir.join("failed");
                    let _ = std::fs::remove_dir_all(&failed);
                    let _ = std::fs::rename(slot, &failed);
                }
            }
        }
        Model::load(&self.factory, Some(&self.pin))
    }

    /// Looks at the drop directory once (every window): a rollback request,
    /// or a complete new model.
    pub fn poll(&mut self, running: Option<&Model>) -> Option<Change> {
        if self.drop_dir.join(ROLLBACK_FILE).exists() {
            let _ = std::fs::remove_file(self.drop_dir.join(ROLLBACK_FILE));
            return Some(self.rollback(running));
        }
        let card_path = self.drop_dir.join(CARD);
        let stamp =
            std::fs::metadata(&card_path).ok().map(|m| (m.modified().unwrap_or(std::time::UNIX_EPOCH), m.len()));
        if stamp.is_none() || stamp == self.refused {
            return None;
        }
        // A refused model that comes again (retained on the MQTT topic, at
        // every connection) is dropped without another refusal.
        // (Card and signature: a signed copy of a card refused unsigned is new.)
        // Read once: what is hashed here is what is verified and installed.
        let card_bytes = match std::fs::read(&card_path) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(path = %card_path.display(), error = %e, "dropped model card cannot be read");
                self.refused = stamp;
                return None;
            }
        };
        let signature = std::fs::read(self.drop_dir.join(SIGNATURE)).ok();
        let mut drop = card_bytes.clone();
        drop.extend(signature.as_deref().unwrap_or_default());
        let card_sha = super::sha256_hex(&drop);
        let last_refused = self.dir.join("last_refused");
        if std::fs::read_to_string(&last_refused).is_ok_and(|s| s.trim() == card_sha) {
            tracing::debug!("the model refused last time came again; ignored");
            self.clear_drop();
            return None;
        }
        let change = match self.install(&card_path, &card_bytes, signature.as_deref(), running) {
            Ok(None) => return None,
            Ok(Some(m)) => Change::Installed(Box::new(m)),
            Err(e) => {
                let why = e.clone();
                self.audit("refused", "-", "-", Source::Drop, &why);
                let _ =
                    std::fs::create_dir_all(&self.dir).and_then(|_| replace_file(&last_refused, card_sha.as_bytes()));
                // Kept for a look, out of the way of the next drop.
                let rejected = self.drop_dir.join("rejected");
                let _ = std::fs::remove_dir_all(&rejected);
                let moved = std::fs::create_dir_all(&rejected).and_then(|_| {
                    for e in std::fs::read_dir(&self.drop_dir)?.flatten() {
                        if e.path().is_file() {
                            std::fs::rename(e.path(), rejected.join(e.file_name()))?;
                        }
                    }
                    Ok(())
                });
                if let Err(e) = moved {
                    tracing::error!(
                        dir = %self.drop_dir.display(),
                        error = %e,
                        "cannot move the refused model aside (is the drop directory the agent's to write?); \
                         it is not tried again until its card changes"
                    );
                    self.refused = stamp;
                }
                Change::Refused(why)
            }
        };
        Some(change)
    }

    /// `None`: the dropped model is the running one (a retained MQTT model
    /// comes again with every connection): nothing to do.
    fn install(
        &self,
        card_path: &Path,
        card_bytes: &[u8],
        signature: Option<&[u8]>,
        running: Option<&Model>,
    ) -> Result<Option<Model>, String> {
        let card: Card = serde_json::from_slice(card_bytes)
            .map_err(|e| format!("{}: not a model card ({e})", card_path.display()))?;
        plain_name(&card.model_file)?;
        let model_bytes = std::fs::read(self.drop_dir.join(&card.model_file))
            .map_err(|e| format!("the dropped card names {}, which cannot be read: {e}", card.model_file))?;
        // Verified before anything is loaded.
        match (&self.key, &self.key_error) {
            (_, Some(e)) => return Err(format!("detect.update_public_key_file: {e}")),
            (Some(key), None) => {
                let sig = signature
                    .ok_or_else(|| format!("no signature {SIGNATURE} with the card: updates must be signed"))?;
                ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
                    .verify(card_bytes, sig)
                    .map_err(|_| {
                        "the card's signature does not verify with detect.update_public_key_file".to_string()
                    })?;
            }
            (None, None) if self.pin.is_empty() => {
                return Err("updates need detect.update_public_key_file (signed cards) or detect.model_sha256 \
                            (one approved model); neither is set"
                    .into())
            }
            (None, None) => {} // the pin is checked by Model::load
        }
        if super::sha256_hex(&model_bytes) != card.model_sha256.to_ascii_lowercase() {
            return Err(format!("{} does not match the card's model_sha256", card.model_file));
        }
        if running.is_some_and(|m| m.sha256 == card.model_sha256.to_ascii_lowercase()) {
            for f in [CARD, SIGNATURE, card.model_file.as_str()] {
                let _ = std::fs::remove_file(self.drop_dir.join(f));
            }
            return Ok(None);
        }
        // Staged, loaded and self-tested there; only then swapped in.
        let staging = self.dir.join("staging");
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
        let io = |e: std::io::Error| format!("cannot stage the model in {}: {e}", staging.display());
        replace_file(&staging.join(&card.model_file), &model_bytes).map_err(io)?;
        replace_file(&staging.join(CARD), card_bytes).map_err(io)?;
        let mut m = Model::load(&staging.join(CARD), Some(&self.pin)).map_err(|e| e.to_string())?;
        let (current, previous) = (self.dir.join("current"), self.dir.join("previous"));
        if current.exists() {
            let _ = std::fs::remove_dir_all(&previous);
            std::fs::rename(&current, &previous).map_err(|e| format!("cannot keep the old model: {e}"))?;
        } else if let Some(r) = running {
            // The factory model becomes `previous` (a copy: the factory
            // files stay where they are).
            copy_model(&r.card_path, &previous)?;
        }
        std::fs::rename(&staging, &current).map_err(|e| format!("cannot install the model: {e}"))?;
        sync_dir(&self.dir);
        for f in [CARD, SIGNATURE, card.model_file.as_str()] {
            let _ = std::fs::remove_file(self.drop_dir.join(f));
        }
        m.card_path = current.join(CARD);
        self.audit(
            "installed",
            &m.sha256,
            &m.card.name,
            Source::Drop,
            &format!("replaces {}", running.map_or("no model", |r| r.sha256.as_str())),
        );
        Ok(Some(m))
    }

    fn rollback(&self, running: Option<&Model>) -> Change {
        let (current, previous) = (self.dir.join("current"), self.dir.join("previous"));
        let target = if previous.join(CARD).exists() { previous.join(CARD) } else { self.factory.clone() };
        let m = match Model::load(&target, Some(&self.pin)) {
            Ok(m) => m,
            Err(e) => {
                let why = format!("rollback refused: {e}");
                self.audit("refused", "-", "-", Source::Drop, &why);
                return Change::Refused(why);
            }
        };
        // previous <-> current.
        let swap = self.dir.join("swap");
        let _ = std::fs::remove_dir_all(&swap);
        let mut m = m;
        if previous.exists() {
            let _ = std::fs::rename(&current, &swap);
            let _ = std::fs::rename(&previous, &current);
            let _ = std::fs::rename(&swap, &previous);
            m.card_path = current.join(CARD);
        } else {
            let _ = std::fs::remove_dir_all(&current);
        }
        sync_dir(&self.dir);
        self.audit(
            "rolled_back",
            &m.sha256,
            &m.card.name,
            Source::Drop,
            &format!("replaces {}", running.map_or("no model", |r| r.sha256.as_str())),
        );
        Change::RolledBack(Some(Box::new(m)))
    }

    fn clear_drop(&self) {
        for e in std::fs::read_dir(&self.drop_dir).into_iter().flatten().flatten() {
            if e.path().is_file() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// One line per change or refusal, synced (docs/model.md).
    fn audit(&self, event: &str, sha256: &str, name: &str, source: Source, detail: &str) {
        let line = format!(
            "{} {event} sha256={sha256} name={name:?} source={} detail={detail:?}\n",
            crate::store::tools::rfc3339(crate::now_ms()),
            match source {
                Source::Start => "start",
                Source::Drop => "drop",
            }
        );
        tracing::warn!(target: "edge_agent::audit", "{}", line.trim_end());
        if let Some(trail) = &self.trail {
            let source = match source {
                Source::Start => "start",
                Source::Drop => "drop",
            };
            let fields = [
                ("sha256", sha256.to_owned()),
                ("name", name.to_owned()),
                ("source", source.to_owned()),
                ("detail", detail.to_owned()),
            ];
            trail.record(&format!("model_{event}"), &fields);
        }
        let path = self.dir.join("audit.log");
        let r = std::fs::create_dir_all(&self.dir).and_then(|_| {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
            std::io::Write::write_all(&mut f, line.as_bytes())?;
            f.sync_data()
        });
        if let Err(e) = r {
            tracing::error!(error = %e, path = %path.display(), "audit line not written");
        }
    }
}

fn copy_model(card: &Path, to: &Path) -> Result<(), String> {
    let c = Card::read(card).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(to).map_err(|e| e.to_string())?;
    let io = |e: std::io::Error| format!("cannot copy the running model to {}: {e}", to.display());
    std::fs::copy(c.model_path(card), to.join(&c.model_file)).map_err(io)?;
    std::fs::copy(card, to.join(CARD)).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_round_trip_and_reject_damage() {
        let p = pack(b"{card}", &[7u8; 64], b"model bytes");
        let b = unpack(&p).unwrap().unwrap();
        assert_eq!((b.card, b.signature.len(), b.model), (&b"{card}"[..], 64, &b"model bytes"[..]));
        assert!(unpack(ROLLBACK_MESSAGE).unwrap().is_none());
        assert!(unpack(&p[..p.len() - 1]).unwrap_err().contains("cut short"));
        let mut extra = p.clone();
        extra.push(0);
        assert!(unpack(&extra).unwrap_err().contains("stray"));
        assert!(unpack(b"hello").unwrap_err().contains("not a model message"));
    }

    #[test]
    fn model_file_names_stay_in_their_directory() {
        assert!(plain_name("anomaly.tflite").is_ok());
        for bad in ["", "..", "../x.tflite", "/etc/passwd", "a/b"] {
            assert!(plain_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn public_keys_are_ed25519_spki_pem_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("edge-pubkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let read = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            read_public_key(&p)
        };
        let pem = |body: &str| format!("-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n");
        // openssl genpkey -algorithm ed25519 | openssl pkey -pubout
        let good = "MCowBQYDK2VwAyEAOau/MJpQTRj1RLH/x6QbMl61g8kjWChLsr1irmyj03A=";
        let key = read("good.pub", &format!("a comment before\n{}", pem(good))).unwrap();
        assert_eq!(key.len(), 32);
        assert_eq!(&key[..4], &[0x39, 0xab, 0xbf, 0x30]);
        // One character short: a base64 body of a bad length, refused.
        let e = read("short.pub", &pem(&good[..good.len() - 2])).unwrap_err();
        assert!(e.contains("short.pub") && e.contains("openssl genpkey"), "{e}");
        // Not base64.
        assert!(read("junk.pub", &pem("MCow*QYDK2VwAyEA")).is_err());
        // X25519 is not Ed25519.
        let e = read("x25519.pub", &pem("MCowBQYDK2VuAyEAYhWKMXRAo/Ry4qFmfsnv+USIh3ywnvnTsllyAnkyRRM=")).unwrap_err();
        assert!(e.contains("not an Ed25519 public key"), "{e}");
        // A private key or nothing at all: no public key in it.
        assert!(read(
            "private.pem",
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIA==\n-----END PRIVATE KEY-----\n"
        )
        .unwrap_err()
        .contains("no PEM public key"));
        assert!(read("empty.pub", "").unwrap_err().contains("no PEM public key"));
        assert!(read_public_key(&dir.join("missing.pub")).unwrap_err().contains("missing.pub"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
