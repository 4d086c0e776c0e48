//! The agent's maintenance pass, on its own clock: runs this agent claimed but never
//! launched (a crash between claim and launch) are adopted, and cancellations are carried
//! out (the run CANCELLED, then its Job deleted).

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::Inner;
use super::stats::AgentStats;
use crate::backend::events::EventLink;
use crate::backend::{Backend, FlowRun};
use crate::deploy::{Deployer, Stopped};

impl<B: Backend, D: Deployer> Inner<B, D> {
    /// A claim may have been left unlaunched just now: scan for orphans again.
    pub(super) fn trouble(&self) {
        if let Ok(mut t) = self.trouble.lock() {
            t.since = std::time::Instant::now();
            t.cleared = false;
        }
        self.trouble_poke.notify_one();
    }

    /// Cancellations and re-adoption of unlaunched claims, on their own clock. With the
    /// event stream waking it for cancellations, the cancellation scan is only the safety
    /// net and runs every `EVENT_SAFETY_NET_TICKS` rounds; while no events arrive (no
    /// stream, or it is down), cancellations are looked for at the poll rate.
    pub(super) async fn maintenance_loop(
        self: Arc<Self>,
        stop: CancellationToken,
        events: Option<EventLink>,
    ) {
        let mut tick: u32 = 0;
        let mut woken = false;
        // Whether the last scan found and dealt with every cancellation there was: the
        // first one of this instance covers what earlier instances (a restart) left.
        let mut scanned = false;
        loop {
            // Boxed: a launch inside is a large future, and inline it would make every
            // idle agent's sleeping loop that large (a thousand agents, a thousand copies).
            Box::pin(self.adopt_orphans(&stop)).await;
            let events_arrive = events.as_ref().is_some_and(EventLink::connected);
            if scan_due(woken, events_arrive, tick, scanned, || {
                self.may_need_cancelling()
            }) {
                scanned = Box::pin(self.carry_out_cancellations(&stop)).await;
            }
            tick = tick.wrapping_add(1);
            let rounds = rounds_to_sleep(events_arrive, self.orphans_cleared(), tick);
            tick = tick.wrapping_add(rounds - 1);
            let sleep = if events_arrive {
                self.cfg.maintenance_interval
            } else {
                self.cfg.maintenance_interval.min(self.cfg.poll_interval)
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep * rounds) => woken = false,
                _ = self.cancel_poke.notified() => {
                    tracing::debug!("woken by a cancellation");
                    woken = true;
                }
                // A claim may have been left unlaunched: orphan scans start again.
                _ = self.trouble_poke.notified() => woken = false,
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Whether a run of this agent could be cancelling: some of its infrastructure may be
    /// unfinished, a claim may wait for adoption or is being launched, or a cancelled
    /// run's infrastructure is still to stop. When none is, a scan can find nothing of
    /// ours (a run claimed and left unlaunched by an earlier instance is found by this
    /// instance's first scan), and an idle agent makes one request a minute fewer.
    fn may_need_cancelling(&self) -> bool {
        let busy = self.busy.runs.lock().map(|b| !b.is_empty()).unwrap_or(true);
        let unstopped = self.unstopped.lock().map(|u| !u.is_empty()).unwrap_or(true);
        busy || unstopped || !self.orphans_cleared() || self.deployer.may_have_running()
    }

    /// No claim of ours can be waiting for adoption (see `Trouble`).
    fn orphans_cleared(&self) -> bool {
        self.trouble.lock().map(|t| t.cleared).unwrap_or(false)
    }

    pub(super) async fn adopt_orphans(self: &Arc<Self>, stop: &CancellationToken) {
        let started = std::time::Instant::now();
        if self.orphans_cleared() {
            return;
        }
        let launched = self.launched_unrecorded();
        let orphans = match self.backend.orphans(self.cfg.adopt_after, &launched).await {
            Ok(runs) => runs,
            Err(e) => {
                tracing::warn!(error = %e, "could not look for unlaunched claims");
                return;
            }
        };
        if orphans.is_empty()
            && let Ok(mut t) = self.trouble.lock()
            && started >= t.since + LATE_CLAIMS + self.cfg.adopt_after
        {
            // Whatever was left unlaunched before `since` would have shown by now, and a
            // claim an earlier process sent would have landed.
            t.cleared = true;
        }
        for run in orphans {
            if stop.is_cancelled() {
                return;
            }
            let Some(_guard) = self.mark_busy(&run.id) else {
                continue;
            };
            let span = tracing::info_span!("flow_run", flow_run = %run.id, name = %run.name);
            async {
                match self.backend.still_unlaunched(&run).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not re-check an unlaunched claim");
                        return;
                    }
                }
                match self.deployer.find(&run).await {
                    Ok(Some(infra_id)) => {
                        tracing::info!(%infra_id, "claimed run already has infrastructure; recording it");
                        if let Err(e) = self.backend.launched(&run.id, &infra_id).await {
                            tracing::warn!(error = %e, "could not record the infrastructure id");
                        }
                        return;
                    }
                    Ok(None) => {}
                    // Not knowing is not "none": looked at again on the next pass.
                    Err(e) => {
                        self.trouble();
                        tracing::warn!(error = %e, "could not tell whether an unlaunched claim has infrastructure; will look again");
                        return;
                    }
                }
                tracing::info!(claimed_at = ?run.state_since, "launching a run claimed earlier but never launched");
                AgentStats::inc(&self.stats.runs_adopted);
                self.launch(run.clone()).await;
            }
            .instrument(span)
            .await;
        }
    }

