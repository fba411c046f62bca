//! Small latency statistics shared by the scenarios.

use std::time::Duration;

/// Nearest-rank quantiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    sorted: Vec<Duration>,
}

impl Latencies {
    /// Sorts the samples.
    pub fn new(mut samples: Vec<Duration>) -> Latencies {
        samples.sort_unstable();
        Latencies { sorted: samples }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The `q` quantile (nearest rank) in ms; 0 without samples.
    pub fn ms(&self, q: f64) -> f64 {
        if self.sorted.is_empty() {
            return 0.0;
        }
        let n = self.sorted.len();
        let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
        self.sorted[rank - 1].as_secs_f64() * 1e3
    }

    /// Mean in ms; 0 without samples.
    pub fn mean_ms(&self) -> f64 {
        if self.sorted.is_empty() {
            return 0.0;
        }
        let total: Duration = self.sorted.iter().sum();
        total.as_secs_f64() * 1e3 / self.sorted.len() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let l = Latencies::new((1..=100).rev().map(Duration::from_millis).collect());
        assert_eq!(l.len(), 100);
        assert!((l.ms(0.5) - 50.0).abs() < 1e-9);
        assert!((l.ms(0.99) - 99.0).abs() < 1e-9);
        assert!((l.ms(1.0) - 100.0).abs() < 1e-9);
        assert!((l.mean_ms() - 50.5).abs() < 1e-9);
        assert_eq!(Latencies::default().ms(0.5), 0.0);
    }
}
