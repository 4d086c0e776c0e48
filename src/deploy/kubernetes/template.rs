//! Prefect's job-template placeholders (`{{ name }}`), rendered exactly as Prefect's
//! `apply_values` does, so a pool that works with the official worker works here.
//!
//! - a string that is one `{{ name }}` and nothing else becomes the variable's value,
//!   whatever its type; when the variable is not set, the key or list item is removed;
//! - other strings get text substitution (unset → empty), values printed as Python
//!   would (`True`, `None`); `{{ $NAME }}` reads the environment;
//! - `{{ prefect.variables.* }}` / `{{ prefect.blocks.* }}` are left in place;
//!   [`resolve_variables`] then fills variables from values fetched from Prefect, as
//!   Prefect does after rendering, and [`prefect_references`] lists what is left.

use serde_json::{Map, Value};

/// One `{{ ... }}` in a string.
#[derive(Debug, PartialEq)]
struct Placeholder<'a> {
    /// The whole `{{ name }}` text.
    full: &'a str,
    name: &'a str,
    start: usize,
}

/// Finds placeholders like Prefect's `({{\s*([\w\.\-\[\]$]+)\s*}})`.
fn placeholders(s: &str) -> Vec<Placeholder<'_>> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(open) = s[from..].find("{{").map(|i| i + from) {
        let inner_start = open + 2;
        let Some(close) = s[inner_start..].find("}}").map(|i| i + inner_start) else {
            break;
        };
        let inner = &s[inner_start..close];
        let name = inner.trim_matches(|c: char| c.is_whitespace());
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_alphanumeric() || "_.-[]$".contains(c));
        if valid {
            out.push(Placeholder {
                full: &s[open..close + 2],
                name,
                start: open,
            });
            from = close + 2;
        } else {
            // Not a placeholder; a later `{{` may still start one.
            from = open + 1;
        }
    }
    out
}

fn is_prefect_reference(name: &str) -> bool {
    name.starts_with("prefect.blocks.") || name.starts_with("prefect.variables.")
}

/// Looks up `a.b[1].c` in nested objects and arrays.
fn lookup<'v>(values: &'v Map<String, Value>, path: &str) -> Option<&'v Value> {
    let normalized = path.replace('[', ".").replace(']', "");
    let mut parts = normalized.split('.');
    let mut current = values.get(parts.next()?)?;
    for part in parts {
        current = match current {
            Value::Object(map) => map.get(part)?,
            Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// A value inside text, printed the way Python's `str()` prints it.
fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Null => "None".into(),
        other => other.to_string(),
    }
}

