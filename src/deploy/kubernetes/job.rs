//! Where a Job is built: a pure function from the pool's job configuration, the run, its
//! environment and the resource's Job section to one `batch/v1` Job.
//!
//! As Prefect's Kubernetes worker (`KubernetesWorkerJobConfiguration.prepare_for_flow_run`)
//! builds it, checked against its own output (tests/parity.rs): (1) the job configuration
//! rendered with the merged job variables, where the resource's `job` settings replace the
//! pool's defaults but not what the deployment or the run set; (2) Prefect's labels
//! (slugified), annotations, environment (the worker's variables first, the user's in
//! their order, `PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR` by `backoffLimit`); (3) the
//! resource's `job` section fills what that left unset; (4) what the operator fixes:
//! the Job's name (from the flow-run id), identifying labels, credentials as
//! `secretKeyRef`, `restartPolicy: Never`; (5) the resource's `job.podTemplate`, last.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use kube::api::{DeleteParams, PropagationPolicy};
use serde_json::{Map, Value, json};

use super::pod_security::violations;
use crate::backend::{Env, EnvValue, FlowRun, PoolInfo, RunAbout};
use crate::crd::{JobSpec, PullPolicy, SecretKeyRef, SecurityProfile};
use crate::scope::Scope;
use crate::work_pool::slug::{label_key, label_value as slug_value};
use crate::work_pool::template::as_text;
use crate::work_pool::{JobConfiguration, ReferenceError, References, standard_base_job_template};

/// Image when neither Prefect nor the resource names one and the server's version is
/// unknown.
pub const DEFAULT_IMAGE: &str = "prefecthq/prefect:3-latest";

/// The Python of the default image: Prefect publishes `<version>-python3.12` for every
/// 2.x release since 2.14 and every 3.x release.
pub const DEFAULT_IMAGE_PYTHON: &str = "3.12";

/// The image a run gets when nothing names one: Prefect of the server's own version, as
/// Prefect's worker runs an image of its own version. A client of another major version
/// refuses the server ("Major versions must match"), and one newer than the server may
/// send what it does not know. A development build (`+local`) gets `<major>-latest`, as
/// Prefect's own `get_prefect_image_name` does; an unknown version, `3-latest`.
pub fn default_image(server_version: Option<&str>) -> String {
    let Some(version) = server_version.map(str::trim).filter(|v| !v.is_empty()) else {
        return DEFAULT_IMAGE.into();
    };
    let local = version.split_once('+').map_or("", |(_, local)| local);
    // The release without pre-release or post-release suffixes (`3.0.0rc1` → `3.0.0`).
    let mut numbers = crate::text::release_numbers(version);
    numbers.truncate(3);
    match numbers.as_slice() {
        [major, ..] if !local.is_empty() || numbers.len() < 3 => {
            format!("prefecthq/prefect:{major}-latest")
        }
        [_, _, _] => format!(
            "prefecthq/prefect:{}-python{DEFAULT_IMAGE_PYTHON}",
            numbers.join(".")
        ),
        _ => DEFAULT_IMAGE.into(),
    }
}

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
    /// The pool's job configuration with the run's job variables (see
    /// [`configuration_for`] for a pool without a Kubernetes template).
    pub configuration: &'a JobConfiguration,
    /// What a work pool's run belongs to, for Prefect's labels; with it come Prefect 3's
    /// eviction handling. None for Prefect 1 runs, whose Jobs are as 1.4 makes them.
    pub about: Option<&'a RunAbout>,
    /// The run's environment after precedence (see `agent::env`), in order.
    pub env: &'a Env,
    /// The resource's `job` section.
    pub defaults: &'a JobSpec,
    /// Where the credential in `env` comes from.
    pub secret: Option<&'a SecretKeyRef>,
    /// Prefect variables and blocks the template refers to.
    pub references: &'a References,
    /// Where the operator may put Jobs (`--job-namespaces`).
    pub scope: &'a Scope,
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
    #[error("{0}")]
    Namespace(String),
    #[error(
        "the operator's pod policy ({level}, --pod-security) refuses spec.template.spec: {fields}"
    )]
    PodSecurity { level: &'static str, fields: String },
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

/// The configuration a Job is rendered from: the pool's, or for a pool without a
/// template (`{}`, or none) Prefect's standard Kubernetes one with the run's values.
pub fn configuration_for<'a>(
    configuration: &'a JobConfiguration,
    base_job_template: Option<&Value>,
) -> Result<Cow<'a, JobConfiguration>, JobBuildError> {
    if configuration.template.contains_key("job_manifest") {
        return Ok(Cow::Borrowed(configuration));
    }
    let none = base_job_template.is_none_or(|t| t.as_object().is_none_or(Map::is_empty));
    if !none {
        return Err(JobBuildError::NoManifest);
    }
    // Without a template the configuration's variables are the run's values.
    JobConfiguration::new(Some(standard_base_job_template()), &configuration.variables)
        .map(Cow::Owned)
        .map_err(|e| JobBuildError::Invalid(e.to_string()))
}

