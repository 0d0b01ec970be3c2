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