/// Renders `template` with `values`; `None` means "not set" (the caller drops it).
pub fn apply_values(
    template: &Value,
    values: &Map<String, Value>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Value> {
    match template {
        Value::String(s) => render_string(s, values, env),
        Value::Object(map) => Some(Value::Object(
            map.iter()
                .filter_map(|(k, v)| apply_values(v, values, env).map(|v| (k.clone(), v)))
                .collect(),
        )),
        Value::Array(items) => Some(Value::Array(
            items
                .iter()
                .filter_map(|v| apply_values(v, values, env))
                .collect(),
        )),
        other => Some(other.clone()),
    }
}

fn render_string(
    s: &str,
    values: &Map<String, Value>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<Value> {
    let found = placeholders(s);
    if let [only] = found.as_slice() {
        let standard = !only.name.starts_with('$') && !is_prefect_reference(only.name);
        if only.full == s && standard {
            return lookup(values, only.name).cloned();
        }
    }
    if found.is_empty() {
        return Some(Value::String(s.to_string()));
    }
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for p in &found {
        out.push_str(&s[last..p.start]);
        let replacement = if let Some(var) = p.name.strip_prefix('$') {
            env(var.trim_start_matches('$')).unwrap_or_default()
        } else if is_prefect_reference(p.name) {
            p.full.to_string()
        } else {
            lookup(values, p.name).map(as_text).unwrap_or_default()
        };
        out.push_str(&replacement);
        last = p.start + p.full.len();
    }
    out.push_str(&s[last..]);
    Some(Value::String(out))
}

const VARIABLE_PREFIX: &str = "prefect.variables.";

/// Names of the Prefect variables a value refers to (`{{ prefect.variables.NAME }}`).
pub fn variable_names(v: &Value) -> Vec<String> {
    prefect_references(v)
        .into_iter()
        .filter_map(|r| r.strip_prefix(VARIABLE_PREFIX).map(str::to_string))
        .collect()
}

/// Fills `{{ prefect.variables.NAME }}` like Prefect's `resolve_variables`: a string that
/// is only the placeholder becomes the variable's value (any type), inside text its text;
/// a variable that does not exist becomes an empty string.
pub fn resolve_variables(v: &Value, variables: &Map<String, Value>) -> Value {
    match v {
        Value::String(s) => {
            let found: Vec<_> = placeholders(s)
                .into_iter()
                .filter(|p| p.name.starts_with(VARIABLE_PREFIX))
                .collect();
            let lookup = |name: &str| variables.get(&name[VARIABLE_PREFIX.len()..]);
            match found.as_slice() {
                [] => v.clone(),
                [only] if only.full == s && placeholders(s).len() == 1 => lookup(only.name)
                    .cloned()
                    .unwrap_or_else(|| Value::String(String::new())),
                _ => {
                    let mut out = s.clone();
                    for p in &found {
                        out = out.replace(p.full, &lookup(p.name).map(as_text).unwrap_or_default());
                    }
                    Value::String(out)
                }
            }
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), resolve_variables(v, variables)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| resolve_variables(v, variables))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// `prefect.blocks.*` and `prefect.variables.*` references left in a rendered value.
pub fn prefect_references(rendered: &Value) -> Vec<String> {
    let mut out = Vec::new();
    collect_references(rendered, &mut out);
    out.sort();
    out.dedup();
    out
}

fn collect_references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.extend(
            placeholders(s)
                .into_iter()
                .filter(|p| is_prefect_reference(p.name))
                .map(|p| p.name.to_string()),
        ),
        Value::Object(map) => map.values().for_each(|v| collect_references(v, out)),
        Value::Array(items) => items.iter().for_each(|v| collect_references(v, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Cases rendered by Prefect 3.9.1's own `apply_values` (tests/fixtures/prefect-kubernetes).
    #[test]
    fn renders_like_prefect_does() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/prefect-kubernetes/apply-values-golden.json"
        );
        let cases: Vec<Value> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(cases.len() >= 2);
        for case in cases {
            let env = case["env"].as_object().unwrap().clone();
            let lookup_env = |k: &str| env.get(k).and_then(Value::as_str).map(str::to_string);
            let rendered = apply_values(
                &case["template"],
                case["values"].as_object().unwrap(),
                &lookup_env,
            );
            assert_eq!(
                rendered.as_ref(),
                Some(&case["rendered"]),
                "case {}",
                case["name"]
            );
        }
    }

    #[test]
    fn finds_placeholders_as_prefect_s_pattern_does() {
        fn names(s: &str) -> Vec<&str> {
            placeholders(s).into_iter().map(|p| p.name).collect()
        }
        assert_eq!(names("{{ a }} {{b}} {{  c.d[0]  }}"), ["a", "b", "c.d[0]"]);
        assert_eq!(names("{{ not valid }} {{ ok-1 }}"), ["ok-1"]);
        assert_eq!(names("{{{ x }}}"), ["x"]);
        assert!(names("{{ }} {{").is_empty());
    }

    #[test]
    fn variables_resolve_like_prefect_s_resolve_variables() {
        let vars = json!({"img": "repo/etl:3", "n": 2, "flag": true, "obj": {"a": 1}});
        let t = json!({
            "image": "{{ prefect.variables.img }}",
            "replicas": "{{ prefect.variables.n }}",
            "obj": "{{ prefect.variables.obj }}",
            "text": "v{{ prefect.variables.n }}-{{ prefect.variables.flag }}",
            "missing": "{{ prefect.variables.nope }}",
            "missing_in_text": "a{{ prefect.variables.nope }}b",
            "list": ["{{ prefect.variables.img }}", "plain"],
            "block": "{{ prefect.blocks.secret.x }}"
        });
        let out = resolve_variables(&t, vars.as_object().unwrap());
        assert_eq!(out["image"], "repo/etl:3");
        assert_eq!(out["replicas"], 2);
        assert_eq!(out["obj"], json!({"a": 1}));
        assert_eq!(out["text"], "v2-True");
        assert_eq!(out["missing"], "");
        assert_eq!(out["missing_in_text"], "ab");
        assert_eq!(out["list"], json!(["repo/etl:3", "plain"]));
        assert_eq!(
            out["block"], "{{ prefect.blocks.secret.x }}",
            "blocks are not variables"
        );
        assert_eq!(variable_names(&t), ["flag", "img", "n", "nope", "obj"]);
    }

    #[test]
    fn prefect_references_are_left_and_listed() {
        let t = json!({"a": "{{ prefect.blocks.secret.db }}", "b": ["x{{ prefect.variables.v }}"], "c": "{{ c }}"});
        let values = json!({"c": 1});
        let out = apply_values(&t, values.as_object().unwrap(), &|_| None).unwrap();
        assert_eq!(out["a"], "{{ prefect.blocks.secret.db }}");
        assert_eq!(out["c"], 1);
        assert_eq!(
            prefect_references(&out),
            ["prefect.blocks.secret.db", "prefect.variables.v"]
        );
    }
}
