//! The async Rust client of the registry: typed calls for the public HTTP
//! API, failover between nodes, retries, auto-registration
//! ([`auto_register`]) and a change stream of one service
//! ([`RegistryClient::watch_service`]).
//!
//! It owns talking to the registry over HTTP and nothing else: it knows the
//! contract's JSON shapes, not the server's types, so it works against any
//! node version that keeps the contract.
//!
//! Failover: the client sticks to the node that last answered. A connection
//! error, a timeout or a `503` (also `502`/`504`, as a proxy in front of a
//! node would answer) moves it to the next node in the list, after a
//! full-jitter exponential backoff (50 ms doubling to 1 s, or the server's
//! `Retry-After` when that fits the remaining budget). After
//! [`ClientOptions::retry_budget`] of this it gives up with
//! [`ClientError::Unavailable`]. Writes are idempotent on the server
//! (register replaces, heartbeat renews), so retrying them is safe; the one
//! visible effect is that a deregister whose first answer was lost may end
//! in `NotFound`.
//!
//! Known limitations:
//! - default reads are served from whichever replica the client is stuck
//!   to, even when that node says (`X-Registry-Known-Leader: false`) that it
//!   is cut off; use the `_consistent` calls when that matters.
//!
//! [`ClientOptions::token`] is sent as `Authorization: Bearer` on every
//! request; a `401` or `403` is [`ClientError::Rejected`] and not retried.

mod auto;
mod watch;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use auto::{auto_register, AutoRegistration};

/// Tuning of a [`RegistryClient`].
#[derive(Clone)]
pub struct ClientOptions {
    /// Timeout of one HTTP request to one node (a blocking query adds its
    /// `wait` to this).
    pub request_timeout: Duration,
    /// Total time one call may spend retrying `503`s and unreachable nodes
    /// before it answers [`ClientError::Unavailable`].
    pub retry_budget: Duration,
    /// API token, sent as `Authorization: Bearer` (needed when the nodes
    /// run with `--tokens`).
    pub token: Option<String>,
    /// Extra CA certificates to trust for `https://` nodes (the cluster's
    /// `--tls-ca`), and an optional client certificate.
    pub tls: crate::tls::ClientTls,
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("request_timeout", &self.request_timeout)
            .field("retry_budget", &self.retry_budget)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(5),
            retry_budget: Duration::from_secs(10),
            token: None,
            tls: Default::default(),
        }
    }
}

/// What can go wrong talking to the registry. Messages are the server's own
/// (`message` of its JSON error body) where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `404`: the service or instance is unknown (after a heartbeat: register again).
    #[error("not found: {0}")]
    NotFound(String),
    /// `400`: bad input; `field` names the offending field when the server did.
    #[error("bad request{}: {message}", field.as_ref().map(|f| format!(" ({f})")).unwrap_or_default())]
    BadRequest {
        field: Option<String>,
        message: String,
    },
    /// `503`, or no node reachable within the retry budget.
    #[error("registry unavailable: {0}")]
    Unavailable(String),
    /// Any other `4xx`; not retried.
    #[error("rejected with {status}: {message}")]
    Rejected { status: u16, message: String },
    /// An answer the contract does not allow (bad JSON, a `500`, a missing header).
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// The client was built wrongly (no URLs, a URL that is not http(s)).
    #[error("client configuration: {0}")]
    Config(String),
}

/// What to register. `None` fields are left out, so the server's defaults apply.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Registration {
    pub service_name: String,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_endpoint: Option<String>,
    pub metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u32>,
}

/// A stored instance, as the server returns it (times are RFC 3339 UTC).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Instance {
    pub service_name: String,
    pub instance_id: String,
    pub host: String,
    pub port: u16,
    pub health_endpoint: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub ttl_seconds: u32,
    pub registered_at: String,
    pub last_heartbeat: String,
}

/// `GET /services/{name}`. The seed-compatible top-level fields (`host`,
/// `url`, ...) are ignored: they repeat one of `instances`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Service {
    pub service_name: String,
    pub instances: Vec<Instance>,
}

/// A client of a registry cluster. Cheap to clone: clones share one
/// connection pool and the choice of node.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// Base URLs without a trailing `/`.
    urls: Vec<String>,
    /// Index into `urls` of the node that last worked.
    current: AtomicUsize,
    opts: ClientOptions,
}

impl fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryClient")
            .field("urls", &self.inner.urls)
            .field("current", &self.inner.current.load(Ordering::Relaxed))
            .finish()
    }
}

