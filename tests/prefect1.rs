//! `agent --flavor prefect1` against the fake Prefect 1 GraphQL server.

use pao_testkit as common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common::prefect1::FakePrefect1;
use common::*;
use serde_json::{Value, json};

fn agent_args<'a>(url: &'a str, name: &'a str, command: &'a str) -> Vec<&'a str> {
    vec![
        "--flavor",
        "prefect1",
        "--api-url",
        url,
        "--name",
        name,
        "--command",
        command,
    ]
    .into_iter()
    .chain(FAST_LOOPS)
    .collect()
}

/// The messages of the Submitted states a run went through.
fn submissions(run: &Value) -> Vec<String> {
    run["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["type"] == "Submitted")
        .map(|h| h["message"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Which agents (by name) a run's Submitted states came from: "Submitted for execution
/// by agent NAME (IDENTITY)".
fn submitted_by(run: &Value) -> Vec<String> {
    submissions(run)
        .iter()
        .map(|m| {
            let name = m.trim_start_matches("Submitted for execution by agent ");
            name.rsplit_once(" (").map_or(name, |(n, _)| n).to_string()
        })
        .collect()
}

/// The agent's sleeps between polls, from the fake server's request log: from the last
/// answer the poll loop waited for (the poll, or the metadata query after it) to the
/// next poll's arrival. Server and load latency stay out of the figures.
fn poll_sleeps(requests: &[Value]) -> Vec<f64> {
    let is_poll = |r: &Value| r["operations"][0] == "get_runs_in_queue";
    let is_metadata = |r: &Value| {
        r["operations"][0] == "flow_run" && r["query"].as_str().unwrap().contains("_in:")
    };
    let polls: Vec<usize> = (0..requests.len())
        .filter(|&i| is_poll(&requests[i]))
        .collect();
    polls
        .windows(2)
        .map(|w| {
            let loop_done = requests[w[0]..w[1]]
                .iter()
                .filter(|r| is_poll(r) || is_metadata(r))
                .map(|r| r["done"].as_f64().unwrap())
                .fold(f64::MIN, f64::max);
            requests[w[1]]["time"].as_f64().unwrap() - loop_done
        })
        .collect()
}

/// The first GraphQL operation of each recorded request, in order.
fn operations(requests: &[Value]) -> Vec<&str> {
    requests
        .iter()
        .map(|r| r["operations"][0].as_str().unwrap_or_default())
        .collect()
}

fn temp_record() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("runs.txt");
    (dir, record)
}

#[tokio::test(flavor = "multi_thread")]
async fn labeled_and_unlabeled_runs_reach_the_right_agents_only() {
    let server = FakePrefect1::start().await;
    let (_dir, record) = temp_record();
    let runner = fake_runner(&record, "complete");
    let unlabeled = server.create_run(json!({"labels": []})).await;
    let gpu = server.create_run(json!({"labels": ["gpu"]})).await;
    let gpu_eu = server.create_run(json!({"labels": ["gpu", "eu"]})).await;

    let _plain = AgentProcess::start(&agent_args(&server.url, "plain", &runner));
    let mut gpu_args = agent_args(&server.url, "gpu-agent", &runner);
    gpu_args.extend(["--label", "gpu"]);
    let _gpu_agent = AgentProcess::start(&gpu_args);

    let done_unlabeled = server
        .wait_state(&unlabeled, "Success", Duration::from_secs(60))
        .await;
    let done_gpu = server
        .wait_state(&gpu, "Success", Duration::from_secs(60))
        .await;
    assert_eq!(submitted_by(&done_unlabeled), ["plain"]);
    assert_eq!(submitted_by(&done_gpu), ["gpu-agent"]);
    // Several more polls of both: the run needing `eu` too is left alone.
    let polls_now = server.requests().await.len();
    wait_for("more polls", Duration::from_secs(30), || async {
        (server.requests().await.len() > polls_now + 8).then_some(())
    })
    .await;
    assert_eq!(server.run(&gpu_eu).await["state"], "Scheduled");

    let mut eu_args = agent_args(&server.url, "gpu-eu-agent", &runner);
    eu_args.extend(["--label", "gpu", "--label", "eu"]);
    let _eu_agent = AgentProcess::start(&eu_args);
    let done = server
        .wait_state(&gpu_eu, "Success", Duration::from_secs(60))
        .await;
    assert_eq!(submitted_by(&done), ["gpu-eu-agent"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_agents_racing_over_the_same_runs_submit_each_once() {
    let server = FakePrefect1::start().await;
    let (_dir, record) = temp_record();
    let runner = fake_runner(&record, "complete");
    let due = (chrono::Utc::now() + chrono::Duration::seconds(5)).to_rfc3339();
    let mut runs = BTreeSet::new();
    for _ in 0..40 {
        runs.insert(
            server
                .create_run(json!({"scheduled_start_time": due}))
                .await,
        );
    }
    let a = AgentProcess::start(&agent_args(&server.url, "racer-a", &runner));
    let b = AgentProcess::start(&agent_args(&server.url, "racer-b", &runner));
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    for run in &runs {
        loop {
            let r = server.run(run).await;
            if r["state"] == "Success" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "run {run} stuck: {}\n--- racer-a\n{}\n--- racer-b\n{}",
                r["history"],
                a.output(),
                b.output()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let executed: Vec<String> = recorded(&record);
    let unique: BTreeSet<String> = executed.iter().cloned().collect();
    assert_eq!(unique, runs, "every run executed");
    assert_eq!(executed.len(), runs.len(), "none twice");
    let mut by_agent = std::collections::BTreeMap::<String, usize>::new();
    for run in &runs {
        let subs = submitted_by(&server.run(run).await);
        assert_eq!(subs.len(), 1, "run {run} submitted {subs:?}");
        *by_agent.entry(subs[0].clone()).or_default() += 1;
    }
    // Version locking turned the losers away: some claims must have been refused.
    let claims = server
        .requests()
        .await
        .iter()
        .filter(|r| r["operations"] == json!(["set_flow_run_states"]))
        .filter(|r| r["query"].as_str().unwrap().contains("set_flow_run_states"))
        .count();
    assert!(claims >= runs.len(), "{claims} state writes");
    eprintln!("runs per agent: {by_agent:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn polls_follow_the_seed_s_backoff_and_max_polls() {
    let server = FakePrefect1::start().await;
    let mut agent = AgentProcess::start(&[
        "--flavor",
        "prefect1",
        "--api-url",
        &server.url,
        "--max-polls",
        "6",
    ]);
    let status = agent.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{}", agent.output());
    let requests = server.requests().await;
    let ops = operations(&requests);
    assert_eq!(
        ops[..3],
        ["tenant", "register_agent", "hello"],
        "a keyless Server's tenant first, as 1.4: {ops:?}"
    );
    let polls: Vec<f64> = requests
        .iter()
        .filter(|r| r["operations"][0] == "get_runs_in_queue")
        .map(|r| r["time"].as_f64().unwrap())
        .collect();
    assert_eq!(polls.len(), 6, "max_polls counts every poll");
    let gaps = poll_sleeps(&requests);
    assert_eq!(gaps.len(), 5);
    for (gap, expected) in gaps.iter().zip([0.5, 1.0, 2.0, 4.0, 8.0]) {
        assert!(
            (expected - 0.02..expected + 0.2).contains(gap),
            "gaps {gaps:?}, expected the seed's 0.5, 1, 2, 4, 8"
        );
    }
    // The envelope and headers of the 1.4 client.
    for r in &requests {
        assert!(r["variables"].is_string(), "variables sent as JSON text");
        assert_eq!(r["headers"]["x-prefect-core-version"], "1.4.1");
    }
    let agent_id = server.agents().await[0]["id"].clone();
    // After the tenant lookup and the registration, every request says who asks.
    for r in &requests[2..] {
        assert_eq!(r["headers"]["x-prefect-agent-id"], agent_id, "{r}");
    }
    let poll: Value = serde_json::from_str(
        requests
            .iter()
            .find(|r| r["operations"][0] == "get_runs_in_queue")
            .unwrap()["variables"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let before =
        chrono::DateTime::parse_from_rfc3339(poll["input"]["before"].as_str().unwrap()).unwrap();
    let sent = polls[0];
    let ahead = before.timestamp_millis() as f64 / 1000.0 - sent;
    assert!(
        (9.0..11.0).contains(&ahead),
        "before is ~10 s ahead: {ahead}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_poll_that_found_runs_the_backoff_starts_over() {
    let server = FakePrefect1::start().await;
    let (_dir, record) = temp_record();
    let runner = fake_runner(&record, "complete");
    server.create_run(json!({})).await;
    let mut agent = AgentProcess::start(&[
        "--flavor",
        "prefect1",
        "--api-url",
        &server.url,
        "--command",
        &runner,
        "--max-polls",
        "5",
    ]);
    assert!(agent.wait_exit(Duration::from_secs(60)).await.success());
    let gaps = poll_sleeps(&server.requests().await);
    assert_eq!(gaps.len(), 4);
    for (gap, expected) in gaps.iter().zip([0.25, 0.5, 1.0, 2.0]) {
        assert!(
            (expected - 0.02..expected + 0.2).contains(gap),
            "gaps {gaps:?}, expected the seed's 0.25 after work, then 0.5, 1, 2"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn graphql_errors_and_500s_are_retried_and_counted() {
    let server = FakePrefect1::start().await;
    let (_dir, record) = temp_record();
    let runner = fake_runner(&record, "complete");
    // Three 500s: the transport retries them within one poll.
    server
        .fault(json!({"mode": "http500", "count": 3, "operation": "get_runs_in_queue"}))
        .await;
    // Two GraphQL errors: two failed polls, counted, and the loop goes on.
    server
        .fault(json!({"mode": "graphql_error", "count": 2, "operation": "get_runs_in_queue", "message": "database unavailable"}))
        .await;
    // A slow answer (the 1.4 client waits up to 15 s) is only slow.
    server
        .fault(json!({"mode": "slow", "delay": 2, "count": 1, "operation": "get_runs_in_queue"}))
        .await;
    let run = server.create_run(json!({})).await;
    let mut args = agent_args(&server.url, "steady", &runner);
    args.extend(["--max-polls", "8"]);
    let mut agent = AgentProcess::start(&args);
    let status = agent.wait_exit(Duration::from_secs(90)).await;
    let out = agent.output();
    assert!(status.success(), "{out}");
    assert!(out.contains("poll_errors=2"), "{out}");
    assert!(out.contains("database unavailable"), "{out}");
    assert_eq!(
        server
            .wait_state(&run, "Success", Duration::from_secs(30))
            .await["state"],
        "Success"
    );
    let polls = server
        .requests()
        .await
        .iter()
        .filter(|r| r["operations"][0] == "get_runs_in_queue")
        .count();
    assert_eq!(polls, 8 + 3, "8 polls, 3 of the calls retried after a 500");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_run_with_a_due_task_run_is_submitted_again() {
    let server = FakePrefect1::start().await;
    let (_dir, record) = temp_record();
    let runner = fake_runner(&record, "complete");
    let run = server.create_run(json!({"state": "Running"})).await;
    let ten_seconds_ago = (chrono::Utc::now() - chrono::Duration::seconds(10)).to_rfc3339();
    server
        .api
        .call(
            reqwest::Method::POST,
            "/_fake/task_runs",
            Some(json!({"flow_run_id": run, "state": "Scheduled", "state_start_time": ten_seconds_ago})),
        )
        .await;
    server
        .api
        .call(
            reqwest::Method::POST,
            "/_fake/task_runs",
            Some(json!({"flow_run_id": run, "state": "Success", "state_start_time": ten_seconds_ago})),
        )
        .await;
    let _agent = AgentProcess::start(&agent_args(&server.url, "retrier", &runner));
    let done = server
        .wait_state(&run, "Success", Duration::from_secs(60))
        .await;
    assert_eq!(recorded(&record), std::slice::from_ref(&run));
    let tasks = done["task_runs"].as_array().unwrap();
    let task = tasks.iter().find(|t| t["state"] != "Success").unwrap();
    assert_eq!(
        task["state"], "Submitted",
        "claimed through its task run: {done}"
    );
    assert_eq!(
        tasks.iter().filter(|t| t["state"] == "Success").count(),
        1,
        "a finished task run is left alone"
    );
    let message = task["serialized_state"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Submitted for execution by agent retrier ("),
        "{message}"
    );
    assert!(
        submitted_by(&done).is_empty(),
        "the flow run itself is not moved back to Submitted"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_launch_ends_failed_with_a_log_line() {
    let server = FakePrefect1::start().await;
    let run = server.create_run(json!({})).await;
    let _agent = AgentProcess::start(&agent_args(
        &server.url,
        "broken",
        "/nonexistent/flow-runner",
    ));
    let failed = server
        .wait_state(&run, "Failed", Duration::from_secs(60))
        .await;
    let message = failed["state_message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "Flow run could not be started: could not start `/nonexistent/flow-runner`"
        ),
        "{message}"
    );
    let errors: Vec<&Value> = failed["logs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "{failed}");
    assert_eq!(errors[0]["message"], message);
    assert_eq!(
        errors[0]["name"], "broken",
        "1.4 names the line after the agent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_run_environment_follows_the_1_4_precedence() {
    let server = FakePrefect1::start().await;
    let (dir, record) = temp_record();
    let runner = fake_runner(&record, "env");
    let flow = server.create_flow(json!({"name": "etl"})).await;
    // A LocalRun, as Prefect 1's LocalAgent runs it: its env and working directory.
    let run = server
        .create_run(json!({"flow_id": flow, "run_config": {
            "type": "LocalRun", "__version__": "1.4.1",
            "working_dir": dir.path().display().to_string(),
            "env": {"SHARED": "run", "PREFECT__CLOUD__API": "http://wrong"}}}))
        .await;
    // A KubernetesRun is not for a process agent: Failed, saying so.
    let k8s = server
        .create_run(json!({"flow_id": flow, "run_config": {"type": "KubernetesRun"}}))
        .await;
    let mut args = agent_args(&server.url, "env-agent", &runner);
    args.extend([
        "--env",
        "SHARED=agent",
        "--env",
        "TEAM=data",
        "--no-cloud-logs",
    ]);
    let _agent = AgentProcess::start(&args);
    server
        .wait_state(&run, "Success", Duration::from_secs(60))
        .await;
    let env: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}.env.json", record.display())).unwrap(),
    )
    .unwrap();
    assert_eq!(env["SHARED"], "run", "run_config env beats the agent's");
    assert_eq!(
        Path::new(env["<cwd>"].as_str().unwrap())
            .canonicalize()
            .unwrap(),
        dir.path().canonicalize().unwrap(),
        "the LocalRun's working_dir"
    );
    let failed = server
        .wait_state(&k8s, "Failed", Duration::from_secs(60))
        .await;
    assert!(
        failed["state_message"].as_str().is_some_and(
            |m| m.contains("run_config type `KubernetesRun` cannot run as a local process")
        ),
        "{failed}"
    );
    assert_eq!(env["TEAM"], "data");
    assert_eq!(env["PREFECT__LOGGING__LEVEL"], "INFO");
    assert_eq!(
        env["PREFECT__CLOUD__API"], server.url,
        "fixed variables win"
    );
    assert_eq!(env["PREFECT__CONTEXT__FLOW_RUN_ID"], run);
    assert_eq!(env["PREFECT__CONTEXT__FLOW_ID"], flow);
    assert_eq!(env["PREFECT__CLOUD__SEND_FLOW_RUN_LOGS"], "false");
    assert_eq!(env["PREFECT__BACKEND"], "server");
    assert_eq!(
        env["PREFECT__ENGINE__FLOW_RUNNER__DEFAULT_CLASS"],
        "prefect.engine.cloud.CloudFlowRunner"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_may_turn_log_shipping_off_but_not_on() {
    let server = FakePrefect1::start().await;
    let (_dir, record) = temp_record();
    let runner = fake_runner(&record, "env");
    let flow = server.create_flow(json!({"name": "quiet"})).await;
    // The agent ships logs; this run's run_config says not to (1.4 lets it).
    let run = server
        .create_run(json!({"flow_id": flow, "run_config": {
            "type": "LocalRun", "env": {"PREFECT__CLOUD__SEND_FLOW_RUN_LOGS": "false"}}}))
        .await;
    let _agent = AgentProcess::start(&agent_args(&server.url, "shipper", &runner));
    server
        .wait_state(&run, "Success", Duration::from_secs(60))
        .await;
    let env: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}.env.json", record.display())).unwrap(),
    )
    .unwrap();
    assert_eq!(env["PREFECT__CLOUD__SEND_FLOW_RUN_LOGS"], "false");
    assert_eq!(
        env["PREFECT__LOGGING__LOG_TO_CLOUD"], "true",
        "the agent's own"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_submitted_run_without_infrastructure_is_launched_after_a_restart() {
    let server = FakePrefect1::start().await;
    let (_dir, record) = temp_record();
    let runner = fake_runner(&record, "complete");
    let run = server.create_run(json!({})).await;
    let mut args = agent_args(&server.url, "phoenix", &runner);
    args.push("--fault-abort-after-claim");
    let mut first = AgentProcess::start(&args);
    assert!(!first.wait_exit(Duration::from_secs(60)).await.success());
    assert_eq!(server.run(&run).await["state"], "Submitted");
    assert!(recorded(&record).is_empty());

    let again = AgentProcess::start(&agent_args(&server.url, "phoenix", &runner));
    server
        .wait_state(&run, "Success", Duration::from_secs(60))
        .await;
    assert_eq!(recorded(&record), std::slice::from_ref(&run));
    assert_eq!(server.times_in_state(&run, "Submitted").await, 1);
    assert!(
        again.output().contains("launching a run claimed earlier"),
        "{}",
        again.output()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn registration_sends_the_seed_s_fields_and_reports_agent_config_settings() {
    let server = FakePrefect1::start().await;
    let config = server.create_agent_config(json!({"sla_seconds": 60})).await;
    let mut agent = AgentProcess::start(&[
        "--flavor",
        "prefect1",
        "--api-url",
        &server.url,
        "--name",
        "configured",
        "--label",
        "a",
        "--label",
        "b",
        "--agent-config-id",
        &config,
        "--max-polls",
        "1",
    ]);
    assert!(agent.wait_exit(Duration::from_secs(60)).await.success());
    let agents = server.agents().await;
    assert_eq!(agents.len(), 1);
    let a = &agents[0];
    assert_eq!(
        (&a["type"], &a["name"], &a["labels"], &a["agent_config_id"]),
        (
            &json!("LocalAgent"),
            &json!("configured"),
            &json!(["a", "b"]),
            &json!(config)
        )
    );
    let out = agent.output();
    assert!(
        out.contains("agent configuration setting not used") && out.contains("sla_seconds"),
        "{out}"
    );
    // An id that does not exist stops the agent with the server's message.
    let mut bad = AgentProcess::start(&[
        "--flavor",
        "prefect1",
        "--api-url",
        &server.url,
        "--agent-config-id",
        "00000000-0000-0000-0000-000000000000",
    ]);
    assert!(!bad.wait_exit(Duration::from_secs(60)).await.success());
    assert!(bad.output().contains("not found"), "{}", bad.output());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_without_a_key_is_polled_for_its_first_tenant() {
    // The fake enforces Server's `tenant_id: UUID!` in get_runs_in_queue_input.
    let server = FakePrefect1::start().await;
    let mut agent = AgentProcess::start(&[
        "--flavor",
        "prefect1",
        "--api-url",
        &server.url,
        "--max-polls",
        "1",
    ]);
    assert!(
        agent.wait_exit(Duration::from_secs(60)).await.success(),
        "{}",
        agent.output()
    );
    let requests = server.requests().await;
    let ops = operations(&requests);
    assert!(ops.contains(&"tenant"), "as 1.4: {ops:?}");
    let poll = requests
        .iter()
        .find(|r| r["operations"][0] == "get_runs_in_queue")
        .expect("a poll");
    let variables: Value = match &poll["variables"] {
        Value::String(s) => serde_json::from_str(s).unwrap(),
        v => v.clone(),
    };
    assert_eq!(
        variables["input"]["tenant_id"],
        "00000000-0000-0000-0000-00000000aaaa"
    );
    assert!(
        poll["headers"].get("x-prefect-tenant-id").is_none(),
        "the tenant header goes with a key only"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_are_checked_and_never_printed() {
    let key = format!("pcsk_{}", uuid::Uuid::new_v4().simple());
    let server = FakePrefect1::start_with(&["--token", &key]).await;
    let mut wrong = AgentProcess::start_with({
        let mut cmd = agent_command(&["--flavor", "prefect1", "--api-url", &server.url]);
        cmd.env("PREFECT__CLOUD__AGENT__AUTH_TOKEN", "not-the-key");
        cmd
    });
    assert_eq!(
        wrong.wait_exit(Duration::from_secs(60)).await.code(),
        Some(1)
    );
    assert!(
        wrong.output().contains("rejected the credentials"),
        "{}",
        wrong.output()
    );

    let mut right = AgentProcess::start_with({
        let mut cmd = agent_command(&[
            "--flavor",
            "prefect1",
            "--api-url",
            &server.url,
            "--max-polls",
            "1",
            "--log-level",
            "debug",
        ]);
        cmd.env("PREFECT__CLOUD__AGENT__AUTH_TOKEN", &key);
        cmd
    });
    assert!(right.wait_exit(Duration::from_secs(60)).await.success());
    let requests = server.requests().await;
    let ops = operations(&requests);
    assert!(
        ops.contains(&"auth_info"),
        "the tenant is looked up: {ops:?}"
    );
    let poll = requests
        .iter()
        .rev()
        .find(|r| r["operations"][0] == "get_runs_in_queue")
        .unwrap();
    assert_eq!(
        poll["headers"]["x-prefect-tenant-id"],
        "00000000-0000-0000-0000-00000000aaaa"
    );
    assert!(!right.output().contains(&key), "the key in the agent's log");
}

/// Two agents of one name (the default name is `agent`): a claim carries the agent's
/// identity, so only the claimant itself, restarted, adopts what it left unlaunched.
#[tokio::test(flavor = "multi_thread")]
async fn a_namesake_never_adopts_another_agent_s_claim() {
    use prefect_agent_operator::backend::prefect1::{Prefect1, Prefect1Config};

    let server = FakePrefect1::start().await;
    let run = server.create_run(json!({})).await;
    let backend = |identity: &str| {
        Prefect1::new(Prefect1Config {
            api_url: server.url.clone(),
            key: None,
            tenant_id: None,
            agent_name: "agent".into(),
            identity: identity.into(),
            agent_type: "LocalAgent".into(),
            labels: Vec::new(),
            agent_config_id: None,
            prefetch: Duration::from_secs(10),
            log_level: "INFO".into(),
            backend: "server".into(),
            retry: Default::default(),
        })
        .unwrap()
    };
    a_namesake_never_adopts(backend, &run).await;
}

/// The same end to end: one agent claims and dies before launching; a namesake with
/// another `--agent-id` and the claimant restarted both run; the run is launched once,
/// by the claimant.
#[tokio::test(flavor = "multi_thread")]
async fn two_agents_of_one_name_launch_a_stranded_claim_once() {
    let server = FakePrefect1::start().await;
    let (_dir, record) = temp_record();
    let runner = fake_runner(&record, "complete");
    let run = server.create_run(json!({})).await;
    let with_id = |id: &'static str| {
        let mut args = agent_args(&server.url, "agent", &runner);
        args.extend(["--agent-id", id]);
        args
    };
    let mut args = with_id("one");
    args.push("--fault-abort-after-claim");
    let mut first = AgentProcess::start(&args);
    assert!(!first.wait_exit(Duration::from_secs(60)).await.success());
    assert_eq!(server.run(&run).await["state"], "Submitted");

    let namesake = AgentProcess::start(&with_id("two"));
    let again = AgentProcess::start(&with_id("one"));
    server
        .wait_state(&run, "Success", Duration::from_secs(60))
        .await;
    assert_eq!(
        recorded(&record),
        std::slice::from_ref(&run),
        "launched once"
    );
    assert!(
        again.output().contains("launching a run claimed earlier"),
        "{}",
        again.output()
    );
    assert!(
        !namesake
            .output()
            .contains("launching a run claimed earlier"),
        "{}",
        namesake.output()
    );
    assert_eq!(
        submissions(&server.run(&run).await),
        ["Submitted for execution by agent agent (one)"]
    );
}
