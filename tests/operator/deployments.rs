//! PrefectDeployment: a deployment, its flow, schedules, parameters and job variables
//! declared as a resource and kept so in a real Prefect server.

use super::*;

use prefect_agent_operator::crd::{PrefectDeployment, PrefectWorkPool};
use reqwest::Method;

fn resource<K: serde::de::DeserializeOwned>(
    kind: &str,
    name: &str,
    url: &str,
    spec: serde_json::Value,
) -> K {
    let mut spec = spec;
    spec["api"] = json!({"url": url});
    serde_json::from_value(json!({
        "apiVersion": "prefect.io/v1alpha1", "kind": kind,
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

/// The operator for `ns`, with a 2 s resync so that drift is put back while a test waits.
fn operator(ns: &str) -> AgentProcess {
    let mut cmd = operator_command(&KubeApiServer::shared().kubeconfig);
    cmd.args(["--namespace", ns, "--sync-interval", "2s"]);
    AgentProcess::start_with(cmd)
}

/// The Ready, Degraded conditions once Ready has `status` for the current generation.
async fn settled(
    deployments: &Api<PrefectDeployment>,
    name: &str,
    status: &str,
) -> PrefectDeployment {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let d = deployments.get(name).await.ok();
        let done = d.as_ref().is_some_and(|d| {
            d.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.type_ == "Ready"
                        && c.status == status
                        && c.observed_generation == d.metadata.generation
                })
            })
        });
        if done {
            return d.unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {name}: Ready={status}; last seen {:?}",
            d.and_then(|d| d.status)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn degraded(d: &PrefectDeployment) -> (String, String) {
    let c = d
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded")
        .unwrap();
    (c.reason.clone(), c.message.clone())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_declared_deployment_is_registered_updated_and_kept() {
    let (_, client, ns) = cluster_with_namespace("pfd").await;
    let prefect = Setup::new("pfd-unused").await;
    let _op = operator(&ns);
    let pools: Api<PrefectWorkPool> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<PrefectDeployment> = Api::namespaced(client.clone(), &ns);
    let url = &prefect.server.url;
    let pool = unique("pfd-pool");
    let flow = unique("etl-flow");
    // The deployment first: it waits for the pool resource it refers to.
    let spec = json!({
        "flowName": flow, "workPoolRef": {"name": "team"}, "workQueue": "default",
        "entrypoint": "flows/etl.py:etl", "path": "/opt/flows",
        "pullSteps": [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/flows"}}],
        "parameters": {"name": "gitops"}, "enforceParameterSchema": false,
        "jobVariables": {"image": "repo/flows:2"}, "tags": ["etl", "gitops"],
        "version": "1.0", "description": "kept in Git", "concurrencyLimit": 3,
        "schedules": [{"interval": 3600, "anchorDate": "2026-01-01T00:00:00Z"},
                      {"cron": "0 6 * * 1-5", "timezone": "Europe/Paris", "active": false}],
        "deletionPolicy": "Delete",
    });
    deployments
        .create(
            &PostParams::default(),
            &resource("PrefectDeployment", "etl", url, spec),
        )
        .await
        .expect("create the deployment");
    let waiting = wait_for("waiting for the pool", Duration::from_secs(30), || async {
        let d = deployments.get("etl").await.ok()?;
        let c = d.status?.conditions;
        c.iter()
            .find(|c| c.type_ == "Ready" && c.reason == "WaitingForWorkPool")
            .map(|c| c.message.clone())
    })
    .await;
    assert!(waiting.contains("team"), "{waiting}");
    pools
        .create(
            &PostParams::default(),
            &resource("PrefectWorkPool", "team", url, json!({"name": pool})),
        )
        .await
        .unwrap();
    // The pool resource is watched: the deployment goes on when it is Ready, not at its
    // 30 s look again.
    wait_for(
        "the deployment after its pool",
        Duration::from_secs(20),
        || async {
            let c = deployments.get("etl").await.ok()?.status?.conditions;
            c.iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
                .then_some(())
        },
    )
    .await;
    let synced = settled(&deployments, "etl", "True").await;
    let status = synced.status.unwrap();
    let id = status.deployment_id.clone().expect("deployment id");

    // Field by field, as Prefect's API answers.
    let api = &prefect.api;
    let d = api
        .call(Method::GET, &format!("/deployments/{id}"), None)
        .await;
    let f = api
        .call(
            Method::GET,
            &format!("/flows/{}", d["flow_id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(f["name"], flow.as_str());
    assert_eq!(status.flow_id.as_deref(), d["flow_id"].as_str());
    assert_eq!(d["name"], "etl");
    assert_eq!(d["work_pool_name"], pool.as_str());
    assert_eq!(d["work_queue_name"], "default");
    assert_eq!(d["entrypoint"], "flows/etl.py:etl");
    assert_eq!(d["path"], "/opt/flows");
    assert_eq!(
        d["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]["directory"],
        "/opt/flows"
    );
    assert_eq!(d["parameters"], json!({"name": "gitops"}));
    assert_eq!(d["enforce_parameter_schema"], false);
    assert_eq!(d["job_variables"], json!({"image": "repo/flows:2"}));
    assert_eq!(d["tags"], json!(["etl", "gitops"]));
    assert_eq!(d["version"], "1.0");
    assert_eq!(d["description"], "kept in Git");
    let schedules = d["schedules"].as_array().unwrap();
    assert_eq!(schedules.len(), 2, "{d}");
    let interval = schedules
        .iter()
        .find(|s| s["schedule"]["interval"].is_number())
        .unwrap();
    assert_eq!(interval["schedule"]["interval"].as_f64(), Some(3600.0));
    assert_eq!(interval["active"], true);
    let cron = schedules
        .iter()
        .find(|s| s["schedule"]["cron"].is_string())
        .unwrap();
    assert_eq!(cron["schedule"]["cron"], "0 6 * * 1-5");
    assert_eq!(cron["schedule"]["timezone"], "Europe/Paris");
    assert_eq!(cron["active"], false);
    let limit = d["concurrency_limit"]
        .as_u64()
        .or(d["global_concurrency_limit"]["limit"].as_u64());
    assert_eq!(limit, Some(3), "{d}");

    // Resyncs with nothing changed correct nothing: Prefect's answer compares equal.
    let quiet = wait_for("a later sync", Duration::from_secs(30), || async {
        let s = deployments.get("etl").await.ok()?.status?;
        (s.last_sync_time > status.last_sync_time).then_some(s)
    })
    .await;
    assert_eq!(quiet.drift_corrections, 0, "{quiet:?}");
    assert!(
        quiet.next_scheduled_run.is_some(),
        "the interval schedule's next run: {quiet:?}"
    );

    // Edited in Git: the same deployment, updated.
    let edit = json!({"spec": {"parameters": {"name": "edited"}}});
    deployments
        .patch("etl", &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .unwrap();
    let after = settled(&deployments, "etl", "True").await.status.unwrap();
    assert_eq!(
        after.deployment_id.as_deref(),
        Some(id.as_str()),
        "updated in place"
    );
    let d = api
        .call(Method::GET, &format!("/deployments/{id}"), None)
        .await;
    assert_eq!(d["parameters"], json!({"name": "edited"}));

    // Changed in Prefect behind the operator's back: put back.
    api.call(
        Method::PATCH,
        &format!("/deployments/{id}"),
        Some(json!({"description": "from the UI", "paused": true})),
    )
    .await;
    wait_for(
        "the description put back",
        Duration::from_secs(60),
        || async {
            let d = api
                .call(Method::GET, &format!("/deployments/{id}"), None)
                .await;
            (d["description"] == "kept in Git" && d["paused"] == false).then_some(())
        },
    )
    .await;
    let corrected = wait_for("drift counted", Duration::from_secs(30), || async {
        let s = deployments.get("etl").await.ok()?.status?;
        (s.drift_corrections >= 1).then_some(s)
    })
    .await;
    assert_eq!(corrected.deployment_id.as_deref(), Some(id.as_str()));

    // A schedule Prefect refuses, named at its field; a pool that does not exist.
    let bad = json!({"spec": {"schedules": [{"cron": "61 * * * *"}]}});
    deployments
        .patch("etl", &PatchParams::default(), &Patch::Merge(&bad))
        .await
        .unwrap();
    let refused = settled(&deployments, "etl", "False").await;
    assert_eq!(
        degraded(&refused),
        (
            "RefusedByPrefect".to_string(),
            "spec.schedules[0].cron: Invalid cron string: \"61 * * * *\" (refused by Prefect)"
                .to_string()
        )
    );
    let lost = resource::<PrefectDeployment>(
        "PrefectDeployment",
        "lost",
        url,
        json!({"flowName": flow, "workPool": "no-such-pool"}),
    );
    deployments
        .create(&PostParams::default(), &lost)
        .await
        .unwrap();
    let lost = settled(&deployments, "lost", "False").await;
    assert_eq!(
        degraded(&lost).0,
        "WorkPoolNotFound",
        "{:?}",
        degraded(&lost)
    );
    assert!(
        degraded(&lost).1.contains("no-such-pool"),
        "{:?}",
        degraded(&lost)
    );

    // deletionPolicy: Delete removes it from Prefect.
    deployments
        .delete("etl", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the deployment deleted in Prefect",
        Duration::from_secs(60),
        || async {
            let gone_here = deployments.get_opt("etl").await.ok()?.is_none();
            let gone_there = api
                .try_call(Method::GET, &format!("/deployments/{id}"), None)
                .await
                .is_err();
            (gone_here && gone_there).then_some(())
        },
    )
    .await;
}

/// Concurrency, as Prefect's own deployments have it: a shared global limit referred to
/// by name (never changed, never deleted by the deployment, even when Prefect would), a
/// declared one created and kept, the deployment's own limit, switches between them.
#[tokio::test(flavor = "multi_thread")]
async fn global_concurrency_limits_are_referred_to_declared_and_never_lost() {
    let (_, client, ns) = cluster_with_namespace("gcl").await;
    let prefect = Setup::new("gcl").await;
    let _op = operator(&ns);
    let deployments: Api<PrefectDeployment> = Api::namespaced(client.clone(), &ns);
    let (url, api) = (&prefect.server.url, &prefect.api);
    let shared = unique("shared-db");
    let made = api
        .call(
            Method::POST,
            "/v2/concurrency_limits/",
            Some(json!({"name": shared, "limit": 7})),
        )
        .await;
    let shared_id = made["id"].as_str().unwrap().to_string();
    let shared_limit = || async {
        api.try_call(
            Method::GET,
            &format!("/v2/concurrency_limits/{shared_id}"),
            None,
        )
        .await
        .ok()
        .map(|l| l["limit"].clone())
    };
    let flow = unique("gcl-flow");
    let spec = |extra: serde_json::Value| {
        let mut s = json!({"flowName": flow, "workPool": prefect.pool, "deletionPolicy": "Delete"});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        s
    };
    deployments
        .create(
            &PostParams::default(),
            &resource(
                "PrefectDeployment",
                "a",
                url,
                spec(json!({"globalConcurrencyLimit": {"name": shared},
                            "concurrencyOptions": {"collisionStrategy": "CancelNew", "gracePeriodSeconds": 120},
                            "versionInfo": {"type": "git", "version": "4f2a9c1"}})),
            ),
        )
        .await
        .unwrap();
    let a = settled(&deployments, "a", "True").await.status.unwrap();
    assert_eq!(
        a.global_concurrency_limit_id.as_deref(),
        Some(shared_id.as_str())
    );
    let id = a.deployment_id.unwrap();
    let path = format!("/deployments/{id}");
    let d = api.call(Method::GET, &path, None).await;
    assert_eq!(d["global_concurrency_limit"]["id"], shared_id.as_str());
    assert_eq!(d["concurrency_options"]["collision_strategy"], "CANCEL_NEW");
    assert_eq!(d["concurrency_options"]["grace_period_seconds"], 120);
    assert_eq!(
        shared_limit().await,
        Some(json!(7)),
        "referred to, not changed"
    );

    // A declared one is created, and put back when changed in Prefect.
    let declared = unique("declared");
    deployments
        .create(
            &PostParams::default(),
            &resource(
                "PrefectDeployment",
                "b",
                url,
                spec(json!({"globalConcurrencyLimit": {"name": declared, "limit": 2, "slotDecayPerSecond": 0.5}})),
            ),
        )
        .await
        .unwrap();
    settled(&deployments, "b", "True").await;
    let gcl = format!("/v2/concurrency_limits/{declared}");
    let l = api.call(Method::GET, &gcl, None).await;
    assert_eq!(
        (l["limit"].clone(), l["slot_decay_per_second"].clone()),
        (json!(2), json!(0.5))
    );
    api.call(Method::PATCH, &gcl, Some(json!({"limit": 9})))
        .await;
    wait_for(
        "the declared limit put back",
        Duration::from_secs(30),
        || async {
            let l = api.try_call(Method::GET, &gcl, None).await.ok()?;
            (l["limit"] == 2).then_some(())
        },
    )
    .await;
    // One that does not exist and is not declared: said at the field.
    deployments
        .create(
            &PostParams::default(),
            &resource(
                "PrefectDeployment",
                "c",
                url,
                spec(json!({"globalConcurrencyLimit": {"name": "no-such-limit"}})),
            ),
        )
        .await
        .unwrap();
    let c = settled(&deployments, "c", "False").await;
    let (reason, message) = degraded(&c);
    assert_eq!(reason, "GlobalConcurrencyLimitNotFound");
    assert!(
        message.starts_with(
            "spec.globalConcurrencyLimit.name: global concurrency limit `no-such-limit`"
        ),
        "{message}"
    );

    // Shared → its own limit: the shared one keeps its limit (Prefect would set it to 3).
    let edit = |extra: serde_json::Value| {
        let mut s = spec(extra);
        s["api"] = json!({"url": url});
        let deployments = deployments.clone();
        async move {
            let mut a = deployments.get("a").await.unwrap();
            a.spec = serde_json::from_value(s).unwrap();
            deployments
                .replace("a", &PostParams::default(), &a)
                .await
                .unwrap();
            settled(&deployments, "a", "True").await
        }
    };
    edit(json!({"concurrencyLimit": 3})).await;
    let d = api.call(Method::GET, &path, None).await;
    assert_eq!(
        d["global_concurrency_limit"]["name"],
        format!("deployment:{id}")
    );
    assert_eq!(d["global_concurrency_limit"]["limit"], 3);
    assert_eq!(shared_limit().await, Some(json!(7)));
    let own = d["global_concurrency_limit"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Own → shared: its own limit is deleted (left, its name would block the next one).
    edit(json!({"globalConcurrencyLimit": {"name": shared}})).await;
    let d = api.call(Method::GET, &path, None).await;
    assert_eq!(d["global_concurrency_limit"]["id"], shared_id.as_str());
    assert!(
        api.try_call(Method::GET, &format!("/v2/concurrency_limits/{own}"), None)
            .await
            .is_err(),
        "its own limit deleted"
    );
    edit(json!({"concurrencyLimit": 4})).await;
    let d = api.call(Method::GET, &path, None).await;
    assert_eq!(d["global_concurrency_limit"]["limit"], 4);
    // None at all: its own removed; shared → none detaches without deleting the shared one.
    edit(json!({})).await;
    let d = api.call(Method::GET, &path, None).await;
    assert!(d["global_concurrency_limit"].is_null(), "{d}");
    edit(json!({"globalConcurrencyLimit": {"name": shared}})).await;
    edit(json!({})).await;
    assert_eq!(shared_limit().await, Some(json!(7)));

    // Deleted with deletionPolicy: Delete while holding the shared limit: Prefect deletes
    // a deployment's limit with it, so the operator detaches the shared one first.
    edit(json!({"globalConcurrencyLimit": {"name": shared}})).await;
    deployments
        .delete("a", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(
        "the deployment deleted in Prefect",
        Duration::from_secs(60),
        || async {
            api.try_call(Method::GET, &path, None)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        shared_limit().await,
        Some(json!(7)),
        "the shared limit outlives it"
    );
}

/// Two resources declaring one deployment would put back each other's changes at every
/// sync and every event: the first created is synced, the second is Degraded and says
/// which one holds it, and deleting it leaves the other's deployment alone.
#[tokio::test(flavor = "multi_thread")]
async fn a_deployment_declared_twice_is_synced_once() {
    let (_, client, ns) = cluster_with_namespace("twice").await;
    let prefect = Setup::new("twice").await;
    let _op = operator(&ns);
    let deployments: Api<PrefectDeployment> = Api::namespaced(client.clone(), &ns);
    let url = &prefect.server.url;
    let flow = unique("twice-flow");
    let declared = |description: &str| {
        json!({"flowName": flow, "name": "shared", "workPool": prefect.pool,
               "description": description, "deletionPolicy": "Delete"})
    };
    deployments
        .create(
            &PostParams::default(),
            &resource("PrefectDeployment", "first", url, declared("first's")),
        )
        .await
        .unwrap();
    let first = settled(&deployments, "first", "True").await;
    let id = first.status.unwrap().deployment_id.unwrap();
    deployments
        .create(
            &PostParams::default(),
            &resource("PrefectDeployment", "second", url, declared("second's")),
        )
        .await
        .unwrap();
    let second = settled(&deployments, "second", "False").await;
    let (reason, message) = degraded(&second);
    assert_eq!(reason, "DeclaredTwice");
    assert!(
        message.starts_with(&format!(
            "PrefectDeployment {ns}/first already declares deployment `{flow}/shared`"
        )),
        "{message}"
    );
    // Several resyncs later Prefect still has the first's, never the second's.
    let path = format!("/deployments/{id}");
    let window = std::time::Instant::now() + Duration::from_secs(6);
    while std::time::Instant::now() < window {
        let d = prefect.api.call(Method::GET, &path, None).await;
        assert_eq!(d["description"], "first's");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Deleting the second (deletionPolicy: Delete) does not delete the first's.
    deployments
        .delete("second", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the second gone", Duration::from_secs(30), || async {
        deployments
            .get_opt("second")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    let d = prefect.api.call(Method::GET, &path, None).await;
    assert_eq!(d["description"], "first's", "still there");
}
