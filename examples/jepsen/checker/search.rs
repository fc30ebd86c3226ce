//! The linearizability search: Wing & Gong's depth-first search with Lowe's memoisation
//! over the operations `prepare` built ([`Prepared`]), on the coded states and transitions
//! of `model`. The algorithm and the reductions cited here by number are described in the
//! parent module's documentation. The driver in the parent module runs a [`Search`] in
//! slices (with [`Search::run`]'s step limit), restarts it from other initial states for
//! the local checks and hands its longest prefix ([`Search::best_prefix`]) to `explain`.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use super::model::{Time, Tr, ABSENT, ANON};
use super::prepare::{Prepared, SOp, NO_CLASS};

/// End of the linked list of call and return entries.
const NIL: usize = usize::MAX;

// ---------------------------------------------------------------------------------------
// Bitset and cache.

/// Fixed-size bitset that keeps track of its run of leading all-ones words (`full`) and of
/// its last non-zero word (`hi`), so that it can be encoded compactly and canonically.
struct Bitset {
    words: Vec<u64>,
    full: usize,
    hi: usize,
}

impl Bitset {
    fn new(bits: usize) -> Bitset {
        Bitset {
            words: vec![0; bits.div_ceil(64)],
            full: 0,
            hi: 0,
        }
    }

    fn get(&self, i: usize) -> bool {
        (self.words[i / 64] >> (i % 64)) & 1 == 1
    }

    fn set(&mut self, i: usize) {
        let w = i / 64;
        self.words[w] |= 1u64 << (i % 64);
        self.hi = self.hi.max(w + 1);
        while self.full < self.words.len() && self.words[self.full] == u64::MAX {
            self.full += 1;
        }
    }

    fn clear(&mut self, i: usize) {
        let w = i / 64;
        self.words[w] &= !(1u64 << (i % 64));
        self.full = self.full.min(w);
        while self.hi > 0 && self.words[self.hi - 1] == 0 {
            self.hi -= 1;
        }
    }

    /// Appends the number of leading all-ones words, then the words up to the last
    /// non-zero one. Equal sets give equal encodings (for a fixed size).
    fn encode_compact(&self, out: &mut Vec<u64>) {
        out.push(self.full as u64);
        out.extend_from_slice(&self.words[self.full..self.hi]);
    }
}

/// Multiply-rotate hasher (FxHash-like) with a final avalanche; keys are `[u64]` slices.
#[derive(Default)]
struct KeyHasher(u64);

impl KeyHasher {
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(b));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            b[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(b) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.add(x);
    }

    fn write_usize(&mut self, x: usize) {
        self.add(x as u64);
    }

    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// Visited configurations. The key is the state followed by the compact encoding of the
/// set of linearized mandatory operations; the value holds, for each visit, a flag word (1
/// if the configuration directly follows an optional operation) followed by the bitset of
/// the applied optional operations.
type Cache = HashMap<Box<[u64]>, Vec<u64>, BuildHasherDefault<KeyHasher>>;

// ---------------------------------------------------------------------------------------
// The search.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SearchResult {
    Linearizable,
    Violation,
    OutOfBudget,
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Move {
    /// Linearize the mandatory operation with this index (= bit).
    Known(usize),
    /// Apply the optional operation with this position among the optional operations.
    Optional(usize),
}

#[derive(Clone, Copy, Debug)]
struct Frame {
    mv: Move,
    prev_state: u32,
    prev_restricted: bool,
    prev_max_call: Time,
    /// The move was a committed observer (reduction 4): no alternatives to try.
    committed: bool,
}

/// Where to continue looking for the next candidate move in the current configuration.
#[derive(Clone, Copy, Debug)]
enum Cursor {
    /// Fresh configuration: look for an observer to commit to first.
    Start,
    /// Continue the scan of the linked list at this node.
    Known(usize),
    /// Continue with the optional operations from this position.
    Optional(usize),
    /// No more candidates: backtrack.
    Exhausted,
}

/// Whether list node `n` is a call entry (node `2i`) rather than a return entry (`2i + 1`).
fn is_call(n: usize) -> bool {
    (n & 1) == 0
}

