//! Where a Job is built: a pure function from the pool's template, the run, its
//! environment and the resource's Job section to one `batch/v1` Job.
//!
//! Order, later wins: (1) the pool's base job template rendered with the merged job
//! variables, as Prefect's worker renders it; (2) the resource's `job` section fills what
//! that left unset; (3) what the operator fixes: the Job's name (from the flow-run id),
//! namespace (the resource's `job.namespace`, else its own), identifying labels, the run's
//! environment with credentials as `secretKeyRef`, `restartPolicy: Never`; (4) the
//! resource's `job.podTemplate`, merged over the pod template last.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, PropagationPolicy};
use serde_json::{Map, Value, json};

use crate::backend::{EnvValue, FlowRun};
use crate::crd::{JobSpec, PullPolicy, SecretKeyRef, SecurityProfile};
use crate::work_pool::template::apply_values;
use crate::work_pool::{ReferenceError, References, standard_base_job_template, template_defaults};

/// Image when neither Prefect nor the resource names one.
pub const DEFAULT_IMAGE: &str = "prefecthq/prefect:3-latest";

/// Label keys the operator puts on every Job and pod.
pub mod labels {
    pub const FLOW_RUN_ID: &str = "prefect.io/flow-run-id";
    pub const FLOW_ID: &str = "prefect.io/flow-id";
    pub const DEPLOYMENT_ID: &str = "prefect.io/deployment-id";
    pub const AGENT: &str = "prefect.io/agent";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
}

/// Everything a Job is built from.
#[derive(Debug)]
pub struct JobInputs<'a> {
    pub run: &'a FlowRun,
    /// The owning `PrefectAgent`'s namespace and name.
    pub agent_namespace: &'a str,
    pub agent_name: &'a str,
    /// Merged job variables (pool defaults < deployment < run).
    pub job_variables: &'a Map<String, Value>,
    /// The job variables the deployment or the run set; the others are pool defaults.
    pub explicit_job_variables: &'a BTreeSet<String>,
    /// The run's environment after precedence (see `agent::env`).
    pub env: &'a BTreeMap<String, EnvValue>,
    /// The pool's `base_job_template`; empty or missing → Prefect's standard one.
    pub base_job_template: Option<&'a Value>,
    /// The resource's `job` section.
    pub defaults: &'a JobSpec,
    /// Where the credential in `env` comes from.
    pub secret: Option<&'a SecretKeyRef>,
    /// Prefect variables and blocks the template refers to.
    pub references: &'a References,
}

/// Why no Job could be built: worded for the run's CRASHED message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobBuildError {
    #[error("the work pool's base job template has no job_configuration.job_manifest object")]
    NoManifest,
    #[error("the job template refers to something Prefect does not have: {0}")]
    Reference(#[from] ReferenceError),
    #[error("the rendered job manifest is not a valid Job: {0}")]
    Invalid(String),
    #[error("the run's environment holds a credential but the resource names no Secret for it")]
    NoSecret,
}

/// The Job's name: one per flow run, so a second create is `AlreadyExists`.
pub fn job_name(run_id: &str) -> String {
    format!("prefect-run-{}", run_id.to_ascii_lowercase())
}

/// How the operator deletes a Job: at once, its pods by the garbage collector.
pub fn in_background() -> DeleteParams {
    DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    }
}

