//! Linearizability checker for one key of a service registry.
//!
//! The key is modelled as a register whose state is `Option<u64>`: absent, or present
//! with the (globally unique) value written by the last acknowledged `Register`.
//!
//! # Algorithm
//!
//! Wing & Gong's search with Lowe's memoisation ("Testing for linearizability",
//! Concurrency and Computation: Practice and Experience, 2017), in the form used by
//! porcupine:
//!
//! * every operation with a known outcome contributes a call entry and a return entry;
//!   the entries are sorted by time, calls before returns at equal times (so an operation
//!   `A` precedes `B` only if `A.ret < B.call`: equal times count as overlapping);
//! * the entries form a doubly-linked list; linearizing an operation *lifts* its call and
//!   return entries out of the list, backtracking *unlifts* them again;
//! * a depth-first search walks the list from its head: a call entry is a candidate to be
//!   linearized next, reaching a return entry means the operation it belongs to should
//!   already have been linearized, so the search backtracks (a stack holds the moves and
//!   the states before them);
//! * a cache of visited configurations `(set of linearized operations, state)` prunes
//!   the search: a configuration entered before is either an ancestor (impossible, the
//!   set only grows along a path) or was explored without success. The set is a small
//!   hand-written bitset over `Vec<u64>`; the cache key encodes it compactly (the run of
//!   leading all-ones words is stored as a count) and is hashed with a small
//!   multiply-rotate hasher.
//!
//! `Unknown` operations (timed out, connection lost, 503) may take effect at any instant
//! after their call, or never. Their return is +infinity, so they never force the search
//! to backtrack; they are kept outside the linked list (they would sit at its front
//! forever) and offered as extra candidates whose call is not after the earliest pending
//! return. The search succeeds as soon as every operation with a known outcome is
//! linearized: the remaining `Unknown` ones are taken never to have happened (which is
//! the same as linearizing them at the very end).
//!
//! # Reductions (all sound and complete; checked against a brute-force oracle in the tests)
//!
//! 1. `Unknown` heartbeats (and `Unknown` reads) never change the state: dropped up front.
//! 2. `Unknown` registers whose value no read ever saw are dropped in a first pass. If the
//!    reduced history is linearizable so is the full one (they simply never took effect).
//!    Only if the first pass fails is the history checked again with them included.
//! 3. Values that no read ever saw are indistinguishable (only reads look at the value),
//!    so all of them are mapped to one abstract "present, anonymous" state.
//! 4. *Observers* (reads, heartbeats, `NotFound` deregisters) never change the state. If
//!    one can be linearized now (its call is not after the earliest pending return and its
//!    outcome matches the state), moving it to this point in any linearization keeps that
//!    linearization valid, so the search commits to it and tries no alternative here.
//!    (In a local check, see below, not if an optional operation that must precede it
//!    could still be applied.)
//! 5. Once the state is `Some(v)` and a read that saw `v` is still pending, the state may
//!    not change unless another register of `v` is still pending: `v` could never come
//!    back and that read could never be linearized.
//! 6. An `Unknown` operation that would not change the state is never applied (not
//!    applying it leaves strictly more options). An applied `Unknown` operation must be
//!    followed directly by a known operation that is not a register (otherwise its effect
//!    is overwritten unobserved and it may as well never have happened); configurations
//!    right after an `Unknown` operation are flagged as such in the cache key.
//! 7. `Unknown` deregisters are interchangeable once called (same effect, pending
//!    forever), and so are `Unknown` registers of never-read values (by 3.): within each
//!    of these two classes they are applied in call order only.
//! 8. A configuration that has applied a superset of the `Unknown` operations of an
//!    explored one (same known operations, same state) is pruned: it has fewer options.
//!    (Two configurations also differ in whether they directly follow an `Unknown`
//!    operation, see 6.; one that does not is never pruned by one that does.)
//! 9. Once no pending read can see the current value any more, the value is as good as an
//!    anonymous one (3.), which merges more configurations.
//! 10. A configuration in which a pending read saw a value that is not the current state
//!     and that no pending register writes is a dead end.
//!
//! # Local proofs of violations
//!
//! Proving that *no* linearization exists needs an exhaustive search, and with `Unknown`
//! operations (each may take effect at any later point) the space of configurations of a
//! long history is large even when the anomaly is local. The main search therefore runs
//! in slices; when a slice brings no progress, the operations that could not be placed
//! at the deepest point reached are used as an anchor and progressively larger time
//! windows `[from, to]` ending at the anchor are checked on their own: the operations
//! inside the window must be linearized, operations straddling its ends may or may not
//! take effect inside it, every `Unknown` operation called before `to` is available, and
//! the state at the start of the window may be any state that the operations before it
//! could have produced (absent, the initial state, or the value of a register called before
//! `to` that is not wholly inside the window). If no such window linearization exists, no
//! linearization of the whole history exists either (restricting one to the window gives
//! one), so the verdict is a violation. Otherwise the main search simply continues; it
//! alone decides linearizability. The windows reuse the search above (operations
//! straddling an end are optional, like `Unknown` ones, but expire once an operation
//! called after their return is linearized); their cost is capped per window and, in
//! total, to about the steps of the main search so far plus a constant. Once a window is
//! proven, the operations near the anchor whose removal alone makes it linearizable are
//! looked for (within a step limit) and reported first among the culprits.
//!
//! # Segmentation
//!
//! Splitting the history at quiescent points is deliberately *not* implemented. A split is
//! only sound if the set of all states possible at the split point is carried into the
//! next segment, and that set needs an exhaustive search of the earlier segment (the
//! search stops at the first linearization it finds; the state at a quiescent point is
//! not unique in general, e.g. after two concurrent registers). Moreover every retained
//! `Unknown` operation stays pending forever, so no split is possible after the first one,
//! and with many concurrent clients quiescent points are rare anyway. The reductions above
//! keep the unsplit search close to linear on realistic linearizable histories (20,000
//! events, 12 clients: tens of milliseconds in release mode), and the local proofs above
//! play the role of splitting for violations.
//!
//! # Layout
//!
//! * `model`: the history's vocabulary ([`Event`], [`Op`], [`Outcome`], [`Time`]) and the
//!   register model, on concrete states and on the coded states of the search;
//! * `prepare`: the operations of one search, for the whole history or for a window;
//! * `search`: the search itself, with its bitset and cache;
//! * `explain`: the account of a violation and its culprits;
//! * this module: the entry point [`check_key`], its [`Verdict`], and the driver that
//!   runs the passes, slices and local proofs described above.

mod explain;
mod model;
mod prepare;
mod search;

pub use model::{Event, Op, Outcome, Time};

