//! Drift seen on Prefect's event stream: a work pool, queue or deployment changed in
//! Prefect by someone else (the UI, a script) is put back at once rather than at the next
//! resync. Once a resource has synced, its Prefect object is followed on one stream per
//! server and credential; an event about it queues the resource with a mark that makes
//! its next reconcile compare with Prefect even though it synced moments ago. The
//! operator's own writes come back as events too: they cost one comparison that finds
//! nothing to do. The resync stays the safety net (a dropped connection loses events).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::ObjectRef;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::backend::events::{
    Listener, StreamEnd, backoff, credential_hash, events_url, has_no_stream, server_version,
    stream,
};
use crate::backend::http::Auth;
use crate::controller::supervisor::locked;
use crate::crd::deployment::PrefectDeployment;
use crate::crd::pool::PrefectWorkPool;

/// The Prefect object an event says was changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Changed {
    /// A work pool, or one of its queues, by the pool's name.
    Pool(String),
    /// A deployment, by id.
    Deployment(String),
}

/// What a message of the stream says was changed behind the operator's back, if
/// anything: updates, pauses and deletions; not creations (made by the operator, or not
/// declared) nor the ready/not-ready status that workers' polls flip.
pub fn changed(message: &Value) -> Option<Changed> {
    if message["type"] != "event" {
        return None;
    }
    let event = &message["event"];
    let name = event["event"].as_str()?;
    let resource = &event["resource"];
    let (kind, what) = name.strip_prefix("prefect.")?.split_once('.')?;
    if !matches!(what, "updated" | "deleted" | "paused") {
        return None;
    }
    match kind {
        "work-pool" => resource["prefect.resource.name"]
            .as_str()
            .map(|n| Changed::Pool(n.to_string())),
        "work-queue" => event["related"]
            .as_array()?
            .iter()
            .find(|r| r["prefect.resource.role"] == "work-pool")
            .and_then(|r| r["prefect.resource.name"].as_str())
            .map(|n| Changed::Pool(n.to_string())),
        "deployment" if what != "paused" => resource["prefect.resource.id"]
            .as_str()?
            .strip_prefix("prefect.deployment.")
            .map(|id| Changed::Deployment(id.to_string())),
        _ => None,
    }
}

/// Queues resources of one kind for a reconcile that compares with Prefect now.
pub struct Trigger<K: kube::Resource> {
    queue: mpsc::UnboundedSender<ObjectRef<K>>,
    due: Mutex<HashSet<ObjectRef<K>>>,
}

impl<K> Trigger<K>
where
    K: kube::Resource<DynamicType = ()>,
{
    /// The trigger, and the stream of resources it queues (for `reconcile_on`).
    pub fn new() -> (Self, mpsc::UnboundedReceiver<ObjectRef<K>>) {
        let (queue, rx) = mpsc::unbounded_channel();
        let due = Mutex::new(HashSet::new());
        (Self { queue, due }, rx)
    }

    fn fire(&self, r: &ObjectRef<K>) {
        locked(&self.due).insert(r.clone());
        let _ = self.queue.send(r.clone());
    }

    /// Whether an event made this resource due: now, or once [`EVENT_GAP`] has passed
    /// since its last sync (the mark is kept until then).
    pub fn due(&self, r: &ObjectRef<K>, last_sync: Option<&Time>) -> Due {
        let due = locked(&self.due);
        if !due.contains(r) {
            return Due::No;
        }
        match wait_for_gap(last_sync, Timestamp::now()) {
            Some(wait) => Due::In(wait),
            None => Due::Now,
        }
    }

    /// Forgets the mark: the resource is being compared with Prefect now.
    pub fn clear(&self, r: &ObjectRef<K>) {
        locked(&self.due).remove(r);
    }
}

/// Least time between two syncs of one resource that events ask for: a field Prefect
/// keeps otherwise than it was sent would else be written, reported by an event and
/// written again as fast as the server answers.
pub const EVENT_GAP: Duration = Duration::from_secs(5);

/// When an event asks for a sync.
#[derive(Debug, PartialEq, Eq)]
pub enum Due {
    /// No event asks.
    No,
    Now,
    /// Once this has passed (the last sync was less than [`EVENT_GAP`] ago).
    In(Duration),
}

