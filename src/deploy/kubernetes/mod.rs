//! The `kubernetes` deployer: one Job per flow run, built from the pool's base job template.

pub mod job;
pub mod observe;
pub mod run_config;

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use serde_json::Map;

use super::{DeployError, Deployer, Launch, Launched, Stopped};
use crate::backend::{EnvValue, FlowRun, References, RunSpec};
use crate::crd::{JobSpec, SecretKeyRef};
use job::{JobInputs, agent_label, build_job, in_background, job_name};
use observe::JobObserver;
use run_config::kubernetes_run;

/// Starts flow runs as Jobs for one `PrefectAgent`.
#[derive(Clone)]
pub struct KubernetesDeployer {
    pub client: Client,
    pub observer: Arc<JobObserver>,
    pub agent_namespace: String,
    pub agent_name: String,
    pub defaults: JobSpec,
    pub secret: Option<SecretKeyRef>,
    /// Most unfinished Jobs at once (`spec.concurrencyLimit`).
    pub concurrency_limit: Option<u32>,
}

impl KubernetesDeployer {
    fn namespace(&self) -> String {
        self.defaults
            .namespace
            .clone()
            .unwrap_or_else(|| self.agent_namespace.clone())
    }

    fn jobs(&self) -> Api<Job> {
        Api::namespaced(self.client.clone(), &self.namespace())
    }

    /// What Prefect stores as `infrastructure_pid`.
    fn infra_id(&self, run_id: &str) -> String {
        format!("{}:{}", self.namespace(), job_name(run_id))
    }

    /// The run's Job: a work pool's template rendered, or a Prefect 1 run_config's Job
    /// (a template without variables).
    fn job(&self, launch: &Launch) -> Result<Job, DeployError> {
        let (no_variables, nothing_explicit, no_references) =
            (Map::new(), BTreeSet::new(), References::default());
        let from_run_config;
        let mut env = Cow::Borrowed(&launch.env);
        let (job_variables, explicit_job_variables, base_job_template, references) =
            match &launch.spec {
                RunSpec::WorkPool {
                    job_variables,
                    explicit_job_variables,
                    base_job_template,
                    references,
                } => (
                    job_variables,
                    explicit_job_variables,
                    base_job_template.as_deref(),
                    references,
                ),
                RunSpec::Prefect1 {
                    run_config,
                    flow,
                    labels,
                } => {
                    from_run_config =
                        kubernetes_run(run_config, flow, labels, self.defaults.image.as_deref())
                            .map_err(|e| DeployError::Build(e.to_string()))?;
                    // The 1.4 agent tells the flow which image it runs in.
                    env.to_mut().insert(
                        "PREFECT__CONTEXT__IMAGE".into(),
                        EnvValue::Plain(from_run_config.image.clone()),
                    );
                    (
                        &no_variables,
                        &nothing_explicit,
                        Some(&from_run_config.base_job_template),
                        &no_references,
                    )
                }
            };
        build_job(&JobInputs {
            run: &launch.run,
            agent_namespace: &self.agent_namespace,
            agent_name: &self.agent_name,
            job_variables,
            explicit_job_variables,
            env: &env,
            base_job_template,
            defaults: &self.defaults,
            secret: self.secret.as_ref(),
            references,
        })
        .map_err(|e| DeployError::Build(e.to_string()))
    }
}

impl Deployer for KubernetesDeployer {
    fn unwatched_exits(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<(String, crate::deploy::Exit)>> {
        Some(
            self.observer
                .subscribe(&agent_label(&self.agent_namespace, &self.agent_name)),
        )
    }

    async fn deploy(&self, launch: Launch) -> Result<Launched, DeployError> {
        let job = self.job(&launch)?;
        let name = job_name(&launch.run.id);
        let exit = self.observer.wait_for(&self.namespace(), &name);
        // Counted from now on, not from when the watch sees it: the limit holds under bursts.
        let agent = agent_label(&self.agent_namespace, &self.agent_name);
        self.observer
            .launched(&agent, &format!("{}/{name}", self.namespace()));
        match self.jobs().create(&PostParams::default(), &job).await {
            Ok(_) => {}
            // The name is the run's: this run was launched before (a retry, a restart).
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::info!(job = %name, "Job already exists; adopting it");
            }
            Err(e) => {
                self.observer.not_launched(&agent, &self.namespace(), &name);
                return Err(create_error(e));
            }
        }
        Ok(Launched {
            infra_id: self.infra_id(&launch.run.id),
            description: format!("Job {}/{name}", self.namespace()),
            exit: Some(exit),
        })
    }

    fn room(&self) -> Option<usize> {
        let active = self
            .observer
            .active(&agent_label(&self.agent_namespace, &self.agent_name));
        self.concurrency_limit
            .map(|limit| (limit as usize).saturating_sub(active))
    }

    async fn find(&self, run: &FlowRun) -> Option<String> {
        let found = self.jobs().get_opt(&job_name(&run.id)).await.ok()??;
        found.metadata.name.map(|_| self.infra_id(&run.id))
    }

    async fn stop(&self, run: &FlowRun) -> Result<Stopped, DeployError> {
        if let Some(pid) = &run.infrastructure_pid
            && *pid != self.infra_id(&run.id)
        {
            return Ok(Stopped::NotMine);
        }
        match self
            .jobs()
            .delete(&job_name(&run.id), &in_background())
            .await
        {
            Ok(_) => Ok(Stopped::Stopped),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Stopped::NotFound),
            Err(e) => Err(DeployError::Stop(e.to_string())),
        }
    }
}

/// Deletes the finished Jobs of the agent with this `prefect.io/agent` label in
/// `namespace` (when its resource goes, so that nothing of it stays behind); Jobs still
/// running are left to finish, and their TTL removes them. Returns how many went.
pub async fn delete_finished_jobs(
    client: &Client,
    namespace: &str,
    agent: &str,
) -> Result<usize, kube::Error> {
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    let selector = format!("{}={agent}", job::labels::AGENT);
    let mut deleted = 0;
    for found in jobs
        .list(&kube::api::ListParams::default().labels(&selector))
        .await?
        .items
    {
        if observe::job_outcome(&found).is_none() {
            continue;
        }
        match jobs.delete(&found.name_any(), &in_background()).await {
            Ok(_) => deleted += 1,
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}

/// A refused create is final (invalid, forbidden, no such namespace); an unanswered or
/// overloaded API server is not, and the run keeps its claim until the Job can be made.
fn create_error(e: kube::Error) -> DeployError {
    match e {
        kube::Error::Api(e) if !matches!(e.code, 429 | 500..=599) => {
            DeployError::Kubernetes(format!("{} ({})", e.message, e.reason))
        }
        kube::Error::Api(e) => DeployError::Unavailable(format!("{} ({})", e.message, e.reason)),
        other => DeployError::Unavailable(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> kube::Error {
        let status: kube::core::Status = serde_json::from_value(serde_json::json!({
            "code": code, "message": "m", "reason": "R"
        }))
        .unwrap();
        kube::Error::Api(Box::new(status))
    }

    #[test]
    fn only_an_unanswering_or_overloaded_api_server_is_worth_another_try() {
        for code in [400, 403, 404, 422] {
            assert!(!create_error(api_error(code)).is_transient(), "{code}");
        }
        for code in [429, 500, 503, 504] {
            assert!(create_error(api_error(code)).is_transient(), "{code}");
        }
        let io = kube::Error::ReadEvents(std::io::Error::other("connection reset"));
        assert!(create_error(io).is_transient());
        assert_eq!(
            create_error(api_error(422)).to_string(),
            "Kubernetes refused the Job: m (R)"
        );
    }
}
