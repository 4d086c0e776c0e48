//! Both backends against a hostile or broken server: a raw TCP server answers every
//! request the way one failure mode says (in the Prefect 3 REST or the Prefect 1 GraphQL
//! dialect). Whatever it answers, a backend must not panic, must end each call in
//! bounded time with an error or a value, must never put the key into an error, and
//! must never send a request outside the API's paths (Prefect 3) or a GraphQL document
//! that a server's text changed (Prefect 1).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prefect_agent_operator::backend::http::{Auth, RetryPolicy};
use prefect_agent_operator::backend::prefect1::{Prefect1, Prefect1Config};
use prefect_agent_operator::backend::prefect3::{Prefect3, Prefect3Config};
use prefect_agent_operator::backend::{Backend, FlowRun, LogLevel};
use prefect_agent_operator::secret::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "pnu_hostile_canary_4242";
const RUN: &str = "7f1c6f0e-5f3a-4a8e-9d2b-1c0de0f1a004";
/// A Prefect 1 run id that would end the GraphQL string it is put in and add a mutation.
const INJECTED: &str =
    r#"INJ"}) { __typename } mutation { delete_flow_run(input: {flow_run_id: "x"#;

/// Which API the server speaks.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Dialect {
    Prefect3,
    Prefect1,
}

/// How the server answers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// 500 whose body echoes the request's headers (the key among them).
    EchoHeaders500,
    /// 422 whose detail quotes the key.
    EchoKey422,
    /// 200 whose GraphQL `errors` (or body) quote the whole request, headers and all.
    EchoInErrors,
    InvalidJson,
    WrongTypes,
    EmptyBody,
    /// 20 MiB of JSON.
    Huge,
    /// Runs whose ids would change the path or add a query.
    PathIds,
    /// A run named with 2 MB.
    LongName,
    AllNull,
    /// JSON nested far deeper than a decoder recurses.
    Deep,
    NotUtf8,
    NotFound,
    Unauthorized,
    /// The connection closed without an answer.
    Reset,
    /// Not HTTP at all.
    Garbage,
}

const MODES: [Mode; 16] = [
    Mode::EchoHeaders500,
    Mode::EchoKey422,
    Mode::EchoInErrors,
    Mode::InvalidJson,
    Mode::WrongTypes,
    Mode::EmptyBody,
    Mode::Huge,
    Mode::PathIds,
    Mode::LongName,
    Mode::AllNull,
    Mode::Deep,
    Mode::NotUtf8,
    Mode::NotFound,
    Mode::Unauthorized,
    Mode::Reset,
    Mode::Garbage,
];

fn response(status: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn run_json(id: &str, name: &str) -> serde_json::Value {
    serde_json::json!({"flow_run": {"id": id, "name": name,
        "state": {"type": "SCHEDULED", "name": "Scheduled"},
        "expected_start_time": "2026-01-01T00:00:00Z"}})
}

/// A Prefect 1 `flow_run` row.
fn row_json(id: &str, name: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "name": name, "version": 1, "state": "Scheduled",
        "labels": [], "run_config": null, "serialized_state": {"type": "Scheduled"},
        "flow": {"id": "f", "name": "flow", "storage": null, "core_version": "1.4.1"}})
}

/// A Prefect 1 answer whose `data` holds what every call of the agent reads, the queue
/// offering `ids` and the runs `rows`.
fn graphql_data(ids: &[&str], rows: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"data": {
        "auth_info": {"tenant_id": "5e0d7c2a-0b8f-4b5e-9d43-2a6f0c1e9b01"},
        "tenant": [{"id": "5e0d7c2a-0b8f-4b5e-9d43-2a6f0c1e9b01"}],
        "register_agent": {"id": "agent"}, "hello": "hi",
        "get_runs_in_queue": {"flow_run_ids": ids},
        "flow_run": rows,
        "set_flow_run_states": {"states": [{"status": "SUCCESS", "message": ""}]},
        "write_run_logs": {"success": true}}})
}

