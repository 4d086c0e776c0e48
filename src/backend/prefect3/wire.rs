//! The Prefect 3 API's objects as this backend reads them (decoded leniently: missing
//! fields default).

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::backend::{FlowRun, StateKind};
use crate::text::{MAX_RUN_NAME, MAX_STATE_MESSAGE, clip};

/// The body of `POST /flow_runs/{id}/set_state`.
#[derive(Clone, Debug, Deserialize)]
pub struct SetStateResponse {
    pub status: String,
    #[serde(default)]
    pub state: Option<ApiState>,
    #[serde(default)]
    pub details: Value,
}

impl SetStateResponse {
    pub fn reason(&self) -> Option<String> {
        self.details
            .get("reason")
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    pub fn current_transition_id(&self) -> Option<&str> {
        self.state.as_ref()?.transition_id()
    }

    pub fn current_kind(&self) -> Option<StateKind> {
        self.state.as_ref().map(|s| StateKind::parse(&s.kind))
    }
}

#[derive(Clone, Debug, Deserialize)]
pub struct ApiState {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub timestamp: Option<DateTime<Utc>>,
    #[serde(default)]
    pub state_details: Value,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub data: Value,
}

impl ApiState {
    /// The transition id its proposer gave it.
    pub fn transition_id(&self) -> Option<&str> {
        self.state_details.get("transition_id")?.as_str()
    }

    /// The time it was scheduled for (SCHEDULED states, and PENDING ones Prefect copied
    /// it into).
    pub fn scheduled_time(&self) -> Option<&str> {
        self.state_details.get("scheduled_time")?.as_str()
    }
}

/// A flow run as the Prefect 3 API returns it (decoded leniently: missing fields default).
#[derive(Clone, Debug, Deserialize)]
pub struct ApiFlowRun {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub flow_id: Option<String>,
    #[serde(default)]
    pub deployment_id: Option<String>,
    #[serde(default)]
    pub state: Option<ApiState>,
    /// The state's type alone: what a Prefect 2.20 poll answers (its `state` is null there).
    #[serde(default)]
    pub state_type: Option<String>,
    #[serde(default)]
    pub next_scheduled_start_time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub expected_start_time: Option<DateTime<Utc>>,
    #[serde(default)]
    pub job_variables: Option<Map<String, Value>>,
    #[serde(default)]
    pub infrastructure_pid: Option<String>,
}

impl From<ApiFlowRun> for FlowRun {
    fn from(r: ApiFlowRun) -> Self {
        let state = r.state.as_ref();
        FlowRun {
            id: r.id,
            // Logged with every line about the run: a server's megabyte name is cut here.
            name: clip(&r.name, MAX_RUN_NAME),
            flow_id: r.flow_id,
            deployment_id: r.deployment_id,
            state: state
                .map(|s| s.kind.as_str())
                .or(r.state_type.as_deref())
                .map(StateKind::parse)
                .unwrap_or(StateKind::Unknown),
            state_since: state.and_then(|s| s.timestamp),
            state_message: state
                .and_then(|s| s.message.as_deref().map(|m| clip(m, MAX_STATE_MESSAGE))),
            scheduled_start: r.next_scheduled_start_time.or(r.expected_start_time),
            job_variables: r.job_variables.unwrap_or_default(),
            infrastructure_pid: r.infrastructure_pid,
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ScheduledRun {
    pub flow_run: ApiFlowRun,
}

#[derive(Debug, Deserialize)]
pub struct Worker {
    #[serde(default)]
    pub id: Option<String>,
    pub name: String,
}
