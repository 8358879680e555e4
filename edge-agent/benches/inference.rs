//! Inference latency per window (issue 6): the agent's TF Lite 1.15 path
//! against the reference interpreter (ai-edge-litert, Python) on the same
//! model and the same inputs (the card's golden vectors), in one run:
//!
//!   cargo bench -p edge-agent --bench inference [-- MODEL_CARD]
//!
//! Rows: the model alone (input in, invoke, output out), and the whole
//! window (features to score: normalisation, model, score, top features).
//! Medians of 7 loops of 2,000 passes over the golden vectors. Default
//! model: model/shipped/anomaly.card.json. Needs model/run.sh (Python).

use edge_agent::detect::Model;
use edge_agent::features::Features;
use std::time::Instant;

#[path = "model_card/mod.rs"]
mod model_card;
use model_card::median;

const N: usize = 2000;
const REPEATS: usize = 7;

fn main() {
    let repo = model_card::repo();
    let card = model_card::from_args();
    let mut m = Model::load(&card, None).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<String> = m.card.features.iter().map(|f| f.name.clone()).collect();
    let windows: Vec<Features> = m
        .card
        .golden
        .iter()
        .map(|g| Features {
            timestamp_ms: 0,
            window_s: m.card.window_s,
            values: names.iter().cloned().zip(g.raw.iter().copied()).collect(),
        })
        .collect();
    let inputs: Vec<Vec<f32>> = m.card.golden.iter().map(|g| g.input.clone()).collect();
    let mut out = vec![0.0f32; names.len()];
    let per = (N * inputs.len()) as f64;
    let mut model_us = Vec::new();
    let mut window_us = Vec::new();
    for _ in 0..REPEATS {
        let t0 = Instant::now();
        for _ in 0..N {
            for z in &inputs {
                m.reconstruct(z, &mut out).unwrap();
                std::hint::black_box(&out);
            }
        }
        model_us.push(t0.elapsed().as_secs_f64() * 1e6 / per);
        let t0 = Instant::now();
        for _ in 0..N {
            for w in &windows {
                std::hint::black_box(m.score(w).unwrap());
            }
        }
        window_us.push(t0.elapsed().as_secs_f64() * 1e6 / per);
    }
    let (ours_model, ours_window) = (median(model_us), median(window_us));
    let o = std::process::Command::new(repo.join("model/run.sh"))
        .args(["bench", "--model", &card.parent().unwrap().display().to_string()])
        .args(["--n", &N.to_string(), "--repeats", &REPEATS.to_string()])
        .output()
        .expect("model/run.sh");
    assert!(o.status.success(), "model/run.sh bench: {}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(o.stdout.trim_ascii()).expect("JSON from model/run.sh bench");
    let (ref_model, ref_window) = (r["model_us"].as_f64().unwrap(), r["window_us"].as_f64().unwrap());
    println!(
        "## Inference per window: {} ({} features, {} golden inputs, medians of {REPEATS} x {N} passes)\n",
        m.card.name,
        names.len(),
        inputs.len()
    );
    println!(
        "| path | edge-agent (TF Lite 1.15, Rust) µs | reference ({}) µs | ratio | goal |",
        r["interpreter"].as_str().unwrap_or("?")
    );
    println!("|---|---|---|---|---|");
    println!(
        "| model alone: input, invoke, output | {ours_model:.2} | {ref_model:.2} | {:.3} | ≤ 1.0 |",
        ours_model / ref_model
    );
    println!(
        "| whole window: normalise, model, score (+ top features in the agent) | {ours_window:.2} | {ref_window:.2} | {:.3} | - |",
        ours_window / ref_window
    );
}
