//! The agent, as a binary, against a real Prefect 2.20 server (`scripts/setup-prefect.sh 2`):
//! the work-pool API it shares with Prefect 3, and where 2.x differs — deployment job
//! variables answered as `infra_overrides`, an event stream that is off unless the server
//! runs with `PREFECT_EXPERIMENTAL_EVENTS=true`.

use pao_testkit as common;

use std::sync::OnceLock;
use std::time::Duration;

use common::*;
use serde_json::json;

/// One Prefect 2 server per setting of its event stream, shared by this binary's tests.
fn server(events: bool) -> &'static PrefectServer {
    static OFF: OnceLock<PrefectServer> = OnceLock::new();
    static ON: OnceLock<PrefectServer> = OnceLock::new();
    if events {
        ON.get_or_init(|| PrefectServer::prefect2(&[("PREFECT_EXPERIMENTAL_EVENTS", "true")]))
    } else {
        OFF.get_or_init(|| PrefectServer::prefect2(&[]))
    }
}

/// A server (events on or off), its API and a new `process` pool on it.
async fn setup(prefix: &str, events: bool) -> (&'static PrefectServer, Api, String) {
    let server = tokio::task::spawn_blocking(move || server(events))
        .await
        .expect("Prefect 2 server");
    let api = server.api();
    let pool = unique(prefix);
    api.create_pool(&pool).await;
    (server, api, pool)
}

fn agent_args<'a>(url: &'a str, pool: &'a str, name: &'a str) -> Vec<&'a str> {
    pool_agent_args(url, pool, name)
}

/// Register, poll, claim, launch Prefect 2's own `prefect flow-run execute`, complete.
#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_run_completes_in_prefect_2_s_own_runner() {
    let (server, api, pool) = setup("p2-hello", false).await;
    let version = api.call(reqwest::Method::GET, "/admin/version", None).await;
    assert!(version.as_str().unwrap().starts_with("2.20."), "{version}");
    let dep = api.create_deployment(&pool, json!({})).await;
    let run = api.create_run(&dep).await;
    let cmd = format!(
        "{} flow-run execute",
        prefect2_venv().join("bin/prefect").display()
    );
    let mut args = agent_args(&server.url, &pool, "p2-agent");
    args.extend(["--command", &cmd]);
    let agent = AgentProcess::start(&args);
    api.wait_state(&run, "COMPLETED", Duration::from_secs(120))
        .await;
    api.assert_ran_here(&run, &pool, "p2-agent").await;
    drop(agent);
}

/// Prefect 2.20 answers a deployment's job variables as `infra_overrides`: the command
/// and environment it sets reach the run (they were dropped), below the run's own.
#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_s_job_variables_reach_the_run() {
    let (server, api, pool) = setup("p2-vars", false).await;
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("runs.txt");
    let dep = api
        .create_deployment(
            &pool,
            json!({"command": fake_runner(&record, "env"),
                   "env": {"DEP_ONLY": "1", "SHARED": "deployment"}}),
        )
        .await;
    let stored = api
        .call(reqwest::Method::GET, &format!("/deployments/{dep}"), None)
        .await;
    assert_eq!(
        stored["infra_overrides"]["env"]["DEP_ONLY"], "1",
        "the server's own name for them: {stored}"
    );
    let run = api
        .create_run_with(&dep, json!({"env": {"SHARED": "run"}}))
        .await;
    // No --command: without the deployment's, the run would not reach the fake runner.
    let agent = AgentProcess::start(&agent_args(&server.url, &pool, "p2-vars"));
    api.wait_state(&run, "COMPLETED", Duration::from_secs(60))
        .await;
    let path = format!("{}.env.json", record.display());
    let env: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(env["DEP_ONLY"], "1", "{env}");
    assert_eq!(env["SHARED"], "run", "the run's beat the deployment's");
    drop(agent);
}

