//! What every probe's series are made of: samples of one window, and the
//! Prometheus histogram shape the kernel's log2 buckets are sent in.

use edge_wire::{Label, SeriesKey};

/// One window's samples, all taken at the window's time.
pub type Samples = Vec<(SeriesKey, f64)>;

/// A histogram's samples: cumulative `_bucket{le}` for log2 bounds of
/// `unit` (seconds per kernel unit), `_sum`, `_count`. `labels` must be
/// sorted by name; `le` is put in its place.
pub fn histogram(name: &str, labels: &[Label], buckets: &[u64], sum: u64, unit: f64, out: &mut Samples) {
    let with_le = |le: String| {
        let mut l = labels.to_vec();
        let at = l.iter().position(|x| x.name.as_str() > "le").unwrap_or(l.len());
        l.insert(at, Label::new("le", le));
        l
    };
    let count: u64 = buckets.iter().sum();
    let mut cumulative = 0;
    for (b, n) in buckets.iter().enumerate().take(buckets.len() - 1) {
        cumulative += n;
        let le = (1u64 << (b + 1)) as f64 * unit;
        out.push((SeriesKey::new(format!("{name}_bucket"), with_le(format!("{le}"))), cumulative as f64));
    }
    out.push((SeriesKey::new(format!("{name}_bucket"), with_le("+Inf".into())), count as f64));
    out.push((SeriesKey::new(format!("{name}_sum"), labels.to_vec()), sum as f64 * unit));
    out.push((SeriesKey::new(format!("{name}_count"), labels.to_vec()), count as f64));
}
