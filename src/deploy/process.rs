//! The `process` deployer: a claimed run becomes a local subprocess (`prefect flow-run execute`).

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::process::Command;
use tokio::sync::oneshot;

use super::{DeployError, Deployer, Exit, Launch, Launched, Stopped};
use crate::backend::prefect1::run_config::run_config_type;
use crate::backend::{EnvValue, FlowRun, RunSpec};

/// The command the official workers run for a flow run.
pub const DEFAULT_COMMAND: &str = "prefect flow-run execute";

/// Settings of the process deployer.
#[derive(Clone, Debug)]
pub struct ProcessConfig {
    /// Command line, used when the run's job variables have no `command`.
    pub command: String,
    /// Working directory, used when the job variables have no `working_dir`.
    pub working_dir: Option<PathBuf>,
    /// How long a stopped process gets between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            command: DEFAULT_COMMAND.into(),
            working_dir: None,
            stop_grace: Duration::from_secs(10),
        }
    }
}

/// Runs flow runs as child processes, each in its own process group.
#[derive(Clone, Debug)]
pub struct ProcessDeployer {
    cfg: ProcessConfig,
    host: String,
    /// run id → process group of the runs this deployer started and that still run.
    running: Arc<Mutex<HashMap<String, i32>>>,
}

/// This machine's host name (where processes run; the standalone agent's default identity).
pub fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

impl ProcessDeployer {
    pub fn new(cfg: ProcessConfig) -> Self {
        Self {
            cfg,
            host: host_name(),
            running: Arc::default(),
        }
    }

    fn tracked(&self, run_id: &str) -> Option<i32> {
        self.running.lock().ok()?.get(run_id).copied()
    }
}

/// The argv for a run: the job variable `command` if set, else the configured one.
pub fn command_line(
    job_command: Option<&Value>,
    default: &str,
) -> Result<Vec<String>, DeployError> {
    let line = match job_command {
        None | Some(Value::Null) => default,
        Some(Value::String(s)) if s.trim().is_empty() => default,
        Some(Value::String(s)) => s.as_str(),
        Some(other) => {
            return Err(DeployError::InvalidJobVariable {
                name: "command",
                reason: format!("expected a string, got {other}"),
            });
        }
    };
    match shlex::split(line) {
        Some(argv) if !argv.is_empty() => Ok(argv),
        _ => Err(DeployError::InvalidJobVariable {
            name: "command",
            reason: format!("`{line}` is not a command line (unbalanced quotes?)"),
        }),
    }
}

/// Describes how a process ended, for a CRASHED state message.
pub fn describe_exit(status: std::process::ExitStatus) -> Exit {
    let description = match (status.code(), status.signal()) {
        (Some(code), _) => format!("the flow run process exited with code {code}"),
        (None, Some(sig)) => {
            let name = Signal::try_from(sig)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| sig.to_string());
            format!("the flow run process was killed by signal {name}")
        }
        (None, None) => "the flow run process ended for an unknown reason".into(),
    };
    Exit {
        success: status.success(),
        description,
    }
}

/// Processes of this user whose environment names the run: they outlive a restarted agent.
fn processes_of_run(run_id: &str) -> Vec<i32> {
    let needle = format!("PREFECT__FLOW_RUN_ID={run_id}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()))
        })
        .collect()
}

impl ProcessDeployer {
    /// The command line and working directory a run asks for: its job variables' (a work
    /// pool's run) or its run_config's (Prefect 1's `LocalRun`), else this deployer's.
    fn what_to_run(&self, spec: &RunSpec) -> Result<(Vec<String>, Option<PathBuf>), DeployError> {
        let (command, dir, dir_name) = match spec {
            RunSpec::WorkPool { configuration, .. } => (
                configuration.variables.get("command"),
                configuration.variables.get("working_dir"),
                "working_dir",
            ),
            RunSpec::Prefect1 { run_config, .. } => {
                match run_config_type(run_config) {
                    None | Some("LocalRun") | Some("UniversalRun") => {}
                    Some(other) => {
                        return Err(DeployError::Unsupported(format!(
                            "run_config type `{other}` cannot run as a local process; this agent runs LocalRun (and UniversalRun) flow runs"
                        )));
                    }
                }
                (
                    None,
                    run_config.get("working_dir"),
                    "run_config.working_dir",
                )
            }
        };
        let argv = command_line(command, &self.cfg.command)?;
        let working_dir = match dir {
            Some(Value::String(s)) if !s.is_empty() => Some(PathBuf::from(s)),
            None | Some(Value::Null) | Some(Value::String(_)) => self.cfg.working_dir.clone(),
            Some(other) => {
                return Err(DeployError::InvalidJobVariable {
                    name: dir_name,
                    reason: format!("expected a path, got {other}"),
                });
            }
        };
        Ok((argv, working_dir))
    }
}

