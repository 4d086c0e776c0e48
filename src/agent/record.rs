//! Where a launched run's infrastructure id is recorded in Prefect, with its "Submitted
//! for execution" log line: once the burst it came in is over, not in the middle of it.
//!
//! The id is for Prefect's UI and for readers who find runs by it (the orphan scan skips a
//! run that has one). Nothing about exactly-once waits for it: a Job's name is its run's,
//! and a run launched but not yet recorded is known to this agent (the orphan scan leaves
//! it alone). Written at once, it is a third call per run at the moment the server is
//! busiest; written after the burst, the runs get their Jobs sooner and the server does
//! the same work when it has time.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Inner;
use crate::backend::{Backend, LogLevel};
use crate::deploy::Deployer;

/// Launched runs whose infrastructure id Prefect has not been told yet.
#[derive(Debug, Default)]
pub(super) struct Unrecorded {
    runs: HashMap<String, Pending>,
}

#[derive(Debug)]
struct Pending {
    infra_id: String,
    /// The run log line that says so, and when it was written.
    line: String,
    at: DateTime<Utc>,
    since: Instant,
}

/// A sustained stream of runs has no "after the burst": an id is written this long after
/// its launch at the latest.
const RECORD_WITHIN: Duration = Duration::from_secs(30);
/// How often the queue is looked at while it holds ids.
const LOOK_EVERY: Duration = Duration::from_millis(500);
/// Writes under way at once.
const WRITERS: usize = 4;

/// Which ids to write now: all of them once the burst is over (nothing being worked on,
/// and the last poll found nothing new), else those that waited [`RECORD_WITHIN`].
/// Between a burst's polls the backlog can touch zero for a moment; writing then put a
/// poll's worth of ids among the next poll's claims.
fn due(backlog: usize, bursting: bool, ages: &[(String, Duration)]) -> Vec<String> {
    let over = backlog == 0 && !bursting;
    ages.iter()
        .filter(|(_, age)| over || *age >= RECORD_WITHIN)
        .map(|(id, _)| id.clone())
        .collect()
}

impl<B: Backend, D: Deployer> Inner<B, D> {
    /// Queues a launched run's infrastructure id and its log line for
    /// [`Inner::record_loop`].
    pub(super) fn record_later(&self, run_id: &str, infra_id: String, line: String) {
        if let Ok(mut u) = self.unrecorded.lock() {
            u.runs.insert(
                run_id.to_string(),
                Pending {
                    infra_id,
                    line,
                    at: Utc::now(),
                    since: Instant::now(),
                },
            );
        }
        self.record_poke.notify_one();
    }

    /// Runs launched by this process whose id is still to be written.
    pub(super) fn launched_unrecorded(&self) -> HashSet<String> {
        self.unrecorded
            .lock()
            .map(|u| u.runs.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Writes queued ids as [`due`] says, until `stop`; what is left then is written by
    /// [`Inner::record_all`] once the submissions under way are done.
    pub(super) async fn record_loop(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let waiting = self
                .unrecorded
                .lock()
                .map(|u| !u.runs.is_empty())
                .unwrap_or(false);
            tokio::select! {
                _ = tokio::time::sleep(LOOK_EVERY), if waiting => {}
                _ = self.record_poke.notified(), if !waiting => {}
                _ = stop.cancelled() => return,
            }
            let now = Instant::now();
            let ages: Vec<(String, Duration)> = match self.unrecorded.lock() {
                Ok(u) => u
                    .runs
                    .iter()
                    .map(|(id, p)| (id.clone(), now - p.since))
                    .collect(),
                Err(_) => return,
            };
            let bursting = self.bursting.load(std::sync::atomic::Ordering::Relaxed);
            self.record(due(self.backlog(), bursting, &ages)).await;
        }
    }

    /// Writes every queued id (the agent is stopping).
    pub(super) async fn record_all(&self) {
        let all = self.launched_unrecorded();
        self.record(all.into_iter().collect()).await;
    }

    async fn record(&self, ids: Vec<String>) {
        let taken: Vec<(String, Pending)> = match self.unrecorded.lock() {
            Ok(mut u) => ids
                .into_iter()
                .filter_map(|id| u.runs.remove(&id).map(|p| (id, p)))
                .collect(),
            Err(_) => return,
        };
        futures::stream::iter(&taken)
            .for_each_concurrent(WRITERS, |(run_id, p)| {
                let span = tracing::info_span!("flow_run", flow_run = %run_id);
                async move {
                    if let Err(e) = self.backend.launched(run_id, &p.infra_id).await {
                        // Not lost: an orphan scan finds the run's Job by name and
                        // records it.
                        self.trouble();
                        tracing::warn!(error = %e, infra_id = %p.infra_id, "could not record the infrastructure id");
                    }
                }
                .instrument(span)
            })
            .await;
        // All at once, so that they go out in few requests (`coalesce`).
        futures::future::join_all(
            taken
                .iter()
                .map(|(run_id, p)| self.run_log_at(run_id, LogLevel::Info, &p.line, p.at)),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_wait_for_the_burst_to_end_or_half_a_minute() {
        let ages = vec![
            ("fresh".to_string(), Duration::from_secs(1)),
            ("old".to_string(), RECORD_WITHIN),
        ];
        assert_eq!(due(5, false, &ages), ["old"]);
        let mut all = due(0, false, &ages);
        all.sort();
        assert_eq!(all, ["fresh", "old"]);
        assert!(due(3, false, &ages[..1]).is_empty());
        assert!(due(0, false, &[]).is_empty());
        // Nothing under way, but the last poll found runs: the next poll may find more.
        assert_eq!(due(0, true, &ages), ["old"]);
    }
}
