//! One PrefectAgent reconciled: its agent started, kept or stopped, its status written,
//! and on deletion its agent stopped and its finished Jobs removed.

use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::core::error_boundary::InvalidObject;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::config::{Credentials, SpecError, agent_config, backend_config, check_spec};
use super::status::{
    MAX_NOTE, agent_started, clip, desired_status, status_changed, transition_event,
};
use super::supervisor::{AgentPhase, Counts, RESTART_FIRST};
use super::{
    Context, Error, FAILING_REFRESH, FIELD_MANAGER, FINALIZER, Guarded, STATUS_REFRESH,
    STATUS_WRITE_GAP,
};
use crate::agent::{AnyAgent, StopReason};
use crate::crd::{JobSpec, PrefectAgent, PrefectAgentStatus};
use crate::deploy::kubernetes::KubernetesDeployer;
use crate::deploy::kubernetes::job::{JobBuildError, agent_label, probe_resource};

/// How long a deleted resource's agent may take to finish its launches under way.
const STOP_GRACE: Duration = Duration::from_secs(20);

impl PrefectAgent {
    /// `namespace/name`: the supervisor's key and the logs' `resource`.
    pub(super) fn key(&self) -> String {
        format!(
            "{}/{}",
            self.namespace().unwrap_or_default(),
            self.name_any()
        )
    }

    pub(super) async fn reconcile(&self, ctx: &Context) -> Result<Action, Error> {
        let key = self.key();
        let generation = self.metadata.generation;
        let current = ctx.supervisor.current(&key, generation);
        // A key rotated in its Secret is picked up: the running agent is replaced.
        if let Some(AgentPhase::Running { stats }) = &current
            && self
                .credentials_rotated(ctx, stats.consecutive_poll_errors > 0)
                .await
        {
            tracing::info!(resource = %key, "the API credentials changed in their Secret; restarting the agent");
            ctx.supervisor.stop(&key);
        }
        let phase = if self.spec.suspend {
            ctx.supervisor.stop(&key);
            AgentPhase::Suspended
        } else if let Some(phase) = ctx.supervisor.current(&key, generation) {
            phase
        } else {
            match self.start_agent(ctx).await {
                Ok(()) => ctx
                    .supervisor
                    .current(&key, generation)
                    .unwrap_or(AgentPhase::Failed {
                        reason: "AgentFailed",
                        message: "the agent did not start".into(),
                        retry_in: RESTART_FIRST,
                    }),
                Err(e @ SpecError::WaitingForWorkPool(_)) => {
                    ctx.supervisor.stop(&key);
                    AgentPhase::Waiting {
                        reason: e.reason(),
                        message: e.to_string(),
                    }
                }
                Err(e) => {
                    ctx.supervisor.stop(&key);
                    AgentPhase::Invalid {
                        reason: e.reason(),
                        message: e.to_string(),
                    }
                }
            }
        };
        self.write_status(ctx, &phase).await?;
        Ok(match phase {
            // Fixed Secrets and namespaces are not watched: looked at again now and then.
            AgentPhase::Invalid { .. } => Action::requeue(Duration::from_secs(30)),
            // The PrefectWorkPool is watched; this only bounds a missed event.
            AgentPhase::Waiting { .. } => Action::requeue(Duration::from_secs(30)),
            AgentPhase::Failed { retry_in, .. } => Action::requeue(retry_in),
            AgentPhase::Suspended | AgentPhase::Finished { .. } => Action::await_change(),
            // What the agent changes is written when it says so (`AgentStats::touch`); the
            // refresh brings the poll figures up to date. While polls fail, the Secrets
            // are looked at again sooner (a fixed key is picked up).
            AgentPhase::Running { stats } if stats.consecutive_poll_errors > 0 => {
                Action::requeue(FAILING_REFRESH)
            }
            AgentPhase::Running { .. } => Action::requeue(STATUS_REFRESH),
        })
    }

    /// Whether the Secrets now hold other credentials than the agent started with (read
    /// again only when due; a Secret that cannot be read now changes nothing).
    async fn credentials_rotated(&self, ctx: &Context, failing: bool) -> bool {
        let Some(started_with) = ctx.supervisor.credentials_due(&self.key(), failing) else {
            return false;
        };
        let ns = self.namespace().unwrap_or_default();
        match Credentials::read(&ctx.client, &ns, &self.spec).await {
            Ok(now) => now.fingerprint() != started_with,
            Err(_) => false,
        }
    }

