//! A circuit breaker: closed → open after `threshold` consecutive failures →
//! half-open after `cooldown` (one trial request) → closed on success, open
//! again on failure. Pure state: the caller passes the clock, so tests need
//! no sleeps.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// One trial is in flight since `since`.
    HalfOpen {
        since: Instant,
    },
}

#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    failures: u32,
    threshold: u32,
    cooldown: Duration,
    /// How long a half-open trial may stay unanswered before another is let
    /// through (a trial whose caller went away never reports back).
    trial_limit: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration, trial_limit: Duration) -> Self {
        Self {
            state: State::Closed,
            failures: 0,
            threshold: threshold.max(1),
            cooldown,
            trial_limit,
        }
    }

    /// Whether a request may go through now; taking the half-open trial
    /// counts as going through.
    pub fn try_acquire(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen { since: now };
                true
            }
            State::Open { .. } => false,
            State::HalfOpen { since } if now.duration_since(since) >= self.trial_limit => {
                self.state = State::HalfOpen { since: now };
                true
            }
            State::HalfOpen { .. } => false,
        }
    }

    /// Forces a request through (every instance is open): it counts as the
    /// half-open trial.
    pub fn force(&mut self, now: Instant) {
        if self.state != State::Closed {
            self.state = State::HalfOpen { since: now };
        }
    }

    /// When this breaker would next let a request through.
    pub fn available_at(&self, now: Instant) -> Instant {
        match self.state {
            State::Closed => now,
            State::Open { until } => until,
            State::HalfOpen { since } => since + self.trial_limit,
        }
    }

    pub fn on_success(&mut self) {
        self.state = State::Closed;
        self.failures = 0;
    }

    /// Records a failure; returns true when this failure opened the breaker.
    pub fn on_failure(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        let was_open = matches!(self.state, State::Open { .. });
        let trip = matches!(self.state, State::HalfOpen { .. }) || self.failures >= self.threshold;
        if trip {
            self.state = State::Open {
                until: now + self.cooldown,
            };
        }
        trip && !was_open
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    pub fn is_open(&self) -> bool {
        self.state != State::Closed
    }

    /// `closed`, `open` or `half_open`, for the status page.
    pub fn name(&self) -> &'static str {
        match self.state {
            State::Closed => "closed",
            State::Open { .. } => "open",
            State::HalfOpen { .. } => "half_open",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn opens_after_threshold_then_half_opens_then_closes() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, 100 * MS, 1000 * MS);
        assert!(!b.on_failure(t0));
        assert!(!b.on_failure(t0));
        assert!(b.try_acquire(t0));
        assert!(b.on_failure(t0), "the third failure opens it");
        assert_eq!(b.name(), "open");
        assert!(!b.try_acquire(t0 + 50 * MS));
        assert!(b.try_acquire(t0 + 100 * MS), "the trial");
        assert_eq!(b.name(), "half_open");
        assert!(!b.try_acquire(t0 + 101 * MS), "one trial at a time");
        b.on_success();
        assert_eq!(b.name(), "closed");
        assert_eq!(b.failures(), 0);
        assert!(b.try_acquire(t0 + 102 * MS));
    }

    #[test]
    fn failed_trial_reopens_and_lost_trial_expires() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, 100 * MS, 500 * MS);
        assert!(b.on_failure(t0));
        assert!(b.try_acquire(t0 + 100 * MS));
        assert!(b.on_failure(t0 + 110 * MS), "a failed trial opens it again");
        assert!(!b.try_acquire(t0 + 150 * MS));
        assert_eq!(b.available_at(t0), t0 + 210 * MS);
        assert!(b.try_acquire(t0 + 210 * MS));
        // The trial never reports back: another is allowed after the limit.
        assert!(!b.try_acquire(t0 + 600 * MS));
        assert!(b.try_acquire(t0 + 710 * MS));
    }

    #[test]
    fn success_resets_the_count() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, 100 * MS, 500 * MS);
        b.on_failure(t0);
        b.on_success();
        assert!(!b.on_failure(t0));
        assert!(!b.is_open());
    }
}
