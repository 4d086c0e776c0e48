//! Sync controllers: Prefect objects declared as Kubernetes resources and kept as
//! declared. A `PrefectWorkPool` is created in Prefect or updated to match, changes made
//! in Prefect behind the operator's back are put back at every resync, and deleting the
//! resource deletes the pool only when its `deletionPolicy` says so.
//!
//! - [`pool`]: what a PrefectWorkPool asks of Prefect, decided without I/O;
//! - this module: the controller, its Prefect calls and the status it writes.

pub mod deployment;
pub mod events;
pub mod pool;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use reqwest::Method;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::backend::http::{ApiClient, Auth, HttpError, RetryPolicy};
use crate::controller::config::{Credentials, SpecError};
use crate::controller::status::{Cond, MAX_MESSAGE, clip, condition_set};
use crate::crd::deployment::{
    GlobalConcurrencyLimitSpec, PrefectDeployment, PrefectDeploymentStatus,
};
use crate::crd::pool::{DeletionPolicy, PrefectWorkPool, PrefectWorkPoolStatus};
use crate::crd::{LocalObjectRef, PrefectApi};
use crate::text::urlencode as encode;
use deployment::DeploymentSpecError;
use pool::PoolSpecError;

/// The finalizer that lets the operator apply a pool's `deletionPolicy`.
pub const POOL_FINALIZER: &str = "prefect.io/work-pool";
/// What every sync reconcile shares.
pub struct SyncContext {
    pub client: Client,
    pub retry: RetryPolicy,
    /// How often a synced pool is compared with Prefect again (drift is put back then).
    pub resync: Duration,
    /// Changes in Prefect seen on its event stream, which make a resource due at once.
    pub drift: events::DriftWatch,
    /// Every PrefectWorkPool and PrefectDeployment the controllers see: two declaring one
    /// Prefect object are found here.
    pub pools_seen: Store<PrefectWorkPool>,
    pub deployments_seen: Store<PrefectDeployment>,
    pub corrections: DriftCounts,
}

/// Each resource's drift corrections as last written, by UID: a sync may start from a
/// cached copy that does not show the previous sync's status write yet, and adding to
/// its count would lose that sync's corrections. A count goes with its resource.
#[derive(Default)]
pub struct DriftCounts(std::sync::Mutex<std::collections::HashMap<String, u64>>);

impl DriftCounts {
    /// The lifetime drift corrections of the resource `uid` after a sync made `made`,
    /// from the larger of its status's count and the one last written here.
    fn after(&self, uid: Option<&str>, in_status: u64, made: u64) -> u64 {
        let (Some(uid), Ok(mut carried)) = (uid, self.0.lock()) else {
            return in_status + made;
        };
        let total = in_status.max(carried.get(uid).copied().unwrap_or(0)) + made;
        carried.insert(uid.to_string(), total);
        total
    }

    /// The resource `uid` is gone (its finalizer's cleanup is done).
    fn forget(&self, uid: Option<&str>) {
        if let (Some(uid), Ok(mut carried)) = (uid, self.0.lock()) {
            carried.remove(uid);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().map(|c| c.len()).unwrap_or(0)
    }
}

/// Why a sync did not (yet) bring Prefect to the declared state.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Spec(#[from] PoolSpecError),
    #[error(transparent)]
    Credentials(#[from] SpecError),
    #[error("{0}")]
    Prefect(#[from] HttpError),
    #[error(
        "{0} flow runs of work pool `{1}` are not finished; the pool is deleted once they are (deletionPolicy: Delete)"
    )]
    RunsUnfinished(u64, String),
    #[error(transparent)]
    Deployment(#[from] DeploymentSpecError),
    #[error("spec.workPool: work pool `{0}` does not exist in Prefect")]
    NoPool(String),
    #[error(
        "spec.globalConcurrencyLimit.name: global concurrency limit `{0}` does not exist in Prefect; set spec.globalConcurrencyLimit.limit to have it created"
    )]
    NoGlobalLimit(String),
    /// Not wrong, not yet possible: a PrefectWorkPool it refers to is not Ready.
    #[error("{0}")]
    Waiting(String),
    #[error(
        "{kind} {other} already declares {object} on this Prefect server; this one is not synced (two would undo each other's changes)"
    )]
    DeclaredTwice {
        kind: &'static str,
        object: String,
        other: String,
    },
    /// An answer without the id it must carry, or with one that is no UUID (it would be
    /// put into a later request's path).
    #[error("Prefect answered {what} without a valid id ({found})")]
    BadId { what: &'static str, found: String },
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl SyncError {
    /// The reason of the conditions this error sets.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Spec(PoolSpecError::TypeChange { .. }) => "WorkPoolTypeChange",
            Self::Spec(PoolSpecError::ConfigMap(_)) => "ConfigMapNotFound",
            Self::Spec(_) => "InvalidTemplate",
            Self::Credentials(e) => e.reason(),
            Self::Prefect(HttpError::Unreachable { .. }) => "PrefectUnreachable",
            Self::Prefect(HttpError::Unauthorized { .. }) => "Unauthorized",
            Self::Prefect(_) => "PrefectRefused",
            Self::RunsUnfinished(..) => "FlowRunsUnfinished",
            Self::Deployment(DeploymentSpecError::Refused { .. }) => "RefusedByPrefect",
            Self::Deployment(_) => "InvalidSpec",
            Self::NoPool(_) => "WorkPoolNotFound",
            Self::NoGlobalLimit(_) => "GlobalConcurrencyLimitNotFound",
            Self::Waiting(_) => "WaitingForWorkPool",
            Self::DeclaredTwice { .. } => "DeclaredTwice",
            Self::BadId { .. } => "PrefectRefused",
            Self::Kube(_) | Self::Finalizer(_) => "KubernetesError",
        }
    }
}