    /// The spec with `workPoolRef` resolved to the PrefectWorkPool's pool, once that is
    /// Ready for its current generation (None without a reference).
    async fn with_referenced_pool(
        &self,
        ctx: &Context,
    ) -> Result<Option<crate::crd::PrefectAgentSpec>, SpecError> {
        let Some(r) = &self.spec.api.work_pool_ref else {
            return Ok(None);
        };
        let ns = self.namespace().unwrap_or_default();
        let pools: kube::Api<crate::crd::PrefectWorkPool> =
            kube::Api::namespaced(ctx.client.clone(), &ns);
        let pool = pools.get_opt(&r.name).await.map_err(|e| {
            SpecError::WaitingForWorkPool(format!(
                "cannot read PrefectWorkPool {ns}/{}: {e}",
                r.name
            ))
        })?;
        let pool_name = referenced_pool(&ns, &r.name, pool.as_ref(), &self.spec.api.server.url)?;
        let mut spec = self.spec.clone();
        spec.api.work_pool = Some(pool_name);
        spec.api.work_pool_ref = None;
        Ok(Some(spec))
    }

    /// Builds this generation's agent from the spec and runs it as a supervised task.
    async fn start_agent(&self, ctx: &Context) -> Result<(), SpecError> {
        let ns = self.namespace().unwrap_or_default();
        check_spec(&self.spec)?;
        let resolved = self.with_referenced_pool(ctx).await?;
        let spec = resolved.as_ref().unwrap_or(&self.spec);
        let cfg = agent_config(&self.name_any(), spec, ctx.agent_defaults)?;
        let job_namespace = ctx
            .scope
            .job_namespace(&ns, spec.job.namespace.as_deref())
            .map_err(SpecError::JobNamespaceNotAllowed)?;
        let defaults = JobSpec {
            namespace: Some(job_namespace),
            ..spec.job.clone()
        };
        // What the resource alone asks of its pods is judged here, once, by field.
        match probe_resource(&ns, &self.name_any(), &defaults, &ctx.scope) {
            Err(e @ JobBuildError::PodSecurity { .. }) => {
                return Err(SpecError::PodSecurity(e.to_string()));
            }
            Err(e) => return Err(SpecError::Invalid(format!("spec.job: {e}"))),
            Ok(_) => {}
        }
        let credentials = Credentials::read(&ctx.client, &ns, spec).await?;
        let fingerprint = credentials.fingerprint();
        let deployer = KubernetesDeployer {
            client: ctx.client.clone(),
            observer: ctx.observer.clone(),
            agent_namespace: ns,
            agent_name: self.name_any(),
            defaults,
            secret: (spec.api.server.key_secret_ref.clone()).or(spec
                .api
                .server
                .auth_string_secret_ref
                .clone()),
            concurrency_limit: spec.concurrency_limit,
            scope: ctx.scope.clone(),
        };
        // The UID, not the name: a namesake elsewhere must never adopt this one's claims.
        let identity = self.uid().unwrap_or_else(|| self.key());
        let backend = backend_config(spec, &cfg, credentials, ctx.retry, &identity)?;
        let agent =
            AnyAgent::new(cfg, backend, deployer).map_err(|e| SpecError::Invalid(e.to_string()))?;
        // Counting on from where the resource's counts are: its status, or an agent
        // that stopped before its last counts were written.
        let c = self.counts(ctx);
        agent
            .stats()
            .resume_from(c.polls, c.runs_submitted, c.runs_failed);
        self.run_agent(ctx, agent, fingerprint);
        Ok(())
    }

