//! The resource's life: an agent per resource, its conditions and status, spec changes, suspension, bad specs and an unreachable Prefect.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_resource_launches_one_job_per_run_and_reports_back() {
    let (client, ns, prefect, operator) = setup("op").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    // A key the no-auth test server ignores, so it can be traced everywhere it must not be.
    let canary = format!("pnu_canary_{}", uuid::Uuid::new_v4().simple());
    create_secret(&client, &ns, "prefect-api", &canary).await;
    let mut resource = agent_resource("etl", &prefect.server.url, &prefect.pool);
    resource.spec.api.server.key_secret_ref = Some(prefect_agent_operator::crd::SecretKeyRef {
        name: "prefect-api".into(),
        key: "key".into(),
    });
    let created = agents
        .create(&PostParams::default(), &resource)
        .await
        .expect("create the PrefectAgent");

    // What a user runs: kubectl waits on the Ready condition of the current generation.
    let kube_server = KubeApiServer::shared();
    kube_server.wait_ready(&ns, "etl", &operator).await;
    let ready = agents.get("etl").await.unwrap();
    let (_, _, generation) = condition(&ready, "Ready").unwrap();
    assert_eq!(generation, created.metadata.generation);
    assert!(
        ready.finalizers().iter().any(|f| f == "prefect.io/agent"),
        "finalizer added"
    );
    // The operator's --heartbeat-interval (20s in `setup`) is what the worker registers.
    let workers = prefect
        .api
        .call(
            reqwest::Method::POST,
            &format!("/work_pools/{}/workers/filter", prefect.pool),
            Some(json!({})),
        )
        .await;
    assert_eq!(workers[0]["heartbeat_interval_seconds"], 20, "{workers}");

    let dep = prefect
        .api
        .create_deployment(
            &prefect.pool,
            json!({"image": "repo/etl:2", "cpu_request": "100m"}),
        )
        .await;
    let run = prefect.api.create_run(&dep).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    let job_name = format!("prefect-run-{run}");
    let job = job_named(&jobs, &job_name).await;
    let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some("repo/etl:2"));
    let requests = c.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert_eq!(requests["cpu"].0, "100m");
    let env: Vec<(String, Option<String>)> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    assert!(
        env.contains(&("PREFECT__FLOW_RUN_ID".into(), Some(run.clone()))),
        "{env:?}"
    );
    assert!(
        env.contains(&("TEAM".into(), Some("data".into()))),
        "{env:?}"
    );
    assert_eq!(
        job.spec.as_ref().unwrap().ttl_seconds_after_finished,
        Some(120)
    );
    assert_eq!(job.labels()["prefect.io/flow-run-id"], run);
    // Recorded just after the create.
    infra_recorded(&prefect, &ns, &run).await;

    // The flow runs to completion, then its Job completes: nothing to report.
    prefect.api.set_state(&run, "RUNNING", false).await;
    prefect.api.set_state(&run, "COMPLETED", false).await;
    finish_job(&jobs, &job_name, "Complete", "", "").await;

    // A second run whose Job fails while the run is not final ends CRASHED with the reason.
    let run2 = prefect.api.create_run(&dep).await;
    let job2 = format!("prefect-run-{run2}");
    job_named(&jobs, &job2).await;
    finish_job(
        &jobs,
        &job2,
        "Failed",
        "DeadlineExceeded",
        "Job was active longer than specified deadline",
    )
    .await;
    let crashed = prefect
        .api
        .wait_state(&run2, "CRASHED", Duration::from_secs(60))
        .await;
    let message = crashed["state"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("DeadlineExceeded"), "{message}");
    assert_eq!(prefect.api.state(&run).await, "COMPLETED");

    wait_for("status counters", Duration::from_secs(30), || async {
        let s = agents.get("etl").await.ok()?.status?;
        (s.runs_submitted == 2 && s.runs_failed == 1 && s.polls > 0).then_some(())
    })
    .await;
    // The printer columns show them.
    let (ok, table) = kube_server.kubectl(&["get", "pfa", "-n", &ns]).await;
    assert!(ok, "{table}");
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let column = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!(column("NAME"), "etl");
    assert_eq!(column("READY"), "True");
    assert_eq!(column("SUBMITTED"), "2", "{table}");
    assert_eq!(column("FAILED"), "1", "{table}");

    // The key reached the Job only as a reference, and nowhere else.
    let key_env = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .find(|e| e.name == "PREFECT_API_KEY")
        .unwrap();
    let key_ref = key_env
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (key_ref.name.as_str(), key_ref.key.as_str()),
        ("prefect-api", "key")
    );
    for job in jobs.list(&Default::default()).await.unwrap() {
        assert!(
            !serde_json::to_string(&job).unwrap().contains(&canary),
            "key in a Job"
        );
    }
    let status = serde_json::to_string(&agents.get("etl").await.unwrap()).unwrap();
    assert!(!status.contains(&canary), "key in the resource");
    let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &ns);
    for event in events.list(&Default::default()).await.unwrap() {
        assert!(
            !serde_json::to_string(&event).unwrap().contains(&canary),
            "key in an Event"
        );
    }
    assert!(
        !operator.output().contains(&canary),
        "key in the operator's log"
    );

    agents
        .delete("etl", &DeleteParams::default())
        .await
        .expect("delete");
    wait_for(
        "the finalizer to let the resource go",
        Duration::from_secs(30),
        || async { agents.get_opt("etl").await.ok()?.is_none().then_some(()) },
    )
    .await;
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_secret_is_named_in_a_degraded_condition() {
    let (client, ns, prefect, operator) = setup("nosecret").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let mut resource = agent_resource("keyless", &prefect.server.url, &prefect.pool);
    resource.spec.api.server.key_secret_ref = Some(prefect_agent_operator::crd::SecretKeyRef {
        name: "prefect-api".into(),
        key: "key".into(),
    });
    agents
        .create(&PostParams::default(), &resource)
        .await
        .expect("create");
    let (status, message, _) = wait_for("Degraded=True", Duration::from_secs(60), || async {
        let a = agents.get("keyless").await.ok()?;
        condition(&a, "Degraded").filter(|(s, _, _)| s == "True")
    })
    .await;
    assert_eq!(status, "True");
    assert_eq!(message, format!("secret {ns}/prefect-api not found"));
    let a = agents.get("keyless").await.unwrap();
    assert_eq!(condition(&a, "Ready").unwrap().0, "False");
    let event = event_about(&client, &ns, "keyless", "SecretNotFound").await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.note.as_deref(),
        Some(format!("secret {ns}/prefect-api not found").as_str())
    );
    drop(operator);
}

