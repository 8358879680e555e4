//! Detect stage: each window's feature vector (features.rs), normalised
//! with the model card's parameters, through the TensorFlow Lite
//! autoencoder; its reconstruction error is the anomaly score. Alarms
//! work with no network: they are decided here, stored in the priority
//! lane, and exported on /metrics.
//!
//! A model is a card (`<name>.card.json`, docs/model.md) and the .tflite
//! file it names. Loading checks, in order: the card's format and feature
//! version, the model file's SHA-256 against the card (and against
//! `detect.model_sha256` when set), that TF Lite builds it with one
//! float32 input and output of the card's width, and the golden vectors:
//! every one is normalised and run, and must give the reference
//! interpreter's values. A model failing any check is refused with an
//! error naming the file; the agent keeps running without inference.

pub mod action;
pub mod config;
pub mod metrics;
pub mod trial;
pub mod update;

use crate::config::DetectConfig;
use crate::features::{FeatureStage, Features, TagValues};
use edge_wire::{Label, SeriesKey};
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const CARD_FORMAT: &str = "edge-agent-model-card";
/// The card version this agent writes about; it reads 1 too (every
/// feature `log`).
pub const CARD_VERSION: u32 = 2;
const CARD_VERSIONS: [u32; 2] = [1, 2];

/// How a feature's value becomes the model's input (docs/model.md,
/// "Normalisation"), before standardising.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transform {
    /// `ln(1 + scale * max(x, 0))`: rates, ratios, latencies, counts.
    #[default]
    Log,
    /// `scale * x`: physical values, signed, of any size.
    Linear,
}

#[derive(Debug, Clone, Deserialize)]
pub struct FeatureSpec {
    pub name: String,
    /// Card version 1 has none: every feature is `log`.
    #[serde(default)]
    pub transform: Transform,
    pub scale: f64,
    pub mean: f64,
    pub std: f64,
}

impl FeatureSpec {
    /// The model's input for one raw value.
    pub fn normalise(&self, x: f64, clip: f64) -> f32 {
        let u = match self.transform {
            Transform::Log => (x.max(0.0) * self.scale).ln_1p(),
            Transform::Linear => x * self.scale,
        };
        ((u - self.mean) / self.std).clamp(-clip, clip) as f32
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Golden {
    pub raw: Vec<f64>,
    pub input: Vec<f32>,
    pub output: Vec<f32>,
    pub score: f64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Tolerance {
    pub relative: f64,
    pub absolute: f64,
}

/// An alarm level's operating point: its threshold on the score and the
/// debounce it was calibrated for.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Level {
    pub threshold: f64,
    #[serde(default = "one")]
    pub raise_after: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct InputSpec {
    pub clip: f64,
}

/// The machine-readable model card (docs/model.md); unknown keys (the
/// training summary) are kept by the file, not needed here.
#[derive(Debug, Clone, Deserialize)]
pub struct Card {
    pub format: String,
    pub card_version: u32,
    pub name: String,
    pub feature_version: u32,
    pub window_s: f64,
    pub model_file: String,
    pub model_sha256: String,
    pub input: InputSpec,
    pub features: Vec<FeatureSpec>,
    pub threshold: f64,
    /// The alarm debounce the threshold was calibrated for (windows).
    #[serde(default = "one")]
    pub raise_after: u32,
    /// The warning level (card version 2, optional): a lower threshold
    /// and its own debounce; `threshold` and `raise_after` are the stop
    /// level's.
    #[serde(default)]
    pub warn: Option<Level>,
    pub golden: Vec<Golden>,
    pub golden_tolerance: Tolerance,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model card {path}: {what}")]
    Card { path: PathBuf, what: String },
    #[error("model {path}: {what}")]
    Model { path: PathBuf, what: String },
    #[error(
        "model {path} failed its golden self-test (vector {vector}, {what}): this TF Lite runtime computes it \
         differently from the reference interpreter (an int8 or otherwise unsupported model?); ship a float32 model \
         made by model/run.sh"
    )]
    Golden { path: PathBuf, vector: usize, what: String },
}

impl ModelError {
    /// A short state for the model metric's `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            ModelError::Card { .. } => "card",
            ModelError::Model { .. } => "model",
            ModelError::Golden { .. } => "golden",
        }
    }
}