    /// Runs the agent as a supervised task for this resource's generation.
    fn run_agent(&self, ctx: &Context, agent: AnyAgent<KubernetesDeployer>, credentials: u64) {
        let key = self.key();
        let stats = agent.stats();
        let token = CancellationToken::new();
        let run_token = token.clone();
        // A root span: the task outlives the reconcile that started it.
        let span = tracing::info_span!(parent: None, "resource", resource = %key);
        let task_stats = stats.clone();
        let handle = tokio::spawn(tracing::Instrument::instrument(
            async move {
                // The error goes where the status reads it: the agent's counters.
                match agent.start(run_token).await {
                    Ok(StopReason::MaxPolls) => task_stats.finish(),
                    Ok(StopReason::Shutdown) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "agent stopped with an error");
                        task_stats.stopped_with(e.reason(), e.to_string());
                    }
                }
                task_stats.touch();
            },
            span,
        ));
        // What the agent says changed is written into the status at once, at most once
        // per `STATUS_WRITE_GAP`: a burst of launches makes one write a second, not one per
        // run. A change during the gap leaves a permit, so the last one is written too.
        let (changes, watched, stop) = (ctx.changes.clone(), stats.clone(), token.clone());
        let resource = ObjectRef::<Guarded>::new(&self.name_any())
            .within(&self.namespace().unwrap_or_default());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = watched.changed() => {}
                    _ = stop.cancelled() => return,
                }
                if changes.send(resource.clone()).is_err() {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(STATUS_WRITE_GAP) => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
        ctx.supervisor.start(
            key,
            self.metadata.generation,
            token,
            stats,
            handle,
            credentials,
        );
    }

    /// The resource's lifetime counts: what its status shows, or what its agents
    /// counted since, whichever is further.
    fn counts(&self, ctx: &Context) -> Counts {
        let written = self
            .status
            .as_ref()
            .map_or_else(Counts::default, |s| Counts {
                polls: s.polls,
                runs_submitted: s.runs_submitted,
                runs_failed: s.runs_failed,
            });
        ctx.supervisor.counts(&self.key()).max(written)
    }

    async fn write_status(&self, ctx: &Context, phase: &AgentPhase) -> Result<(), Error> {
        let ns = self.namespace().unwrap_or_default();
        let active_jobs = ctx.observer.active(&agent_label(&ns, &self.name_any())) as u64;
        let mut before = self.status.clone().unwrap_or_default();
        let c = self.counts(ctx);
        (before.polls, before.runs_submitted, before.runs_failed) =
            (c.polls, c.runs_submitted, c.runs_failed);
        let status = desired_status(phase, self.metadata.generation, Some(&before), active_jobs);
        if self
            .status
            .as_ref()
            .is_some_and(|s| !status_changed(s, &status, agent_started(phase)))
        {
            return Ok(());
        }
        let object = self.object_ref(&());
        let previous = self.status.as_ref().map_or(&[][..], |s| &s.conditions);
        if let Some((warning, reason, note)) = transition_event(previous, &status.conditions) {
            publish(ctx, &object, warning, reason, note).await;
        }
        apply_status(ctx, &object, &status).await?;
        Ok(())
    }

    pub(super) async fn cleanup(&self, ctx: &Context) -> Result<Action, Error> {
        let key = self.key();
        ctx.supervisor.stop_and_wait(&key, STOP_GRACE).await;
        // Its finished Jobs go with it; a failure leaves them to their TTL.
        let own = self.namespace().unwrap_or_default();
        let namespace = self.spec.job.namespace.clone().unwrap_or(own.clone());
        let label = agent_label(&own, &self.name_any());
        ctx.observer.forget_agent(&label);
        match crate::deploy::kubernetes::delete_finished_jobs(&ctx.client, &namespace, &label).await
        {
            Ok(n) => {
                tracing::info!(resource = %key, deleted = n, "deleted the finished Jobs of a removed PrefectAgent")
            }
            Err(e) => {
                tracing::warn!(resource = %key, error = %e, "could not delete the finished Jobs of a removed PrefectAgent; their TTL will")
            }
        }
        Ok(Action::await_change())
    }
}

/// Publishes an Event on the resource; a failure is only logged.
async fn publish(
    ctx: &Context,
    object: &ObjectReference,
    warning: bool,
    reason: String,
    note: String,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason,
        note: Some(note),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder().publish(&event, object).await {
        tracing::warn!(error = %e, "could not publish an Event");
    }
}

