//! What the integration tests start, by what it starts: a real Prefect server and its
//! API (here), the kube-apiserver (`cluster`), the one-node cluster (`node`), the fake
//! Prefect 1 server (`prefect1`), the operator binary as a child process, and waiting
//! with deadlines. A crate of its own so that each test binary uses what it needs.

pub mod cluster;
pub mod node;
pub mod prefect;
pub mod prefect1;
pub mod process;

pub use prefect::{Api, PrefectServer, RestartablePrefect, Setup};
pub use process::{
    AgentProcess, FAST_LOOPS, agent_command, an_agent_asleep, clean_cluster_command, dev_runner,
    fake_runner, health, operator_binary, operator_command, polls, pool_agent_args, recorded,
};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The Prefect venv: `PAO_PREFECT_VENV`, else the cache `scripts/setup-prefect.sh` fills.
pub fn prefect_venv() -> PathBuf {
    venv_from("PAO_PREFECT_VENV", &[])
}

/// Prefect 2.20's venv (`scripts/setup-prefect.sh 2`; `PAO_PREFECT2_VENV` names a ready one).
pub fn prefect2_venv() -> PathBuf {
    venv_from("PAO_PREFECT2_VENV", &["2"])
}

fn venv_from(variable: &str, args: &[&str]) -> PathBuf {
    if let Ok(v) = std::env::var(variable) {
        return PathBuf::from(v);
    }
    let out = Command::new("bash")
        .arg(repo().join("scripts/setup-prefect.sh"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/setup-prefect.sh");
    assert!(
        out.status.success(),
        "scripts/setup-prefect.sh {args:?} failed"
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

pub fn repo() -> PathBuf {
    // This crate lives in the repository's `testkit/`.
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A free loopback port, never the same one twice in this test process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut given = GIVEN.lock().expect("ports");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The last `n` lines of a log, to show why a test failed.
pub fn last_lines(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Polls `cond` until it returns `Some`, or panics with `what` at the deadline.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `cmd` from a thread that never ends, with a parent-death signal, so the
/// child goes away with the test process even though statics are never dropped.
pub fn spawn_tied_to_test_process(mut cmd: Command) {
    use std::os::unix::process::CommandExt;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn();
        let failed = child.is_err();
        let _ = tx.send(child.map(|_| ()).map_err(|e| e.to_string()));
        if !failed {
            loop {
                std::thread::park();
            }
        }
    });
    rx.recv()
        .expect("spawner thread")
        .expect("spawn prefect server");
}

/// A plain HTTP/1.0 GET to `host`, answering whether the status was 2xx (no runtime
/// needed).
pub fn http_get_ok_at(host: &str, port: u16, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect((host, port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 2") || buf.starts_with("HTTP/1.0 2")
}

/// GET on an operator's probe port: (status, body).
pub async fn probe(port: u16, path: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

/// A unique name for a test's pool.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// Claims by identity, for either backend: `backend(identity)` makes an agent of one
/// fixed name. The first claims `run`; a namesake with another identity must find no
/// orphan; the first's identity, in a new backend (a restart), must find exactly `run`.
pub async fn a_namesake_never_adopts<B, F>(backend: F, run: &str)
where
    B: prefect_agent_operator::backend::Backend + prefect_agent_operator::backend::ClaimLedger,
    F: Fn(&str) -> B,
{
    use prefect_agent_operator::backend::Claim;
    let first = backend("one");
    first.register().await.expect("register");
    let runs = first.poll().await.expect("poll");
    let offered = runs
        .iter()
        .find(|r| r.id == run)
        .expect("the run is offered");
    let claim = first.claim(offered).await.expect("claim");
    assert!(matches!(claim, Claim::Claimed(_)), "claimed: {claim:?}");

    let namesake = backend("two");
    namesake.register().await.expect("register");
    assert!(
        namesake
            .orphans(Duration::ZERO, &Default::default())
            .await
            .expect("orphans")
            .is_empty(),
        "a namesake's claim is not this agent's to adopt"
    );
    let restarted = backend("one");
    restarted.register().await.expect("register");
    let orphans = restarted
        .orphans(Duration::ZERO, &Default::default())
        .await
        .expect("orphans");
    assert_eq!(
        orphans.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [run],
        "the claimant, restarted, finds its own"
    );
}
