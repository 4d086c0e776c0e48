//! The operator's own HTTP endpoints, for probes and Prometheus:
//! `GET /healthz` (the process serves), `GET /readyz` (leading, synced with Kubernetes
//! and the Kubernetes API reachable; a standby replica is healthy but not ready;
//! `/readyz?standby=ok` also accepts a standby that reaches Kubernetes, which is what the
//! chart's readiness probe asks, so that rolling updates of several replicas finish) and
//! `GET /metrics` (each agent's counters, labelled `agent="namespace/name"`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::agent::stats::StatsSnapshot;
use crate::metrics::{HistogramSnapshot, api_latency, write_histogram};

/// What the probes report; set by the operator's main loop.
#[derive(Debug, Default)]
pub struct Readiness {
    pub leading: AtomicBool,
    pub synced: AtomicBool,
    pub api_reachable: AtomicBool,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
            && self.synced.load(Ordering::Relaxed)
            && self.api_reachable.load(Ordering::Relaxed)
    }

    /// Ready to take over: a standby that reaches Kubernetes (or a ready leader).
    pub fn is_ready_or_standing_by(&self) -> bool {
        self.is_ready()
            || (!self.leading.load(Ordering::Relaxed) && self.api_reachable.load(Ordering::Relaxed))
    }

    /// Why not ready, for the probe's body.
    fn reason(&self) -> &'static str {
        if !self.leading.load(Ordering::Relaxed) {
            "standby: another replica leads"
        } else if !self.api_reachable.load(Ordering::Relaxed) {
            "the Kubernetes API is unreachable"
        } else if !self.synced.load(Ordering::Relaxed) {
            "not synced with Kubernetes yet"
        } else {
            "ready"
        }
    }
}

/// One agent's figures.
#[derive(Clone, Debug, Default)]
pub struct AgentMetrics {
    /// `namespace/name`.
    pub agent: String,
    pub stats: StatsSnapshot,
    pub active_jobs: usize,
    pub submission_latency: HistogramSnapshot,
}

/// The controller's own figures.
#[derive(Clone, Debug, Default)]
pub struct ControllerMetrics {
    pub reconciles: u64,
    pub reconcile_errors: u64,
    pub reconcile_duration: HistogramSnapshot,
}

/// Where metrics come from.
pub trait MetricsSource: Send + Sync + 'static {
    fn agents(&self) -> Vec<AgentMetrics>;
    fn controller(&self) -> ControllerMetrics;
}

#[derive(Clone)]
struct AppState {
    readiness: Arc<Readiness>,
    metrics: Arc<dyn MetricsSource>,
}

/// Prometheus text exposition of the agents' and the controller's figures.
pub fn render_metrics(agents: &[AgentMetrics], controller: &ControllerMetrics) -> String {
    type Field = fn(&StatsSnapshot) -> u64;
    let counters: [(&str, &str, Field); 8] = [
        (
            "prefect_agent_polls_total",
            "Polls of Prefect for due runs.",
            |s| s.polls,
        ),
        (
            "prefect_agent_poll_errors_total",
            "Polls that failed.",
            |s| s.poll_errors,
        ),
        (
            "prefect_agent_runs_claimed_total",
            "Claims this agent won.",
            |s| s.runs_claimed,
        ),
        (
            "prefect_agent_claim_conflicts_total",
            "Claims another agent or worker won first.",
            |s| s.claim_conflicts,
        ),
        (
            "prefect_agent_runs_submitted_total",
            "Flow runs launched.",
            |s| s.runs_submitted,
        ),
        (
            "prefect_agent_runs_failed_total",
            "Flow runs that could not be started or whose infrastructure failed (crashed).",
            |s| s.runs_failed,
        ),
        (
            "prefect_agent_runs_cancelled_total",
            "Flow runs cancelled.",
            |s| s.runs_cancelled,
        ),
        (
            "prefect_agent_runs_adopted_total",
            "Claimed but unlaunched runs launched again.",
            |s| s.runs_adopted,
        ),
    ];
    let mut out = String::new();
    for (name, help, field) in counters {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for a in agents {
            let _ = writeln!(
                out,
                "{name}{{agent=\"{}\"}} {}",
                escape(&a.agent),
                field(&a.stats)
            );
        }
    }
    type Gauge = fn(&AgentMetrics) -> u64;
    let gauges: [(&str, &str, Gauge); 2] = [
        (
            "prefect_agent_active_jobs",
            "Jobs of the agent not finished yet.",
            |a| a.active_jobs as u64,
        ),
        (
            "prefect_agent_registered",
            "1 when the agent is registered with Prefect.",
            |a| u64::from(a.stats.agent_id.is_some()),
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for a in agents {
            let _ = writeln!(out, "{name}{{agent=\"{}\"}} {}", escape(&a.agent), value(a));
        }
    }
    let name = "prefect_agent_submission_latency_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} From a run's scheduled time to its infrastructure created.\n# TYPE {name} histogram"
    );
    for a in agents {
        let labels = format!("agent=\"{}\"", escape(&a.agent));
        write_histogram(&mut out, name, &labels, &a.submission_latency);
    }
    for (name, help, value) in [
        (
            "prefect_agent_operator_reconciles_total",
            "PrefectAgent reconciles.",
            controller.reconciles,
        ),
        (
            "prefect_agent_operator_reconcile_errors_total",
            "Reconciles that failed.",
            controller.reconcile_errors,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    let name = "prefect_agent_operator_reconcile_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time per reconcile.\n# TYPE {name} histogram"
    );
    write_histogram(&mut out, name, "", &controller.reconcile_duration);
    let name = "prefect_api_request_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Prefect API requests (each attempt), by backend.\n# TYPE {name} histogram"
    );
    for backend in ["prefect3", "prefect1"] {
        let labels = format!("backend=\"{backend}\"");
        write_histogram(&mut out, name, &labels, &api_latency(backend).snapshot());
    }
    out
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn healthz() -> &'static str {
    "ok"
}