/// Builds the Job for one flow run.
pub fn build_job(input: &JobInputs<'_>) -> Result<Job, JobBuildError> {
    // The backend merged the pool's own defaults into the job variables; only the
    // standard template, used when the pool has none, brings defaults of its own.
    let (template, mut values) = match input.base_job_template {
        Some(t) if t.pointer("/job_configuration/job_manifest").is_some() => {
            (t, input.job_variables.clone())
        }
        Some(t) if t.as_object().is_some_and(|o| !o.is_empty()) => {
            return Err(JobBuildError::NoManifest);
        }
        _ => {
            let standard = standard_base_job_template();
            let mut values = template_defaults(standard);
            values.extend(input.job_variables.clone());
            (standard, values)
        }
    };
    let manifest = template
        .pointer("/job_configuration/job_manifest")
        .filter(|m| m.is_object())
        .ok_or(JobBuildError::NoManifest)?;

    // The resource's settings beat the pool's defaults, not the deployment's or the run's.
    for (name, value) in resource_variables(input.defaults) {
        if !input.explicit_job_variables.contains(name) {
            values.insert(name.to_string(), value);
        }
    }
    // The environment is set whole in step 3; rendering only needs it out of the way.
    values.remove("env");
    let job = apply_values(manifest, &values, &|name| std::env::var(name).ok())
        .unwrap_or_else(|| json!({}));
    // Prefect resolves blocks and variables after rendering.
    let mut job = input.references.resolve(&job)?;
    split_string_commands(&mut job);
    let mut job: Job =
        serde_json::from_value(job).map_err(|e| JobBuildError::Invalid(e.to_string()))?;

    fill_from_resource(&mut job, input.defaults);
    fix_identity(&mut job, input)?;
    if input.defaults.security_profile == Some(SecurityProfile::Restricted) {
        restrict(&mut job);
    }
    let mut value =
        serde_json::to_value(&job).map_err(|e| JobBuildError::Invalid(e.to_string()))?;
    if let (Some(overrides), Some(pod)) = (
        &input.defaults.pod_template,
        value.pointer_mut("/spec/template"),
    ) {
        strategic_merge(pod, overrides);
    }
    serde_json::from_value(value)
        .map_err(|e| JobBuildError::Invalid(format!("after podTemplate: {e}")))
}

/// The user pods of the `restricted` profile run as when the template does not say.
pub const RESTRICTED_USER: i64 = 1000;

/// Where the `restricted` profile's writable emptyDir is mounted: HOME and the working
/// directory (beside Prefect's image's root-owned `/opt/prefect`, whose entrypoint it
/// must not hide).
pub const RESTRICTED_WORKDIR: &str = "/opt/prefect/work";

/// The `restricted` profile: pods and containers that have no security context get the
/// "restricted" Pod Security Standard's (non-root uid/gid 1000, no privilege escalation,
/// no capabilities, RuntimeDefault seccomp), and containers without a working directory
/// get HOME and their working directory on an emptyDir, since a uid other than the
/// image's cannot write where Prefect's image puts them (what real pods showed).
/// A template's or `podTemplate`'s own security context wins.
fn restrict(job: &mut Job) {
    use k8s_openapi::api::core::v1::{
        Capabilities, EmptyDirVolumeSource, EnvVar, PodSecurityContext, SeccompProfile,
        SecurityContext, Volume, VolumeMount,
    };
    const VOLUME: &str = "prefect-workdir";
    let Some(pod) = job.spec.as_mut().and_then(|s| s.template.spec.as_mut()) else {
        return;
    };
    if pod.security_context.is_none() {
        pod.security_context = Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RESTRICTED_USER),
            run_as_group: Some(RESTRICTED_USER),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        });
    }
    let mut needs_volume = false;
    for c in pod
        .containers
        .iter_mut()
        .chain(pod.init_containers.iter_mut().flatten())
    {
        if c.security_context.is_none() {
            c.security_context = Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".into()]),
                    ..Capabilities::default()
                }),
                ..SecurityContext::default()
            });
        }
        if c.working_dir.is_none() {
            needs_volume = true;
            c.working_dir = Some(RESTRICTED_WORKDIR.into());
            c.volume_mounts
                .get_or_insert_with(Vec::new)
                .push(VolumeMount {
                    name: VOLUME.into(),
                    mount_path: RESTRICTED_WORKDIR.into(),
                    ..VolumeMount::default()
                });
            let env = c.env.get_or_insert_with(Vec::new);
            if !env.iter().any(|e| e.name == "HOME") {
                env.push(EnvVar {
                    name: "HOME".into(),
                    value: Some(RESTRICTED_WORKDIR.into()),
                    ..EnvVar::default()
                });
            }
        }
    }
    if needs_volume {
        pod.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: VOLUME.into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        });
    }
}

