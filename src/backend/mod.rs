//! How the agent talks to Prefect: the [`Backend`] trait and the flow-run types it speaks.

pub mod coalesce;
pub mod config;
pub mod events;
pub mod http;
pub mod prefect1;
pub mod prefect3;

pub use crate::work_pool::{JobConfiguration, References};

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::secret::SecretString;

pub use http::HttpError;

/// The kind of a flow-run state, as Prefect 3 names them (Prefect 1 maps onto these).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateKind {
    Scheduled,
    Pending,
    Running,
    Completed,
    Failed,
    Cancelled,
    Crashed,
    Paused,
    Cancelling,
    Unknown,
}

impl StateKind {
    pub fn parse(s: &str) -> Self {
        match s.to_ascii_uppercase().as_str() {
            "SCHEDULED" => Self::Scheduled,
            "PENDING" => Self::Pending,
            "RUNNING" => Self::Running,
            "COMPLETED" => Self::Completed,
            "FAILED" => Self::Failed,
            "CANCELLED" => Self::Cancelled,
            "CRASHED" => Self::Crashed,
            "PAUSED" => Self::Paused,
            "CANCELLING" => Self::Cancelling,
            _ => Self::Unknown,
        }
    }

    /// A final state: nothing will move the run on by itself.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Cancelled | Self::Crashed
        )
    }
}

/// A flow run as the agent needs it, whatever the backend.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowRun {
    pub id: String,
    pub name: String,
    pub flow_id: Option<String>,
    pub deployment_id: Option<String>,
    pub state: StateKind,
    /// When the run's current state began (server clock).
    pub state_since: Option<DateTime<Utc>>,
    pub state_message: Option<String>,
    pub scheduled_start: Option<DateTime<Utc>>,
    /// The run's own job variables (Prefect 3) or run_config (Prefect 1).
    pub job_variables: Map<String, Value>,
    pub infrastructure_pid: Option<String>,
}

impl FlowRun {
    /// A PENDING run known by id and name only (probes, tests).
    pub fn pending(id: &str, name: &str) -> Self {
        FlowRun {
            id: id.into(),
            name: name.into(),
            flow_id: None,
            deployment_id: None,
            state: StateKind::Pending,
            state_since: None,
            state_message: None,
            scheduled_start: None,
            job_variables: Map::new(),
            infrastructure_pid: None,
        }
    }

    /// How long the run has been in its current state (unknown start: as old as can be).
    pub fn state_age(&self, now: DateTime<Utc>) -> Duration {
        self.state_since
            .map(|t| (now - t).to_std().unwrap_or_default())
            .unwrap_or(Duration::MAX)
    }
}

/// The answer to a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The run is ours to launch; how we know.
    Claimed(Proof),
    /// Another agent or worker has it.
    Taken(String),
    /// Not now (a concurrency limit, a WAIT); it will be offered again.
    Delayed(String),
}

/// What proved a claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// The server's answer alone (Prefect 1's version lock; a Prefect 3 server that runs
    /// transitions one at a time, see `prefect3::proven_by_answer`).
    Answer,
    /// The run's state history, read because the answer left it open.
    History,
}

/// An environment variable value: the key must reach a Kubernetes Job only as a `secretKeyRef`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvValue {
    Plain(String),
    Secret(SecretString),
    /// A Kubernetes `valueFrom` source given in a list-style `env` job variable; only a
    /// Kubernetes Job can resolve it.
    From(Value),
}

/// A run's environment in order: Prefect's worker puts its own variables first and the
/// user's after them in the order given, so `$(VAR)` references can expand.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Env(Vec<(String, EnvValue)>);

impl Env {
    /// Sets a variable: in its place when it is there (as a Python dict does), else last.
    pub fn set(&mut self, name: impl Into<String>, value: EnvValue) {
        let name = name.into();
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    /// A plain variable, set as [`Env::set`] does.
    pub fn set_plain(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.set(name, EnvValue::Plain(value.into()));
    }

    /// Moves a variable (or adds it) to the end.
    pub fn push(&mut self, name: impl Into<String>, value: EnvValue) {
        let name = name.into();
        self.remove(&name);
        self.0.push((name, value));
    }

    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(n, _)| n != name);
    }

    pub fn get(&self, name: &str) -> Option<&EnvValue> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.get(name).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &EnvValue)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| n.as_str())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<N: Into<String>> FromIterator<(N, EnvValue)> for Env {
    fn from_iter<I: IntoIterator<Item = (N, EnvValue)>>(iter: I) -> Self {
        let mut env = Env::default();
        for (name, value) in iter {
            env.set(name, value);
        }
        env
    }
}

impl<N: Into<String>> Extend<(N, EnvValue)> for Env {
    fn extend<I: IntoIterator<Item = (N, EnvValue)>>(&mut self, iter: I) {
        for (name, value) in iter {
            self.set(name, value);
        }
    }
}

impl std::ops::Index<&str> for Env {
    type Output = EnvValue;

