//! One watch over the operator's Jobs and their Pods, shared by all agents: turns a
//! Job's end, or a pod that cannot get going (image pull, scheduling, OOM, eviction),
//! into an [`Exit`] for the agent that launched it. A run whose pod is stuck has its
//! Job deleted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::job::{in_background, job_name, labels};
use crate::deploy::Exit;

/// Who waits for which Job (`namespace/name`), and how long a stuck pod is given.
#[derive(Debug)]
pub struct JobObserver {
    waiters: Mutex<HashMap<String, oneshot::Sender<Exit>>>,
    /// Pods with a problem that is not fatal yet, re-checked until it is or goes away.
    troubled: Mutex<HashMap<String, Pod>>,
    /// Unfinished Jobs by the `prefect.io/agent` label of their agent.
    active: Mutex<HashMap<String, HashSet<String>>>,
    /// Finished Jobs and when their TTL runs out.
    expiring: Mutex<HashMap<String, Timestamp>>,
    /// Ends of Jobs nobody waits for (launched before this process started), by agent
    /// label: `(flow run id, exit)` to the agent, or kept until it subscribes.
    agents: Mutex<HashMap<String, Subscriber>>,
    unclaimed: Mutex<HashMap<String, Vec<Unwatched>>>,
    /// The UID of every Job seen (`namespace/name`): a pod counts only when such a Job
    /// controls it.
    job_uids: Mutex<HashMap<String, String>>,
    /// Jobs whose end was already routed that way (a finished Job is seen again on
    /// every later change).
    routed: Mutex<HashSet<String>>,
    /// Whether `active` holds every Job the watch lists (false until the first list
    /// completes, and again during a relist).
    listed: AtomicBool,
    grace: Duration,
}

/// How many ends of unwatched Jobs are kept for an agent that has not subscribed yet.
const UNCLAIMED_MAX: usize = 10_000;

/// Which namespaces an agent's Jobs may be in: an end heard from anywhere else is not
/// its (labels are anyone's to write).
pub type NamespaceFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

struct Subscriber {
    tx: mpsc::UnboundedSender<(String, Exit)>,
    accepts: NamespaceFilter,
}

impl std::fmt::Debug for Subscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscriber")
    }
}

/// An end nobody waited for: the Job's namespace, the run, how it ended.
#[derive(Debug)]
struct Unwatched {
    namespace: String,
    run_id: String,
    exit: Exit,
}

/// When a finished Job may be deleted: its end plus `ttlSecondsAfterFinished`.
pub fn expiry(job: &Job) -> Option<Timestamp> {
    let ttl = job.spec.as_ref()?.ttl_seconds_after_finished?;
    let status = job.status.as_ref()?;
    let ended = status.completion_time.as_ref().map(|t| t.0).or_else(|| {
        status
            .conditions
            .iter()
            .flatten()
            .filter(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
            .filter_map(|c| c.last_transition_time.as_ref().map(|t| t.0))
            .max()
    })?;
    ended
        .checked_add(k8s_openapi::jiff::SignedDuration::from_secs(i64::from(ttl)))
        .ok()
}

/// Waiting reasons that mean the flow-run container will not start by itself.
const STUCK_REASONS: [&str; 5] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// What is wrong with a flow run's pod, in Kubernetes' words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodProblem {
    pub reason: String,
    pub message: String,
    /// True once the run should be given up (at once, or after the grace period).
    pub fatal: bool,
}

impl PodProblem {
    fn description(&self) -> String {
        if self.message.is_empty() {
            format!("the flow run's pod failed ({})", self.reason)
        } else {
            format!(
                "the flow run's pod failed ({}): {}",
                self.reason, self.message
            )
        }
    }
}

/// Judges a pod: eviction and OOM are fatal at once; a pod that cannot pull its image,
/// build its container or be scheduled is fatal once it is older than `grace`.
pub fn pod_problem(pod: &Pod, now: Timestamp, grace: Duration) -> Option<PodProblem> {
    let status = pod.status.as_ref()?;
    let problem = |reason: &str, message: Option<&str>, fatal: bool| PodProblem {
        reason: reason.to_string(),
        message: message.unwrap_or_default().to_string(),
        fatal,
    };
    if status.reason.as_deref() == Some("Evicted") {
        return Some(problem("Evicted", status.message.as_deref(), true));
    }
    let age = pod
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| now.duration_since(t.0).unsigned_abs())
        .unwrap_or_default();
    let past_grace = age >= grace;
    for cs in status.container_statuses.iter().flatten() {
        let state = cs.state.as_ref();
        if let Some(t) = state.and_then(|s| s.terminated.as_ref())
            && t.reason.as_deref() == Some("OOMKilled")
        {
            let msg = format!(
                "container {} ran out of memory (exit code {})",
                cs.name, t.exit_code
            );
            return Some(problem("OOMKilled", Some(&msg), true));
        }
        if let Some(w) = state.and_then(|s| s.waiting.as_ref())
            && let Some(reason) = w.reason.as_deref().filter(|r| STUCK_REASONS.contains(r))
        {
            return Some(problem(reason, w.message.as_deref(), past_grace));
        }
    }
    let unschedulable = status.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.reason.as_deref() == Some("Unschedulable")
    });
    unschedulable.map(|c| problem("Unschedulable", c.message.as_deref(), past_grace))
}

fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// How a Job ended, if it has: `Complete` is success, `Failed` carries Kubernetes' reason.
pub fn job_outcome(job: &Job) -> Option<Exit> {
    let conditions = job.status.as_ref()?.conditions.as_ref()?;
    let done = |t: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == t && c.status == "True")
    };
    if done("Complete").is_some() {
        return Some(Exit {
            success: true,
            description: "the Job completed".into(),
        });
    }
    let failed = done("Failed")?;
    let reason = failed.reason.as_deref().unwrap_or("Failed");
    let description = match failed.message.as_deref() {
        Some(m) if !m.is_empty() => format!("the Job failed ({reason}): {m}"),
        _ => format!("the Job failed ({reason})"),
    };
    Some(Exit {
        success: false,
        description,
    })
}

/// How a failed Job's pod ended, in Kubernetes' words (`container prefect-job: OOMKilled,
/// exit code 137`): the cause behind a Job's `BackoffLimitExceeded`. The newest pod's
/// first container that ended other than `Completed`.
pub fn pod_termination(pods: &[Pod]) -> Option<String> {
    let newest = pods
        .iter()
        .max_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0))?;
    let statuses = newest.status.as_ref()?.container_statuses.as_ref()?;
    statuses.iter().find_map(|cs| {
        let t = cs.state.as_ref()?.terminated.as_ref()?;
        let reason = t.reason.as_deref().unwrap_or("Terminated");
        if reason == "Completed" {
            return None;
        }
        let mut text = format!("container {}: {reason}, exit code {}", cs.name, t.exit_code);
        if let Some(m) = t.message.as_deref().filter(|m| !m.trim().is_empty()) {
            text.push_str(&format!(" ({})", m.trim()));
        }
        Some(text)
    })
}

impl JobObserver {
    /// An observer that gives a stuck pod `grace` before its run is given up.
    pub fn new(grace: Duration) -> Arc<Self> {
        Arc::new(Self {
            waiters: Mutex::default(),
            troubled: Mutex::default(),
            active: Mutex::default(),
            expiring: Mutex::default(),
            agents: Mutex::default(),
            unclaimed: Mutex::default(),
            job_uids: Mutex::default(),
            routed: Mutex::default(),
            listed: AtomicBool::new(false),
            grace,
        })
    }

