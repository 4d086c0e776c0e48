//! The Helm chart, the plain manifests and the Argo CD health check, with the real tools:
//! Helm v4's engine (helm-python-sdk), the real API server, a real Lua 5.1.

use pao_testkit as common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::cluster::{cluster_with_namespace, create_secret};
use common::*;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, PostParams};
use prefect_agent_operator::crd::PrefectAgent;
use serde_json::{Value, json};

fn chart_dir() -> PathBuf {
    repo().join("charts/prefect-agent-operator")
}

/// Runs tests/fixtures/helm_chart.py; returns (success, stdout).
fn helm(args: &[&str]) -> (bool, String) {
    let out = Command::new(prefect_venv().join("bin/python"))
        .arg(repo().join("tests/fixtures/helm_chart.py"))
        .args(args)
        .output()
        .expect("run helm_chart.py");
    assert!(
        out.stderr.is_empty() || out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The chart's templates rendered with `values` into `namespace`.
fn render(values: Value, namespace: &str) -> Vec<Value> {
    let chart = chart_dir();
    let (ok, out) = helm(&[
        "render",
        chart.to_str().unwrap(),
        &values.to_string(),
        namespace,
    ]);
    let answer: Value = serde_json::from_str(&out).expect("JSON from helm_chart.py");
    assert!(ok, "render failed: {answer}");
    answer["objects"].as_array().unwrap().clone()
}

fn find<'a>(objects: &'a [Value], kind: &str, name_part: &str) -> Option<&'a Value> {
    objects.iter().find(|o| {
        o["kind"] == kind
            && o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.contains(name_part))
    })
}

fn kinds(objects: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap().to_string())
        .collect();
    k.sort();
    k
}