/// A successful (non-retryable) HTTP answer.
struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: bytes::Bytes,
}

impl Answer {
    /// The answer if it is a 2xx, else the error it carries.
    fn success(self) -> Result<Self, ClientError> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(error_of(&self))
        }
    }
}

const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const RETRY_AFTER_FLOOR: Duration = Duration::from_millis(10);

/// A full-jitter delay: uniform in `[0, ceiling]`.
pub(crate) fn jitter(ceiling: Duration) -> Duration {
    let ms = ceiling.as_millis().max(1) as u64;
    Duration::from_millis(rand::thread_rng().gen_range(0..=ms))
}

impl RegistryClient {
    /// A client of the nodes at `urls` (`http://host:port` or `https://...`),
    /// with default options.
    pub fn new<I, S>(urls: I) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::with_options(urls, ClientOptions::default())
    }

    pub fn with_options<I, S>(urls: I, opts: ClientOptions) -> Result<Self, ClientError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut list = Vec::new();
        for u in urls {
            let u: String = u.into();
            let u = u.trim().trim_end_matches('/').to_string();
            let rest = u
                .strip_prefix("http://")
                .or_else(|| u.strip_prefix("https://"));
            match rest {
                Some(host) if !host.is_empty() && !host.contains('/') => list.push(u),
                _ => {
                    return Err(ClientError::Config(format!(
                        "'{u}' is not a registry URL like http://host:port"
                    )))
                }
            }
        }
        if list.is_empty() {
            return Err(ClientError::Config("no registry URL given".into()));
        }
        let builder = reqwest::Client::builder().connect_timeout(opts.request_timeout);
        let http = opts
            .tls
            .apply(builder)
            .map_err(ClientError::Config)?
            .build()
            .map_err(|e| ClientError::Config(format!("HTTP client: {e}")))?;
        // Start at the first URL: callers list their preferred node first.
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                urls: list,
                current: AtomicUsize::new(0),
                opts,
            }),
        })
    }

    /// The node URLs this client knows, in order.
    pub fn urls(&self) -> &[String] {
        &self.inner.urls
    }

    /// The URL of the node the client currently sticks to.
    pub fn current_url(&self) -> &str {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.urls.len();
        &self.inner.urls[i]
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    /// `POST /register`: returns the stored instance.
    pub async fn register(&self, reg: &Registration) -> Result<Instance, ClientError> {
        let body = serde_json::to_value(reg).map_err(|e| ClientError::Config(e.to_string()))?;
        let a = self
            .send(Method::POST, "/register", &[], Some(&body), None)
            .await?
            .success()?;
        decode(&a)
    }

    /// `POST /heartbeat`: renews one instance, or every instance of the
    /// service when `instance_id` is `None`. Returns how many were renewed;
    /// [`ClientError::NotFound`] means: register again.
    pub async fn heartbeat(
        &self,
        service: &str,
        instance_id: Option<&str>,
    ) -> Result<usize, ClientError> {
        let mut body = serde_json::json!({ "service_name": service });
        if let Some(id) = instance_id {
            body["instance_id"] = Value::from(id);
        }
        let a = self
            .send(Method::POST, "/heartbeat", &[], Some(&body), None)
            .await?
            .success()?;
        count(&a, "renewed")
    }

    /// `DELETE /deregister/{name}`: one instance, or the whole service when
    /// `instance_id` is `None`. Returns how many instances went.
    pub async fn deregister(
        &self,
        service: &str,
        instance_id: Option<&str>,
    ) -> Result<usize, ClientError> {
        let path = format!("/deregister/{}", encode_segment(service));
        let query: Vec<(&str, String)> = instance_id
            .map(|id| vec![("instance_id", id.to_string())])
            .unwrap_or_default();
        let a = self
            .send(Method::DELETE, &path, &query, None, None)
            .await?
            .success()?;
        count(&a, "removed")
    }

    /// `GET /services`: the names, sorted.
    pub async fn services(&self) -> Result<Vec<String>, ClientError> {
        let a = self
            .send(Method::GET, "/services", &[], None, None)
            .await?
            .success()?;
        decode(&a)
    }

    /// `GET /services/{name}` from the replica of the current node.
    pub async fn service(&self, name: &str) -> Result<Service, ClientError> {
        self.get_service(name, &[]).await
    }

    /// `GET /services/{name}?consistent=true`: a linearizable read.
    pub async fn service_consistent(&self, name: &str) -> Result<Service, ClientError> {
        self.get_service(name, &[("consistent", "true".into())])
            .await
    }

    async fn get_service(
        &self,
        name: &str,
        query: &[(&str, String)],
    ) -> Result<Service, ClientError> {
        let path = format!("/services/{}", encode_segment(name));
        let a = self
            .send(Method::GET, &path, query, None, None)
            .await?
            .success()?;
        decode(&a)
    }

    /// `GET /health` of the node the client uses: the first node, in its
    /// failover order, that reports itself healthy.
    pub async fn health(&self) -> Result<Value, ClientError> {
        let a = self
            .send(Method::GET, "/health", &[], None, None)
            .await?
            .success()?;
        decode(&a)
    }

    /// Blocking query: `GET /services/{name}?index=N&wait=Ds`. Returns the
    /// view (`None` if the service does not exist: 404) and the
    /// `X-Registry-Index` to pass next time.
    pub async fn wait_service(
        &self,
        name: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Option<Service>, u64), ClientError> {
        let path = format!("/services/{}", encode_segment(name));
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let query = [
            ("index", index.to_string()),
            ("wait", format!("{}s", secs.max(1))),
        ];
        // The server may hold the request for `wait` (plus a little jitter).
        let timeout = self.inner.opts.request_timeout + wait + wait / 16;
        let a = self
            .send(Method::GET, &path, &query, None, Some(timeout))
            .await?;
        match a.status {
            s if s.is_success() => Ok((Some(decode(&a)?), index_of(&a)?)),
            StatusCode::NOT_FOUND => Ok((None, index_of(&a)?)),
            _ => Err(error_of(&a)),
        }
    }

    /// Sends a request with failover: returns the first answer that is not
    /// a reason to try another node, or `Unavailable` once the budget is spent.
    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        timeout: Option<Duration>,
    ) -> Result<Answer, ClientError> {
        let inner = &*self.inner;
        let n = inner.urls.len();
        let timeout = timeout.unwrap_or(inner.opts.request_timeout);
        let deadline = Instant::now() + inner.opts.retry_budget;
        let mut ceiling = BACKOFF_START;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let idx = inner.current.load(Ordering::Relaxed) % n;
            let url = format!("{}{path}", inner.urls[idx]);
            let mut req = inner
                .http
                .request(method.clone(), &url)
                .timeout(timeout)
                .query(query);
            if let Some(t) = &inner.opts.token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let (reason, retry_after) = match req.send().await {
                Ok(resp) => {
                    let status = resp.status();
                    let headers = resp.headers().clone();
                    match resp.bytes().await {
                        Ok(body) => {
                            let a = Answer {
                                status,
                                headers,
                                body,
                            };
                            if !is_retryable(status) {
                                return Ok(a);
                            }
                            let retry_after = a
                                .headers
                                .get(reqwest::header::RETRY_AFTER)
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.trim().parse::<u64>().ok())
                                .map(Duration::from_secs);
                            (
                                format!("{}: {}", inner.urls[idx], error_of(&a)),
                                retry_after,
                            )
                        }
                        Err(e) => (format!("{url}: reading the answer: {e}"), None),
                    }
                }
                Err(e) => (format!("{url}: {}", describe(&e)), None),
            };
            tracing::debug!(attempt = attempts, %reason, "registry request failed; trying the next node");
            // Move on, unless a concurrent call already did.
            let _ = inner.current.compare_exchange(
                idx,
                (idx + 1) % n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Unavailable(format!(
                    "no registry node answered within {:?} ({attempts} attempts); last: {reason}",
                    inner.opts.retry_budget
                )));
            }
            let remaining = deadline - now;
            let delay = match retry_after {
                // Floored, so a `Retry-After: 0` cannot make this a busy loop.
                Some(ra) if ra < remaining => ra.max(RETRY_AFTER_FLOOR),
                _ => jitter(ceiling),
            };
            ceiling = (ceiling * 2).min(BACKOFF_MAX);
            tokio::time::sleep(delay.min(remaining)).await;
        }
    }
}

