//! Keyed rate limits (`governor`), shared by the node's public API and the
//! gateway: one GCRA bucket per key, swept of idle keys in the background.

use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

/// How often idle keys are swept out of the limiters.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// A limiter holding more keys than this is swept at once, not at the next
/// tick (checked every [`CHECK_LEN_EVERY`] requests).
const MAX_TRACKED_KEYS: usize = 100_000;
const CHECK_LEN_EVERY: u64 = 1024;

type Keyed<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock>;

/// One keyed rate limit: `rate` requests per second per key, bursts of
/// twice as many. The node's limits and the gateway's are made of these.
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    limiter: Keyed<K>,
    rate: u32,
    checks: AtomicU64,
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    /// `None` for a rate of 0 (no limit).
    pub fn new(rate: u32) -> Option<Self> {
        let per_second = NonZeroU32::new(rate)?;
        let burst = NonZeroU32::new(rate.saturating_mul(2)).unwrap_or(per_second);
        Some(Self {
            limiter: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            rate,
            checks: AtomicU64::new(0),
        })
    }

    /// Like [`KeyedLimit::new`], shared, with (inside a Tokio runtime) a
    /// task that sweeps idle keys until the limit is dropped.
    pub fn swept(rate: u32) -> Option<Arc<Self>>
    where
        K: Send + Sync + 'static,
    {
        let limit = Arc::new(Self::new(rate)?);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(periodic(Arc::downgrade(&limit), SWEEP_EVERY, Self::sweep));
        }
        Some(limit)
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// `Err(wait)` when `key` is over its limit. A limit tracking more than
    /// [`MAX_TRACKED_KEYS`] keys is swept at once, not at the next tick.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let n = self.checks.fetch_add(1, Ordering::Relaxed);
        if n % CHECK_LEN_EVERY == CHECK_LEN_EVERY - 1 && self.tracked() > MAX_TRACKED_KEYS {
            self.sweep();
        }
        self.limiter
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets the keys whose bucket is full again.
    pub fn sweep(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Keys currently tracked.
    pub fn tracked(&self) -> usize {
        self.limiter.len()
    }
}

/// `Retry-After` for a wait: whole seconds, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

/// Runs `job` on `owner` every `every` until `owner` is dropped.
pub async fn periodic<T>(owner: Weak<T>, every: Duration, job: fn(&T)) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(owner) = owner.upgrade() else {
            return;
        };
        job(&owner);
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
