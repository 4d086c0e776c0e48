//! The operator's own HTTP endpoints, for probes and Prometheus:
//! `GET /healthz` (the process serves), `GET /readyz` (leading, synced with Kubernetes
//! and the Kubernetes API reachable; a standby replica is healthy but not ready;
//! `/readyz?standby=ok` also accepts a standby that reaches Kubernetes, which is what the
//! chart's readiness probe asks, so that rolling updates of several replicas finish) and
//! `GET /metrics` (each agent's counters, labelled `agent="namespace/name"`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::agent::stats::StatsSnapshot;
use prometheus::core::{Collector, Desc, Metric as _};
use prometheus::proto::{self, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{IntCounter, Registry, TextEncoder};

use crate::metrics::{API_LATENCY, SUBMISSION_LATENCY, latency_histogram};

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
            "not synced with Kubernetes (the PrefectAgent list or watch fails)"
        } else {
            "ready"
        }
    }
}

/// One agent's figures.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    /// `namespace/name`.
    pub agent: String,
    pub stats: StatsSnapshot,
    pub active_jobs: usize,
    pub submission_latency: prometheus::Histogram,
}

/// The controller's own figures, registered with the agents'.
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    pub reconciles: IntCounter,
    pub reconcile_errors: IntCounter,
    pub reconcile_duration: prometheus::Histogram,
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        // Constant names: an invariant, built by every unit test of this module.
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid counter");
        Self {
            reconciles: counter(
                "prefect_agent_operator_reconciles_total",
                "PrefectAgent reconciles.",
            ),
            reconcile_errors: counter(
                "prefect_agent_operator_reconcile_errors_total",
                "Reconciles that failed.",
            ),
            reconcile_duration: latency_histogram(
                "prefect_agent_operator_reconcile_duration_seconds",
                "Time per reconcile.",
            ),
        }
    }
}

/// Where the agents' figures come from.
pub trait MetricsSource: Send + Sync + 'static {
    fn agents(&self) -> Vec<AgentMetrics>;
}

#[derive(Clone)]
struct AppState {
    readiness: Arc<Readiness>,
    registry: Registry,
    agents: Arc<dyn MetricsSource>,
}

type Field = fn(&AgentMetrics) -> f64;

/// The agents' series: name, help, type, value.
const AGENT_SERIES: [(&str, &str, MetricType, Field); 11] = [
    (
        "prefect_agent_polls_total",
        "Polls of Prefect for due runs.",
        MetricType::COUNTER,
        |a| a.stats.polls as f64,
    ),
    (
        "prefect_agent_poll_errors_total",
        "Polls that failed.",
        MetricType::COUNTER,
        |a| a.stats.poll_errors as f64,
    ),
    (
        "prefect_agent_runs_claimed_total",
        "Claims this agent won.",
        MetricType::COUNTER,
        |a| a.stats.runs_claimed as f64,
    ),
    (
        "prefect_agent_claims_checked_by_history_total",
        "Claims won whose answer left it open, proven by the run's state history.",
        MetricType::COUNTER,
        |a| a.stats.claims_checked_by_history as f64,
    ),
    (
        "prefect_agent_claim_conflicts_total",
        "Claims another agent or worker won first.",
        MetricType::COUNTER,
        |a| a.stats.claim_conflicts as f64,
    ),
    (
        "prefect_agent_runs_submitted_total",
        "Flow runs launched.",
        MetricType::COUNTER,
        |a| a.stats.runs_submitted as f64,
    ),
    (
        "prefect_agent_runs_failed_total",
        "Flow runs that could not be started or whose infrastructure failed (crashed).",
        MetricType::COUNTER,
        |a| a.stats.runs_failed as f64,
    ),
    (
        "prefect_agent_runs_cancelled_total",
        "Flow runs cancelled.",
        MetricType::COUNTER,
        |a| a.stats.runs_cancelled as f64,
    ),
    (
        "prefect_agent_runs_adopted_total",
        "Claimed but unlaunched runs launched again.",
        MetricType::COUNTER,
        |a| a.stats.runs_adopted as f64,
    ),
    (
        "prefect_agent_active_jobs",
        "Jobs of the agent not finished yet.",
        MetricType::GAUGE,
        |a| a.active_jobs as f64,
    ),
    (
        "prefect_agent_registered",
        "1 when the agent is registered with Prefect.",
        MetricType::GAUGE,
        |a| if a.stats.agent_id.is_some() { 1.0 } else { 0.0 },
    ),
];

