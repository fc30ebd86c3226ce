//! Explaining a violation: once the driver in the parent module has found that no
//! linearization exists, the longest prefix the last search found (a list of operations
//! from `prepare`) is replayed on concrete states with `model`'s sequential specification,
//! and the operations that could not be placed after it, the reads that pin the state and
//! the reads that can never be linearized are described, together with the local check
//! that proved the violation, if any. [`analyse`] also serves the driver, which anchors
//! its local checks at the operations it blames. [`describe`] writes one event on one line.

use std::collections::HashSet;
use std::fmt::Write as _;

use super::model::{concrete_step, fmt_state, Event, Op, Outcome, Time};
use super::prepare::Prepared;
use super::WindowProof;

/// Operations of the longest prefix an explanation shows (the last ones).
const PREFIX_SHOWN: usize = 40;
/// Entries an explanation shows of each list (the driver looks for at most as many
/// critical operations).
pub(super) const LIST_SHOWN: usize = 10;

/// One-line description of an event, as used in explanations.
fn describe(e: &Event) -> String {
    let op = match &e.op {
        Op::Register { value } => format!("register({value})"),
        Op::Deregister => "deregister".to_string(),
        Op::Heartbeat => "heartbeat".to_string(),
        Op::Read => "read".to_string(),
    };
    let ret = if e.outcome == Outcome::Unknown {
        "?".to_string()
    } else {
        fmt_time(e.ret)
    };
    let outcome = match &e.outcome {
        Outcome::Registered => "registered".to_string(),
        Outcome::Removed => "removed".to_string(),
        Outcome::NotFound => "not found".to_string(),
        Outcome::Present => "present".to_string(),
        Outcome::Saw(s) => format!("saw {}", fmt_state(*s)),
        Outcome::Unknown => "unknown".to_string(),
    };
    format!(
        "#{} client {} {} [{} .. {}] -> {}",
        e.id,
        e.client,
        op,
        fmt_time(e.call),
        ret,
        outcome
    )
}

fn fmt_time(t: Time) -> String {
    format!("{}.{:09}s", t / 1_000_000_000, t % 1_000_000_000)
}

/// Where a search got stuck: the configuration after the longest prefix it found.
pub(super) struct Stuck {
    /// Concrete state after the prefix.
    state: Option<u64>,
    /// Per operation of the pass: linearized in the prefix.
    done: Vec<bool>,
    /// The pending mandatory operation that returns first (index into the pass's ops).
    pub(super) blocking: usize,
    /// The mandatory operations that could come next, each with the reason it cannot.
    candidates: Vec<(usize, String)>,
    /// The value the state is stuck at, and the pending reads that saw it (see `pinned`).
    pin: Option<(u64, Vec<usize>)>,
    /// Pending reads that can never be linearized (see `orphan_reads`).
    orphans: Vec<usize>,
    /// Indices (into the pass's ops) of the operations to blame.
    pub(super) culprits: Vec<usize>,
}

pub(super) fn analyse(
    events: &[Event],
    prep: &Prepared,
    prefix: &[usize],
    initial: Option<u64>,
) -> Option<Stuck> {
    let ops = &prep.ops;
    let mut state = initial;
    let mut done = vec![false; ops.len()];
    for &oi in prefix {
        done[oi] = true;
        if let Ok(s) = concrete_step(&events[ops[oi].ev], state) {
            state = s;
        }
    }
    let pending: Vec<usize> = (0..prep.n_known).filter(|&i| !done[i]).collect();
    let &blocking = pending.iter().min_by_key(|&&i| (ops[i].ret, i))?;
    let frontier = ops[blocking].ret;
    let pin = pinned(events, prep, &done, state);
    let orphans = orphan_reads(events, prep, &done, state);

    let mut culprits = Vec::new();
    let mut candidates = Vec::new();
    for &i in pending.iter().filter(|&&i| ops[i].call <= frontier) {
        let reason = match (concrete_step(&events[ops[i].ev], state), &pin) {
            (Err(why), _) => {
                culprits.push(i);
                format!("cannot be placed: {why}")
            }
            (Ok(next), Some((v, _))) if next != state => {
                culprits.push(i);
                format!("cannot be placed: it would replace value {v} (see below)")
            }
            (Ok(_), _) => "could take effect here, but no linearization of the remaining \
                           operations continues from there"
                .to_string(),
        };
        candidates.push((i, reason));
    }
    if !orphans.is_empty() {
        // They alone make a linearization impossible.
        culprits = orphans.clone();
    } else if culprits.is_empty() {
        culprits = candidates.iter().map(|(i, _)| *i).collect();
    } else if let Some((_, readers)) = &pin {
        // The reads that keep the state from changing are part of the anomaly.
        culprits.extend(readers);
    }
    let mut seen = HashSet::new();
    culprits.retain(|i| seen.insert(*i));
    Some(Stuck {
        state,
        done,
        blocking,
        candidates,
        pin,
        orphans,
        culprits,
    })
}

