//! The `PrefectWorkPool` resource: a Prefect work pool, its base job template and its
//! queues kept as declared (`crds/prefectworkpool.yaml` is generated from this).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{PrefectApi, conditions, free_form_object};

/// A Prefect work pool, created and kept as declared by the operator.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "prefect.io",
    version = "v1alpha1",
    kind = "PrefectWorkPool",
    namespaced,
    shortname = "pfwp",
    status = "PrefectWorkPoolStatus",
    derive = "Default",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".spec.type"}"#,
    printcolumn = r#"{"name":"Pool ID","type":"string","priority":1,"jsonPath":".status.poolId"}"#,
    printcolumn = r#"{"name":"Last Sync","type":"date","jsonPath":".status.lastSyncTime"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PrefectWorkPoolSpec {
    /// The Prefect API (Prefect 3, or 2.10 and later) and its credentials.
    pub api: PrefectApi,
    /// The pool's name in Prefect (default: metadata.name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name: Option<String>,
    /// The pool's type (default `kubernetes`). Prefect cannot change a pool's type.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Most runs of the pool at once (unset = no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_limit: Option<u32>,
    /// A paused pool hands out no runs.
    #[serde(default)]
    pub paused: bool,
    /// What every Job of the pool is built from (default: Prefect's standard Kubernetes
    /// template for a `kubernetes` pool, none for other types).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_job_template: Option<BaseJobTemplate>,
    /// Queues of the pool kept as declared; queues not listed are left alone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<WorkQueueSpec>,
    /// What deleting this resource does to the pool in Prefect: `Retain` (default)
    /// leaves it, `Delete` deletes it once no flow run of it is unfinished.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

impl PrefectWorkPool {
    /// The pool's name in Prefect.
    pub fn pool_name(&self) -> String {
        use kube::ResourceExt;
        self.spec.name.clone().unwrap_or_else(|| self.name_any())
    }

    /// Why what refers to this resource must wait for it, or None once it is Ready for
    /// its current generation (its pool then exists in Prefect as declared).
    pub fn not_ready(&self) -> Option<String> {
        let ready = self.status.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .filter(|c| c.observed_generation == self.metadata.generation)
        });
        match ready {
            Some(c) if c.status == "True" => None,
            Some(c) => Some(format!("to be Ready: {}", c.message)),
            None => Some("to be synced".into()),
        }
    }
}

/// Where the base job template comes from: `inline` or a ConfigMap key (JSON or YAML),
/// else Prefect's standard one; `defaults` then replaces its variables' defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BaseJobTemplate {
    /// The template as Prefect stores it: `job_configuration` and `variables`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub inline: Option<Value>,
    /// A key of a ConfigMap in this namespace holding the template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_key_ref: Option<ConfigMapKeyRef>,
    /// New defaults of the template's variables, e.g. `{image: repo/flows:1}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "free_form_object")]
    pub defaults: BTreeMap<String, Value>,
}

/// A key of a ConfigMap in the resource's namespace.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ConfigMapKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// One work queue of the pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkQueueSpec {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Lower is served first (Prefect's default: after the existing queues).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_limit: Option<u32>,
    #[serde(default)]
    pub paused: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// What deleting the resource does to what it made in Prefect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// Nothing: the pool stays in Prefect.
    #[default]
    Retain,
    /// The pool is deleted in Prefect, once none of its flow runs is unfinished.
    Delete,
}

/// What the operator last synced, written by server-side apply.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrefectWorkPoolStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready, Progressing, Degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_id: Option<String>,
    /// The declared queues' ids, by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub queue_ids: BTreeMap<String, String>,
    /// A hash of the base job template last sent (FNV-1a of its JSON, hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,
    /// Changes made in Prefect behind the operator's back and put back, since creation.
    #[serde(default)]
    pub drift_corrections: u64,
}
