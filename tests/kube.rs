//! On a real kube-apiserver: the PrefectAgent CRD installed, served and rejecting nonsense; built Jobs accepted.

use pao_testkit as common;

use common::cluster::{KubeApiServer, install_crd, namespace};
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use prefect_agent_operator::controller::{AgentDefaults, agent_config};
use prefect_agent_operator::crd::{
    PrefectAgent, PrefectAgentStatus, PrefectDeployment, PrefectWorkPool,
};
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

/// Every field the CRD's schema names, as a path of object keys (`"0"` for an item of a
/// list, `"k"` for an entry of a map), for the corpus below.
fn schema_paths(schema: &serde_json::Value, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let mut visit = |key: &str, sub: &serde_json::Value| {
        let mut path = prefix.to_vec();
        path.push(key.to_string());
        out.push(path.clone());
        schema_paths(sub, &path, out);
    };
    if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
        for (k, sub) in props {
            visit(k, sub);
        }
    }
    if let Some(items) = schema.get("items") {
        visit("0", items);
    }
    if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        visit("k", values);
    }
}

/// Sets `value` at `path` inside `doc`, making the objects and lists on the way.
fn set_at(doc: &mut serde_json::Value, path: &[String], value: serde_json::Value) {
    let Some((last, init)) = path.split_last() else {
        *doc = value;
        return;
    };
    let mut at = doc;
    for (i, seg) in init.iter().enumerate() {
        let next_is_item = path[i + 1] == "0";
        let empty = if next_is_item { json!([]) } else { json!({}) };
        at = if seg == "0" {
            if !at.is_array() {
                *at = json!([]);
            }
            let list = at.as_array_mut().unwrap();
            if list.is_empty() {
                list.push(empty);
            }
            &mut list[0]
        } else {
            if !at.is_object() {
                *at = json!({});
            }
            at.as_object_mut()
                .unwrap()
                .entry(seg.clone())
                .or_insert(empty)
        };
    }
    if last == "0" {
        *at = json!([value]);
    } else {
        if !at.is_object() {
            *at = json!({});
        }
        at.as_object_mut().unwrap().insert(last.clone(), value);
    }
}

/// What a hostile or careless user writes into a field.
fn hostile_value(rng: &mut impl rand::Rng) -> serde_json::Value {
    // 12 levels: the test's API server (1.20) spends time exponential in the depth of
    // a free-form field such as `job.podTemplate` (0.4 s at 12 levels, 5.5 s at 18, a
    // core for minutes at 40: kubernetes#109099, fixed in 1.25's structured-merge-diff).
    let deep = (0..12).fold(json!("x"), |v, _| json!({ "a": v }));
    let choices = [
        json!(4294967296u64),
        json!(2147483648u64),
        json!(9007199254740993u64),
        json!(u64::MAX),
        json!(-1),
        json!(i64::MIN),
        json!(1.5),
        json!(1e300),
        json!(0),
        json!(""),
        json!("x".repeat(1025)),
        json!("y".repeat(1_000_000)),
        json!("\u{0}\n\u{202e}é"),
        json!("-1s"),
        json!("{{ prefect.variables.x }}"),
        json!(true),
        json!(null),
        json!([]),
        json!(vec!["l"; 65]),
        json!({}),
        json!(
            (0..65)
                .map(|i| (format!("k{i}"), "v"))
                .collect::<std::collections::BTreeMap<_, _>>()
        ),
        deep,
        // And what a careful user writes, so that some hostile values are stored beside them.
        json!(1),
        json!(60),
        json!("a"),
        json!("10s"),
        json!(["a"]),
        json!({"a": "b"}),
    ];
    choices[rng.random_range(0..choices.len())].clone()
}