    /// The ends of this agent's Jobs that no launch in this process waits for, e.g. Jobs
    /// started before an operator restart; ends seen before the call come first. Only
    /// Jobs in namespaces `accepts` admits count.
    pub fn subscribe(
        &self,
        agent: &str,
        accepts: NamespaceFilter,
    ) -> mpsc::UnboundedReceiver<(String, Exit)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let earlier = self
            .unclaimed
            .lock()
            .ok()
            .and_then(|mut u| u.remove(agent))
            .unwrap_or_default();
        for item in earlier.into_iter().filter(|i| accepts(&i.namespace)) {
            let _ = tx.send((item.run_id, item.exit));
        }
        if let Ok(mut a) = self.agents.lock() {
            a.insert(agent.to_string(), Subscriber { tx, accepts });
        }
        rx
    }

    /// Forgets everything kept for the agent with this label (its resource is gone): what
    /// the observer holds per agent must not grow with every PrefectAgent ever made.
    pub fn forget_agent(&self, agent: &str) {
        if let Ok(mut a) = self.agents.lock() {
            a.remove(agent);
        }
        if let Ok(mut u) = self.unclaimed.lock() {
            u.remove(agent);
        }
        if let Ok(mut a) = self.active.lock() {
            a.remove(agent);
        }
    }

    fn unmark_routed(&self, k: &str) {
        if let Ok(mut r) = self.routed.lock() {
            r.remove(k);
        }
    }

    /// Notes that a Job's end has been told to someone: later sightings stay quiet.
    fn mark_routed(&self, k: &str) {
        if let Ok(mut r) = self.routed.lock() {
            r.insert(k.to_string());
        }
    }

    /// Sends the end of a Job nobody waits for to its agent, once per Job (`labels`: the
    /// Job's or its pod's; `k`: the Job's `namespace/name`); true when it was sent now.
    fn route_unwatched(&self, labels: &BTreeMap<String, String>, k: &str, exit: Exit) -> bool {
        let (Some(agent), Some(run_id)) =
            (labels.get(labels::AGENT), labels.get(labels::FLOW_RUN_ID))
        else {
            return false;
        };
        let namespace = k.split_once('/').map_or("", |(ns, _)| ns).to_string();
        // Only the run's own Job name counts, whatever the labels say.
        if k.split_once('/').map(|(_, name)| name) != Some(job_name(run_id).as_str()) {
            return false;
        }
        if !self
            .routed
            .lock()
            .is_ok_and(|mut r| r.insert(k.to_string()))
        {
            return false;
        }
        let item = Unwatched {
            namespace,
            run_id: run_id.clone(),
            exit,
        };
        let item = match self.agents.lock() {
            Ok(a) => match a.get(agent) {
                // Not a namespace this agent uses: someone else's Job (or a forgery).
                Some(s) if !(s.accepts)(&item.namespace) => return false,
                Some(s) => match s.tx.send((item.run_id, item.exit)) {
                    Ok(()) => return true,
                    Err(mpsc::error::SendError((run_id, exit))) => Unwatched {
                        namespace: item.namespace,
                        run_id,
                        exit,
                    },
                },
                None => item,
            },
            Err(_) => item,
        };
        if let Ok(mut u) = self.unclaimed.lock() {
            let pending = u.entry(agent.clone()).or_default();
            if pending.len() < UNCLAIMED_MAX {
                pending.push(item);
            }
        }
        true
    }

    /// Registers interest before the Job is created, so its end cannot be missed.
    pub fn wait_for(&self, namespace: &str, name: &str) -> oneshot::Receiver<Exit> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.insert(key(namespace, name), tx);
        }
        rx
    }

    /// Hands a Job's outcome to whoever waits for it (pure dispatch, used by the watch).
    pub fn observe(&self, job: &Job) {
        self.observe_with_cause(job, None);
    }

    /// The same, with what the Job's pod said when it ended (see [`pod_termination`]).
    pub fn observe_with_cause(&self, job: &Job, cause: Option<String>) {
        let k = key(&job.namespace().unwrap_or_default(), &job.name_any());
        if let (Some(uid), Ok(mut uids)) = (job.uid(), self.job_uids.lock()) {
            uids.insert(k.clone(), uid);
        }
        let outcome = job_outcome(job).map(|mut exit| {
            if let Some(cause) = cause.filter(|_| !exit.success) {
                exit.description = format!("{}; {cause}", exit.description);
            }
            exit
        });
        if let Some(agent) = job.labels().get(labels::AGENT) {
            match outcome {
                Some(_) => self.forget(agent, &k),
                None => self.launched(agent, &k),
            }
        }
        if outcome.is_some()
            && let Some(at) = expiry(job)
            && let Ok(mut e) = self.expiring.lock()
        {
            e.insert(k.clone(), at);
        }
        let Some(exit) = outcome else { return };
        let waiter = self.waiters.lock().ok().and_then(|mut w| w.remove(&k));
        match waiter {
            Some(tx) => {
                self.mark_routed(&k);
                // The launch that waited is gone (its agent stopped): its agent's
                // successor hears of it instead.
                if let Err(exit) = tx.send(exit) {
                    self.unmark_routed(&k);
                    self.route_unwatched(job.labels(), &k, exit);
                }
            }
            None => {
                self.route_unwatched(job.labels(), &k, exit);
            }
        }
    }

    /// Counts a Job as active for `agent` (its `prefect.io/agent` label) from its creation on.
    pub fn launched(&self, agent: &str, job_key: &str) {
        if let Ok(mut a) = self.active.lock() {
            a.entry(agent.to_string())
                .or_default()
                .insert(job_key.to_string());
        }
    }

    /// A Job vanished. If its run was waiting for it to finish, it never will: the run's
    /// agent hears that it ended (and crashes the run unless it finished or is cancelling).
    pub fn gone(&self, job: &Job) {
        let k = key(&job.namespace().unwrap_or_default(), &job.name_any());
        if let Ok(mut uids) = self.job_uids.lock() {
            uids.remove(&k);
        }
        if let Some(agent) = job.labels().get(labels::AGENT) {
            self.forget(agent, &k);
        }
        let waiter = self.waiters.lock().ok().and_then(|mut w| w.remove(&k));
        let exit = Exit {
            success: false,
            description: format!("the Job {k} was deleted before it finished"),
        };
        match waiter {
            Some(tx) => {
                if let Err(exit) = tx.send(exit) {
                    self.route_unwatched(job.labels(), &k, exit);
                }
            }
            // A Job of an earlier process deleted unfinished is reported too; a finished
            // one (already routed, or TTL-deleted) is only forgotten.
            None if job_outcome(job).is_none() => {
                self.route_unwatched(job.labels(), &k, exit);
            }
            None => {}
        }
        if let Ok(mut r) = self.routed.lock() {
            r.remove(&k);
        }
    }

    /// A launch that did not happen: nothing to wait for, nothing active.
    pub fn not_launched(&self, agent: &str, namespace: &str, name: &str) {
        let k = key(namespace, name);
        self.forget(agent, &k);
        if let Ok(mut w) = self.waiters.lock() {
            w.remove(&k);
        }
    }

    fn forget(&self, agent: &str, job_key: &str) {
        if let Ok(mut a) = self.active.lock()
            && let Some(jobs) = a.get_mut(agent)
        {
            jobs.remove(job_key);
            if jobs.is_empty() {
                a.remove(agent);
            }
        }
    }

    /// Finished Jobs whose TTL ran out by `now` (`(namespace, name)`), no longer tracked.
    pub fn expired(&self, now: Timestamp) -> Vec<(String, String)> {
        let Ok(mut e) = self.expiring.lock() else {
            return Vec::new();
        };
        let due: Vec<String> = e
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        due.into_iter()
            .filter_map(|k| {
                e.remove(&k);
                k.split_once('/')
                    .map(|(ns, name)| (ns.to_string(), name.to_string()))
            })
            .collect()
    }

    /// The watch lists every Job again: counts are rebuilt from what it lists.
    fn relisting(&self) {
        self.listed.store(false, Ordering::Relaxed);
        if let Ok(mut a) = self.active.lock() {
            a.clear();
        }
    }

    /// The watch listed every Job.
    fn listed(&self) {
        self.listed.store(true, Ordering::Relaxed);
    }

    /// Whether the agent with this label may have an unfinished Job: it has one, or not
    /// every Job is known yet (before the watch's first list, during a relist).
    pub fn may_have_active(&self, agent: &str) -> bool {
        !self.listed.load(Ordering::Relaxed) || self.active(agent) > 0
    }

    /// Unfinished Jobs of the agent with this `prefect.io/agent` label.
    pub fn active(&self, agent: &str) -> usize {
        self.active
            .lock()
            .ok()
            .and_then(|a| a.get(agent).map(HashSet::len))
            .unwrap_or(0)
    }

    /// Judges a pod; when its problem is fatal, ends the run's wait and returns the Job to delete.
    pub fn observe_pod(&self, pod: &Pod, now: Timestamp) -> Option<(String, String)> {
        let ns = pod.namespace().unwrap_or_default();
        let pod_key = key(&ns, &pod.name_any());
        let run_id = pod.labels().get(labels::FLOW_RUN_ID)?.clone();
        if !self.owned_by_run_job(pod, &ns, &run_id) {
            return None;
        }
        let problem = match pod_problem(pod, now, self.grace) {
            Some(p) if p.fatal => p,
            other => {
                if let Ok(mut t) = self.troubled.lock() {
                    match other {
                        Some(_) => t.insert(pod_key, pod.clone()),
                        None => t.remove(&pod_key),
                    };
                }
                return None;
            }
        };
        if let Ok(mut t) = self.troubled.lock() {
            t.remove(&pod_key);
        }
        let job = job_name(&run_id);
        let waiter = self
            .waiters
            .lock()
            .ok()
            .and_then(|mut w| w.remove(&key(&ns, &job)));
        let exit = Exit {
            success: false,
            description: problem.description(),
        };
        let job_key = key(&ns, &job);
        match waiter {
            Some(tx) => {
                self.mark_routed(&job_key);
                if let Err(exit) = tx.send(exit) {
                    self.unmark_routed(&job_key);
                    self.route_unwatched(pod.labels(), &job_key, exit);
                }
            }
            // A Job from before a restart: its agent hears of it once, then it is deleted.
            None if self.route_unwatched(pod.labels(), &job_key, exit) => {}
            None => return None,
        }
        Some((ns, job))
    }

    /// Whether the Job of `run_id`, as this observer saw it, controls the pod: labels alone
    /// are anyone's to write.
    fn owned_by_run_job(&self, pod: &Pod, ns: &str, run_id: &str) -> bool {
        let name = job_name(run_id);
        let Some(uid) = self
            .job_uids
            .lock()
            .ok()
            .and_then(|u| u.get(&key(ns, &name)).cloned())
        else {
            return false;
        };
        pod.owner_references().iter().any(|o| {
            o.kind == "Job" && o.controller == Some(true) && o.name == name && o.uid == uid
        })
    }

    /// For a failed Job whose end nobody heard yet: how its pod ended (one list call).
    async fn failed_pod_cause(&self, client: &Client, job: &Job) -> Option<String> {
        let ns = job.namespace()?;
        let k = key(&ns, &job.name_any());
        if job_outcome(job).is_none_or(|e| e.success)
            || self.routed.lock().is_ok_and(|r| r.contains(&k))
        {
            return None;
        }
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let selector = format!("job-name={}", job.name_any());
        let list = pods
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
            .ok()?;
        pod_termination(&list.items)
    }

    /// Watches the operator's Jobs and Pods in every namespace until shutdown; the
    /// watches restart themselves with backoff when they break.
    pub async fn run(
        self: Arc<Self>,
        client: Client,
        namespace: Option<String>,
        shutdown: CancellationToken,
    ) {
        let selector = format!("{}={}", labels::MANAGED_BY, crate::APP_NAME);
        let config = watcher::Config::default().labels(&selector);
        let (jobs, pods): (Api<Job>, Api<Pod>) = match &namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
        let jobs = watcher(jobs, config.clone())
            .default_backoff()
            .map_ok(|event| match event {
                watcher::Event::Apply(j) | watcher::Event::InitApply(j) => Seen::Job(Box::new(j)),
                watcher::Event::Delete(j) => Seen::JobGone(Box::new(j)),
                // A relist: counts are rebuilt from the InitApply events that follow.
                watcher::Event::Init => Seen::Relist,
                watcher::Event::InitDone => Seen::Listed,
            });
        let pods = watcher(pods, config)
            .default_backoff()
            .applied_objects()
            .map_ok(|p| Seen::Pod(Box::new(p)));
        let mut events = std::pin::pin!(futures::stream::select(jobs, pods));
        let mut recheck = tokio::time::interval(Duration::from_secs(2));
        loop {
            // Jobs to delete, with why.
            let doomed: Vec<(String, String, &str)> = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = recheck.tick() => {
                    let troubled: Vec<Pod> = self.troubled.lock().map(|t| t.values().cloned().collect()).unwrap_or_default();
                    let stuck = troubled.iter().filter_map(|p| self.observe_pod(p, Timestamp::now()));
                    // Finished Jobs past their TTL, for clusters that do not clean them up.
                    let expired = self.expired(Timestamp::now()).into_iter();
                    stuck.map(|(ns, j)| (ns, j, "its pod is stuck"))
                        .chain(expired.map(|(ns, j)| (ns, j, "it finished and its TTL ran out")))
                        .collect()
                }
                next = events.try_next() => match next {
                    Ok(Some(Seen::Job(job))) => {
                        let cause = self.failed_pod_cause(&client, &job).await;
                        self.observe_with_cause(&job, cause);
                        Vec::new()
                    }
                    Ok(Some(Seen::JobGone(job))) => { self.gone(&job); Vec::new() }
                    Ok(Some(Seen::Relist)) => { self.relisting(); Vec::new() }
                    Ok(Some(Seen::Listed)) => { self.listed(); Vec::new() }
                    Ok(Some(Seen::Pod(pod))) => self.observe_pod(&pod, Timestamp::now())
                        .map(|(ns, j)| (ns, j, "its pod is stuck"))
                        .into_iter()
                        .collect(),
                    Ok(None) => return,
                    Err(e) => { tracing::warn!(error = %e, "Job/Pod watch error; retrying"); Vec::new() }
                }
            };
            for (ns, job, why) in doomed {
                let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
                match jobs.delete(&job, &in_background()).await {
                    Ok(_) => {
                        tracing::info!(job = %format!("{ns}/{job}"), why, "deleted a Job")
                    }
                    Err(e) => {
                        tracing::warn!(job = %format!("{ns}/{job}"), why, error = %e, "could not delete a Job")
                    }
                }
            }
        }
    }
}

