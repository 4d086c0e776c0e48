//! The `PrefectAgent` resource: the seed's `Agent(...)` arguments, where work comes from,
//! and how each flow run's Job is built. `crds/prefectagent.yaml` is generated from this.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

pub use crate::flavor::Flavor;

pub mod deployment;
pub mod pool;
pub use deployment::{PrefectDeployment, PrefectDeploymentSpec, PrefectDeploymentStatus};
pub use pool::{PrefectWorkPool, PrefectWorkPoolSpec, PrefectWorkPoolStatus};

/// One Prefect agent, run by the operator.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "prefect.io",
    version = "v1alpha1",
    kind = "PrefectAgent",
    namespaced,
    shortname = "pfa",
    status = "PrefectAgentStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Flavor","type":"string","jsonPath":".spec.api.flavor"}"#,
    printcolumn = r#"{"name":"Pool","type":"string","jsonPath":".spec.api.workPool"}"#,
    printcolumn = r#"{"name":"Pool Ref","type":"string","priority":1,"jsonPath":".spec.api.workPoolRef.name"}"#,
    printcolumn = r#"{"name":"Labels","type":"string","priority":1,"jsonPath":".spec.labels"}"#,
    printcolumn = r#"{"name":"Active","type":"integer","jsonPath":".status.activeJobs"}"#,
    printcolumn = r#"{"name":"Submitted","type":"integer","jsonPath":".status.runsSubmitted"}"#,
    printcolumn = r#"{"name":"Failed","type":"integer","jsonPath":".status.runsFailed"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PrefectAgentSpec {
    /// Agent name shown in Prefect (default: metadata.name). Marks this agent's claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// Prefect 1: configuration fetched from the backend agent config with this id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_config_id: Option<String>,
    /// Prefect 1 labels: a run is offered when its labels are a subset of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Added to every flow run's environment (lowest precedence).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env_vars: BTreeMap<String, String>,
    /// Unset = poll forever, 0 = never poll, N = stop after N polls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_polls: Option<u64>,
    /// `host:port` where the agent serves /api/health and /api/poke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_address: Option<String>,
    /// Ship no logs to Prefect, from the agent or its flow runs.
    #[serde(default)]
    pub no_cloud_logs: bool,
    /// Where the work comes from.
    pub api: ApiSpec,
    /// How each flow run's Job is built.
    #[serde(default)]
    pub job: JobSpec,
    /// Longest sleep between polls, e.g. `10s`, `1m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub poll_interval: Option<String>,
    /// Most runs with live Jobs at once (unset = no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub concurrency_limit: Option<u32>,
    /// Stop polling; Jobs already started keep running.
    #[serde(default)]
    pub suspend: bool,
}

/// Another resource in the same namespace, by name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LocalObjectRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A key of a Secret in the resource's namespace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A Prefect API and its credentials: what every resource of the operator talks to.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrefectApi {
    /// Prefect 3: the API URL ending in /api (Cloud: .../api/accounts/<id>/workspaces/<id>).
    /// Prefect 1: the GraphQL endpoint (Server: http://apollo:4200/graphql).
    #[schemars(regex(pattern = r"^https?://.+"))]
    pub url: String,
    /// The API key (Bearer), read from a Secret; never written anywhere else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_secret_ref: Option<SecretKeyRef>,
    /// `user:password` for a self-hosted server with basic auth, read from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_string_secret_ref: Option<SecretKeyRef>,
}

/// The Prefect API and where to take runs from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiSpec {
    #[serde(flatten)]
    pub server: PrefectApi,
    #[serde(default)]
    pub flavor: Flavor,
    /// Prefect 3 work pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub work_pool: Option<String>,
    /// Instead of `workPool`: a PrefectWorkPool in this namespace; the agent takes its
    /// pool and is Ready only once that pool is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_pool_ref: Option<LocalObjectRef>,
    /// Prefect 3 work queues of the pool; empty = all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub work_queues: Vec<String>,
    /// Prefect 1 tenant (Cloud 1 with an API key; looked up when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Prefect 3: launch a run as soon as the server's event stream says it was
    /// scheduled (default true); polling goes on either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<bool>,
}

