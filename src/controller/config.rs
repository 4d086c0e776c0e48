//! From a PrefectAgent's spec (and its Secrets) to what runs: the agent's settings, its
//! backend's, and the reason a spec cannot be run, for its conditions.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use crate::agent::AgentConfig;
use crate::backend::config::BackendConfig;
use crate::backend::http::{Auth, RetryPolicy};
use crate::backend::prefect1::Prefect1Config;
use crate::backend::prefect3::Prefect3Config;
use crate::crd::{Flavor, PrefectAgentSpec, PrefectApi, SecretKeyRef};
use crate::secret::SecretString;

/// Why a spec cannot be run; the variant is the conditions' reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    SecretNotFound(String),
    #[error("{0}")]
    SecretUnreadable(String),
    #[error("{0}")]
    JobNamespaceNotAllowed(String),
    #[error(
        "the operator cannot read this PrefectAgent ({0}); fix that field: the CRD of this operator version refuses such values"
    )]
    Undecodable(String),
    #[error("spec.job: {0}")]
    PodSecurity(String),
    /// Not wrong, not yet possible: the PrefectWorkPool it refers to is not Ready.
    #[error("{0}")]
    WaitingForWorkPool(String),
}

impl SpecError {
    /// The reason of the conditions this error sets.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "InvalidSpec",
            Self::SecretNotFound(_) => "SecretNotFound",
            Self::SecretUnreadable(_) => "SecretUnreadable",
            Self::JobNamespaceNotAllowed(_) => "JobNamespaceNotAllowed",
            Self::Undecodable(_) => "UndecodableSpec",
            Self::PodSecurity(_) => "PodSecurity",
            Self::WaitingForWorkPool(_) => "WaitingForWorkPool",
        }
    }
}

/// The credentials a spec's Secrets hold.
#[derive(Debug, Default)]
pub struct Credentials {
    pub key: Option<SecretString>,
    pub auth_string: Option<SecretString>,
}

impl Credentials {
    /// A fingerprint of the values (FNV-1a), to notice a rotated key without keeping a
    /// second copy of it.
    pub fn fingerprint(&self) -> u64 {
        // Each value and a separator byte, so that ("ab", "") and ("a", "b") differ.
        let parts = [&self.key, &self.auth_string]
            .map(|part| part.as_ref().map_or("\0none", |s| s.expose()));
        crate::text::fnv1a(parts.iter().flat_map(|p| p.bytes().chain([0xff])))
    }

    /// Reads the Secrets the spec names, in the resource's namespace.
    pub async fn read(
        client: &Client,
        namespace: &str,
        spec: &PrefectAgentSpec,
    ) -> Result<Self, SpecError> {
        Self::read_for(client, namespace, &spec.api.server).await
    }

    /// Reads the Secrets an API reference names, in the resource's namespace.
    pub async fn read_for(
        client: &Client,
        namespace: &str,
        api: &PrefectApi,
    ) -> Result<Self, SpecError> {
        let read = async |r: &Option<SecretKeyRef>| match r {
            Some(r) => read_secret(client, namespace, r).await.map(Some),
            None => Ok(None),
        };
        Ok(Self {
            key: read(&api.key_secret_ref).await?,
            auth_string: read(&api.auth_string_secret_ref).await?,
        })
    }
}

/// Reads `key` of a Secret in `namespace`; the error names the object, never the value.
async fn read_secret(
    client: &Client,
    namespace: &str,
    r: &SecretKeyRef,
) -> Result<SecretString, SpecError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = match secrets.get_opt(&r.name).await {
        Ok(Some(s)) => s,
        Ok(None) => {
            return Err(SpecError::SecretNotFound(format!(
                "secret {namespace}/{} not found",
                r.name
            )));
        }
        // Not "not found": the API server did not answer, or refused.
        Err(e) => {
            return Err(SpecError::SecretUnreadable(format!(
                "cannot read secret {namespace}/{}: {e}",
                r.name
            )));
        }
    };
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(&r.key))
                .cloned()
        });
    match value {
        Some(v) if !v.is_empty() => Ok(SecretString::new(v)),
        _ => Err(SpecError::SecretNotFound(format!(
            "secret {namespace}/{} has no key `{}`",
            r.name, r.key
        ))),
    }
}

