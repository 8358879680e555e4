//! Model file bytes, whatever they are, under the shipped card: loading
//! never crashes or hangs this process (the verifier, then the trial load
//! in a forked child, docs/model.md "Damaged model files"); it loads (the
//! golden self-test passed) or is refused with an error naming the file.
#![no_main]

use edge_agent::detect::{Card, Model};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

const CARD: &str = include_str!("../../model/shipped/anomaly.card.json");

fuzz_target!(|data: &[u8]| {
    let card: Card = serde_json::from_str(CARD).expect("the shipped card");
    let path = Path::new("/fuzz/anomaly.card.json");
    if let Err(e) = Model::load_bytes(card, path, data.to_vec()) {
        assert!(e.to_string().contains("/fuzz/"), "{e}");
    }
});
