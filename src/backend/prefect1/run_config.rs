//! A Prefect 1 flow run's `run_config` (`KubernetesRun`) turned into what the deployers
//! take: a Job manifest (as a base job template without placeholders), job variables
//! and the run's environment, following the 1.4 `KubernetesAgent`.
//!
//! Job: the run_config's `job_template`, else a bare `batch/v1` Job with one container
//! `flow`; on the flow container (the one named `flow`, else the first): image = the
//! run_config's, else the flow's Docker storage image, else the template's, else the
//! resource's `job.image`, else `prefecthq/prefect:<core version>`; `args` =
//! `prefect execute flow-run`; pull policy and the four cpu/memory fields from the
//! run_config; service account and pull secrets from the run_config, else the
//! template's, else (filled later) the resource's; the run's Prefect labels as the
//! annotation `prefect.io/run-labels`.
//!
//! Environment, later wins: `PREFECT__LOGGING__LEVEL` < the agent's `env_vars` < the
//! run_config's `env` < the fixed variables (API, credentials as Secret references,
//! tenant, flow-run and flow ids, image, log shipping).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::backend::EnvValue;
use crate::secret::SecretString;

/// Why a run_config cannot be run; worded for the run's Failed message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunConfigError {
    #[error(
        "run_config type `{0}` cannot run here; this agent runs KubernetesRun (and UniversalRun) flow runs"
    )]
    UnsupportedType(String),
    #[error(
        "run_config.job_template_path `{0}` cannot be read by the operator; put the template inline in job_template"
    )]
    TemplatePath(String),
    #[error("run_config.job_template is not a Job with a container: {0}")]
    BadTemplate(String),
    #[error("run_config.{field} must be {expected}")]
    BadField {
        field: &'static str,
        expected: &'static str,
    },
}

/// The flow of a run, as the metadata query returns it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FlowInfo {
    pub id: String,
    pub name: String,
    pub storage: Value,
    pub core_version: Option<String>,
}

/// Everything a run_config decides, ready for the deployer.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSpec {
    /// `{"job_configuration": {"job_manifest": <Job>}, "variables": {}}`.
    pub base_job_template: Value,
    /// `env` (the run_config's) for the agent's env precedence.
    pub job_variables: Map<String, Value>,
    /// The image the flow container runs (also `PREFECT__CONTEXT__IMAGE`).
    pub image: String,
}

fn str_field(rc: &Value, field: &'static str) -> Result<Option<String>, RunConfigError> {
    match rc.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(RunConfigError::BadField {
            field,
            expected: "a string",
        }),
    }
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

/// The image of a flow stored in Docker storage.
fn storage_image(storage: &Value) -> Option<String> {
    if storage.get("type").and_then(Value::as_str) != Some("Docker") {
        return None;
    }
    let name = storage.get("image_name")?.as_str()?;
    let tag = storage
        .get("image_tag")
        .and_then(Value::as_str)
        .unwrap_or("latest");
    let image = format!("{name}:{tag}");
    Some(match storage.get("registry_url").and_then(Value::as_str) {
        Some(registry) if !registry.is_empty() => {
            format!("{}/{image}", registry.trim_end_matches('/'))
        }
        _ => image,
    })
}