/// Image pull policy of the flow-run container.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// What the operator adds to flow-run pods that set no security context themselves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SecurityProfile {
    /// Nothing: the pod runs as its image says, as with Prefect's own worker (Prefect's
    /// official image runs as root in a root-owned working directory).
    #[default]
    Prefect,
    /// The "restricted" Pod Security Standard: uid/gid 1000, non-root, no privilege
    /// escalation, no capabilities, RuntimeDefault seccomp; HOME and the working directory
    /// on an emptyDir, so that Prefect's image and pull steps that write still run.
    Restricted,
}

/// What every flow run's Job gets unless Prefect's job variables say otherwise.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobSpec {
    /// Namespace of the Jobs (default: the resource's). Another namespace must be allowed
    /// by the operator (`--job-namespaces`) and hold the API key Secret under the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Image of the flow-run container (default: Prefect of the server's version,
    /// prefecthq/prefect:<version>-python3.12).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Added to the Job and its pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Pod retries of one Job, where the pool's template leaves `backoffLimit` to its
    /// default or unset (Prefect's standard template: 0, Prefect retries runs, not pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub backoff_limit: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Finished Jobs are deleted this long after they end, where the pool's template
    /// leaves `ttlSecondsAfterFinished` to its default or unset (Prefect's standard
    /// template keeps finished Jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,
    /// `prefect` (default): pods run as their image says, as with Prefect's worker;
    /// `restricted`: the restricted Pod Security Standard, with a writable HOME and
    /// working directory. A template's or `podTemplate`'s own security context wins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_profile: Option<SecurityProfile>,
    /// Applied last, over the built Job's pod template (strategic-merge style).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub pod_template: Option<serde_json::Value>,
}

/// What the operator last observed, written by server-side apply.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrefectAgentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll_time: Option<Time>,
    #[serde(default)]
    pub polls: u64,
    #[serde(default)]
    pub runs_submitted: u64,
    #[serde(default)]
    pub runs_failed: u64,
    #[serde(default)]
    pub active_jobs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Any object, kept as given (a structural schema needs the explicit marker).
pub(crate) fn free_form_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// `metav1.Condition` list keyed by `type`, so server-side apply merges by condition.
pub(crate) fn conditions(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": item,
    })
}

/// The CRD the operator installs and `crds/prefectagent.yaml` holds.
///
/// Optional enums come out of the derive as `enum: [..., null]` with `nullable: true`;
/// API servers before 1.24 reject the `null` member (with a misleading "per-version
/// schemas" error), and `nullable` alone already admits null, so it is dropped.
pub fn crd() -> CustomResourceDefinition {
    hardened::<PrefectAgent>()
}

/// Every resource kind of the operator: (file in `crds/`, its CRD).
pub fn all() -> [(&'static str, CustomResourceDefinition); 3] {
    [
        ("prefectagent.yaml", crd()),
        ("prefectworkpool.yaml", hardened::<PrefectWorkPool>()),
        ("prefectdeployment.yaml", hardened::<PrefectDeployment>()),
    ]
}

/// A kind's CRD with the bounds every spec gets (see [`bound`]).
fn hardened<K: kube::CustomResourceExt>() -> CustomResourceDefinition {
    let mut crd = K::crd();
    for version in &mut crd.spec.versions {
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            drop_null_enum_members(schema);
            if let Some(spec) = schema.properties.as_mut().and_then(|p| p.get_mut("spec")) {
                bound(spec, false);
            }
        }
    }
    crd
}

