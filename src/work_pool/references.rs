//! Prefect objects a job template or job variables refer to, resolved the way Prefect's
//! worker does after rendering (`resolve_block_document_references`, then
//! `resolve_variables`):
//!
//! - `{{ prefect.blocks.<type slug>.<name>[.<key path>] }}` becomes the block document's
//!   data (a block holding only `value`, like `secret` or `string`, gives that value),
//!   or the value at the key path; a missing block or key path is an error that names it;
//! - `{"$ref": {"block_document_id": "<id>"}}` becomes that block document's data;
//! - `{{ prefect.variables.<name> }}` becomes the variable's value; a missing variable
//!   becomes an empty string.
//!
//! A string that is only the placeholder takes the value whatever its type; inside text
//! the value is printed (a block resolving to an object or list cannot be).
//!
//! The backend finds what a run refers to ([`references_in`]), fetches it, and the
//! pure [`References::resolve`] does the rest, so both run here and in unit tests.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::template::{as_text, lookup_path, placeholders};

const BLOCK_PREFIX: &str = "prefect.blocks.";
const VARIABLE_PREFIX: &str = "prefect.variables.";

/// One Prefect object referred to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reference {
    /// A block document by its type's slug and its name.
    Block { slug: String, name: String },
    /// A block document by id (`$ref`).
    BlockId(String),
    /// A Prefect variable by name.
    Variable(String),
}

/// Why a reference could not be resolved; worded for the run's CRASHED message.
/// Never holds a resolved value (blocks may be secrets).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error(
        "`{{{{ {0} }}}}` is not a block reference; the form is prefect.blocks.<block-type-slug>.<block-document-name>"
    )]
    Malformed(String),
    #[error(
        "block `{name}` of type `{slug}` does not exist; it is referenced by the deployment or work pool configuration"
    )]
    MissingBlock { slug: String, name: String },
    #[error(
        "block document {0} does not exist; it is referenced by the deployment or work pool configuration"
    )]
    MissingBlockId(String),
    #[error("block `{name}` of type `{slug}` has nothing at `{path}`")]
    MissingKey {
        slug: String,
        name: String,
        path: String,
    },
    #[error(
        "`{0}` resolves to an object or list, which cannot be put inside text; refer to one of its fields instead"
    )]
    NotScalar(String),
}

/// The fetched objects a run refers to; an absent entry means "does not exist".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct References {
    /// Block document data by reference (`Block` or `BlockId`).
    pub blocks: BTreeMap<Reference, Value>,
    /// Variable values by name.
    pub variables: Map<String, Value>,
}

/// A parsed `prefect.blocks.<slug>.<name>[.<path>]`.
struct BlockPlaceholder<'a> {
    slug: &'a str,
    name: &'a str,
    path: Option<&'a str>,
}

impl BlockPlaceholder<'_> {
    fn reference(&self) -> Reference {
        Reference::Block {
            slug: self.slug.into(),
            name: self.name.into(),
        }
    }
}

/// `None` when `name` is no block placeholder at all.
fn parse_block(name: &str) -> Option<Result<BlockPlaceholder<'_>, ReferenceError>> {
    let rest = name.strip_prefix(BLOCK_PREFIX)?;
    let mut parts = rest.splitn(3, '.');
    Some(match (parts.next(), parts.next(), parts.next()) {
        (Some(slug), Some(doc), path) if !slug.is_empty() && !doc.is_empty() => {
            Ok(BlockPlaceholder {
                slug,
                name: doc,
                path,
            })
        }
        _ => Err(ReferenceError::Malformed(name.into())),
    })
}

/// Every Prefect object `v` refers to, sorted, each once.
pub fn references_in(v: &Value) -> Vec<Reference> {
    let mut out = Vec::new();
    collect(v, &mut out);
    out.sort();
    out.dedup();
    out
}

fn collect(v: &Value, out: &mut Vec<Reference>) {
    match v {
        Value::String(s) => {
            for p in placeholders(s) {
                if let Some(Ok(block)) = parse_block(p.name) {
                    out.push(block.reference());
                } else if let Some(var) = p.name.strip_prefix(VARIABLE_PREFIX) {
                    out.push(Reference::Variable(var.into()));
                }
            }
        }
        Value::Object(map) => match block_id(map) {
            Some(id) => out.push(Reference::BlockId(id.into())),
            None => map.values().for_each(|v| collect(v, out)),
        },
        Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
        _ => {}
    }
}

fn block_id(map: &Map<String, Value>) -> Option<&str> {
    map.get("$ref")?
        .get("block_document_id")?
        .as_str()
        .filter(|id| !id.is_empty())
}

