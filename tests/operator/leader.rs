//! Two replicas with leader election.

use super::*;

/// GET on the operator's probe port: (status, body).
async fn probe(port: u16, path: &str) -> Option<(u16, String)> {
    let resp = reqwest::get(format!("http://127.0.0.1:{port}{path}"))
        .await
        .ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.ok()?))
}

#[tokio::test(flavor = "multi_thread")]
async fn two_replicas_elect_one_leader_and_the_standby_takes_over() {
    let (kube_server, client, ns) = cluster_with_namespace("ha").await;
    let prefect = Setup::new("ha").await;
    let start = |port: u16| {
        let mut cmd = operator_command(&kube_server.kubeconfig);
        cmd.args(["--namespace", &ns, "--leader-elect"])
            .args(["--leader-election-namespace", &ns])
            .env("PAO_HEALTH_ADDRESS", format!("127.0.0.1:{port}"));
        AgentProcess::start_with(cmd)
    };
    let ports = [free_port(), free_port()];
    let replicas = [start(ports[0]), start(ports[1])];
    let leader = wait_for("one ready leader", Duration::from_secs(60), || async {
        let a = probe(ports[0], "/readyz").await?;
        let b = probe(ports[1], "/readyz").await?;
        match (a.0, b.0) {
            (200, 503) => Some(0),
            (503, 200) => Some(1),
            _ => None,
        }
    })
    .await;
    let standby = 1 - leader;
    let (status, body) = probe(ports[standby], "/readyz").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (503, "standby: another replica leads")
    );
    assert_eq!(probe(ports[standby], "/healthz").await.unwrap().0, 200);

    let agents = create_agent(&client, &ns, "ha-agent", &prefect).await;
    wait_for("the agent registered", Duration::from_secs(60), || async {
        agents
            .get("ha-agent")
            .await
            .ok()?
            .status?
            .agent_id
            .map(|_| ())
    })
    .await;
    let metrics = probe(ports[leader], "/metrics").await.unwrap().1;
    let series = format!("prefect_agent_polls_total{{agent=\"{ns}/ha-agent\"}}");
    assert!(metrics.contains(&series), "{metrics}");
    assert!(
        !probe(ports[standby], "/metrics")
            .await
            .unwrap()
            .1
            .contains(&series),
        "the standby runs no agent"
    );

    // The leader dies without a word; the standby takes over within the lease.
    replicas[leader].signal(nix::sys::signal::Signal::SIGKILL);
    let killed = std::time::Instant::now();
    wait_for("the standby to lead", Duration::from_secs(40), || async {
        (probe(ports[standby], "/readyz").await?.0 == 200).then_some(())
    })
    .await;
    eprintln!("failover took {:?}", killed.elapsed());
    let run = prefect.new_run().await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    job_named(&jobs, &format!("prefect-run-{run}")).await;

    // The new leader's metrics count that launch.
    let agent = format!("agent=\"{ns}/ha-agent\"");
    let metrics = wait_for(
        "the launch in /metrics",
        Duration::from_secs(30),
        || async {
            let text = probe(ports[standby], "/metrics").await?.1;
            text.contains(&format!(
                "prefect_agent_runs_submitted_total{{{agent}}} 1\n"
            ))
            .then_some(text)
        },
    )
    .await;
    for series in [
        format!("prefect_agent_runs_claimed_total{{{agent}}} 1\n"),
        format!("prefect_agent_submission_latency_seconds_count{{{agent}}} 1\n"),
        format!("prefect_agent_submission_latency_seconds_bucket{{{agent},le=\"+Inf\"}} 1\n"),
        "# TYPE prefect_api_request_duration_seconds histogram\n".to_string(),
        "# TYPE prefect_agent_operator_reconcile_duration_seconds histogram\n".to_string(),
    ] {
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    assert!(value("prefect_agent_operator_reconciles_total ") >= 1.0);
    assert!(value("prefect_api_request_duration_seconds_count{backend=\"prefect3\"} ") >= 3.0);
}
