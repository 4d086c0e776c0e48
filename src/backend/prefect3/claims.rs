//! Prefect 3's claim protocol, decided from answers and state histories without I/O.
//!
//! A claim is a PENDING state proposed with a fresh `transition_id` and this agent's
//! [`claim_marker`] as its message. Prefect may accept two racing claims (SQLite's stale
//! reads), so a claim holds only when it is the one PENDING state since the run was last
//! SCHEDULED; everyone reads the same history, so everyone agrees who holds it.

use chrono::{DateTime, Utc};

use super::wire::{ApiState, SetStateResponse};
use crate::backend::{Claim, StateKind};

/// The `state.message` a claim carries, so a restarted agent recognises its own claims.
pub fn claim_marker(agent_name: &str, identity: &str) -> String {
    format!("Claimed by agent {agent_name} ({identity})")
}

/// What a claim's answer means, given the transition id we sent: `None` when the answer
/// gives us the run (whether that is proof enough is [`proven_by_answer`]'s to say), else
/// why not.
pub fn interpret_claim(resp: &SetStateResponse, transition_id: &str) -> Option<Claim> {
    let reason = resp.reason().unwrap_or_default();
    match resp.status.as_str() {
        "ACCEPT" => None,
        // Our own earlier attempt already moved the run (a lost response, retried).
        "REJECT" | "ABORT" if resp.current_transition_id() == Some(transition_id) => None,
        "ABORT" => Some(Claim::Taken(reason)),
        "REJECT" if resp.current_kind() == Some(StateKind::Scheduled) => {
            Some(Claim::Delayed(reason))
        }
        "REJECT" => Some(Claim::Taken(reason)),
        "WAIT" => Some(Claim::Delayed(format!(
            "the server asked to wait: {reason}"
        ))),
        other => Some(Claim::Delayed(format!(
            "unexpected orchestration answer {other}: {reason}"
        ))),
    }
}

/// Whether the server runs a run's state transitions one at a time. Prefect 2.20 and 3.x
/// do (read in their code: the run's row is locked on PostgreSQL, SQLite's transaction
/// begins `IMMEDIATE`; two to six clients racing over the same runs got one `ACCEPT`
/// each, on both databases), and their policy refuses PENDING after PENDING. An unknown
/// or older server is not trusted with it.
pub fn serialises_transitions(server_version: Option<&str>) -> bool {
    let Some(version) = server_version else {
        return false;
    };
    let numbers = crate::text::release_numbers(version);
    match numbers.as_slice() {
        [major, minor, ..] => match (major.parse::<u32>(), minor.parse::<u32>()) {
            (Ok(major), Ok(minor)) => (major, minor) >= (2, 20),
            _ => false,
        },
        _ => false,
    }
}

/// Whether a claim's answer alone proves it holds, on a server that
/// [`serialises_transitions`]: our PENDING is the run's state and it displaced a
/// SCHEDULED one. Prefect copies the displaced SCHEDULED state's `scheduled_time` into
/// the PENDING it accepts (its `CopyScheduledTime` rule, SCHEDULED → PENDING only), and
/// a claim carries none of its own; a PENDING accepted over anything else (a re-run of a
/// finished run) has none. One transition at a time and no PENDING after PENDING: ours
/// is then the one claim of its round, and the history has nothing to add.
pub fn proven_by_answer(resp: &SetStateResponse, transition_id: &str) -> bool {
    let Some(state) = resp.state.as_ref() else {
        return false;
    };
    StateKind::parse(&state.kind) == StateKind::Pending
        && state.transition_id() == Some(transition_id)
        && state.scheduled_time().is_some()
}

/// The claim round: the PENDING states after the run was last SCHEDULED. `None` when the
/// newest state before them is not SCHEDULED (a claim that landed on a running or
/// finished run, which Prefect accepts because it allows re-runs).
fn current_claims(history: &[ApiState]) -> Option<&[ApiState]> {
    let last_other = history
        .iter()
        .rposition(|s| StateKind::parse(&s.kind) != StateKind::Pending)?;
    (StateKind::parse(&history[last_other].kind) == StateKind::Scheduled)
        .then(|| &history[last_other + 1..])
}