impl References {
    /// Resolves blocks, then variables, everywhere in `v`.
    pub fn resolve(&self, v: &Value) -> Result<Value, ReferenceError> {
        let v = self.resolve_blocks(v)?;
        Ok(self.resolve_variables(&v))
    }

    fn block(&self, name: &str) -> Option<Result<Value, ReferenceError>> {
        let parsed = parse_block(name)?;
        Some(parsed.and_then(|b| {
            let (slug, name, path) = (b.slug, b.name, b.path);
            let data =
                self.blocks
                    .get(&b.reference())
                    .ok_or_else(|| ReferenceError::MissingBlock {
                        slug: slug.into(),
                        name: name.into(),
                    })?;
            // Blocks that hold only `value` (secret, string, json) resolve to it,
            // unless the path already starts inside it.
            let only_value =
                data.as_object().is_some_and(|m| m.len() == 1) && data.get("value").is_some();
            let path_into_value = path.is_some_and(|p| {
                p == "value" || p.starts_with("value.") || p.starts_with("value[")
            });
            let data = match data.get("value") {
                Some(inner) if only_value && !path_into_value => inner,
                _ => data,
            };
            match path {
                None => Ok(data.clone()),
                Some(path) => {
                    lookup_path(data, path)
                        .cloned()
                        .ok_or_else(|| ReferenceError::MissingKey {
                            slug: slug.into(),
                            name: name.into(),
                            path: path.into(),
                        })
                }
            }
        }))
    }