/// `args: "prefect flow-run execute"` (a rendered `{{ command }}`) becomes a list.
fn split_string_commands(job: &mut Value) {
    let Some(containers) = job
        .pointer_mut("/spec/template/spec/containers")
        .and_then(Value::as_array_mut)
    else {
        return;
    };
    for c in containers {
        for key in ["args", "command"] {
            if let Some(Value::String(line)) = c.get(key) {
                let argv = shlex::split(line).unwrap_or_else(|| vec![line.clone()]);
                c[key] = json!(argv);
            }
        }
    }
}

/// The resource's `job` settings under the standard template's variable names.
fn resource_variables(d: &JobSpec) -> Vec<(&'static str, Value)> {
    let mut out = Vec::new();
    if let Some(image) = &d.image {
        out.push(("image", json!(image)));
    }
    if let Some(policy) = d.image_pull_policy {
        out.push(("image_pull_policy", json!(pull_policy(policy))));
    }
    if let Some(account) = &d.service_account_name {
        out.push(("service_account_name", json!(account)));
    }
    if let Some(limit) = d.backoff_limit {
        out.push(("backoff_limit", json!(limit)));
    }
    if let Some(ttl) = d.ttl_seconds_after_finished {
        out.push(("finished_job_ttl", json!(ttl)));
    }
    out
}

fn pull_policy(p: PullPolicy) -> &'static str {
    match p {
        PullPolicy::Always => "Always",
        PullPolicy::IfNotPresent => "IfNotPresent",
        PullPolicy::Never => "Never",
    }
}

fn fill_from_resource(job: &mut Job, d: &JobSpec) {
    let spec = job.spec.get_or_insert_with(Default::default);
    if spec.backoff_limit.is_none() {
        spec.backoff_limit = Some(d.backoff_limit.unwrap_or(0));
    }
    if spec.active_deadline_seconds.is_none() {
        spec.active_deadline_seconds = d.active_deadline_seconds;
    }
    if spec.ttl_seconds_after_finished.is_none() {
        spec.ttl_seconds_after_finished = Some(d.ttl_seconds_after_finished.unwrap_or(3600));
    }
    let pod = spec.template.spec.get_or_insert_with(Default::default);
    if pod.service_account_name.is_none() {
        pod.service_account_name = d.service_account_name.clone();
    }
    if pod.image_pull_secrets.as_ref().is_none_or(Vec::is_empty) && !d.image_pull_secrets.is_empty()
    {
        pod.image_pull_secrets = Some(
            d.image_pull_secrets
                .iter()
                .map(|name| k8s_openapi::api::core::v1::LocalObjectReference { name: name.clone() })
                .collect(),
        );
    }
    if pod.node_selector.as_ref().is_none_or(BTreeMap::is_empty) && !d.node_selector.is_empty() {
        pod.node_selector = Some(d.node_selector.clone());
    }
    if pod.tolerations.as_ref().is_none_or(Vec::is_empty) && !d.tolerations.is_empty() {
        pod.tolerations = Some(d.tolerations.clone());
    }
    if pod.containers.is_empty() {
        pod.containers.push(k8s_openapi::api::core::v1::Container {
            name: "prefect-job".into(),
            ..Default::default()
        });
    }
    let c = &mut pod.containers[0];
    if c.image.as_deref().is_none_or(str::is_empty) {
        c.image = Some(d.image.clone().unwrap_or_else(|| DEFAULT_IMAGE.into()));
    }
    if let (None, Some(policy)) = (&c.image_pull_policy, d.image_pull_policy) {
        c.image_pull_policy = Some(pull_policy(policy).into());
    }
    let empty_resources = c.resources.as_ref().is_none_or(|r| {
        r.limits.as_ref().is_none_or(BTreeMap::is_empty)
            && r.requests.as_ref().is_none_or(BTreeMap::is_empty)
    });
    if empty_resources && d.resources.is_some() {
        c.resources = d.resources.clone();
    }
    if c.args.as_ref().is_none_or(Vec::is_empty) && c.command.as_ref().is_none_or(Vec::is_empty) {
        c.args = Some(
            ["prefect", "flow-run", "execute"]
                .map(String::from)
                .to_vec(),
        );
    }
    let meta = &mut job.metadata;
    for (k, v) in &d.labels {
        meta.labels
            .get_or_insert_with(Default::default)
            .entry(k.clone())
            .or_insert(v.clone());
    }
    for (k, v) in &d.annotations {
        meta.annotations
            .get_or_insert_with(Default::default)
            .entry(k.clone())
            .or_insert(v.clone());
    }
}