/// Builds the run's Job manifest, variables and image from its run_config.
pub fn run_spec(
    run_config: &Value,
    flow: &FlowInfo,
    run_labels: &[String],
    default_image: Option<&str>,
) -> Result<RunSpec, RunConfigError> {
    let rc = if run_config.is_null() {
        &json!({})
    } else {
        run_config
    };
    match rc.get("type").and_then(Value::as_str) {
        None | Some("KubernetesRun") | Some("UniversalRun") => {}
        Some(other) => return Err(RunConfigError::UnsupportedType(other.into())),
    }
    if let Some(path) = str_field(rc, "job_template_path")? {
        return Err(RunConfigError::TemplatePath(path));
    }
    let mut job = match rc.get("job_template") {
        None | Some(Value::Null) => json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "prefect-job"},
            "spec": {"template": {"spec": {"containers": [{"name": "flow"}]}}}
        }),
        Some(t @ Value::Object(_)) => t.clone(),
        Some(_) => {
            return Err(RunConfigError::BadField {
                field: "job_template",
                expected: "a Job object",
            });
        }
    };
    let containers = job
        .pointer_mut("/spec/template/spec/containers")
        .and_then(Value::as_array_mut)
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            RunConfigError::BadTemplate("spec.template.spec.containers is missing or empty".into())
        })?;
    let index = containers
        .iter()
        .position(|c| c.get("name").and_then(Value::as_str) == Some("flow"))
        .unwrap_or(0);
    let container = containers[index]
        .as_object_mut()
        .ok_or_else(|| RunConfigError::BadTemplate("a container is not an object".into()))?;

    let template_image = container
        .get("image")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let image = str_field(rc, "image")?
        .or_else(|| storage_image(&flow.storage))
        .or(template_image)
        .or_else(|| default_image.map(str::to_string))
        .unwrap_or_else(|| {
            format!(
                "prefecthq/prefect:{}",
                flow.core_version.as_deref().unwrap_or("1.4.1")
            )
        });
    container.insert("image".into(), json!(image));
    let command = flow_run_command(flow.core_version.as_deref());
    container.insert("args".into(), json!(command.split(' ').collect::<Vec<_>>()));
    if let Some(policy) = str_field(rc, "image_pull_policy")? {
        container.insert("imagePullPolicy".into(), json!(policy));
    }
    for (field, kind, resource) in [
        ("cpu_request", "requests", "cpu"),
        ("cpu_limit", "limits", "cpu"),
        ("memory_request", "requests", "memory"),
        ("memory_limit", "limits", "memory"),
    ] {
        if let Some(quantity) = str_field(rc, field)? {
            let resources = container.entry("resources").or_insert_with(|| json!({}));
            if !resources.is_object() {
                *resources = json!({});
            }
            let section = &mut resources[kind];
            if !section.is_object() {
                *section = json!({});
            }
            section[resource] = json!(quantity);
        }
    }

    let pod = job
        .pointer_mut("/spec/template/spec")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| RunConfigError::BadTemplate("spec.template.spec is not an object".into()))?;
    if let Some(account) = str_field(rc, "service_account_name")? {
        pod.insert("serviceAccountName".into(), json!(account));
    }
    match rc.get("image_pull_secrets") {
        None | Some(Value::Null) => {}
        Some(Value::Array(names)) if names.iter().all(Value::is_string) => {
            if !names.is_empty() {
                let refs: Vec<Value> = names.iter().map(|n| json!({"name": n})).collect();
                pod.insert("imagePullSecrets".into(), Value::Array(refs));
            }
        }
        Some(_) => {
            return Err(RunConfigError::BadField {
                field: "image_pull_secrets",
                expected: "a list of Secret names",
            });
        }
    }
    if !run_labels.is_empty() {
        job["metadata"]["annotations"]["prefect.io/run-labels"] = json!(run_labels.join(","));
    }

    let mut job_variables = Map::new();
    match rc.get("env") {
        None | Some(Value::Null) => {}
        Some(env @ Value::Object(_)) => {
            job_variables.insert("env".into(), env.clone());
        }
        Some(_) => {
            return Err(RunConfigError::BadField {
                field: "env",
                expected: "an object of NAME: value",
            });
        }
    }
    Ok(RunSpec {
        base_job_template: json!({
            "job_configuration": {"job_manifest": job},
            "variables": {"properties": {}}
        }),
        job_variables,
        image,
    })
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
    pub image: &'a str,
    pub no_cloud_logs: bool,
}

/// Python's `str()` of a list of strings: `['a', 'b']`.
fn python_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("'{s}'")).collect();
    format!("[{}]", quoted.join(", "))
}

