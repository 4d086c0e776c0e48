//! A Prefect 1 `KubernetesRun` (or `UniversalRun`) turned into a Job manifest (as a base
//! job template without placeholders) and the image it runs, following the 1.4
//! `KubernetesAgent`.
//!
//! Job: the run_config's `job_template`, else a bare `batch/v1` Job with one container
//! `flow`; on the first container, which runs the flow as in 1.4: image = the
//! flow's Docker storage image, else the run_config's, else the template's, else the
//! resource's `job.image`, else `prefecthq/prefect:<core version without +local>`; `args` =
//! `prefect execute flow-run`; pull policy and the four cpu/memory fields from the
//! run_config; service account and pull secrets from the run_config, else the
//! template's, else (filled later) the resource's; the run's Prefect labels as the
//! annotation `prefect.io/run-labels`.

use serde_json::{Value, json};

use crate::backend::prefect1::run_config::{FlowInfo, flow_run_command, run_config_type};

/// Why a run_config cannot be run; worded for the run's Failed message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunConfigError {
    #[error(
        "run_config type `{0}` cannot run on Kubernetes; this agent runs KubernetesRun (and UniversalRun) flow runs"
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

/// What a run_config decides for the Job.
#[derive(Clone, Debug, PartialEq)]
pub struct RunConfigJob {
    /// `{"job_configuration": {"job_manifest": <Job>}, "variables": {}}`.
    pub base_job_template: Value,
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

/// Builds the run's Job manifest and image from its run_config.
pub fn kubernetes_run(
    run_config: &Value,
    flow: &FlowInfo,
    run_labels: &[String],
    default_image: Option<&str>,
) -> Result<RunConfigJob, RunConfigError> {
    let rc = if run_config.is_null() {
        &json!({})
    } else {
        run_config
    };
    match run_config_type(rc) {
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
    // As 1.4: the first container runs the flow (image, args, resources; the env goes
    // there too when the Job is built), whatever its name.
    let container = containers[0]
        .as_object_mut()
        .ok_or_else(|| RunConfigError::BadTemplate("a container is not an object".into()))?;

    let template_image = container
        .get("image")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    // 1.4's `get_flow_image`: Docker storage, then the run_config's, then the default.
    let run_config_image = str_field(rc, "image")?;
    let image = storage_image(&flow.storage)
        .or(run_config_image)
        .or(template_image)
        .or_else(|| default_image.map(str::to_string))
        .unwrap_or_else(|| {
            // A local version (`1.4.1+5.gabcdef`) is no image tag: 1.4 drops the suffix.
            let version = flow.core_version.as_deref().unwrap_or("1.4.1");
            let version = version.split('+').next().unwrap_or(version);
            format!("prefecthq/prefect:{version}")
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
    // 1.4 creates the Job in the agent's namespace, whatever the template says.
    if let Some(meta) = job.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.shift_remove("namespace");
    }

    Ok(RunConfigJob {
        base_job_template: json!({
            "job_configuration": {"job_manifest": job},
            "variables": {"properties": {}}
        }),
        image,
    })
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

    fn manifest(spec: &RunConfigJob) -> &Value {
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
        let spec = kubernetes_run(&rc, &flow(), &["k8s".into()], Some("resource:1")).unwrap();
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
            kubernetes_run(rc, flow, &[], default).unwrap().image
        };
        let docker = FlowInfo {
            storage: json!({"type": "Docker", "registry_url": "reg.io/", "image_name": "etl", "image_tag": "7"}),
            ..flow()
        };
        assert_eq!(image(&template, &docker, Some("res")), "reg.io/etl:7");
        // Docker storage wins over the run_config's image too, as in 1.4.
        let with_image = json!({"type": "KubernetesRun", "image": "from-run-config:2"});
        assert_eq!(image(&with_image, &docker, Some("res")), "reg.io/etl:7");
        assert_eq!(
            image(&with_image, &flow(), Some("res")),
            "from-run-config:2"
        );
        let local = FlowInfo {
            core_version: Some("1.4.1+5.gabcdef".into()),
            ..flow()
        };
        assert_eq!(image(&Value::Null, &local, None), "prefecthq/prefect:1.4.1");
        assert_eq!(
            image(&template, &flow(), Some("res")),
            "envoy",
            "the first container's"
        );
        assert_eq!(image(&json!({}), &flow(), Some("res")), "res");
        assert_eq!(
            image(&Value::Null, &flow(), None),
            "prefecthq/prefect:1.4.1"
        );
        // 1.4 runs the flow in the first container, whatever its name: image, args and
        // (when the Job is built) env all go there; the others are left alone.
        let with_image = json!({"type": "KubernetesRun", "image": "flow:9",
            "job_template": template["job_template"].clone()});
        let spec = kubernetes_run(&with_image, &flow(), &[], None).unwrap();
        let containers = &manifest(&spec)["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers[0]["image"], "flow:9");
        assert_eq!(
            containers[0]["args"],
            json!(["prefect", "execute", "flow-run"])
        );
        assert_eq!(
            containers[1],
            json!({"name": "flow", "image": "from-template:1"})
        );
    }

    #[test]
    fn what_cannot_run_is_named() {
        let err = |rc: Value| {
            kubernetes_run(&rc, &flow(), &[], None)
                .unwrap_err()
                .to_string()
        };
        assert!(err(json!({"type": "DockerRun"})).contains("`DockerRun`"));
        assert!(
            err(json!({"type": "KubernetesRun", "job_template_path": "s3://b/job.yaml"}))
                .contains("job_template_path `s3://b/job.yaml`")
        );
        assert!(err(json!({"job_template": {"spec": {}}})).contains("containers is missing"));
    }
}