/// The `prefect.io/agent` label of a resource's Jobs.
pub fn agent_label(namespace: &str, name: &str) -> String {
    label_value(&format!("{namespace}.{name}"))
}

/// A label value: at most 63 of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
pub fn label_value(raw: &str) -> String {
    let cleaned: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    cleaned
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

fn fix_identity(job: &mut Job, input: &JobInputs<'_>) -> Result<(), JobBuildError> {
    let run = input.run;
    let namespace = input
        .defaults
        .namespace
        .clone()
        .unwrap_or_else(|| input.agent_namespace.to_string());
    let mut ours = BTreeMap::from([
        (labels::FLOW_RUN_ID.to_string(), label_value(&run.id)),
        (
            labels::AGENT.to_string(),
            agent_label(input.agent_namespace, input.agent_name),
        ),
        (labels::MANAGED_BY.to_string(), crate::APP_NAME.to_string()),
    ]);
    if let Some(flow) = &run.flow_id {
        ours.insert(labels::FLOW_ID.into(), label_value(flow));
    }
    if let Some(dep) = &run.deployment_id {
        ours.insert(labels::DEPLOYMENT_ID.into(), label_value(dep));
    }
    let meta = &mut job.metadata;
    meta.name = Some(job_name(&run.id));
    meta.generate_name = None;
    meta.namespace = Some(namespace);
    let job_labels = meta.labels.get_or_insert_with(Default::default);
    job_labels.extend(ours.clone());
    let all_labels = job_labels.clone();
    let annotations = meta.annotations.clone();
    let spec = job.spec.get_or_insert_with(Default::default);
    let template_meta = spec.template.metadata.get_or_insert_with(Default::default);
    template_meta
        .labels
        .get_or_insert_with(Default::default)
        .extend(all_labels);
    if let Some(a) = annotations {
        template_meta
            .annotations
            .get_or_insert_with(Default::default)
            .extend(a);
    }
    let pod = spec.template.spec.get_or_insert_with(Default::default);
    pod.restart_policy = Some("Never".into());
    let backoff = spec.backoff_limit.unwrap_or(0);
    let container = &mut pod.containers[0];
    container.env = Some(env_list(
        input.env,
        container.env.take().unwrap_or_default(),
        input.secret,
        backoff,
    )?);
    Ok(())
}

/// The container's env: the run's environment first (credentials by `secretKeyRef`),
/// then template entries with other names, as Prefect's worker orders them.
fn env_list(
    env: &BTreeMap<String, EnvValue>,
    template: Vec<k8s_openapi::api::core::v1::EnvVar>,
    secret: Option<&SecretKeyRef>,
    backoff_limit: i32,
) -> Result<Vec<k8s_openapi::api::core::v1::EnvVar>, JobBuildError> {
    use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};
    let mut out = Vec::with_capacity(env.len() + template.len() + 1);
    for (name, value) in env {
        out.push(match value {
            EnvValue::Plain(v) => EnvVar {
                name: name.clone(),
                value: Some(v.clone()),
                value_from: None,
            },
            EnvValue::Secret(_) => {
                let secret = secret.ok_or(JobBuildError::NoSecret)?;
                EnvVar {
                    name: name.clone(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: secret.name.clone(),
                            key: secret.key.clone(),
                            optional: Some(false),
                        }),
                        ..Default::default()
                    }),
                }
            }
        });
    }
    // Evicted pods: with no pod retries Prefect reschedules the run, else Kubernetes owns retries.
    const SIGTERM: &str = "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR";
    if backoff_limit != 0 {
        out.retain(|e| e.name != SIGTERM);
        out.push(EnvVar {
            name: SIGTERM.into(),
            value: Some("relinquish".into()),
            value_from: None,
        });
    } else if !env.contains_key(SIGTERM) {
        out.push(EnvVar {
            name: SIGTERM.into(),
            value: Some("reschedule".into()),
            value_from: None,
        });
    }
    for e in template {
        if !out.iter().any(|o| o.name == e.name) {
            out.push(e);
        }
    }
    Ok(out)
}

