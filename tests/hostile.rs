//! The Prefect 3 backend against a hostile or broken server: a raw TCP server answers
//! every request the way one failure mode says. Whatever it answers, the backend must not
//! panic, must end each call in bounded time with an error or a value, must never put the
//! key into an error, and must never send a request outside the API's paths.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prefect_agent_operator::backend::http::{Auth, RetryPolicy};
use prefect_agent_operator::backend::prefect3::{Prefect3, Prefect3Config};
use prefect_agent_operator::backend::{Backend, FlowRun, LogLevel};
use prefect_agent_operator::secret::SecretString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "pnu_hostile_canary_4242";

/// How the server answers.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// 500 whose body echoes the request's headers (the key among them).
    EchoHeaders500,
    /// 422 whose detail quotes the key.
    EchoKey422,
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

const MODES: [Mode; 15] = [
    Mode::EchoHeaders500,
    Mode::EchoKey422,
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

/// The answer of `mode` to a request (its head and body as text).
fn answer(mode: Mode, request: &str) -> Option<Vec<u8>> {
    let ok = |v: serde_json::Value| Some(response("200 OK", v.to_string().as_bytes()));
    let poll = request.contains("get_scheduled_flow_runs");
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
        Mode::InvalidJson => Some(response("200 OK", b"{not json")),
        Mode::WrongTypes if poll => ok(serde_json::json!({"flow_run": "x"})),
        Mode::WrongTypes => ok(serde_json::json!([1, 2, 3])),
        Mode::EmptyBody => Some(response("200 OK", b"")),
        Mode::Huge => {
            let mut body = b"[".to_vec();
            body.extend(std::iter::repeat_n(b'1', 20 * 1024 * 1024));
            body.push(b']');
            Some(response("200 OK", &body))
        }
        Mode::PathIds if poll => ok(serde_json::json!([
            run_json("../../../admin", "a"),
            run_json("a b?c=d#e", "b")
        ])),
        Mode::LongName if poll => ok(serde_json::json!([run_json(
            "7f1c6f0e-5f3a-4a8e-9d2b-1c0de0f1a004",
            &"n".repeat(2_000_000)
        )])),
        Mode::PathIds | Mode::LongName => ok(serde_json::json!({"type": "kubernetes",
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

/// Serves `mode` on a local port; records every request line.
async fn serve(mode: Mode) -> (String, Arc<Mutex<Vec<String>>>) {
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
                if let Some(line) = request.lines().next() {
                    record.lock().unwrap().push(line.to_string());
                }
                if let Some(bytes) = answer(mode, &request) {
                    let _ = conn.write_all(&bytes).await;
                }
                let _ = conn.shutdown().await;
            });
        }
    });
    (format!("http://{addr}/api"), seen)
}

fn backend(url: &str) -> Prefect3 {
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
        retry: RetryPolicy {
            attempts: 2,
            unreachable_attempts: 2,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
        },
        events: false,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hostile_server_gets_errors_never_a_panic_a_leak_or_a_wrong_path() {
    let mut tried = 0;
    for mode in MODES {
        let (url, seen) = serve(mode).await;
        let b = backend(&url);
        let started = Instant::now();
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
        let _ = b
            .log("7f1c6f0e-5f3a-4a8e-9d2b-1c0de0f1a004", LogLevel::Info, "x")
            .await;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{mode:?}: bounded, took {:?}",
            started.elapsed()
        );
        for e in &errors {
            assert!(!e.contains(KEY), "{mode:?}: the key in an error: {e}");
            assert!(e.len() < 4096, "{mode:?}: an error of {} bytes", e.len());
        }
        for line in seen.lock().unwrap().iter() {
            let path = line.split_whitespace().nth(1).unwrap_or_default();
            assert!(
                path.starts_with("/api/") && !path.contains("..") && !path.contains('#'),
                "{mode:?}: a request outside the API: {line}"
            );
        }
        if matches!(mode, Mode::PathIds) {
            assert!(
                errors.iter().any(|e| e.contains("not a UUID")),
                "{mode:?}: {errors:?}"
            );
        }
        tried += 1;
    }
    eprintln!("hostile server modes tried: {tried}, panics: 0, key leaks: 0");
}
