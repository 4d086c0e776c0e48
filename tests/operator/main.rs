//! The operator end to end, as a process: a real kube-apiserver and a real Prefect
//! server, the dev job runner or hand-written pod status in place of a kubelet. One test
//! binary, a file per subject; the helpers they share are here.

mod deployments;
mod jobs;
mod leader;
mod lifecycle;
mod pods;
mod prefect1;
mod prefect2;
mod work_pools;

use pao_testkit as common;

use std::time::Duration;

use common::cluster::{KubeApiServer, cluster_with_namespace, create_secret, dedicated_cluster};
use common::*;
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use prefect_agent_operator::crd::PrefectAgent;
use serde_json::json;
/// Both servers, the CRD, a namespace, a Prefect pool, and the operator running.
async fn setup(prefix: &str) -> (kube::Client, String, Setup, AgentProcess) {
    let (kube_server, client, ns) = cluster_with_namespace(prefix).await;
    let prefect = Setup::new(prefix).await;
    // Each test's operator watches its own namespace only: tests run side by side.
    let mut cmd = operator_command(&kube_server.kubeconfig);
    // Not the default heartbeat, so a test can see the flag reach the agents.
    cmd.args(["--namespace", &ns, "--heartbeat-interval", "20s"]);
    let operator = AgentProcess::start_with(cmd);
    (client, ns, prefect, operator)
}

fn agent_resource(name: &str, url: &str, pool: &str) -> PrefectAgent {
    serde_json::from_value(json!({
        "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
        "metadata": {"name": name},
        "spec": {"api": {"url": url, "workPool": pool}, "pollInterval": "1s",
                 "envVars": {"TEAM": "data"}, "job": {"ttlSecondsAfterFinished": 120}}
    }))
    .unwrap()
}

/// Creates a PrefectAgent for the test's pool and returns the resource API.
async fn create_agent(
    client: &kube::Client,
    ns: &str,
    name: &str,
    prefect: &Setup,
) -> Api<PrefectAgent> {
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), ns);
    agents
        .create(
            &PostParams::default(),
            &agent_resource(name, &prefect.server.url, &prefect.pool),
        )
        .await
        .expect("create the PrefectAgent");
    agents
}

/// An agent, one run launched and RUNNING: the Jobs API, the run id and its Job's name.
async fn a_running_job(
    client: &kube::Client,
    ns: &str,
    agent: &str,
    prefect: &Setup,
) -> (Api<Job>, String, String) {
    create_agent(client, ns, agent, prefect).await;
    let run = prefect.new_run().await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let job_name = format!("prefect-run-{run}");
    job_named(&jobs, &job_name).await;
    infra_recorded(prefect, ns, &run).await;
    prefect.api.set_state(&run, "RUNNING", false).await;
    (jobs, run, job_name)
}

/// Waits for a Job by name.
async fn job_named(jobs: &Api<Job>, name: &str) -> Job {
    wait_for(&format!("Job {name}"), Duration::from_secs(60), || async {
        jobs.get_opt(name).await.ok().flatten()
    })
    .await
}

/// Waits until Prefect records the run's Job as its infrastructure.
async fn infra_recorded(prefect: &Setup, ns: &str, run: &str) {
    let infra = format!("{ns}:prefect-run-{run}");
    wait_for(
        "the infrastructure id in Prefect",
        Duration::from_secs(30),
        || async {
            (prefect.api.run(run).await["infrastructure_pid"] == infra.as_str()).then_some(())
        },
    )
    .await;
}

fn condition(agent: &PrefectAgent, kind: &str) -> Option<(String, String, Option<i64>)> {
    let c = agent
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == kind)?;
    Some((c.status.clone(), c.message.clone(), c.observed_generation))
}

/// Plays the kubelet and Job controller: writes a Job condition through the status subresource.
async fn finish_job(jobs: &Api<Job>, name: &str, kind: &str, reason: &str, message: &str) {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let mut status = json!({"status": {"conditions": [{"type": kind, "status": "True", "reason": reason,
        "message": message, "lastProbeTime": now, "lastTransitionTime": now}]}});
    if kind == "Complete" {
        status["status"]["completionTime"] = json!(now);
    }
    jobs.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("write Job status");
}