/// Merges `patch` into `target` the way a strategic merge patch treats a pod: objects
/// merge key by key, lists of named objects (containers, volumes, env) merge by `name`,
/// other lists are replaced, `null` deletes.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, pv) in p {
                if pv.is_null() {
                    t.remove(k);
                } else if let Some(tv) = t.get_mut(k) {
                    strategic_merge(tv, pv);
                } else {
                    t.insert(k.clone(), pv.clone());
                }
            }
        }
        (Value::Array(t), Value::Array(p)) if is_named_list(t) && is_named_list(p) => {
            for item in p {
                let name = &item["name"];
                match t.iter_mut().find(|x| &x["name"] == name) {
                    Some(existing) => strategic_merge(existing, item),
                    None => t.push(item.clone()),
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn is_named_list(items: &[Value]) -> bool {
    !items.is_empty()
        && items
            .iter()
            .all(|i| i.get("name").is_some_and(Value::is_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::StateKind;
    use crate::secret::SecretString;
    use crate::work_pool::Reference;

    fn run() -> FlowRun {
        FlowRun {
            id: "0D3E5F2A-1111-2222-3333-444455556666".into(),
            name: "brave-otter".into(),
            flow_id: Some("f-1".into()),
            deployment_id: Some("d-1".into()),
            state: StateKind::Pending,
            state_since: None,
            state_message: None,
            scheduled_start: None,
            job_variables: Map::new(),
            infrastructure_pid: None,
        }
    }

    fn env() -> BTreeMap<String, EnvValue> {
        BTreeMap::from([
            (
                "PREFECT_API_URL".into(),
                EnvValue::Plain("http://prefect/api".into()),
            ),
            (
                "PREFECT_API_KEY".into(),
                EnvValue::Secret(SecretString::new("pnu_secret")),
            ),
            ("A".into(), EnvValue::Plain("1".into())),
        ])
    }

    fn secret() -> SecretKeyRef {
        SecretKeyRef {
            name: "prefect-api".into(),
            key: "key".into(),
        }
    }

    fn build(
        vars: Value,
        defaults: JobSpec,
        template: Option<&Value>,
    ) -> Result<Job, JobBuildError> {
        let run = run();
        let env = env();
        let secret = secret();
        build_job(&JobInputs {
            run: &run,
            agent_namespace: "data",
            agent_name: "etl",
            job_variables: vars.as_object().unwrap(),
            explicit_job_variables: &vars.as_object().unwrap().keys().cloned().collect(),
            env: &env,
            base_job_template: template,
            defaults: &defaults,
            secret: Some(&secret),
            references: &Default::default(),
        })
    }

    #[test]
    fn the_reference_example_with_the_standard_template() {
        let vars = json!({"image": "repo/etl:2", "cpu_request": "500m", "namespace": "elsewhere",
                          "backoff_limit": 2, "env": {"A": "1", "B": "2"}});
        let job = build(vars, JobSpec::default(), None).unwrap();
        let v = serde_json::to_value(&job).unwrap();
        assert_eq!(
            v["metadata"]["name"],
            "prefect-run-0d3e5f2a-1111-2222-3333-444455556666"
        );
        assert!(v["metadata"].get("generateName").is_none());
        assert_eq!(
            v["metadata"]["namespace"], "data",
            "Jobs stay in the resource's namespace"
        );
        assert_eq!(v["spec"]["backoffLimit"], 2);
        assert_eq!(
            v["spec"]["ttlSecondsAfterFinished"], 3600,
            "unset by Prefect → the resource's default"
        );
        let c = &v["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["name"], "prefect-job");
        assert_eq!(c["image"], "repo/etl:2");
        assert_eq!(c["imagePullPolicy"], "IfNotPresent");
        assert_eq!(
            c["resources"],
            json!({"limits": {}, "requests": {"cpu": "500m"}})
        );
        assert_eq!(c["args"], json!(["prefect", "flow-run", "execute"]));
        assert_eq!(v["spec"]["template"]["spec"]["restartPolicy"], "Never");
        let names: Vec<&str> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "A",
                "PREFECT_API_KEY",
                "PREFECT_API_URL",
                "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"
            ]
        );
        let sigterm = &c["env"][3]["value"];
        assert_eq!(
            sigterm, "relinquish",
            "backoffLimit 2: Kubernetes owns retries"
        );
        let labels = &v["spec"]["template"]["metadata"]["labels"];
        assert_eq!(
            labels["prefect.io/flow-run-id"],
            "0D3E5F2A-1111-2222-3333-444455556666"
        );
        assert_eq!(labels["prefect.io/agent"], "data.etl");
        assert_eq!(labels["prefect.io/deployment-id"], "d-1");
        assert_eq!(
            v["metadata"]["labels"], *labels,
            "Job and pod carry the same labels"
        );
    }

    #[test]
    fn the_key_is_a_secret_key_ref_never_a_literal() {
        let job = build(json!({}), JobSpec::default(), None).unwrap();
        let text = serde_json::to_string(&job).unwrap();
        assert!(!text.contains("pnu_secret"), "{text}");
        let v = serde_json::to_value(&job).unwrap();
        let key = v["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "PREFECT_API_KEY")
            .cloned()
            .unwrap();
        assert_eq!(
            key["valueFrom"]["secretKeyRef"],
            json!({"name": "prefect-api", "key": "key", "optional": false})
        );
        let run = run();
        let env = env();
        let err = build_job(&JobInputs {
            run: &run,
            agent_namespace: "data",
            agent_name: "etl",
            job_variables: &Map::new(),
            explicit_job_variables: &BTreeSet::new(),
            env: &env,
            base_job_template: None,
            defaults: &JobSpec::default(),
            secret: None,
            references: &Default::default(),
        })
        .unwrap_err();
        assert_eq!(err, JobBuildError::NoSecret);
    }

    #[test]
    fn the_resource_fills_what_prefect_leaves_unset_and_pod_template_applies_last() {
        let defaults: JobSpec = serde_json::from_value(json!({
            "namespace": "jobs", "image": "mine:1", "serviceAccountName": "runner",
            "imagePullSecrets": ["regcred"], "imagePullPolicy": "Always",
            "resources": {"requests": {"memory": "1Gi"}}, "nodeSelector": {"pool": "batch"},
            "labels": {"team": "data"}, "backoffLimit": 0, "activeDeadlineSeconds": 600,
            "ttlSecondsAfterFinished": 60,
            "podTemplate": {"spec": {"priorityClassName": "low",
                "containers": [{"name": "prefect-job", "resources": {"limits": {"memory": "2Gi"}}}]}}
        }))
        .unwrap();
        let job = build(json!({"image": "from-prefect:2"}), defaults, None).unwrap();
        let v = serde_json::to_value(&job).unwrap();
        assert_eq!(v["metadata"]["namespace"], "jobs");
        assert_eq!(v["metadata"]["labels"]["team"], "data");
        assert_eq!(v["spec"]["activeDeadlineSeconds"], 600);
        assert_eq!(v["spec"]["ttlSecondsAfterFinished"], 60);
        let pod = &v["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], "runner");
        assert_eq!(pod["imagePullSecrets"], json!([{"name": "regcred"}]));
        assert_eq!(pod["nodeSelector"], json!({"pool": "batch"}));
        assert_eq!(pod["priorityClassName"], "low");
        let c = &pod["containers"][0];
        assert_eq!(
            c["image"], "from-prefect:2",
            "Prefect's job variables win over the resource"
        );
        assert_eq!(c["imagePullPolicy"], "Always");
        assert_eq!(
            c["resources"],
            json!({"requests": {"memory": "1Gi"}, "limits": {"memory": "2Gi"}})
        );
        let sigterm = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR")
            .unwrap();
        assert_eq!(sigterm["value"], "reschedule");
    }

    /// The default adds nothing, as Prefect's worker: the image decides the user.
    #[test]
    fn pods_run_as_their_image_says_by_default() {
        let v = serde_json::to_value(build(json!({}), JobSpec::default(), None).unwrap()).unwrap();
        let pod = &v["spec"]["template"]["spec"];
        assert!(pod.get("securityContext").is_none(), "{pod}");
        assert!(pod["containers"][0].get("securityContext").is_none());
        assert!(pod.get("volumes").is_none());
    }

    #[test]
    fn the_restricted_profile_gives_a_writable_home_and_working_directory() {
        let restricted: JobSpec =
            serde_json::from_value(json!({"securityProfile": "restricted"})).unwrap();
        let job = build(json!({}), restricted.clone(), None).unwrap();
        let v = serde_json::to_value(&job).unwrap();
        let pod = &v["spec"]["template"]["spec"];
        assert_eq!(
            pod["securityContext"],
            json!({"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000,
                   "seccompProfile": {"type": "RuntimeDefault"}})
        );
        let c = &pod["containers"][0];
        assert_eq!(
            c["securityContext"],
            json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}})
        );
        assert_eq!(c["workingDir"], RESTRICTED_WORKDIR);
        assert_eq!(
            c["volumeMounts"],
            json!([{"name": "prefect-workdir", "mountPath": RESTRICTED_WORKDIR}])
        );
        assert_eq!(
            pod["volumes"],
            json!([{"name": "prefect-workdir", "emptyDir": {}}])
        );
        let home: Vec<_> = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["name"] == "HOME")
            .collect();
        assert_eq!(
            home,
            vec![&json!({"name": "HOME", "value": RESTRICTED_WORKDIR})]
        );

        // An image that must run as root: the resource says so in podTemplate.
        let mut defaults = restricted.clone();
        defaults.pod_template = Some(json!({"spec": {
            "securityContext": {"runAsNonRoot": false, "runAsUser": 0}}}));
        let v = serde_json::to_value(build(json!({}), defaults, None).unwrap()).unwrap();
        let sc = &v["spec"]["template"]["spec"]["securityContext"];
        assert_eq!(
            (&sc["runAsNonRoot"], &sc["runAsUser"]),
            (&json!(false), &json!(0))
        );
        // A pool template that sets its own keeps it whole, and its own working directory
        // and HOME are left alone.
        let mut template = standard_base_job_template().clone();
        let spec = &mut template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"];
        spec["securityContext"] = json!({"fsGroup": 2000});
        spec["containers"][0]["workingDir"] = json!("/work");
        let v =
            serde_json::to_value(build(json!({}), restricted, Some(&template)).unwrap()).unwrap();
        let pod = &v["spec"]["template"]["spec"];
        assert_eq!(pod["securityContext"], json!({"fsGroup": 2000}));
        assert_eq!(pod["containers"][0]["workingDir"], "/work");
        assert!(pod.get("volumes").is_none());
    }

    /// Pool defaults < the resource's `job` section < the deployment's and run's variables.
    #[test]
    fn the_resource_beats_pool_defaults_but_not_deployments() {
        let defaults: JobSpec = serde_json::from_value(json!({
            "image": "mine:1", "imagePullPolicy": "Always", "serviceAccountName": "runner",
            "backoffLimit": 3, "ttlSecondsAfterFinished": 60
        }))
        .unwrap();
        let mut pool = standard_base_job_template().clone();
        for (var, default) in [
            ("image", json!("pool:1")),
            ("image_pull_policy", json!("Never")),
            ("service_account_name", json!("pool-sa")),
            ("backoff_limit", json!(1)),
            ("finished_job_ttl", json!(10)),
        ] {
            pool["variables"]["properties"][var]["default"] = default;
        }
        let pool_defaults = template_defaults(&pool);
        let picked = |explicit: Map<String, Value>| {
            let mut vars = pool_defaults.clone();
            vars.extend(explicit.clone());
            let run = run();
            let env = env();
            let secret = secret();
            let job = build_job(&JobInputs {
                run: &run,
                agent_namespace: "data",
                agent_name: "etl",
                job_variables: &vars,
                explicit_job_variables: &explicit.keys().cloned().collect(),
                env: &env,
                base_job_template: Some(&pool),
                defaults: &defaults,
                secret: Some(&secret),
                references: &Default::default(),
            })
            .unwrap();
            let v = serde_json::to_value(&job).unwrap();
            let pod = &v["spec"]["template"]["spec"];
            json!([
                pod["containers"][0]["image"],
                pod["containers"][0]["imagePullPolicy"],
                pod["serviceAccountName"],
                v["spec"]["backoffLimit"],
                v["spec"]["ttlSecondsAfterFinished"],
            ])
        };
        assert_eq!(
            picked(Map::new()),
            json!(["mine:1", "Always", "runner", 3, 60]),
            "the resource replaces the pool's defaults"
        );
        let deployment = json!({"image": "dep:2", "backoff_limit": 0, "finished_job_ttl": 5});
        assert_eq!(
            picked(deployment.as_object().unwrap().clone()),
            json!(["dep:2", "Always", "runner", 0, 5]),
            "the deployment's variables replace the resource's"
        );
    }

    #[test]
    fn bad_templates_are_named() {
        let no_manifest =
            json!({"job_configuration": {"command": "{{ command }}"}, "variables": {}});
        assert_eq!(
            build(json!({}), JobSpec::default(), Some(&no_manifest)).unwrap_err(),
            JobBuildError::NoManifest
        );
        let block = json!({"job_configuration": {"job_manifest": {"apiVersion": "batch/v1", "kind": "Job",
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "{{ prefect.blocks.secret.img }}"}]}}}}},
            "variables": {"properties": {}}});
        let err = build(json!({}), JobSpec::default(), Some(&block)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the job template refers to something Prefect does not have: block `img` of type `secret` does not exist; it is referenced by the deployment or work pool configuration"
        );
        let bad = json!({"job_configuration": {"job_manifest": {"spec": {"backoffLimit": "many"}}},
            "variables": {"properties": {}}});
        assert!(matches!(
            build(json!({}), JobSpec::default(), Some(&bad)).unwrap_err(),
            JobBuildError::Invalid(_)
        ));
    }

    #[test]
    fn prefect_variables_and_blocks_resolve_after_rendering() {
        let run = run();
        let env = env();
        let secret = secret();
        let vars = json!({"image": "{{ prefect.variables.etl_image }}"});
        let mut template = standard_base_job_template().clone();
        template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["nodeSelector"] =
            json!({"pool": "{{ prefect.blocks.string.node-pool }}"});
        let references = References {
            variables: json!({"etl_image": "repo/etl:7"})
                .as_object()
                .unwrap()
                .clone(),
            blocks: [(
                Reference::Block {
                    slug: "string".into(),
                    name: "node-pool".into(),
                },
                json!({"value": "batch"}),
            )]
            .into(),
        };
        let job = build_job(&JobInputs {
            run: &run,
            agent_namespace: "data",
            agent_name: "etl",
            job_variables: vars.as_object().unwrap(),
            explicit_job_variables: &BTreeSet::from(["image".to_string()]),
            env: &env,
            base_job_template: Some(&template),
            defaults: &JobSpec::default(),
            secret: Some(&secret),
            references: &references,
        })
        .unwrap();
        let pod = job.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.containers[0].image.as_deref(), Some("repo/etl:7"));
        assert_eq!(
            pod.node_selector,
            Some([("pool".to_string(), "batch".to_string())].into())
        );
    }

    #[test]
    fn the_embedded_standard_template_parses() {
        let t = standard_base_job_template();
        assert!(
            t.pointer("/job_configuration/job_manifest/spec/template/spec/containers")
                .is_some()
        );
    }

    #[test]
    fn label_values_follow_kubernetes_rules() {
        assert_eq!(label_value("data.etl"), "data.etl");
        assert_eq!(label_value("-a b/c-"), "a_b_c");
        assert_eq!(label_value(&"x".repeat(80)).len(), 63);
    }

    #[test]
    fn strategic_merge_merges_named_lists() {
        let mut t = json!({"containers": [{"name": "a", "image": "1"}], "volumes": [], "x": 1});
        strategic_merge(
            &mut t,
            &json!({"containers": [{"name": "a", "image": "2"}, {"name": "b"}], "x": null}),
        );
        assert_eq!(
            t,
            json!({"containers": [{"name": "a", "image": "2"}, {"name": "b"}], "volumes": []})
        );
    }
}