/// A new user's first mistakes, each said at the first failed registration with a
/// reason `kubectl get` shows and a message that leads to the fix: a pool that does not
/// exist, a `process` pool (every run would crash), the server's URL without `/api`.
#[tokio::test(flavor = "multi_thread")]
async fn first_run_mistakes_are_degraded_at_once_with_what_to_do() {
    let (client, ns, prefect, operator) = setup("mistakes").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let process_pool = unique("process");
    prefect
        .api
        .create_pool_with_template(
            &process_pool,
            json!({"job_configuration": {"command": "{{ command }}"},
                   "variables": {"type": "object",
                                 "properties": {"command": {"type": "string"}}}}),
        )
        .await;
    let url = &prefect.server.url;
    let bare_url = url.trim_end_matches("/api");
    let cases = [
        ("nopool", url.as_str(), "no-such-pool", "WorkPoolNotFound"),
        (
            "processpool",
            url.as_str(),
            process_pool.as_str(),
            "WorkPoolUnsuitable",
        ),
        ("noapi", bare_url, prefect.pool.as_str(), "NotPrefectApi"),
    ];
    for (name, url, pool, _) in cases {
        agents
            .create(&PostParams::default(), &agent_resource(name, url, pool))
            .await
            .expect("create");
    }
    for (name, _, pool, reason) in cases {
        // The old way showed Ready=False without a reason for 30-40 s (the next resync).
        let (degraded, ready) = wait_for(
            &format!("{name}: Degraded with {reason}"),
            Duration::from_secs(20),
            || async {
                let a = agents.get(name).await.ok()?;
                let conditions = a.status?.conditions;
                let find = |t: &str| conditions.iter().find(|c| c.type_ == t).cloned();
                let (d, r) = (find("Degraded")?, find("Ready")?);
                (d.status == "True" && d.reason == reason).then_some((d, r))
            },
        )
        .await;
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", reason)
        );
        let m = degraded.message;
        match reason {
            "WorkPoolNotFound" => assert_eq!(
                m,
                format!(
                    "work pool `{pool}` does not exist at {url}; create it in Prefect \
                     (`prefect work-pool create '{pool}' --type kubernetes`)"
                )
            ),
            "WorkPoolUnsuitable" => {
                assert!(
                    m.starts_with(&format!("work pool `{pool}` is a `process` pool")),
                    "{m}"
                );
                assert!(m.contains("--type kubernetes"), "{m}");
                assert!(
                    !m.contains("--create-pool"),
                    "no CLI flag in the operator: {m}"
                );
            }
            _ => assert_eq!(
                m,
                format!(
                    "{bare_url} is not the Prefect API: it serves Prefect's web UI; the API is \
                     at {url}: use that URL"
                )
            ),
        }
    }
    // `kubectl get` shows the reason, and `-o wide` the message.
    let kube = KubeApiServer::shared();
    let (ok, wide) = kube.kubectl(&["get", "pfa", "-n", &ns, "-o", "wide"]).await;
    assert!(ok, "{wide}");
    let header = wide.lines().next().unwrap_or_default();
    assert!(
        header.contains("REASON") && header.contains("MESSAGE"),
        "{wide}"
    );
    let row = wide
        .lines()
        .find(|l| l.starts_with("nopool"))
        .unwrap_or_default();
    assert!(
        row.contains("WorkPoolNotFound") && row.contains("does not exist"),
        "{wide}"
    );
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_in_a_namespace_the_operator_does_not_allow_are_refused() {
    let (client, ns, prefect, operator) = setup("jobns").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let mut resource = agent_resource("elsewhere", &prefect.server.url, &prefect.pool);
    resource.spec.job.namespace = Some("kube-system".into());
    agents
        .create(&PostParams::default(), &resource)
        .await
        .expect("create");
    let (_, message, _) = wait_for("Degraded=True", Duration::from_secs(60), || async {
        let a = agents.get("elsewhere").await.ok()?;
        condition(&a, "Degraded").filter(|(s, _, _)| s == "True")
    })
    .await;
    assert_eq!(
        message,
        format!(
            "spec.job.namespace `kube-system`: this operator watches namespace `{ns}` only \
             (--namespace) and could not follow Jobs elsewhere"
        )
    );
    let a = agents.get("elsewhere").await.unwrap();
    let ready = a
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready");
    assert_eq!(
        ready.map(|c| c.reason.as_str()),
        Some("JobNamespaceNotAllowed")
    );
    // No agent runs for it: a run of its pool gets no Job anywhere.
    assert!(a.status.as_ref().unwrap().agent_id.is_none());
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spec_change_restarts_the_agent_and_suspend_stops_it() {
    let (client, ns, prefect, operator) = setup("edit").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    agents
        .create(
            &PostParams::default(),
            &agent_resource("edited", &prefect.server.url, &prefect.pool),
        )
        .await
        .expect("create");
    let ready_at = |generation: i64| {
        let agents = agents.clone();
        async move {
            wait_for(
                &format!("Ready=True for generation {generation}"),
                Duration::from_secs(60),
                || async {
                    let a = agents.get("edited").await.ok()?;
                    let (status, _, observed) = condition(&a, "Ready")?;
                    (status == "True" && observed == Some(generation)).then_some(())
                },
            )
            .await
        }
    };
    ready_at(1).await;

    let patch = json!({"spec": {"envVars": {"TEAM": "ml"}}});
    agents
        .patch("edited", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    ready_at(2).await;
    let dep = prefect
        .api
        .create_deployment(&prefect.pool, json!({}))
        .await;
    let run = prefect.api.create_run(&dep).await;
    let job = job_named(&jobs, &format!("prefect-run-{run}")).await;
    let env = job.spec.unwrap().template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert!(
        env.iter()
            .any(|e| e.name == "TEAM" && e.value.as_deref() == Some("ml")),
        "the new envVars are used: {env:?}"
    );

    let suspend = json!({"spec": {"suspend": true}});
    agents
        .patch("edited", &PatchParams::default(), &Patch::Merge(&suspend))
        .await
        .unwrap();
    wait_for(
        "Ready=False, Suspended",
        Duration::from_secs(30),
        || async {
            let a = agents.get("edited").await.ok()?;
            let c = a
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready")?;
            (c.reason == "Suspended" && c.observed_generation == Some(3)).then_some(())
        },
    )
    .await;
    // The counters are the resource's lifetime counts: a suspended agent keeps them.
    let suspended = agents.get("edited").await.unwrap().status.unwrap();
    assert_eq!(suspended.runs_submitted, 1, "{suspended:?}");
    assert!(suspended.polls > 0, "{suspended:?}");
    let idle_run = prefect.api.create_run(&dep).await;
    // Absence over a window: a running agent (1 s polls) would have claimed it by then.
    let window = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < window {
        assert_eq!(
            prefect.api.state(&idle_run).await,
            "SCHEDULED",
            "a suspended agent claims nothing"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let resume = json!({"spec": {"suspend": false}});
    agents
        .patch("edited", &PatchParams::default(), &Patch::Merge(&resume))
        .await
        .unwrap();
    job_named(&jobs, &format!("prefect-run-{idle_run}")).await;
    // Counting on from there (the old way: back to 0 at every start).
    wait_for("runsSubmitted = 2", Duration::from_secs(30), || async {
        let s = agents.get("edited").await.ok()?.status?;
        (s.runs_submitted == 2 && s.polls >= suspended.polls).then_some(())
    })
    .await;
    // And across an operator restart: the new agent's first writes count on too.
    let before = agents.get("edited").await.unwrap().status.unwrap();
    drop(operator);
    let kube = KubeApiServer::shared();
    let mut cmd = operator_command(&kube.kubeconfig);
    cmd.args(["--namespace", &ns]);
    let operator = AgentProcess::start_with(cmd);
    let after = wait_for(
        "a poll of the new operator's agent",
        Duration::from_secs(60),
        || async {
            let s = agents.get("edited").await.ok()?.status?;
            (s.last_poll_time > before.last_poll_time && s.polls > before.polls).then_some(s)
        },
    )
    .await;
    assert_eq!(after.runs_submitted, 2, "{after:?}");
    drop(operator);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_prefect_api_is_degraded_with_the_cause() {
    let (client, ns, prefect, operator) = setup("unreach").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let url = format!("http://127.0.0.1:{}/api", free_port()); // nothing listens there
    agents
        .create(
            &PostParams::default(),
            &agent_resource("lost", &url, &prefect.pool),
        )
        .await
        .expect("create");
    let (_, message, _) = wait_for("Degraded=True", Duration::from_secs(60), || async {
        let a = agents.get("lost").await.ok()?;
        condition(&a, "Degraded").filter(|(s, _, _)| s == "True")
    })
    .await;
    assert_eq!(
        message,
        format!("cannot reach the Prefect API at {url}: Connection refused (os error 111)")
    );
    let a = agents.get("lost").await.unwrap();
    let ready = a
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "PrefectUnreachable")
    );
    // The supervisor restarts it after 10 s; failing again doubles the wait.
    let (_, restarting, _) = wait_for(
        "a second failure with a doubled delay",
        Duration::from_secs(60),
        || async {
            let a = agents.get("lost").await.ok()?;
            condition(&a, "Progressing").filter(|(_, m, _)| m.contains("restarted in 20s"))
        },
    )
    .await;
    assert!(
        restarting.ends_with("Connection refused (os error 111)"),
        "{restarting}"
    );
    drop(operator);
}

/// A PrefectAgent stored under an older CRD that the operator cannot decode: it gets a
/// Degraded condition naming the field, every other agent runs, /readyz is ready, and it
/// can be deleted.
#[tokio::test(flavor = "multi_thread")]
async fn an_undecodable_resource_is_named_and_stops_no_other_agent() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::DynamicObject;
    let (kube_server, client, ns) = dedicated_cluster("undecodable").await;
    let prefect = Setup::new("undecodable").await;
    // An older CRD: concurrencyLimit without its maximum.
    let mut old = serde_json::to_value(prefect_agent_operator::crd::crd()).unwrap();
    let limit = old
        .pointer_mut(
            "/spec/versions/0/schema/openAPIV3Schema/properties/spec/properties/concurrencyLimit",
        )
        .unwrap();
    limit.as_object_mut().unwrap().remove("maximum");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "prefectagents.prefect.io",
        &PatchParams::apply("old-crd").force(),
        &Patch::Apply(&old),
    )
    .await
    .expect("the old CRD");
    let resource = kube::api::ApiResource::erase::<PrefectAgent>(&());
    let raw: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    let bad = json!({"apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
        "metadata": {"name": "bad"},
        "spec": {"api": {"url": prefect.server.url, "workPool": prefect.pool},
                 "concurrencyLimit": 4294967296u64}});
    wait_for("the old CRD to take", Duration::from_secs(30), || async {
        raw.create(
            &PostParams::default(),
            &serde_json::from_value(bad.clone()).unwrap(),
        )
        .await
        .ok()
    })
    .await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    agents
        .create(
            &PostParams::default(),
            &agent_resource("good", &prefect.server.url, &prefect.pool),
        )
        .await
        .expect("create the good one");

    // The operator starts with its own CRD, as after an upgrade; the stored object stays.
    let port = free_port();
    let mut cmd = operator_command(&kube_server.kubeconfig);
    cmd.args(["--namespace", &ns, "--install-crd"])
        .env("PAO_HEALTH_ADDRESS", format!("127.0.0.1:{port}"));
    let operator = AgentProcess::start_with(cmd);
    kube_server.wait_ready(&ns, "good", &operator).await;
    // A Warning Event names the field (the API server may refuse a status write to an
    // object that breaks the schema it now has).
    let note = event_about(&client, &ns, "bad", "UndecodableSpec")
        .await
        .note
        .unwrap_or_default();
    assert!(note.contains("spec.concurrencyLimit"), "{note}");
    let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz"))
        .await
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200, "{}", operator.output());
    // Each agent's health, on the operator's own port.
    let health: serde_json::Value =
        reqwest::get(format!("http://127.0.0.1:{port}/agents/{ns}/good/health"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    assert!(health["agentId"].is_string(), "{health}");
    let none = reqwest::get(format!("http://127.0.0.1:{port}/agents/{ns}/bad/health"))
        .await
        .unwrap();
    assert_eq!(none.status().as_u16(), 404);

    raw.delete("bad", &Default::default())
        .await
        .expect("delete");
    wait_for("the bad one to go", Duration::from_secs(30), || async {
        raw.get_opt("bad").await.ok()?.is_none().then_some(())
    })
    .await;
    drop(operator);
}

/// `maxPolls` reached is a state of its own: Finished, not a failure, and the agent is
/// run again only when the spec changes.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_that_made_its_max_polls_is_finished_not_failed() {
    let (client, ns, prefect, operator) = setup("maxpolls").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let mut resource = agent_resource("once", &prefect.server.url, &prefect.pool);
    resource.spec.max_polls = Some(1);
    agents
        .create(&PostParams::default(), &resource)
        .await
        .expect("create");
    let finished = |generation: i64, polls: u64| {
        let agents = agents.clone();
        async move {
            let a = agents.get("once").await.ok()?;
            let (status, message, observed) = condition(&a, "Ready")?;
            let reason = a
                .status
                .as_ref()?
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")?
                .reason
                .clone();
            (status == "False"
                && reason == "Finished"
                && observed == Some(generation)
                && a.status.as_ref()?.polls == polls)
                .then_some((a, message))
        }
    };
    let (a, message) = wait_for("Finished after 1 poll", Duration::from_secs(60), || {
        finished(1, 1)
    })
    .await;
    assert!(message.contains("maxPolls"), "{message}");
    let (degraded, _, _) = condition(&a, "Degraded").unwrap();
    assert_eq!(degraded, "False", "finishing is not a failure");
    // A new spec runs it again.
    let patch = json!({"spec": {"maxPolls": 2}});
    agents
        .patch("once", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("patch");
    // Two more polls; the status counts on from the first agent's.
    wait_for(
        "Finished after 2 more polls",
        Duration::from_secs(60),
        || finished(2, 3),
    )
    .await;
    drop(operator);
}

/// A Ready agent whose Prefect server goes away turns Degraded with the error after a few
/// failed polls, and Ready again, the error cleared, once the server is back.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_degrades_while_prefect_is_down_and_recovers() {
    let (kube_server, client, ns) = cluster_with_namespace("degrade").await;
    let mut server = RestartablePrefect::start().await;
    let api = server.api();
    let pool = format!("degrade-{}", uuid::Uuid::new_v4().simple());
    api.create_pool_with_template(&pool, json!({})).await;
    let mut cmd = operator_command(&kube_server.kubeconfig);
    cmd.args(["--namespace", &ns]);
    let operator = AgentProcess::start_with(cmd);
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    agents
        .create(
            &PostParams::default(),
            &agent_resource("flaky", &server.url, &pool),
        )
        .await
        .expect("create");
    kube_server.wait_ready(&ns, "flaky", &operator).await;
    let degraded = |want: &'static str| {
        let agents = agents.clone();
        async move {
            let a = agents.get("flaky").await.ok()?;
            let (status, message, _) = condition(&a, "Degraded")?;
            (status == want).then_some((a, message))
        }
    };
    server.kill();
    let (_, message) = wait_for("Degraded", Duration::from_secs(120), || degraded("True")).await;
    assert!(
        !message.is_empty() && message != "no problem seen",
        "{message}"
    );
    server.restart().await;
    let (a, _) = wait_for("recovered", Duration::from_secs(120), || degraded("False")).await;
    assert_eq!(condition(&a, "Ready").unwrap().0, "True");
    assert_eq!(a.status.unwrap().last_error, None, "the error is cleared");
    drop(operator);
}