/// Longest string in the spec the API server accepts unless a field says otherwise.
pub const MAX_STRING: i64 = 1024;
/// Longest value of a map (`envVars`, `labels`, `annotations`, `nodeSelector`).
pub const MAX_MAP_VALUE: i64 = 4096;
/// Most items of a list, and most entries of a map.
pub const MAX_ITEMS: i64 = 64;

/// Bounds the API server enforces on every field of the spec: `format: uint32` alone is
/// not checked, and one PrefectAgent the operator cannot decode must not be storable;
/// sizes keep a resource (and the status that quotes it) far below etcd's limits.
fn bound(schema: &mut JSONSchemaProps, map_value: bool) {
    // A nullable field takes the zero value of any type (the API server's validator lets
    // `""`, `0` or `false` through as null: `activeDeadlineSeconds: ""` was stored and
    // could not be decoded). Not nullable, a null is pruned as if unset and a zero of
    // the wrong type is a 422.
    if schema.type_.is_some() {
        schema.nullable = None;
    }
    match schema.type_.as_deref() {
        Some("integer") => {
            // 64-bit fields stop at 2^53 - 1: the bound is a float to the API server, and
            // 2^63 - 1 rounds up and overflows there (seen on 1.20).
            const SAFE: f64 = 9_007_199_254_740_991.0;
            let (min, max) = match schema.format.as_deref() {
                Some("int32") => (i32::MIN as f64, i32::MAX as f64),
                Some("uint32") => (0.0, u32::MAX as f64),
                Some("uint64") => (0.0, SAFE),
                _ => (-SAFE, SAFE),
            };
            schema.minimum.get_or_insert(min);
            schema.maximum.get_or_insert(max);
        }
        Some("string") if schema.enum_.is_none() => {
            schema
                .max_length
                .get_or_insert(if map_value { MAX_MAP_VALUE } else { MAX_STRING });
        }
        Some("array") => {
            schema.max_items.get_or_insert(MAX_ITEMS);
        }
        Some("object") if schema.additional_properties.is_some() => {
            schema.max_properties.get_or_insert(MAX_ITEMS);
        }
        _ => {}
    }
    for child in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        bound(child, false);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(item)) = schema.items.as_mut() {
        bound(item, false);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(value)) = schema.additional_properties.as_mut() {
        bound(value, true);
    }
}

fn drop_null_enum_members(schema: &mut JSONSchemaProps) {
    if let Some(members) = schema.enum_.as_mut() {
        members.retain(|m| !m.0.is_null());
    }
    let children = schema
        .properties
        .iter_mut()
        .flat_map(|p| p.values_mut())
        .chain(schema.items.iter_mut().filter_map(|i| match i {
            JSONSchemaPropsOrArray::Schema(s) => Some(s.as_mut()),
            JSONSchemaPropsOrArray::Schemas(_) => None,
        }))
        .chain(
            schema
                .additional_properties
                .iter_mut()
                .filter_map(|a| match a {
                    JSONSchemaPropsOrBool::Schema(s) => Some(s.as_mut()),
                    JSONSchemaPropsOrBool::Bool(_) => None,
                }),
        );
    for child in children {
        drop_null_enum_members(child);
    }
}

/// The CRD as YAML, exactly what `crds/prefectagent.yaml` holds.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    serde_yaml::to_string(&crd())
}

/// The CRD kept in `crds/<file>` (see [`all`]), as YAML; None for an unknown file.
pub fn crd_yaml_of(file: &str) -> Option<Result<String, serde_yaml::Error>> {
    all()
        .into_iter()
        .find(|(f, _)| *f == file)
        .map(|(_, crd)| serde_yaml::to_string(&crd))
}