fn one() -> u32 {
    1
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl Card {
    pub fn read(path: &Path) -> Result<Card, ModelError> {
        let err = |what: String| ModelError::Card { path: path.to_owned(), what };
        let text = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let card: Card = serde_json::from_slice(&text)
            .map_err(|e| err(format!("not a model card ({e}); write cards with model/run.sh train")))?;
        if card.format != CARD_FORMAT || !CARD_VERSIONS.contains(&card.card_version) {
            return Err(err(format!(
                "format {:?} version {}, this agent reads {CARD_FORMAT:?} versions {CARD_VERSIONS:?}",
                card.format, card.card_version
            )));
        }
        if !crate::features::RUNS_MODELS_OF.contains(&card.feature_version) {
            return Err(err(format!(
                "trained on feature version {}, this agent computes version {} (and runs models of {:?}): retrain \
                 on its export",
                card.feature_version,
                crate::features::VERSION,
                crate::features::RUNS_MODELS_OF
            )));
        }
        update::plain_name(&card.model_file).map_err(err)?;
        let n = card.features.len();
        if n == 0 {
            return Err(err("lists no features".into()));
        }
        if let Some(f) = card.features.iter().find(|f| {
            f.std.is_nan() || f.std <= 0.0 || !f.std.is_finite() || !f.scale.is_finite() || !f.mean.is_finite()
        }) {
            return Err(err(format!("feature {:?} has a bad normalisation (std must be > 0)", f.name)));
        }
        if !(card.threshold > 0.0 && card.threshold.is_finite()) {
            return Err(err(format!("threshold {} is not a positive number", card.threshold)));
        }
        if let Some(w) = card.warn {
            if !(w.threshold > 0.0 && w.threshold.is_finite()) {
                return Err(err(format!("warn.threshold {} is not a positive number", w.threshold)));
            }
            if w.threshold > card.threshold {
                return Err(err(format!(
                    "warn.threshold {} is above the stop threshold {}: the warning would never come first",
                    w.threshold, card.threshold
                )));
            }
        }
        if card.golden.is_empty() {
            return Err(err("has no golden vectors: the model cannot be checked".into()));
        }
        if let Some(i) = card.golden.iter().position(|g| g.raw.len() != n || g.input.len() != n || g.output.len() != n)
        {
            return Err(err(format!("golden vector {i} does not have {n} values")));
        }
        Ok(card)
    }

    /// The model file's path: next to the card.
    pub fn model_path(&self, card_path: &Path) -> PathBuf {
        card_path.parent().unwrap_or(Path::new(".")).join(&self.model_file)
    }

    /// The model's input for a window's raw feature values (in card order).
    pub fn normalise(&self, raw: &[f64], out: &mut [f32]) {
        for ((f, &x), o) in self.features.iter().zip(raw).zip(out.iter_mut()) {
            *o = f.normalise(x, self.input.clip);
        }
    }

    /// The tags whose values the model uses (the subjects of its
    /// `value_*` features), in order.
    pub fn tags(&self) -> std::collections::BTreeSet<&str> {
        fn subject(name: &str) -> Option<&str> {
            name.strip_suffix('}')?.split_once('{').map(|(_, s)| s)
        }
        self.features.iter().filter(|f| f.name.starts_with("value_")).filter_map(|f| subject(&f.name)).collect()
    }
}

fn close(got: f64, want: f64, t: &Tolerance) -> bool {
    (got - want).abs() <= t.absolute + t.relative * want.abs()
}

/// The mean squared error between the input and its reconstruction.
pub fn score(input: &[f32], output: &[f32]) -> f64 {
    let sum: f64 = input.iter().zip(output).map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2)).sum();
    sum / input.len().max(1) as f64
}

/// The TF Lite interpreter with the model's one input and one output.
#[cfg(feature = "tflite")]
mod runtime {
    type Interp = tflite::Interpreter<'static, tflite::ops::builtin::BuiltinOpResolver>;

    pub struct Runtime {
        interp: Interp,
        input: tflite::TensorIndex,
        output: tflite::TensorIndex,
    }

    impl Runtime {
        /// Builds the model; checks one float32 input and output of `n` values.
        pub fn build(bytes: Vec<u8>, n: usize) -> Result<Runtime, String> {
            // TF Lite's interpreter reads the flatbuffer unverified: first
            // the schema's own verifier (flatbuffers' C++ Verifier with
            // TF Lite's generated VerifyModelBuffer), so no offset or size
            // in the file can point outside it.
            let Some(verified) = tflite::model::Model::from_buffer(&bytes) else {
                return Err("not a valid TensorFlow Lite file: its structure fails the flatbuffers verifier \
                            (a damaged or truncated file)"
                    .into());
            };
            // The bindings' tensor_info panics on a tensor name that is not
            // UTF-8 (tflite 0.9 unwraps it): refused here, by name.
            for (g, sub) in verified.subgraphs.iter().enumerate() {
                if let Some(t) = sub.tensors.iter().position(|t| t.name.c_str().to_str().is_err()) {
                    return Err(format!(
                        "tensor {t} of subgraph {g} has a name that is not UTF-8: a damaged or hostile file"
                    ));
                }
            }
            drop(verified);
            let fb = tflite::FlatBufferModel::build_from_buffer(bytes)
                .map_err(|e| format!("not a TensorFlow Lite model: {e}"))?;
            let resolver = tflite::ops::builtin::BuiltinOpResolver::default();
            let mut interp = tflite::InterpreterBuilder::new(fb, resolver)
                .and_then(|b| b.build())
                .map_err(|e| format!("TF Lite 1.15 cannot build it ({e}): an operator or version it lacks"))?;
            interp.allocate_tensors().map_err(|e| format!("cannot allocate its tensors: {e}"))?;
            let (ins, outs) = (interp.inputs().to_vec(), interp.outputs().to_vec());
            if ins.len() != 1 || outs.len() != 1 {
                return Err(format!(
                    "{} inputs and {} outputs; an anomaly model has one of each",
                    ins.len(),
                    outs.len()
                ));
            }
            for (what, ix) in [("input", ins[0]), ("output", outs[0])] {
                let info = interp.tensor_info(ix).ok_or_else(|| format!("no {what} tensor"))?;
                if info.element_kind != tflite::context::ElementKind::kTfLiteFloat32 {
                    return Err(format!(
                        "{what} is {:?}, not float32: quantised models miscompute in this runtime",
                        info.element_kind
                    ));
                }
                if info.dims.iter().product::<usize>() != n {
                    return Err(format!("{what} has shape {:?}; the card lists {n} features", info.dims));
                }
            }
            Ok(Runtime { interp, input: ins[0], output: outs[0] })
        }

