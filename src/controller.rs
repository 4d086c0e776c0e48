//! The operator: a kube-runtime Controller over `PrefectAgent`. A supervisor runs one
//! agent task per resource, restarts it when the spec (generation) changes, stops it on
//! delete or `suspend`; status is written whole by server-side apply from what was observed.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics::{Histogram, HistogramSnapshot};
use crate::operator_api::{AgentMetrics, ControllerMetrics, MetricsSource};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent::stats::{AgentStats, StatsSnapshot};
use crate::agent::{Agent, AgentConfig};
use crate::backend::Backend;
use crate::backend::http::{Auth, RetryPolicy};
use crate::backend::prefect1::{Prefect1, Prefect1Config};
use crate::backend::prefect3::{Prefect3, Prefect3Config};
use crate::crd::{Flavor, PrefectAgent, PrefectAgentSpec, PrefectAgentStatus, SecretKeyRef};
use crate::deploy::kubernetes::KubernetesDeployer;
use crate::deploy::kubernetes::job::agent_label;
use crate::deploy::kubernetes::observe::JobObserver;
use crate::scope::Scope;
use crate::secret::SecretString;

/// The finalizer that lets the operator stop an agent before its resource goes.
pub const FINALIZER: &str = "prefect.io/agent";
/// The field manager of every status write.
pub const FIELD_MANAGER: &str = crate::APP_NAME;
/// How often status is refreshed while nothing changes.
const STATUS_INTERVAL: Duration = Duration::from_secs(5);
/// How long a failed agent waits before the supervisor starts it again: doubling from
/// the first, up to the last; an agent that ran this long counts as healthy again.
const RESTART_FIRST: Duration = Duration::from_secs(10);
const RESTART_MAX: Duration = Duration::from_secs(300);
const HEALTHY_AFTER: Duration = Duration::from_secs(600);

/// The wait before restarting an agent that failed `failures` times in a row (≥ 1).
pub fn restart_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    RESTART_FIRST
        .saturating_mul(1 << doublings)
        .min(RESTART_MAX)
}

/// Errors of one reconcile, each with a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    /// Publishes Kubernetes Events on the resources.
    pub recorder: Recorder,
    pub observer: Arc<JobObserver>,
    pub supervisor: Supervisor,
    pub retry: RetryPolicy,
    pub reconciles: AtomicU64,
    pub reconcile_errors: AtomicU64,
    pub reconcile_duration: Histogram,
    /// Where resources may put their Jobs.
    pub scope: Scope,
}

/// One running agent task.
struct Running {
    generation: Option<i64>,
    token: CancellationToken,
    stats: Arc<AgentStats>,
    handle: JoinHandle<()>,
    started: Instant,
    /// Failed runs of this generation in a row, counting this one once it ends.
    failures: u32,
    /// When the supervisor first saw this task ended.
    ended: Option<Instant>,
}

/// Agent tasks by `namespace/name`.
#[derive(Default)]
pub struct Supervisor {
    agents: Mutex<HashMap<String, Running>>,
}

/// What the supervisor knows about one resource's agent, for its status.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentPhase {
    /// Not started: the resource is suspended.
    Suspended,
    /// The spec cannot be run as it is; reason and message.
    Invalid {
        reason: &'static str,
        message: String,
    },
    /// The agent task runs; `stats` says how far it got.
    Running { stats: StatsSnapshot },
    /// The agent task ended with this error and will be restarted after `retry_in`.
    Failed { message: String, retry_in: Duration },
}

impl Supervisor {
    fn stop(&self, key: &str) {
        if let Some(r) = self.agents.lock().ok().and_then(|mut a| a.remove(key)) {
            r.token.cancel();
        }
    }