use explain::{analyse, explain, LIST_SHOWN};
use model::{Codes, Tr, ABSENT, ANON};
use prepare::Prepared;
use search::{Search, SearchResult};

/// Result of [`check_key`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Some linearization exists.
    Linearizable,
    /// Not linearizable. `explanation` is a human-readable multi-line account: the
    /// operations of the longest prefix that could be linearized (in linearization order,
    /// with call/return times and outcomes) and the operation(s) that could not be placed,
    /// i.e. enough for an engineer to see the anomaly (e.g. a stale read).
    Violation {
        explanation: String,
        /// Event ids of the operations to blame: if a local check (see the module
        /// documentation) established the violation, first the operations whose removal
        /// alone would remove the contradiction it found; then the operations that could
        /// not be placed after the longest prefix, together with the reads that kept the
        /// state from changing there or that can never be linearized.
        culprits: Vec<usize>,
    },
    /// The search exceeded `budget` steps; no verdict.
    Inconclusive { steps: u64 },
}

/// Checks whether `history` (one key, events in any order) is linearizable with respect to
/// the register model, starting from state `initial`.
///
/// `budget` bounds the total number of search steps (one step is one candidate tried or
/// one backtrack, over all passes and local checks); when it runs out the answer is
/// [`Verdict::Inconclusive`]. Never panics.
pub fn check_key(history: &[Event], initial: Option<u64>, budget: u64) -> Verdict {
    check_key_tuned(history, initial, budget, &TUNING)
}

// ---------------------------------------------------------------------------------------
// Driver: passes, slices and local proofs.

/// Knobs of the driver (the tests use other values to exercise the local proofs).
struct Tuning {
    /// Steps per slice of a main search.
    slice: u64,
    /// Number of operations called before the anchor that the successive windows include.
    window_sizes: &'static [usize],
}

const TUNING: Tuning = Tuning {
    slice: 50_000,
    window_sizes: &[32, 128, 512, 2_048, 8_192],
};
/// Step cap of one window check: `WINDOW_STEPS_BASE + WINDOW_STEPS_PER_OP * operations`.
const WINDOW_STEPS_BASE: u64 = 50_000;
const WINDOW_STEPS_PER_OP: u64 = 200;
/// Local checks may take up to this many steps more than the main searches so far.
const WINDOW_ALLOWANCE_BASE: u64 = 500_000;
/// Steps spent at most on finding the critical operations of a window, for the explanation.
const CRITICAL_STEPS: u64 = 300_000;

fn check_key_tuned(
    history: &[Event],
    initial: Option<u64>,
    budget: u64,
    tuning: &Tuning,
) -> Verdict {
    let events: Vec<Event> = history
        .iter()
        .map(|e| {
            let mut e = e.clone();
            if e.ret < e.call {
                e.ret = e.call;
            }
            e
        })
        .collect();
    let codes = Codes::new(&events);

    // Reduction 1: unknown heartbeats and reads have no effect on the state.
    let relevant: Vec<usize> = (0..events.len())
        .filter(|&i| {
            let e = &events[i];
            !(e.outcome == Outcome::Unknown && matches!(e.op, Op::Heartbeat | Op::Read))
        })
        .collect();
    // Reduction 2: first try without the unknown registers nobody ever saw.
    let first: Vec<usize> = relevant
        .iter()
        .copied()
        .filter(|&i| {
            let e = &events[i];
            !(e.outcome == Outcome::Unknown
                && matches!(e.op, Op::Register { value } if !codes.is_observed(value)))
        })
        .collect();

    let mut driver = Driver::new(&events, &relevant, &codes, initial, budget, tuning);
    let prep = Prepared::full(&events, &first, &codes, initial);
    let (prep, prefix, window) = match driver.run_pass(&prep) {
        PassResult::Linearizable => return Verdict::Linearizable,
        PassResult::OutOfBudget => return Verdict::Inconclusive { steps: driver.used },
        PassResult::Violation { prefix, window } => {
            if window.is_some() || first.len() == relevant.len() {
                (prep, prefix, window)
            } else if let Some(w) = driver.try_windows(&prep, &prefix) {
                (prep, prefix, Some(w))
            } else {
                let prep = Prepared::full(&events, &relevant, &codes, initial);
                match driver.run_pass(&prep) {
                    PassResult::Linearizable => return Verdict::Linearizable,
                    PassResult::OutOfBudget => return Verdict::Inconclusive { steps: driver.used },
                    PassResult::Violation { prefix, window } => (prep, prefix, window),
                }
            }
        }
    };
    let (explanation, culprits) = explain(&events, &prep, &prefix, initial, window.as_ref());
    Verdict::Violation {
        explanation,
        culprits,
    }
}

/// A window whose operations alone cannot be linearized.
struct WindowProof {
    from: Time,
    to: Time,
    /// Operations that had to be linearized inside the window.
    mandatory: usize,
    /// All operations considered.
    considered: usize,
    /// Events (indices) of the window whose removal alone makes it linearizable.
    critical: Vec<usize>,
    /// Steps the proof took.
    steps: u64,
}

enum WindowResult {
    Proven(WindowProof),
    Linearizable,
    /// The allowance for local checks (or the budget) ran out.
    OutOfAllowance,
    /// The window needs more steps than a local check may take.
    TooCostly,
}

enum PassResult {
    Linearizable,
    OutOfBudget,
    Violation {
        /// Longest prefix found, as indices into the pass's operations.
        prefix: Vec<usize>,
        window: Option<WindowProof>,
    },
}

struct Driver<'a> {
    events: &'a [Event],
    codes: &'a Codes,
    initial: Option<u64>,
    /// The relevant events, sorted by call time.
    by_call: Vec<usize>,
    budget: u64,
    used: u64,
    slice: u64,
    window_sizes: &'static [usize],
    /// Steps spent in main searches and in local checks.
    main_steps: u64,
    window_steps: u64,
    /// Anchors tried so far, with the index of the next window size to try.
    tried: Vec<((Time, Time), usize)>,
}

