//! What the guard against damaged model files costs per load: the trial
//! load in a forked child (detect::trial) and the flatbuffers verifier, as
//! `Model::load` does them, against building the same model in this
//! process alone, in one run:
//!
//!   cargo bench -p edge-agent --bench model_load [-- MODEL_CARD]
//!
//! Medians of 7 rounds of 20 loads each. Default model:
//! model/shipped/anomaly.card.json.

use edge_agent::detect::Model;
use std::time::Instant;

#[path = "model_card/mod.rs"]
mod model_card;
use model_card::median;

const LOADS: usize = 20;
const REPEATS: usize = 7;

fn time_ms(load: &dyn Fn()) -> f64 {
    let rounds: Vec<f64> = (0..REPEATS)
        .map(|_| {
            let t0 = Instant::now();
            for _ in 0..LOADS {
                load();
            }
            t0.elapsed().as_secs_f64() * 1e3 / LOADS as f64
        })
        .collect();
    median(rounds)
}

fn main() {
    let card = model_card::from_args();
    let size = std::fs::metadata(card.with_file_name("anomaly.tflite")).map(|m| m.len()).unwrap_or(0);
    let alone = time_ms(&|| drop(std::hint::black_box(Model::load_without_trial(&card).unwrap())));
    let guarded = time_ms(&|| drop(std::hint::black_box(Model::load(&card, None).unwrap())));
    println!("## Model trial load ({}, {size} bytes; medians of {REPEATS} x {LOADS} loads)\n", card.display());
    println!("| load | ms per load | ratio |");
    println!("|---|---|---|");
    println!("| in this process alone (baseline) | {alone:.3} | 1.00 |");
    println!(
        "| verified, trial in a forked child, then here (`Model::load`) | {guarded:.3} | {:.2} |",
        guarded / alone
    );
}