    /// One scan for cancelling runs, each carried out if it is ours; whether the scan was
    /// made and every run in it dealt with (a failure is tried again at the next scan).
    pub(super) async fn carry_out_cancellations(&self, stop: &CancellationToken) -> bool {
        self.stop_again().await;
        let runs = match self.backend.cancelling().await {
            Ok(runs) => runs,
            Err(e) => {
                tracing::warn!(error = %e, "could not look for cancellations");
                return false;
            }
        };
        let mut complete = true;
        for run in runs {
            if stop.is_cancelled() {
                return false;
            }
            let span = tracing::info_span!("flow_run", flow_run = %run.id, name = %run.name);
            complete &= async {
                // Busy elsewhere: a launch or an adoption under way, which the next
                // scan sees through.
                let Some(_guard) = self.mark_busy(&run.id) else {
                    return true;
                };
                match self.ours_to_cancel(&run).await {
                    Some(true) => {}
                    Some(false) => return true,
                    None => return false,
                }
                // Recorded before the infrastructure is stopped: on the SIGTERM that
                // follows, Prefect's runner reschedules a run that is not final yet, and
                // Prefect accepts that reschedule even after a CANCELLED that lands later:
                // the run would start again (seen on the real node).
                if let Err(e) = self.backend.cancelled(&run.id).await {
                    // Still CANCELLING: the next pass tries again.
                    tracing::error!(error = %e, "could not mark the run cancelled");
                    return false;
                }
                AgentStats::inc(&self.stats.runs_cancelled);
                tracing::info!("flow run cancelled");
                self.stop_infrastructure(run).await;
                true
            }
            .instrument(span)
            .await;
        }
        complete
    }

    /// Whether a CANCELLING run is this agent's to cancel: its infrastructure is ours, or
    /// it has none and we claimed it (nobody else will finish it then). None when that
    /// could not be told now.
    async fn ours_to_cancel(&self, run: &FlowRun) -> Option<bool> {
        if !self.deployer.owns(run) {
            return Some(false);
        }
        if run.infrastructure_pid.is_some() {
            return Some(true);
        }
        match self.deployer.find(run).await {
            Ok(Some(_)) => return Some(true),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not look for the run's infrastructure; will look again");
                return None;
            }
        }
        match self.backend.claimed_by_me(run).await {
            Ok(true) => {
                tracing::info!("cancelled before it was launched");
                Some(true)
            }
            Ok(false) => {
                tracing::debug!("cancelling run claimed by another agent; left to it");
                Some(false)
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not read who claimed the run");
                None
            }
        }
    }

    /// Stops a cancelled run's infrastructure; one that could not be stopped is tried
    /// again at every maintenance pass (the run is already CANCELLED in Prefect).
    async fn stop_infrastructure(&self, run: FlowRun) {
        match self.deployer.stop(&run).await {
            Ok(Stopped::Stopped) => tracing::info!("stopped the run's infrastructure"),
            Ok(Stopped::NotFound | Stopped::NotMine) => {}
            Err(e) => {
                tracing::error!(error = %e, "could not stop the cancelled run's infrastructure; will try again");
                if let Ok(mut unstopped) = self.unstopped.lock() {
                    unstopped.push(run);
                }
            }
        }
    }

    /// Tries again to stop what earlier cancellations could not.
    async fn stop_again(&self) {
        let runs = match self.unstopped.lock() {
            Ok(mut unstopped) => std::mem::take(&mut *unstopped),
            Err(_) => return,
        };
        for run in runs {
            let span = tracing::info_span!("flow_run", flow_run = %run.id, name = %run.name);
            self.stop_infrastructure(run).instrument(span).await;
        }
    }
}

