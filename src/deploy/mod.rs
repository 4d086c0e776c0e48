//! Starting a claimed run's infrastructure: the [`Deployer`] trait (the seed's `deploy_flows`).

pub mod kubernetes;
pub mod process;

use std::future::Future;

use tokio::sync::oneshot;

use crate::backend::{Env, FlowRun, PoolInfo, RunSpec};

/// Everything a deployer needs to start one run.
#[derive(Clone, Debug)]
pub struct Launch {
    pub run: FlowRun,
    /// What the backend knows about how the run must be started; the deployer
    /// translates it into its infrastructure.
    pub spec: RunSpec,
    /// The run's environment after precedence was applied (see `agent::env`).
    pub env: Env,
}

/// How a run's infrastructure ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exit {
    /// Success of the infrastructure itself, not of the flow.
    pub success: bool,
    /// A sentence for the user: "the process exited with code 1".
    pub description: String,
}

/// A started run.
#[derive(Debug)]
pub struct Launched {
    /// What Prefect stores as `infrastructure_pid`.
    pub infra_id: String,
    /// For the run log: "process 1234 on host".
    pub description: String,
    /// Resolves when the infrastructure ends, where the deployer can observe that.
    pub exit: Option<oneshot::Receiver<Exit>>,
}

/// The answer to "stop this run's infrastructure".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// It was running and has been stopped.
    Stopped,
    /// Its infrastructure would be here, but nothing of it runs any more.
    NotFound,
    /// Its infrastructure belongs to another agent (another host, another cluster).
    NotMine,
}

/// Errors starting or stopping infrastructure, worded for the run's state message.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("job variable `{name}` is invalid: {reason}")]
    InvalidJobVariable { name: &'static str, reason: String },
    #[error("could not start `{program}`: {cause}")]
    Spawn { program: String, cause: String },
    #[error("could not stop the flow run's infrastructure: {0}")]
    Stop(String),
    #[error("could not build the Job: {0}")]
    Build(String),
    /// The run asks for infrastructure this deployer does not start.
    #[error("{0}")]
    Unsupported(String),
    #[error("Kubernetes refused the Job: {0}")]
    Kubernetes(String),
    /// The platform did not answer or was overloaded; the same launch may work later.
    #[error("Kubernetes is unavailable, the Job will be created when it answers: {0}")]
    Unavailable(String),
}

impl DeployError {
    /// True when launching again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Starts, finds and stops a run's infrastructure on one platform.
pub trait Deployer: Send + Sync + 'static {
    /// Starts the infrastructure for a claimed run.
    fn deploy(&self, launch: Launch) -> impl Future<Output = Result<Launched, DeployError>> + Send;
    /// Infrastructure already running for this run, if any (its infra id): makes
    /// re-adoption safe. An error is not "none": the caller looks again later.
    fn find(
        &self,
        run: &FlowRun,
    ) -> impl Future<Output = Result<Option<String>, DeployError>> + Send;
    /// Stops the run's infrastructure.
    fn stop(&self, run: &FlowRun) -> impl Future<Output = Result<Stopped, DeployError>> + Send;
    /// Whether the run's infrastructure, if it has any, would be this deployer's to stop
    /// (its recorded infra id points here). Asked before a cancellation is recorded.
    fn owns(&self, run: &FlowRun) -> bool;
    /// The work pool type this deployer starts runs of, for hints ("create it with
    /// `--type kubernetes`").
    fn pool_type(&self) -> &'static str;
    /// Whether runs of `pool` can be started here; when not, what to do about it. Asked
    /// at registration, so that a pool whose every run would crash is said at once.
    fn suits(&self, _pool: &PoolInfo) -> Result<(), String> {
        Ok(())
    }
    /// Whether some infrastructure of this agent may still be unfinished (so that a run
    /// of it may need cancelling). A deployer that cannot tell says yes.
    fn may_have_running(&self) -> bool {
        true
    }
    /// How many more runs may be started now (a concurrency limit); `None` = no limit.
    fn room(&self) -> Option<usize> {
        None
    }
    /// Ends of this agent's infrastructure that no launch of this process waits for
    /// (started before a restart): `(flow run id, exit)`. Taken once, at agent start.
    fn unwatched_exits(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<(String, Exit)>> {
        None
    }
}
