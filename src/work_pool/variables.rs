//! Job variables as Prefect's workers see them: a base job template's defaults, the
//! deployment's and the run's values over them, and the job configuration they render.
//!
//! Follows prefect 3.9.1's `BaseJobConfiguration.resolve_for_flow_run` and
//! `from_template_and_values` step by step, including where their precedence surprises
//! (a run's `"env.A"` loses to a deployment's `env: {A: ..}`; a `job_configuration`
//! without `env` drops the deployment's unless the pool has an `env` default).

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::template::apply_values;

/// Why job variables could not be used: worded for the run's CRASHED message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VariableError {
    #[error("job variable `{key}`: `{at}` is not an object, so it cannot hold `{key}`")]
    NotAnObject { key: String, at: String },
}

/// Job-variable defaults of a base job template (`variables.properties.*.default`, not null).
pub fn template_defaults(base_job_template: &Value) -> Map<String, Value> {
    base_job_template
        .pointer("/variables/properties")
        .and_then(Value::as_object)
        .map(|props| {
            props
                .iter()
                .filter_map(|(k, v)| v.get("default").map(|d| (k.clone(), d.clone())))
                // Prefect treats `default: null` as no default.
                .filter(|(_, d)| !d.is_null())
                .collect()
        })
        .unwrap_or_default()
}

/// The values a run brings (`resolve_for_flow_run`): the deployment's job variables with
/// the run's over them; when both `env`s are objects they merge variable by variable.
pub fn run_values(deployment: &Map<String, Value>, run: &Map<String, Value>) -> Map<String, Value> {
    let mut out = deployment.clone();
    let mut run = run.clone();
    if let (Some(Value::Object(env)), Some(Value::Object(more))) =
        (out.get_mut("env"), run.get("env"))
    {
        env.extend(more.clone());
        run.shift_remove("env");
    }
    out.extend(run);
    out
}

/// A pool's job configuration for one run, before rendering: the template's
/// `job_configuration` and the variables it is rendered with.
#[derive(Clone, Debug, PartialEq)]
pub struct JobConfiguration {
    /// `job_configuration`, its `env` already merged as Prefect merges it.
    pub template: Map<String, Value>,
    /// Pool defaults with the run's values over them.
    pub variables: Map<String, Value>,
    /// The variables the deployment or the run set (the rest are pool defaults).
    pub explicit: BTreeSet<String>,
}

impl JobConfiguration {
    /// `from_template_and_values`. Without a template (a pool that has none) the values
    /// are the variables and the configuration passes `env` through.
    pub fn new(
        base_job_template: Option<&Value>,
        values: &Map<String, Value>,
    ) -> Result<Self, VariableError> {
        let (mut template, mut variables) = match base_job_template {
            Some(t) if t.get("job_configuration").is_some() => (
                t["job_configuration"]
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                template_defaults(t),
            ),
            _ => (
                Map::from_iter([("env".to_string(), Value::String("{{ env }}".into()))]),
                Map::new(),
            ),
        };
        // The pool's `env` default goes into the configuration before the run's values
        // replace the variable.
        if let Some(default_env) = variables.get("env").filter(|e| truthy(e)) {
            let merged = match (template.get("env"), default_env) {
                (Some(Value::Object(base)), Value::Object(more)) => {
                    let mut base = base.clone();
                    base.extend(more.clone());
                    Value::Object(base)
                }
                _ => default_env.clone(),
            };
            template.insert("env".into(), merged);
        }
        let values = expand_dotted(values)?;
        let explicit = values.keys().cloned().collect();
        variables.extend(values);
        if let (Some(Value::Object(base)), Some(Value::Object(more))) =
            (template.get_mut("env"), variables.get("env"))
            && !more.is_empty()
        {
            base.extend(more.clone());
        }
        Ok(Self {
            template,
            variables,
            explicit,
        })
    }

    /// The configuration rendered: `env`, `labels`, `command`, `job_manifest`, ... as the
    /// template says. `env` looks up `$VAR` placeholders in the operator's environment.
    pub fn render(&self, env: &dyn Fn(&str) -> Option<String>) -> Map<String, Value> {
        match apply_values(&Value::Object(self.template.clone()), &self.variables, env) {
            Some(Value::Object(rendered)) => rendered,
            _ => Map::new(),
        }
    }

    /// The configuration's `env` (an object or, from a pool whose `env` is untyped, a
    /// Kubernetes-style list), or none.
    pub fn env(&self) -> Option<Value> {
        let template = self.template.get("env")?;
        apply_values(template, &self.variables, &|_| None).filter(|v| !v.is_null())
    }
}

/// Python's truthiness for a JSON value.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// Sets `value` at a dotted path (`a.b[0]` is `a.b.0`), making objects on the way; a
/// non-object on the way is an error, as in Prefect's `set_in_dict`.
fn set_in(
    map: &mut Map<String, Value>,
    key: &str,
    path: &[&str],
    value: Value,
) -> Result<(), VariableError> {
    match path {
        [] => Ok(()),
        [leaf] => {
            map.insert(leaf.to_string(), value);
            Ok(())
        }
        [head, rest @ ..] => {
            let next = map
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            match next {
                Value::Object(inner) => set_in(inner, key, rest, value),
                _ => Err(VariableError::NotAnObject {
                    key: key.to_string(),
                    at: head.to_string(),
                }),
            }
        }
    }
}