pub(super) struct Search<'p> {
    ops: &'p [SOp],
    n_known: usize,
    /// Sentinel node; the call entry of mandatory operation `i` is node `2i`, its return
    /// entry node `2i + 1`.
    head: usize,
    next: Vec<usize>,
    prev: Vec<usize>,
    known_bits: Bitset,
    optional_bits: Bitset,
    state: u32,
    /// The last move applied an optional operation (reduction 6).
    restricted: bool,
    /// Latest call among the linearized operations (expires optional operations).
    max_call: Time,
    /// Some optional operation can expire (only in windows).
    expiring: bool,
    known_left: usize,
    /// Per state code: mandatory reads of that value not yet linearized.
    reads_pending: Vec<u32>,
    /// Per state code: registers of that value not yet linearized.
    writes_pending: Vec<u32>,
    /// Number of values with pending reads but no pending register (reduction 10).
    orphans: u32,
    /// Per class: rank of the next `Unknown` operation of the class that may be applied.
    next_rank: [usize; 2],
    cache: Cache,
    key: Vec<u64>,
    stack: Vec<Frame>,
    cursor: Cursor,
    /// Longest stack seen so far; `best[..common] == stack[..common]`.
    pub(super) best: Vec<Move>,
    common: usize,
    pub(super) steps: u64,
}

