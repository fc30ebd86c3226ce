//! Guards in front of the public API: rate limits per client address and
//! per API token (`Authorization: Bearer` or `X-Registry-Token`), and a
//! deadline for reading a request body.
//!
//! Not guarded: the internal routes (`/raft/*`, `/cluster/*`: other nodes
//! and operators, behind the cluster secret) and `GET /health` (load
//! balancers and orchestrators poll it and must not be throttled into
//! declaring a node dead).
//!
//! Limits are GCRA buckets from `governor` ([`KeyedLimit`], which the
//! gateway's `--rate-limit-per-ip` uses too), one per key: `N` requests per
//! second with a burst of `2N`. A key whose bucket is full again is
//! indistinguishable from a new one, so the periodic `retain_recent` sweep
//! (and an early one when the map grows large) forgets it: memory follows
//! the number of clients active in the last few seconds, not all ever seen.
//!
//! With an audit log, refusals are audited per key in windows of
//! [`AUDIT_WINDOW`] (see [`RefusalAudit`]): a flood of `429`s costs a few
//! lines, not one per request.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use prometheus::IntCounterVec;
use serde_json::json;

use super::access::{peer_of, public_route};
use super::{ApiError, MAX_BODY};
use crate::audit::{AuditLog, Outcome};
use crate::auth::{request_token, Auth, Caller, Identity};
pub use crate::http::limit::{ip_key, retry_after_secs, KeyedLimit};
use crate::http::limit::{periodic, SWEEP_EVERY};

/// Refusals of one key after its first are counted for this long, then
/// written as one audit line.
pub const AUDIT_WINDOW: Duration = Duration::from_secs(10);
/// Keys with an open audit window at most; refusals of further keys share
/// one window per limit.
const MAX_AUDITED_KEYS: usize = 10_000;
/// How often audit windows that ended are written out.
const AUDIT_FLUSH_EVERY: Duration = Duration::from_secs(1);

/// The node's request limits (from `--rate-limit-per-ip`,
/// `--rate-limit-per-token` and `--read-timeout-ms`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitConfig {
    /// Requests per second per client address (IPv6: per /64); 0 = no limit.
    pub per_ip: u32,
    /// Requests per second per API token (either header); 0 = no limit.
    pub per_token: u32,
    /// A request's head (from its first byte), and then its body, must each
    /// arrive within this.
    pub read_timeout: Duration,
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self {
            per_ip: 0,
            per_token: 0,
            read_timeout: Duration::from_secs(10),
        }
    }
}

/// Shared by every request of one node.
pub struct Limits {
    per_ip: Option<KeyedLimit<IpAddr>>,
    per_token: Option<KeyedLimit<u64>>,
    /// Keyed per process: tokens are kept only as hashes
    /// nobody outside can predict.
    hasher: RandomState,
    read_timeout: Duration,
    limited: IntCounterVec,
    /// Where refusals are audited, when the node has an audit log.
    audit: Option<RefusalAudit>,
}

