//! `fleet-bridge rollout`: a configuration overlay or a model to a canary
//! set first, their health watched in Prometheus, then promoted to the
//! group or rolled back (docs/remote-config.md, "Canary rollouts"). Every
//! step is printed and appended to `<audit.dir>/rollout-<YYYY-MM-DD>.jsonl`.
//!
//! A canary is healthy when, within the watch: the box took the change (a
//! configuration kept: `edge_agent_remote_configs_total{result="kept"}`
//! rose, neither `reverted` nor `refused` did; a model installed:
//! `edge_agent_detect_model_changes_total{result="installed"}` rose,
//! neither `rolled_back` nor `refused` did), its windows recorded after the
//! push landed, no fewer probes are attached than before, and its anomaly
//! alarm was not raised more than in as long a time before the push.

use crate::config::Config;
use crate::operator::Operator;
use edge_wire::config_doc::{self, ConfigDoc};
use std::time::{Duration, Instant};

/// What the rollout is asked to do.
#[derive(Debug, Clone)]
pub struct Plan {
    pub prometheus: String,
    pub group: String,
    pub canaries: Vec<String>,
    pub id: String,
    pub change: Change,
    pub watch: Duration,
}

/// What a rollout changes.
#[derive(Debug, Clone)]
pub enum Change {
    /// A configuration overlay (TOML), sent as configuration documents,
    /// signed with `key` (PKCS#8 DER of an Ed25519 key) if given.
    Config { overlay: String, key: Option<Vec<u8>> },
    /// A model message (`model/run.sh sign`'s `model.bundle`: the card is
    /// signed by its maker, the message goes as it is).
    Model(Vec<u8>),
    /// A probe program pack (`edge-agent programs pack`, signed by its
    /// maker).
    Programs(Vec<u8>),
}

impl Change {
    fn device_topic(&self, prefix: &str, device: &str) -> String {
        match self {
            Change::Config { .. } => config_doc::device_topic(prefix, device),
            Change::Model(_) => edge_wire::model_topic(prefix, device),
            Change::Programs(_) => edge_wire::probe_programs_topic(prefix, device),
        }
    }

    fn group_topic(&self, prefix: &str, group: &str) -> String {
        match self {
            Change::Config { .. } => config_doc::group_topic(prefix, group),
            Change::Model(_) => edge_wire::group_model_topic(prefix, group),
            Change::Programs(_) => edge_wire::group_probe_programs_topic(prefix, group),
        }
    }

    /// The counter of the box's decisions and its results for taken,
    /// reverted and refused.
    fn counts(&self) -> (&'static str, [&'static str; 3]) {
        match self {
            Change::Config { .. } => ("edge_agent_remote_configs_total", ["kept", "reverted", "refused"]),
            Change::Model(_) => ("edge_agent_detect_model_changes_total", ["installed", "rolled_back", "refused"]),
            Change::Programs(_) => ("edge_agent_probe_programs_total", ["installed", "rolled_back", "refused"]),
        }
    }

    /// The message for `target` (`device:<id>`, `group:<g>`).
    fn message(&self, target: &str, id: &str) -> Result<Vec<u8>, String> {
        match self {
            Change::Config { overlay, key } => document(key.as_deref(), target, id, overlay),
            Change::Model(bundle) | Change::Programs(bundle) => Ok(bundle.clone()),
        }
    }

    /// What a canary's own topic held before, to put back: a document
    /// with its TOML (an empty one when it had none); a model message, or
    /// nothing (an empty retained message clears the topic).
    fn restore(&self, target: &str, id: &str, previous: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Change::Config { key, .. } => {
                let toml = if previous.is_empty() {
                    String::new()
                } else {
                    ConfigDoc::decode(previous).map_err(|e| format!("{target}: {e}"))?.doc.toml
                };
                document(key.as_deref(), target, id, &toml)
            }
            Change::Model(_) | Change::Programs(_) => Ok(previous.to_vec()),
        }
    }
}

/// One canary's health figures at a time.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Health {
    pub kept: f64,
    pub reverted: f64,
    pub refused: f64,
    pub probes_attached: f64,
    /// The newest window's time (s).
    pub newest_s: f64,
    /// Windows with the alarm raised, over the watch's length up to now.
    pub alarm_windows: f64,
}

