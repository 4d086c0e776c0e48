//! The `kubernetes` deployer: one Job per flow run, built from the pool's base job template.

pub mod job;
pub mod observe;
pub mod pod_security;
pub mod run_config;

use std::borrow::Cow;
use std::sync::Arc;

use k8s_openapi::api::batch::v1::Job;
use kube::api::PostParams;
use kube::{Api, Client, ResourceExt};
use serde_json::Map;

use super::{DeployError, Deployer, Launch, Launched, Stopped};
use crate::backend::{FlowRun, References, RunSpec};
use crate::crd::{JobSpec, SecretKeyRef};
use crate::scope::Scope;
use crate::work_pool::JobConfiguration;
use job::{JobInputs, agent_label, build_job, configuration_for, in_background, job_name};
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
    /// Where the operator may put Jobs: a run's `namespace` job variable is followed
    /// only there.
    pub scope: Scope,
}

impl KubernetesDeployer {
    /// Where this resource's Jobs go unless a run's job variables say otherwise.
    fn namespace(&self) -> String {
        self.defaults
            .namespace
            .clone()
            .unwrap_or_else(|| self.agent_namespace.clone())
    }

    fn jobs(&self, namespace: &str) -> Api<Job> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// The namespace of a run's Job by what Prefect recorded (`namespace:name`), if it is
    /// one this resource may use.
    fn recorded_namespace(&self, run: &FlowRun) -> Option<String> {
        let (ns, name) = run.infrastructure_pid.as_deref()?.split_once(':')?;
        let allowed =
            ns == self.namespace() || self.scope.run_namespace(&self.agent_namespace, ns).is_ok();
        (name == job_name(&run.id) && allowed).then(|| ns.to_string())
    }

    /// The run's Job: a work pool's configuration rendered, or a Prefect 1 run_config's
    /// Job (a template without variables).
    fn job(&self, launch: &Launch) -> Result<Job, DeployError> {
        let build = |e: job::JobBuildError| DeployError::Build(e.to_string());
        let no_references = References::default();
        let mut env = Cow::Borrowed(&launch.env);
        let (configuration, about, references) = match &launch.spec {
            RunSpec::WorkPool {
                configuration,
                base_job_template,
                references,
                about,
            } => (
                configuration_for(configuration, base_job_template.as_deref()).map_err(build)?,
                Some(about),
                references,
            ),
            RunSpec::Prefect1 {
                run_config,
                flow,
                labels,
            } => {
                let job = kubernetes_run(run_config, flow, labels, self.defaults.image.as_deref())
                    .map_err(|e| DeployError::Build(e.to_string()))?;
                // The 1.4 agent tells the flow which image it runs in.
                env.to_mut()
                    .set_plain("PREFECT__CONTEXT__IMAGE", job.image.clone());
                let configuration =
                    JobConfiguration::new(Some(&job.base_job_template), &Map::new())
                        .map_err(|e| DeployError::Build(e.to_string()))?;
                (Cow::Owned(configuration), None, &no_references)
            }
        };
        build_job(&JobInputs {
            run: &launch.run,
            agent_namespace: &self.agent_namespace,
            agent_name: &self.agent_name,
            configuration: &configuration,
            about,
            env: &env,
            defaults: &self.defaults,
            secret: self.secret.as_ref(),
            references,
            scope: &self.scope,
        })
        .map_err(build)
    }
}

impl Deployer for KubernetesDeployer {
    fn pool_type(&self) -> &'static str {
        "kubernetes"
    }

    fn suits(&self, pool: &crate::backend::PoolInfo) -> Result<(), String> {
        job::suits_pool(pool)
    }

    fn may_have_running(&self) -> bool {
        self.observer
            .may_have_active(&agent_label(&self.agent_namespace, &self.agent_name))
    }

    fn unwatched_exits(
        &self,
    ) -> Option<tokio::sync::mpsc::UnboundedReceiver<(String, crate::deploy::Exit)>> {
        let (own, agent_ns, scope) = (
            self.namespace(),
            self.agent_namespace.clone(),
            self.scope.clone(),
        );
        let accepts: observe::NamespaceFilter =
            Arc::new(move |ns| ns == own || scope.run_namespace(&agent_ns, ns).is_ok());
        Some(self.observer.subscribe(
            &agent_label(&self.agent_namespace, &self.agent_name),
            accepts,
        ))
    }

    async fn deploy(&self, launch: Launch) -> Result<Launched, DeployError> {
        let job = self.job(&launch)?;
        let name = job_name(&launch.run.id);
        let namespace = job.namespace().unwrap_or_else(|| self.namespace());
        let exit = self.observer.wait_for(&namespace, &name);
        // Counted from now on, not from when the watch sees it: the limit holds under bursts.
        let agent = agent_label(&self.agent_namespace, &self.agent_name);
        self.observer
            .launched(&agent, &format!("{namespace}/{name}"));
        match self
            .jobs(&namespace)
            .create(&PostParams::default(), &job)
            .await
        {
            Ok(_) => {}
            // The name is the run's: this run was launched before (a retry, a restart).
            Err(kube::Error::Api(e)) if e.code == 409 => {
                tracing::info!(job = %name, "Job already exists; adopting it");
            }
            Err(e) => {
                self.observer.not_launched(&agent, &namespace, &name);
                return Err(create_error(e));
            }
        }
        Ok(Launched {
            infra_id: format!("{namespace}:{name}"),
            description: format!("Job {namespace}/{name}"),
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

    async fn find(&self, run: &FlowRun) -> Result<Option<String>, DeployError> {
        // A Job in another namespace is found by the create's AlreadyExists instead.
        let namespace = self.namespace();
        let name = job_name(&run.id);
        let found = self.jobs(&namespace).get_opt(&name).await.map_err(|e| {
            DeployError::Unavailable(format!("could not look for Job {namespace}/{name}: {e}"))
        })?;
        Ok(found.map(|_| format!("{namespace}:{name}")))
    }

    fn owns(&self, run: &FlowRun) -> bool {
        run.infrastructure_pid.is_none() || self.recorded_namespace(run).is_some()
    }

    async fn stop(&self, run: &FlowRun) -> Result<Stopped, DeployError> {
        let namespace = match &run.infrastructure_pid {
            None => self.namespace(),
            Some(_) => match self.recorded_namespace(run) {
                Some(ns) => ns,
                None => return Ok(Stopped::NotMine),
            },
        };
        match self
            .jobs(&namespace)
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