impl Limits {
    /// Builds the limits and, inside a Tokio runtime, the sweeper task (and
    /// with `audit`, the task writing out audit windows); they end when the
    /// router holding the limits is dropped.
    pub fn new(
        cfg: &LimitConfig,
        limited: IntCounterVec,
        audit: Option<RefusalAudit>,
    ) -> Arc<Self> {
        let limits = Arc::new(Self {
            per_ip: KeyedLimit::new(cfg.per_ip),
            per_token: KeyedLimit::new(cfg.per_token),
            hasher: RandomState::new(),
            read_timeout: cfg.read_timeout,
            limited,
            audit,
        });
        if limits.per_ip.is_some() || limits.per_token.is_some() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(periodic(Arc::downgrade(&limits), SWEEP_EVERY, Self::sweep));
                if limits.audit.is_some() {
                    rt.spawn(periodic(
                        Arc::downgrade(&limits),
                        AUDIT_FLUSH_EVERY,
                        Self::flush_audit,
                    ));
                }
            }
        }
        limits
    }

    fn flush_audit(&self) {
        if let Some(audit) = &self.audit {
            audit.flush();
        }
    }

    fn sweep(&self) {
        if let Some(l) = &self.per_ip {
            l.sweep();
        }
        if let Some(l) = &self.per_token {
            l.sweep();
        }
    }

    /// Keys currently tracked (per address, per token), for tests.
    pub fn tracked(&self) -> (usize, usize) {
        (
            self.per_ip.as_ref().map_or(0, KeyedLimit::tracked),
            self.per_token.as_ref().map_or(0, KeyedLimit::tracked),
        )
    }

    /// The `429` answer when the caller is over a limit.
    fn refusal(&self, req: &Request) -> Option<Response> {
        if let Some(limit) = &self.per_ip {
            if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
                let key = ip_key(peer.ip());
                if let Err(wait) = limit.check(&key) {
                    return Some(self.refuse(
                        req,
                        AuditKey::Ip(key),
                        format!(
                            "rate limit of {} requests/s for this client address exceeded",
                            limit.rate()
                        ),
                        wait,
                    ));
                }
            }
        }
        if let Some(limit) = &self.per_token {
            if let Some(token) = request_token(req.headers()) {
                let key = self.hasher.hash_one(token.as_bytes());
                if let Err(wait) = limit.check(&key) {
                    return Some(self.refuse(
                        req,
                        AuditKey::Token(key),
                        format!(
                            "rate limit of {} requests/s for this token exceeded",
                            limit.rate()
                        ),
                        wait,
                    ));
                }
            }
        }
        None
    }

    fn refuse(&self, req: &Request, key: AuditKey, message: String, wait: Duration) -> Response {
        self.limited.with_label_values(&[key.limit()]).inc();
        if let Some(audit) = &self.audit {
            audit.refused(key, req);
        }
        let secs = retry_after_secs(wait);
        let mut resp =
            ApiError::TooManyRequests(format!("{message}; retry in {secs} s")).into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        resp
    }
}

/// What one audit window counts the refusals of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AuditKey {
    /// A client address (IPv6: its /64).
    Ip(IpAddr),
    /// The keyed hash of an `Authorization` value.
    Token(u64),
    /// Any key of this limit, once [`MAX_AUDITED_KEYS`] windows are open.
    Overflow(&'static str),
}

impl AuditKey {
    /// The limit: `ip` or `token` (the `by` label of the metric).
    fn limit(&self) -> &'static str {
        match self {
            Self::Ip(_) => "ip",
            Self::Token(_) => "token",
            Self::Overflow(limit) => limit,
        }
    }
}

/// A refused request, as an audit line names it.
struct Sample {
    caller: Option<String>,
    identity: Option<Arc<Identity>>,
    operation: &'static str,
    target: String,
}

/// The refusals of one key since `opened`.
struct Window {
    opened: Instant,
    opened_at: DateTime<Utc>,
    /// Refusals not written yet.
    counted: u64,
    /// The first of them.
    sample: Option<Sample>,
}

impl Window {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            opened_at: Utc::now(),
            counted: 0,
            sample: None,
        }
    }
}

/// Writes `429` refusals to the audit log without letting a flood fill the
/// disk. Per key (client address or token): the first refusal is written
/// at once (`"count": 1`); later ones within the next `window` are only
/// counted, and when the window ends they are written as one line with
/// their `count` and `since` (the window's start), naming the first of
/// them. While a key keeps being refused this repeats, one line per window;
/// a key with no refusal in a whole window is forgotten, so its next
/// refusal is written at once again. So a key costs at most one line per
/// refusal and two per window, and the table at most [`MAX_AUDITED_KEYS`]
/// entries (then further keys share one window per limit, marked
/// `"overflow": true`). Counts still open when the node stops are written
/// then.
pub struct RefusalAudit {
    log: AuditLog,
    auth: Arc<Auth>,
    window: Duration,
    open: Mutex<HashMap<AuditKey, Window>>,
}

impl RefusalAudit {
    pub fn new(log: AuditLog, auth: Arc<Auth>) -> Self {
        Self::with_window(log, auth, AUDIT_WINDOW)
    }

