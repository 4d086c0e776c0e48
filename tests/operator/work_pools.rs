//! PrefectWorkPool: a work pool, its template and queues declared as a resource and kept
//! so in a real Prefect server.

use super::*;

use prefect_agent_operator::crd::PrefectWorkPool;
use reqwest::Method;

/// The operator with a 2 s resync, so that drift is put back while the test waits.
fn operator(kube: &KubeApiServer, ns: &str) -> AgentProcess {
    operator_on(kube, ns, free_port())
}

/// The same, serving /metrics on `port`.
fn operator_on(kube: &KubeApiServer, ns: &str, port: u16) -> AgentProcess {
    operator_resyncing(kube, ns, port, "2s")
}

fn operator_resyncing(kube: &KubeApiServer, ns: &str, port: u16, every: &str) -> AgentProcess {
    let mut cmd = operator_command(&kube.kubeconfig);
    let health = format!("127.0.0.1:{port}");
    cmd.args([
        "--namespace",
        ns,
        "--sync-interval",
        every,
        "--health-address",
        &health,
    ]);
    AgentProcess::start_with(cmd)
}

fn work_pool(name: &str, url: &str, spec: serde_json::Value) -> PrefectWorkPool {
    let mut spec = spec;
    spec["api"] = json!({"url": url});
    serde_json::from_value(json!({
        "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectWorkPool",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

/// Waits for the resource's Ready condition to have `status` and returns the resource.
async fn ready(pools: &Api<PrefectWorkPool>, name: &str, status: &str) -> PrefectWorkPool {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let p = pools.get(name).await.ok();
        let found = p.as_ref().and_then(|p| {
            let c = p
                .status
                .as_ref()?
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")?;
            (c.status == status && c.observed_generation == p.metadata.generation).then_some(())
        });
        if let (Some(()), Some(p)) = (found, &p) {
            return p.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {name}: Ready={status}; last seen: {:?}",
            p.and_then(|p| p.status)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until Prefect's pool (or queue) answers `want` at `pointer`.
async fn prefect_has(api: &Api2, path: &str, pointer: &str, want: serde_json::Value) {
    wait_for(
        &format!("{path}{pointer} = {want}"),
        Duration::from_secs(60),
        || async {
            let v = api.try_call(Method::GET, path, None).await.ok()?;
            (v.pointer(pointer) == Some(&want)).then_some(())
        },
    )
    .await;
}

type Api2 = common::Api;

#[tokio::test(flavor = "multi_thread")]
async fn a_declared_pool_is_created_updated_and_kept_as_declared() {
    let (_, client, ns) = cluster_with_namespace("wp").await;
    let prefect = Setup::new("wp-unused").await;
    let kube = KubeApiServer::shared();
    let port = free_port();
    let mut op = operator_on(kube, &ns, port);
    let pools: Api<PrefectWorkPool> = Api::namespaced(client.clone(), &ns);
    let name = unique("declared");
    let resource = work_pool(
        "declared",
        &prefect.server.url,
        json!({"name": name, "description": "d1", "concurrencyLimit": 5,
               "baseJobTemplate": {"defaults": {"image": "repo/flows:1"}},
               "queues": [{"name": "high", "priority": 1, "concurrencyLimit": 2},
                          {"name": "low", "paused": true, "description": "later"}]}),
    );
    pools
        .create(&PostParams::default(), &resource)
        .await
        .expect("create");
    let synced = ready(&pools, "declared", "True").await;
    let status = synced.status.unwrap();

    // Field by field, as Prefect's API answers.
    let api = &prefect.api;
    let pool = api
        .call(Method::GET, &format!("/work_pools/{name}"), None)
        .await;
    assert_eq!(pool["type"], "kubernetes");
    assert_eq!(pool["description"], "d1");
    assert_eq!(pool["concurrency_limit"], 5);
    assert_eq!(pool["is_paused"], false);
    assert_eq!(
        pool["base_job_template"]["variables"]["properties"]["image"]["default"],
        "repo/flows:1"
    );
    assert!(pool["base_job_template"]["job_configuration"]["job_manifest"].is_object());
    assert_eq!(status.pool_id.as_deref(), pool["id"].as_str());
    let high = api
        .call(
            Method::GET,
            &format!("/work_pools/{name}/queues/high"),
            None,
        )
        .await;
    assert_eq!(
        (high["priority"].clone(), high["concurrency_limit"].clone()),
        (json!(1), json!(2))
    );
    let low = api
        .call(Method::GET, &format!("/work_pools/{name}/queues/low"), None)
        .await;
    assert_eq!(
        (low["is_paused"].clone(), low["description"].clone()),
        (json!(true), json!("later"))
    );
    assert_eq!(status.queue_ids["high"], high["id"].as_str().unwrap());
    assert!(status.template_hash.is_some() && status.last_sync_time.is_some());

    // Edited in Git: updated in Prefect.
    let edit = json!({"spec": {"description": "d2", "paused": true}});
    pools
        .patch("declared", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    let path = format!("/work_pools/{name}");
    prefect_has(api, &path, "/description", json!("d2")).await;
    prefect_has(api, &path, "/is_paused", json!(true)).await;
    ready(&pools, "declared", "True").await;
    // Several resyncs with nothing changed correct nothing (Prefect's answer compares
    // equal to what was sent).
    let quiet = pools.get("declared").await.unwrap().status.unwrap();
    let later = wait_for("three more resyncs", Duration::from_secs(60), || async {
        let s = pools.get("declared").await.ok()?.status?;
        (s.last_sync_time > quiet.last_sync_time).then_some(s)
    })
    .await;
    assert_eq!(later.drift_corrections, 0, "{later:?}");

    // Changed in Prefect behind the operator's back: put back.
    api.call(
        Method::PATCH,
        &path,
        Some(json!({"description": "edited in the UI", "concurrency_limit": 50})),
    )
    .await;
    api.call(
        Method::PATCH,
        &format!("{path}/queues/high"),
        Some(json!({"concurrency_limit": 9})),
    )
    .await;
    prefect_has(api, &path, "/description", json!("d2")).await;
    prefect_has(api, &path, "/concurrency_limit", json!(5)).await;
    prefect_has(
        api,
        &format!("{path}/queues/high"),
        "/concurrency_limit",
        json!(2),
    )
    .await;
    let corrected = wait_for("drift counted", Duration::from_secs(30), || async {
        let s = pools.get("declared").await.ok()?.status?;
        (s.drift_corrections >= 2).then_some(s)
    })
    .await;

    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("prefect_sync_drift_corrections_total{kind=\"PrefectWorkPool\"} ")
        })
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(counted, Some(corrected.drift_corrections), "{metrics}");
    // One sync per resync (2 s here), not one per status write it makes (each write
    // comes back as a watch event). Counted over a quiet window of 6 s.
    let syncs = || async {
        let text = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find_map(|l| {
                l.strip_prefix("prefect_sync_total{kind=\"PrefectWorkPool\",outcome=\"synced\"} ")
            })
            .and_then(|v| v.parse::<u64>().ok())
    };
    let before = syncs().await.unwrap();
    let window = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = syncs().await.unwrap() - before;
    assert!(during <= 4, "{during} syncs in {:?}", window.elapsed());
    // An operator restart recreates nothing: the same pool, the same queues.
    op.signal(nix::sys::signal::Signal::SIGTERM);
    op.wait_exit(Duration::from_secs(30)).await;
    let _op = operator(kube, &ns);
    let after = wait_for(
        "a sync by the new operator",
        Duration::from_secs(60),
        || async {
            let s = pools.get("declared").await.ok()?.status?;
            (s.last_sync_time > corrected.last_sync_time).then_some(s)
        },
    )
    .await;
    assert_eq!(after.pool_id, status.pool_id);
    assert_eq!(after.queue_ids, status.queue_ids);
    let all = api
        .call(Method::POST, "/work_pools/filter", Some(json!({})))
        .await;
    let named: Vec<_> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == name.as_str())
        .collect();
    assert_eq!(named.len(), 1);
}

/// A template from a ConfigMap follows the ConfigMap at once (the ConfigMap is watched:
/// the resync here is 10 minutes); a template Prefect's worker would fail on never
/// reaches Prefect, and the condition names where it is wrong.
#[tokio::test(flavor = "multi_thread")]
async fn templates_come_from_config_maps_and_bad_ones_are_named() {
    let (_, client, ns) = cluster_with_namespace("wpt").await;
    let prefect = Setup::new("wpt-unused").await;
    let kube = KubeApiServer::shared();
    let _op = operator_resyncing(kube, &ns, free_port(), "10m");
    let pools: Api<PrefectWorkPool> = Api::namespaced(client.clone(), &ns);
    let maps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), &ns);
    let template = |image: &str| {
        let mut t: serde_json::Value = serde_json::from_str(include_str!(
            "../../src/work_pool/default-base-job-template.json"
        ))
        .unwrap();
        t["variables"]["properties"]["image"]["default"] = json!(image);
        serde_yaml::to_string(&t).unwrap()
    };
    let map = |image: &str| -> k8s_openapi::api::core::v1::ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": "template"},
                                      "data": {"template.yaml": template(image)}}))
        .unwrap()
    };
    maps.create(&PostParams::default(), &map("repo/a:1"))
        .await
        .unwrap();
    let name = unique("from-map");
    pools
        .create(
            &PostParams::default(),
            &work_pool(
                "from-map",
                &prefect.server.url,
                json!({"name": name, "baseJobTemplate": {"configMapKeyRef":
                    {"name": "template", "key": "template.yaml"}}}),
            ),
        )
        .await
        .unwrap();
    ready(&pools, "from-map", "True").await;
    let path = format!("/work_pools/{name}");
    let image = "/base_job_template/variables/properties/image/default";
    prefect_has(&prefect.api, &path, image, json!("repo/a:1")).await;
    maps.replace("template", &PostParams::default(), &map("repo/a:2"))
        .await
        .unwrap();
    prefect_has(&prefect.api, &path, image, json!("repo/a:2")).await;

    let bad = unique("bad");
    let mut t: serde_json::Value = serde_json::from_str(include_str!(
        "../../src/work_pool/default-base-job-template.json"
    ))
    .unwrap();
    t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["image"] =
        json!("{{ imgae }}");
    pools
        .create(
            &PostParams::default(),
            &work_pool(
                "bad",
                &prefect.server.url,
                json!({"name": bad, "baseJobTemplate": {"inline": t}}),
            ),
        )
        .await
        .unwrap();
    let degraded = ready(&pools, "bad", "False").await;
    let c = degraded.status.unwrap().conditions;
    let d = c.iter().find(|c| c.type_ == "Degraded").unwrap();
    assert_eq!(
        (d.status.as_str(), d.reason.as_str()),
        ("True", "InvalidTemplate")
    );
    assert!(
        d.message.starts_with(
            "spec.baseJobTemplate: job_configuration.job_manifest.spec.template.spec.containers[0].image: {{ imgae }} names no variable"
        ),
        "{}",
        d.message
    );
    let absent = prefect
        .api
        .try_call(Method::GET, &format!("/work_pools/{bad}"), None)
        .await;
    assert!(absent.is_err(), "never sent to Prefect: {absent:?}");
}