/// The agents' figures, read from their counters when scraped, labelled `agent`.
struct AgentsCollector {
    source: Weak<dyn MetricsSource>,
    descs: Vec<Desc>,
}

impl AgentsCollector {
    fn new(source: Weak<dyn MetricsSource>) -> Self {
        let descs = AGENT_SERIES
            .iter()
            .map(|(name, help, _, _)| (*name, *help))
            .chain([SUBMISSION_LATENCY])
            .map(|(name, help)| {
                // Constant names and label: an invariant, built by a unit test.
                Desc::new(
                    name.into(),
                    help.into(),
                    vec!["agent".into()],
                    HashMap::new(),
                )
                .expect("valid metric description")
            })
            .collect();
        Self { source, descs }
    }
}

impl Collector for AgentsCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let agents = self
            .source
            .upgrade()
            .map(|s| s.agents())
            .unwrap_or_default();
        let label = |a: &AgentMetrics| {
            let mut l = LabelPair::default();
            l.set_name("agent".into());
            l.set_value(a.agent.clone());
            vec![l]
        };
        let family = |name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>| {
            let mut f = MetricFamily::default();
            f.set_name(name.into());
            f.set_help(help.into());
            f.set_field_type(kind);
            f.set_metric(metrics);
            f
        };
        let mut out: Vec<MetricFamily> = AGENT_SERIES
            .iter()
            .map(|(name, help, kind, value)| {
                let metrics = agents
                    .iter()
                    .map(|a| {
                        let mut m = Metric::from_label(label(a));
                        if *kind == MetricType::COUNTER {
                            let mut c = proto::Counter::default();
                            c.set_value(value(a));
                            m.set_counter(c);
                        } else {
                            let mut g = proto::Gauge::default();
                            g.set_value(value(a));
                            m.set_gauge(g);
                        }
                        m
                    })
                    .collect();
                family(name, help, *kind, metrics)
            })
            .collect();
        let latencies = agents
            .iter()
            .map(|a| {
                let mut m = a.submission_latency.metric();
                m.set_label(label(a));
                m
            })
            .collect();
        let (name, help) = SUBMISSION_LATENCY;
        out.push(family(name, help, MetricType::HISTOGRAM, latencies));
        out
    }
}

/// One registry for `/metrics`: the agents' figures from `source`, the controller's, and
/// the Prefect API's latency.
pub fn registry(source: Weak<dyn MetricsSource>, controller: &ControllerMetrics) -> Registry {
    let registry = Registry::new();
    let collectors: [Box<dyn Collector>; 7] = [
        Box::new(AgentsCollector::new(source)),
        Box::new(controller.reconciles.clone()),
        Box::new(controller.reconcile_errors.clone()),
        Box::new(controller.reconcile_duration.clone()),
        Box::new(API_LATENCY.clone()),
        Box::new(crate::metrics::SYNCS.clone()),
        Box::new(crate::metrics::DRIFT_CORRECTIONS.clone()),
    ];
    for c in collectors {
        // Distinct constant names: registering cannot clash (a unit test registers them).
        if let Err(e) = registry.register(c) {
            tracing::error!(error = %e, "a metric could not be registered");
        }
    }
    registry
}

/// The registry in Prometheus' text format.
pub fn render_metrics(registry: &Registry) -> String {
    TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_else(|e| format!("# the metrics could not be encoded: {e}\n"))
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
        render_metrics(&state.registry),
    )
}

/// One agent's health, as the standalone agent serves it at `agent_address`: the
/// operator serves every agent's on its own port instead of a listener per resource.
async fn agent_health(
    State(state): State<AppState>,
    axum::extract::Path((namespace, name)): axum::extract::Path<(String, String)>,
) -> axum::response::Response {
    let key = format!("{namespace}/{name}");
    match state.agents.agents().into_iter().find(|a| a.agent == key) {
        Some(a) => axum::Json(serde_json::json!(a.stats)).into_response(),
        None => (
            axum::http::StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({"error": format!("no agent runs for {key}")})),
        )
            .into_response(),
    }
}