/// A canary's verdict: healthy, or why not; `None` while undecided.
pub fn judge(before: &Health, now: &Health, pushed_s: f64, watch_over: bool) -> Option<Result<(), String>> {
    if now.reverted > before.reverted {
        return Some(Err("the box reverted it".into()));
    }
    if now.refused > before.refused {
        return Some(Err("the box refused it".into()));
    }
    if now.alarm_windows > before.alarm_windows {
        return Some(Err(format!(
            "its anomaly alarm was raised in {} windows, {} in as long before",
            now.alarm_windows, before.alarm_windows
        )));
    }
    if !watch_over {
        return None;
    }
    if now.kept <= before.kept {
        return Some(Err("the box did not take it within the watch".into()));
    }
    if now.newest_s <= pushed_s {
        return Some(Err("no window recorded after the push has landed".into()));
    }
    if now.probes_attached < before.probes_attached {
        return Some(Err(format!("{} probes attached, {} before", now.probes_attached, before.probes_attached)));
    }
    Some(Ok(()))
}

/// The rollout's record: printed, and appended to the audit directory.
struct Log {
    path: std::path::PathBuf,
    id: String,
}

impl Log {
    fn step(&self, step: &str, target: &str, detail: &str) {
        println!("rollout {}: {step} {target}: {detail}", self.id);
        let line = serde_json::json!({
            "time_ms": crate::now_ms(), "rollout": self.id, "step": step, "target": target, "detail": detail,
        });
        use std::io::Write;
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "{line}").and_then(|_| f.sync_data()));
        if let Err(e) = r {
            eprintln!("rollout {}: cannot append to {}: {e}", self.id, self.path.display());
        }
    }
}

/// Prometheus' instant query: the first value, `None` when empty.
fn query(agent: &ureq::Agent, url: &str, q: &str, at_s: f64) -> Result<Option<f64>, String> {
    let mut resp = agent
        .get(format!("{}/api/v1/query", url.trim_end_matches('/')))
        .query("query", q)
        .query("time", format!("{at_s:.3}"))
        .call()
        .map_err(|e| format!("{url}: {e}"))?;
    let body = resp.body_mut().read_to_string().map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{url}: {e}"))?;
    Ok(v["data"]["result"].as_array().and_then(|r| r.first()).and_then(|r| r["value"][1].as_str()?.parse().ok()))
}

fn health(agent: &ureq::Agent, plan: &Plan, device: &str, at_s: f64) -> Result<Health, String> {
    let (url, span_s) = (&plan.prometheus, plan.watch.as_secs().max(1));
    let one = |q: String| query(agent, url, &q, at_s).map(|v| v.unwrap_or(0.0));
    let (counter, [kept, reverted, refused]) = plan.change.counts();
    let count = |r: &str| one(format!("max(last_over_time({counter}{{device=\"{device}\",result=\"{r}\"}}[1h]))"));
    Ok(Health {
        kept: count(kept)?,
        reverted: count(reverted)?,
        refused: count(refused)?,
        probes_attached: one(format!("sum(last_over_time(edge_agent_probe_attached{{device=\"{device}\"}}[5m]))"))?,
        newest_s: one(format!(
            "max(timestamp(last_over_time(edge_agent_store_backlog_records{{device=\"{device}\",lane=\"routine\"}}[5m])))"
        ))?,
        alarm_windows: one(format!("sum(sum_over_time(edge_anomaly_alarm{{device=\"{device}\"}}[{span_s}s]))"))?,
    })
}

fn document(key: Option<&[u8]>, target: &str, id: &str, toml: &str) -> Result<Vec<u8>, String> {
    let doc = ConfigDoc { target: target.into(), id: id.into(), issued_ms: crate::now_ms(), toml: toml.into() };
    match key {
        Some(k) => doc.encode_signed(k),
        None => Ok(doc.encode_unsigned()),
    }
}

