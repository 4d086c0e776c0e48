//! The operator binary as a child process (`agent`, `operator`, `dev-runner`), and the
//! fake flow runner the process deployer starts in its place.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, prefect_venv, repo, wait_for};

/// The agent binary running as a child process; killed when dropped.
pub struct AgentProcess {
    pub child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The operator binary Cargo built for this package's integration tests: beside the
/// test executable's `deps/` folder (`target/<profile>/prefect-agent-operator`).
pub fn operator_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("tests run from target/<profile>/deps");
    let binary = profile.join("prefect-agent-operator");
    assert!(
        binary.exists(),
        "{} not built: run the tests with cargo test",
        binary.display()
    );
    binary
}

/// The binary with a clean environment (no PREFECT_* or PAO_* from the caller).
fn clean_command() -> Command {
    let mut cmd = Command::new(operator_binary());
    for (k, _) in std::env::vars() {
        if k.starts_with("PREFECT") || k.starts_with("PAO_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Flags that make an agent's loops fast, so that tests wait on conditions, not clocks.
pub const FAST_LOOPS: [&str; 6] = [
    "--poll-interval",
    "1s",
    "--maintenance-interval",
    "1s",
    "--adopt-after",
    "1s",
];

/// The flags of a work-pool agent on `url`'s `pool`, named `name`, with fast loops.
pub fn pool_agent_args<'a>(url: &'a str, pool: &'a str, name: &'a str) -> Vec<&'a str> {
    let mut args = vec!["--api-url", url, "--pool", pool, "--name", name];
    args.extend(FAST_LOOPS);
    args
}

/// `agent` with these flags.
pub fn agent_command(args: &[&str]) -> Command {
    let mut cmd = clean_command();
    cmd.arg("agent").args(args);
    cmd
}

/// A subcommand against the API server behind `kubeconfig`.
pub fn clean_cluster_command(kubeconfig: &Path, subcommand: &str) -> Command {
    cluster_command(kubeconfig, subcommand)
}

fn cluster_command(kubeconfig: &Path, subcommand: &str) -> Command {
    let mut cmd = clean_command();
    cmd.arg(subcommand)
        .env("KUBECONFIG", kubeconfig)
        // Stuck pods are given up after 1 s, not a minute.
        .env("PAO_POD_GRACE", "1s");
    cmd
}

/// The operator against the API server behind `kubeconfig`, its probes on a free port.
pub fn operator_command(kubeconfig: &Path) -> Command {
    let mut cmd = cluster_command(kubeconfig, "operator");
    cmd.env("PAO_HEALTH_ADDRESS", format!("127.0.0.1:{}", free_port()));
    cmd
}

/// The dev job runner against the API server behind `kubeconfig`, for one namespace.
pub fn dev_runner(kubeconfig: &Path, namespace: &str) -> AgentProcess {
    let mut cmd = cluster_command(kubeconfig, "dev-runner");
    cmd.args(["--namespace", namespace]);
    AgentProcess::start_with(cmd)
}

impl AgentProcess {
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(agent_command(args))
    }

    pub fn start_with(mut cmd: Command) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("agent.log");
        let file = std::fs::File::create(&log).expect("log file");
        cmd.stdout(file.try_clone().expect("log")).stderr(file);
        let child = cmd.spawn().expect("start the agent binary");
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Waits for the agent to exit and returns its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit within {timeout:?}; output:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command line of the fake flow runner, recording into `record`.
pub fn fake_runner(record: &Path, mode: &str) -> String {
    format!(
        "{} {} {} {mode}",
        prefect_venv().join("bin/python").display(),
        repo().join("tests/fixtures/fake_flow_run.py").display(),
        record.display()
    )
}

/// Lines of a record file written by the fake runner.
pub fn recorded(record: &Path) -> Vec<String> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// An agent polling every 60 s, with its agent API for the poll count, once it has backed
/// off into that long sleep: (agent, its address, polls so far).
pub async fn an_agent_asleep(url: &str, pool: &str, extra: &[&str]) -> (AgentProcess, String, u64) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--api-url",
        url,
        "--pool",
        pool,
        "--name",
        "sleeper",
        "--poll-interval",
        "60s",
        "--agent-address",
        &addr,
        // The run is only claimed; nothing needs to execute it.
        "--command",
        "true",
    ];
    args.extend_from_slice(extra);
    let agent = AgentProcess::start(&args);
    // The seed's backoff: 0.25 → 0.5 → 1 → 2 → 4 → 8 s after the 5th empty poll, then
    // the 60 s poll interval after the 6th.
    let polls = wait_for("the agent to back off", Duration::from_secs(40), || async {
        polls(&addr).await.filter(|p| *p >= 6)
    })
    .await;
    (agent, addr, polls)
}

/// An agent's `/api/health` answer (at its `--agent-address`), once it answers.
pub async fn health(addr: &str) -> Option<serde_json::Value> {
    let r = reqwest::get(format!("http://{addr}/api/health"))
        .await
        .ok()?;
    assert_eq!(r.status(), 200);
    r.json().await.ok()
}

pub async fn polls(addr: &str) -> Option<u64> {
    health(addr).await?["polls"].as_u64()
}
