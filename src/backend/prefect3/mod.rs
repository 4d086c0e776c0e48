//! The Prefect 3 work-pool backend: poll a pool, claim runs with a transition id, report back.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use tokio::sync::RwLock;

mod claims;
mod wire;

pub use claims::{
    claim_marker, claimant_of_record, displaced_by, due_again, in_commit_order, interpret_claim,
    late_claim_over_final, late_marks_in_place, latest_claimant, proven_by_answer,
    serialises_transitions, verify_claim,
};
pub use wire::{ApiFlowRun, ApiState, SetStateResponse};

use wire::{ScheduledRun, Worker};

use super::coalesce::{Coalescer, Memo, ReadAhead};
use super::http::{ApiClient, Auth, HttpError, RetryPolicy};
use super::{
    Backend, BackendError, Claim, ClaimLedger, Env, EnvValue, FlowRun, LogLevel, PoolInfo, Proof,
    Registration, RunAbout, RunContext, RunSpec, StateKind, poll_horizon, timestamp,
};
use crate::text::urlencode;
use crate::work_pool::{
    JobConfiguration, Reference, References, references_in, run_values, shared_template,
    standard_template,
};

/// Where and how this backend polls.
#[derive(Clone, Debug)]
pub struct Prefect3Config {
    pub api_url: String,
    pub auth: Auth,
    pub pool: String,
    /// Empty = every queue of the pool.
    pub queues: Vec<String>,
    /// The worker name Prefect shows; also marks this agent's claims.
    pub agent_name: String,
    /// Who this agent is in its claims (a PrefectAgent's UID, the standalone agent's
    /// `--agent-id`): it adopts only its own unlaunched claims, never a namesake's.
    pub identity: String,
    /// How far ahead of their start time runs are picked up.
    pub prefetch: Duration,
    pub heartbeat_interval: Duration,
    /// Create the pool with this type when it is missing.
    pub create_pool: Option<String>,
    /// Most runs asked for per poll (the server returns at most 200).
    pub poll_limit: usize,
    pub retry: RetryPolicy,
    /// Wake the poll loop on the server's events (a run turned SCHEDULED).
    pub events: bool,
}

/// The Prefect 3 REST backend.
pub struct Prefect3 {
    api: ApiClient,
    cfg: Prefect3Config,
    /// The pool's base job template, read at registration.
    pool_template: RwLock<Arc<Value>>,
    /// What registration learnt: the pool's id, this worker's id, the server's version.
    known: RwLock<Known>,
    /// Concurrent submissions share their reads and log lines (see `coalesce`).
    runs: Coalescer<String, Option<ApiFlowRun>>,
    deployments: Coalescer<String, Option<Value>>,
    flows: Coalescer<String, Option<Value>>,
    logs: Coalescer<Value, ()>,
    /// Deployments as read since the last poll: the runs one poll found share one read
    /// (as if launched the moment the first was), and a poll reads them afresh, so an
    /// edited deployment reaches every run polled after the edit.
    polled_deployments: Memo<String, Option<Value>>,
    /// Flows by id, for their names only (which Prefect never changes).
    flow_names: Memo<String, Option<Value>>,
    /// Runs re-read before their claims, read a few at a time (see `ReadAhead`).
    read_ahead: ReadAhead<Option<FlowRun>>,
}

/// What registration learnt about the pool, the worker and the server.
#[derive(Clone, Debug, Default)]
struct Known {
    pool_id: Option<String>,
    worker_id: Option<String>,
    server_version: Option<String>,
}

/// How many items one coalesced request carries at most (Prefect's filters answer 200).
const BATCH: usize = 100;
/// How many deployments and flows are kept between reads at most.
const MEMO: usize = 1000;
/// A run's state read before its claim serves the claim this long: about as long as a
/// claim waits in a busy server's queue, what a read right before it leaves open anyway.
const READ_FRESH: Duration = Duration::from_secs(1);
/// Runs read along with the one whose claim is next: four rounds of the default slots.
const READ_AHEAD: usize = 16;

impl Prefect3 {
    /// This agent's claim marker: its name and its identity.
    fn marker(&self) -> String {
        claim_marker(&self.cfg.agent_name, &self.cfg.identity)
    }

