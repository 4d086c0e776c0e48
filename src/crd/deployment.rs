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
    /// Most runs of the deployment at once (a limit of its own; not with
    /// `globalConcurrencyLimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub concurrency_limit: Option<u32>,
    /// A global concurrency limit, shared by name, whose slots its runs take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_concurrency_limit: Option<GlobalConcurrencyLimitSpec>,
    /// What a run does when its concurrency limit is full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_options: Option<ConcurrencyOptionsSpec>,
    /// The version's description (`type`, e.g. `git`, and `version`). Prefect Cloud
    /// keeps it; Prefect server 3.x accepts it and does not store it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_info: Option<VersionInfoSpec>,
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

/// A global concurrency limit (Prefect's `/v2/concurrency_limits`) by name. With `limit`
/// the operator creates it if missing and keeps it as declared; without, it must exist.
/// Deleting the resource never deletes it (others may share it).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GlobalConcurrencyLimitSpec {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub limit: Option<u32>,
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// Slots freed per second by decay (a rate limit); default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub slot_decay_per_second: Option<f64>,
}

/// Prefect's concurrency options of a deployment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConcurrencyOptionsSpec {
    /// `Enqueue` (wait for a slot, Prefect's default) or `CancelNew`.
    pub collision_strategy: CollisionStrategy,
    /// Seconds a run's infrastructure has to start before its slot is taken back
    /// (60 to 86400; default: the server's setting).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 86400))]
    pub grace_period_seconds: Option<u32>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum CollisionStrategy {
    #[default]
    Enqueue,
    CancelNew,
}

impl CollisionStrategy {
    /// Prefect's name for it.
    pub fn prefect_name(self) -> &'static str {
        match self {
            Self::Enqueue => "ENQUEUE",
            Self::CancelNew => "CANCEL_NEW",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VersionInfoSpec {
    /// e.g. `git`.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 253))]
    pub type_: String,
    #[schemars(length(min = 1, max = 253))]
    pub version: String,
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
    /// The global concurrency limit its runs take slots of (`globalConcurrencyLimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_concurrency_limit_id: Option<String>,
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
