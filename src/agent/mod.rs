//! The seed's `Agent`: register, then poll → claim → deploy → report, until told to stop.

mod any;
pub mod backoff;
pub mod env;
pub mod health;
mod launch;
mod maintenance;
mod record;
pub mod stats;

pub use any::AnyAgent;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backend::http::HttpError;
use crate::backend::{Backend, BackendError, Claim, FlowRun, Proof};
use crate::deploy::Deployer;
use backoff::Backoff;
use stats::AgentStats;

/// The seed's seven arguments plus the knobs of the loop.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Prefect 1 only: configuration fetched from the backend.
    pub agent_config_id: Option<String>,
    pub name: String,
    pub labels: Vec<String>,
    /// Added to every run's environment (lowest precedence, see [`env`]).
    pub env_vars: BTreeMap<String, String>,
    /// `None` = forever, `Some(0)` = never poll, `Some(n)` = stop after n polls.
    pub max_polls: Option<u64>,
    /// Serve `/api/health` and `/api/poke` here.
    pub agent_address: Option<SocketAddr>,
    /// Ship no logs to Prefect, and turn log shipping off in every run.
    pub no_cloud_logs: bool,
    /// Longest sleep between polls.
    pub poll_interval: Duration,
    pub heartbeat_interval: Duration,
    /// How often cancellations and unlaunched claims are looked for.
    pub maintenance_interval: Duration,
    /// A claim of ours this old without infrastructure is launched again.
    pub adopt_after: Duration,
    /// Claims under way at once (their launches are not counted).
    pub submit_concurrency: usize,
    /// Fault injection for tests: abort the process right after a successful claim.
    pub fault_abort_after_claim: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            agent_config_id: None,
            name: "agent".into(),
            labels: Vec::new(),
            env_vars: BTreeMap::new(),
            max_polls: None,
            agent_address: None,
            no_cloud_logs: false,
            poll_interval: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(30),
            maintenance_interval: Duration::from_secs(10),
            adopt_after: Duration::from_secs(15),
            submit_concurrency: default_submit_concurrency(),
            fault_abort_after_claim: false,
        }
    }
}

/// The seed sized its submission thread pool by CPUs (`min(32, cpus + 4)`) because each
/// submission held a thread. Here a claim is a task waiting on Prefect, so the bound is
/// there for the Prefect server, not this process's CPUs. Measured (README, "Bursts"): a
/// Prefect server keeps five database connections and opens and closes up to ten more as
/// requests need them; past five claims at once it pays for those connections, and on
/// PostgreSQL claims at 16 or 32 at once go through at half to two thirds the rate of 4.
/// Four leaves a connection for the poll and the heartbeats.
pub fn default_submit_concurrency() -> usize {
    4
}

/// Why `start()` returned normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `max_polls` polls were made.
    MaxPolls,
    /// SIGTERM/SIGINT or the owner asked it to stop.
    Shutdown,
}

/// Errors that keep an agent from starting.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Register(#[source] BackendError),
    /// The pool is missing; the hint fits who starts the runs.
    #[error(
        "work pool `{pool}` does not exist at {url}; create it in Prefect (`prefect work-pool create '{pool}' --type {kind}`)"
    )]
    NoPool {
        pool: String,
        url: String,
        kind: &'static str,
    },
    /// The deployer cannot start the pool's runs.
    #[error("{0}")]
    PoolUnsuitable(String),
    #[error("cannot serve the agent API on {addr}: {cause}")]
    AgentAddress { addr: SocketAddr, cause: String },
}

impl AgentError {
    /// A word for a status condition's reason: what is wrong, so that `kubectl get`
    /// tells a missing pool from a wrong URL.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoPool { .. } => "WorkPoolNotFound",
            Self::PoolUnsuitable(_) => "WorkPoolUnsuitable",
            Self::Register(BackendError::NotTheApi { .. }) => "NotPrefectApi",
            Self::Register(BackendError::UnknownQueue { .. }) => "WorkQueueNotFound",
            Self::Register(BackendError::Http(HttpError::Unauthorized { .. })) => "Unauthorized",
            Self::Register(BackendError::Http(HttpError::Unreachable { .. })) => {
                "PrefectUnreachable"
            }
            Self::Register(_) | Self::AgentAddress { .. } => "AgentFailed",
        }
    }
}

/// An agent: one backend, one deployer, one poll loop.
pub struct Agent<B, D> {
    inner: Arc<Inner<B, D>>,
}