/// The variables the 1.4 agent sets over everything else.
pub fn fixed_env(id: &RunIdentity<'_>) -> BTreeMap<String, EnvValue> {
    let plain = |s: &str| EnvValue::Plain(s.to_string());
    let logs = if id.no_cloud_logs { "false" } else { "true" };
    let mut env = BTreeMap::from([
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
        ("PREFECT__CONTEXT__IMAGE".to_string(), plain(id.image)),
        (
            "PREFECT__ENGINE__FLOW_RUNNER__DEFAULT_CLASS".to_string(),
            plain("prefect.engine.cloud.CloudFlowRunner"),
        ),
        ("PREFECT__LOGGING__LOG_TO_CLOUD".to_string(), plain(logs)),
        (
            "PREFECT__CLOUD__SEND_FLOW_RUN_LOGS".to_string(),
            plain(logs),
        ),
    ]);
    if let Some(key) = id.key {
        env.insert(
            "PREFECT__CLOUD__API_KEY".into(),
            EnvValue::Secret(key.clone()),
        );
        env.insert(
            "PREFECT__CLOUD__AUTH_TOKEN".into(),
            EnvValue::Secret(key.clone()),
        );
    }
    if let Some(tenant) = id.tenant_id {
        env.insert("PREFECT__CLOUD__TENANT_ID".into(), plain(tenant));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> FlowInfo {
        FlowInfo {
            id: "f-1".into(),
            name: "etl".into(),
            storage: json!({"type": "GitHub"}),
            core_version: Some("1.4.1".into()),
        }
    }

    fn manifest(spec: &RunSpec) -> &Value {
        &spec.base_job_template["job_configuration"]["job_manifest"]
    }

    #[test]
    fn a_kubernetes_run_maps_onto_the_job() {
        let rc = json!({
            "type": "KubernetesRun", "__version__": "1.4.1", "image": "repo/flow:3",
            "env": {"A": "1"}, "cpu_request": "500m", "cpu_limit": "1", "memory_request": "1Gi",
            "memory_limit": null, "service_account_name": "runner",
            "image_pull_secrets": ["regcred"], "image_pull_policy": "Always",
            "job_template": null, "job_template_path": null, "labels": ["k8s"]
        });
        let spec = run_spec(&rc, &flow(), &["k8s".into()], Some("resource:1")).unwrap();
        let job = manifest(&spec);
        let c = &job["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["name"], "flow");
        assert_eq!(c["image"], "repo/flow:3");
        assert_eq!(c["imagePullPolicy"], "Always");
        assert_eq!(c["args"], json!(["prefect", "execute", "flow-run"]));
        assert_eq!(
            c["resources"],
            json!({"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1"}})
        );
        let pod = &job["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "runner");
        assert_eq!(pod["imagePullSecrets"], json!([{"name": "regcred"}]));
        assert_eq!(
            job["metadata"]["annotations"]["prefect.io/run-labels"],
            "k8s"
        );
        assert_eq!(spec.job_variables["env"], json!({"A": "1"}));
        assert_eq!(spec.image, "repo/flow:3");
    }

    #[test]
    fn the_image_falls_back_like_the_1_4_agent() {
        let template = json!({"type": "KubernetesRun", "job_template": {
            "apiVersion": "batch/v1", "kind": "Job",
            "spec": {"template": {"spec": {"containers": [
                {"name": "sidecar", "image": "envoy"},
                {"name": "flow", "image": "from-template:1"}]}}}}});
        let image = |rc: &Value, flow: &FlowInfo, default: Option<&str>| {
            run_spec(rc, flow, &[], default).unwrap().image
        };
        let docker = FlowInfo {
            storage: json!({"type": "Docker", "registry_url": "reg.io/", "image_name": "etl", "image_tag": "7"}),
            ..flow()
        };
        assert_eq!(image(&template, &docker, Some("res")), "reg.io/etl:7");
        assert_eq!(image(&template, &flow(), Some("res")), "from-template:1");
        assert_eq!(image(&json!({}), &flow(), Some("res")), "res");
        assert_eq!(
            image(&Value::Null, &flow(), None),
            "prefecthq/prefect:1.4.1"
        );
        let spec = run_spec(&template, &flow(), &[], None).unwrap();
        let containers = &manifest(&spec)["spec"]["template"]["spec"]["containers"];
        assert_eq!(
            containers[0]["image"], "envoy",
            "only the flow container changes"
        );
        assert_eq!(
            containers[1]["args"],
            json!(["prefect", "execute", "flow-run"])
        );
    }

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
    fn what_cannot_run_is_named() {
        let err = |rc: Value| run_spec(&rc, &flow(), &[], None).unwrap_err().to_string();
        assert!(err(json!({"type": "DockerRun"})).contains("`DockerRun`"));
        assert!(
            err(json!({"type": "KubernetesRun", "job_template_path": "s3://b/job.yaml"}))
                .contains("job_template_path `s3://b/job.yaml`")
        );
        assert_eq!(
            err(json!({"type": "KubernetesRun", "env": ["A=1"]})),
            "run_config.env must be an object of NAME: value"
        );
        assert!(err(json!({"job_template": {"spec": {}}})).contains("containers is missing"));
    }

    #[test]
    fn the_fixed_environment_follows_the_1_4_agent() {
        let key = SecretString::new("pnu_x");
        let env = fixed_env(&RunIdentity {
            api_url: "http://p1:4200/graphql",
            key: Some(&key),
            tenant_id: Some("t-1"),
            backend: "cloud",
            agent_labels: &["a".into(), "b".into()],
            run_id: "r-1",
            flow_id: "f-1",
            image: "repo/flow:3",
            no_cloud_logs: true,
        });
        let plain = |k: &str| match &env[k] {
            EnvValue::Plain(v) => v.clone(),
            EnvValue::Secret(_) => "<secret>".into(),
        };
        assert_eq!(plain("PREFECT__CLOUD__AGENT__LABELS"), "['a', 'b']");
        assert_eq!(plain("PREFECT__CONTEXT__FLOW_RUN_ID"), "r-1");
        assert_eq!(plain("PREFECT__CLOUD__SEND_FLOW_RUN_LOGS"), "false");
        assert_eq!(plain("PREFECT__LOGGING__LOG_TO_CLOUD"), "false");
        assert_eq!(plain("PREFECT__CLOUD__API_KEY"), "<secret>");
        assert_eq!(plain("PREFECT__CLOUD__AUTH_TOKEN"), "<secret>");
        assert_eq!(plain("PREFECT__CLOUD__TENANT_ID"), "t-1");
    }
}
