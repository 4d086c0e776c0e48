//! Property tests: thousands of generated resource specs and generated or mutated Prefect
//! API answers. Nothing may panic; whatever cannot be used is answered by an error or a
//! condition with a message.

use prefect_agent_operator::backend::prefect1::graphql::error_of;
use prefect_agent_operator::backend::prefect1::parse_flow_run_row;
use prefect_agent_operator::backend::prefect1::run_config::FlowInfo;
use prefect_agent_operator::backend::prefect3::{
    ApiFlowRun, ApiState, SetStateResponse, displaced_by, interpret_claim, latest_claimant,
    verify_claim,
};
use prefect_agent_operator::backend::{Env, EnvValue, FlowRun, References};
use prefect_agent_operator::controller::{AgentDefaults, agent_config};
use prefect_agent_operator::crd::{PrefectAgentSpec, SecretKeyRef};
use prefect_agent_operator::deploy::kubernetes::job::{JobInputs, build_job, configuration_for};
use prefect_agent_operator::deploy::kubernetes::run_config::kubernetes_run;
use prefect_agent_operator::scope::Scope;
use prefect_agent_operator::work_pool::template::apply_values;
use prefect_agent_operator::work_pool::{JobConfiguration, references_in, run_values};
use proptest::prelude::*;
use serde_json::{Value, json};

const CASES: u32 = 1000;

/// A fixed seed: every run of the test command tries the same corpus (a failure is
/// reproducible as it is); `PROPTEST_RNG_SEED` picks another.
fn config() -> ProptestConfig {
    let seed = std::env::var("PROPTEST_RNG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026);
    ProptestConfig {
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed),
        ..ProptestConfig::with_cases(CASES)
    }
}

/// Strings a user or a server might send, placeholders and odd characters included.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9._-]{0,12}",
        "\\PC{0,16}",
        Just("{{ image }}".to_string()),
        Just("{{ prefect.variables.x }}".to_string()),
        Just("{{ prefect.blocks.secret.y }}".to_string()),
        Just("{{ $HOME }}".to_string()),
        Just("10s".to_string()),
        Just("-1s".to_string()),
        Just("http://127.0.0.1:4200/api".to_string()),
        Just("0.0.0.0:8080".to_string()),
        Just("2026-01-01T00:00:00Z".to_string()),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("image".to_string()),
        Just("env".to_string()),
        Just("command".to_string()),
        Just("namespace".to_string()),
        Just("backoff_limit".to_string()),
        Just("type".to_string()),
        Just("state".to_string()),
        Just("id".to_string()),
        Just("$ref".to_string()),
        Just("block_document_id".to_string()),
        "[a-z_.]{1,10}",
    ]
}

/// Any JSON, biased towards the keys and strings the code looks at.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e9f64..1e9).prop_map(|f| json!(f)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn maybe<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Option<T>> {
    prop::option::weighted(0.7, s)
}

/// Resource specs: mostly the right shape, with wrong values and wrong types mixed in.
fn spec_json() -> impl Strategy<Value = Value> {
    (
        text(),
        prop_oneof![3 => Just("prefect3"), 2 => Just("prefect1"), 1 => Just("prefect2")],
        maybe(text()),
        maybe(prop_oneof![4 => text().prop_map(Value::String), 1 => any_json()]),
        maybe(text()),
        maybe(prop_oneof![4 => 0i64..10, 1 => any::<i64>()]),
        prop_oneof![
            4 => prop::collection::vec(text(), 0..3).prop_map(|l| json!(l)),
            1 => any_json()
        ],
        prop_oneof![1 => any_json(), 6 => job_json()],
    )
        .prop_map(
            |(url, flavor, pool, poll, address, max_polls, labels, job)| {
                let mut spec = json!({"api": {"url": url, "flavor": flavor}});
                if let Some(p) = pool {
                    spec["api"]["workPool"] = json!(p);
                }
                if let Some(p) = poll {
                    spec["pollInterval"] = p;
                }
                if let Some(a) = address {
                    spec["agentAddress"] = json!(a);
                }
                if let Some(m) = max_polls {
                    spec["maxPolls"] = json!(m);
                }
                spec["labels"] = labels;
                spec["job"] = job;
                spec
            },
        )
}

fn job_json() -> impl Strategy<Value = Value> {
    (
        maybe(text()),
        maybe(prop_oneof![
            Just("Always"),
            Just("Never"),
            Just("IfNotPresent")
        ]),
        maybe(0i32..200),
        maybe(prop_oneof![4 => 0i32..100_000, 1 => any::<i32>()]),
        maybe(any_json()),
        maybe(prop::collection::btree_map("[a-z]{1,5}", text(), 0..3)),
    )
        .prop_map(|(image, policy, backoff, ttl, pod_template, labels)| {
            let mut job = json!({});
            if let Some(i) = image {
                job["image"] = json!(i);
            }
            if let Some(p) = policy {
                job["imagePullPolicy"] = json!(p);
            }
            if let Some(b) = backoff {
                job["backoffLimit"] = json!(b);
            }
            if let Some(t) = ttl {
                job["ttlSecondsAfterFinished"] = json!(t);
            }
            if let Some(p) = pod_template.filter(Value::is_object) {
                job["podTemplate"] = p;
            }
            if let Some(l) = labels {
                job["labels"] = json!(l);
            }
            job
        })
}