/// An operator whose PrefectAgent list keeps failing (the CRD is gone) still stops at
/// SIGTERM, promptly and cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_an_operator_whose_list_keeps_failing() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let (kube_server, client, ns) = dedicated_cluster("nolist").await;
    let mut cmd = operator_command(&kube_server.kubeconfig);
    cmd.args(["--namespace", &ns]);
    let mut operator = AgentProcess::start_with(cmd);
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("prefectagents.prefect.io", &Default::default())
        .await
        .expect("delete the CRD");
    wait_for("the list to fail", Duration::from_secs(60), || async {
        let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
        agents
            .list(&Default::default())
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // Let the operator meet the failure too: its log says so.
    wait_for(
        "the operator to see it",
        Duration::from_secs(60),
        || async {
            let out = operator.output();
            (out.contains("PrefectAgent watch fails") || out.contains("cannot list PrefectAgents"))
                .then_some(())
        },
    )
    .await;
    operator.signal(nix::sys::signal::Signal::SIGTERM);
    let status = operator.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "{status:?}: {}", operator.output());
    // Not by the shutdown's deadline: with nothing ever listed there is nothing to finish.
    assert!(
        !operator.output().contains("did not stop in time"),
        "{}",
        operator.output()
    );
}

/// The first Event with `reason` about the resource `name`, once there is one.
async fn event_about(
    client: &kube::Client,
    ns: &str,
    name: &str,
    reason: &str,
) -> k8s_openapi::api::events::v1::Event {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    wait_for(
        &format!("a {reason} Event about {name}"),
        Duration::from_secs(60),
        || async {
            events
                .list(&Default::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                })
        },
    )
    .await
}