    /// Panics when the variable is missing, like a map's index.
    fn index(&self, name: &str) -> &EnvValue {
        match self.get(name) {
            Some(v) => v,
            None => panic!("no variable {name} in the environment"),
        }
    }
}

/// What a backend knows about how a run must be started, in its API's terms; each
/// deployer translates it into its own infrastructure (a Job, a process).
#[derive(Clone, Debug, PartialEq)]
pub enum RunSpec {
    /// A Prefect 3 work pool's run.
    WorkPool {
        /// The pool's job configuration with the deployment's and the run's job
        /// variables (Prefect references in them resolved).
        configuration: JobConfiguration,
        /// The pool's base job template as Prefect keeps it (none or `{}` for a pool
        /// without one); shared, not copied, per launch.
        base_job_template: Option<Arc<Value>>,
        /// Prefect variables and blocks the template refers to.
        references: References,
        /// What the run belongs to, for the labels Prefect's worker gives its Jobs.
        about: RunAbout,
    },
    /// A Prefect 1 run: its `run_config` as the server keeps it, and its flow.
    Prefect1 {
        run_config: Value,
        flow: prefect1::run_config::FlowInfo,
        /// The run's labels.
        labels: Vec<String>,
    },
}

impl RunSpec {
    /// The environment the run asks for (the `env` of its job configuration or run_config).
    pub fn env(&self) -> Option<Value> {
        match self {
            Self::WorkPool { configuration, .. } => configuration.env(),
            Self::Prefect1 { run_config, .. } => run_config.get("env").cloned(),
        }
    }
}

/// The names around a Prefect 3 run, as Prefect's worker labels its Jobs with them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunAbout {
    pub flow_name: Option<String>,
    pub deployment_name: Option<String>,
    /// When the deployment was last updated (RFC 3339, UTC).
    pub deployment_updated: Option<String>,
    pub work_pool_name: String,
    pub work_pool_id: Option<String>,
    /// The agent's name in Prefect (the worker name).
    pub worker_name: String,
    /// The Prefect server's version.
    pub prefect_version: Option<String>,
}

/// What a backend knows about how a run must be started.
#[derive(Clone, Debug, PartialEq)]
pub struct RunContext {
    pub spec: RunSpec,
    /// Variables under everything else, even the agent's `env_vars` (Prefect 1's
    /// `PREFECT__LOGGING__LEVEL`).
    pub default_env: Env,
    /// Prefect 3's worker variables (API URL, credential, run and attribution ids): the
    /// agent's `env_vars` do not replace them, the run's own `env` may, as with Prefect's
    /// worker.
    pub worker_env: Env,
    /// Variables that win over everything else (Prefect 1's identity of the run;
    /// `no_cloud_logs`).
    pub fixed_env: Env,
}

/// What registering the agent returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub agent_id: String,
    /// The pool's type (Prefect 3) or the agent type (Prefect 1).
    pub kind: String,
    /// The work pool as registration read it (Prefect 2 and 3), for the deployer to say
    /// whether it can start its runs.
    pub pool: Option<PoolInfo>,
}

/// A work pool: its name, type and base job template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolInfo {
    pub name: String,
    pub kind: String,
    pub base_job_template: Arc<Value>,
}

/// Severity of a log line shipped to Prefect for a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogLevel {
    Info,
    Warning,
    Error,
}

impl LogLevel {
    /// Python's name of the level (Prefect 1's logs).
    pub fn name(self) -> &'static str {
        match self {
            Self::Info => "INFO",
            Self::Warning => "WARNING",
            Self::Error => "ERROR",
        }
    }

    /// Python's number of the level (Prefect 3's logs).
    pub fn number(self) -> u8 {
        match self {
            Self::Info => 20,
            Self::Warning => 30,
            Self::Error => 40,
        }
    }
}

/// A time as both APIs take it: RFC 3339, UTC, microseconds.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The latest scheduled start a poll at `now` picks up: runs due within the prefetch
/// window are started early, as the seed does.
pub fn poll_horizon(now: DateTime<Utc>, prefetch: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(prefetch).unwrap_or_default()
}

