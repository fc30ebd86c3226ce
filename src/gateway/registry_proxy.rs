//! The registry's one stable address (`--registry-listen`): a listener that
//! passes every request, whatever its method and path, to the registry
//! nodes of `--registry`, as the Nginx in front of the old registry did.
//! Old services know one registry URL; this keeps it answering while any
//! one node is down. Owns the choice of node and the failover rule; does
//! not look inside the API (the nodes do).
//!
//! A request is read whole first (at most [`MAX_BODY`], the nodes' own
//! limit; more is `413`, within `read_timeout` or `408`), so that it can be
//! sent again. Nodes are tried in
//! `--registry` order starting from the last one that answered. The next
//! node is tried only when the request surely changed nothing:
//!
//! - the connection to the node failed (refused, no route, name not
//!   resolved, connect timeout): the request never arrived;
//! - the node answered `503` saying it reached no leader
//!   (`{"error":"unavailable","message":"no leader reachable ..."}`): a
//!   node says that only after every attempt to hand the write to a leader
//!   surely failed (`api::forward`), so nothing was applied;
//! - for `GET`, `HEAD` and `OPTIONS` (reads, which change nothing): any
//!   other failure too, a timeout or any `503`.
//!
//! Any other answer goes back to the client as is, and any other failure of
//! a write (the connection broke after the request was sent, no answer in
//! time) is a `502`/`504` saying the outcome is unknown: the write may have
//! been committed, and whether to send it again is the client's call (old
//! clients do, at their next heartbeat). The next request then starts at
//! the next node. With every node unreachable the answer is `503` with
//! `Retry-After`, in the nodes' error format.
//!
//! The original client stays known to the nodes: every request carries
//! `X-Registry-Caller: <client ip:port>` (and `X-Forwarded-For`), and the
//! public routes also `X-Cluster-Secret: <--cluster-secret>`, which makes
//! nodes trust the caller header. Whatever the client sent in those headers
//! (and in `X-Registry-Via`) is dropped first. On `/cluster/*` and
//! `/raft/*` the client's own `X-Cluster-Secret` is passed on unchanged and
//! the proxy adds none: the stable address must not turn anyone who can
//! reach it into an operator.
//!
//! Responses are streamed back with `X-Gateway-Registry-Node` naming the
//! node that answered. Metrics: `gateway_registry_proxy_requests_total`
//! by status class and `gateway_registry_proxy_failovers_total` by reason.
//!
//! Known limitations: a node that accepts connections but never answers (a
//! paused process) holds a write until the timeout and then gets a `504`;
//! with no majority anywhere, a write waits the nodes' leader wait on each
//! node in turn before its `503`; the nodes' `503` is recognised by its
//! message (they give no stabler mark yet);
//! a blocking query (`?index=`) may be held up to the nodes' longest wait
//! ([`MAX_BLOCKING`]) before a read fails over; the listener speaks plain
//! HTTP only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures::StreamExt;

use super::metrics::{status_class, GatewayMetrics};
use super::proxy::{end_to_end, forwarded_for};
use super::{error_response, GatewayConfig, GatewayError};
use crate::api::MAX_BODY;
use crate::auth::Secret;
use crate::http::error_chain;

/// The nodes' longest blocking query: `wait` of at most 5 minutes plus up
/// to 1/16 of jitter (`api::watch`), with a margin.
pub const MAX_BLOCKING: Duration = Duration::from_secs(330);

/// How much of a too large body is read (and dropped) before the `413`.
const DRAIN_LIMIT: usize = 1024 * 1024;

// The nodes' own header names, so that the two sides cannot drift apart.
const CALLER: HeaderName = HeaderName::from_static(crate::api::CALLER_HEADER);
const VIA: HeaderName = HeaderName::from_static(crate::api::VIA_HEADER);
const SECRET: HeaderName = HeaderName::from_static(crate::raft::network::SECRET_HEADER);
const NODE: HeaderName = HeaderName::from_static("x-gateway-registry-node");

/// Why a request went on to the next node (the metric's `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failover {
    /// The connection failed: the request never arrived.
    Connect,
    /// A `503` saying the node reached no leader: nothing was applied.
    NoLeader,
    /// A read that failed otherwise (timeout, broken connection, a `503`).
    Read,
}