/// Retain leaves the pool; Delete waits for its unfinished runs, then deletes it.
#[tokio::test(flavor = "multi_thread")]
async fn deletion_follows_the_policy_and_waits_for_unfinished_runs() {
    let (_, client, ns) = cluster_with_namespace("wpd").await;
    let prefect = Setup::new("wpd-unused").await;
    let kube = KubeApiServer::shared();
    let _op = operator(kube, &ns);
    let pools: Api<PrefectWorkPool> = Api::namespaced(client.clone(), &ns);
    let (kept, deleted) = (unique("kept"), unique("deleted"));
    for (resource, name, policy) in [("kept", &kept, "Retain"), ("deleted", &deleted, "Delete")] {
        pools
            .create(
                &PostParams::default(),
                &work_pool(
                    resource,
                    &prefect.server.url,
                    json!({"name": name, "deletionPolicy": policy}),
                ),
            )
            .await
            .unwrap();
        ready(&pools, resource, "True").await;
    }
    let api = &prefect.api;
    // A run of the Delete pool, running.
    let dep = api.create_deployment(&deleted, json!({})).await;
    let run = api.create_run(&dep).await;
    api.set_state(&run, "RUNNING", true).await;

    for resource in ["kept", "deleted"] {
        pools
            .delete(resource, &DeleteParams::default())
            .await
            .unwrap();
    }
    wait_for(
        "kept gone from Kubernetes",
        Duration::from_secs(30),
        || async { pools.get_opt("kept").await.ok()?.is_none().then_some(()) },
    )
    .await;
    api.call(Method::GET, &format!("/work_pools/{kept}"), None)
        .await;

    let waiting = wait_for(
        "Degraded while a run is unfinished",
        Duration::from_secs(30),
        || async {
            let p = pools.get("deleted").await.ok()?;
            let c = p.status?.conditions;
            let d = c.into_iter().find(|c| c.type_ == "Degraded")?;
            (d.reason == "FlowRunsUnfinished").then_some(d.message)
        },
    )
    .await;
    assert!(
        waiting.starts_with(&format!(
            "1 flow runs of work pool `{deleted}` are not finished"
        )),
        "{waiting}"
    );
    assert!(
        api.try_call(Method::GET, &format!("/work_pools/{deleted}"), None)
            .await
            .is_ok(),
        "not deleted under a running flow"
    );
    api.set_state(&run, "COMPLETED", true).await;
    wait_for(
        "deleted gone from Kubernetes and Prefect",
        Duration::from_secs(60),
        || async {
            let gone_here = pools.get_opt("deleted").await.ok()?.is_none();
            let gone_there = api
                .try_call(Method::GET, &format!("/work_pools/{deleted}"), None)
                .await
                .is_err();
            (gone_here && gone_there).then_some(())
        },
    )
    .await;
}