        /// One inference: the reconstruction of `z` into `out`.
        pub fn run(&mut self, z: &[f32], out: &mut [f32]) -> Result<(), String> {
            let e = |e: tflite::Error| format!("inference failed: {e}");
            self.interp.tensor_data_mut::<f32>(self.input).map_err(e)?.copy_from_slice(z);
            self.interp.invoke().map_err(e)?;
            out.copy_from_slice(self.interp.tensor_data::<f32>(self.output).map_err(e)?);
            Ok(())
        }
    }
}

/// An agent built without TF Lite (no C++ cross toolchain for its target):
/// every model is refused, saying why.
#[cfg(not(feature = "tflite"))]
mod runtime {
    pub enum Runtime {}

    impl Runtime {
        pub fn build(_bytes: Vec<u8>, _n: usize) -> Result<Runtime, String> {
            Err("this agent was built without the TF Lite runtime (cargo feature `tflite` off: no C++ cross \
                 toolchain for its target); use a build with it to run models"
                .into())
        }

        pub fn run(&mut self, _z: &[f32], _out: &mut [f32]) -> Result<(), String> {
            match *self {}
        }
    }
}

/// A loaded, self-tested model.
pub struct Model {
    pub card: Card,
    pub card_path: PathBuf,
    pub sha256: String,
    runtime: runtime::Runtime,
    z: Vec<f32>,
    out: Vec<f32>,
    raw: Vec<f64>,
}

impl Model {
    /// Loads the card at `card_path` and its model; `pin`: the SHA-256 the
    /// model file must have (config `detect.model_sha256`), if any.
    pub fn load(card_path: &Path, pin: Option<&str>) -> Result<Model, ModelError> {
        let card = Card::read(card_path)?;
        let path = card.model_path(card_path);
        let err = |what: String| ModelError::Model { path: path.clone(), what };
        let bytes = std::fs::read(&path).map_err(|e| err(format!("cannot read: {e}")))?;
        let sha256 = sha256_hex(&bytes);
        if !sha256.eq_ignore_ascii_case(&card.model_sha256) {
            return Err(err(format!(
                "SHA-256 {sha256} is not the card's {} (a damaged or mismatched file: install the pair again)",
                card.model_sha256
            )));
        }
        if let Some(pin) = pin.filter(|p| !p.is_empty()) {
            if !sha256.eq_ignore_ascii_case(pin) {
                return Err(err(format!("SHA-256 {sha256} is not detect.model_sha256 {pin}: not the approved model")));
            }
        }
        Self::load_checked(card, card_path, &sha256, bytes)
    }

    /// Builds a model from its card and whatever file bytes, as a load
    /// does after its hash checks: the model fuzz target's entry
    /// (fuzz/model).
    pub fn load_bytes(card: Card, card_path: &Path, bytes: Vec<u8>) -> Result<Model, ModelError> {
        let sha256 = sha256_hex(&bytes);
        Self::load_checked(card, card_path, &sha256, bytes)
    }

    /// First in a child (detect::trial), so that bytes that crash TF Lite
    /// cannot crash the agent, then here.
    fn load_checked(card: Card, card_path: &Path, sha256: &str, bytes: Vec<u8>) -> Result<Model, ModelError> {
        let path = card.model_path(card_path);
        trial::run(trial::TIMEOUT, || Self::build(card.clone(), card_path, sha256, bytes.clone(), &path).is_ok())
            .map_err(|e| ModelError::Model { path: path.clone(), what: e.to_string() })?;
        Self::build(card, card_path, sha256, bytes, &path)
    }