fn args_of(deployment: &Value) -> Vec<String> {
    deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_chart_ships_the_generated_crds() {
    for (file, _) in prefect_agent_operator::crd::all() {
        let generated = prefect_agent_operator::crd::crd_yaml_of(file)
            .unwrap()
            .unwrap();
        let in_chart = std::fs::read_to_string(chart_dir().join("crds").join(file)).unwrap();
        assert_eq!(
            in_chart, generated,
            "charts/prefect-agent-operator/crds/{file} is stale: cp crds/{file} there"
        );
    }
}

#[test]
fn install_yaml_is_the_chart_rendered_with_defaults() {
    let chart = chart_dir();
    let (ok, generated) = helm(&["install-yaml", chart.to_str().unwrap()]);
    assert!(ok, "{generated}");
    let committed = std::fs::read_to_string(repo().join("manifests/install.yaml")).unwrap();
    assert!(
        committed == generated,
        "manifests/install.yaml is stale; regenerate it with \
         `$VENV/bin/python tests/fixtures/helm_chart.py install-yaml charts/prefect-agent-operator > manifests/install.yaml`"
    );
}

#[test]
fn default_values_render_a_restricted_least_privilege_operator() {
    let objects = render(json!({}), "pao-system");
    assert_eq!(
        kinds(&objects),
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
            "ServiceAccount"
        ]
    );
    // PrefectAgents run pods: only the roles that create pods (edit, admin) create them.
    let edit = find(&objects, "ClusterRole", "prefect-agent-operator-edit").unwrap();
    assert_eq!(
        edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"],
        "true"
    );
    assert!(
        edit["metadata"]["labels"]
            .get("rbac.authorization.k8s.io/aggregate-to-view")
            .is_none()
    );
    let view = find(&objects, "ClusterRole", "prefect-agent-operator-view").unwrap();
    assert_eq!(view["rules"][0]["verbs"], json!(["get", "list", "watch"]));
    let deployment = find(&objects, "Deployment", "prefect-agent-operator").unwrap();
    assert_eq!(deployment["metadata"]["namespace"], "pao-system");
    assert_eq!(deployment["spec"]["replicas"], 1);
    let args = args_of(deployment);
    assert_eq!(args[0], "operator");
    assert!(args.contains(&"--health-address=0.0.0.0:8080".to_string()));
    assert!(args.contains(&"--pod-security=baseline".to_string()));
    assert!(
        !args.iter().any(|a| a.starts_with("--leader-elect")),
        "one replica"
    );
    assert!(
        !args.iter().any(|a| a.starts_with("--namespace")),
        "cluster mode"
    );
    assert!(
        !args.iter().any(|a| a.starts_with("--job-namespaces")),
        "Jobs in each PrefectAgent's own namespace"
    );
    let pod = &deployment["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    // A standby replica is Ready too, or rolling updates of 2+ replicas never finish.
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz?standby=ok");
    assert_eq!(
        c["image"],
        "ghcr.io/prefect-agent-operator/prefect-agent-operator:0.1.0"
    );
    // The "restricted" Pod Security Standard.
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert!(c["resources"]["requests"]["memory"].is_string());

    let role = find(&objects, "ClusterRole", "").unwrap();
    let rules = role["rules"].as_array().unwrap();
    for rule in rules {
        for field in ["apiGroups", "resources", "verbs"] {
            assert!(
                !rule[field].as_array().unwrap().contains(&json!("*")),
                "no wildcards: {rule}"
            );
        }
    }
    let verbs = |resource: &str| -> Vec<String> {
        rules
            .iter()
            .filter(|r| {
                r["resources"]
                    .as_array()
                    .unwrap()
                    .contains(&json!(resource))
            })
            .flat_map(|r| r["verbs"].as_array().unwrap().clone())
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(verbs("secrets"), ["get"], "Secrets read only");
    assert_eq!(verbs("pods"), ["get", "list", "watch"]);
    assert_eq!(verbs("jobs"), ["get", "list", "watch", "create", "delete"]);
    assert_eq!(verbs("prefectagents/finalizers"), ["update"]);
    assert!(
        verbs("leases").is_empty(),
        "no leader election with one replica"
    );
    let binding = find(&objects, "ClusterRoleBinding", "").unwrap();
    assert_eq!(binding["subjects"][0]["namespace"], "pao-system");
    let service = find(&objects, "Service", "").unwrap();
    assert_eq!(service["spec"]["ports"][0]["name"], "http-metrics");
}

#[test]
fn non_default_values_render_namespaced_ha_with_extras() {
    let objects = render(
        json!({
            "replicaCount": 2,
            "watchNamespace": "data",
            "rbac": {"secretNamespaces": ["data"]},
            "podDisruptionBudget": {"enabled": true},
            "metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "prom"}}},
            "image": {"repository": "registry.local/pao", "tag": "dev"},
            "agents": [{"name": "etl", "spec": {"api": {"url": "http://p/api", "workPool": "k8s"}}}]
        }),
        "pao-system",
    );
    assert!(
        find(&objects, "ClusterRole", "").is_none(),
        "namespaced mode"
    );
    let deployment = find(&objects, "Deployment", "").unwrap();
    let args = args_of(deployment);
    assert!(args.contains(&"--leader-elect".to_string()), "{args:?}");
    assert!(args.contains(&"--namespace=data".to_string()), "{args:?}");
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["containers"][0]["image"],
        "registry.local/pao:dev"
    );
    let role = objects
        .iter()
        .find(|o| {
            o["kind"] == "Role"
                && o["metadata"]["namespace"] == "data"
                && !o["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .ends_with("-secrets")
        })
        .unwrap();
    assert!(
        !role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resources"]
                .as_array()
                .unwrap()
                .contains(&json!("secrets"))),
        "Secrets come from their own Role"
    );
    let secrets = find(&objects, "Role", "-secrets").unwrap();
    assert_eq!(secrets["metadata"]["namespace"], "data");
    let lease = find(&objects, "Role", "-leader-election").unwrap();
    assert_eq!(lease["metadata"]["namespace"], "pao-system");
    assert_eq!(lease["rules"][0]["resources"], json!(["leases"]));
    let pdb = find(&objects, "PodDisruptionBudget", "").unwrap();
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    let sm = find(&objects, "ServiceMonitor", "").unwrap();
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "http-metrics");
    let agent = find(&objects, "PrefectAgent", "etl").unwrap();
    assert_eq!(
        agent["metadata"]["namespace"], "data",
        "agents default to the watched namespace"
    );
}

#[test]
fn helm_lint_finds_no_errors() {
    let chart = chart_dir();
    for values in [
        json!({}),
        json!({"replicaCount": 3, "watchNamespace": "data"}),
    ] {
        let (ok, out) = helm(&["lint", chart.to_str().unwrap(), &values.to_string()]);
        assert!(ok, "{out}");
        let report: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["errors"], json!([]), "{report}");
        let severe: Vec<&Value> = report["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["severity"].as_u64().unwrap_or(0) >= 2)
            .collect();
        assert!(severe.is_empty(), "warnings or errors: {severe:?}");
    }
}

