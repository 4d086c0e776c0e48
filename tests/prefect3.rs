//! The agent, as a binary, against a real `prefect server`: each test has its own pool.

use pao_testkit as common;

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use serde_json::json;

fn prefect_command() -> String {
    format!(
        "{} flow-run execute",
        prefect_venv().join("bin/prefect").display()
    )
}

/// Flags every test agent shares: fast loops so tests wait on conditions, not clocks.
fn agent_args<'a>(url: &'a str, pool: &'a str, name: &'a str) -> Vec<&'a str> {
    pool_agent_args(url, pool, name)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_run_completes_with_its_logs_in_prefect() {
    let Setup {
        server, api, pool, ..
    } = Setup::new("hello").await;
    let dep = api.create_deployment(&pool, json!({})).await;
    let run = api.create_run(&dep).await;

    let cmd = prefect_command();
    let mut args = agent_args(&server.url, &pool, "hello-agent");
    args.extend(["--command", &cmd, "--env", "GREETING_FROM=agent"]);
    let agent = AgentProcess::start(&args);

    let done = api
        .wait_state(&run, "COMPLETED", Duration::from_secs(120))
        .await;
    let pid = done["infrastructure_pid"].as_str().unwrap_or_default();
    assert!(
        pid.contains(':'),
        "infrastructure_pid is host:pid, got {pid:?}"
    );
    api.assert_ran_here(&run, &pool, "hello-agent").await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_agents_racing_over_100_runs_execute_each_exactly_once() {
    race(Setup::new("race").await, Due::AllAtOnce).await;
}

/// The same on PostgreSQL, Prefect's production database: its locking differs from
/// SQLite's (concurrent claims of one run race in the database, not behind a file lock).
/// The runs are 30 s late, so Prefect's late-runs service marks them "Late" while the
/// agents claim them; a Late state stamped after a claim but committed before it made
/// the claim look lost, and the run was left PENDING with nobody to launch it.
#[tokio::test(flavor = "multi_thread")]
async fn on_postgres_two_agents_racing_over_100_runs_execute_each_exactly_once() {
    let setup = Setup::on(PrefectServer::on_postgres, "race-pg", json!({})).await;
    let db = setup.server.postgres.as_ref().expect("on PostgreSQL");
    let pool = setup.pool.clone();
    race(setup, Due::Late).await;
    // The runs are PostgreSQL's rows, not a SQLite file's.
    let sql = format!(
        "SELECT count(*) FROM flow_run JOIN work_queue ON flow_run.work_queue_id = work_queue.id \
         JOIN work_pool ON work_queue.work_pool_id = work_pool.id \
         WHERE work_pool.name = '{pool}' AND flow_run.state_type = 'COMPLETED'"
    );
    assert_eq!(db.query(&sql), "100");
}

/// When the race's runs are due.
enum Due {
    /// All at the same instant a few seconds ahead, so both agents see all at once.
    AllAtOnce,
    /// 30 s ago: late already, as a backlog is.
    Late,
}

async fn race(setup: Setup, due: Due) {
    let Setup {
        server,
        api,
        pool,
        record,
        _dir,
    } = setup;
    let dep = api
        .create_deployment(&pool, json!({"command": fake_runner(&record, "complete")}))
        .await;
    let (port_a, port_b) = (free_port(), free_port());
    let (addr_a, addr_b) = (format!("127.0.0.1:{port_a}"), format!("127.0.0.1:{port_b}"));
    let mut args_a = agent_args(&server.url, &pool, "racer-a");
    args_a.extend(["--agent-address", &addr_a, "--prefetch", "1s"]);
    let mut args_b = agent_args(&server.url, &pool, "racer-b");
    args_b.extend(["--agent-address", &addr_b, "--prefetch", "1s"]);
    let a = AgentProcess::start(&args_a);
    let b = AgentProcess::start(&args_b);
    for addr in [&addr_a, &addr_b] {
        wait_for(
            "both agents registered",
            Duration::from_secs(60),
            || async { health(addr).await?["agentId"].as_str().map(|_| ()) },
        )
        .await;
    }
    let due = match due {
        Due::AllAtOnce => chrono::Utc::now() + chrono::Duration::seconds(8),
        Due::Late => chrono::Utc::now() - chrono::Duration::seconds(30),
    };
    let mut runs = BTreeSet::new();
    for _ in 0..100 {
        runs.insert(api.create_run_at(&dep, due).await);
    }

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done: BTreeSet<String> = recorded(&record).into_iter().collect();
        if done.len() == 100 {
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<&String> = runs.difference(&done).collect();
            for run in missing.iter().take(3) {
                explain(&api, run, &[&a, &b]).await;
            }
            for agent in [&a, &b] {
                eprintln!("TAIL\n{}", last_lines(&agent.output(), 40));
            }
            panic!(
                "{} of 100 runs executed after 180 s; not: {missing:?}",
                done.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Give late duplicates (a second claim, a re-adoption) every chance to show:
    // several more polls and maintenance passes of both agents.
    for addr in [&addr_a, &addr_b] {
        let now = wait_for("health", Duration::from_secs(10), || polls(addr)).await;
        wait_for("three more polls", Duration::from_secs(90), || async {
            polls(addr).await.filter(|p| *p >= now + 3)
        })
        .await;
    }
    for run in &runs {
        // The history, not the current-state pointer: the SQLite server can let a stale
        // concurrent claim overwrite the pointer after COMPLETED (see docs/prefect3.md).
        let states = api.states(run).await;
        let kinds: Vec<&str> = states.iter().filter_map(|s| s["type"].as_str()).collect();
        if !kinds.contains(&"COMPLETED") || kinds.contains(&"CRASHED") {
            explain(&api, run, &[&a, &b]).await;
            panic!("run {run} completed and was not crashed by an agent: {kinds:?}");
        }
    }
    let lines = recorded(&record);
    let unique_ids: BTreeSet<String> = lines.iter().cloned().collect();
    if lines.len() != unique_ids.len() {
        let mut seen = HashSet::new();
        let dup = lines.iter().find(|l| !seen.insert(l.as_str())).unwrap();
        explain(&api, dup, &[&a, &b]).await;
    }
    assert_eq!(
        lines.len(),
        100,
        "100 executions, no more: duplicates = {}",
        lines.len() - unique_ids.len()
    );
    assert_eq!(unique_ids, runs, "every run executed");
    // The log line follows the infrastructure-id update, which may land after COMPLETED.
    let submitted = |out: String| out.matches("submitted for execution").count();
    wait_for(
        "both agents' logs to count 100 submissions",
        Duration::from_secs(30),
        || async { (submitted(a.output()) + submitted(b.output()) == 100).then_some(()) },
    )
    .await;
    let (na, nb) = (submitted(a.output()), submitted(b.output()));
    eprintln!("racer-a launched {na}, racer-b launched {nb}");
    // Prefect 3.9.1 runs a run's transitions one at a time: its answer proves a claim that
    // displaced a SCHEDULED state, and the history is read only where it does not.
    let (mut claimed, mut by_history) = (0, 0);
    for addr in [&addr_a, &addr_b] {
        let h = wait_for("health", Duration::from_secs(10), || health(addr)).await;
        claimed += h["runsClaimed"].as_u64().unwrap_or(0);
        by_history += h["claimsCheckedByHistory"].as_u64().unwrap_or(u64::MAX / 4);
    }
    eprintln!("claims won {claimed}, of them proven by the history {by_history}");
    assert!(claimed >= 100, "every run claimed: {claimed}");
    assert!(
        by_history * 10 <= claimed,
        "the answer proved the claims, the history was read for few: {by_history} of {claimed}"
    );
    assert!(
        na > 0 && nb > 0,
        "both agents took part in the race: {na} + {nb}"
    );
}

/// Prints a run's state history with messages and every agent log line naming it.
async fn explain(api: &Api, run: &str, agents: &[&AgentProcess]) {
    for s in api.states(run).await {
        eprintln!(
            "STATE {run} {} {} {}",
            s["timestamp"], s["type"], s["message"]
        );
    }
    for agent in agents {
        for l in agent.output().lines().filter(|l| l.contains(run)) {
            eprintln!("LOG {l}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn max_polls_zero_registers_and_never_polls() {
    let Setup {
        server, api, pool, ..
    } = Setup::new("max0").await;
    let dep = api
        .create_deployment(&pool, json!({"command": "true"}))
        .await;
    let run = api.create_run(&dep).await;

    let mut args = agent_args(&server.url, &pool, "zero");
    args.extend(["--max-polls", "0", "--log-format", "json"]);
    let mut agent = AgentProcess::start(&args);
    let status = agent.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "exit 0; output:\n{}", agent.output());
    assert_eq!(stopped_field(&agent.output(), "polls"), Some(0));
    assert_eq!(api.state(&run).await, "SCHEDULED", "nothing was claimed");
    let workers = api
        .call(
            reqwest::Method::POST,
            &format!("/work_pools/{pool}/workers/filter"),
            Some(json!({})),
        )
        .await;
    assert_eq!(workers[0]["name"], "zero", "registered all the same");
}

#[tokio::test(flavor = "multi_thread")]
async fn max_polls_three_stops_after_three_polls_failed_ones_included() {
    let Setup {
        server, api, pool, ..
    } = Setup::new("max3").await;
    let mut args = agent_args(&server.url, &pool, "three");
    args.extend(["--max-polls", "3", "--log-format", "json"]);
    let mut agent = AgentProcess::start(&args);
    let status = agent.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "exit 0; output:\n{}", agent.output());
    assert_eq!(stopped_field(&agent.output(), "polls"), Some(3));

    // Polls that fail count too: delete the pool under a running agent.
    let mut args = agent_args(&server.url, &pool, "three-failing");
    args.extend(["--max-polls", "3", "--log-format", "json"]);
    let pool2 = pool.clone();
    let mut agent = AgentProcess::start(&args);
    wait_for("the agent to register", Duration::from_secs(30), || async {
        agent.output().contains("agent registered").then_some(())
    })
    .await;
    api.call(
        reqwest::Method::DELETE,
        &format!("/work_pools/{pool2}"),
        None,
    )
    .await;
    let status = agent.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "exit 0; output:\n{}", agent.output());
    let out = agent.output();
    assert_eq!(stopped_field(&out, "polls"), Some(3));
    assert!(
        stopped_field(&out, "poll_errors").unwrap_or(0) >= 1,
        "{out}"
    );
}

/// A numeric field of the agent's final "agent stopped" JSON log line.
fn stopped_field(output: &str, field: &str) -> Option<u64> {
    output
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "agent stopped")
        .and_then(|v| v[field].as_u64())
}

/// A server with an auth string takes it as the event stream's token too (found when
/// pods on a real node met such a server: the stream was refused, polling only).
#[tokio::test(flavor = "multi_thread")]
async fn the_event_stream_authenticates_with_an_auth_string() {
    const AUTH: &str = "admin:events-credential";
    let server = tokio::task::spawn_blocking(|| PrefectServer::with_auth(AUTH))
        .await
        .unwrap();
    let api = Api::new(
        &server.url,
        prefect_agent_operator::backend::http::Auth::Basic(
            prefect_agent_operator::secret::SecretString::new(AUTH),
        ),
    );
    let pool = unique("events-auth");
    api.create_pool(&pool).await;
    let (agent, _addr, _) = an_agent_asleep(&server.url, &pool, &["--auth-string", AUTH]).await;
    let dep = api.create_deployment(&pool, json!({})).await;
    let run = api.create_run(&dep).await;
    // Well inside the 60 s sleep: the event woke the agent.
    wait_for("the run claimed", Duration::from_secs(20), || async {
        (api.state(&run).await != "SCHEDULED").then_some(())
    })
    .await;
    assert!(
        !agent.output().contains("event stream unavailable"),
        "{}",
        agent.output()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn poke_wakes_an_idle_agent_at_once() {
    let Setup { server, pool, .. } = Setup::new("poke").await;
    let (agent, addr, before) = an_agent_asleep(&server.url, &pool, &["--no-events"]).await;
    let r = reqwest::get(format!("http://{addr}/api/poke"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Well inside the 60 s sleep the poke cut short.
    wait_for(
        "a poll right after the poke",
        Duration::from_secs(20),
        || async { polls(&addr).await.filter(|p| *p > before) },
    )
    .await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_run_event_wakes_the_agent_which_claims_it() {
    let Setup {
        server, api, pool, ..
    } = Setup::new("events").await;
    let (agent, addr, before) = an_agent_asleep(&server.url, &pool, &[]).await;
    let dep = api.create_deployment(&pool, json!({})).await;
    let run = api.create_run(&dep).await;
    // Claimed well inside the 60 s sleep (with --no-events this times out): the event
    // woke the poll loop, which claimed.
    wait_for("the run claimed", Duration::from_secs(20), || async {
        (api.state(&run).await != "SCHEDULED").then_some(())
    })
    .await;
    let after = polls(&addr).await.unwrap();
    assert!(after > before, "claimed by a poll ({before} → {after})");
    // A run of another pool wakes nobody here.
    let other = Setup::new("events-other").await;
    let other_dep = other.api.create_deployment(&other.pool, json!({})).await;
    let other_run = other.api.create_run(&other_dep).await;
    // Its event has come and gone once this pool's next run is claimed.
    let run2 = api.create_run(&dep).await;
    wait_for(
        "the second run claimed",
        Duration::from_secs(20),
        || async { (api.state(&run2).await != "SCHEDULED").then_some(()) },
    )
    .await;
    assert_eq!(api.state(&other_run).await, "SCHEDULED");
    drop(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_whose_launch_fails_ends_crashed_with_the_cause() {
    let Setup {
        server, api, pool, ..
    } = Setup::new("badlaunch").await;
    let dep = api
        .create_deployment(&pool, json!({"command": "/nonexistent/flow-runner --go"}))
        .await;
    let run = api.create_run(&dep).await;
    let agent = AgentProcess::start(&agent_args(&server.url, &pool, "bad-launch"));
    let crashed = api
        .wait_state(&run, "CRASHED", Duration::from_secs(60))
        .await;
    let message = crashed["state"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("could not start `/nonexistent/flow-runner`")
            && message.contains("No such file"),
        "cause in the state message: {message:?}"
    );
    assert!(
        api.logs(&run)
            .await
            .iter()
            .any(|l| l.contains("could not start")),
        "and in the run's logs"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_that_exits_early_crashes_its_run_with_the_exit_code() {
    let Setup {
        server,
        api,
        pool,
        record,
        _dir,
    } = Setup::new("exit3").await;
    let dep = api
        .create_deployment(&pool, json!({"command": fake_runner(&record, "exit3")}))
        .await;
    let run = api.create_run(&dep).await;
    let agent = AgentProcess::start(&agent_args(&server.url, &pool, "exit3"));
    let crashed = api
        .wait_state(&run, "CRASHED", Duration::from_secs(60))
        .await;
    let message = crashed["state"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("exited with code 3"), "{message:?}");
    assert_eq!(recorded(&record), std::slice::from_ref(&run));
    drop(agent);
}

/// As Prefect's worker: infrastructure that ends successfully leaves the run to the flow.
/// An evicted pod's runner puts its run back to SCHEDULED and exits 0; the run is picked
/// up again, not crashed.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_its_flow_rescheduled_is_run_again_not_crashed() {
    let Setup {
        server,
        api,
        pool,
        record,
        _dir,
    } = Setup::new("resched").await;
    let dep = api
        .create_deployment(
            &pool,
            json!({"command": fake_runner(&record, "reschedule")}),
        )
        .await;
    let run = api.create_run(&dep).await;
    let agent = AgentProcess::start(&agent_args(&server.url, &pool, "resched"));
    api.wait_state(&run, "COMPLETED", Duration::from_secs(60))
        .await;
    assert_eq!(recorded(&record), [run.clone(), run.clone()], "run twice");
    assert_eq!(api.times_in_state(&run, "CRASHED").await, 0);
    drop(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancelling_a_running_run_stops_its_process_and_ends_cancelled() {
    cancel_a_running_run("cancel", "1s", &["--no-events"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cancelling_event_wakes_the_cancellation_check() {
    // Checks every 2 minutes, yet the run is cancelled within the 60 s deadline below.
    cancel_a_running_run("cancel-event", "120s", &[]).await;
}

/// A run whose flow process runs is set CANCELLING: the agent (checking for cancellations
/// every `maintenance`) ends the run CANCELLED and kills the process, whose SIGTERM handler
/// (as Prefect's runner's) reschedules a run not final yet: it must find it CANCELLED.
async fn cancel_a_running_run(prefix: &str, maintenance: &str, extra: &[&str]) {
    let Setup {
        server,
        api,
        pool,
        record,
        _dir,
    } = Setup::new(prefix).await;
    let dep = api
        .create_deployment(&pool, json!({"command": fake_runner(&record, "sigterm")}))
        .await;
    let run = api.create_run(&dep).await;
    let mut args = agent_args(&server.url, &pool, "canceller");
    let at = args
        .iter()
        .position(|a| *a == "--maintenance-interval")
        .unwrap();
    args[at + 1] = maintenance;
    args.extend_from_slice(extra);
    let agent = AgentProcess::start(&args);
    api.wait_state(&run, "RUNNING", Duration::from_secs(60))
        .await;
    // The agent records the process after it started it, and the flow may say RUNNING
    // first (seen on a loaded machine): wait for the record itself.
    let pid: i32 = wait_for(
        "the run's infrastructure pid",
        Duration::from_secs(60),
        || async {
            let run = api.run(&run).await;
            run["infrastructure_pid"]
                .as_str()?
                .rsplit_once(':')?
                .1
                .parse()
                .ok()
        },
    )
    .await;
    assert!(alive(pid), "flow process {pid} runs");

    let answer = api.set_state(&run, "CANCELLING", false).await;
    assert_eq!(answer["status"], "ACCEPT", "{answer}");
    api.wait_state(&run, "CANCELLED", Duration::from_secs(60))
        .await;
    wait_for(
        "the flow process to be gone",
        Duration::from_secs(15),
        || async { (!alive(pid)).then_some(()) },
    )
    .await;
    let seen = std::fs::read_to_string(format!("{}.sigterm", record.display()))
        .expect("the runner's SIGTERM handler ran");
    assert_eq!(
        seen, "CANCELLED",
        "the run was final when its runner got SIGTERM"
    );
    let kinds: Vec<String> = api
        .states(&run)
        .await
        .iter()
        .map(|s| s["type"].as_str().unwrap_or_default().to_string())
        .collect();
    let cancelling = kinds.iter().position(|k| k == "CANCELLING").unwrap();
    assert!(
        kinds[cancelling + 1..].iter().all(|k| k == "CANCELLED"),
        "nothing but CANCELLED after CANCELLING: {kinds:?}"
    );
    assert_eq!(recorded(&record).len(), 1, "launched once");
    drop(agent);
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for our purpose: it only waits to be reaped.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_between_claim_and_launch_still_runs_the_run_exactly_once() {
    let Setup {
        server,
        api,
        pool,
        record,
        _dir,
    } = Setup::new("adopt").await;
    let dep = api
        .create_deployment(&pool, json!({"command": fake_runner(&record, "complete")}))
        .await;
    let run = api.create_run(&dep).await;

    let mut args = agent_args(&server.url, &pool, "phoenix");
    args.push("--fault-abort-after-claim");
    let mut first = AgentProcess::start(&args);
    let status = first.wait_exit(Duration::from_secs(60)).await;
    assert!(!status.success(), "the first agent died mid-submission");
    let claimed = api.run(&run).await;
    assert_eq!(claimed["state"]["type"], "PENDING", "claimed…");
    assert!(claimed["infrastructure_pid"].is_null(), "…never launched");
    assert!(recorded(&record).is_empty());

    let second = AgentProcess::start(&agent_args(&server.url, &pool, "phoenix"));
    api.wait_state(&run, "COMPLETED", Duration::from_secs(60))
        .await;
    assert_eq!(
        recorded(&record),
        std::slice::from_ref(&run),
        "executed exactly once"
    );
    assert_eq!(api.times_in_state(&run, "PENDING").await, 1, "claimed once");
    assert!(
        second.output().contains("launching a run claimed earlier"),
        "{}",
        second.output()
    );
}

/// A claim sent by a process killed mid-request can land after the run was claimed
/// again, ran and finished (the request waited in a busy server; seen in the fault suite
/// on SQLite): Prefect takes it as a re-run and the run would stay PENDING for good. The
/// agent's next process puts the finished state back and launches nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_late_claim_over_a_finished_run_is_undone_by_the_next_process() {
    let Setup {
        server,
        api,
        pool,
        record,
        _dir,
    } = Setup::new("lateclaim").await;
    let dep = api
        .create_deployment(&pool, json!({"command": fake_runner(&record, "complete")}))
        .await;
    let run = api.create_run(&dep).await;
    let args = agent_args(&server.url, &pool, "lazarus");
    let first = AgentProcess::start(&args);
    api.wait_state(&run, "COMPLETED", Duration::from_secs(60))
        .await;
    drop(first);
    // The late claim: this agent's marker, a transition id, as its claims carry.
    let states = api.states(&run).await;
    let marker = states
        .iter()
        .find(|s| s["type"] == "PENDING")
        .and_then(|s| s["message"].as_str())
        .expect("the first process's claim")
        .to_string();
    let late = api
        .call(
            reqwest::Method::POST,
            &format!("/flow_runs/{run}/set_state"),
            Some(
                json!({"state": {"type": "PENDING", "name": "Pending", "message": marker,
                "state_details": {"transition_id": uuid::Uuid::new_v4().to_string()}}}),
            ),
        )
        .await;
    assert_eq!(
        late["status"], "ACCEPT",
        "Prefect takes a claim over a finished run: {late}"
    );
    assert_eq!(api.state(&run).await, "PENDING");

    let second = AgentProcess::start(&args);
    api.wait_state(&run, "COMPLETED", Duration::from_secs(60))
        .await;
    assert!(
        second
            .output()
            .contains("a late claim displaced the run's state; restored it"),
        "{}",
        second.output()
    );
    assert_eq!(
        recorded(&record),
        std::slice::from_ref(&run),
        "executed once, not again"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_cancelled_between_claim_and_launch_ends_cancelled() {
    let Setup {
        server,
        api,
        pool,
        record,
        _dir,
    } = Setup::new("cclaim").await;
    let dep = api
        .create_deployment(&pool, json!({"command": fake_runner(&record, "complete")}))
        .await;
    let run = api.create_run(&dep).await;
    let mut args = agent_args(&server.url, &pool, "claimer");
    args.push("--fault-abort-after-claim");
    let mut first = AgentProcess::start(&args);
    assert!(!first.wait_exit(Duration::from_secs(60)).await.success());
    assert_eq!(api.state(&run).await, "PENDING", "claimed, never launched");
    let answer = api.set_state(&run, "CANCELLING", false).await;
    assert_eq!(answer["status"], "ACCEPT", "{answer}");

    // Another agent on the pool leaves it alone: the claim is not its own.
    let mut args = agent_args(&server.url, &pool, "bystander");
    args.extend(["--log-level", "debug"]);
    let other = AgentProcess::start(&args);
    wait_for(
        "the bystander to pass it over",
        Duration::from_secs(60),
        || async {
            other
                .output()
                .contains("claimed by another agent; left to it")
                .then_some(())
        },
    )
    .await;
    drop(other);
    assert_eq!(api.state(&run).await, "CANCELLING");

    let _again = AgentProcess::start(&agent_args(&server.url, &pool, "claimer"));
    api.wait_state(&run, "CANCELLED", Duration::from_secs(60))
        .await;
    assert!(recorded(&record).is_empty(), "never executed");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_finishes_submissions_under_way_and_exits_zero() {
    let Setup {
        server,
        api,
        pool,
        record,
        _dir,
    } = Setup::new("term").await;
    let dep = api
        .create_deployment(&pool, json!({"command": fake_runner(&record, "complete")}))
        .await;
    let mut runs = HashSet::new();
    for _ in 0..20 {
        runs.insert(api.create_run(&dep).await);
    }
    let mut args = agent_args(&server.url, &pool, "terminated");
    args.extend(["--submit-concurrency", "2"]);
    let mut agent = AgentProcess::start(&args);
    wait_for("a first submission", Duration::from_secs(60), || async {
        agent
            .output()
            .contains("submitted for execution")
            .then_some(())
    })
    .await;
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(60)).await;
    assert!(
        status.success(),
        "exit 0 on SIGTERM; output:\n{}",
        agent.output()
    );
    // Every run it claimed was launched: none is left PENDING without infrastructure.
    for run in &runs {
        let r = api.run(run).await;
        let state = r["state"]["type"].as_str().unwrap_or_default();
        assert!(
            state == "SCHEDULED" || !r["infrastructure_pid"].is_null(),
            "run {run} left {state} without infrastructure"
        );
    }
}

/// The environment the fake runner saw, as a map.
fn env_seen(record: &std::path::Path) -> serde_json::Map<String, serde_json::Value> {
    let path = format!("{}.env.json", record.display());
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("env json")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_environment_follows_the_documented_precedence() {
    // Pool defaults are the lowest job-variable layer.
    let template = json!({"job_configuration": {"command": "{{ command }}", "env": "{{ env }}"},
        "variables": {"type": "object", "properties": {
            "command": {"type": "string"},
            "env": {"type": "object", "default": {"POOL_ONLY": "pool", "SHARED": "pool"}}}}});
    let Setup {
        server,
        api,
        pool,
        record,
        _dir,
    } = Setup::with_template("env", template).await;
    // The deployment points its runs at the same server by another address, as one sets
    // an in-cluster URL for Prefect's worker.
    let in_cluster = server.url.replace("127.0.0.1", "localhost");
    assert_ne!(in_cluster, server.url);
    let dep = api
        .create_deployment(
            &pool,
            json!({"command": fake_runner(&record, "env"),
                   "env": {"SHARED": "deployment", "DEP_ONLY": "1", "PREFECT_API_URL": in_cluster}}),
        )
        .await;
    let run = api
        .create_run_with(&dep, json!({"env": {"SHARED": "run"}}))
        .await;
    let mut args = agent_args(&server.url, &pool, "env-agent");
    args.extend([
        "--env",
        "TEAM=agent",
        "--env",
        "SHARED=agent",
        "--env",
        "PREFECT_API_URL=http://wrong/api",
    ]);
    let agent = AgentProcess::start(&args);
    api.wait_state(&run, "COMPLETED", Duration::from_secs(60))
        .await;
    let env = env_seen(&record);
    assert_eq!(env["TEAM"], "agent", "agent env_vars reach the run");
    assert_eq!(env["POOL_ONLY"], "pool", "pool defaults merge in");
    assert_eq!(env["DEP_ONLY"], "1", "deployment env merges with the run's");
    assert_eq!(
        env["SHARED"], "run",
        "run job variables beat deployment and agent"
    );
    assert_eq!(
        env["PREFECT_API_URL"], in_cluster,
        "the deployment's API URL wins over the agent's, as with Prefect's worker"
    );
    assert_eq!(env["PREFECT__FLOW_RUN_ID"], run.as_str());
    assert_eq!(env["PREFECT__WORKER_NAME"], "env-agent", "attribution");
    assert_eq!(env["PREFECT__DEPLOYMENT_ID"], dep.as_str(), "attribution");
    assert!(
        env.contains_key("PREFECT__FLOW_NAME"),
        "attribution: {env:?}"
    );
    assert!(
        !env.contains_key("PREFECT_LOGGING_TO_API_ENABLED"),
        "log shipping stays on"
    );
    // Shipped in the background: the run may complete before the agent's line lands.
    wait_for(
        "the agent's submission line in the run's logs",
        Duration::from_secs(30),
        || async {
            let logs = api.logs(&run).await;
            logs.iter()
                .any(|l| l.starts_with("Submitted for execution"))
                .then_some(())
        },
    )
    .await;
    drop(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_cloud_logs_silences_the_agent_and_turns_off_shipping_in_runs() {
    let Setup {
        server,
        api,
        pool,
        record,
        _dir,
    } = Setup::new("nologs").await;
    let dep = api
        .create_deployment(
            &pool,
            json!({"command": fake_runner(&record, "env"), "env": {"PREFECT_LOGGING_TO_API_ENABLED": "true"}}),
        )
        .await;
    let run = api.create_run(&dep).await;
    let mut args = agent_args(&server.url, &pool, "quiet");
    args.push("--no-cloud-logs");
    let agent = AgentProcess::start(&args);
    api.wait_state(&run, "COMPLETED", Duration::from_secs(60))
        .await;
    let env = env_seen(&record);
    assert_eq!(
        env["PREFECT_LOGGING_TO_API_ENABLED"], "false",
        "a job variable cannot turn it back on"
    );
    assert!(
        agent.output().contains("submitted for execution"),
        "the agent did launch it"
    );
    assert_eq!(
        api.logs(&run).await,
        Vec::<String>::new(),
        "the agent shipped no log line"
    );
    drop(agent);
}

#[tokio::test(flavor = "multi_thread")]
async fn queues_split_a_pool_s_work() {
    let Setup {
        server,
        api,
        pool,
        record,
        _dir,
    } = Setup::new("queues").await;
    api.create_queue(&pool, "fast").await;
    api.create_queue(&pool, "slow").await;
    let fast = api
        .create_deployment_in(
            &pool,
            "fast",
            json!({"command": fake_runner(&record, "complete")}),
        )
        .await;
    let slow = api
        .create_deployment_in(
            &pool,
            "slow",
            json!({"command": fake_runner(&record, "complete")}),
        )
        .await;
    let fast_run = api.create_run(&fast).await;
    let slow_run = api.create_run(&slow).await;

    let mut args = agent_args(&server.url, &pool, "fast-only");
    args.extend(["--queue", "fast", "--max-polls", "4"]);
    let mut agent = AgentProcess::start(&args);
    api.wait_state(&fast_run, "COMPLETED", Duration::from_secs(60))
        .await;
    assert!(agent.wait_exit(Duration::from_secs(60)).await.success());
    assert_eq!(
        api.state(&slow_run).await,
        "SCHEDULED",
        "another queue's run is left alone"
    );
    assert_eq!(recorded(&record), std::slice::from_ref(&fast_run));

    let mut args = agent_args(&server.url, &pool, "slow-too");
    args.extend(["--queue", "fast,slow"]);
    let agent = AgentProcess::start(&args);
    api.wait_state(&slow_run, "COMPLETED", Duration::from_secs(60))
        .await;
    drop(agent);
}

/// Two agents of one name: a claim carries the agent's identity, so only the claimant
/// itself, restarted, adopts what it left unlaunched; a namesake never does.
#[tokio::test(flavor = "multi_thread")]
async fn a_namesake_never_adopts_another_agent_s_claim() {
    use prefect_agent_operator::backend::prefect3::{Prefect3, Prefect3Config};

    let Setup {
        server, api, pool, ..
    } = Setup::new("namesake").await;
    let dep = api.create_deployment(&pool, json!({})).await;
    let run = api.create_run(&dep).await;
    let backend = |identity: &str| {
        Prefect3::new(Prefect3Config {
            api_url: server.url.clone(),
            auth: prefect_agent_operator::backend::http::Auth::None,
            pool: pool.clone(),
            queues: Vec::new(),
            agent_name: "agent".into(),
            identity: identity.into(),
            prefetch: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(30),
            create_pool: None,
            poll_limit: 200,
            retry: Default::default(),
            events: false,
        })
        .unwrap()
    };
    a_namesake_never_adopts(backend, &run).await;
}

/// A burst is not polled again while the runs a poll found still wait for submission
/// slots: a poll is the server's dearest call, and one made then only finds them again.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_is_polled_again_only_when_its_runs_are_nearly_submitted() {
    let Setup {
        server, api, pool, ..
    } = Setup::new("burstpoll").await;
    let dep = api
        .create_deployment(&pool, json!({"command": "true"}))
        .await;
    const RUNS: u64 = 100;
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        runs.push(api.create_run(&dep).await);
    }
    let addr = format!("127.0.0.1:{}", free_port());
    // Not the tests' 1 s poll interval: it bounds the wait for the slots.
    let args = [
        "--api-url",
        &server.url,
        "--pool",
        &pool,
        "--name",
        "burst-polls",
        "--poll-interval",
        "30s",
        "--agent-address",
        &addr,
        "--submit-concurrency",
        "1",
    ];
    let agent = AgentProcess::start(&args);
    let health = || async {
        let h = health(&addr).await?;
        Some((h["polls"].as_u64()?, h["runsSubmitted"].as_u64()?))
    };
    let (first_polls, started) =
        wait_for("a first submission", Duration::from_secs(60), || async {
            health()
                .await
                .filter(|(_, submitted)| *submitted >= 1)
                .map(|(polls, _)| (polls, std::time::Instant::now()))
        })
        .await;
    let last_polls = wait_for("every run submitted", Duration::from_secs(180), || async {
        health()
            .await
            .filter(|(_, submitted)| *submitted == RUNS)
            .map(|(polls, _)| polls)
    })
    .await;
    let drained = started.elapsed();
    // One slot took the runs one by one for this long; the loop that polled again 250 ms
    // after any poll that found runs (then backed off) made 5 polls over 12 s here.
    assert!(
        drained >= Duration::from_millis(1500),
        "{RUNS} runs through one slot in {drained:?}: too fast to tell; output:\n{}",
        agent.output()
    );
    let polls = last_polls - first_polls;
    assert!(
        polls <= 2,
        "{polls} polls while {RUNS} found runs were submitted over {drained:?}; output:\n{}",
        agent.output()
    );
    // Their infrastructure ids were written after the burst, every one of them.
    for run in &runs {
        wait_for(
            "the run's infrastructure id recorded",
            Duration::from_secs(30),
            || async {
                api.run(run).await["infrastructure_pid"]
                    .as_str()
                    .map(|_| ())
            },
        )
        .await;
    }
}
