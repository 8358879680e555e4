//! Detect stage, input side: the feature vector of a window (version 2,
//! docs/features.md), computed from that window's samples, its process
//! values (values.rs) and the previous window's samples. Counters are
//! cumulative, so rates and ratios come from their differences; latency
//! quantiles from the differences of histogram buckets. Pure; owns only
//! the previous window (and the FFT plans).
//!
//! Feature names are `<feature>{<subject>}`: the subject is a port class,
//! a device file, a Modbus side or a tag, so the same name means the same
//! thing on every box. A model lists the names it was trained on (its model
//! card); the agent computes every feature its data allows and the model
//! picks.

pub mod values;

use edge_wire::SeriesKey;
use std::collections::{BTreeMap, BTreeSet, HashMap};
pub use values::{tag_values, TagValues};

/// Version of the feature definitions below; in every export and model card.
pub const VERSION: u32 = 2;

/// Feature versions whose models this agent runs: each later version kept
/// every definition of the earlier ones (docs/features.md).
pub const RUNS_MODELS_OF: [u32; 2] = [1, 2];

/// The series counting a tag's values each window: every tag of the map
/// has one, so its features exist (count 0) in a window without values.
const VALUE_COUNT_SERIES: &str = "edge_process_value_count";

/// One window's features.
#[derive(Debug, Clone, PartialEq)]
pub struct Features {
    pub timestamp_ms: i64,
    /// Seconds since the previous window (the rates' denominator).
    pub window_s: f64,
    pub values: BTreeMap<String, f64>,
}

type SeriesId = (String, Vec<(String, String)>);

#[derive(Debug, Default)]
pub struct FeatureStage {
    prev: Option<(i64, HashMap<SeriesId, f64>)>,
    values: values::ValueFeatures,
}

fn id(k: &SeriesKey) -> SeriesId {
    (k.name.clone(), k.labels.iter().map(|l| (l.name.clone(), l.value.clone())).collect())
}

fn label<'a>(labels: &'a [(String, String)], name: &str) -> Option<&'a str> {
    labels.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// Sums of differences of counters per subject, and of histogram buckets.