#[test]
fn bad_values_are_rejected_by_the_schema_with_a_clear_message() {
    let chart = chart_dir();
    let check = |values: Value| -> String {
        let (ok, out) = helm(&["validate", chart.to_str().unwrap(), &values.to_string()]);
        assert!(!ok, "accepted {values}");
        let answer: Value = serde_json::from_str(&out).unwrap();
        answer["error"].as_str().unwrap().to_string()
    };
    let e = check(json!({"replicaCount": -1}));
    assert!(e.contains("/replicaCount") && e.contains("minimum"), "{e}");
    let e = check(json!({"logFormat": "xml"}));
    assert!(
        e.contains("/logFormat") && e.contains("'json', 'text'"),
        "{e}"
    );
    let e = check(json!({"replicas": 2}));
    assert!(e.contains("replicas"), "a misspelt key is named: {e}");
    let e = check(json!({"jobNamespaces": ["ok", "Not/One"]}));
    assert!(e.contains("/jobNamespaces/1"), "{e}");
    let e = check(json!({"watchNamespace": "Not_A_Namespace"}));
    assert!(e.contains("/watchNamespace"), "{e}");
    let e = check(json!({"agents": [{"name": "x"}]}));
    assert!(e.contains("spec"), "{e}");
    let (ok, _) = helm(&["validate", chart.to_str().unwrap(), "{\"replicaCount\": 2}"]);
    assert!(ok);
}

/// Evaluates manifests/argocd/health.lua for `obj` with Lua 5.1, as Argo CD does.
fn argo_health(obj: &Value) -> (String, String) {
    fn lua(v: &Value) -> String {
        match v {
            Value::Null => "nil".into(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            Value::String(s) => format!("{s:?}"),
            Value::Array(items) => {
                let items: Vec<String> = items.iter().map(lua).collect();
                format!("{{{}}}", items.join(", "))
            }
            Value::Object(map) => {
                let fields: Vec<String> = map
                    .iter()
                    .map(|(k, v)| format!("[{k:?}] = {}", lua(v)))
                    .collect();
                format!("{{{}}}", fields.join(", "))
            }
        }
    }
    let script = format!(
        "obj = {}\nlocal check = assert(loadfile({:?}))\nlocal hs = check()\nio.write(hs.status, \"\\n\", hs.message or \"\")",
        lua(obj),
        repo().join("manifests/argocd/health.lua").display()
    );
    let out = Command::new("lua5.1")
        .args(["-e", &script])
        .output()
        .expect("lua5.1 (scripts/test.sh installs Debian's lua5.1)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, message) = text.split_once('\n').unwrap_or((&text, ""));
    (status.to_string(), message.to_string())
}

fn agent_with(generation: i64, observed: i64, conditions: Value) -> Value {
    json!({
        "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
        "metadata": {"name": "etl", "namespace": "data", "generation": generation},
        "spec": {"api": {"url": "http://p/api", "workPool": "k8s"}},
        "status": {"observedGeneration": observed, "conditions": conditions}
    })
}

fn cond(kind: &str, status: &str, reason: &str, message: &str, generation: i64) -> Value {
    json!({"type": kind, "status": status, "reason": reason, "message": message,
           "observedGeneration": generation, "lastTransitionTime": "2026-01-01T00:00:00Z"})
}

#[test]
fn the_argo_cd_health_check_reads_the_conditions() {
    let ready = agent_with(
        2,
        2,
        json!([
            cond("Ready", "True", "Polling", "the agent polls Prefect", 2),
            cond("Progressing", "False", "Polling", "up to date", 2),
            cond("Degraded", "False", "Polling", "no errors", 2)
        ]),
    );
    assert_eq!(
        argo_health(&ready),
        ("Healthy".into(), "the agent polls Prefect".into())
    );

    let stale = agent_with(
        3,
        2,
        json!([cond(
            "Ready",
            "True",
            "Polling",
            "the agent polls Prefect",
            2
        )]),
    );
    assert_eq!(
        argo_health(&stale),
        (
            "Progressing".into(),
            "Waiting for the operator to observe generation 3".into()
        )
    );

    let degraded = agent_with(
        1,
        1,
        json!([
            cond(
                "Ready",
                "False",
                "SecretNotFound",
                "Secret data/prefect-api not found",
                1
            ),
            cond(
                "Degraded",
                "True",
                "SecretNotFound",
                "Secret data/prefect-api not found",
                1
            )
        ]),
    );
    assert_eq!(
        argo_health(&degraded),
        (
            "Degraded".into(),
            "Secret data/prefect-api not found".into()
        )
    );

    let mut fresh = agent_with(1, 0, json!([]));
    fresh.as_object_mut().unwrap().remove("status");
    assert_eq!(argo_health(&fresh).0, "Progressing", "no status yet");

    let suspended = agent_with(
        4,
        4,
        json!([cond("Ready", "False", "Suspended", "suspended", 4)]),
    );
    assert_eq!(argo_health(&suspended).0, "Suspended");

    let registering = agent_with(
        1,
        1,
        json!([
            cond(
                "Ready",
                "False",
                "Registering",
                "the agent is registering with Prefect",
                1
            ),
            cond(
                "Progressing",
                "True",
                "Registering",
                "the agent is registering with Prefect",
                1
            )
        ]),
    );
    assert_eq!(
        argo_health(&registering),
        (
            "Progressing".into(),
            "the agent is registering with Prefect".into()
        )
    );
}

#[test]
fn the_argocd_cm_snippet_carries_the_same_check() {
    let lua = std::fs::read_to_string(repo().join("manifests/argocd/health.lua")).unwrap();
    let cm: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("manifests/argocd/argocd-cm.yaml")).unwrap(),
    )
    .unwrap();
    for kind in ["PrefectAgent", "PrefectWorkPool", "PrefectDeployment"] {
        assert_eq!(
            cm["data"][format!("resource.customizations.health.prefect.io_{kind}").as_str()]
                .as_str(),
            Some(lua.as_str()),
            "{kind}"
        );
    }
}

