//! A flow run's environment and its precedence rules.
//!
//! Later layers win: (0) the backend's defaults (Prefect 1: `PREFECT__LOGGING__LEVEL`),
//! (1) the agent's `env_vars`, (2) the run's own `env` job variable
//! (pool defaults < deployment < run, merged variable by variable by the backend), (3) the fixed variables
//! the run needs to reach Prefect (API URL, credentials, flow-run id, log shipping off
//! under `no_cloud_logs`). In job variables a `null` value removes a variable.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::backend::EnvValue;

/// Why a run's `env` (job variable or run_config field) could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the run's `env` is invalid: {0}")]
pub struct EnvError(String);

/// Computes the run's environment from the three layers.
pub fn run_environment(
    defaults: &BTreeMap<String, String>,
    agent_env: &BTreeMap<String, String>,
    run_env: Option<&Value>,
    fixed: &BTreeMap<String, EnvValue>,
) -> Result<BTreeMap<String, EnvValue>, EnvError> {
    let mut env: BTreeMap<String, EnvValue> = defaults
        .iter()
        .chain(agent_env)
        .map(|(k, v)| (k.clone(), EnvValue::Plain(v.clone())))
        .collect();
    match run_env {
        None | Some(Value::Null) => {}
        Some(Value::Object(vars)) => {
            for (k, v) in vars {
                match v {
                    Value::Null => {
                        env.remove(k);
                    }
                    Value::String(s) => {
                        env.insert(k.clone(), EnvValue::Plain(s.clone()));
                    }
                    // As Prefect's `str()`: `True`, not `true`.
                    Value::Bool(b) => {
                        let text = if *b { "True" } else { "False" };
                        env.insert(k.clone(), EnvValue::Plain(text.into()));
                    }
                    Value::Number(_) => {
                        env.insert(k.clone(), EnvValue::Plain(v.to_string()));
                    }
                    other => {
                        return Err(EnvError(format!(
                            "`{k}` must be a string, number, boolean or null, got {other}"
                        )));
                    }
                }
            }
        }
        Some(other) => {
            return Err(EnvError(format!(
                "expected an object of NAME: value, got {other}"
            )));
        }
    }
    env.extend(fixed.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::SecretString;
    use serde_json::json;

    fn plain(s: &str) -> EnvValue {
        EnvValue::Plain(s.into())
    }

    #[test]
    fn later_layers_win() {
        let agent = BTreeMap::from([
            ("TEAM".to_string(), "data".to_string()),
            ("SHARED".to_string(), "agent".to_string()),
            ("PREFECT_API_URL".to_string(), "http://wrong".to_string()),
            ("DROP".to_string(), "me".to_string()),
        ]);
        let vars = json!({"env": {"SHARED": "run", "N": 3, "B": true, "DROP": null}});
        let fixed = BTreeMap::from([
            ("PREFECT_API_URL".to_string(), plain("http://right/api")),
            (
                "PREFECT_API_KEY".to_string(),
                EnvValue::Secret(SecretString::new("k")),
            ),
        ]);
        let defaults = BTreeMap::from([
            ("PREFECT__LOGGING__LEVEL".to_string(), "INFO".to_string()),
            ("TEAM".to_string(), "default".to_string()),
        ]);
        let env = run_environment(&defaults, &agent, vars.get("env"), &fixed).unwrap();
        assert_eq!(env["PREFECT__LOGGING__LEVEL"], plain("INFO"));
        assert_eq!(
            env["TEAM"],
            plain("data"),
            "the agent's env_vars beat defaults"
        );
        assert_eq!(env["SHARED"], plain("run"));
        assert_eq!(env["N"], plain("3"));
        assert_eq!(env["B"], plain("True"), "Python's str() of a boolean");
        assert!(!env.contains_key("DROP"));
        assert_eq!(env["PREFECT_API_URL"], plain("http://right/api"));
        assert!(matches!(env["PREFECT_API_KEY"], EnvValue::Secret(_)));
    }

    #[test]
    fn a_bad_env_variable_is_named() {
        let fixed = BTreeMap::new();
        let err = run_environment(
            &BTreeMap::new(),
            &BTreeMap::new(),
            Some(&json!(["A=1"])),
            &fixed,
        )
        .unwrap_err();
        assert!(err.to_string().contains("expected an object"), "{err}");
        let err = run_environment(
            &BTreeMap::new(),
            &BTreeMap::new(),
            Some(&json!({"A": {"x": 1}})),
            &fixed,
        )
        .unwrap_err();
        assert!(err.to_string().contains("`A`"), "{err}");
    }
}