/// The answer of `mode`, in `dialect`, to a request (its head and body as text).
fn answer(dialect: Dialect, mode: Mode, request: &str) -> Option<Vec<u8>> {
    let ok = |v: serde_json::Value| Some(response("200 OK", v.to_string().as_bytes()));
    let p1 = dialect == Dialect::Prefect1;
    let poll = request.contains(if p1 {
        "get_runs_in_queue"
    } else {
        "get_scheduled_flow_runs"
    });
    let metadata = p1 && request.contains("flow_run(where");
    match mode {
        Mode::EchoHeaders500 => Some(response(
            "500 Internal Server Error",
            serde_json::json!({"detail": request})
                .to_string()
                .as_bytes(),
        )),
        Mode::EchoKey422 => Some(response(
            "422 Unprocessable Entity",
            format!(r#"{{"detail": "bad key {KEY}"}}"#).as_bytes(),
        )),
        Mode::EchoInErrors => ok(serde_json::json!({"errors": [{"message": request}],
            "detail": request})),
        Mode::InvalidJson => Some(response("200 OK", b"{not json")),
        Mode::WrongTypes if p1 && poll => ok(serde_json::json!({"data":
            {"get_runs_in_queue": {"flow_run_ids": "x"}}})),
        Mode::WrongTypes if p1 && metadata => {
            ok(serde_json::json!({"data": {"flow_run": {"id": 1}}}))
        }
        Mode::WrongTypes if p1 => ok(serde_json::json!({"data": [1, 2, 3]})),
        Mode::WrongTypes if poll => ok(serde_json::json!({"flow_run": "x"})),
        Mode::WrongTypes => ok(serde_json::json!([1, 2, 3])),
        Mode::EmptyBody => Some(response("200 OK", b"")),
        Mode::Huge => {
            let mut body = b"[".to_vec();
            body.extend(std::iter::repeat_n(b'1', 20 * 1024 * 1024));
            body.push(b']');
            Some(response("200 OK", &body))
        }
        Mode::PathIds if p1 => ok(graphql_data(
            &["../../../admin", "a b?c=d#e", INJECTED],
            serde_json::json!([row_json(INJECTED, "a")]),
        )),
        Mode::LongName if p1 => ok(graphql_data(
            &[RUN],
            serde_json::json!([row_json(RUN, &"n".repeat(2_000_000))]),
        )),
        Mode::PathIds if poll => ok(serde_json::json!([
            run_json("../../../admin", "a"),
            run_json("a b?c=d#e", "b")
        ])),
        Mode::LongName if poll => ok(serde_json::json!([run_json(RUN, &"n".repeat(2_000_000))])),
        // An id that would climb out of the path it is put in.
        Mode::PathIds => ok(serde_json::json!({"type": "kubernetes",
            "base_job_template": {}, "id": "../../../admin"})),
        Mode::LongName => ok(serde_json::json!({"type": "kubernetes",
            "base_job_template": {}, "id": "p"})),
        Mode::AllNull => ok(serde_json::Value::Null),
        Mode::Deep => Some(response("200 OK", "[".repeat(100_000).as_bytes())),
        Mode::NotUtf8 => Some(response("200 OK", &[0xff, 0xfe, 0x00, 0x80])),
        Mode::NotFound => Some(response("404 Not Found", br#"{"detail": "no"}"#)),
        Mode::Unauthorized => Some(response("401 Unauthorized", br#"{"detail": "no"}"#)),
        Mode::Reset => None,
        Mode::Garbage => Some(b"\x00\x01garbage that is not HTTP\r\n\r\n".to_vec()),
    }
}

/// Serves `mode` in `dialect` on a local port; records every request (head and body).
async fn serve(dialect: Dialect, mode: Mode) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).to_string();
                record.lock().unwrap().push(request.clone());
                if let Some(bytes) = answer(dialect, mode, &request) {
                    let _ = conn.write_all(&bytes).await;
                }
                let _ = conn.shutdown().await;
            });
        }
    });
    let path = match dialect {
        Dialect::Prefect3 => "api",
        Dialect::Prefect1 => "graphql",
    };
    (format!("http://{addr}/{path}"), seen)
}

