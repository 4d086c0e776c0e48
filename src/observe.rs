//! One watch over the operator's Jobs, shared by all agents: turns a Job's end into an
//! [`Exit`] for the agent that launched it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::TryStreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::deploy::Exit;
use crate::deploy::kubernetes::job::labels;

/// Who waits for which Job (`namespace/name`).
#[derive(Debug, Default)]
pub struct JobObserver {
    waiters: Mutex<HashMap<String, oneshot::Sender<Exit>>>,
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

impl JobObserver {
    pub fn new() -> Arc<Self> {
        Arc::default()
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
        let Some(exit) = job_outcome(job) else { return };
        let k = key(&job.namespace().unwrap_or_default(), &job.name_any());
        let waiter = self.waiters.lock().ok().and_then(|mut w| w.remove(&k));
        if let Some(tx) = waiter {
            let _ = tx.send(exit);
        }
    }

    /// Watches the operator's Jobs in every namespace until shutdown; restarts itself
    /// with backoff when the watch breaks.
    pub async fn run(self: Arc<Self>, client: Client, shutdown: CancellationToken) {
        let jobs: Api<Job> = Api::all(client);
        let selector = format!("{}={}", labels::MANAGED_BY, crate::APP_NAME);
        let stream = watcher(jobs, watcher::Config::default().labels(&selector))
            .default_backoff()
            .applied_objects();
        let mut stream = std::pin::pin!(stream);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                next = stream.try_next() => match next {
                    Ok(Some(job)) => self.observe(&job),
                    Ok(None) => return,
                    Err(e) => tracing::warn!(error = %e, "Job watch error; retrying"),
                }
            }
        }
    }
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

    #[test]
    fn dispatches_to_the_waiter_once() {
        let o = JobObserver::new();
        let mut rx = o.wait_for("n", "j");
        o.observe(&job(json!([])));
        assert!(rx.try_recv().is_err(), "nothing yet");
        o.observe(&job(json!([{"type": "Complete", "status": "True"}])));
        assert!(rx.try_recv().unwrap().success);
    }
}
