//! The agents the operator runs: one task per resource generation, restarted with a
//! doubling delay when it fails, and what each is doing for the resource's status.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent::stats::{AgentStats, StatsSnapshot};

/// How long a failed agent waits before the supervisor starts it again: doubling from
/// the first, up to the last; an agent that ran this long counts as healthy again.
pub const RESTART_FIRST: Duration = Duration::from_secs(10);
pub const RESTART_MAX: Duration = Duration::from_secs(300);
const HEALTHY_AFTER: Duration = Duration::from_secs(600);

/// The wait before restarting an agent that failed `failures` times in a row (≥ 1).
pub fn restart_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    RESTART_FIRST
        .saturating_mul(1 << doublings)
        .min(RESTART_MAX)
}

/// One running agent task.
struct Running {
    generation: Option<i64>,
    token: CancellationToken,
    stats: Arc<AgentStats>,
    handle: JoinHandle<()>,
    started: Instant,
    /// Failed runs of this generation in a row, counting this one once it ends.
    failures: u32,
    /// When the supervisor first saw this task ended.
    ended: Option<Instant>,
    /// A fingerprint of the credentials the agent started with, and when the Secrets
    /// were last read again to compare.
    credentials: u64,
    checked: Instant,
}

/// How often a running agent's Secrets are read again for a rotated key; while its
/// polls fail, at most this often instead.
pub const CREDENTIALS_RECHECK: Duration = Duration::from_secs(300);
pub const CREDENTIALS_RECHECK_FAILING: Duration = Duration::from_secs(10);

/// A lock's guard even after a panic elsewhere poisoned it: what it guards (agents, their
/// counts, the Event recorder) must stay usable, above all to stop agents.
pub fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A resource's lifetime counts, which outlive each of its agents (a spec change,
/// suspension, a failed start): the next agent continues from them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub polls: u64,
    pub runs_submitted: u64,
    pub runs_failed: u64,
}

impl Counts {
    pub fn of(s: &StatsSnapshot) -> Self {
        Self {
            polls: s.polls,
            runs_submitted: s.runs_submitted,
            runs_failed: s.runs_failed,
        }
    }

    /// Each count the larger of the two (both count from the resource's creation).
    pub fn max(self, o: Self) -> Self {
        Self {
            polls: self.polls.max(o.polls),
            runs_submitted: self.runs_submitted.max(o.runs_submitted),
            runs_failed: self.runs_failed.max(o.runs_failed),
        }
    }
}

/// Agent tasks by `namespace/name`.
#[derive(Default)]
pub struct Supervisor {
    agents: Mutex<HashMap<String, Running>>,
    /// The counts of agents stopped or replaced, by resource, until it is deleted.
    carried: Mutex<HashMap<String, Counts>>,
}

/// What the supervisor knows about one resource's agent, for its status.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentPhase {
    /// Not started: the resource is suspended.
    Suspended,
    /// The spec cannot be run as it is; reason and message.
    Invalid {
        reason: &'static str,
        message: String,
    },
    /// The spec is fine but waits for something else (a PrefectWorkPool to be Ready).
    Waiting {
        reason: &'static str,
        message: String,
    },
    /// The agent task runs; `stats` says how far it got.
    Running { stats: StatsSnapshot },
    /// The agent task ended with this error and will be restarted after `retry_in`.
    Failed {
        reason: &'static str,
        message: String,
        retry_in: Duration,
    },
    /// The agent made its `maxPolls` and stopped; it runs again when the spec changes.
    Finished { stats: StatsSnapshot },
}

impl Supervisor {
    /// The agents, even after a panic elsewhere poisoned the lock: an agent must always
    /// be stoppable.
    fn agents(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        locked(&self.agents)
    }

    pub fn stop(&self, key: &str) {
        let removed = self.agents().remove(key);
        if let Some(r) = removed {
            r.token.cancel();
            self.carry(key, &r);
        }
    }

    fn carry(&self, key: &str, r: &Running) {
        let counts = Counts::of(&r.stats.snapshot());
        let mut carried = locked(&self.carried);
        let slot = carried.entry(key.to_string()).or_default();
        *slot = slot.max(counts);
    }

    /// What the resource's agents have counted so far: its current agent's counts, or
    /// those its stopped agents left.
    pub fn counts(&self, key: &str) -> Counts {
        let carried = locked(&self.carried).get(key).copied().unwrap_or_default();
        let current = self
            .agents()
            .get(key)
            .map(|r| Counts::of(&r.stats.snapshot()))
            .unwrap_or_default();
        carried.max(current)
    }

    /// Stops `key`'s agent and waits, at most `within`, for the launches it has under
    /// way: a resource's finalizer is released only after them.
    pub async fn stop_and_wait(&self, key: &str, within: Duration) {
        let removed = self.agents().remove(key);
        // The resource is going: nothing continues its counts.
        locked(&self.carried).remove(key);
        let Some(r) = removed else {
            return;
        };
        r.token.cancel();
        if tokio::time::timeout(within, r.handle).await.is_err() {
            tracing::warn!(
                resource = key,
                ?within,
                "the agent did not stop in time; its claims are left to adoption"
            );
        }
    }

