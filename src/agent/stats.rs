//! What an agent has done so far: counters for status, health and metrics.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::metrics::Histogram;

/// Live counters, updated by the loop and read by the health API.
#[derive(Debug, Default)]
pub struct AgentStats {
    pub polls: AtomicU64,
    pub poll_errors: AtomicU64,
    pub runs_submitted: AtomicU64,
    pub runs_failed: AtomicU64,
    pub runs_cancelled: AtomicU64,
    pub runs_adopted: AtomicU64,
    /// Claims this agent won.
    pub runs_claimed: AtomicU64,
    /// Claims another agent or worker won first.
    pub claim_conflicts: AtomicU64,
    /// A run's scheduled time → its infrastructure created.
    pub submission_latency: Histogram,
    last: Mutex<Last>,
}

#[derive(Debug, Default, Clone)]
struct Last {
    agent_id: Option<String>,
    poll_time: Option<DateTime<Utc>>,
    error: Option<String>,
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
    pub claim_conflicts: u64,
    pub last_poll_time: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
}

impl AgentStats {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_agent_id(&self, id: &str) {
        if let Ok(mut last) = self.last.lock() {
            last.agent_id = Some(id.to_string());
        }
    }

    pub fn polled(&self, error: Option<String>) {
        Self::inc(&self.polls);
        if error.is_some() {
            Self::inc(&self.poll_errors);
        }
        if let Ok(mut last) = self.last.lock() {
            last.poll_time = Some(Utc::now());
            if error.is_some() {
                last.error = error;
            }
        }
    }

    pub fn error(&self, message: String) {
        if let Ok(mut last) = self.last.lock() {
            last.error = Some(message);
        }
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
            claim_conflicts: self.claim_conflicts.load(Ordering::Relaxed),
            last_poll_time: last.poll_time,
            last_error: last.error,
        }
    }
}