/// The message of `name`'s Degraded condition once the pod policy refused it.
async fn refused_by_pod_policy(agents: &Api<PrefectAgent>, name: &str) -> String {
    wait_for(
        "Degraded by the pod policy",
        Duration::from_secs(60),
        || async {
            let a = agents.get(name).await.ok()?;
            let c = a
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Degraded" && c.status == "True")?;
            (c.reason == "PodSecurity").then_some(c.message)
        },
    )
    .await
}

/// What a user who may create PrefectAgents asks of its pods is held to the operator's pod
/// policy (baseline by default): a host-network, host-path pod is refused by field.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_template_asking_for_the_host_is_refused_by_field() {
    let (client, ns, prefect, operator) = setup("podsec").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let mut resource = agent_resource("hostile", &prefect.server.url, &prefect.pool);
    resource.spec.job.pod_template = Some(json!({"spec": {"hostNetwork": true,
        "volumes": [{"name": "root", "hostPath": {"path": "/"}}]}}));
    agents
        .create(&PostParams::default(), &resource)
        .await
        .expect("create");
    let message = refused_by_pod_policy(&agents, "hostile").await;
    assert!(
        message.contains("hostNetwork")
            && message.contains("hostPath")
            && message.contains("--pod-security"),
        "{message}"
    );
    drop(operator);
}

