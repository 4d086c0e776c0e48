//! The `PrefectAgent` controller: one agent per resource, run while the resource exists
//! and is not suspended, its state written back into the resource's status.
//!
//! - [`reconcile`](self::reconcile): the finalizer, the agent's start and its status;
//! - [`supervisor`]: the agent tasks, restarted with backoff when they fail;
//! - [`status`]: what the status says, decided without I/O;
//! - [`config`]: spec (and Secrets) → agent and backend settings, or why not.

pub mod config;
mod reconcile;
pub mod status;
pub mod supervisor;

pub use config::{AgentDefaults, SpecError, agent_config, backend_config};
pub use supervisor::{AgentPhase, Supervisor};

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use kube::core::DeserializeGuard;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backend::http::RetryPolicy;
use crate::crd::PrefectAgent;
use crate::deploy::kubernetes::job::agent_label;
use crate::deploy::kubernetes::observe::JobObserver;
use crate::operator_api::{AgentMetrics, ControllerMetrics, MetricsSource, Readiness};
use crate::scope::Scope;
use prometheus::Registry;

/// The finalizer that lets the operator stop an agent before its resource goes.
pub const FINALIZER: &str = "prefect.io/agent";
/// The field manager of every status write.
pub const FIELD_MANAGER: &str = crate::APP_NAME;
/// How often a running agent's status is refreshed when nothing else changed (its poll
/// count and time); everything else is written when the agent says it changed. Five
/// minutes, as the kubelet refreshes an unchanged Node status: a thousand idle agents
/// cost the API server three writes a second, not thirty.
const STATUS_REFRESH: Duration = Duration::from_secs(300);
/// The same while the agent's polls fail.
const FAILING_REFRESH: Duration = Duration::from_secs(30);
/// The least time between two status writes an agent's changes cause.
const STATUS_WRITE_GAP: Duration = Duration::from_secs(1);

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
    /// Publishes Kubernetes Events on the resources (see [`Context::recorder`]), and when
    /// it was made.
    recorder: Mutex<(Recorder, Instant)>,
    reporter: Reporter,
    pub observer: Arc<JobObserver>,
    pub supervisor: Supervisor,
    pub retry: RetryPolicy,
    pub metrics: ControllerMetrics,
    /// What `/metrics` serves: the agents', the controller's and the API's figures.
    pub registry: Registry,
    /// Where resources may put their Jobs.
    pub scope: Scope,
    /// The operator's settings for every agent.
    pub agent_defaults: AgentDefaults,
    /// Resources whose agent changed something their status shows: reconciled at once.
    changes: mpsc::UnboundedSender<ObjectRef<Guarded>>,
    changed: Mutex<Option<mpsc::UnboundedReceiver<ObjectRef<Guarded>>>>,
}

/// A PrefectAgent as watched: decoded, or the reason it could not be (one bad object
/// must not stop the watch, and with it every other agent).
pub type Guarded = DeserializeGuard<PrefectAgent>;

/// The controller's reconcile: a decodable resource is reconciled, an undecodable one
/// reported on.
async fn reconcile_guarded(guard: Arc<Guarded>, ctx: Arc<Context>) -> Result<Action, Error> {
    match &guard.0 {
        Ok(agent) => reconcile(Arc::new(agent.clone()), ctx).await,
        Err(invalid) => reconcile::undecodable(&guard, invalid, &ctx).await,
    }
}

/// One reconcile of one resource, behind its finalizer (public for in-process tests).
pub async fn reconcile(agent: Arc<PrefectAgent>, ctx: Arc<Context>) -> Result<Action, Error> {
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
    ctx.metrics.reconciles.inc();
    if result.is_err() {
        ctx.metrics.reconcile_errors.inc();
    }
    crate::metrics::observe(&ctx.metrics.reconcile_duration, started.elapsed());
    result
}

fn error_policy(agent: Arc<Guarded>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(agent = %agent.name_any(), %error, "reconcile failed");
    Action::requeue(Duration::from_secs(5))
}

impl Context {
    pub fn new(
        client: Client,
        pod_grace: Duration,
        scope: Scope,
        agent_defaults: AgentDefaults,
    ) -> Arc<Self> {
        let reporter = Reporter {
            controller: crate::APP_NAME.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let (changes, changed) = mpsc::unbounded_channel();
        let metrics = ControllerMetrics::default();
        // The registry reads the agents from this very Context when scraped.
        Arc::new_cyclic(|this: &Weak<Context>| Context {
            changes,
            changed: Mutex::new(Some(changed)),
            recorder: Mutex::new((
                Recorder::new(client.clone(), reporter.clone()),
                Instant::now(),
            )),
            reporter,
            client,
            observer: JobObserver::new(pod_grace),
            supervisor: Supervisor::default(),
            retry: RetryPolicy::default(),
            registry: crate::operator_api::registry(this.clone(), &metrics),
            metrics,
            scope,
            agent_defaults,
        })
    }
}

impl Context {
    /// The Event recorder.
    pub fn recorder(&self) -> Recorder {
        let held = supervisor::locked(&self.recorder);
        held.0.clone()
    }

