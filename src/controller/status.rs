//! What a resource's status should say, decided without I/O: conditions from the
//! agent's phase, the Event a change deserves, and whether a change is worth a write.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::supervisor::AgentPhase;
pub use crate::agent::stats::DEGRADED_AFTER_POLL_ERRORS;
use crate::crd::PrefectAgentStatus;
pub use crate::text::clip;

/// Longest message a status keeps (conditions, `lastError`): a resource that quotes a
/// megabyte must still be writable, or its error is visible nowhere.
pub const MAX_MESSAGE: usize = 1024;
/// Longest Event note Kubernetes accepts (events.k8s.io/v1: 1 KiB).
pub const MAX_NOTE: usize = 1024;

/// A condition's status, reason and message.
pub type Cond<'a> = (&'a str, &'a str, String);

/// Conditions for a phase, keeping `lastTransitionTime` where a condition did not change.
pub fn conditions(
    phase: &AgentPhase,
    generation: Option<i64>,
    previous: &[Condition],
) -> Vec<Condition> {
    let (ready, progressing, degraded): (Cond, Cond, Cond) = match phase {
        AgentPhase::Suspended => (
            (
                "False",
                "Suspended",
                "spec.suspend is true: the agent does not poll".into(),
            ),
            ("False", "Suspended", "suspended".into()),
            ("False", "Suspended", "suspended".into()),
        ),
        AgentPhase::Invalid { reason, message } => (
            ("False", reason, message.clone()),
            ("False", reason, message.clone()),
            ("True", reason, message.clone()),
        ),
        AgentPhase::Waiting { reason, message } => (
            ("False", reason, message.clone()),
            ("True", reason, message.clone()),
            ("False", reason, "no problem seen".into()),
        ),
        AgentPhase::Failed {
            reason,
            message,
            retry_in,
        } => (
            ("False", reason, message.clone()),
            (
                "True",
                "Restarting",
                format!(
                    "the agent will be restarted in {}s: {message}",
                    retry_in.as_secs()
                ),
            ),
            ("True", reason, message.clone()),
        ),
        AgentPhase::Finished { .. } => {
            let m = "the agent made its spec.maxPolls polls and stopped; it runs again when the \
                     spec changes"
                .to_string();
            (
                ("False", "Finished", m.clone()),
                ("False", "Finished", m),
                ("False", "Finished", "no problem seen".into()),
            )
        }
        AgentPhase::Running { stats } if stats.agent_id.is_none() => (
            (
                "False",
                "Registering",
                "the agent is registering with Prefect".into(),
            ),
            (
                "True",
                "Registering",
                "the agent is registering with Prefect".into(),
            ),
            ("False", "Registering", "no problem seen".into()),
        ),
        AgentPhase::Running { stats } => {
            // Never polled successfully, or failing for a while after a healthy start.
            let polling_fails = stats.last_error.is_some()
                && ((stats.polls > 0 && stats.poll_errors == stats.polls)
                    || stats.consecutive_poll_errors >= DEGRADED_AFTER_POLL_ERRORS);
            if polling_fails {
                let m = stats.last_error.clone().unwrap_or_default();
                (
                    ("False", "PollFailing", m.clone()),
                    ("False", "Polling", "polling".into()),
                    ("True", "PollFailing", m),
                )
            } else {
                (
                    (
                        "True",
                        "Polling",
                        format!(
                            "agent {} polls Prefect",
                            stats.agent_id.clone().unwrap_or_default()
                        ),
                    ),
                    ("False", "Polling", "up to date".into()),
                    ("False", "Polling", "no problem seen".into()),
                )
            }
        }
    };
    condition_set(generation, previous, [ready, progressing, degraded])
}