struct Inner<B, D> {
    cfg: AgentConfig,
    backend: B,
    deployer: D,
    stats: Arc<AgentStats>,
    poke: Arc<Notify>,
    /// Wakes the maintenance loop (a run is being cancelled).
    cancel_poke: Arc<Notify>,
    /// Runs being claimed, launched, adopted or stopped right now: never twice at once.
    busy: Arc<Busy>,
    /// The last poll found runs not seen before: a burst may be under way, and the
    /// infrastructure ids wait (see `record`).
    bursting: AtomicBool,
    slots: Semaphore,
    /// Orphan scans are needed only while a claim may have been left unlaunched: since
    /// start (a previous process's claims) or since a launch went wrong. They become
    /// visible to a scan `adopt_after` later; one clean scan after that ends the need.
    trouble: Mutex<Trouble>,
    /// Wakes the maintenance loop when a claim may have been left unlaunched.
    trouble_poke: Notify,
    /// Cancelled runs whose infrastructure could not be stopped yet.
    unstopped: Mutex<Vec<FlowRun>>,
    /// Launched runs whose infrastructure id is still to be written (see `record`).
    unrecorded: Mutex<record::Unrecorded>,
    record_poke: Notify,
    /// Cancelled when `start` returns: the per-run exit watchers end with their agent, so
    /// that the ends they waited for go to its successor.
    stopped: CancellationToken,
}

struct Trouble {
    /// When a claim may last have been left without a launch.
    since: std::time::Instant,
    /// A scan that started after `since + adopt_after` and found nothing.
    cleared: bool,
}

/// The runs being worked on, and a wake-up each time one is done with (the poll loop of a
/// burst waits for the backlog to go down).
#[derive(Default)]
struct Busy {
    runs: Mutex<HashSet<String>>,
    released: Notify,
}

impl Busy {
    fn len(&self) -> usize {
        self.runs.lock().map(|b| b.len()).unwrap_or(0)
    }
}

/// Releases a run from the busy set when its work ends, however it ends.
struct BusyGuard {
    busy: Arc<Busy>,
    id: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Ok(mut runs) = self.busy.runs.lock() {
            runs.remove(&self.id);
        }
        self.busy.released.notify_one();
    }
}

/// Whether a poll after one that found runs is worth its price: only once the runs it
/// found are down to a few rounds of the submission slots (the poll takes as long as
/// several claims on a busy server; the slots should not run dry meanwhile).
fn poll_again(backlog: usize, slots: usize) -> bool {
    backlog <= POLL_AGAIN_ROUNDS * slots.max(1)
}

/// After a poll that took up runs: whether it was a burst, so that the next poll goes out
/// as soon as the backlog allows instead of after the seed's pause. `fresh` counts the runs
/// taken up that the poll before had not answered; runs answered again (claims Prefect
/// told to wait for a concurrency slot) are no burst, or their polls would follow each
/// other without a pause.
fn burst(fresh: usize, slots: usize) -> bool {
    !poll_again(fresh, slots)
}

/// Rounds of submission slots left when the next poll of a burst goes out.
const POLL_AGAIN_ROUNDS: usize = 4;

impl<B: Backend, D: Deployer> Agent<B, D> {
    pub fn new(cfg: AgentConfig, backend: B, deployer: D) -> Self {
        let slots = Semaphore::new(cfg.submit_concurrency.max(1));
        Self {
            inner: Arc::new(Inner {
                cfg,
                backend,
                deployer,
                stats: Arc::default(),
                poke: Arc::default(),
                cancel_poke: Arc::default(),
                trouble: Mutex::new(Trouble {
                    since: std::time::Instant::now(),
                    cleared: false,
                }),
                busy: Arc::default(),
                bursting: AtomicBool::new(false),
                slots,
                trouble_poke: Notify::new(),
                unstopped: Mutex::default(),
                unrecorded: Mutex::default(),
                record_poke: Notify::new(),
                stopped: CancellationToken::new(),
            }),
        }
    }

    /// The agent's counters, live.
    pub fn stats(&self) -> Arc<AgentStats> {
        self.inner.stats.clone()
    }

    /// Notifying this wakes the poll loop at once (what `/api/poke` does).
    pub fn poke_handle(&self) -> Arc<Notify> {
        self.inner.poke.clone()
    }