/// How long a claim sent by an earlier process (killed mid-request) may take to land: its
/// request can wait in a busy server (SQLite's lock, a queue) for seconds. Orphan scans go
/// on this much longer after a start, so that such a claim is seen and, where it landed
/// on a finished run, undone.
const LATE_CLAIMS: std::time::Duration = std::time::Duration::from_secs(30);

/// With events arriving, every this many maintenance rounds the cancellations are scanned
/// anyway (a missed event).
const EVENT_SAFETY_NET_TICKS: u32 = 6;

/// Whether round `tick` scans for cancellations: when an event woke it, at every round
/// while no events arrive and every `EVENT_SAFETY_NET_TICKS` rounds while they do; and
/// then only until a scan succeeded while nothing of the agent's could be cancelling.
fn scan_due(
    woken: bool,
    events_arrive: bool,
    tick: u32,
    scanned: bool,
    may_need_cancelling: impl FnOnce() -> bool,
) -> bool {
    if woken {
        return true;
    }
    let round = !events_arrive || tick.is_multiple_of(EVENT_SAFETY_NET_TICKS);
    round && (!scanned || may_need_cancelling())
}

/// How many maintenance rounds to sleep through at once. With events arriving and no claim
/// waiting for adoption, the rounds before the next safety-net scan have nothing to do:
/// an idle agent wakes once a minute instead of every 10 s (a thousand agents, a hundred
/// wakeups a second). `tick` is the round about to come.
fn rounds_to_sleep(events_arrive: bool, orphans_cleared: bool, tick: u32) -> u32 {
    if !(events_arrive && orphans_cleared) {
        return 1;
    }
    match tick % EVENT_SAFETY_NET_TICKS {
        0 => 1,
        r => EVENT_SAFETY_NET_TICKS - r + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_with_nothing_to_cancel_scans_once_then_only_when_woken() {
        let nothing = || false;
        let something = || true;
        // The first scan of an instance is made, whatever it has.
        assert!(scan_due(false, true, 0, false, nothing));
        // Then, with nothing that could be cancelling: no safety-net scan, events or not.
        assert!(!scan_due(false, true, 0, true, nothing));
        assert!(!scan_due(false, false, 3, true, nothing));
        // A cancellation event wakes a scan regardless.
        assert!(scan_due(true, true, 3, true, nothing));
        // With a Job unfinished or a claim under way: at the safety-net rounds with
        // events, at every round without.
        assert!(scan_due(
            false,
            true,
            EVENT_SAFETY_NET_TICKS,
            true,
            something
        ));
        assert!(!scan_due(false, true, 1, true, something));
        assert!(scan_due(false, false, 1, true, something));
        // A scan that failed is made again at the next round that is due.
        assert!(scan_due(
            false,
            true,
            EVENT_SAFETY_NET_TICKS,
            false,
            nothing
        ));
    }

    #[test]
    fn an_idle_agent_sleeps_until_its_next_safety_net_scan() {
        // Round 0 scanned; rounds 1..=5 have nothing to do: woken for round 6.
        assert_eq!(rounds_to_sleep(true, true, 1), 6);
        assert_eq!(rounds_to_sleep(true, true, 4), 3);
        assert_eq!(rounds_to_sleep(true, true, 6), 1);
        // The rounds land on every sixth, as before.
        let mut tick = 1;
        let mut scans = Vec::new();
        for _ in 0..4 {
            tick += rounds_to_sleep(true, true, tick) - 1;
            scans.push(tick);
            tick += 1;
        }
        assert_eq!(scans, [6, 12, 18, 24]);
        // Orphans to look for, or no events: every round.
        assert_eq!(rounds_to_sleep(true, false, 1), 1);
        assert_eq!(rounds_to_sleep(false, true, 1), 1);
    }
}