    /// The running agent for `key` if it runs the given generation and has not failed.
    pub fn current(&self, key: &str, generation: Option<i64>) -> Option<AgentPhase> {
        let mut agents = self.agents();
        let r = agents.get_mut(key)?;
        if r.generation != generation {
            return None;
        }
        let stats = r.stats.snapshot();
        // The agent says it stopped before its task is over: the status need not wait
        // for the next resync to say so.
        if r.handle.is_finished() || stats.finished || stats.stopped_reason.is_some() {
            if stats.finished {
                return Some(AgentPhase::Finished { stats });
            }
            let reason = stats.stopped_reason.unwrap_or("AgentFailed");
            let last = stats
                .last_error
                .unwrap_or_else(|| "the agent stopped".into());
            let ended = *r.ended.get_or_insert_with(Instant::now);
            let retry_in = restart_delay(r.failures + 1);
            if ended.elapsed() < retry_in {
                return Some(AgentPhase::Failed {
                    reason,
                    message: last,
                    retry_in,
                });
            }
            return None;
        }
        Some(AgentPhase::Running { stats })
    }

    /// The fingerprint `key`'s agent started with, when its Secrets are due to be read
    /// again (`failing`: its polls fail, perhaps for a key rotated since).
    pub fn credentials_due(&self, key: &str, failing: bool) -> Option<u64> {
        let mut agents = self.agents();
        let r = agents.get_mut(key)?;
        let gap = if failing {
            CREDENTIALS_RECHECK_FAILING
        } else {
            CREDENTIALS_RECHECK
        };
        (r.checked.elapsed() >= gap).then(|| {
            r.checked = Instant::now();
            r.credentials
        })
    }

    pub fn start(
        &self,
        key: String,
        generation: Option<i64>,
        token: CancellationToken,
        stats: Arc<AgentStats>,
        handle: JoinHandle<()>,
        credentials: u64,
    ) {
        // Recorded even behind a poisoned lock: an agent left out could never be stopped.
        let mut agents = self.agents();
        // A restart of the same generation after a quick failure backs off further.
        let failures = match agents.get(&key) {
            Some(old)
                if old.generation == generation
                    && old.handle.is_finished()
                    && old.started.elapsed() < HEALTHY_AFTER =>
            {
                old.failures + 1
            }
            _ => 0,
        };
        let running = Running {
            generation,
            token,
            stats,
            handle,
            started: Instant::now(),
            failures,
            ended: None,
            credentials,
            checked: Instant::now(),
        };
        if let Some(old) = agents.insert(key.clone(), running) {
            old.token.cancel();
            drop(agents);
            self.carry(&key, &old);
        }
    }

    /// Each running agent's counters, by `namespace/name`.
    pub fn snapshots(&self) -> Vec<(String, StatsSnapshot, prometheus::Histogram)> {
        let mut out: Vec<_> = self
            .agents()
            .iter()
            .map(|(k, r)| {
                let latency = r.stats.submission_latency.clone();
                (k.clone(), r.stats.snapshot(), latency)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Stops every agent (operator shutdown) and waits, at most `within`, for them to
    /// finish what they were launching.
    pub async fn stop_all(&self, within: Duration) {
        let handles: Vec<JoinHandle<()>> = self
            .agents()
            .drain()
            .map(|(_, r)| {
                r.token.cancel();
                r.handle
            })
            .collect();
        let all = futures::future::join_all(handles);
        if tokio::time::timeout(within, all).await.is_err() {
            tracing::warn!(
                ?within,
                "agents still launching at shutdown; leaving them to adoption"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn agents_start_and_stop_behind_a_poisoned_lock() {
        let supervisor = Supervisor::default();
        std::thread::scope(|s| {
            let _ = s
                .spawn(|| {
                    let _held = supervisor.agents.lock();
                    panic!("poison the lock");
                })
                .join();
        });
        assert!(supervisor.agents.is_poisoned());
        let token = CancellationToken::new();
        let stop = token.clone();
        let handle = tokio::spawn(async move { stop.cancelled().await });
        let stats = Arc::new(AgentStats::default());
        supervisor.start("ns/a".into(), Some(1), token.clone(), stats, handle, 0);
        assert!(matches!(
            supervisor.current("ns/a", Some(1)),
            Some(AgentPhase::Running { .. })
        ));
        assert_eq!(supervisor.snapshots().len(), 1);
        supervisor
            .stop_and_wait("ns/a", Duration::from_secs(5))
            .await;
        assert!(token.is_cancelled(), "the agent was told to stop");
        assert!(supervisor.current("ns/a", Some(1)).is_none());
    }

    /// An agent's counts outlive it (suspension, a new generation), not the resource.
    #[tokio::test]
    async fn counts_carry_over_to_the_next_agent_until_the_resource_goes() {
        let supervisor = Supervisor::default();
        let start = |generation: i64, polls: u64, submitted: u64| {
            let token = CancellationToken::new();
            let stop = token.clone();
            let handle = tokio::spawn(async move { stop.cancelled().await });
            let stats = Arc::new(AgentStats::default());
            stats.resume_from(polls, submitted, 0);
            supervisor.start("ns/a".into(), Some(generation), token, stats, handle, 0);
        };
        start(1, 5, 2);
        assert_eq!(supervisor.counts("ns/a").runs_submitted, 2);
        // A new generation replaces the agent before its counts were written anywhere.
        start(2, 0, 0);
        assert_eq!(supervisor.counts("ns/a").polls, 5);
        supervisor.stop("ns/a");
        let kept = supervisor.counts("ns/a");
        assert_eq!((kept.polls, kept.runs_submitted), (5, 2), "suspended");
        supervisor
            .stop_and_wait("ns/a", Duration::from_secs(5))
            .await;
        assert_eq!(supervisor.counts("ns/a"), Counts::default(), "deleted");
    }
}
