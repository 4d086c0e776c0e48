//! The one HTTP client every backend uses: auth, JSON, and retries with backoff.

use std::time::Duration;

use rand::Rng;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::secret::SecretString;

/// How requests authenticate.
#[derive(Clone, Debug, Default)]
pub enum Auth {
    #[default]
    None,
    /// `Authorization: Bearer <key>` (Prefect Cloud, Prefect 1 API keys).
    Bearer(SecretString),
    /// HTTP basic auth from a `user:password` string (`PREFECT_API_AUTH_STRING`).
    Basic(SecretString),
}

impl Auth {
    /// What an API key or a `user:password` string (at most one is given) sends.
    pub fn from_credentials(key: Option<SecretString>, auth_string: Option<SecretString>) -> Self {
        match (key, auth_string) {
            (Some(k), _) => Auth::Bearer(k),
            (None, Some(s)) => Auth::Basic(s),
            (None, None) => Auth::None,
        }
    }

    /// The `Authorization` header value, for every connection that sends one (HTTP calls,
    /// the event stream's upgrade request).
    pub fn authorization(&self) -> Option<SecretString> {
        use base64::Engine;
        match self {
            Auth::None => None,
            Auth::Bearer(key) => Some(SecretString::new(format!("Bearer {}", key.expose()))),
            Auth::Basic(s) => {
                let (user, pass) = s.expose().split_once(':').unwrap_or((s.expose(), ""));
                let encoded =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                Some(SecretString::new(format!("Basic {encoded}")))
            }
        }
    }

    /// The `Authorization` header these credentials make (marked sensitive, so that no
    /// library prints it), or why they cannot be sent as one (a newline, a control
    /// character): better refused by name than sent without.
    pub fn header(&self) -> Result<Option<reqwest::header::HeaderValue>, String> {
        let Some(value) = self.authorization() else {
            return Ok(None);
        };
        match reqwest::header::HeaderValue::from_str(value.expose()) {
            Ok(mut header) => {
                header.set_sensitive(true);
                Ok(Some(header))
            }
            Err(_) if matches!(self, Auth::Bearer(_)) => Err(
                "the API key holds a newline or another character a header cannot carry; \
                 store the key alone (e.g. `kubectl create secret generic … --from-literal`)"
                    .into(),
            ),
            Err(_) => Err(
                "the auth string holds a newline or another character a header cannot carry".into(),
            ),
        }
    }

    /// Why these credentials cannot be sent, if they cannot (see [`Auth::header`]).
    pub fn check(&self) -> Result<(), String> {
        self.header().map(|_| ())
    }

    /// `text` with every form of these credentials cut out: servers echo requests back,
    /// and what they answer goes into conditions, Events and logs.
    pub fn redact(&self, text: &str) -> String {
        let secrets: Vec<String> = match self {
            Auth::None => Vec::new(),
            Auth::Bearer(key) => vec![key.expose().to_string()],
            Auth::Basic(s) => {
                let mut all = vec![s.expose().to_string()];
                if let Some((_, pass)) = s.expose().split_once(':') {
                    all.push(pass.to_string());
                }
                if let Some(header) = self.authorization() {
                    all.push(header.expose().trim_start_matches("Basic ").to_string());
                }
                all
            }
        };
        let mut out = text.to_string();
        // Longest first, so that a part does not leave the rest of a whole behind.
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 4).collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for secret in secrets {
            out = out.replace(&secret, "[redacted]");
        }
        out
    }
}

/// Why an API URL cannot be used as it is: credentials in it (`https://user:pass@host`)
/// would travel into every run's `PREFECT_API_URL`, logs and status.
pub fn check_api_url(url: &str) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(
            "the API URL holds credentials (user:password@host); put them in a Secret \
             (an API key or an auth string) instead"
                .into(),
        );
    }
    Ok(())
}