    /// Loads without the trial in a child: only the benchmark's baseline
    /// (benches/model_load.rs) may use it.
    #[doc(hidden)]
    pub fn load_without_trial(card_path: &Path) -> Result<Model, ModelError> {
        let card = Card::read(card_path)?;
        let path = card.model_path(card_path);
        let bytes = std::fs::read(&path).map_err(|e| ModelError::Model { path: path.clone(), what: e.to_string() })?;
        let sha256 = sha256_hex(&bytes);
        Self::build(card, card_path, &sha256, bytes, &path)
    }

    /// Builds the runtime from the model's bytes and runs the golden
    /// self-test.
    fn build(card: Card, card_path: &Path, sha256: &str, bytes: Vec<u8>, path: &Path) -> Result<Model, ModelError> {
        let n = card.features.len();
        let runtime =
            runtime::Runtime::build(bytes, n).map_err(|what| ModelError::Model { path: path.to_owned(), what })?;
        let mut m = Model {
            card,
            card_path: card_path.to_owned(),
            sha256: sha256.to_owned(),
            runtime,
            z: vec![0.0; n],
            out: vec![0.0; n],
            raw: vec![0.0; n],
        };
        m.self_test(path)?;
        Ok(m)
    }

    fn self_test(&mut self, path: &Path) -> Result<(), ModelError> {
        let golden = std::mem::take(&mut self.card.golden);
        let tol = self.card.golden_tolerance.clone();
        let r = (|| {
            for (v, g) in golden.iter().enumerate() {
                let bad = |what: String| ModelError::Golden { path: path.to_owned(), vector: v, what };
                let mut z = vec![0.0f32; g.raw.len()];
                self.card.normalise(&g.raw, &mut z);
                if let Some(i) = (0..z.len()).find(|&i| !close(z[i].into(), g.input[i].into(), &tol)) {
                    return Err(bad(format!(
                        "normalised feature {} is {}, the card says {}",
                        self.card.features[i].name, z[i], g.input[i]
                    )));
                }
                let mut out = vec![0.0f32; g.raw.len()];
                self.runtime.run(&g.input, &mut out).map_err(bad)?;
                if let Some(i) = (0..out.len()).find(|&i| !close(out[i].into(), g.output[i].into(), &tol)) {
                    return Err(bad(format!("output {i} is {}, the reference gave {}", out[i], g.output[i])));
                }
                let s = score(&g.input, &out);
                if !close(s, g.score, &tol) {
                    return Err(bad(format!("score {s}, the reference gave {}", g.score)));
                }
            }
            Ok(())
        })();
        self.card.golden = golden;
        r
    }

    /// The model alone: the reconstruction of a normalised input.
    pub fn reconstruct(&mut self, z: &[f32], out: &mut [f32]) -> Result<(), String> {
        self.runtime.run(z, out)
    }

    /// Scores one window: its features in the card's order (0 where the
    /// window lacks one), normalised, reconstructed.
    pub fn score(&mut self, f: &Features) -> Result<Scored, String> {
        for (r, spec) in self.raw.iter_mut().zip(&self.card.features) {
            *r = f.values.get(&spec.name).copied().unwrap_or(0.0);
        }
        self.card.normalise(&self.raw, &mut self.z);
        self.runtime.run(&self.z, &mut self.out)?;
        let s = score(&self.z, &self.out);
        // The features that contributed most to the error, for the record.
        let n = self.z.len() as f64;
        let mut top: Vec<(usize, f64)> = Vec::with_capacity(4);
        for (i, (&a, &b)) in self.z.iter().zip(&self.out).enumerate() {
            let c = (f64::from(a) - f64::from(b)).powi(2) / n;
            let at = top.iter().position(|&(_, t)| c > t).unwrap_or(top.len());
            if at < 3 {
                top.insert(at, (i, c));
                top.truncate(3);
            }
        }
        Ok(Scored { score: s, top: top.into_iter().map(|(i, c)| (self.card.features[i].name.clone(), c)).collect() })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub score: f64,
    /// Up to three (feature, its share of the score), largest first.
    pub top: Vec<(String, f64)>,
}

/// What the alarm logic decided for a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Raised,
    Cleared,
}

/// Debounce: an alarm is raised after `raise_after` consecutive windows
/// above the threshold and cleared after `clear_after` consecutive ones
/// below it.
#[derive(Debug, Clone)]
pub struct Alarm {
    pub raise_after: u32,
    pub clear_after: u32,
    pub active: bool,
    above: u32,
    below: u32,
}

impl Alarm {
    pub fn new(raise_after: u32, clear_after: u32) -> Alarm {
        Alarm { raise_after: raise_after.max(1), clear_after: clear_after.max(1), active: false, above: 0, below: 0 }
    }

    pub fn observe(&mut self, above: bool) -> Transition {
        if above {
            self.above += 1;
            self.below = 0;
            if !self.active && self.above >= self.raise_after {
                self.active = true;
                return Transition::Raised;
            }
        } else {
            self.below += 1;
            self.above = 0;
            if self.active && self.below >= self.clear_after {
                self.active = false;
                return Transition::Cleared;
            }
        }
        Transition::None
    }
}