#[test]
fn the_argo_cd_health_check_reads_a_work_pool_s_conditions() {
    let pool = |conditions: Value| {
        json!({
            "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectWorkPool",
            "metadata": {"name": "k8s", "namespace": "data", "generation": 1},
            "spec": {"api": {"url": "http://p/api"}},
            "status": {"observedGeneration": 1, "conditions": conditions}
        })
    };
    let synced = pool(json!([
        cond(
            "Ready",
            "True",
            "Synced",
            "work pool `k8s` is as declared",
            1
        ),
        cond("Degraded", "False", "Synced", "no problem seen", 1)
    ]));
    assert_eq!(
        argo_health(&synced),
        ("Healthy".into(), "work pool `k8s` is as declared".into())
    );
    let message = "spec.baseJobTemplate: job_configuration.command: {{ cmd }} names no variable";
    let bad = pool(json!([
        cond("Ready", "False", "InvalidTemplate", message, 1),
        cond("Degraded", "True", "InvalidTemplate", message, 1)
    ]));
    assert_eq!(argo_health(&bad), ("Degraded".into(), message.into()));
}

/// Writes a kubeconfig like the admin one but authenticating with `token`.
fn kubeconfig_with_token(admin: &Path, token: &str, dir: &Path) -> PathBuf {
    let mut kc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(admin).unwrap()).unwrap();
    kc["users"][0]["user"] = serde_yaml::to_value(json!({"token": token})).unwrap();
    let path = dir.join("kubeconfig-sa");
    std::fs::write(&path, serde_yaml::to_string(&kc).unwrap()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn install_yaml_and_the_chart_apply_to_the_api_server() {
    let (kube_server, client, ns) = cluster_with_namespace("chart").await;
    let install = repo().join("manifests/install.yaml");
    // A real apply, as a user runs it (a server-side dry run cannot create the namespace
    // the other objects go into).
    let (ok, out) = kube_server
        .kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            install.to_str().unwrap(),
        ])
        .await;
    assert!(ok, "{out}");
    for kind in [
        "namespace",
        "customresourcedefinition",
        "deployment",
        "clusterrole",
    ] {
        assert!(out.contains(kind), "{kind} in {out}");
    }

    // The README's example step as written, on a server that has never seen `data`.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let step = readme
        .lines()
        .find(|l| l.starts_with("kubectl apply -f manifests/examples/"))
        .expect("the README's example step");
    let words = shlex::split(step).unwrap();
    let args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
    let (ok, out) = kube_server.kubectl(&args).await;
    assert!(ok, "{step}\n{out}");
    let examples: Api<PrefectAgent> = Api::namespaced(client.clone(), "data");
    assert!(examples.get("etl").await.is_ok(), "{out}");
    let pools: Api<prefect_agent_operator::crd::PrefectWorkPool> =
        Api::namespaced(client.clone(), "data");
    let pool = pools.get("k8s").await.expect("the example PrefectWorkPool");
    assert_eq!(pool.spec.queues.len(), 2);
    let deployments: Api<prefect_agent_operator::crd::PrefectDeployment> =
        Api::namespaced(client.clone(), "data");
    let hello = deployments
        .get("hello")
        .await
        .expect("the example PrefectDeployment");
    assert_eq!(hello.spec.schedules.len(), 2);

    // The chart with non-default values, applied for real (without the ServiceMonitor,
    // whose CRD this server does not have, and with this server's PDB version).
    let objects = render(
        json!({"replicaCount": 2, "watchNamespace": ns,
               "agents": [{"name": "from-chart",
                           "spec": {"api": {"url": "http://127.0.0.1:9/api", "workPool": "p"}}}]}),
        &ns,
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("chart.json");
    std::fs::write(
        &file,
        json!({"apiVersion": "v1", "kind": "List", "items": objects}).to_string(),
    )
    .unwrap();
    let (ok, out) = kube_server
        .kubectl(&["apply", "--server-side", "-f", file.to_str().unwrap()])
        .await;
    assert!(ok, "{out}");
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    assert!(agents.get("from-chart").await.is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_s_rbac_is_enough_to_run_the_operator() {
    let (kube_server, client, ns) = cluster_with_namespace("rbac").await;
    let prefect = Setup::new("rbac").await;
    // Namespaced mode, leader election on: the Roles, the binding and the Lease rules.
    let objects = render(
        json!({"watchNamespace": ns, "leaderElection": {"enabled": true}}),
        &ns,
    );
    let deployment = find(&objects, "Deployment", "").unwrap().clone();
    let rbac: Vec<Value> = objects
        .into_iter()
        .filter(|o| o["kind"] != "Deployment" && o["kind"] != "Service")
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rbac.json");
    std::fs::write(
        &file,
        json!({"apiVersion": "v1", "kind": "List", "items": rbac}).to_string(),
    )
    .unwrap();
    let (ok, out) = kube_server
        .kubectl(&["apply", "--server-side", "-f", file.to_str().unwrap()])
        .await;
    assert!(ok, "{out}");
    let sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap()
        .to_string();
    let (ok, token) = kube_server
        .kubectl(&["create", "token", &sa, "-n", &ns, "--duration=1h"])
        .await;
    assert!(ok, "{token}");
    let kubeconfig = kubeconfig_with_token(&kube_server.kubeconfig, token.trim(), dir.path());

    // The operator exactly as the Deployment starts it, with the ServiceAccount's token.
    let port = free_port();
    let args: Vec<String> = args_of(&deployment)
        .into_iter()
        .map(|a| {
            if a.starts_with("--health-address") {
                format!("--health-address=127.0.0.1:{port}")
            } else {
                a
            }
        })
        .collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_prefect-agent-operator"));
    cmd.args(&args)
        .env_remove("PAO_HEALTH_ADDRESS")
        .env("KUBECONFIG", &kubeconfig)
        .env("POD_NAMESPACE", &ns)
        .env("POD_NAME", "pao-0")
        .env("PAO_POD_GRACE", "1s");
    let operator = AgentProcess::start_with(cmd);

    create_secret(&client, &ns, "prefect-api", "unused").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let resource: PrefectAgent = serde_json::from_value(json!({
        "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
        "metadata": {"name": "rbac-agent"},
        "spec": {"api": {"url": prefect.server.url, "workPool": prefect.pool,
                         "keySecretRef": {"name": "prefect-api", "key": "key"}},
                 "pollInterval": "1s", "job": {"ttlSecondsAfterFinished": 1}}
    }))
    .unwrap();
    agents
        .create(&PostParams::default(), &resource)
        .await
        .unwrap();
    kube_server.wait_ready(&ns, "rbac-agent", &operator).await;

    let run = prefect.new_run().await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let name = format!("prefect-run-{run}");
    wait_for("the Job", Duration::from_secs(60), || async {
        jobs.get_opt(&name).await.ok().flatten()
    })
    .await;
    // The Job fails: the observer (Jobs + Pods watch) reports it, the run is CRASHED,
    // and an Event is written — all with the chart's permissions.
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    jobs.patch_status(
        &name,
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&json!({"status": {"conditions": [{"type": "Failed", "status": "True",
            "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit",
            "lastProbeTime": now, "lastTransitionTime": now}]}})),
    )
    .await
    .unwrap();
    prefect
        .api
        .wait_state(&run, "CRASHED", Duration::from_secs(60))
        .await;
    // Finished, its TTL runs out: the operator deletes it.
    wait_for(
        "the finished Job deleted",
        Duration::from_secs(30),
        || async { jobs.get_opt(&name).await.ok()?.is_none().then_some(()) },
    )
    .await;
    let lease: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &ns);
    let held = lease.get("prefect-agent-operator").await.unwrap();
    assert_eq!(held.spec.unwrap().holder_identity.as_deref(), Some("pao-0"));
    let out = operator.output();
    assert!(
        !out.contains("forbidden"),
        "a permission is missing:\n{out}"
    );
}
