//! The lease rules: when a heartbeat may be acknowledged without a Raft
//! write, when an instance may be expired, and when expiry must pause.
//! Pure functions of leader-stamped times; no clock, no I/O.
//!
//! # Why these rules keep P1 (no early removal) without a write per beat
//!
//! Write `c` for an instance's *committed* `last_heartbeat` and `A` for its
//! ack window, [`ack_window`]: half its TTL plus [`ACK_GRACE_MS`], at most
//! the TTL (32 s for the default 60 s TTL).
//!
//! 1. **Acknowledging.** Only the leader acknowledges, and only after it has
//!    confirmed that it still leads (a read-index round or its leader lease,
//!    see `crate::leader::read_index`) and applied everything committed
//!    before the heartbeat arrived. It stamps the heartbeat `h` with its
//!    clock *after* that confirmation. It acknowledges at once when
//!    `h <= c + A` ([`can_ack`]) and remembers `h` as *unsettled* until a
//!    checkpoint (a batched `Renew` entry, within a second) has put it in
//!    the log; otherwise it first commits a `Renew` carrying its stamp, then
//!    answers as above, stamped again and remembered as unsettled (the
//!    answer comes later than the committed stamp, by the commit's latency;
//!    revivals are remembered the same way). So every acknowledged
//!    heartbeat is either committed (`h <= c`), or unsettled on the leader
//!    that acknowledged it, with `h <= c + A`.
//! 2. **Leaders follow each other.** A deposed leader acknowledges nothing
//!    once its leader lease has run out, and no new leader can be elected
//!    before that (the lease is shorter than the time followers refuse to
//!    vote for anyone else). A new leader notes when it began leading, `t_L`
//!    on its clock. Every heartbeat acknowledged by an earlier leader was
//!    acknowledged before `t_L` and, by (1), at most `c + A`, with `c` the
//!    committed value that leader saw, which the new leader's state includes.
//! 3. **Expiring.** The leader bounds the latest acknowledged heartbeat of an
//!    instance by `b = max(c, u, min(c + A, t_L))`, with `u` its own
//!    unsettled value ([`last_ack_bound`]), and expires the instance only
//!    once `b + ttl + EXPIRY_MARGIN_MS <= now` ([`may_expire`]), on a state
//!    that includes everything committed before the round began (it confirms
//!    leadership first). By (1) and (2), every acknowledgement so far is at
//!    most `b`.
//! 4. **Between the decision and the removal.** The expiry entry carries
//!    `now` and the margin; apply removes an instance only if its committed
//!    `c + ttl + margin <= now` still holds. A renewal committed before the
//!    entry makes it skip the instance. A fast acknowledgement after the
//!    decision would need `h <= c + A`, yet `c <= now - ttl - margin` and
//!    `h > now`, which `A <= ttl` rules out. Leaders of later terms
//!    acknowledge only after applying the entry, and find the instance gone.
//!
//! So an instance is removed no earlier than `ttl + EXPIRY_MARGIN_MS` after
//! its latest acknowledged heartbeat, whichever leader removes it and however
//! many leaders came between; the margin absorbs clock differences between
//! successive leaders. A new leader needs no grace period (no mass expiry
//! after failover): an instance that kept its cadence has `c + A` at or past
//! its last heartbeat, so it is judged on that heartbeat, and it renews
//! again long before `ttl` has passed.
//!
//! # How soon a silent instance goes (P2)
//!
//! Let `s` be the last acknowledged heartbeat. Expiry rounds run about once
//! a second (800-1200 ms apart).
//! - **Same leader throughout:** `b = s`, so the instance goes within
//!   `ttl + EXPIRY_MARGIN_MS` plus one round (about 1.2 s) and the commit:
//!   under `ttl + 3 s`.
//! - **The leader changed after `s`:** the new leader cannot know `s`, only
//!   `c >= s - A`, so `b <= min(s + A, t_L)`: the instance goes within
//!   `ttl + EXPIRY_MARGIN_MS + min(A, t_L - s)` plus one round, where `t_L`
//!   is when the new leader noticed it leads (its first expiry round, at
//!   most a round after its election). At worst `1.5 ttl + 3 s` plus a
//!   round; for the default 60 s TTL, 93 s rather than 62 s.
//!
//! Entries written by earlier releases (`Expire`, `ExpireKeep`) keep their
//! own rule: removal at `c + ttl + LEGACY_EXPIRY_SLACK_MS`, when those
//! releases acknowledged only within 1.5 s of `c`.

use super::{Instance, Millis};

/// How far past half its TTL a heartbeat may come and still be
/// acknowledged without a write: the slack of a client that sends every
/// TTL/2 and waits for each answer.
pub const ACK_GRACE_MS: Millis = 2_000;

/// Expiry waits this long past the latest possible acknowledged heartbeat
/// plus the TTL: the clock difference between successive leaders it
/// tolerates.
pub const EXPIRY_MARGIN_MS: Millis = 1_000;

/// The slack that `Expire` and `ExpireKeep` entries (earlier releases)
/// are applied with.
pub const LEGACY_EXPIRY_SLACK_MS: Millis = 2_000;