/// Turns `{"env.FOO": "1", "image": "x"}` into `{"env": {"FOO": "1"}, "image": "x"}`;
/// a plain key is deep-merged over what dotted keys built, so it wins.
fn expand_dotted(values: &Map<String, Value>) -> Result<Map<String, Value>, VariableError> {
    let mut out = Map::new();
    for (key, value) in values.iter().filter(|(k, _)| k.contains('.')) {
        let path = key.replace('[', ".").replace(']', "");
        let parts: Vec<&str> = path.split('.').collect();
        set_in(&mut out, key, &parts, value.clone())?;
    }
    for (key, value) in values.iter().filter(|(k, _)| !k.contains('.')) {
        match out.get_mut(key) {
            Some(nested @ Value::Object(_)) if value.is_object() => deep_merge(nested, value),
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    Ok(out)
}

/// Prefect's `deep_merge`: objects merge recursively, anything else is replaced.
fn deep_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(existing) if existing.is_object() && v.is_object() => {
                        deep_merge(existing, v)
                    }
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn standard() -> Value {
        crate::work_pool::standard_base_job_template().clone()
    }

    #[test]
    fn pool_defaults_then_deployment_then_run() {
        let mut template = standard();
        template["variables"]["properties"]["env"]["default"] = json!({"POOL": "1", "A": "pool"});
        let values = run_values(
            &obj(json!({"env": {"A": "dep", "D": "1"}, "image": "dep:1"})),
            &obj(json!({"env": {"R": "1"}, "cpu_request": "1"})),
        );
        let config = JobConfiguration::new(Some(&template), &values).unwrap();
        assert_eq!(config.variables["image"], "dep:1");
        assert_eq!(config.variables["image_pull_policy"], "IfNotPresent");
        assert_eq!(
            config.env(),
            Some(json!({"POOL": "1", "A": "dep", "D": "1", "R": "1"}))
        );
        assert_eq!(
            config.explicit,
            BTreeSet::from(["env".into(), "image".into(), "cpu_request".into()])
        );
    }

    #[test]
    fn a_run_s_dotted_key_loses_to_the_deployment_s_env() {
        let values = run_values(
            &obj(json!({"env": {"A": "dep-a"}})),
            &obj(json!({"env.A": "run-a", "env.R": "run-r"})),
        );
        let config = JobConfiguration::new(Some(&standard()), &values).unwrap();
        assert_eq!(config.env(), Some(json!({"A": "dep-a", "R": "run-r"})));
    }

    #[test]
    fn without_env_in_the_configuration_the_deployment_s_is_dropped() {
        let mut template = standard();
        template["job_configuration"]
            .as_object_mut()
            .unwrap()
            .shift_remove("env");
        let values = obj(json!({"env": {"DEP": "1"}}));
        let config = JobConfiguration::new(Some(&template), &values).unwrap();
        assert_eq!(config.env(), None);
        // ...unless the pool has an env default, which brings `env` back.
        template["variables"]["properties"]["env"]["default"] = json!({"POOL": "p"});
        let config = JobConfiguration::new(Some(&template), &values).unwrap();
        assert_eq!(config.env(), Some(json!({"POOL": "p", "DEP": "1"})));
    }

    #[test]
    fn env_keeps_the_order_given() {
        let values = obj(json!({"env": {"Z": "1", "A": "2", "M": "3"}}));
        let config = JobConfiguration::new(Some(&standard()), &values).unwrap();
        let env = config.env().unwrap();
        let names: Vec<&String> = env.as_object().unwrap().keys().collect();
        assert_eq!(names, ["Z", "A", "M"]);
    }

    #[test]
    fn dotted_keys_expand_under_plain_ones() {
        let v = json!({"a.b.c": 1, "a.d": 2, "a": {"d": 3}, "x.y": 4, "l.m[0]": 5});
        let out = expand_dotted(v.as_object().unwrap()).unwrap();
        assert_eq!(out["a"], json!({"b": {"c": 1}, "d": 3}));
        assert_eq!(out["x"], json!({"y": 4}));
        assert_eq!(out["l"], json!({"m": {"0": 5}}));
        let err = expand_dotted(&obj(json!({"a": 1, "a.b": 2, "a.b.c": 3}))).unwrap_err();
        assert!(err.to_string().contains("`a.b.c`"), "{err}");
    }

    #[test]
    fn a_pool_without_a_template_passes_the_values_through() {
        let values = obj(json!({"env": {"A": "1"}, "command": "x"}));
        let config = JobConfiguration::new(None, &values).unwrap();
        assert_eq!(config.variables, values);
        assert_eq!(config.env(), Some(json!({"A": "1"})));
    }
}
