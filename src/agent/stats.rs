//! What an agent has done so far: counters for status, health and metrics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use prometheus::Histogram;
use serde::Serialize;
use tokio::sync::Notify;

use crate::metrics::{SUBMISSION_LATENCY, latency_histogram};

/// Polls failed in a row after which an agent that polled well before counts as degraded.
pub const DEGRADED_AFTER_POLL_ERRORS: u64 = 3;

/// Live counters, updated by the loop and read by the health API.
#[derive(Debug)]
pub struct AgentStats {
    /// When this agent (this process's instance of it) started.
    pub started_at: DateTime<Utc>,
    pub polls: AtomicU64,
    pub poll_errors: AtomicU64,
    pub runs_submitted: AtomicU64,
    pub runs_failed: AtomicU64,
    pub runs_cancelled: AtomicU64,
    pub runs_adopted: AtomicU64,
    /// Claims this agent won.
    pub runs_claimed: AtomicU64,
    /// Of those, the ones whose answer left it open, proven by the run's state history.
    pub claims_checked_by_history: AtomicU64,
    /// Claims another agent or worker won first.
    pub claim_conflicts: AtomicU64,
    /// A run's scheduled time → its infrastructure created.
    pub submission_latency: Histogram,
    last: Mutex<Last>,
    /// Signalled when something a status shows changed (not on every poll).
    changed: Notify,
}

#[derive(Debug, Default, Clone)]
struct Last {
    agent_id: Option<String>,
    poll_time: Option<DateTime<Utc>>,
    error: Option<String>,
    /// Whether the last poll failed.
    failing: bool,
    /// Polls failed in a row.
    consecutive_poll_errors: u64,
    /// The agent made its `max_polls` and stopped.
    finished: bool,
    /// The agent stopped with `error`, for this reason (a condition's reason).
    stopped_reason: Option<&'static str>,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StatsSnapshot {
    pub agent_id: Option<String>,
    pub polls: u64,
    pub poll_errors: u64,
    pub runs_submitted: u64,
    pub runs_failed: u64,
    pub runs_cancelled: u64,
    pub runs_adopted: u64,
    #[serde(default)]
    pub runs_claimed: u64,
    #[serde(default)]
    pub claims_checked_by_history: u64,
    #[serde(default)]
    pub claim_conflicts: u64,
    pub last_poll_time: Option<DateTime<Utc>>,
    /// When this instance of the agent started (its poll figures before that are an
    /// earlier instance's).
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    /// Polls failed in a row (0 after a poll that worked).
    #[serde(default)]
    pub consecutive_poll_errors: u64,
    /// The agent made its `max_polls` and stopped (not a failure).
    #[serde(default)]
    pub finished: bool,
    /// The agent stopped with `last_error`, for this reason: set before its task ends,
    /// so that the status can say so at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_reason: Option<&'static str>,
}

impl Default for AgentStats {
    fn default() -> Self {
        Self {
            started_at: Utc::now(),
            polls: AtomicU64::default(),
            poll_errors: AtomicU64::default(),
            runs_submitted: AtomicU64::default(),
            runs_failed: AtomicU64::default(),
            runs_cancelled: AtomicU64::default(),
            runs_adopted: AtomicU64::default(),
            runs_claimed: AtomicU64::default(),
            claims_checked_by_history: AtomicU64::default(),
            claim_conflicts: AtomicU64::default(),
            submission_latency: latency_histogram(SUBMISSION_LATENCY.0, SUBMISSION_LATENCY.1),
            last: Mutex::default(),
            changed: Notify::new(),
        }
    }
}

