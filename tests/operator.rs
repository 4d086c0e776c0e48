//! The operator end to end: a real kube-apiserver and a real Prefect server.

mod common;

use std::time::Duration;

use common::cluster::{KubeApiServer, cluster_with_namespace, create_secret};
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
    cmd.args(["--namespace", &ns]);
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
    let dep = prefect
        .api
        .create_deployment(&prefect.pool, json!({}))
        .await;
    let run = prefect.api.create_run(&dep).await;
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

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_resource_launches_one_job_per_run_and_reports_back() {
    let (client, ns, prefect, operator) = setup("op").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    // A key the no-auth test server ignores, so it can be traced everywhere it must not be.
    let canary = format!("pnu_canary_{}", uuid::Uuid::new_v4().simple());
    create_secret(&client, &ns, "prefect-api", &canary).await;
    let mut resource = agent_resource("etl", &prefect.server.url, &prefect.pool);
    resource.spec.api.key_secret_ref = Some(prefect_agent_operator::crd::SecretKeyRef {
        name: "prefect-api".into(),
        key: "key".into(),
    });
    let created = agents
        .create(&PostParams::default(), &resource)
        .await
        .expect("create the PrefectAgent");

    // What a user runs: kubectl waits on the Ready condition of the current generation.
    let kube_server = KubeApiServer::shared();
    kube_server.wait_ready(&ns, "etl", &operator).await;
    let ready = agents.get("etl").await.unwrap();
    let (_, _, generation) = condition(&ready, "Ready").unwrap();
    assert_eq!(generation, created.metadata.generation);
    assert!(
        ready.finalizers().iter().any(|f| f == "prefect.io/agent"),
        "finalizer added"
    );

    let dep = prefect
        .api
        .create_deployment(
            &prefect.pool,
            json!({"image": "repo/etl:2", "cpu_request": "100m"}),
        )
        .await;
    let run = prefect.api.create_run(&dep).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job_name = format!("prefect-run-{run}");
    let job = job_named(&jobs, &job_name).await;
    let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("repo/etl:2"));
    let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert_eq!(requests["cpu"].0, "100m");
    let env: Vec<(String, Option<String>)> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    assert!(
        env.contains(&("PREFECT__FLOW_RUN_ID".into(), Some(run.clone()))),
        "{env:?}"
    );
    assert!(
        env.contains(&("TEAM".into(), Some("data".into()))),
        "{env:?}"
    );
    assert_eq!(
        job.spec.as_ref().unwrap().ttl_seconds_after_finished,
        Some(120)
    );
    assert_eq!(job.labels()["prefect.io/flow-run-id"], run);
    // Recorded just after the create.
    infra_recorded(&prefect, &ns, &run).await;

    // The flow runs to completion, then its Job completes: nothing to report.
    prefect.api.set_state(&run, "RUNNING", false).await;
    prefect.api.set_state(&run, "COMPLETED", false).await;
    finish_job(&jobs, &job_name, "Complete", "", "").await;

    // A second run whose Job fails while the run is not final ends CRASHED with the reason.
    let run2 = prefect.api.create_run(&dep).await;
    let job2 = format!("prefect-run-{run2}");
    job_named(&jobs, &job2).await;
    finish_job(
        &jobs,
        &job2,
        "Failed",
        "DeadlineExceeded",
        "Job was active longer than specified deadline",
    )
    .await;
    let crashed = prefect
        .api
        .wait_state(&run2, "CRASHED", Duration::from_secs(60))
        .await;
    let message = crashed["state"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("DeadlineExceeded"), "{message}");
    assert_eq!(prefect.api.state(&run).await, "COMPLETED");

    wait_for("status counters", Duration::from_secs(30), || async {
        let s = agents.get("etl").await.ok()?.status?;
        (s.runs_submitted == 2 && s.runs_failed == 1 && s.polls > 0).then_some(())
    })
    .await;
    // The printer columns show them.
    let (ok, table) = kube_server.kubectl(&["get", "pfa", "-n", &ns]).await;
    assert!(ok, "{table}");
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let column = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!(column("NAME"), "etl");
    assert_eq!(column("READY"), "True");
    assert_eq!(column("SUBMITTED"), "2", "{table}");
    assert_eq!(column("FAILED"), "1", "{table}");

    // The key reached the Job only as a reference, and nowhere else.
    let key_env = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "PREFECT_API_KEY")
        .unwrap();
    let key_ref = key_env
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (key_ref.name.as_str(), key_ref.key.as_str()),
        ("prefect-api", "key")
    );
    for job in jobs.list(&Default::default()).await.unwrap() {
        assert!(
            !serde_json::to_string(&job).unwrap().contains(&canary),
            "key in a Job"
        );
    }
    let status = serde_json::to_string(&agents.get("etl").await.unwrap()).unwrap();
    assert!(!status.contains(&canary), "key in the resource");
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &ns);
    for event in events.list(&Default::default()).await.unwrap() {
        assert!(
            !serde_json::to_string(&event).unwrap().contains(&canary),
            "key in an Event"
        );
    }
    assert!(
        !operator.output().contains(&canary),
        "key in the operator's log"
    );

    agents
        .delete("etl", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for(
        "the finalizer to let the resource go",
        Duration::from_secs(30),
        || async { agents.get_opt("etl").await.ok()?.is_none().then_some(()) },
    )
    .await;
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_secret_is_named_in_a_degraded_condition() {
    let (client, ns, prefect, operator) = setup("nosecret").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let mut resource = agent_resource("keyless", &prefect.server.url, &prefect.pool);
    resource.spec.api.key_secret_ref = Some(prefect_agent_operator::crd::SecretKeyRef {
        name: "prefect-api".into(),
        key: "key".into(),
    });
    agents
        .create(&PostParams::default(), &resource)
        .await
        .expect("create");
    let (status, message, _) = wait_for("Degraded=True", Duration::from_secs(60), || async {
        let a = agents.get("keyless").await.ok()?;
        condition(&a, "Degraded").filter(|(s, _, _)| s == "True")
    })
    .await;
    assert_eq!(status, "True");
    assert_eq!(message, format!("secret {ns}/prefect-api not found"));
    let a = agents.get("keyless").await.unwrap();
    assert_eq!(condition(&a, "Ready").unwrap().0, "False");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let event = wait_for(
        "a Warning Event naming the Secret",
        Duration::from_secs(30),
        || async {
            events
                .list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("SecretNotFound")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("keyless")
                })
        },
    )
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.note.as_deref(),
        Some(format!("secret {ns}/prefect-api not found").as_str())
    );
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_in_a_namespace_the_operator_does_not_allow_are_refused() {
    let (client, ns, prefect, operator) = setup("jobns").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let mut resource = agent_resource("elsewhere", &prefect.server.url, &prefect.pool);
    resource.spec.job.namespace = Some("kube-system".into());
    agents
        .create(&PostParams::default(), &resource)
        .await
        .expect("create");
    let (_, message, _) = wait_for("Degraded=True", Duration::from_secs(60), || async {
        let a = agents.get("elsewhere").await.ok()?;
        condition(&a, "Degraded").filter(|(s, _, _)| s == "True")
    })
    .await;
    assert_eq!(
        message,
        format!(
            "spec.job.namespace `kube-system`: this operator watches namespace `{ns}` only \
             and could not follow Jobs elsewhere"
        )
    );
    let a = agents.get("elsewhere").await.unwrap();
    let ready = a
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready");
    assert_eq!(
        ready.map(|c| c.reason.as_str()),
        Some("JobNamespaceNotAllowed")
    );
    // No agent runs for it: a run of its pool gets no Job anywhere.
    assert!(a.status.as_ref().unwrap().agent_id.is_none());
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spec_change_restarts_the_agent_and_suspend_stops_it() {
    let (client, ns, prefect, operator) = setup("edit").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    agents
        .create(
            &PostParams::default(),
            &agent_resource("edited", &prefect.server.url, &prefect.pool),
        )
        .await
        .expect("create");
    let ready_at = |generation: i64| {
        let agents = agents.clone();
        async move {
            wait_for(
                &format!("Ready=True for generation {generation}"),
                Duration::from_secs(60),
                || async {
                    let a = agents.get("edited").await.ok()?;
                    let (status, _, observed) = condition(&a, "Ready")?;
                    (status == "True" && observed == Some(generation)).then_some(())
                },
            )
            .await
        }
    };
    ready_at(1).await;

    let patch = json!({"spec": {"envVars": {"TEAM": "ml"}}});
    agents
        .patch("edited", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    ready_at(2).await;
    let dep = prefect
        .api
        .create_deployment(&prefect.pool, json!({}))
        .await;
    let run = prefect.api.create_run(&dep).await;
    let job = job_named(&jobs, &format!("prefect-run-{run}")).await;
    let env = job.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert!(
        env.iter()
            .any(|e| e.name == "TEAM" && e.value.as_deref() == Some("ml")),
        "the new envVars are used: {env:?}"
    );

    let suspend = json!({"spec": {"suspend": true}});
    agents
        .patch("edited", &PatchParams::default(), &Patch::Merge(&suspend))
        .await
        .unwrap();
    wait_for(
        "Ready=False, Suspended",
        Duration::from_secs(30),
        || async {
            let a = agents.get("edited").await.ok()?;
            let c = a
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            (c.reason == "Suspended" && c.observed_generation == Some(3)).then_some(())
        },
    )
    .await;
    let idle_run = prefect.api.create_run(&dep).await;
    // Absence over a window: a running agent (1 s polls) would have claimed it by then.
    let window = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < window {
        assert_eq!(
            prefect.api.state(&idle_run).await,
            "SCHEDULED",
            "a suspended agent claims nothing"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let resume = json!({"spec": {"suspend": false}});
    agents
        .patch("edited", &PatchParams::default(), &Patch::Merge(&resume))
        .await
        .unwrap();
    job_named(&jobs, &format!("prefect-run-{idle_run}")).await;
    drop(operator);
}

/// Creates a run's Job, then its pod with `container_state` as a kubelet would report it;
/// the run must end CRASHED with `expected` in the message, and the Job be deleted.
async fn pod_report_crashes_the_run(
    prefix: &str,
    container_state: serde_json::Value,
    expected: &[&str],
) {
    use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
    let (client, ns, prefect, operator) = setup(prefix).await;
    create_agent(&client, &ns, "watched", &prefect).await;
    let dep = prefect
        .api
        .create_deployment(&prefect.pool, json!({"image": "repo/etl:2"}))
        .await;
    let run = prefect.api.create_run(&dep).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job_name = format!("prefect-run-{run}");
    let job = job_named(&jobs, &job_name).await;

    // No kubelet here: make the Job's pod and write what a kubelet would report.
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap(),
    )
    .await
    .expect("service account");
    let labels = job.spec.unwrap().template.metadata.unwrap().labels.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod_name = format!("{job_name}-abcde");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": pod_name, "labels": labels},
        "spec": {"automountServiceAccountToken": false, "restartPolicy": "Never",
                 "containers": [{"name": "prefect-job", "image": "repo/etl:2"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let status = json!({"status": {"phase": "Pending", "containerStatuses": [{
        "name": "prefect-job", "ready": false, "restartCount": 0, "image": "repo/etl:2", "imageID": "",
        "state": container_state}]}});
    pods.patch_status(&pod_name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .expect("pod status");

    let crashed = prefect
        .api
        .wait_state(&run, "CRASHED", Duration::from_secs(60))
        .await;
    let message = crashed["state"]["message"].as_str().unwrap_or_default();
    for needle in expected {
        assert!(message.contains(needle), "{needle:?} in {message:?}");
    }
    wait_for("the Job deleted", Duration::from_secs(30), || async {
        jobs.get_opt(&job_name).await.ok()?.is_none().then_some(())
    })
    .await;
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_stuck_on_its_image_crashes_the_run_and_its_job_is_deleted() {
    let state = json!({"waiting": {"reason": "ErrImagePull",
        "message": "rpc error: pull access denied for does-not-exist"}});
    pod_report_crashes_the_run("pull", state, &["ErrImagePull", "pull access denied"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oom_killed_pod_crashes_the_run() {
    let state = json!({"terminated": {"reason": "OOMKilled", "exitCode": 137}});
    pod_report_crashes_the_run("oom", state, &["OOMKilled", "exit code 137"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_completes_through_the_dev_runner() {
    let (client, ns, prefect, operator) = setup("devrun").await;
    let kube_server = tokio::task::spawn_blocking(KubeApiServer::shared)
        .await
        .unwrap();
    let runner = dev_runner(&kube_server.kubeconfig, &ns);
    let agents = create_agent(&client, &ns, "runner", &prefect).await;
    let dep = prefect
        .api
        .create_deployment(
            &prefect.pool,
            json!({"command": fake_runner(&prefect.record, "complete")}),
        )
        .await;
    let run = prefect.api.create_run(&dep).await;
    prefect
        .api
        .wait_state(&run, "COMPLETED", Duration::from_secs(90))
        .await;
    assert_eq!(
        recorded(&prefect.record),
        std::slice::from_ref(&run),
        "executed once, through its Job"
    );
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job = jobs.get(&format!("prefect-run-{run}")).await.unwrap();
    assert_eq!(job.status.unwrap().succeeded, Some(1));
    wait_for("runsSubmitted = 1", Duration::from_secs(30), || async {
        let s = agents.get("runner").await.ok()?.status?;
        (s.runs_submitted == 1 && s.runs_failed == 0).then_some(())
    })
    .await;
    drop((operator, runner));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_deleted_by_someone_else_crashes_its_run() {
    let (client, ns, prefect, operator) = setup("gone").await;
    let (jobs, run, job_name) = a_running_job(&client, &ns, "bystander", &prefect).await;
    jobs.delete(&job_name, &DeleteParams::background())
        .await
        .expect("delete the Job");
    let crashed = prefect
        .api
        .wait_state(&run, "CRASHED", Duration::from_secs(60))
        .await;
    let message = crashed["state"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!(
            "the Job {ns}/{job_name} was deleted before it finished"
        )),
        "{message}"
    );
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_failed_while_the_operator_was_down_crashes_its_run() {
    let (client, ns, prefect, operator) = setup("down").await;
    let (jobs, run, job_name) = a_running_job(&client, &ns, "phoenix", &prefect).await;

    operator.signal(nix::sys::signal::Signal::SIGKILL);
    drop(operator);
    finish_job(
        &jobs,
        &job_name,
        "Failed",
        "BackoffLimitExceeded",
        "Job has reached the specified backoff limit",
    )
    .await;
    assert_eq!(prefect.api.state(&run).await, "RUNNING", "nobody watching");

    let kube_server = KubeApiServer::shared();
    let mut cmd = operator_command(&kube_server.kubeconfig);
    cmd.args(["--namespace", &ns]);
    let _again = AgentProcess::start_with(cmd);
    let crashed = prefect
        .api
        .wait_state(&run, "CRASHED", Duration::from_secs(60))
        .await;
    let message = crashed["state"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("BackoffLimitExceeded"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_run_deletes_its_job_and_ends_it_cancelled() {
    let (client, ns, prefect, operator) = setup("cancel").await;
    let (jobs, run, job_name) = a_running_job(&client, &ns, "canceller", &prefect).await;
    let answer = prefect.api.set_state(&run, "CANCELLING", false).await;
    assert_eq!(answer["status"], "ACCEPT", "{answer}");
    prefect
        .api
        .wait_state(&run, "CANCELLED", Duration::from_secs(60))
        .await;
    wait_for("the Job deleted", Duration::from_secs(30), || async {
        jobs.get_opt(&job_name).await.ok()?.is_none().then_some(())
    })
    .await;
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_killed_mid_burst_and_restarted_loses_no_run() {
    let (client, ns, prefect, mut operator) = setup("crash").await;
    let kube_server = tokio::task::spawn_blocking(KubeApiServer::shared)
        .await
        .unwrap();
    create_agent(&client, &ns, "survivor", &prefect).await;
    let dep = prefect
        .api
        .create_deployment(&prefect.pool, json!({}))
        .await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let mut runs = Vec::new();
    for _ in 0..30 {
        runs.push(prefect.api.create_run(&dep).await);
    }
    // Kill it hard once it has started launching, in the middle of the burst.
    wait_for("the first Jobs", Duration::from_secs(60), || async {
        let n = jobs.list(&Default::default()).await.ok()?.items.len();
        (n >= 3).then_some(())
    })
    .await;
    operator.signal(nix::sys::signal::Signal::SIGKILL);
    operator.wait_exit(Duration::from_secs(10)).await;
    let mut cmd = operator_command(&kube_server.kubeconfig);
    cmd.args(["--namespace", &ns]);
    let restarted = AgentProcess::start_with(cmd);

    // Every run ends up with its one Job recorded in Prefect; claims the first
    // operator made but never launched are adopted after --adopt-after (15 s).
    for run in &runs {
        job_named(&jobs, &format!("prefect-run-{run}")).await;
        let infra = format!("{ns}:prefect-run-{run}");
        wait_for(
            &format!("run {run} recorded as launched"),
            Duration::from_secs(90),
            || async {
                (prefect.api.run(run).await["infrastructure_pid"] == infra.as_str()).then_some(())
            },
        )
        .await;
    }
    let all = jobs.list(&Default::default()).await.unwrap().items;
    assert_eq!(all.len(), runs.len(), "one Job per run, none extra");
    for run in &runs {
        assert_eq!(
            prefect.api.times_in_state(run, "PENDING").await,
            1,
            "run {run} claimed once"
        );
    }
    drop(restarted);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrency_limit_caps_live_jobs_and_active_jobs_counts_them() {
    let (client, ns, prefect, operator) = setup("limit").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let mut resource = agent_resource("limited", &prefect.server.url, &prefect.pool);
    resource.spec.concurrency_limit = Some(2);
    agents
        .create(&PostParams::default(), &resource)
        .await
        .expect("create");
    let dep = prefect
        .api
        .create_deployment(&prefect.pool, json!({}))
        .await;
    for _ in 0..5 {
        prefect.api.create_run(&dep).await;
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let two = wait_for("two Jobs", Duration::from_secs(60), || async {
        let items = jobs.list(&Default::default()).await.ok()?.items;
        (items.len() >= 2).then_some(items)
    })
    .await;
    wait_for(
        "activeJobs = 2 in status",
        Duration::from_secs(30),
        || async { (agents.get("limited").await.ok()?.status?.active_jobs == 2).then_some(()) },
    )
    .await;
    // Absence over a window: with 1 s polls a third Job would have appeared by then.
    let window = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < window {
        let n = jobs.list(&Default::default()).await.unwrap().items.len();
        assert_eq!(n, 2, "never more than concurrencyLimit live Jobs");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // One finishes: room for exactly one more.
    let first = two[0].metadata.name.clone().unwrap();
    let run = first.trim_start_matches("prefect-run-").to_string();
    prefect.api.set_state(&run, "RUNNING", false).await;
    prefect.api.set_state(&run, "COMPLETED", false).await;
    finish_job(&jobs, &first, "Complete", "", "").await;
    wait_for("a third Job", Duration::from_secs(60), || async {
        (jobs.list(&Default::default()).await.ok()?.items.len() == 3).then_some(())
    })
    .await;
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_jobs_are_deleted_after_their_ttl_by_the_operator() {
    let (client, ns, prefect, operator) = setup("ttl").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let mut resource = agent_resource("tidy", &prefect.server.url, &prefect.pool);
    resource.spec.job.ttl_seconds_after_finished = Some(1);
    agents
        .create(&PostParams::default(), &resource)
        .await
        .expect("create");
    let dep = prefect
        .api
        .create_deployment(&prefect.pool, json!({}))
        .await;
    let run = prefect.api.create_run(&dep).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let name = format!("prefect-run-{run}");
    job_named(&jobs, &name).await;
    prefect.api.set_state(&run, "RUNNING", false).await;
    prefect.api.set_state(&run, "COMPLETED", false).await;
    // No kube-controller-manager runs here: only the operator can delete it.
    finish_job(&jobs, &name, "Complete", "", "").await;
    wait_for(
        "the finished Job deleted after 1 s",
        Duration::from_secs(30),
        || async { jobs.get_opt(&name).await.ok()?.is_none().then_some(()) },
    )
    .await;
    assert_eq!(
        prefect.api.state(&run).await,
        "COMPLETED",
        "the run is untouched"
    );
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_prefect_api_is_degraded_with_the_cause() {
    let (client, ns, prefect, operator) = setup("unreach").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let url = format!("http://127.0.0.1:{}/api", free_port()); // nothing listens there
    agents
        .create(
            &PostParams::default(),
            &agent_resource("lost", &url, &prefect.pool),
        )
        .await
        .expect("create");
    let (_, message, _) = wait_for("Degraded=True", Duration::from_secs(60), || async {
        let a = agents.get("lost").await.ok()?;
        condition(&a, "Degraded").filter(|(s, _, _)| s == "True")
    })
    .await;
    assert_eq!(
        message,
        format!("cannot reach the Prefect API at {url}: Connection refused (os error 111)")
    );
    let a = agents.get("lost").await.unwrap();
    let ready = a
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "AgentFailed")
    );
    // The supervisor restarts it after 10 s; failing again doubles the wait.
    let (_, restarting, _) = wait_for(
        "a second failure with a doubled delay",
        Duration::from_secs(60),
        || async {
            let a = agents.get("lost").await.ok()?;
            condition(&a, "Progressing").filter(|(_, m, _)| m.contains("restarted in 20s"))
        },
    )
    .await;
    assert!(
        restarting.ends_with("Connection refused (os error 111)"),
        "{restarting}"
    );
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn prefect_variables_in_job_variables_are_resolved() {
    let (client, ns, prefect, operator) = setup("vars").await;
    create_agent(&client, &ns, "variable", &prefect).await;
    let name = format!("etl_image_{}", uuid::Uuid::new_v4().simple());
    prefect
        .api
        .call(
            reqwest::Method::POST,
            "/variables/",
            Some(json!({"name": name, "value": "repo/etl:7"})),
        )
        .await;
    let image = format!("{{{{ prefect.variables.{name} }}}}");
    let dep = prefect
        .api
        .create_deployment(&prefect.pool, json!({"image": image}))
        .await;
    let run = prefect.api.create_run(&dep).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job = job_named(&jobs, &format!("prefect-run-{run}")).await;
    let c = &job.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(c.image.as_deref(), Some("repo/etl:7"));
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn prefect_blocks_in_job_variables_are_resolved() {
    let (client, ns, prefect, operator) = setup("blocks").await;
    create_agent(&client, &ns, "blocks", &prefect).await;
    let block = format!("db-pass-{}", uuid::Uuid::new_v4().simple());
    prefect
        .api
        .create_block("secret", &block, json!({"value": "block-secret-value"}))
        .await;
    let dep = prefect
        .api
        .create_deployment(
            &prefect.pool,
            json!({"env": {"DB_PASS": format!("{{{{ prefect.blocks.secret.{block} }}}}")}}),
        )
        .await;
    let run = prefect.api.create_run(&dep).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job = job_named(&jobs, &format!("prefect-run-{run}")).await;
    let env = job.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap_or_default();
    let db_pass = env.iter().find(|e| e.name == "DB_PASS").unwrap();
    assert_eq!(db_pass.value.as_deref(), Some("block-secret-value"));

    // A block that does not exist: the run ends CRASHED naming it, and no Job is made.
    let dep = prefect
        .api
        .create_deployment(
            &prefect.pool,
            json!({"image": "{{ prefect.blocks.string.no-such-image }}"}),
        )
        .await;
    let run = prefect.api.create_run(&dep).await;
    let crashed = prefect
        .api
        .wait_state(&run, "CRASHED", Duration::from_secs(60))
        .await;
    assert_eq!(
        crashed["state"]["message"],
        "Flow run could not be started: block `no-such-image` of type `string` does not exist; \
         it is referenced by the deployment or work pool configuration"
    );
    assert!(
        jobs.get_opt(&format!("prefect-run-{run}"))
            .await
            .unwrap()
            .is_none()
    );
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prefect1_agent_resource_runs_a_flow_through_its_job() {
    let (kube_server, client, ns) = cluster_with_namespace("p1").await;
    let key = format!("pcsk_{}", uuid::Uuid::new_v4().simple());
    let server = common::prefect1::FakePrefect1::start_with(&["--token", &key]).await;
    let mut cmd = operator_command(&kube_server.kubeconfig);
    cmd.args(["--namespace", &ns]);
    let operator = AgentProcess::start_with(cmd);

    // The dev runner plays the kubelet; `prefect execute flow-run` is the fake runner.
    let record_dir = tempfile::tempdir().unwrap();
    let record = record_dir.path().join("runs.txt");
    let shim = record_dir.path().join("prefect");
    std::fs::write(
        &shim,
        // FAKE_MODE (from the run_config's env) picks the fake runner's behaviour.
        format!(
            "#!/bin/sh\nexec {}\n",
            fake_runner(&record, "\"${FAKE_MODE:-complete}\"")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&shim, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut runner_cmd = clean_cluster_command(&kube_server.kubeconfig, "dev-runner");
    runner_cmd.args(["--namespace", &ns]).env(
        "PATH",
        format!(
            "{}:{}",
            record_dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    );
    let _runner = AgentProcess::start_with(runner_cmd);

    create_secret(&client, &ns, "prefect1-api", &key).await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let resource: PrefectAgent = serde_json::from_value(json!({
        "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
        "metadata": {"name": "legacy"},
        "spec": {"api": {"flavor": "prefect1", "url": server.url,
                         "keySecretRef": {"name": "prefect1-api", "key": "key"}},
                 "labels": ["k8s"], "pollInterval": "1s",
                 "job": {"image": "resource/img:1"}}
    }))
    .unwrap();
    agents
        .create(&PostParams::default(), &resource)
        .await
        .expect("create");
    kube_server.wait_ready(&ns, "legacy", &operator).await;
    let registered = server.agents().await;
    assert_eq!(registered[0]["type"], "KubernetesAgent");

    let flow = server
        .create_flow(json!({"name": "etl", "core_version": "1.4.1"}))
        .await;
    let run = server
        .create_run(json!({"flow_id": flow, "labels": ["k8s"], "run_config": {
            "type": "KubernetesRun", "__version__": "1.4.1", "image": "repo/flow:1",
            "env": {"A": "1"}, "cpu_request": "250m", "memory_limit": "1Gi",
            "service_account_name": "runner", "image_pull_secrets": ["regcred"],
            "image_pull_policy": "Always", "job_template": null, "job_template_path": null,
            "labels": ["k8s"]}}))
        .await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job = job_named(&jobs, &format!("prefect-run-{run}")).await;
    assert_eq!(job.labels()["prefect.io/flow-run-id"], run);
    let pod = job.spec.as_ref().unwrap().template.spec.clone().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("runner"));
    assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "regcred");
    let c = &pod.containers[0];
    assert_eq!(c.name, "flow");
    assert_eq!(c.image.as_deref(), Some("repo/flow:1"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
    assert_eq!(c.args.clone().unwrap(), ["prefect", "execute", "flow-run"]);
    let resources = c.resources.clone().unwrap();
    assert_eq!(resources.requests.unwrap()["cpu"].0, "250m");
    assert_eq!(resources.limits.unwrap()["memory"].0, "1Gi");
    let env = c.env.clone().unwrap();
    let value = |name: &str| {
        env.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    assert_eq!(value("A").as_deref(), Some("1"));
    assert_eq!(value("PREFECT__CONTEXT__FLOW_RUN_ID"), Some(run.clone()));
    assert_eq!(
        value("PREFECT__CONTEXT__IMAGE").as_deref(),
        Some("repo/flow:1")
    );
    assert_eq!(value("PREFECT__CLOUD__API"), Some(server.url.clone()));
    for secret_var in ["PREFECT__CLOUD__API_KEY", "PREFECT__CLOUD__AUTH_TOKEN"] {
        let e = env.iter().find(|e| e.name == secret_var).unwrap();
        assert!(e.value.is_none(), "{secret_var} only by reference");
        let r = e
            .value_from
            .as_ref()
            .unwrap()
            .secret_key_ref
            .as_ref()
            .unwrap();
        assert_eq!((r.name.as_str(), r.key.as_str()), ("prefect1-api", "key"));
    }
    assert!(!serde_json::to_string(&job).unwrap().contains(&key));

    // Through the dev runner to Success in Prefect 1, once.
    server
        .wait_state(&run, "Success", Duration::from_secs(90))
        .await;
    assert_eq!(recorded(&record), std::slice::from_ref(&run));
    wait_for("status counters", Duration::from_secs(30), || async {
        let s = agents.get("legacy").await.ok()?.status?;
        (s.runs_submitted == 1 && s.polls > 0).then_some(())
    })
    .await;

    // A run whose flow process dies: its Job fails and the run ends Failed with why.
    let run2 = server
        .create_run(json!({"flow_id": flow, "labels": ["k8s"], "run_config": {
            "type": "KubernetesRun", "env": {"FAKE_MODE": "exit3"}}}))
        .await;
    let failed = server
        .wait_state(&run2, "Failed", Duration::from_secs(90))
        .await;
    let message = failed["state_message"].as_str().unwrap_or_default();
    assert!(message.contains("exit status: 3"), "{message}");
    assert!(
        !operator.output().contains(&key),
        "key in the operator's log"
    );
    drop(operator);
}

/// GET on the operator's probe port: (status, body).
async fn probe(port: u16, path: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_elect_one_leader_and_the_standby_takes_over() {
    let (kube_server, client, ns) = cluster_with_namespace("ha").await;
    let prefect = Setup::new("ha").await;
    let start = |port: u16| {
        let mut cmd = operator_command(&kube_server.kubeconfig);
        cmd.args(["--namespace", &ns, "--leader-elect"])
            .args(["--leader-election-namespace", &ns])
            .env("PAO_HEALTH_ADDRESS", format!("127.0.0.1:{port}"));
        AgentProcess::start_with(cmd)
    };
    let ports = [free_port(), free_port()];
    let replicas = [start(ports[0]), start(ports[1])];
    let leader = wait_for("one ready leader", Duration::from_secs(60), || async {
        let a = probe(ports[0], "/readyz").await?;
        let b = probe(ports[1], "/readyz").await?;
        match (a.0, b.0) {
            (200, 503) => Some(0),
            (503, 200) => Some(1),
            _ => None,
        }
    })
    .await;
    let standby = 1 - leader;
    let (status, body) = probe(ports[standby], "/readyz").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (503, "standby: another replica leads")
    );
    assert_eq!(probe(ports[standby], "/healthz").await.unwrap().0, 200);

    let agents = create_agent(&client, &ns, "ha-agent", &prefect).await;
    wait_for("the agent registered", Duration::from_secs(60), || async {
        agents
            .get("ha-agent")
            .await
            .ok()?
            .status?
            .agent_id
            .map(|_| ())
    })
    .await;
    let metrics = probe(ports[leader], "/metrics").await.unwrap().1;
    let series = format!("prefect_agent_polls_total{{agent=\"{ns}/ha-agent\"}}");
    assert!(metrics.contains(&series), "{metrics}");
    assert!(
        !probe(ports[standby], "/metrics")
            .await
            .unwrap()
            .1
            .contains(&series),
        "the standby runs no agent"
    );

    // The leader dies without a word; the standby takes over within the lease.
    replicas[leader].signal(nix::sys::signal::Signal::SIGKILL);
    let killed = std::time::Instant::now();
    wait_for("the standby to lead", Duration::from_secs(40), || async {
        (probe(ports[standby], "/readyz").await?.0 == 200).then_some(())
    })
    .await;
    eprintln!("failover took {:?}", killed.elapsed());
    let dep = prefect
        .api
        .create_deployment(&prefect.pool, json!({}))
        .await;
    let run = prefect.api.create_run(&dep).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    job_named(&jobs, &format!("prefect-run-{run}")).await;

    // The new leader's metrics count that launch.
    let agent = format!("agent=\"{ns}/ha-agent\"");
    let metrics = wait_for(
        "the launch in /metrics",
        Duration::from_secs(30),
        || async {
            let text = probe(ports[standby], "/metrics").await?.1;
            text.contains(&format!(
                "prefect_agent_runs_submitted_total{{{agent}}} 1\n"
            ))
            .then_some(text)
        },
    )
    .await;
    for series in [
        format!("prefect_agent_runs_claimed_total{{{agent}}} 1\n"),
        format!("prefect_agent_submission_latency_seconds_count{{{agent}}} 1\n"),
        format!("prefect_agent_submission_latency_seconds_bucket{{{agent},le=\"+Inf\"}} 1\n"),
        "# TYPE prefect_api_request_duration_seconds histogram\n".to_string(),
        "# TYPE prefect_agent_operator_reconcile_duration_seconds histogram\n".to_string(),
    ] {
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(value("prefect_agent_operator_reconciles_total ") >= 1.0);
    assert!(value("prefect_api_request_duration_seconds_count{backend=\"prefect3\"} ") >= 3.0);
}