/// When and how often to retry a request that failed for a passing reason.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Total tries, the first included, while the server answers "busy" (503, locked).
    pub attempts: u32,
    /// Total tries while nothing answers at all: a wrong URL should fail fast.
    pub unreachable_attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 12,
            unreachable_attempts: 6,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff with full jitter in the upper half: `base * 2^n`, capped.
    pub fn delay(&self, retry: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << retry.min(16))
            .min(self.max_delay);
        let half = exp / 2;
        half + exp.mul_f64(rand::rng().random_range(0.0..0.5))
    }
}

/// What went wrong with a request, after retries.
#[derive(Clone, Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot reach the Prefect API at {url}: {cause}")]
    Unreachable { url: String, cause: String },
    #[error(
        "the Prefect API at {url} rejected the credentials (HTTP {status}); check the API key or auth string"
    )]
    Unauthorized { url: String, status: u16 },
    #[error("{method} {path}: not found: {detail}")]
    NotFound {
        method: Method,
        path: String,
        detail: String,
    },
    #[error("{method} {path} failed with HTTP {status}: {detail}")]
    Status {
        method: Method,
        path: String,
        status: u16,
        detail: String,
        /// A 422's whole answer (credentials redacted), for callers that say which of
        /// their fields Prefect refused; `detail` is cut short.
        refusal: Option<Box<Value>>,
    },
    #[error("{method} {path}: the response is not what was expected: {cause}")]
    Decode {
        method: Method,
        path: String,
        cause: String,
    },
    #[error("{method} {path}: the answer is larger than {limit} bytes; not read")]
    TooLarge {
        method: Method,
        path: String,
        limit: usize,
    },
    /// Never sent: an id that would change the request's path.
    #[error("refused to call the Prefect API with flow run id {id:?}: it is not a UUID")]
    BadId { id: String },
}

impl HttpError {
    /// True for failures that would likely go away by themselves.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Status { status, .. } => is_retryable_status(*status, ""),
            _ => false,
        }
    }
}

fn is_retryable_status(status: u16, body: &str) -> bool {
    matches!(status, 429 | 502 | 503 | 504)
        || (status == 500 && body.contains("database is locked"))
}

/// The innermost cause of an error: "Connection refused (os error 111)", not a chain of wrappers.
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = err;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The `detail` of a Prefect error body, or the body itself, shortened.
fn error_detail(body: &str) -> String {
    let detail = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| match v.get("detail") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
            None => v.get("exception_detail").map(|d| d.to_string()),
        })
        .unwrap_or_else(|| body.trim().to_string());
    let mut detail = detail;
    if detail.len() > 300 {
        let mut cut = 300;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push('…');
    }
    detail
}

/// One connection pool for every agent of the process: a thousand agents of one Prefect
/// server share its connections instead of holding a thousand pools.
fn shared_http() -> Result<reqwest::Client, String> {
    static HTTP: std::sync::OnceLock<Result<reqwest::Client, String>> = std::sync::OnceLock::new();
    HTTP.get_or_init(new_http).clone()
}

fn new_http() -> Result<reqwest::Client, String> {
    crate::install_crypto_provider();
    reqwest::Client::builder()
        .user_agent(concat!(
            "prefect-agent-operator/",
            env!("CARGO_PKG_VERSION")
        ))
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .pool_idle_timeout(Duration::from_secs(60))
        // Agents poll at random moments; a few kept connections serve them all.
        .pool_max_idle_per_host(32)
        .build()
        .map_err(|e| root_cause(&e))
}

/// A JSON API client bound to one base URL.
#[derive(Clone, Debug)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    auth: Auth,
    retry: RetryPolicy,
    /// Retry every 500 too (Prefect 1's client does), not only "database is locked".
    retry_server_errors: bool,
    /// The backend's latency histogram the requests count in (looked up once, here,
    /// not per request).
    latency: prometheus::Histogram,
}