    /// The running agent for `key` if it runs the given generation and has not failed.
    fn current(&self, key: &str, generation: Option<i64>) -> Option<AgentPhase> {
        let mut agents = self.agents.lock().ok()?;
        let r = agents.get_mut(key)?;
        if r.generation != generation {
            return None;
        }
        if r.handle.is_finished() {
            let last = r
                .stats
                .snapshot()
                .last_error
                .unwrap_or_else(|| "the agent stopped".into());
            let ended = *r.ended.get_or_insert_with(Instant::now);
            let retry_in = restart_delay(r.failures + 1);
            if ended.elapsed() < retry_in {
                return Some(AgentPhase::Failed {
                    message: last,
                    retry_in,
                });
            }
            return None;
        }
        Some(AgentPhase::Running {
            stats: r.stats.snapshot(),
        })
    }

    fn start(
        &self,
        key: String,
        generation: Option<i64>,
        token: CancellationToken,
        stats: Arc<AgentStats>,
        handle: JoinHandle<()>,
    ) {
        let Ok(mut agents) = self.agents.lock() else {
            return;
        };
        // A restart of the same generation after a quick failure backs off further.
        let failures = match agents.get(&key) {
            Some(old)
                if old.generation == generation
                    && old.handle.is_finished()
                    && old.started.elapsed() < HEALTHY_AFTER =>
            {
                old.failures + 1
            }
            _ => 0,
        };
        let running = Running {
            generation,
            token,
            stats,
            handle,
            started: Instant::now(),
            failures,
            ended: None,
        };
        if let Some(old) = agents.insert(key, running) {
            old.token.cancel();
        }
    }