/// Answers that say "this node cannot serve you now; another may".
fn is_retryable(s: StatusCode) -> bool {
    matches!(
        s,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT
    )
}

/// A failed request in one line, with its causes (such as "invalid peer
/// certificate: UnknownIssuer").
fn describe(e: &reqwest::Error) -> String {
    let chain = crate::http::error_chain(e);
    if e.is_timeout() {
        format!("timed out: {chain}")
    } else if e.is_connect() {
        format!("cannot connect: {chain}")
    } else {
        chain
    }
}

/// The error a non-2xx answer stands for, with the server's message.
fn error_of(a: &Answer) -> ClientError {
    #[derive(Deserialize)]
    struct ErrorBody {
        message: Option<String>,
        error: Option<String>,
        field: Option<String>,
    }
    let parsed: Option<ErrorBody> = serde_json::from_slice(&a.body).ok();
    let (message, field) = match parsed {
        Some(b) => (
            b.message
                .or(b.error)
                .unwrap_or_else(|| a.status.to_string()),
            b.field,
        ),
        None => (
            String::from_utf8_lossy(&a.body[..a.body.len().min(200)]).into_owned(),
            None,
        ),
    };
    match a.status {
        StatusCode::NOT_FOUND => ClientError::NotFound(message),
        StatusCode::BAD_REQUEST => ClientError::BadRequest { field, message },
        s if is_retryable(s) => ClientError::Unavailable(message),
        s if s.is_client_error() => ClientError::Rejected {
            status: s.as_u16(),
            message,
        },
        s => ClientError::Protocol(format!("status {s}: {message}")),
    }
}