/// One thing the watch saw.
enum Seen {
    Job(Box<Job>),
    JobGone(Box<Job>),
    Pod(Box<Pod>),
    Relist,
    Listed,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(conditions: serde_json::Value) -> Job {
        serde_json::from_value(json!({"metadata": {"name": "j", "namespace": "n"},
            "status": {"conditions": conditions}}))
        .unwrap()
    }

    #[test]
    fn outcomes_from_job_conditions() {
        assert_eq!(job_outcome(&job(json!([]))), None);
        let ok = job_outcome(&job(json!([{"type": "Complete", "status": "True"}]))).unwrap();
        assert!(ok.success);
        let failed = job_outcome(&job(json!([{"type": "Failed", "status": "True",
            "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}]))).unwrap();
        assert!(!failed.success);
        assert_eq!(
            failed.description,
            "the Job failed (DeadlineExceeded): Job was active longer than specified deadline"
        );
        assert_eq!(
            job_outcome(&job(json!([{"type": "Failed", "status": "False"}]))),
            None
        );
    }

    /// A pod of run `r1`'s Job (UID `job-uid`) in namespace `n`.
    fn pod(age_secs: i64, status: serde_json::Value) -> Pod {
        let created = Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_secs(age_secs);
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "n",
            "creationTimestamp": created.to_string(),
            "labels": {"prefect.io/flow-run-id": "r1", "prefect.io/agent": "n.etl"},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "controller": true,
                "name": job_name("r1"), "uid": "job-uid"}]}, "status": status}))
        .unwrap()
    }

    /// Run `r1`'s Job in namespace `ns`, as the Job watch sees it.
    fn run_job(ns: &str, uid: &str) -> Job {
        serde_json::from_value(json!({"metadata": {"name": job_name("r1"), "namespace": ns,
            "uid": uid, "labels": {"prefect.io/agent": "n.etl", "prefect.io/flow-run-id": "r1"}},
            "status": {}}))
        .unwrap()
    }

    fn waiting(reason: &str) -> serde_json::Value {
        json!({"containerStatuses": [{"name": "prefect-job", "ready": false, "restartCount": 0,
            "image": "x", "imageID": "", "state": {"waiting": {"reason": reason, "message": "Back-off pulling image \"x\""}}}]})
    }

    #[test]
    fn a_failed_job_s_pod_says_why() {
        let ended = |reason: &str, code: i32| {
            pod(
                1,
                json!({"containerStatuses": [{"name": "prefect-job", "ready": false,
                "restartCount": 0, "image": "x", "imageID": "",
                "state": {"terminated": {"reason": reason, "exitCode": code}}}]}),
            )
        };
        assert_eq!(
            pod_termination(&[ended("OOMKilled", 137)]).as_deref(),
            Some("container prefect-job: OOMKilled, exit code 137")
        );
        assert_eq!(
            pod_termination(&[ended("Error", 3)]).as_deref(),
            Some("container prefect-job: Error, exit code 3")
        );
        assert_eq!(pod_termination(&[ended("Completed", 0)]), None);
        assert_eq!(pod_termination(&[]), None);
        // The cause is added to a failure, never to a success.
        let observer = JobObserver::new(Duration::from_secs(1));
        let failed = job(json!([{"type": "Failed", "status": "True",
            "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]));
        let mut exit = observer.wait_for("n", "j");
        observer.observe_with_cause(
            &failed,
            Some("container prefect-job: Error, exit code 3".into()),
        );
        assert_eq!(
            exit.try_recv().unwrap().description,
            "the Job failed (BackoffLimitExceeded): Job has reached the specified backoff limit; \
             container prefect-job: Error, exit code 3"
        );
    }

    #[test]
    fn pod_problems() {
        let grace = Duration::from_secs(60);
        let now = Timestamp::now();
        let young = pod_problem(&pod(5, waiting("ImagePullBackOff")), now, grace).unwrap();
        assert!(!young.fatal, "within the grace period");
        let old = pod_problem(&pod(120, waiting("ErrImagePull")), now, grace).unwrap();
        assert!(old.fatal);
        assert_eq!(
            old.description(),
            "the flow run's pod failed (ErrImagePull): Back-off pulling image \"x\""
        );
        assert_eq!(
            pod_problem(&pod(120, waiting("ContainerCreating")), now, grace),
            None
        );
        let oom = pod_problem(
            &pod(
                1,
                json!({"containerStatuses": [{"name": "prefect-job", "ready": false,
            "restartCount": 0, "image": "x", "imageID": "",
            "state": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]}),
            ),
            now,
            grace,
        )
        .unwrap();
        assert!(oom.fatal && oom.reason == "OOMKilled" && oom.message.contains("137"));
        let evicted = pod_problem(
            &pod(1, json!({"reason": "Evicted", "message": "low on memory"})),
            now,
            grace,
        )
        .unwrap();
        assert!(evicted.fatal && evicted.message == "low on memory");
        let unschedulable = pod_problem(
            &pod(
                90,
                json!({"conditions": [{"type": "PodScheduled", "status": "False",
            "reason": "Unschedulable", "message": "0/3 nodes are available"}]}),
            ),
            now,
            grace,
        )
        .unwrap();
        assert!(unschedulable.fatal && unschedulable.reason == "Unschedulable");
    }

    #[test]
    fn a_stuck_pod_ends_its_run_s_wait() {
        let o = JobObserver::new(Duration::from_secs(60));
        let mut rx = o.wait_for("n", &job_name("r1"));
        o.observe(&run_job("n", "job-uid"));
        assert_eq!(
            o.observe_pod(&pod(5, waiting("ImagePullBackOff")), Timestamp::now()),
            None
        );
        assert_eq!(o.troubled.lock().unwrap().len(), 1, "kept for a re-check");
        let stuck = o.observe_pod(&pod(61, waiting("ImagePullBackOff")), Timestamp::now());
        assert_eq!(stuck, Some(("n".to_string(), job_name("r1"))));
        let exit = rx.try_recv().unwrap();
        assert!(!exit.success && exit.description.contains("ImagePullBackOff"));
        assert!(o.troubled.lock().unwrap().is_empty());
    }

    #[test]
    fn finished_jobs_expire_after_their_ttl() {
        let finished = |ttl: i32, completed: &str| -> Job {
            serde_json::from_value(json!({"metadata": {"name": "j", "namespace": "n"},
                "spec": {"ttlSecondsAfterFinished": ttl, "template": {}},
                "status": {"completionTime": completed,
                           "conditions": [{"type": "Complete", "status": "True"}]}}))
            .unwrap()
        };
        let job = finished(60, "2026-01-01T00:00:00Z");
        assert_eq!(expiry(&job).unwrap().to_string(), "2026-01-01T00:01:00Z");
        let o = JobObserver::new(Duration::from_secs(60));
        o.observe(&job);
        let before: Timestamp = "2026-01-01T00:00:59Z".parse().unwrap();
        assert!(o.expired(before).is_empty());
        let after: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        assert_eq!(o.expired(after), [("n".to_string(), "j".to_string())]);
        assert!(o.expired(after).is_empty(), "handed out once");
        let running: Job =
            serde_json::from_value(json!({"spec": {"ttlSecondsAfterFinished": 1, "template": {}}}))
                .unwrap();
        assert_eq!(expiry(&running), None);
    }

    #[test]
    fn counts_unfinished_jobs_per_agent() {
        let o = JobObserver::new(Duration::from_secs(60));
        let labelled = |name: &str, conditions: serde_json::Value| -> Job {
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "n",
                "labels": {"prefect.io/agent": "n.etl"}}, "status": {"conditions": conditions}}))
            .unwrap()
        };
        o.launched("n.etl", "n/a");
        o.observe(&labelled("b", json!([])));
        assert_eq!(o.active("n.etl"), 2);
        o.observe(&labelled(
            "a",
            json!([{"type": "Complete", "status": "True"}]),
        ));
        assert_eq!(o.active("n.etl"), 1);
        assert_eq!(o.active("other"), 0);
    }

    /// An agent is known to have no unfinished Job only once the watch listed them all:
    /// not before its first list, not during a relist.
    #[test]
    fn no_unfinished_job_is_known_only_after_a_complete_list() {
        let o = JobObserver::new(Duration::from_secs(60));
        let running: Job = serde_json::from_value(json!({"metadata": {"name": "a",
            "namespace": "n", "labels": {"prefect.io/agent": "n.etl"}}}))
        .unwrap();
        assert!(o.may_have_active("n.idle"), "nothing listed yet");
        o.observe(&running);
        o.listed();
        assert!(!o.may_have_active("n.idle"));
        assert!(o.may_have_active("n.etl"));
        o.relisting();
        assert!(o.may_have_active("n.idle"), "during a relist");
        o.observe(&running);
        o.listed();
        assert!(!o.may_have_active("n.idle"));
        assert!(o.may_have_active("n.etl"), "the relist counted it again");
    }

    #[test]
    fn dispatches_to_the_waiter_once() {
        let o = JobObserver::new(Duration::from_secs(60));
        let mut rx = o.wait_for("n", "j");
        o.observe(&job(json!([])));
        assert!(rx.try_recv().is_err(), "nothing yet");
        o.observe(&job(json!([{"type": "Complete", "status": "True"}])));
        assert!(rx.try_recv().unwrap().success);
    }

    fn labelled_job(conditions: serde_json::Value) -> Job {
        serde_json::from_value(
            json!({"metadata": {"name": job_name("r1"), "namespace": "n",
            "labels": {"prefect.io/agent": "n.etl", "prefect.io/flow-run-id": "r1"}},
            "status": {"conditions": conditions}}),
        )
        .unwrap()
    }

    #[test]
    fn ends_nobody_waits_for_go_to_the_agent_once() {
        let failed =
            json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]);
        // Seen before the agent subscribed (an operator restart): kept for it.
        let o = JobObserver::new(Duration::from_secs(60));
        o.observe(&labelled_job(failed.clone()));
        let mut rx = o.subscribe("n.etl", only("n"));
        let (run, exit) = rx.try_recv().unwrap();
        assert_eq!(run, "r1");
        assert!(!exit.success && exit.description.contains("BackoffLimitExceeded"));
        o.observe(&labelled_job(failed.clone()));
        assert!(
            rx.try_recv().is_err(),
            "a finished Job seen again is not news"
        );
        // A Job someone waits for is told to the waiter only, then never routed.
        let o = JobObserver::new(Duration::from_secs(60));
        let mut rx = o.subscribe("n.etl", only("n"));
        let mut waiter = o.wait_for("n", &job_name("r1"));
        o.observe(&labelled_job(failed.clone()));
        assert!(!waiter.try_recv().unwrap().success);
        o.observe(&labelled_job(failed));
        assert!(rx.try_recv().is_err());
        // An unfinished Job of an earlier process deleted: its agent hears of it.
        let mut other = labelled_job(json!([]));
        other.metadata.name = Some(job_name("r2"));
        other
            .labels_mut()
            .insert("prefect.io/flow-run-id".into(), "r2".into());
        o.gone(&other);
        assert_eq!(
            rx.try_recv().unwrap().1.description,
            format!(
                "the Job n/{} was deleted before it finished",
                job_name("r2")
            )
        );
    }

    /// A launch that waited and is gone (its agent stopped): the end goes to whoever
    /// subscribes for that agent instead of nowhere.
    #[test]
    fn an_end_whose_waiter_is_gone_goes_to_the_agent() {
        let o = JobObserver::new(Duration::from_secs(60));
        let mut rx = o.subscribe("n.etl", only("n"));
        drop(o.wait_for("n", &job_name("r1")));
        o.observe(&labelled_job(json!([{"type": "Failed", "status": "True"}])));
        assert_eq!(rx.try_recv().unwrap().0, "r1");
    }

    #[test]
    fn a_gone_agent_leaves_nothing_behind() {
        let o = JobObserver::new(Duration::from_secs(60));
        let _rx = o.subscribe("n.etl", only("n"));
        o.launched("n.etl", "n/j");
        o.observe(&labelled_job(
            json!([{"type": "Complete", "status": "True"}]),
        ));
        o.forget_agent("n.etl");
        assert!(o.agents.lock().unwrap().is_empty());
        assert!(o.active.lock().unwrap().is_empty());
        assert!(o.unclaimed.lock().unwrap().is_empty());
    }

    fn only(ns: &'static str) -> NamespaceFilter {
        Arc::new(move |n| n == ns)
    }

    /// Labels are anyone's to write: a Job in a namespace its agent does not use, a Job
    /// not named after the run, a pod no such Job controls: none reaches the agent.
    #[test]
    fn forged_jobs_and_pods_reach_no_agent() {
        let failed =
            json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]);
        let o = JobObserver::new(Duration::from_secs(60));
        let mut rx = o.subscribe("n.etl", only("n"));
        let mut elsewhere = labelled_job(failed.clone());
        elsewhere.metadata.namespace = Some("attacker".into());
        o.observe(&elsewhere);
        let mut misnamed = labelled_job(failed);
        misnamed.metadata.name = Some("whatever".into());
        o.observe(&misnamed);
        assert!(rx.try_recv().is_err(), "no end from a forged Job");

        // A pod labelled for the run, evicted, in the attacker's namespace, owned by nothing
        // the watch saw; then one owned by a Job of the same name but another UID.
        let evicted = json!({"phase": "Failed", "reason": "Evicted", "message": "forged"});
        let mut forged = pod(1, evicted.clone());
        forged.metadata.namespace = Some("attacker".into());
        assert_eq!(o.observe_pod(&forged, Timestamp::now()), None);
        o.observe(&run_job("attacker", "attacker-uid"));
        assert_eq!(
            o.observe_pod(&forged, Timestamp::now()),
            None,
            "UID differs"
        );
        assert!(rx.try_recv().is_err());
        // The real pod of the real Job still counts.
        o.observe(&run_job("n", "job-uid"));
        assert!(o.observe_pod(&pod(1, evicted), Timestamp::now()).is_some());
        assert_eq!(rx.try_recv().unwrap().0, "r1");
    }

    #[test]
    fn a_job_deleted_before_it_finished_ends_the_wait() {
        let o = JobObserver::new(Duration::from_secs(60));
        let mut rx = o.wait_for("n", "j");
        o.gone(&job(json!([])));
        let exit = rx.try_recv().unwrap();
        assert!(!exit.success);
        assert_eq!(
            exit.description,
            "the Job n/j was deleted before it finished"
        );
        // A Job that already finished has no waiter left: deleting it later says nothing.
        let mut rx = o.wait_for("n", "j");
        o.observe(&job(json!([{"type": "Complete", "status": "True"}])));
        assert!(rx.try_recv().unwrap().success);
        o.gone(&job(json!([{"type": "Complete", "status": "True"}])));
    }
}
