//! Fault injection on the real API server and the real Prefect server. A burst of runs is
//! created while something breaks, round after round:
//! - the operator is SIGKILLed at a random moment and restarted;
//! - of two replicas with leader election, the leader is SIGKILLed (and comes back as
//!   the standby);
//! - the Prefect server is SIGKILLed and started again on the same database;
//! - the Kubernetes API server goes away and comes back (etcd keeps the state); while it
//!   is away the operator's /readyz must say so.
//!
//! Every run must end up launched exactly once (one Job, ever) and finished, and the
//! API key (a Secret) must appear in no Job, status, Event or log line.
//!
//! The test plays kubelet and flow: each new Job's run goes RUNNING → COMPLETED in Prefect
//! and the Job Complete. Size: PAO_FAULT_RUNS (default 100) runs and PAO_FAULT_ROUNDS
//! (default 2) disruptions per scenario; `scripts/fault-suite.sh` runs them at 500 × 5
//! and prints the table. The Prefect server runs on SQLite, or on PostgreSQL with
//! PAO_FAULT_DATABASE=postgres.

use pao_testkit as common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::cluster::{KubeApiServer, cluster_with_namespace, create_secret, dedicated_cluster};
use common::*;
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use nix::sys::signal::Signal;
use prefect_agent_operator::crd::PrefectAgent;
use rand::Rng;
use reqwest::Method;
use serde_json::{Value, json};

type PrefectApi = common::Api;

/// The shared Prefect server on the database PAO_FAULT_DATABASE names.
async fn shared_prefect() -> &'static PrefectServer {
    tokio::task::spawn_blocking(|| match on_postgres() {
        true => PrefectServer::on_postgres(),
        false => PrefectServer::shared(),
    })
    .await
    .unwrap()
}

