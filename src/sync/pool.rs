//! What a `PrefectWorkPool` asks of Prefect, decided without I/O: its base job template
//! (inline, from a ConfigMap, or Prefect's standard one, with new variable defaults), the
//! checks a template must pass before Prefect sees it, and the changes that bring the
//! pool and its queues in Prefect to what the resource declares.

use serde_json::{Map, Value, json};

use crate::backend::FlowRun;
use crate::crd::pool::{BaseJobTemplate, PrefectWorkPoolSpec, WorkQueueSpec};
use crate::crd::{JobSpec, SecurityProfile};
use crate::deploy::kubernetes::job::{JobInputs, build_job};
use crate::scope::Scope;
use crate::work_pool::template::placeholders;
use crate::work_pool::{JobConfiguration, References, standard_base_job_template};

/// Why a pool cannot be synced as declared; each names the field to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolSpecError {
    #[error("spec.baseJobTemplate: set either inline or configMapKeyRef, not both")]
    TwoTemplates,
    #[error("spec.baseJobTemplate.configMapKeyRef: {0}")]
    ConfigMap(String),
    #[error("spec.baseJobTemplate{path}: {problem}")]
    Template { path: String, problem: String },
    #[error(
        "spec.type: the pool `{pool}` is a `{actual}` pool in Prefect and Prefect cannot change a pool's type; delete it there or name another pool"
    )]
    TypeChange { pool: String, actual: String },
}

/// The pool's type: `kubernetes` unless the spec says.
pub fn pool_type(spec: &PrefectWorkPoolSpec) -> &str {
    spec.kind.as_deref().unwrap_or("kubernetes")
}

/// The base job template the spec declares, given the ConfigMap's text when it names
/// one: parsed, its variables' defaults replaced, and checked.
pub fn template(
    spec: &PrefectWorkPoolSpec,
    config_map_text: Option<&str>,
) -> Result<Value, PoolSpecError> {
    let declared = spec.base_job_template.clone().unwrap_or_default();
    let BaseJobTemplate {
        inline,
        config_map_key_ref,
        defaults,
    } = declared;
    let mut template = match (inline, config_map_key_ref) {
        (Some(_), Some(_)) => return Err(PoolSpecError::TwoTemplates),
        (Some(inline), None) => inline,
        (None, Some(r)) => {
            let text = config_map_text.ok_or_else(|| {
                PoolSpecError::ConfigMap(format!("ConfigMap {} has no key {}", r.name, r.key))
            })?;
            // JSON is YAML; YAML is what people keep in ConfigMaps.
            serde_yaml::from_str::<Value>(text).map_err(|e| {
                PoolSpecError::ConfigMap(format!(
                    "ConfigMap {} key {} is not a JSON or YAML template: {e}",
                    r.name, r.key
                ))
            })?
        }
        (None, None) if pool_type(spec) == "kubernetes" => standard_base_job_template().clone(),
        (None, None) => json!({}),
    };
    let template_is_empty = template.as_object().is_some_and(Map::is_empty);
    for (name, value) in defaults {
        let slot = template
            .pointer_mut(&format!("/variables/properties/{}", escape(&name)))
            .and_then(Value::as_object_mut)
            .ok_or_else(|| PoolSpecError::Template {
                path: format!(".defaults.{name}"),
                problem: if template_is_empty {
                    "the template is empty: there is no variable to give a default".into()
                } else {
                    format!("the template has no variable `{name}`")
                },
            })?;
        slot.insert("default".into(), value);
    }
    check(pool_type(spec), &template)?;
    Ok(template)
}