/// Checks what must hold before anything is read: the settings of one flavour are not
/// given to the other.
pub fn check_spec(spec: &PrefectAgentSpec) -> Result<(), SpecError> {
    crate::backend::http::check_api_url(&spec.api.server.url)
        .map_err(|e| SpecError::Invalid(format!("spec.api.url: {e}")))?;
    match spec.api.flavor {
        Flavor::Prefect3 if spec.api.work_pool.is_none() && spec.api.work_pool_ref.is_none() => {
            Err(SpecError::Invalid(
                "spec.api.workPool (or workPoolRef) is required for flavor prefect3".into(),
            ))
        }
        Flavor::Prefect3 if spec.api.work_pool.is_some() && spec.api.work_pool_ref.is_some() => {
            Err(SpecError::Invalid(
                "spec.api: set workPool or workPoolRef, not both".into(),
            ))
        }
        Flavor::Prefect1 if spec.api.server.auth_string_secret_ref.is_some() => {
            Err(SpecError::Invalid(
                "spec.api.authStringSecretRef is a Prefect 3 setting; Prefect 1 takes keySecretRef"
                    .into(),
            ))
        }
        _ => Ok(()),
    }
}

/// The backend a spec asks for, with the credentials its Secrets hold; `identity` (the
/// resource's UID) marks its claims.
pub fn backend_config(
    spec: &PrefectAgentSpec,
    agent: &AgentConfig,
    credentials: Credentials,
    retry: RetryPolicy,
    identity: &str,
) -> Result<BackendConfig, SpecError> {
    check_spec(spec)?;
    let api_url = spec.api.server.url.trim_end_matches('/').to_string();
    let auth = Auth::from_credentials(credentials.key.clone(), credentials.auth_string.clone());
    auth.check().map_err(|e| {
        let named = spec
            .api
            .server
            .key_secret_ref
            .as_ref()
            .or(spec.api.server.auth_string_secret_ref.as_ref())
            .map(|r| format!("Secret {}, key {}: ", r.name, r.key))
            .unwrap_or_default();
        SpecError::Invalid(format!("{named}{e}"))
    })?;
    Ok(match spec.api.flavor {
        Flavor::Prefect1 => BackendConfig::Prefect1(Prefect1Config {
            api_url,
            backend: if credentials.key.is_some() {
                "cloud"
            } else {
                "server"
            }
            .into(),
            key: credentials.key,
            tenant_id: spec.api.tenant_id.clone(),
            agent_name: agent.name.clone(),
            identity: identity.to_string(),
            agent_type: "KubernetesAgent".into(),
            labels: agent.labels.clone(),
            agent_config_id: agent.agent_config_id.clone(),
            prefetch: Duration::from_secs(10),
            log_level: "INFO".into(),
            retry,
        }),
        Flavor::Prefect3 => BackendConfig::Prefect3(Prefect3Config {
            api_url,
            auth,
            pool: spec.api.work_pool.clone().unwrap_or_default(),
            queues: spec.api.work_queues.clone(),
            agent_name: agent.name.clone(),
            identity: identity.to_string(),
            prefetch: Duration::from_secs(10),
            heartbeat_interval: agent.heartbeat_interval,
            create_pool: None,
            poll_limit: 200,
            retry,
            events: spec.api.events.unwrap_or(true),
        }),
    })
}

/// `spec.job.resources` quantities Kubernetes would refuse in every Job (`cpu: lots`):
/// refused once, in the status, instead of crashing every run.
fn check_quantities(
    resources: &k8s_openapi::api::core::v1::ResourceRequirements,
) -> Result<(), SpecError> {
    for (section, map) in [
        ("limits", &resources.limits),
        ("requests", &resources.requests),
    ] {
        for (name, q) in map.iter().flatten() {
            if !is_quantity(&q.0) {
                return Err(SpecError::Invalid(format!(
                    "spec.job.resources.{section}.{name} `{}` is not a Kubernetes quantity \
                     (such as 500m, 2, 1Gi)",
                    crate::text::clip(&q.0, 64)
                )));
            }
        }
    }
    Ok(())
}

/// Kubernetes' quantity syntax: a signed decimal number and a suffix (binary `Ki`..`Ei`,
/// decimal `n`,`u`,`m`,`k`,`M`..`E`, or an exponent `e3`).
fn is_quantity(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let digits = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits);
    let number_ok = !number.is_empty() && number != "." && number.matches('.').count() <= 1;
    let suffix_ok = matches!(
        suffix,
        "" | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
            | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
    ) || suffix
        .strip_prefix(['e', 'E'])
        .map(|e| e.strip_prefix(['+', '-']).unwrap_or(e))
        .is_some_and(|e| !e.is_empty() && e.chars().all(|c| c.is_ascii_digit()));
    number_ok && suffix_ok
}

