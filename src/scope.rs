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
        if let Some(watched) = &self.watch_namespace
            && wanted != watched
        {
            return Err(format!(
                "spec.job.namespace `{wanted}`: this operator watches namespace `{watched}` only \
                 and could not follow Jobs elsewhere"
            ));
        }
        if !self.job_namespaces.allows(wanted) {
            return Err(format!(
                "spec.job.namespace `{wanted}`: Jobs run in the PrefectAgent's own namespace \
                 `{resource_ns}` unless the operator allows others (--job-namespaces, Helm \
                 value jobNamespaces)"
            ));
        }
        Ok(wanted.to_string())
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
