//! Prefect 3's event stream as a wake-up call. When a flow run of a pool turns SCHEDULED,
//! the agents of that pool are woken and their poll loop polls at once: claims still
//! happen in that one loop, and polling stays the safety net (runs made by a deployment's
//! schedule emit no event until they turn Late; a dropped connection loses events).
//! A run turning CANCELLING wakes the agents' cancellation check the same way.
//!
//! One websocket per Prefect server and credential serves every agent of the process;
//! it closes once the last of them has stopped, and reconnects with backoff.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use super::http::{ApiClient, Auth, RetryPolicy};
use reqwest::Method;

/// Which of an agent's loops an event concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topic {
    /// A run turned SCHEDULED (created, rescheduled, awaiting a retry): the poll loop.
    NewRun,
    /// A run turned CANCELLING: the cancellation check.
    Cancelling,
}

/// What an event asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Wake {
    /// Nothing: not a run becoming schedulable or cancelled.
    Nobody,
    /// The agents of this pool.
    Pool(Topic, String),
    /// Every agent of the server (the event names no pool).
    Everyone(Topic),
}

/// Whom a message of the stream wakes, and for what.
pub fn wakes(message: &Value) -> Wake {
    if message["type"] != "event" {
        return Wake::Nobody;
    }
    let event = &message["event"];
    if !event["event"]
        .as_str()
        .is_some_and(|e| e.starts_with("prefect.flow-run."))
    {
        return Wake::Nobody;
    }
    let topic = match event["resource"]["prefect.state-type"].as_str() {
        Some("SCHEDULED") => Topic::NewRun,
        Some("CANCELLING") => Topic::Cancelling,
        _ => return Wake::Nobody,
    };
    event["related"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["prefect.resource.role"] == "work-pool")
        .and_then(|r| r["prefect.resource.name"].as_str())
        .map_or(Wake::Everyone(topic), |pool| {
            Wake::Pool(topic, pool.to_string())
        })
}

/// Where an agent wants to be woken.
#[derive(Clone, Debug)]
pub struct Wakers {
    pub new_runs: Arc<Notify>,
    pub cancellations: Arc<Notify>,
}

/// The websocket address of a Prefect API URL (`http://h/api` → `ws://h/api/events/out`).
pub fn events_url(api_url: &str) -> Option<String> {
    let base = api_url.trim_end_matches('/');
    let rest = base
        .strip_prefix("https://")
        .map(|r| format!("wss://{r}"))
        .or_else(|| base.strip_prefix("http://").map(|r| format!("ws://{r}")))?;
    Some(format!("{rest}/events/out"))
}

/// Tells credentials apart without keeping them: clients with different keys must not
/// share a stream.
pub(crate) fn credential_hash(auth: &Auth) -> u64 {
    let mut hasher = DefaultHasher::new();
    match auth {
        Auth::None => 0u8.hash(&mut hasher),
        Auth::Bearer(k) => (1u8, k.expose()).hash(&mut hasher),
        Auth::Basic(s) => (2u8, s.expose()).hash(&mut hasher),
    }
    hasher.finish()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct FeedKey {
    url: String,
    /// A hash of the credential: agents with different keys must not share a stream,
    /// and the key itself is kept out of the map.
    credential: u64,
}

/// The agents listening on one stream: (pool, topic, wake-up).
#[derive(Default)]
struct Feed {
    subscribers: Mutex<Vec<(String, Topic, Weak<Notify>)>>,
    /// The stream is up now: events arrive.
    connected: AtomicBool,
    /// The server has no stream (Prefect 2 without `PREFECT_EXPERIMENTAL_EVENTS`): it is
    /// not asked again while the process runs.
    absent: AtomicBool,
}

/// An agent's view of its stream: whether events arrive right now. While they do not,
/// the agent checks for cancellations at its poll rate instead of waiting to be woken.
#[derive(Clone)]
pub struct EventLink(Arc<Feed>);

impl EventLink {
    pub fn connected(&self) -> bool {
        self.0.connected.load(Ordering::Relaxed)
    }
}

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum StreamEnd {
    /// The server answered the upgrade with this HTTP status instead of a websocket.
    Refused(u16),
    /// Anything else: unreachable, dropped, auth refused.
    Failed(String),
}

impl std::fmt::Display for StreamEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(status) => {
                write!(f, "the server answered the upgrade with HTTP {status}")
            }
            Self::Failed(e) => f.write_str(e),
        }
    }
}

/// Whether a server that refused the stream with HTTP `status` has none at all: a
/// Prefect 2 server, whose stream is off unless it runs with
/// `PREFECT_EXPERIMENTAL_EVENTS=true` (it answers 500 and logs an error each time; before
/// 2.14, 404). A Prefect 3 server, or one that does not say its version, refusing is a
/// passing failure (a proxy during a rollout, a server starting): retried with backoff.
pub fn has_no_stream(status: u16, server_version: Option<&str>) -> bool {
    (400..600).contains(&status) && server_version.is_some_and(|v| v.starts_with("2."))
}

