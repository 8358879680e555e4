//! What the bridge does with an MQTT payload (envelope, then block), and the
//! encoder/decoder round trip on windows derived from the input.
#![no_main]

use edge_wire::{block, BlockEncoder, Envelope, Label, SeriesKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // 1. Arbitrary bytes as a message: errors, never panics.
    if let Ok(env) = Envelope::decode(data) {
        if let Ok(batch) = env.block() {
            for s in &batch.series {
                assert!(s.samples.windows(2).all(|w| w[0].timestamp_ms < w[1].timestamp_ms));
            }
        }
    }
    // 2. Arbitrary bytes as a sequence of frames: [n][len][frame]...
    let mut frames = Vec::new();
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = (len as usize).min(tail.len());
        frames.push(&tail[..len]);
        rest = &tail[len..];
    }
    let _ = block::decode_block(frames.iter().copied());

    // 3. Round trip: windows built from the input decode to what went in.
    if data.len() < 2 {
        return;
    }
    let series = (data[0] % 8) as usize + 1;
    let keys: Vec<SeriesKey> =
        (0..series).map(|i| SeriesKey::new("m", vec![Label::new("i", i.to_string())])).collect();
    let mut enc = BlockEncoder::new();
    let mut sent: Vec<Vec<(i64, u64)>> = vec![Vec::new(); series];
    let mut out = Vec::new();
    let mut ts = 0i64;
    for chunk in data[1..].chunks(9) {
        ts += 1 + i64::from(chunk[0] % 4) * 1000;
        let mut samples = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if chunk[0] & (1 << (i % 8)) == 0 && i > 0 {
                continue; // series i missing from this window
            }
            let mut b = [0u8; 8];
            for (j, x) in chunk.iter().skip(1).enumerate() {
                b[j] = x.wrapping_add(i as u8);
            }
            let v = if chunk[0] & 0x80 != 0 { f64::from_bits(u64::from_le_bytes(b)) } else { i64::from_le_bytes(b) as f64 / 8.0 };
            samples.push((k.clone(), v));
            sent[i].push((ts, v.to_bits()));
        }
        out.push(enc.frame(ts, &samples).expect("valid windows encode"));
    }
    let batch = block::decode_block(out.iter().map(Vec::as_slice)).expect("own frames decode");
    for s in &batch.series {
        let i: usize = s.labels[0].value.parse().unwrap();
        let got: Vec<(i64, u64)> = s.samples.iter().map(|p| (p.timestamp_ms, p.value.to_bits())).collect();
        assert_eq!(got, sent[i]);
    }
});
