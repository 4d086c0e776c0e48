//! A real one-node cluster for tests (scripts/cluster.sh: kubelet, scheduler, containerd,
//! images built here), one per test binary; and what pods need from the host: a Prefect
//! server and the flows' code in a git repository, both on the address pods reach.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use super::cluster::KubeApiServer;
use super::{Api, PrefectServer, free_port, repo, spawn_tied_to_test_process};

/// The cluster this test binary uses.
pub struct Node {
    /// Its API server (it serves on the bridge address, not loopback).
    pub kube: KubeApiServer,
    /// The host as pods see it: servers that pods use listen here.
    pub host_ip: String,
}

impl Node {
    /// Starts it once with the Prefect 3 flow image loaded (building what the cache lacks).
    pub fn shared() -> &'static Node {
        static NODE: OnceLock<Node> = OnceLock::new();
        NODE.get_or_init(|| Self::start(&["flow"]))
    }

    fn start(images: &[&str]) -> Node {
        let dir = super::cluster::run_in_background("cluster.sh", "pao-node-", images, 600);
        let env = std::fs::read_to_string(dir.join("env")).expect("the node's env file");
        let host_ip = env
            .lines()
            .find_map(|l| l.strip_prefix("PAO_NODE_HOST_IP="))
            .expect("PAO_NODE_HOST_IP in the env file")
            .to_string();
        Node {
            kube: KubeApiServer {
                kubeconfig: dir.join("kubeconfig"),
                dir,
            },
            host_ip,
        }
    }

    /// Imports more images (scripts/images.sh names) into the node.
    pub async fn load(&self, images: &[&str]) {
        self.load_with(images, &[]).await;
    }

    async fn load_with(&self, images: &[&str], env: &[(&str, &str)]) {
        let out = tokio::process::Command::new("bash")
            .arg(repo().join("scripts/cluster.sh"))
            .arg("load")
            .arg(&self.kube.dir)
            .args(images)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run scripts/cluster.sh load");
        assert!(
            out.status.success(),
            "cluster.sh load {images:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Imports the operator image built from `binary` (scripts/images.sh `operator`), also
    /// under `published` (a fully qualified reference, e.g. the chart's default image).
    pub async fn load_operator(&self, binary: &str, published: &str) {
        self.load_with(&["operator"], &[("PAO_OPERATOR_BINARY", binary)])
            .await;
        let sock = self.kube.dir.join("containerd/containerd.sock");
        let out = tokio::process::Command::new("ctr")
            .arg("-a")
            .arg(&sock)
            .args(["-n", "k8s.io", "images", "tag", "--force"])
            .arg(image("operator"))
            .arg(published)
            .output()
            .await
            .expect("run ctr images tag");
        assert!(
            out.status.success(),
            "ctr images tag: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The operator on the host, for one namespace, with a pod grace that real pods need
    /// (they take real seconds to be scheduled and to start).
    pub fn operator(&self, namespace: &str) -> super::AgentProcess {
        let mut cmd = super::operator_command(&self.kube.kubeconfig);
        cmd.args(["--namespace", namespace])
            .env("PAO_POD_GRACE", "15s");
        super::AgentProcess::start_with(cmd)
    }

    /// The logs of a Job's pod (`kubectl logs job/NAME`).
    pub async fn job_logs(&self, namespace: &str, job: &str) -> String {
        self.kube
            .kubectl(&["logs", "-n", namespace, &format!("job/{job}")])
            .await
            .1
    }
}

/// The reference pods use for an image of scripts/images.sh.
pub fn image(name: &str) -> String {
    let out = Command::new("bash")
        .arg(repo().join("scripts/images.sh"))
        .args(["ref", name])
        .output()
        .expect("run scripts/images.sh ref");
    assert!(out.status.success(), "images.sh ref {name}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A Prefect server that pods reach, requiring HTTP basic auth with `auth_string`, so
/// that a flow in a pod proves it got the credential.
pub fn prefect_for_pods(node: &Node, auth_string: &'static str) -> &'static PrefectServer {
    static SERVER: OnceLock<PrefectServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        PrefectServer::start_on(
            &node.host_ip,
            &[("PREFECT_SERVER_API_AUTH_STRING", auth_string)],
        )
    })
}

/// The test flows (`tests/fixtures/flows/` and `examples/flows/hello.py`) in a git
/// repository served by `git daemon` on the node's host address: deployments pull them
/// with Prefect's `git_clone` step, as real deployments pull their code.
pub struct FlowRepo {
    pub url: String,
}

impl FlowRepo {
    pub fn shared(node: &Node) -> &'static FlowRepo {
        static REPO: OnceLock<FlowRepo> = OnceLock::new();
        REPO.get_or_init(|| Self::serve(&node.host_ip))
    }

    fn serve(host: &str) -> FlowRepo {
        let base = tempfile::Builder::new()
            .prefix("pao-flows-")
            .tempdir()
            .expect("tempdir")
            .keep();
        let work = base.join("work");
        std::fs::create_dir_all(&work).expect("work tree");
        for src in [
            repo().join("examples/flows/hello.py"),
            repo().join("tests/fixtures/flows/node_flows.py"),
        ] {
            let name = src.file_name().expect("file name");
            std::fs::copy(&src, work.join(name)).expect("copy a flow");
        }
        let git = |dir: &Path, args: &[&str]| {
            let out = Command::new("git")
                .args(["-c", "user.name=tests", "-c", "user.email=tests@localhost"])
                .args(args)
                .current_dir(dir)
                .output()
                .expect("run git");
            assert!(
                out.status.success(),
                "git {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", "flows"]);
        git(&base, &["clone", "-q", "--bare", "work", "flows.git"]);
        let port = free_port();
        let mut cmd = Command::new("git");
        cmd.args([
            "daemon",
            "--reuseaddr",
            "--export-all",
            &format!("--listen={host}"),
            &format!("--port={port}"),
            &format!("--base-path={}", base.display()),
        ])
        .arg(&base)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        spawn_tied_to_test_process(cmd);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect((host, port)).is_err() {
            assert!(Instant::now() < deadline, "git daemon did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        FlowRepo {
            url: format!("git://{host}:{port}/flows.git"),
        }
    }
}

/// Test-side Prefect calls for pods: a `kubernetes` pool and git-pulled deployments.
impl Api {
    /// A pool of type `kubernetes` with Prefect's standard base job template.
    pub async fn create_kubernetes_pool(&self, name: &str) {
        let template: Value =
            serde_json::from_str(prefect_agent_operator::work_pool::DEFAULT_BASE_JOB_TEMPLATE)
                .expect("the standard template");
        self.call(
            Method::POST,
            "/work_pools/",
            Some(json!({"name": name, "type": "kubernetes", "base_job_template": template})),
        )
        .await;
    }

    /// A deployment of `entrypoint` (e.g. `node_flows.py:sleepy`) pulled from `repo` by
    /// Prefect's `git_clone` step into the pod's working directory.
    pub async fn create_git_deployment(
        &self,
        pool: &str,
        repo: &FlowRepo,
        entrypoint: &str,
        job_variables: Value,
    ) -> String {
        let flow_name = entrypoint.rsplit(':').next().expect("entrypoint");
        let flow = self
            .call(Method::POST, "/flows/", Some(json!({"name": flow_name})))
            .await;
        let dep = self
            .call(
                Method::POST,
                "/deployments/",
                Some(json!({
                    // Unique: Prefect upserts a deployment by flow and name.
                    "name": super::unique(flow_name),
                    "flow_id": flow["id"],
                    "work_pool_name": pool,
                    "entrypoint": entrypoint,
                    "pull_steps": [{"prefect.deployments.steps.git_clone": {"repository": repo.url}}],
                    "job_variables": job_variables,
                })),
            )
            .await;
        dep["id"].as_str().expect("deployment id").to_string()
    }
}

/// Where a test's scratch files go (kept for a look after a failure).
pub fn scratch(prefix: &str) -> PathBuf {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("tempdir")
        .keep()
}
