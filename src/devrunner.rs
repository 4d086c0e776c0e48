//! The dev job runner, for tests and the quick start only: on an API server without a
//! kubelet it runs each of the operator's Jobs' container command as a local process
//! with the container's environment (secretKeyRef resolved), and writes the Job status
//! the Job controller would (active, then Complete or Failed).

use std::collections::HashSet;

use futures::TryStreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{EnvVar, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::deploy::kubernetes::job::labels;

/// The argv a Job's first container would run (command + args).
pub fn argv(job: &Job) -> Option<Vec<String>> {
    let c = job
        .spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?;
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    (!argv.is_empty()).then_some(argv)
}

fn started(job: &Job) -> bool {
    job.status.as_ref().is_some_and(|s| s.start_time.is_some())
}

async fn resolve_env(
    client: &Client,
    ns: &str,
    env: &[EnvVar],
) -> Result<Vec<(String, String)>, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut out = Vec::new();
    for e in env {
        if let Some(v) = &e.value {
            out.push((e.name.clone(), v.clone()));
        } else if let Some(r) = e
            .value_from
            .as_ref()
            .and_then(|f| f.secret_key_ref.as_ref())
        {
            let secret = secrets
                .get(&r.name)
                .await
                .map_err(|err| format!("secret {ns}/{}: {err}", r.name))?;
            let value = secret
                .data
                .as_ref()
                .and_then(|d| d.get(&r.key))
                .map(|b| String::from_utf8_lossy(&b.0).to_string())
                .ok_or_else(|| format!("secret {ns}/{} has no key `{}`", r.name, r.key))?;
            out.push((e.name.clone(), value));
        }
    }
    Ok(out)
}

async fn set_status(jobs: &Api<Job>, name: &str, status: serde_json::Value) {
    if let Err(e) = jobs
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status})),
        )
        .await
    {
        tracing::warn!(job = name, error = %e, "could not write Job status");
    }
}

async fn run_job(client: Client, job: Job) {
    let ns = job.namespace().unwrap_or_default();
    let name = job.name_any();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let now = Timestamp::now().to_string();
    set_status(&jobs, &name, json!({"startTime": now, "active": 1})).await;
    let container = job
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.containers.first());
    let env = container.and_then(|c| c.env.clone()).unwrap_or_default();
    let outcome = match (argv(&job), resolve_env(&client, &ns, &env).await) {
        (None, _) => Err("the container has no command or args".to_string()),
        (_, Err(e)) => Err(e),
        (Some(argv), Ok(env)) => {
            tracing::info!(job = %name, command = %argv.join(" "), "running the Job's command locally");
            let status = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .envs(env)
                .stdin(std::process::Stdio::null())
                .status()
                .await;
            match status {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(format!("the command exited with {s}")),
                Err(e) => Err(format!("could not start `{}`: {e}", argv[0])),
            }
        }
    };
    let end = Timestamp::now().to_string();
    let status = match outcome {
        Ok(()) => json!({"active": null, "succeeded": 1, "completionTime": end,
            "conditions": [{"type": "Complete", "status": "True", "lastProbeTime": end, "lastTransitionTime": end}]}),
        Err(message) => json!({"active": null, "failed": 1,
            "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                "message": message, "lastProbeTime": end, "lastTransitionTime": end}]}),
    };
    set_status(&jobs, &name, status).await;
}

/// Runs every new operator Job in `namespace` (or all) until shutdown.
pub async fn run(client: Client, namespace: Option<String>, shutdown: CancellationToken) {
    let jobs: Api<Job> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let selector = format!("{}={}", labels::MANAGED_BY, crate::APP_NAME);
    let stream = watcher(jobs, watcher::Config::default().labels(&selector))
        .default_backoff()
        .applied_objects();
    let mut stream = std::pin::pin!(stream);
    let mut seen = HashSet::new();
    loop {
        let job = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = stream.try_next() => match next {
                Ok(Some(job)) => job,
                Ok(None) => return,
                Err(e) => { tracing::warn!(error = %e, "Job watch error; retrying"); continue }
            }
        };
        let key = format!("{}/{}", job.namespace().unwrap_or_default(), job.name_any());
        let fresh = seen.insert(key);
        if fresh && !started(&job) && job.metadata.deletion_timestamp.is_none() {
            tokio::spawn(run_job(client.clone(), job));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argv_is_command_then_args() {
        let job: Job =
            serde_json::from_value(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "c", "command": ["python"], "args": ["-m", "x"]}]}}}}))
            .unwrap();
        assert_eq!(argv(&job).unwrap(), ["python", "-m", "x"]);
        let empty: Job = serde_json::from_value(
            json!({"spec": {"template": {"spec": {"containers": [{"name": "c"}]}}}}),
        )
        .unwrap();
        assert_eq!(argv(&empty), None);
    }
}
