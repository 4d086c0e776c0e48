//! Job variables as Prefect's workers see them: a base job template's defaults, and the
//! merge of pool defaults, deployment and run.

use serde_json::{Map, Value};

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

/// Job variables as Prefect's workers merge them: pool defaults < deployment < run, each
/// key replaced whole except `env`, whose variables merge one by one; dotted keys
/// (`"env.FOO": "1"`) set one nested value.
pub fn merge_job_variables(
    pool_defaults: &Map<String, Value>,
    deployment: &Map<String, Value>,
    run: &Map<String, Value>,
) -> Map<String, Value> {
    let mut out = pool_defaults.clone();
    for layer in [deployment, run] {
        for (k, v) in expand_dotted(layer) {
            match (out.get_mut(&k), v) {
                (Some(Value::Object(env)), Value::Object(more)) if k == "env" => env.extend(more),
                (_, v) => {
                    out.insert(k, v);
                }
            }
        }
    }
    out
}

/// Sets `value` at a dotted path, making objects on the way (and replacing non-objects).
fn set_in(map: &mut Map<String, Value>, path: &[&str], value: Value) {
    match path {
        [] => {}
        [leaf] => {
            map.insert(leaf.to_string(), value);
        }
        [head, rest @ ..] => {
            let next = map
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if !next.is_object() {
                *next = Value::Object(Map::new());
            }
            if let Value::Object(inner) = next {
                set_in(inner, rest, value);
            }
        }
    }
}

/// Turns `{"env.FOO": "1", "image": "x"}` into `{"env": {"FOO": "1"}, "image": "x"}`;
/// a plain key is merged over what dotted keys built, as in Prefect.
fn expand_dotted(values: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (key, value) in values.iter().filter(|(k, _)| k.contains('.')) {
        let parts: Vec<&str> = key.split('.').collect();
        set_in(&mut out, &parts, value.clone());
    }
    for (key, value) in values.iter().filter(|(k, _)| !k.contains('.')) {
        match (out.get_mut(key), value) {
            (Some(Value::Object(nested)), Value::Object(plain)) => nested.extend(plain.clone()),
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn job_variables_merge_in_order() {
        let template = json!({"job_configuration": {}, "variables": {"properties": {
            "command": {"type": "string", "default": "prefect flow-run execute"},
            "env": {"type": "object", "default": {"POOL": "1"}},
            "working_dir": {"type": "string"},
            "image": {"default": null}
        }}});
        let pool = template_defaults(&template);
        assert_eq!(pool.len(), 2);
        let deployment = json!({"env": {"DEP": "1", "SHARED": "dep"}, "working_dir": "/srv"});
        let run =
            json!({"env": {"RUN": "1", "SHARED": "run"}, "env.DOTTED": "yes", "command": "x"});
        let merged = merge_job_variables(
            &pool,
            deployment.as_object().unwrap(),
            run.as_object().unwrap(),
        );
        assert_eq!(merged["command"], "x");
        assert_eq!(merged["working_dir"], "/srv");
        assert_eq!(
            merged["env"],
            json!({"POOL": "1", "DEP": "1", "RUN": "1", "SHARED": "run", "DOTTED": "yes"})
        );
        // Without overrides the pool defaults stay.
        let merged = merge_job_variables(&pool, &Map::new(), &Map::new());
        assert_eq!(merged["command"], "prefect flow-run execute");
    }

    #[test]
    fn dotted_keys_expand_under_plain_ones() {
        let v = json!({"a.b.c": 1, "a.d": 2, "a": {"d": 3}, "x.y": 4});
        let out = expand_dotted(v.as_object().unwrap());
        assert_eq!(out["a"], json!({"b": {"c": 1}, "d": 3}));
        assert_eq!(out["x"], json!({"y": 4}));
    }
}
