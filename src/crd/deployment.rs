//! The `PrefectDeployment` resource: a Prefect deployment of a flow, its schedules,
//! parameters and job variables kept as declared (`crds/prefectdeployment.yaml`).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::pool::DeletionPolicy;
use super::{LocalObjectRef, PrefectApi, conditions, free_form_object};

/// A Prefect deployment, created and kept as declared by the operator.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "prefect.io",
    version = "v1alpha1",
    kind = "PrefectDeployment",
    namespaced,
    shortname = "pfd",
    status = "PrefectDeploymentStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Flow","type":"string","jsonPath":".spec.flowName"}"#,
    printcolumn = r#"{"name":"Next Run","type":"string","jsonPath":".status.nextScheduledRun"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PrefectDeploymentSpec {
    /// The Prefect API (Prefect 3) and its credentials.
    pub api: PrefectApi,
    /// The deployment's name in Prefect (default: metadata.name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// The flow, registered by this name as `flow.deploy` does.
    #[schemars(length(min = 1, max = 253))]
    pub flow_name: String,
    /// The work pool by name, or `workPoolRef`: a PrefectWorkPool in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub work_pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_pool_ref: Option<LocalObjectRef>,
    /// The pool's queue (default: the pool's default queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub work_queue: Option<String>,
    /// `path/to/file.py:flow_function`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<String>,
    /// Where the flow's code is, for the runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Prefect's pull steps, e.g. `[{prefect.deployments.steps.git_clone: {repository: …}}]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "free_form_list")]
    pub pull_steps: Vec<Value>,
    /// Default parameters of its runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub parameters: Option<Value>,
    /// The parameters' OpenAPI schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub parameter_openapi_schema: Option<Value>,
    /// Refuse runs whose parameters do not fit the schema (Prefect's default: true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforce_parameter_schema: Option<bool>,
    /// Job variables over the pool's template defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub job_variables: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A paused deployment schedules no runs.
    #[serde(default)]
    pub paused: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<ScheduleSpec>,
    /// Most runs of the deployment at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub concurrency_limit: Option<u32>,
    /// What deleting this resource does to the deployment in Prefect (default Retain).
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// One schedule: exactly one of `interval`, `cron`, `rrule`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScheduleSpec {
    /// Seconds between runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub interval: Option<u64>,
    /// A cron expression, e.g. `0 6 * * 1-5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// An iCalendar RRULE, e.g. `FREQ=WEEKLY;BYDAY=MO`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rrule: Option<String>,
    /// IANA name, e.g. `Europe/Paris` (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Interval schedules count from here (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_date: Option<String>,
    /// Cron: a day matches when day-of-month OR day-of-week does (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub day_or: Option<bool>,
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_scheduled_runs: Option<u32>,
}

/// What the operator last synced, written by server-side apply.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrefectDeploymentStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_id: Option<String>,
    /// The expected start of the deployment's next scheduled run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_scheduled_run: Option<String>,
    /// A hash of what was last sent (FNV-1a of its JSON, hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// Changes made in Prefect behind the operator's back and put back, since creation.
    #[serde(default)]
    pub drift_corrections: u64,
}

/// A list of free-form objects (pull steps).
fn free_form_list(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let item = free_form_object(generator);
    schemars::json_schema!({"type": "array", "items": item})
}
