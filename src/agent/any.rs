//! An agent over whichever backend its configuration names: where both modes (the
//! standalone `agent` and the operator's agents) turn a [`BackendConfig`] into a backend.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::stats::AgentStats;
use super::{Agent, AgentConfig, AgentError, StopReason};
use crate::backend::BackendError;
use crate::backend::config::BackendConfig;
use crate::backend::prefect1::Prefect1;
use crate::backend::prefect3::Prefect3;
use crate::deploy::Deployer;

/// An [`Agent`] of either backend.
pub enum AnyAgent<D> {
    Prefect3(Agent<Prefect3, D>),
    Prefect1(Agent<Prefect1, D>),
}

impl<D: Deployer> AnyAgent<D> {
    /// Builds the backend `backend` names and the agent around it.
    pub fn new(
        cfg: AgentConfig,
        backend: BackendConfig,
        deployer: D,
    ) -> Result<Self, BackendError> {
        Ok(match backend {
            BackendConfig::Prefect3(b) => {
                Self::Prefect3(Agent::new(cfg, Prefect3::new(b)?, deployer))
            }
            BackendConfig::Prefect1(b) => {
                Self::Prefect1(Agent::new(cfg, Prefect1::new(b)?, deployer))
            }
        })
    }

    /// The agent's counters, live.
    pub fn stats(&self) -> Arc<AgentStats> {
        match self {
            Self::Prefect3(a) => a.stats(),
            Self::Prefect1(a) => a.stats(),
        }
    }

    /// [`Agent::start`].
    pub async fn start(&self, shutdown: CancellationToken) -> Result<StopReason, AgentError> {
        match self {
            Self::Prefect3(a) => a.start(shutdown).await,
            Self::Prefect1(a) => a.start(shutdown).await,
        }
    }
}
