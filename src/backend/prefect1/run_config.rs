//! A Prefect 1 flow run as the backend hands it on: its flow, the command that runs it,
//! and the environment the 1.4 agents fix for it. What a `run_config` means for the
//! infrastructure is each deployer's (`deploy::kubernetes::run_config` for
//! `KubernetesRun`, `deploy::process` for `LocalRun`).
//!
//! Environment, later wins: `PREFECT__LOGGING__LEVEL` < the agent's `env_vars` < the
//! run_config's `env` < the fixed variables (API, credentials as Secret references,
//! tenant, flow-run and flow ids, log shipping; the Kubernetes deployer adds the image).

use serde_json::Value;

use crate::backend::{Env, EnvValue};
use crate::secret::SecretString;

/// The flow of a run, as the metadata query returns it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FlowInfo {
    pub id: String,
    pub name: String,
    pub storage: Value,
    pub core_version: Option<String>,
}

/// A run_config's `type` (`KubernetesRun`, `LocalRun`, …); none for an empty one.
pub fn run_config_type(run_config: &Value) -> Option<&str> {
    run_config.get("type").and_then(Value::as_str)
}

/// The command that runs a Prefect 1 flow run in its container.
pub fn flow_run_command(core_version: Option<&str>) -> &'static str {
    let old = core_version
        .and_then(|v| {
            let mut parts = v.split(['.', '+']);
            let major: u32 = parts.next()?.parse().ok()?;
            let minor: u32 = parts.next()?.parse().ok()?;
            Some(major == 0 && minor < 13)
        })
        .unwrap_or(false);
    if old {
        "prefect execute cloud-flow"
    } else {
        "prefect execute flow-run"
    }
}

/// Who the run talks to and as whom, for its fixed environment.
#[derive(Clone, Debug)]
pub struct RunIdentity<'a> {
    pub api_url: &'a str,
    pub key: Option<&'a SecretString>,
    pub tenant_id: Option<&'a str>,
    /// `server` or `cloud`.
    pub backend: &'a str,
    pub agent_labels: &'a [String],
    pub run_id: &'a str,
    pub flow_id: &'a str,
    pub no_cloud_logs: bool,
}

/// Python's `str()` of a list of strings: `['a', 'b']`.
fn python_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("'{s}'")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The variables under everything else (even the agent's `env_vars`), as 1.4 starts a
/// run's environment: the log level, and log shipping on unless the agent ships none.
pub fn default_env(log_level: &str, no_cloud_logs: bool) -> Env {
    let mut env = Env::default();
    env.set_plain("PREFECT__LOGGING__LEVEL", log_level);
    if !no_cloud_logs {
        env.set_plain("PREFECT__CLOUD__SEND_FLOW_RUN_LOGS", "true");
    }
    env
}

/// The variables the 1.4 agent sets over everything else.
pub fn fixed_env(id: &RunIdentity<'_>) -> Env {
    let plain = |s: &str| EnvValue::Plain(s.to_string());
    let logs = if id.no_cloud_logs { "false" } else { "true" };
    let mut env: Env = [
        ("PREFECT__BACKEND".to_string(), plain(id.backend)),
        (
            "PREFECT__CLOUD__AGENT__LABELS".to_string(),
            plain(&python_list(id.agent_labels)),
        ),
        ("PREFECT__CLOUD__API".to_string(), plain(id.api_url)),
        (
            "PREFECT__CLOUD__USE_LOCAL_SECRETS".to_string(),
            plain("false"),
        ),
        (
            "PREFECT__CONTEXT__FLOW_RUN_ID".to_string(),
            plain(id.run_id),
        ),
        ("PREFECT__CONTEXT__FLOW_ID".to_string(), plain(id.flow_id)),
        (
            "PREFECT__ENGINE__FLOW_RUNNER__DEFAULT_CLASS".to_string(),
            plain("prefect.engine.cloud.CloudFlowRunner"),
        ),
        ("PREFECT__LOGGING__LOG_TO_CLOUD".to_string(), plain(logs)),
    ]
    .into_iter()
    .collect();
    // "Allow logs to be disabled by flow run settings but not enabled" (1.4): fixed only
    // when the agent ships none; otherwise a default the run may turn off.
    if id.no_cloud_logs {
        env.set_plain("PREFECT__CLOUD__SEND_FLOW_RUN_LOGS", "false");
    }
    if let Some(key) = id.key {
        env.set("PREFECT__CLOUD__API_KEY", EnvValue::Secret(key.clone()));
        env.set("PREFECT__CLOUD__AUTH_TOKEN", EnvValue::Secret(key.clone()));
    }
    if let Some(tenant) = id.tenant_id {
        env.set("PREFECT__CLOUD__TENANT_ID", plain(tenant));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_flows_run_with_the_old_command() {
        assert_eq!(
            flow_run_command(Some("0.12.6")),
            "prefect execute cloud-flow"
        );
        assert_eq!(flow_run_command(Some("0.15.0")), "prefect execute flow-run");
        assert_eq!(flow_run_command(None), "prefect execute flow-run");
    }

    #[test]
    fn the_fixed_environment_follows_the_1_4_agent() {
        let key = SecretString::new("pnu_x");
        let labels = ["a".to_string(), "b".to_string()];
        let id = RunIdentity {
            api_url: "http://p1:4200/graphql",
            key: Some(&key),
            tenant_id: Some("t-1"),
            backend: "cloud",
            agent_labels: &labels,
            run_id: "r-1",
            flow_id: "f-1",
            no_cloud_logs: true,
        };
        let env = fixed_env(&id);
        let plain = |k: &str| match &env[k] {
            EnvValue::Plain(v) => v.clone(),
            EnvValue::Secret(_) | EnvValue::From(_) => "<secret>".into(),
        };
        assert_eq!(plain("PREFECT__CLOUD__AGENT__LABELS"), "['a', 'b']");
        assert_eq!(plain("PREFECT__CONTEXT__FLOW_RUN_ID"), "r-1");
        assert_eq!(plain("PREFECT__CLOUD__SEND_FLOW_RUN_LOGS"), "false");
        assert_eq!(plain("PREFECT__LOGGING__LOG_TO_CLOUD"), "false");
        assert_eq!(plain("PREFECT__CLOUD__API_KEY"), "<secret>");
        assert_eq!(plain("PREFECT__CLOUD__AUTH_TOKEN"), "<secret>");
        assert_eq!(plain("PREFECT__CLOUD__TENANT_ID"), "t-1");
        // Shipping logs: the fixed layer leaves SEND_FLOW_RUN_LOGS to the run, over a
        // default of true, so a run_config env can turn it off (not on).
        let shipping = fixed_env(&RunIdentity {
            no_cloud_logs: false,
            ..id.clone()
        });
        assert!(!shipping.contains("PREFECT__CLOUD__SEND_FLOW_RUN_LOGS"));
        assert_eq!(
            default_env("INFO", false)["PREFECT__CLOUD__SEND_FLOW_RUN_LOGS"],
            EnvValue::Plain("true".into())
        );
        assert!(!default_env("INFO", true).contains("PREFECT__CLOUD__SEND_FLOW_RUN_LOGS"));
    }
}