    /// The seed's `start()`: sets the agent up, then polls for work until
    /// `max_polls` is reached or `shutdown` fires; in-flight submissions finish first.
    pub async fn start(&self, shutdown: CancellationToken) -> Result<StopReason, AgentError> {
        let inner = &self.inner;
        let _stopped = inner.stopped.clone().drop_guard();
        let span = tracing::info_span!("agent", agent = %inner.cfg.name);
        async move {
            let background = shutdown.child_token();
            let tasks = TaskTracker::new();
            if let Some(addr) = inner.cfg.agent_address {
                let listener = health::bind(addr)
                    .await
                    .map_err(|e| AgentError::AgentAddress {
                        addr,
                        cause: e.to_string(),
                    })?;
                tracing::info!(%addr, "serving /api/health and /api/poke");
                tasks.spawn(health::serve(
                    listener,
                    inner.stats.clone(),
                    inner.poke.clone(),
                    background.clone(),
                ));
            }
            // The agent API is up before registration: a busy port fails at once, and
            // health answers while a slow server is still being reached.
            let registered = inner.backend.register().await;
            let reg = match registered.map_err(|e| inner.register_error(e)) {
                Ok(reg) => match reg.pool.as_ref().map(|p| inner.deployer.suits(p)) {
                    Some(Err(why)) => Err(AgentError::PoolUnsuitable(why)),
                    _ => Ok(reg),
                },
                Err(e) => Err(e),
            };
            let reg = match reg {
                Ok(reg) => reg,
                Err(e) => {
                    background.cancel();
                    tasks.close();
                    tasks.wait().await;
                    return Err(e);
                }
            };
            inner.stats.set_agent_id(&reg.agent_id);
            tracing::info!(agent_id = %reg.agent_id, kind = %reg.kind, "agent registered");
            let events = inner
                .backend
                .wake_on_events(&crate::backend::events::Wakers {
                    new_runs: inner.poke.clone(),
                    cancellations: inner.cancel_poke.clone(),
                });
            tasks.spawn(
                Inner::heartbeat_loop(self.inner.clone(), background.clone()).in_current_span(),
            );
            tasks.spawn(
                Inner::maintenance_loop(self.inner.clone(), background.clone(), events)
                    .in_current_span(),
            );
            tasks.spawn(
                Inner::record_loop(self.inner.clone(), background.clone()).in_current_span(),
            );
            if let Some(exits) = inner.deployer.unwatched_exits() {
                tasks.spawn(
                    Inner::report_unwatched(self.inner.clone(), exits, background.clone())
                        .in_current_span(),
                );
            }

            let reason = Inner::poll_loop(&self.inner, &shutdown, &tasks).await;
            tracing::info!(
                ?reason,
                "agent stopping: no new polls; finishing submissions under way"
            );
            background.cancel();
            tasks.close();
            tasks.wait().await;
            // The submissions are done: what they launched is recorded before we go.
            inner.record_all().await;
            let s = inner.stats.snapshot();
            tracing::info!(
                polls = s.polls,
                poll_errors = s.poll_errors,
                runs_submitted = s.runs_submitted,
                runs_failed = s.runs_failed,
                runs_cancelled = s.runs_cancelled,
                runs_adopted = s.runs_adopted,
                "agent stopped"
            );
            Ok(reason)
        }
        .instrument(span)
        .await
    }
}

impl<B: Backend, D: Deployer> Inner<B, D> {
    /// A registration error, with the hint that fits this agent's deployer.
    fn register_error(&self, e: BackendError) -> AgentError {
        match e {
            BackendError::UnknownPool { pool, url } => AgentError::NoPool {
                pool,
                url,
                kind: self.deployer.pool_type(),
            },
            e => AgentError::Register(e),
        }
    }