fn retry() -> RetryPolicy {
    RetryPolicy {
        attempts: 2,
        unreachable_attempts: 2,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(50),
    }
}

fn prefect3(url: &str) -> Prefect3 {
    Prefect3::new(Prefect3Config {
        api_url: url.into(),
        auth: Auth::Bearer(SecretString::new(KEY)),
        pool: "p".into(),
        queues: Vec::new(),
        agent_name: "hostile".into(),
        identity: "test".into(),
        prefetch: Duration::from_secs(10),
        heartbeat_interval: Duration::from_secs(30),
        create_pool: None,
        poll_limit: 200,
        retry: retry(),
        events: false,
    })
    .unwrap()
}

fn prefect1(url: &str) -> Prefect1 {
    Prefect1::new(Prefect1Config {
        api_url: url.into(),
        key: Some(SecretString::new(KEY)),
        // Looked up with the key (`auth_info`), so that call meets the server too.
        tenant_id: None,
        agent_name: "hostile".into(),
        identity: "test".into(),
        agent_type: "KubernetesAgent".into(),
        labels: Vec::new(),
        agent_config_id: None,
        // Runs are claimed at once, not at their start time.
        prefetch: Duration::ZERO,
        log_level: "INFO".into(),
        backend: "server".into(),
        retry: retry(),
    })
    .unwrap()
}

/// Registers, polls, claims and crashes what the poll offered, and logs: every call an
/// agent makes of a server that it may meet at its worst. Returns the errors.
async fn exercise<B: Backend>(b: &B, mode: Mode) -> Vec<String> {
    let mut errors = Vec::new();
    if let Err(e) = b.register().await {
        errors.push(e.to_string());
    }
    let runs: Vec<FlowRun> = match b.poll().await {
        Ok(runs) => runs,
        Err(e) => {
            errors.push(e.to_string());
            Vec::new()
        }
    };
    for run in &runs {
        assert!(run.name.len() <= 256, "{mode:?}: a name is cut");
        if let Err(e) = b.claim(run).await {
            errors.push(e.to_string());
        }
        if let Err(e) = b.crash(&run.id, "gone").await {
            errors.push(e.to_string());
        }
    }
    let _ = b.log(RUN, LogLevel::Info, "x", chrono::Utc::now()).await;
    errors
}

/// What a Prefect 1 request's GraphQL document is, when the request is one.
fn graphql_query(request: &str) -> Option<String> {
    let body = request.split_once("\r\n\r\n")?.1;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("query")?.as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_server_gets_errors_never_a_panic_a_leak_or_a_wrong_path() {
    let mut tried = 0;
    for dialect in [Dialect::Prefect3, Dialect::Prefect1] {
        for mode in MODES {
            let (url, seen) = serve(dialect, mode).await;
            let started = Instant::now();
            let errors = match dialect {
                Dialect::Prefect3 => exercise(&prefect3(&url), mode).await,
                Dialect::Prefect1 => exercise(&prefect1(&url), mode).await,
            };
            let case = format!("{dialect:?}/{mode:?}");
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{case}: bounded, took {:?}",
                started.elapsed()
            );
            for e in &errors {
                assert!(!e.contains(KEY), "{case}: the key in an error: {e}");
                assert!(e.len() < 4096, "{case}: an error of {} bytes", e.len());
            }
            let requests = seen.lock().unwrap().clone();
            assert!(
                !requests.is_empty(),
                "{case}: the backend called the server"
            );
            for request in &requests {
                let line = request.lines().next().unwrap_or_default();
                let path = line.split_whitespace().nth(1).unwrap_or_default();
                match dialect {
                    Dialect::Prefect3 => assert!(
                        path.starts_with("/api/") && !path.contains("..") && !path.contains('#'),
                        "{case}: a request outside the API: {line}"
                    ),
                    Dialect::Prefect1 => {
                        assert_eq!(path, "/graphql", "{case}: {line}");
                        // Every call is one document the agent wrote: no id from the
                        // server ends a string in it or adds an operation.
                        let query = graphql_query(request)
                            .unwrap_or_else(|| panic!("{case}: not a GraphQL call: {request}"));
                        assert!(
                            !query.contains("INJ\"") && !query.contains("../"),
                            "{case}: a server's id changed the document: {query}"
                        );
                    }
                }
            }
            if mode == Mode::PathIds {
                match dialect {
                    Dialect::Prefect3 => assert!(
                        errors.iter().any(|e| e.contains("not a UUID")),
                        "{case}: {errors:?}"
                    ),
                    // The ids are left at the poll: no metadata query, no claim.
                    Dialect::Prefect1 => assert!(
                        !requests.iter().any(|r| r.contains("flow_run(where")),
                        "{case}: a non-UUID id was asked about"
                    ),
                }
            }
            if mode == Mode::LongName && dialect == Dialect::Prefect1 {
                assert!(
                    requests.iter().any(|r| r.contains("set_flow_run_states")),
                    "{case}: the long-named run was claimed (its name cut): {errors:?}"
                );
            }
            tried += 1;
        }
    }
    eprintln!("hostile server modes tried: {tried}, panics: 0, key leaks: 0");
}