fn ttl_ms(ttl_seconds: u32) -> Millis {
    Millis::from(ttl_seconds) * 1000
}

/// How long after its committed `last_heartbeat` an instance's heartbeats
/// are acknowledged without a write: `ttl/2 + ACK_GRACE_MS`, at most `ttl`
/// (the argument above needs `A <= ttl`).
pub fn ack_window(ttl_seconds: u32) -> Millis {
    let ttl = ttl_ms(ttl_seconds);
    (ttl / 2 + ACK_GRACE_MS).min(ttl)
}

/// The latest moment a heartbeat of `instance` may be acknowledged on the
/// strength of its committed `last_heartbeat` alone.
pub fn ack_until(instance: &Instance) -> Millis {
    instance
        .last_heartbeat
        .saturating_add(ack_window(instance.ttl_seconds))
}

/// May a heartbeat stamped `now` be acknowledged without a write, given the
/// instance's [`ack_until`]?
pub fn can_ack(ack_until: Millis, now: Millis) -> bool {
    now <= ack_until
}

/// The latest acknowledged heartbeat of an instance, as far as a leader can
/// bound it: `committed` is its committed `last_heartbeat`, `unsettled` the
/// latest heartbeat this leader acknowledged that may not be in the log yet,
/// and `leading_since` when this leader began leading (on its clock).
pub fn last_ack_bound(
    committed: Millis,
    ttl_seconds: u32,
    unsettled: Option<Millis>,
    leading_since: Millis,
) -> Millis {
    let by_earlier_leaders = committed
        .saturating_add(ack_window(ttl_seconds))
        .min(leading_since);
    committed
        .max(unsettled.unwrap_or(Millis::MIN))
        .max(by_earlier_leaders)
}

/// May the leader expire the instance at `now` (see [`last_ack_bound`])?
pub fn may_expire(
    committed: Millis,
    ttl_seconds: u32,
    unsettled: Option<Millis>,
    leading_since: Millis,
    now: Millis,
) -> bool {
    last_ack_bound(committed, ttl_seconds, unsettled, leading_since)
        .saturating_add(ttl_ms(ttl_seconds))
        .saturating_add(EXPIRY_MARGIN_MS)
        <= now
}

/// Is the instance due at `now` on its committed state, with `margin` past
/// its deadline? Apply's check for every expiry entry.
pub fn is_due(instance: &Instance, margin: Millis, now: Millis) -> bool {
    deadline_passed(instance.deadline(), margin, now)
}