impl ApiClient {
    /// `text` without this client's credentials in it.
    pub fn redact(&self, text: &str) -> String {
        self.auth.redact(text)
    }

    /// A client on the process's shared connection pool.
    pub fn new(base: &str, auth: Auth, retry: RetryPolicy) -> Result<Self, HttpError> {
        Self::on(shared_http(), base, auth, retry)
    }

    /// A client with a pool of its own: for a process with several Tokio runtimes (tests),
    /// whose connections must not outlive the runtime that made them.
    pub fn with_own_pool(base: &str, auth: Auth, retry: RetryPolicy) -> Result<Self, HttpError> {
        Self::on(new_http(), base, auth, retry)
    }

    fn on(
        http: Result<reqwest::Client, String>,
        base: &str,
        auth: Auth,
        retry: RetryPolicy,
    ) -> Result<Self, HttpError> {
        let http = http.map_err(|cause| HttpError::Unreachable {
            url: base.to_string(),
            cause,
        })?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            auth,
            retry,
            retry_server_errors: false,
            latency: crate::metrics::api_latency("prefect3"),
        })
    }

    /// Counts this client's requests under `backend` in the latency metrics.
    pub fn for_backend(mut self, backend: &'static str) -> Self {
        self.latency = crate::metrics::api_latency(backend);
        self
    }

    /// Treats every HTTP 500 as passing, as Prefect 1's client does.
    pub fn retrying_server_errors(mut self) -> Self {
        self.retry_server_errors = true;
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Sends a request and decodes a JSON answer; `204 No Content` decodes as `null`.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, HttpError> {
        let text = self.send(method.clone(), path, body).await?;
        let text = if text.is_empty() { "null" } else { &text };
        serde_json::from_str(text).map_err(|e| HttpError::Decode {
            method,
            path: path.to_string(),
            cause: e.to_string(),
        })
    }

    /// Sends a request, retrying transient failures, and returns the body of a 2xx answer.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<String, HttpError> {
        self.send_with_headers(method, path, body, &[]).await
    }

    /// Sends a request once, without retrying: for what is sent again on its own clock
    /// anyway (a heartbeat), where a retry would only add to a struggling server's load.
    pub async fn send_unretried(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<String, HttpError> {
        let url = format!("{}{}", self.base, path);
        match self.send_once(method, &url, body, &[]).await {
            Ok((_, text)) => Ok(text),
            Err(Attempt::Final(err) | Attempt::Retry { err, .. }) => Err(err),
        }
    }

    /// [`Self::send`] with extra request headers.
    pub async fn send_with_headers(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&'static str, String)],
    ) -> Result<String, HttpError> {
        let url = format!("{}{}", self.base, path);
        let started = std::time::Instant::now();
        let mut retry = 0;
        loop {
            let (err, after) = match self.send_once(method.clone(), &url, body, headers).await {
                Ok((_, text)) => return Ok(text),
                Err(Attempt::Final(e)) => return Err(e),
                Err(Attempt::Retry { err, after }) => (err, after),
            };
            let budget = match err {
                HttpError::Unreachable { .. } => self.retry.unreachable_attempts,
                _ => self.retry.attempts,
            };
            let delay = after.unwrap_or_else(|| self.retry.delay(retry));
            // However many attempts are left, one call holds its caller this long at most.
            if retry + 1 >= budget || started.elapsed() + delay >= CALL_DEADLINE {
                return Err(err);
            }
            // The first retry of a call is worth a line; a long series, the first only.
            if retry == 0 {
                tracing::warn!(%method, path, ?delay, error = %err, "retrying a Prefect API call");
            } else {
                tracing::debug!(%method, path, retry, ?delay, error = %err, "retrying Prefect API call");
            }
            tokio::time::sleep(delay).await;
            retry += 1;
        }
    }

    async fn send_once(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        headers: &[(&'static str, String)],
    ) -> Result<(StatusCode, String), Attempt> {
        let mut req = self.http.request(method.clone(), url);
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        // Checked when the settings were made; never sent without it silently.
        match self.auth.header() {
            Ok(Some(value)) => req = req.header(reqwest::header::AUTHORIZATION, value),
            Ok(None) => {}
            Err(_) => {
                return Err(Attempt::Final(HttpError::Unauthorized {
                    url: self.base.clone(),
                    status: 0,
                }));
            }
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let path = url.strip_prefix(&self.base).unwrap_or(url).to_string();
        let started = std::time::Instant::now();
        let sent = req.send().await;
        crate::metrics::observe(&self.latency, started.elapsed());
        let resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                return Err(Attempt::Retry {
                    err: HttpError::Unreachable {
                        url: self.base.clone(),
                        cause: root_cause(&e),
                    },
                    after: None,
                });
            }
        };
        let status = resp.status();
        // Where a burst's time goes, call by call (off unless asked for at trace level).
        tracing::trace!(%method, path, status = status.as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "prefect call");
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|s| Duration::from_secs(s.min(30)));
        let text = match read_capped(resp, MAX_BODY).await {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Err(Attempt::Final(HttpError::TooLarge {
                    method,
                    path,
                    limit: MAX_BODY,
                }));
            }
            Err(e) => {
                return Err(Attempt::Retry {
                    err: HttpError::Unreachable {
                        url: self.base.clone(),
                        cause: root_cause(&e),
                    },
                    after: None,
                });
            }
        };
        if status.is_success() {
            return Ok((status, text));
        }
        let code = status.as_u16();
        let err = match code {
            401 | 403 => HttpError::Unauthorized {
                url: self.base.clone(),
                status: code,
            },
            404 => HttpError::NotFound {
                method,
                path,
                detail: error_detail(&self.auth.redact(&text)),
            },
            _ => HttpError::Status {
                method,
                path,
                status: code,
                detail: error_detail(&self.auth.redact(&text)),
                refusal: (code == 422)
                    .then(|| serde_json::from_str(&self.auth.redact(&text)).ok())
                    .flatten()
                    .map(Box::new),
            },
        };
        if is_retryable_status(code, &text) || (self.retry_server_errors && code == 500) {
            Err(Attempt::Retry {
                err,
                after: retry_after,
            })
        } else {
            Err(Attempt::Final(err))
        }
    }
}