/// JSON pointer escaping of one segment.
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// What Prefect's own worker would fail on, found before Prefect sees the template: its
/// shape, a placeholder that names no variable, and (for a `kubernetes` pool) a Job
/// manifest that does not render to a Job with a sample run.
pub fn check(kind: &str, template: &Value) -> Result<(), PoolSpecError> {
    let bad = |path: &str, problem: String| PoolSpecError::Template {
        path: path.to_string(),
        problem,
    };
    let Some(object) = template.as_object() else {
        return Err(bad("", "must be an object".into()));
    };
    if object.is_empty() {
        return Ok(());
    }
    let Some(configuration) = object.get("job_configuration").and_then(Value::as_object) else {
        return Err(bad(
            "",
            "has no job_configuration object (a template is {job_configuration, variables})".into(),
        ));
    };
    let variables = object
        .get("variables")
        .and_then(|v| v.get("properties"))
        .and_then(Value::as_object)
        .ok_or_else(|| bad(".variables", "has no properties object".into()))?;
    let mut unknown = Vec::new();
    walk(
        &Value::Object(configuration.clone()),
        "job_configuration",
        &mut |path, text| {
            for p in placeholders(text) {
                let root = p.name.split(['.', '[']).next().unwrap_or_default();
                let known = variables.contains_key(root)
                    || p.name.starts_with("prefect.")
                    || p.name.starts_with('$');
                if !known {
                    unknown.push(format!("{path}: {} names no variable", p.full));
                }
            }
        },
    );
    if let Some(first) = unknown.first() {
        let mut names: Vec<&str> = variables.keys().map(String::as_str).collect();
        names.sort_unstable();
        return Err(bad(
            "",
            format!(
                "{first}{} (variables: {})",
                match unknown.len() {
                    1 => String::new(),
                    n => format!(", and {} more", n - 1),
                },
                names.join(", ")
            ),
        ));
    }
    if kind == "kubernetes" {
        render_sample(template).map_err(|e| bad("", e))?;
    }
    Ok(())
}

/// Calls `visit(path, text)` for every string in `v`, with its path in Prefect's
/// dotted form (`job_configuration.job_manifest.spec.containers[0].image`).
fn walk(v: &Value, path: &str, visit: &mut dyn FnMut(&str, &str)) {
    match v {
        Value::String(s) => visit(path, s),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                walk(item, &format!("{path}[{i}]"), visit);
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                walk(item, &format!("{path}.{k}"), visit);
            }
        }
        _ => {}
    }
}

/// Builds the Job a run with no job variables of its own would get, as the agents build
/// it: the template's defaults rendered with the same renderer.
fn render_sample(template: &Value) -> Result<(), String> {
    if template
        .pointer("/job_configuration/job_manifest")
        .is_none()
    {
        return Err(
            "job_configuration has no job_manifest: a kubernetes pool's runs need one".into(),
        );
    }
    let configuration =
        JobConfiguration::new(Some(template), &Map::new()).map_err(|e| e.to_string())?;
    let run = FlowRun::pending("00000000-0000-4000-8000-000000000000", "sample-run");
    let scope = Scope::default();
    build_job(&JobInputs {
        run: &run,
        agent_namespace: "default",
        agent_name: "sample",
        configuration: &configuration,
        about: None,
        env: &Default::default(),
        defaults: &JobSpec {
            security_profile: Some(SecurityProfile::Prefect),
            ..JobSpec::default()
        },
        secret: None,
        references: &References::default(),
        scope: &scope,
    })
    .map(|_| ())
    .map_err(|e| format!("renders no valid Job with its defaults: {e}"))
}

/// The pool as Prefect should have it (the fields the operator owns).
pub fn desired_pool(spec: &PrefectWorkPoolSpec, template: &Value) -> Value {
    json!({
        "description": spec.description,
        "is_paused": spec.paused,
        "concurrency_limit": spec.concurrency_limit,
        "base_job_template": template,
    })
}

/// The body that creates the pool.
pub fn create_pool_body(name: &str, spec: &PrefectWorkPoolSpec, template: &Value) -> Value {
    let mut body = desired_pool(spec, template);
    body["name"] = json!(name);
    body["type"] = json!(pool_type(spec));
    body
}

/// The fields of `desired` that `observed` (Prefect's answer) does not have as desired:
/// a PATCH body, or None when the two agree.
pub fn drift(desired: &Value, observed: &Value) -> Option<Value> {
    let mut patch = Map::new();
    for (k, want) in desired.as_object().into_iter().flatten() {
        if observed.get(k).unwrap_or(&Value::Null) != want {
            patch.insert(k.clone(), want.clone());
        }
    }
    (!patch.is_empty()).then_some(Value::Object(patch))
}

/// A queue as Prefect should have it. Priority unset leaves Prefect's; a queue without
/// a description has `""` in Prefect (it refuses null).
pub fn desired_queue(q: &WorkQueueSpec) -> Value {
    let mut v = json!({
        "description": q.description.as_deref().unwrap_or_default(),
        "is_paused": q.paused,
        "concurrency_limit": q.concurrency_limit,
    });
    if let Some(p) = q.priority {
        v["priority"] = json!(p);
    }
    v
}