    /// Each running agent's counters, by `namespace/name`.
    pub fn snapshots(&self) -> Vec<(String, StatsSnapshot, HistogramSnapshot)> {
        let Ok(agents) = self.agents.lock() else {
            return Vec::new();
        };
        let mut out: Vec<_> = agents
            .iter()
            .map(|(k, r)| {
                let latency = r.stats.submission_latency.snapshot();
                (k.clone(), r.stats.snapshot(), latency)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Stops every agent (operator shutdown).
    pub fn stop_all(&self) {
        if let Ok(mut agents) = self.agents.lock() {
            for (_, r) in agents.drain() {
                r.token.cancel();
            }
        }
    }
}

/// A condition's status, reason and message.
type Cond<'a> = (&'a str, &'a str, String);

/// Conditions for a phase, keeping `lastTransitionTime` where a condition did not change.
pub fn conditions(
    phase: &AgentPhase,
    generation: Option<i64>,
    previous: &[Condition],
) -> Vec<Condition> {
    let (ready, progressing, degraded): (Cond, Cond, Cond) = match phase {
        AgentPhase::Suspended => (
            (
                "False",
                "Suspended",
                "spec.suspend is true: the agent does not poll".into(),
            ),
            ("False", "Suspended", "suspended".into()),
            ("False", "Suspended", "suspended".into()),
        ),
        AgentPhase::Invalid { reason, message } => (
            ("False", reason, message.clone()),
            ("False", reason, message.clone()),
            ("True", reason, message.clone()),
        ),
        AgentPhase::Failed { message, retry_in } => (
            ("False", "AgentFailed", message.clone()),
            (
                "True",
                "Restarting",
                format!(
                    "the agent will be restarted in {}s: {message}",
                    retry_in.as_secs()
                ),
            ),
            ("True", "AgentFailed", message.clone()),
        ),
        AgentPhase::Running { stats } if stats.agent_id.is_none() => (
            (
                "False",
                "Registering",
                "the agent is registering with Prefect".into(),
            ),
            (
                "True",
                "Registering",
                "the agent is registering with Prefect".into(),
            ),
            ("False", "Registering", "no problem seen".into()),
        ),
        AgentPhase::Running { stats } => {
            let polling_fails =
                stats.polls > 0 && stats.last_error.is_some() && stats.poll_errors == stats.polls;
            if polling_fails {
                let m = stats.last_error.clone().unwrap_or_default();
                (
                    ("False", "PollFailing", m.clone()),
                    ("False", "Polling", "polling".into()),
                    ("True", "PollFailing", m),
                )
            } else {
                (
                    (
                        "True",
                        "Polling",
                        format!(
                            "agent {} polls Prefect",
                            stats.agent_id.clone().unwrap_or_default()
                        ),
                    ),
                    ("False", "Polling", "up to date".into()),
                    ("False", "Polling", "no problem seen".into()),
                )
            }
        }
    };
    let now = Time(Timestamp::now());
    [
        ("Ready", ready),
        ("Progressing", progressing),
        ("Degraded", degraded),
    ]
    .into_iter()
    .map(|(kind, (status, reason, message))| {
        let since = previous
            .iter()
            .find(|c| c.type_ == kind && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        Condition {
            type_: kind.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: generation,
            last_transition_time: since,
        }
    })
    .collect()
}

/// The Event a status change deserves: Ready turning True, or a new problem (Degraded
/// turning True or changing reason), or suspension. `(warning, reason, note)`.
pub fn transition_event(
    previous: &[Condition],
    next: &[Condition],
) -> Option<(bool, String, String)> {
    let find = |list: &[Condition], t: &str| list.iter().find(|c| c.type_ == t).cloned();
    let (old_ready, new_ready) = (find(previous, "Ready"), find(next, "Ready")?);
    let (old_degraded, new_degraded) = (find(previous, "Degraded"), find(next, "Degraded")?);
    let same = |a: &Option<Condition>, b: &Condition| {
        a.as_ref()
            .is_some_and(|a| a.status == b.status && a.reason == b.reason)
    };
    if new_degraded.status == "True" && !same(&old_degraded, &new_degraded) {
        return Some((true, new_degraded.reason, new_degraded.message));
    }
    if !same(&old_ready, &new_ready)
        && (new_ready.status == "True" || new_ready.reason == "Suspended")
    {
        let reason = if new_ready.status == "True" {
            "AgentReady".to_string()
        } else {
            new_ready.reason
        };
        return Some((false, reason, new_ready.message));
    }
    None
}

/// Reads `key` of a Secret in `namespace`; the error names the object, never the value.
async fn read_secret(
    client: &Client,
    namespace: &str,
    r: &SecretKeyRef,
) -> Result<SecretString, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = match secrets.get_opt(&r.name).await {
        Ok(Some(s)) => s,
        Ok(None) => return Err(format!("secret {namespace}/{} not found", r.name)),
        Err(e) => return Err(format!("cannot read secret {namespace}/{}: {e}", r.name)),
    };
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(&r.key))
                .cloned()
        });
    match value {
        Some(v) if !v.is_empty() => Ok(SecretString::new(v)),
        _ => Err(format!(
            "secret {namespace}/{} has no key `{}`",
            r.name, r.key
        )),
    }
}

/// The agent settings a spec asks for, or why it cannot be run.
pub fn agent_config(
    name: &str,
    spec: &PrefectAgentSpec,
) -> Result<AgentConfig, (&'static str, String)> {
    let poll_interval = match &spec.poll_interval {
        Some(s) => humantime::parse_duration(s)
            .map_err(|e| ("InvalidSpec", format!("spec.pollInterval `{s}`: {e}")))?,
        None => Duration::from_secs(10),
    };
    let agent_address = spec
        .agent_address
        .as_deref()
        .map(crate::settings::parse_agent_address)
        .transpose()
        .map_err(|e| ("InvalidSpec", format!("spec.agentAddress: {e}")))?;
    Ok(AgentConfig {
        agent_config_id: spec.agent_config_id.clone(),
        name: spec.name.clone().unwrap_or_else(|| name.to_string()),
        labels: spec.labels.clone(),
        env_vars: spec.env_vars.clone(),
        max_polls: spec.max_polls,
        agent_address,
        no_cloud_logs: spec.no_cloud_logs,
        poll_interval: poll_interval.max(Duration::from_millis(250)),
        ..AgentConfig::default()
    })
}