/// Whether a Job can be built from the pool's template: Prefect's standard Kubernetes
/// one stands in for none at all, any other must hold a job manifest. A `process` pool
/// would otherwise be Ready and crash every run.
pub fn suits_pool(pool: &PoolInfo) -> Result<(), String> {
    let template = &*pool.base_job_template;
    let empty = template.as_object().is_none_or(Map::is_empty);
    if empty
        || template
            .pointer("/job_configuration/job_manifest")
            .is_some_and(Value::is_object)
    {
        return Ok(());
    }
    Err(format!(
        "work pool `{}` is a `{}` pool: its base job template has no \
         job_configuration.job_manifest, so no Job can be built from it and every run would \
         crash. Point spec.api.workPool at a Kubernetes pool (`prefect work-pool create \
         NAME --type kubernetes`), or give this pool Prefect's Kubernetes template \
         (`prefect work-pool get-default-base-job-template --type kubernetes`)",
        pool.name, pool.kind
    ))
}

/// Builds the Job for one flow run.
pub fn build_job(input: &JobInputs<'_>) -> Result<Job, JobBuildError> {
    let configuration = input.configuration;
    // The resource's settings beat the pool's defaults, not the deployment's or the run's.
    let mut rendering = configuration.clone();
    for (name, value) in resource_variables(input.defaults, input.agent_namespace) {
        if !configuration.explicit.contains(name) {
            rendering.variables.insert(name.to_string(), value);
        }
    }
    let rendered = rendering.render(&|name| std::env::var(name).ok());
    // Prefect resolves blocks and variables after rendering.
    let rendered = match input.references.resolve(&Value::Object(rendered))? {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    let mut manifest = rendered
        .get("job_manifest")
        .filter(|m| m.is_object())
        .cloned()
        .ok_or(JobBuildError::NoManifest)?;
    // As Prefect's: the configuration's namespace when the manifest names none; without
    // one either, the resource's (where Prefect would use `default`).
    if manifest.pointer("/metadata/namespace").is_none() {
        let namespace = rendered.get("namespace").cloned().unwrap_or_else(|| {
            json!(
                input
                    .defaults
                    .namespace
                    .as_deref()
                    .unwrap_or(input.agent_namespace)
            )
        });
        manifest["metadata"]["namespace"] = namespace;
    }
    // `{{ env }}` renders an object; the environment is set whole below.
    if let Some(c) = manifest.pointer_mut("/spec/template/spec/containers/0")
        && c.get("env").is_some_and(|e| !e.is_array())
        && let Some(c) = c.as_object_mut()
    {
        c.shift_remove("env");
    }
    split_string_commands(&mut manifest);
    let mut job: Job =
        serde_json::from_value(manifest).map_err(|e| JobBuildError::Invalid(e.to_string()))?;

    let prefect_labels = prefect_labels(input.run, input.about, rendered.get("labels"));
    let annotations = rendered
        .get("annotations")
        .and_then(Value::as_object)
        .map(|a| {
            a.iter()
                .map(|(k, v)| (k.clone(), as_text(v)))
                .collect::<BTreeMap<_, _>>()
        })
        .unwrap_or_default();
    label_like_prefect(&mut job, &prefect_labels, &annotations);
    let version = input.about.and_then(|a| a.prefect_version.as_deref());
    fill_from_resource(&mut job, input.defaults, &default_image(version));
    let ours = identity_labels(input);
    fix_identity(&mut job, input, &ours)?;
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
    let mut job: Job = serde_json::from_value(value)
        .map_err(|e| JobBuildError::Invalid(format!("after podTemplate: {e}")))?;
    // Set after `podTemplate`, which may add labels but never replace the ones the
    // operator knows pods by.
    if let Some(spec) = job.spec.as_mut() {
        spec.template
            .metadata
            .get_or_insert_with(Default::default)
            .labels
            .get_or_insert_with(Default::default)
            .extend(ours);
    }
    let level = input.scope.pod_security;
    if let Some(pod) = job.spec.as_ref().and_then(|s| s.template.spec.as_ref()) {
        let refused = violations(pod, level);
        if !refused.is_empty() {
            return Err(JobBuildError::PodSecurity {
                level: level.name(),
                fields: refused.join("; "),
            });
        }
    }
    Ok(job)
}

/// Builds the Job the resource's `job` section alone makes (Prefect's standard template,
/// no job variables), so that what it asks for is judged once, in its status, instead
/// of at every run.
pub fn probe_resource(
    agent_namespace: &str,
    agent_name: &str,
    defaults: &JobSpec,
    scope: &Scope,
) -> Result<Job, JobBuildError> {
    let run = FlowRun::pending("00000000-0000-0000-0000-000000000000", "probe");
    let configuration = JobConfiguration::new(Some(standard_base_job_template()), &Map::new())
        .map_err(|e| JobBuildError::Invalid(e.to_string()))?;
    build_job(&JobInputs {
        run: &run,
        agent_namespace,
        agent_name,
        configuration: &configuration,
        about: None,
        env: &Env::default(),
        defaults,
        secret: None,
        references: &References::default(),
        scope,
    })
}

/// The labels Prefect's worker gives a run's Job, before slugifying: its own about the
/// run, pool, worker, flow and deployment, then the configuration's `labels`.
fn prefect_labels(
    run: &FlowRun,
    about: Option<&RunAbout>,
    configured: Option<&Value>,
) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut set = |k: &str, v: &str| match out.iter_mut().find(|(key, _)| key == k) {
        Some(slot) => slot.1 = v.to_string(),
        None => out.push((k.to_string(), v.to_string())),
    };
    if let Some(about) = about {
        let version = about.prefect_version.as_deref().unwrap_or_default();
        let version = version.split('+').next().unwrap_or_default();
        set(labels::FLOW_RUN_ID, &run.id);
        set("prefect.io/flow-run-name", &run.name);
        if !version.is_empty() {
            set("prefect.io/version", version);
        }
        set(labels::MANAGED_BY, "prefect");
        set("app.kubernetes.io/part-of", "prefect");
        if !version.is_empty() {
            set("app.kubernetes.io/version", version);
        }
        set("prefect.io/work-pool-name", &about.work_pool_name);
        if let Some(id) = &about.work_pool_id {
            set("prefect.io/work-pool-id", id);
        }
        set("prefect.io/worker-name", &about.worker_name);
        if let (Some(id), Some(name)) = (&run.flow_id, &about.flow_name) {
            set(labels::FLOW_ID, id);
            set("prefect.io/flow-name", name);
            set("app.kubernetes.io/name", name);
        }
        if let (Some(id), Some(name)) = (&run.deployment_id, &about.deployment_name) {
            set(labels::DEPLOYMENT_ID, id);
            set("prefect.io/deployment-name", name);
            if let Some(updated) = &about.deployment_updated {
                set("prefect.io/deployment-updated", updated);
            }
            set("app.kubernetes.io/name", name);
        }
    }
    if let Some(configured) = configured.and_then(Value::as_object) {
        for (k, v) in configured {
            set(k, &as_text(v));
        }
    }
    out
}

