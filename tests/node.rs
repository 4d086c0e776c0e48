//! Flows in real pods: a one-node cluster (scripts/cluster.sh: kubelet, scheduler,
//! containerd), the Prefect 3 image laid out like Prefect's official one, a Prefect server
//! that requires a credential, and the flows' code pulled by Prefect's `git_clone` step.
//! Nothing here plays the kubelet: pods start, fail and end for real.

use pao_testkit as common;

use std::time::Duration;

use common::node::{FlowRepo, Node, image, prefect_for_pods};
use common::*;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api as KubeApi, ListParams, PostParams};
use prefect_agent_operator::backend::http::Auth;
use prefect_agent_operator::crd::PrefectAgent;
use prefect_agent_operator::secret::SecretString;
use serde_json::{Value, json};

/// The basic-auth credential the test Prefect server requires: a flow that reaches it
/// proves the Secret reached the pod.
const AUTH: &str = "admin:node-tests-credential";

/// How long a pod may take from the run's creation to a final state on a busy 2-core
/// machine (a pod start imports Prefect: ~5 s alone).
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// One test's world: the node, the Prefect server pods reach, the flows' repository, a
/// kubernetes pool, a namespace with the credential Secret, and the operator.
struct World {
    node: &'static Node,
    api: Api,
    url: String,
    repo: &'static FlowRepo,
    pool: String,
    ns: String,
    client: kube::Client,
    operator: AgentProcess,
}

impl World {
    async fn new(prefix: &str) -> World {
        let node = tokio::task::spawn_blocking(Node::shared)
            .await
            .expect("the node");
        let server = tokio::task::spawn_blocking(move || prefect_for_pods(node, AUTH))
            .await
            .expect("the Prefect server");
        let repo = tokio::task::spawn_blocking(move || FlowRepo::shared(node))
            .await
            .expect("the flows' repository");
        let api = Api::new(&server.url, Auth::Basic(SecretString::new(AUTH)));
        let pool = unique(prefix);
        api.create_kubernetes_pool(&pool).await;
        let client = node.kube.client().await;
        common::cluster::install_crd(&client).await;
        let ns = common::cluster::namespace(&client, prefix).await;
        common::cluster::create_secret(&client, &ns, "prefect-auth", AUTH).await;
        let operator = node.operator(&ns);
        World {
            node,
            api,
            url: server.url.clone(),
            repo,
            pool,
            ns,
            client,
            operator,
        }
    }

    /// A PrefectAgent with nothing but the API, the credential and the pool, plus `spec`
    /// merged over it.
    async fn agent(&self, name: &str, spec: Value) {
        let mut resource = json!({
            "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
            "metadata": {"name": name},
            "spec": {"api": {"url": self.url, "workPool": self.pool,
                             "authStringSecretRef": {"name": "prefect-auth", "key": "key"}}}
        });
        merge(&mut resource["spec"], &spec);
        let agents: KubeApi<PrefectAgent> = KubeApi::namespaced(self.client.clone(), &self.ns);
        agents
            .create(
                &PostParams::default(),
                &serde_json::from_value(resource).expect("a PrefectAgent"),
            )
            .await
            .expect("create the PrefectAgent");
        self.node
            .kube
            .wait_ready(&self.ns, name, &self.operator)
            .await;
    }

    /// A deployment of `entrypoint` in the test image, with more job variables.
    async fn deployment(&self, entrypoint: &str, job_variables: Value) -> String {
        let mut vars = json!({"image": image("flow")});
        merge(&mut vars, &job_variables);
        self.api
            .create_git_deployment(&self.pool, self.repo, entrypoint, vars)
            .await
    }

