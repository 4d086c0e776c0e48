//! The fake Prefect 1 GraphQL server (tests/fixtures/fake_prefect1.py), one per test.

use std::process::{Command, Stdio};
use std::time::Duration;

use prefect_agent_operator::backend::http::Auth;
use reqwest::Method;
use serde_json::{Value, json};

use super::{
    Api, free_port, http_get_ok_at, prefect_venv, repo, spawn_tied_to_test_process, wait_for,
};

pub struct FakePrefect1 {
    /// The GraphQL endpoint, as an agent is given it.
    pub url: String,
    pub api: Api,
}

impl FakePrefect1 {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// With extra arguments, e.g. `["--token", key]`.
    pub async fn start_with(args: &[&str]) -> Self {
        Self::start_on("127.0.0.1", args).await
    }

    /// Listening on `host` (e.g. the address pods reach the node's host at).
    pub async fn start_on(host: &str, args: &[&str]) -> Self {
        let port = free_port();
        let mut cmd = Command::new(prefect_venv().join("bin/python"));
        cmd.arg(repo().join("tests/fixtures/fake_prefect1.py"))
            .args(["--port", &port.to_string(), "--host", host])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        spawn_tied_to_test_process(cmd);
        wait_for(
            "the fake Prefect 1 server",
            Duration::from_secs(30),
            || async move {
                let host = host.to_string();
                tokio::task::spawn_blocking(move || http_get_ok_at(&host, port, "/_fake/agents"))
                    .await
                    .ok()?
                    .then_some(())
            },
        )
        .await;
        let url = format!("http://{host}:{port}/graphql");
        Self {
            api: Api::new(&format!("http://{host}:{port}"), Auth::None),
            url,
        }
    }

    pub async fn create_flow(&self, body: Value) -> String {
        let flow = self
            .api
            .call(Method::POST, "/_fake/flows", Some(body))
            .await;
        flow["id"].as_str().unwrap().to_string()
    }

    /// A Scheduled flow run due now unless `body` says otherwise.
    pub async fn create_run(&self, body: Value) -> String {
        let run = self
            .api
            .call(Method::POST, "/_fake/flow_runs", Some(body))
            .await;
        run["id"].as_str().unwrap().to_string()
    }

    pub async fn run(&self, id: &str) -> Value {
        self.api
            .call(Method::GET, &format!("/_fake/flow_runs/{id}"), None)
            .await
    }

    pub async fn wait_state(&self, id: &str, state: &str, timeout: Duration) -> Value {
        wait_for(&format!("run {id} to be {state}"), timeout, || async {
            let run = self.run(id).await;
            (run["state"] == state).then_some(run)
        })
        .await
    }

    /// How many times the run entered `state`.
    pub async fn times_in_state(&self, id: &str, state: &str) -> usize {
        self.run(id).await["history"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|h| h["type"] == state)
            .count()
    }

    /// Every GraphQL request received: time (epoch s), operations, query, variables, headers.
    pub async fn requests(&self) -> Vec<Value> {
        let all = self.api.call(Method::GET, "/_fake/requests", None).await;
        all.as_array().unwrap().clone()
    }

    /// Rotates the key the server takes: the old one is refused from now on.
    pub async fn rotate_token(&self, token: &str) {
        self.api
            .call(
                Method::POST,
                "/_fake/token",
                Some(serde_json::json!({"token": token})),
            )
            .await;
    }

    /// Injects failures: `{"mode": "http500"|"graphql_error"|"slow", "count": n, "operation": "..."}`.
    pub async fn fault(&self, fault: Value) {
        self.api
            .call(Method::POST, "/_fake/faults", Some(fault))
            .await;
    }

    pub async fn agents(&self) -> Vec<Value> {
        let all = self.api.call(Method::GET, "/_fake/agents", None).await;
        all.as_array().unwrap().clone()
    }

    pub async fn create_agent_config(&self, settings: Value) -> String {
        let c = self
            .api
            .call(
                Method::POST,
                "/_fake/agent_configs",
                Some(json!({"settings": settings})),
            )
            .await;
        c["id"].as_str().unwrap().to_string()
    }
}