/// A PrefectAgent that refers to a PrefectWorkPool waits for it, then takes its pool.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_referring_to_a_pool_resource_waits_for_it_then_runs_its_runs() {
    let (_, client, ns) = cluster_with_namespace("wpref").await;
    let prefect = Setup::new("wpref-unused").await;
    let kube = KubeApiServer::shared();
    let _op = operator(kube, &ns);
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let pools: Api<PrefectWorkPool> = Api::namespaced(client.clone(), &ns);
    let mut agent = agent_resource("referring", &prefect.server.url, "unused");
    agent.spec.api.work_pool = None;
    agent.spec.api.work_pool_ref = Some(prefect_agent_operator::crd::LocalObjectRef {
        name: "team-pool".into(),
    });
    agents
        .create(&PostParams::default(), &agent)
        .await
        .expect("create the agent");
    let waiting = wait_for(
        "the agent waiting for its pool",
        Duration::from_secs(30),
        || async {
            let a = agents.get("referring").await.ok()?;
            let c = a.status?.conditions;
            let r = c.iter().find(|c| c.type_ == "Ready")?;
            let d = c.iter().find(|c| c.type_ == "Degraded")?;
            (r.reason == "WaitingForWorkPool")
                .then(|| (r.status.clone(), d.status.clone(), r.message.clone()))
        },
    )
    .await;
    assert_eq!(
        (waiting.0.as_str(), waiting.1.as_str()),
        ("False", "False"),
        "waiting is no failure"
    );
    assert!(waiting.2.contains("team-pool"), "{}", waiting.2);

    let name = unique("team");
    pools
        .create(
            &PostParams::default(),
            &work_pool("team-pool", &prefect.server.url, json!({"name": name})),
        )
        .await
        .unwrap();
    // The pool resource is watched: the agent starts when it is Ready, not at its
    // 30 s look again.
    wait_for(
        "the agent Ready after its pool",
        Duration::from_secs(20),
        || async {
            let c = agents.get("referring").await.ok()?.status?.conditions;
            c.iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await;
    let dep = prefect.api.create_deployment(&name, json!({})).await;
    let run = prefect.api.create_run(&dep).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    job_named(&jobs, &format!("prefect-run-{run}")).await;
}

/// Changed in Prefect behind the operator's back, seen on Prefect's event stream: put
/// back at once, though the resync here is 10 minutes (pool, queue and deployment).
#[tokio::test(flavor = "multi_thread")]
async fn drift_seen_on_the_event_stream_is_put_back_at_once() {
    let (_, client, ns) = cluster_with_namespace("wpev").await;
    let prefect = Setup::new("wpev-unused").await;
    let kube = KubeApiServer::shared();
    let _op = operator_resyncing(kube, &ns, free_port(), "10m");
    let pools: Api<PrefectWorkPool> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<prefect_agent_operator::crd::PrefectDeployment> =
        Api::namespaced(client.clone(), &ns);
    let name = unique("watched");
    pools
        .create(
            &PostParams::default(),
            &work_pool(
                "watched",
                &prefect.server.url,
                json!({"name": name, "description": "as declared",
                       "queues": [{"name": "high", "priority": 1}]}),
            ),
        )
        .await
        .unwrap();
    ready(&pools, "watched", "True").await;
    let flow = unique("watched-flow");
    let deployment: prefect_agent_operator::crd::PrefectDeployment =
        serde_json::from_value(json!({
        "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectDeployment",
        "metadata": {"name": "watched"},
        "spec": {"api": {"url": prefect.server.url}, "flowName": flow,
                 "workPoolRef": {"name": "watched"}, "description": "as declared"}}))
        .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let id = wait_for("the deployment synced", Duration::from_secs(60), || async {
        let s = deployments.get("watched").await.ok()?.status?;
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
            .then_some(s.deployment_id?)
    })
    .await;
    let api = &prefect.api;
    let pool_path = format!("/work_pools/{name}");
    let deployment_path = format!("/deployments/{id}");

    api.call(
        Method::PATCH,
        &pool_path,
        Some(json!({"description": "from the UI"})),
    )
    .await;
    api.call(
        Method::PATCH,
        &format!("{pool_path}/queues/high"),
        Some(json!({"priority": 7})),
    )
    .await;
    api.call(
        Method::PATCH,
        &deployment_path,
        Some(json!({"description": "from the UI"})),
    )
    .await;
    prefect_has(api, &pool_path, "/description", json!("as declared")).await;
    prefect_has(
        api,
        &format!("{pool_path}/queues/high"),
        "/priority",
        json!(1),
    )
    .await;
    prefect_has(api, &deployment_path, "/description", json!("as declared")).await;
    wait_for("drift counted", Duration::from_secs(30), || async {
        let p = pools.get("watched").await.ok()?.status?;
        let d = deployments.get("watched").await.ok()?.status?;
        (p.drift_corrections >= 1 && d.drift_corrections >= 1).then_some(())
    })
    .await;
}

/// Another writer fighting the declared state (a script, another operator): put back at
/// most once per 5 s per resource, not as fast as the server answers.
#[tokio::test(flavor = "multi_thread")]
async fn a_writer_fighting_the_declaration_is_answered_once_per_gap() {
    let (_, client, ns) = cluster_with_namespace("wpfight").await;
    let prefect = Setup::new("wpfight-unused").await;
    let kube = KubeApiServer::shared();
    let _op = operator_resyncing(kube, &ns, free_port(), "10m");
    let pools: Api<PrefectWorkPool> = Api::namespaced(client.clone(), &ns);
    let name = unique("fought");
    pools
        .create(
            &PostParams::default(),
            &work_pool(
                "fought",
                &prefect.server.url,
                json!({"name": name, "description": "as declared"}),
            ),
        )
        .await
        .unwrap();
    ready(&pools, "fought", "True").await;
    let path = format!("/work_pools/{name}");
    let api = &prefect.api;
    let started = std::time::Instant::now();
    let mut writes = 0;
    while started.elapsed() < Duration::from_secs(12) {
        api.call(
            Method::PATCH,
            &path,
            Some(json!({"description": format!("fight {writes}")})),
        )
        .await;
        writes += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    prefect_has(api, &path, "/description", json!("as declared")).await;
    let corrections = pools
        .get("fought")
        .await
        .unwrap()
        .status
        .unwrap()
        .drift_corrections;
    eprintln!("{writes} writes against the declaration in 12 s, {corrections} put back");
    assert!(
        (1..=5).contains(&corrections),
        "{corrections} corrections for {writes} writes in 12 s: at most one per 5 s (+ the last)"
    );
}