/// Writes a resource's status by server-side apply; guarded, since the answer is the
/// resource, which may not decode.
async fn apply_status(
    ctx: &Context,
    object: &ObjectReference,
    status: &PrefectAgentStatus,
) -> Result<(), kube::Error> {
    let api: Api<Guarded> = Api::namespaced(
        ctx.client.clone(),
        object.namespace.as_deref().unwrap_or_default(),
    );
    let patch =
        json!({"apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent", "status": status});
    api.patch_status(
        object.name.as_deref().unwrap_or_default(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// A PrefectAgent the operator cannot decode (stored by an older CRD, or edited around
/// the schema): its agent, if one ran, is stopped, and its status says which field is
/// wrong; every other resource is reconciled as usual. Being deleted, it is let go.
pub(super) async fn undecodable(
    guard: &Guarded,
    invalid: &InvalidObject,
    ctx: &Context,
) -> Result<Action, Error> {
    let meta = &invalid.metadata;
    let (ns, name) = (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    );
    ctx.supervisor.stop(&format!("{ns}/{name}"));
    let api: Api<Guarded> = Api::namespaced(ctx.client.clone(), &ns);
    if meta.deletion_timestamp.is_some() {
        let finalizers = meta.finalizers.clone().unwrap_or_default();
        if finalizers.iter().any(|f| f == FINALIZER) {
            let rest: Vec<&String> = finalizers.iter().filter(|f| *f != FINALIZER).collect();
            let patch = json!({"metadata": {"finalizers": rest,
                "resourceVersion": meta.resource_version}});
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        return Ok(Action::await_change());
    }
    let cause = field_error(ctx, &ns, &name)
        .await
        .unwrap_or_else(|| invalid.error.clone());
    tracing::warn!(resource = %format!("{ns}/{name}"), error = %cause, "cannot decode a PrefectAgent; its agent is not run");
    let error = SpecError::Undecodable(cause);
    let object = guard.object_ref(&());
    // An Event always: the API server may refuse the status of an object that breaks
    // the schema (it validates the whole object on a status write).
    let note = clip(&error.to_string(), MAX_NOTE);
    publish(ctx, &object, true, error.reason().into(), note).await;
    let phase = AgentPhase::Invalid {
        reason: error.reason(),
        message: error.to_string(),
    };
    let status = desired_status(&phase, meta.generation, None, 0);
    if let Err(e) = apply_status(ctx, &object, &status).await {
        tracing::warn!(resource = %format!("{ns}/{name}"), error = %e, "could not write the status of an undecodable PrefectAgent; its Event says why");
    }
    Ok(Action::await_change())
}

/// Which field of a stored PrefectAgent does not decode, as `spec.x.y: why`.
async fn field_error(ctx: &Context, ns: &str, name: &str) -> Option<String> {
    let resource = ApiResource::erase::<PrefectAgent>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(ctx.client.clone(), ns, &resource);
    let raw = serde_json::to_value(api.get(name).await.ok()?).ok()?;
    match serde_path_to_error::deserialize::<_, PrefectAgent>(raw) {
        Ok(_) => None,
        Err(e) => Some(format!("{}: {}", e.path(), e.inner())),
    }
}

/// The pool a `workPoolRef` names, or why the agent cannot take it (yet).
fn referenced_pool(
    ns: &str,
    name: &str,
    pool: Option<&crate::crd::PrefectWorkPool>,
    agent_url: &str,
) -> Result<String, SpecError> {
    let Some(pool) = pool else {
        return Err(SpecError::WaitingForWorkPool(format!(
            "waiting for PrefectWorkPool {ns}/{name}: it does not exist"
        )));
    };
    if pool.spec.api.url.trim_end_matches('/') != agent_url.trim_end_matches('/') {
        return Err(SpecError::Invalid(format!(
            "spec.api.workPoolRef: PrefectWorkPool {ns}/{name} is on {}, this agent on {agent_url}",
            pool.spec.api.url
        )));
    }
    match pool.not_ready() {
        None => Ok(pool.pool_name()),
        Some(why) => Err(SpecError::WaitingForWorkPool(format!(
            "waiting for PrefectWorkPool {ns}/{name} {why}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::PrefectWorkPool;

    #[test]
    fn a_referenced_pool_is_taken_once_ready_and_only_on_the_same_server() {
        let pool = |url: &str, ready: Option<&str>| -> PrefectWorkPool {
            let conditions = ready.map_or(json!([]), |status| {
                json!([{"type": "Ready", "status": status, "reason": "Synced", "message": "m",
                        "observedGeneration": 1, "lastTransitionTime": "2026-01-01T00:00:00Z"}])
            });
            serde_json::from_value(json!({
                "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectWorkPool",
                "metadata": {"name": "p", "generation": 1},
                "spec": {"api": {"url": url}, "name": "in-prefect"},
                "status": {"conditions": conditions},
            }))
            .unwrap()
        };
        let here = "http://prefect/api";
        let taken = referenced_pool("ns", "p", Some(&pool(here, Some("True"))), here);
        assert_eq!(taken.unwrap(), "in-prefect");
        for waiting in [
            None,
            Some(pool(here, Some("False"))),
            Some(pool(here, None)),
        ] {
            let e = referenced_pool("ns", "p", waiting.as_ref(), here).unwrap_err();
            assert_eq!(e.reason(), "WaitingForWorkPool", "{e}");
        }
        let elsewhere = pool("http://other/api", Some("True"));
        let e = referenced_pool("ns", "p", Some(&elsewhere), here).unwrap_err();
        assert_eq!(e.reason(), "InvalidSpec");
        assert!(e.to_string().contains("http://other/api"), "{e}");
    }
}