/// Runs the rollout: `Ok(true)` promoted, `Ok(false)` rolled back.
pub fn run(cfg: &Config, plan: &Plan) -> Result<bool, String> {
    std::fs::create_dir_all(&cfg.audit.dir).map_err(|e| format!("{}: {e}", cfg.audit.dir.display()))?;
    let day = crate::audit::day(crate::now_ms());
    let log = Log { path: cfg.audit.dir.join(format!("rollout-{day}.jsonl")), id: plan.id.clone() };
    let prefix = &cfg.mqtt.topic_prefix;
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(10))).build().into();
    let mut op = Operator::connect(cfg, "rollout")?;
    let group_topic = plan.change.group_topic(prefix, &plan.group);
    let group_had = op.retained(&group_topic)?.filter(|p| !p.is_empty());
    // What each canary's own topic held (put back afterwards) and its
    // health.
    let pushed_s = crate::now_ms() as f64 / 1000.0;
    let mut canaries = Vec::new();
    for device in &plan.canaries {
        let topic = plan.change.device_topic(prefix, device);
        let previous = op.retained(&topic)?.unwrap_or_default();
        let before = health(&agent, plan, device, pushed_s)?;
        canaries.push((device.clone(), topic, previous, before));
    }
    let span = plan.watch.as_secs().max(1);
    log.step("start", &format!("group:{}", plan.group), &format!("canaries {:?}, watch {span} s", plan.canaries));
    for (device, topic, _, _) in &canaries {
        op.publish(topic, plan.change.message(&format!("device:{device}"), &plan.id)?)?;
        log.step("canary", &format!("device:{device}"), "published");
    }
    let until = Instant::now() + plan.watch;
    let mut verdicts: Vec<Option<Result<(), String>>> = vec![None; canaries.len()];
    loop {
        let over = Instant::now() >= until;
        let now_s = crate::now_ms() as f64 / 1000.0;
        for (i, (device, _, _, before)) in canaries.iter().enumerate() {
            if verdicts[i].is_some() {
                continue;
            }
            let now = health(&agent, plan, device, now_s)?;
            verdicts[i] = judge(before, &now, pushed_s, over);
            if let Some(v) = &verdicts[i] {
                let detail = v.as_ref().map_or_else(|e| format!("unhealthy: {e}"), |_| "healthy".into());
                log.step("watched", &format!("device:{device}"), &detail);
            }
        }
        if verdicts.iter().any(|v| matches!(v, Some(Err(_)))) || verdicts.iter().all(Option::is_some) {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let healthy = verdicts.iter().all(|v| matches!(v, Some(Ok(()))));
    if healthy {
        op.publish(&group_topic, plan.change.message(&format!("group:{}", plan.group), &plan.id)?)?;
        log.step("promoted", &format!("group:{}", plan.group), "published to the group");
    }
    // The canaries' own topics back as they were (the group's now carries
    // the change, or nothing does).
    let (step, suffix) = if healthy { ("restored", "promoted") } else { ("rolled_back", "rolled-back") };
    for (device, topic, previous, _) in &canaries {
        let target = format!("device:{device}");
        op.publish(topic, plan.change.restore(&target, &format!("{}-{suffix}", plan.id), previous)?)?;
        log.step(step, &target, "its own topic as before the rollout");
        // A model with nothing to go back to on the topics: the box's own
        // previous model (a rollback request, not retained).
        // Programs likewise: back to the built-in ones.
        if !healthy && previous.is_empty() && group_had.is_none() {
            let request = match plan.change {
                Change::Model(_) => {
                    Some((edge_wire::MODEL_ROLLBACK, "no model on its topics: back to its previous one"))
                }
                Change::Programs(_) => {
                    Some((edge_wire::PROBE_PROGRAMS_BUILT_IN, "no pack on its topics: back to the built-in programs"))
                }
                Change::Config { .. } => None,
            };
            if let Some((message, detail)) = request {
                op.publish_once(topic, message.to_vec())?;
                log.step("rollback_requested", &target, detail);
            }
        }
    }
    Ok(healthy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_canary_is_judged_on_every_signal() {
        let before = Health { kept: 1.0, probes_attached: 2.0, newest_s: 100.0, ..Default::default() };
        let good = Health { kept: 2.0, probes_attached: 2.0, newest_s: 130.0, ..Default::default() };
        assert_eq!(judge(&before, &good, 110.0, false), None, "undecided while watching");
        assert_eq!(judge(&before, &good, 110.0, true), Some(Ok(())));
        let bad = |f: fn(&mut Health)| {
            let mut h = good;
            f(&mut h);
            judge(&before, &h, 110.0, true).unwrap().unwrap_err()
        };
        assert!(bad(|h| h.reverted = 1.0).contains("reverted"));
        assert!(bad(|h| h.refused = 1.0).contains("refused"));
        assert!(bad(|h| h.kept = 1.0).contains("did not take"));
        assert!(bad(|h| h.newest_s = 105.0).contains("no window"));
        assert!(bad(|h| h.probes_attached = 1.0).contains("1 probes attached, 2 before"));
        assert!(bad(|h| h.alarm_windows = 3.0).contains("alarm"));
        // A revert is decided at once, not at the end of the watch.
        let mut reverted = good;
        reverted.reverted = 1.0;
        assert!(matches!(judge(&before, &reverted, 110.0, false), Some(Err(_))));
    }
}
