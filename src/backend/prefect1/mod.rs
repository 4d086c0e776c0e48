//! Prefect 1 (Server 1.x / Cloud 1) over GraphQL, as the 1.4 `Agent` speaks it
//! (reference: prefect1-graphql.md): `register_agent`, `get_runs_in_queue` then the
//! flow-run metadata query, claims by setting `Submitted` with the run's version (a
//! version conflict means another agent has it), failures as `Failed` plus a run log.
//!
//! Beyond the 1.4 agent: the Submitted state names this agent, so a restarted agent
//! finds its Submitted runs that never got infrastructure and launches them.

pub mod graphql;
pub mod labels;
pub mod run_config;

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};

use self::graphql::{CORE_VERSION, GraphqlClient, GraphqlError, literal};
use self::run_config::{FlowInfo, RunIdentity, default_env, fixed_env};
use super::http::{ApiClient, Auth, RetryPolicy};
use super::{
    Backend, BackendError, Claim, ClaimLedger, FlowRun, LogLevel, Proof, Registration, RunContext,
    RunSpec, StateKind, poll_horizon, timestamp,
};
use crate::secret::SecretString;

/// How to reach Prefect 1 and who this agent is there.
#[derive(Clone, Debug)]
pub struct Prefect1Config {
    /// The GraphQL endpoint (Server: `http://host:4200/graphql`; Cloud: `https://api.prefect.io`).
    pub api_url: String,
    pub key: Option<SecretString>,
    /// Looked up with `auth_info` when a key is set and no tenant is given.
    pub tenant_id: Option<String>,
    pub agent_name: String,
    /// Who this agent is in its claims (a PrefectAgent's UID, the standalone agent's
    /// `--agent-id`): it adopts only its own unlaunched claims, never a namesake's.
    pub identity: String,
    /// `KubernetesAgent` (operator) or `LocalAgent` (process deployer).
    pub agent_type: String,
    pub labels: Vec<String>,
    pub agent_config_id: Option<String>,
    /// Runs due this far ahead are fetched already (the seed: 10 s).
    pub prefetch: Duration,
    /// `PREFECT__LOGGING__LEVEL` of the runs.
    pub log_level: String,
    /// `PREFECT__BACKEND` of the runs: `server` or `cloud`.
    pub backend: String,
    pub retry: RetryPolicy,
}

impl From<GraphqlError> for BackendError {
    fn from(e: GraphqlError) -> Self {
        match e {
            GraphqlError::Http(e) => BackendError::Http(e),
            other => BackendError::Protocol {
                call: "Prefect 1 GraphQL",
                detail: other.to_string(),
            },
        }
    }
}

/// What the metadata query returned about a run, kept from poll to claim and launch.
#[derive(Clone, Debug, PartialEq)]
struct RunMeta {
    version: i64,
    state: String,
    run_config: Value,
    labels: Vec<String>,
    flow: FlowInfo,
    /// Due task runs of a Running flow run that are Scheduled (retries): (id, version).
    task_runs: Vec<(String, i64)>,
}

/// A Prefect 1 state name as the agent loop sees it.
pub fn state_kind(name: &str) -> StateKind {
    match name {
        "Scheduled" | "Queued" | "Retrying" | "Resume" => StateKind::Scheduled,
        "Submitted" | "Pending" | "ClientFailed" => StateKind::Pending,
        "Running" | "Looped" => StateKind::Running,
        "Success" | "Cached" | "Skipped" | "Mapped" => StateKind::Completed,
        "Failed" | "TimedOut" | "TriggerFailed" | "ValidationFailed" => StateKind::Failed,
        "Cancelled" => StateKind::Cancelled,
        "Cancelling" => StateKind::Cancelling,
        "Paused" => StateKind::Paused,
        _ => StateKind::Unknown,
    }
}