/// A claim holds only when it is the one PENDING state since the run was last SCHEDULED.
pub fn verify_claim(history: &[ApiState], transition_id: &str) -> bool {
    match current_claims(history) {
        Some([only]) => only.transition_id() == Some(transition_id),
        _ => false,
    }
}

/// Who owns a claim round that nobody launched: its first claim, as every agent sees it.
pub fn claimant_of_record(history: &[ApiState]) -> Option<&ApiState> {
    current_claims(history)?.first()
}

/// The claimant of record of the latest claim round, looking past the CANCELLING or
/// CANCELLED states a cancellation put after it.
pub fn latest_claimant(history: &[ApiState]) -> Option<&ApiState> {
    let end = history.iter().rposition(|s| {
        !matches!(
            StateKind::parse(&s.kind),
            StateKind::Cancelling | StateKind::Cancelled
        )
    })?;
    claimant_of_record(&history[..=end])
}

/// The state our claim displaced, when it was not SCHEDULED: it must be put back.
pub fn displaced_by<'a>(history: &'a [ApiState], transition_id: &str) -> Option<&'a ApiState> {
    let ours = history
        .iter()
        .rposition(|s| s.transition_id() == Some(transition_id))?;
    let before = history[..ours]
        .iter()
        .rev()
        .find(|s| StateKind::parse(&s.kind) != StateKind::Pending)?;
    (StateKind::parse(&before.kind) != StateKind::Scheduled).then_some(before)
}

/// A claim with `marker` (this agent's, from any of its processes) that is the run's
/// current state and displaced a finished state: the final state to put back. Such a
/// claim was sent by a process killed before it could undo it itself, its request still
/// waiting in the server while the run was claimed again, ran and finished (Prefect
/// accepts PENDING after a final state, as a re-run); left alone, the run would stay
/// PENDING for good.
pub fn late_claim_over_final<'a>(history: &'a [ApiState], marker: &str) -> Option<&'a ApiState> {
    let last = history.last()?;
    if StateKind::parse(&last.kind) != StateKind::Pending || last.message.as_deref() != Some(marker)
    {
        return None;
    }
    let previous = displaced_by(history, last.transition_id()?)?;
    StateKind::parse(&previous.kind)
        .is_final()
        .then_some(previous)
}

/// The history in the order the server committed it, as far as it can be known: states
/// are stamped when a request builds them, not when it commits, so a state stamped after
/// ours may have been committed before it (Prefect's late-runs service marking a run
/// "Late" a millisecond before our claim landed on it). The run's current state is the
/// last committed one; it is moved to the end.
pub fn in_commit_order(mut history: Vec<ApiState>, current: Option<&ApiState>) -> Vec<ApiState> {
    let Some(current) = current else {
        return history;
    };
    let same = |s: &ApiState| match (&s.id, &current.id) {
        (Some(a), Some(b)) => a == b,
        _ => {
            s.kind == current.kind
                && s.timestamp == current.timestamp
                && s.transition_id() == current.transition_id()
        }
    };
    if let Some(at) = history.iter().rposition(same) {
        let state = history.remove(at);
        history.push(state);
    }
    history
}

/// Prefect marks only a SCHEDULED run "Late" (its `EnsureOnlyScheduledFlowsMarkedLate`
/// rule), so a Late state stamped right after PENDING claims was committed before them:
/// it is moved back before them. Every reader of the history (the claim check, orphan
/// adoption, cancellation) then sees the order the server committed.
pub fn late_marks_in_place(mut history: Vec<ApiState>) -> Vec<ApiState> {
    let mut i = 1;
    while i < history.len() {
        let late = StateKind::parse(&history[i].kind) == StateKind::Scheduled
            && history[i].name.as_deref() == Some("Late");
        let mut at = i;
        while late && at > 0 && StateKind::parse(&history[at - 1].kind) == StateKind::Pending {
            at -= 1;
        }
        if at < i {
            let state = history.remove(i);
            history.insert(at, state);
        }
        i += 1;
    }
    history
}