impl Deployer for ProcessDeployer {
    fn pool_type(&self) -> &'static str {
        "process"
    }

    async fn deploy(&self, launch: Launch) -> Result<Launched, DeployError> {
        let (argv, working_dir) = self.what_to_run(&launch.spec)?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        for (k, v) in launch.env.iter() {
            match v {
                EnvValue::Plain(s) => cmd.env(k, s),
                EnvValue::Secret(s) => cmd.env(k, s.expose()),
                EnvValue::From(_) => {
                    return Err(DeployError::Unsupported(format!(
                        "env `{k}` takes its value from Kubernetes (valueFrom), which a local process cannot"
                    )));
                }
            };
        }
        if let Some(dir) = &working_dir {
            cmd.current_dir(dir);
        }
        // Its own group: a Ctrl-C meant for the agent does not kill the flow, and
        // stopping the run reaches everything the flow started.
        cmd.process_group(0)
            .kill_on_drop(false)
            .stdin(std::process::Stdio::null());
        let mut child = cmd.spawn().map_err(|e| DeployError::Spawn {
            program: argv[0].clone(),
            cause: match &working_dir {
                Some(dir) if !dir.is_dir() => {
                    format!("working directory {} does not exist", dir.display())
                }
                _ => e.to_string(),
            },
        })?;
        let pid = child.id().map(|p| p as i32).unwrap_or_default();
        if let Ok(mut running) = self.running.lock() {
            running.insert(launch.run.id.clone(), pid);
        }
        let (tx, rx) = oneshot::channel();
        let running = self.running.clone();
        let run_id = launch.run.id.clone();
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => describe_exit(status),
                Err(e) => Exit {
                    success: false,
                    description: format!("waiting for the flow run process failed: {e}"),
                },
            };
            if let Ok(mut running) = running.lock() {
                running.remove(&run_id);
            }
            let _ = tx.send(exit);
        });
        Ok(Launched {
            infra_id: format!("{}:{pid}", self.host),
            description: format!(
                "process {pid} on {} running `{}`",
                self.host,
                argv.join(" ")
            ),
            exit: Some(rx),
        })
    }

    async fn find(&self, run: &FlowRun) -> Result<Option<String>, DeployError> {
        if let Some(pid) = self.tracked(&run.id) {
            return Ok(Some(format!("{}:{pid}", self.host)));
        }
        let run_id = run.id.clone();
        let pids = tokio::task::spawn_blocking(move || processes_of_run(&run_id))
            .await
            .map_err(|e| {
                DeployError::Unavailable(format!("could not look for the run's process: {e}"))
            })?;
        Ok(pids.first().map(|pid| format!("{}:{pid}", self.host)))
    }

    fn owns(&self, run: &FlowRun) -> bool {
        self.tracked(&run.id).is_some()
            || run
                .infrastructure_pid
                .as_deref()
                .and_then(|p| p.rsplit_once(':'))
                .is_none_or(|(host, _)| host == self.host)
    }

    async fn stop(&self, run: &FlowRun) -> Result<Stopped, DeployError> {
        let group = match self.tracked(&run.id) {
            Some(pgid) => Some(pgid),
            None => {
                if !self.owns(run) {
                    return Ok(Stopped::NotMine);
                }
                let run_id = run.id.clone();
                let pids = tokio::task::spawn_blocking(move || processes_of_run(&run_id))
                    .await
                    .unwrap_or_default();
                pids.first().map(|pid| {
                    nix::unistd::getpgid(Some(Pid::from_raw(*pid))).map_or(*pid, |g| g.as_raw())
                })
            }
        };
        let Some(pgid) = group else {
            return Ok(Stopped::NotFound);
        };
        let pg = Pid::from_raw(pgid);
        if killpg(pg, Signal::SIGTERM).is_err() {
            return Ok(Stopped::NotFound);
        }
        let deadline = tokio::time::Instant::now() + self.cfg.stop_grace;
        // Signal 0 probes whether any member of the group is still alive.
        while killpg(pg, None).is_ok() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if killpg(pg, None).is_ok() {
            killpg(pg, Signal::SIGKILL).map_err(|e| DeployError::Stop(e.to_string()))?;
        }
        Ok(Stopped::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn prefect1(run_config: Value) -> RunSpec {
        RunSpec::Prefect1 {
            run_config,
            flow: Default::default(),
            labels: Vec::new(),
        }
    }

    #[test]
    fn what_runs_follows_the_job_variables_or_the_run_config() {
        let d = ProcessDeployer::new(ProcessConfig {
            working_dir: Some("/srv".into()),
            ..ProcessConfig::default()
        });
        let values = json!({"command": "python x.py", "working_dir": "/w"});
        let pool = RunSpec::WorkPool {
            configuration: crate::work_pool::JobConfiguration::new(
                None,
                values.as_object().unwrap(),
            )
            .unwrap(),
            base_job_template: None,
            references: Default::default(),
            about: Default::default(),
        };
        let (argv, dir) = d.what_to_run(&pool).unwrap();
        assert_eq!(
            (argv, dir),
            (vec!["python".into(), "x.py".into()], Some("/w".into()))
        );
        // Prefect 1: a LocalRun's working_dir, else the deployer's; its own command.
        let (argv, dir) = d
            .what_to_run(&prefect1(
                json!({"type": "LocalRun", "working_dir": "/flows"}),
            ))
            .unwrap();
        assert_eq!(argv, ["prefect", "flow-run", "execute"]);
        assert_eq!(dir, Some("/flows".into()));
        let (_, dir) = d.what_to_run(&prefect1(json!(null))).unwrap();
        assert_eq!(dir, Some("/srv".into()));
        assert!(
            d.what_to_run(&prefect1(json!({"type": "UniversalRun"})))
                .is_ok()
        );
        let err = d
            .what_to_run(&prefect1(json!({"type": "KubernetesRun"})))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`KubernetesRun` cannot run as a local process"),
            "{err}"
        );
        let err = d
            .what_to_run(&prefect1(json!({"type": "LocalRun", "working_dir": 3})))
            .unwrap_err()
            .to_string();
        assert!(err.contains("run_config.working_dir"), "{err}");
    }

    #[test]
    fn command_line_prefers_the_job_variable() {
        assert_eq!(
            command_line(None, DEFAULT_COMMAND).unwrap(),
            ["prefect", "flow-run", "execute"]
        );
        assert_eq!(
            command_line(Some(&json!("python -m 'my flow'")), DEFAULT_COMMAND).unwrap(),
            ["python", "-m", "my flow"]
        );
        assert_eq!(command_line(Some(&json!("  ")), "a b").unwrap(), ["a", "b"]);
        assert!(command_line(Some(&json!(["a"])), "x").is_err());
        let err = command_line(Some(&json!("echo 'oops")), "x").unwrap_err();
        assert!(err.to_string().contains("job variable `command`"), "{err}");
    }

    #[test]
    fn exits_are_described() {
        use std::process::ExitStatus;
        let e = describe_exit(ExitStatus::from_raw(3 << 8));
        assert_eq!(e.description, "the flow run process exited with code 3");
        assert!(!e.success);
        let e = describe_exit(ExitStatus::from_raw(9));
        assert_eq!(
            e.description,
            "the flow run process was killed by signal SIGKILL"
        );
        assert!(describe_exit(ExitStatus::from_raw(0)).success);
    }
}
