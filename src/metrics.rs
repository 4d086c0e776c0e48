//! Prometheus histograms without a registry: fixed buckets, atomic counts, rendered as
//! text by `operator_api`. Process-wide series (API latency by backend) live here too.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds in seconds, shared by every histogram here: from a fast API call to a
/// slow submission.
pub const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// A latency histogram.
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// A copy of a histogram's counts (per bucket, not cumulative).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    pub counts: Vec<u64>,
    pub count: u64,
    pub sum_seconds: f64,
}

impl Histogram {
    pub const fn new() -> Self {
        Self {
            counts: [const { AtomicU64::new(0) }; BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            d.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            count: self.count.load(Ordering::Relaxed),
            sum_seconds: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// Writes one histogram series (`labels` like `agent="ns/x"`) in the text format.
pub fn write_histogram(out: &mut String, name: &str, labels: &str, h: &HistogramSnapshot) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0;
    for (bound, n) in BUCKETS.iter().zip(&h.counts) {
        cumulative += n;
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
        );
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count{{{labels}}} {}", h.count);
}

/// Prefect API request latency, by backend (every attempt, retries included).
pub static API_LATENCY_PREFECT3: Histogram = Histogram::new();
pub static API_LATENCY_PREFECT1: Histogram = Histogram::new();

/// The histogram for a backend's API calls.
pub fn api_latency(backend: &str) -> &'static Histogram {
    match backend {
        "prefect1" => &API_LATENCY_PREFECT1,
        _ => &API_LATENCY_PREFECT3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_in_the_text() {
        let h = Histogram::new();
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(2));
        h.observe(Duration::from_secs(600));
        let mut out = String::new();
        write_histogram(&mut out, "x_seconds", "agent=\"a\"", &h.snapshot());
        assert!(out.contains("x_seconds_bucket{agent=\"a\",le=\"0.025\"} 0\n"));
        assert!(out.contains("x_seconds_bucket{agent=\"a\",le=\"0.05\"} 2\n"));
        assert!(out.contains("x_seconds_bucket{agent=\"a\",le=\"2.5\"} 3\n"));
        assert!(out.contains("x_seconds_bucket{agent=\"a\",le=\"60\"} 3\n"));
        assert!(out.contains("x_seconds_bucket{agent=\"a\",le=\"+Inf\"} 4\n"));
        assert!(out.contains("x_seconds_count{agent=\"a\"} 4\n"));
        assert!(out.contains("x_seconds_sum{agent=\"a\"} 602.06\n"));
    }
}
