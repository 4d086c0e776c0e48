//! The operator as users install it, on a real one-node cluster: the image built here
//! (the tests' binary in a minimal image, user 65532), `helm install` with Helm's own
//! engine (helm-python-sdk), then `kubectl apply --server-side -f manifests/install.yaml`.
//! The operator runs as a pod under the chart's ServiceAccount and RBAC, passes its probes,
//! and runs a flow in a pod; uninstalling leaves nothing of it behind.
//!
//! One test, in its own binary: an operator installed cluster-wide manages every
//! namespace's PrefectAgents, so nothing else may run beside it.

use pao_testkit as common;

use std::process::Stdio;
use std::time::Duration;

use common::node::{FlowRepo, Node, image, prefect_for_pods};
use common::*;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api as KubeApi, ListParams};
use prefect_agent_operator::backend::http::Auth;
use prefect_agent_operator::secret::SecretString;
use serde_json::{Value, json};

const AUTH: &str = "admin:install-tests-credential";
/// What the chart and install.yaml name; the local image is tagged so in the node.
const PUBLISHED_IMAGE: &str = "ghcr.io/prefect-agent-operator/prefect-agent-operator:0.1.0";

async fn helm(args: &[&str]) -> Value {
    let out = tokio::process::Command::new(prefect_venv().join("bin/python"))
        .arg(repo().join("tests/fixtures/helm_chart.py"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run helm_chart.py");
    let text = String::from_utf8_lossy(&out.stdout);
    let answer: Value = serde_json::from_str(text.trim()).unwrap_or_else(|_| {
        panic!(
            "helm {args:?}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "helm {}: {answer}", args[0]);
    answer
}

/// The operator's pods in `namespace` and whether each is Ready.
async fn operator_pods(client: &kube::Client, namespace: &str) -> Vec<(Pod, bool)> {
    let pods: KubeApi<Pod> = KubeApi::namespaced(client.clone(), namespace);
    pods.list(&ListParams::default().labels("app.kubernetes.io/name=prefect-agent-operator"))
        .await
        .expect("list the operator's pods")
        .items
        .into_iter()
        .map(|p| {
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            (p, ready)
        })
        .collect()
}

/// Waits until the operator has exactly one pod in `namespace`, and it is Ready.
async fn one_operator_ready(client: &kube::Client, namespace: &str) {
    wait_for(
        "the operator pod Ready",
        Duration::from_secs(120),
        || async {
            let pods = operator_pods(client, namespace).await;
            (pods.len() == 1 && pods[0].1).then_some(())
        },
    )
    .await;
}

/// A namespace for PrefectAgents with the credential's Secret, and a kubernetes pool.
async fn agents_namespace(client: &kube::Client, api: &Api, prefix: &str) -> (String, String) {
    let ns = common::cluster::namespace(client, prefix).await;
    common::cluster::create_secret(client, &ns, "prefect-auth", AUTH).await;
    let pool = unique(prefix);
    api.create_kubernetes_pool(&pool).await;
    (ns, pool)
}

/// `GET http://<pod ip>:8080<path>` from the host (pods are routable on the bridge).
async fn probe(pod: &Pod, path: &str) -> Option<(u16, String)> {
    let ip = pod.status.as_ref()?.pod_ip.clone()?;
    let r = reqwest::get(format!("http://{ip}:8080{path}")).await.ok()?;
    Some((r.status().as_u16(), r.text().await.ok()?))
}

/// Runs one flow through the PrefectAgent `agent` of `namespace` and waits for COMPLETED.
async fn a_flow_completes(node: &Node, api: &Api, pool: &str, repo: &FlowRepo, what: &str) {
    let dep = api
        .create_git_deployment(
            pool,
            repo,
            "hello.py:hello",
            json!({"image": image("flow")}),
        )
        .await;
    let run = api.create_run(&dep).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        let current = api.run(&run).await;
        if current["state"]["type"] == "COMPLETED" {
            return;
        }
        if std::time::Instant::now() > deadline {
            let (_, pods) = node
                .kube
                .kubectl(&["get", "pods", "-A", "-o", "wide"])
                .await;
            let (_, logs) = node
                .kube
                .kubectl(&[
                    "logs",
                    "-A",
                    "-l",
                    "app.kubernetes.io/name=prefect-agent-operator",
                    "--tail=50",
                ])
                .await;
            panic!(
                "{what}: run {run} is {} ({}), not COMPLETED\n{pods}\noperator:\n{logs}",
                current["state"]["type"], current["state"]["message"]
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `kubectl delete pfa --all`: each PrefectAgent's finalizer runs while the operator does.
async fn delete_agents(node: &Node, namespace: &str) {
    let (ok, out) = node
        .kube
        .kubectl(&["delete", "pfa", "--all", "-n", namespace, "--timeout=120s"])
        .await;
    assert!(ok, "{out}");
}

/// `kubectl wait --for=condition=complete` for every Job of `namespace`.
async fn jobs_complete(node: &Node, namespace: &str) {
    let (ok, out) = node
        .kube
        .kubectl(&[
            "wait",
            "--for=condition=complete",
            "jobs",
            "--all",
            "-n",
            namespace,
            "--timeout=120s",
        ])
        .await;
    assert!(ok, "{out}");
}

/// Waits until nothing of the operator is left: no Job in `jobs_ns`, no PrefectAgent with
/// a finalizer, no ClusterRole/ClusterRoleBinding of the operator.
async fn nothing_left(node: &Node, jobs_ns: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let (_, jobs) = node
            .kube
            .kubectl(&["get", "jobs", "-n", jobs_ns, "-o", "name"])
            .await;
        let (_, agents) = node.kube.kubectl(&["get", "pfa", "-A", "-o", "name"]).await;
        let (_, rbac) = node
            .kube
            .kubectl(&["get", "clusterroles,clusterrolebindings", "-o", "name"])
            .await;
        let rbac: Vec<&str> = rbac
            .lines()
            .filter(|l| l.contains("prefect-agent-operator") || l.contains("/pao-"))
            .collect();
        // After `kubectl delete -f install.yaml` the CRD itself is gone: nothing to list.
        let agents: Vec<&str> = agents
            .lines()
            .filter(|l| l.starts_with("prefectagent.prefect.io/"))
            .collect();
        if jobs.trim().is_empty() && agents.is_empty() && rbac.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left behind after 120 s: jobs {jobs:?}, agents {agents:?}, rbac {rbac:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_and_kubectl_install_the_operator_as_a_pod_that_runs_flows() {
    let node = tokio::task::spawn_blocking(Node::shared)
        .await
        .expect("the node");
    // The tests' own binary in the minimal image, also under the published name.
    node.load_operator(
        env!("CARGO_BIN_EXE_prefect-agent-operator"),
        PUBLISHED_IMAGE,
    )
    .await;
    let server = tokio::task::spawn_blocking(move || prefect_for_pods(node, AUTH))
        .await
        .unwrap();
    let repo = tokio::task::spawn_blocking(move || FlowRepo::shared(node))
        .await
        .unwrap();
    let api = Api::new(&server.url, Auth::Basic(SecretString::new(AUTH)));
    let client = node.kube.client().await;
    let kubeconfig = node.kube.kubeconfig.to_str().unwrap().to_string();
    let chart = repo_path("charts/prefect-agent-operator");

    // --- Helm: install (cluster mode, the default) with a PrefectAgent from values.
    let release_ns = "pao-system";
    let (agents_ns, pool) = agents_namespace(&client, &api, "helm").await;
    let agent = json!({"name": "from-values", "namespace": agents_ns, "spec": {
        "api": {"url": server.url, "workPool": pool,
                "authStringSecretRef": {"name": "prefect-auth", "key": "key"}},
        "pollInterval": "2s"}});
    let values = json!({"image": {"repository": image("operator").rsplit_once(':').unwrap().0,
                                  "tag": "dev", "pullPolicy": "IfNotPresent"},
                        "podGrace": "20s", "agents": [agent]});
    helm(&[
        "install",
        &kubeconfig,
        &chart,
        "pao",
        release_ns,
        &values.to_string(),
    ])
    .await;
    one_operator_ready(&client, release_ns).await;
    let (pod, _) = operator_pods(&client, release_ns).await.remove(0);
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some("pao-prefect-agent-operator")
    );
    assert_eq!(
        probe(&pod, "/readyz").await.map(|(code, _)| code),
        Some(200),
        "/readyz of the only replica"
    );
    node.kube.wait_ready_for(&agents_ns, "from-values").await;
    a_flow_completes(node, &api, &pool, repo, "helm install").await;

    // --- helm upgrade to 2 replicas: leader election, one leads, the other stands by.
    let mut two = values.clone();
    two["replicaCount"] = json!(2);
    helm(&[
        "upgrade",
        &kubeconfig,
        &chart,
        "pao",
        release_ns,
        &two.to_string(),
    ])
    .await;
    // Both replicas Ready (the chart's probe lets a standby be), one leads: plain /readyz
    // says which.
    let (leader, standby) = wait_for(
        "two Ready replicas, one leading",
        Duration::from_secs(180),
        || async {
            let pods = operator_pods(&client, release_ns).await;
            if pods.len() != 2
                || pods
                    .iter()
                    .any(|(p, r)| !r || p.metadata.deletion_timestamp.is_some())
            {
                return None;
            }
            let mut leaders = Vec::new();
            let mut standbys = Vec::new();
            for (p, _) in pods {
                match probe(&p, "/readyz").await? {
                    (200, _) => leaders.push(p),
                    (503, body) if body.contains("standby: another replica leads") => {
                        standbys.push(p)
                    }
                    _ => return None,
                }
            }
            (leaders.len() == 1 && standbys.len() == 1)
                .then(|| (leaders.remove(0), standbys.remove(0)))
        },
    )
    .await;
    assert_eq!(
        probe(&standby, "/readyz?standby=ok").await.map(|(c, _)| c),
        Some(200)
    );
    assert_eq!(
        probe(&leader, "/readyz?standby=ok").await.map(|(c, _)| c),
        Some(200)
    );
    a_flow_completes(node, &api, &pool, repo, "after helm upgrade").await;

    // --- Uninstall as the README says: the PrefectAgents first, then the release (once
    // their runs' Jobs are done: a Job still running is left to finish).
    jobs_complete(node, &agents_ns).await;
    delete_agents(node, &agents_ns).await;
    helm(&["uninstall", &kubeconfig, "pao", release_ns]).await;
    nothing_left(node, &agents_ns).await;

    // --- kubectl apply --server-side -f manifests/install.yaml, as it is.
    let install = repo_path("manifests/install.yaml");
    let (ok, out) = node
        .kube
        .kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            &install,
        ])
        .await;
    assert!(ok, "{out}");
    let kubectl_ns = "prefect-agent-operator";
    one_operator_ready(&client, kubectl_ns).await;
    let (agents_ns, pool) = agents_namespace(&client, &api, "kubectl").await;
    let manifest = json!({"apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
        "metadata": {"name": "etl", "namespace": agents_ns},
        "spec": {"api": {"url": server.url, "workPool": pool,
                         "authStringSecretRef": {"name": "prefect-auth", "key": "key"}},
                 "pollInterval": "2s"}});
    let file = common::node::scratch("pao-install-").join("agent.json");
    std::fs::write(&file, manifest.to_string()).unwrap();
    let (ok, out) = node
        .kube
        .kubectl(&["apply", "-f", file.to_str().unwrap()])
        .await;
    assert!(ok, "{out}");
    node.kube.wait_ready_for(&agents_ns, "etl").await;
    a_flow_completes(node, &api, &pool, repo, "kubectl apply install.yaml").await;
    jobs_complete(node, &agents_ns).await;
    delete_agents(node, &agents_ns).await;
    let (ok, out) = node
        .kube
        .kubectl(&["delete", "-f", &install, "--timeout=120s"])
        .await;
    assert!(ok, "{out}");
    nothing_left(node, &agents_ns).await;
}

fn repo_path(rel: &str) -> String {
    repo().join(rel).to_str().unwrap().to_string()
}