impl PrefectAgent {
    async fn reconcile(&self, ctx: &Context) -> Result<Action, Error> {
        let ns = self.namespace().unwrap_or_default();
        let key = format!("{ns}/{}", self.name_any());
        let generation = self.metadata.generation;
        let phase = if self.spec.suspend {
            ctx.supervisor.stop(&key);
            AgentPhase::Suspended
        } else if let Some(phase) = ctx.supervisor.current(&key, generation) {
            phase
        } else {
            match self.start_agent(ctx, &ns, &key).await {
                Ok(()) => ctx
                    .supervisor
                    .current(&key, generation)
                    .unwrap_or(AgentPhase::Failed {
                        message: "the agent did not start".into(),
                        retry_in: RESTART_FIRST,
                    }),
                Err((reason, message)) => {
                    ctx.supervisor.stop(&key);
                    AgentPhase::Invalid { reason, message }
                }
            }
        };
        self.write_status(ctx, &phase).await?;
        Ok(match phase {
            AgentPhase::Invalid { .. } => Action::requeue(Duration::from_secs(30)),
            _ => Action::requeue(STATUS_INTERVAL),
        })
    }

    async fn start_agent(
        &self,
        ctx: &Context,
        ns: &str,
        key: &str,
    ) -> Result<(), (&'static str, String)> {
        let spec = &self.spec;
        let prefect1 = spec.api.flavor == Flavor::Prefect1;
        let pool = match (&spec.api.work_pool, prefect1) {
            (_, true) => String::new(),
            (Some(pool), false) => pool.clone(),
            (None, false) => {
                return Err((
                    "InvalidSpec",
                    "spec.api.workPool is required for flavor prefect3".to_string(),
                ));
            }
        };
        if prefect1 && spec.api.auth_string_secret_ref.is_some() {
            return Err((
                "InvalidSpec",
                "spec.api.authStringSecretRef is a Prefect 3 setting; Prefect 1 takes keySecretRef"
                    .to_string(),
            ));
        }
        let cfg = agent_config(&self.name_any(), spec)?;
        let job_namespace = ctx
            .scope
            .job_namespace(ns, spec.job.namespace.as_deref())
            .map_err(|m| ("JobNamespaceNotAllowed", m))?;
        let key_secret = match &spec.api.key_secret_ref {
            Some(r) => Some(
                read_secret(&ctx.client, ns, r)
                    .await
                    .map_err(|m| ("SecretNotFound", m))?,
            ),
            None => None,
        };
        let auth_secret = match &spec.api.auth_string_secret_ref {
            Some(r) => Some(
                read_secret(&ctx.client, ns, r)
                    .await
                    .map_err(|m| ("SecretNotFound", m))?,
            ),
            None => None,
        };
        let secret_ref = spec
            .api
            .key_secret_ref
            .clone()
            .or(spec.api.auth_string_secret_ref.clone());
        let deployer = KubernetesDeployer {
            client: ctx.client.clone(),
            observer: ctx.observer.clone(),
            agent_namespace: ns.to_string(),
            agent_name: self.name_any(),
            defaults: crate::crd::JobSpec {
                namespace: Some(job_namespace),
                ..spec.job.clone()
            },
            secret: secret_ref,
            concurrency_limit: spec.concurrency_limit,
        };
        let api_url = spec.api.url.trim_end_matches('/').to_string();
        if prefect1 {
            let backend = Prefect1::new(Prefect1Config {
                api_url,
                backend: if key_secret.is_some() {
                    "cloud"
                } else {
                    "server"
                }
                .into(),
                key: key_secret,
                tenant_id: spec.api.tenant_id.clone(),
                agent_name: cfg.name.clone(),
                agent_type: "KubernetesAgent".into(),
                labels: cfg.labels.clone(),
                agent_config_id: cfg.agent_config_id.clone(),
                prefetch: Duration::from_secs(10),
                default_image: spec.job.image.clone(),
                log_level: "INFO".into(),
                retry: ctx.retry,
            })
            .map_err(|e| ("InvalidSpec", e.to_string()))?;
            self.run_agent(ctx, key, Agent::new(cfg, backend, deployer));
            return Ok(());
        }
        let auth = match (key_secret, auth_secret) {
            (Some(k), _) => Auth::Bearer(k),
            (None, Some(s)) => Auth::Basic(s),
            (None, None) => Auth::None,
        };
        let backend = Prefect3::new(Prefect3Config {
            api_url,
            auth,
            pool,
            queues: spec.api.work_queues.clone(),
            agent_name: cfg.name.clone(),
            prefetch: Duration::from_secs(10),
            heartbeat_interval: cfg.heartbeat_interval,
            create_pool: None,
            poll_limit: 200,
            retry: ctx.retry,
            events: spec.api.events.unwrap_or(true),
        })
        .map_err(|e| ("InvalidSpec", e.to_string()))?;
        self.run_agent(ctx, key, Agent::new(cfg, backend, deployer));
        Ok(())
    }

