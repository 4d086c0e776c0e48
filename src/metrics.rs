//! Metrics on the `prometheus` crate: latency histograms with the operator's buckets and
//! the Prefect API's latency by backend. `operator_api` gathers them with the agents'
//! counters into one registry and encodes it for `GET /metrics`.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, Opts};

/// Upper bounds in seconds, shared by every histogram here: from a fast API call to a
/// slow submission.
pub const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// Name and help of each agent's submission latency (`AgentStats`, `/metrics`).
pub const SUBMISSION_LATENCY: (&str, &str) = (
    "prefect_agent_submission_latency_seconds",
    "From a run's scheduled time to its infrastructure created.",
);

fn opts(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(BUCKETS.to_vec())
}

/// A latency histogram with [`BUCKETS`]; its owner collects it.
pub fn latency_histogram(name: &str, help: &str) -> Histogram {
    // Only this module's constant names and buckets reach here; a unit test builds each.
    Histogram::with_opts(opts(name, help)).expect("valid histogram options")
}

/// Records one duration.
pub fn observe(histogram: &Histogram, d: Duration) {
    histogram.observe(d.as_secs_f64());
}

/// Prefect API request latency, by backend (every attempt, retries included).
pub static API_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    let opts = opts(
        "prefect_api_request_duration_seconds",
        "Prefect API requests (each attempt), by backend.",
    );
    // A constant name, label and buckets: an invariant, built by a unit test.
    let vec = HistogramVec::new(opts, &["backend"]).expect("valid histogram options");
    // Both series exist from the start, at zero.
    for backend in BACKENDS {
        vec.with_label_values(&[backend]);
    }
    vec
});

/// Syncs of declared Prefect objects, by kind and outcome (`synced`, `failed`).
pub static SYNCS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let opts = Opts::new(
        "prefect_sync_total",
        "Syncs of PrefectWorkPools and PrefectDeployments with Prefect, by kind and outcome.",
    );
    // A constant name and labels: an invariant, built by a unit test.
    let vec = IntCounterVec::new(opts, &["kind", "outcome"]).expect("valid counter options");
    for kind in SYNCED_KINDS {
        for outcome in ["synced", "failed"] {
            vec.with_label_values(&[kind, outcome]);
        }
    }
    vec
});

/// Changes made in Prefect behind the operator's back and put back, by kind.
pub static DRIFT_CORRECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    let opts = Opts::new(
        "prefect_sync_drift_corrections_total",
        "Fields or queues changed in Prefect behind the operator's back and put back.",
    );
    let vec = IntCounterVec::new(opts, &["kind"]).expect("valid counter options");
    for kind in SYNCED_KINDS {
        vec.with_label_values(&[kind]);
    }
    vec
});

/// The kinds the sync controllers keep in Prefect.
const SYNCED_KINDS: [&str; 2] = ["PrefectWorkPool", "PrefectDeployment"];

/// The values of the `backend` label.
const BACKENDS: [&str; 2] = ["prefect3", "prefect1"];

/// The histogram for a backend's API calls.
pub fn api_latency(backend: &str) -> Histogram {
    let backend = BACKENDS
        .into_iter()
        .find(|b| *b == backend)
        .unwrap_or(BACKENDS[0]);
    API_LATENCY.with_label_values(&[backend])
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::core::{Collector, Metric};

    #[test]
    fn histograms_use_the_operator_s_buckets() {
        let h = latency_histogram("x_seconds", "x");
        observe(&h, Duration::from_millis(30));
        observe(&h, Duration::from_secs(600));
        let m = h.metric();
        let bounds: Vec<f64> = m
            .get_histogram()
            .get_bucket()
            .iter()
            .map(|b| b.upper_bound())
            .collect();
        assert_eq!(bounds, BUCKETS);
        assert_eq!(m.get_histogram().get_sample_count(), 2);
        let families = API_LATENCY.collect();
        assert_eq!(
            families[0].get_metric().len(),
            2,
            "both backends, from the start"
        );
        api_latency("prefect1").observe(0.1);
        api_latency("unknown").observe(0.1);
    }
}
