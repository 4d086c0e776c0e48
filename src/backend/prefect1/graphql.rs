//! Prefect 1's GraphQL transport, as its 1.4 client sends it: every call a `POST` to the
//! API URL with `{"query": ..., "variables": "<JSON text>"}` (the variables object
//! encoded as a string), the agent id, tenant and core-version headers, and HTTP
//! 500/502/503/504 retried.

use std::sync::RwLock;

use reqwest::Method;
use serde_json::{Value, json};

use crate::backend::http::{ApiClient, HttpError};

/// The Prefect 1 core version this agent speaks as.
pub const CORE_VERSION: &str = "1.4.1";

/// What a GraphQL call can end in, after the transport's retries.
#[derive(Debug, thiserror::Error)]
pub enum GraphqlError {
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(
        "the Prefect 1 API rejected the credentials: {0}; check the API key (PREFECT__CLOUD__API_KEY) or token"
    )]
    Unauthenticated(String),
    /// Someone else changed the object first (`VERSION_LOCKING_ERROR`).
    #[error("version conflict: {0}")]
    VersionLocked(String),
    #[error("the Prefect 1 API answered {operation} with an error: {message}")]
    Graphql { operation: String, message: String },
    #[error("unexpected answer from the Prefect 1 API to {operation}: {detail}")]
    Shape { operation: String, detail: String },
}

impl GraphqlError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Http(e) if e.is_transient())
    }
}

/// Writes a JSON value as a GraphQL literal (object keys bare), for arguments the 1.4
/// client inlines into the document.
pub fn literal(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let fields: Vec<String> = map
                .iter()
                .map(|(k, v)| format!("{k}: {}", literal(v)))
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(literal).collect();
            format!("[{}]", items.join(", "))
        }
        // JSON strings, numbers, booleans and null are valid GraphQL literals.
        other => other.to_string(),
    }
}

/// The first operation name in a document (`register_agent`, `flow_run`…), for messages.
fn operation_of(query: &str) -> String {
    let body = query.split_once('{').map_or(query, |(_, rest)| rest);
    body.trim_start()
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()
        .unwrap_or("query")
        .to_string()
}

/// Classifies a response's `errors` list.
pub fn error_of(operation: &str, errors: &Value) -> GraphqlError {
    let first = errors.get(0).cloned().unwrap_or(Value::Null);
    let message = first
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("unknown error")
        .to_string();
    let code = first
        .pointer("/extensions/code")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if code == "UNAUTHENTICATED"
        || message.contains("UNAUTHENTICATED")
        || message.contains("Malformed Authorization header")
    {
        GraphqlError::Unauthenticated(message)
    } else if code == "VERSION_LOCKING_ERROR" || message.contains("State update failed") {
        GraphqlError::VersionLocked(message)
    } else {
        GraphqlError::Graphql {
            operation: operation.to_string(),
            message,
        }
    }
}

/// A GraphQL client for one Prefect 1 API.
#[derive(Debug)]
pub struct GraphqlClient {
    api: ApiClient,
    tenant_id: RwLock<Option<String>>,
    agent_id: RwLock<Option<String>>,
    /// Whether a credential is sent (the tenant header goes only with one).
    with_key: bool,
}

impl GraphqlClient {
    pub fn new(api: ApiClient, tenant_id: Option<String>, with_key: bool) -> Self {
        Self {
            api: api.retrying_server_errors().for_backend("prefect1"),
            tenant_id: RwLock::new(tenant_id),
            agent_id: RwLock::new(None),
            with_key,
        }
    }

    pub fn url(&self) -> &str {
        self.api.base_url()
    }

    pub fn tenant_id(&self) -> Option<String> {
        self.tenant_id.read().ok().and_then(|t| t.clone())
    }

    pub fn set_tenant_id(&self, id: String) {
        if let Ok(mut t) = self.tenant_id.write() {
            *t = Some(id);
        }
    }

    /// Sent as `X-PREFECT-AGENT-ID` on every later call.
    pub fn set_agent_id(&self, id: String) {
        if let Ok(mut a) = self.agent_id.write() {
            *a = Some(id);
        }
    }

    fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![("X-PREFECT-CORE-VERSION", CORE_VERSION.to_string())];
        if self.with_key
            && let Some(t) = self.tenant_id()
        {
            h.push(("X-PREFECT-TENANT-ID", t));
        }
        if let Some(a) = self.agent_id.read().ok().and_then(|a| a.clone()) {
            h.push(("X-PREFECT-AGENT-ID", a));
        }
        h
    }

    /// Runs one query or mutation and returns its `data`.
    pub async fn request(
        &self,
        query: &str,
        variables: Option<&Value>,
    ) -> Result<Value, GraphqlError> {
        let operation = operation_of(query);
        let variables = variables.unwrap_or(&Value::Null).to_string();
        let body = json!({"query": query, "variables": variables});
        let text = self
            .api
            .send_with_headers(Method::POST, "", Some(&body), &self.headers())
            .await?;
        let answer: Value = serde_json::from_str(&text).map_err(|e| GraphqlError::Shape {
            operation: operation.clone(),
            detail: format!("not JSON: {e}"),
        })?;
        if let Some(errors) = answer.get("errors").filter(|e| !e.is_null()) {
            // What a server echoes back must not carry the key into logs and status.
            let errors: Value =
                serde_json::from_str(&self.api.redact(&errors.to_string())).unwrap_or(Value::Null);
            return Err(error_of(&operation, &errors));
        }
        answer
            .get("data")
            .cloned()
            .filter(|d| !d.is_null())
            .ok_or_else(|| GraphqlError::Shape {
                operation,
                detail: "no data".into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_graphql() {
        let v = json!({"id": {"_in": ["a", "b\"c"]}, "n": 3, "ok": true, "none": null});
        assert_eq!(
            literal(&v),
            r#"{id: {_in: ["a", "b\"c"]}, n: 3, ok: true, none: null}"#
        );
    }

    #[test]
    fn operations_are_named_for_messages() {
        assert_eq!(
            operation_of(
                "mutation($input: register_agent_input!) { register_agent(input: $input) { id } }"
            ),
            "register_agent"
        );
        assert_eq!(operation_of("query { hello }"), "hello");
    }

    #[test]
    fn errors_are_classified() {
        let e = |v: Value| error_of("op", &v);
        assert!(matches!(
            e(json!([{"message": "UNAUTHENTICATED: bad key"}])),
            GraphqlError::Unauthenticated(_)
        ));
        assert!(matches!(
            e(
                json!([{"message": "State update failed", "extensions": {"code": "VERSION_LOCKING_ERROR"}}])
            ),
            GraphqlError::VersionLocked(_)
        ));
        assert_eq!(
            e(json!([{"message": "Cannot query field \"nope\" on type \"flow_run\"."}]))
                .to_string(),
            "the Prefect 1 API answered op with an error: Cannot query field \"nope\" on type \"flow_run\"."
        );
    }
}