    async fn poll_loop(
        this: &Arc<Self>,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> StopReason {
        let mut backoff = Backoff::new(this.cfg.poll_interval);
        let mut polls = 0u64;
        // The runs the last poll answered: one it answers again (a claim Prefect told to
        // wait for a concurrency slot, say) is no sign of a burst.
        let mut last_answer: HashSet<String> = HashSet::new();
        // Checked before the first poll (max_polls 0) and after each one (no sleep after the last).
        let exhausted = |polls: u64| this.cfg.max_polls.is_some_and(|max| polls >= max);
        if exhausted(polls) {
            return StopReason::MaxPolls;
        }
        loop {
            if shutdown.is_cancelled() {
                return StopReason::Shutdown;
            }
            polls += 1;
            // Runs taken up by this poll, and how many of them the last poll had not answered.
            let (found, fresh) = match this.backend.poll().await {
                Ok(runs) => {
                    this.stats.polled(None);
                    let (mut found, mut fresh) = (false, 0usize);
                    let answer: HashSet<String> = runs.iter().map(|r| r.id.clone()).collect();
                    // A concurrency limit: claims under way count against it too.
                    let in_flight = this.backlog();
                    let room = this.deployer.room().map(|r| r.saturating_sub(in_flight));
                    if room.is_some_and(|r| runs.len() > r) {
                        tracing::debug!(
                            due = runs.len(),
                            ?room,
                            "concurrency limit: leaving runs for later polls"
                        );
                    }
                    for run in runs.into_iter().take(room.unwrap_or(usize::MAX)) {
                        if let Some(guard) = this.mark_busy(&run.id) {
                            found = true;
                            fresh += usize::from(!last_answer.contains(&run.id));
                            let this = this.clone();
                            let span = tracing::info_span!("flow_run", flow_run = %run.id, name = %run.name);
                            tasks.spawn(
                                async move {
                                    let _guard = guard;
                                    this.submit(run).await;
                                }
                                .instrument(span),
                            );
                        }
                    }
                    last_answer = answer;
                    (found, fresh)
                }
                Err(e) => {
                    tracing::error!(error = %e, "poll failed");
                    this.stats.polled(Some(e.to_string()));
                    (false, 0)
                }
            };
            this.bursting.store(fresh > 0, Ordering::Relaxed);
            if exhausted(polls) {
                return StopReason::MaxPolls;
            }
            let sleep = backoff.after_poll(found);
            if found {
                // What this poll found still waits for submission slots, and a poll now
                // would find it again at a poll's full price on the server (the dearest
                // call there is). The next one waits until a few rounds of slots' work
                // are left, or a poll interval has passed.
                let deadline = tokio::time::Instant::now() + this.cfg.poll_interval;
                while !poll_again(this.backlog(), this.cfg.submit_concurrency) {
                    tokio::select! {
                        _ = this.busy.released.notified() => {}
                        _ = tokio::time::sleep_until(deadline) => break,
                        _ = shutdown.cancelled() => return StopReason::Shutdown,
                    }
                }
                // A burst (more than those rounds found): more runs are likely due, and
                // the slots would run dry during the seed's pause; the next poll goes
                // out now.
                if burst(fresh, this.cfg.submit_concurrency) {
                    continue;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = this.poke.notified() => tracing::debug!("poked"),
                _ = shutdown.cancelled() => return StopReason::Shutdown,
            }
        }
    }

    /// Runs found and not yet done with: queued for a slot, being claimed or launched.
    fn backlog(&self) -> usize {
        self.busy.len()
    }

    /// Marks a run busy unless it already is; the guard releases it.
    fn mark_busy(&self, id: &str) -> Option<BusyGuard> {
        let mut busy = self.busy.runs.lock().ok()?;
        busy.insert(id.to_string()).then(|| BusyGuard {
            busy: self.busy.clone(),
            id: id.to_string(),
        })
    }

    async fn submit(self: Arc<Self>, run: FlowRun) {
        // The slot bounds what the Prefect server sees of us at once: the claim. The launch
        // is the platform's work and goes on without it.
        let claim = {
            let Ok(_slot) = self.slots.acquire().await else {
                return;
            };
            tracing::trace!("submission slot taken");
            self.backend.claim(&run).await
        };
        match claim {
            Ok(Claim::Claimed(proof)) => {
                tracing::info!(?proof, "claimed");
                AgentStats::inc(&self.stats.runs_claimed);
                if proof == Proof::History {
                    AgentStats::inc(&self.stats.claims_checked_by_history);
                }
                if self.cfg.fault_abort_after_claim {
                    tracing::error!("fault injection: aborting between claim and launch");
                    std::process::abort();
                }
                self.launch(run).await;
            }
            Ok(Claim::Taken(reason)) => {
                AgentStats::inc(&self.stats.claim_conflicts);
                tracing::debug!(%reason, "claimed by someone else");
            }
            Ok(Claim::Delayed(reason)) => tracing::info!(%reason, "not claimed now"),
            Err(e) => {
                // The claim may have landed even so.
                self.trouble();
                tracing::warn!(error = %e, "claim failed; the run will be offered again");
                self.stats.error(e.to_string());
            }
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.heartbeat_interval) => {}
                _ = stop.cancelled() => return,
            }
            if let Err(e) = self.backend.heartbeat().await {
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{burst, poll_again};

    #[test]
    fn a_burst_is_polled_again_once_its_runs_are_down_to_a_few_rounds_of_slots() {
        assert!(!poll_again(200, 8));
        assert!(!poll_again(33, 8));
        assert!(poll_again(32, 8));
        assert!(poll_again(0, 8));
        // No slots configured still means one at a time, not never.
        assert!(poll_again(4, 0));
        assert!(!poll_again(5, 0));
    }

    #[test]
    fn a_burst_is_more_new_runs_than_a_few_rounds_of_slots() {
        assert!(burst(184, 4));
        assert!(burst(17, 4));
        assert!(!burst(16, 4));
        // A poll that answers only what it answered before.
        assert!(!burst(0, 4));
    }
}
