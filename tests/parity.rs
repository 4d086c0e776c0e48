//! The same Job as Prefect's own Kubernetes worker: every case of
//! tests/fixtures/prefect-kubernetes/parity-golden.json was rendered by prefect-kubernetes
//! 0.8.0 (`render_jobs.py`, Prefect 3.9.1) and is built here through the operator's own
//! path (job-variable merge, environment layers, Job builder). The Jobs must be equal
//! except for the deliberate differences the README lists, which are checked one by one
//! and then taken out of the comparison.

use std::collections::BTreeMap;

use prefect_agent_operator::agent::env::run_environment;
use prefect_agent_operator::backend::http::Auth;
use prefect_agent_operator::backend::prefect3::{fixed_env, worker_env};
use prefect_agent_operator::backend::{FlowRun, RunAbout, RunContext, RunSpec};
use prefect_agent_operator::crd::{JobSpec, SecretKeyRef};
use prefect_agent_operator::deploy::kubernetes::job::{
    JobInputs, build_job, configuration_for, default_image,
};
use prefect_agent_operator::scope::Scope;
use prefect_agent_operator::secret::SecretString;
use prefect_agent_operator::work_pool::{JobConfiguration, run_values};
use serde_json::{Map, Value, json};

const GOLDEN: &str = include_str!("fixtures/prefect-kubernetes/parity-golden.json");

fn text(case: &Value, key: &str) -> String {
    case[key].as_str().unwrap_or_default().to_string()
}

fn object(case: &Value, key: &str) -> Map<String, Value> {
    case[key].as_object().cloned().unwrap_or_default()
}

/// The operator's Job for one case, as JSON.
fn ours(case: &Value) -> Value {
    let run = FlowRun {
        flow_id: Some(text(case, "flow_id")),
        deployment_id: Some(text(case, "deployment_id")),
        job_variables: object(case, "run_job_variables"),
        ..FlowRun::pending(&text(case, "flow_run_id"), &text(case, "flow_run_name"))
    };
    let about = RunAbout {
        flow_name: Some(text(case, "flow_name")),
        deployment_name: Some(text(case, "deployment_name")),
        deployment_updated: Some(text(case, "deployment_updated")),
        work_pool_name: text(case, "work_pool_name"),
        work_pool_id: Some(text(case, "work_pool_id")),
        worker_name: text(case, "worker_name"),
        prefect_version: Some(text(case, "prefect_version")),
    };
    let template = &case["base_job_template"];
    let values = run_values(
        &object(case, "deployment_job_variables"),
        &run.job_variables,
    );
    let configuration = JobConfiguration::new(Some(template), &values).unwrap();
    let configuration = configuration_for(&configuration, Some(template)).unwrap();
    let layers = RunContext {
        spec: RunSpec::WorkPool {
            configuration: configuration.clone().into_owned(),
            base_job_template: None,
            references: Default::default(),
            about: about.clone(),
        },
        default_env: Default::default(),
        worker_env: worker_env(
            "http://prefect.example:4200/api",
            &Auth::Bearer(SecretString::new("pnu_oracle")),
            &run,
            &about,
            Some(&text(case, "worker_id")),
        ),
        fixed_env: fixed_env(false),
    };
    let env = run_environment(&layers, &BTreeMap::new()).unwrap();
    let job = build_job(&JobInputs {
        run: &run,
        agent_namespace: "default",
        agent_name: "agent",
        configuration: &configuration,
        about: Some(&about),
        env: &env,
        defaults: &JobSpec::default(),
        secret: Some(&SecretKeyRef {
            name: "prefect-api".into(),
            key: "key".into(),
        }),
        references: &Default::default(),
        scope: &Scope::default(),
    })
    .unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
    serde_json::to_value(job).unwrap()
}

/// Empty objects and lists mean the same as absent ones to Kubernetes.
fn prune(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for child in map.values_mut() {
                prune(child);
            }
            map.retain(|_, c| {
                !(c.is_null()
                    || c.as_object().is_some_and(Map::is_empty)
                    || c.as_array().is_some_and(Vec::is_empty))
            });
        }
        Value::Array(items) => items.iter_mut().for_each(prune),
        _ => {}
    }
}