/// Is an instance whose deadline is `deadline` due at `now`, `margin` past it?
pub fn deadline_passed(deadline: Millis, margin: Millis, now: Millis) -> bool {
    deadline.saturating_add(margin) <= now
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

    fn inst(last_heartbeat: Millis, ttl: u32) -> Instance {
        Instance {
            service_name: "s".into(),
            instance_id: "i".into(),
            host: "h".into(),
            port: 1,
            health_endpoint: "/health".into(),
            metadata: Default::default(),
            ttl_seconds: ttl,
            registered_at: 0,
            last_heartbeat,
        }
    }

    #[test]
    fn the_ack_window_is_half_the_ttl_plus_grace_and_never_above_the_ttl() {
        assert_eq!(ack_window(60), 32_000);
        assert_eq!(ack_window(10), 7_000);
        // Short TTLs: capped at the TTL, as the argument needs.
        assert_eq!(ack_window(3), 3_000);
        for ttl in 1..=86_400 {
            assert!(ack_window(ttl) <= ttl_ms(ttl));
        }
        let i = inst(10_000, 60);
        assert!(can_ack(ack_until(&i), 42_000));
        assert!(!can_ack(ack_until(&i), 42_001));
        // A committed value from a leader whose clock ran ahead is fine too.
        assert!(can_ack(ack_until(&i), 5_000));
    }

    #[test]
    fn a_leader_judges_what_it_saw_on_its_own_acks_and_the_rest_by_the_window() {
        let ttl = 10;
        // Renewed by this leader at 50 s, committed at 40 s: due at
        // 50 + 10 + margin, not earlier.
        let t_l = 20_000;
        assert!(!may_expire(40_000, ttl, Some(50_000), t_l, 60_999));
        assert!(may_expire(40_000, ttl, Some(50_000), t_l, 61_000));
        // Not renewed since this leader took over at 50 s: an earlier
        // leader may have acknowledged up to c + A = 47 s.
        assert_eq!(last_ack_bound(40_000, ttl, None, 50_000), 47_000);
        assert!(!may_expire(40_000, ttl, None, 50_000, 57_999));
        assert!(may_expire(40_000, ttl, None, 50_000, 58_000));
        // ...but nothing after the takeover at 42 s.
        assert_eq!(last_ack_bound(40_000, ttl, None, 42_000), 42_000);
        // Committed after the takeover (registered, or renewed through the
        // log): the committed value itself.
        assert_eq!(last_ack_bound(40_000, ttl, None, 30_000), 40_000);
        // Apply's check on committed values.
        let i = inst(1_000, 5);
        assert!(!is_due(
            &i,
            EXPIRY_MARGIN_MS,
            1_000 + 5_000 + EXPIRY_MARGIN_MS - 1
        ));
        assert!(is_due(
            &i,
            EXPIRY_MARGIN_MS,
            1_000 + 5_000 + EXPIRY_MARGIN_MS
        ));
    }

    #[test]
    fn p2_bounds_hold_with_and_without_a_leader_change() {
        let ttl = 60;
        let s = 100_000;
        // Same leader: its own ack of s decides.
        assert!(may_expire(
            s,
            ttl,
            Some(s),
            0,
            s + 60_000 + EXPIRY_MARGIN_MS
        ));
        assert!(may_expire(
            s - 30_000,
            ttl,
            Some(s),
            0,
            s + 60_000 + EXPIRY_MARGIN_MS
        ));
        // A new leader since 2 s after s, its checkpoint of s lost (c = s - 30 s):
        // gone by s + ttl + margin + 2 s.
        assert!(may_expire(s - 30_000, ttl, None, s + 2_000, s + 63_000));
        // Whatever the takeover, by s + 1.5 ttl + grace + margin.
        assert!(may_expire(s, ttl, None, Millis::MAX, s + 32_000 + 61_000));
    }

    /// One instance, a history of leaders: heartbeats acknowledged fast or
    /// through the log, checkpoints, failovers that lose the old leader's
    /// unsettled acks, clocks that differ by up to 0.4 s, expiry rounds
    /// whose entry is applied later (heartbeats may come in between). No
    /// instance may be removed before its last acknowledged heartbeat + TTL.
    ///
    /// Shown to fail: without the bound on earlier leaders' acks
    /// (`min(c + A, t_L)`) it finds a removal 11 s after an ack with a 12 s
    /// TTL; with an ack window of `ttl + 2 s` (past `ttl + margin`) it finds
    /// a heartbeat acknowledged after the decision and removed at once.
    #[derive(Debug, Clone)]
    enum Step {
        Heartbeat,
        Checkpoint,
        Failover { skew: Millis, delay: Millis },
        Round,
        Apply,
    }

    fn step() -> impl proptest::strategy::Strategy<Value = (Millis, Step)> {
        use proptest::prelude::*;
        let s = prop_oneof![
            4 => Just(Step::Heartbeat),
            2 => Just(Step::Checkpoint),
            1 => (0..=400i64, 0..=1_500i64).prop_map(|(skew, delay)| Step::Failover { skew, delay }),
            3 => Just(Step::Round),
            2 => Just(Step::Apply),
        ];
        (0..8_000i64, s)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4_096))]
        #[test]
        fn no_leader_history_expires_an_instance_early(
            ttl in 5u32..20,
            steps in proptest::collection::vec(step(), 1..80),
        ) {
            let mut t: Millis = 1_000_000; // true time
            let mut skew: Millis = 0; // the leader's clock: t + skew
            let mut c = t; // committed last_heartbeat (registered now)
            let mut last_ack = t;
            let mut unsettled: Option<Millis> = None;
            let mut leading_since = t;
            // An expiry decided at this leader time, not applied yet.
            let mut decided: Option<Millis> = None;
            for (gap, s) in steps {
                t += gap;
                let now = t + skew;
                // Applies a decided expiry now: removal at true time `t`.
                let apply = |decided: &mut Option<Millis>, c: Millis, t: Millis| {
                    match decided.take() {
                        Some(at) if is_due(&inst(c, ttl), EXPIRY_MARGIN_MS, at) => Some(t),
                        _ => None,
                    }
                };
                let removed = match s {
                    Step::Heartbeat => {
                        if can_ack(c + ack_window(ttl), now) {
                            unsettled = Some(unsettled.map_or(now, |u| u.max(now)));
                            last_ack = t;
                            None
                        } else {
                            // Through the log: the renewal entry comes after
                            // any decided expiry, which is applied first.
                            let removed = apply(&mut decided, c, t);
                            if removed.is_none() {
                                c = c.max(now);
                                last_ack = t;
                            }
                            removed
                        }
                    }
                    Step::Checkpoint => {
                        if let Some(u) = unsettled.take() {
                            c = c.max(u);
                        }
                        None
                    }
                    Step::Failover { skew: new, delay } => {
                        // The old leader's lease ran out; an expiry it
                        // decided is applied before the new one acts (or
                        // is lost). The new one leads from `delay` later,
                        // knowing only what is committed.
                        let removed = apply(&mut decided, c, t);
                        unsettled = None;
                        skew = new;
                        t += delay;
                        leading_since = t + skew;
                        removed
                    }
                    Step::Round => {
                        if decided.is_none() && may_expire(c, ttl, unsettled, leading_since, now) {
                            decided = Some(now);
                        }
                        None
                    }
                    Step::Apply => apply(&mut decided, c, t),
                };
                if let Some(at) = removed {
                    proptest::prop_assert!(
                        at >= last_ack + ttl_ms(ttl),
                        "removed at {}, last ack at {}, ttl {} s",
                        at, last_ack, ttl
                    );
                    return Ok(());
                }
            }
        }
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
