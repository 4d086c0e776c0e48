//! On a real kube-apiserver: the PrefectAgent CRD installed, served and rejecting nonsense; built Jobs accepted.

use pao_testkit as common;

use common::cluster::{KubeApiServer, install_crd, namespace};
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use prefect_agent_operator::crd::{PrefectAgent, PrefectAgentStatus};
use serde_json::json;

/// A client with the CRD installed and a fresh namespace.
async fn setup() -> (Client, String) {
    let server = tokio::task::spawn_blocking(KubeApiServer::shared)
        .await
        .unwrap();
    let client = server.client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "crd").await;
    (client, ns)
}

fn agent(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent",
           "metadata": {"name": name}, "spec": spec})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_valid_agent_is_stored_with_defaults_and_takes_status() {
    let (client, ns) = setup().await;
    let agents: Api<PrefectAgent> = Api::namespaced(client, &ns);
    let created = agents
        .create(
            &PostParams::default(),
            &serde_json::from_value(agent("etl", json!({
                "labels": ["k8s"], "maxPolls": 0,
                "api": {"url": "http://prefect:4200/api", "workPool": "k8s",
                        "keySecretRef": {"name": "prefect-api", "key": "key"}},
                "job": {"image": "prefecthq/prefect:3-latest", "imagePullPolicy": "IfNotPresent",
                        "podTemplate": {"spec": {"priorityClassName": "batch"}}}
            })))
            .unwrap(),
        )
        .await
        .expect("a valid PrefectAgent is accepted");
    assert_eq!(created.spec.api.work_pool.as_deref(), Some("k8s"));
    assert_eq!(
        created.spec.job.pod_template,
        Some(json!({"spec": {"priorityClassName": "batch"}})),
        "free-form overrides are kept, not pruned"
    );

    let status = PrefectAgentStatus {
        observed_generation: created.metadata.generation,
        polls: 3,
        runs_submitted: 2,
        ..Default::default()
    };
    let ssa = PatchParams::apply("prefect-agent-operator");
    let patch =
        json!({"apiVersion": "prefect.io/v1alpha1", "kind": "PrefectAgent", "status": status});
    let patched = agents
        .patch_status("etl", &ssa, &Patch::Apply(&patch))
        .await
        .expect("status by server-side apply");
    assert_eq!(patched.status.unwrap().runs_submitted, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_server_rejects_nonsense_with_422() {
    let (client, ns) = setup().await;
    let agents: Api<DynamicObject> = Api::namespaced_with(
        client,
        &ns,
        &kube::api::ApiResource::erase::<PrefectAgent>(&()),
    );
    let url = json!("http://prefect:4200/api");
    let cases = [
        ("no-api", json!({}), "spec.api"),
        (
            "bad-flavor",
            json!({"api": {"url": url, "flavor": "prefect2"}}),
            "spec.api.flavor",
        ),
        (
            "bad-url",
            json!({"api": {"url": "prefect:4200"}}),
            "spec.api.url",
        ),
        (
            "negative-polls",
            json!({"api": {"url": url}, "maxPolls": -1}),
            "spec.maxPolls",
        ),
        (
            "zero-limit",
            json!({"api": {"url": url}, "concurrencyLimit": 0}),
            "spec.concurrencyLimit",
        ),
        (
            "bad-interval",
            json!({"api": {"url": url}, "pollInterval": "soon"}),
            "spec.pollInterval",
        ),
        (
            "bad-policy",
            json!({"api": {"url": url}, "job": {"imagePullPolicy": "Sometimes"}}),
            "spec.job.imagePullPolicy",
        ),
        (
            "bad-backoff",
            json!({"api": {"url": url}, "job": {"backoffLimit": -1}}),
            "spec.job.backoffLimit",
        ),
        // Stored, these would stop the operator decoding any PrefectAgent.
        (
            "huge-limit",
            json!({"api": {"url": url}, "concurrencyLimit": 4294967296u64}),
            "spec.concurrencyLimit",
        ),
        (
            "huge-ttl",
            json!({"api": {"url": url}, "job": {"ttlSecondsAfterFinished": 2147483648u64}}),
            "spec.job.ttlSecondsAfterFinished",
        ),
        (
            "long-image",
            json!({"api": {"url": url}, "job": {"image": "x".repeat(2000)}}),
            "spec.job.image",
        ),
        (
            "many-labels",
            json!({"api": {"url": url}, "labels": vec!["l"; 65]}),
            "spec.labels",
        ),
        (
            "many-env",
            json!({"api": {"url": url}, "envVars": (0..65).map(|i| (format!("V{i}"), "x")).collect::<std::collections::BTreeMap<_, _>>()}),
            "spec.envVars",
        ),
    ];
    for (name, spec, field) in cases {
        let err = agents
            .create(
                &PostParams::default(),
                &serde_json::from_value::<DynamicObject>(agent(name, spec)).unwrap(),
            )
            .await
            .expect_err(name);
        match err {
            kube::Error::Api(resp) => {
                assert_eq!(resp.code, 422, "{name}: {resp:?}");
                assert!(
                    resp.message.contains(field),
                    "{name}: the message names {field}: {}",
                    resp.message
                );
            }
            other => panic!("{name}: expected a 422, got {other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_built_job_is_accepted_and_a_second_create_is_already_exists() {
    use k8s_openapi::api::batch::v1::Job;
    use prefect_agent_operator::backend::{Env, EnvValue, FlowRun};
    use prefect_agent_operator::crd::{JobSpec, SecretKeyRef};
    use prefect_agent_operator::deploy::kubernetes::job::{JobInputs, build_job};
    use prefect_agent_operator::secret::SecretString;
    use prefect_agent_operator::work_pool::{JobConfiguration, standard_base_job_template};

    let (client, ns) = setup().await;
    let run = FlowRun {
        flow_id: Some("f".into()),
        ..FlowRun::pending(&uuid::Uuid::new_v4().to_string(), "brave-otter")
    };
    let env: Env = [
        (
            "PREFECT_API_URL",
            EnvValue::Plain("http://prefect/api".into()),
        ),
        (
            "PREFECT_API_KEY",
            EnvValue::Secret(SecretString::new("pnu_do_not_leak")),
        ),
        (
            "TOKEN",
            EnvValue::From(json!({"secretKeyRef": {"name": "s", "key": "k"}})),
        ),
    ]
    .into_iter()
    .collect();
    // Names Kubernetes would refuse as they are: Prefect's worker slugifies them.
    let vars = json!({"image": "repo/etl:2", "cpu_request": "500m", "memory_limit": "1Gi",
                      "labels": {"Team Name": "Data Team"}, "annotations": {"My Key": "a b"}});
    let configuration = JobConfiguration::new(
        Some(standard_base_job_template()),
        vars.as_object().unwrap(),
    )
    .unwrap();
    let secret = SecretKeyRef {
        name: "prefect-api".into(),
        key: "key".into(),
    };
    let job = build_job(&JobInputs {
        run: &run,
        agent_namespace: &ns,
        agent_name: "etl",
        configuration: &configuration,
        about: None,
        env: &env,
        defaults: &JobSpec::default(),
        secret: Some(&secret),
        references: &Default::default(),
        scope: &Default::default(),
    })
    .expect("built");
    let jobs: Api<Job> = Api::namespaced(client, &ns);
    let created = jobs
        .create(&PostParams::default(), &job)
        .await
        .expect("the API server accepts it");
    let stored = serde_json::to_string(&created).unwrap();
    assert!(
        !stored.contains("pnu_do_not_leak"),
        "no literal key in the stored Job"
    );
    assert!(stored.contains("secretKeyRef"));
    assert_eq!(
        created.metadata.labels.as_ref().unwrap()["Team-Name"],
        "Data-Team"
    );
    match jobs.create(&PostParams::default(), &job).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.reason, "AlreadyExists", "{e:?}"),
        other => panic!("a second create must be AlreadyExists, got {other:?}"),
    }
}
