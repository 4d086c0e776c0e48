//! Joins concurrent calls of one kind into one request. In a burst, sixteen submissions
//! each reading "their" run, deployment or shipping "their" log line become one filter
//! call or one `POST /logs/` with sixteen entries: the Prefect server, not this process,
//! is what bounds a burst, and it pays per request far more than per item.
//!
//! A lone call goes out at once (no timer, no added latency); calls that arrive while a
//! request is in flight wait for it and go out together in the next one.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::http::HttpError;

type BatchFuture<O> = Pin<Box<dyn Future<Output = Result<Vec<O>, HttpError>> + Send>>;
type SendBatch<I, O> = Arc<dyn Fn(Vec<I>) -> BatchFuture<O> + Send + Sync>;
type Waiter<I, O> = (I, oneshot::Sender<Result<O, HttpError>>);

/// Calls `send` with every item queued since its last call; `send` answers one output
/// per item, in order.
pub struct Coalescer<I, O> {
    what: &'static str,
    max_batch: usize,
    send: SendBatch<I, O>,
    /// The queue of the worker task, started on first use (inside a runtime) and again
    /// should the runtime it ran on be gone.
    queue: Mutex<Option<mpsc::UnboundedSender<Waiter<I, O>>>>,
}

impl<I: Send + 'static, O: Send + 'static> Coalescer<I, O> {
    pub fn new<F, Fut>(what: &'static str, max_batch: usize, send: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<O>, HttpError>> + Send + 'static,
    {
        Self {
            what,
            max_batch: max_batch.max(1),
            send: Arc::new(move |items| Box::pin(send(items))),
            queue: Mutex::new(None),
        }
    }

    pub async fn call(&self, item: I) -> Result<O, HttpError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue((item, tx));
        rx.await.unwrap_or_else(|_| Err(self.lost()))
    }

