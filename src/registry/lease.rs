//! The lease rules: when a heartbeat may be acknowledged without a Raft
//! write, when an instance is due for expiry, and when expiry must pause.
//! Pure functions of leader-stamped times; no clock, no I/O.
//!
//! # Why these rules keep P1 (no early removal) without a write per beat
//!
//! Let `h` be the moment a heartbeat is acknowledged and `c` the
//! `last_heartbeat` that is *committed* for the instance at that moment. A
//! node acknowledges only if `c >= h - ACK_SLACK_MS` ([`can_ack`]);
//! otherwise it first commits a renewal (a batched `Renew` entry) and checks
//! again. Committed values never move backwards, and every leader expires an
//! instance only once `c + ttl + EXPIRY_SLACK_MS <= now` ([`is_due`]), with
//! `EXPIRY_SLACK_MS > ACK_SLACK_MS`. So removal happens no earlier than
//! `h - ACK_SLACK_MS + ttl + EXPIRY_SLACK_MS > h + ttl`, whichever leader
//! does it and however many leaders came between: a new leader needs no
//! grace period (no mass expiry after failover) and extends nothing (no
//! immortal entries after repeated elections). The margin between the two
//! slacks absorbs clock differences between successive leaders.
//!
//! P2 (removal soon after heartbeats stop) follows too: an instance silent
//! since `s` has `c <= s`, so it is due at `s + ttl + EXPIRY_SLACK_MS` at the
//! latest, and the leader's expiry tick removes it about a second later.

use super::{Instance, Millis};

/// A heartbeat is acknowledged at once when the committed `last_heartbeat`
/// is at most this old.
pub const ACK_SLACK_MS: Millis = 1_500;

/// Expiry waits this long past `last_heartbeat + ttl`. Must exceed
/// [`ACK_SLACK_MS`]; the difference tolerates clock skew between leaders.
pub const EXPIRY_SLACK_MS: Millis = 2_000;

// The safety argument above needs the expiry slack to exceed the ack slack.
const _: () = assert!(EXPIRY_SLACK_MS > ACK_SLACK_MS);

/// May a heartbeat at `now` be acknowledged on the strength of the committed
/// `last_heartbeat` alone?
pub fn can_ack(committed_last_heartbeat: Millis, now: Millis) -> bool {
    committed_last_heartbeat >= now.saturating_sub(ACK_SLACK_MS)
}

/// Is the instance due for removal at `now`, judged on committed state?
pub fn is_due(instance: &Instance, now: Millis) -> bool {
    deadline_passed(instance.deadline(), now)
}

/// Is an instance whose deadline is `deadline` due for removal at `now`?
pub fn deadline_passed(deadline: Millis, now: Millis) -> bool {
    deadline.saturating_add(EXPIRY_SLACK_MS) <= now
}

/// When expiry pauses: the operator's threshold and the smallest registry it
/// applies to (a registry of two instances, one of them dead, is not sick).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Protection {
    /// Pause when more than this share of instances is overdue or recently
    /// expired (0.0-1.0; 1.0 disables the protection).
    pub threshold: f64,
    /// Protection applies only with at least this many instances.
    pub min_instances: usize,
}

impl Default for Protection {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            min_instances: 10,
        }
    }
}

/// What the leader saw in one expiry round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assessment {
    /// Instances in the registry now.
    pub total: usize,
    /// Of those, how many are due.
    pub overdue: usize,
    /// How many this leader expired within the current window.
    pub recently_expired: usize,
    /// `(overdue + recently_expired) / (total + recently_expired)`.
    pub share: f64,
    /// Whether expiry should be paused.
    pub pause: bool,
}

impl Protection {
    /// Decides, from fresh counts each round, whether expiry must pause:
    /// when more than `threshold` of the instances seen within one window
    /// are overdue or already expired, the registry or its network is sick,
    /// not the services. Recomputed every round, so it clears by itself as
    /// soon as renewals come back.
    pub fn assess(&self, total: usize, overdue: usize, recently_expired: usize) -> Assessment {
        let seen = total + recently_expired;
        let share = if seen == 0 {
            0.0
        } else {
            (overdue + recently_expired) as f64 / seen as f64
        };
        Assessment {
            total,
            overdue,
            recently_expired,
            share,
            pause: seen >= self.min_instances && self.threshold < 1.0 && share > self.threshold,
        }
    }
}

/// The mass-expiry protection across the leader's rounds: the window of
/// recent expirations, since when expiry has been paused, and whether the
/// pause was overridden (paused for longer than allowed). Pure: every call
/// takes the time, a monotonic clock in milliseconds.
#[derive(Debug, Clone)]
pub struct ExpiryGuard {
    protection: Protection,
    window_ms: Millis,
    pause_max_ms: Millis,
    /// `(when, how many)` of this leader's recent expirations.
    recent: std::collections::VecDeque<(Millis, usize)>,
    paused_since: Option<Millis>,
    overridden: bool,
}

/// What one round decided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Round {
    pub assessment: Assessment,
    /// Expiry pauses this round.
    pub pause: bool,
    /// The protection has been overridden (until the share drops).
    pub overridden: bool,
    /// This round overrode it: the pause lasted longer than allowed.
    pub just_overridden: bool,
}

impl ExpiryGuard {
    pub fn new(protection: Protection, window_ms: Millis, pause_max_ms: Millis) -> Self {
        Self {
            protection,
            window_ms,
            pause_max_ms,
            recent: Default::default(),
            paused_since: None,
            overridden: false,
        }
    }

