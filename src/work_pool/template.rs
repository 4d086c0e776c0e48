//! Prefect's job-template placeholders (`{{ name }}`), rendered exactly as Prefect's
//! `apply_values` does, so a pool that works with the official worker works here.
//!
//! - a string that is one `{{ name }}` and nothing else becomes the variable's value,
//!   whatever its type; when the variable is not set, the key or list item is removed;
//! - other strings get text substitution (unset → empty), values printed as Python
//!   would (`True`, `None`); `{{ $NAME }}` reads the environment;
//! - `{{ prefect.variables.* }}` / `{{ prefect.blocks.* }}` are left in place; Prefect
//!   resolves them after rendering, as [`super::references`] does here.

use serde_json::{Map, Value};

/// One `{{ ... }}` in a string.
#[derive(Debug, PartialEq)]
pub(crate) struct Placeholder<'a> {
    /// The whole `{{ name }}` text.
    pub full: &'a str,
    pub name: &'a str,
    pub start: usize,
}

/// Finds placeholders like Prefect's `({{\s*([\w\.\-\[\]$]+)\s*}})`.
pub(crate) fn placeholders(s: &str) -> Vec<Placeholder<'_>> {
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
    let (first, rest) = match path.split_once(['.', '[']) {
        Some((first, _)) => (first, &path[first.len()..]),
        None => (path, ""),
    };
    lookup_path(values.get(first)?, rest.trim_start_matches('.'))
}

/// Looks up `b[1].c` below `root` (an empty path is `root` itself).
pub(crate) fn lookup_path<'v>(root: &'v Value, path: &str) -> Option<&'v Value> {
    let normalized = path.replace('[', ".").replace(']', "");
    let mut current = root;
    for part in normalized.split('.').filter(|p| !p.is_empty()) {
        current = match current {
            Value::Object(map) => map.get(part)?,
            Value::Array(items) => items.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(current)
}

/// A value inside text, printed the way Python's `str()` prints it.
pub(crate) fn as_text(v: &Value) -> String {
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
    fn prefect_references_are_left_for_later() {
        let t = json!({"a": "{{ prefect.blocks.secret.db }}", "b": ["x{{ prefect.variables.v }}"], "c": "{{ c }}"});
        let values = json!({"c": 1});
        let out = apply_values(&t, values.as_object().unwrap(), &|_| None).unwrap();
        assert_eq!(out["a"], "{{ prefect.blocks.secret.db }}");
        assert_eq!(out["b"], json!(["x{{ prefect.variables.v }}"]));
        assert_eq!(out["c"], 1);
    }
}
