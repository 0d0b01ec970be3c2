//! Latency percentiles.

use std::time::Duration;

/// Percentiles of a set of latency samples (nearest-rank: the value at or below which
/// that share of the samples lies; no interpolation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencySummary {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl LatencySummary {
    /// Summarizes `samples` (sorting them in place); `None` when there are none.
    pub fn of(samples: &mut [Duration]) -> Option<LatencySummary> {
        samples.sort_unstable();
        let max = *samples.last()?;
        Some(LatencySummary {
            count: samples.len(),
            p50: nearest_rank(samples, 50),
            p99: nearest_rank(samples, 99),
            max,
        })
    }
}

/// The `percent`-th percentile of sorted, non-empty `samples`.
fn nearest_rank(sorted: &[Duration], percent: usize) -> Duration {
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

/// Milliseconds, as a float.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Milliseconds from `a` to `b`, negative when `b` came first.
pub fn signed_ms(a: std::time::Instant, b: std::time::Instant) -> f64 {
    if b >= a { ms(b - a) } else { -ms(a - b) }
}

/// Nearest-rank percentile of sorted, non-empty samples.
pub fn rank(sorted: &[f64], percent: usize) -> f64 {
    let r = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[r - 1]
}

/// Prints a p50/p90/p99/max table of millisecond samples (sorting them), one row per
/// `(label, key, samples)`, then a `N unit; summary key_p50=.. key_p99=..` line for scripts.
pub fn print_table(unit: &str, rows: &mut [(&str, &str, Vec<f64>)]) {
    println!(
        "{:<32} {:>8} {:>8} {:>8} {:>8}",
        "(ms, nearest rank)", "p50", "p90", "p99", "max"
    );
    let mut summary = String::from("summary");
    let mut n = 0;
    for (name, key, v) in rows.iter_mut() {
        v.sort_by(f64::total_cmp);
        n = v.len();
        if v.is_empty() {
            continue;
        }
        let (p50, p90, p99) = (rank(v, 50), rank(v, 90), rank(v, 99));
        let max = v.last().copied().unwrap_or(f64::NAN);
        println!("{name:<32} {p50:>8.2} {p90:>8.2} {p99:>8.2} {max:>8.2}");
        summary.push_str(&format!(" {key}_p50={p50:.3} {key}_p99={p99:.3}"));
    }
    println!("{n} {unit}; {summary}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms = Duration::from_millis;
        let mut samples: Vec<Duration> = (1..=200).rev().map(ms).collect();
        let s = LatencySummary::of(&mut samples).unwrap();
        assert_eq!(
            (s.count, s.p50, s.p99, s.max),
            (200, ms(100), ms(198), ms(200))
        );
        assert_eq!(
            LatencySummary::of(&mut [ms(7)]).unwrap(),
            LatencySummary {
                count: 1,
                p50: ms(7),
                p99: ms(7),
                max: ms(7)
            }
        );
        assert_eq!(LatencySummary::of(&mut []), None);
    }
}