/// Binds the address (an error names it) and serves until `stop`.
pub async fn serve(
    address: SocketAddr,
    readiness: Arc<Readiness>,
    registry: Registry,
    agents: Arc<dyn MetricsSource>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, std::io::Error> {
    let listener = tokio::net::TcpListener::bind(address).await?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/agents/{namespace}/{name}/health", get(agent_health))
        .with_state(AppState {
            readiness,
            registry,
            agents,
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

    struct Agents(Vec<AgentMetrics>);

    impl MetricsSource for Agents {
        fn agents(&self) -> Vec<AgentMetrics> {
            self.0.clone()
        }
    }

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
            ..StatsSnapshot::default()
        };
        let latency = latency_histogram(SUBMISSION_LATENCY.0, SUBMISSION_LATENCY.1);
        latency.observe(0.08);
        let agent = AgentMetrics {
            agent: "data/etl".into(),
            stats: s,
            active_jobs: 2,
            submission_latency: latency,
        };
        let source: Arc<dyn MetricsSource> = Arc::new(Agents(vec![agent]));
        let controller = ControllerMetrics::default();
        for _ in 0..9 {
            controller.reconciles.inc();
        }
        let registry = registry(Arc::downgrade(&source), &controller);
        let text = render_metrics(&registry);
        assert!(text.contains("prefect_agent_claim_conflicts_total{agent=\"data/etl\"} 4\n"));
        assert!(text.contains("prefect_sync_total{kind=\"PrefectWorkPool\",outcome=\"failed\"}"));
        assert!(text.contains("prefect_sync_drift_corrections_total{kind=\"PrefectWorkPool\"}"));
        assert!(text.contains(
            "prefect_agent_submission_latency_seconds_bucket{agent=\"data/etl\",le=\"0.1\"} 1\n"
        ));
        assert!(text.contains(
            "prefect_agent_submission_latency_seconds_bucket{agent=\"data/etl\",le=\"0.05\"} 0\n"
        ));
        assert!(text.contains("prefect_agent_operator_reconciles_total 9\n"));
        assert!(text.contains("prefect_api_request_duration_seconds_count{backend=\"prefect1\"}"));
        assert!(text.contains("# TYPE prefect_agent_polls_total counter\nprefect_agent_polls_total{agent=\"data/etl\"} 7\n"));
        assert!(text.contains("prefect_agent_active_jobs{agent=\"data/etl\"} 2\n"));
        assert!(text.contains("prefect_agent_registered{agent=\"data/etl\"} 1\n"));
        // Label values are escaped by the encoder.
        let odd: Arc<dyn MetricsSource> = Arc::new(Agents(vec![AgentMetrics {
            agent: "a\"b".into(),
            stats: StatsSnapshot::default(),
            active_jobs: 0,
            submission_latency: latency_histogram("x", "x"),
        }]));
        let text = render_metrics(&registry_for(&odd));
        assert!(
            text.contains("prefect_agent_polls_total{agent=\"a\\\"b\"} 0\n"),
            "{text}"
        );
        // No agents: no agent series, the rest still there.
        let none: Arc<dyn MetricsSource> = Arc::new(Agents(Vec::new()));
        let text = render_metrics(&registry_for(&none));
        assert!(!text.contains("prefect_agent_polls_total"));
        assert!(text.contains("prefect_agent_operator_reconciles_total 0\n"));
    }

    fn registry_for(source: &Arc<dyn MetricsSource>) -> Registry {
        registry(Arc::downgrade(source), &ControllerMetrics::default())
    }

    #[test]
    fn ready_only_when_leading_synced_and_connected() {
        let r = Readiness::default();
        assert!(!r.is_ready());
        assert_eq!(r.reason(), "standby: another replica leads");
        r.leading.store(true, Ordering::Relaxed);
        r.api_reachable.store(true, Ordering::Relaxed);
        assert_eq!(
            r.reason(),
            "not synced with Kubernetes (the PrefectAgent list or watch fails)"
        );
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