/// The sync controllers' Prefect half (a work pool with queues, a deployment with a
/// global limit and schedules) against the same server at its worst: an error a
/// condition can carry, in bounded time, never a panic, the key, or a request outside
/// the API (an id from an answer goes into a path only as a UUID).
#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_server_gets_errors_from_the_sync_controllers_too() {
    use prefect_agent_operator::backend::http::ApiClient;
    use prefect_agent_operator::crd::{PrefectDeployment, PrefectWorkPool};
    use prefect_agent_operator::sync::{pool, write_deployment, write_pool};
    let work_pool: PrefectWorkPool = serde_json::from_value(serde_json::json!({
        "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectWorkPool",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"api": {"url": "http://unused/api"}, "description": "d",
                 "queues": [{"name": "high", "priority": 1}, {"name": "low"}]}}))
    .unwrap();
    let template = pool::template(&work_pool.spec, None).unwrap();
    let deployment: PrefectDeployment = serde_json::from_value(serde_json::json!({
        "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectDeployment",
        "metadata": {"name": "d", "namespace": "ns"},
        "spec": {"api": {"url": "http://unused/api"}, "flowName": "etl", "workPool": "p",
                 "globalConcurrencyLimit": {"name": "shared", "limit": 2},
                 "schedules": [{"interval": 60}]}}))
    .unwrap();
    let mut tried = 0;
    for mode in MODES {
        let (url, seen) = serve(Dialect::Prefect3, mode).await;
        let api = ApiClient::new(&url, Auth::Bearer(SecretString::new(KEY)), retry()).unwrap();
        let started = Instant::now();
        let errors: Vec<String> = [
            write_pool(&api, &work_pool, &template)
                .await
                .err()
                .map(|e| e.to_string()),
            write_deployment(&api, &deployment, "p".into())
                .await
                .err()
                .map(|e| e.to_string()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let case = format!("sync/{mode:?}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{case}: bounded, took {:?}",
            started.elapsed()
        );
        assert!(
            !errors.is_empty(),
            "{case}: no server at its worst is a success"
        );
        for e in &errors {
            assert!(!e.contains(KEY), "{case}: the key in an error: {e}");
            assert!(e.len() < 4096, "{case}: an error of {} bytes", e.len());
        }
        for request in seen.lock().unwrap().iter() {
            let line = request.lines().next().unwrap_or_default();
            let path = line.split_whitespace().nth(1).unwrap_or_default();
            assert!(
                path.starts_with("/api/") && !path.contains("..") && !path.contains('#'),
                "{case}: a request outside the API: {line}"
            );
        }
        tried += 1;
    }
    eprintln!(
        "hostile server modes tried on the sync controllers: {tried}, panics: 0, key leaks: 0"
    );
}
