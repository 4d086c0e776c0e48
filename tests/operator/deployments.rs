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
    let kube = KubeApiServer::shared();
    let mut cmd = operator_command(&kube.kubeconfig);
    cmd.args(["--namespace", &ns, "--sync-interval", "2s"]);
    let _op = AgentProcess::start_with(cmd);
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
