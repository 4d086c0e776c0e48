//! A flow run's environment and its precedence rules.
//!
//! In order, later layers overriding a variable in its place: (0) the backend's defaults
//! (Prefect 1: `PREFECT__LOGGING__LEVEL`), (1) Prefect 3's worker variables (API URL and
//! credential, the run's id and attribution variables, as Prefect's worker sets them),
//! (2) the agent's `env_vars`, except over the worker variables, (3) the run's own `env`
//! (its job configuration's or run_config's), where `null` removes a variable, (4) the
//! fixed variables (Prefect 1's run identity, `no_cloud_logs`). Kubernetes `valueFrom`
//! entries of a list-style `env` come last, as Prefect's Kubernetes worker appends them.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::backend::{Env, EnvValue, RunContext};
use crate::work_pool::template::as_text;

/// Why a run's `env` (job variable or run_config field) could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the run's `env` is invalid: {0}")]
pub struct EnvError(String);

/// Computes the run's environment from the layers.
pub fn run_environment(
    layers: &RunContext,
    agent_env: &BTreeMap<String, String>,
) -> Result<Env, EnvError> {
    let mut env = layers.default_env.clone();
    env.extend(layers.worker_env.iter().map(|(k, v)| (k, v.clone())));
    for (k, v) in agent_env {
        if !layers.worker_env.contains(k) {
            env.set_plain(k, v);
        }
    }
    let run_env = layers.spec.env();
    let run_env = run_env.as_ref();
    let fixed = &layers.fixed_env;
    let mut sources = Vec::new();
    match run_env {
        None | Some(Value::Null) => {}
        Some(Value::Object(vars)) => {
            for (k, v) in vars {
                set(&mut env, k, v)?;
            }
        }
        // Kubernetes style, from a pool whose `env` variable is untyped.
        Some(Value::Array(entries)) => {
            for entry in entries {
                let Some(name) = entry.get("name").and_then(Value::as_str) else {
                    return Err(EnvError(format!(
                        "every entry of a list needs a `name`, got {entry}"
                    )));
                };
                if let Some(source) = entry.get("valueFrom") {
                    sources.push((name.to_string(), EnvValue::From(source.clone())));
                } else if let Some(v) = entry.get("value") {
                    set(&mut env, name, v)?;
                }
            }
        }
        Some(other) => {
            return Err(EnvError(format!(
                "expected an object of NAME: value or a list of {{name, value}}, got {other}"
            )));
        }
    }
    env.extend(fixed.iter().map(|(k, v)| (k, v.clone())));
    for (name, source) in sources {
        env.push(name, source);
    }
    Ok(env)
}

/// One variable of the run's `env`: as Prefect's `str()` makes it, or removed by `null`.
fn set(env: &mut Env, name: &str, value: &Value) -> Result<(), EnvError> {
    match value {
        Value::Null => env.remove(name),
        // As Prefect's `str()`: `True`, not `true`.
        Value::String(_) | Value::Bool(_) | Value::Number(_) => env.set_plain(name, as_text(value)),
        other => {
            return Err(EnvError(format!(
                "`{name}` must be a string, number, boolean or null, got {other}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RunSpec;
    use crate::secret::SecretString;
    use serde_json::json;

    fn plain(s: &str) -> EnvValue {
        EnvValue::Plain(s.into())
    }

    /// Layers whose run asks for `env` (as a Prefect 1 run_config would).
    fn layers(default_env: Env, worker_env: Env, env: Value, fixed_env: Env) -> RunContext {
        RunContext {
            spec: RunSpec::Prefect1 {
                run_config: json!({ "env": env }),
                flow: Default::default(),
                labels: Vec::new(),
            },
            default_env,
            worker_env,
            fixed_env,
        }
    }

    fn env_of(items: &[(&str, EnvValue)]) -> Env {
        items.iter().cloned().collect()
    }

    #[test]
    fn later_layers_win_in_place() {
        let worker = env_of(&[
            ("PREFECT_API_URL", plain("http://prefect/api")),
            ("PREFECT_API_KEY", EnvValue::Secret(SecretString::new("k"))),
            ("PREFECT__FLOW_RUN_ID", plain("r-1")),
        ]);
        let defaults = env_of(&[("TEAM", plain("default"))]);
        let agent = BTreeMap::from([
            ("TEAM".to_string(), "data".to_string()),
            ("SHARED".to_string(), "agent".to_string()),
            ("DROP".to_string(), "me".to_string()),
            ("PREFECT_API_URL".to_string(), "http://wrong".to_string()),
        ]);
        let run = json!({"Z": "z", "SHARED": "run", "N": 3, "B": true, "DROP": null,
                         "PREFECT__FLOW_RUN_ID": "r-1"});
        let fixed = env_of(&[("PREFECT_LOGGING_TO_API_ENABLED", plain("false"))]);
        let env = run_environment(&layers(defaults, worker, run, fixed), &agent).unwrap();
        assert_eq!(
            env["TEAM"],
            plain("data"),
            "the agent's env_vars beat defaults"
        );
        assert_eq!(
            env["PREFECT_API_URL"],
            plain("http://prefect/api"),
            "...but not the worker's variables"
        );
        assert_eq!(env["SHARED"], plain("run"));
        assert_eq!(env["N"], plain("3"));
        assert_eq!(env["B"], plain("True"), "Python's str() of a boolean");
        assert!(!env.contains("DROP"));
        assert!(matches!(env["PREFECT_API_KEY"], EnvValue::Secret(_)));
        let names: Vec<&str> = env.names().collect();
        assert_eq!(
            names,
            [
                "TEAM",
                "PREFECT_API_URL",
                "PREFECT_API_KEY",
                "PREFECT__FLOW_RUN_ID",
                "SHARED",
                "Z",
                "N",
                "B",
                "PREFECT_LOGGING_TO_API_ENABLED"
            ],
            "each variable where it was first set, the user's in the order given"
        );
    }

    #[test]
    fn the_run_may_point_its_flow_elsewhere() {
        let worker = env_of(&[("PREFECT_API_URL", plain("http://prefect/api"))]);
        let run = json!({"PREFECT_API_URL": "http://in-cluster/api"});
        let env = run_environment(
            &layers(Env::default(), worker, run, Env::default()),
            &BTreeMap::new(),
        )
        .unwrap();
        assert_eq!(env["PREFECT_API_URL"], plain("http://in-cluster/api"));
    }

    #[test]
    fn a_kubernetes_style_list_keeps_its_sources_for_the_job() {
        let run = json!([
            {"name": "A", "value": "1"},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
            {"name": "B", "value": "2"}
        ]);
        let ctx = layers(Env::default(), Env::default(), run, Env::default());
        let env = run_environment(&ctx, &BTreeMap::new()).unwrap();
        let names: Vec<&str> = env.names().collect();
        assert_eq!(names, ["A", "B", "TOKEN"]);
        assert_eq!(
            env["TOKEN"],
            EnvValue::From(json!({"secretKeyRef": {"name": "s", "key": "k"}}))
        );
    }

    #[test]
    fn a_bad_env_variable_is_named() {
        let bad = |run: Value| {
            let ctx = layers(Env::default(), Env::default(), run, Env::default());
            run_environment(&ctx, &BTreeMap::new())
                .unwrap_err()
                .to_string()
        };
        assert!(bad(json!("A=1")).contains("expected an object"));
        assert!(bad(json!({"A": {"x": 1}})).contains("`A`"));
        assert!(bad(json!([{"value": "1"}])).contains("`name`"));
    }
}