    /// Runs the agent as a supervised task for this resource's generation.
    fn run_agent<B: Backend>(&self, ctx: &Context, key: &str, agent: Agent<B, KubernetesDeployer>) {
        let stats = agent.stats();
        let token = CancellationToken::new();
        let run_token = token.clone();
        // A root span: the task outlives the reconcile that started it.
        let span = tracing::info_span!(parent: None, "resource", resource = %key);
        let task_stats = stats.clone();
        let handle = tokio::spawn(tracing::Instrument::instrument(
            async move {
                // The error goes where the status reads it: the agent's counters.
                if let Err(e) = agent.start(run_token).await {
                    tracing::error!(error = %e, "agent stopped with an error");
                    task_stats.error(e.to_string());
                }
            },
            span,
        ));
        ctx.supervisor.start(
            key.to_string(),
            self.metadata.generation,
            token,
            stats,
            handle,
        );
    }

    async fn write_status(&self, ctx: &Context, phase: &AgentPhase) -> Result<(), Error> {
        let previous = self
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let stats = match phase {
            AgentPhase::Running { stats } => Some(stats.clone()),
            _ => None,
        };
        let last_error = match phase {
            AgentPhase::Invalid { message, .. } | AgentPhase::Failed { message, .. } => {
                Some(message.clone())
            }
            _ => stats.as_ref().and_then(|s| s.last_error.clone()),
        };
        let status = PrefectAgentStatus {
            observed_generation: self.metadata.generation,
            conditions: conditions(phase, self.metadata.generation, &previous),
            agent_id: stats.as_ref().and_then(|s| s.agent_id.clone()),
            last_poll_time: stats
                .as_ref()
                .and_then(|s| s.last_poll_time)
                .and_then(|t| Timestamp::from_microsecond(t.timestamp_micros()).ok())
                .map(Time),
            polls: stats.as_ref().map_or(0, |s| s.polls),
            runs_submitted: stats.as_ref().map_or(0, |s| s.runs_submitted),
            runs_failed: stats.as_ref().map_or(0, |s| s.runs_failed),
            active_jobs: ctx.observer.active(&agent_label(
                &self.namespace().unwrap_or_default(),
                &self.name_any(),
            )) as u64,
            last_error,
            message: None,
        };
        if self
            .status
            .as_ref()
            .is_some_and(|s| !status_changed(s, &status))
        {
            return Ok(());
        }
        if let Some((warning, reason, note)) = transition_event(&previous, &status.conditions) {
            let event = Event {
                type_: if warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason,
                note: Some(note),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &self.object_ref(&())).await {
                tracing::warn!(error = %e, "could not publish an Event");
            }
        }
        let api: Api<PrefectAgent> =
            Api::namespaced(ctx.client.clone(), &self.namespace().unwrap_or_default());
        let patch =
            json!({"apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent", "status": status});
        api.patch_status(
            &self.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        Ok(())
    }

    async fn cleanup(&self, ctx: &Context) -> Result<Action, Error> {
        let key = format!(
            "{}/{}",
            self.namespace().unwrap_or_default(),
            self.name_any()
        );
        ctx.supervisor.stop(&key);
        // Its finished Jobs go with it; a failure leaves them to their TTL.
        let own = self.namespace().unwrap_or_default();
        let namespace = self.spec.job.namespace.clone().unwrap_or(own.clone());
        let label = agent_label(&own, &self.name_any());
        match crate::deploy::kubernetes::delete_finished_jobs(&ctx.client, &namespace, &label).await
        {
            Ok(n) => {
                tracing::info!(resource = %key, deleted = n, "deleted the finished Jobs of a removed PrefectAgent")
            }
            Err(e) => {
                tracing::warn!(resource = %key, error = %e, "could not delete the finished Jobs of a removed PrefectAgent; their TTL will")
            }
        }
        Ok(Action::await_change())
    }
}

/// How stale an idle agent's poll count and time may get in its status. They move with
/// every poll; writing them for every agent every few seconds (and the watch event and
/// reconcile each write causes) would be most of what an idle operator does.
const POLL_FIGURES_EVERY: SignedDuration = SignedDuration::from_secs(30);

/// Whether `new` is worth a write over `old`: anything but the poll figures (and the
/// condition timestamps) changed, or those figures are older than `POLL_FIGURES_EVERY`.
fn status_changed(old: &PrefectAgentStatus, new: &PrefectAgentStatus) -> bool {
    let strip = |s: &PrefectAgentStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        s.polls = 0;
        s.last_poll_time = None;
        s
    };
    if strip(old) != strip(new) {
        return true;
    }
    match (&old.last_poll_time, &new.last_poll_time) {
        (Some(Time(then)), Some(Time(now))) => now.duration_since(*then) >= POLL_FIGURES_EVERY,
        (None, Some(_)) => true,
        _ => false,
    }
}