/// Where the model stands; exported as `edge_detect_model_state{state}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelState {
    Loaded,
    Disabled,
    Missing,
    Refused,
}

impl ModelState {
    pub const ALL: [ModelState; 4] =
        [ModelState::Loaded, ModelState::Disabled, ModelState::Missing, ModelState::Refused];
    pub fn label(self) -> &'static str {
        match self {
            ModelState::Loaded => "loaded",
            ModelState::Disabled => "disabled",
            ModelState::Missing => "missing",
            ModelState::Refused => "refused",
        }
    }
}

/// What the detect stage adds for one window.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Samples for the routine window (score, alarm).
    pub samples: Vec<(SeriesKey, f64)>,
    /// An anomaly record for the priority lane (alarm raised or cleared).
    pub record: Option<Vec<(SeriesKey, f64)>>,
    pub scored: Option<Scored>,
    /// The stop level's decision.
    pub transition: Option<Transition>,
    /// The warn level's (a model with one).
    pub warning: Option<Transition>,
    pub inference_s: f64,
    /// The local action's firing (or its suppression), for the audit
    /// trail: the event it was given and what became of it.
    pub action: Option<(action::Event, action::Fired)>,
}

/// The samples of one level's raise or clear in the priority record: the
/// event with the score, and the threshold crossed.
fn level_record(level: &str, event: &str, model_id: &str, score: f64, threshold: f64) -> [(SeriesKey, f64); 2] {
    let labels = |extra: Option<(&str, &str)>| {
        let mut l = vec![Label::new("level", level), Label::new("model", model_id)];
        if let Some((n, v)) = extra {
            l.insert(0, Label::new(n, v));
        }
        l
    };
    [
        (SeriesKey::new(metrics::EVENT, labels(Some(("event", event)))), score),
        (SeriesKey::new(metrics::THRESHOLD, labels(None)), threshold),
    ]
}

/// The detect stage: owns the feature stage, the model, its updates and
/// the alarm.
pub struct DetectStage {
    features: FeatureStage,
    pub model: Option<Model>,
    pub state: ModelState,
    /// The stop level: the alarm that runs the local action.
    pub alarm: Alarm,
    /// The warn level (when the model has one).
    pub warning: Alarm,
    updates: Option<update::Updates>,
    raise_after: u32,
    clear_after: u32,
    warn_raise_after: u32,
    warn_clear_after: u32,
    /// Windows shorter than this (half the configured length) are not
    /// scored: the partial window a SIGHUP or the shutdown closes has
    /// rates over a second or two, noisier than any the model learned.
    min_window_s: f64,
    /// Until then (the agent's start + detect.warmup_secs) no window
    /// counts toward raising the alarm.
    warm_at: std::time::Instant,
    pub action: action::Action,
    /// The tags of this box's tag map.
    box_tags: std::collections::BTreeSet<String>,
    /// Tags the running model uses that the box's tag map does not name.
    pub missing_tags: Vec<String>,
}

impl DetectStage {
    /// Loads the model (an installed update, else the configured one); a
    /// missing or refused model leaves the stage scoring nothing (the
    /// reason is logged and in the state) until an update installs one.
    /// `box_tags`: the names of the box's tag map (a model using another
    /// tag is loaded, and said to miss it).
    pub fn new(
        cfg: &DetectConfig,
        state_dir: &Path,
        window: std::time::Duration,
        device: &str,
        box_tags: std::collections::BTreeSet<String>,
    ) -> DetectStage {
        let mut s = DetectStage {
            features: FeatureStage::new(),
            model: None,
            state: ModelState::Disabled,
            alarm: Alarm::new(cfg.raise_after, cfg.clear_after),
            warning: Alarm::new(cfg.warn_raise_after, cfg.warn_clear_after),
            updates: None,
            raise_after: cfg.raise_after,
            clear_after: cfg.clear_after,
            warn_raise_after: cfg.warn_raise_after,
            warn_clear_after: cfg.warn_clear_after,
            warm_at: std::time::Instant::now() + std::time::Duration::from_secs(cfg.warmup_secs),
            min_window_s: window.as_secs_f64() / 2.0,
            action: action::Action::new(&cfg.action, device),
            box_tags,
            missing_tags: Vec::new(),
        };
        if !cfg.enabled {
            tracing::info!("detection disabled (detect.enabled = false)");
            return s;
        }
        let updates = update::Updates::new(cfg, state_dir);
        if !cfg.model.exists() && !updates.current_card().exists() {
            s.state = ModelState::Missing;
            tracing::warn!(
                card = %cfg.model.display(),
                drop_dir = %updates.drop_dir.display(),
                "no anomaly model: windows are stored but not scored (install a model card and its .tflite there, \
                 set detect.model, or drop a signed model)"
            );
        } else {
            match updates.load_at_start() {
                Ok(m) => s.run(m, "anomaly model loaded and self-tested"),
                Err(e) => {
                    s.state = ModelState::Refused;
                    tracing::error!(error = %e, "anomaly model refused: the agent runs without inference");
                }
            }
        }
        s.updates = Some(updates);
        s
    }

