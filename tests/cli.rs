//! Bad input to the `agent` command: one clear line naming the problem, a non-zero exit, no panic.

use pao_testkit as common;

use std::time::Duration;

use common::*;

/// Runs the agent to completion; returns (exit code, stderr+stdout).
async fn run_agent(args: &[&str]) -> (i32, String) {
    let mut agent = AgentProcess::start(args);
    let status = agent.wait_exit(Duration::from_secs(90)).await;
    (status.code().unwrap_or(-1), agent.output())
}

/// The one `error:` line, after checking there is exactly one and no panic.
fn the_error(output: &str) -> String {
    assert!(!output.contains("panicked"), "no panic:\n{output}");
    assert!(!output.contains("Backtrace"), "no backtrace:\n{output}");
    let errors: Vec<&str> = output.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "exactly one error line:\n{output}");
    errors[0].to_string()
}

#[tokio::test]
async fn a_bad_flag_value_names_the_flag() {
    let (code, out) = run_agent(&[
        "--api-url",
        "http://x/api",
        "--pool",
        "p",
        "--max-polls",
        "many",
    ])
    .await;
    assert_eq!(code, 2);
    let err = the_error(&out);
    assert!(err.contains("--max-polls"), "{err}");
}

#[tokio::test]
async fn missing_settings_name_the_flag_and_variable() {
    let (code, out) = run_agent(&["--pool", "p"]).await;
    assert_eq!(code, 2);
    assert_eq!(
        the_error(&out),
        "error: no Prefect API URL: pass --api-url or set PREFECT_API_URL"
    );
    let (code, out) = run_agent(&["--api-url", "http://127.0.0.1:1/api"]).await;
    assert_eq!(code, 2);
    assert!(the_error(&out).contains("pass --pool or set PAO_WORK_POOL"));
    let (code, out) =
        run_agent(&["--api-url", "http://x/api", "--pool", "p", "-e", "NOVALUE"]).await;
    assert_eq!(code, 2);
    assert!(the_error(&out).contains("--env expects KEY=VALUE, got `NOVALUE`"));
}

#[tokio::test]
async fn an_unreachable_api_is_one_line() {
    let port = free_port(); // nothing listens there
    let url = format!("http://127.0.0.1:{port}/api");
    let (code, out) = run_agent(&["--api-url", &url, "--pool", "p"]).await;
    assert_eq!(code, 1);
    let err = the_error(&out);
    assert!(
        err.starts_with(&format!(
            "error: cannot reach the Prefect API at {url}: Connection refused"
        )),
        "{err}"
    );
}

