//! The controller in process, as controller-rs tests it: a `Context` over a real client
//! (the test API server) and a real Prefect server; `reconcile` called directly, then
//! the resource, the supervisor and the returned `Action` looked at. No operator binary.

use pao_testkit as common;

use std::sync::Arc;
use std::time::Duration;

use common::cluster::{cluster_with_namespace, create_secret};
use common::*;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::Action;
use prefect_agent_operator::backend::http::Auth;
use prefect_agent_operator::controller::AgentDefaults;
use prefect_agent_operator::controller::{Context, FINALIZER, reconcile};
use prefect_agent_operator::crd::PrefectAgent;
use prefect_agent_operator::scope::{JobNamespaces, Scope};
use serde_json::json;

fn context(client: kube::Client, ns: &str) -> Arc<Context> {
    let scope = Scope {
        watch_namespace: Some(ns.to_string()),
        job_namespaces: JobNamespaces::from_list(&[]),
        ..Scope::default()
    };
    Context::new(
        client,
        Duration::from_secs(60),
        scope,
        AgentDefaults::default(),
    )
}

fn condition(agent: &PrefectAgent, kind: &str) -> (String, String, String) {
    let c = agent
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == kind))
        .unwrap_or_else(|| panic!("no {kind} condition: {:?}", agent.status));
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

