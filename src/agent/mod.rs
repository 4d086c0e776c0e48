//! The seed's `Agent`: register, then poll → claim → deploy → report, until told to stop.

mod any;
pub mod backoff;
pub mod env;
pub mod health;
pub mod stats;

pub use any::AnyAgent;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::backend::{Backend, BackendError, Claim, FlowRun, LogLevel, StateKind};
use crate::deploy::{DeployError, Deployer, Exit, Launch, Stopped};
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
    /// Claims and launches under way at once.
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
/// submission held a thread. Here a submission is a task waiting on Prefect and
/// Kubernetes, so the bound is there to spare the Prefect server, not this process's
/// CPUs: a burst drains about as fast as this many round trips allow.
pub fn default_submit_concurrency() -> usize {
    32
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
    #[error("cannot serve the agent API on {addr}: {cause}")]
    AgentAddress { addr: SocketAddr, cause: String },
}

/// Why one run could not be started.
#[derive(Debug, thiserror::Error)]
enum LaunchError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Env(#[from] env::EnvError),
    #[error(transparent)]
    Deploy(#[from] DeployError),
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
    busy: Arc<Mutex<HashSet<String>>>,
    slots: Semaphore,
    /// Orphan scans are needed only while a claim may have been left unlaunched: since
    /// start (a previous process's claims) or since a launch went wrong. They become
    /// visible to a scan `adopt_after` later; one clean scan after that ends the need.
    trouble: Mutex<Trouble>,
}

struct Trouble {
    /// When a claim may last have been left without a launch.
    since: std::time::Instant,
    /// A scan that started after `since + adopt_after` and found nothing.
    cleared: bool,
}

/// Releases a run from the busy set when its work ends, however it ends.
struct BusyGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    id: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        if let Ok(mut busy) = self.busy.lock() {
            busy.remove(&self.id);
        }
    }
}

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
                slots,
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
            let reg = match inner.backend.register().await {
                Ok(reg) => reg,
                Err(e) => {
                    background.cancel();
                    tasks.close();
                    tasks.wait().await;
                    return Err(AgentError::Register(e));
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
    async fn poll_loop(
        this: &Arc<Self>,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> StopReason {
        let mut backoff = Backoff::new(this.cfg.poll_interval);
        let mut polls = 0u64;
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
            let found = match this.backend.poll().await {
                Ok(runs) => {
                    this.stats.polled(None);
                    let mut found = false;
                    // A concurrency limit: claims under way count against it too.
                    let in_flight = this.busy.lock().map(|b| b.len()).unwrap_or(0);
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
                    found
                }
                Err(e) => {
                    tracing::error!(error = %e, "poll failed");
                    this.stats.polled(Some(e.to_string()));
                    false
                }
            };
            if exhausted(polls) {
                return StopReason::MaxPolls;
            }
            let sleep = backoff.after_poll(found);
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = this.poke.notified() => tracing::debug!("poked"),
                _ = shutdown.cancelled() => return StopReason::Shutdown,
            }
        }
    }

    /// Marks a run busy unless it already is; the guard releases it.
    fn mark_busy(&self, id: &str) -> Option<BusyGuard> {
        let mut busy = self.busy.lock().ok()?;
        busy.insert(id.to_string()).then(|| BusyGuard {
            busy: self.busy.clone(),
            id: id.to_string(),
        })
    }

    async fn submit(self: Arc<Self>, run: FlowRun) {
        let Ok(_slot) = self.slots.acquire().await else {
            return;
        };
        match self.backend.claim(&run).await {
            Ok(Claim::Claimed) => {
                tracing::info!("claimed");
                AgentStats::inc(&self.stats.runs_claimed);
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

    async fn launch(self: &Arc<Self>, run: FlowRun) {
        let run_id = run.id.clone();
        let scheduled = run.scheduled_start;
        match self.try_launch(run).await {
            Ok((infra_id, description, exit)) => {
                if let Err(e) = self.backend.launched(&run_id, &infra_id).await {
                    self.trouble();
                    tracing::warn!(error = %e, "could not record the infrastructure id");
                }
                self.stats.submitted();
                if let Some(at) = scheduled {
                    // Early (prefetched) launches count as zero.
                    let late = (chrono::Utc::now() - at).to_std().unwrap_or_default();
                    crate::metrics::observe(&self.stats.submission_latency, late);
                }
                tracing::info!(%infra_id, "submitted for execution");
                self.run_log(
                    &run_id,
                    LogLevel::Info,
                    &format!("Submitted for execution: {description}"),
                )
                .await;
                if let Some(exit) = exit {
                    let this = self.clone();
                    tokio::spawn(
                        async move { this.watch_exit(run_id, exit).await }.in_current_span(),
                    );
                }
            }
            Err(LaunchError::Backend(e)) if e.is_transient() => {
                self.trouble();
                // Still claimed by us: the maintenance loop adopts it once Prefect answers again.
                tracing::warn!(error = %e, "could not prepare the launch; will retry");
                self.stats.error(e.to_string());
            }
            Err(LaunchError::Deploy(e)) if e.is_transient() => {
                self.trouble();
                // The same: adopted once the platform answers again (the Job name is the
                // run's, so a launch that did happen after all is found, not repeated).
                tracing::warn!(error = %e, "could not launch; will retry");
                self.stats.error(e.to_string());
            }
            Err(e) => {
                self.stats.failed();
                let message = format!("Flow run could not be started: {e}");
                tracing::error!(%message);
                self.stats.error(message.clone());
                self.run_log(&run_id, LogLevel::Error, &message).await;
                if let Err(e) = self.backend.crash(&run_id, &message).await {
                    tracing::error!(error = %e, "could not mark the run crashed");
                }
            }
        }
    }

    async fn try_launch(
        &self,
        run: FlowRun,
    ) -> Result<(String, String, Option<oneshot::Receiver<Exit>>), LaunchError> {
        let ctx = self.backend.context(&run, self.cfg.no_cloud_logs).await?;
        let env = env::run_environment(
            &ctx.default_env,
            &self.cfg.env_vars,
            &ctx.job_variables,
            &ctx.fixed_env,
        )?;
        let launched = self
            .deployer
            .deploy(Launch {
                run,
                job_variables: ctx.job_variables,
                explicit_job_variables: ctx.explicit_job_variables,
                env,
                base_job_template: ctx.base_job_template,
                references: ctx.references,
            })
            .await?;
        Ok((launched.infra_id, launched.description, launched.exit))
    }

    /// When a run's infrastructure ends before the run did, the run is crashed with the cause.
    async fn watch_exit(&self, run_id: String, exit: oneshot::Receiver<Exit>) {
        let Ok(exit) = exit.await else { return };
        self.report_exit(run_id, exit).await;
    }

    /// Ends of infrastructure launched before this process (e.g. Jobs that failed while
    /// the operator was down) get the same treatment as the ones it watched itself.
    async fn report_unwatched(
        self: Arc<Self>,
        mut exits: tokio::sync::mpsc::UnboundedReceiver<(String, Exit)>,
        stop: CancellationToken,
    ) {
        loop {
            let (run_id, exit) = tokio::select! {
                next = exits.recv() => match next {
                    Some(item) => item,
                    None => return,
                },
                _ = stop.cancelled() => return,
            };
            let span = tracing::info_span!("flow_run", flow_run = %run_id);
            self.report_exit(run_id, exit).instrument(span).await;
        }
    }

    async fn report_exit(&self, run_id: String, exit: Exit) {
        // One fewer active run, whatever follows.
        self.stats.touch();
        let state = match self.backend.settled_state(&run_id).await {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(error = %e, exit = %exit.description, "could not read the run after its infrastructure ended");
                return;
            }
        };
        if state.is_final() {
            tracing::info!(?state, exit = %exit.description, "flow run finished");
            return;
        }
        if state == StateKind::Cancelling {
            // The cancellation pass reports this one.
            return;
        }
        let message = format!(
            "Flow run infrastructure exited while the run was {state:?}: {}",
            exit.description
        );
        tracing::warn!(%message);
        self.stats.failed();
        self.run_log(&run_id, LogLevel::Error, &message).await;
        if let Err(e) = self.backend.crash(&run_id, &message).await {
            tracing::error!(error = %e, "could not mark the run crashed");
        }
    }

    async fn run_log(&self, run_id: &str, level: LogLevel, message: &str) {
        if self.cfg.no_cloud_logs {
            return;
        }
        if let Err(e) = self.backend.log(run_id, level, message).await {
            tracing::debug!(error = %e, "could not ship a run log line");
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

    /// A claim may have been left unlaunched just now: scan for orphans again.
    fn trouble(&self) {
        if let Ok(mut t) = self.trouble.lock() {
            t.since = std::time::Instant::now();
            t.cleared = false;
        }
    }

    /// Cancellations and re-adoption of unlaunched claims, on their own clock. With the
    /// event stream waking it for cancellations, the cancellation scan is only the safety
    /// net and runs every `EVENT_SAFETY_NET_TICKS` rounds.
    async fn maintenance_loop(self: Arc<Self>, stop: CancellationToken, events: bool) {
        const EVENT_SAFETY_NET_TICKS: u32 = 6;
        let mut tick: u32 = 0;
        let mut woken = false;
        loop {
            // Boxed: a launch inside is a large future, and inline it would make every
            // idle agent's sleeping loop that large (a thousand agents, a thousand copies).
            Box::pin(self.adopt_orphans(&stop)).await;
            if woken || !events || tick.is_multiple_of(EVENT_SAFETY_NET_TICKS) {
                Box::pin(self.carry_out_cancellations(&stop)).await;
            }
            tick = tick.wrapping_add(1);
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.maintenance_interval) => woken = false,
                _ = self.cancel_poke.notified() => {
                    tracing::debug!("woken by a cancellation");
                    woken = true;
                }
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn adopt_orphans(self: &Arc<Self>, stop: &CancellationToken) {
        let started = std::time::Instant::now();
        let due = match self.trouble.lock() {
            Ok(t) => !t.cleared,
            Err(_) => true,
        };
        if !due {
            return;
        }
        let orphans = match self.backend.orphans(self.cfg.adopt_after).await {
            Ok(runs) => runs,
            Err(e) => {
                tracing::warn!(error = %e, "could not look for unlaunched claims");
                return;
            }
        };
        if orphans.is_empty()
            && let Ok(mut t) = self.trouble.lock()
            && started >= t.since + self.cfg.adopt_after
        {
            // Whatever was left unlaunched before `since` would have shown by now.
            t.cleared = true;
        }
        for run in orphans {
            if stop.is_cancelled() {
                return;
            }
            let Some(_guard) = self.mark_busy(&run.id) else {
                continue;
            };
            let span = tracing::info_span!("flow_run", flow_run = %run.id, name = %run.name);
            async {
                match self.backend.still_unlaunched(&run).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not re-check an unlaunched claim");
                        return;
                    }
                }
                if let Some(infra_id) = self.deployer.find(&run).await {
                    tracing::info!(%infra_id, "claimed run already has infrastructure; recording it");
                    if let Err(e) = self.backend.launched(&run.id, &infra_id).await {
                        tracing::warn!(error = %e, "could not record the infrastructure id");
                    }
                    return;
                }
                tracing::info!(claimed_at = ?run.state_since, "launching a run claimed earlier but never launched");
                AgentStats::inc(&self.stats.runs_adopted);
                self.launch(run.clone()).await;
            }
            .instrument(span)
            .await;
        }
    }

    async fn carry_out_cancellations(&self, stop: &CancellationToken) {
        let runs = match self.backend.cancelling().await {
            Ok(runs) => runs,
            Err(e) => {
                tracing::warn!(error = %e, "could not look for cancellations");
                return;
            }
        };
        for run in runs {
            if stop.is_cancelled() {
                return;
            }
            let span = tracing::info_span!("flow_run", flow_run = %run.id, name = %run.name);
            async {
                let Some(_guard) = self.mark_busy(&run.id) else {
                    return;
                };
                match self.deployer.stop(&run).await {
                    Ok(Stopped::Stopped) => tracing::info!("stopped the run's infrastructure"),
                    // Ours but already gone.
                    Ok(Stopped::NotFound) if run.infrastructure_pid.is_some() => {}
                    // Claimed by us and never launched: nobody else will finish it.
                    Ok(Stopped::NotFound) => match self.backend.claimed_by_me(&run).await {
                        Ok(true) => tracing::info!("cancelled before it was launched"),
                        Ok(false) => {
                            tracing::debug!("cancelling run claimed by another agent; left to it");
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "could not read who claimed the run");
                            return;
                        }
                    },
                    Ok(Stopped::NotMine) => return,
                    Err(e) => {
                        tracing::error!(error = %e, "could not stop the run");
                        return;
                    }
                }
                match self.backend.cancelled(&run.id).await {
                    Ok(()) => {
                        AgentStats::inc(&self.stats.runs_cancelled);
                        tracing::info!("flow run cancelled");
                    }
                    Err(e) => tracing::error!(error = %e, "could not mark the run cancelled"),
                }
            }
            .instrument(span)
            .await;
        }
    }
}
