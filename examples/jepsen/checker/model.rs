//! The model the histories are checked against: one key of the registry seen as a
//! register whose state is `Option<u64>`, absent or present with the value written by the
//! last `Register`.
//!
//! It holds the history's vocabulary ([`Event`], [`Op`], [`Outcome`], [`Time`], re-exported
//! by the parent module), the sequential specification on concrete states
//! ([`concrete_step`], which `explain` uses to replay a prefix and say why an operation
//! cannot be placed) and the same specification on the coded states the search works
//! with: [`Codes`] maps the values some read saw to state codes, [`Tr`] is the effect and
//! precondition of an operation on a coded state. `prepare` turns events into [`Tr`]s,
//! `search` applies them.

use std::collections::HashMap;

/// Nanoseconds since the start of the run (monotonic clock).
pub type Time = u64;

/// An operation on one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Register the instance, writing a globally unique value.
    Register { value: u64 },
    /// Remove the instance.
    Deregister,
    /// Renew the instance's lease (does not change the state).
    Heartbeat,
    /// Linearizable read of the key.
    Read,
}

/// What the client observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Register acknowledged (state := Some(value)).
    Registered,
    /// Deregister answered 200: the key was present, now absent.
    Removed,
    /// Deregister or heartbeat answered 404: the key was absent (state unchanged).
    NotFound,
    /// Heartbeat answered 200: the key was present (state unchanged).
    Present,
    /// A read (linearizable read) saw this state.
    Saw(Option<u64>),
    /// Timed out / connection lost / 503: the operation may or may not have taken
    /// effect, at any time after its call. Only for Register and Deregister (and
    /// Heartbeat, which then has no effect on state and can simply be ignored).
    Unknown,
}

/// One completed (or abandoned) client operation on the key.
#[derive(Clone, Debug)]
pub struct Event {
    /// Identifier reported back in the culprits of a
    /// [`Verdict::Violation`](super::Verdict::Violation).
    pub id: usize,
    /// The client (process) that issued the operation.
    pub client: usize,
    /// The operation.
    pub op: Op,
    /// Invocation time.
    pub call: Time,
    /// Response time; ignored for [`Outcome::Unknown`]. `ret < call` is read as `ret = call`.
    pub ret: Time,
    /// What the client observed.
    pub outcome: Outcome,
}

/// How a (concrete) state is written in explanations.
pub(super) fn fmt_state(s: Option<u64>) -> String {
    match s {
        None => "absent".to_string(),
        Some(v) => format!("present({v})"),
    }
}

/// State codes: `ABSENT`, `ANON` (present with a value no read ever saw), and `2 + k` for
/// the k-th value some read saw.
pub(super) const ABSENT: u32 = 0;
pub(super) const ANON: u32 = 1;

/// Maps the values that some read saw to state codes `2..`.
pub(super) struct Codes(HashMap<u64, u32>);

impl Codes {
    pub(super) fn new(events: &[Event]) -> Codes {
        let mut seen: Vec<u64> = events
            .iter()
            .filter_map(|e| match (&e.op, &e.outcome) {
                (Op::Read, Outcome::Saw(Some(v))) => Some(*v),
                _ => None,
            })
            .collect();
        seen.sort_unstable();
        seen.dedup();
        Codes(
            seen.into_iter()
                .enumerate()
                .map(|(k, v)| (v, (k as u32).saturating_add(2)))
                .collect(),
        )
    }

    pub(super) fn code(&self, v: u64) -> u32 {
        self.0.get(&v).copied().unwrap_or(ANON)
    }

    pub(super) fn is_observed(&self, v: u64) -> bool {
        self.0.contains_key(&v)
    }

    pub(super) fn count(&self) -> usize {
        self.0.len() + 2
    }
}

/// Effect and precondition of an operation on the coded state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Tr {
    /// State := code (an acknowledged register, or any `Unknown` operation).
    Write(u32),
    /// Requires present; state := absent.
    Remove,
    /// Observer: requires absent.
    ObsAbsent,
    /// Observer: requires present.
    ObsPresent,
    /// Observer: requires exactly this (observed) value.
    ObsExactly(u32),
    /// An outcome that is impossible for the operation.
    Illegal,
}

impl Tr {
    pub(super) fn of_known(e: &Event, codes: &Codes) -> Tr {
        match (&e.op, &e.outcome) {
            (Op::Register { value }, Outcome::Registered) => Tr::Write(codes.code(*value)),
            (Op::Deregister, Outcome::Removed) => Tr::Remove,
            (Op::Deregister | Op::Heartbeat, Outcome::NotFound) => Tr::ObsAbsent,
            (Op::Heartbeat, Outcome::Present) => Tr::ObsPresent,
            (Op::Read, Outcome::Saw(None)) => Tr::ObsAbsent,
            (Op::Read, Outcome::Saw(Some(v))) => Tr::ObsExactly(codes.code(*v)),
            _ => Tr::Illegal,
        }
    }

    pub(super) fn is_observer(self) -> bool {
        matches!(self, Tr::ObsAbsent | Tr::ObsPresent | Tr::ObsExactly(_))
    }

    pub(super) fn apply(self, s: u32) -> Option<u32> {
        match self {
            Tr::Write(c) => Some(c),
            Tr::Remove => (s != ABSENT).then_some(ABSENT),
            Tr::ObsAbsent => (s == ABSENT).then_some(s),
            Tr::ObsPresent => (s != ABSENT).then_some(s),
            Tr::ObsExactly(c) => (s == c).then_some(s),
            Tr::Illegal => None,
        }
    }
}

/// The sequential specification on concrete states: the state after `e`, or why `e`
/// cannot take effect in state `s`.
pub(super) fn concrete_step(e: &Event, s: Option<u64>) -> Result<Option<u64>, String> {
    match (&e.op, &e.outcome) {
        (Op::Register { value }, Outcome::Unknown) => Ok(Some(*value)),
        (Op::Deregister, Outcome::Unknown) => Ok(None),
        (_, Outcome::Unknown) => Ok(s),
        (Op::Register { value }, Outcome::Registered) => Ok(Some(*value)),
        (Op::Deregister, Outcome::Removed) => match s {
            Some(_) => Ok(None),
            None => Err("it removed the key, but the key is absent here".to_string()),
        },
        (Op::Deregister | Op::Heartbeat, Outcome::NotFound) => match s {
            None => Ok(None),
            Some(_) => Err(format!(
                "it found no key, but the state here is {}",
                fmt_state(s)
            )),
        },
        (Op::Heartbeat, Outcome::Present) => match s {
            Some(_) => Ok(s),
            None => Err("it found the key present, but the key is absent here".to_string()),
        },
        (Op::Read, Outcome::Saw(x)) => {
            if *x == s {
                Ok(s)
            } else {
                Err(format!(
                    "it saw {}, but the state here is {}",
                    fmt_state(*x),
                    fmt_state(s)
                ))
            }
        }
        (op, outcome) => Err(format!(
            "outcome {outcome:?} is impossible for operation {op:?}"
        )),
    }
}
