//! Jobs and what their ends mean for runs: completion, deletion, failures while the operator was away, cancellation, restarts mid-burst, the concurrency limit, TTL clean-up, Prefect variables and blocks.

use super::*;

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
    // The labels and variables Prefect's own worker gives its Jobs, from what the real
    // server says about the run's flow, deployment, pool and version.
    let labels = job.metadata.labels.clone().unwrap_or_default();
    let version = prefect
        .api
        .call(reqwest::Method::GET, "/admin/version", None)
        .await;
    assert_eq!(labels["prefect.io/version"], version.as_str().unwrap());
    assert_eq!(labels["prefect.io/work-pool-name"], prefect.pool);
    assert_eq!(labels["prefect.io/worker-name"], "runner");
    assert_eq!(labels["prefect.io/deployment-id"], dep);
    for key in [
        "prefect.io/work-pool-id",
        "prefect.io/flow-name",
        "prefect.io/deployment-name",
        "prefect.io/deployment-updated",
    ] {
        assert!(labels.contains_key(key), "{key} in {labels:?}");
    }
    let env = job
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .env
        .clone()
        .unwrap_or_default();
    let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names[0], "PREFECT_API_URL",
        "the worker's variables first: {names:?}"
    );
    for name in [
        "PREFECT__WORKER_NAME",
        "PREFECT__FLOW_NAME",
        "PREFECT__DEPLOYMENT_NAME",
    ] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    // Prefect hears COMPLETED from the flow before its pod exits: the Job's success follows.
    wait_for("the Job succeeded", Duration::from_secs(30), || async {
        let job = jobs.get(&format!("prefect-run-{run}")).await.ok()?;
        (job.status?.succeeded == Some(1)).then_some(())
    })
    .await;
    wait_for("runsSubmitted = 1", Duration::from_secs(30), || async {
        let s = agents.get("runner").await.ok()?.status?;
        (s.runs_submitted == 1 && s.runs_failed == 0).then_some(())
    })
    .await;
    drop((operator, runner));
}

/// A run's `namespace` job variable the operator does not allow: the run ends CRASHED
/// naming the namespace and the flag, and no Job is made anywhere.
#[tokio::test(flavor = "multi_thread")]
async fn a_namespace_the_operator_does_not_allow_crashes_the_run_by_name() {
    let (client, ns, prefect, operator) = setup("nsvar").await;
    let _agents = create_agent(&client, &ns, "nsvar", &prefect).await;
    let dep = prefect
        .api
        .create_deployment(
            &prefect.pool,
            json!({"command": fake_runner(&prefect.record, "complete"), "namespace": "kube-system"}),
        )
        .await;
    let run = prefect.api.create_run(&dep).await;
    let crashed = prefect
        .api
        .wait_state(&run, "CRASHED", Duration::from_secs(60))
        .await;
    let message = crashed["state"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("`kube-system`") && message.contains("--namespace"),
        "{message}"
    );
    let elsewhere: Api<Job> = Api::namespaced(client.clone(), "kube-system");
    assert!(
        elsewhere
            .get_opt(&format!("prefect-run-{run}"))
            .await
            .unwrap()
            .is_none()
    );
    let here: Api<Job> = Api::namespaced(client.clone(), &ns);
    assert!(
        here.get_opt(&format!("prefect-run-{run}"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(recorded(&prefect.record).is_empty());
    drop(operator);
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
