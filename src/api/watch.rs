//! Blocking queries (Consul's `?index=N&wait=D`): a read that waits until
//! its view has changed past index `N`, or `D` has passed, then answers as
//! usual with the current view and `X-Registry-Index`.
//!
//! Bounded three ways: a node-wide cap on waiters (a semaphore; `429` when
//! full); one shared wake-up (every waiter watches the replica's applied
//! index on one `tokio::sync::watch` channel and re-checks its own view,
//! which is a map lookup); and nothing outlives its request: the slot is a
//! permit owned by the handler's future, so a client that goes away frees
//! it at once when hyper drops that future.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::ApiError;
use crate::raft::replica::ViewIndex;

/// Default and largest wait.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// Parses `wait`: `500ms`, `10s`, `5m`, or a bare number of seconds.
pub fn parse_wait(s: Option<&str>) -> Result<Duration, ApiError> {
    let Some(s) = s else {
        return Ok(DEFAULT_WAIT);
    };
    let bad = || ApiError::bad("wait", "wait must look like 500ms, 10s or 5m (at most 5m)");
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(bad()),
    };
    if d > MAX_WAIT {
        return Err(bad());
    }
    Ok(d)
}

/// Blocking queries: the slots they take and the node's stop signal.
pub struct Watching {
    /// Slots for blocking queries; a request that finds none gets `429`.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Turns true when the node stops: blocking queries answer at once.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    pub replica: Arc<crate::raft::Replica>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Watching {
    /// Waits until `view(index)` exceeds `after`, or `wait` (plus up to 1/16
    /// of it as jitter, so watchers do not come back in lockstep) passes.
    pub async fn block_until_changed(
        &self,
        after: u64,
        wait: Duration,
        view: impl Fn(&ViewIndex) -> u64,
    ) -> Result<(), ApiError> {
        // Index 0 means "I have seen nothing yet": answer at once.
        if after == 0 || view(&self.replica.read().views) > after {
            return Ok(());
        }
        let _slot = self.slots.clone().try_acquire_owned().map_err(|_| {
            self.metrics.watch_rejected.inc();
            ApiError::TooManyRequests(
                "this node has no free slot for another blocking query; retry shortly or without wait".into(),
            )
        })?;
        let _gauge = WatcherGauge::new(self);
        let jitter = wait.as_millis() as u64 / 16;
        let jitter = if jitter == 0 {
            0
        } else {
            rand::random::<u64>() % jitter
        };
        let deadline = Instant::now() + wait + Duration::from_millis(jitter);
        let mut applied = self.replica.subscribe();
        let mut stopping = self.stopping.clone();
        loop {
            if view(&self.replica.read().views) > after {
                return Ok(());
            }
            tokio::select! {
                changed = tokio::time::timeout_at(deadline, applied.changed()) => match changed {
                    Ok(Ok(())) => continue,
                    // Time is up: answer with what we have.
                    Ok(Err(_)) | Err(_) => return self.not_behind(after),
                },
                // The node is stopping: answer now so the stop is not held up.
                _ = stopping.wait_for(|s| *s) => return self.not_behind(after),
            }
        }
    }

    /// A blocking query never answers with a state older than the index it
    /// was given: a node that has not applied that far yet (it lags, is cut
    /// off, or restarted) says so with `503` instead of sending the client
    /// back in time. (The harness in `examples/jepsen` caught a watcher
    /// moving to a lagging node and being answered from before its index.)
    fn not_behind(&self, after: u64) -> Result<(), ApiError> {
        let applied = self.replica.read().applied_index();
        if applied < after {
            return Err(ApiError::Unavailable(format!(
                "this node has applied up to index {applied}, behind the index {after} you \
                 asked to wait past; retry shortly or ask another node"
            )));
        }
        Ok(())
    }
}

/// Counts a waiter in `registry_watchers` for as long as it lives.
struct WatcherGauge<'a>(&'a Watching);

impl<'a> WatcherGauge<'a> {
    fn new(state: &'a Watching) -> Self {
        state.metrics.watchers.inc();
        Self(state)
    }
}

impl Drop for WatcherGauge<'_> {
    fn drop(&mut self) {
        self.0.metrics.watchers.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_values() {
        assert_eq!(parse_wait(None).unwrap(), DEFAULT_WAIT);
        assert_eq!(
            parse_wait(Some("500ms")).unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_wait(Some("10s")).unwrap(), Duration::from_secs(10));
        assert_eq!(parse_wait(Some("5m")).unwrap(), Duration::from_secs(300));
        assert_eq!(parse_wait(Some("7")).unwrap(), Duration::from_secs(7));
        for bad in ["", "6m", "10h", "x", "-1s", "1.5s"] {
            assert!(parse_wait(Some(bad)).is_err(), "{bad}");
        }
    }
}