/// Every CRD as one multi-document YAML stream (what `crdgen` prints).
pub fn all_yaml() -> Result<String, serde_yaml::Error> {
    let docs = all()
        .iter()
        .map(|(_, crd)| serde_yaml::to_string(crd))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(docs.join("---\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_crds_are_current() {
        for (file, _) in all() {
            let generated = crd_yaml_of(file).unwrap().unwrap();
            let path = format!("{}/crds/{file}", env!("CARGO_MANIFEST_DIR"));
            let checked_in = std::fs::read_to_string(path).unwrap_or_default();
            assert!(
                generated == checked_in,
                "crds/{file} is stale: run `cargo run -- crdgen --file {file} > crds/{file}`"
            );
        }
    }

    #[test]
    fn the_schema_has_the_constraints_the_api_server_enforces() {
        let crd = serde_json::to_value(crd()).unwrap();
        let v = &crd["spec"]["versions"][0];
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "pfa");
        assert!(v["subresources"]["status"].is_object());
        let spec = &v["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], serde_json::json!(["api"]));
        let api = &spec["properties"]["api"];
        assert_eq!(
            api["properties"]["flavor"]["enum"],
            serde_json::json!(["prefect3", "prefect1"])
        );
        assert_eq!(api["required"], serde_json::json!(["url"]));
        assert_eq!(
            spec["properties"]["maxPolls"]["minimum"].as_f64(),
            Some(0.0)
        );
        assert_eq!(
            spec["properties"]["concurrencyLimit"]["minimum"].as_f64(),
            Some(1.0)
        );
        let status = &v["schema"]["openAPIV3Schema"]["properties"]["status"];
        assert_eq!(
            status["properties"]["conditions"]["x-kubernetes-list-type"],
            "map"
        );
        let job = &spec["properties"]["job"]["properties"];
        assert_eq!(
            job["podTemplate"]["x-kubernetes-preserve-unknown-fields"],
            true
        );
        // Optional enums have no null member (1.20 rejects it) and are not nullable: a null
        // is pruned as unset.
        assert_eq!(
            job["imagePullPolicy"]["enum"],
            serde_json::json!(["Always", "IfNotPresent", "Never"])
        );
        assert!(job["imagePullPolicy"].get("nullable").is_none());
    }

    /// Every field of the spec has a bound the API server enforces: what is stored can be
    /// decoded (`u32`, `i32`) and stays small.
    #[test]
    fn every_spec_field_is_bounded() {
        fn check(path: &str, s: &serde_json::Value, unbounded: &mut Vec<String>) {
            if !s.is_object() {
                return;
            }
            let has = |k: &str| s.get(k).is_some();
            // A nullable field lets a zero of any type through the API server's check.
            if s["nullable"] == serde_json::Value::Bool(true) && has("type") {
                unbounded.push(format!("{path} (nullable)"));
            }
            match s["type"].as_str() {
                Some("integer") if !(has("minimum") && has("maximum")) => {
                    unbounded.push(path.into())
                }
                Some("string") if !has("maxLength") && !has("enum") => unbounded.push(path.into()),
                Some("array") if !has("maxItems") => unbounded.push(path.into()),
                Some("object") if has("additionalProperties") && !has("maxProperties") => {
                    unbounded.push(path.into())
                }
                _ => {}
            }
            if let Some(props) = s["properties"].as_object() {
                for (k, v) in props {
                    check(&format!("{path}.{k}"), v, unbounded);
                }
            }
            check(&format!("{path}[]"), &s["items"], unbounded);
            check(
                &format!("{path}{{}}"),
                &s["additionalProperties"],
                unbounded,
            );
        }
        let crd = serde_json::to_value(crd()).unwrap();
        let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
        let mut unbounded = Vec::new();
        check("spec", spec, &mut unbounded);
        assert!(unbounded.is_empty(), "unbounded: {unbounded:?}");
        assert_eq!(
            spec["properties"]["concurrencyLimit"]["maximum"].as_f64(),
            Some(u32::MAX as f64)
        );
        assert_eq!(
            spec["properties"]["job"]["properties"]["ttlSecondsAfterFinished"]["maximum"].as_f64(),
            Some(i32::MAX as f64)
        );
    }
}
