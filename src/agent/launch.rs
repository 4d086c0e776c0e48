//! A claimed run launched: its context from the backend, its environment, the deployer;
//! then what its infrastructure's end means for the run (CRASHED with the cause when it
//! ended first).

use std::sync::Arc;

use tokio::sync::oneshot;
use tracing::Instrument;

use super::{Inner, env};
use crate::backend::{Backend, BackendError, FlowRun, LogLevel, StateKind};
use crate::deploy::{DeployError, Deployer, Exit, Launch};
use tokio_util::sync::CancellationToken;

/// Why one run could not be started.
#[derive(Debug, thiserror::Error)]
enum LaunchError {
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Env(#[from] env::EnvError),
    #[error(transparent)]
    Deploy(#[from] DeployError),
}

impl<B: Backend, D: Deployer> Inner<B, D> {
    pub(super) async fn launch(self: &Arc<Self>, run: FlowRun) {
        let run_id = run.id.clone();
        let scheduled = run.scheduled_start;
        match self.try_launch(run).await {
            Ok((infra_id, description, exit)) => {
                self.stats.submitted();
                if let Some(at) = scheduled {
                    // Early (prefetched) launches count as zero.
                    let late = (chrono::Utc::now() - at).to_std().unwrap_or_default();
                    crate::metrics::observe(&self.stats.submission_latency, late);
                }
                tracing::info!(%infra_id, "submitted for execution");
                // Its run log line goes to Prefect with the id, after the burst.
                self.record_later(
                    &run_id,
                    infra_id,
                    format!("Submitted for execution: {description}"),
                );
                if let Some(exit) = exit {
                    let this = self.clone();
                    tokio::spawn(
                        async move { this.watch_exit(run_id, exit).await }.in_current_span(),
                    );
                }
            }
            Err(LaunchError::Backend(e)) if e.is_transient() => {
                self.trouble();
                // Still claimed by us: the maintenance loop adopts it once Prefect answers again.
                tracing::warn!(error = %e, "could not prepare the launch; will retry");
                self.stats.error(e.to_string());
            }
            Err(LaunchError::Deploy(e)) if e.is_transient() => {
                self.trouble();
                // The same: adopted once the platform answers again (the Job name is the
                // run's, so a launch that did happen after all is found, not repeated).
                tracing::warn!(error = %e, "could not launch; will retry");
                self.stats.error(e.to_string());
            }
            Err(e) => {
                self.stats.failed();
                let message = format!("Flow run could not be started: {e}");
                tracing::error!(%message);
                self.stats.error(message.clone());
                self.run_log(&run_id, LogLevel::Error, &message).await;
                if let Err(e) = self.backend.crash(&run_id, &message).await {
                    tracing::error!(error = %e, "could not mark the run crashed");
                }
            }
        }
    }

    async fn try_launch(
        &self,
        run: FlowRun,
    ) -> Result<(String, String, Option<oneshot::Receiver<Exit>>), LaunchError> {
        let ctx = self.backend.context(&run, self.cfg.no_cloud_logs).await?;
        let env = env::run_environment(&ctx, &self.cfg.env_vars)?;
        let launched = self
            .deployer
            .deploy(Launch {
                run,
                spec: ctx.spec,
                env,
            })
            .await?;
        Ok((launched.infra_id, launched.description, launched.exit))
    }

    /// When a run's infrastructure ends before the run did, the run is crashed with the cause.
    async fn watch_exit(&self, run_id: String, exit: oneshot::Receiver<Exit>) {
        let exit = tokio::select! {
            exit = exit => exit,
            // The agent stopped: dropping the receiver hands the end to its successor.
            _ = self.stopped.cancelled() => return,
        };
        let Ok(exit) = exit else { return };
        self.report_exit(run_id, exit).await;
    }

    /// Ends of infrastructure launched before this process (e.g. Jobs that failed while
    /// the operator was down) get the same treatment as the ones it watched itself.
    pub(super) async fn report_unwatched(
        self: Arc<Self>,
        mut exits: tokio::sync::mpsc::UnboundedReceiver<(String, Exit)>,
        stop: CancellationToken,
    ) {
        loop {
            let (run_id, exit) = tokio::select! {
                next = exits.recv() => match next {
                    Some(item) => item,
                    None => return,
                },
                _ = stop.cancelled() => return,
            };
            let span = tracing::info_span!("flow_run", flow_run = %run_id);
            self.report_exit(run_id, exit).instrument(span).await;
        }
    }

    async fn report_exit(&self, run_id: String, exit: Exit) {
        // One fewer active run, whatever follows.
        self.stats.touch();
        let state = match self.backend.settled_state(&run_id).await {
            Ok(state) => state,
            Err(e) => {
                tracing::warn!(error = %e, exit = %exit.description, "could not read the run after its infrastructure ended");
                return;
            }
        };
        if state.is_final() {
            tracing::info!(?state, exit = %exit.description, "flow run finished");
            return;
        }
        if state == StateKind::Cancelling {
            // The cancellation pass reports this one.
            return;
        }
        if exit.success {
            // As Prefect's worker: a run whose infrastructure succeeded is the flow's to
            // report. An evicted pod's run is SCHEDULED again by then (the runner's
            // `reschedule`, exit 0) and must not be crashed.
            tracing::info!(?state, exit = %exit.description, "infrastructure ended successfully; the run's state is left to the flow");
            if state != StateKind::Scheduled {
                let message = format!(
                    "Flow run infrastructure exited successfully while the run was {state:?}: {}; its state is left to the flow",
                    exit.description
                );
                self.run_log(&run_id, LogLevel::Warning, &message).await;
            }
            return;
        }
        let message = format!(
            "Flow run infrastructure exited while the run was {state:?}: {}",
            exit.description
        );
        tracing::warn!(%message);
        self.stats.failed();
        self.run_log(&run_id, LogLevel::Error, &message).await;
        if let Err(e) = self.backend.crash(&run_id, &message).await {
            tracing::error!(error = %e, "could not mark the run crashed");
        }
    }

    pub(super) async fn run_log(&self, run_id: &str, level: LogLevel, message: &str) {
        self.run_log_at(run_id, level, message, chrono::Utc::now())
            .await;
    }

    /// A run log line written at `at` (shipped later, e.g. after a burst).
    pub(super) async fn run_log_at(
        &self,
        run_id: &str,
        level: LogLevel,
        message: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) {
        if self.cfg.no_cloud_logs {
            return;
        }
        if let Err(e) = self.backend.log(run_id, level, message, at).await {
            tracing::debug!(error = %e, "could not ship a run log line");
        }
    }
}