/// A serialized Prefect 1 state, as the 1.4 client sends it.
pub fn serialized_state(kind: &str, message: &str) -> Value {
    json!({
        "type": kind,
        "message": message,
        "state": null,
        "context": {},
        "cached_inputs": {},
        "_result": {"type": "NoResultType", "__version__": CORE_VERSION},
        "__version__": CORE_VERSION,
    })
}

/// Says so when the server did not take a state the agent set (`status`, `message`):
/// not silently, as if it had.
fn refused(state: &str, run_id: &str, (status, message): (String, String)) {
    if !matches!(status.as_str(), "SUCCESS" | "") {
        tracing::warn!(run_id, state, %status, %message, "Prefect 1 did not take the state");
    }
}

/// Most runs whose metadata is kept between a poll and their claim.
const MAX_REMEMBERED: usize = 5_000;

/// The message of this agent's Submitted states: how a restarted agent knows its claims.
pub fn claim_marker(agent_name: &str, identity: &str) -> String {
    format!("Submitted for execution by agent {agent_name} ({identity})")
}

const RUN_FIELDS: &str = "id version state state_message state_timestamp serialized_state \
     parameters scheduled_start_time run_config name labels \
     flow { id name environment storage version core_version }";

/// The metadata query: runs by id that are Scheduled, or Running with task runs due.
pub fn metadata_query(ids: &[String], now: DateTime<Utc>) -> String {
    let due = timestamp(now - chrono::Duration::seconds(3));
    let filter = json!({
        "id": {"_in": ids},
        "_or": [
            {"state": {"_eq": "Scheduled"}},
            {"state": {"_eq": "Running"}, "task_runs": {"state_start_time": {"_lte": due}}}
        ]
    });
    format!(
        "query {{ flow_run(where: {}) {{ {RUN_FIELDS} task_runs(where: {}) {{ id version task_id serialized_state }} }} }}",
        literal(&filter),
        literal(&json!({"state_start_time": {"_lte": due}})),
    )
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The run ids a queue answer offers, only those that are UUIDs (as Prefect 1's are):
/// an id becomes a Job's name and label, so a server's `../x` or quoted text is left,
/// with a warning, instead of reaching them.
fn run_ids(v: Option<&Value>) -> Vec<String> {
    let mut ids = strings(v);
    ids.retain(|id| {
        let ok = uuid::Uuid::parse_str(id).is_ok();
        if !ok {
            let shown: String = id.chars().take(64).collect();
            tracing::warn!(flow_run = %shown, "the Prefect 1 API offered a run id that is not a UUID; leaving it");
        }
        ok
    });
    ids
}

fn time(v: Option<&Value>) -> Option<DateTime<Utc>> {
    v.and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

/// A `flow_run` row as `poll` reads it; `None` when it lacks an id or a state.
pub fn parse_flow_run_row(row: &Value) -> Option<FlowRun> {
    parse_run(row).map(|(run, _)| run)
}

/// One row of a `flow_run` query.
fn parse_run(row: &Value) -> Option<(FlowRun, RunMeta)> {
    let id = row.get("id")?.as_str()?.to_string();
    let state = row.get("state")?.as_str()?.to_string();
    let flow = row.get("flow").cloned().unwrap_or(Value::Null);
    let flow = FlowInfo {
        id: flow
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .into(),
        name: flow
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .into(),
        storage: flow.get("storage").cloned().unwrap_or(Value::Null),
        core_version: flow
            .get("core_version")
            .and_then(Value::as_str)
            .map(str::to_string),
    };
    let serialized = row.get("serialized_state").cloned().unwrap_or(Value::Null);
    let run_config = row.get("run_config").cloned().unwrap_or(Value::Null);
    let task_runs = row
        .get("task_runs")
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                // Only what waits to run again; finished or running task runs stay as they are.
                .filter(|t| {
                    t.pointer("/serialized_state/type")
                        .and_then(Value::as_str)
                        .is_some_and(|k| state_kind(k) == StateKind::Scheduled)
                })
                .filter_map(|t| {
                    Some((
                        t.get("id")?.as_str()?.to_string(),
                        t.get("version")?.as_i64()?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let run = FlowRun {
        id: id.clone(),
        // Logged with every line about the run: a server's megabyte name is cut here.
        name: crate::text::clip(
            row.get("name").and_then(Value::as_str).unwrap_or_default(),
            crate::text::MAX_RUN_NAME,
        ),
        flow_id: Some(flow.id.clone()).filter(|f| !f.is_empty()),
        deployment_id: None,
        state: state_kind(&state),
        state_since: time(row.get("state_timestamp")),
        state_message: row
            .get("state_message")
            .and_then(Value::as_str)
            .map(|m| crate::text::clip(m, crate::text::MAX_STATE_MESSAGE)),
        scheduled_start: time(serialized.get("start_time"))
            .or_else(|| time(row.get("scheduled_start_time"))),
        job_variables: run_config.as_object().cloned().unwrap_or_default(),
        infrastructure_pid: None,
    };
    let meta = RunMeta {
        version: row.get("version").and_then(Value::as_i64).unwrap_or(0),
        state,
        run_config,
        labels: strings(row.get("labels")),
        flow,
        task_runs,
    };
    Some((run, meta))
}

/// The Prefect 1 backend.
#[derive(Debug)]
pub struct Prefect1 {
    gql: GraphqlClient,
    cfg: Prefect1Config,
    meta: Mutex<HashMap<String, RunMeta>>,
    /// Runs this process launched that may still be Submitted: Prefect 1 has no field
    /// for a run's infrastructure, so this is what keeps them from being adopted.
    launched: Mutex<HashSet<String>>,
}

impl Prefect1 {
    /// This agent's claim marker: its name and its identity.
    fn marker(&self) -> String {
        claim_marker(&self.cfg.agent_name, &self.cfg.identity)
    }

    pub fn new(cfg: Prefect1Config) -> Result<Self, BackendError> {
        let auth = cfg.key.clone().map_or(Auth::None, Auth::Bearer);
        let api = ApiClient::new(&cfg.api_url, auth, cfg.retry)?;
        Ok(Self {
            gql: GraphqlClient::new(api, cfg.tenant_id.clone(), cfg.key.is_some()),
            cfg,
            meta: Mutex::new(HashMap::new()),
            launched: Mutex::new(HashSet::new()),
        })
    }

    fn remember(&self, rows: &Value) -> Vec<FlowRun> {
        let mut runs = Vec::new();
        let Some(rows) = rows.as_array() else {
            return runs;
        };
        let Ok(mut meta) = self.meta.lock() else {
            return runs;
        };
        // Runs that left the queue unclaimed are never forgotten one by one: past the cap,
        // only this answer's are kept (a run missing later is read again by id).
        if meta.len() + rows.len() > MAX_REMEMBERED {
            meta.clear();
        }
        for (run, m) in rows.iter().filter_map(parse_run) {
            meta.insert(run.id.clone(), m);
            runs.push(run);
        }
        runs
    }

    fn meta_of(&self, run_id: &str) -> Option<RunMeta> {
        self.meta.lock().ok()?.get(run_id).cloned()
    }

    fn forget(&self, run_id: &str) {
        if let Ok(mut meta) = self.meta.lock() {
            meta.remove(run_id);
        }
    }

    async fn set_flow_run_state(
        &self,
        run_id: &str,
        version: Option<i64>,
        state: Value,
    ) -> Result<(String, String), GraphqlError> {
        let mut entry = json!({"flow_run_id": run_id, "state": state});
        if let Some(v) = version {
            entry["version"] = json!(v);
        }
        let data = self
            .gql
            .request(
                "mutation($input: set_flow_run_states_input!) { set_flow_run_states(input: $input) { states { id status message } } }",
                Some(&json!({"input": {"states": [entry]}})),
            )
            .await?;
        let first = data.pointer("/set_flow_run_states/states/0");
        let field = |k: &str| {
            first
                .and_then(|s| s.get(k))
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        Ok((field("status"), field("message")))
    }

    async fn claim_task_runs(&self, meta: &RunMeta) -> Result<Claim, BackendError> {
        let marker = self.marker();
        let states: Vec<Value> = meta
            .task_runs
            .iter()
            .map(|(id, version)| {
                json!({"task_run_id": id, "version": version, "state": serialized_state("Submitted", &marker)})
            })
            .collect();
        if states.is_empty() {
            return Ok(Claim::Taken("no task run is due any more".into()));
        }
        match self
            .gql
            .request(
                "mutation($input: set_task_run_states_input!) { set_task_run_states(input: $input) { states { id status message } } }",
                Some(&json!({"input": {"states": states}})),
            )
            .await
        {
            Ok(_) => Ok(Claim::Claimed(Proof::Answer)),
            Err(GraphqlError::VersionLocked(m)) => Ok(Claim::Taken(m)),
            Err(e) => Err(e.into()),
        }
    }

    async fn runs_where(&self, filter: &Value) -> Result<Value, GraphqlError> {
        let query = format!(
            "query {{ flow_run(where: {}) {{ {RUN_FIELDS} }} }}",
            literal(filter)
        );
        let data = self.gql.request(&query, None).await?;
        Ok(data.get("flow_run").cloned().unwrap_or(Value::Null))
    }

    /// The tenant as 1.4's client finds it: the key's (`auth_info`) on Cloud, the first
    /// of the server's (`tenant`) on a Server without a key.
    async fn look_up_tenant(&self) -> Result<(), BackendError> {
        let tenant = if self.cfg.key.is_some() {
            let data = self
                .gql
                .request("query { auth_info { tenant_id } }", None)
                .await?;
            data.pointer("/auth_info/tenant_id")
                .and_then(Value::as_str)
                .map(str::to_string)
        } else {
            let data = self.gql.request("query { tenant { id } }", None).await?;
            let first = data.pointer("/tenant/0/id").and_then(Value::as_str);
            let first = first.ok_or_else(|| BackendError::NoTenant {
                url: self.cfg.api_url.clone(),
            })?;
            Some(first.to_string())
        };
        if let Some(t) = tenant {
            self.gql.set_tenant_id(t);
        }
        Ok(())
    }
}

impl Backend for Prefect1 {
    async fn register(&self) -> Result<Registration, BackendError> {
        if self.gql.tenant_id().is_none() {
            self.look_up_tenant().await?;
        }
        let input = json!({"input": {
            "type": self.cfg.agent_type,
            "name": self.cfg.agent_name,
            "labels": self.cfg.labels,
            "tenant_id": self.gql.tenant_id(),
            "agent_config_id": self.cfg.agent_config_id,
        }});
        let data = self
            .gql
            .request(
                "mutation($input: register_agent_input!) { register_agent(input: $input) { id } }",
                Some(&input),
            )
            .await?;
        let agent_id = data
            .pointer("/register_agent/id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty())
            .ok_or_else(|| BackendError::Protocol {
                call: "register_agent",
                detail: "no agent id in the answer".into(),
            })?
            .to_string();
        if let Some(config_id) = &self.cfg.agent_config_id {
            let query = format!(
                "query {{ agent_config(where: {}) {{ settings }} }}",
                literal(&json!({"id": {"_eq": config_id}}))
            );
            let data = self.gql.request(&query, None).await?;
            let settings =
                data.pointer("/agent_config/0/settings")
                    .ok_or_else(|| BackendError::Protocol {
                        call: "agent_config",
                        detail: format!("agent configuration {config_id} does not exist"),
                    })?;
            // The 1.4 agent stores these and uses none of them; say so instead of
            // dropping them silently.
            for key in settings.as_object().map(Map::keys).into_iter().flatten() {
                tracing::warn!(
                    setting = %key,
                    agent_config_id = %config_id,
                    "agent configuration setting not used (the Prefect 1.4 agent uses none)"
                );
            }
        }
        self.gql.set_agent_id(agent_id.clone());
        self.gql.request("query { hello }", None).await?;
        Ok(Registration {
            agent_id,
            kind: self.cfg.agent_type.clone(),
            pool: None,
        })
    }

    async fn heartbeat(&self) -> Result<(), BackendError> {
        self.gql.request("query { hello }", None).await?;
        Ok(())
    }

    async fn poll(&self) -> Result<Vec<FlowRun>, BackendError> {
        let now = Utc::now();
        let before = poll_horizon(now, self.cfg.prefetch);
        let input = json!({"input": {
            "before": timestamp(before),
            "labels": self.cfg.labels,
            "tenant_id": self.gql.tenant_id(),
        }});
        let data = self
            .gql
            .request(
                "mutation($input: get_runs_in_queue_input!) { get_runs_in_queue(input: $input) { flow_run_ids } }",
                Some(&input),
            )
            .await?;
        let ids = run_ids(data.pointer("/get_runs_in_queue/flow_run_ids"));
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let data = self.gql.request(&metadata_query(&ids, now), None).await?;
        let mut runs = self.remember(data.get("flow_run").unwrap_or(&Value::Null));
        // The server applies the label rule; a run it should not have offered is left.
        runs.retain(|r| {
            let ok = self
                .meta_of(&r.id)
                .is_some_and(|m| labels::offered(&m.labels, &self.cfg.labels));
            if !ok {
                tracing::warn!(flow_run = %r.id, "offered a run whose labels this agent lacks; leaving it");
                self.forget(&r.id);
            }
            ok
        });
        runs.sort_by_key(|r| r.scheduled_start);
        Ok(runs)
    }

    async fn claim(&self, run: &FlowRun) -> Result<Claim, BackendError> {
        let Some(meta) = self.meta_of(&run.id) else {
            return Ok(Claim::Delayed(
                "the run's details are no longer known".into(),
            ));
        };
        // As the seed: wait for the start time (a prefetched run is up to 10 s early).
        if let Some(start) = run.scheduled_start {
            let wait = (start - Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep(wait.min(self.cfg.prefetch)).await;
        }
        let claim = if meta.state == "Running" {
            self.claim_task_runs(&meta).await?
        } else {
            let marker = self.marker();
            match self
                .set_flow_run_state(
                    &run.id,
                    Some(meta.version),
                    serialized_state("Submitted", &marker),
                )
                .await
            {
                Ok((status, _)) if status == "SUCCESS" => Claim::Claimed(Proof::Answer),
                Ok((status, message)) if status == "QUEUED" => {
                    Claim::Delayed(format!("a concurrency limit queued it: {message}"))
                }
                Ok((status, message)) => Claim::Taken(format!("{status}: {message}")),
                Err(GraphqlError::VersionLocked(m)) => Claim::Taken(m),
                Err(e) => return Err(e.into()),
            }
        };
        if !matches!(claim, Claim::Claimed(_)) {
            self.forget(&run.id);
        }
        Ok(claim)
    }

    async fn context(
        &self,
        run: &FlowRun,
        no_cloud_logs: bool,
    ) -> Result<RunContext, BackendError> {
        let meta = match self.meta_of(&run.id) {
            Some(m) => m,
            None => {
                let rows = self.runs_where(&json!({"id": {"_eq": run.id}})).await?;
                self.remember(&rows);
                self.meta_of(&run.id)
                    .ok_or_else(|| BackendError::Protocol {
                        call: "flow_run",
                        detail: format!("flow run {} does not exist", run.id),
                    })?
            }
        };
        let tenant = self.gql.tenant_id();
        let fixed = fixed_env(&RunIdentity {
            api_url: &self.cfg.api_url,
            key: self.cfg.key.as_ref(),
            tenant_id: tenant.as_deref(),
            backend: &self.cfg.backend,
            agent_labels: &self.cfg.labels,
            run_id: &run.id,
            flow_id: &meta.flow.id,
            no_cloud_logs,
        });
        self.forget(&run.id);
        Ok(RunContext {
            spec: RunSpec::Prefect1 {
                run_config: meta.run_config,
                flow: meta.flow,
                labels: meta.labels,
            },
            default_env: default_env(&self.cfg.log_level, no_cloud_logs),
            worker_env: Default::default(),
            fixed_env: fixed,
        })
    }

    async fn launched(&self, run_id: &str, _infra_id: &str) -> Result<(), BackendError> {
        // Prefect 1 has no field for it: remembered here, and after a restart the
        // deployer finds the infrastructure by the run's id (the Job's name).
        if let Ok(mut launched) = self.launched.lock() {
            launched.insert(run_id.to_string());
        }
        Ok(())
    }

    async fn crash(&self, run_id: &str, message: &str) -> Result<(), BackendError> {
        let answer = self
            .set_flow_run_state(run_id, None, serialized_state("Failed", message))
            .await?;
        refused("Failed", run_id, answer);
        Ok(())
    }

    async fn cancelled(&self, run_id: &str) -> Result<(), BackendError> {
        let answer = self
            .set_flow_run_state(
                run_id,
                None,
                serialized_state("Cancelled", "Cancelled by the agent"),
            )
            .await?;
        refused("Cancelled", run_id, answer);
        Ok(())
    }

    async fn cancelling(&self) -> Result<Vec<FlowRun>, BackendError> {
        // Prefect 1 cancels from inside the flow run (its runner watches the state).
        Ok(Vec::new())
    }

    async fn settled_state(&self, run_id: &str) -> Result<StateKind, BackendError> {
        let rows = self.runs_where(&json!({"id": {"_eq": run_id}})).await?;
        let state = rows
            .pointer("/0/state")
            .and_then(Value::as_str)
            .ok_or_else(|| BackendError::Protocol {
                call: "flow_run",
                detail: format!("flow run {run_id} does not exist"),
            })?;
        Ok(state_kind(state))
    }

    async fn log(
        &self,
        run_id: &str,
        level: LogLevel,
        message: &str,
        at: DateTime<Utc>,
    ) -> Result<(), BackendError> {
        let input = json!({"input": {"logs": [{
            "flow_run_id": run_id,
            // 1.4 names the agent's run log lines after the agent.
            "name": self.cfg.agent_name,
            "message": message,
            "level": level.name(),
            "timestamp": timestamp(at),
        }]}});
        self.gql
            .request(
                "mutation($input: write_run_logs_input!) { write_run_logs(input: $input) { success } }",
                Some(&input),
            )
            .await?;
        Ok(())
    }
}

impl ClaimLedger for Prefect1 {
    async fn orphans(
        &self,
        min_age: Duration,
        recording: &HashSet<String>,
    ) -> Result<Vec<FlowRun>, BackendError> {
        let marker = self.marker();
        let rows = self
            .runs_where(&json!({"state": {"_eq": "Submitted"}, "state_message": {"_eq": marker}}))
            .await?;
        let now = Utc::now();
        let runs = self.remember(&rows);
        let submitted: HashSet<&str> = runs.iter().map(|r| r.id.as_str()).collect();
        let launched = match self.launched.lock() {
            Ok(mut launched) => {
                // Runs that moved on need no protection any more.
                launched.retain(|id| submitted.contains(id.as_str()));
                launched.clone()
            }
            Err(_) => HashSet::new(),
        };
        let (old, rest): (Vec<_>, Vec<_>) = runs.into_iter().partition(|r| {
            r.state_age(now) >= min_age && !launched.contains(&r.id) && !recording.contains(&r.id)
        });
        for r in rest {
            self.forget(&r.id);
        }
        Ok(old)
    }

    async fn still_unlaunched(&self, run: &FlowRun) -> Result<bool, BackendError> {
        if self.launched.lock().is_ok_and(|l| l.contains(&run.id)) {
            return Ok(false);
        }
        Ok(self.settled_state(&run.id).await? == StateKind::Pending)
    }

    async fn claimed_by_me(&self, run: &FlowRun) -> Result<bool, BackendError> {
        Ok(run.state_message.as_deref() == Some(self.marker().as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_map_onto_the_loop_s_kinds() {
        assert_eq!(state_kind("Scheduled"), StateKind::Scheduled);
        assert_eq!(state_kind("Submitted"), StateKind::Pending);
        assert_eq!(state_kind("Success"), StateKind::Completed);
        assert_eq!(state_kind("TimedOut"), StateKind::Failed);
        assert_eq!(state_kind("Cancelling"), StateKind::Cancelling);
        assert!(state_kind("Cached").is_final());
        assert!(!state_kind("Running").is_final());
    }

    #[test]
    fn the_metadata_query_asks_what_the_seed_asks() {
        let now = DateTime::parse_from_rfc3339("2026-01-01T00:00:10Z")
            .unwrap()
            .with_timezone(&Utc);
        let q = metadata_query(&["r1".into(), "r2".into()], now);
        assert!(q.starts_with(r#"query { flow_run(where: {id: {_in: ["r1", "r2"]}, _or: [{state: {_eq: "Scheduled"}}, {state: {_eq: "Running"}, task_runs: {state_start_time: {_lte: "2026-01-01T00:00:07.000000Z"}}}]})"#), "{q}");
        assert!(q.contains("task_runs(where: {state_start_time: {_lte: \"2026-01-01T00:00:07.000000Z\"}}) { id version task_id serialized_state }"));
    }

    #[test]
    fn only_uuid_run_ids_are_taken_from_the_queue() {
        let ids = json!([
            "7f1c6f0e-5f3a-4a8e-9d2b-1c0de0f1a004",
            "../../admin",
            "x\"}) { __typename } mutation { delete_flow_run(input: {flow_run_id: \"y",
            "",
            3
        ]);
        assert_eq!(
            run_ids(Some(&ids)),
            ["7f1c6f0e-5f3a-4a8e-9d2b-1c0de0f1a004"]
        );
    }

    #[test]
    fn rows_parse_into_runs() {
        let row = json!({
            "id": "r1", "version": 4, "state": "Scheduled", "state_message": null,
            "state_timestamp": "2026-01-01T00:00:00+00:00",
            "serialized_state": {"type": "Scheduled", "start_time": "2026-01-01T00:00:05+00:00"},
            "parameters": {}, "scheduled_start_time": "2026-01-01T00:00:04+00:00",
            "run_config": {"type": "KubernetesRun", "image": "x"}, "name": "brave-fox",
            "labels": ["k8s"],
            "flow": {"id": "f1", "name": "etl", "environment": null, "storage": null, "version": 1, "core_version": "1.4.1"},
            "task_runs": [
                {"id": "t1", "version": 2, "task_id": "k", "serialized_state": {"type": "Retrying"}},
                {"id": "t2", "version": 5, "task_id": "j", "serialized_state": {"type": "Success"}}
            ]
        });
        let (run, meta) = parse_run(&row).unwrap();
        assert_eq!(run.state, StateKind::Scheduled);
        assert_eq!(
            run.scheduled_start.map(|t| t.to_rfc3339()),
            Some("2026-01-01T00:00:05+00:00".into()),
            "the state's start time first"
        );
        assert_eq!(run.job_variables["image"], "x");
        assert_eq!(meta.version, 4);
        assert_eq!(meta.labels, ["k8s"]);
        assert_eq!(meta.task_runs, [("t1".to_string(), 2)]);
        assert_eq!(meta.flow.core_version.as_deref(), Some("1.4.1"));
    }
}