    fn run(&mut self, m: Model, what: &str) {
        if self.raise_after < m.card.raise_after {
            tracing::warn!(
                configured = self.raise_after,
                calibrated_for = m.card.raise_after,
                "detect.raise_after is below what the model's threshold was calibrated for: expect more false alarms"
            );
        }
        if let Some(w) = m.card.warn.filter(|w| self.warn_raise_after < w.raise_after) {
            tracing::warn!(
                configured = self.warn_raise_after,
                calibrated_for = w.raise_after,
                "detect.warn_raise_after is below what the model's warn threshold was calibrated for: expect more \
                 false warnings"
            );
        }
        tracing::info!(
            card = %m.card_path.display(),
            name = %m.card.name,
            sha256 = %m.sha256,
            features = m.card.features.len(),
            threshold = m.card.threshold,
            golden = m.card.golden.len(),
            "{what}"
        );
        self.missing_tags =
            m.card.tags().into_iter().filter(|t| !self.box_tags.contains(*t)).map(String::from).collect();
        if !self.missing_tags.is_empty() {
            tracing::warn!(
                card = %m.card_path.display(),
                missing = ?self.missing_tags,
                "the model uses process values of tags this box's tag map does not name: their features are 0 in \
                 every window, so expect high scores; add the tags to [[tags]] (configs/tags/), or use a model \
                 trained on this box's export"
            );
        }
        self.model = Some(m);
        self.state = ModelState::Loaded;
        // New thresholds: the alarm and the warning start over.
        self.alarm = Alarm::new(self.raise_after, self.clear_after);
        self.warning = Alarm::new(self.warn_raise_after, self.warn_clear_after);
    }

    /// Once per window: a dropped model or rollback request, if any.
    /// Returns the change's result label (`installed`, `rolled_back`,
    /// `refused`) for the metrics.
    /// Model changes and refusals go to `trail` as well.
    pub fn set_audit(&mut self, trail: std::sync::Arc<crate::audit::Audit>) {
        if let Some(u) = self.updates.as_mut() {
            u.trail = Some(trail);
        }
    }

    /// The running model's SHA-256, if one runs.
    pub fn model_sha256(&self) -> Option<&str> {
        self.model.as_ref().map(|m| m.sha256.as_str())
    }