    fn enqueue(&self, waiter: Waiter<I, O>) {
        let Ok(mut queue) = self.queue.lock() else {
            let _ = waiter.1.send(Err(self.lost()));
            return;
        };
        let waiter = match queue.as_ref() {
            Some(q) => match q.send(waiter) {
                Ok(()) => return,
                Err(mpsc::error::SendError(w)) => w,
            },
            None => waiter,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(waiter);
        tokio::spawn(work(rx, self.send.clone(), self.max_batch));
        *queue = Some(tx);
    }

    fn lost(&self) -> HttpError {
        HttpError::Unreachable {
            url: self.what.to_string(),
            cause: "the batching task stopped".into(),
        }
    }
}

async fn work<I, O>(
    mut rx: mpsc::UnboundedReceiver<Waiter<I, O>>,
    send: SendBatch<I, O>,
    max_batch: usize,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let (items, waiters): (Vec<I>, Vec<_>) = batch.into_iter().unzip();
        let n = items.len();
        match send(items).await {
            Ok(outs) if outs.len() == n => {
                for (w, o) in waiters.into_iter().zip(outs) {
                    let _ = w.send(Ok(o));
                }
            }
            Ok(outs) => {
                let e = HttpError::Decode {
                    method: reqwest::Method::POST,
                    path: "(batched call)".into(),
                    cause: format!("{} answers to {n} items", outs.len()),
                };
                for w in waiters {
                    let _ = w.send(Err(e.clone()));
                }
            }
            Err(e) => {
                for w in waiters {
                    let _ = w.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Answers kept for reuse: a burst's runs mostly share one deployment and one flow, and
/// each read of them costs the server as much as a claim's share of a poll. At most `cap`
/// answers are kept (all are dropped when full); `clear` drops them all, and an answer
/// read before a `clear` is not kept after it.
pub struct Memo<K, V> {
    cap: usize,
    kept: Mutex<(u64, HashMap<K, V>)>,
}

impl<K: Eq + Hash, V: Clone> Memo<K, V> {
    pub fn new(cap: usize) -> Self {
        Self {
            cap: cap.max(1),
            kept: Mutex::new((0, HashMap::new())),
        }
    }

    /// The kept answer, or the generation a read started now is to be kept under.
    pub fn get(&self, key: &K) -> Result<V, u64> {
        let Ok(kept) = self.kept.lock() else {
            return Err(u64::MAX);
        };
        kept.1.get(key).cloned().ok_or(kept.0)
    }

    /// Keeps an answer read in `generation`, unless cleared since.
    pub fn keep(&self, generation: u64, key: K, value: V) {
        if let Ok(mut kept) = self.kept.lock()
            && kept.0 == generation
        {
            if kept.1.len() >= self.cap {
                kept.1.clear();
            }
            kept.1.insert(key, value);
        }
    }

    pub fn clear(&self) {
        if let Ok(mut kept) = self.kept.lock() {
            kept.0 += 1;
            kept.1.clear();
        }
    }
}

/// Answers read ahead for the runs next in line. A burst's claims go out a few at a time
/// (the submission slots), each after a read of its run, so one at a time the reads would
/// be a request each. Instead the read that one run's claim needs also reads the runs the
/// last poll listed after it, the ones whose slots come next; their answers serve their
/// own claims if still `fresh` by then, and are read again otherwise. Each answer serves
/// once.
pub struct ReadAhead<V> {
    fresh: Duration,
    ahead: usize,
    state: Mutex<ReadAheadState<V>>,
}

struct ReadAheadState<V> {
    /// The last poll's runs, in its order, and where each is in it.
    order: Vec<String>,
    position: HashMap<String, usize>,
    /// Answers read ahead, with when their read was sent.
    read: HashMap<String, (Instant, V)>,
}

impl<V> ReadAhead<V> {
    pub fn new(fresh: Duration, ahead: usize) -> Self {
        Self {
            fresh,
            ahead,
            state: Mutex::new(ReadAheadState {
                order: Vec::new(),
                position: HashMap::new(),
                read: HashMap::new(),
            }),
        }
    }

    /// A poll sent at `at` found these runs, in this order (the order their claims go out
    /// in): the poll is a read of each, as fresh as any.
    pub fn polled(&self, answers: impl IntoIterator<Item = (String, V)>, at: Instant) {
        if let Ok(mut state) = self.state.lock() {
            // Answers no claim took (runs left for later polls) go once stale: the poll of
            // an agent at its concurrency limit finds runs it does not claim, again and again.
            let fresh = self.fresh;
            state
                .read
                .retain(|_, (read, _)| at.saturating_duration_since(*read) <= fresh);
            state.order.clear();
            for (id, answer) in answers {
                state.order.push(id.clone());
                state.read.insert(id, (at, answer));
            }
            let position = state
                .order
                .iter()
                .enumerate()
                .map(|(i, id)| (id.clone(), i))
                .collect();
            state.position = position;
        }
    }

    /// `id`'s answer if one was read ahead at most `fresh` before `now`; otherwise the ids
    /// to read now: `id` first, then up to `ahead` runs polled after it without a fresh
    /// answer.
    pub fn take(&self, id: &str, now: Instant) -> Result<V, Vec<String>> {
        let Ok(mut state) = self.state.lock() else {
            return Err(vec![id.to_string()]);
        };
        let fresh = self.fresh;
        state
            .read
            .retain(|_, (at, _)| now.saturating_duration_since(*at) <= fresh);
        if let Some((_, answer)) = state.read.remove(id) {
            return Ok(answer);
        }
        let mut ids = vec![id.to_string()];
        if let Some(&at) = state.position.get(id) {
            ids.extend(
                state.order[at + 1..]
                    .iter()
                    .filter(|next| !state.read.contains_key(*next))
                    .take(self.ahead)
                    .cloned(),
            );
        }
        Err(ids)
    }

    /// Keeps an answer for `id` read (sent) at `at`.
    pub fn keep(&self, id: String, answer: V, at: Instant) {
        if let Ok(mut state) = self.state.lock() {
            state.read.insert(id, (at, answer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_read_takes_the_next_polled_runs_along_and_their_answers_serve_once_while_fresh() {
        let ra = ReadAhead::new(Duration::from_secs(1), 2);
        let t0 = Instant::now();
        let polled = |names: &[&str], at| ra.polled(names.iter().map(|n| (n.to_string(), 0)), at);
        polled(&["a", "b", "c", "d", "e"], t0 - Duration::from_secs(5));
        // `a`'s poll is too old: its read also reads the two after it.
        assert_eq!(ra.take("a", t0), Err(ids(&["a", "b", "c"])));
        ra.keep("b".into(), 2, t0);
        ra.keep("c".into(), 3, t0);
        assert_eq!(ra.take("b", t0 + Duration::from_millis(500)), Ok(2));
        // Served once: read again, with the next ones that have no answer (`c` has).
        assert_eq!(
            ra.take("b", t0 + Duration::from_millis(600)),
            Err(ids(&["b", "d", "e"]))
        );
        // Too old by the time its slot came: read again.
        assert_eq!(
            ra.take("c", t0 + Duration::from_millis(1500)),
            Err(ids(&["c", "d", "e"]))
        );
        // A run no poll listed (an adopted claim, say) is read alone.
        assert_eq!(ra.take("z", t0), Err(ids(&["z"])));
        // A new poll's order replaces the last one's, and its answers serve while fresh;
        // stale answers nobody took are dropped with it.
        ra.keep("y".into(), 9, t0 - Duration::from_secs(2));
        polled(&["e", "f"], t0);
        assert_eq!(ra.state.lock().unwrap().read.len(), 2);
        assert_eq!(ra.take("e", t0 + Duration::from_millis(900)), Ok(0));
        assert_eq!(ra.take("d", t0), Err(ids(&["d"])));
        assert_eq!(
            ra.take("f", t0 + Duration::from_millis(1100)),
            Err(ids(&["f"]))
        );
    }

    #[tokio::test]
    async fn concurrent_calls_share_requests_and_get_their_own_answers() {
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let c = Arc::new(Coalescer::new("test", 8, move |items: Vec<u32>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::task::yield_now().await;
                Ok(items.into_iter().map(|i| i * 10).collect())
            }
        }));
        let calls: Vec<_> = (0..20u32)
            .map(|i| {
                let c = c.clone();
                tokio::spawn(async move { c.call(i).await })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), i as u32 * 10);
        }
        let n = requests.load(Ordering::SeqCst);
        assert!((3..20).contains(&n), "20 calls in {n} requests");
    }

    #[tokio::test]
    async fn a_failed_request_fails_each_of_its_calls_and_the_next_goes_out() {
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let f = fail.clone();
        let c = Coalescer::new("test", 8, move |items: Vec<u32>| {
            let fail = f.swap(false, Ordering::SeqCst);
            async move {
                if fail {
                    Err(HttpError::Unreachable {
                        url: "http://x".into(),
                        cause: "refused".into(),
                    })
                } else {
                    Ok(items)
                }
            }
        });
        let e = c.call(1).await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert_eq!(c.call(2).await.unwrap(), 2);
    }

    #[test]
    fn a_memo_keeps_answers_until_cleared_and_never_more_than_its_cap() {
        let m = Memo::new(2);
        let g = m.get(&"a").unwrap_err();
        m.keep(g, "a", 1);
        m.keep(g, "b", 2);
        assert_eq!((m.get(&"a"), m.get(&"b")), (Ok(1), Ok(2)));
        m.keep(g, "c", 3);
        assert_eq!((m.get(&"a").ok(), m.get(&"c").ok()), (None, Some(3)));
        m.clear();
        assert_eq!(m.get(&"c").ok(), None);
        // Read before the clear, answered after it: stale, not kept.
        m.keep(g, "d", 4);
        assert_eq!(m.get(&"d").ok(), None);
    }

    #[tokio::test]
    async fn a_wrong_number_of_answers_is_an_error_not_a_mix_up() {
        let c: Coalescer<u32, u32> = Coalescer::new("test", 8, |_: Vec<u32>| async { Ok(vec![]) });
        let e: HttpError = c.call(1).await.unwrap_err();
        assert!(e.to_string().contains("0 answers to 1 items"), "{e}");
    }
}