impl AgentStats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits until something a status shows changed since the last wait returned.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Something a status shows changed (a run started or ended, the agent stopped).
    pub fn touch(&self) {
        // A stored permit: a change while nobody waits is not lost.
        self.changed.notify_one();
    }

    pub fn set_agent_id(&self, id: &str) {
        if let Ok(mut last) = self.last.lock() {
            last.agent_id = Some(id.to_string());
        }
        self.touch();
    }

    /// One poll, failed with `error` or not; a change only for this instance's first
    /// poll, when polling starts or stops failing, fails differently, or has failed
    /// `DEGRADED_AFTER_POLL_ERRORS` times in a row.
    pub fn polled(&self, error: Option<String>) {
        Self::inc(&self.polls);
        if error.is_some() {
            Self::inc(&self.poll_errors);
        }
        let Ok(mut last) = self.last.lock() else {
            return;
        };
        let first = last.poll_time.replace(Utc::now()).is_none();
        let failing = error.is_some();
        let mut changed = first || failing != last.failing || (failing && error != last.error);
        if failing {
            last.consecutive_poll_errors += 1;
            changed |= last.consecutive_poll_errors == DEGRADED_AFTER_POLL_ERRORS;
            last.error = error;
        } else {
            last.consecutive_poll_errors = 0;
            // Polling works again: the error it showed is over.
            if last.failing {
                last.error = None;
            }
        }
        last.failing = failing;
        drop(last);
        if changed {
            self.touch();
        }
    }

    pub fn error(&self, message: String) {
        if let Ok(mut last) = self.last.lock() {
            if last.error.as_ref() == Some(&message) {
                return;
            }
            last.error = Some(message);
        }
        self.touch();
    }

    /// The agent stopped with an error: `reason` for a condition, `message` for people.
    pub fn stopped_with(&self, reason: &'static str, message: String) {
        if let Ok(mut last) = self.last.lock() {
            last.error = Some(message);
            last.stopped_reason = Some(reason);
        }
        self.touch();
    }

    /// Continues the counts a resource's status already shows (an operator restart, a new
    /// spec): its figures go on from there instead of back to zero.
    pub fn resume_from(&self, polls: u64, submitted: u64, failed: u64) {
        self.polls.fetch_add(polls, Ordering::Relaxed);
        self.runs_submitted.fetch_add(submitted, Ordering::Relaxed);
        self.runs_failed.fetch_add(failed, Ordering::Relaxed);
    }

    /// The agent made its `max_polls` and stopped.
    pub fn finish(&self) {
        if let Ok(mut last) = self.last.lock() {
            last.finished = true;
        }
        self.touch();
    }

    /// A run was submitted.
    pub fn submitted(&self) {
        Self::inc(&self.runs_submitted);
        self.touch();
    }

    /// A run could not be started, or its infrastructure ended before it did.
    pub fn failed(&self) {
        Self::inc(&self.runs_failed);
        self.touch();
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let last = self.last.lock().map(|l| l.clone()).unwrap_or_default();
        StatsSnapshot {
            agent_id: last.agent_id,
            polls: self.polls.load(Ordering::Relaxed),
            poll_errors: self.poll_errors.load(Ordering::Relaxed),
            runs_submitted: self.runs_submitted.load(Ordering::Relaxed),
            runs_failed: self.runs_failed.load(Ordering::Relaxed),
            runs_cancelled: self.runs_cancelled.load(Ordering::Relaxed),
            runs_adopted: self.runs_adopted.load(Ordering::Relaxed),
            runs_claimed: self.runs_claimed.load(Ordering::Relaxed),
            claims_checked_by_history: self.claims_checked_by_history.load(Ordering::Relaxed),
            claim_conflicts: self.claim_conflicts.load(Ordering::Relaxed),
            last_poll_time: last.poll_time,
            started_at: Some(self.started_at),
            last_error: last.error,
            consecutive_poll_errors: last.consecutive_poll_errors,
            finished: last.finished,
            stopped_reason: last.stopped_reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a change was signalled since the last call (the permit is taken).
    fn signalled(stats: &AgentStats) -> bool {
        let waiter = stats.changed();
        let mut waiter = std::pin::pin!(waiter);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        waiter.as_mut().poll(&mut cx).is_ready()
    }

    #[test]
    fn counts_resume_from_a_status() {
        let stats = AgentStats::default();
        stats.resume_from(10, 3, 1);
        stats.polled(None);
        stats.submitted();
        let s = stats.snapshot();
        assert_eq!((s.polls, s.runs_submitted, s.runs_failed), (11, 4, 1));
    }

    #[test]
    fn only_what_a_status_shows_signals_a_change() {
        let stats = AgentStats::default();
        assert!(!signalled(&stats));
        stats.set_agent_id("a-1");
        assert!(signalled(&stats));
        // This instance's first poll is worth a write (its figures replace an earlier
        // instance's); later polls alone are not.
        stats.polled(None);
        assert!(signalled(&stats));
        stats.polled(None);
        assert!(!signalled(&stats));
        // Polling starts failing: once; the same failure again: nothing; recovery: once.
        stats.polled(Some("down".into()));
        assert!(signalled(&stats));
        stats.polled(Some("down".into()));
        assert!(!signalled(&stats));
        stats.polled(Some("refused".into()));
        assert!(signalled(&stats));
        assert_eq!(stats.snapshot().consecutive_poll_errors, 3);
        stats.polled(None);
        assert!(signalled(&stats));
        let after = stats.snapshot();
        assert_eq!(after.consecutive_poll_errors, 0);
        assert_eq!(after.last_error, None, "recovery clears the error");
        stats.submitted();
        assert!(signalled(&stats));
        stats.failed();
        assert!(signalled(&stats));
        assert_eq!(stats.snapshot().runs_submitted, 1);
        assert_eq!(stats.snapshot().runs_failed, 1);
        assert_eq!(stats.snapshot().polls, 6);
    }

    /// The failure that makes a healthy agent degraded is signalled, even when it is
    /// the same failure as the ones before: the status says so at once, not at the next
    /// refresh minutes later.
    #[test]
    fn the_failure_that_degrades_an_agent_signals_a_change() {
        let stats = AgentStats::default();
        stats.polled(None);
        assert!(signalled(&stats));
        for n in 1..=DEGRADED_AFTER_POLL_ERRORS + 2 {
            stats.polled(Some("down".into()));
            let expected = n == 1 || n == DEGRADED_AFTER_POLL_ERRORS;
            assert_eq!(signalled(&stats), expected, "failure {n}");
        }
    }
}