impl Failover {
    fn label(self) -> &'static str {
        match self {
            Failover::Connect => "connect",
            Failover::NoLeader => "no_leader",
            Failover::Read => "read",
        }
    }
}

/// State of the stable-address listener.
pub(crate) struct RegistryProxy {
    /// Node base URLs, without a trailing `/`.
    nodes: Vec<String>,
    /// Where the next request starts: the last node that answered.
    next: AtomicUsize,
    client: reqwest::Client,
    secret: Option<Secret>,
    /// Response-head deadline of a request that is not a blocking query.
    timeout: Duration,
    /// Deadline for reading a request's body.
    read_timeout: Duration,
    metrics: Arc<GatewayMetrics>,
}

impl RegistryProxy {
    pub(crate) fn new(
        cfg: &GatewayConfig,
        metrics: Arc<GatewayMetrics>,
    ) -> Result<Self, GatewayError> {
        let client = cfg
            .tls
            .apply(reqwest::Client::builder())
            .map_err(GatewayError::Config)?
            .connect_timeout(cfg.registry_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| GatewayError::Config(format!("HTTP client: {e}")))?;
        Ok(Self {
            nodes: cfg
                .registry
                .iter()
                .map(|n| n.trim_end_matches('/').to_string())
                .collect(),
            next: AtomicUsize::new(0),
            client,
            secret: cfg.cluster_secret.clone(),
            timeout: cfg.timeout,
            read_timeout: cfg.read_timeout,
            metrics,
        })
    }
}

pub(crate) fn router(proxy: Arc<RegistryProxy>) -> Router {
    Router::new().fallback(forward).with_state(proxy)
}

/// Routes where the client's own secret, not the proxy's, must decide.
fn operator_path(path: &str) -> bool {
    ["/cluster", "/raft"]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
}

/// Reads change nothing: any failure may be tried on another node.
fn is_read(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Whether a `503` body is a node saying it reached no leader, so the
/// write was not handed to one (see `api::forward`).
fn says_no_leader(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    v["error"] == "unavailable"
        && v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("no leader reachable"))
}

/// The headers sent to a node: the client's end-to-end headers, minus the
/// ones only the proxy may set, plus the caller (and the secret on public
/// routes).
fn node_headers(
    client: &HeaderMap,
    peer: SocketAddr,
    path: &str,
    secret: Option<&Secret>,
) -> HeaderMap {
    let mut headers = end_to_end(client, true);
    // The body is buffered: its length is set again when it is sent.
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(CALLER);
    headers.remove(VIA);
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    if let Ok(v) = HeaderValue::from_str(&peer.to_string()) {
        headers.insert(CALLER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&forwarded_for(client, peer.ip())) {
        headers.insert(HeaderName::from_static("x-forwarded-for"), v);
    }
    if !operator_path(path) {
        headers.remove(SECRET);
        if let Some(v) = secret.and_then(|s| HeaderValue::from_str(s.expose()).ok()) {
            headers.insert(SECRET, v);
        }
    }
    headers
}

/// What one node made of the request.
enum Answer {
    /// The node answered; the answer goes back to the client.
    Answered(Response),
    /// A write failed after it was sent: its outcome is unknown, so it is
    /// not sent again; this error goes back to the client.
    Unknown(Response),
    /// Try the next node; the response stands if there is none.
    Next(Failover, Option<Response>, String),
}

async fn forward(
    State(p): State<Arc<RegistryProxy>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
) -> Response {
    let resp = forward_inner(&p, peer, req).await;
    p.metrics
        .registry_proxy_requests
        .with_label_values(&[status_class(resp.status().as_u16())])
        .inc();
    resp
}

async fn forward_inner(p: &RegistryProxy, peer: SocketAddr, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match read_body(body, &parts.headers, p.read_timeout).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let headers = node_headers(&parts.headers, peer, parts.uri.path(), p.secret.as_ref());
    let blocking = parts
        .uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv.split('=').next() == Some("index")));
    let timeout = if blocking {
        MAX_BLOCKING + p.timeout
    } else {
        p.timeout
    };
    let read = is_read(&parts.method);
    let n = p.nodes.len();
    let start = p.next.load(Ordering::Relaxed) % n;
    let mut last: Option<Response> = None;
    let mut failures: Vec<String> = Vec::new();
    for k in 0..n {
        let i = (start + k) % n;
        let node = &p.nodes[i];
        let answer = send_once(
            p,
            node,
            &parts.method,
            path_and_query,
            &headers,
            &body,
            timeout,
            read,
        )
        .await;
        match answer {
            // A node that answered is where the next request starts.
            Answer::Answered(resp) => {
                p.next.store(i, Ordering::Relaxed);
                return resp;
            }
            // The next request starts elsewhere.
            Answer::Unknown(resp) => {
                p.next.store((i + 1) % n, Ordering::Relaxed);
                return resp;
            }
            Answer::Next(why, resp, detail) => {
                if k + 1 < n {
                    p.metrics
                        .registry_proxy_failovers
                        .with_label_values(&[why.label()])
                        .inc();
                    tracing::warn!(
                        node = %node,
                        next = %p.nodes[(i + 1) % n],
                        reason = why.label(),
                        error = %detail,
                        method = %parts.method,
                        path = parts.uri.path(),
                        "registry node failed; trying the next one"
                    );
                }
                failures.push(format!("{node}: {detail}"));
                if resp.is_some() {
                    last = resp;
                }
            }
        }
    }
    if let Some(resp) = last {
        return resp;
    }
    let mut resp = error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        &format!(
            "no registry node could be reached; retry shortly ({})",
            failures.join("; ")
        ),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// Reads a request's body whole, within `deadline`. Over [`MAX_BODY`]: a