    pub fn poll_updates(&mut self) -> Option<&'static str> {
        let change = self.updates.as_mut()?.poll(self.model.as_ref())?;
        Some(match change {
            update::Change::Installed(m) => {
                self.run(*m, "new anomaly model installed (verified, self-tested)");
                "installed"
            }
            update::Change::RolledBack(m) => {
                if let Some(m) = m {
                    self.run(*m, "anomaly model rolled back");
                }
                "rolled_back"
            }
            update::Change::Refused(why) => {
                tracing::error!(reason = %why, "new anomaly model refused; the running one stays");
                "refused"
            }
        })
    }

    /// Whether the warm-up after the agent's start is over.
    fn warmed_up(&self) -> bool {
        std::time::Instant::now() >= self.warm_at
    }

    /// Scores the window ending at `timestamp_ms` (its samples as stored).
    pub fn observe(&mut self, timestamp_ms: i64, samples: &[(SeriesKey, f64)], tags: &TagValues) -> Outcome {
        let mut out = Outcome::default();
        let Some(f) = self.features.next(timestamp_ms, samples, tags) else { return out };
        if f.window_s < self.min_window_s {
            return out;
        }
        let warmed_up = self.warmed_up();
        let Some(model) = self.model.as_mut() else { return out };
        let t0 = std::time::Instant::now();
        let scored = match model.score(&f) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "inference failed; window not scored");
                return out;
            }
        };
        out.inference_s = t0.elapsed().as_secs_f64();
        let threshold = model.card.threshold;
        // Scored and exported during the warm-up, but not counted toward
        // a raise (config.rs: DetectConfig::warmup_secs).
        let transition = self.alarm.observe(scored.score > threshold && warmed_up);
        let warn = model.card.warn;
        let warned = warn.map(|w| self.warning.observe(scored.score > w.threshold && warmed_up));
        out.samples.push((SeriesKey::new(metrics::SCORE, vec![]), scored.score));
        out.samples.push((SeriesKey::new(metrics::ALARM, vec![]), f64::from(u8::from(self.alarm.active))));
        if warn.is_some() {
            out.samples.push((SeriesKey::new(metrics::WARNING, vec![]), f64::from(u8::from(self.warning.active))));
        }
        let model_id = model.sha256[..12].to_string();
        let mut rec = Vec::new();
        // The warn level: a record (and the log) only.
        if let (Some(w), Some(t @ (Transition::Raised | Transition::Cleared))) = (warn, warned) {
            let event = if t == Transition::Raised { "raised" } else { "cleared" };
            tracing::warn!(event, score = scored.score, threshold = w.threshold, top = ?scored.top, "anomaly warning {event}");
            rec.extend(level_record("warn", event, &model_id, scored.score, w.threshold));
        }
        if transition != Transition::None {
            let event = if transition == Transition::Raised { "raised" } else { "cleared" };
            tracing::warn!(event, score = scored.score, threshold, top = ?scored.top, "anomaly alarm {event}");
            rec.extend(level_record("stop", event, &model_id, scored.score, threshold));
            let action_event = action::Event {
                event,
                score: scored.score,
                threshold,
                timestamp_ms,
                model_sha256: model.sha256.clone(),
                top: scored.top.clone(),
            };
            let fired = self.action.fire(&action_event);
            if fired != action::Fired::Nothing {
                out.action = Some((action_event, fired));
            }
            // Every firing of the local action is in the record, beside
            // the score and the features that caused it.
            if let Some(result) = fired.label() {
                rec.push((
                    SeriesKey::new(metrics::ACTION, vec![Label::new("event", event), Label::new("result", result)]),
                    1.0,
                ));
            }
        }
        if !rec.is_empty() {
            for (rank, (name, share)) in scored.top.iter().enumerate() {
                let rank = (rank + 1).to_string();
                rec.push((
                    SeriesKey::new(
                        metrics::TOP_FEATURE,
                        vec![Label::new("feature", name.as_str()), Label::new("rank", rank.as_str())],
                    ),
                    *share,
                ));
            }
            out.record = Some(rec);
        }
        out.warning = warned;
        out.transition = Some(transition);
        out.scored = Some(scored);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alarm_debounces_both_ways() {
        let mut a = Alarm::new(2, 3);
        let seq = [true, false, true, true, true, false, false, true, false, false, false];
        let got: Vec<Transition> = seq.iter().map(|&s| a.observe(s)).collect();
        use Transition::*;
        assert_eq!(got, [None, None, None, Raised, None, None, None, None, None, None, Cleared]);
    }

    #[test]
    fn normalisation_is_log_scaled_standardised_and_clipped() {
        let card = Card {
            format: CARD_FORMAT.into(),
            card_version: 1,
            name: "t".into(),
            feature_version: 1,
            window_s: 10.0,
            model_file: "m.tflite".into(),
            model_sha256: String::new(),
            input: InputSpec { clip: 5.0 },
            features: vec![
                FeatureSpec { name: "a".into(), transform: Transform::Log, scale: 1.0, mean: 1.0, std: 0.5 },
                FeatureSpec { name: "b".into(), transform: Transform::Log, scale: 1000.0, mean: 0.0, std: 0.1 },
            ],
            threshold: 1.0,
            raise_after: 2,
            warn: None,
            golden: vec![],
            golden_tolerance: Tolerance { relative: 0.0, absolute: 0.0 },
        };
        let mut z = [0.0f32; 2];
        card.normalise(&[std::f64::consts::E - 1.0, 1.0], &mut z);
        assert!(z[0].abs() < 1e-6, "{z:?}");
        assert_eq!(z[1], 5.0, "clipped");
        card.normalise(&[-3.0, 0.0], &mut z);
        assert!((z[0] + 2.0).abs() < 1e-6, "negative treated as 0: {z:?}");
    }

    /// Fits a feature as model/run.sh does (pipeline.py, fit_normalisation):
    /// mean and std of the training values, the std floored at 1e-3 of the
    /// mean's size or the smallest step between training values.
    fn fit(transform: Transform, scale: f64, xs: &[f64]) -> FeatureSpec {
        let mut spec = FeatureSpec { name: "x".into(), transform, scale, mean: 0.0, std: 1.0 };
        let u: Vec<f64> = xs
            .iter()
            .map(|&x| match transform {
                Transform::Log => (x.max(0.0) * scale).ln_1p(),
                Transform::Linear => x * scale,
            })
            .collect();
        let n = u.len() as f64;
        spec.mean = u.iter().sum::<f64>() / n;
        let std = (u.iter().map(|v| (v - spec.mean).powi(2)).sum::<f64>() / n).sqrt();
        let floor = match transform {
            Transform::Log => 0.1,
            Transform::Linear => {
                let mut sorted = u.clone();
                sorted.sort_by(f64::total_cmp);
                let step = sorted.windows(2).map(|w| w[1] - w[0]).filter(|d| *d > 0.0).fold(f64::INFINITY, f64::min);
                (1e-3 * spec.mean.abs()).max(if step.is_finite() { step } else { 0.0 }).max(f32::MIN_POSITIVE.into())
            }
        };
        spec.std = std.max(floor);
        spec
    }

    /// Sensors from 1e-5 to 1e5, positive and negative: under `linear`
    /// each one's normal spread is about one unit of z and a shift of
    /// three of its standard deviations is about three, whatever its units
    /// and sign; under `log` (the version-1 rule for every feature) the
    /// small ones are flat and the negative ones vanish.
    #[test]
    fn linear_normalisation_fits_physical_values_of_any_size_and_sign() {
        let wobble = |centre: f64, spread: f64| -> Vec<f64> {
            (0..200).map(|i| centre + spread * ((i as f64) * 0.7).sin()).collect()
        };
        let spread_of = |xs: &[f64]| {
            let m = xs.iter().sum::<f64>() / xs.len() as f64;
            (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64).sqrt()
        };
        for exp in -5..=5 {
            for sign in [1.0, -1.0] {
                let centre = sign * 10f64.powi(exp);
                let spread = 10f64.powi(exp) * 0.05;
                let xs = wobble(centre, spread);
                let sd = spread_of(&xs);
                let lin = fit(Transform::Linear, 1.0, &xs);
                assert!((lin.std - sd).abs() <= 1e-9 * sd, "{centre}: the spread itself, not a floor: {}", lin.std);
                let z_normal = lin.normalise(centre, 1000.0);
                let z_shift = lin.normalise(centre + 3.0 * sd, 1000.0);
                assert!(z_normal.abs() < 0.05, "{centre}: normal at z {z_normal}");
                assert!((z_shift - z_normal - 3.0).abs() < 1e-3, "{centre}: a shift of 3 sd is z {z_shift}");
                let z_down = lin.normalise(centre - 3.0 * sd, 1000.0);
                assert!((z_normal - z_down - 3.0).abs() < 1e-3, "{centre}: the sign is kept: {z_down}");
                // The version-1 rule: ln(1 + max(x, 0)), std at least 0.1.
                let log = fit(Transform::Log, 1.0, &xs);
                let z_log = log.normalise(centre + 3.0 * sd, 1000.0) - log.normalise(centre, 1000.0);
                if sign < 0.0 {
                    assert_eq!(z_log, 0.0, "{centre}: a negative value is 0 to the log rule");
                } else if exp <= -2 {
                    assert!(z_log.abs() < 0.02, "{centre}: the log rule flattens a small sensor ({z_log})");
                }
            }
        }
        // A sensor toggling by its last digit: the floor is its resolution
        // (1e-7, above 1e-3 of its size); a constant one: 1e-3 of its size,
        // in its own units, so a step of 1 % of its size is z 10.
        let steps: Vec<f64> = (0..100).map(|i| 2.5e-5 + if i % 2 == 0 { 0.0 } else { 1e-7 }).collect();
        let lin = fit(Transform::Linear, 1.0, &steps);
        assert!((lin.std - 1e-7).abs() < 1e-12, "the resolution: {}", lin.std);
        let frozen = fit(Transform::Linear, 1.0, &[-40_000.0; 50]);
        assert_eq!(frozen.std, 40.0);
        assert!((frozen.normalise(-39_600.0, 1000.0) - 10.0).abs() < 1e-4);
    }

    #[test]
    fn the_transform_is_named_in_the_card_and_defaults_to_log() {
        let spec =
            |t: &str| serde_json::from_str::<FeatureSpec>(&format!(r#"{{"name":"v","scale":1,"mean":0,"std":1{t}}}"#));
        assert_eq!(spec("").unwrap().transform, Transform::Log, "card version 1 has none");
        assert_eq!(spec(r#","transform":"linear""#).unwrap().transform, Transform::Linear);
        let err = spec(r#","transform":"cube""#).unwrap_err().to_string();
        assert!(err.contains("cube") && err.contains("linear"), "{err}");
        let card = Card {
            features: [
                "value_mean{flow}",
                "value_band1_rms{vibration_rms}",
                "tcp_opened_per_s{hmi}",
                "value_std{flow}",
            ]
            .iter()
            .map(|n| FeatureSpec { name: (*n).into(), transform: Transform::Linear, scale: 1.0, mean: 0.0, std: 1.0 })
            .collect(),
            ..serde_json::from_str(CARD_FOR_TESTS).unwrap()
        };
        assert_eq!(card.tags().into_iter().collect::<Vec<_>>(), ["flow", "vibration_rms"]);
    }

    const CARD_FOR_TESTS: &str = r#"{"format":"edge-agent-model-card","card_version":2,"name":"t","feature_version":2,
        "window_s":10,"model_file":"m.tflite","model_sha256":"","input":{"clip":5},"features":[],"threshold":1,
        "golden":[],"golden_tolerance":{"relative":0,"absolute":0}}"#;

    #[test]
    fn score_is_mean_squared_error() {
        assert_eq!(score(&[1.0, 2.0], &[0.0, 0.0]), 2.5);
    }
}
