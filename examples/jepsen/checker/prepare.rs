//! Preparing a history for the search: the events of one key (already normalised and
//! reduced by the driver in the parent module) become the operations of one search
//! ([`Prepared`]), either for the whole history or for a time window of it (the local
//! checks). Each operation gets its transition on the coded state of `model` ([`Tr`]), its
//! call and return times, its expiry (for operations straddling a window's ends) and, for
//! interchangeable `Unknown` operations, its class and rank (reduction 7 of the parent
//! module's documentation); values that none of the prepared reads saw are made anonymous
//! (reduction 3). `search` runs on the result, `explain` maps its operations back to events.

use super::model::{Codes, Event, Op, Outcome, Time, Tr, ABSENT, ANON};

/// Interchangeability classes of `Unknown` operations (reduction 7): none, deregisters,
/// registers of values no read saw.
pub(super) const NO_CLASS: usize = usize::MAX;
pub(super) const CLASS_DEREGISTER: usize = 0;
pub(super) const CLASS_ANON_REGISTER: usize = 1;

/// An operation as seen by the search.
pub(super) struct SOp {
    /// Index into the (normalised) history.
    pub(super) ev: usize,
    pub(super) call: Time,
    /// Return time of a mandatory operation; `Time::MAX` for the others.
    pub(super) ret: Time,
    /// An optional operation can no longer be applied once an operation called after this
    /// time has been linearized (`Time::MAX`: never expires).
    pub(super) expiry: Time,
    pub(super) tr: Tr,
    /// Interchangeability class of an `Unknown` operation (reduction 7), or `NO_CLASS`.
    pub(super) class: usize,
    /// Position within the class, in call order.
    pub(super) rank: usize,
}

/// The operations of one search: the `n_known` mandatory operations (known outcome) first,
/// sorted by call time (index = bit in the bitset), then the optional ones (`Unknown`
/// operations, and in a window the known ones straddling its ends), sorted by call time.
pub(super) struct Prepared {
    pub(super) ops: Vec<SOp>,
    pub(super) n_known: usize,
    pub(super) n_codes: usize,
    pub(super) init: u32,
}

impl Prepared {
    /// The whole history restricted to the events `keep`.
    pub(super) fn full(
        events: &[Event],
        keep: &[usize],
        codes: &Codes,
        initial: Option<u64>,
    ) -> Prepared {
        let (unknown, known): (Vec<usize>, Vec<usize>) = keep
            .iter()
            .partition(|&&i| events[i].outcome == Outcome::Unknown);
        let init = initial.map_or(ABSENT, |v| codes.code(v));
        Prepared::build(events, known, Vec::new(), unknown, codes, init)
    }

    /// The events of `by_call` relevant to the window `[from, to]`, except `exclude`.
    pub(super) fn window(
        events: &[Event],
        by_call: &[usize],
        from: Time,
        to: Time,
        exclude: Option<usize>,
        codes: &Codes,
    ) -> Prepared {
        let mut known = Vec::new();
        let mut straddling = Vec::new();
        let mut unknown = Vec::new();
        for &i in by_call {
            let e = &events[i];
            if e.call > to {
                break;
            }
            if Some(i) == exclude {
                continue;
            }
            if e.outcome == Outcome::Unknown {
                unknown.push(i);
            } else if e.call >= from && e.ret <= to {
                known.push(i);
            } else if e.ret >= from && matches!(Tr::of_known(e, codes), Tr::Write(_) | Tr::Remove) {
                // Observers straddling an end may as well be dropped.
                straddling.push(i);
            }
        }
        Prepared::build(events, known, straddling, unknown, codes, ABSENT)
    }

    fn build(
        events: &[Event],
        mut known: Vec<usize>,
        straddling: Vec<usize>,
        unknown: Vec<usize>,
        codes: &Codes,
        init: u32,
    ) -> Prepared {
        known.sort_by_key(|&i| (events[i].call, events[i].ret, i));
        // (Unknown heartbeats and reads have no effect: never kept.)
        let mut optional: Vec<usize> = straddling
            .into_iter()
            .chain(
                unknown
                    .into_iter()
                    .filter(|&i| matches!(events[i].op, Op::Register { .. } | Op::Deregister)),
            )
            .collect();
        optional.sort_by_key(|&i| (events[i].call, i));

        // Reduction 3 within this set of operations: values that none of its reads saw are
        // anonymous here.
        let mut read = vec![false; codes.count()];
        for &i in &known {
            if let Tr::ObsExactly(c) = Tr::of_known(&events[i], codes) {
                read[c as usize] = true;
            }
        }
        let local = |c: u32| if c < 2 || read[c as usize] { c } else { ANON };

        let mut ops = Vec::with_capacity(known.len() + optional.len());
        for &i in &known {
            let e = &events[i];
            let tr = match Tr::of_known(e, codes) {
                Tr::Write(c) => Tr::Write(local(c)),
                tr => tr,
            };
            ops.push(SOp {
                ev: i,
                call: e.call,
                ret: e.ret,
                expiry: Time::MAX,
                tr,
                class: NO_CLASS,
                rank: 0,
            });
        }
        let mut class_size = [0usize; 2];
        for &i in &optional {
            let e = &events[i];
            let (tr, class, expiry) = match (&e.op, &e.outcome) {
                (Op::Register { value }, Outcome::Unknown) => {
                    let c = local(codes.code(*value));
                    let class = if c == ANON {
                        CLASS_ANON_REGISTER
                    } else {
                        NO_CLASS
                    };
                    (Tr::Write(c), class, Time::MAX)
                }
                (Op::Deregister, Outcome::Unknown) => {
                    (Tr::Write(ABSENT), CLASS_DEREGISTER, Time::MAX)
                }
                _ => match Tr::of_known(e, codes) {
                    Tr::Write(c) => (Tr::Write(local(c)), NO_CLASS, e.ret),
                    tr => (tr, NO_CLASS, e.ret),
                },
            };
            let rank = if class == NO_CLASS {
                0
            } else {
                class_size[class] += 1;
                class_size[class] - 1
            };
            ops.push(SOp {
                ev: i,
                call: e.call,
                ret: Time::MAX,
                expiry,
                tr,
                class,
                rank,
            });
        }
        Prepared {
            ops,
            n_known: known.len(),
            n_codes: codes.count(),
            init: local(init),
        }
    }
}
