//! Where the operator may act for a resource. A `PrefectAgent` runs its Jobs in its own
//! namespace unless the operator was started with `--job-namespaces`: whoever may create
//! a `PrefectAgent` in one namespace must not thereby get pods (with that namespace's
//! service accounts and Secrets) in another.

use std::collections::BTreeSet;

/// The operator's limits: the namespace it watches and where else Jobs may go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// `--namespace`: PrefectAgents and Jobs are watched here only.
    pub watch_namespace: Option<String>,
    pub job_namespaces: JobNamespaces,
    /// `--pod-security`: the Pod Security Standard every flow-run pod is held to.
    pub pod_security: crate::deploy::kubernetes::pod_security::PodSecurity,
}

/// Namespaces besides its own where a PrefectAgent may run Jobs (`--job-namespaces`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum JobNamespaces {
    /// Only the resource's own (the default).
    #[default]
    OwnOnly,
    /// `*`: any.
    Any,
    These(BTreeSet<String>),
}

impl JobNamespaces {
    /// From the flag's values: names, or `*` for any.
    pub fn from_list(list: &[String]) -> Self {
        let names: BTreeSet<String> = list
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if names.contains("*") {
            JobNamespaces::Any
        } else if names.is_empty() {
            JobNamespaces::OwnOnly
        } else {
            JobNamespaces::These(names)
        }
    }

    fn allows(&self, namespace: &str) -> bool {
        match self {
            JobNamespaces::OwnOnly => false,
            JobNamespaces::Any => true,
            JobNamespaces::These(names) => names.contains(namespace),
        }
    }
}

impl Scope {
    /// The namespace of this resource's Jobs, or a message saying why `spec.job.namespace`
    /// is refused and what to change.
    pub fn job_namespace(
        &self,
        resource_ns: &str,
        requested: Option<&str>,
    ) -> Result<String, String> {
        let Some(wanted) = requested.filter(|ns| *ns != resource_ns) else {
            return Ok(resource_ns.to_string());
        };
        match self.refusal(resource_ns, wanted) {
            Some(why) => Err(format!("spec.job.namespace `{wanted}`: {why}")),
            None => Ok(wanted.to_string()),
        }
    }

    /// Whether a run's Job may go to `wanted`, a namespace its job variables or its pool's
    /// template name; the refusal names the namespace and the flag that allows it.
    pub fn run_namespace(&self, resource_ns: &str, wanted: &str) -> Result<(), String> {
        match self.refusal(resource_ns, wanted) {
            Some(why) => Err(format!(
                "the run's Job would go to namespace `{wanted}` (its `namespace` job variable \
                 or the pool's job template), but {why}"
            )),
            None => Ok(()),
        }
    }

    /// Why a resource in `resource_ns` may not run Jobs in `wanted`, if it may not.
    fn refusal(&self, resource_ns: &str, wanted: &str) -> Option<String> {
        if wanted == resource_ns {
            return None;
        }
        if let Some(watched) = &self.watch_namespace
            && wanted != watched
        {
            return Some(format!(
                "this operator watches namespace `{watched}` only (--namespace) and could not \
                 follow Jobs elsewhere"
            ));
        }
        (!self.job_namespaces.allows(wanted)).then(|| {
            format!(
                "Jobs run in the PrefectAgent's own namespace `{resource_ns}` unless the \
                 operator allows others (--job-namespaces, Helm value jobNamespaces)"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(list: &[&str], watch: Option<&str>) -> Scope {
        Scope {
            watch_namespace: watch.map(str::to_string),
            job_namespaces: JobNamespaces::from_list(
                &list.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            ),
            ..Scope::default()
        }
    }

    #[test]
    fn the_own_namespace_is_always_allowed() {
        let s = scope(&[], None);
        assert_eq!(s.job_namespace("a", None), Ok("a".into()));
        assert_eq!(s.job_namespace("a", Some("a")), Ok("a".into()));
    }

    #[test]
    fn another_namespace_needs_the_operator_to_allow_it() {
        let refused = scope(&[], None).job_namespace("a", Some("b")).unwrap_err();
        let run = scope(&["b"], None).run_namespace("a", "c").unwrap_err();
        assert!(
            run.contains("`c`") && run.contains("--job-namespaces"),
            "{run}"
        );
        assert_eq!(scope(&["b"], None).run_namespace("a", "b"), Ok(()));
        assert_eq!(scope(&[], None).run_namespace("a", "a"), Ok(()));
        assert!(
            refused.contains("`b`") && refused.contains("--job-namespaces"),
            "{refused}"
        );
        assert_eq!(
            scope(&["b", "c"], None).job_namespace("a", Some("b")),
            Ok("b".into())
        );
        assert!(scope(&["c"], None).job_namespace("a", Some("b")).is_err());
        assert_eq!(
            scope(&["*"], None).job_namespace("a", Some("b")),
            Ok("b".into())
        );
        assert_eq!(
            JobNamespaces::from_list(&[" ".into()]),
            JobNamespaces::OwnOnly
        );
    }

    #[test]
    fn a_namespaced_operator_keeps_jobs_where_it_watches() {
        let refused = scope(&["*"], Some("a"))
            .job_namespace("a", Some("b"))
            .unwrap_err();
        assert!(refused.contains("watches namespace `a`"), "{refused}");
    }
}