/// A resource near etcd's limit whose every part is refused: the refusal (thousands of
/// fields) is cut to what a condition and an Event hold, so the user sees it instead of
/// status writes and Events the API server turns away forever.
#[tokio::test(flavor = "multi_thread")]
async fn a_megabyte_of_refused_fields_is_cut_to_a_visible_condition_and_event() {
    let (client, ns, prefect, operator) = setup("megabyte").await;
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let mut resource = agent_resource("huge", &prefect.server.url, &prefect.pool);
    let volumes: Vec<_> = (0..3300)
        .map(|i| json!({"name": format!("v{i}"), "hostPath": {"path": format!("/{}", "p".repeat(250))}}))
        .collect();
    resource.spec.job.pod_template = Some(json!({"spec": {"volumes": volumes}}));
    let size = serde_json::to_vec(&resource).unwrap().len();
    assert!(size > 900_000, "the resource is {size} bytes");
    agents
        .create(&PostParams::default(), &resource)
        .await
        .expect("a resource of about a megabyte is stored");
    let message = refused_by_pod_policy(&agents, "huge").await;
    assert!(message.len() <= 1024, "{} bytes", message.len());
    assert!(message.contains("hostPath"), "{message}");
    let event = event_about(&client, &ns, "huge", "PodSecurity").await;
    let note = event.note.unwrap_or_default();
    assert!(note.len() <= 1024 && note.contains("hostPath"), "{note}");
    drop(operator);
}