/// Prefect's `_slugify_labels`, `_slugify_annotations` and their propagation to the pod:
/// the Job gets its template's labels with Prefect's over them, the pod its own with
/// Prefect's over them; annotation keys are slugified, values kept.
fn label_like_prefect(
    job: &mut Job,
    prefect: &[(String, String)],
    annotations: &BTreeMap<String, String>,
) {
    // The object's own labels with Prefect's over them, every one made valid.
    let with_prefect = |own: Option<BTreeMap<String, String>>| -> BTreeMap<String, String> {
        own.unwrap_or_default()
            .into_iter()
            .chain(prefect.iter().cloned())
            .map(|(k, v)| (label_key(&k), slug_value(&v)))
            .collect()
    };
    let meta = &mut job.metadata;
    meta.labels = Some(with_prefect(meta.labels.take()));
    let mut merged: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in meta
        .annotations
        .take()
        .unwrap_or_default()
        .into_iter()
        .chain(annotations.clone())
    {
        merged.insert(label_key(&k), v);
    }
    meta.annotations = (!merged.is_empty()).then(|| merged.clone());
    let spec = job.spec.get_or_insert_with(Default::default);
    let pod_meta = spec.template.metadata.get_or_insert_with(Default::default);
    pod_meta.labels = Some(with_prefect(pod_meta.labels.take()));
    if !merged.is_empty() {
        pod_meta
            .annotations
            .get_or_insert_with(Default::default)
            .extend(merged);
    }
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

/// The resource's `job` settings under the standard template's variable names; the
/// namespace is always the resource's (its `job.namespace` or its own).
fn resource_variables(d: &JobSpec, agent_namespace: &str) -> Vec<(&'static str, Value)> {
    let namespace = d.namespace.as_deref().unwrap_or(agent_namespace);
    let mut out = vec![("namespace", json!(namespace))];
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

fn fill_from_resource(job: &mut Job, d: &JobSpec, default_image: &str) {
    let spec = job.spec.get_or_insert_with(Default::default);
    // Unset stays unset, as with Prefect's worker (Kubernetes' backoffLimit is then 6).
    if spec.backoff_limit.is_none() {
        spec.backoff_limit = d.backoff_limit;
    }
    if spec.active_deadline_seconds.is_none() {
        spec.active_deadline_seconds = d.active_deadline_seconds;
    }
    if spec.ttl_seconds_after_finished.is_none() {
        spec.ttl_seconds_after_finished = d.ttl_seconds_after_finished;
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
        c.image = Some(d.image.clone().unwrap_or_else(|| default_image.into()));
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
    // The resource's labels and annotations go on the Job and its pod.
    let pod_meta = spec.template.metadata.get_or_insert_with(Default::default);
    for meta in [&mut job.metadata, pod_meta] {
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
}

/// The `prefect.io/agent` label of a resource's Jobs: `namespace.name`, or when that is
/// longer than a label value may be, its start and a hash of the whole, so that two long
/// names never share a label (and their Jobs, counts and ends).
pub fn agent_label(namespace: &str, name: &str) -> String {
    let full = format!("{namespace}.{name}");
    let cleaned = label_value(&full);
    if full.len() <= 63 && cleaned == full {
        return cleaned;
    }
    let hash = crate::text::fnv1a(full.bytes());
    let head: String = label_value(&full).chars().take(46).collect();
    format!(
        "{}-{hash:016x}",
        head.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
    )
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

fn fix_identity(
    job: &mut Job,
    input: &JobInputs<'_>,
    ours: &BTreeMap<String, String>,
) -> Result<(), JobBuildError> {
    let run = input.run;
    let default_namespace = input
        .defaults
        .namespace
        .as_deref()
        .unwrap_or(input.agent_namespace);
    let namespace = job
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| default_namespace.to_string());
    if namespace != default_namespace {
        input
            .scope
            .run_namespace(input.agent_namespace, &namespace)
            .map_err(JobBuildError::Namespace)?;
    }
    let meta = &mut job.metadata;
    meta.name = Some(job_name(&run.id));
    meta.generate_name = None;
    meta.namespace = Some(namespace);
    meta.labels
        .get_or_insert_with(Default::default)
        .extend(ours.clone());
    let spec = job.spec.get_or_insert_with(Default::default);
    // Prefect 3's runner reads the SIGTERM behaviour; a Prefect 1 run's Job is left as 1.4 makes it.
    let env = match input.about {
        Some(_) => eviction_handling(input.env, spec.backoff_limit),
        None => Cow::Borrowed(input.env),
    };
    let pod = spec.template.spec.get_or_insert_with(Default::default);
    pod.restart_policy = Some("Never".into());
    let container = &mut pod.containers[0];
    container.env = Some(env_list(
        &env,
        container.env.take().unwrap_or_default(),
        input.secret,
    )?);
    Ok(())
}

/// The labels by which the operator knows a Job and its pod as a run's.
fn identity_labels(input: &JobInputs<'_>) -> BTreeMap<String, String> {
    let run = input.run;
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
    ours
}

/// Prefect's eviction handling: with no pod retries (`backoffLimit: 0`) the run is
/// rescheduled on SIGTERM unless the user chose otherwise; else Kubernetes owns retries
/// and the run is relinquished.
fn eviction_handling(env: &Env, backoff_limit: Option<i32>) -> Cow<'_, Env> {
    const SIGTERM: &str = "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR";
    let mut env = Cow::Borrowed(env);
    if backoff_limit == Some(0) {
        let chosen = match env.get(SIGTERM) {
            Some(EnvValue::Plain(v)) => !v.is_empty(),
            Some(EnvValue::Secret(_) | EnvValue::From(_)) => true,
            None => false,
        };
        if !chosen {
            env.to_mut().set_plain(SIGTERM, "reschedule");
        }
    } else if env.iter().any(|(_, v)| matches!(v, EnvValue::From(_))) {
        // A list-style env (Prefect keeps it a list when it holds `valueFrom`): moved last.
        env.to_mut()
            .push(SIGTERM, EnvValue::Plain("relinquish".into()));
    } else {
        env.to_mut().set_plain(SIGTERM, "relinquish");
    }
    env
}

/// The container's env: the run's environment in order (credentials by `secretKeyRef`),
/// then template entries with other names, as Prefect's worker orders them.
fn env_list(
    env: &Env,
    template: Vec<k8s_openapi::api::core::v1::EnvVar>,
    secret: Option<&SecretKeyRef>,
) -> Result<Vec<k8s_openapi::api::core::v1::EnvVar>, JobBuildError> {
    use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};
    let mut out = Vec::with_capacity(env.len() + template.len());
    for (name, value) in env.iter() {
        out.push(match value {
            EnvValue::Plain(v) => EnvVar {
                name: name.to_string(),
                value: Some(v.clone()),
                value_from: None,
            },
            EnvValue::Secret(_) => {
                let secret = secret.ok_or(JobBuildError::NoSecret)?;
                EnvVar {
                    name: name.to_string(),
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
            EnvValue::From(source) => EnvVar {
                name: name.to_string(),
                value: None,
                value_from: Some(serde_json::from_value(source.clone()).map_err(|e| {
                    JobBuildError::Invalid(format!("env `{name}`: valueFrom: {e}"))
                })?),
            },
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
    use crate::secret::SecretString;
    use crate::work_pool::Reference;
    use std::sync::Arc;

    fn run() -> FlowRun {
        FlowRun {
            flow_id: Some("f-1".into()),
            deployment_id: Some("d-1".into()),
            ..FlowRun::pending("0D3E5F2A-1111-2222-3333-444455556666", "brave-otter")
        }
    }

    fn env() -> Env {
        [
            (
                "PREFECT_API_URL",
                EnvValue::Plain("http://prefect/api".into()),
            ),
            (
                "PREFECT_API_KEY",
                EnvValue::Secret(SecretString::new("pnu_secret")),
            ),
            ("A", EnvValue::Plain("1".into())),
        ]
        .into_iter()
        .collect()
    }

    fn secret() -> SecretKeyRef {
        SecretKeyRef {
            name: "prefect-api".into(),
            key: "key".into(),
        }
    }

    /// Builds the Job of `values` (the deployment's and run's job variables) in a pool
    /// with `template` (none: the standard one).
    fn build_in(
        values: Value,
        defaults: JobSpec,
        template: Option<&Value>,
        references: &References,
        scope: &Scope,
    ) -> Result<Job, JobBuildError> {
        let run = run();
        let env = env();
        let secret = secret();
        let with_config = template.filter(|t| t.get("job_configuration").is_some());
        let configuration =
            JobConfiguration::new(with_config, values.as_object().unwrap()).unwrap();
        let configuration = configuration_for(&configuration, template)?;
        let about = RunAbout {
            work_pool_name: "k8s".into(),
            worker_name: "etl".into(),
            ..RunAbout::default()
        };
        build_job(&JobInputs {
            run: &run,
            agent_namespace: "data",
            agent_name: "etl",
            configuration: &configuration,
            about: Some(&about),
            env: &env,
            defaults: &defaults,
            secret: Some(&secret),
            references,
            scope,
        })
    }

    /// A Job without a work pool's names (as for a Prefect 1 run), with `secret`.
    fn build_without_pool(secret: Option<&SecretKeyRef>) -> Result<Job, JobBuildError> {
        let (run, env) = (run(), env());
        let configuration = JobConfiguration::new(None, &Map::new()).unwrap();
        let configuration = configuration_for(&configuration, None).unwrap();
        build_job(&JobInputs {
            run: &run,
            agent_namespace: "data",
            agent_name: "etl",
            configuration: &configuration,
            about: None,
            env: &env,
            defaults: &JobSpec::default(),
            secret,
            references: &Default::default(),
            scope: &Scope::default(),
        })
    }

    fn build(
        values: Value,
        defaults: JobSpec,
        template: Option<&Value>,
    ) -> Result<Job, JobBuildError> {
        build_in(
            values,
            defaults,
            template,
            &References::default(),
            &Scope::default(),
        )
    }

    #[test]
    fn the_reference_example_with_the_standard_template() {
        let vars = json!({"image": "repo/etl:2", "cpu_request": "500m",
                          "backoff_limit": 2, "env": {"B": "2", "A": "1"}});
        let job = build(vars, JobSpec::default(), None).unwrap();
        let v = serde_json::to_value(&job).unwrap();
        assert_eq!(
            v["metadata"]["name"],
            "prefect-run-0d3e5f2a-1111-2222-3333-444455556666"
        );
        assert!(v["metadata"].get("generateName").is_none());
        assert_eq!(
            v["metadata"]["namespace"], "data",
            "the resource's namespace replaces the pool's default"
        );
        assert_eq!(v["spec"]["backoffLimit"], 2);
        assert!(
            v["spec"].get("ttlSecondsAfterFinished").is_none(),
            "unset by Prefect and the resource: unset"
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
                "PREFECT_API_URL",
                "PREFECT_API_KEY",
                "A",
                "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"
            ],
            "the environment in its order, not sorted"
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

    /// The pod policy judges what the resource and the job variables produce, by field.
    #[test]
    fn the_pod_policy_refuses_host_access_by_field() {
        let defaults: JobSpec = serde_json::from_value(json!({"podTemplate": {"spec": {
            "hostNetwork": true, "volumes": [{"name": "root", "hostPath": {"path": "/"}}]}}}))
        .unwrap();
        let err = build(json!({}), defaults.clone(), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("baseline") && err.contains("hostNetwork") && err.contains("hostPath"),
            "{err}"
        );
        let scope = Scope {
            pod_security: super::super::pod_security::PodSecurity::Privileged,
            ..Scope::default()
        };
        assert!(build_in(json!({}), defaults, None, &References::default(), &scope).is_ok());
        assert!(probe_resource("data", "etl", &JobSpec::default(), &Scope::default()).is_ok());
    }

    /// A Prefect 1 run's Job (no work pool) is left as 1.4 makes it: no SIGTERM behaviour
    /// for Prefect 3's runner.
    #[test]
    fn a_prefect1_job_gets_no_prefect3_runner_settings() {
        let job = build_without_pool(Some(&secret())).unwrap();
        let text = serde_json::to_string(&job).unwrap();
        assert!(!text.contains("SIGTERM_BEHAVIOR"), "{text}");
    }

    /// The `namespace` job variable is followed where the operator allows it, and refused
    /// by name elsewhere.
    #[test]
    fn a_run_s_namespace_needs_the_operator_s_leave() {
        let vars = json!({"namespace": "elsewhere"});
        let err = build(vars.clone(), JobSpec::default(), None).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("`elsewhere`") && text.contains("--job-namespaces"),
            "{text}"
        );
        let scope = Scope {
            job_namespaces: crate::scope::JobNamespaces::from_list(&["elsewhere".into()]),
            ..Scope::default()
        };
        let job = build_in(
            vars,
            JobSpec::default(),
            None,
            &References::default(),
            &scope,
        )
        .unwrap();
        assert_eq!(job.metadata.namespace.as_deref(), Some("elsewhere"));
        // The pool's default namespace (`default`) is not the run's choice: the resource's wins.
        let job = build(json!({}), JobSpec::default(), None).unwrap();
        assert_eq!(job.metadata.namespace.as_deref(), Some("data"));
    }

    /// As prefect-kubernetes' `_slugify_labels`: names Kubernetes would refuse are made valid.
    #[test]
    fn a_pool_without_a_job_manifest_is_refused_at_once() {
        let pool = |kind: &str, template: Value| PoolInfo {
            name: "p".into(),
            kind: kind.into(),
            base_job_template: Arc::new(template),
        };
        assert_eq!(suits_pool(&pool("process", json!({}))), Ok(()));
        assert_eq!(suits_pool(&pool("kubernetes", Value::Null)), Ok(()));
        let standard = standard_base_job_template().clone();
        assert_eq!(suits_pool(&pool("kubernetes", standard)), Ok(()));
        let process = json!({"job_configuration": {"command": "{{ command }}"},
                             "variables": {"properties": {}}});
        let refused = suits_pool(&pool("process", process)).unwrap_err();
        assert!(
            refused.starts_with("work pool `p` is a `process` pool"),
            "{refused}"
        );
        assert!(refused.contains("--type kubernetes"), "{refused}");
        let text_manifest = json!({"job_configuration": {"job_manifest": "{{ m }}"}});
        assert!(suits_pool(&pool("kubernetes", text_manifest)).is_err());
    }

    #[test]
    fn the_default_image_follows_the_server_s_version() {
        let cases = [
            (Some("3.9.1"), "prefecthq/prefect:3.9.1-python3.12"),
            (Some("2.20.27"), "prefecthq/prefect:2.20.27-python3.12"),
            (Some("3.0.0rc1"), "prefecthq/prefect:3.0.0-python3.12"),
            (Some("3.4.1.dev3+12.gabcdef"), "prefecthq/prefect:3-latest"),
            (Some("2.20.27+local"), "prefecthq/prefect:2-latest"),
            (Some("3"), "prefecthq/prefect:3-latest"),
            (Some("garbage"), DEFAULT_IMAGE),
            (Some(""), DEFAULT_IMAGE),
            (None, DEFAULT_IMAGE),
        ];
        for (version, image) in cases {
            assert_eq!(default_image(version), image, "{version:?}");
        }
    }

    #[test]
    fn labels_and_annotation_keys_are_slugified() {
        let vars = json!({"labels": {"Team Name": "Data Team"},
                          "annotations": {"My Key": "any value: kept!"}});
        let v = serde_json::to_value(build(vars, JobSpec::default(), None).unwrap()).unwrap();
        assert_eq!(v["metadata"]["labels"]["Team-Name"], "Data-Team");
        assert_eq!(v["metadata"]["annotations"]["My-Key"], "any value: kept!");
        let pod = &v["spec"]["template"]["metadata"];
        assert_eq!(pod["labels"]["Team-Name"], "Data-Team");
        assert_eq!(pod["annotations"]["My-Key"], "any value: kept!");
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
        let err = build_without_pool(None).unwrap_err();
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

    /// `podTemplate` labels cannot pass a pod off as another run's or agent's.
    #[test]
    fn pod_template_cannot_override_the_operator_s_labels() {
        let defaults: JobSpec = serde_json::from_value(json!({"podTemplate": {"metadata": {"labels": {
            "prefect.io/flow-run-id": "victim", "prefect.io/agent": "other.agent", "extra": "ok"}}}}))
        .unwrap();
        let job = build(json!({}), defaults, None).unwrap();
        let labels = job.spec.unwrap().template.metadata.unwrap().labels.unwrap();
        assert_eq!(
            labels["prefect.io/flow-run-id"],
            "0D3E5F2A-1111-2222-3333-444455556666"
        );
        assert_eq!(labels["prefect.io/agent"], "data.etl");
        assert_eq!(labels["extra"], "ok");
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
        let picked = |explicit: Map<String, Value>| {
            let job = build(Value::Object(explicit), defaults.clone(), Some(&pool)).unwrap();
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
        let job = build_in(
            vars,
            JobSpec::default(),
            Some(&template),
            &references,
            &Scope::default(),
        )
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
    fn long_agent_names_do_not_share_a_label() {
        assert_eq!(agent_label("data", "etl"), "data.etl");
        let long = "x".repeat(70);
        let a = agent_label("ns", &format!("{long}-a"));
        let b = agent_label("ns", &format!("{long}-b"));
        assert_ne!(a, b);
        for l in [&a, &b] {
            assert!(l.len() <= 63 && label_value(l) == **l, "{l}");
        }
        assert_eq!(a, agent_label("ns", &format!("{long}-a")), "stable");
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