impl Feed {
    /// Drops stopped agents; true while some are left.
    fn alive(&self) -> bool {
        let Ok(mut subs) = self.subscribers.lock() else {
            return false;
        };
        subs.retain(|(_, _, w)| w.strong_count() > 0);
        !subs.is_empty()
    }

    /// Wakes the agents `wake` names, and forgets stopped ones on the way: a stream that
    /// stays up while agents come and go would otherwise keep an entry for each.
    fn wake(&self, wake: &Wake) {
        let Ok(mut subs) = self.subscribers.lock() else {
            return;
        };
        subs.retain(|(pool, topic, notify)| {
            let Some(n) = notify.upgrade() else {
                return false;
            };
            let hit = match wake {
                Wake::Nobody => false,
                Wake::Everyone(t) => t == topic,
                Wake::Pool(t, p) => t == topic && p == pool,
            };
            if hit {
                n.notify_one();
            }
            true
        });
    }
}

/// The process's event streams.
#[derive(Default)]
pub struct EventHub {
    feeds: Mutex<HashMap<FeedKey, Arc<Feed>>>,
}

impl EventHub {
    pub fn global() -> &'static EventHub {
        static HUB: std::sync::OnceLock<EventHub> = std::sync::OnceLock::new();
        HUB.get_or_init(EventHub::default)
    }

    /// Wakes `wakers` whenever a run of `pool` on the server at `api_url` turns SCHEDULED
    /// or CANCELLING, for as long as the caller holds them. Must be called within a Tokio
    /// runtime. None when there is no stream to listen to.
    pub fn subscribe(
        &'static self,
        api_url: &str,
        auth: &Auth,
        pool: &str,
        wakers: &Wakers,
    ) -> Option<EventLink> {
        let Some(url) = events_url(api_url) else {
            tracing::warn!(%api_url, "no event stream for this URL; polling only");
            return None;
        };
        let key = FeedKey {
            url,
            credential: credential_hash(auth),
        };
        let Ok(mut feeds) = self.feeds.lock() else {
            return None;
        };
        let feed = feeds.entry(key.clone()).or_insert_with(|| {
            let feed = Arc::new(Feed::default());
            let api_url = api_url.to_string();
            tokio::spawn(self.run(key, api_url, auth.clone(), feed.clone()));
            feed
        });
        if feed.absent.load(Ordering::Relaxed) {
            return None;
        }
        if let Ok(mut subs) = feed.subscribers.lock() {
            subs.push((
                pool.to_string(),
                Topic::NewRun,
                Arc::downgrade(&wakers.new_runs),
            ));
            subs.push((
                pool.to_string(),
                Topic::Cancelling,
                Arc::downgrade(&wakers.cancellations),
            ));
        }
        Some(EventLink(feed.clone()))
    }

    /// Removes the feed when nobody listens any more (under the hub's lock, so that a
    /// concurrent `subscribe` either finds it alive or starts a new one).
    fn retire_if_idle(&self, key: &FeedKey, feed: &Arc<Feed>) -> bool {
        let Ok(mut feeds) = self.feeds.lock() else {
            return true;
        };
        // An absent stream stays known as such (one entry per server), so that agents
        // started later do not ask again.
        if feed.alive() || feed.absent.load(Ordering::Relaxed) {
            return false;
        }
        if feeds.get(key).is_some_and(|f| Arc::ptr_eq(f, feed)) {
            feeds.remove(key);
        }
        true
    }

    async fn run(&'static self, key: FeedKey, api_url: String, auth: Auth, feed: Arc<Feed>) {
        let mut failures: u32 = 0;
        loop {
            if self.retire_if_idle(&key, &feed) {
                tracing::debug!(url = %key.url, "event stream closed: no agent listens");
                return;
            }
            let ended = stream(&key.url, &auth, feed.as_ref()).await;
            feed.connected.store(false, Ordering::Relaxed);
            match ended {
                Ok(()) => failures = 0,
                Err(StreamEnd::Refused(status))
                    if has_no_stream(status, server_version(&api_url, &auth).await.as_deref()) =>
                {
                    feed.absent.store(true, Ordering::Relaxed);
                    if let Ok(mut subs) = feed.subscribers.lock() {
                        subs.clear();
                    }
                    tracing::warn!(url = %key.url, status, "this Prefect server has no event stream \
                        (a Prefect 2 server needs PREFECT_EXPERIMENTAL_EVENTS=true); polling only, \
                        and cancellations are checked at the poll rate");
                    return;
                }
                Err(e) => {
                    failures += 1;
                    // Said once per outage; the poll loop carries on regardless.
                    if failures == 1 {
                        tracing::warn!(url = %key.url, error = %e, "event stream unavailable; polling only until it is back");
                    } else {
                        tracing::debug!(url = %key.url, error = %e, failures, "event stream still unavailable");
                    }
                }
            }
            tokio::time::sleep(backoff(failures)).await;
        }
    }
}