/// The largest answer read: a run list of 200 runs with their job variables is far
/// below; a hostile or broken server's endless body is cut here, not in memory.
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// The longest one call may take, retries included.
pub const CALL_DEADLINE: Duration = Duration::from_secs(90);

/// The body as text, or `None` when it is longer than `limit` bytes (not read further).
async fn read_capped(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Option<String>, reqwest::Error> {
    let declared = resp.content_length();
    if declared.is_some_and(|n| n > limit as u64) {
        return Ok(None);
    }
    // One buffer of the declared size (no doubling), turned into the text in place: a
    // large answer is held once, not three times.
    let mut body = Vec::with_capacity(declared.map_or(0, |n| n as usize));
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(match String::from_utf8(body) {
        Ok(text) => text,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }))
}

enum Attempt {
    Final(HttpError),
    Retry {
        err: HttpError,
        after: Option<Duration>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_headers_as_reqwest_would_write_them() {
        let bearer = Auth::Bearer(SecretString::new("pnu_k"));
        assert_eq!(bearer.authorization().unwrap().expose(), "Bearer pnu_k");
        // base64("admin:pass") and base64("admin:"), as basic_auth(user, Some(pass)).
        let basic = Auth::Basic(SecretString::new("admin:pass"));
        assert_eq!(
            basic.authorization().unwrap().expose(),
            "Basic YWRtaW46cGFzcw=="
        );
        let user_only = Auth::Basic(SecretString::new("admin"));
        assert_eq!(
            user_only.authorization().unwrap().expose(),
            "Basic YWRtaW46"
        );
        assert!(Auth::None.authorization().is_none());
    }

    #[test]
    fn retry_delays_grow_and_are_capped() {
        let p = RetryPolicy {
            attempts: 10,
            unreachable_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        };
        for n in 0..10 {
            let d = p.delay(n);
            let exp = (Duration::from_millis(100) * 2u32.pow(n)).min(Duration::from_secs(2));
            assert!(
                d >= exp / 2 && d <= exp,
                "retry {n}: {d:?} not in [{:?}, {exp:?}]",
                exp / 2
            );
        }
    }

    #[test]
    fn retryable_statuses() {
        assert!(is_retryable_status(503, ""));
        assert!(is_retryable_status(429, ""));
        assert!(is_retryable_status(
            500,
            "sqlite3.OperationalError: database is locked"
        ));
        assert!(!is_retryable_status(500, "boom"));
        assert!(!is_retryable_status(404, ""));
        assert!(!is_retryable_status(422, ""));
    }

    #[test]
    fn credentials_are_cut_out_of_what_servers_answer() {
        let key = Auth::Bearer(SecretString::new("pnu_canary_123"));
        assert_eq!(
            key.redact(r#"{"detail": "bad key pnu_canary_123 given"}"#),
            r#"{"detail": "bad key [redacted] given"}"#
        );
        let basic = Auth::Basic(SecretString::new("admin:s3cret-pass"));
        let header = basic.authorization().unwrap().expose().to_string();
        let echoed = format!("got admin:s3cret-pass, s3cret-pass and {header}");
        let redacted = basic.redact(&echoed);
        assert!(!redacted.contains("s3cret"), "{redacted}");
        assert!(
            !redacted.contains(header.trim_start_matches("Basic ")),
            "{redacted}"
        );
    }

    /// A server that answers an endless body: the call ends at the cap, with an error that
    /// says so, instead of reading it all into memory.
    #[tokio::test]
    async fn an_endless_answer_is_cut_at_the_cap() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n[")
                .await;
            let chunk = vec![b'1'; 64 * 1024];
            // Far more than the cap, unless the client stops reading first.
            for _ in 0..(2 * MAX_BODY / chunk.len()) {
                if conn.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        let api = ApiClient::with_own_pool(
            &format!("http://{addr}/api"),
            Auth::None,
            RetryPolicy::default(),
        )
        .unwrap();
        let err = api
            .call::<Value>(Method::GET, "/big", None)
            .await
            .unwrap_err();
        assert!(matches!(err, HttpError::TooLarge { .. }), "{err}");
    }

    #[test]
    fn credentials_in_the_url_are_refused() {
        assert!(check_api_url("http://127.0.0.1:4200/api").is_ok());
        let err = check_api_url("http://user:PASS@host/api").unwrap_err();
        assert!(err.contains("Secret") && !err.contains("PASS"), "{err}");
        assert!(check_api_url("https://token@host/api").is_err());
    }

    #[test]
    fn a_key_a_header_cannot_carry_is_refused_by_name() {
        assert!(
            Auth::Bearer(SecretString::new("pnu_abc\n"))
                .check()
                .unwrap_err()
                .contains("newline")
        );
        assert!(Auth::Bearer(SecretString::new("pnu_abc")).check().is_ok());
        assert!(Auth::None.check().is_ok());
    }

    #[test]
    fn error_detail_reads_prefect_bodies() {
        assert_eq!(
            error_detail(r#"{"detail": "Work pool \"x\" not found."}"#),
            r#"Work pool "x" not found."#
        );
        assert!(error_detail(r#"{"exception_message":"Invalid request received.","exception_detail":[{"loc":["body"]}]}"#).contains("loc"));
        assert_eq!(error_detail("plain text\n"), "plain text");
        assert!(error_detail(&"é".repeat(400)).ends_with('…'));
    }
}