impl<'p> Search<'p> {
    pub(super) fn new(prep: &'p Prepared) -> Search<'p> {
        let k = prep.n_known;
        let head = 2 * k;
        let mut order: Vec<usize> = (0..head).collect();
        order.sort_by_key(|&n| {
            let op = &prep.ops[n / 2];
            if is_call(n) {
                (op.call, 0u8, n / 2)
            } else {
                (op.ret, 1u8, n / 2)
            }
        });
        let mut next = vec![NIL; head + 1];
        let mut prev = vec![NIL; head + 1];
        let mut last = head;
        for &n in &order {
            next[last] = n;
            prev[n] = last;
            last = n;
        }
        let mut reads_pending = vec![0u32; prep.n_codes];
        let mut writes_pending = vec![0u32; prep.n_codes];
        for op in &prep.ops {
            match op.tr {
                Tr::ObsExactly(c) => reads_pending[c as usize] += 1,
                Tr::Write(c) => writes_pending[c as usize] += 1,
                _ => {}
            }
        }
        let orphans = (2..prep.n_codes)
            .filter(|&c| reads_pending[c] > 0 && writes_pending[c] == 0)
            .count() as u32;
        let mut search = Search {
            ops: &prep.ops,
            n_known: k,
            head,
            next,
            prev,
            known_bits: Bitset::new(k),
            optional_bits: Bitset::new(prep.ops.len() - k),
            state: ABSENT,
            restricted: false,
            max_call: 0,
            expiring: prep.ops[k..].iter().any(|op| op.expiry != Time::MAX),
            known_left: k,
            reads_pending,
            writes_pending,
            orphans,
            next_rank: [0; 2],
            cache: Cache::default(),
            key: Vec::new(),
            stack: Vec::new(),
            cursor: Cursor::Start,
            best: Vec::new(),
            common: 0,
            steps: 0,
        };
        search.restart(prep.init);
        search
    }

    /// Starts the search again from the root with initial state `state`, keeping the
    /// cache (valid for any initial state) and the step count.
    pub(super) fn restart(&mut self, state: u32) {
        while let Some(frame) = self.stack.pop() {
            self.undo(frame);
        }
        let state = state.min(self.reads_pending.len().saturating_sub(1) as u32);
        self.state = self.canonical(Tr::Illegal, state);
        self.restricted = false;
        self.max_call = 0;
        self.cursor = Cursor::Start;
    }

    /// Continues the search until it finishes or `self.steps` reaches `limit`.
    pub(super) fn run(&mut self, limit: u64) -> SearchResult {
        if self.known_left == 0 {
            return SearchResult::Linearizable;
        }
        loop {
            if self.steps >= limit {
                return SearchResult::OutOfBudget;
            }
            self.steps += 1;
            match self.next_candidate(self.cursor) {
                Some((mv, new_state, committed)) => {
                    if self.apply(mv, new_state, committed) {
                        if self.known_left == 0 {
                            return SearchResult::Linearizable;
                        }
                        self.cursor = Cursor::Start;
                    } else if committed {
                        // The configuration after the observer was explored before, so
                        // this one needs no further exploration (reduction 4).
                        self.cursor = Cursor::Exhausted;
                    } else {
                        self.cursor = self.after(mv);
                    }
                }
                None => match self.stack.pop() {
                    None => {
                        self.cursor = Cursor::Exhausted;
                        return SearchResult::Violation;
                    }
                    Some(frame) => {
                        self.undo(frame);
                        self.cursor = if frame.committed {
                            Cursor::Exhausted
                        } else {
                            self.after(frame.mv)
                        };
                    }
                },
            }
        }
    }

    /// The cursor that continues the scan after `mv` (which is not applied).
    fn after(&self, mv: Move) -> Cursor {
        match mv {
            Move::Known(i) => Cursor::Known(self.next[2 * i]),
            Move::Optional(p) => Cursor::Optional(p + 1),
        }
    }

    /// Reduction 9: once no pending read can see a value any more, it is as good as an
    /// anonymous one. `tr` is the move that leads to `new_state`.
    fn canonical(&self, tr: Tr, new_state: u32) -> u32 {
        if new_state < 2 {
            return new_state;
        }
        let left = self.reads_pending[new_state as usize]
            .saturating_sub(u32::from(tr == Tr::ObsExactly(new_state)));
        if left == 0 {
            ANON
        } else {
            new_state
        }
    }

    /// Reduction 10: a pending read saw a value that is not the state and that no pending
    /// register writes, so it can never be linearized.
    fn dead(&self) -> bool {
        let s = self.state as usize;
        let current = self.state >= 2 && self.reads_pending[s] > 0 && self.writes_pending[s] == 0;
        self.orphans > u32::from(current)
    }

    /// Reduction 5: may the state not change from the current one to `new_state`?
    fn blocked(&self, new_state: u32) -> bool {
        let s = self.state as usize;
        new_state != self.state
            && self.state >= 2
            && self.reads_pending[s] > 0
            && self.writes_pending[s] == 0
    }

    fn next_candidate(&self, cursor: Cursor) -> Option<(Move, u32, bool)> {
        match cursor {
            Cursor::Start if self.dead() => None,
            Cursor::Start => {
                // Moving an observer before a pending optional operation that must precede
                // it would rule that operation out, so such an observer is not committed to.
                let deadline = self.deadline();
                let mut n = self.next[self.head];
                while n != NIL && is_call(n) {
                    let op = &self.ops[n / 2];
                    if op.tr.is_observer()
                        && op.call <= deadline
                        && op.tr.apply(self.state).is_some()
                    {
                        return Some((Move::Known(n / 2), self.state, true));
                    }
                    n = self.next[n];
                }
                self.scan_known(self.next[self.head])
            }
            Cursor::Known(n) => self.scan_known(n),
            Cursor::Optional(p) => self.scan_optional(p, self.frontier()),
            Cursor::Exhausted => None,
        }
    }

    /// Candidates among the call entries from node `n` up to the first return entry, then
    /// among the optional operations.
    fn scan_known(&self, mut n: usize) -> Option<(Move, u32, bool)> {
        while n != NIL && is_call(n) {
            let i = n / 2;
            let tr = self.ops[i].tr;
            // (A legal observer here is one `Start` could not commit to.) After an optional
            // operation no register may follow (reduction 6).
            if !(self.restricted && matches!(tr, Tr::Write(_))) {
                if let Some(new_state) = tr.apply(self.state) {
                    if !self.blocked(new_state) {
                        return Some((Move::Known(i), new_state, false));
                    }
                }
            }
            n = self.next[n];
        }
        if self.restricted {
            return None;
        }
        let frontier = if n == NIL {
            Time::MAX
        } else {
            self.ops[n / 2].ret
        };
        self.scan_optional(0, frontier)
    }

    /// Earliest expiry among the optional operations that can still be applied.
    fn deadline(&self) -> Time {
        if !self.expiring {
            return Time::MAX;
        }
        self.ops[self.n_known..]
            .iter()
            .enumerate()
            .filter(|&(p, op)| !self.optional_bits.get(p) && op.expiry >= self.max_call)
            .map(|(_, op)| op.expiry)
            .min()
            .unwrap_or(Time::MAX)
    }

    /// Return time of the first return entry in the list (the earliest pending return).
    fn frontier(&self) -> Time {
        let mut n = self.next[self.head];
        while n != NIL && is_call(n) {
            n = self.next[n];
        }
        if n == NIL {
            Time::MAX
        } else {
            self.ops[n / 2].ret
        }
    }

    fn scan_optional(&self, from: usize, frontier: Time) -> Option<(Move, u32, bool)> {
        for (p, op) in self.ops[self.n_known..].iter().enumerate().skip(from) {
            if op.call > frontier {
                break;
            }
            if self.optional_bits.get(p) || op.expiry < self.max_call {
                continue;
            }
            if op.class != NO_CLASS && op.rank != self.next_rank[op.class] {
                continue;
            }
            let Some(new_state) = op.tr.apply(self.state) else {
                continue;
            };
            let new_state = self.canonical(op.tr, new_state);
            if new_state == self.state || self.blocked(new_state) {
                continue;
            }
            return Some((Move::Optional(p), new_state, false));
        }
        None
    }

    fn op_index(&self, mv: Move) -> usize {
        match mv {
            Move::Known(i) => i,
            Move::Optional(p) => self.n_known + p,
        }
    }

    fn set_bit(&mut self, mv: Move, on: bool) {
        let (bits, i) = match mv {
            Move::Known(i) => (&mut self.known_bits, i),
            Move::Optional(p) => (&mut self.optional_bits, p),
        };
        if on {
            bits.set(i);
        } else {
            bits.clear(i);
        }
    }

    /// Applies `mv` unless the resulting configuration is pruned by the cache.
    fn apply(&mut self, mv: Move, new_state: u32, committed: bool) -> bool {
        let ops = self.ops;
        let op = &ops[self.op_index(mv)];
        let restricted = matches!(mv, Move::Optional(_));
        let new_state = self.canonical(op.tr, new_state);
        self.set_bit(mv, true);
        self.key.clear();
        self.key.push(u64::from(new_state));
        self.known_bits.encode_compact(&mut self.key);
        let optional = &self.optional_bits.words;
        if let Some(seen) = self.cache.get(self.key.as_slice()) {
            // Exact revisit, or reduction 8: a superset of the optional operations of an
            // explored configuration (one directly after an optional operation only prunes
            // configurations of that kind, as it was explored under reduction 6).
            let pruned = seen.chunks_exact(1 + optional.len()).any(|entry| {
                (restricted || entry[0] == 0)
                    && entry[1..].iter().zip(optional).all(|(a, b)| a & !b == 0)
            });
            if pruned {
                self.set_bit(mv, false);
                return false;
            }
        }
        let flag = u64::from(restricted);
        match self.cache.get_mut(self.key.as_slice()) {
            Some(seen) => {
                seen.push(flag);
                seen.extend_from_slice(optional);
            }
            None => {
                let mut seen = Vec::with_capacity(1 + optional.len());
                seen.push(flag);
                seen.extend_from_slice(optional);
                self.cache.insert(self.key.as_slice().into(), seen);
            }
        }

        self.stack.push(Frame {
            mv,
            prev_state: self.state,
            prev_restricted: self.restricted,
            prev_max_call: self.max_call,
            committed,
        });
        match op.tr {
            Tr::ObsExactly(c) => {
                let c = c as usize;
                self.reads_pending[c] -= 1;
                if c >= 2 && self.reads_pending[c] == 0 && self.writes_pending[c] == 0 {
                    self.orphans -= 1;
                }
            }
            Tr::Write(c) => {
                let c = c as usize;
                self.writes_pending[c] -= 1;
                if c >= 2 && self.writes_pending[c] == 0 && self.reads_pending[c] > 0 {
                    self.orphans += 1;
                }
            }
            _ => {}
        }
        if op.class != NO_CLASS {
            self.next_rank[op.class] += 1;
        }
        if let Move::Known(i) = mv {
            self.known_left -= 1;
            self.lift(i);
        }
        self.state = new_state;
        self.restricted = restricted;
        self.max_call = self.max_call.max(op.call);

        if self.stack.len() > self.best.len() {
            self.best.truncate(self.common);
            self.best
                .extend(self.stack[self.common..].iter().map(|f| f.mv));
            self.common = self.stack.len();
        }
        true
    }

    /// Reverts the move of `frame`, which was just popped from the stack.
    fn undo(&mut self, frame: Frame) {
        let ops = self.ops;
        let op = &ops[self.op_index(frame.mv)];
        match op.tr {
            Tr::ObsExactly(c) => {
                let c = c as usize;
                if c >= 2 && self.reads_pending[c] == 0 && self.writes_pending[c] == 0 {
                    self.orphans += 1;
                }
                self.reads_pending[c] += 1;
            }
            Tr::Write(c) => {
                let c = c as usize;
                if c >= 2 && self.writes_pending[c] == 0 && self.reads_pending[c] > 0 {
                    self.orphans -= 1;
                }
                self.writes_pending[c] += 1;
            }
            _ => {}
        }
        if op.class != NO_CLASS {
            self.next_rank[op.class] -= 1;
        }
        self.set_bit(frame.mv, false);
        if let Move::Known(i) = frame.mv {
            self.known_left += 1;
            self.unlift(i);
        }
        self.state = frame.prev_state;
        self.restricted = frame.prev_restricted;
        self.max_call = frame.prev_max_call;
        self.common = self.common.min(self.stack.len());
    }

    /// Removes the call and return entries of mandatory operation `i` from the list.
    fn lift(&mut self, i: usize) {
        for n in [2 * i, 2 * i + 1] {
            let (p, q) = (self.prev[n], self.next[n]);
            self.next[p] = q;
            if q != NIL {
                self.prev[q] = p;
            }
        }
    }

    /// Puts back the entries removed by `lift(i)` (in reverse order).
    fn unlift(&mut self, i: usize) {
        for n in [2 * i + 1, 2 * i] {
            let (p, q) = (self.prev[n], self.next[n]);
            self.next[p] = n;
            if q != NIL {
                self.prev[q] = n;
            }
        }
    }

    pub(super) fn best_prefix(&self) -> Vec<usize> {
        self.best.iter().map(|&mv| self.op_index(mv)).collect()
    }
}