/// 1 s, 2 s, 4 s, … up to a minute, with jitter so that restarts do not reconnect in step.
pub(crate) fn backoff(failures: u32) -> Duration {
    let base = Duration::from_secs(1u64 << failures.min(6)).min(Duration::from_secs(60));
    base.mul_f64(rand::rng().random_range(0.5..1.0))
}

/// The server's version, if it says.
pub(crate) async fn server_version(api_url: &str, auth: &Auth) -> Option<String> {
    let once = RetryPolicy {
        attempts: 1,
        unreachable_attempts: 1,
        ..RetryPolicy::default()
    };
    let api = ApiClient::new(api_url, auth.clone(), once).ok()?;
    api.call(Method::GET, "/admin/version", None).await.ok()
}

/// What one connection listens for, and what it does with it.
pub(crate) trait Listener: Send + Sync {
    /// The event names it wants, by prefix.
    fn prefixes(&self) -> &'static [&'static str];
    /// One message of the stream.
    fn heard(&self, message: &Value);
    /// False once nobody needs the stream: it is closed.
    fn alive(&self) -> bool;
    /// The stream is up (events arrive) or down.
    fn connected(&self, up: bool);
}

impl Listener for Feed {
    fn prefixes(&self) -> &'static [&'static str] {
        &["prefect.flow-run."]
    }
    fn heard(&self, message: &Value) {
        self.wake(&wakes(message));
    }
    fn alive(&self) -> bool {
        Feed::alive(self)
    }
    fn connected(&self, up: bool) {
        self.connected.store(up, Ordering::Relaxed);
    }
}

/// One connection: auth, filter, then events until it drops or nobody listens.
pub(crate) async fn stream(url: &str, auth: &Auth, feed: &impl Listener) -> Result<(), StreamEnd> {
    use tokio_tungstenite::tungstenite::Error as WsError;
    let failed = |e: &dyn std::fmt::Display| StreamEnd::Failed(e.to_string());
    let mut request = url.into_client_request().map_err(|e| failed(&e))?;
    let headers = request.headers_mut();
    headers.insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("prefect"),
    );
    // A server behind basic auth checks the upgrade request; a key goes in the auth message.
    if let Auth::Basic(_) = auth
        && let Some(value) = auth.header().map_err(StreamEnd::Failed)?
    {
        headers.insert("Authorization", value);
    }
    let connect = tokio_tungstenite::connect_async(request);
    let (mut ws, _) = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| failed(&"connecting timed out"))?
        .map_err(|e| match e {
            WsError::Http(answer) => StreamEnd::Refused(answer.status().as_u16()),
            e => failed(&e),
        })?;
    // A self-hosted server with PREFECT_SERVER_API_AUTH_STRING wants the auth string
    // itself as the token (as Prefect's own event subscriber sends it).
    let token = match auth {
        Auth::Bearer(k) | Auth::Basic(k) => json!(k.expose()),
        Auth::None => Value::Null,
    };
    send(&mut ws, json!({"type": "auth", "token": token}))
        .await
        .map_err(StreamEnd::Failed)?;
    let answer = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .map_err(|_| failed(&"no answer to auth"))?;
    match answer {
        Some(Ok(Message::Text(t))) if t.contains("auth_success") => {}
        Some(Ok(other)) => {
            return Err(StreamEnd::Failed(format!(
                "auth refused: {}",
                short(&other.to_string())
            )));
        }
        Some(Err(e)) => return Err(failed(&e)),
        None => return Err(failed(&"closed during auth")),
    }
    let since = k8s_openapi::jiff::Timestamp::now().to_string();
    // `until` must lie in the future or nothing streams.
    send(
        &mut ws,
        json!({"type": "filter", "backfill": false, "filter": {
            "occurred": {"since": since, "until": "2100-01-01T00:00:00Z"},
            "event": {"prefix": feed.prefixes()}}}),
    )
    .await
    .map_err(StreamEnd::Failed)?;
    tracing::debug!(%url, "event stream connected");
    feed.connected(true);
    let mut check = tokio::time::interval(Duration::from_secs(30));
    check.tick().await;
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&t) {
                        feed.heard(&v);
                    }
                }
                Some(Ok(Message::Close(_))) | None => return Ok(()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(failed(&e)),
            },
            _ = check.tick() => if !feed.alive() {
                let _ = ws.close(None).await;
                return Ok(());
            },
        }
    }
}

