//! Guards in front of the public API: rate limits per client address and
//! per `Authorization` value, and a deadline for reading a request body.
//!
//! Not guarded: the internal routes (`/raft/*`, `/cluster/*`: other nodes
//! and operators, behind the cluster secret) and `GET /health` (load
//! balancers and orchestrators poll it and must not be throttled into
//! declaring a node dead).
//!
//! Limits are GCRA buckets from `governor`, one per key: `N` requests per
//! second with a burst of `2N`. A key whose bucket is full again is
//! indistinguishable from a new one, so the periodic `retain_recent` sweep
//! (and an early one when the map grows large) forgets it: memory follows
//! the number of clients active in the last few seconds, not all ever seen.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use prometheus::IntCounterVec;

use super::{ApiError, MAX_BODY};

/// How often idle keys are swept out of the limiters.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// A limiter holding more keys than this is swept at once, not at the next
/// tick (checked every [`CHECK_LEN_EVERY`] requests).
const MAX_TRACKED_KEYS: usize = 100_000;
const CHECK_LEN_EVERY: u64 = 1024;

/// The node's request limits (from `--rate-limit-per-ip`,
/// `--rate-limit-per-token` and `--read-timeout-ms`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitConfig {
    /// Requests per second per client address (IPv6: per /64); 0 = no limit.
    pub per_ip: u32,
    /// Requests per second per `Authorization` value; 0 = no limit.
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

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>;

/// One keyed limiter and its rate, for the message.
struct Limit<K: std::hash::Hash + Eq + Clone> {
    limiter: Keyed<K>,
    rate: u32,
}

impl<K: std::hash::Hash + Eq + Clone> Limit<K> {
    fn new(rate: u32) -> Option<Self> {
        let per_second = NonZeroU32::new(rate)?;
        let burst = NonZeroU32::new(rate.saturating_mul(2)).unwrap_or(per_second);
        Some(Self {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            rate,
        })
    }

    /// `Err(wait)` when `key` is over its limit.
    fn check(&self, key: &K) -> Result<(), Duration> {
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }
}

/// Shared by every request of one node.
pub struct Limits {
    per_ip: Option<Limit<IpAddr>>,
    per_token: Option<Limit<u64>>,
    /// Keyed per process: `Authorization` values are kept only as hashes
    /// nobody outside can predict.
    hasher: RandomState,
    read_timeout: Duration,
    limited: IntCounterVec,
    requests: AtomicU64,
}

impl Limits {
    /// Builds the limits and, inside a Tokio runtime, the sweeper task (it
    /// ends when the router holding the limits is dropped).
    pub fn new(cfg: &LimitConfig, limited: IntCounterVec) -> Arc<Self> {
        let limits = Arc::new(Self {
            per_ip: Limit::new(cfg.per_ip),
            per_token: Limit::new(cfg.per_token),
            hasher: RandomState::new(),
            read_timeout: cfg.read_timeout,
            limited,
            requests: AtomicU64::new(0),
        });
        if limits.per_ip.is_some() || limits.per_token.is_some() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(sweeper(Arc::downgrade(&limits)));
            }
        }
        limits
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
            self.per_ip.as_ref().map_or(0, |l| l.limiter.len()),
            self.per_token.as_ref().map_or(0, |l| l.limiter.len()),
        )
    }

    /// The `429` answer when the caller is over a limit.
    fn refusal(&self, req: &Request) -> Option<Response> {
        if self.per_ip.is_none() && self.per_token.is_none() {
            return None;
        }
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        if n % CHECK_LEN_EVERY == CHECK_LEN_EVERY - 1 {
            let (ips, tokens) = self.tracked();
            if ips.max(tokens) > MAX_TRACKED_KEYS {
                self.sweep();
            }
        }
        if let Some(limit) = &self.per_ip {
            if let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>() {
                if let Err(wait) = limit.check(&ip_key(peer.ip())) {
                    return Some(self.refuse(
                        "ip",
                        format!(
                            "rate limit of {} requests/s for this client address exceeded",
                            limit.rate
                        ),
                        wait,
                    ));
                }
            }
        }
        if let Some(limit) = &self.per_token {
            if let Some(auth) = req.headers().get(header::AUTHORIZATION) {
                let key = self.hasher.hash_one(auth.as_bytes());
                if let Err(wait) = limit.check(&key) {
                    return Some(self.refuse(
                        "token",
                        format!(
                            "rate limit of {} requests/s for this token exceeded",
                            limit.rate
                        ),
                        wait,
                    ));
                }
            }
        }
        None
    }

    fn refuse(&self, by: &str, message: String, wait: Duration) -> Response {
        self.limited.with_label_values(&[by]).inc();
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        let mut resp =
            ApiError::TooManyRequests(format!("{message}; retry in {secs} s")).into_response();
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        resp
    }
}

async fn sweeper(limits: Weak<Limits>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(limits) = limits.upgrade() else {
            return;
        };
        limits.sweep();
    }
}

/// The key of a client address: IPv4 addresses (also IPv4-mapped IPv6) as
/// they are, IPv6 addresses by their /64, which one host can fill at will.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u128::from(u64::MAX)))),
        v4 => v4,
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
        let l = Limit::<u64>::new(3).unwrap();
        for _ in 0..6 {
            assert!(l.check(&1).is_ok());
        }
        let wait = l.check(&1).unwrap_err();
        assert!(wait <= Duration::from_millis(334), "{wait:?}");
        assert!(l.check(&2).is_ok());
        assert_eq!(l.limiter.len(), 2);
        assert!(Limit::<u64>::new(0).is_none());
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