/// Pending reads that saw a value other than `state` that no pending register writes.
fn orphan_reads(
    events: &[Event],
    prep: &Prepared,
    done: &[bool],
    state: Option<u64>,
) -> Vec<usize> {
    let mut written = HashSet::new();
    for (i, op) in prep.ops.iter().enumerate() {
        if let (false, Op::Register { value }) = (done[i], &events[op.ev].op) {
            written.insert(*value);
        }
    }
    (0..prep.n_known)
        .filter(|&i| {
            !done[i]
                && matches!(&events[prep.ops[i].ev].outcome,
                    Outcome::Saw(Some(v)) if state != Some(*v) && !written.contains(v))
                && events[prep.ops[i].ev].op == Op::Read
        })
        .collect()
}

/// If the state is `Some(v)`, reads that saw `v` are pending and no pending register writes
/// `v`, the state cannot change any more: returns `v` and those reads.
fn pinned(
    events: &[Event],
    prep: &Prepared,
    done: &[bool],
    state: Option<u64>,
) -> Option<(u64, Vec<usize>)> {
    let v = state?;
    let mut readers = Vec::new();
    for (i, op) in prep.ops.iter().enumerate() {
        if done[i] {
            continue;
        }
        let e = &events[op.ev];
        match (&e.op, &e.outcome) {
            (Op::Register { value }, _) if *value == v => return None,
            (Op::Read, Outcome::Saw(Some(x))) if *x == v && i < prep.n_known => readers.push(i),
            _ => {}
        }
    }
    if readers.is_empty() {
        None
    } else {
        Some((v, readers))
    }
}