async fn send<S>(ws: &mut S, v: Value) -> Result<(), String>
where
    S: futures::Sink<Message> + Unpin,
    S::Error: std::fmt::Display,
{
    ws.send(Message::text(v.to_string()))
        .await
        .map_err(|e| e.to_string())
}

fn short(s: &str) -> String {
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(name: &str, state_type: &str, pool: Option<&str>) -> Value {
        let mut related = vec![json!({"prefect.resource.id": "prefect.flow.f",
                                      "prefect.resource.role": "flow"})];
        if let Some(p) = pool {
            related.push(json!({"prefect.resource.id": "prefect.work-pool.x",
                                "prefect.resource.role": "work-pool",
                                "prefect.resource.name": p}));
        }
        json!({"type": "event", "event": {"event": name,
            "resource": {"prefect.resource.id": "prefect.flow-run.r",
                         "prefect.state-type": state_type},
            "related": related}})
    }

    #[test]
    fn a_run_turning_scheduled_wakes_its_pool() {
        let e = event("prefect.flow-run.Scheduled", "SCHEDULED", Some("k8s"));
        assert_eq!(wakes(&e), Wake::Pool(Topic::NewRun, "k8s".into()));
        let retry = event("prefect.flow-run.AwaitingRetry", "SCHEDULED", Some("k8s"));
        assert_eq!(wakes(&retry), Wake::Pool(Topic::NewRun, "k8s".into()));
        let no_pool = event("prefect.flow-run.Scheduled", "SCHEDULED", None);
        assert_eq!(wakes(&no_pool), Wake::Everyone(Topic::NewRun));
        let cancel = event("prefect.flow-run.Cancelling", "CANCELLING", Some("k8s"));
        assert_eq!(wakes(&cancel), Wake::Pool(Topic::Cancelling, "k8s".into()));
    }

    #[test]
    fn other_events_wake_nobody() {
        for e in [
            event("prefect.flow-run.Running", "RUNNING", Some("k8s")),
            event("prefect.task-run.Scheduled", "SCHEDULED", Some("k8s")),
            event("prefect.flow-run.Pending", "PENDING", Some("k8s")),
            json!({"type": "auth_success"}),
            json!({"type": "event", "event": null}),
            json!("garbage"),
        ] {
            assert_eq!(wakes(&e), Wake::Nobody, "{e}");
        }
    }

    #[test]
    fn only_a_server_without_a_stream_is_left_alone_for_good() {
        assert!(has_no_stream(500, Some("2.20.27")), "Prefect 2, events off");
        assert!(
            has_no_stream(404, Some("2.12.1")),
            "Prefect 2 before the route"
        );
        assert!(!has_no_stream(404, Some("3.9.1")), "Prefect 3: passing");
        assert!(!has_no_stream(500, Some("3.9.1")), "Prefect 3: passing");
        assert!(!has_no_stream(404, None), "unknown: retried");
    }

    #[test]
    fn the_stream_lives_beside_the_api() {
        assert_eq!(
            events_url("http://127.0.0.1:4200/api/").as_deref(),
            Some("ws://127.0.0.1:4200/api/events/out")
        );
        assert_eq!(
            events_url("https://api.prefect.cloud/api/accounts/a/workspaces/w").as_deref(),
            Some("wss://api.prefect.cloud/api/accounts/a/workspaces/w/events/out")
        );
        assert_eq!(events_url("ftp://x"), None);
    }

    #[test]
    fn only_live_subscribers_of_the_pool_are_woken() {
        let feed = Feed::default();
        let a = Arc::new(Notify::new());
        let b = Arc::new(Notify::new());
        let a_cancel = Arc::new(Notify::new());
        {
            let mut subs = feed.subscribers.lock().unwrap();
            subs.push(("a".into(), Topic::NewRun, Arc::downgrade(&a)));
            subs.push(("a".into(), Topic::Cancelling, Arc::downgrade(&a_cancel)));
            subs.push(("b".into(), Topic::NewRun, Arc::downgrade(&b)));
        }
        feed.wake(&Wake::Pool(Topic::NewRun, "a".into()));
        // A wake-up is a stored permit: the first poll of `notified()` sees it.
        use futures::FutureExt;
        assert!(a.notified().now_or_never().is_some(), "a woken");
        assert!(b.notified().now_or_never().is_none(), "b not woken");
        assert!(a_cancel.notified().now_or_never().is_none(), "not for this");
        drop(a_cancel);
        drop(a);
        // Any event forgets the stopped agents, woken or not.
        feed.wake(&Wake::Nobody);
        assert_eq!(feed.subscribers.lock().unwrap().len(), 1, "b is left");
        drop(b);
        assert!(!feed.alive());
    }
}