    pub fn new(cfg: Prefect3Config) -> Result<Self, BackendError> {
        let api = ApiClient::new(&cfg.api_url, cfg.auth.clone(), cfg.retry)?;
        let (a, b, c, d) = (api.clone(), api.clone(), api.clone(), api.clone());
        Ok(Self {
            runs: Coalescer::new("flow run reads", BATCH, move |ids| {
                let api = a.clone();
                async move { read_by_id(&api, "/flow_runs/filter", "flow_runs", ids).await }
            }),
            deployments: Coalescer::new("deployment reads", BATCH, move |ids| {
                let api = b.clone();
                async move { read_by_id(&api, "/deployments/filter", "deployments", ids).await }
            }),
            flows: Coalescer::new("flow reads", BATCH, move |ids| {
                let api = d.clone();
                async move { read_by_id(&api, "/flows/filter", "flows", ids).await }
            }),
            logs: Coalescer::new("run logs", BATCH, move |lines: Vec<Value>| {
                let api = c.clone();
                async move {
                    let n = lines.len();
                    api.send(Method::POST, "/logs/", Some(&Value::Array(lines)))
                        .await?;
                    Ok(vec![(); n])
                }
            }),
            polled_deployments: Memo::new(MEMO),
            flow_names: Memo::new(MEMO),
            read_ahead: ReadAhead::new(READ_FRESH, READ_AHEAD),
            api,
            cfg,
            pool_template: RwLock::new(Arc::new(Value::Null)),
            known: RwLock::new(Known::default()),
        })
    }

    fn pool_path(&self) -> String {
        format!("/work_pools/{}", urlencode(&self.cfg.pool))
    }

    async fn set_state(&self, run_id: &str, state: Value) -> Result<SetStateResponse, HttpError> {
        self.api
            .call(
                Method::POST,
                &format!("{}/set_state", run_path(run_id)?),
                Some(&state),
            )
            .await
    }

    async fn filter_runs(&self, state: &str) -> Result<Vec<FlowRun>, BackendError> {
        let runs = self.filter_api_runs(state).await?;
        Ok(runs.into_iter().map(FlowRun::from).collect())
    }

    /// The pool's runs in `state`, as the API gives them.
    async fn filter_api_runs(&self, state: &str) -> Result<Vec<ApiFlowRun>, BackendError> {
        let mut body = json!({
            "flow_runs": {"state": {"type": {"any_": [state]}}},
            "work_pools": {"name": {"any_": [self.cfg.pool]}},
            "limit": 200,
        });
        if !self.cfg.queues.is_empty() {
            body["work_queues"] = json!({"name": {"any_": self.cfg.queues}});
        }
        Ok(self
            .api
            .call(Method::POST, "/flow_runs/filter", Some(&body))
            .await?)
    }

    /// One worker heartbeat, retried or not.
    async fn beat(&self, retried: bool) -> Result<(), BackendError> {
        let body = json!({
            "name": self.cfg.agent_name,
            "heartbeat_interval_seconds": self.cfg.heartbeat_interval.as_secs().max(1),
        });
        let path = format!("{}/workers/heartbeat", self.pool_path());
        if retried {
            self.api.send(Method::POST, &path, Some(&body)).await?;
        } else {
            self.api
                .send_unretried(Method::POST, &path, Some(&body))
                .await?;
        }
        Ok(())
    }

    /// A run as it is just before its claim: as its poll or the read of an earlier run
    /// found it, if that was under a second ago; else read with the runs polled after it
    /// (see [`ReadAhead`]).
    async fn read_before_claim(&self, run_id: &str) -> Result<FlowRun, BackendError> {
        let sent = std::time::Instant::now();
        let ids = match self.read_ahead.take(run_id, sent) {
            Ok(Some(run)) => return Ok(run),
            Ok(None) => return Err(not_found("flow run", run_id).into()),
            Err(ids) => ids,
        };
        // `take` lists `run_id` first, then the runs read along with it.
        let mut reads = futures::future::join_all(ids.iter().map(|id| self.runs.call(id.clone())))
            .await
            .into_iter();
        let mine = reads.next().unwrap_or(Ok(None));
        for (id, read) in ids.into_iter().skip(1).zip(reads) {
            if let Ok(read) = read {
                self.read_ahead.keep(id, read.map(FlowRun::from), sent);
            }
        }
        found(run_id, mine?)
    }

    /// The run as it is now.
    async fn read(&self, run_id: &str) -> Result<FlowRun, BackendError> {
        found(run_id, self.runs.call(run_id.to_string()).await?)
    }

    /// Puts back a state our late claim overwrote (best effort; logged either way).
    async fn restore(&self, run_id: &str, previous: &ApiState) {
        let state = json!({"state": {"type": previous.kind, "name": previous.name,
            "message": previous.message, "data": previous.data}, "force": true});
        match self.set_state(run_id, state).await {
            Ok(r) if r.status == "ACCEPT" => {
                tracing::warn!(run_id, restored = %previous.kind, "a late claim displaced the run's state; restored it")
            }
            Ok(r) => {
                tracing::error!(run_id, status = %r.status, "could not restore the state a late claim displaced")
            }
            Err(e) => {
                tracing::error!(run_id, error = %e, "could not restore the state a late claim displaced")
            }
        }
    }