fn decode<T: DeserializeOwned>(a: &Answer) -> Result<T, ClientError> {
    serde_json::from_slice(&a.body)
        .map_err(|e| ClientError::Protocol(format!("cannot decode the answer: {e}")))
}

/// Reads a count field (`renewed`, `removed`) of a write's answer.
fn count(a: &Answer, field: &str) -> Result<usize, ClientError> {
    let v: Value = decode(a)?;
    v.get(field)
        .and_then(Value::as_u64)
        .map(|n| n as usize)
        .ok_or_else(|| ClientError::Protocol(format!("the answer has no '{field}' count: {v}")))
}

fn index_of(a: &Answer) -> Result<u64, ClientError> {
    a.headers
        .get("x-registry-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| ClientError::Protocol("the answer has no X-Registry-Index".into()))
}

/// Percent-encodes one path segment (service names are `[A-Za-z0-9_.-]`,
/// but a caller may pass anything; let the server reject it, not the URL).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        assert!(matches!(
            RegistryClient::new(Vec::<String>::new()),
            Err(ClientError::Config(_))
        ));
        assert!(matches!(
            RegistryClient::new(["127.0.0.1:8888"]),
            Err(ClientError::Config(_))
        ));
        assert!(matches!(
            RegistryClient::new(["ftp://x"]),
            Err(ClientError::Config(_))
        ));
        let c = RegistryClient::new(["http://a:1/", " https://b:2 "]).unwrap();
        assert_eq!(c.urls(), ["http://a:1", "https://b:2"]);
        assert_eq!(c.current_url(), "http://a:1");
    }

    #[test]
    fn options_do_not_print_the_token() {
        let o = ClientOptions {
            token: Some("s3cret-token-value".into()),
            ..Default::default()
        };
        let dbg = format!("{o:?}");
        assert!(!dbg.contains("s3cret"), "{dbg}");
        assert!(dbg.contains("redacted"));
    }

    #[test]
    fn registration_skips_absent_fields() {
        let r = Registration {
            service_name: "s".into(),
            port: 1,
            ..Default::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service_name": "s", "port": 1, "metadata": {}})
        );
    }

    #[test]
    fn errors_map_from_answers() {
        let a = |status: u16, body: &str| Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: Default::default(),
            body: bytes::Bytes::from(body.to_string()),
        };
        let bad = error_of(&a(
            400,
            r#"{"error":"invalid_request","field":"port","message":"port must be 1-65535"}"#,
        ));
        assert!(
            matches!(bad, ClientError::BadRequest { field: Some(ref f), ref message } if f == "port" && message == "port must be 1-65535")
        );
        assert!(matches!(
            error_of(&a(404, r#"{"error":"not_found","message":"gone"}"#)),
            ClientError::NotFound(m) if m == "gone"
        ));
        assert!(matches!(
            error_of(&a(415, "{}")),
            ClientError::Rejected { status: 415, .. }
        ));
        assert!(matches!(
            error_of(&a(500, "boom")),
            ClientError::Protocol(_)
        ));
        assert_eq!(encode_segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn jitter_stays_under_the_ceiling() {
        for _ in 0..100 {
            assert!(jitter(Duration::from_millis(50)) <= Duration::from_millis(50));
        }
    }
}
