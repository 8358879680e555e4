//! The detect stage's metrics (docs/metrics.md, docs/model.md), and the
//! names of its series that also travel in windows and priority records:
//! one name each, on `/metrics` and in Prometheus.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::metrics::{ModelLabels, ResultLabels, StateLabels};

/// The last window's anomaly score (also in every scored window).
pub const SCORE: &str = "edge_anomaly_score";
/// The running model's alarm threshold (also in every alarm record).
pub const THRESHOLD: &str = "edge_anomaly_threshold";
/// 1 while the alarm is raised (also in every scored window).
pub const ALARM: &str = "edge_anomaly_alarm";
/// 1 while the warning is raised (also in scored windows, with a warn level).
pub const WARNING: &str = "edge_anomaly_warning";
/// An alarm's raising or clearing (priority records only).
pub const EVENT: &str = "edge_anomaly_event";
/// A local action's firing (priority records only).
pub const ACTION: &str = "edge_anomaly_action";
/// The features that raised an alarm most (priority records only).
pub const TOP_FEATURE: &str = "edge_anomaly_top_feature";
/// Model updates by result (also in every window while detection is on:
/// what a model rollout watches, docs/remote-config.md).
pub const MODEL_CHANGES_TOTAL: &str = "edge_agent_detect_model_changes_total";
/// The results a model update counts.
pub const MODEL_CHANGE_RESULTS: [&str; 3] = ["installed", "rolled_back", "refused"];

#[derive(Clone, Debug, Default)]
pub struct DetectMetrics {
    pub model_state: Family<StateLabels, Gauge>,
    pub score: Gauge<f64, AtomicU64>,
    pub threshold: Gauge<f64, AtomicU64>,
    pub alarm: Gauge,
    pub alarms: Counter,
    pub warning: Gauge,
    pub warnings: Counter,
    pub scored: Counter,
    pub inference_seconds: Counter<f64, AtomicU64>,
    pub model_changes: Family<ResultLabels, Counter>,
    pub model_info: Family<ModelLabels, Gauge>,
    pub missing_tags: Gauge,
    pub actions: Family<ResultLabels, Counter>,
}

impl DetectMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "edge_agent_detect_model_state",
            "1 for the anomaly model's state (loaded, disabled, missing, refused), 0 for the others",
            self.model_state.clone(),
        );
        r.register(SCORE, "The last window's anomaly score", self.score.clone());
        r.register(THRESHOLD, "The loaded model's alarm threshold", self.threshold.clone());
        r.register(ALARM, "1 while the anomaly alarm is raised", self.alarm.clone());
        r.register("edge_agent_anomaly_alarms", "Anomaly alarms raised", self.alarms.clone());
        r.register(WARNING, "1 while the anomaly warning (the model's warn level) is raised", self.warning.clone());
        r.register("edge_agent_anomaly_warnings", "Anomaly warnings raised", self.warnings.clone());
        r.register("edge_agent_detect_windows_scored", "Windows scored by the anomaly model", self.scored.clone());
        r.register(
            "edge_agent_detect_inference_seconds",
            "Time spent in inference (normalisation, model, score)",
            self.inference_seconds.clone(),
        );
        r.register(
            "edge_agent_detect_model_changes",
            "Model updates: installed, rolled_back, refused (each also a line in the model audit log)",
            self.model_changes.clone(),
        );
        r.register(
            "edge_agent_anomaly_actions",
            "Local actions on alarms: ok, failed, suppressed (rate limit)",
            self.actions.clone(),
        );
        r.register(
            "edge_agent_detect_model_info",
            "1 for the running anomaly model, by its name and SHA-256",
            self.model_info.clone(),
        );
        r.register(
            "edge_agent_detect_model_missing_tags",
            "Tags the running model uses that this box's tag map does not name (their features are 0)",
            self.missing_tags.clone(),
        );
    }

    pub fn set_model_state(&self, d: &super::DetectStage) {
        for s in super::ModelState::ALL {
            self.model_state.get_or_create(&StateLabels { state: s.label().into() }).set(i64::from(s == d.state));
        }
        self.threshold.set(d.model.as_ref().map_or(0.0, |m| m.card.threshold));
        self.missing_tags.set(if d.model.is_some() { d.missing_tags.len() as i64 } else { 0 });
        self.model_info.clear();
        if let Some(m) = &d.model {
            self.model_info.get_or_create(&ModelLabels { name: m.card.name.clone(), sha256: m.sha256.clone() }).set(1);
        }
    }

    pub fn observe(&self, o: &super::Outcome, alarm: bool, warning: bool) {
        if let Some(s) = &o.scored {
            self.score.set(s.score);
            self.scored.inc();
            self.inference_seconds.inc_by(o.inference_s);
        }
        self.alarm.set(i64::from(alarm));
        self.warning.set(i64::from(warning));
        if o.transition == Some(super::Transition::Raised) {
            self.alarms.inc();
        }
        if o.warning == Some(super::Transition::Raised) {
            self.warnings.inc();
        }
    }

    /// A model update's result (installed, rolled_back, refused).
    pub fn model_changed(&self, result: &str) {
        self.model_changes.get_or_create(&ResultLabels { result: result.into() }).inc();
    }

    /// The model updates' counts, as series of a window.
    pub fn model_change_samples(&self) -> impl Iterator<Item = (edge_wire::SeriesKey, f64)> + '_ {
        MODEL_CHANGE_RESULTS.iter().map(|r| {
            let n = self.model_changes.get_or_create(&ResultLabels { result: (*r).into() }).get();
            (edge_wire::SeriesKey::new(MODEL_CHANGES_TOTAL, vec![edge_wire::Label::new("result", *r)]), n as f64)
        })
    }

    /// The local action's counters, for it to count into as results come.
    pub fn action_counts(&self) -> super::action::Counts {
        let c = |result: &str| self.actions.get_or_create(&ResultLabels { result: result.into() }).clone();
        super::action::Counts { ok: c("ok"), failed: c("failed"), suppressed: c("suppressed") }
    }
}