/// `?standby=ok` on `/readyz`.
#[derive(Debug, Default, serde::Deserialize)]
struct ReadyzQuery {
    standby: Option<String>,
}

async fn readyz(
    State(state): State<AppState>,
    axum::extract::Query(query): axum::extract::Query<ReadyzQuery>,
) -> impl IntoResponse {
    let standby_ok = query.standby.as_deref() == Some("ok");
    let ready = if standby_ok {
        state.readiness.is_ready_or_standing_by()
    } else {
        state.readiness.is_ready()
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, state.readiness.reason())
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        render_metrics(&state.metrics.agents(), &state.metrics.controller()),
    )
}

/// Binds the address (an error names it) and serves until `stop`.
pub async fn serve(
    address: SocketAddr,
    readiness: Arc<Readiness>,
    source: Arc<dyn MetricsSource>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            readiness,
            metrics: source,
        });
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the operator's HTTP endpoint stopped");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_prometheus_text_per_agent() {
        let s = StatsSnapshot {
            agent_id: Some("w1".into()),
            polls: 7,
            poll_errors: 1,
            runs_submitted: 3,
            runs_failed: 0,
            runs_cancelled: 0,
            runs_adopted: 0,
            runs_claimed: 3,
            claim_conflicts: 4,
            last_poll_time: None,
            last_error: None,
        };
        let latency = crate::metrics::Histogram::new();
        latency.observe(std::time::Duration::from_millis(80));
        let agent = AgentMetrics {
            agent: "data/etl".into(),
            stats: s,
            active_jobs: 2,
            submission_latency: latency.snapshot(),
        };
        let controller = ControllerMetrics {
            reconciles: 9,
            ..ControllerMetrics::default()
        };
        let text = render_metrics(&[agent], &controller);
        assert!(text.contains("prefect_agent_claim_conflicts_total{agent=\"data/etl\"} 4\n"));
        assert!(text.contains(
            "prefect_agent_submission_latency_seconds_bucket{agent=\"data/etl\",le=\"0.1\"} 1\n"
        ));
        assert!(text.contains("prefect_agent_operator_reconciles_total 9\n"));
        assert!(text.contains("prefect_api_request_duration_seconds_count{backend=\"prefect1\"}"));
        assert!(text.contains("# TYPE prefect_agent_polls_total counter\nprefect_agent_polls_total{agent=\"data/etl\"} 7\n"));
        assert!(text.contains("prefect_agent_active_jobs{agent=\"data/etl\"} 2\n"));
        assert!(text.contains("prefect_agent_registered{agent=\"data/etl\"} 1\n"));
        assert_eq!(escape("a\"b"), "a\\\"b");
    }

    #[test]
    fn ready_only_when_leading_synced_and_connected() {
        let r = Readiness::default();
        assert!(!r.is_ready());
        assert_eq!(r.reason(), "standby: another replica leads");
        r.leading.store(true, Ordering::Relaxed);
        r.api_reachable.store(true, Ordering::Relaxed);
        assert_eq!(r.reason(), "not synced with Kubernetes yet");
        r.synced.store(true, Ordering::Relaxed);
        assert!(r.is_ready());
    }

    #[test]
    fn a_standby_that_reaches_kubernetes_stands_by() {
        let r = Readiness::default();
        assert!(!r.is_ready_or_standing_by(), "not connected yet");
        r.api_reachable.store(true, Ordering::Relaxed);
        assert!(!r.is_ready() && r.is_ready_or_standing_by());
        // A leader still syncing is not ready in either sense.
        r.leading.store(true, Ordering::Relaxed);
        assert!(!r.is_ready_or_standing_by());
        r.synced.store(true, Ordering::Relaxed);
        assert!(r.is_ready_or_standing_by());
    }
}