/// What the operator's flags set for every agent it runs: the Prefect server's limits,
/// which the platform team knows and a PrefectAgent's author need not.
#[derive(Clone, Copy, Debug)]
pub struct AgentDefaults {
    pub heartbeat_interval: Duration,
    pub submit_concurrency: usize,
}

impl Default for AgentDefaults {
    fn default() -> Self {
        let agent = AgentConfig::default();
        Self {
            heartbeat_interval: agent.heartbeat_interval,
            submit_concurrency: agent.submit_concurrency,
        }
    }
}

/// The agent settings a spec asks for, or why it cannot be run.
pub fn agent_config(
    name: &str,
    spec: &PrefectAgentSpec,
    defaults: AgentDefaults,
) -> Result<AgentConfig, SpecError> {
    let poll_interval = match &spec.poll_interval {
        Some(s) => humantime::parse_duration(s)
            .map_err(|e| SpecError::Invalid(format!("spec.pollInterval `{s}`: {e}")))?,
        None => Duration::from_secs(10),
    };
    // One process, many resources: none may open a listener in it.
    if let Some(a) = &spec.agent_address {
        return Err(SpecError::Invalid(format!(
            "spec.agentAddress `{a}`: the operator opens no listener per resource; each agent's \
             health is served on the operator's own port at /agents/<namespace>/<name>/health"
        )));
    }
    if let Some(resources) = &spec.job.resources {
        check_quantities(resources)?;
    }
    Ok(AgentConfig {
        agent_config_id: spec.agent_config_id.clone(),
        name: spec.name.clone().unwrap_or_else(|| name.to_string()),
        labels: spec.labels.clone(),
        env_vars: spec.env_vars.clone(),
        max_polls: spec.max_polls,
        no_cloud_logs: spec.no_cloud_logs,
        poll_interval: poll_interval.max(Duration::from_millis(250)),
        heartbeat_interval: defaults.heartbeat_interval,
        submit_concurrency: defaults.submit_concurrency,
        ..AgentConfig::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_opens_no_listener_and_names_a_bad_quantity() {
        let spec: PrefectAgentSpec = serde_json::from_value(serde_json::json!({
            "api": {"url": "http://p/api", "workPool": "k"}, "agentAddress": "0.0.0.0:22"}))
        .unwrap();
        let err = agent_config("a", &spec, AgentDefaults::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/agents/<namespace>/<name>/health"), "{err}");
        let spec: PrefectAgentSpec = serde_json::from_value(serde_json::json!({
            "api": {"url": "http://p/api", "workPool": "k"},
            "job": {"resources": {"limits": {"cpu": "lots"}}}}))
        .unwrap();
        let err = agent_config("a", &spec, AgentDefaults::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("spec.job.resources.limits.cpu `lots`"),
            "{err}"
        );
    }

    #[test]
    fn quantities_as_kubernetes_reads_them() {
        for ok in ["500m", "2", "1Gi", "0.5", "1e3", "+1", ".5", "128974848"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["lots", "", "1.2.3", "5 Gi", "1GB", "e3", "."] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }
    use serde_json::json;

    #[test]
    fn agent_settings_from_a_spec() {
        let spec: PrefectAgentSpec = serde_json::from_value(json!({
            "api": {"url": "http://p/api", "workPool": "k"}, "pollInterval": "2s", "maxPolls": 3,
            "envVars": {"A": "1"}, "noCloudLogs": true}))
        .unwrap();
        let defaults = AgentDefaults {
            heartbeat_interval: Duration::from_secs(90),
            submit_concurrency: 2,
        };
        let cfg = agent_config("etl", &spec, defaults).unwrap();
        assert_eq!(cfg.name, "etl");
        // The operator's flags reach every agent.
        assert_eq!(cfg.heartbeat_interval, Duration::from_secs(90));
        assert_eq!(cfg.submit_concurrency, 2);
        assert_eq!(cfg.poll_interval, Duration::from_secs(2));
        assert_eq!(cfg.max_polls, Some(3));
        assert!(cfg.no_cloud_logs);
        let bad: PrefectAgentSpec = serde_json::from_value(json!({
            "api": {"url": "http://p/api"}, "agentAddress": "nowhere"}))
        .unwrap();
        assert_eq!(
            agent_config("x", &bad, AgentDefaults::default())
                .unwrap_err()
                .reason(),
            "InvalidSpec"
        );
    }
}