    /// Reads the variables and block documents a run refers to; missing ones stay absent
    /// (the resolver names them). Block secrets are read in clear, as Prefect's worker does.
    async fn fetch_references(&self, wanted: Vec<Reference>) -> Result<References, BackendError> {
        let mut found = References::default();
        for reference in wanted {
            let path = match &reference {
                Reference::Variable(name) => format!("/variables/name/{}", urlencode(name)),
                Reference::Block { slug, name } => format!(
                    "/block_types/slug/{}/block_documents/name/{}?include_secrets=true",
                    urlencode(slug),
                    urlencode(name)
                ),
                Reference::BlockId(id) => {
                    format!("/block_documents/{}?include_secrets=true", urlencode(id))
                }
            };
            let answer = match self.api.call::<Value>(Method::GET, &path, None).await {
                Ok(answer) => answer,
                Err(HttpError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            match reference {
                Reference::Variable(name) => {
                    let value = answer.get("value").cloned().unwrap_or(Value::Null);
                    found.variables.insert(name, value);
                }
                block => {
                    let data = answer.get("data").cloned().unwrap_or(Value::Null);
                    found.blocks.insert(block, data);
                }
            }
        }
        Ok(found)
    }

    /// The run's states, oldest first.
    async fn history(&self, run_id: &str) -> Result<Vec<ApiState>, BackendError> {
        let mut states: Vec<ApiState> = self
            .api
            .call(
                Method::GET,
                &format!("/flow_run_states/?flow_run_id={}", run_uuid(run_id)?),
                None,
            )
            .await?;
        states.sort_by_key(|s| s.timestamp);
        Ok(late_marks_in_place(states))
    }

    /// The server's version (for the default image and the `prefect.io/version` label),
    /// and a check that the URL is the API: Prefect serves its UI, a web page for any
    /// path, beside the API, so `http://host:4200` without `/api` would otherwise show
    /// up as "the pool does not exist". A server without the route is no error.
    async fn server_version(&self) -> Result<Option<String>, BackendError> {
        let answer = match self.api.send(Method::GET, "/admin/version", None).await {
            Ok(text) => text,
            Err(e @ (HttpError::Unreachable { .. } | HttpError::Unauthorized { .. })) => {
                return Err(e.into());
            }
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(_) => String::new(),
        };
        if let Ok(Value::String(version)) = serde_json::from_str(&answer) {
            return Ok(Some(version));
        }
        let url = self.api.base_url();
        let web_page = answer.trim_start().starts_with('<');
        // Where the API would be if the URL lacks its path.
        let api_url = format!("{url}/api");
        let api_there = !url.ends_with("/api") && {
            let once = RetryPolicy {
                attempts: 1,
                unreachable_attempts: 1,
                ..RetryPolicy::default()
            };
            let probe = ApiClient::new(&api_url, self.cfg.auth.clone(), once)?;
            matches!(
                probe
                    .call::<Value>(Method::GET, "/admin/version", None)
                    .await,
                Ok(Value::String(_))
            )
        };
        let detail = match (api_there, web_page) {
            (true, _) => Some(format!(
                "it serves Prefect's web UI; the API is at {api_url}: use that URL"
            )),
            (false, true) => Some(
                "it answers with a web page; Prefect's API URL ends in /api (e.g. \
                 http://prefect-server:4200/api)"
                    .to_string(),
            ),
            (false, false) => None,
        };
        match detail {
            Some(detail) => Err(BackendError::NotTheApi {
                url: url.to_string(),
                detail,
            }),
            None => Ok(None),
        }
    }

    async fn read_pool(&self) -> Result<Value, BackendError> {
        match self.api.call(Method::GET, &self.pool_path(), None).await {
            Ok(pool) => Ok(pool),
            Err(HttpError::NotFound { .. }) => match &self.cfg.create_pool {
                Some(kind) => {
                    let body = json!({"name": self.cfg.pool, "type": kind,
                        "base_job_template": standard_template(kind)});
                    tracing::info!(pool = %self.cfg.pool, kind, "creating missing work pool");
                    Ok(self
                        .api
                        .call(Method::POST, "/work_pools/", Some(&body))
                        .await?)
                }
                None => Err(BackendError::UnknownPool {
                    pool: self.cfg.pool.clone(),
                    url: self.api.base_url().to_string(),
                }),
            },
            Err(e) => Err(e.into()),
        }
    }
}

/// A flow run id as it may go into a URL: a UUID, nothing that could change the path
/// (`../admin`) or add a query (`a?b=c`); ids come from servers and from Job labels.
fn run_uuid(run_id: &str) -> Result<uuid::Uuid, HttpError> {
    uuid::Uuid::parse_str(run_id).map_err(|_| HttpError::BadId {
        id: run_id.chars().take(64).collect(),
    })
}

/// `/flow_runs/<uuid>`.
fn run_path(run_id: &str) -> Result<String, HttpError> {
    Ok(format!("/flow_runs/{}", run_uuid(run_id)?))
}

/// The variables Prefect's worker gives every run, in its order: its own settings (API
/// URL and credential), the run's id and the attribution variables. The run's `env` may
/// override them, as with Prefect's worker.
pub fn worker_env(
    api_url: &str,
    auth: &Auth,
    run: &FlowRun,
    about: &RunAbout,
    worker_id: Option<&str>,
) -> Env {
    let mut env = Env::default();
    env.set_plain("PREFECT_API_URL", api_url);
    match auth {
        Auth::None => {}
        Auth::Bearer(key) => env.set("PREFECT_API_KEY", EnvValue::Secret(key.clone())),
        Auth::Basic(s) => env.set("PREFECT_API_AUTH_STRING", EnvValue::Secret(s.clone())),
    }
    env.set_plain("PREFECT__FLOW_RUN_ID", &run.id);
    let attribution = [
        ("PREFECT__WORKER_ID", worker_id),
        ("PREFECT__WORKER_NAME", Some(about.worker_name.as_str())),
        ("PREFECT__FLOW_ID", run.flow_id.as_deref()),
        ("PREFECT__FLOW_NAME", about.flow_name.as_deref()),
        ("PREFECT__DEPLOYMENT_ID", run.deployment_id.as_deref()),
        ("PREFECT__DEPLOYMENT_NAME", about.deployment_name.as_deref()),
    ];
    for (name, value) in attribution {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            env.set_plain(name, value);
        }
    }
    env
}

/// What the agent's own settings impose on every run (`no_cloud_logs`).
pub fn fixed_env(no_cloud_logs: bool) -> Env {
    let mut env = Env::default();
    if no_cloud_logs {
        env.set_plain("PREFECT_LOGGING_TO_API_ENABLED", "false");
    }
    env
}

/// A timestamp as Python's `datetime.isoformat()` writes it in UTC, which Prefect's
/// worker puts in the `prefect.io/deployment-updated` label.
fn python_isoformat(rfc3339: &str) -> Option<String> {
    let t = chrono::DateTime::parse_from_rfc3339(rfc3339)
        .ok()?
        .with_timezone(&Utc);
    let micros = t.timestamp_subsec_micros();
    let base = t.format("%Y-%m-%dT%H:%M:%S");
    Some(if micros == 0 {
        format!("{base}+00:00")
    } else {
        format!("{base}.{micros:06}+00:00")
    })
}

/// Objects by id through a filter call (`{<kind>: {id: {any_: [..]}}}`), one answer per
/// id asked, in order: `None` where the server has no such object.
async fn read_by_id<T: DeserializeOwned + HasId + Clone>(
    api: &ApiClient,
    path: &str,
    kind: &str,
    ids: Vec<String>,
) -> Result<Vec<Option<T>>, HttpError> {
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    let body = json!({kind: {"id": {"any_": unique}}, "limit": unique.len()});
    let found: Vec<T> = api.call(Method::POST, path, Some(&body)).await?;
    let by_id: HashMap<String, T> = found
        .into_iter()
        .filter_map(|x| x.id().map(|id| (id, x)))
        .collect();
    Ok(ids.iter().map(|id| by_id.get(id).cloned()).collect())
}

/// An object by id: as kept in `memo`, else read (with concurrent reads) and kept.
async fn remembered(
    memo: &Memo<String, Option<Value>>,
    reads: &Coalescer<String, Option<Value>>,
    id: &str,
) -> Result<Option<Value>, HttpError> {
    let generation = match memo.get(&id.to_string()) {
        Ok(known) => return Ok(known),
        Err(generation) => generation,
    };
    let read = reads.call(id.to_string()).await?;
    memo.keep(generation, id.to_string(), read.clone());
    Ok(read)
}

/// The error a read by id gives for an object the server does not have.
/// A run as read, or the error that says it is not there.
fn found(run_id: &str, read: Option<ApiFlowRun>) -> Result<FlowRun, BackendError> {
    read.map(FlowRun::from)
        .ok_or_else(|| not_found("flow run", run_id).into())
}

fn not_found(what: &str, id: &str) -> HttpError {
    HttpError::NotFound {
        method: Method::POST,
        path: format!("{what} {id}"),
        detail: "no such object".into(),
    }
}

/// What `read_by_id` matches answers on.
trait HasId {
    fn id(&self) -> Option<String>;
}

impl HasId for ApiFlowRun {
    fn id(&self) -> Option<String> {
        Some(self.id.clone())
    }
}

impl HasId for Value {
    fn id(&self) -> Option<String> {
        self["id"].as_str().map(str::to_string)
    }
}

/// How many of a pool's latest-beating workers are looked through for this agent's id
/// right after its heartbeat.
const WORKER_LOOKUP: usize = 20;

impl Backend for Prefect3 {
    async fn register(&self) -> Result<Registration, BackendError> {
        // First, so that a URL that is not the API is said as such, not as a missing pool.
        let server_version = self.server_version().await?;
        let pool = self.read_pool().await?;
        let kind = pool
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let template = shared_template(
            pool.get("base_job_template")
                .cloned()
                .unwrap_or(Value::Null),
        );
        *self.pool_template.write().await = template.clone();
        for queue in &self.cfg.queues {
            let path = format!("{}/queues/{}", self.pool_path(), urlencode(queue));
            match self.api.send(Method::GET, &path, None).await {
                Ok(_) => {}
                Err(HttpError::NotFound { .. }) => {
                    return Err(BackendError::UnknownQueue {
                        pool: self.cfg.pool.clone(),
                        queue: queue.clone(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Retried: registration waits for it.
        self.beat(true).await?;
        // The server lists a pool's workers by their last heartbeat, latest first: ours
        // is among the first few (a pool's every worker is a lot of rows for the server
        // when a thousand agents start at once).
        let workers: Vec<Worker> = self
            .api
            .call(
                Method::POST,
                &format!("{}/workers/filter", self.pool_path()),
                Some(&json!({"limit": WORKER_LOOKUP})),
            )
            .await
            .unwrap_or_default();
        let worker_id = workers
            .into_iter()
            .find(|w| w.name == self.cfg.agent_name)
            .and_then(|w| w.id);
        *self.known.write().await = Known {
            pool_id: pool.get("id").and_then(Value::as_str).map(str::to_string),
            worker_id: worker_id.clone(),
            server_version,
        };
        let agent_id =
            worker_id.unwrap_or_else(|| format!("{}/{}", self.cfg.pool, self.cfg.agent_name));
        Ok(Registration {
            agent_id,
            pool: Some(PoolInfo {
                name: self.cfg.pool.clone(),
                kind: kind.clone(),
                base_job_template: template,
            }),
            kind,
        })
    }

    /// Not retried: the next one follows within the interval, and Prefect counts a worker
    /// offline only after three intervals without one. A server that refuses heartbeats
    /// for load (SQLite's "database is locked" with a thousand workers) gets no more of
    /// them for it.
    async fn heartbeat(&self) -> Result<(), BackendError> {
        self.beat(false).await
    }

    async fn poll(&self) -> Result<Vec<FlowRun>, BackendError> {
        let before = poll_horizon(Utc::now(), self.cfg.prefetch);
        let mut body = json!({
            "scheduled_before": timestamp(before),
            "limit": self.cfg.poll_limit,
        });
        if !self.cfg.queues.is_empty() {
            body["work_queue_names"] = json!(self.cfg.queues);
        }
        self.polled_deployments.clear();
        let sent = std::time::Instant::now();
        let runs: Vec<ScheduledRun> = match self
            .api
            .call(
                Method::POST,
                &format!("{}/get_scheduled_flow_runs", self.pool_path()),
                Some(&body),
            )
            .await
        {
            Ok(runs) => runs,
            Err(HttpError::NotFound { .. }) => {
                return Err(BackendError::UnknownPool {
                    pool: self.cfg.pool.clone(),
                    url: self.api.base_url().to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let runs: Vec<FlowRun> = runs.into_iter().map(|r| r.flow_run.into()).collect();
        // Only an answer that shows the run SCHEDULED stands for the read before its claim.
        self.read_ahead.polled(
            runs.iter()
                .filter(|run| run.state == StateKind::Scheduled)
                .map(|run| (run.id.clone(), Some(run.clone()))),
            sent,
        );
        Ok(runs)
    }

    async fn claim(&self, run: &FlowRun) -> Result<Claim, BackendError> {
        // The poll may be seconds old (a burst waits for submission slots): a run that
        // moved on meanwhile must not be claimed, as Prefect would accept it as a re-run.
        let now = self.read_before_claim(&run.id).await?;
        if now.state != StateKind::Scheduled {
            return Ok(Claim::Taken(format!(
                "no longer scheduled: {:?}",
                now.state
            )));
        }
        let serialised = serialises_transitions(self.known.read().await.server_version.as_deref());
        // A second try only where the run is SCHEDULED and due again after the first
        // (`due_again`).
        for _ in 0..2 {
            let transition_id = uuid::Uuid::new_v4().to_string();
            let state = json!({
                "state": {
                    "type": "PENDING",
                    "name": "Pending",
                    "message": self.marker(),
                    "state_details": {"transition_id": transition_id},
                }
            });
            let resp = self.set_state(&run.id, state).await?;
            if let Some(not_ours) = interpret_claim(&resp, &transition_id) {
                return Ok(not_ours);
            }
            if serialised && proven_by_answer(&resp, &transition_id) {
                return Ok(Claim::Claimed(Proof::Answer));
            }
            // The answer leaves it open (a server not known to run transitions one at a
            // time, or a claim that landed on something other than SCHEDULED). The
            // history decides, the same way for every agent.
            let history = self.history(&run.id).await?;
            if verify_claim(&history, &transition_id) {
                return Ok(Claim::Claimed(Proof::History));
            }
            // Stamps are not commit order; the run's current state settles what they
            // leave open (read only here, where a claim did not hold at first sight).
            let current = self.runs.call(run.id.clone()).await?.and_then(|r| r.state);
            let history = in_commit_order(history, current.as_ref());
            if verify_claim(&history, &transition_id) {
                tracing::info!("the claim holds: a state stamped after it was committed before it");
                return Ok(Claim::Claimed(Proof::History));
            }
            if let Some(previous) = displaced_by(&history, &transition_id) {
                self.restore(&run.id, previous).await;
            }
            if !due_again(current.as_ref(), Utc::now()) {
                return Ok(Claim::Taken(
                    "another agent claimed it at the same moment".into(),
                ));
            }
            tracing::info!("the run is scheduled and due again after our claim; claiming it again");
        }
        Ok(Claim::Delayed(
            "the run was scheduled again over two claims in a row".into(),
        ))
    }

    async fn context(
        &self,
        run: &FlowRun,
        no_cloud_logs: bool,
    ) -> Result<RunContext, BackendError> {
        let deployment = match &run.deployment_id {
            Some(id) => Some(
                remembered(&self.polled_deployments, &self.deployments, id)
                    .await?
                    .ok_or_else(|| not_found("deployment", id))?,
            ),
            None => None,
        };
        // Only for names in labels and variables: a flow the server cannot find is no reason
        // to fail the run.
        let flow = match &run.flow_id {
            Some(id) => remembered(&self.flow_names, &self.flows, id)
                .await
                .ok()
                .flatten(),
            None => None,
        };
        let deployment_vars = deployment
            .as_ref()
            .map(deployment_job_variables)
            .unwrap_or_default();
        let values = Value::Object(run_values(&deployment_vars, &run.job_variables));
        let template = self.pool_template.read().await.clone();
        let mut wanted = references_in(&template);
        wanted.extend(references_in(&values));
        let references = self.fetch_references(wanted).await?;
        let no_values = Map::new();
        let has_template = template.get("job_configuration").is_some();
        let mut configuration = JobConfiguration::new(
            has_template.then_some(&*template),
            values.as_object().unwrap_or(&no_values),
        )?;
        // Resolved once, after the merge (as Prefect does), so every deployer and the env
        // see values; the job manifest's own references are resolved by the deployer
        // after rendering.
        configuration.variables =
            match references.resolve(&Value::Object(configuration.variables))? {
                Value::Object(vars) => vars,
                _ => Map::new(),
            };
        if let Some(env) = configuration.template.get("env") {
            let env = references.resolve(env)?;
            configuration.template.insert("env".into(), env);
        }
        let known = self.known.read().await.clone();
        let text = |v: Option<&Value>, key: &str| {
            v.and_then(|v| v.get(key))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let about = RunAbout {
            flow_name: text(flow.as_ref(), "name"),
            deployment_name: text(deployment.as_ref(), "name"),
            deployment_updated: text(deployment.as_ref(), "updated")
                .and_then(|t| python_isoformat(&t)),
            work_pool_name: self.cfg.pool.clone(),
            work_pool_id: known.pool_id,
            worker_name: self.cfg.agent_name.clone(),
            prefect_version: known.server_version,
        };
        let worker_env = worker_env(
            &self.cfg.api_url,
            &self.cfg.auth,
            run,
            &about,
            known.worker_id.as_deref(),
        );
        Ok(RunContext {
            spec: RunSpec::WorkPool {
                configuration,
                base_job_template: (!template.is_null()).then_some(template),
                references,
                about,
            },
            default_env: Env::default(),
            worker_env,
            fixed_env: fixed_env(no_cloud_logs),
        })
    }

    async fn launched(&self, run_id: &str, infra_id: &str) -> Result<(), BackendError> {
        self.api
            .send(
                Method::PATCH,
                &run_path(run_id)?,
                Some(&json!({"infrastructure_pid": infra_id})),
            )
            .await?;
        Ok(())
    }

    async fn crash(&self, run_id: &str, message: &str) -> Result<(), BackendError> {
        let state = json!({"state": {"type": "CRASHED", "name": "Crashed", "message": message}});
        let resp = self.set_state(run_id, state).await?;
        if resp.status != "ACCEPT" {
            tracing::warn!(run_id, status = %resp.status, reason = ?resp.reason(), "Prefect refused to mark the run crashed");
        }
        Ok(())
    }

    async fn cancelled(&self, run_id: &str) -> Result<(), BackendError> {
        let state = json!({"state": {"type": "CANCELLED", "name": "Cancelled",
            "message": "Cancelled: the agent stops the flow run's infrastructure"}});
        let resp = self.set_state(run_id, state).await?;
        if resp.status != "ACCEPT" {
            tracing::warn!(run_id, status = %resp.status, reason = ?resp.reason(), "Prefect refused to mark the run cancelled");
        }
        Ok(())
    }

    async fn cancelling(&self) -> Result<Vec<FlowRun>, BackendError> {
        self.filter_runs("CANCELLING").await
    }

    async fn settled_state(&self, run_id: &str) -> Result<StateKind, BackendError> {
        let run = self.read(run_id).await?;
        if run.state.is_final() {
            return Ok(run.state);
        }
        let newest = self
            .history(run_id)
            .await?
            .last()
            .map(|s| StateKind::parse(&s.kind))
            .filter(|k| k.is_final());
        match newest {
            Some(kind) => {
                tracing::warn!(run_id, current = ?run.state, history = ?kind,
                    "Prefect's current state lags its history (concurrent writes on the server); trusting the history");
                Ok(kind)
            }
            None => Ok(run.state),
        }
    }

    async fn log(
        &self,
        run_id: &str,
        level: LogLevel,
        message: &str,
        at: chrono::DateTime<Utc>,
    ) -> Result<(), BackendError> {
        let line = json!({
            "name": crate::APP_NAME,
            "level": level.number(),
            "message": message,
            "timestamp": timestamp(at),
            "flow_run_id": run_id,
        });
        self.logs.call(line).await?;
        Ok(())
    }

    fn wake_on_events(&self, wakers: &super::events::Wakers) -> Option<super::events::EventLink> {
        if !self.cfg.events {
            return None;
        }
        super::events::EventHub::global().subscribe(
            &self.cfg.api_url,
            &self.cfg.auth,
            &self.cfg.pool,
            wakers,
        )
    }
}

impl ClaimLedger for Prefect3 {
    async fn orphans(
        &self,
        min_age: Duration,
        launched: &HashSet<String>,
    ) -> Result<Vec<FlowRun>, BackendError> {
        let marker = self.marker();
        let now = Utc::now();
        let serialised = serialises_transitions(self.known.read().await.server_version.as_deref());
        let mut orphans = Vec::new();
        for found in self.filter_api_runs("PENDING").await? {
            // A claim of ours that displaced a finished run (`late_claim_over_final`): on a
            // server that copies a SCHEDULED state's time into the claim that follows it,
            // the one claim without that time. Put right whoever sent it.
            let late = serialised
                && found.state.as_ref().is_some_and(|s| {
                    s.message.as_deref() == Some(marker.as_str()) && s.scheduled_time().is_none()
                });
            let run = FlowRun::from(found);
            let old_enough = run.state_age(now) >= min_age && !launched.contains(&run.id);
            let mut history = None;
            if late && old_enough {
                let states = self.history(&run.id).await?;
                if let Some(previous) = late_claim_over_final(&states, &marker) {
                    self.restore(&run.id, previous).await;
                    continue;
                }
                history = Some(states);
            }
            // Fresh claims are being launched right now: no history read for them.
            if run.infrastructure_pid.is_some() || !old_enough {
                continue;
            }
            // Read once: the late-claim check above may have read it already.
            let history = match history {
                Some(states) => states,
                None => self.history(&run.id).await?,
            };
            if claimant_of_record(&history).and_then(|s| s.message.as_deref()) == Some(&marker) {
                orphans.push(run);
            }
        }
        Ok(orphans)
    }

    async fn still_unlaunched(&self, run: &FlowRun) -> Result<bool, BackendError> {
        let now = self.read(&run.id).await?;
        Ok(now.state == StateKind::Pending && now.infrastructure_pid.is_none())
    }

    async fn claimed_by_me(&self, run: &FlowRun) -> Result<bool, BackendError> {
        let history = self.history(&run.id).await?;
        let marker = self.marker();
        Ok(latest_claimant(&history).and_then(|s| s.message.as_deref()) == Some(&marker))
    }
}

/// A deployment's job variables: Prefect 2 servers answer with them as `infra_overrides`
/// (2.20 still does), Prefect 3 as `job_variables`.
fn deployment_job_variables(deployment: &Value) -> Map<String, Value> {
    ["job_variables", "infra_overrides"]
        .into_iter()
        .filter_map(|key| deployment.get(key).and_then(Value::as_object))
        .find(|vars| !vars.is_empty())
        .cloned()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretString;

    #[test]
    fn a_run_whose_answer_has_no_state_object_takes_its_state_type() {
        // What a Prefect 2.20 poll answers: `state` null, `state_type` set.
        let polled: ApiFlowRun = serde_json::from_value(json!({
            "id": "r", "name": "n", "state": null, "state_type": "SCHEDULED"}))
        .unwrap();
        assert_eq!(FlowRun::from(polled).state, StateKind::Scheduled);
        let neither: ApiFlowRun = serde_json::from_value(json!({"id": "r"})).unwrap();
        assert_eq!(FlowRun::from(neither).state, StateKind::Unknown);
    }

    #[test]
    fn a_prefect_2_deployment_s_infra_overrides_are_its_job_variables() {
        let v2 = json!({"infra_overrides": {"image": "a:2"}, "name": "d"});
        assert_eq!(deployment_job_variables(&v2)["image"], "a:2");
        let v3 = json!({"job_variables": {"image": "a:3"}, "infra_overrides": {"image": "old"}});
        assert_eq!(deployment_job_variables(&v3)["image"], "a:3");
        let both_shapes = json!({"job_variables": {}, "infra_overrides": {"image": "a:2"}});
        assert_eq!(deployment_job_variables(&both_shapes)["image"], "a:2");
        assert!(deployment_job_variables(&json!({"job_variables": null})).is_empty());
    }

    #[test]
    fn the_worker_s_variables_in_prefect_s_order_with_credentials_as_secrets() {
        let run = FlowRun {
            flow_id: Some("f-1".into()),
            ..FlowRun::pending("run-1", "otter")
        };
        let about = RunAbout {
            flow_name: Some("etl".into()),
            worker_name: "w".into(),
            ..RunAbout::default()
        };
        let env = worker_env(
            "http://x/api",
            &Auth::Bearer(SecretString::new("k")),
            &run,
            &about,
            Some("w-1"),
        );
        assert_eq!(
            env["PREFECT_API_KEY"],
            EnvValue::Secret(SecretString::new("k"))
        );
        let names: Vec<&str> = env.names().collect();
        assert_eq!(
            names,
            [
                "PREFECT_API_URL",
                "PREFECT_API_KEY",
                "PREFECT__FLOW_RUN_ID",
                "PREFECT__WORKER_ID",
                "PREFECT__WORKER_NAME",
                "PREFECT__FLOW_ID",
                "PREFECT__FLOW_NAME"
            ]
        );
        let env = worker_env(
            "http://x/api",
            &Auth::Basic(SecretString::new("u:p")),
            &run,
            &about,
            None,
        );
        assert!(env.contains("PREFECT_API_AUTH_STRING"));
        assert!(!env.contains("PREFECT__WORKER_ID"));
        assert_eq!(
            fixed_env(true)["PREFECT_LOGGING_TO_API_ENABLED"],
            EnvValue::Plain("false".into())
        );
        assert!(fixed_env(false).is_empty());
    }

    #[test]
    fn deployment_timestamps_as_python_writes_them() {
        assert_eq!(
            python_isoformat("2026-11-01T10:00:00Z").as_deref(),
            Some("2026-11-01T10:00:00+00:00")
        );
        assert_eq!(
            python_isoformat("2026-11-01T12:00:00.120000+02:00").as_deref(),
            Some("2026-11-01T10:00:00.120000+00:00")
        );
        assert_eq!(python_isoformat("yesterday"), None);
    }

    #[test]
    fn run_ids_cannot_change_a_path() {
        for bad in [
            "../../../admin",
            "a b?c=d#e",
            "",
            "7f1c6f0e-5f3a-4a8e-9d2b-1c0de0f1a004/x",
        ] {
            assert!(
                matches!(run_path(bad), Err(HttpError::BadId { .. })),
                "{bad}"
            );
        }
        assert_eq!(
            run_path("7F1C6F0E-5F3A-4A8E-9D2B-1C0DE0F1A004").unwrap(),
            "/flow_runs/7f1c6f0e-5f3a-4a8e-9d2b-1c0de0f1a004"
        );
    }
}
