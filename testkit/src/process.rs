//! The operator binary as a child process (`agent`, `operator`, `dev-runner`), and the
//! fake flow runner the process deployer starts in its place.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, prefect_venv, repo};

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