fn handshake_errors(server: &PrefectServer) -> usize {
    std::fs::read_to_string(server.home.join("server.log"))
        .unwrap_or_default()
        .matches("without completing handshake")
        .count()
}

/// Events off (2.x's default): the stream is asked for once, not retried forever (each
/// try is an error in the server's log), and cancellations are checked at the poll rate
/// instead of waiting for the cancellation scan.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_stream_the_agent_asks_once_and_cancels_at_the_poll_rate() {
    // A server of its own: its log counts this agent's handshakes alone.
    let server = tokio::task::spawn_blocking(|| PrefectServer::prefect2(&[]))
        .await
        .unwrap();
    let server = &server;
    let api = server.api();
    let pool = unique("p2-noevents");
    api.create_pool(&pool).await;
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("runs.txt");
    let dep = api
        .create_deployment(&pool, json!({"command": fake_runner(&record, "sleep")}))
        .await;
    let run = api.create_run(&dep).await;
    // The safety-net scan every two minutes: a cancellation inside the deadline below
    // comes from the poll-rate check.
    let agent = AgentProcess::start(&[
        "--api-url",
        &server.url,
        "--pool",
        &pool,
        "--name",
        "p2-cancel",
        "--poll-interval",
        "1s",
        "--maintenance-interval",
        "120s",
    ]);
    wait_for(
        "the agent to give up on the stream",
        Duration::from_secs(30),
        || async {
            agent
                .output()
                .contains("this Prefect server has no event stream")
                .then_some(())
        },
    )
    .await;
    api.wait_state(&run, "RUNNING", Duration::from_secs(60))
        .await;
    let answer = api.set_state(&run, "CANCELLING", false).await;
    assert_eq!(answer["status"], "ACCEPT", "{answer}");
    api.wait_state(&run, "CANCELLED", Duration::from_secs(30))
        .await;
    // Every retry would have been another line by now (1, 2, 4, 8 s…).
    let errors = handshake_errors(server);
    assert!(
        errors <= 1,
        "{errors} failed handshakes in the server's log"
    );
    drop(agent);
}

/// Events on: the stream works as on Prefect 3, a new run wakes a sleeping agent.
#[tokio::test(flavor = "multi_thread")]
async fn with_the_stream_on_a_new_run_wakes_the_agent() {
    let (server, api, pool) = setup("p2-events", true).await;
    let (agent, _, _) = an_agent_asleep(&server.url, &pool, &[]).await;
    let dep = api.create_deployment(&pool, json!({})).await;
    let run = api.create_run(&dep).await;
    wait_for("the run claimed", Duration::from_secs(20), || async {
        (api.state(&run).await != "SCHEDULED").then_some(())
    })
    .await;
    assert!(
        !agent.output().contains("no event stream"),
        "{}",
        agent.output()
    );
    assert_eq!(handshake_errors(server), 0);
    drop(agent);
}

/// The server's address without `/api`, on a server that serves its web UI there (as
/// Prefect does by default): the agent says which URL to use, not "no such pool".
#[tokio::test(flavor = "multi_thread")]
async fn the_server_s_address_without_api_is_named_with_the_api_url() {
    let server =
        tokio::task::spawn_blocking(|| PrefectServer::prefect2(&[("PREFECT_UI_ENABLED", "true")]))
            .await
            .unwrap();
    let pool = unique("p2-ui");
    server.api().create_pool(&pool).await;
    let bare = server.url.trim_end_matches("/api");
    let page = reqwest::get(format!("{bare}/admin/version"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        page.trim_start().starts_with('<'),
        "the UI answers: {page:.80}"
    );
    let mut agent = AgentProcess::start(&["--api-url", bare, "--pool", &pool]);
    let status = agent.wait_exit(Duration::from_secs(60)).await;
    assert_eq!(status.code(), Some(1));
    let out = agent.output();
    assert!(
        out.contains(&format!(
            "error: {bare} is not the Prefect API: it serves Prefect's web UI; the API is at {}: use that URL",
            server.url
        )),
        "{out}"
    );
}
