//! Features of the process values (feature version 2, docs/features.md):
//! per tag and window, statistics of the values captured in it and, for a
//! tag read at 5 Hz or faster, the RMS of four bands of its spectrum.
//! Pure; the same code serves the agent and `store export --format
//! features`.

use rustfft::{num_complex::Complex, FftPlanner};
use std::collections::BTreeMap;

/// The values of one window, per tag: (time in ms, value), in time order.
pub type TagValues = BTreeMap<String, Vec<(i64, f64)>>;

/// Polling rate from which a tag gets band features (Hz).
pub const BAND_MIN_HZ: f64 = 5.0;
/// Fewest values a window needs for band features.
pub const BAND_MIN_VALUES: usize = 16;
/// Most values one spectrum takes (the window's last ones).
pub const BAND_MAX_VALUES: usize = 1024;
/// Bands: equal parts of (0, rate / 2].
pub const BANDS: usize = 4;

/// The tag values of a window's value series (label `tag`; the values as
/// numbers, scale and offset applied).
pub fn tag_values(series: &[edge_wire::ValueSeries]) -> TagValues {
    let mut out = TagValues::new();
    for s in series {
        let Some(tag) = s.key.labels.iter().find(|l| l.name == "tag") else { continue };
        let dst = out.entry(tag.value.clone()).or_default();
        dst.extend(s.samples.iter().map(|&(t, raw)| (t, s.codec.value(raw))));
        dst.sort_by_key(|p| p.0);
    }
    out
}

/// Owns the FFT plans (power-of-two lengths only, so at most a few).
#[derive(Default)]
pub struct ValueFeatures {
    planner: Option<FftPlanner<f64>>,
}

impl std::fmt::Debug for ValueFeatures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ValueFeatures")
    }
}

impl ValueFeatures {
    /// Adds the features of one tag's window of values to `out`; `count`
    /// is the number captured (also when `values` is empty).
    pub fn add(&mut self, tag: &str, values: &[(i64, f64)], out: &mut BTreeMap<String, f64>) {
        let name = |f: &str| format!("{f}{{{tag}}}");
        out.insert(name("value_count"), values.len() as f64);
        let Some(&(_, last)) = values.last() else { return };
        let n = values.len() as f64;
        let mean = values.iter().map(|p| p.1).sum::<f64>() / n;
        let var = values.iter().map(|p| (p.1 - mean).powi(2)).sum::<f64>() / n;
        out.insert(name("value_mean"), mean);
        out.insert(name("value_std"), var.sqrt());
        out.insert(name("value_min"), values.iter().map(|p| p.1).fold(f64::INFINITY, f64::min));
        out.insert(name("value_max"), values.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max));
        out.insert(name("value_last"), last);
        out.insert(name("value_slope_per_s"), slope(values));
        for (b, rms) in self.bands(values).into_iter().flatten().enumerate() {
            out.insert(format!("value_band{}_rms{{{tag}}}", b + 1), rms);
        }
    }

    /// The RMS of each band of the spectrum of the window's last 2^k
    /// values (k as large as the window allows, up to BAND_MAX_VALUES),
    /// mean removed, taken as evenly spaced: the bands' squares add up to
    /// those values' variance. None below BAND_MIN_HZ or BAND_MIN_VALUES.
    fn bands(&mut self, values: &[(i64, f64)]) -> Option<[f64; BANDS]> {
        if values.len() < BAND_MIN_VALUES {
            return None;
        }
        let n = (1usize << values.len().ilog2()).min(BAND_MAX_VALUES);
        let part = &values[values.len() - n..];
        let span_s = (part[n - 1].0 - part[0].0) as f64 / 1000.0;
        if span_s <= 0.0 || (n - 1) as f64 / span_s < BAND_MIN_HZ {
            return None;
        }
        let mean = part.iter().map(|p| p.1).sum::<f64>() / n as f64;
        let mut buf: Vec<Complex<f64>> = part.iter().map(|p| Complex::new(p.1 - mean, 0.0)).collect();
        self.planner.get_or_insert_with(FftPlanner::new).plan_fft_forward(n).process(&mut buf);
        // One-sided power: bins 1..n/2, doubled but for the Nyquist bin.
        let half = n / 2;
        let mut energy = [0.0f64; BANDS];
        let n2 = (n * n) as f64;
        for (k, c) in buf.iter().enumerate().take(half + 1).skip(1) {
            let p = c.norm_sqr() / n2 * if k == half { 1.0 } else { 2.0 };
            let band = ((k - 1) * BANDS / half).min(BANDS - 1);
            energy[band] += p;
        }
        Some(energy.map(f64::sqrt))
    }
}