async fn reconcile(agent: Arc<PrefectAgent>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let api: Api<PrefectAgent> =
        Api::namespaced(ctx.client.clone(), &agent.namespace().unwrap_or_default());
    let result = finalizer(&api, FINALIZER, agent, |event| async {
        match event {
            Finalizer::Apply(a) => a.reconcile(&ctx).await,
            Finalizer::Cleanup(a) => a.cleanup(&ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(e.to_string()));
    AgentStats::inc(&ctx.reconciles);
    if result.is_err() {
        AgentStats::inc(&ctx.reconcile_errors);
    }
    ctx.reconcile_duration.observe(started.elapsed());
    result
}

fn error_policy(agent: Arc<PrefectAgent>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(agent = %agent.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

/// Runs the operator until `shutdown`: the Job watch and the controller.
/// `namespace`: watch only this one (resources and Jobs), else every namespace.
impl Context {
    pub fn new(client: Client, pod_grace: Duration, scope: Scope) -> Arc<Self> {
        let reporter = Reporter {
            controller: crate::APP_NAME.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            observer: JobObserver::new(pod_grace),
            supervisor: Supervisor::default(),
            retry: RetryPolicy::default(),
            reconciles: AtomicU64::new(0),
            reconcile_errors: AtomicU64::new(0),
            reconcile_duration: Histogram::new(),
            scope,
        })
    }
}

impl MetricsSource for Context {
    fn agents(&self) -> Vec<AgentMetrics> {
        self.supervisor
            .snapshots()
            .into_iter()
            .map(|(agent, stats, submission_latency)| {
                let active_jobs = agent
                    .split_once('/')
                    .map_or(0, |(ns, name)| self.observer.active(&agent_label(ns, name)));
                AgentMetrics {
                    agent,
                    stats,
                    active_jobs,
                    submission_latency,
                }
            })
            .collect()
    }

    fn controller(&self) -> ControllerMetrics {
        ControllerMetrics {
            reconciles: self.reconciles.load(Ordering::Relaxed),
            reconcile_errors: self.reconcile_errors.load(Ordering::Relaxed),
            reconcile_duration: self.reconcile_duration.snapshot(),
        }
    }
}

/// Runs the controller (and the Job observer) until `shutdown`.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, shutdown: CancellationToken) {
    let client = ctx.client.clone();
    tokio::spawn(
        ctx.observer
            .clone()
            .run(client.clone(), namespace.clone(), shutdown.clone()),
    );
    let agents: Api<PrefectAgent> = match &namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let stop = shutdown.clone();
    // Bounded: a thousand resources requeued at once must not open a thousand
    // connections to the API server.
    let config = kube::runtime::controller::Config::default().concurrency(16);
    // The cache keeps every resource for the operator's lifetime; their managedFields
    // (server-side apply bookkeeping, several KiB each) are never read here.
    let (reader, writer) = reflector::store();
    let resources = reflector(
        writer,
        watcher(agents, watcher::Config::default()).modify(|agent| {
            agent.managed_fields_mut().clear();
        }),
    )
    .applied_objects();
    Controller::for_stream(resources, reader)
        .with_config(config)
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile error");
            }
        })
        .await;
    ctx.supervisor.stop_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_figures_alone_are_written_every_30_seconds() {
        let at = |secs: i64| Some(Time(Timestamp::from_second(1_800_000_000 + secs).unwrap()));
        let old = PrefectAgentStatus {
            polls: 10,
            last_poll_time: at(0),
            ..Default::default()
        };
        let polled = |polls, secs| PrefectAgentStatus {
            polls,
            last_poll_time: at(secs),
            ..old.clone()
        };
        assert!(!status_changed(&old, &old));
        assert!(!status_changed(&old, &polled(12, 20)));
        assert!(status_changed(&old, &polled(13, 30)));
        let submitted = PrefectAgentStatus {
            runs_submitted: 1,
            ..polled(11, 1)
        };
        assert!(
            status_changed(&old, &submitted),
            "a launch is written at once"
        );
    }

    fn stats(agent_id: Option<&str>, polls: u64, errors: u64) -> StatsSnapshot {
        StatsSnapshot {
            agent_id: agent_id.map(str::to_string),
            polls,
            poll_errors: errors,
            last_error: (errors > 0).then(|| "cannot reach the Prefect API".to_string()),
            ..StatsSnapshot::default()
        }
    }

    fn get<'a>(c: &'a [Condition], t: &str) -> &'a Condition {
        c.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn conditions_follow_the_phase() {
        let ready = conditions(
            &AgentPhase::Running {
                stats: stats(Some("w1"), 3, 0),
            },
            Some(2),
            &[],
        );
        assert_eq!(get(&ready, "Ready").status, "True");
        assert_eq!(get(&ready, "Degraded").status, "False");
        assert!(ready.iter().all(|c| c.observed_generation == Some(2)));

        let invalid = conditions(
            &AgentPhase::Invalid {
                reason: "SecretNotFound",
                message: "secret data/prefect-api not found".into(),
            },
            Some(1),
            &[],
        );
        assert_eq!(get(&invalid, "Ready").status, "False");
        assert_eq!(get(&invalid, "Degraded").reason, "SecretNotFound");
        assert!(
            get(&invalid, "Degraded")
                .message
                .contains("data/prefect-api")
        );

        let failing = conditions(
            &AgentPhase::Running {
                stats: stats(Some("w1"), 4, 4),
            },
            Some(1),
            &[],
        );
        assert_eq!(get(&failing, "Ready").reason, "PollFailing");
        let registering = conditions(
            &AgentPhase::Running {
                stats: stats(None, 0, 0),
            },
            Some(1),
            &[],
        );
        assert_eq!(get(&registering, "Progressing").status, "True");
        let suspended = conditions(&AgentPhase::Suspended, Some(1), &[]);
        assert_eq!(get(&suspended, "Ready").reason, "Suspended");
    }

    #[test]
    fn failed_agents_restart_with_doubling_delays() {
        let delays: Vec<u64> = (1..=7).map(|n| restart_delay(n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(restart_delay(u32::MAX), RESTART_MAX);
        let failed = conditions(
            &AgentPhase::Failed {
                message: "cannot reach the Prefect API at http://p/api".into(),
                retry_in: restart_delay(3),
            },
            Some(2),
            &[],
        );
        let progressing = get(&failed, "Progressing");
        assert_eq!(
            progressing.message,
            "the agent will be restarted in 40s: cannot reach the Prefect API at http://p/api"
        );
    }

    #[test]
    fn events_on_transitions_only() {
        let ready = conditions(
            &AgentPhase::Running {
                stats: stats(Some("w"), 1, 0),
            },
            Some(1),
            &[],
        );
        let (warning, reason, _) = transition_event(&[], &ready).unwrap();
        assert!(!warning);
        assert_eq!(reason, "AgentReady");
        assert_eq!(
            transition_event(&ready, &ready),
            None,
            "no change, no event"
        );
        let broken = conditions(
            &AgentPhase::Invalid {
                reason: "SecretNotFound",
                message: "secret d/s not found".into(),
            },
            Some(2),
            &ready,
        );
        let (warning, reason, note) = transition_event(&ready, &broken).unwrap();
        assert!(warning);
        assert_eq!(
            (reason.as_str(), note.as_str()),
            ("SecretNotFound", "secret d/s not found")
        );
        assert_eq!(transition_event(&broken, &broken), None);
        let suspended = conditions(&AgentPhase::Suspended, Some(3), &ready);
        assert_eq!(transition_event(&ready, &suspended).unwrap().1, "Suspended");
    }

    #[test]
    fn transition_times_survive_unchanged_conditions() {
        let first = conditions(
            &AgentPhase::Running {
                stats: stats(Some("w"), 1, 0),
            },
            Some(1),
            &[],
        );
        let mut old = first.clone();
        for c in &mut old {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        let again = conditions(
            &AgentPhase::Running {
                stats: stats(Some("w"), 2, 0),
            },
            Some(1),
            &old,
        );
        assert_eq!(
            get(&again, "Ready").last_transition_time,
            Time(Timestamp::UNIX_EPOCH)
        );
        let changed = conditions(&AgentPhase::Suspended, Some(1), &old);
        assert_ne!(
            get(&changed, "Ready").last_transition_time,
            Time(Timestamp::UNIX_EPOCH)
        );
    }

    #[test]
    fn agent_settings_from_a_spec() {
        let spec: PrefectAgentSpec = serde_json::from_value(json!({
            "api": {"url": "http://p/api", "workPool": "k"}, "pollInterval": "2s", "maxPolls": 3,
            "envVars": {"A": "1"}, "noCloudLogs": true}))
        .unwrap();
        let cfg = agent_config("etl", &spec).unwrap();
        assert_eq!(cfg.name, "etl");
        assert_eq!(cfg.poll_interval, Duration::from_secs(2));
        assert_eq!(cfg.max_polls, Some(3));
        assert!(cfg.no_cloud_logs);
        let bad: PrefectAgentSpec = serde_json::from_value(json!({
            "api": {"url": "http://p/api"}, "agentAddress": "nowhere"}))
        .unwrap();
        assert_eq!(agent_config("x", &bad).unwrap_err().0, "InvalidSpec");
    }
}