/// A hash of the template as sent (FNV-1a of its JSON), for the status.
pub fn template_hash(template: &Value) -> String {
    format!("{:016x}", crate::text::fnv1a(template.to_string().bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::pool::ConfigMapKeyRef;

    fn spec(template: Option<BaseJobTemplate>) -> PrefectWorkPoolSpec {
        PrefectWorkPoolSpec {
            base_job_template: template,
            ..PrefectWorkPoolSpec::default()
        }
    }

    #[test]
    fn a_kubernetes_pool_gets_the_standard_template_with_new_defaults() {
        let t = template(
            &spec(Some(BaseJobTemplate {
                defaults: [("image".to_string(), json!("repo/flows:1"))].into(),
                ..BaseJobTemplate::default()
            })),
            None,
        )
        .unwrap();
        assert_eq!(
            t["variables"]["properties"]["image"]["default"],
            "repo/flows:1"
        );
        assert!(t["job_configuration"]["job_manifest"].is_object());
        let unknown = template(
            &spec(Some(BaseJobTemplate {
                defaults: [("imgae".to_string(), json!("x"))].into(),
                ..BaseJobTemplate::default()
            })),
            None,
        )
        .unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "spec.baseJobTemplate.defaults.imgae: the template has no variable `imgae`"
        );
    }

    #[test]
    fn a_template_prefect_s_worker_would_fail_on_is_named_by_path() {
        let mut t = standard_base_job_template().clone();
        t["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["image"] =
            json!("{{ imgae }}");
        let e = check("kubernetes", &t).unwrap_err().to_string();
        assert!(
            e.starts_with(
                "spec.baseJobTemplate: job_configuration.job_manifest.spec.template.spec.containers[0].image: {{ imgae }} names no variable (variables: "
            ),
            "{e}"
        );
        let mut t = standard_base_job_template().clone();
        t["job_configuration"]["job_manifest"]["spec"]["backoffLimit"] = json!("many");
        let e = check("kubernetes", &t).unwrap_err().to_string();
        assert!(e.contains("renders no valid Job"), "{e}");
        assert!(check("kubernetes", &json!({"variables": {}})).is_err());
        assert!(check("kubernetes", &json!([])).is_err());
        // Prefect's references and environment placeholders are no variables.
        let mut t = standard_base_job_template().clone();
        t["job_configuration"]["labels"] =
            json!({"a": "{{ prefect.variables.team }}", "b": "{{ $HOME }}"});
        check("kubernetes", &t).unwrap();
        // A process pool's template has no manifest, and needs none.
        let process = json!({"job_configuration": {"command": "{{ command }}"},
                             "variables": {"properties": {"command": {"type": "string"}}}});
        check("process", &process).unwrap();
        assert!(check("kubernetes", &process).is_err());
    }

    #[test]
    fn a_config_map_template_may_be_yaml() {
        let s = spec(Some(BaseJobTemplate {
            config_map_key_ref: Some(ConfigMapKeyRef {
                name: "t".into(),
                key: "k".into(),
            }),
            ..BaseJobTemplate::default()
        }));
        let yaml = serde_yaml::to_string(standard_base_job_template()).unwrap();
        assert_eq!(
            &template(&s, Some(&yaml)).unwrap(),
            standard_base_job_template()
        );
        let e = template(&s, None).unwrap_err().to_string();
        assert_eq!(
            e,
            "spec.baseJobTemplate.configMapKeyRef: ConfigMap t has no key k"
        );
        assert!(template(&s, Some("{: not yaml")).is_err());
    }

    #[test]
    fn drift_is_the_fields_that_differ() {
        let want = json!({"description": "d", "is_paused": false, "concurrency_limit": null});
        let same = json!({"description": "d", "is_paused": false, "concurrency_limit": null,
                          "id": "x"});
        assert_eq!(drift(&want, &same), None);
        let changed = json!({"description": "edited in the UI", "is_paused": true});
        assert_eq!(
            drift(&want, &changed),
            Some(json!({"description": "d", "is_paused": false}))
        );
    }
}