fn on_postgres() -> bool {
    match std::env::var("PAO_FAULT_DATABASE").as_deref() {
        Ok("postgres") => true,
        Ok("sqlite") | Err(_) => false,
        Ok(other) => panic!("PAO_FAULT_DATABASE={other}: sqlite or postgres"),
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every Job seen: run id → the Job UIDs that carried it, and when each new one appeared.
#[derive(Default)]
struct Ledger {
    jobs: BTreeMap<String, BTreeSet<String>>,
    created: Vec<Instant>,
}

/// A Prefect call the test must get through even while the server is being restarted.
async fn insist(api: &PrefectApi, method: Method, path: &str, body: Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        match api.try_call(method.clone(), path, Some(body.clone())).await {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("{method} {path}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// Watches the namespace's Jobs (through API server restarts); each new one is "run": its
/// flow run goes RUNNING then COMPLETED and the Job is marked Complete.
async fn play_kubelet(
    client: Client,
    ns: String,
    api: Arc<PrefectApi>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let jobs: Api<Job> = Api::namespaced(client, &ns);
    let stream = watcher(jobs.clone(), watcher::Config::default())
        .default_backoff()
        .applied_objects();
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        let Ok(job) = event else { continue };
        let Some(run) = job.labels().get("prefect.io/flow-run-id").cloned() else {
            continue;
        };
        let uid = job.uid().unwrap_or_default();
        {
            let mut l = ledger.lock().unwrap();
            if !l.jobs.entry(run.clone()).or_default().insert(uid) {
                continue;
            }
            l.created.push(Instant::now());
        }
        let jobs = jobs.clone();
        let api = api.clone();
        let name = job.name_any();
        tokio::spawn(async move {
            let path = format!("/flow_runs/{run}/set_state");
            for kind in ["RUNNING", "COMPLETED"] {
                // As Prefect's engine does: a WAIT is retried after the delay it names;
                // anything else but ACCEPT is reported (the run then shows as unfinished).
                for _ in 0..10 {
                    let body = json!({"state": {"type": kind}});
                    let answer = insist(&api, Method::POST, &path, body).await;
                    if answer["status"] == "ACCEPT" {
                        break;
                    }
                    eprintln!("kubelet stand-in: {run} → {kind} answered {answer}");
                    if answer["status"] != "WAIT" {
                        break;
                    }
                    let delay = answer["details"]["delay_seconds"].as_f64().unwrap_or(1.0);
                    tokio::time::sleep(Duration::from_secs_f64(delay.clamp(0.1, 10.0))).await;
                }
            }
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let status = json!({"status": {"completionTime": now, "succeeded": 1, "conditions": [
                {"type": "Complete", "status": "True", "lastProbeTime": now, "lastTransitionTime": now}]}});
            let deadline = Instant::now() + Duration::from_secs(180);
            while jobs
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .is_err()
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }
}

/// One way of breaking things, applied once per round.
trait Disruption {
    /// Breaks something and repairs it; returns the moment from which recovery is timed.
    async fn disrupt(&mut self) -> Instant;
    /// Everything the operator processes logged.
    fn logs(&self) -> String;
}

/// The operator, started with these extra flags, its probes on `port`.
fn operator(kubeconfig: &std::path::Path, ns: &str, port: u16, extra: &[&str]) -> AgentProcess {
    let mut cmd = operator_command(kubeconfig);
    cmd.args(["--namespace", ns])
        .args(extra)
        .env("PAO_HEALTH_ADDRESS", format!("127.0.0.1:{port}"));
    AgentProcess::start_with(cmd)
}

/// Sum of a counter over all agents in an operator's /metrics.
async fn counter(port: u16, name: &str) -> Option<f64> {
    let text = probe(port, "/metrics").await?.1;
    Some(
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// What a burst scenario measured.
struct Row {
    rounds: usize,
    runs: usize,
    duplicates: Vec<String>,
    never_launched: Vec<String>,
    unfinished: Vec<String>,
    key_leaks: Vec<String>,
    max_recovery: Duration,
    wall: Duration,
}

/// A namespace with a PrefectAgent whose API key is a Secret, a pool, a deployment, and
/// the kubelet stand-in.
struct Burst {
    client: Client,
    ns: String,
    api: Arc<PrefectApi>,
    ledger: Arc<Mutex<Ledger>>,
    canary: String,
    deployment: String,
}

impl Burst {
    async fn new(client: Client, ns: String, prefect_url: &str) -> Self {
        let api = Arc::new(PrefectApi::new(
            prefect_url,
            prefect_agent_operator::backend::http::Auth::None,
        ));
        let pool = unique("faults");
        api.create_pool(&pool).await;
        let deployment = api.create_deployment(&pool, json!({})).await;
        // The test server takes no key; this one exists to be looked for everywhere.
        let canary = format!("pnu_canary_{}", uuid::Uuid::new_v4().simple());
        create_secret(&client, &ns, "prefect-api", &canary).await;
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        tokio::spawn(play_kubelet(
            client.clone(),
            ns.clone(),
            api.clone(),
            ledger.clone(),
        ));
        let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
        let resource: PrefectAgent = serde_json::from_value(json!({
            "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
            "metadata": {"name": "burst"},
            "spec": {"api": {"url": prefect_url, "workPool": pool,
                             "keySecretRef": {"name": "prefect-api", "key": "key"}},
                     "pollInterval": "1s", "job": {"ttlSecondsAfterFinished": 3600}}
        }))
        .unwrap();
        agents
            .create(&PostParams::default(), &resource)
            .await
            .unwrap();
        Burst {
            client,
            ns,
            api,
            ledger,
            canary,
            deployment,
        }
    }

    /// Creates the runs while `disruption` strikes `rounds` times at random moments, then
    /// waits for every run to finish and counts what went wrong.
    async fn run(&self, disruption: &mut impl Disruption) -> Row {
        let runs_wanted = env_or("PAO_FAULT_RUNS", 100);
        let rounds = env_or("PAO_FAULT_ROUNDS", 2);
        let started = Instant::now();
        let creator = {
            let api = self.api.clone();
            let path = format!("/deployments/{}/create_flow_run", self.deployment);
            tokio::spawn(async move {
                let mut runs = BTreeSet::new();
                for _ in 0..runs_wanted {
                    let run = insist(&api, Method::POST, &path, json!({})).await;
                    runs.insert(run["id"].as_str().unwrap().to_string());
                }
                runs
            })
        };
        let mut recoveries = Vec::new();
        for _ in 0..rounds {
            // A random moment: what is being claimed or launched right then is cut short.
            let wait = rand::rng().random_range(500..4000);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let clock = disruption.disrupt().await;
            let before = self.ledger.lock().unwrap().created.len();
            // Recovery: the first new Job after the repair (if any work is left).
            let deadline = Instant::now() + Duration::from_secs(90);
            while Instant::now() < deadline {
                if self.ledger.lock().unwrap().created.len() > before {
                    recoveries.push(clock.elapsed());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let runs = creator.await.unwrap();
        // Everything finishes: adopted claims after `adopt_after` (15 s) at most.
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut unfinished: BTreeSet<String> = runs.clone();
        while !unfinished.is_empty() && Instant::now() < deadline {
            let mut still = BTreeSet::new();
            for run in unfinished.iter().map(|u| u.split(' ').next().unwrap_or(u)) {
                let r = insist(
                    &self.api,
                    Method::GET,
                    &format!("/flow_runs/{run}"),
                    json!(null),
                )
                .await;
                if r["state"]["type"] != "COMPLETED" {
                    still.insert(format!(
                        "{run} ({} {})",
                        r["state"]["type"], r["state"]["message"]
                    ));
                }
            }
            unfinished = still;
            if !unfinished.is_empty() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        let (duplicates, never_launched) = {
            let l = self.ledger.lock().unwrap();
            let duplicates = l
                .jobs
                .iter()
                .filter(|(_, uids)| uids.len() > 1)
                .map(|(run, _)| run.clone())
                .collect();
            let never = runs
                .iter()
                .filter(|r| !l.jobs.contains_key(*r))
                .cloned()
                .collect();
            (duplicates, never)
        };
        Row {
            rounds,
            runs: runs.len(),
            duplicates,
            never_launched,
            unfinished: unfinished.into_iter().collect(),
            key_leaks: self.key_leaks(&disruption.logs()).await,
            max_recovery: recoveries.iter().max().copied().unwrap_or_default(),
            wall: started.elapsed(),
        }
    }

    /// Where the key shows up: every Job, the resource with its status, every Event, and
    /// every line the operators logged.
    async fn key_leaks(&self, logs: &str) -> Vec<String> {
        let lp = ListParams::default();
        let mut leaks = Vec::new();
        let jobs: Api<Job> = Api::namespaced(self.client.clone(), &self.ns);
        for job in jobs.list(&lp).await.unwrap() {
            if serde_json::to_string(&job).unwrap().contains(&self.canary) {
                leaks.push(format!("Job {}", job.name_any()));
            }
        }
        let agents: Api<PrefectAgent> = Api::namespaced(self.client.clone(), &self.ns);
        for agent in agents.list(&lp).await.unwrap() {
            if serde_json::to_string(&agent)
                .unwrap()
                .contains(&self.canary)
            {
                leaks.push(format!("PrefectAgent {}", agent.name_any()));
            }
        }
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        for event in events.list(&lp).await.unwrap() {
            if serde_json::to_string(&event)
                .unwrap()
                .contains(&self.canary)
            {
                leaks.push(format!("Event {}", event.name_any()));
            }
        }
        leaks.extend(
            logs.lines()
                .filter(|l| l.contains(&self.canary))
                .map(|l| format!("log: {l}")),
        );
        leaks
    }
}

/// A burst through `disruption`, reported as `scenario`.
async fn burst_through(
    scenario: &str,
    client: Client,
    ns: String,
    prefect_url: &str,
    disruption: &mut impl Disruption,
) {
    let row = Burst::new(client, ns, prefect_url)
        .await
        .run(disruption)
        .await;
    report(scenario, row, &disruption.logs());
}

/// Prints the scenario's table row and fails on any duplicate, loss or leak.
fn report(scenario: &str, row: Row, logs: &str) {
    // A line of its own: libtest prints the test's name without a newline before output.
    println!(
        "\n| {scenario} | {} | {} | {} | {} | {} | {} | {} | {:.1} s | {:.0} s |",
        if on_postgres() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        row.rounds,
        row.runs,
        row.duplicates.len(),
        row.never_launched.len(),
        row.unfinished.len(),
        row.key_leaks.len(),
        row.max_recovery.as_secs_f64(),
        row.wall.as_secs_f64()
    );
    // The operators' last words, to see why.
    let tail = last_lines(logs, 80);
    assert!(
        row.duplicates.is_empty(),
        "runs with two Jobs: {:?}\n{tail}",
        row.duplicates
    );
    assert!(
        row.never_launched.is_empty(),
        "never launched: {:?}\n{tail}",
        row.never_launched
    );
    assert!(
        row.unfinished.is_empty(),
        "never finished: {:?}\n{tail}",
        row.unfinished
    );
    assert!(
        row.key_leaks.is_empty(),
        "the API key leaked: {:?}",
        row.key_leaks
    );
}

/// SIGKILL, restart at once.
struct KillOperator {
    kubeconfig: std::path::PathBuf,
    ns: String,
    operator: AgentProcess,
    logs: String,
}

impl Disruption for KillOperator {
    async fn disrupt(&mut self) -> Instant {
        self.operator.signal(Signal::SIGKILL);
        let _ = self.operator.wait_exit(Duration::from_secs(10)).await;
        self.logs.push_str(&self.operator.output());
        self.operator = operator(&self.kubeconfig, &self.ns, free_port(), &[]);
        Instant::now()
    }
    fn logs(&self) -> String {
        format!("{}{}", self.logs, self.operator.output())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkilled_operators_lose_and_duplicate_nothing() {
    let (kube, client, ns) = cluster_with_namespace("faults").await;
    let prefect = shared_prefect().await;
    let mut disruption = KillOperator {
        kubeconfig: kube.kubeconfig.clone(),
        operator: operator(&kube.kubeconfig, &ns, free_port(), &[]),
        ns: ns.clone(),
        logs: String::new(),
    };
    burst_through(
        "SIGKILL operator",
        client,
        ns,
        &prefect.url,
        &mut disruption,
    )
    .await;
}

/// Two replicas with leader election; the leader is SIGKILLed and restarted as standby.
struct KillLeader {
    kubeconfig: std::path::PathBuf,
    ns: String,
    replicas: Vec<(u16, AgentProcess)>,
    logs: String,
}

impl KillLeader {
    fn replica(kubeconfig: &std::path::Path, ns: &str, port: u16) -> AgentProcess {
        operator(
            kubeconfig,
            ns,
            port,
            &["--leader-elect", "--leader-election-namespace", ns],
        )
    }
}

impl Disruption for KillLeader {
    async fn disrupt(&mut self) -> Instant {
        let ports: Vec<u16> = self.replicas.iter().map(|(p, _)| *p).collect();
        let leader = wait_for("a ready leader", Duration::from_secs(60), || async {
            for (i, port) in ports.iter().enumerate() {
                if probe(*port, "/readyz").await?.0 == 200 {
                    return Some(i);
                }
            }
            None
        })
        .await;
        let (port, process) = &mut self.replicas[leader];
        process.signal(Signal::SIGKILL);
        let killed = Instant::now();
        let _ = process.wait_exit(Duration::from_secs(10)).await;
        self.logs.push_str(&process.output());
        *process = Self::replica(&self.kubeconfig, &self.ns, *port);
        // The other replica takes over once the lease has run out.
        killed
    }
    fn logs(&self) -> String {
        let mut logs = self.logs.clone();
        for (_, p) in &self.replicas {
            logs.push_str(&p.output());
        }
        logs
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_leader_loses_and_duplicates_nothing() {
    let (kube, client, ns) = cluster_with_namespace("faults-ha").await;
    let prefect = shared_prefect().await;
    let replicas = (0..2)
        .map(|_| {
            let port = free_port();
            (port, KillLeader::replica(&kube.kubeconfig, &ns, port))
        })
        .collect();
    let mut disruption = KillLeader {
        kubeconfig: kube.kubeconfig.clone(),
        ns: ns.clone(),
        replicas,
        logs: String::new(),
    };
    burst_through(
        "SIGKILL leader of 2 replicas",
        client,
        ns,
        &prefect.url,
        &mut disruption,
    )
    .await;
}

/// The Prefect server is SIGKILLed; it stays down until the operator has noticed (a
/// failed poll), then starts again on the same database.
struct RestartPrefect {
    server: RestartablePrefect,
    port: u16,
    operator: AgentProcess,
}

impl Disruption for RestartPrefect {
    async fn disrupt(&mut self) -> Instant {
        // Killed before the agent registered, the server would be noticed by a failed
        // registration, never by a failed poll: a loaded machine can take longer to start
        // the operator's agent than the burst waits before its first strike.
        wait_for(
            "the agent's first poll",
            Duration::from_secs(120),
            || async {
                (counter(self.port, "prefect_agent_polls_total").await? >= 1.0).then_some(())
            },
        )
        .await;
        let errors = counter(self.port, "prefect_agent_poll_errors_total")
            .await
            .unwrap_or_default();
        self.server.kill();
        // Mid-burst the poll loop may wait for submission slots whose calls are retrying
        // against the dead server first; on a loaded machine that took over 60 s once.
        let deadline = Instant::now() + Duration::from_secs(120);
        while counter(self.port, "prefect_agent_poll_errors_total")
            .await
            .is_none_or(|now| now <= errors)
        {
            assert!(
                Instant::now() < deadline,
                "no failed poll 120 s after the Prefect server was killed; the operator's last lines:\n{}",
                last_lines(&self.operator.output(), 60)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.server.restart().await;
        Instant::now()
    }
    fn logs(&self) -> String {
        self.operator.output()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_prefect_server_loses_and_duplicates_nothing() {
    let (kube, client, ns) = cluster_with_namespace("faults-prefect").await;
    let server = match on_postgres() {
        true => RestartablePrefect::on_postgres().await,
        false => RestartablePrefect::start().await,
    };
    let port = free_port();
    let url = server.url.clone();
    let mut disruption = RestartPrefect {
        server,
        port,
        operator: operator(&kube.kubeconfig, &ns, port, &[]),
    };
    burst_through(
        "Prefect server restarted",
        client,
        ns,
        &url,
        &mut disruption,
    )
    .await;
}

/// The API server goes away until the operator's /readyz says so, then comes back.
struct RestartApiServer {
    kube: KubeApiServer,
    port: u16,
    operator: AgentProcess,
}

impl Disruption for RestartApiServer {
    async fn disrupt(&mut self) -> Instant {
        self.kube.stop_apiserver().await;
        let port = self.port;
        wait_for("/readyz to fail", Duration::from_secs(60), || async {
            let (status, body) = probe(port, "/readyz").await?;
            (status == 503 && body == "the Kubernetes API is unreachable").then_some(())
        })
        .await;
        self.kube.start_apiserver().await;
        let back = Instant::now();
        // The watch comes back at its next retry, up to 30 s apart after a long outage
        // (kube-runtime's backoff), then relists; under load that passed 60 s once.
        wait_for("/readyz to recover", Duration::from_secs(120), || async {
            (probe(port, "/readyz").await?.0 == 200).then_some(())
        })
        .await;
        back
    }
    fn logs(&self) -> String {
        self.operator.output()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_api_server_loses_and_duplicates_nothing() {
    let (kube, client, ns) = dedicated_cluster("faults-kube").await;
    let prefect = shared_prefect().await;
    let port = free_port();
    let operator = operator(&kube.kubeconfig, &ns, port, &[]);
    wait_for("the operator ready", Duration::from_secs(60), || async {
        (probe(port, "/readyz").await?.0 == 200).then_some(())
    })
    .await;
    let mut disruption = RestartApiServer {
        kube,
        port,
        operator,
    };
    burst_through(
        "API server restarted",
        client,
        ns,
        &prefect.url,
        &mut disruption,
    )
    .await;
}