    /// A new Event recorder once the current one is `EVENT_CACHE_TTL` old. kube-runtime's
    /// keeps every Event it published for 6 minutes (to count repeats into a series) and
    /// forgets them only when it publishes again: after a thousand resources were deleted,
    /// their Events pinned some 24 MiB of heap pages in an idle operator. A repeat across
    /// a renewal starts a new Event instead of counting on.
    fn renew_recorder(&self) {
        let mut held = supervisor::locked(&self.recorder);
        if held.1.elapsed() >= EVENT_CACHE_TTL {
            *held = (
                Recorder::new(self.client.clone(), self.reporter.clone()),
                Instant::now(),
            );
        }
    }
}

/// How long kube-runtime's Event recorder keeps what it published.
const EVENT_CACHE_TTL: Duration = Duration::from_secs(6 * 60);

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
}

/// Runs the controller (and the Job observer) until `shutdown`; `readiness.synced`
/// follows the PrefectAgent watch (a watch that keeps failing makes `/readyz` say so).
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: CancellationToken,
    readiness: Arc<Readiness>,
) {
    let client = ctx.client.clone();
    tokio::spawn(release_memory(ctx.clone(), shutdown.clone()));
    tokio::spawn(
        ctx.observer
            .clone()
            .run(client.clone(), namespace.clone(), shutdown.clone()),
    );
    let agents: Api<Guarded> = match &namespace {
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
    let listed = reader.clone();
    let resources = reflector(
        writer,
        watcher(agents, watcher::Config::default())
            .default_backoff()
            .modify(|agent| {
                agent.managed_fields_mut().clear();
            }),
    )
    .inspect(move |event| match event {
        Ok(_) => readiness.synced.store(true, Ordering::Relaxed),
        Err(e) => {
            if readiness.synced.swap(false, Ordering::Relaxed) {
                tracing::warn!(error = %e, "the PrefectAgent watch fails; retrying with backoff");
            }
        }
    })
    .applied_objects();
    let changed = ctx
        .changed
        .lock()
        .ok()
        .and_then(|mut c| c.take())
        .map(|rx| {
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) })
        });
    let pools: Api<crate::crd::PrefectWorkPool> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let referring = reader.clone();
    let mut controller = Controller::for_stream(resources, reader)
        .with_config(config)
        // An agent waiting for its PrefectWorkPool starts when that is Ready.
        .watches(pools, watcher::Config::default(), move |pool| {
            referring_to_pool(&referring.state(), &pool)
        });
    if let Some(changed) = changed {
        controller = controller.reconcile_on(changed);
    }
    let controller = controller
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile_guarded, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile error");
            }
        });
    // Graceful, but bounded. And not at all before the first list: kube-runtime's runner
    // (5.0) holds its work until the store is ready and reads the end of its queue as
    // "pending" meanwhile, so a controller whose PrefectAgent list never succeeded would
    // never finish; it has started no reconcile either, so there is nothing to wait for.
    let deadline = async {
        shutdown.cancelled().await;
        if listed.wait_until_ready().now_or_never().is_none() {
            tracing::info!("no PrefectAgent was ever listed: nothing to finish");
            return false;
        }
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        true
    };
    tokio::select! {
        _ = controller => {}
        late = deadline => if late {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "the controller did not stop in time after the shutdown; stopping anyway");
        },
    }
    // Launches under way finish (their claims would otherwise wait for adoption).
    ctx.supervisor.stop_all(SHUTDOWN_GRACE).await;
}

/// The PrefectAgents whose `workPoolRef` names this PrefectWorkPool.
fn referring_to_pool(
    agents: &[Arc<Guarded>],
    pool: &crate::crd::PrefectWorkPool,
) -> Vec<ObjectRef<Guarded>> {
    agents
        .iter()
        .filter(|g| {
            g.0.as_ref().is_ok_and(|a| {
                a.namespace() == pool.namespace()
                    && a.spec
                        .api
                        .work_pool_ref
                        .as_ref()
                        .is_some_and(|r| r.name == pool.name_any())
            })
        })
        .map(|g| ObjectRef::from_obj(g.as_ref()))
        .collect()
}

/// Every `MEMORY_RELEASE_INTERVAL`, the heap freed since goes back to the system: a
/// resource's memory goes with the resource, in RSS too. glibc's allocator otherwise keeps
/// its high-water mark, and a few live blocks pin whole pages: after a thousand resources
/// were deleted the operator stayed at the size it had with them, and a thousand
/// registering left 120 MiB where the idle thousand need far less. Done every time,
/// not only when agents stopped: registrations, bursts and Events leave freed pages too,
/// and one trim of a heap this size costs well under a millisecond of CPU.
async fn release_memory(ctx: Arc<Context>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(MEMORY_RELEASE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {
                ctx.renew_recorder();
                trim_heap();
            }
        }
    }
}

/// Hands the allocator's free pages back to the system.
fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own arenas to the
    // system; it takes no pointers and is safe to call from any thread.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

const MEMORY_RELEASE_INTERVAL: Duration = Duration::from_secs(30);

/// How long a shutdown waits for the controller and the agents' launches under way.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
