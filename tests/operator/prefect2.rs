//! A PrefectAgent against a real Prefect 2.20 server: the Job follows the deployment's
//! job variables (which 2.20 answers as `infra_overrides`) and runs Prefect 2's image.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_prefect_2_run_gets_its_deployment_s_variables_and_a_prefect_2_image() {
    let (_, client, ns) = cluster_with_namespace("p2").await;
    let server = tokio::task::spawn_blocking(|| PrefectServer::prefect2(&[]))
        .await
        .unwrap();
    let api = server.api();
    let version = api.call(reqwest::Method::GET, "/admin/version", None).await;
    let version = version.as_str().unwrap().to_string();
    let pool = unique("p2-k8s");
    api.create_pool(&pool).await;
    let dep = api
        .create_deployment(
            &pool,
            json!({"env": {"FROM_DEPLOYMENT": "yes"}, "finished_job_ttl": 77}),
        )
        .await;
    let run = api.create_run(&dep).await;

    let kube_server = KubeApiServer::shared();
    let mut cmd = operator_command(&kube_server.kubeconfig);
    cmd.args(["--namespace", &ns]);
    let operator = AgentProcess::start_with(cmd);
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let mut resource = agent_resource("p2", &server.url, &pool);
    resource.spec.job.ttl_seconds_after_finished = None;
    agents
        .create(&PostParams::default(), &resource)
        .await
        .expect("create");
    kube_server.wait_ready(&ns, "p2", &operator).await;

    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job = job_named(&jobs, &format!("prefect-run-{run}")).await;
    let spec = job.spec.unwrap();
    assert_eq!(
        spec.ttl_seconds_after_finished,
        Some(77),
        "the deployment's TTL"
    );
    let container = &spec.template.spec.unwrap().containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some(format!("prefecthq/prefect:{version}-python3.12").as_str()),
        "Prefect of the server's version: a 3.x client refuses a 2.x server"
    );
    let env = container.env.clone().unwrap_or_default();
    assert!(
        env.iter()
            .any(|e| e.name == "FROM_DEPLOYMENT" && e.value.as_deref() == Some("yes")),
        "the deployment's env: {env:?}"
    );
    let labels = job.metadata.labels.unwrap_or_default();
    assert_eq!(labels.get("prefect.io/version"), Some(&version));
    drop(operator);
}