/// Runs the PrefectWorkPool and PrefectDeployment controllers until `shutdown`.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    resync: Duration,
    shutdown: CancellationToken,
) {
    let ns = namespace.as_deref();
    let pools = Controller::new(scoped(&client, ns), watcher::Config::default());
    let deployments = Controller::new(scoped(&client, ns), watcher::Config::default());
    let pool_watch: Api<PrefectWorkPool> = scoped(&client, ns);
    let config_maps: Api<PartialObjectMeta<ConfigMap>> = scoped(&client, ns);
    let (pool_trigger, pool_events) = events::Trigger::new();
    let (deployment_trigger, deployment_events) = events::Trigger::new();
    let ctx = Arc::new(SyncContext {
        client,
        retry: RetryPolicy::default(),
        resync,
        drift: events::DriftWatch::new(pool_trigger, deployment_trigger),
        pools_seen: pools.store(),
        deployments_seen: deployments.store(),
        corrections: Default::default(),
    });
    let stop = shutdown.clone();
    let referring = pools.store();
    let pools = pools
        // A template kept in a ConfigMap follows its edits at once (names only are
        // watched: the text is read when a pool uses it).
        .watches_stream(watch_names(config_maps), move |map| {
            using_config_map(&referring.state(), &map)
        })
        .reconcile_on(receiver_stream(pool_events))
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile_pool, error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "work pool reconcile error");
            }
        });
    let stop = shutdown.clone();
    let referring = deployments.store();
    let deployments = deployments
        // A deployment waiting for its PrefectWorkPool goes on when that is Ready.
        .watches(pool_watch, watcher::Config::default(), move |pool| {
            referring_to_pool(&referring.state(), &pool)
        })
        .reconcile_on(receiver_stream(deployment_events))
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile_deployment, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "deployment reconcile error");
            }
        });
    let controller = futures::future::join(pools, deployments);
    // Bounded: kube-runtime's controller never ends while its first list fails (an
    // install without this CRD), and a sync under way is safe to cut.
    tokio::select! {
        _ = controller => {}
        _ = async { shutdown.cancelled().await; tokio::time::sleep(Duration::from_secs(5)).await } => {}
    }
}

/// The resource of the same kind that declared the same Prefect object first, if another
/// does (`key` names the object: server and name). Two resources declaring one object
/// would each put back the other's changes, at every resync and every event: only the
/// first created is synced.
fn declared_first<K: ResourceExt>(
    me: &K,
    seen: &[Arc<K>],
    key: impl Fn(&K) -> String,
) -> Option<String> {
    let mine = key(me);
    let rank = |k: &K| {
        (
            k.creation_timestamp().map(|t| t.0),
            k.namespace(),
            k.name_any(),
        )
    };
    seen.iter()
        .filter(|o| o.uid() != me.uid() && o.meta().deletion_timestamp.is_none())
        .filter(|o| rank(o) < rank(me) && key(o) == mine)
        .min_by_key(|o| rank(o))
        .map(|o| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()))
}

fn pool_key(p: &PrefectWorkPool) -> String {
    format!("{} {}", p.spec.api.url.trim_end_matches('/'), p.pool_name())
}

fn deployment_key(d: &PrefectDeployment) -> String {
    let url = d.spec.api.url.trim_end_matches('/');
    format!("{url} {} {}", d.spec.flow_name, deployment_name(d))
}

/// Refuses a pool another PrefectWorkPool declared first.
fn first_to_declare_pool(p: &PrefectWorkPool, ctx: &SyncContext) -> Result<(), SyncError> {
    match declared_first(p, &ctx.pools_seen.state(), pool_key) {
        None => Ok(()),
        Some(other) => Err(SyncError::DeclaredTwice {
            kind: "PrefectWorkPool",
            object: format!("work pool `{}`", p.pool_name()),
            other,
        }),
    }
}

/// Refuses a deployment another PrefectDeployment declared first.
fn first_to_declare_deployment(d: &PrefectDeployment, ctx: &SyncContext) -> Result<(), SyncError> {
    match declared_first(d, &ctx.deployments_seen.state(), deployment_key) {
        None => Ok(()),
        Some(other) => Err(SyncError::DeclaredTwice {
            kind: "PrefectDeployment",
            object: format!("deployment `{}/{}`", d.spec.flow_name, deployment_name(d)),
            other,
        }),
    }
}

/// The objects of a kind in the operator's namespace, or in all.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// The names of the watched objects as they change. Without permission to list them
/// (ConfigMaps where Secrets are narrowed to some namespaces), one warning, and what
/// depends on them follows at every resync instead.
fn watch_names<K>(
    api: Api<PartialObjectMeta<K>>,
) -> impl futures::Stream<Item = Result<PartialObjectMeta<K>, watcher::Error>> + Send
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let warned = std::sync::atomic::AtomicBool::new(false);
    watcher::watcher(api, watcher::Config::default())
        .default_backoff()
        .touched_objects()
        .filter_map(move |event| {
            let out = match event {
                Ok(object) => Some(Ok(object)),
                Err(e) => {
                    if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(kind = K::kind(&()).as_ref(), error = %e, "cannot watch; edits are followed at every resync instead");
                    }
                    None
                }
            };
            std::future::ready(out)
        })
}

fn receiver_stream<T: Send + 'static>(
    rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) })
}

