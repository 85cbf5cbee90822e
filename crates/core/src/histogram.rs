//! A Prometheus histogram of durations, kept in atomics: what the node
//! measures (sends, transfers, deliveries) and what the store measures (its
//! journal's syncs) render the same way.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// Cumulative bucket counts, sum and count of observed durations.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Counts one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    /// How many durations were counted.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// How many durations were longer than the largest bucket bound not
    /// above `secs` (so pass one of [`BUCKETS`]).
    pub fn over(&self, secs: f64) -> u64 {
        let within: u64 = BUCKETS
            .iter()
            .zip(&self.buckets)
            .take_while(|(b, _)| **b <= secs)
            .map(|(_, n)| n.load(Ordering::Relaxed))
            .sum();
        // Read apart from the buckets: an observation under way may show
        // in one and not yet in the other.
        self.count().saturating_sub(within)
    }

    /// Appends the Prometheus text exposition of this histogram as `name`.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} histogram\n");
        let mut cumulative = 0;
        for (b, n) in BUCKETS.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let count = self.count();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = write!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}\n"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_the_sum_is_in_seconds() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(120));
        let mut out = String::new();
        h.render(&mut out, "x_seconds", "Test.");
        assert!(
            out.starts_with("# HELP x_seconds Test.\n# TYPE x_seconds histogram\n"),
            "{out}"
        );
        assert!(out.contains("x_seconds_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.025\"} 1\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"0.05\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"60\"} 2\n"), "{out}");
        assert!(out.contains("x_seconds_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("x_seconds_sum 120.0305\n"), "{out}");
        assert!(out.ends_with("x_seconds_count 3\n"), "{out}");
        assert_eq!(h.count(), 3);
        assert_eq!(
            (h.over(0.001), h.over(0.025), h.over(0.05), h.over(60.0)),
            (2, 2, 1, 1)
        );
    }
}