/// Creates a PrefectAgent `name` whose key comes from the Secret `secret`, for a server
/// that is never reached (these tests end before it).
async fn create_keyed(agents: &Api<PrefectAgent>, name: &str, secret: &str) -> PrefectAgent {
    let resource: PrefectAgent = serde_json::from_value(json!({
        "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
        "metadata": {"name": name},
        "spec": {"api": {"url": "http://prefect.invalid/api", "workPool": "p",
                         "keySecretRef": {"name": secret, "key": "key"}}}
    }))
    .unwrap();
    agents
        .create(&PostParams::default(), &resource)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_secret_is_degraded_and_looked_at_again_later() {
    let (_kube, client, ns) = cluster_with_namespace("reconcile").await;
    let ctx = context(client.clone(), &ns);
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let created = create_keyed(&agents, "nokey", "absent").await;

    // The first pass adds the finalizer and stops there (the finalizer helper's way).
    let action = reconcile(Arc::new(created), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    let stored = agents.get("nokey").await.unwrap();
    assert!(stored.finalizers().contains(&FINALIZER.to_string()));

    let action = reconcile(Arc::new(stored), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let stored = agents.get("nokey").await.unwrap();
    let (status, reason, message) = condition(&stored, "Degraded");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "SecretNotFound")
    );
    assert_eq!(message, format!("secret {ns}/absent not found"));
    assert_eq!(condition(&stored, "Ready").0, "False");
    assert!(ctx.supervisor.snapshots().is_empty(), "no agent runs");

    // The Secret appears: the next pass starts the agent.
    create_secret(&client, &ns, "absent", "pnu_x").await;
    reconcile(Arc::new(stored), ctx.clone()).await.unwrap();
    let running: Vec<String> = ctx
        .supervisor
        .snapshots()
        .into_iter()
        .map(|(k, _, _)| k)
        .collect();
    assert_eq!(running, [format!("{ns}/nokey")]);
    ctx.supervisor
        .stop_all(std::time::Duration::from_secs(20))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_the_operator_may_not_read_is_unreadable_not_missing() {
    let (kube, client, ns) = cluster_with_namespace("reconcile").await;
    // An operator whose RBAC lets it manage PrefectAgents and Events but not read Secrets.
    let user = format!("limited-{ns}");
    let rbac = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "no-secrets", "namespace": ns},
         "rules": [
            {"apiGroups": ["prefect.io"], "resources": ["prefectagents", "prefectagents/status"],
             "verbs": ["get", "list", "watch", "patch", "update"]},
            {"apiGroups": ["", "events.k8s.io"], "resources": ["events"],
             "verbs": ["create", "patch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": "no-secrets", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "no-secrets"},
         "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}
    ]});
    let file = std::env::temp_dir().join(format!("{ns}-rbac.json"));
    std::fs::write(&file, rbac.to_string()).unwrap();
    let (ok, out) = kube.kubectl(&["apply", "-f", file.to_str().unwrap()]).await;
    assert!(ok, "{out}");
    create_secret(&client, &ns, "prefect-api", "pnu_x").await;
    let ctx = context(kube.client_as(&user).await, &ns);
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let created = create_keyed(&agents, "forbidden", "prefect-api").await;
    reconcile(Arc::new(created), ctx.clone()).await.unwrap();
    let stored = agents.get("forbidden").await.unwrap();
    let action = reconcile(Arc::new(stored), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let stored = agents.get("forbidden").await.unwrap();
    let (status, reason, message) = condition(&stored, "Degraded");
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "SecretUnreadable"),
        "{message}"
    );
    assert!(
        message.starts_with(&format!("cannot read secret {ns}/prefect-api: "))
            && message.contains("forbidden")
            && !message.contains("not found"),
        "the refusal, not a missing Secret: {message}"
    );
    assert!(ctx.supervisor.snapshots().is_empty(), "no agent runs");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_is_started_reported_suspended_and_cleaned_up() {
    let (_kube, client, ns) = cluster_with_namespace("reconcile").await;
    let prefect = tokio::task::spawn_blocking(PrefectServer::shared)
        .await
        .unwrap();
    let api = common::Api::new(&prefect.url, Auth::None);
    let pool = unique("reconcile");
    api.create_pool(&pool).await;
    let ctx = context(client.clone(), &ns);
    let agents: Api<PrefectAgent> = Api::namespaced(client.clone(), &ns);
    let resource: PrefectAgent = serde_json::from_value(json!({
        "apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
        "metadata": {"name": "etl"},
        "spec": {"api": {"url": prefect.url, "workPool": pool}, "pollInterval": "1s"}
    }))
    .unwrap();
    let created = agents
        .create(&PostParams::default(), &resource)
        .await
        .unwrap();
    reconcile(Arc::new(created), ctx.clone()).await.unwrap();
    let stored = agents.get("etl").await.unwrap();
    reconcile(Arc::new(stored), ctx.clone()).await.unwrap();
    // The agent registers on its own task; the next pass reports it.
    wait_for("the agent registered", Duration::from_secs(60), || async {
        let snapshots = ctx.supervisor.snapshots();
        snapshots
            .iter()
            .any(|(_, s, _)| s.agent_id.is_some())
            .then_some(())
    })
    .await;
    let stored = agents.get("etl").await.unwrap();
    let action = reconcile(Arc::new(stored), ctx.clone()).await.unwrap();
    // A healthy agent's status is refreshed every 5 minutes; what it changes is written
    // when it says so.
    assert_eq!(action, Action::requeue(Duration::from_secs(300)));
    let stored = agents.get("etl").await.unwrap();
    let (status, reason, _) = condition(&stored, "Ready");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Polling"));
    assert!(stored.status.as_ref().unwrap().agent_id.is_some());

    // Suspended: the agent stops, nothing is requeued.
    let mut suspended = stored.clone();
    suspended.spec.suspend = true;
    let action = reconcile(Arc::new(suspended), ctx.clone()).await.unwrap();
    assert_eq!(action, Action::await_change());
    assert!(ctx.supervisor.snapshots().is_empty());
    let stored = agents.get("etl").await.unwrap();
    assert_eq!(condition(&stored, "Ready").1, "Suspended");

    // Deleted: the finalizer's cleanup runs and lets the resource go.
    agents
        .delete("etl", &DeleteParams::default())
        .await
        .unwrap();
    let deleting = agents.get("etl").await.unwrap();
    assert!(deleting.metadata.deletion_timestamp.is_some());
    reconcile(Arc::new(deleting), ctx.clone()).await.unwrap();
    wait_for("the resource gone", Duration::from_secs(30), || async {
        agents.get_opt("etl").await.unwrap().is_none().then_some(())
    })
    .await;
}