/// Least-squares slope of value over time, per second; 0 with fewer than
/// two distinct times.
pub fn slope(values: &[(i64, f64)]) -> f64 {
    let n = values.len() as f64;
    if values.len() < 2 {
        return 0.0;
    }
    let t0 = values[0].0;
    let ts = |p: &(i64, f64)| (p.0 - t0) as f64 / 1000.0;
    let mt = values.iter().map(ts).sum::<f64>() / n;
    let mv = values.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for p in values {
        let dt = ts(p) - mt;
        sxy += dt * (p.1 - mv);
        sxx += dt * dt;
    }
    if sxx > 0.0 {
        sxy / sxx
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(values: &[(i64, f64)]) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        ValueFeatures::default().add("t", values, &mut out);
        out
    }

    #[test]
    fn statistics_of_a_window_of_signed_values() {
        // -0.3 bar falling by 0.01 bar a second, read once a second.
        let vs: Vec<(i64, f64)> = (0..10).map(|i| (1_000 * i, -0.3 - 0.01 * i as f64)).collect();
        let f = features(&vs);
        let v = |n: &str| f[&format!("{n}{{t}}")];
        assert_eq!(v("value_count"), 10.0);
        assert!((v("value_mean") + 0.345).abs() < 1e-12);
        assert!((v("value_min") + 0.39).abs() < 1e-12 && (v("value_max") + 0.3).abs() < 1e-12);
        assert!((v("value_last") + 0.39).abs() < 1e-12);
        assert!((v("value_slope_per_s") + 0.01).abs() < 1e-12, "{}", v("value_slope_per_s"));
        let sd = (0..10).map(|i| (0.01 * (i as f64 - 4.5)).powi(2)).sum::<f64>() / 10.0;
        assert!((v("value_std") - sd.sqrt()).abs() < 1e-12);
        assert!(!f.contains_key("value_band1_rms{t}"), "1 Hz: no bands");
    }

    #[test]
    fn a_window_without_values_has_only_its_count() {
        let f = features(&[]);
        assert_eq!(f.into_iter().collect::<Vec<_>>(), [("value_count{t}".to_string(), 0.0)]);
        assert_eq!(slope(&[(5, 1.0), (5, 2.0)]), 0.0, "no time between them: no slope");
    }

    /// A 10 Hz vibration of 1e-4 g with a 4.375 Hz component (band 4 of
    /// (0, 5] Hz) and a 0.3125 Hz one (band 1): each band's RMS is its
    /// component's amplitude / sqrt(2); the squares add up to the variance.
    #[test]
    fn bands_split_the_variance_by_frequency() {
        let (a1, a4) = (2e-4, 1e-4);
        let vs: Vec<(i64, f64)> = (0..100)
            .map(|i| {
                let t = i as f64 / 10.0;
                let x = 5e-4
                    + a1 * (2.0 * std::f64::consts::PI * 0.3125 * t).sin()
                    + a4 * (2.0 * std::f64::consts::PI * 4.375 * t).sin();
                (100 * i, x)
            })
            .collect();
        let f = features(&vs);
        let b = |k: usize| f[&format!("value_band{k}_rms{{t}}")];
        // The last 64 values, 6.3 s: 0.3125 Hz is 2 cycles of them, 4.375 Hz 28.
        assert!((b(1) - a1 / 2f64.sqrt()).abs() < 1e-9, "band 1: {}", b(1));
        assert!((b(4) - a4 / 2f64.sqrt()).abs() < 1e-9, "band 4: {}", b(4));
        assert!(b(2) < 1e-12 && b(3) < 1e-12, "{} {}", b(2), b(3));
        let part = &vs[36..];
        let m = part.iter().map(|p| p.1).sum::<f64>() / 64.0;
        let var = part.iter().map(|p| (p.1 - m).powi(2)).sum::<f64>() / 64.0;
        assert!(((1..=4).map(|k| b(k).powi(2)).sum::<f64>() - var).abs() < 1e-15);
        // 4 Hz (too slow) or 15 values (too few): no bands.
        let slow: Vec<(i64, f64)> = (0..100).map(|i| (250 * i, (i % 3) as f64)).collect();
        assert!(!features(&slow).contains_key("value_band1_rms{t}"));
        assert!(!features(&vs[..15]).contains_key("value_band1_rms{t}"));
    }
}
