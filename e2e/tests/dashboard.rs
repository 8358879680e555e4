//! The shipped Grafana dashboard (configs/grafana/edge-fleet.json): every
//! query parses in a real Prometheus, and every metric it uses is
//! documented (docs/metrics.md) or a rule of configs/rules/.

use e2e::*;

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

/// Names in a PromQL expression that look like our metrics or rules.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut cur = String::new();
    for c in expr.chars().chain([' ']) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            cur.push(c);
        } else {
            if cur.starts_with("edge") || cur.starts_with("fleet_") {
                names.push(std::mem::take(&mut cur));
            }
            cur.clear();
        }
    }
    names
}

#[test]
fn every_dashboard_query_parses_and_uses_documented_metrics() {
    if !require_root_and_tools() {
        return;
    }
    let text = std::fs::read_to_string(repo_dir().join("configs/grafana/edge-fleet.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut all = Vec::new();
    exprs(&dash["panels"], &mut all);
    assert!(all.len() >= 15, "{} queries", all.len());
    let docs = std::fs::read_to_string(repo_dir().join("docs/metrics.md")).unwrap();
    let rules = std::fs::read_to_string(repo_dir().join("configs/rules/edge.rules.yml")).unwrap();
    let dir = tempdir("dashboard");
    let prom = Prom::start(&dir);
    for e in &all {
        // Grafana's variables, as Grafana would fill them in.
        let q = e.replace("$device", ".*").replace("$__rate_interval", "1m");
        if let Err(err) = prom.scalar(&q) {
            panic!("dashboard query {e:?} does not run: {err}");
        }
        for name in metric_names(e) {
            // A histogram is documented by its base name.
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(&name);
            let documented = docs.contains(&format!("`{name}"))
                || docs.contains(&format!("`{base}` | histogram"))
                || rules.contains(&format!("record: {name}"));
            assert!(documented, "{name} (in {e:?}) is neither in docs/metrics.md nor a recording rule");
        }
    }
}
