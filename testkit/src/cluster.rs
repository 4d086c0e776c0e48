//! A real kube-apiserver + etcd for tests (scripts/kube-apiserver.sh), one per test binary.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

use super::{repo, spawn_tied_to_test_process};

/// The API server this test binary uses.
pub struct KubeApiServer {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
}

impl KubeApiServer {
    /// Starts it once (building it first if the cache is empty) and shares it.
    pub fn shared() -> &'static KubeApiServer {
        static SERVER: OnceLock<KubeApiServer> = OnceLock::new();
        SERVER.get_or_init(Self::start)
    }

    /// A server of its own, for a test that takes it down (see `stop_apiserver`); it
    /// lives as long as the test process.
    pub fn dedicated() -> KubeApiServer {
        Self::start()
    }

    /// Fault injection: the API server process goes away; etcd keeps the state.
    pub async fn stop_apiserver(&self) {
        self.script("stop-apiserver").await;
    }

    /// Brings the API server back on the same address; returns once it is ready.
    pub async fn start_apiserver(&self) {
        self.script("start-apiserver").await;
    }

    async fn script(&self, command: &str) {
        let out = tokio::process::Command::new("bash")
            .arg(repo().join("scripts/kube-apiserver.sh"))
            .arg(command)
            .arg(&self.dir)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run scripts/kube-apiserver.sh");
        assert!(
            out.status.success(),
            "kube-apiserver.sh {command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start() -> KubeApiServer {
        let dir = run_in_background("kube-apiserver.sh", "pao-kube-", &[], 120);
        KubeApiServer {
            kubeconfig: dir.join("kubeconfig"),
            dir,
        }
    }

    /// Runs `kubectl` against this server; returns (success, stdout + stderr).
    pub async fn kubectl(&self, args: &[&str]) -> (bool, String) {
        let out = tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run kubectl (scripts/kube-apiserver.sh install provides it)");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// `kubectl wait --for=condition=Ready pfa/<name>`, as a user runs it; panics with
    /// kubectl's answer, the resource and the operator's log when it times out.
    pub async fn wait_ready(&self, namespace: &str, name: &str, operator: &super::AgentProcess) {
        self.wait_ready_with(namespace, name, &operator.output())
            .await;
    }

    /// The same for an operator running elsewhere (e.g. as a pod).
    pub async fn wait_ready_for(&self, namespace: &str, name: &str) {
        self.wait_ready_with(namespace, name, "").await;
    }

    async fn wait_ready_with(&self, namespace: &str, name: &str, operator_log: &str) {
        let resource = format!("pfa/{name}");
        let (ok, out) = self
            .kubectl(&[
                "wait",
                "-n",
                namespace,
                "--for=condition=Ready",
                &resource,
                "--timeout=120s",
            ])
            .await;
        if !(ok && out.contains("condition met")) {
            let (_, status) = self
                .kubectl(&["get", "-n", namespace, &resource, "-o", "yaml"])
                .await;
            panic!("kubectl wait: {out}\n{status}\noperator:\n{operator_log}");
        }
    }

    /// An admin client from the kubeconfig the script wrote.
    pub async fn client(&self) -> Client {
        self.client_for(None).await
    }

    /// A client that acts as `user` (the admin impersonating it): it may do what RBAC
    /// grants that user, and no more.
    pub async fn client_as(&self, user: &str) -> Client {
        self.client_for(Some(user)).await
    }

    async fn client_for(&self, user: Option<&str>) -> Client {
        prefect_agent_operator::install_crypto_provider();
        let kc = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .expect("config");
        config.auth_info.impersonate = user.map(str::to_string);
        Client::try_from(config).expect("client")
    }
}

/// `scripts/<script> install`, then `scripts/<script> run DIR ARGS...` tied to the test
/// process, until it writes DIR/ready (or says `error:`); returns DIR.
pub fn run_in_background(script: &str, prefix: &str, args: &[&str], timeout_secs: u64) -> PathBuf {
    let script = repo().join("scripts").join(script);
    let install = Command::new("bash")
        .arg(&script)
        .arg("install")
        .stderr(Stdio::inherit())
        .output()
        .expect("run the install script");
    assert!(
        install.status.success(),
        "{} install failed",
        script.display()
    );
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
        .keep();
    let log = std::fs::File::create(dir.join("run.log")).expect("log");
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .arg("run")
        .arg(&dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    spawn_tied_to_test_process(cmd);
    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    while !dir.join("ready").exists() {
        let log = std::fs::read_to_string(dir.join("run.log")).unwrap_or_default();
        assert!(
            !log.contains("error:") && Instant::now() < deadline,
            "{} run did not get ready; see {}:\n{log}",
            script.display(),
            dir.join("run.log").display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    dir
}

/// The shared API server with the CRD installed, an admin client and a fresh namespace.
pub async fn cluster_with_namespace(prefix: &str) -> (&'static KubeApiServer, Client, String) {
    let server = tokio::task::spawn_blocking(KubeApiServer::shared)
        .await
        .expect("the API server");
    let (client, ns) = prepare(server, prefix).await;
    (server, client, ns)
}

/// A dedicated API server (one a test may stop), prepared like the shared one.
pub async fn dedicated_cluster(prefix: &str) -> (KubeApiServer, Client, String) {
    let server = tokio::task::spawn_blocking(KubeApiServer::dedicated)
        .await
        .expect("the API server");
    let (client, ns) = prepare(&server, prefix).await;
    (server, client, ns)
}

async fn prepare(server: &KubeApiServer, prefix: &str) -> (Client, String) {
    let client = server.client().await;
    install_crd(&client).await;
    let ns = namespace(&client, prefix).await;
    (client, ns)
}

/// Creates a Secret `name` with one key `key`.
pub async fn create_secret(client: &Client, namespace: &str, name: &str, value: &str) {
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client.clone(), namespace);
    let secret = serde_json::from_value(
        serde_json::json!({"metadata": {"name": name}, "stringData": {"key": value}}),
    )
    .expect("a Secret");
    secrets
        .create(&kube::api::PostParams::default(), &secret)
        .await
        .expect("create the Secret");
}

/// Installs the operator's CRDs (server-side apply) and waits until they are served.
pub async fn install_crd(client: &Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let ssa = PatchParams::apply("prefect-agent-operator-tests").force();
    for (_, crd) in prefect_agent_operator::crd::all() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(&name, &ssa, &Patch::Apply(crd))
            .await
            .expect("apply the CRD");
        wait_established(&crds, &name).await;
    }
}

async fn wait_established(
    crds: &kube::Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    >,
    name: &str,
) {
    super::wait_for(
        "the CRD to be established",
        Duration::from_secs(30),
        || async {
            let crd = crds.get(name).await.ok()?;
            crd.status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
                .then_some(())
        },
    )
    .await;
}

/// A fresh namespace named after `prefix`.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, PostParams};
    let ns = super::unique(prefix);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))
                .expect("namespace"),
        )
        .await
        .expect("create namespace");
    ns
}