impl<'a> Driver<'a> {
    fn new(
        events: &'a [Event],
        relevant: &[usize],
        codes: &'a Codes,
        initial: Option<u64>,
        budget: u64,
        tuning: &Tuning,
    ) -> Driver<'a> {
        let mut by_call = relevant.to_vec();
        by_call.sort_by_key(|&i| (events[i].call, i));
        Driver {
            events,
            codes,
            initial,
            by_call,
            budget,
            used: 0,
            slice: tuning.slice.max(1),
            window_sizes: tuning.window_sizes,
            main_steps: 0,
            window_steps: 0,
            tried: Vec::new(),
        }
    }

    /// Runs a main search in slices, trying local proofs when a slice makes no progress.
    fn run_pass(&mut self, prep: &Prepared) -> PassResult {
        let mut search = Search::new(prep);
        let mut last_depth = usize::MAX;
        loop {
            let left = self.budget.saturating_sub(self.used);
            let before = search.steps;
            let result = search.run(before.saturating_add(self.slice.min(left)));
            self.used = self.used.saturating_add(search.steps - before);
            self.main_steps = self.main_steps.saturating_add(search.steps - before);
            match result {
                SearchResult::Linearizable => return PassResult::Linearizable,
                SearchResult::Violation => {
                    return PassResult::Violation {
                        prefix: search.best_prefix(),
                        window: None,
                    }
                }
                SearchResult::OutOfBudget => {
                    if self.used >= self.budget {
                        return PassResult::OutOfBudget;
                    }
                    let depth = search.best.len();
                    if depth == last_depth {
                        let prefix = search.best_prefix();
                        if let Some(w) = self.try_windows(prep, &prefix) {
                            return PassResult::Violation {
                                prefix,
                                window: Some(w),
                            };
                        }
                    }
                    last_depth = depth;
                }
            }
        }
    }

    /// Tries to prove a violation with windows ending at the operations that could not be
    /// placed after `prefix`.
    fn try_windows(&mut self, prep: &Prepared, prefix: &[usize]) -> Option<WindowProof> {
        let stuck = analyse(self.events, prep, prefix, self.initial)?;
        let mut lo = Time::MAX;
        let mut hi = 0;
        for &i in stuck.culprits.iter().chain([&stuck.blocking]) {
            lo = lo.min(prep.ops[i].call);
            hi = hi.max(prep.ops[i].ret);
        }
        let k = match self
            .tried
            .iter()
            .position(|&(anchor, _)| anchor == (lo, hi))
        {
            Some(k) => k,
            None => {
                self.tried.push(((lo, hi), 0));
                self.tried.len() - 1
            }
        };
        // Each window size is tried ending at `hi`, then ending when every operation called
        // by `hi` has returned (which takes in, e.g., a stale read of a value overwritten
        // just before it).
        let extended = self
            .by_call
            .iter()
            .map(|&i| &self.events[i])
            .take_while(|e| e.call <= hi)
            .filter(|e| e.outcome != Outcome::Unknown)
            .map(|e| e.ret)
            .fold(hi, Time::max);
        let before = self.by_call.partition_point(|&i| self.events[i].call < lo);
        loop {
            let attempt = self.tried[k].1;
            let &size = self.window_sizes.get(attempt / 2)?;
            let extend = (attempt & 1) == 1;
            let to = if extend { extended } else { hi };
            if before <= size || (extend && extended == hi) {
                // A window reaching back to the start is the main search's job.
                self.tried[k].1 += 1;
                continue;
            }
            // Local checks may cost at most about as much as the main searches so far.
            let allowance = (self.main_steps.saturating_add(WINDOW_ALLOWANCE_BASE))
                .saturating_sub(self.window_steps)
                .min(self.budget.saturating_sub(self.used));
            let from = self.events[self.by_call[before - size]].call;
            match self.check_window(from, to, None, allowance) {
                WindowResult::Proven(mut w) => {
                    let first: Vec<usize> =
                        stuck.culprits.iter().map(|&i| prep.ops[i].ev).collect();
                    w.critical = self.critical(&w, lo, &first);
                    return Some(w);
                }
                WindowResult::Linearizable | WindowResult::TooCostly => self.tried[k].1 += 1,
                // Try again at a later stall, with a larger allowance.
                WindowResult::OutOfAllowance => return None,
            }
        }
    }

    /// The operations of a window found not linearizable whose removal alone would make
    /// it linearizable. Tried in this order: the events `first`, then the reads and then
    /// the other operations that overlap `[near, w.to]`; each try may take twice the steps
    /// of the proof, all of them `CRITICAL_STEPS`.
    fn critical(&mut self, w: &WindowProof, near: Time, first: &[usize]) -> Vec<usize> {
        let window = Prepared::window(self.events, &self.by_call, w.from, w.to, None, self.codes);
        let mandatory = &window.ops[..window.n_known];
        let mut order: Vec<usize> = first
            .iter()
            .copied()
            .filter(|&ev| mandatory.iter().any(|op| op.ev == ev))
            .collect();
        for reads in [true, false] {
            for op in mandatory.iter().filter(|op| op.ret >= near) {
                if op.tr.is_observer() == reads && !order.contains(&op.ev) {
                    order.push(op.ev);
                }
            }
        }
        let per_try = w.steps.saturating_mul(2).saturating_add(1_000);
        let mut spent = 0u64;
        let mut critical = Vec::new();
        for ev in order {
            let left = CRITICAL_STEPS
                .saturating_sub(spent)
                .min(per_try)
                .min(self.budget.saturating_sub(self.used));
            if left == 0 || critical.len() >= LIST_SHOWN {
                break;
            }
            let before = self.used;
            let result = self.check_window(w.from, w.to, Some(ev), left);
            spent = spent.saturating_add(self.used - before);
            if let WindowResult::Linearizable = result {
                critical.push(ev);
            }
        }
        critical
    }

    /// Checks the window `[from, to]` without the event `exclude` on its own (see the
    /// module documentation), in at most `allowance` steps.
    fn check_window(
        &mut self,
        from: Time,
        to: Time,
        exclude: Option<usize>,
        allowance: u64,
    ) -> WindowResult {
        let window = Prepared::window(self.events, &self.by_call, from, to, exclude, self.codes);
        let starts = self.window_starts(&window, from, to, exclude);
        let own_cap = WINDOW_STEPS_PER_OP
            .saturating_mul(window.ops.len() as u64)
            .saturating_add(WINDOW_STEPS_BASE);
        if allowance < own_cap && exclude.is_none() {
            // Wait for a larger allowance rather than start a check that may not finish.
            return WindowResult::OutOfAllowance;
        }
        let cap = own_cap.min(allowance);
        let mut search = Search::new(&window);
        let mut result = WindowResult::Proven(WindowProof {
            from,
            to,
            mandatory: window.n_known,
            considered: window.ops.len(),
            critical: Vec::new(),
            steps: 0,
        });
        for &s0 in &starts {
            search.restart(s0);
            match search.run(cap) {
                SearchResult::Violation => {}
                SearchResult::Linearizable => {
                    result = WindowResult::Linearizable;
                    break;
                }
                SearchResult::OutOfBudget => {
                    result = if cap < own_cap {
                        WindowResult::OutOfAllowance
                    } else {
                        WindowResult::TooCostly
                    };
                    break;
                }
            }
        }
        self.used = self.used.saturating_add(search.steps);
        self.window_steps = self.window_steps.saturating_add(search.steps);
        if let WindowResult::Proven(w) = &mut result {
            w.steps = search.steps;
        }
        result
    }

    /// The states the operations before a window `[from, to]` may have left: absent, the
    /// initial state, or the value of any register called by `to` that is not wholly inside
    /// the window.
    fn window_starts(
        &self,
        window: &Prepared,
        from: Time,
        to: Time,
        exclude: Option<usize>,
    ) -> Vec<u32> {
        let mut starts = vec![ABSENT];
        if let Some(v) = self.initial {
            starts.push(self.codes.code(v));
        }
        for &i in &self.by_call {
            let e = &self.events[i];
            if e.call > to {
                break;
            }
            if Some(i) == exclude {
                continue;
            }
            let inside = e.outcome != Outcome::Unknown && e.call >= from && e.ret <= to;
            if let (Op::Register { value }, Outcome::Registered | Outcome::Unknown, false) =
                (&e.op, &e.outcome, inside)
            {
                starts.push(self.codes.code(*value));
            }
        }
        // Values that no read inside the window sees are as good as anonymous ones.
        let mut seen = vec![false; window.n_codes];
        for op in &window.ops[..window.n_known] {
            if let Tr::ObsExactly(c) = op.tr {
                seen[c as usize] = true;
            }
        }
        for s in starts.iter_mut() {
            if *s >= 2 && !seen[*s as usize] {
                *s = ANON;
            }
        }
        starts.sort_unstable();
        starts.dedup();
        starts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    const BUDGET: u64 = 200_000_000;

    pub(super) fn ev(id: usize, op: Op, call: Time, ret: Time, outcome: Outcome) -> Event {
        Event {
            id,
            client: id,
            op,
            call,
            ret,
            outcome,
        }
    }

    fn reg(id: usize, v: u64, call: Time, ret: Time) -> Event {
        ev(
            id,
            Op::Register { value: v },
            call,
            ret,
            Outcome::Registered,
        )
    }

    fn reg_unknown(id: usize, v: u64, call: Time) -> Event {
        ev(
            id,
            Op::Register { value: v },
            call,
            call + 1,
            Outcome::Unknown,
        )
    }

    pub(super) fn dereg(id: usize, call: Time, ret: Time, outcome: Outcome) -> Event {
        ev(id, Op::Deregister, call, ret, outcome)
    }

    fn hb(id: usize, call: Time, ret: Time, outcome: Outcome) -> Event {
        ev(id, Op::Heartbeat, call, ret, outcome)
    }

    pub(super) fn read(id: usize, call: Time, ret: Time, saw: Option<u64>) -> Event {
        ev(id, Op::Read, call, ret, Outcome::Saw(saw))
    }

    fn check(history: &[Event]) -> Verdict {
        check_key(history, None, BUDGET)
    }

    fn culprits(v: &Verdict) -> Vec<usize> {
        match v {
            Verdict::Violation { culprits, .. } => culprits.clone(),
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    // -- deterministic cases ------------------------------------------------------------

    #[test]
    fn empty_history_is_linearizable() {
        assert_eq!(check_key(&[], None, 0), Verdict::Linearizable);
        assert_eq!(check_key(&[], Some(3), 10), Verdict::Linearizable);
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = vec![
            read(0, 0, 1, None),
            hb(1, 2, 3, Outcome::NotFound),
            dereg(2, 4, 5, Outcome::NotFound),
            reg(3, 10, 6, 7),
            read(4, 8, 9, Some(10)),
            hb(5, 10, 11, Outcome::Present),
            reg(6, 11, 12, 13),
            read(7, 14, 15, Some(11)),
            dereg(8, 16, 17, Outcome::Removed),
            read(9, 18, 19, None),
            hb(10, 20, 21, Outcome::NotFound),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
        // Input order does not matter.
        let mut rev = h.clone();
        rev.reverse();
        assert_eq!(check(&rev), Verdict::Linearizable);
    }

    #[test]
    fn concurrent_history_is_linearizable() {
        // Two overlapping registers; concurrent reads see them in either order, a later
        // read sees the one that was linearized last.
        let h = vec![
            reg(0, 1, 0, 100),
            reg(1, 2, 10, 90),
            read(2, 20, 30, Some(2)),
            read(3, 40, 50, Some(1)),
            read(4, 110, 120, Some(1)),
            dereg(5, 105, 200, Outcome::Removed),
            hb(6, 150, 160, Outcome::Present),
            read(7, 210, 220, None),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
        // Reads overlapping a deregister (and each other) may see either state ...
        let h2 = vec![
            reg(0, 1, 0, 10),
            dereg(1, 20, 40, Outcome::Removed),
            read(2, 25, 38, None),
            read(3, 26, 35, Some(1)),
        ];
        assert_eq!(check(&h2), Verdict::Linearizable);
        // ... but not in an order that contradicts real time: the read that saw the key
        // absent returned before the read that still saw it present was called.
        let h3 = vec![
            reg(0, 1, 0, 10),
            dereg(1, 20, 40, Outcome::Removed),
            read(2, 25, 30, None),
            read(3, 31, 35, Some(1)),
        ];
        assert!(culprits(&check(&h3)).contains(&3));
    }

    #[test]
    fn stale_read_is_a_violation() {
        let h = vec![
            reg(0, 1, 0, 10),
            reg(1, 2, 20, 30),
            read(2, 40, 50, Some(1)),
        ];
        let v = check(&h);
        let c = culprits(&v);
        assert!(c.contains(&2), "culprits {c:?}");
        if let Verdict::Violation { explanation, .. } = &v {
            assert!(explanation.contains("#2"), "{explanation}");
            assert!(explanation.contains("register(1)"), "{explanation}");
        }
        // Also when a read of the newer value comes in between.
        let h = vec![
            reg(0, 1, 0, 10),
            reg(1, 2, 20, 30),
            read(2, 40, 50, Some(2)),
            read(3, 60, 70, Some(1)),
        ];
        assert!(culprits(&check(&h)).contains(&3));
    }

    #[test]
    fn read_of_a_value_never_written_is_a_violation() {
        let h = vec![reg(0, 1, 0, 10), read(1, 5, 15, Some(99))];
        assert_eq!(culprits(&check(&h)), vec![1]);
    }

    #[test]
    fn removed_when_key_cannot_be_present_is_a_violation() {
        let h = vec![
            dereg(0, 0, 10, Outcome::Removed),
            reg(1, 5, 20, 30),
            read(2, 40, 50, Some(5)),
        ];
        assert!(culprits(&check(&h)).contains(&0));
        // With an initial value it is fine.
        assert_eq!(check_key(&h, Some(4), BUDGET), Verdict::Linearizable);
    }

    #[test]
    fn not_found_heartbeat_after_acknowledged_register_is_a_violation() {
        let h = vec![reg(0, 7, 0, 10), hb(1, 20, 30, Outcome::NotFound)];
        assert_eq!(culprits(&check(&h)), vec![1]);
        // Overlapping the register it is fine.
        let h = vec![reg(0, 7, 0, 10), hb(1, 5, 30, Outcome::NotFound)];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn unknown_register_later_observed_is_linearizable() {
        let h = vec![
            reg(0, 1, 0, 10),
            reg_unknown(1, 2, 20),
            read(2, 30, 40, Some(1)),
            read(3, 1_000, 1_010, Some(2)),
            hb(4, 1_020, 1_030, Outcome::Present),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
        // But not before its call.
        let h = vec![reg_unknown(1, 2, 20), read(2, 0, 10, Some(2))];
        assert!(culprits(&check(&h)).contains(&2));
    }

    #[test]
    fn unknown_register_never_observed_is_linearizable() {
        let h = vec![
            reg(0, 1, 0, 10),
            reg_unknown(1, 2, 20),
            read(2, 30, 40, Some(1)),
            read(3, 50, 60, Some(1)),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
        // Needed (second pass) to explain a heartbeat that found the key present.
        let h = vec![reg_unknown(0, 5, 0), hb(1, 10, 20, Outcome::Present)];
        assert_eq!(check(&h), Verdict::Linearizable);
        // ... but not before its call.
        let h = vec![hb(1, 0, 5, Outcome::Present), reg_unknown(0, 5, 10)];
        assert_eq!(culprits(&check(&h)), vec![1]);
    }

    #[test]
    fn unknown_deregister_explains_a_later_absent_read() {
        let h = vec![
            reg(0, 1, 0, 10),
            dereg(1, 20, 21, Outcome::Unknown),
            read(2, 30, 40, Some(1)),
            read(3, 500, 510, None),
            hb(4, 520, 530, Outcome::NotFound),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
        // Without the deregister it is a violation.
        let h2: Vec<Event> = h.iter().filter(|e| e.id != 1).cloned().collect();
        assert!(culprits(&check(&h2)).contains(&3));
    }

    #[test]
    fn each_unknown_deregister_takes_effect_at_most_once() {
        // Two removals are needed; the two unknown deregisters are interchangeable.
        let mut h = vec![
            dereg(0, 0, 1, Outcome::Unknown),
            dereg(1, 0, 1, Outcome::Unknown),
            reg(2, 1, 10, 20),
            read(3, 30, 40, None),
            reg(4, 2, 50, 60),
            read(5, 70, 80, None),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
        h.remove(1);
        assert!(culprits(&check(&h)).contains(&5));
    }

    #[test]
    fn unknown_heartbeats_and_reads_are_ignored() {
        let h = vec![
            hb(0, 0, 10, Outcome::Unknown),
            ev(1, Op::Read, 0, 10, Outcome::Unknown),
            read(2, 20, 30, None),
        ];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn equal_times_count_as_overlapping() {
        // The read starts exactly when the register returns: it may be ordered first.
        let h = vec![reg(0, 1, 0, 10), read(1, 10, 20, None)];
        assert_eq!(check(&h), Verdict::Linearizable);
        let h = vec![reg(0, 1, 0, 10), read(1, 11, 20, None)];
        assert_eq!(culprits(&check(&h)), vec![1]);
        // Instantaneous operations at the same instant.
        let h = vec![reg(0, 1, 5, 5), read(1, 5, 5, None), read(2, 5, 5, Some(1))];
        assert_eq!(check(&h), Verdict::Linearizable);
    }

    #[test]
    fn odd_input_does_not_panic() {
        // ret < call is read as ret = call; duplicate ids; impossible outcomes.
        let h = vec![
            reg(3, 1, 10, 5),
            read(3, 10, 2, Some(1)),
            ev(3, Op::Read, 20, 30, Outcome::Registered),
            ev(4, Op::Register { value: 9 }, 40, 50, Outcome::Saw(Some(9))),
            read(5, u64::MAX, 0, None),
        ];
        let v = check(&h);
        assert!(matches!(v, Verdict::Violation { .. }));
        let h = vec![reg(3, 1, 10, 5), read(3, 10, 2, Some(1))];
        assert_eq!(check(&h), Verdict::Linearizable);
        let h = vec![
            ev(1, Op::Read, 0, 1, Outcome::Present),
            ev(2, Op::Heartbeat, 0, 1, Outcome::Removed),
        ];
        let c = culprits(&check(&h));
        assert!(c.contains(&1) && c.contains(&2), "{c:?}");
    }

    #[test]
    fn initial_state_is_respected() {
        let h = vec![read(0, 0, 1, Some(4)), hb(1, 2, 3, Outcome::Present)];
        assert_eq!(check_key(&h, Some(4), BUDGET), Verdict::Linearizable);
        assert!(matches!(
            check_key(&h, Some(5), BUDGET),
            Verdict::Violation { .. }
        ));
        assert!(matches!(
            check_key(&h, None, BUDGET),
            Verdict::Violation { .. }
        ));
    }

    #[test]
    fn budget_exhaustion_is_inconclusive() {
        let h: Vec<Event> = (0..100u64)
            .map(|i| reg(i as usize, i, 10 * i, 10 * i + 5))
            .collect();
        assert_eq!(check_key(&h, None, 10), Verdict::Inconclusive { steps: 10 });
        assert_eq!(check_key(&h, None, 0), Verdict::Inconclusive { steps: 0 });
        assert_eq!(check_key(&h, None, 1_000), Verdict::Linearizable);
    }

    #[test]
    fn pathological_history_is_inconclusive() {
        // 60 concurrent registers and deregisters can be ordered in exponentially many ways;
        // the contradiction at the end (absent, then present with nothing in between) is
        // only found after all of them were tried.
        let mut h = Vec::new();
        for i in 0..30 {
            h.push(reg(i, 100 + i as u64, i as u64, 1_000));
            h.push(dereg(30 + i, i as u64, 1_000, Outcome::Removed));
        }
        h.push(read(60, 2_000, 2_100, None));
        h.push(hb(61, 2_200, 2_300, Outcome::Present));
        let start = Instant::now();
        assert_eq!(
            check_key(&h, None, 300_000),
            Verdict::Inconclusive { steps: 300_000 }
        );
        assert!(start.elapsed() < Duration::from_secs(30));
        // Without the last heartbeat it is linearizable, and found quickly.
        h.pop();
        assert_eq!(check_key(&h, None, 10_000), Verdict::Linearizable);
    }

    // -- randomised cases ---------------------------------------------------------------

    /// splitmix64
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            if n == 0 {
                0
            } else {
                self.next() % n
            }
        }
    }

    struct SimParams {
        clients: usize,
        events: usize,
        max_gap: u64,
        max_duration: u64,
        /// One operation in `slow_one_in` takes up to `slow_duration`.
        slow_one_in: u64,
        slow_duration: u64,
        unknown_per_mille: u64,
    }

    /// Simulates clients against a real linearizable register: every operation takes
    /// effect atomically at a random instant within its interval. An operation drawn as
    /// `Unknown` (reads never are) takes effect with probability 1/2, or never.
    fn simulate(rng: &mut Rng, p: &SimParams) -> Vec<Event> {
        let mut free_at: Vec<Time> = (0..p.clients).map(|_| rng.below(1_000)).collect();
        let mut events = Vec::with_capacity(p.events);
        let mut unknown = Vec::with_capacity(p.events);
        let mut points = Vec::new();
        let mut next_value = 0u64;
        for id in 0..p.events {
            let client = id % p.clients;
            let call = free_at[client] + rng.below(p.max_gap + 1);
            let duration = if rng.below(p.slow_one_in) == 0 {
                rng.below(p.slow_duration + 1)
            } else {
                rng.below(p.max_duration + 1)
            };
            let ret = call + duration;
            free_at[client] = ret + 1;
            let op = match rng.below(100) {
                0..=29 => {
                    next_value += 1;
                    Op::Register { value: next_value }
                }
                30..=44 => Op::Deregister,
                45..=59 => Op::Heartbeat,
                _ => Op::Read,
            };
            let is_unknown = op != Op::Read && rng.below(1_000) < p.unknown_per_mille;
            if !is_unknown || rng.below(2) == 0 {
                points.push((call + rng.below(duration + 1), id));
            }
            unknown.push(is_unknown);
            events.push(Event {
                id,
                client,
                op,
                call,
                ret,
                outcome: Outcome::Unknown,
            });
        }
        points.sort_unstable();
        let mut state: Option<u64> = None;
        for &(_, id) in &points {
            let e = &mut events[id];
            let outcome = match e.op {
                Op::Register { value } => {
                    state = Some(value);
                    Outcome::Registered
                }
                Op::Deregister => {
                    if state.take().is_some() {
                        Outcome::Removed
                    } else {
                        Outcome::NotFound
                    }
                }
                Op::Heartbeat => {
                    if state.is_some() {
                        Outcome::Present
                    } else {
                        Outcome::NotFound
                    }
                }
                Op::Read => Outcome::Saw(state),
            };
            if !unknown[id] {
                e.outcome = outcome;
            }
        }
        events
    }

    /// Independent sequential specification for the oracle.
    fn spec(e: &Event, s: Option<u64>) -> Option<Option<u64>> {
        match (&e.op, &e.outcome) {
            (Op::Register { value }, Outcome::Unknown) => Some(Some(*value)),
            (Op::Deregister, Outcome::Unknown) => Some(None),
            (_, Outcome::Unknown) => Some(s),
            (Op::Register { value }, Outcome::Registered) => Some(Some(*value)),
            (Op::Deregister, Outcome::Removed) if s.is_some() => Some(None),
            (Op::Deregister, Outcome::NotFound) if s.is_none() => Some(s),
            (Op::Heartbeat, Outcome::NotFound) if s.is_none() => Some(s),
            (Op::Heartbeat, Outcome::Present) if s.is_some() => Some(s),
            (Op::Read, Outcome::Saw(x)) if *x == s => Some(s),
            _ => None,
        }
    }

    /// Brute-force oracle: every subset of the unknown operations, every order that
    /// respects real time (memoised on (placed set, state)).
    fn oracle(history: &[Event], initial: Option<u64>) -> bool {
        let evs: Vec<Event> = history
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.ret = e.ret.max(e.call);
                e
            })
            .collect();
        assert!(evs.len() <= 16);
        let unknown: Vec<usize> = (0..evs.len())
            .filter(|&i| evs[i].outcome == Outcome::Unknown)
            .collect();
        for mask in 0u32..(1 << unknown.len()) {
            let mut included = vec![true; evs.len()];
            for (k, &i) in unknown.iter().enumerate() {
                included[i] = (mask >> k) & 1 == 1;
            }
            let mut failed = HashSet::new();
            if oracle_dfs(&evs, &included, 0, initial, &mut failed) {
                return true;
            }
        }
        false
    }

    fn oracle_dfs(
        evs: &[Event],
        included: &[bool],
        placed: u32,
        state: Option<u64>,
        failed: &mut HashSet<(u32, Option<u64>)>,
    ) -> bool {
        let open: Vec<usize> = (0..evs.len())
            .filter(|&i| included[i] && (placed >> i) & 1 == 0)
            .collect();
        if open.is_empty() {
            return true;
        }
        if !failed.insert((placed, state)) {
            return false;
        }
        for &i in &open {
            let must_wait = open
                .iter()
                .any(|&j| j != i && evs[j].outcome != Outcome::Unknown && evs[j].ret < evs[i].call);
            if must_wait {
                continue;
            }
            if let Some(next) = spec(&evs[i], state) {
                if oracle_dfs(evs, included, placed | (1 << i), next, failed) {
                    return true;
                }
            }
        }
        false
    }

    fn random_small_history(rng: &mut Rng) -> (Vec<Event>, Option<u64>) {
        let n = 1 + rng.below(8) as usize;
        let mut h = Vec::new();
        for id in 0..n {
            let call = rng.below(12);
            let ret = if rng.below(20) == 0 {
                call.saturating_sub(1)
            } else {
                call + rng.below(6)
            };
            let r = rng.below(100);
            let (op, outcome) = match rng.below(4) {
                0 => (
                    Op::Register {
                        value: 1 + rng.below(4),
                    },
                    if r < 75 {
                        Outcome::Registered
                    } else {
                        Outcome::Unknown
                    },
                ),
                1 => (
                    Op::Deregister,
                    match r {
                        0..=44 => Outcome::Removed,
                        45..=79 => Outcome::NotFound,
                        _ => Outcome::Unknown,
                    },
                ),
                2 => (
                    Op::Heartbeat,
                    match r {
                        0..=44 => Outcome::Present,
                        45..=89 => Outcome::NotFound,
                        _ => Outcome::Unknown,
                    },
                ),
                _ => (
                    Op::Read,
                    if r < 35 {
                        Outcome::Saw(None)
                    } else {
                        Outcome::Saw(Some(1 + rng.below(5)))
                    },
                ),
            };
            let outcome = if rng.below(40) == 0 {
                Outcome::Present // sometimes an impossible combination
            } else {
                outcome
            };
            h.push(Event {
                id,
                client: id,
                op,
                call,
                ret,
                outcome,
            });
        }
        let initial = match rng.below(3) {
            0 => Some(1 + rng.below(5)),
            _ => None,
        };
        (h, initial)
    }

    fn mutate_one(rng: &mut Rng, h: &mut [Event]) {
        if h.is_empty() {
            return;
        }
        let i = rng.below(h.len() as u64) as usize;
        h[i].outcome = match rng.below(6) {
            0 => Outcome::Removed,
            1 => Outcome::NotFound,
            2 => Outcome::Present,
            3 => Outcome::Saw(None),
            4 => Outcome::Saw(Some(rng.below(20))),
            _ => Outcome::Unknown,
        };
    }

    /// Tuning that slices the main search after every step and tries tiny windows, so that
    /// the local proofs and the resumption of the main search are exercised constantly.
    const EAGER: Tuning = Tuning {
        slice: 1,
        window_sizes: &[1, 2, 3, 5, 8],
    };

    fn random_case(rng: &mut Rng, case: usize) -> (Vec<Event>, Option<u64>) {
        if (case & 1) == 0 {
            random_small_history(rng)
        } else {
            let p = SimParams {
                clients: 1 + rng.below(4) as usize,
                events: 1 + rng.below(9) as usize,
                max_gap: 3,
                max_duration: 6,
                slow_one_in: 4,
                slow_duration: 15,
                unknown_per_mille: 250,
            };
            let mut h = simulate(rng, &p);
            if rng.below(2) == 0 {
                mutate_one(rng, &mut h);
            }
            (h, None)
        }
    }

    #[test]
    fn agrees_with_brute_force_oracle() {
        let mut rng = Rng(0x5eed);
        let (mut lin, mut non) = (0, 0);
        for case in 0..6_000 {
            let (h, initial) = random_case(&mut rng, case);
            let expected = oracle(&h, initial);
            for tuning in [&TUNING, &EAGER] {
                let got = check_key_tuned(&h, initial, BUDGET, tuning);
                match (&got, expected) {
                    (Verdict::Linearizable, true) => lin += 1,
                    (Verdict::Violation { culprits, .. }, false) => {
                        non += 1;
                        assert!(!culprits.is_empty(), "no culprits for {h:#?}");
                        assert!(culprits.iter().all(|c| h.iter().any(|e| e.id == *c)));
                    }
                    _ => panic!(
                        "case {case}: oracle says {expected}, checker says {got:?}\n\
                         initial {initial:?}\n{h:#?}"
                    ),
                }
            }
        }
        assert!(lin > 2_000 && non > 2_000, "lin {lin} non {non}");
    }

    /// Runs the local check of every window `[from, to]` with ends at event times.
    fn windows_proving_violation(h: &[Event], initial: Option<u64>) -> Vec<(Time, Time)> {
        let events: Vec<Event> = h
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.ret = e.ret.max(e.call);
                e
            })
            .collect();
        let codes = Codes::new(&events);
        let relevant: Vec<usize> = (0..events.len())
            .filter(|&i| {
                !(events[i].outcome == Outcome::Unknown
                    && matches!(events[i].op, Op::Heartbeat | Op::Read))
            })
            .collect();
        let mut times: Vec<Time> = events.iter().flat_map(|e| [e.call, e.ret]).collect();
        times.sort_unstable();
        times.dedup();
        let mut driver = Driver::new(&events, &relevant, &codes, initial, BUDGET, &TUNING);
        let mut proven = Vec::new();
        for (k, &from) in times.iter().enumerate() {
            for &to in &times[k..] {
                if let WindowResult::Proven(_) = driver.check_window(from, to, None, BUDGET) {
                    proven.push((from, to));
                }
            }
        }
        proven
    }

    #[test]
    fn local_proofs_are_sound() {
        let mut rng = Rng(0xa11ce);
        let mut proofs = 0;
        for case in 0..3_000 {
            let (h, initial) = random_case(&mut rng, case);
            let windows = windows_proving_violation(&h, initial);
            if oracle(&h, initial) {
                assert!(
                    windows.is_empty(),
                    "case {case}: windows {windows:?} prove a violation of a linearizable \
                     history\ninitial {initial:?}\n{h:#?}"
                );
            }
            proofs += windows.len();
        }
        assert!(proofs > 1_000, "only {proofs} local proofs");
    }

    fn large_params() -> SimParams {
        SimParams {
            clients: 12,
            events: 20_000,
            max_gap: 3_000,
            max_duration: 20_000,
            slow_one_in: 50,
            slow_duration: 200_000,
            unknown_per_mille: 2,
        }
    }

    #[test]
    fn large_random_history() {
        let mut rng = Rng(42);
        let h = simulate(&mut rng, &large_params());
        let unknowns = h.iter().filter(|e| e.outcome == Outcome::Unknown).count();
        assert!(unknowns >= 10, "only {unknowns} unknown operations");

        let start = Instant::now();
        let verdict = check_key(&h, None, BUDGET);
        let elapsed = start.elapsed();
        eprintln!(
            "large history: {} events, {unknowns} unknown: {verdict:?} in {elapsed:?}",
            h.len()
        );
        assert_eq!(verdict, Verdict::Linearizable);
        // How long it took is printed, not asserted: the search is bounded
        // by BUDGET steps, and a busy machine says nothing about the checker.

        // Make one read in the middle stale: it returns the value of a register that was
        // overwritten (by another acknowledged register) before the read was called.
        let mut by_call: Vec<usize> = (0..h.len()).collect();
        by_call.sort_by_key(|&i| (h[i].call, i));
        let reader = &h[by_call[by_call.len() / 2..]
            .iter()
            .copied()
            .find(|&i| matches!(h[i].outcome, Outcome::Saw(_)))
            .expect("a read")];
        let last_register_before = |t: Time| {
            h.iter()
                .filter(|e| e.outcome == Outcome::Registered && e.ret < t)
                .max_by_key(|e| e.ret)
                .expect("a register")
        };
        let newer = last_register_before(reader.call);
        let older = last_register_before(newer.call);
        let Op::Register { value: stale } = older.op else {
            unreachable!()
        };
        let reader_id = reader.id;
        let mut mutated = h.clone();
        for e in mutated.iter_mut().filter(|e| e.id == reader_id) {
            e.outcome = Outcome::Saw(Some(stale));
        }
        let start = Instant::now();
        let verdict = check_key(&mutated, None, BUDGET);
        let elapsed = start.elapsed();
        let c = culprits(&verdict);
        eprintln!(
            "mutated history (read #{reader_id} now sees {stale}): culprits {c:?} in {elapsed:?}"
        );
        if let Verdict::Violation { explanation, .. } = &verdict {
            eprintln!("{explanation}");
        }
        assert!(c.contains(&reader_id), "culprits {c:?}");
    }

    /// A mutation that makes a simulated (linearizable) history non-linearizable: returns
    /// the id of the mutated event.
    fn break_history(rng: &mut Rng, h: &mut [Event]) -> Option<usize> {
        let mut by_call: Vec<usize> = (0..h.len()).collect();
        by_call.sort_by_key(|&i| (h[i].call, i));
        let start = h.len() / 4 + rng.below(h.len() as u64 / 2) as usize;
        let registered = |e: &Event| e.outcome == Outcome::Registered;
        match rng.below(4) {
            // Stale read.
            0 => {
                let r = *by_call[start..]
                    .iter()
                    .find(|&&i| matches!(h[i].outcome, Outcome::Saw(_)))?;
                let newer = (0..h.len())
                    .filter(|&i| registered(&h[i]) && h[i].ret < h[r].call)
                    .max_by_key(|&i| h[i].ret)?;
                let older = (0..h.len())
                    .filter(|&i| registered(&h[i]) && h[i].ret < h[newer].call)
                    .max_by_key(|&i| h[i].ret)?;
                let Op::Register { value } = h[older].op else {
                    return None;
                };
                h[r].outcome = Outcome::Saw(Some(value));
                Some(h[r].id)
            }
            // A heartbeat that finds the key absent although it was registered before and
            // no deregister can have taken effect in between.
            1 => {
                let hb = *by_call[start..]
                    .iter()
                    .find(|&&i| h[i].op == Op::Heartbeat && h[i].outcome == Outcome::Present)?;
                let w = (0..h.len())
                    .filter(|&i| registered(&h[i]) && h[i].ret < h[hb].call)
                    .max_by_key(|&i| h[i].ret)?;
                let deregister_possible = h.iter().any(|e| {
                    e.op == Op::Deregister
                        && e.call <= h[hb].ret
                        && (e.outcome == Outcome::Unknown || e.ret >= h[w].call)
                });
                if deregister_possible {
                    return None;
                }
                h[hb].outcome = Outcome::NotFound;
                Some(h[hb].id)
            }
            // A read that sees a value although the key was removed after that value was
            // written and nothing can have registered it again before the read.
            2 => {
                let r = *by_call[start..]
                    .iter()
                    .find(|&&i| h[i].outcome == Outcome::Saw(None))?;
                let d = (0..h.len())
                    .filter(|&i| h[i].outcome == Outcome::Removed && h[i].ret < h[r].call)
                    .max_by_key(|&i| h[i].ret)?;
                let reregistered = h.iter().any(|e| {
                    matches!(e.op, Op::Register { .. })
                        && e.call <= h[r].ret
                        && (e.outcome == Outcome::Unknown || e.ret >= h[d].call)
                });
                let w = (0..h.len())
                    .filter(|&i| registered(&h[i]) && h[i].ret < h[d].call)
                    .max_by_key(|&i| h[i].ret)?;
                let Op::Register { value } = h[w].op else {
                    return None;
                };
                if reregistered {
                    return None;
                }
                h[r].outcome = Outcome::Saw(Some(value));
                Some(h[r].id)
            }
            // A read of a value that is never written.
            _ => {
                let r = *by_call[start..]
                    .iter()
                    .find(|&&i| matches!(h[i].outcome, Outcome::Saw(_)))?;
                h[r].outcome = Outcome::Saw(Some(u64::MAX));
                Some(h[r].id)
            }
        }
    }

    /// Checks `seeds` simulated histories (with more and more unknown operations), then the
    /// same histories broken by `break_history`; returns the worst times.
    fn check_broken_histories(seeds: std::ops::Range<u64>, events: usize) -> (Duration, Duration) {
        let mut worst_ok = Duration::ZERO;
        let mut worst_bad = Duration::ZERO;
        for seed in seeds {
            let mut rng = Rng(seed);
            let mut p = large_params();
            p.events = events;
            p.unknown_per_mille = [0, 2, 4, 8][seed as usize % 4];
            let h = simulate(&mut rng, &p);
            let unknowns = h.iter().filter(|e| e.outcome == Outcome::Unknown).count();
            let start = Instant::now();
            let v = check_key(&h, None, BUDGET);
            let ok = start.elapsed();
            assert_eq!(v, Verdict::Linearizable, "seed {seed}");
            let mut broken = h.clone();
            let Some(id) = (0..10).find_map(|_| break_history(&mut rng, &mut broken)) else {
                continue;
            };
            let start = Instant::now();
            let v = check_key(&broken, None, BUDGET);
            let bad = start.elapsed();
            let Verdict::Violation {
                explanation,
                culprits,
            } = &v
            else {
                panic!("seed {seed}: broke #{id}, got {v:?}");
            };
            eprintln!(
                "seed {seed}: {unknowns} unknown, linearizable in {ok:?}; broke #{id}: \
                 culprits {culprits:?} in {bad:?} (local proof: {})",
                explanation.contains("local check")
            );
            assert!(
                culprits.contains(&id),
                "seed {seed}: broke #{id}\n{explanation}"
            );
            worst_ok = worst_ok.max(ok);
            worst_bad = worst_bad.max(bad);
        }
        (worst_ok, worst_bad)
    }

    #[test]
    fn broken_histories_are_violations() {
        check_broken_histories(0..8, 5_000);
    }

    /// Run with `cargo test --release -- --ignored --nocapture stress`.
    #[test]
    #[ignore]
    fn stress_large_histories() {
        let (ok, bad) = check_broken_histories(0..40, 20_000);
        eprintln!("worst: linearizable {ok:?}, violation {bad:?}");
    }

    #[test]
    fn many_random_medium_histories_are_linearizable() {
        let mut rng = Rng(7);
        for _ in 0..50 {
            let p = SimParams {
                clients: 1 + rng.below(12) as usize,
                events: 500,
                max_gap: rng.below(5_000),
                max_duration: 1 + rng.below(20_000),
                slow_one_in: 20,
                slow_duration: 100_000,
                unknown_per_mille: rng.below(30),
            };
            let h = simulate(&mut rng, &p);
            assert_eq!(check_key(&h, None, BUDGET), Verdict::Linearizable);
        }
    }
}
