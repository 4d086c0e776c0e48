//! The operator's own HTTP endpoints, for probes and Prometheus:
//! `GET /healthz` (the process serves), `GET /readyz` (leading, synced with Kubernetes
//! and the Kubernetes API reachable; a standby replica is healthy but not ready) and
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

/// Where metrics come from: one snapshot per agent, with its live Job count.
pub trait MetricsSource: Send + Sync + 'static {
    fn agents(&self) -> Vec<(String, StatsSnapshot, usize)>;
}

#[derive(Clone)]
struct AppState {
    readiness: Arc<Readiness>,
    metrics: Arc<dyn MetricsSource>,
}

/// Prometheus text exposition of the agents' counters.
pub fn render_metrics(agents: &[(String, StatsSnapshot, usize)]) -> String {
    type Field = fn(&StatsSnapshot) -> u64;
    let counters: [(&str, &str, Field); 6] = [
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
            "prefect_agent_runs_submitted_total",
            "Flow runs launched.",
            |s| s.runs_submitted,
        ),
        (
            "prefect_agent_runs_failed_total",
            "Flow runs that could not be started or whose infrastructure failed.",
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
        for (agent, s, _) in agents {
            let _ = writeln!(out, "{name}{{agent=\"{}\"}} {}", escape(agent), field(s));
        }
    }
    let _ = writeln!(
        out,
        "# HELP prefect_agent_active_jobs Jobs of the agent not finished yet.\n# TYPE prefect_agent_active_jobs gauge"
    );
    for (agent, _, active) in agents {
        let _ = writeln!(
            out,
            "prefect_agent_active_jobs{{agent=\"{}\"}} {active}",
            escape(agent)
        );
    }
    let _ = writeln!(
        out,
        "# HELP prefect_agent_registered 1 when the agent is registered with Prefect.\n# TYPE prefect_agent_registered gauge"
    );
    for (agent, s, _) in agents {
        let up = u8::from(s.agent_id.is_some());
        let _ = writeln!(
            out,
            "prefect_agent_registered{{agent=\"{}\"}} {up}",
            escape(agent)
        );
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

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let status = if state.readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, state.readiness.reason())
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        render_metrics(&state.metrics.agents()),
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
            last_poll_time: None,
            last_error: None,
        };
        let text = render_metrics(&[("data/etl".into(), s, 2)]);
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
}
