//! Fault injection on the real API server and the real Prefect server: the operator is
//! SIGKILLed at random moments during a burst of runs and restarted each time. Every run
//! must end up launched exactly once (one Job, ever) and finished.
//!
//! The test plays kubelet and flow: each new Job's run goes RUNNING → COMPLETED in Prefect
//! and the Job Complete. Size: PAO_FAULT_RUNS (default 120) runs, PAO_FAULT_ROUNDS
//! (default 3) kills; `scripts/fault-suite.sh` runs it with 500 × 5 and prints the table.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::cluster_with_namespace;
use common::*;
use futures::TryStreamExt;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use prefect_agent_operator::crd::PrefectAgent;
use rand::Rng;
use serde_json::json;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every Job seen: run id → the Job UIDs that carried it, and when the first appeared.
#[derive(Default)]
struct Ledger {
    jobs: BTreeMap<String, BTreeSet<String>>,
    created: Vec<Instant>,
}

/// Watches the namespace's Jobs; each new one is "run": its flow run goes RUNNING then
/// COMPLETED and the Job is marked Complete.
async fn play_kubelet(client: Client, ns: String, api: Arc<Api_>, ledger: Arc<Mutex<Ledger>>) {
    let jobs: Api<Job> = Api::namespaced(client, &ns);
    let stream = watcher(jobs.clone(), watcher::Config::default()).applied_objects();
    let mut stream = std::pin::pin!(stream);
    while let Ok(Some(job)) = stream.try_next().await {
        let Some(run) = job.labels().get("prefect.io/flow-run-id").cloned() else {
            continue;
        };
        let uid = job.uid().unwrap_or_default();
        let new = {
            let mut l = ledger.lock().unwrap();
            let fresh = l.jobs.entry(run.clone()).or_default().insert(uid);
            if fresh {
                l.created.push(Instant::now());
            }
            fresh
        };
        if !new {
            continue;
        }
        let jobs = jobs.clone();
        let api = api.clone();
        let name = job.name_any();
        tokio::spawn(async move {
            api.set_state(&run, "RUNNING", false).await;
            api.set_state(&run, "COMPLETED", false).await;
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let status = json!({"status": {"completionTime": now, "succeeded": 1, "conditions": [
                {"type": "Complete", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}]}});
            let _ = jobs
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await;
        });
    }
}

type Api_ = common::Api;

#[tokio::test(flavor = "multi_thread")]
async fn sigkilled_operators_lose_and_duplicate_nothing() {
    let runs_wanted = env_or("PAO_FAULT_RUNS", 120);
    let rounds = env_or("PAO_FAULT_ROUNDS", 3);
    let (kube_server, client, ns) = cluster_with_namespace("faults").await;
    let prefect = Setup::new("faults").await;
    let api = Arc::new(common::Api::new(
        &prefect.server.url,
        prefect_agent_operator::backend::http::Auth::None,
    ));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    tokio::spawn(play_kubelet(
        client.clone(),
        ns.clone(),
        api.clone(),
        ledger.clone(),
    ));
    let start_operator = || {
        let mut cmd = operator_command(&kube_server.kubeconfig);
        cmd.args(["--namespace", &ns]);
        AgentProcess::start_with(cmd)
    };
    let mut operator = start_operator();
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let resource: PrefectAgent = serde_json::from_value(json!({
        "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
        "metadata": {"name": "burst"},
        "spec": {"api": {"url": prefect.server.url, "workPool": prefect.pool},
                 "pollInterval": "1s", "job": {"ttlSecondsAfterFinished": 3600}}
    }))
    .unwrap();
    agents
        .create(&PostParams::default(), &resource)
        .await
        .unwrap();
    let dep = prefect
        .api
        .create_deployment(&prefect.pool, json!({}))
        .await;

    // The burst: all due now, created while the operator is being killed.
    let started = Instant::now();
    let creator = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut runs = BTreeSet::new();
            for _ in 0..runs_wanted {
                let run = api
                    .call(
                        reqwest::Method::POST,
                        &format!("/deployments/{dep}/create_flow_run"),
                        Some(json!({})),
                    )
                    .await;
                runs.insert(run["id"].as_str().unwrap().to_string());
            }
            runs
        })
    };
    let mut recoveries = Vec::new();
    for _ in 0..rounds {
        // A random moment: what is being claimed or launched right then is cut short.
        let wait = rand::rng().random_range(500..4000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        operator.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = operator.wait_exit(Duration::from_secs(10)).await;
        let before = ledger.lock().unwrap().created.len();
        let restarted = Instant::now();
        operator = start_operator();
        // Recovery: the restarted operator's first new Job (if any work is left).
        let recovered = wait_for_opt(Duration::from_secs(60), || {
            (ledger.lock().unwrap().created.len() > before).then_some(())
        })
        .await;
        recoveries.push(recovered.map(|_| restarted.elapsed()));
    }
    let runs = creator.await.unwrap();
    // Everything finishes: adopted claims after `adopt_after` (15 s) at most.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut unfinished = runs.clone();
    while !unfinished.is_empty() && Instant::now() < deadline {
        let mut still = BTreeSet::new();
        for run in &unfinished {
            if prefect.api.state(run).await != "COMPLETED" {
                still.insert(run.clone());
            }
        }
        unfinished = still;
        if !unfinished.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let (duplicates, never_launched) = {
        let l = ledger.lock().unwrap();
        let duplicates: Vec<&String> = l
            .jobs
            .iter()
            .filter(|(_, uids)| uids.len() > 1)
            .map(|(run, _)| run)
            .collect();
        let never: Vec<&String> = runs.iter().filter(|r| !l.jobs.contains_key(*r)).collect();
        (
            duplicates.into_iter().cloned().collect::<Vec<_>>(),
            never.into_iter().cloned().collect::<Vec<_>>(),
        )
    };
    let max_recovery = recoveries
        .iter()
        .flatten()
        .max()
        .copied()
        .unwrap_or_default();
    // A line of its own: libtest prints the test's name without a newline before output.
    println!(
        "\n| scenario | rounds | runs | duplicate Jobs | never launched | never finished | max recovery | wall time |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| SIGKILL operator mid-burst | {rounds} | {} | {} | {} | {} | {:.1} s | {:.0} s |",
        runs.len(),
        duplicates.len(),
        never_launched.len(),
        unfinished.len(),
        max_recovery.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(duplicates.is_empty(), "runs with two Jobs: {duplicates:?}");
    assert!(
        never_launched.is_empty(),
        "never launched: {never_launched:?}"
    );
    assert!(
        unfinished.is_empty(),
        "never finished: {unfinished:?}\n{}",
        operator.output()
    );
}

/// Polls `cond` until it holds or `timeout`; `None` when it never did.
async fn wait_for_opt<F>(timeout: Duration, cond: F) -> Option<()>
where
    F: Fn() -> Option<()>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond().is_some() {
            return Some(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}