/// Builds the explanation of a violation from the longest prefix the last search found.
pub(super) fn explain(
    events: &[Event],
    prep: &Prepared,
    prefix: &[usize],
    initial: Option<u64>,
    window: Option<&WindowProof>,
) -> (String, Vec<usize>) {
    let ops = &prep.ops;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "not linearizable: no order of the {} operation(s) on this key ({} with unknown \
         outcome) is consistent with a register whose initial state is {}",
        ops.len(),
        ops.len() - prep.n_known,
        fmt_state(initial)
    );

    let hidden = prefix.len().saturating_sub(PREFIX_SHOWN);
    let _ = writeln!(
        out,
        "longest linearizable prefix found: {} operation(s), in linearization order{}:",
        prefix.len(),
        if hidden > 0 {
            format!(" (the first {hidden} not shown)")
        } else {
            String::new()
        }
    );
    let mut state = initial;
    for (k, &oi) in prefix.iter().enumerate() {
        let e = &events[ops[oi].ev];
        if let Ok(s) = concrete_step(e, state) {
            state = s;
        }
        if k >= hidden {
            let note = if e.outcome == Outcome::Unknown {
                " (assumed to take effect here)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "  {:>6}. {}{}  => {}",
                k + 1,
                describe(e),
                note,
                fmt_state(state)
            );
        }
    }

    let Some(stuck) = analyse(events, prep, prefix, initial) else {
        let _ = writeln!(out, "(every operation with a known outcome was linearized)");
        return (out, Vec::new());
    };
    let _ = writeln!(out, "state after the prefix: {}", fmt_state(stuck.state));
    if stuck.orphans.is_empty() {
        let _ = writeln!(
            out,
            "no continuation exists from there; the operations that could come next (each \
             must take effect before #{} returned at {}):",
            events[ops[stuck.blocking].ev].id,
            fmt_time(ops[stuck.blocking].ret)
        );
        for (i, reason) in &stuck.candidates {
            let _ = writeln!(out, "  {}: {}", describe(&events[ops[*i].ev]), reason);
        }
    } else {
        let _ = writeln!(
            out,
            "these read(s) can never be linearized: each saw a value that is not the state \
             here and that no register still to be linearized writes:"
        );
        for &r in stuck.orphans.iter().take(LIST_SHOWN) {
            let _ = writeln!(out, "  {}", describe(&events[ops[r].ev]));
        }
        if stuck.orphans.len() > LIST_SHOWN {
            let _ = writeln!(out, "  ... ({} in all)", stuck.orphans.len());
        }
    }
    if let Some((v, readers)) = &stuck.pin {
        let _ = writeln!(
            out,
            "the state cannot change from {} until these read(s) that saw value {v} are \
             linearized, as no pending register writes {v} again:",
            fmt_state(stuck.state)
        );
        for &r in readers.iter().take(LIST_SHOWN) {
            let _ = writeln!(out, "  {}", describe(&events[ops[r].ev]));
        }
        if readers.len() > LIST_SHOWN {
            let _ = writeln!(out, "  ... ({} in all)", readers.len());
        }
    }

    let frontier = ops[stuck.blocking].ret;
    let available: Vec<&Event> = ops[prep.n_known..]
        .iter()
        .enumerate()
        .filter(|&(p, op)| !stuck.done[prep.n_known + p] && op.call <= frontier)
        .map(|(_, op)| &events[op.ev])
        .collect();
    if !available.is_empty() {
        let _ = writeln!(
            out,
            "operations with unknown outcome that could also take effect here (or never): {}",
            available.len()
        );
        for e in available.iter().take(LIST_SHOWN) {
            let _ = writeln!(out, "  {}", describe(e));
        }
    }
    let mut culprits: Vec<usize> = Vec::new();
    if let Some(w) = window {
        if !w.critical.is_empty() {
            let _ = writeln!(
                out,
                "between {} and {}, removing any one of these operations would remove the \
                 contradiction:",
                fmt_time(w.from),
                fmt_time(w.to)
            );
            for &i in &w.critical {
                let _ = writeln!(out, "  {}", describe(&events[i]));
                culprits.push(events[i].id);
            }
        }
        let _ = writeln!(
            out,
            "(established by a local check: the {} operation(s) that lie entirely between {} \
             and {} cannot all be linearized from any state the earlier operations could \
             have left, even with the {} operation(s) that overlap that interval or have an \
             unknown outcome taking effect at will)",
            w.mandatory,
            fmt_time(w.from),
            fmt_time(w.to),
            w.considered - w.mandatory
        );
    }
    culprits.extend(stuck.culprits.iter().map(|&i| events[ops[i].ev].id));
    let mut seen = HashSet::new();
    culprits.retain(|id| seen.insert(*id));
    (out, culprits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::tests::{dereg, ev, read};

    #[test]
    fn describe_is_one_line() {
        let e = ev(
            7,
            Op::Register { value: 42 },
            1_500_000_000,
            1_600_000_001,
            Outcome::Registered,
        );
        assert_eq!(
            describe(&e),
            "#7 client 7 register(42) [1.500000000s .. 1.600000001s] -> registered"
        );
        let e = read(8, 0, 5, Some(3));
        assert_eq!(
            describe(&e),
            "#8 client 8 read [0.000000000s .. 0.000000005s] -> saw present(3)"
        );
        let e = dereg(9, 5, 1, Outcome::Unknown);
        assert_eq!(
            describe(&e),
            "#9 client 9 deregister [0.000000005s .. ?] -> unknown"
        );
    }
}