    fn with_window(log: AuditLog, auth: Arc<Auth>, window: Duration) -> Self {
        Self {
            log,
            auth,
            window,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn sample(&self, req: &Request) -> Sample {
        let path = req.uri().path();
        let identity = request_token(req.headers()).and_then(|t| self.auth.tokens()?.verify(t));
        Sample {
            caller: peer_of(req),
            identity,
            operation: public_route(req.method(), path).1,
            target: path.to_string(),
        }
    }

    fn write(&self, key: AuditKey, sample: &Sample, count: u64, since: Option<DateTime<Utc>>) {
        let caller = Caller {
            addr: sample.caller.clone(),
            identity: sample.identity.clone(),
            ..Default::default()
        };
        let mut extra = json!({"limit": key.limit(), "count": count});
        if let Some(since) = since {
            extra["since"] = json!(crate::audit::timestamp(since));
        }
        if matches!(key, AuditKey::Overflow(_)) {
            extra["overflow"] = json!(true);
        }
        self.log.record(
            Some(&caller),
            sample.operation,
            json!(sample.target),
            Outcome::Refused(429, "rate_limit".into()),
            Some(extra),
        );
    }

    /// Writes the refusals `w` counted, if any.
    fn write_window(&self, key: AuditKey, w: &Window) {
        if let (Some(sample), true) = (&w.sample, w.counted > 0) {
            self.write(key, sample, w.counted, Some(w.opened_at));
        }
    }

    /// Notes one refusal of `key`.
    fn refused(&self, key: AuditKey, req: &Request) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let key = if open.len() >= MAX_AUDITED_KEYS && !open.contains_key(&key) {
            AuditKey::Overflow(key.limit())
        } else {
            key
        };
        if let Some(w) = open.get_mut(&key) {
            if w.opened.elapsed() < self.window {
                w.counted += 1;
                if w.sample.is_none() {
                    w.sample = Some(self.sample(req));
                }
                return;
            }
            // Ended, and not written out yet.
            self.write_window(key, w);
            if w.counted > 0 {
                // Still refused: keep counting.
                *w = Window::new();
                w.counted = 1;
                w.sample = Some(self.sample(req));
                return;
            }
        }
        self.write(key, &self.sample(req), 1, None);
        open.insert(key, Window::new());
    }

    /// Writes out the windows that ended and forgets keys that were not
    /// refused in theirs.
    fn flush(&self) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|key, w| {
            if w.opened.elapsed() < self.window {
                return true;
            }
            if w.counted == 0 {
                return false;
            }
            self.write_window(*key, w);
            *w = Window::new();
            true
        });
    }
}