    /// Forgets everything (this node stopped leading).
    pub fn reset(&mut self) {
        *self = Self::new(self.protection, self.window_ms, self.pause_max_ms);
    }

    /// Decides a round at `now` from the registry's counts: pause when the
    /// protection says so, unless the pause has lasted longer than allowed;
    /// the override holds until the share drops below the threshold.
    pub fn round(&mut self, now: Millis, total: usize, overdue: usize) -> Round {
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) > self.window_ms)
        {
            self.recent.pop_front();
        }
        let recently = self.recent.iter().map(|(_, n)| n).sum();
        let a = self.protection.assess(total, overdue, recently);
        if !a.pause {
            self.overridden = false;
        }
        let mut just_overridden = false;
        if a.pause && !self.overridden {
            let since = *self.paused_since.get_or_insert(now);
            if now.saturating_sub(since) > self.pause_max_ms {
                self.overridden = true;
                just_overridden = true;
            }
        }
        let pause = a.pause && !self.overridden;
        if !pause {
            self.paused_since = None;
        }
        Round {
            assessment: a,
            pause,
            overridden: self.overridden,
            just_overridden,
        }
    }

    /// Records `n` instances expired at `now`.
    pub fn expired(&mut self, now: Millis, n: usize) {
        if n > 0 {
            self.recent.push_back((now, n));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn inst(last_heartbeat: Millis, ttl: u32) -> Instance {
        Instance {
            service_name: "s".into(),
            instance_id: "i".into(),
            host: "h".into(),
            port: 1,
            health_endpoint: "/health".into(),
            metadata: BTreeMap::new(),
            ttl_seconds: ttl,
            registered_at: 0,
            last_heartbeat,
        }
    }

    #[test]
    fn the_slacks_keep_every_acknowledged_heartbeat_safe() {
        // Walk acknowledgement times past a committed value: wherever an
        // ack is allowed, removal comes strictly after ack + ttl.
        let committed = 100_000;
        let i = inst(committed, 5);
        for ack in (committed..committed + 10_000).step_by(100) {
            if !can_ack(committed, ack) {
                continue;
            }
            for now in (ack..ack + 20_000).step_by(100) {
                if is_due(&i, now) {
                    assert!(now > ack + 5_000, "removed at {now}, acked at {ack}");
                }
            }
        }
    }

    #[test]
    fn ack_needs_a_fresh_committed_heartbeat() {
        assert!(can_ack(10_000, 10_000));
        assert!(can_ack(10_000, 11_500));
        assert!(!can_ack(10_000, 11_501));
        // A committed value from a leader whose clock ran ahead is fine too.
        assert!(can_ack(12_000, 10_000));
    }

    #[test]
    fn due_after_ttl_plus_slack() {
        let i = inst(1_000, 5);
        assert!(!is_due(&i, 1_000 + 5_000 + EXPIRY_SLACK_MS - 1));
        assert!(is_due(&i, 1_000 + 5_000 + EXPIRY_SLACK_MS));
    }

    #[test]
    fn protection_pauses_on_mass_expiry_and_clears_by_itself() {
        let p = Protection {
            threshold: 0.5,
            min_instances: 10,
        };
        // Most instances silent at once: pause.
        assert!(p.assess(10, 8, 0).pause);
        // Expiring them one batch at a time does not sneak past the guard.
        assert!(p.assess(5, 3, 5).pause);
        // Renewals come back: the same round's counts clear it.
        assert!(!p.assess(10, 0, 0).pause);
        // Exactly the threshold is not more than it.
        assert!(!p.assess(10, 5, 0).pause);
        // Small registries are never protected.
        assert!(!p.assess(2, 2, 0).pause);
        // threshold 1.0 disables the protection.
        let off = Protection {
            threshold: 1.0,
            min_instances: 0,
        };
        assert!(!off.assess(10, 10, 0).pause);
    }

    #[test]
    fn the_guard_pauses_overrides_after_the_longest_pause_and_rearms() {
        let p = Protection {
            threshold: 0.5,
            min_instances: 10,
        };
        let mut g = ExpiryGuard::new(p, 60_000, 900_000);
        // Healthy: nothing pauses.
        let r = g.round(0, 100, 1);
        assert!(!r.pause && !r.overridden);
        // Most instances silent: pause, and keep pausing...
        assert!(g.round(1_000, 100, 80).pause);
        assert!(g.round(900_999, 100, 80).pause);
        // ...until the pause has lasted longer than allowed.
        let r = g.round(901_001, 100, 80);
        assert!(!r.pause && r.overridden && r.just_overridden);
        let r = g.round(902_000, 100, 80);
        assert!(!r.pause && r.overridden && !r.just_overridden);
        // Once the share drops, the override clears and the guard re-arms.
        let r = g.round(903_000, 100, 0);
        assert!(!r.pause && !r.overridden);
        assert!(g.round(904_000, 100, 80).pause);
    }

    #[test]
    fn recent_expirations_count_within_the_window_only() {
        let p = Protection {
            threshold: 0.5,
            min_instances: 10,
        };
        let mut g = ExpiryGuard::new(p, 60_000, 900_000);
        // Expiring batch after batch does not sneak past the guard...
        g.expired(0, 40);
        assert!(g.round(1_000, 60, 25).pause);
        // ...but expirations older than the window no longer count.
        assert!(!g.round(61_001, 60, 25).pause);
        g.reset();
        assert!(!g.round(61_002, 60, 25).pause);
    }
}
