//! Prefect's work-pool semantics, shared by the backends (which fetch what a run needs)
//! and the deployers (which render it): the standard base job template, job variables
//! and their merge, the placeholder renderer, and the Prefect objects a template refers
//! to. Pure: it depends on neither backends nor deployers.

pub mod references;
pub mod slug;
pub mod template;
pub mod variables;

use std::sync::{Arc, Mutex, Weak};

use serde_json::{Value, json};

pub use references::{Reference, ReferenceError, References, references_in};
pub use variables::{JobConfiguration, VariableError, run_values, template_defaults};

/// Prefect's standard Kubernetes base job template (prefect-kubernetes 0.8.0), used when
/// the pool has none; `--create-pool` sends it too.
pub const DEFAULT_BASE_JOB_TEMPLATE: &str = include_str!("default-base-job-template.json");

/// [`DEFAULT_BASE_JOB_TEMPLATE`], parsed once.
pub fn standard_base_job_template() -> &'static Value {
    static PARSED: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| {
        // Compiled into the binary and parsed by a unit test: an invariant, not input.
        serde_json::from_str(DEFAULT_BASE_JOB_TEMPLATE).expect("the embedded template is JSON")
    });
    &PARSED
}

/// The base job template a pool of `kind` is created with: Prefect's standard one for
/// `kubernetes` (what the official worker sends), none otherwise.
pub fn standard_template(kind: &str) -> Value {
    match kind {
        "kubernetes" => standard_base_job_template().clone(),
        _ => json!({}),
    }
}

/// One copy of each distinct base job template in the process: a thousand agents of one
/// pool would otherwise hold a thousand parsed copies (some 45 KiB each for Prefect's
/// standard Kubernetes template), most of an idle agent's memory.
pub fn shared_template(template: Value) -> Arc<Value> {
    static TEMPLATES: Mutex<Vec<Weak<Value>>> = Mutex::new(Vec::new());
    let Ok(mut all) = TEMPLATES.lock() else {
        return Arc::new(template);
    };
    all.retain(|w| w.strong_count() > 0);
    if let Some(same) = all
        .iter()
        .filter_map(Weak::upgrade)
        .find(|t| **t == template)
    {
        return same;
    }
    let template = Arc::new(template);
    all.push(Arc::downgrade(&template));
    template
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_pools_are_created_with_the_standard_template() {
        let t = standard_template("kubernetes");
        assert!(
            t.pointer("/job_configuration/job_manifest/spec/template")
                .is_some()
        );
        assert_eq!(
            t.pointer("/variables/properties/image_pull_policy/default"),
            Some(&json!("IfNotPresent"))
        );
        assert_eq!(standard_template("process"), json!({}));
    }

    #[test]
    fn agents_of_one_pool_share_one_copy_of_its_template() {
        let a = shared_template(standard_template("kubernetes"));
        let b = shared_template(standard_template("kubernetes"));
        assert!(Arc::ptr_eq(&a, &b));
        let mut edited = standard_template("kubernetes");
        edited["variables"]["properties"]["image"]["default"] = json!("mine:1");
        let c = shared_template(edited);
        assert!(!Arc::ptr_eq(&a, &c), "an edited template is its own");
        assert_eq!(c["variables"]["properties"]["image"]["default"], "mine:1");
    }
}
