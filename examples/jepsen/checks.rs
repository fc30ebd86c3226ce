//! What the history must satisfy once the run is over.
//!
//! (a) every acknowledged registration that was not later deregistered is
//!     on every node at the end, and all nodes agree;
//! (b) per key, writes, heartbeats and consistent reads are linearizable
//!     (Wing–Gong–Lowe, `checker/`);
//! (c) default reads keep the promises of docs/api.md: a node's
//!     `X-Registry-Index` never goes back within one process; two answers
//!     at the same index show the same instances (every node applies the
//!     same log); no read shows a value nobody wrote;
//! (d) no short-TTL instance disappeared while its last acknowledged
//!     heartbeat was less than a TTL old.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::Instant;

use crate::checker::{self, Event, Op, Outcome, Verdict};
use crate::workload::{self, Kind, Record, Res};

pub struct Anomaly {
    pub check: &'static str,
    pub detail: String,
}

#[derive(Default)]
pub struct Report {
    pub anomalies: Vec<Anomaly>,
    pub keys_checked: usize,
    pub events_checked: usize,
    pub inconclusive: usize,
    pub linearizability_ms: u128,
    pub reads_checked_c: usize,
    pub absences_checked_d: usize,
    pub presences_checked_d: usize,
    pub acked_registrations_a: usize,
}

fn secs(ns: u64) -> String {
    format!("{:.3}s", ns as f64 / 1e9)
}

pub fn show(r: &Record) -> String {
    let what = match r.kind {
        Kind::Register => format!(
            "register {}/{} v={}",
            r.service,
            r.instance.as_deref().unwrap_or("?"),
            r.value.unwrap_or(0)
        ),
        Kind::Deregister | Kind::Heartbeat => format!(
            "{:?} {}/{}",
            r.kind,
            r.service,
            r.instance.as_deref().unwrap_or("?")
        )
        .to_lowercase(),
        _ => format!("{:?} {}", r.kind, r.service).to_lowercase(),
    };
    let res = match &r.result {
        Res::Saw(m) => format!("saw {m:?}"),
        other => format!("{other:?}"),
    };
    format!(
        "#{} client {} node {} [{} .. {}] {what} -> {res} (index {:?})",
        r.id,
        r.client,
        r.node,
        secs(r.call),
        secs(r.ret),
        r.index
    )
}

fn is_main(service: &str) -> bool {
    service.starts_with("jk")
}

/// The checker's events for one key of a long-lived service.
fn events_for(records: &[Record], service: &str, inst: &str) -> Vec<Event> {
    let mut out = Vec::new();
    for r in records.iter().filter(|r| r.service == service) {
        let mine = r.instance.as_deref() == Some(inst);
        let (op, outcome) = match (r.kind, &r.result) {
            (_, Res::Fail(_)) => continue,
            (Kind::Register, res) if mine => (
                Op::Register {
                    value: r.value.unwrap_or(0),
                },
                match res {
                    Res::Ok => Outcome::Registered,
                    _ => Outcome::Unknown,
                },
            ),
            (Kind::Deregister, res) if mine => (
                Op::Deregister,
                match res {
                    Res::Ok => Outcome::Removed,
                    Res::NotFound => Outcome::NotFound,
                    _ => Outcome::Unknown,
                },
            ),
            (Kind::Heartbeat, res) if mine => (
                Op::Heartbeat,
                match res {
                    Res::Ok => Outcome::Present,
                    Res::NotFound => Outcome::NotFound,
                    _ => Outcome::Unknown,
                },
            ),
            (Kind::ConsistentRead | Kind::FinalRead, Res::Saw(m)) => {
                (Op::Read, Outcome::Saw(m.get(inst).copied()))
            }
            _ => continue,
        };
        out.push(Event {
            id: r.id,
            client: r.client,
            op,
            call: r.call,
            ret: r.ret,
            outcome,
        });
    }
    out
}

