//! What the bridge does with an MQTT payload (envelope, then block or audit
//! record), and the encoder/decoder round trip on windows derived from the
//! input.
#![no_main]

use edge_wire::{block, BlockEncoder, Envelope, Label, SeriesKey, ValueCodec, ValueSeries, ValueType};
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
    // An audit record (the frame kind the bridge logs instead of writing):
    // errors, never panics; a valid one survives its own round trip.
    if let Ok(r) = edge_wire::audit::AuditRecord::decode(data) {
        assert_eq!(edge_wire::audit::AuditRecord::decode(&r.encode()).as_ref(), Ok(&r));
    }

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
    // Process values too: one series per type, samples at times and raw
    // values from the input (wrapping changes, gaps, several per window).
    let mut value_sent: Vec<Vec<(i64, u64)>> = vec![Vec::new(); ValueType::ALL.len()];
    let mut value_t = -5000i64;
    for chunk in data[1..].chunks(9) {
        let window_start = ts;
        ts += 1 + i64::from(chunk[0] % 4) * 1000;
        let mut values = Vec::new();
        // What this window's values should read back as: kept only if the
        // frame is encoded (a block that is full ends the round trip).
        let mut window_values = Vec::new();
        for (k, kind) in ValueType::ALL.into_iter().enumerate() {
            if chunk.len() < 9 || chunk[k % 9] & 1 == 1 {
                continue;
            }
            let mut samples = Vec::new();
            for j in 0..(chunk[(k + 3) % 9] % 4) {
                value_t = value_t.max(window_start - 3000) + 1 + i64::from(chunk[(k + j as usize) % 9] % 50);
                let bits = u64::from_le_bytes(chunk[1..9].try_into().unwrap()).rotate_left(u32::from(j) * 7 + k as u32);
                samples.push((value_t, kind.raw_of_bits(bits)));
            }
            let codec = ValueCodec { kind, scale: if k % 2 == 0 { 1.0 } else { 0.5 }, offset: k as f64 };
            for (t, raw) in &samples {
                window_values.push((k, (*t, codec.value(*raw).to_bits())));
            }
            let key = SeriesKey::new("v", vec![Label::new("k", k.to_string())]);
            values.push(ValueSeries { key, codec, samples });
        }
        let mut samples = Vec::new();
        let mut window_sent = Vec::new();
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
            window_sent.push((i, (ts, v.to_bits())));
        }
        match enc.frame_with_values(ts, &samples, &values) {
            Ok(f) => {
                out.push(f);
                for (k, v) in window_values {
                    value_sent[k].push(v);
                }
                for (i, v) in window_sent {
                    sent[i].push(v);
                }
            }
            // More than a block holds: the round trip ends here.
            Err(edge_wire::EncodeError::Full) => break,
            Err(e) => panic!("valid windows encode: {e}"),
        }
    }
    let batch = block::decode_block(out.iter().map(Vec::as_slice)).expect("own frames decode");
    // No series with samples sent is missing.
    let decoded: std::collections::BTreeSet<(bool, usize)> =
        batch.series.iter().map(|s| (s.name == "v", s.labels[0].value.parse().unwrap())).collect();
    for (values, all) in [(false, &sent), (true, &value_sent)] {
        for (i, v) in all.iter().enumerate() {
            assert!(v.is_empty() || decoded.contains(&(values, i)), "series {i} (values: {values}) missing");
        }
    }
    for s in &batch.series {
        let got: Vec<(i64, u64)> = s.samples.iter().map(|p| (p.timestamp_ms, p.value.to_bits())).collect();
        let i: usize = s.labels[0].value.parse().unwrap();
        // Every sample of every frame encoded, exactly.
        if s.name == "v" {
            assert_eq!(got, value_sent[i]);
        } else {
            assert_eq!(got, sent[i]);
        }
    }
});