impl Due {
    /// `wait`, or sooner if an event asks for a sync before.
    pub fn sooner(&self, wait: Duration) -> Duration {
        match self {
            Self::In(gap) => wait.min(*gap),
            _ => wait,
        }
    }
}

/// How long until [`EVENT_GAP`] has passed since `last_sync`; None once it has.
fn wait_for_gap(last_sync: Option<&Time>, now: Timestamp) -> Option<Duration> {
    let since = Duration::try_from(now.duration_since(last_sync?.0)).ok()?;
    EVENT_GAP.checked_sub(since).filter(|w| !w.is_zero())
}

/// The streams the sync controllers follow, one per Prefect server and credential.
pub struct DriftWatch {
    servers: Mutex<HashMap<(String, u64), Arc<Server>>>,
    pub pools: Arc<Trigger<PrefectWorkPool>>,
    pub deployments: Arc<Trigger<PrefectDeployment>>,
}

/// Who is followed on one server's stream.
struct Server {
    pools: Mutex<HashMap<String, HashSet<ObjectRef<PrefectWorkPool>>>>,
    deployments: Mutex<HashMap<String, ObjectRef<PrefectDeployment>>>,
    pool_trigger: Arc<Trigger<PrefectWorkPool>>,
    deployment_trigger: Arc<Trigger<PrefectDeployment>>,
    up: AtomicBool,
}

impl Listener for Server {
    fn prefixes(&self) -> &'static [&'static str] {
        &[
            "prefect.work-pool.",
            "prefect.work-queue.",
            "prefect.deployment.",
        ]
    }

    fn heard(&self, message: &Value) {
        match changed(message) {
            Some(Changed::Pool(name)) => {
                for r in locked(&self.pools).get(&name).into_iter().flatten() {
                    tracing::debug!(pool = %name, resource = %r, "changed in Prefect; comparing now");
                    self.pool_trigger.fire(r);
                }
            }
            Some(Changed::Deployment(id)) => {
                if let Some(r) = locked(&self.deployments).get(&id) {
                    tracing::debug!(deployment = %id, resource = %r, "changed in Prefect; comparing now");
                    self.deployment_trigger.fire(r);
                }
            }
            None => {}
        }
    }

    fn alive(&self) -> bool {
        true
    }

    fn connected(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
    }
}

impl DriftWatch {
    pub fn new(pools: Trigger<PrefectWorkPool>, deployments: Trigger<PrefectDeployment>) -> Self {
        Self {
            servers: Mutex::new(HashMap::new()),
            pools: Arc::new(pools),
            deployments: Arc::new(deployments),
        }
    }

    /// Follows the work pool `name` for the resource `r`.
    pub fn follow_pool(
        &self,
        api_url: &str,
        auth: &Auth,
        name: &str,
        r: ObjectRef<PrefectWorkPool>,
    ) {
        if let Some(server) = self.server(api_url, auth) {
            let mut pools = locked(&server.pools);
            for refs in pools.values_mut() {
                refs.remove(&r);
            }
            pools.retain(|_, refs| !refs.is_empty());
            pools.entry(name.to_string()).or_default().insert(r);
        }
    }

    /// Follows the deployment `id` for the resource `r`.
    pub fn follow_deployment(
        &self,
        api_url: &str,
        auth: &Auth,
        id: &str,
        r: ObjectRef<PrefectDeployment>,
    ) {
        if let Some(server) = self.server(api_url, auth) {
            let mut deployments = locked(&server.deployments);
            deployments.retain(|_, followed| followed != &r);
            deployments.insert(id.to_string(), r);
        }
    }

    /// Forgets a deleted resource.
    pub fn forget_pool(&self, r: &ObjectRef<PrefectWorkPool>) {
        for server in locked(&self.servers).values() {
            let mut pools = locked(&server.pools);
            for refs in pools.values_mut() {
                refs.remove(r);
            }
            pools.retain(|_, refs| !refs.is_empty());
        }
    }

    pub fn forget_deployment(&self, r: &ObjectRef<PrefectDeployment>) {
        for server in locked(&self.servers).values() {
            locked(&server.deployments).retain(|_, followed| followed != r);
        }
    }