#[tokio::test]
async fn an_unknown_pool_or_queue_is_named() {
    let server = tokio::task::spawn_blocking(PrefectServer::shared)
        .await
        .unwrap();
    let pool = unique("missing");
    let (code, out) = run_agent(&["--api-url", &server.url, "--pool", &pool]).await;
    assert_eq!(code, 1);
    let err = the_error(&out);
    assert!(
        err.contains(&format!(
            "work pool `{pool}` does not exist at {}",
            server.url
        )),
        "{err}"
    );
    assert!(err.contains("--create-pool"), "says how to fix it: {err}");

    let api = server.api();
    api.create_pool(&pool).await;
    let (code, out) =
        run_agent(&["--api-url", &server.url, "--pool", &pool, "--queue", "nope"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        the_error(&out),
        format!("error: work queue `nope` does not exist in work pool `{pool}`")
    );
}

#[tokio::test]
async fn create_pool_makes_a_missing_pool() {
    let server = tokio::task::spawn_blocking(PrefectServer::shared)
        .await
        .unwrap();
    let pool = unique("created");
    let (code, out) = run_agent(&[
        "--api-url",
        &server.url,
        "--pool",
        &pool,
        "--create-pool",
        "process",
        "--max-polls",
        "1",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let made = server
        .api()
        .call(reqwest::Method::GET, &format!("/work_pools/{pool}"), None)
        .await;
    assert_eq!(made["type"], "process");

    let k8s_pool = unique("created-k8s");
    let (code, out) = run_agent(&[
        "--api-url",
        &server.url,
        "--pool",
        &k8s_pool,
        "--create-pool",
        "kubernetes",
        "--max-polls",
        "0",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    let made = server
        .api()
        .call(
            reqwest::Method::GET,
            &format!("/work_pools/{k8s_pool}"),
            None,
        )
        .await;
    assert_eq!(made["type"], "kubernetes");
    assert!(
        made.pointer("/base_job_template/job_configuration/job_manifest")
            .is_some(),
        "created with Prefect's standard Kubernetes template: {made}"
    );
}

#[tokio::test]
async fn a_wrong_key_is_refused_without_showing_it() {
    let server = tokio::task::spawn_blocking(|| PrefectServer::with_auth("admin:right-password"))
        .await
        .unwrap();
    let (code, out) = run_agent(&[
        "--api-url",
        &server.url,
        "--pool",
        "p",
        "--auth-string",
        "admin:wrong-password",
    ])
    .await;
    assert_eq!(code, 1);
    let err = the_error(&out);
    assert!(err.contains("rejected the credentials (HTTP 401)"), "{err}");
    assert!(
        !out.contains("wrong-password"),
        "the secret never shows:\n{out}"
    );

    // The same through the variable, with a Bearer key.
    let mut cmd = agent_command(&["--api-url", &server.url, "--pool", "p"]);
    cmd.env("PREFECT_API_KEY", "pnu_not_the_key");
    let mut agent = AgentProcess::start_with(cmd);
    let status = agent.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(1));
    let out = agent.output();
    assert!(the_error(&out).contains("HTTP 401"));
    assert!(!out.contains("pnu_not_the_key"), "{out}");

    // And the right one works.
    let api = prefect_agent_operator::backend::http::Auth::Basic(
        prefect_agent_operator::secret::SecretString::new("admin:right-password"),
    );
    let api = Api::new(&server.url, api);
    let pool = unique("authed");
    api.create_pool(&pool).await;
    let (code, out) = run_agent(&[
        "--api-url",
        &server.url,
        "--pool",
        &pool,
        "--auth-string",
        "admin:right-password",
        "--max-polls",
        "1",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("right-password"), "{out}");
}

#[tokio::test]
async fn a_busy_agent_address_is_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, out) = run_agent(&[
        "--api-url",
        "http://127.0.0.1:1/api",
        "--pool",
        "p",
        "--agent-address",
        &addr,
    ])
    .await;
    assert_eq!(code, 1);
    let err = the_error(&out);
    assert!(
        err.contains(&format!("cannot serve the agent API on {addr}")),
        "{err}"
    );
}

#[test]
fn help_reads_well() {
    let out = agent_command(&["--help"]).output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "Prefect API:",
        "Agent (the seed's arguments):",
        "--max-polls",
        "--agent-address",
        "--no-cloud-logs",
        "[env: PREFECT_API_URL=]",
        "PREFECT__CLOUD__AGENT__LABELS",
    ] {
        assert!(help.contains(needle), "--help mentions {needle}:\n{help}");
    }
    assert!(!help.contains("--fault"), "test hooks stay hidden");
}

/// The operator's settings for every agent are refused at zero, by flag name, before it
/// reaches for a cluster.
#[test]
fn the_operator_names_a_zero_setting() {
    for (flag, value) in [
        ("--submit-concurrency", "0"),
        ("--heartbeat-interval", "0s"),
        ("--heartbeat-interval", "soon"),
    ] {
        let out = std::process::Command::new(operator_binary())
            .args(["operator", flag, value])
            .env("KUBECONFIG", "/nonexistent")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        let text = String::from_utf8_lossy(&out.stderr);
        let err = the_error(&text);
        assert!(err.contains(flag), "{flag} {value}: {err}");
    }
}