/// Checks each deliberate difference, then removes it from both Jobs.
fn without_deliberate_differences(
    case: &Value,
    mut ours: Value,
    mut theirs: Value,
) -> (Value, Value) {
    let name = &case["name"];
    // One Job per run by name instead of generateName.
    assert_eq!(
        ours["metadata"]["name"],
        format!("prefect-run-{}", text(case, "flow_run_id")),
        "{name}"
    );
    ours["metadata"]
        .as_object_mut()
        .unwrap()
        .shift_remove("name");
    theirs["metadata"]
        .as_object_mut()
        .unwrap()
        .shift_remove("generateName");
    for meta in ["/metadata", "/spec/template/metadata"] {
        let labels = ours.pointer_mut(&format!("{meta}/labels")).unwrap();
        let labels = labels.as_object_mut().unwrap();
        // Who manages the Job, and which resource's it is.
        assert_eq!(
            labels["app.kubernetes.io/managed-by"], "prefect-agent-operator",
            "{name}"
        );
        assert_eq!(labels["prefect.io/agent"], "default.agent", "{name}");
        labels.shift_remove("app.kubernetes.io/managed-by");
        labels.shift_remove("prefect.io/agent");
        let labels = theirs.pointer_mut(&format!("{meta}/labels")).unwrap();
        let labels = labels.as_object_mut().unwrap();
        assert_eq!(labels["app.kubernetes.io/managed-by"], "prefect", "{name}");
        labels.shift_remove("app.kubernetes.io/managed-by");
    }
    let ours_c = ours
        .pointer_mut("/spec/template/spec/containers/0")
        .unwrap();
    let theirs_c = theirs
        .pointer_mut("/spec/template/spec/containers/0")
        .unwrap();
    // The key only as a secretKeyRef.
    for e in ours_c["env"].as_array_mut().unwrap() {
        if e["name"] == "PREFECT_API_KEY" {
            assert_eq!(
                e["valueFrom"]["secretKeyRef"]["name"], "prefect-api",
                "{name}"
            );
            *e = json!({"name": "PREFECT_API_KEY", "value": "pnu_oracle"});
        }
    }
    // Without an image anywhere: both Prefect of the server's version; the worker's with
    // its own Python, ours with the one the README names.
    let image_set = case
        .pointer("/deployment_job_variables/image")
        .or(case.pointer("/run_job_variables/image"))
        .is_some();
    if !image_set {
        let version = text(case, "prefect_version");
        assert_eq!(ours_c["image"], default_image(Some(&version)), "{name}");
        let theirs_image = theirs_c["image"].as_str().unwrap();
        assert!(
            theirs_image.starts_with(&format!("prefecthq/prefect:{version}-python")),
            "{name}: {theirs_image}"
        );
        ours_c.as_object_mut().unwrap().shift_remove("image");
        theirs_c.as_object_mut().unwrap().shift_remove("image");
    }
    // Prefect's standard template puts these Job fields in the pod spec, where they mean
    // nothing and the API server drops them; a typed Job cannot hold them.
    let pod = theirs.pointer_mut("/spec/template/spec").unwrap();
    for field in ["completions", "parallelism"] {
        pod.as_object_mut().unwrap().shift_remove(field);
    }
    prune(&mut ours);
    prune(&mut theirs);
    (ours, theirs)
}

/// Where two JSON values differ, one line per path.
fn diff(path: &str, ours: &Value, theirs: &Value, out: &mut Vec<String>) {
    match (ours, theirs) {
        (Value::Object(a), Value::Object(b)) => {
            for key in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
                let (x, y) = (
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null),
                );
                diff(&format!("{path}/{key}"), x, y, out);
            }
        }
        _ if ours == theirs => {}
        _ => out.push(format!("{path}: ours {ours} theirs {theirs}")),
    }
}

#[test]
fn jobs_match_prefect_kubernetes_workers_case_by_case() {
    let cases: Vec<Value> = serde_json::from_str(GOLDEN).unwrap();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for case in &cases {
        let (ours, theirs) = without_deliberate_differences(case, ours(case), case["job"].clone());
        let mut differences = Vec::new();
        diff("", &ours, &theirs, &mut differences);
        if !differences.is_empty() {
            failures.push(format!("## {}\n{}", case["name"], differences.join("\n")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