    /// The server's stream, started on first use; None for a URL without one.
    fn server(&self, api_url: &str, auth: &Auth) -> Option<Arc<Server>> {
        let url = events_url(api_url)?;
        let key = (url.clone(), credential_hash(auth));
        let mut servers = locked(&self.servers);
        let server = servers.entry(key).or_insert_with(|| {
            let server = Arc::new(Server {
                pools: Mutex::default(),
                deployments: Mutex::default(),
                pool_trigger: self.pools.clone(),
                deployment_trigger: self.deployments.clone(),
                up: AtomicBool::new(false),
            });
            tokio::spawn(follow(
                url,
                api_url.to_string(),
                auth.clone(),
                server.clone(),
            ));
            server
        });
        Some(server.clone())
    }
}

/// One server's stream for the operator's lifetime, reconnected with backoff; given up
/// only where the server has none (Prefect 2 without events).
async fn follow(url: String, api_url: String, auth: Auth, server: Arc<Server>) {
    let mut failures: u32 = 0;
    loop {
        let ended = stream(&url, &auth, server.as_ref()).await;
        server.connected(false);
        match ended {
            Ok(()) => failures = 0,
            Err(StreamEnd::Refused(status))
                if has_no_stream(status, server_version(&api_url, &auth).await.as_deref()) =>
            {
                tracing::info!(%url, "no event stream on this server: drift is put back at each resync only");
                return;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::info!(%url, error = %e, "event stream unavailable: drift is put back at each resync until it is back");
                }
            }
        }
        tokio::time::sleep(backoff(failures)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn events_ask_for_one_sync_per_gap_at_most() {
        let now = Timestamp::now();
        let ago = |s: i64| Time(now - k8s_openapi::jiff::SignedDuration::from_secs(s));
        assert_eq!(wait_for_gap(None, now), None, "never synced: now");
        assert_eq!(wait_for_gap(Some(&ago(60)), now), None);
        assert_eq!(
            wait_for_gap(Some(&ago(2)), now),
            Some(Duration::from_secs(3))
        );
    }

    fn event(name: &str, resource: Value, related: Value) -> Value {
        json!({"type": "event", "event": {"event": name, "resource": resource, "related": related}})
    }

    #[test]
    fn updates_pauses_and_deletions_are_drift_creations_and_status_are_not() {
        let pool =
            json!({"prefect.resource.id": "prefect.work-pool.p1", "prefect.resource.name": "team"});
        assert_eq!(
            changed(&event("prefect.work-pool.updated", pool.clone(), json!([]))),
            Some(Changed::Pool("team".into()))
        );
        assert_eq!(
            changed(&event("prefect.work-pool.paused", pool.clone(), json!([]))),
            Some(Changed::Pool("team".into()))
        );
        assert_eq!(
            changed(&event("prefect.work-pool.ready", pool.clone(), json!([]))),
            None
        );
        assert_eq!(
            changed(&event(
                "prefect.work-pool.not-ready",
                pool.clone(),
                json!([])
            )),
            None
        );
        assert_eq!(
            changed(&event("prefect.work-pool.created", pool, json!([]))),
            None
        );
        let queue = json!({"prefect.resource.id": "prefect.work-queue.q1", "prefect.resource.name": "default"});
        let related = json!([{"prefect.resource.id": "prefect.work-pool.p1", "prefect.resource.role": "work-pool",
                              "prefect.resource.name": "team"}]);
        assert_eq!(
            changed(&event(
                "prefect.work-queue.updated",
                queue.clone(),
                related.clone()
            )),
            Some(Changed::Pool("team".into()))
        );
        assert_eq!(
            changed(&event("prefect.work-queue.ready", queue, related)),
            None
        );
        let deployment =
            json!({"prefect.resource.id": "prefect.deployment.d1", "prefect.resource.name": "etl"});
        assert_eq!(
            changed(&event(
                "prefect.deployment.updated",
                deployment.clone(),
                json!([])
            )),
            Some(Changed::Deployment("d1".into()))
        );
        assert_eq!(
            changed(&event(
                "prefect.deployment.deleted",
                deployment.clone(),
                json!([])
            )),
            Some(Changed::Deployment("d1".into()))
        );
        assert_eq!(
            changed(&event(
                "prefect.deployment.not-ready",
                deployment,
                json!([])
            )),
            None
        );
        assert_eq!(changed(&json!({"type": "auth_success"})), None);
        assert_eq!(
            changed(&event("prefect.flow-run.Scheduled", json!({}), json!([]))),
            None
        );
    }
}