/// The PrefectWorkPools whose template is kept in this ConfigMap.
fn using_config_map(
    pools: &[Arc<PrefectWorkPool>],
    map: &PartialObjectMeta<ConfigMap>,
) -> Vec<ObjectRef<PrefectWorkPool>> {
    pools
        .iter()
        .filter(|p| p.namespace() == map.namespace())
        .filter(|p| {
            p.spec
                .base_job_template
                .as_ref()
                .and_then(|t| t.config_map_key_ref.as_ref())
                .is_some_and(|r| r.name == map.name_any())
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// The PrefectDeployments that refer to this PrefectWorkPool.
fn referring_to_pool(
    deployments: &[Arc<PrefectDeployment>],
    pool: &PrefectWorkPool,
) -> Vec<ObjectRef<PrefectDeployment>> {
    deployments
        .iter()
        .filter(|d| d.namespace() == pool.namespace())
        .filter(|d| {
            d.spec
                .work_pool_ref
                .as_ref()
                .is_some_and(|r| r.name == pool.name_any())
        })
        .map(|d| ObjectRef::from_obj(d.as_ref()))
        .collect()
}

fn error_policy<K: ResourceExt>(object: Arc<K>, error: &SyncError, _: Arc<SyncContext>) -> Action {
    tracing::warn!(resource = %object.name_any(), %error, "sync failed");
    Action::requeue(Duration::from_secs(15))
}

/// One reconcile of one PrefectWorkPool, behind its finalizer.
pub async fn reconcile_pool(
    pool: Arc<PrefectWorkPool>,
    ctx: Arc<SyncContext>,
) -> Result<Action, SyncError> {
    let ns = pool.namespace().unwrap_or_default();
    let api: Api<PrefectWorkPool> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, POOL_FINALIZER, pool, |event| async {
        match event {
            Finalizer::Apply(p) => apply(&p, &ctx).await,
            Finalizer::Cleanup(p) => {
                let done = cleanup(&p, &ctx).await;
                if done.is_ok() {
                    ctx.corrections.forget(p.metadata.uid.as_deref());
                }
                done
            }
        }
    })
    .await
    .map_err(unwrap_finalizer)
}

/// The sync's own error out of the finalizer helper's.
fn unwrap_finalizer(e: kube::runtime::finalizer::Error<SyncError>) -> SyncError {
    match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        e => SyncError::Finalizer(e.to_string()),
    }
}

/// The UUID `answer` carries as its id: ids go into later requests' paths, where
/// whatever else a server answers must not end up.
fn id_in(answer: &Value, what: &'static str) -> Result<String, SyncError> {
    let found = &answer["id"];
    match found.as_str().map(uuid::Uuid::parse_str) {
        Some(Ok(id)) => Ok(id.to_string()),
        _ => Err(SyncError::BadId {
            what,
            found: crate::controller::status::clip(&found.to_string(), 80),
        }),
    }
}

/// `/work_pools/<name>` with the name percent-encoded.
fn pool_path(name: &str) -> String {
    format!("/work_pools/{}", encode(name))
}

/// A client for the resource's Prefect API, and the credentials it uses (the event
/// stream's too).
async fn prefect_at(
    api: &PrefectApi,
    ns: &str,
    ctx: &SyncContext,
) -> Result<(ApiClient, Auth), SyncError> {
    let credentials = Credentials::read_for(&ctx.client, ns, api).await?;
    let auth = Auth::from_credentials(credentials.key, credentials.auth_string);
    Ok((ApiClient::new(&api.url, auth.clone(), ctx.retry)?, auth))
}

/// The text of the ConfigMap key the template names, if it names one.
async fn config_map_text(
    p: &PrefectWorkPool,
    ctx: &SyncContext,
) -> Result<Option<String>, SyncError> {
    let Some(r) = p
        .spec
        .base_job_template
        .as_ref()
        .and_then(|t| t.config_map_key_ref.as_ref())
    else {
        return Ok(None);
    };
    let maps: Api<ConfigMap> =
        Api::namespaced(ctx.client.clone(), &p.namespace().unwrap_or_default());
    let found = maps.get_opt(&r.name).await?;
    Ok(found
        .and_then(|m| m.data)
        .and_then(|mut d| d.remove(&r.key)))
}

async fn apply(p: &PrefectWorkPool, ctx: &SyncContext) -> Result<Action, SyncError> {
    // A ConfigMap edit changes the template without changing the resource's generation.
    let template = match config_map_text(p, ctx).await {
        Ok(text) => pool::template(&p.spec, text.as_deref()).map_err(SyncError::from),
        Err(e @ SyncError::Kube(_)) => return Err(e),
        Err(e) => Err(e),
    };
    let hash = template.as_ref().ok().map(pool::template_hash);
    let me = ObjectRef::from_obj(p);
    let last_sync = p.status.as_ref().and_then(|s| s.last_sync_time.as_ref());
    let event = ctx.drift.pools.due(&me, last_sync);
    if let Some(s) = &p.status
        && event != events::Due::Now
        && hash.is_some()
        && s.template_hash == hash
        && let Some(wait) = not_due(
            (s.observed_generation, p.metadata.generation),
            &s.conditions,
            s.last_sync_time.as_ref(),
            ctx.resync,
        )
    {
        return Ok(Action::requeue(event.sooner(wait)));
    }
    ctx.drift.pools.clear(&me);
    let outcome = match template {
        Ok(template) => sync(p, ctx, &template).await,
        Err(e) => Err(e),
    };
    let previous = p.status.clone().unwrap_or_default();
    let generation = p.metadata.generation;
    let (status, action) = match outcome {
        Ok(done) => {
            let ready = synced(format!("work pool `{}` is as declared", p.pool_name()));
            crate::metrics::SYNCS
                .with_label_values(&["PrefectWorkPool", "synced"])
                .inc();
            crate::metrics::DRIFT_CORRECTIONS
                .with_label_values(&["PrefectWorkPool"])
                .inc_by(done.drift_corrections);
            let status = PrefectWorkPoolStatus {
                observed_generation: generation,
                conditions: condition_set(generation, &previous.conditions, ready),
                pool_id: done.pool_id,
                queue_ids: done.queue_ids,
                template_hash: Some(done.template_hash),
                last_sync_time: Some(Time(Timestamp::now())),
                drift_corrections: ctx.corrections.after(
                    p.metadata.uid.as_deref(),
                    previous.drift_corrections,
                    done.drift_corrections,
                ),
            };
            (status, Action::requeue(ctx.resync))
        }
        Err(e @ SyncError::Kube(_)) => return Err(e),
        Err(e) => {
            tracing::warn!(pool = %p.name_any(), reason = e.reason(), error = %e, "work pool not synced");
            crate::metrics::SYNCS
                .with_label_values(&["PrefectWorkPool", "failed"])
                .inc();
            let failed = not_synced(&e);
            let status = PrefectWorkPoolStatus {
                observed_generation: generation,
                conditions: condition_set(generation, &previous.conditions, failed),
                ..previous.clone()
            };
            // A wrong spec waits for an edit (or a ConfigMap/Secret to appear); Prefect
            // being away is retried sooner.
            let again = match e {
                SyncError::Prefect(_) => Duration::from_secs(15),
                _ => Duration::from_secs(30),
            };
            (status, Action::requeue(again))
        }
    };
    if p.status.as_ref() != Some(&status) {
        write_status(p, ctx, &status).await?;
    }
    Ok(action)
}

/// What a sync brought about.
#[derive(Debug)]
pub struct Synced {
    pub pool_id: Option<String>,
    pub queue_ids: std::collections::BTreeMap<String, String>,
    pub template_hash: String,
    /// Fields put back that Prefect had different without a spec change.
    pub drift_corrections: u64,
}

async fn sync(
    p: &PrefectWorkPool,
    ctx: &SyncContext,
    template: &Value,
) -> Result<Synced, SyncError> {
    first_to_declare_pool(p, ctx)?;
    let (api, auth) = prefect_at(&p.spec.api, &p.namespace().unwrap_or_default(), ctx).await?;
    let done = write_pool(&api, p, template).await?;
    ctx.drift.follow_pool(
        &p.spec.api.url,
        &auth,
        &p.pool_name(),
        ObjectRef::from_obj(p),
    );
    Ok(done)
}

/// Brings the pool and its queues in Prefect to the declared state (`template` checked
/// already): the Prefect half of a sync, with nothing of Kubernetes.
pub async fn write_pool(
    api: &ApiClient,
    p: &PrefectWorkPool,
    template: &Value,
) -> Result<Synced, SyncError> {
    let name = p.pool_name();
    let path = pool_path(&name);
    // A difference while the spec is the one last synced was made in Prefect.
    let spec_unchanged = p
        .status
        .as_ref()
        .is_some_and(|s| s.observed_generation == p.metadata.generation && s.pool_id.is_some());
    let mut corrections = 0;
    let observed: Value = match api.call(Method::GET, &path, None).await {
        Ok(v) => v,
        Err(HttpError::NotFound { .. }) => {
            tracing::info!(pool = %name, "creating the work pool in Prefect");
            if spec_unchanged {
                corrections += 1;
            }
            api.call(
                Method::POST,
                "/work_pools/",
                Some(&pool::create_pool_body(&name, &p.spec, template)),
            )
            .await?
        }
        Err(e) => return Err(e.into()),
    };
    let actual = observed["type"].as_str().unwrap_or_default();
    if actual != pool::pool_type(&p.spec) {
        return Err(PoolSpecError::TypeChange {
            pool: name,
            actual: actual.to_string(),
        }
        .into());
    }
    if let Some(patch) = pool::drift(&pool::desired_pool(&p.spec, template), &observed) {
        tracing::info!(pool = %name, fields = ?patch.as_object().map(|o| o.keys().collect::<Vec<_>>()), "updating the work pool in Prefect");
        api.send(Method::PATCH, &path, Some(&patch)).await?;
        if spec_unchanged {
            corrections += 1;
        }
    }
    let queues: Vec<Value> = api
        .call(
            Method::POST,
            &format!("{path}/queues/filter"),
            Some(&json!({"limit": 200})),
        )
        .await?;
    let mut queue_ids = std::collections::BTreeMap::new();
    for q in &p.spec.queues {
        let want = pool::desired_queue(q);
        let found = queues.iter().find(|o| o["name"] == q.name.as_str());
        let id = match found {
            None => {
                if spec_unchanged {
                    corrections += 1;
                }
                let mut body = want.clone();
                body["name"] = json!(q.name);
                let made: Value = api
                    .call(Method::POST, &format!("{path}/queues/"), Some(&body))
                    .await?;
                made["id"].as_str().map(str::to_string)
            }
            Some(o) => {
                if let Some(patch) = pool::drift(&want, o) {
                    api.send(
                        Method::PATCH,
                        &format!("{path}/queues/{}", encode(&q.name)),
                        Some(&patch),
                    )
                    .await?;
                    if spec_unchanged {
                        corrections += 1;
                    }
                }
                o["id"].as_str().map(str::to_string)
            }
        };
        if let Some(id) = id {
            queue_ids.insert(q.name.clone(), id);
        }
    }
    Ok(Synced {
        pool_id: observed["id"].as_str().map(str::to_string),
        queue_ids,
        template_hash: pool::template_hash(template),
        drift_corrections: corrections,
    })
}

async fn cleanup(p: &PrefectWorkPool, ctx: &SyncContext) -> Result<Action, SyncError> {
    ctx.drift.forget_pool(&ObjectRef::from_obj(p));
    if let Err(e) = first_to_declare_pool(p, ctx) {
        tracing::info!(pool = %p.pool_name(), error = %e, "resource deleted; the work pool is another's, left in Prefect");
        return Ok(Action::await_change());
    }
    if p.spec.deletion_policy == DeletionPolicy::Retain {
        tracing::info!(pool = %p.pool_name(), "resource deleted; the work pool stays in Prefect (deletionPolicy: Retain)");
        return Ok(Action::await_change());
    }
    let name = p.pool_name();
    let result = delete_pool(p, ctx, &name).await;
    if let Err(e) = &result {
        // Said where the user looks while the resource hangs in deletion.
        let previous = p.status.clone().unwrap_or_default();
        let (reason, message) = (e.reason(), clip(&e.to_string(), MAX_MESSAGE));
        let failed: [Cond; 3] = [
            ("False", reason, message.clone()),
            ("True", "Deleting", message.clone()),
            ("True", reason, message),
        ];
        let status = PrefectWorkPoolStatus {
            conditions: condition_set(p.metadata.generation, &previous.conditions, failed),
            ..previous
        };
        write_status(p, ctx, &status).await?;
    }
    result
}

async fn delete_pool(
    p: &PrefectWorkPool,
    ctx: &SyncContext,
    name: &str,
) -> Result<Action, SyncError> {
    let (api, _) = prefect_at(&p.spec.api, &p.namespace().unwrap_or_default(), ctx).await?;
    let unfinished: u64 = api
        .call(
            Method::POST,
            "/flow_runs/count",
            Some(&json!({
                "work_pools": {"name": {"any_": [name]}},
                "flow_runs": {"state": {"type": {"any_": ["PENDING", "RUNNING", "CANCELLING", "PAUSED"]}}},
            })),
        )
        .await?;
    if unfinished > 0 {
        return Err(SyncError::RunsUnfinished(unfinished, name.to_string()));
    }
    match api.send(Method::DELETE, &pool_path(name), None).await {
        Ok(_) | Err(HttpError::NotFound { .. }) => {
            tracing::info!(pool = %name, "work pool deleted in Prefect (deletionPolicy: Delete)");
            Ok(Action::await_change())
        }
        Err(e) => Err(e.into()),
    }
}

async fn write_status(
    p: &PrefectWorkPool,
    ctx: &SyncContext,
    status: &PrefectWorkPoolStatus,
) -> Result<(), SyncError> {
    write_status_of(p, ctx, status).await
}

/// Writes a resource's status by server-side apply, under the operator's field manager.
async fn write_status_of<K>(
    object: &K,
    ctx: &SyncContext,
    status: &impl serde::Serialize,
) -> Result<(), SyncError>
where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
    let patch = json!({"apiVersion": K::api_version(&()), "kind": K::kind(&()), "status": status});
    api.patch_status(
        &object.name_any(),
        &PatchParams::apply(crate::controller::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// How long until a resource synced less than `resync` ago for its current generation is
/// due again; None when it is due now. Every status write comes back as a watch event,
/// and a sync per event would call Prefect in a loop: a synced resource is compared with
/// Prefect once per `resync`, and at once when its spec changes.
pub fn not_due(
    (observed, generation): (Option<i64>, Option<i64>),
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    last_sync: Option<&Time>,
    resync: Duration,
) -> Option<Duration> {
    let synced = conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if observed != generation || !synced {
        return None;
    }
    let since = Timestamp::now().duration_since(last_sync?.0);
    let since = Duration::try_from(since).ok()?;
    resync.checked_sub(since).filter(|left| !left.is_zero())
}

/// Ready, Progressing, Degraded after a sync that worked.
fn synced(message: String) -> [Cond<'static>; 3] {
    [
        ("True", "Synced", message),
        ("False", "Synced", "up to date".into()),
        ("False", "Synced", "no problem seen".into()),
    ]
}

/// Ready, Progressing, Degraded after a sync that did not; waiting is no failure.
fn not_synced(e: &SyncError) -> [Cond<'static>; 3] {
    let (reason, message) = (e.reason(), clip(&e.to_string(), MAX_MESSAGE));
    if let SyncError::Waiting(_) = e {
        return [
            ("False", reason, message.clone()),
            ("True", reason, message),
            ("False", reason, "no problem seen".into()),
        ];
    }
    [
        ("False", reason, message.clone()),
        ("False", reason, message.clone()),
        ("True", reason, message),
    ]
}

/// The pool a `workPoolRef` names, once that PrefectWorkPool is Ready for its generation.
async fn referenced_pool(
    ns: &str,
    r: &LocalObjectRef,
    ctx: &SyncContext,
) -> Result<String, SyncError> {
    let pools: Api<PrefectWorkPool> = Api::namespaced(ctx.client.clone(), ns);
    let Some(pool) = pools.get_opt(&r.name).await? else {
        return Err(SyncError::Waiting(format!(
            "waiting for PrefectWorkPool {ns}/{}: it does not exist",
            r.name
        )));
    };
    match pool.not_ready() {
        None => Ok(pool.pool_name()),
        Some(why) => Err(SyncError::Waiting(format!(
            "waiting for PrefectWorkPool {ns}/{} {why}",
            r.name
        ))),
    }
}

/// The finalizer that lets the operator apply a deployment's `deletionPolicy`.
pub const DEPLOYMENT_FINALIZER: &str = "prefect.io/deployment";

/// One reconcile of one PrefectDeployment, behind its finalizer.
pub async fn reconcile_deployment(
    d: Arc<PrefectDeployment>,
    ctx: Arc<SyncContext>,
) -> Result<Action, SyncError> {
    let api: Api<PrefectDeployment> =
        Api::namespaced(ctx.client.clone(), &d.namespace().unwrap_or_default());
    finalizer(&api, DEPLOYMENT_FINALIZER, d, |event| async {
        match event {
            Finalizer::Apply(d) => apply_deployment(&d, &ctx).await,
            Finalizer::Cleanup(d) => {
                let done = cleanup_deployment(&d, &ctx).await;
                if done.is_ok() {
                    ctx.corrections.forget(d.metadata.uid.as_deref());
                }
                done
            }
        }
    })
    .await
    .map_err(unwrap_finalizer)
}

/// The deployment's name in Prefect.
fn deployment_name(d: &PrefectDeployment) -> String {
    d.spec.name.clone().unwrap_or_else(|| d.name_any())
}

async fn apply_deployment(d: &PrefectDeployment, ctx: &SyncContext) -> Result<Action, SyncError> {
    let me = ObjectRef::from_obj(d);
    let last_sync = d.status.as_ref().and_then(|s| s.last_sync_time.as_ref());
    let event = ctx.drift.deployments.due(&me, last_sync);
    if let Some(s) = &d.status
        && event != events::Due::Now
        && let Some(wait) = not_due(
            (s.observed_generation, d.metadata.generation),
            &s.conditions,
            s.last_sync_time.as_ref(),
            ctx.resync,
        )
    {
        return Ok(Action::requeue(event.sooner(wait)));
    }
    ctx.drift.deployments.clear(&me);
    let previous = d.status.clone().unwrap_or_default();
    let generation = d.metadata.generation;
    let (status, action) = match sync_deployment(d, ctx).await {
        Ok(s) => {
            crate::metrics::SYNCS
                .with_label_values(&["PrefectDeployment", "synced"])
                .inc();
            crate::metrics::DRIFT_CORRECTIONS
                .with_label_values(&["PrefectDeployment"])
                .inc_by(s.drift_corrections);
            let message = format!(
                "deployment `{}/{}` is as declared",
                d.spec.flow_name,
                deployment_name(d)
            );
            let status = PrefectDeploymentStatus {
                observed_generation: generation,
                conditions: condition_set(generation, &previous.conditions, synced(message)),
                deployment_id: s.deployment_id,
                flow_id: s.flow_id,
                global_concurrency_limit_id: s.global_concurrency_limit_id,
                next_scheduled_run: s.next_scheduled_run,
                spec_hash: Some(s.spec_hash),
                last_sync_time: Some(Time(Timestamp::now())),
                drift_corrections: ctx.corrections.after(
                    d.metadata.uid.as_deref(),
                    previous.drift_corrections,
                    s.drift_corrections,
                ),
            };
            (status, Action::requeue(ctx.resync))
        }
        Err(e @ SyncError::Kube(_)) => return Err(e),
        Err(e) => {
            crate::metrics::SYNCS
                .with_label_values(&["PrefectDeployment", "failed"])
                .inc();
            if let SyncError::Waiting(_) = e {
                tracing::info!(deployment = %d.name_any(), error = %e, "deployment waits for its pool");
            } else {
                tracing::warn!(deployment = %d.name_any(), reason = e.reason(), error = %e, "deployment not synced");
            }
            let status = PrefectDeploymentStatus {
                observed_generation: generation,
                conditions: condition_set(generation, &previous.conditions, not_synced(&e)),
                ..previous.clone()
            };
            let again = match e {
                // The PrefectWorkPool is watched; this only bounds a missed event.
                SyncError::Waiting(_) => Duration::from_secs(30),
                SyncError::Prefect(_) => Duration::from_secs(15),
                _ => Duration::from_secs(30),
            };
            (status, Action::requeue(again))
        }
    };
    if d.status.as_ref() != Some(&status) {
        write_status_of(d, ctx, &status).await?;
    }
    Ok(action)
}

/// What a deployment sync brought about.
#[derive(Debug)]
pub struct SyncedDeployment {
    pub deployment_id: Option<String>,
    pub flow_id: Option<String>,
    pub global_concurrency_limit_id: Option<String>,
    pub next_scheduled_run: Option<String>,
    pub spec_hash: String,
    pub drift_corrections: u64,
}

async fn sync_deployment(
    d: &PrefectDeployment,
    ctx: &SyncContext,
) -> Result<SyncedDeployment, SyncError> {
    let spec = &d.spec;
    deployment::check(spec)?;
    first_to_declare_deployment(d, ctx)?;
    let ns = d.namespace().unwrap_or_default();
    let pool = match (&spec.work_pool, &spec.work_pool_ref) {
        (Some(pool), _) => pool.clone(),
        (None, Some(r)) => referenced_pool(&ns, r, ctx).await?,
        (None, None) => return Err(DeploymentSpecError::Pool.into()),
    };
    let (api, auth) = prefect_at(&spec.api, &ns, ctx).await?;
    let done = write_deployment(&api, d, pool).await?;
    if let Some(id) = &done.deployment_id {
        ctx.drift
            .follow_deployment(&spec.api.url, &auth, id, ObjectRef::from_obj(d));
    }
    Ok(done)
}

/// Registers the flow and brings the deployment in Prefect to the declared state, in the
/// work pool `pool`: the Prefect half of a sync, with nothing of Kubernetes.
pub async fn write_deployment(
    api: &ApiClient,
    d: &PrefectDeployment,
    pool: String,
) -> Result<SyncedDeployment, SyncError> {
    let spec = &d.spec;
    // Registered by name, as `flow.deploy` does: the existing flow, or a new one.
    let flow: Value = api
        .call(
            Method::POST,
            "/flows/",
            Some(&json!({"name": spec.flow_name})),
        )
        .await?;
    let flow_id = id_in(&flow, "the flow")?;
    let spec_unchanged = d.status.as_ref().is_some_and(|s| {
        s.observed_generation == d.metadata.generation && s.deployment_id.is_some()
    });
    let mut corrections = 0;
    let global_limit = match &spec.global_concurrency_limit {
        Some(g) => Some(global_limit(api, g, spec_unchanged, &mut corrections).await?),
        None => None,
    };
    let name = deployment_name(d);
    let want = deployment::body(spec, &name, &flow_id, &pool, global_limit.as_deref());
    let path = format!(
        "/deployments/name/{}/{}",
        encode(&spec.flow_name),
        encode(&name)
    );
    let observed: Option<Value> = match api.call(Method::GET, &path, None).await {
        Ok(v) => Some(v),
        Err(HttpError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let differs = observed.as_ref().map_or_else(
        || vec!["(missing)".to_string()],
        |o| deployment::drift(&want, o),
    );
    let current = match observed {
        Some(o) if differs.is_empty() => o,
        _ => {
            tracing::info!(deployment = %name, fields = ?differs, "creating or updating the deployment in Prefect");
            if spec_unchanged {
                corrections += 1;
            }
            let steps = deployment::limit_steps(observed.as_ref(), global_limit.as_deref());
            if let (true, Some(o)) = (steps.detach_first, &observed) {
                detach_global_limit(api, o).await?;
            }
            let upserted = match api.call(Method::POST, "/deployments/", Some(&want)).await {
                Ok(v) => v,
                Err(HttpError::Status {
                    status: 422,
                    refusal: Some(answer),
                    ..
                }) => {
                    if let Some(e) = deployment::refused(&answer) {
                        return Err(e.into());
                    }
                    return Err(SyncError::Deployment(DeploymentSpecError::Refused {
                        field: "spec".into(),
                        message: answer.to_string(),
                    }));
                }
                Err(HttpError::NotFound { detail, .. }) if detail.contains("ork pool") => {
                    return Err(SyncError::NoPool(pool));
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(own) = steps.delete_after {
                let path = format!("/v2/concurrency_limits/{}", encode(&own));
                match api.send(Method::DELETE, &path, None).await {
                    Ok(_) | Err(HttpError::NotFound { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            upserted
        }
    };
    let id = Some(id_in(&current, "the deployment")?);
    // Its runs scheduled now, as Prefect's scheduler would within its loop (a minute),
    // so that the status says when the next one is.
    let wrote = corrections > 0 || !differs.is_empty();
    let schedules = !spec.paused && spec.schedules.iter().any(|s| s.active != Some(false));
    if let (true, true, Some(id)) = (wrote, schedules, &id) {
        let path = format!("/deployments/{}/schedule", encode(id));
        if let Err(e) = api.send(Method::POST, &path, Some(&json!({}))).await {
            tracing::debug!(error = %e, "could not schedule the deployment's runs; Prefect's scheduler will");
        }
    }
    let next: Vec<Value> = match &id {
        Some(id) => api
            .call(
                Method::POST,
                "/flow_runs/filter",
                Some(&json!({
                    "deployments": {"id": {"any_": [id]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                    "sort": "EXPECTED_START_TIME_ASC",
                    "limit": 1,
                })),
            )
            .await
            .unwrap_or_default(),
        None => Vec::new(),
    };
    Ok(SyncedDeployment {
        deployment_id: id,
        flow_id: Some(flow_id),
        global_concurrency_limit_id: global_limit,
        next_scheduled_run: next
            .first()
            .and_then(|r| r["expected_start_time"].as_str())
            .map(str::to_string),
        spec_hash: pool::template_hash(&want),
        drift_corrections: corrections,
    })
}

/// The id of the deployment's global concurrency limit: created when missing if the spec
/// declares its limit, and then kept as declared.
async fn global_limit(
    api: &ApiClient,
    g: &GlobalConcurrencyLimitSpec,
    spec_unchanged: bool,
    corrections: &mut u64,
) -> Result<String, SyncError> {
    let path = format!("/v2/concurrency_limits/{}", encode(&g.name));
    let found: Value = match api.call(Method::GET, &path, None).await {
        Ok(v) => v,
        Err(HttpError::NotFound { .. }) if g.limit.is_some() => {
            tracing::info!(limit = %g.name, "creating the global concurrency limit in Prefect");
            if spec_unchanged {
                *corrections += 1;
            }
            api.call(
                Method::POST,
                "/v2/concurrency_limits/",
                Some(&deployment::global_limit_body(g)),
            )
            .await?
        }
        Err(HttpError::NotFound { .. }) => return Err(SyncError::NoGlobalLimit(g.name.clone())),
        Err(e) => return Err(e.into()),
    };
    if let Some(patch) = deployment::global_limit_drift(g, &found) {
        api.send(Method::PATCH, &path, Some(&patch)).await?;
        if spec_unchanged {
            *corrections += 1;
        }
    }
    id_in(&found, "the global concurrency limit")
}

/// Detaches the shared global concurrency limit a deployment holds: Prefect would change
/// it on a `concurrency_limit`, and delete it with a null one or with the deployment.
async fn detach_global_limit(api: &ApiClient, observed: &Value) -> Result<(), SyncError> {
    let id = id_in(observed, "the deployment")?;
    api.send(
        Method::PATCH,
        &format!("/deployments/{}", encode(&id)),
        Some(&json!({"global_concurrency_limit_id": null})),
    )
    .await?;
    Ok(())
}

async fn cleanup_deployment(d: &PrefectDeployment, ctx: &SyncContext) -> Result<Action, SyncError> {
    ctx.drift.forget_deployment(&ObjectRef::from_obj(d));
    if let Err(e) = first_to_declare_deployment(d, ctx) {
        tracing::info!(deployment = %deployment_name(d), error = %e, "resource deleted; the deployment is another's, left in Prefect");
        return Ok(Action::await_change());
    }
    if d.spec.deletion_policy == DeletionPolicy::Retain {
        tracing::info!(deployment = %deployment_name(d), "resource deleted; the deployment stays in Prefect (deletionPolicy: Retain)");
        return Ok(Action::await_change());
    }
    let Some(id) = d.status.as_ref().and_then(|s| s.deployment_id.clone()) else {
        return Ok(Action::await_change());
    };
    let (api, _) = prefect_at(&d.spec.api, &d.namespace().unwrap_or_default(), ctx).await?;
    let path = format!("/deployments/{}", encode(&id));
    if let Ok(observed) = api.call::<Value>(Method::GET, &path, None).await
        && deployment::limit_steps(Some(&observed), None).detach_first
    {
        detach_global_limit(&api, &observed).await?;
    }
    match api
        .send(
            Method::DELETE,
            &format!("/deployments/{}", encode(&id)),
            None,
        )
        .await
    {
        Ok(_) | Err(HttpError::NotFound { .. }) => {
            tracing::info!(deployment = %deployment_name(d), "deployment deleted in Prefect (deletionPolicy: Delete)");
            Ok(Action::await_change())
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    #[test]
    fn drift_counts_survive_a_stale_status_and_go_with_their_resource() {
        let counts = DriftCounts::default();
        assert_eq!(counts.after(Some("a"), 0, 1), 1);
        // The next sync started from a copy without that write: nothing is lost.
        assert_eq!(counts.after(Some("a"), 0, 1), 2);
        // A status ahead of what this process wrote (another replica) counts.
        assert_eq!(counts.after(Some("a"), 5, 0), 5);
        assert_eq!(counts.after(Some("b"), 0, 0), 0);
        assert_eq!(counts.len(), 2);
        counts.forget(Some("a"));
        counts.forget(None);
        assert_eq!(counts.len(), 1);
        assert_eq!(counts.after(None, 3, 1), 4);
        assert_eq!(counts.len(), 1);
    }

    fn pool(ns: &str, name: &str, pool: &str, created_s: i64) -> Arc<PrefectWorkPool> {
        let mut p: PrefectWorkPool = serde_json::from_value(json!({
            "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectWorkPool",
            "metadata": {"name": name, "namespace": ns, "uid": format!("{ns}-{name}")},
            "spec": {"api": {"url": "http://prefect/api/"}, "name": pool}}))
        .unwrap();
        p.metadata.creation_timestamp = Some(Time(
            Timestamp::from_second(1_700_000_000 + created_s).unwrap(),
        ));
        Arc::new(p)
    }

    #[test]
    fn of_two_resources_declaring_one_object_the_first_created_is_synced() {
        let a = pool("team-a", "pool", "shared", 10);
        let b = pool("team-b", "pool", "shared", 20);
        let c = pool("team-c", "other", "another", 5);
        let seen = vec![a.clone(), b.clone(), c.clone()];
        assert_eq!(declared_first(a.as_ref(), &seen, pool_key), None);
        assert_eq!(
            declared_first(b.as_ref(), &seen, pool_key),
            Some("team-a/pool".into())
        );
        assert_eq!(declared_first(c.as_ref(), &seen, pool_key), None);
        // The same second: by namespace, then name.
        let d = pool("team-0", "pool", "shared", 10);
        let seen = vec![a.clone(), d.clone()];
        assert_eq!(
            declared_first(a.as_ref(), &seen, pool_key),
            Some("team-0/pool".into())
        );
        // One being deleted no longer holds the name.
        let mut gone = (*d).clone();
        gone.metadata.deletion_timestamp = gone.metadata.creation_timestamp.clone();
        let seen = vec![a.clone(), Arc::new(gone)];
        assert_eq!(declared_first(a.as_ref(), &seen, pool_key), None);
    }

    #[test]
    fn a_synced_resource_is_due_once_per_resync_or_when_its_spec_changes() {
        let ready = |status: &str| Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: "Synced".into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::now()),
        };
        let minute = Duration::from_secs(60);
        let just_now = Time(Timestamp::now());
        let left = not_due(
            (Some(1), Some(1)),
            &[ready("True")],
            Some(&just_now),
            minute,
        );
        assert!(
            left.is_some_and(|l| l > Duration::from_secs(50)),
            "{left:?}"
        );
        assert_eq!(
            not_due(
                (Some(1), Some(2)),
                &[ready("True")],
                Some(&just_now),
                minute
            ),
            None,
            "spec changed"
        );
        assert_eq!(
            not_due(
                (Some(1), Some(1)),
                &[ready("False")],
                Some(&just_now),
                minute
            ),
            None,
            "not synced"
        );
        assert_eq!(
            not_due((Some(1), Some(1)), &[ready("True")], None, minute),
            None
        );
        let long_ago = Time(Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(120));
        assert_eq!(
            not_due(
                (Some(1), Some(1)),
                &[ready("True")],
                Some(&long_ago),
                minute
            ),
            None
        );
    }
}