    /// Waits for the run to reach `state`; on a timeout, says what the run, its pod and
    /// the operator did.
    async fn wait_state(&self, run: &str, state: &str) -> Value {
        let deadline = std::time::Instant::now() + RUN_TIMEOUT;
        loop {
            let current = self.api.run(run).await;
            if current["state"]["type"] == state {
                return current;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "run {run} is {} after {RUN_TIMEOUT:?}, not {state}: {}\n{}",
                    current["state"]["type"],
                    current["state"]["message"],
                    self.diagnostics(run).await
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits for a log line of the run containing `text` and returns it.
    async fn logged(&self, run: &str, text: &str) -> String {
        wait_for(
            &format!("a log line of {run} with `{text}`"),
            Duration::from_secs(30),
            || async {
                self.api
                    .logs(run)
                    .await
                    .into_iter()
                    .find(|l| l.contains(text))
            },
        )
        .await
    }

    /// Waits for any final state.
    async fn wait_final(&self, run: &str) -> Value {
        wait_for(&format!("run {run} final"), RUN_TIMEOUT, || async {
            let current = self.api.run(run).await;
            ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]
                .contains(&current["state"]["type"].as_str().unwrap_or_default())
                .then_some(current)
        })
        .await
    }

    async fn diagnostics(&self, run: &str) -> String {
        let job = prefect_agent_operator::deploy::kubernetes::job::job_name(run);
        let (_, pods) = self
            .node
            .kube
            .kubectl(&["get", "pods,jobs", "-n", &self.ns, "-o", "wide"])
            .await;
        let (_, describe) = self
            .node
            .kube
            .kubectl(&[
                "describe",
                "pods",
                "-n",
                &self.ns,
                "-l",
                &format!("job-name={job}"),
            ])
            .await;
        let logs = self.node.job_logs(&self.ns, &job).await;
        let history: Vec<String> = self
            .api
            .states(run)
            .await
            .iter()
            .map(|s| format!("{} {}", s["type"], s["message"]))
            .collect();
        format!(
            "states: {history:?}\n{pods}\n{describe}\npod logs:\n{logs}\noperator:\n{}",
            self.operator.output()
        )
    }

    async fn pods_of(&self, run: &str) -> Vec<Pod> {
        let pods: KubeApi<Pod> = KubeApi::namespaced(self.client.clone(), &self.ns);
        pods.list(&ListParams::default().labels(&format!("prefect.io/flow-run-id={run}")))
            .await
            .expect("list pods")
            .items
    }

    async fn job(&self, run: &str) -> Option<Job> {
        let jobs: KubeApi<Job> = KubeApi::namespaced(self.client.clone(), &self.ns);
        jobs.get_opt(&prefect_agent_operator::deploy::kubernetes::job::job_name(
            run,
        ))
        .await
        .expect("get the Job")
    }
}

/// `over` merged into `base`, objects key by key.
fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_default_agent_runs_a_flow_in_a_real_pod_that_authenticates_with_the_secret() {
    let w = World::new("real").await;
    w.agent("etl", json!({})).await;
    let dep = w.deployment("hello.py:hello", json!({})).await;
    let run = w.api.create_run(&dep).await;
    w.wait_state(&run, "COMPLETED").await;

    // The flow's own log line reached Prefect (it ships just after the final state): the
    // pod authenticated with the credential.
    w.logged(&run, "Hello, world!").await;
    // The pod really ran and ends Succeeded (the flow reports COMPLETED just before its
    // process exits); the credential is a secretKeyRef, never a literal.
    wait_for("the pod Succeeded", Duration::from_secs(60), || async {
        let pods = w.pods_of(&run).await;
        assert_eq!(pods.len(), 1, "one pod for one run");
        (pods[0].status.as_ref()?.phase.as_deref() == Some("Succeeded")).then_some(())
    })
    .await;
    let job = w.job(&run).await.expect("the run's Job");
    let text = serde_json::to_string(&job).unwrap();
    assert!(!text.contains(AUTH), "no literal credential in the Job");
    let env = job.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let auth = env
        .iter()
        .find(|e| e.name == "PREFECT_API_AUTH_STRING")
        .expect("the credential's variable");
    let from = auth.value_from.as_ref().unwrap().secret_key_ref.as_ref();
    assert_eq!(from.map(|s| s.name.as_str()), Some("prefect-auth"));
    // What a user sees with kubectl.
    let logs = w
        .node
        .job_logs(
            &w.ns,
            &prefect_agent_operator::deploy::kubernetes::job::job_name(&run),
        )
        .await;
    assert!(logs.contains("Hello, world!"), "kubectl logs: {logs}");
}

/// Waits for the run's final state and checks it and its message.
async fn ends_with(w: &World, run: &str, state: &str, words: &[&str]) {
    let done = w.wait_state(run, state).await;
    let message = done["state"]["message"].as_str().unwrap_or_default();
    for word in words {
        assert!(
            message.contains(word),
            "run {run} ended {state} with `{message}`, which does not name `{word}`\n{}",
            w.diagnostics(run).await
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn real_pod_failures_end_their_runs_with_kubernetes_reasons() {
    let w = World::new("fail").await;
    w.agent("etl", json!({})).await;
    // A memory limit the flow exceeds: the kernel kills the flow's process. Prefect 3.9's
    // `flow-run execute` runs the flow in a child process, sees it SIGKILLed and reports
    // the run CRASHED itself; the container lives on.
    let hog = w
        .deployment("node_flows.py:hog", json!({"memory_limit": "300Mi"}))
        .await;
    // A container whose own process exceeds its limit: Kubernetes says OOMKilled.
    let oom_container = w
        .deployment(
            "hello.py:hello",
            json!({"memory_limit": "64Mi",
                   "command": "python3 -c 'b = bytearray(1 << 30); print(len(b))'"}),
        )
        .await;
    // An image that is nowhere (no registry answers here).
    let missing = w
        .deployment(
            "hello.py:hello",
            json!({"image": "docker.io/local/no-such-image:1"}),
        )
        .await;
    // A process that exits non-zero before its run is RUNNING: Kubernetes fails the Job.
    let exits = w
        .deployment("hello.py:hello", json!({"command": "sh -c 'exit 3'"}))
        .await;
    // A flow that raises: Prefect's engine in the pod ends it FAILED itself.
    let raises = w.deployment("node_flows.py:fails", json!({})).await;

    let (oom, oom_killed, pull, exit, failed) = (
        w.api.create_run(&hog).await,
        w.api.create_run(&oom_container).await,
        w.api.create_run(&missing).await,
        w.api.create_run(&exits).await,
        w.api.create_run(&raises).await,
    );
    ends_with(&w, &oom, "CRASHED", &["SIGKILL", "memory"]).await;
    ends_with(&w, &oom_killed, "CRASHED", &["OOMKilled"]).await;
    let pull_done = w.wait_state(&pull, "CRASHED").await;
    let message = pull_done["state"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("ErrImagePull") || message.contains("ImagePullBackOff"),
        "the pull failure is named: {message}"
    );
    assert!(message.contains("no-such-image"), "{message}");
    // Given up after the grace, and its Job deleted.
    wait_for("the stuck Job deleted", Duration::from_secs(60), || async {
        w.job(&pull).await.is_none().then_some(())
    })
    .await;
    ends_with(
        &w,
        &exit,
        "CRASHED",
        &["BackoffLimitExceeded", "exit code 3"],
    )
    .await;
    ends_with(&w, &failed, "FAILED", &[]).await;
    w.logged(&failed, "this flow fails on purpose").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unschedulable_pod_crashes_its_run_after_the_grace() {
    let w = World::new("unsched").await;
    w.agent(
        "etl",
        json!({"job": {"nodeSelector": {"prefect.io/no-such-label": "anywhere"}}}),
    )
    .await;
    let dep = w.deployment("hello.py:hello", json!({})).await;
    let run = w.api.create_run(&dep).await;
    // Kubernetes 1.20 words a nodeSelector miss as "didn't match Pod's node affinity".
    ends_with(
        &w,
        &run,
        "CRASHED",
        &["Unschedulable", "0/1 nodes are available", "didn't match"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_running_flow_terminates_its_pod() {
    let w = World::new("cancel").await;
    w.agent("etl", json!({})).await;
    let dep = w.deployment("node_flows.py:sleepy", json!({})).await;
    let run = w.api.create_run(&dep).await;
    // RUNNING is set by Prefect's engine inside the pod.
    w.wait_state(&run, "RUNNING").await;
    w.api.set_state(&run, "CANCELLING", false).await;
    w.wait_state(&run, "CANCELLED").await;
    // Prefect's runner in the pod stops the flow and its container ends (or, where it
    // cannot, the operator deletes the Job): no container of the run is left running.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let running = w.pods_of(&run).await.iter().any(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|phase| phase == "Running" || phase == "Pending")
        });
        if !running {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run's pod still runs 90 s after the cancellation\n{}",
            w.diagnostics(&run).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // And it stays cancelled: the runner's SIGTERM reschedule (AwaitingRetry) once landed
    // after a CANCELLED written after the Job's deletion, and the run started again.
    let kinds: Vec<String> = w
        .api
        .states(&run)
        .await
        .iter()
        .map(|s| s["type"].as_str().unwrap_or_default().to_string())
        .collect();
    let cancelling = kinds.iter().position(|k| k == "CANCELLING");
    // The runner, seeing the cancellation itself, may say CANCELLED once more.
    assert!(
        cancelling.is_some_and(|at| kinds[at + 1..].iter().all(|k| k == "CANCELLED")),
        "nothing but CANCELLED after CANCELLING: {kinds:?}\n{}",
        w.diagnostics(&run).await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_killed_while_pods_run_duplicates_nothing() {
    let mut w = World::new("kill").await;
    w.agent("etl", json!({})).await;
    let dep = w.deployment("node_flows.py:sleepy", json!({})).await;
    // Runs of 15 s.
    let fifteen_seconds = || async {
        let run = w
            .api
            .call(
                reqwest::Method::POST,
                &format!("/deployments/{dep}/create_flow_run"),
                Some(json!({"parameters": {"seconds": 15}})),
            )
            .await;
        run["id"].as_str().unwrap().to_string()
    };
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(fifteen_seconds().await);
    }
    for run in &runs {
        w.wait_state(run, "RUNNING").await;
    }
    w.operator.signal(nix::sys::signal::Signal::SIGKILL);
    w.operator.wait_exit(Duration::from_secs(10)).await;
    // Runs created while no operator runs wait for the next one.
    for _ in 0..2 {
        runs.push(fifteen_seconds().await);
    }
    w.operator = w.node.operator(&w.ns);
    for run in &runs {
        w.wait_state(run, "COMPLETED").await;
    }
    for run in &runs {
        assert_eq!(w.pods_of(run).await.len(), 1, "one pod for run {run}");
        assert_eq!(
            w.api.times_in_state(run, "RUNNING").await,
            1,
            "run {run} ran once"
        );
    }
    let jobs: KubeApi<Job> = KubeApi::namespaced(w.client.clone(), &w.ns);
    let all = jobs.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(all.len(), runs.len(), "one Job per run, no other");
}

/// The pod facts the `whoami` flow logged.
async fn pod_facts(w: &World, run: &str) -> String {
    w.logged(run, "pod facts:").await
}

#[tokio::test(flavor = "multi_thread")]
async fn security_profiles_in_the_official_image_layout() {
    let w = World::new("secctx").await;
    // Three agents of one pool would share its runs: a pool each.
    let restricted_pool = unique("restricted");
    let uid1000_pool = unique("uid1000");
    for pool in [&restricted_pool, &uid1000_pool] {
        w.api.create_kubernetes_pool(pool).await;
    }
    w.agent("default", json!({})).await;
    w.agent(
        "restricted",
        json!({"api": {"workPool": restricted_pool}, "job": {"securityProfile": "restricted"}}),
    )
    .await;
    // What this operator did before: uid 1000 and nothing else.
    w.agent(
        "uid1000",
        json!({"api": {"workPool": uid1000_pool}, "job": {"podTemplate": {"spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000}}}}}),
    )
    .await;
    let deployment = |pool: String| {
        let api = &w.api;
        let repo = w.repo;
        async move {
            api.create_git_deployment(
                &pool,
                repo,
                "node_flows.py:whoami",
                json!({"image": image("flow")}),
            )
            .await
        }
    };
    let default = w.api.create_run(&deployment(w.pool.clone()).await).await;
    let restricted = w.api.create_run(&deployment(restricted_pool).await).await;
    let uid1000 = w.api.create_run(&deployment(uid1000_pool).await).await;

    // Default: the image's user (root); HOME is the image's and writable.
    w.wait_state(&default, "COMPLETED").await;
    let facts = pod_facts(&w, &default).await;
    assert!(facts.contains("'uid': 0, 'home': '/root'"), "{facts}");
    assert!(
        facts.contains("'cwd_writable': True, 'home_writable': True"),
        "{facts}"
    );

    // Restricted: uid 1000, HOME on the emptyDir.
    w.wait_state(&restricted, "COMPLETED").await;
    let facts = pod_facts(&w, &restricted).await;
    assert!(
        facts.contains("'uid': 1000, 'home': '/opt/prefect/work'"),
        "{facts}"
    );
    assert!(
        facts.contains("'cwd_writable': True, 'home_writable': True"),
        "{facts}"
    );

    // In both, the persisted task result was written.
    for run in [&default, &restricted] {
        let pod_log = w
            .node
            .job_logs(
                &w.ns,
                &prefect_agent_operator::deploy::kubernetes::job::job_name(run),
            )
            .await;
        assert!(
            !pod_log.contains("An error was encountered while committing transaction"),
            "{pod_log}"
        );
    }

    // uid 1000 alone (what this operator did before): Prefect 3.9 clones into a temporary
    // directory, so the pull step works, but HOME is `/`: Prefect cannot create its home,
    // and the persisted task result is lost (the run still COMPLETES: Prefect logs the
    // error and goes on, so caching silently stops working).
    w.wait_final(&uid1000).await;
    let facts = pod_facts(&w, &uid1000).await;
    assert!(facts.contains("'uid': 1000, 'home': '/'"), "{facts}");
    let pod_log = w
        .node
        .job_logs(
            &w.ns,
            &prefect_agent_operator::deploy::kubernetes::job::job_name(&uid1000),
        )
        .await;
    for seen in [
        "Failed to create the Prefect home directory at /.prefect",
        "An error was encountered while committing transaction",
        "/.prefect/storage",
    ] {
        assert!(
            pod_log.contains(seen),
            "`{seen}` in the pod's log:\n{pod_log}"
        );
    }
}

/// Prefect 1.4.1's own `prefect execute flow-run`, in the 1.4.1 image built here, against
/// the fake Prefect 1 server: the run goes Submitted → Running → Success in a real pod.
/// The flow comes from Prefect 1's `Webhook` storage (a script served from the host).
#[tokio::test(flavor = "multi_thread")]
async fn a_prefect1_flow_runs_in_a_real_pod() {
    let node = tokio::task::spawn_blocking(Node::shared)
        .await
        .expect("the node");
    node.load(&["prefect1"]).await;
    let server = common::prefect1::FakePrefect1::start_on(&node.host_ip, &[]).await;
    // The flow's script over HTTP.
    let dir = common::node::scratch("pao-p1-flow-");
    std::fs::write(
        dir.join("hello1.py"),
        "from prefect import Flow\n\nflow = Flow(\"hello1\")\n",
    )
    .unwrap();
    let port = free_port();
    let mut http = std::process::Command::new(prefect_venv().join("bin/python"));
    http.args([
        "-m",
        "http.server",
        "--bind",
        &node.host_ip,
        &port.to_string(),
        "--directory",
    ])
    .arg(&dir)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    spawn_tied_to_test_process(http);
    let host = node.host_ip.clone();
    wait_for("the flow's HTTP server", Duration::from_secs(30), || {
        let host = host.clone();
        async move {
            tokio::task::spawn_blocking(move || common::http_get_ok_at(&host, port, "/hello1.py"))
                .await
                .ok()?
                .then_some(())
        }
    })
    .await;

    let client = node.kube.client().await;
    common::cluster::install_crd(&client).await;
    let ns = common::cluster::namespace(&client, "p1pod").await;
    let operator = node.operator(&ns);
    let agents: KubeApi<PrefectAgent> = KubeApi::namespaced(client.clone(), &ns);
    let resource: PrefectAgent = serde_json::from_value(json!({
        "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
        "metadata": {"name": "legacy"},
        "spec": {"api": {"flavor": "prefect1", "url": server.url},
                 "labels": ["k8s"], "pollInterval": "1s"}
    }))
    .unwrap();
    agents
        .create(&PostParams::default(), &resource)
        .await
        .unwrap();
    node.kube.wait_ready(&ns, "legacy", &operator).await;

    let storage = json!({"type": "Webhook", "__version__": "1.4.1",
        "flows": {"hello1": "hello1.py"}, "secrets": [],
        "build_request_kwargs": {}, "build_request_http_method": "POST",
        "get_flow_request_kwargs": {"url": format!("http://{}:{port}/hello1.py", node.host_ip)},
        "get_flow_request_http_method": "GET", "stored_as_script": true});
    let flow = server
        .create_flow(json!({"name": "hello1", "core_version": "1.4.1", "storage": storage}))
        .await;
    let run = server
        .create_run(json!({"flow_id": flow, "labels": ["k8s"], "run_config": {
            "type": "KubernetesRun", "__version__": "1.4.1", "image": image("prefect1"),
            // The fake server has no heartbeat mutation.
            "env": {"PREFECT__CLOUD__HEARTBEAT_MODE": "off"}}}))
        .await;
    let deadline = std::time::Instant::now() + RUN_TIMEOUT;
    loop {
        let current = server.run(&run).await;
        if current["state"] == "Success" {
            break;
        }
        if std::time::Instant::now() > deadline {
            let job = prefect_agent_operator::deploy::kubernetes::job::job_name(&run);
            panic!(
                "run {run}: {current}\npod logs:\n{}\noperator:\n{}",
                node.job_logs(&ns, &job).await,
                operator.output()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let history: Vec<String> = server.run(&run).await["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["type"].as_str().unwrap_or_default().to_string())
        .collect();
    for state in ["Submitted", "Running", "Success"] {
        assert!(history.iter().any(|h| h == state), "{state} in {history:?}");
    }
}