/// Ready, Progressing and Degraded as `(status, reason, message)` each, as conditions
/// that keep `lastTransitionTime` where their status did not change.
pub fn condition_set(
    generation: Option<i64>,
    previous: &[Condition],
    [ready, progressing, degraded]: [Cond<'_>; 3],
) -> Vec<Condition> {
    let now = Time(Timestamp::now());
    [
        ("Ready", ready),
        ("Progressing", progressing),
        ("Degraded", degraded),
    ]
    .into_iter()
    .map(|(kind, (status, reason, message))| {
        let since = previous
            .iter()
            .find(|c| c.type_ == kind && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone());
        Condition {
            type_: kind.into(),
            status: status.into(),
            reason: reason.into(),
            message: clip(&message, MAX_MESSAGE),
            observed_generation: generation,
            last_transition_time: since,
        }
    })
    .collect()
}

/// The status a resource should have: its agent's phase and figures, and the Jobs of
/// its agent still running.
///
/// The counters are the resource's lifetime counts: a phase without a running agent
/// (suspended, invalid, failed) keeps the ones `previous` shows, and a new agent
/// continues from them (`AgentStats::resume_from`).
pub fn desired_status(
    phase: &AgentPhase,
    generation: Option<i64>,
    previous: Option<&PrefectAgentStatus>,
    active_jobs: u64,
) -> PrefectAgentStatus {
    let stats = agent_stats(phase);
    let before = |count: fn(&PrefectAgentStatus) -> u64| previous.map_or(0, count);
    let conditions_before = previous.map_or(&[][..], |p| &p.conditions);
    let last_error = match phase {
        AgentPhase::Invalid { message, .. } | AgentPhase::Failed { message, .. } => {
            Some(message.clone())
        }
        _ => stats.and_then(|s| s.last_error.clone()),
    };
    PrefectAgentStatus {
        observed_generation: generation,
        conditions: conditions(phase, generation, conditions_before),
        agent_id: stats.and_then(|s| s.agent_id.clone()),
        last_poll_time: stats
            .and_then(|s| s.last_poll_time)
            .and_then(kube_time)
            .map(Time),
        polls: stats.map_or_else(|| before(|p| p.polls), |s| s.polls),
        runs_submitted: stats.map_or_else(|| before(|p| p.runs_submitted), |s| s.runs_submitted),
        runs_failed: stats.map_or_else(|| before(|p| p.runs_failed), |s| s.runs_failed),
        active_jobs,
        last_error: last_error.map(|e| clip(&e, MAX_MESSAGE)),
        message: None,
    }
}

/// The figures of the agent a phase has (running, or finished its polls).
fn agent_stats(phase: &AgentPhase) -> Option<&crate::agent::stats::StatsSnapshot> {
    match phase {
        AgentPhase::Running { stats } | AgentPhase::Finished { stats } => Some(stats),
        _ => None,
    }
}

/// When the phase's agent (this instance of it) started, for [`status_changed`].
pub fn agent_started(phase: &AgentPhase) -> Option<Timestamp> {
    agent_stats(phase)?.started_at.and_then(kube_time)
}

/// An agent's time as Kubernetes' (microseconds, as the API server keeps them).
fn kube_time(t: chrono::DateTime<chrono::Utc>) -> Option<Timestamp> {
    Timestamp::from_microsecond(t.timestamp_micros()).ok()
}

/// The Event a status change deserves: Ready turning True, or a new problem (Degraded
/// turning True or changing reason), or suspension. `(warning, reason, note)`.
pub fn transition_event(
    previous: &[Condition],
    next: &[Condition],
) -> Option<(bool, String, String)> {
    let find = |list: &[Condition], t: &str| list.iter().find(|c| c.type_ == t).cloned();
    let (old_ready, new_ready) = (find(previous, "Ready"), find(next, "Ready")?);
    let (old_degraded, new_degraded) = (find(previous, "Degraded"), find(next, "Degraded")?);
    let same = |a: &Option<Condition>, b: &Condition| {
        a.as_ref()
            .is_some_and(|a| a.status == b.status && a.reason == b.reason)
    };
    if new_degraded.status == "True" && !same(&old_degraded, &new_degraded) {
        return Some((
            true,
            new_degraded.reason,
            clip(&new_degraded.message, MAX_NOTE),
        ));
    }
    if !same(&old_ready, &new_ready)
        && (new_ready.status == "True" || new_ready.reason == "Suspended")
    {
        let reason = if new_ready.status == "True" {
            "AgentReady".to_string()
        } else {
            new_ready.reason
        };
        return Some((false, reason, clip(&new_ready.message, MAX_NOTE)));
    }
    None
}

/// How stale an idle agent's poll count and time may get in its status when something
/// else is written anyway. They move with every poll; writing them for every agent at
/// every poll (and the watch event and reconcile each write causes) would be most of
/// what an idle operator does. Without other changes they are written at the agent's
/// periodic refresh (`STATUS_REFRESH`), and once for each new instance of the agent.
const POLL_FIGURES_EVERY: SignedDuration = SignedDuration::from_secs(30);

/// Whether `new` is worth a write over `old`: anything but the poll figures (and the
/// condition timestamps) changed, or those figures are older than `POLL_FIGURES_EVERY`,
/// or they are an earlier instance's and the agent started at `agent_started` has polled.
pub fn status_changed(
    old: &PrefectAgentStatus,
    new: &PrefectAgentStatus,
    agent_started: Option<Timestamp>,
) -> bool {
    let strip = |s: &PrefectAgentStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        s.polls = 0;
        s.last_poll_time = None;
        s
    };
    if strip(old) != strip(new) {
        return true;
    }
    match (&old.last_poll_time, &new.last_poll_time) {
        (Some(Time(then)), Some(Time(now))) => {
            let earlier_instance = agent_started.is_some_and(|t| *then < t && *now >= t);
            earlier_instance || now.duration_since(*then) >= POLL_FIGURES_EVERY
        }
        (None, Some(_)) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::supervisor::{RESTART_MAX, restart_delay};
    use super::*;
    use crate::agent::stats::StatsSnapshot;

    /// A megabyte in a message leaves a status (and an Event) Kubernetes accepts.
    #[test]
    fn huge_messages_are_cut_to_what_kubernetes_takes() {
        let huge = "é".repeat(1_000_000);
        let phase = AgentPhase::Invalid {
            reason: "InvalidSpec",
            message: huge.clone(),
        };
        let status = desired_status(&phase, Some(1), None, 0);
        assert!(
            status
                .conditions
                .iter()
                .all(|c| c.message.len() <= MAX_MESSAGE)
        );
        assert!(status.last_error.unwrap().len() <= MAX_MESSAGE);
        let (_, _, note) = transition_event(&[], &status.conditions).unwrap();
        assert!(note.len() <= MAX_NOTE && note.ends_with('…'));
        assert_eq!(clip("short", 10), "short");
    }

    #[test]
    fn poll_figures_alone_are_written_when_30_seconds_old_or_from_a_new_instance() {
        let at = |secs: i64| Some(Time(Timestamp::from_second(1_800_000_000 + secs).unwrap()));
        let old = PrefectAgentStatus {
            polls: 10,
            last_poll_time: at(0),
            ..Default::default()
        };
        let polled = |polls, secs| PrefectAgentStatus {
            polls,
            last_poll_time: at(secs),
            ..old.clone()
        };
        let started = |secs: i64| Some(Timestamp::from_second(1_800_000_000 + secs).unwrap());
        assert!(!status_changed(&old, &old, None));
        assert!(!status_changed(&old, &polled(12, 20), started(-100)));
        assert!(status_changed(&old, &polled(13, 30), started(-100)));
        let submitted = PrefectAgentStatus {
            runs_submitted: 1,
            ..polled(11, 1)
        };
        assert!(
            status_changed(&old, &submitted, None),
            "a launch is written at once"
        );
        // A new instance of the agent (an operator restart): its first poll is written
        // even seconds after the old instance's figures; its next ones are not.
        assert!(status_changed(&old, &polled(11, 5), started(2)));
        assert!(!status_changed(&polled(11, 5), &polled(12, 10), started(2)));
        assert!(
            !status_changed(&old, &polled(11, 1), started(2)),
            "not before the new instance has polled"
        );
    }

    fn stats(agent_id: Option<&str>, polls: u64, errors: u64) -> StatsSnapshot {
        StatsSnapshot {
            agent_id: agent_id.map(str::to_string),
            polls,
            poll_errors: errors,
            last_error: (errors > 0).then(|| "cannot reach the Prefect API".to_string()),
            ..StatsSnapshot::default()
        }
    }

    fn get<'a>(c: &'a [Condition], t: &str) -> &'a Condition {
        c.iter().find(|c| c.type_ == t).unwrap()
    }

    /// A healthy agent whose polls start failing is Degraded after a few, with the error,
    /// and Ready again after the next poll that works.
    #[test]
    fn a_healthy_agent_degrades_when_polls_keep_failing() {
        let after = |consecutive: u64| {
            let s = StatsSnapshot {
                consecutive_poll_errors: consecutive,
                last_error: (consecutive > 0).then(|| "connection refused".to_string()),
                ..stats(Some("w1"), 100, consecutive)
            };
            conditions(&AgentPhase::Running { stats: s }, Some(1), &[])
        };
        assert_eq!(get(&after(2), "Ready").status, "True", "a blip is no alarm");
        let degraded = after(DEGRADED_AFTER_POLL_ERRORS);
        assert_eq!(get(&degraded, "Degraded").status, "True");
        assert_eq!(get(&degraded, "Degraded").message, "connection refused");
        assert_eq!(get(&after(0), "Degraded").status, "False");
    }

    /// Suspending, a bad spec or a failed start keep the lifetime counts.
    #[test]
    fn counters_outlive_the_agent() {
        let running = AgentPhase::Running {
            stats: StatsSnapshot {
                runs_submitted: 4,
                runs_failed: 1,
                ..stats(Some("w1"), 9, 0)
            },
        };
        let before = desired_status(&running, Some(1), None, 0);
        for phase in [
            AgentPhase::Suspended,
            AgentPhase::Invalid {
                reason: "InvalidSpec",
                message: "x".into(),
            },
            AgentPhase::Failed {
                reason: "WorkPoolNotFound",
                message: "x".into(),
                retry_in: RESTART_MAX,
            },
        ] {
            let after = desired_status(&phase, Some(2), Some(&before), 0);
            assert_eq!(
                (after.polls, after.runs_submitted, after.runs_failed),
                (9, 4, 1),
                "{phase:?}"
            );
        }
        assert_eq!(
            desired_status(&AgentPhase::Suspended, Some(1), None, 0).polls,
            0
        );
    }

    /// An agent that made its maxPolls is finished, not failed.
    #[test]
    fn a_finished_agent_is_neither_ready_nor_degraded() {
        let finished = AgentPhase::Finished {
            stats: StatsSnapshot {
                finished: true,
                ..stats(Some("w1"), 1, 0)
            },
        };
        let c = conditions(&finished, Some(1), &[]);
        assert_eq!(get(&c, "Ready").reason, "Finished");
        assert_eq!(get(&c, "Ready").status, "False");
        assert_eq!(get(&c, "Degraded").status, "False");
        assert!(get(&c, "Ready").message.contains("maxPolls"));
        assert_eq!(desired_status(&finished, Some(1), None, 0).polls, 1);
    }

    #[test]
    fn conditions_follow_the_phase() {
        let ready = conditions(
            &AgentPhase::Running {
                stats: stats(Some("w1"), 3, 0),
            },
            Some(2),
            &[],
        );
        assert_eq!(get(&ready, "Ready").status, "True");
        assert_eq!(get(&ready, "Degraded").status, "False");
        assert!(ready.iter().all(|c| c.observed_generation == Some(2)));

        let invalid = conditions(
            &AgentPhase::Invalid {
                reason: "SecretNotFound",
                message: "secret data/prefect-api not found".into(),
            },
            Some(1),
            &[],
        );
        assert_eq!(get(&invalid, "Ready").status, "False");
        assert_eq!(get(&invalid, "Degraded").reason, "SecretNotFound");
        assert!(
            get(&invalid, "Degraded")
                .message
                .contains("data/prefect-api")
        );

        let failing = conditions(
            &AgentPhase::Running {
                stats: stats(Some("w1"), 4, 4),
            },
            Some(1),
            &[],
        );
        assert_eq!(get(&failing, "Ready").reason, "PollFailing");
        let registering = conditions(
            &AgentPhase::Running {
                stats: stats(None, 0, 0),
            },
            Some(1),
            &[],
        );
        assert_eq!(get(&registering, "Progressing").status, "True");
        let suspended = conditions(&AgentPhase::Suspended, Some(1), &[]);
        assert_eq!(get(&suspended, "Ready").reason, "Suspended");
    }

    #[test]
    fn failed_agents_restart_with_doubling_delays() {
        let delays: Vec<u64> = (1..=7).map(|n| restart_delay(n).as_secs()).collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(restart_delay(u32::MAX), RESTART_MAX);
        let failed = conditions(
            &AgentPhase::Failed {
                reason: "PrefectUnreachable",
                message: "cannot reach the Prefect API at http://p/api".into(),
                retry_in: restart_delay(3),
            },
            Some(2),
            &[],
        );
        let progressing = get(&failed, "Progressing");
        assert_eq!(
            progressing.message,
            "the agent will be restarted in 40s: cannot reach the Prefect API at http://p/api"
        );
    }

    #[test]
    fn events_on_transitions_only() {
        let ready = conditions(
            &AgentPhase::Running {
                stats: stats(Some("w"), 1, 0),
            },
            Some(1),
            &[],
        );
        let (warning, reason, _) = transition_event(&[], &ready).unwrap();
        assert!(!warning);
        assert_eq!(reason, "AgentReady");
        assert_eq!(
            transition_event(&ready, &ready),
            None,
            "no change, no event"
        );
        let broken = conditions(
            &AgentPhase::Invalid {
                reason: "SecretNotFound",
                message: "secret d/s not found".into(),
            },
            Some(2),
            &ready,
        );
        let (warning, reason, note) = transition_event(&ready, &broken).unwrap();
        assert!(warning);
        assert_eq!(
            (reason.as_str(), note.as_str()),
            ("SecretNotFound", "secret d/s not found")
        );
        assert_eq!(transition_event(&broken, &broken), None);
        let suspended = conditions(&AgentPhase::Suspended, Some(3), &ready);
        assert_eq!(transition_event(&ready, &suspended).unwrap().1, "Suspended");
    }

    #[test]
    fn transition_times_survive_unchanged_conditions() {
        let first = conditions(
            &AgentPhase::Running {
                stats: stats(Some("w"), 1, 0),
            },
            Some(1),
            &[],
        );
        let mut old = first.clone();
        for c in &mut old {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        let again = conditions(
            &AgentPhase::Running {
                stats: stats(Some("w"), 2, 0),
            },
            Some(1),
            &old,
        );
        assert_eq!(
            get(&again, "Ready").last_transition_time,
            Time(Timestamp::UNIX_EPOCH)
        );
        let changed = conditions(&AgentPhase::Suspended, Some(1), &old);
        assert_ne!(
            get(&changed, "Ready").last_transition_time,
            Time(Timestamp::UNIX_EPOCH)
        );
    }
}