impl Drop for RefusalAudit {
    fn drop(&mut self) {
        let open = std::mem::take(self.open.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (key, w) in &open {
            self.write_window(*key, w);
        }
    }
}

/// Paths the guards leave alone: the internal routes and `/health`.
fn exempt(path: &str) -> bool {
    path == "/health" || path.starts_with("/raft/") || path.starts_with("/cluster/")
}

/// The middleware: rate limits first (cheapest refusal), then the whole
/// body is read within the read timeout (at most [`MAX_BODY`]), so a client
/// that trickles its body gets `408` instead of holding a task forever.
pub async fn guard(State(limits): State<Arc<Limits>>, req: Request, next: Next) -> Response {
    if exempt(req.uri().path()) {
        return next.run(req).await;
    }
    if let Some(resp) = limits.refusal(&req) {
        return resp;
    }
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, MAX_BODY);
    let bytes = match tokio::time::timeout(limits.read_timeout, read).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) if too_large(&e) => return ApiError::PayloadTooLarge.into_response(),
        Ok(Err(e)) => {
            return ApiError::bad("body", format!("cannot read the request body: {e}"))
                .into_response()
        }
        Err(_) => {
            return ApiError::RequestTimeout(format!(
                "the request body did not arrive within {} ms",
                limits.read_timeout.as_millis()
            ))
            .into_response()
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn too_large(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_counts_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(ip_key(a), ip_key(b));
        assert_ne!(ip_key(a), ip_key(c));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(ip_key(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn burst_is_twice_the_rate_and_idle_keys_are_forgotten() {
        let l = KeyedLimit::<u64>::new(3).unwrap();
        for _ in 0..6 {
            assert!(l.check(&1).is_ok());
        }
        let wait = l.check(&1).unwrap_err();
        assert!(wait <= Duration::from_millis(334), "{wait:?}");
        assert!(l.check(&2).is_ok());
        assert_eq!(l.tracked(), 2);
        assert!(KeyedLimit::<u64>::new(0).is_none());
    }

    fn audited(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn request(ip: &str, method: &str, path: &str, token: Option<&str>) -> Request {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .extension(ConnectInfo(SocketAddr::new(ip.parse().unwrap(), 4000)));
        if let Some(t) = token {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        b.body(Body::empty()).unwrap()
    }

    #[test]
    fn refusals_are_audited_at_once_then_counted_per_window() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let tokens = dir.path().join("tokens.json");
        std::fs::write(
            &tokens,
            r#"{"tokens":[{"id":"ci","token":"0123456789abcdef","role":"read"}]}"#,
        )
        .unwrap();
        let rotation = crate::audit::Rotation {
            max_bytes: 1 << 20,
            max_files: 1,
        };
        let dropped = prometheus::IntCounter::new("d", "d").unwrap();
        let log = AuditLog::open(&path, 3, rotation, dropped).unwrap();
        let auth = Arc::new(Auth::load(Some(&tokens), &[]).unwrap());
        let window = Duration::from_millis(200);
        let audit = RefusalAudit::with_window(log.clone(), auth, window);
        let a = AuditKey::Ip("10.0.0.1".parse().unwrap());
        let b = AuditKey::Token(42);
        let lines = || {
            log.sync(Duration::from_secs(5));
            audited(&path)
        };

        // The first refusal of each key is written at once, the rest counted.
        for _ in 0..50 {
            audit.refused(a, &request("10.0.0.1", "GET", "/services", None));
        }
        let token = Some("0123456789abcdef");
        audit.refused(b, &request("10.0.0.2", "POST", "/register", token));
        audit.flush();
        let got = lines();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0]["caller"], "10.0.0.1:4000");
        assert_eq!(got[0]["node"], 3);
        assert_eq!(got[0]["operation"], "list");
        assert_eq!(got[0]["target"], "/services");
        assert_eq!(got[0]["result"], "refused: rate_limit");
        assert_eq!(got[0]["status"], 429);
        assert_eq!(got[0]["limit"], "ip");
        assert_eq!(got[0]["count"], 1);
        assert_eq!(got[0]["token_id"], serde_json::Value::Null);
        assert!(got[0].get("since").is_none());
        assert_eq!(got[1]["limit"], "token");
        assert_eq!(got[1]["token_id"], "ci");
        assert_eq!(got[1]["operation"], "register");

        // The window ends: one line with the count; b, not refused again,
        // is forgotten.
        std::thread::sleep(window);
        audit.flush();
        let got = lines();
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[2]["caller"], "10.0.0.1:4000");
        assert_eq!(got[2]["count"], 49);
        assert!(got[2]["since"].as_str().unwrap() >= got[0]["time"].as_str().unwrap());
        assert_eq!(audit.open.lock().unwrap().len(), 1);

        // a is still refused: counted, not written at once; b is new again.
        for _ in 0..5 {
            audit.refused(a, &request("10.0.0.1", "GET", "/services", None));
        }
        audit.refused(b, &request("10.0.0.2", "GET", "/services", token));
        assert_eq!(lines().len(), 4);
        // A window that ended is written out by the next refusal too.
        std::thread::sleep(window);
        audit.refused(a, &request("10.0.0.1", "GET", "/services", None));
        assert_eq!(lines().len(), 5);
        // What is still counted is written when the node stops.
        drop(audit);
        let got = lines();
        assert_eq!(got.len(), 6, "{got:?}");
        let total: u64 = got
            .iter()
            .filter(|e| e["limit"] == "ip")
            .map(|e| e["count"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 56);
    }

    #[test]
    fn the_audit_table_is_bounded() {
        let audit = RefusalAudit::new(AuditLog::disabled(), Arc::new(Auth::open()));
        for i in 0..(MAX_AUDITED_KEYS as u32 + 10) {
            let ip = IpAddr::from(i.to_be_bytes());
            audit.refused(
                AuditKey::Ip(ip),
                &request(&ip.to_string(), "GET", "/", None),
            );
        }
        let open = audit.open.lock().unwrap();
        assert_eq!(open.len(), MAX_AUDITED_KEYS + 1);
        assert_eq!(open[&AuditKey::Overflow("ip")].counted, 9);
    }

    #[test]
    fn internal_routes_and_health_are_exempt() {
        assert!(exempt("/health"));
        assert!(exempt("/raft/append"));
        assert!(exempt("/cluster/status"));
        assert!(!exempt("/healthz"));
        assert!(!exempt("/register"));
        assert!(!exempt("/services/raft"));
    }
}