/// `413`, after reading on (discarding) up to [`DRAIN_LIMIT`] so that the
/// client, still sending, gets to read the answer instead of a reset.
async fn read_body(body: Body, headers: &HeaderMap, deadline: Duration) -> Result<Bytes, Response> {
    let too_large = || {
        let mut resp = error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &format!("the request body is larger than {MAX_BODY} bytes"),
        );
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        resp
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut stream = body.into_data_stream();
        let mut buf = Vec::new();
        let mut seen = 0usize;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            seen += chunk.len();
            if seen > DRAIN_LIMIT {
                break;
            }
            if seen <= MAX_BODY {
                buf.extend_from_slice(&chunk);
            }
        }
        Ok::<_, String>((Bytes::from(buf), seen))
    };
    match tokio::time::timeout(deadline, read).await {
        Err(_) => Err(error_response(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            &format!(
                "the request body did not arrive within {} ms",
                deadline.as_millis()
            ),
        )),
        Ok(Err(e)) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &format!("the request body could not be read: {e}"),
        )),
        Ok(Ok((_, seen))) if seen > MAX_BODY => Err(too_large()),
        Ok(Ok((bytes, _))) => Ok(bytes),
    }
}

/// One try at one node.
#[allow(clippy::too_many_arguments)]
async fn send_once(
    p: &RegistryProxy,
    node: &str,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: &Bytes,
    timeout: Duration,
    read: bool,
) -> Answer {
    let mut rb = p
        .client
        .request(method.clone(), format!("{node}{path_and_query}"))
        .headers(headers.clone());
    if !body.is_empty() {
        rb = rb.body(body.clone());
    }
    let resp = match tokio::time::timeout(timeout, rb.send()).await {
        Err(_) if read => {
            return Answer::Next(
                Failover::Read,
                None,
                format!("no answer within {} ms", timeout.as_millis()),
            )
        }
        Err(_) => {
            return Answer::Unknown(error_response(
                StatusCode::GATEWAY_TIMEOUT,
                "gateway_timeout",
                &format!(
                    "registry node {node} did not answer within {} ms; the request may or may not have been applied",
                    timeout.as_millis()
                ),
            ))
        }
        Ok(Err(e)) if e.is_connect() => {
            return Answer::Next(Failover::Connect, None, error_chain(&e))
        }
        Ok(Err(e)) if read => return Answer::Next(Failover::Read, None, error_chain(&e)),
        Ok(Err(e)) => {
            tracing::warn!(node, error = %error_chain(&e), "registry node failed after the request was sent");
            return Answer::Unknown(error_response(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                &format!(
                    "registry node {node} failed after the request was sent ({}); the request may or may not have been applied",
                    error_chain(&e)
                ),
            ));
        }
        Ok(Ok(resp)) => resp,
    };
    let status = resp.status();
    let mut out_headers = end_to_end(resp.headers(), false);
    if let Ok(v) = HeaderValue::from_str(node) {
        out_headers.insert(NODE, v);
    }
    if status != StatusCode::SERVICE_UNAVAILABLE {
        let mut out = Body::from_stream(resp.bytes_stream()).into_response();
        *out.status_mut() = status;
        *out.headers_mut() = out_headers;
        return Answer::Answered(out);
    }
    // A 503 is small: read it to decide, then keep it in case it stands.
    let bytes = match tokio::time::timeout(timeout, resp.bytes()).await {
        Ok(Ok(b)) => b,
        _ => Bytes::new(),
    };
    let why = if says_no_leader(&bytes) {
        Some(Failover::NoLeader)
    } else if read {
        Some(Failover::Read)
    } else {
        None
    };
    out_headers.remove(header::CONTENT_LENGTH);
    let mut out = Body::from(bytes.clone()).into_response();
    *out.status_mut() = status;
    *out.headers_mut() = out_headers;
    match why {
        Some(why) => Answer::Next(
            why,
            Some(out),
            format!("503 {}", String::from_utf8_lossy(&bytes).trim()),
        ),
        None => Answer::Answered(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_no_leader_503_is_safe_to_send_elsewhere() {
        assert!(says_no_leader(
            br#"{"error":"unavailable","message":"no leader reachable within 5000 ms to commit the write; retry shortly"}"#
        ));
        assert!(says_no_leader(
            br#"{"error":"unavailable","message":"no leader reachable; retry shortly"}"#
        ));
        for other in [
            &br#"{"error":"unavailable","message":"the write was not committed in time (no quorum?); its outcome is unknown and retrying it is safe"}"#[..],
            br#"{"error":"unavailable","message":"the node is stopping"}"#,
            br#"{"error":"too_many_requests","message":"no leader reachable"}"#,
            b"no leader reachable",
            b"",
        ] {
            assert!(!says_no_leader(other), "{}", String::from_utf8_lossy(other));
        }
    }

    #[test]
    fn operator_paths_keep_the_clients_secret() {
        for p in ["/cluster", "/cluster/status", "/raft/append", "/raft"] {
            assert!(operator_path(p), "{p}");
        }
        for p in ["/register", "/clusters", "/raftx", "/services/cluster"] {
            assert!(!operator_path(p), "{p}");
        }
    }

    #[test]
    fn the_proxy_sets_caller_and_secret_headers() {
        let mut client = HeaderMap::new();
        client.insert("x-registry-caller", HeaderValue::from_static("6.6.6.6:1"));
        client.insert("x-registry-via", HeaderValue::from_static("2"));
        client.insert("x-cluster-secret", HeaderValue::from_static("guess"));
        client.insert("x-registry-token", HeaderValue::from_static("tok"));
        client.insert("content-length", HeaderValue::from_static("12"));
        client.insert("host", HeaderValue::from_static("lb"));
        let peer: SocketAddr = "[::ffff:10.1.2.3]:4567".parse().unwrap();
        let secret = Secret::from("s3cret");

        let h = node_headers(&client, peer, "/register", Some(&secret));
        assert_eq!(h["x-registry-caller"], "10.1.2.3:4567");
        assert_eq!(h["x-forwarded-for"], "10.1.2.3");
        assert_eq!(h["x-cluster-secret"], "s3cret");
        assert_eq!(h["x-registry-token"], "tok");
        for gone in ["x-registry-via", "content-length", "host"] {
            assert!(!h.contains_key(gone), "{gone}");
        }
        // No secret configured: the client's guess is dropped all the same.
        let h = node_headers(&client, peer, "/register", None);
        assert!(!h.contains_key("x-cluster-secret"));
        // Operator routes: the client's own secret, never the proxy's.
        let h = node_headers(&client, peer, "/cluster/status", Some(&secret));
        assert_eq!(h["x-cluster-secret"], "guess");
        assert_eq!(h["x-registry-caller"], "10.1.2.3:4567");
        let mut bare = client.clone();
        bare.remove("x-cluster-secret");
        let h = node_headers(&bare, peer, "/cluster/nodes/3", Some(&secret));
        assert!(!h.contains_key("x-cluster-secret"));
    }
}