fn run() -> FlowRun {
    FlowRun {
        flow_id: Some("f".into()),
        deployment_id: Some("d".into()),
        ..FlowRun::pending("0b7e0c1e-0000-4000-8000-000000000001", "brave-fox")
    }
}

proptest! {
    #![proptest_config(config())]

    /// A spec that deserializes either configures an agent or is refused with a reason and
    /// a message; its Job section with any job variables builds a Job or a named error.
    #[test]
    fn generated_specs_configure_an_agent_or_say_why(spec in spec_json(), vars in any_json(), template in any_json()) {
        let Ok(spec) = serde_json::from_value::<PrefectAgentSpec>(spec) else {
            return Ok(()); // the shape is wrong: the CRD schema rejects it first
        };
        if let Err(e) = agent_config("x", &spec, AgentDefaults::default()) {
            prop_assert!(!e.reason().is_empty() && !e.to_string().is_empty());
        }
        let vars = vars.as_object().cloned().unwrap_or_default();
        let env: Env = [("PREFECT_API_URL", EnvValue::Plain("http://p/api".into()))].into_iter().collect();
        let secret = SecretKeyRef { name: "s".into(), key: "k".into() };
        let base = template.is_object().then(|| json!({"job_configuration": {"job_manifest": template}, "variables": {"properties": {}}}));
        let r = run();
        let built = JobConfiguration::new(base.as_ref(), &vars)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                let c = configuration_for(&c, base.as_ref()).map_err(|e| e.to_string())?;
                build_job(&JobInputs {
                    run: &r,
                    agent_namespace: "ns",
                    agent_name: "x",
                    configuration: &c,
                    about: None,
                    env: &env,
                    defaults: &spec.job,
                    secret: Some(&secret),
                    references: &References::default(),
                    scope: &Scope::default(),
                })
                .map_err(|e| e.to_string())
            });
        match built {
            Ok(job) => {
                prop_assert_eq!(job.metadata.name.as_deref(), Some("prefect-run-0b7e0c1e-0000-4000-8000-000000000001"));
                // The resource's Job namespace, or its own: nothing the operator did not allow.
                let ns = job.metadata.namespace.as_deref();
                prop_assert!(ns == Some(spec.job.namespace.as_deref().unwrap_or("ns")) || ns == Some("ns"), "{:?}", ns);
            }
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }

    /// Mutated Prefect 3 flow runs, claim answers and state histories.
    #[test]
    fn mutated_prefect3_answers_never_panic(
        mutations in prop::collection::vec((key(), any_json()), 0..4),
        answer in any_json(),
        history in prop::collection::vec(any_json(), 0..6),
        layers in (any_json(), any_json(), any_json()),
    ) {
        let mut run = json!({"id": "r", "name": "n", "state": {"type": "SCHEDULED", "name": "Scheduled"},
            "expected_start_time": "2026-01-01T00:00:00Z", "job_variables": {"image": "x"}});
        for (k, v) in mutations {
            if v.is_null() { run.as_object_mut().unwrap().remove(&k); } else { run[k] = v; }
        }
        if let Ok(api) = serde_json::from_value::<ApiFlowRun>(run) {
            let _ = FlowRun::from(api);
        }
        if let Ok(resp) = serde_json::from_value::<SetStateResponse>(answer) {
            let _ = interpret_claim(&resp, "t");
        }
        let states: Vec<ApiState> = history.into_iter().filter_map(|h| serde_json::from_value(h).ok()).collect();
        let _ = verify_claim(&states, "t");
        let _ = displaced_by(&states, "t");
        let _ = latest_claimant(&states);
        let obj = |v: &Value| v.as_object().cloned().unwrap_or_default();
        let values = run_values(&obj(&layers.1), &obj(&layers.2));
        let template = json!({"job_configuration": layers.0, "variables": {"properties": {}}});
        let merged = match JobConfiguration::new(Some(&template), &values) {
            Ok(c) => {
                let _ = c.render(&|_| None);
                let _ = c.env();
                c.variables
            }
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                values
            }
        };
        let _ = apply_values(&Value::Object(merged.clone()), &merged, &|_| None);
        let refs = references_in(&Value::Object(merged.clone()));
        if let Err(e) = References::default().resolve(&Value::Object(merged)) {
            prop_assert!(!refs.is_empty(), "an error needs a reference: {e}");
            prop_assert!(!e.to_string().is_empty());
        }
    }

    /// Mutated Prefect 1 rows, run_configs and GraphQL error lists.
    #[test]
    fn mutated_prefect1_answers_never_panic(
        mutations in prop::collection::vec((key(), any_json()), 0..4),
        run_config in any_json(),
        errors in any_json(),
    ) {
        let mut row = json!({"id": "r", "version": 1, "state": "Scheduled", "serialized_state": {"type": "Scheduled"},
            "run_config": {"type": "KubernetesRun"}, "labels": [], "flow": {"id": "f", "core_version": "1.4.1"},
            "task_runs": []});
        for (k, v) in mutations {
            row[k] = v;
        }
        let _ = parse_flow_run_row(&row);
        let flow = FlowInfo { id: "f".into(), name: "n".into(), storage: run_config.get("storage").cloned().unwrap_or(Value::Null), core_version: None };
        match kubernetes_run(&run_config, &flow, &[], None) {
            Ok(spec) => prop_assert!(spec.base_job_template.pointer("/job_configuration/job_manifest/spec/template/spec/containers/0").is_some()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        prop_assert!(!error_of("op", &errors).to_string().is_empty());
    }
}