/// Hostile specs of one kind tried on the API server: what it stores must decode, and
/// `judge` (what the operator does first with a spec) must answer without panicking:
/// Ok, or an error a condition says.
async fn hostile_corpus<K>(
    kind_file: &str,
    base: serde_json::Value,
    cases: usize,
    judge: impl Fn(&K) -> Result<(), String>,
) where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    use rand::{Rng, SeedableRng};
    let (client, ns) = setup().await;
    let erased = kube::api::ApiResource::erase::<K>(&());
    let raw: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &erased);
    let typed: Api<K> = Api::namespaced(client, &ns);
    let (_, crd) = prefect_agent_operator::crd::all()
        .into_iter()
        .find(|(file, _)| *file == kind_file)
        .unwrap();
    let crd = serde_json::to_value(crd).unwrap();
    let spec_schema =
        &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut paths = Vec::new();
    schema_paths(spec_schema, &[], &mut paths);
    assert!(paths.len() > 20, "the schema's fields: {}", paths.len());
    // A fixed seed: the same corpus every run (PAO_CORPUS_SEED picks another).
    let seed = std::env::var("PAO_CORPUS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026u64);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut stored, mut refused, mut said_why) = (0, 0, 0);
    for i in 0..cases {
        let mut spec = base.clone();
        for _ in 0..rng.random_range(1..=3) {
            let path = &paths[rng.random_range(0..paths.len())];
            set_at(&mut spec, path, hostile_value(&mut rng));
        }
        let name = format!("c{i}");
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": K::api_version(&()), "kind": K::kind(&()),
            "metadata": {"name": name}, "spec": spec}))
        .unwrap();
        match raw.create(&PostParams::default(), &object).await {
            Ok(_) => {
                stored += 1;
                // What the API server keeps, the operator must read (one object it
                // cannot decode would otherwise stop the watch of every resource).
                let decoded = match typed.get(&name).await {
                    Ok(decoded) => decoded,
                    Err(e) => {
                        panic!("case {i} (seed {seed}) was stored but does not decode: {e}\n{spec}")
                    }
                };
                if let Err(why) = judge(&decoded) {
                    assert!(!why.is_empty());
                    said_why += 1;
                }
            }
            Err(kube::Error::Api(resp)) => {
                assert!(
                    [400, 413, 422].contains(&resp.code),
                    "case {i}: refused with {resp:?}"
                );
                refused += 1;
            }
            Err(e) => panic!("case {i}: {e}"),
        }
    }
    assert!(
        stored > 0 && refused > 0,
        "stored {stored}, refused {refused}"
    );
    eprintln!(
        "hostile {} specs tried server-side: {cases} ({} fields), stored {stored} (all decode; \
         {said_why} refused by a condition), refused {refused} by the API server",
        K::kind(&()),
        paths.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_spec_the_api_server_stores_decodes() {
    let base = json!({"api": {"url": "http://prefect:4200/api", "workPool": "k8s",
        "keySecretRef": {"name": "prefect-api", "key": "key"}}});
    hostile_corpus::<PrefectAgent>("prefectagent.yaml", base, 500, |a| {
        // It configures an agent or says why, by a condition's reason.
        match agent_config(
            &a.metadata.name.clone().unwrap_or_default(),
            &a.spec,
            AgentDefaults::default(),
        ) {
            Ok(_) => Ok(()),
            Err(e) => {
                assert!(!e.reason().is_empty());
                Err(e.to_string())
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_work_pool_spec_the_api_server_stores_decodes() {
    use prefect_agent_operator::sync::pool;
    let base = json!({"api": {"url": "http://prefect:4200/api"}, "name": "k8s",
        "queues": [{"name": "high", "priority": 1}]});
    hostile_corpus::<PrefectWorkPool>("prefectworkpool.yaml", base, 250, |p| {
        // Its template is built and checked (the ConfigMap's text, if any, as a hostile
        // text too), and what is sent to Prefect is built from it.
        let text = "{{ x }}: [";
        let template = pool::template(&p.spec, Some(text)).map_err(|e| e.to_string())?;
        let _ = pool::create_pool_body("k8s", &p.spec, &template);
        let _ = pool::desired_pool(&p.spec, &template);
        for q in &p.spec.queues {
            let _ = pool::desired_queue(q);
        }
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_deployment_spec_the_api_server_stores_decodes() {
    use prefect_agent_operator::sync::deployment;
    let base = json!({"api": {"url": "http://prefect:4200/api"}, "flowName": "etl",
        "workPool": "k8s", "schedules": [{"interval": 60}]});
    hostile_corpus::<PrefectDeployment>("prefectdeployment.yaml", base, 250, |d| {
        deployment::check(&d.spec).map_err(|e| e.to_string())?;
        // What is sent, and compared with Prefect's answer (here: an empty one).
        let body = deployment::body(&d.spec, "etl", "flow-id", "k8s", Some("gcl-id"));
        assert_eq!(body["name"], "etl");
        let _ = deployment::drift(&body, &json!({}));
        Ok(())
    })
    .await;
}