/// A run whose claim did not hold is SCHEDULED again and due by `now`: it is to be claimed
/// again at once, as no poll may find it (the "Late" state above carries no scheduled
/// time, and Prefect's poll orders and filters by it). A run rescheduled into the future
/// is left to its time.
pub fn due_again(current: Option<&ApiState>, now: DateTime<Utc>) -> bool {
    let Some(current) = current else {
        return false;
    };
    StateKind::parse(&current.kind) == StateKind::Scheduled
        && current
            .scheduled_time()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .is_none_or(|t| t <= now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn resp(body: Value) -> SetStateResponse {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn claim_answers() {
        let t = "t-1";
        assert_eq!(
            interpret_claim(
                &resp(json!({"status": "ACCEPT", "details": {"type": "accept_details"}})),
                t
            ),
            None
        );
        // A retried claim whose first attempt went through.
        let again = json!({"status": "REJECT",
            "state": {"type": "PENDING", "state_details": {"transition_id": t}},
            "details": {"reason": "This run has already made this state transition."}});
        assert_eq!(interpret_claim(&resp(again), t), None);
        let other = json!({"status": "ABORT",
            "state": {"type": "PENDING", "state_details": {"transition_id": "someone-else"}},
            "details": {"reason": "This run is in a PENDING state and cannot transition to a PENDING state."}});
        assert!(
            matches!(interpret_claim(&resp(other), t), Some(Claim::Taken(r)) if r.contains("PENDING state"))
        );
        let limit = json!({"status": "REJECT",
            "state": {"type": "SCHEDULED", "name": "AwaitingConcurrencySlot", "state_details": {}},
            "details": {"reason": "Deployment concurrency limit reached."}});
        assert!(
            matches!(interpret_claim(&resp(limit), t), Some(Claim::Delayed(r)) if r.contains("concurrency"))
        );
        let wait = json!({"status": "WAIT", "details": {"delay_seconds": 5, "reason": "busy"}});
        assert!(matches!(
            interpret_claim(&resp(wait), t),
            Some(Claim::Delayed(_))
        ));
    }

    /// Answers as Prefect 3.9.1 gave them (trimmed): a claim of a SCHEDULED run, the same
    /// claim sent again, and a claim of a COMPLETED run (a re-run, accepted).
    #[test]
    fn an_accepted_claim_proves_itself_only_where_it_displaced_a_scheduled_state() {
        let t = "9315d8c2";
        let pending = |status: &str, scheduled: Value, transition: &str| {
            resp(json!({"status": status,
                "state": {"type": "PENDING", "name": "Pending",
                    "message": "Claimed by agent x (id)",
                    "state_details": {"scheduled_time": scheduled, "transition_id": transition,
                        "flow_run_id": "ab9a550d"}},
                "details": {"type": "accept_details"}}))
        };
        let when = json!("2026-12-07T17:17:43.074925Z");
        assert!(proven_by_answer(&pending("ACCEPT", when.clone(), t), t));
        assert!(proven_by_answer(&pending("REJECT", when.clone(), t), t));
        // Over COMPLETED: Prefect copies no scheduled time.
        assert!(!proven_by_answer(&pending("ACCEPT", Value::Null, t), t));
        // Someone else's state, or none at all.
        assert!(!proven_by_answer(
            &pending("ACCEPT", when.clone(), "other"),
            t
        ));
        assert!(!proven_by_answer(
            &resp(json!({"status": "ACCEPT", "details": {}})),
            t
        ));
        let scheduled = resp(json!({"status": "REJECT",
            "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": when, "transition_id": t}}}));
        assert!(!proven_by_answer(&scheduled, t));
    }

    #[test]
    fn only_servers_known_to_run_transitions_one_at_a_time_are_trusted_with_them() {
        for v in [
            "3.9.1",
            "2.20.27",
            "2.20.0",
            "3.0.0rc1",
            "3.4.25.dev3+g1234",
            "10.1",
        ] {
            assert!(serialises_transitions(Some(v)), "{v}");
        }
        for v in ["2.19.9", "2.7", "1.4.1", "", "three", "3"] {
            assert!(!serialises_transitions(Some(v)), "{v}");
        }
        assert!(!serialises_transitions(None));
    }

    fn state(kind: &str, ts: &str, message: Option<&str>, transition: Option<&str>) -> ApiState {
        serde_json::from_value(json!({"type": kind, "timestamp": ts, "message": message,
            "state_details": {"transition_id": transition}}))
        .unwrap()
    }

    #[test]
    fn a_late_marker_committed_before_our_claim_does_not_undo_it() {
        let sched = state("SCHEDULED", "2026-01-01T00:00:00Z", None, None);
        let ours = state(
            "PENDING",
            "2026-01-01T00:00:01.000Z",
            Some("Claimed by agent a"),
            Some("ta"),
        );
        let late = |scheduled: Value| -> ApiState {
            serde_json::from_value(json!({"type": "SCHEDULED", "name": "Late",
                "timestamp": "2026-01-01T00:00:01.002Z",
                "state_details": {"scheduled_time": scheduled}}))
            .unwrap()
        };
        // As seen on PostgreSQL: stamped after our claim, committed before it.
        let stamped = vec![sched.clone(), ours.clone(), late(Value::Null)];
        assert!(!verify_claim(&stamped, "ta"));
        let committed = in_commit_order(stamped.clone(), Some(&ours));
        assert!(verify_claim(&committed, "ta"));
        assert_eq!(
            claimant_of_record(&committed).unwrap().message.as_deref(),
            Some("Claimed by agent a")
        );
        // Committed after it: the run is SCHEDULED again, nobody holds it.
        let reopened = in_commit_order(stamped.clone(), Some(&late(Value::Null)));
        assert!(!verify_claim(&reopened, "ta"));
        assert!(displaced_by(&reopened, "ta").is_none());
        // Nothing known about the current state: the stamps' order stands.
        assert_eq!(in_commit_order(stamped.clone(), None).len(), 3);
        assert!(!verify_claim(&in_commit_order(stamped, None), "ta"));
    }

    #[test]
    fn a_late_mark_stamped_after_claims_is_read_before_them() {
        let named = |kind: &str, name: &str, ts: &str, t: Option<&str>| -> ApiState {
            serde_json::from_value(json!({"type": kind, "name": name, "timestamp": ts,
                "message": t.map(|t| format!("Claimed by agent {t}")),
                "state_details": {"transition_id": t}}))
            .unwrap()
        };
        let sched = named("SCHEDULED", "Scheduled", "2026-01-01T00:00:00Z", None);
        let a = named("PENDING", "Pending", "2026-01-01T00:00:01Z", Some("a"));
        let b = named("PENDING", "Pending", "2026-01-01T00:00:01.001Z", Some("b"));
        let late = named("SCHEDULED", "Late", "2026-01-01T00:00:01.002Z", None);
        let running = named("RUNNING", "Running", "2026-01-01T00:00:02Z", None);
        let names = |h: &[ApiState]| -> Vec<String> {
            h.iter()
                .map(|s| {
                    s.name.clone().unwrap_or_default() + &s.message.clone().unwrap_or_default()
                })
                .collect()
        };
        let fixed = late_marks_in_place(vec![
            sched.clone(),
            a.clone(),
            late.clone(),
            running.clone(),
        ]);
        assert_eq!(
            names(&fixed),
            names(&[sched.clone(), late.clone(), a.clone(), running.clone()])
        );
        assert!(verify_claim(&fixed[..3], "a"));
        assert_eq!(
            claimant_of_record(&fixed[..3]).unwrap().message.as_deref(),
            Some("Claimed by agent a")
        );
        // Behind two claims: before both (the round still has two, as it had).
        let fixed = late_marks_in_place(vec![sched.clone(), a.clone(), b.clone(), late.clone()]);
        assert_eq!(
            names(&fixed),
            names(&[sched.clone(), late.clone(), a.clone(), b.clone()])
        );
        // A Late state after a SCHEDULED one, or a plain reschedule after a claim: as stamped.
        let plain = vec![sched.clone(), late.clone(), a.clone()];
        assert_eq!(names(&late_marks_in_place(plain.clone())), names(&plain));
        let rescheduled = vec![sched.clone(), a.clone(), sched.clone()];
        assert_eq!(
            names(&late_marks_in_place(rescheduled.clone())),
            names(&rescheduled)
        );
        assert!(late_marks_in_place(Vec::new()).is_empty());
    }

    #[test]
    fn a_run_scheduled_again_and_due_is_claimed_again_at_once() {
        let now = "2026-01-01T00:00:03Z".parse().unwrap();
        let at = |kind: &str, scheduled: Value| -> ApiState {
            serde_json::from_value(
                json!({"type": kind, "state_details": {"scheduled_time": scheduled}}),
            )
            .unwrap()
        };
        assert!(due_again(Some(&at("SCHEDULED", Value::Null)), now));
        assert!(due_again(
            Some(&at("SCHEDULED", json!("2026-01-01T00:00:00Z"))),
            now
        ));
        assert!(!due_again(
            Some(&at("SCHEDULED", json!("2026-01-01T01:00:00Z"))),
            now
        ));
        assert!(!due_again(Some(&at("PENDING", Value::Null)), now));
        assert!(!due_again(None, now));
    }

    #[test]
    fn a_claim_holds_only_alone_in_its_round() {
        let sched = state("SCHEDULED", "2026-01-01T00:00:00Z", None, None);
        let b = state(
            "PENDING",
            "2026-01-01T00:00:01Z",
            Some("Claimed by agent b"),
            Some("tb"),
        );
        let a = state(
            "PENDING",
            "2026-01-01T00:00:02Z",
            Some("Claimed by agent a"),
            Some("ta"),
        );
        assert!(verify_claim(&[sched.clone(), b.clone()], "tb"));
        assert!(!verify_claim(&[sched.clone(), b.clone()], "ta"));
        // Two accepted claims: neither launches now; the first one adopts it later.
        let both = [sched.clone(), b.clone(), a.clone()];
        assert!(!verify_claim(&both, "ta"));
        assert!(!verify_claim(&both, "tb"));
        assert_eq!(
            claimant_of_record(&both).unwrap().message.as_deref(),
            Some("Claimed by agent b")
        );
        // An earlier round (crashed, then rescheduled) does not count.
        let crashed = state("CRASHED", "2026-01-01T00:00:03Z", None, None);
        let again = state("SCHEDULED", "2026-01-01T00:00:04Z", None, None);
        let c = state(
            "PENDING",
            "2026-01-01T00:00:05Z",
            Some("Claimed by agent a"),
            Some("tc"),
        );
        assert!(verify_claim(
            &[sched, b, a, crashed, again.clone(), c.clone()],
            "tc"
        ));
        assert!(claimant_of_record(std::slice::from_ref(&again)).is_none());
        let running = state("RUNNING", "2026-01-01T00:00:06Z", None, None);
        assert!(!verify_claim(
            &[again.clone(), c.clone(), running.clone()],
            "tc"
        ));
        // A late claim on a finished run (Prefect accepts it as a re-run) does not hold
        // and names the state to put back.
        let done = state("COMPLETED", "2026-01-01T00:00:07Z", None, None);
        let late = state(
            "PENDING",
            "2026-01-01T00:00:08Z",
            Some("Claimed by agent b"),
            Some("tl"),
        );
        let h = [again, c, running, done, late];
        assert!(!verify_claim(&h, "tl"));
        assert!(claimant_of_record(&h).is_none());
        assert_eq!(
            displaced_by(&h, "tl").map(|s| s.kind.as_str()),
            Some("COMPLETED")
        );
        assert!(displaced_by(&h, "tc").is_none(), "tc followed SCHEDULED");
        assert_eq!(
            late_claim_over_final(&h, "Claimed by agent b").map(|s| s.kind.as_str()),
            Some("COMPLETED")
        );
        assert!(
            late_claim_over_final(&h, "Claimed by agent a").is_none(),
            "another agent's late claim is its own to undo"
        );
        assert!(
            late_claim_over_final(&h[..4], "Claimed by agent b").is_none(),
            "a finished run"
        );
        let over_running = [h[0].clone(), h[1].clone(), h[2].clone(), h[4].clone()];
        assert!(
            late_claim_over_final(&over_running, "Claimed by agent b").is_none(),
            "a run still running moves on by itself"
        );
        // A run cancelled before anyone launched it still names its claimant.
        let cancelling = state("CANCELLING", "2026-01-01T00:00:09Z", Some("by user"), None);
        let claimed_then_cancelled = [h[0].clone(), h[1].clone(), cancelling.clone()];
        assert_eq!(
            latest_claimant(&claimed_then_cancelled).and_then(|s| s.message.as_deref()),
            Some("Claimed by agent a")
        );
        let ran_then_cancelled = [h[0].clone(), h[1].clone(), h[2].clone(), cancelling];
        assert!(
            latest_claimant(&ran_then_cancelled).is_none(),
            "it ran: not a bare claim"
        );
    }
}
