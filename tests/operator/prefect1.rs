//! A `flavor: prefect1` resource against the fake Prefect 1 server.

use super::*;

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

/// A key rotated in Prefect and then in its Secret is picked up without a spec change:
/// the agent, failing on the revoked key, is restarted with the new one.
#[tokio::test(flavor = "multi_thread")]
async fn a_key_rotated_in_its_secret_is_picked_up() {
    use k8s_openapi::api::core::v1::Secret;
    let (kube_server, client, ns) = cluster_with_namespace("rotate").await;
    let old = format!("pcsk_{}", uuid::Uuid::new_v4().simple());
    let new = format!("pcsk_{}", uuid::Uuid::new_v4().simple());
    let server = common::prefect1::FakePrefect1::start_with(&["--token", &old]).await;
    let mut cmd = operator_command(&kube_server.kubeconfig);
    cmd.args(["--namespace", &ns]);
    let operator = AgentProcess::start_with(cmd);
    create_secret(&client, &ns, "prefect1-api", &old).await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let resource: PrefectAgent = serde_json::from_value(json!({
        "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
        "metadata": {"name": "rotating"},
        "spec": {"api": {"flavor": "prefect1", "url": server.url,
                         "keySecretRef": {"name": "prefect1-api", "key": "key"}},
                 "pollInterval": "1s"}
    }))
    .unwrap();
    agents
        .create(&PostParams::default(), &resource)
        .await
        .expect("create");
    kube_server.wait_ready(&ns, "rotating", &operator).await;
    let generation = agents.get("rotating").await.unwrap().metadata.generation;

    server.rotate_token(&new).await;
    let degraded = |want: &'static str| {
        let agents = agents.clone();
        async move {
            let a = agents.get("rotating").await.ok()?;
            (condition(&a, "Degraded")?.0 == want).then_some(a)
        }
    };
    wait_for(
        "Degraded on the revoked key",
        Duration::from_secs(90),
        || degraded("True"),
    )
    .await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let patch = json!({"stringData": {"key": new}});
    secrets
        .patch(
            "prefect1-api",
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .expect("rotate the Secret");
    let a = wait_for(
        "Ready again on the new key",
        Duration::from_secs(120),
        || async {
            let a = degraded("False").await?;
            (condition(&a, "Ready")?.0 == "True").then_some(a)
        },
    )
    .await;
    assert_eq!(a.metadata.generation, generation, "no spec change");
    let out = operator.output();
    assert!(
        !out.contains(&old) && !out.contains(&new),
        "no key in the logs"
    );
    drop(operator);
}