#[derive(Default)]
struct Acc {
    sums: BTreeMap<(&'static str, String), f64>,
    /// (histogram, subject) -> upper bound -> count in this window.
    hists: BTreeMap<(&'static str, String), BTreeMap<u64, f64>>,
}

impl Acc {
    fn add(&mut self, what: &'static str, subject: &str, v: f64) {
        *self.sums.entry((what, subject.to_owned())).or_default() += v;
    }
    fn get(&self, what: &'static str, subject: &str) -> f64 {
        self.sums.get(&(what, subject.to_owned())).copied().unwrap_or(0.0)
    }
    /// Every subject with a sum or histogram of one of `whats`.
    fn subjects(&self, whats: &[&str]) -> BTreeSet<String> {
        let keys = self.sums.keys().chain(self.hists.keys());
        keys.filter(|(w, _)| whats.contains(w)).map(|(_, s)| s.clone()).collect()
    }
    /// The `q` quantile of a histogram (0 when the subject has none).
    fn quantile(&self, what: &'static str, subject: &str, q: f64) -> f64 {
        self.hists.get(&(what, subject.to_owned())).map_or(0.0, |h| quantile(h, q))
    }
}

/// The `q` quantile of a histogram given as (upper bound's bits ->
/// cumulative count; positive floats order like their bits), interpolated linearly inside its bucket as Prometheus does; the
/// last finite bound for observations in +Inf. 0 without observations.
pub fn quantile(cumulative: &BTreeMap<u64, f64>, q: f64) -> f64 {
    let total = cumulative.values().copied().fold(0.0, f64::max);
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let mut lower_bound = 0.0;
    let mut lower_count = 0.0;
    for (&bits, &count) in cumulative {
        let bound = f64::from_bits(bits);
        if count >= rank {
            if bound.is_infinite() {
                return lower_bound;
            }
            let in_bucket = count - lower_count;
            if in_bucket <= 0.0 {
                return bound;
            }
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / in_bucket;
        }
        lower_bound = bound;
        lower_count = count;
    }
    lower_bound
}

impl FeatureStage {
    pub fn new() -> Self {
        Self::default()
    }

    /// The features of the window ending at `timestamp_ms` (its samples
    /// and the process values captured in it); `None` for the first window
    /// seen (nothing to difference against) or a window not after the
    /// previous one.
    pub fn next(&mut self, timestamp_ms: i64, samples: &[(SeriesKey, f64)], tags: &TagValues) -> Option<Features> {
        let now: HashMap<SeriesId, f64> = samples.iter().map(|(k, v)| (id(k), *v)).collect();
        let (prev_ts, prev) = self.prev.replace((timestamp_ms, now))?;
        let now = &self.prev.as_ref().expect("just stored").1;
        if timestamp_ms <= prev_ts {
            return None;
        }
        let window_s = (timestamp_ms - prev_ts) as f64 / 1000.0;
        // A counter's increase; a counter that went down restarted (the
        // agent restarted): its new value is the increase.
        let delta = |sid: &SeriesId, v: f64| -> f64 {
            match prev.get(sid) {
                Some(&p) if v >= p => v - p,
                _ => v,
            }
        };
        let mut acc = Acc::default();
        let mut gauges: BTreeMap<String, f64> = BTreeMap::new();
        for (sid, &v) in now {
            let (name, labels) = sid;
            let class = || label(labels, "port_class").unwrap_or("other");
            let file = || label(labels, "file").unwrap_or("unknown");
            let side = || label(labels, "side").unwrap_or("unknown");
            match name.as_str() {
                "edge_tcp_connections_opened_total" => acc.add("opened", class(), delta(sid, v)),
                "edge_tcp_connections_failed_total" => acc.add("failed", class(), delta(sid, v)),
                "edge_tcp_connections_refused_total" => acc.add("refused", class(), delta(sid, v)),
                "edge_tcp_retransmits_total" => acc.add("retransmits", class(), delta(sid, v)),
                "edge_tcp_resets_sent_total" | "edge_tcp_resets_received_total" => {
                    acc.add("resets", class(), delta(sid, v))
                }
                "edge_tcp_connections_established" => {
                    *gauges.entry(format!("tcp_established{{{}}}", class())).or_default() += v
                }
                "edge_tcp_connections_idle" => *gauges.entry(format!("tcp_idle{{{}}}", class())).or_default() += v,
                "edge_tcp_connect_latency_seconds_bucket" => hist(&mut acc, "connect", class(), labels, delta(sid, v)),
                "edge_device_operation_seconds_count" => acc.add("dev_ops", file(), delta(sid, v)),
                "edge_device_bytes_total" => acc.add("dev_bytes", file(), delta(sid, v)),
                "edge_device_errors_total" => acc.add("dev_errors", file(), delta(sid, v)),
                "edge_device_operation_seconds_bucket" => hist(&mut acc, "dev", file(), labels, delta(sid, v)),
                "edge_modbus_requests_total" => acc.add("mb_requests", side(), delta(sid, v)),
                "edge_modbus_exceptions_total" => acc.add("mb_exceptions", side(), delta(sid, v)),
                "edge_modbus_reply_seconds_count" => acc.add("mb_replies", side(), delta(sid, v)),
                "edge_modbus_abandoned_requests_total" => acc.add("mb_abandoned", side(), delta(sid, v)),
                "edge_modbus_reply_seconds_bucket" => hist(&mut acc, "mb_reply", side(), labels, delta(sid, v)),
                _ => {}
            }
        }
        let mut values = gauges;
        let ratio = |n: f64, d: f64| if d > 0.0 { n / d } else { 0.0 };
        let tcp = acc.subjects(&["opened", "failed", "refused", "retransmits", "resets", "connect"]);
        for c in &tcp {
            let (opened, failed) = (acc.get("opened", c), acc.get("failed", c));
            values.insert(format!("tcp_opened_per_s{{{c}}}"), opened / window_s);
            values.insert(format!("tcp_failed_ratio{{{c}}}"), ratio(failed, opened + failed));
            values.insert(format!("tcp_refused_per_s{{{c}}}"), acc.get("refused", c) / window_s);
            values.insert(format!("tcp_retransmits_per_s{{{c}}}"), acc.get("retransmits", c) / window_s);
            values.insert(format!("tcp_resets_per_s{{{c}}}"), acc.get("resets", c) / window_s);
            values.insert(format!("tcp_connect_p50_s{{{c}}}"), acc.quantile("connect", c, 0.5));
            values.insert(format!("tcp_connect_p99_s{{{c}}}"), acc.quantile("connect", c, 0.99));
        }
        for f in acc.subjects(&["dev_ops", "dev_bytes", "dev_errors", "dev"]) {
            let ops = acc.get("dev_ops", &f);
            values.insert(format!("dev_ops_per_s{{{f}}}"), ops / window_s);
            values.insert(format!("dev_bytes_per_s{{{f}}}"), acc.get("dev_bytes", &f) / window_s);
            values.insert(format!("dev_error_ratio{{{f}}}"), ratio(acc.get("dev_errors", &f), ops));
            values.insert(format!("dev_latency_p50_s{{{f}}}"), acc.quantile("dev", &f, 0.5));
            values.insert(format!("dev_latency_p99_s{{{f}}}"), acc.quantile("dev", &f, 0.99));
        }
        for s in acc.subjects(&["mb_requests", "mb_exceptions", "mb_replies", "mb_abandoned", "mb_reply"]) {
            values.insert(format!("modbus_requests_per_s{{{s}}}"), acc.get("mb_requests", &s) / window_s);
            values.insert(
                format!("modbus_exception_ratio{{{s}}}"),
                ratio(acc.get("mb_exceptions", &s), acc.get("mb_replies", &s)),
            );
            values.insert(format!("modbus_abandoned_per_s{{{s}}}"), acc.get("mb_abandoned", &s) / window_s);
            values.insert(format!("modbus_reply_p99_s{{{s}}}"), acc.quantile("mb_reply", &s, 0.99));
        }
        // Every tag the map names (its count series) and every tag with values.
        let counted = samples.iter().filter(|(k, _)| k.name == VALUE_COUNT_SERIES);
        let mut names: BTreeSet<&str> =
            counted.filter_map(|(k, _)| k.labels.iter().find(|l| l.name == "tag")).map(|l| l.value.as_str()).collect();
        names.extend(tags.keys().map(String::as_str));
        for tag in names {
            self.values.add(tag, tags.get(tag).map_or(&[][..], Vec::as_slice), &mut values);
        }
        Some(Features { timestamp_ms, window_s, values })
    }
}

/// Adds one `_bucket{le}` difference to the histogram of (what, subject);
/// the series of one subject (several processes, ops, directions) add up.
fn hist(acc: &mut Acc, what: &'static str, subject: &str, labels: &[(String, String)], v: f64) {
    let Some(le) = label(labels, "le") else { return };
    let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
    // Cumulative per series, so the sum over series is cumulative too.
    *acc.hists.entry((what, subject.to_owned())).or_default().entry(bound.to_bits()).or_default() += v;
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_wire::Label;

    fn key(name: &str, labels: &[(&str, &str)]) -> SeriesKey {
        SeriesKey::new(name, labels.iter().map(|(n, v)| Label::new(*n, *v)).collect())
    }

    #[test]
    fn quantiles_interpolate_inside_log2_buckets() {
        let b = |pairs: &[(f64, f64)]| pairs.iter().map(|(le, c)| (le.to_bits(), *c)).collect::<BTreeMap<_, _>>();
        // 10 observations: 4 below 1 ms, 6 in (1 ms, 2 ms].
        let h = b(&[(0.001, 4.0), (0.002, 10.0), (f64::INFINITY, 10.0)]);
        assert!((quantile(&h, 0.5) - 0.001_166_666).abs() < 1e-6, "{}", quantile(&h, 0.5));
        assert!((quantile(&h, 0.2) - 0.0005).abs() < 1e-9);
        assert_eq!(quantile(&b(&[(0.001, 0.0), (f64::INFINITY, 0.0)]), 0.5), 0.0);
        // Everything past the last finite bound: that bound.
        assert_eq!(quantile(&b(&[(0.001, 0.0), (f64::INFINITY, 3.0)]), 0.99), 0.001);
    }

    #[test]
    fn rates_ratios_and_quantiles_from_two_windows() {
        let opened = key("edge_tcp_connections_opened_total", &[("direction", "outbound"), ("port_class", "modbus")]);
        let failed = key("edge_tcp_connections_failed_total", &[("direction", "outbound"), ("port_class", "modbus")]);
        let est = key("edge_tcp_connections_established", &[("direction", "outbound"), ("port_class", "modbus")]);
        let ops = key(
            "edge_device_operation_seconds_count",
            &[("file", "/dev/ttyUSB0"), ("op", "read"), ("process", "reader")],
        );
        let errs = key(
            "edge_device_errors_total",
            &[("errno", "EIO"), ("file", "/dev/ttyUSB0"), ("op", "read"), ("process", "reader")],
        );
        let bucket = |le: &str| {
            key(
                "edge_device_operation_seconds_bucket",
                &[("file", "/dev/ttyUSB0"), ("le", le), ("op", "read"), ("process", "reader")],
            )
        };
        let mut st = FeatureStage::new();
        let w1 = [
            (opened.clone(), 10.0),
            (failed.clone(), 1.0),
            (est.clone(), 2.0),
            (ops.clone(), 100.0),
            (errs.clone(), 0.0),
            (bucket("0.001"), 100.0),
            (bucket("0.002"), 100.0),
            (bucket("+Inf"), 100.0),
        ];
        assert_eq!(st.next(1_000, &w1, &TagValues::new()), None, "the first window has nothing to difference");
        let w2 = [
            (opened, 30.0),
            (failed, 1.0),
            (est, 3.0),
            (ops, 150.0),
            (errs, 5.0),
            (bucket("0.001"), 100.0),
            (bucket("0.002"), 150.0),
            (bucket("+Inf"), 150.0),
        ];
        let f = st.next(11_000, &w2, &TagValues::new()).unwrap();
        assert_eq!(f.window_s, 10.0);
        let v = |n: &str| f.values.get(n).copied().unwrap_or_else(|| panic!("{n} missing: {:?}", f.values));
        assert_eq!(v("tcp_opened_per_s{modbus}"), 2.0);
        assert_eq!(v("tcp_failed_ratio{modbus}"), 0.0);
        assert_eq!(v("tcp_established{modbus}"), 3.0);
        assert_eq!(v("dev_ops_per_s{/dev/ttyUSB0}"), 5.0);
        assert_eq!(v("dev_error_ratio{/dev/ttyUSB0}"), 0.1);
        // All 50 of this window's reads were in (1 ms, 2 ms].
        assert!((v("dev_latency_p50_s{/dev/ttyUSB0}") - 0.0015).abs() < 1e-9);
    }

    #[test]
    fn a_restarted_counter_counts_from_zero() {
        let opened = key("edge_tcp_connections_opened_total", &[("direction", "inbound"), ("port_class", "other")]);
        let mut st = FeatureStage::new();
        st.next(1_000, &[(opened.clone(), 500.0)], &TagValues::new());
        let f = st.next(2_000, &[(opened, 7.0)], &TagValues::new()).unwrap();
        assert_eq!(f.values["tcp_opened_per_s{other}"], 7.0);
    }

    #[test]
    fn every_tag_of_the_map_has_features_and_the_values_their_statistics() {
        let count = |tag: &str, n: f64| (key("edge_process_value_count", &[("tag", tag)]), n);
        let mut st = FeatureStage::new();
        st.next(1_000, &[count("flow", 0.0), count("speed", 0.0)], &TagValues::new());
        let tags: TagValues = [("speed".to_string(), vec![(1_500, 10.0), (2_000, 14.0)])].into();
        let f = st.next(2_000, &[count("flow", 0.0), count("speed", 2.0)], &tags).unwrap();
        let named: Vec<&str> = f.values.keys().map(String::as_str).collect();
        assert_eq!(
            named,
            [
                "value_count{flow}",
                "value_count{speed}",
                "value_last{speed}",
                "value_max{speed}",
                "value_mean{speed}",
                "value_min{speed}",
                "value_slope_per_s{speed}",
                "value_std{speed}"
            ],
            "nobody read flow: only its count"
        );
        assert_eq!(f.values["value_slope_per_s{speed}"], 8.0);
        assert_eq!(f.values["value_std{speed}"], 2.0);
    }
}
