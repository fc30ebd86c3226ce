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
use std::hash::BuildHasher;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus::IntCounterVec;

use super::refusal_audit::AuditKey;
pub use super::refusal_audit::{RefusalAudit, AUDIT_WINDOW};
use super::{ApiError, MAX_BODY};
use crate::auth::request_token;
pub use crate::http::limit::{ip_key, retry_after_secs, KeyedLimit};
use crate::http::limit::{periodic, SWEEP_EVERY};

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