/// Errors a backend reports, each with a message a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Http(#[from] HttpError),
    /// How to create it depends on who starts the runs: the agent says (`AgentError`).
    #[error("work pool `{pool}` does not exist at {url}")]
    UnknownPool { pool: String, url: String },
    #[error("{url} is not the Prefect API: {detail}")]
    NotTheApi { url: String, detail: String },
    #[error(
        "the Prefect Server at {url} has no tenant; create one (`prefect server create-tenant --name default`)"
    )]
    NoTenant { url: String },
    #[error("work queue `{queue}` does not exist in work pool `{pool}`")]
    UnknownQueue { pool: String, queue: String },
    #[error(transparent)]
    Reference(#[from] crate::work_pool::ReferenceError),
    #[error(transparent)]
    Variables(#[from] crate::work_pool::VariableError),
    #[error("unexpected answer from the Prefect API to {call}: {detail}")]
    Protocol { call: &'static str, detail: String },
}

impl BackendError {
    /// True when retrying later may succeed (the API was unreachable or overloaded).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Http(e) if e.is_transient())
    }
}

/// This agent's claims as Prefect records them, for adopting the ones a crash left
/// unlaunched; when to look and what to do with them is the agent's (`agent::maintenance`).
pub trait ClaimLedger {
    /// Runs this agent claimed at least `min_age` ago but never recorded as launched,
    /// except `launched`: runs this process launched whose record is still to be written.
    fn orphans(
        &self,
        min_age: Duration,
        launched: &HashSet<String>,
    ) -> impl Future<Output = Result<Vec<FlowRun>, BackendError>> + Send;
    /// Re-checks, once the run is held busy, that an [`ClaimLedger::orphans`] answer still
    /// stands: the scan may have read the run just before its launch was recorded.
    fn still_unlaunched(
        &self,
        run: &FlowRun,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;
    /// True when this agent holds the run's latest claim (as every agent reads it), even
    /// if the run has moved on since (e.g. to CANCELLING before it was launched).
    fn claimed_by_me(
        &self,
        run: &FlowRun,
    ) -> impl Future<Output = Result<bool, BackendError>> + Send;
}

/// How to talk to Prefect. One implementation per API flavour; the agent loop is written once.
///
/// Every call is retried by the implementation where that is safe; an error
/// returned here has already survived the retry policy.
pub trait Backend: ClaimLedger + Send + Sync + 'static {
    /// Announces the agent (Prefect 3: checks the pool and queues, first heartbeat).
    fn register(&self) -> impl Future<Output = Result<Registration, BackendError>> + Send;
    /// Tells Prefect the agent is alive (need not be retried: the next one follows).
    fn heartbeat(&self) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Runs due now or within the prefetch window, not yet claimed.
    fn poll(&self) -> impl Future<Output = Result<Vec<FlowRun>, BackendError>> + Send;
    /// Claims one run, exactly once: a retried claim that already succeeded is `Claimed`.
    fn claim(&self, run: &FlowRun) -> impl Future<Output = Result<Claim, BackendError>> + Send;
    /// Everything needed to start the run's infrastructure.
    fn context(
        &self,
        run: &FlowRun,
        no_cloud_logs: bool,
    ) -> impl Future<Output = Result<RunContext, BackendError>> + Send;
    /// Records the infrastructure id of a launched run.
    fn launched(
        &self,
        run_id: &str,
        infra_id: &str,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Ends a run whose infrastructure failed (Prefect 3: CRASHED) with the cause.
    fn crash(
        &self,
        run_id: &str,
        message: &str,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Ends a run whose cancellation has been carried out.
    fn cancelled(&self, run_id: &str) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Runs the user asked to cancel, in this agent's pool.
    fn cancelling(&self) -> impl Future<Output = Result<Vec<FlowRun>, BackendError>> + Send;
    /// The run's state now. Where the server's current state lags its own history (a
    /// stale write on SQLite), a final state in the history wins.
    fn settled_state(
        &self,
        run_id: &str,
    ) -> impl Future<Output = Result<StateKind, BackendError>> + Send;
    /// Ships one log line for a run, written at `at`.
    fn log(
        &self,
        run_id: &str,
        level: LogLevel,
        message: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Asks to have the agent woken as soon as a new run may be waiting or a run is being
    /// cancelled (Prefect 3: its event stream), for as long as the wakers live. Without
    /// it the agent simply polls. The link says whether events arrive right now.
    fn wake_on_events(&self, _wakers: &events::Wakers) -> Option<events::EventLink> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_age_counts_from_the_state_start() {
        let now: DateTime<Utc> = "2026-01-01T00:00:10Z".parse().unwrap();
        let mut run = FlowRun {
            id: "r".into(),
            name: "n".into(),
            flow_id: None,
            deployment_id: None,
            state: StateKind::Pending,
            state_since: Some("2026-01-01T00:00:00Z".parse().unwrap()),
            state_message: None,
            scheduled_start: None,
            job_variables: Map::new(),
            infrastructure_pid: None,
        };
        assert_eq!(run.state_age(now), Duration::from_secs(10));
        run.state_since = Some("2026-01-01T00:00:20Z".parse().unwrap());
        assert_eq!(
            run.state_age(now),
            Duration::ZERO,
            "clock skew counts as fresh"
        );
        run.state_since = None;
        assert_eq!(run.state_age(now), Duration::MAX);
    }

    #[test]
    fn final_states() {
        for s in ["COMPLETED", "failed", "CANCELLED", "CRASHED"] {
            assert!(StateKind::parse(s).is_final(), "{s}");
        }
        for s in [
            "SCHEDULED",
            "PENDING",
            "RUNNING",
            "CANCELLING",
            "PAUSED",
            "weird",
        ] {
            assert!(!StateKind::parse(s).is_final(), "{s}");
        }
    }
}
