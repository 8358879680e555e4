//! Remote configuration (docs/remote-config.md): documents for this device
//! or its groups arrive over MQTT (retained; edge_wire::config_doc), each a
//! TOML overlay of `[probes]` and `[mqtt]` on top of the local file. A
//! document is checked (target, signature or the broker's ACL, not older
//! than the one it replaces), merged and validated with the same code as
//! the local file, refused if it would touch the box's identity or trust,
//! then applied through the reload path and kept only if a block recorded
//! after it is confirmed end to end within `deadline_secs`; otherwise the
//! agent goes back to the layers it had, by itself, and says why. Every
//! step is audited.
//!
//! On disk, under `<state_dir>/remote/`: `inbox/` (the uplink's drop
//! place: one file per topic, the latest message), `layers/<target>.doc`
//! (the applied documents, as received), `trial` (the one being tried:
//! what to go back to, and until when), `refused` (documents refused or
//! reverted, by SHA-256: a retained message is not tried again).

use edge_wire::config_doc::{ConfigDoc, Received};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The `[remote_config]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteSettings {
    /// Take documents at all (off unless set).
    pub enabled: bool,
    /// Groups this box belongs to: documents on `<prefix>/group/<g>/config`
    /// apply in this order, the device's own document last.
    pub groups: Vec<String>,
    /// An Ed25519 public key (PEM): every document must be signed by it.
    /// "" trusts the broker's ACL alone (only the operators' identity may
    /// publish on the config topics).
    pub public_key_file: PathBuf,
    /// How long an applied document has to prove itself: a block recorded
    /// after it confirmed end to end (10 .. 86400).
    pub deadline_secs: u64,
}

impl Default for RemoteSettings {
    fn default() -> Self {
        RemoteSettings { enabled: false, groups: Vec::new(), public_key_file: PathBuf::new(), deadline_secs: 300 }
    }
}

impl RemoteSettings {
    pub fn validate(&self) -> Result<(), String> {
        if !(10..=86_400).contains(&self.deadline_secs) {
            return Err("remote_config.deadline_secs must be 10 .. 86400".into());
        }
        if let Some(g) = self.groups.iter().find(|g| !edge_wire::config_doc::is_group(g)) {
            return Err(format!("remote_config.groups: {g:?} is not a group name (as a device id)"));
        }
        if self.groups.len() > 16 {
            return Err("remote_config.groups: at most 16".into());
        }
        Ok(())
    }
}

/// The counter of documents by result, also sent with every window.
pub const CONFIGS_TOTAL: &str = "edge_agent_remote_configs_total";
/// Its results.
pub const RESULTS: [&str; 4] = ["applied", "kept", "reverted", "refused"];

/// Sections a document may set; within `[mqtt]` not these keys.
const SETTABLE: [&str; 2] = ["probes", "mqtt"];
const MQTT_FIXED: [&str; 3] = ["tls", "auth", "client_id"];

/// The overlay's keys that a document may not set, if any.
fn forbidden(overlay: &toml::Table) -> Option<String> {
    if let Some(k) = overlay.keys().find(|k| !SETTABLE.contains(&k.as_str())) {
        return Some(format!(
            "it sets {k:?}: a remote document may set only [probes] and [mqtt] (the identity, trust, state \
             directory and the sections that apply at a restart stay the local file's)"
        ));
    }
    if let Some(toml::Value::Table(m)) = overlay.get("mqtt") {
        if let Some(k) = m.keys().find(|k| MQTT_FIXED.contains(&k.as_str())) {
            return Some(format!("it sets mqtt.{k}: TLS, credentials and the client id stay the local file's"));
        }
    }
    None
}

/// `over` merged into `base`: tables key by key, anything else replaced.
fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// A stored or received document.
#[derive(Debug, Clone)]
pub struct Layer {
    pub received: Received,
    pub payload: Vec<u8>,
}

impl Layer {
    pub fn sha256(&self) -> String {
        crate::audit::sha256_hex(&self.payload)
    }
}

/// The effective configuration: the local file's text with `layers` over
/// it, parsed and validated as the local file is.
pub fn effective(local_text: &str, origin: &Path, layers: &[Layer]) -> Result<crate::config::Config, String> {
    let mut table: toml::Table = toml::from_str(local_text).map_err(|e| format!("{}: {e}", origin.display()))?;
    for l in layers {
        let over: toml::Table =
            toml::from_str(&l.received.doc.toml).map_err(|e| format!("document {:?}: {e}", l.received.doc.id))?;
        if let Some(why) = forbidden(&over) {
            return Err(format!("document {:?}: {why}", l.received.doc.id));
        }
        merge(&mut table, &over);
    }
    let text = toml::to_string(&table).map_err(|e| e.to_string())?;
    let cfg = crate::config::Config::parse(&text, origin).map_err(|e| e.to_string())?;
    cfg.validate()?;
    Ok(cfg)
}

/// What is being tried, persisted so a restart goes on with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// The layer file tried (`device` or `group-<g>`) and what it held
    /// before (hex of the payload; "" none).
    pub layer: String,
    pub previous: String,
    pub id: String,
    pub sha256: String,
    /// Wall clock when it applied, and the deadline (ms).
    pub applied_ms: i64,
    pub deadline_ms: i64,
    /// Healthy once the routine lane's confirmed position reaches this
    /// record (the first recorded after it applied).
    pub since_seq: u64,
}

/// What the stage decided at a poll.
#[derive(Debug)]
pub enum Step {
    /// Nothing to do.
    Idle,
    /// New layers: apply `config` (reload path); a trial began.
    Apply(Box<crate::config::Config>),
    /// The trial's document proved itself.
    Kept,
    /// Back to the layers before the trial: apply `config`.
    Revert(Box<crate::config::Config>),
}

/// The remote configuration stage's state on disk and its decisions.
pub struct Remote {
    dir: PathBuf,
    device: String,
    settings: RemoteSettings,
    key: Option<Vec<u8>>,
    local: PathBuf,
    pub trial: Option<Trial>,
    audit: std::sync::Arc<crate::audit::Audit>,
    counts: crate::metrics::ResultCounts,
}

fn hex(b: &[u8]) -> String {
    edge_wire::audit::hex(b)
}

impl Remote {
    /// The stage of `state_dir`; `local`: the config file (remote
    /// documents need one: their floor).
    pub fn open(
        cfg: &crate::config::Config,
        local: PathBuf,
        audit: std::sync::Arc<crate::audit::Audit>,
        counts: crate::metrics::ResultCounts,
    ) -> Result<Remote, String> {
        let s = &cfg.remote_config;
        let key = if s.public_key_file.as_os_str().is_empty() {
            None
        } else {
            Some(crate::detect::update::read_public_key(&s.public_key_file)?)
        };
        let dir = cfg.state_dir.join("remote");
        for d in [dir.join("inbox"), dir.join("layers")] {
            std::fs::create_dir_all(&d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let trial = std::fs::read(dir.join("trial")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        Ok(Remote { dir, device: cfg.device_id.clone(), settings: s.clone(), key, local, trial, audit, counts })
    }

    /// The inbox the uplink writes documents into.
    pub fn inbox(&self) -> Inbox {
        Inbox { dir: self.dir.join("inbox") }
    }

    /// The layer files, in the order they apply: groups, then the device.
    fn layer_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.settings.groups.iter().map(|g| format!("group-{g}")).collect();
        v.push("device".into());
        v
    }

    /// The applied layers, read back (a damaged one is left out, said).
    pub fn layers(&self) -> Vec<Layer> {
        self.layer_names().iter().filter_map(|n| self.read_layer(n)).collect()
    }

    fn read_layer(&self, name: &str) -> Option<Layer> {
        let payload = std::fs::read(self.dir.join("layers").join(format!("{name}.doc"))).ok()?;
        match ConfigDoc::decode(&payload) {
            Ok(received) => Some(Layer { received, payload }),
            Err(e) => {
                tracing::error!(layer = name, error = %e, "remote config layer unreadable: left out");
                None
            }
        }
    }

    /// The configuration to run: the local file with the applied layers;
    /// the local file alone when they no longer fit it (said, audited).
    pub fn effective(&self) -> Result<crate::config::Config, String> {
        let text = std::fs::read_to_string(&self.local).map_err(|e| format!("{}: {e}", self.local.display()))?;
        let layers = self.layers();
        match effective(&text, &self.local, &layers) {
            Ok(c) => Ok(c),
            Err(e) if !layers.is_empty() => {
                tracing::error!(error = %e, "remote config layers do not fit the local file: running the local file alone");
                self.audit.record("config_refused", &[("source", "remote".into()), ("error", e)]);
                effective(&text, &self.local, &[])
            }
            Err(e) => Err(e),
        }
    }

    fn refused_before(&self, sha: &str) -> bool {
        std::fs::read_to_string(self.dir.join("refused")).unwrap_or_default().lines().any(|l| l == sha)
    }

    fn remember_refused(&self, sha: &str) {
        use std::io::Write;
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("refused"))
            .and_then(|mut f| writeln!(f, "{sha}"));
        if let Err(e) = r {
            tracing::warn!(error = %e, "refused document not remembered: it may be tried again");
        }
    }

    fn refuse(&self, layer: Option<&Layer>, why: String) {
        self.count("refused");
        let (id, sha) = layer.map_or(("-".into(), "-".into()), |l| (l.received.doc.id.clone(), l.sha256()));
        if sha != "-" {
            self.remember_refused(&sha);
        }
        tracing::error!(id, error = %why, "remote config refused");
        self.audit
            .record("config_refused", &[("source", "remote".into()), ("id", id), ("sha256", sha), ("error", why)]);
    }

    fn count(&self, result: &str) {
        self.counts.get_or_create(&crate::metrics::ResultLabels { result: result.into() }).inc();
    }

    fn save_trial(&self) {
        let path = self.dir.join("trial");
        let r = match &self.trial {
            Some(t) => crate::store::medium::replace_file(&path, &serde_json::to_vec(t).unwrap_or_default()),
            None => remove_if_present(&path),
        };
        if let Err(e) = r {
            tracing::error!(error = %e, path = %path.display(), "remote config trial state not saved");
        }
    }

    /// One look: the trial's health (`confirmed`: the routine lane's
    /// confirmed position; `next_seq`: its next record), else a new
    /// document from the inbox.
    pub fn poll(&mut self, now_ms: i64, confirmed: u64, next_seq: u64) -> Step {
        if let Some(t) = self.trial.clone() {
            if confirmed >= t.since_seq {
                self.trial = None;
                self.save_trial();
                self.count("kept");
                let secs = ((now_ms - t.applied_ms) / 1000).to_string();
                tracing::info!(id = t.id, secs, "remote config kept: a block recorded after it was confirmed");
                self.audit.record(
                    "config_kept",
                    &[("id", t.id), ("sha256", t.sha256), ("layer", t.layer), ("after_secs", secs)],
                );
                return Step::Kept;
            }
            if now_ms < t.deadline_ms {
                return Step::Idle;
            }
            return self.revert(t);
        }
        for name in self.layer_names() {
            let path = self.dir.join("inbox").join(&name);
            let Ok(payload) = std::fs::read(&path) else { continue };
            let _ = std::fs::remove_file(&path);
            if let Some(step) = self.take(&name, payload, now_ms, next_seq) {
                return step;
            }
        }
        Step::Idle
    }

    /// A document for layer `name`: refused, or applied as a trial.
    fn take(&mut self, name: &str, payload: Vec<u8>, now_ms: i64, next_seq: u64) -> Option<Step> {
        let current = self.read_layer(name);
        // An empty message clears a retained topic: nothing to apply (a
        // layer goes with a document whose TOML is empty).
        if payload.is_empty() || current.as_ref().is_some_and(|c| c.payload == payload) {
            return None; // the retained copy of what runs
        }
        let sha = crate::audit::sha256_hex(&payload);
        if self.refused_before(&sha) {
            return None;
        }
        let received = match ConfigDoc::decode(&payload) {
            Ok(r) => r,
            Err(e) => {
                self.remember_refused(&sha);
                self.refuse(None, format!("not a config document: {e}"));
                return None;
            }
        };
        let layer = Layer { received, payload };
        let want =
            if name == "device" { format!("device:{}", self.device) } else { name.replacen("group-", "group:", 1) };
        if layer.received.doc.target != want {
            self.refuse(Some(&layer), format!("it is for {:?}, not {want:?}", layer.received.doc.target));
            return None;
        }
        if let Some(key) = &self.key {
            if let Err(e) = layer.received.verify(key) {
                self.refuse(Some(&layer), e);
                return None;
            }
        }
        if let Some(c) = &current {
            if layer.received.doc.issued_ms < c.received.doc.issued_ms {
                self.refuse(Some(&layer), format!("older than the applied {:?}", c.received.doc.id));
                return None;
            }
        }
        // The layers with this one in its place, checked as a whole.
        let layers: Vec<Layer> = self
            .layer_names()
            .iter()
            .filter_map(|n| if n == name { Some(layer.clone()) } else { self.read_layer(n) })
            .collect();
        let text = match std::fs::read_to_string(&self.local) {
            Ok(t) => t,
            Err(e) => {
                self.refuse(Some(&layer), format!("the local file {}: {e}", self.local.display()));
                return None;
            }
        };
        let cfg = match effective(&text, &self.local, &layers) {
            Ok(c) => c,
            Err(e) => {
                self.refuse(Some(&layer), e);
                return None;
            }
        };
        let file = self.dir.join("layers").join(format!("{name}.doc"));
        if let Err(e) = crate::store::medium::replace_file(&file, &layer.payload) {
            self.refuse(Some(&layer), format!("cannot keep it: {}: {e}", file.display()));
            return None;
        }
        let deadline = self.settings.deadline_secs as i64 * 1000;
        let t = Trial {
            layer: name.into(),
            previous: current.as_ref().map_or(String::new(), |c| hex(&c.payload)),
            id: layer.received.doc.id.clone(),
            sha256: layer.sha256(),
            applied_ms: now_ms,
            deadline_ms: now_ms + deadline,
            since_seq: next_seq,
        };
        self.count("applied");
        tracing::info!(
            id = t.id,
            layer = name,
            deadline_secs = self.settings.deadline_secs,
            "remote config applied: on trial"
        );
        self.audit.record(
            "config_applied",
            &[
                ("source", "remote".into()),
                ("id", t.id.clone()),
                ("layer", name.into()),
                ("sha256", t.sha256.clone()),
                ("previous_sha256", current.map_or("-".into(), |c| c.sha256())),
                ("deadline_secs", self.settings.deadline_secs.to_string()),
            ],
        );
        self.trial = Some(t);
        self.save_trial();
        Some(Step::Apply(Box::new(cfg)))
    }

    /// The trial's document did not prove itself: its layer goes back to
    /// what it held, the document is not tried again.
    fn revert(&mut self, t: Trial) -> Step {
        let file = self.dir.join("layers").join(format!("{}.doc", t.layer));
        let restored = match edge_wire::audit::unhex(&t.previous) {
            Some(prev) if !prev.is_empty() => crate::store::medium::replace_file(&file, &prev),
            _ => remove_if_present(&file),
        };
        if let Err(e) = restored {
            tracing::error!(error = %e, path = %file.display(), "remote config layer not restored");
        }
        self.remember_refused(&t.sha256);
        self.trial = None;
        self.save_trial();
        self.count("reverted");
        let why = format!("no block recorded after it was confirmed within {} s", self.settings.deadline_secs);
        tracing::error!(id = t.id, why, "remote config reverted");
        self.audit
            .record("config_reverted", &[("id", t.id), ("layer", t.layer), ("sha256", t.sha256), ("reason", why)]);
        match self.effective() {
            Ok(c) => Step::Revert(Box::new(c)),
            Err(e) => {
                tracing::error!(error = %e, "the configuration to go back to does not load: keeping the running one");
                Step::Idle
            }
        }
    }
}

/// Removes `path`; one that is not there is no error.
fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Where the uplink leaves configuration messages: one file per topic.
#[derive(Debug, Clone)]
pub struct Inbox {
    dir: PathBuf,
}

impl Inbox {
    /// The latest message of a config topic (`layer`: `device` or
    /// `group-<g>`), for the stage's next poll.
    pub fn put(&self, layer: &str, payload: &[u8]) -> Result<(), String> {
        if payload.len() > edge_wire::config_doc::MAX_DOC_BYTES {
            return Err(format!(
                "a config message of {} bytes (at most {})",
                payload.len(),
                edge_wire::config_doc::MAX_DOC_BYTES
            ));
        }
        crate::store::medium::replace_file(&self.dir.join(layer), payload)
            .map_err(|e| format!("{}: {e}", self.dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(target: &str, id: &str, issued_ms: i64, toml: &str) -> Layer {
        let payload =
            ConfigDoc { target: target.into(), id: id.into(), issued_ms, toml: toml.into() }.encode_unsigned();
        Layer { received: ConfigDoc::decode(&payload).unwrap(), payload }
    }

    /// A stage over a local file in a new state directory.
    fn stage(name: &str) -> (Remote, PathBuf) {
        let dir = std::env::temp_dir().join(format!("remote-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let local = dir.join("agent.toml");
        let text = format!(
            "device_id = \"box-1\"\nstate_dir = \"{}\"\n[remote_config]\nenabled = true\ngroups = [\"line-1\"]\n\
             deadline_secs = 10\n",
            dir.display()
        );
        std::fs::write(&local, text).unwrap();
        let cfg = crate::config::Config::load(Some(&local)).unwrap();
        let audit = crate::audit::for_tests(&dir);
        (Remote::open(&cfg, local, audit, Default::default()).unwrap(), dir)
    }

    fn count(r: &Remote, result: &str) -> u64 {
        r.counts.get_or_create(&crate::metrics::ResultLabels { result: result.into() }).get()
    }

    #[test]
    fn a_document_is_tried_kept_or_reverted_and_never_tried_again() {
        let (mut r, dir) = stage("trial");
        let inbox = r.inbox();
        let ok = layer("group:line-1", "k20", 10, "[mqtt]\nkeep_alive_secs = 20\n");
        inbox.put("group-line-1", &ok.payload).unwrap();
        let Step::Apply(c) = r.poll(1_000, 0, 5) else { panic!("not applied") };
        assert_eq!(c.mqtt.keep_alive_secs, 20);
        // A restart goes on with the trial: it is on disk.
        let saved: Option<Trial> =
            std::fs::read(dir.join("remote/trial")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        assert_eq!(saved, r.trial);
        assert!(matches!(r.poll(2_000, 4, 9), Step::Idle), "record 5 not confirmed yet");
        assert!(matches!(r.poll(3_000, 5, 9), Step::Kept));
        assert_eq!(r.effective().unwrap().mqtt.keep_alive_secs, 20);

        let bad = layer("device:box-1", "bad", 20, "[mqtt]\nport = 1\n");
        inbox.put("device", &bad.payload).unwrap();
        assert!(matches!(r.poll(4_000, 5, 12), Step::Apply(_)));
        assert!(matches!(r.poll(13_999, 11, 12), Step::Idle));
        let Step::Revert(c) = r.poll(14_000, 11, 12) else { panic!("not reverted") };
        assert_eq!((c.mqtt.port, c.mqtt.keep_alive_secs), (8883, 20), "back to the group's layer alone");
        // The retained copy comes again: not tried again.
        inbox.put("device", &bad.payload).unwrap();
        assert!(matches!(r.poll(15_000, 12, 13), Step::Idle));
        // Older than the applied group document, for another box, or not
        // a document: refused.
        inbox.put("group-line-1", &layer("group:line-1", "old", 5, "").payload).unwrap();
        assert!(matches!(r.poll(16_000, 12, 13), Step::Idle));
        inbox.put("device", &layer("device:box-2", "other", 30, "").payload).unwrap();
        assert!(matches!(r.poll(17_000, 12, 13), Step::Idle));
        inbox.put("device", b"junk").unwrap();
        assert!(matches!(r.poll(18_000, 12, 13), Step::Idle));
        assert_eq!(
            (count(&r, "applied"), count(&r, "kept"), count(&r, "reverted"), count(&r, "refused")),
            (2, 1, 1, 3)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn layers_merge_over_the_local_file_and_may_not_touch_identity_or_trust() {
        let local = "device_id = \"box-1\"\n[probes.devices]\nenabled = true\n[mqtt]\nport = 8883\n";
        let origin = Path::new("agent.toml");
        let group = layer("group:line-1", "g1", 1, "[probes.devices]\nenabled = false\n[mqtt]\nkeep_alive_secs = 20\n");
        let device = layer("device:box-1", "d1", 2, "[mqtt]\nport = 9999\n");
        let c = effective(local, origin, &[group.clone(), device]).unwrap();
        assert!(!c.probes.devices.enabled);
        assert_eq!((c.mqtt.port, c.mqtt.keep_alive_secs, c.device_id.as_str()), (9999, 20, "box-1"));
        for (bad, what) in [
            ("device_id = \"other\"\n", "\"device_id\""),
            ("[mqtt.tls]\nenabled = false\n", "mqtt.tls"),
            ("[mqtt]\nclient_id = \"x\"\n", "mqtt.client_id"),
            ("[remote_config]\nenabled = false\n", "\"remote_config\""),
            ("[store]\nmax_bytes = 1\n", "\"store\""),
        ] {
            let e = effective(local, origin, &[layer("device:box-1", "bad", 3, bad)]).unwrap_err();
            assert!(e.contains(what), "{bad}: {e}");
        }
        // Validated as the local file is.
        let e = effective(local, origin, &[layer("device:box-1", "p0", 3, "[mqtt]\nmax_inflight = 0\n")]).unwrap_err();
        assert!(e.contains("mqtt.max_inflight"), "{e}");
    }
}
