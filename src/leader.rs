//! Leader election on a `coordination.k8s.io/v1` Lease, so that of several operator
//! replicas exactly one runs agents. The holder renews the Lease every `renew_every`;
//! another replica takes it over once `lease_duration` has passed without a renewal.
//! Writes are optimistic (`resourceVersion`): two replicas racing for an expired Lease
//! cannot both win. A leader that cannot renew within the lease duration stops leading.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

/// Where the Lease is and who we are.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    /// This replica (the pod name, else host name and pid).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

impl LeaderConfig {
    pub fn new(namespace: String, name: String, identity: String) -> Self {
        Self {
            namespace,
            name,
            identity,
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(4),
        }
    }
}

/// Whether `identity` may write itself into the Lease at `now`.
pub fn may_take(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> bool {
    let Some(spec) = spec else { return true };
    match spec.holder_identity.as_deref() {
        None | Some("") => return true,
        Some(holder) if holder == identity => return true,
        Some(_) => {}
    }
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    match &spec.renew_time {
        Some(MicroTime(renewed)) => {
            renewed
                .checked_add(SignedDuration::from_secs(duration))
                .ok()
                < Some(now)
        }
        None => true,
    }
}

fn spec_for(cfg: &LeaderConfig, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let ours = previous.and_then(|s| s.holder_identity.as_deref()) == Some(cfg.identity.as_str());
    let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(cfg.lease_duration.as_secs() as i32),
        acquire_time: if ours {
            previous.and_then(|s| s.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if ours { transitions } else { transitions + 1 }),
        ..LeaseSpec::default()
    }
}

/// One attempt to take or renew the Lease: `Ok(true)` when we hold it now.
pub async fn try_hold(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(spec_for(cfg, None, now)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            if !may_take(lease.spec.as_ref(), &cfg.identity, now) {
                return Ok(false);
            }
            lease.spec = Some(spec_for(cfg, lease.spec.as_ref(), now));
            // `replace` carries the resourceVersion we read: a concurrent writer wins, we lose.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Why leading ended.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "lost the leader Lease {0}: another replica holds it or it could not be renewed in time"
    )]
    Lost(String),
}

/// Waits until this replica holds the Lease (or `stop`), then returns a token that is
/// cancelled when leadership is lost; a task keeps renewing until `stop`.
pub async fn lead(
    client: Client,
    cfg: LeaderConfig,
    stop: CancellationToken,
) -> Option<(
    CancellationToken,
    tokio::task::JoinHandle<Result<(), LeaderError>>,
)> {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut logged = false;
    loop {
        match try_hold(&api, &cfg).await {
            Ok(true) => break,
            Ok(false) if !logged => {
                tracing::info!(lease = %cfg.name, "standing by: another replica leads");
                logged = true;
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "could not read or take the leader Lease"),
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.renew_every) => {}
            _ = stop.cancelled() => return None,
        }
    }
    tracing::info!(lease = %cfg.name, identity = %cfg.identity, "leading");
    let lost = CancellationToken::new();
    let lost_tx = lost.clone();
    let renewer = tokio::spawn(async move {
        let mut last_held = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(cfg.renew_every) => {}
                _ = stop.cancelled() => {
                    release(&api, &cfg).await;
                    return Ok(());
                }
            }
            match try_hold(&api, &cfg).await {
                Ok(true) => last_held = std::time::Instant::now(),
                Ok(false) => {
                    lost_tx.cancel();
                    return Err(LeaderError::Lost(cfg.name.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew the leader Lease");
                    // Stop before another replica may take it over.
                    if last_held.elapsed() + cfg.renew_every >= cfg.lease_duration {
                        lost_tx.cancel();
                        return Err(LeaderError::Lost(cfg.name.clone()));
                    }
                }
            }
        }
    });
    Some((lost, renewer))
}

/// Hands the Lease over at once on a clean shutdown (a standby need not wait it out).
async fn release(api: &Api<Lease>, cfg: &LeaderConfig) {
    let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await else {
        return;
    };
    let Some(spec) = lease.spec.as_mut() else {
        return;
    };
    if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
        return;
    }
    spec.holder_identity = None;
    spec.renew_time = None;
    if let Err(e) = api.replace(&cfg.name, &PostParams::default(), &lease).await {
        tracing::debug!(error = %e, "could not release the leader Lease");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn held_by(holder: &str, renewed: &str) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_live_lease_belongs_to_its_holder() {
        let now = at("2026-01-01T00:00:10Z");
        let lease = held_by("a", "2026-01-01T00:00:00Z");
        assert!(may_take(Some(&lease), "a", now), "the holder renews");
        assert!(!may_take(Some(&lease), "b", now), "others wait");
        assert!(may_take(None, "b", now));
        assert!(may_take(Some(&LeaseSpec::default()), "b", now), "released");
    }

    #[test]
    fn an_expired_lease_can_be_taken_over() {
        let lease = held_by("a", "2026-01-01T00:00:00Z");
        assert!(!may_take(Some(&lease), "b", at("2026-01-01T00:00:15Z")));
        assert!(may_take(Some(&lease), "b", at("2026-01-01T00:00:15.001Z")));
    }

    #[test]
    fn taking_over_counts_a_transition() {
        let cfg = LeaderConfig::new("ns".into(), "l".into(), "b".into());
        let now = at("2026-01-01T00:01:00Z");
        let mut previous = held_by("a", "2026-01-01T00:00:00Z");
        previous.lease_transitions = Some(2);
        let taken = spec_for(&cfg, Some(&previous), now);
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.lease_transitions, Some(3));
        assert_eq!(taken.acquire_time, Some(MicroTime(now)));
        let renewed = spec_for(&cfg, Some(&taken), at("2026-01-01T00:01:04Z"));
        assert_eq!(renewed.lease_transitions, Some(3));
        assert_eq!(
            renewed.acquire_time,
            Some(MicroTime(now)),
            "kept on renewal"
        );
    }
}