/// (b)
fn linearizability(records: &[Record], report: &mut Report, budget: u64) {
    let started = Instant::now();
    let keys: Vec<(String, String)> = (0..workload::SERVICES)
        .flat_map(|s| {
            (0..workload::INSTANCES).map(move |i| (workload::service(s), workload::instance(i)))
        })
        .collect();
    let verdicts: Vec<(String, usize, Verdict)> = std::thread::scope(|scope| {
        let chunks: Vec<Vec<(String, String)>> = keys
            .chunks(keys.len().div_ceil(2))
            .map(|c| c.to_vec())
            .collect();
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|(s, i)| {
                            let events = events_for(records, &s, &i);
                            let n = events.len();
                            (
                                format!("{s}/{i}"),
                                n,
                                checker::check_key(&events, None, budget),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    for (key, n, verdict) in verdicts {
        report.keys_checked += 1;
        report.events_checked += n;
        match verdict {
            Verdict::Linearizable => {}
            Verdict::Inconclusive { steps } => {
                report.inconclusive += 1;
                eprintln!("linearizability of {key}: no verdict after {steps} steps");
            }
            Verdict::Violation {
                explanation,
                culprits,
            } => {
                let mut detail = format!("key {key} is not linearizable; culprits {culprits:?}\n");
                for line in explanation.lines().take(60) {
                    let _ = writeln!(detail, "    {line}");
                }
                report.anomalies.push(Anomaly {
                    check: "(b) linearizability",
                    detail,
                });
            }
        }
    }
    report.linearizability_ms = started.elapsed().as_millis();
}

/// (a) and the agreement of all nodes at the end.
fn final_state(records: &[Record], finals: &[Record], report: &mut Report) {
    // All nodes agree.
    let mut by_service: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for f in finals {
        by_service.entry(&f.service).or_default().push(f);
    }
    for (service, answers) in &by_service {
        let first = answers.iter().find_map(|r| match &r.result {
            Res::Saw(m) => Some((r, m)),
            _ => None,
        });
        for r in answers {
            match (&r.result, first) {
                (Res::Saw(m), Some((f, fm))) if m != fm => report.anomalies.push(Anomaly {
                    check: "(a) final state",
                    detail: format!(
                        "nodes disagree on {service} after converging:\n    {}\n    {}",
                        show(f),
                        show(r)
                    ),
                }),
                (Res::Saw(_), _) => {}
                (other, _) => report.anomalies.push(Anomaly {
                    check: "(a) final state",
                    detail: format!(
                        "node {} did not answer the final read of {service}: {other:?}",
                        r.node
                    ),
                }),
            }
        }
    }
    // Every acknowledged registration not followed by a deregistration is there.
    for s in 0..workload::SERVICES {
        let service = workload::service(s);
        for i in 0..workload::INSTANCES {
            let inst = workload::instance(i);
            let ops: Vec<&Record> = records
                .iter()
                .filter(|r| r.service == service && r.instance.as_deref() == Some(inst.as_str()))
                .collect();
            let acked = ops
                .iter()
                .filter(|r| r.kind == Kind::Register && matches!(r.result, Res::Ok))
                .max_by_key(|r| r.call);
            let Some(w) = acked else { continue };
            report.acked_registrations_a += 1;
            // A deregister that may have taken effect after `w` started.
            let later_dereg = ops.iter().any(|r| {
                r.kind == Kind::Deregister
                    && !matches!(r.result, Res::Fail(_) | Res::NotFound)
                    && (!matches!(r.result, Res::Ok) || r.ret >= w.call)
            });
            // Values that may be the last one written.
            let possible: Vec<u64> = ops
                .iter()
                .filter(|r| {
                    r.kind == Kind::Register
                        && !matches!(r.result, Res::Fail(_))
                        && (r.id == w.id || !matches!(r.result, Res::Ok) || r.ret >= w.call)
                })
                .filter_map(|r| r.value)
                .collect();
            for f in finals.iter().filter(|f| f.service == service) {
                let Res::Saw(m) = &f.result else { continue };
                match m.get(&inst) {
                    None if !later_dereg => report.anomalies.push(Anomaly {
                        check: "(a) acknowledged write lost",
                        detail: format!(
                            "{service}/{inst} is missing on node {} at the end, but was registered (acknowledged) by\n    {}\nand never deregistered after that",
                            f.node,
                            show(w)
                        ),
                    }),
                    Some(v) if !possible.contains(v) => report.anomalies.push(Anomaly {
                        check: "(a) final state",
                        detail: format!(
                            "{service}/{inst} on node {} ends with v={v}, which is older than the last acknowledged registration\n    {}",
                            f.node,
                            show(w)
                        ),
                    }),
                    _ => {}
                }
            }
        }
    }
}

/// (c)
fn default_reads(records: &[Record], report: &mut Report) {
    let reads: Vec<&Record> = records
        .iter()
        .filter(|r| {
            matches!(
                r.kind,
                Kind::Read | Kind::ConsistentRead | Kind::FinalRead | Kind::Watch
            ) && matches!(r.result, Res::Saw(_))
                && r.index.is_some()
        })
        .collect();
    report.reads_checked_c = reads.len();

    // c1: within one process, the index never goes back.
    let mut by_node: HashMap<(u64, u64), Vec<&Record>> = HashMap::new();
    for r in &reads {
        if let Some(inc) = r.incarnation {
            by_node.entry((r.node, inc)).or_default().push(r);
        }
    }
    for ((node, _), mut rs) in by_node {
        rs.sort_by_key(|r| r.call);
        let mut by_ret = rs.clone();
        by_ret.sort_by_key(|r| r.ret);
        let mut k = 0;
        let mut best: Option<&Record> = None;
        for b in &rs {
            while k < by_ret.len() && by_ret[k].ret < b.call {
                if best.is_none_or(|x| by_ret[k].index > x.index) {
                    best = Some(by_ret[k]);
                }
                k += 1;
            }
            if let Some(a) = best {
                if a.index > b.index {
                    report.anomalies.push(Anomaly {
                        check: "(c) index went back",
                        detail: format!(
                            "node {node} answered index {:?} and later, in the same process, index {:?}:\n    {}\n    {}",
                            a.index, b.index, show(a), show(b)
                        ),
                    });
                    break;
                }
            }
        }
    }

    // c4: a blocking query never answers with a state older than the
    // index it was given (a watch must not go back in time).
    for r in reads.iter().filter(|r| r.kind == Kind::Watch) {
        if let (Some(after), Some(index)) = (r.after, r.index) {
            if index < after {
                report.anomalies.push(Anomaly {
                    check: "(c) watch went back",
                    detail: format!(
                        "a blocking query with index={after} answered a state at index {index}:\n    {}",
                        show(r)
                    ),
                });
            }
        }
    }

    // c2: the same index means the same state, on every node.
    let mut at: HashMap<(&str, u64), &Record> = HashMap::new();
    let mut reported = 0;
    for r in &reads {
        let key = (r.service.as_str(), r.index.unwrap_or(0));
        match at.get(&key) {
            None => {
                at.insert(key, r);
            }
            Some(o) => {
                let (Res::Saw(a), Res::Saw(b)) = (&o.result, &r.result) else {
                    continue;
                };
                if a != b && reported < 20 {
                    reported += 1;
                    report.anomalies.push(Anomaly {
                        check: "(c) same index, different state",
                        detail: format!(
                            "two answers at index {} of {} differ:\n    {}\n    {}",
                            key.1,
                            key.0,
                            show(o),
                            show(r)
                        ),
                    });
                }
            }
        }
    }

    // c3: nobody reads a value that was never written.
    let mut written: HashMap<u64, &Record> = HashMap::new();
    for r in records.iter().filter(|r| r.kind == Kind::Register) {
        if let (Some(v), false) = (r.value, matches!(r.result, Res::Fail(_))) {
            written.insert(v, r);
        }
    }
    for r in &reads {
        let Res::Saw(m) = &r.result else { continue };
        for (inst, v) in m {
            let ok = written.get(v).is_some_and(|w| {
                w.call <= r.ret && w.service == r.service && w.instance.as_deref() == Some(inst)
            });
            if !ok {
                report.anomalies.push(Anomaly {
                    check: "(c) phantom value",
                    detail: format!(
                        "read shows {inst}={v}, which no register wrote before it:\n    {}",
                        show(r)
                    ),
                });
            }
        }
    }
}

/// (d)
fn early_expiry(records: &[Record], finals: &[Record], report: &mut Report) {
    let ttl_ns = workload::HB_TTL_SECS * 1_000_000_000;
    for s in 0..workload::HB_SERVICES {
        let service = workload::hb_service(s);
        for i in 0..workload::HB_INSTANCES {
            let inst = workload::instance(i);
            let mut acks: Vec<&Record> = records
                .iter()
                .filter(|r| {
                    r.service == service
                        && r.instance.as_deref() == Some(inst.as_str())
                        && matches!(r.kind, Kind::Register | Kind::Heartbeat)
                        && matches!(r.result, Res::Ok)
                })
                .collect();
            acks.sort_by_key(|r| r.ret);
            report.presences_checked_d += records
                .iter()
                .filter(|r| {
                    r.service == service
                        && matches!(&r.result, Res::Saw(m) if m.contains_key(&inst))
                })
                .count();
            let absences = records.iter().chain(finals).filter(|r| {
                r.service == service
                    && match (&r.kind, &r.result) {
                        (Kind::ConsistentRead | Kind::FinalRead, Res::Saw(m)) => {
                            !m.contains_key(&inst)
                        }
                        (Kind::Heartbeat, Res::NotFound) => {
                            r.instance.as_deref() == Some(inst.as_str())
                        }
                        _ => false,
                    }
            });
            for r in absences {
                report.absences_checked_d += 1;
                // The latest ack that certainly happened before this read.
                let before = acks.partition_point(|a| a.ret < r.call);
                let Some(last) = acks[..before].iter().max_by_key(|a| a.call) else {
                    continue;
                };
                if r.ret < last.call + ttl_ns {
                    report.anomalies.push(Anomaly {
                        check: "(d) early expiry",
                        detail: format!(
                            "{service}/{inst} was gone {} after its last acknowledged heartbeat (TTL {} s):\n    {}\n    {}",
                            secs(r.ret.saturating_sub(last.call)),
                            workload::HB_TTL_SECS,
                            show(last),
                            show(r)
                        ),
                    });
                }
            }
        }
    }
}

pub fn check(records: &[Record], finals: &[Record], budget: u64) -> Report {
    let mut report = Report::default();
    let main: Vec<Record> = records
        .iter()
        .chain(finals)
        .filter(|r| is_main(&r.service))
        .cloned()
        .collect();
    final_state(
        records,
        &finals
            .iter()
            .filter(|r| is_main(&r.service))
            .cloned()
            .collect::<Vec<_>>(),
        &mut report,
    );
    linearizability(&main, &mut report, budget);
    let all: Vec<Record> = records.iter().chain(finals).cloned().collect();
    default_reads(&all, &mut report);
    early_expiry(records, finals, &mut report);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn rec(
        id: usize,
        kind: Kind,
        service: &str,
        inst: Option<&str>,
        call: u64,
        ret: u64,
        result: Res,
    ) -> Record {
        Record {
            id,
            client: id,
            kind,
            service: service.into(),
            instance: inst.map(Into::into),
            value: None,
            node: 1,
            incarnation: Some(1),
            call,
            ret,
            result,
            index: None,
            status: None,
            after: None,
        }
    }

    fn saw(pairs: &[(&str, u64)]) -> Res {
        Res::Saw(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    fn register(id: usize, service: &str, inst: &str, v: u64, call: u64, ret: u64) -> Record {
        let mut r = rec(id, Kind::Register, service, Some(inst), call, ret, Res::Ok);
        r.value = Some(v);
        r
    }

    fn read(
        id: usize,
        kind: Kind,
        service: &str,
        call: u64,
        ret: u64,
        index: u64,
        res: Res,
    ) -> Record {
        let mut r = rec(id, kind, service, None, call, ret, res);
        r.index = Some(index);
        r
    }

    fn checks_named(report: &Report, name: &str) -> usize {
        report
            .anomalies
            .iter()
            .filter(|a| a.check.contains(name))
            .count()
    }

    #[test]
    fn a_clean_history_passes() {
        let records = vec![
            register(0, "jk0", "i0", 1, 0, S),
            read(
                1,
                Kind::ConsistentRead,
                "jk0",
                2 * S,
                3 * S,
                5,
                saw(&[("i0", 1)]),
            ),
            read(2, Kind::Read, "jk0", 4 * S, 5 * S, 5, saw(&[("i0", 1)])),
        ];
        let finals = vec![read(
            3,
            Kind::FinalRead,
            "jk0",
            9 * S,
            10 * S,
            7,
            saw(&[("i0", 1)]),
        )];
        let report = check(&records, &finals, 1_000_000);
        assert!(
            report.anomalies.is_empty(),
            "{:?}",
            report
                .anomalies
                .iter()
                .map(|a| &a.detail)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_lost_acknowledged_write_is_reported() {
        let records = vec![register(0, "jk0", "i0", 1, 0, S)];
        let finals = vec![read(1, Kind::FinalRead, "jk0", 9 * S, 10 * S, 7, saw(&[]))];
        let report = check(&records, &finals, 1_000_000);
        assert_eq!(checks_named(&report, "lost"), 1);
        assert!(checks_named(&report, "linearizability") >= 1);
    }

    #[test]
    fn a_stale_consistent_read_is_reported() {
        let mut second = register(1, "jk0", "i0", 2, 2 * S, 3 * S);
        second.value = Some(2);
        let records = vec![
            register(0, "jk0", "i0", 1, 0, S),
            second,
            read(
                2,
                Kind::ConsistentRead,
                "jk0",
                4 * S,
                5 * S,
                3,
                saw(&[("i0", 1)]),
            ),
        ];
        let report = check(&records, &[], 1_000_000);
        assert_eq!(checks_named(&report, "linearizability"), 1);
    }

    #[test]
    fn an_index_going_back_on_one_node_is_reported() {
        let records = vec![
            register(0, "jk0", "i0", 1, 0, S),
            read(1, Kind::Read, "jk0", 2 * S, 3 * S, 9, saw(&[("i0", 1)])),
            read(2, Kind::Read, "jk0", 4 * S, 5 * S, 8, saw(&[("i0", 1)])),
        ];
        let report = check(&records, &[], 1_000_000);
        assert_eq!(checks_named(&report, "index went back"), 1);
        // Across a restart (another incarnation) the index may start lower.
        let mut records = records;
        records[2].incarnation = Some(2);
        assert_eq!(
            checks_named(&check(&records, &[], 1_000_000), "index went back"),
            0
        );
    }

    #[test]
    fn two_states_at_one_index_and_phantoms_are_reported() {
        let records = vec![
            register(0, "jk0", "i0", 1, 0, S),
            read(1, Kind::Read, "jk0", 2 * S, 3 * S, 9, saw(&[("i0", 1)])),
            read(2, Kind::Read, "jk0", 2 * S, 3 * S, 9, saw(&[])),
            read(3, Kind::Read, "jk0", 4 * S, 5 * S, 10, saw(&[("i0", 77)])),
        ];
        let report = check(&records, &[], 1_000_000);
        assert_eq!(checks_named(&report, "same index"), 1);
        assert_eq!(checks_named(&report, "phantom"), 1);
    }

    #[test]
    fn early_expiry_is_reported_and_late_expiry_is_not() {
        let ttl = workload::HB_TTL_SECS * S;
        let records = vec![
            register(0, "jh0", "i0", 1, 0, S),
            rec(
                1,
                Kind::Heartbeat,
                "jh0",
                Some("i0"),
                10 * S,
                11 * S,
                Res::Ok,
            ),
            // Gone 2 s after the heartbeat: too early.
            read(
                2,
                Kind::ConsistentRead,
                "jh0",
                12 * S,
                12 * S + 1,
                5,
                saw(&[]),
            ),
            // Gone a TTL after it: fine.
            read(
                3,
                Kind::ConsistentRead,
                "jh0",
                10 * S + ttl + 1,
                10 * S + ttl + 2,
                6,
                saw(&[]),
            ),
        ];
        let report = check(&records, &[], 1_000_000);
        assert_eq!(
            checks_named(&report, "early expiry"),
            1,
            "{:?}",
            report
                .anomalies
                .iter()
                .map(|a| &a.detail)
                .collect::<Vec<_>>()
        );
    }
}
