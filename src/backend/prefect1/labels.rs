//! Prefect 1's label rule, which decides which agent may take a run.

use std::collections::BTreeSet;

/// A run is offered to an agent when every run label is one of the agent's labels; a
/// run without labels goes only to an agent without labels.
pub fn offered(run_labels: &[String], agent_labels: &[String]) -> bool {
    if run_labels.is_empty() {
        return agent_labels.is_empty();
    }
    let agent: BTreeSet<&str> = agent_labels.iter().map(String::as_str).collect();
    run_labels.iter().all(|l| agent.contains(l.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(labels: &[&str]) -> Vec<String> {
        labels.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn run_labels_must_be_a_subset_of_the_agent_s() {
        assert!(offered(&v(&["gpu"]), &v(&["gpu", "eu"])));
        assert!(offered(&v(&["gpu", "eu"]), &v(&["eu", "gpu"])));
        assert!(!offered(&v(&["gpu", "us"]), &v(&["gpu", "eu"])));
        assert!(!offered(&v(&["gpu"]), &v(&[])));
    }

    #[test]
    fn unlabeled_runs_go_only_to_unlabeled_agents() {
        assert!(offered(&v(&[]), &v(&[])));
        assert!(!offered(&v(&[]), &v(&["gpu"])));
    }
}