    fn resolve_blocks(&self, v: &Value) -> Result<Value, ReferenceError> {
        Ok(match v {
            Value::String(s) => {
                let found = placeholders(s);
                if let [only] = found.as_slice()
                    && only.full == s
                    && let Some(value) = self.block(only.name)
                {
                    return value;
                }
                let mut out = s.clone();
                for p in &found {
                    if let Some(value) = self.block(p.name) {
                        let value = value?;
                        if value.is_object() || value.is_array() {
                            return Err(ReferenceError::NotScalar(p.full.into()));
                        }
                        out = out.replace(p.full, &as_text(&value));
                    }
                }
                Value::String(out)
            }
            Value::Object(map) => match block_id(map) {
                Some(id) => self
                    .blocks
                    .get(&Reference::BlockId(id.into()))
                    .cloned()
                    .ok_or_else(|| ReferenceError::MissingBlockId(id.into()))?,
                None => Value::Object(
                    map.iter()
                        .map(|(k, v)| Ok((k.clone(), self.resolve_blocks(v)?)))
                        .collect::<Result<_, ReferenceError>>()?,
                ),
            },
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|v| self.resolve_blocks(v))
                    .collect::<Result<_, _>>()?,
            ),
            other => other.clone(),
        })
    }

    fn resolve_variables(&self, v: &Value) -> Value {
        match v {
            Value::String(s) => {
                let all = placeholders(s);
                let found: Vec<_> = all
                    .iter()
                    .filter(|p| p.name.starts_with(VARIABLE_PREFIX))
                    .collect();
                let lookup = |name: &str| self.variables.get(&name[VARIABLE_PREFIX.len()..]);
                match found.as_slice() {
                    [] => v.clone(),
                    [only] if only.full == s && all.len() == 1 => lookup(only.name)
                        .cloned()
                        .unwrap_or_else(|| Value::String(String::new())),
                    _ => {
                        let mut out = s.clone();
                        for p in &found {
                            let text = lookup(p.name).map(as_text).unwrap_or_default();
                            out = out.replace(p.full, &text);
                        }
                        Value::String(out)
                    }
                }
            }
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| (k.clone(), self.resolve_variables(v)))
                    .collect(),
            ),
            Value::Array(items) => {
                Value::Array(items.iter().map(|v| self.resolve_variables(v)).collect())
            }
            other => other.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn block(slug: &str, name: &str) -> Reference {
        Reference::Block {
            slug: slug.into(),
            name: name.into(),
        }
    }

    #[test]
    fn variables_resolve_like_prefect_s_resolve_variables() {
        let refs = References {
            variables: json!({"img": "repo/etl:3", "n": 2, "flag": true, "obj": {"a": 1}})
                .as_object()
                .unwrap()
                .clone(),
            ..Default::default()
        };
        let t = json!({
            "image": "{{ prefect.variables.img }}",
            "replicas": "{{ prefect.variables.n }}",
            "obj": "{{ prefect.variables.obj }}",
            "text": "v{{ prefect.variables.n }}-{{ prefect.variables.flag }}",
            "missing": "{{ prefect.variables.nope }}",
            "missing_in_text": "a{{ prefect.variables.nope }}b",
            "list": ["{{ prefect.variables.img }}", "plain"],
        });
        let out = refs.resolve(&t).unwrap();
        assert_eq!(out["image"], "repo/etl:3");
        assert_eq!(out["replicas"], 2);
        assert_eq!(out["obj"], json!({"a": 1}));
        assert_eq!(out["text"], "v2-True");
        assert_eq!(out["missing"], "");
        assert_eq!(out["missing_in_text"], "ab");
        assert_eq!(out["list"], json!(["repo/etl:3", "plain"]));
    }

    #[test]
    fn references_are_found_in_strings_and_refs() {
        let t = json!({
            "a": "{{ prefect.blocks.secret.db-pass }}",
            "b": ["x{{ prefect.variables.v }}{{ prefect.blocks.json.cfg.value.k }}"],
            "c": {"$ref": {"block_document_id": "0b1d"}},
            "d": "{{ c }} {{ prefect.blocks.bad }}",
        });
        assert_eq!(
            references_in(&t),
            [
                block("json", "cfg"),
                block("secret", "db-pass"),
                Reference::BlockId("0b1d".into()),
                Reference::Variable("v".into()),
            ]
        );
    }

    #[test]
    fn blocks_resolve_like_prefect_s_resolve_block_document_references() {
        let refs = References {
            blocks: BTreeMap::from([
                (block("secret", "token"), json!({"value": "s3cr3t"})),
                (
                    block("json", "cfg"),
                    json!({"value": {"key": {"nested": "n"}, "list": [{"k": "lv"}, 1]}}),
                ),
                (
                    block("kubernetes-credentials", "prod"),
                    json!({"namespace": "etl", "replicas": 3}),
                ),
                (Reference::BlockId("id-1".into()), json!({"x": 1})),
            ]),
            variables: json!({"tag": "7"}).as_object().unwrap().clone(),
        };
        let t = json!({
            "whole": "{{ prefect.blocks.secret.token }}",
            "value_path": "{{ prefect.blocks.json.cfg.value.key }}",
            "short_path": "{{ prefect.blocks.json.cfg.key.nested }}",
            "list_path": "{{ prefect.blocks.json.cfg.list[0].k }}",
            "object": "{{ prefect.blocks.kubernetes-credentials.prod }}",
            "field": "{{ prefect.blocks.kubernetes-credentials.prod.replicas }}",
            "inline": "ns={{ prefect.blocks.kubernetes-credentials.prod.namespace }}:{{ prefect.variables.tag }}",
            "by_id": {"$ref": {"block_document_id": "id-1"}},
        });
        let out = refs.resolve(&t).unwrap();
        assert_eq!(out["whole"], "s3cr3t");
        assert_eq!(out["value_path"], json!({"nested": "n"}));
        assert_eq!(out["short_path"], "n");
        assert_eq!(out["list_path"], "lv");
        assert_eq!(out["object"], json!({"namespace": "etl", "replicas": 3}));
        assert_eq!(out["field"], 3);
        assert_eq!(out["inline"], "ns=etl:7");
        assert_eq!(out["by_id"], json!({"x": 1}));
    }

    #[test]
    fn unresolvable_blocks_are_errors_that_name_them() {
        let refs = References {
            blocks: BTreeMap::from([(block("json", "cfg"), json!({"a": {"b": 1}, "c": 2}))]),
            ..Default::default()
        };
        let err = |t: Value| refs.resolve(&t).unwrap_err().to_string();
        assert_eq!(
            err(json!("{{ prefect.blocks.secret.gone }}")),
            "block `gone` of type `secret` does not exist; it is referenced by the deployment or work pool configuration"
        );
        assert_eq!(
            err(json!(["{{ prefect.blocks.json.cfg.a.zz }}"])),
            "block `cfg` of type `json` has nothing at `a.zz`"
        );
        assert!(
            err(json!("x{{ prefect.blocks.json.cfg.a }}")).contains("cannot be put inside text")
        );
        assert!(err(json!("{{ prefect.blocks.json }}")).contains("not a block reference"));
        assert!(
            err(json!({"$ref": {"block_document_id": "nope"}})).contains("nope does not exist")
        );
        assert_eq!(
            refs.resolve(&json!("{{ prefect.blocks.json.cfg.c }}-x")),
            Ok(json!("2-x")),
            "a scalar inside text is printed"
        );
    }
}
