//! A Jepsen-style test of vertice-register: concurrent clients against a
//! three-node cluster of real processes, faults on a seeded schedule, and
//! a check of the recorded history afterwards (see `checks.rs`).
//!
//! Run it through `scripts/jepsen.sh --minutes N --seed S [--tls]`, which builds the
//! release binary and this harness first. It needs root and iptables for
//! the partition faults (they are skipped, and said so, without them).
//! Exit status: 0 no anomaly, 1 anomalies found (with `--expect-violation`:
//! the other way round), 2 the harness itself failed.

mod checker;
mod checks;
mod cluster;
mod workload;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use cluster::Cluster;
use workload::{Kind, Record, Res, Shared};

/// Clients that watch a service with blocking queries.
const WATCHERS: usize = 2;

const FAULTS: &[&str] = &[
    "kill-leader",
    "kill-follower",
    "kill-all",
    "pause-leader",
    "pause-follower",
    "partition-leader",
    "partition-partial",
    "partition-one-way",
    "restart",
    "membership",
];

#[derive(Parser, Debug)]
#[command(about = "Linearizability and safety test of a vertice-register cluster under faults")]
struct Args {
    /// How long the clients and faults run, in minutes.
    #[arg(long, default_value_t = 1.0)]
    minutes: f64,
    /// Seed for the fault schedule and the clients' choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Concurrent clients on the long-lived services.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Comma-separated faults to inject (default: all of them).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Start the nodes with the test-only stale consistent read path.
    #[arg(long)]
    stale_reads: bool,
    /// Start the nodes with the test-only broken lease rule: renewals
    /// acknowledged without a write are forgotten, so instances expire while
    /// their heartbeats are acknowledged. With --expect-violation, the run
    /// passes only if check (d) reports an early expiry.
    #[arg(long)]
    broken_leases: bool,
    /// Run the nodes with mutual TLS (certificates from a CA made for the run).
    #[arg(long)]
    tls: bool,
    /// Succeed only if the checker reports an anomaly (proves it bites);
    /// with --broken-leases, an early expiry (check (d)) in particular.
    #[arg(long)]
    expect_violation: bool,
    /// The vertice-register binary (default: next to this harness).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Where node data, logs and the history go (kept after a failure).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Keep the output directory even when the run passes.
    #[arg(long)]
    keep: bool,
    /// Search steps the linearizability checker may spend per key.
    #[arg(long, default_value_t = 20_000_000)]
    budget: u64,
    /// The run fails unless every kind of operation succeeded at least this
    /// many times: a run that checked nothing proves nothing.
    #[arg(long, default_value_t = 10)]
    min_ok: usize,
    /// Let the run pass when faults this machine cannot inject (partitions
    /// without iptables or root) are skipped; without it, a skip fails it.
    #[arg(long)]
    allow_skip: bool,
}

/// What a run found: how to judge it.
struct Outcome {
    /// Anomalies, liveness failures and inconclusive keys, all counted.
    anomalies: usize,
    /// Of the anomalies, early expiries (check (d)).
    early_expiries: usize,
    /// Of the anomalies, linearizability violations (check (b)).
    linearizability: usize,
    /// Why the run cannot count, pass or fail: too few operations, a
    /// requested fault never injected, a fault skipped without leave.
    invalid: Vec<String>,
}

struct Fault {
    kind: &'static str,
    target: String,
    at: Duration,
    took: Duration,
}

fn log(start: Instant, msg: impl AsRef<str>) {
    println!("[{:7.2}s] {}", start.elapsed().as_secs_f64(), msg.as_ref());
    let _ = std::io::stdout().flush();
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(o) => {
            if !o.invalid.is_empty() {
                println!(
                    "\nthe run cannot be judged ({} reasons: the 'invalid' lines above), so it fails",
                    o.invalid.len()
                );
                std::process::exit(1);
            }
            // What "it bites" means: the violation the broken build makes,
            // not any anomaly (a leader gap or an inconclusive search would
            // otherwise pass for a caught stale read).
            let (bit, what) = if args.broken_leases {
                (o.early_expiries, "an early expiry (check (d))")
            } else {
                (o.linearizability, "a linearizability violation (check (b))")
            };
            let code = match (o.anomalies > 0, args.expect_violation) {
                (false, false) => 0,
                (true, true) if bit > 0 => 0,
                _ => 1,
            };
            if args.expect_violation {
                if bit > 0 {
                    println!("\nexpected {what}, and the checker reported {bit}: it bites");
                } else {
                    println!(
                        "\nexpected {what}, but the checker found none ({} other anomalies)",
                        o.anomalies
                    );
                }
            }
            std::process::exit(code);
        }
        Err(e) => {
            eprintln!("jepsen: the harness failed: {e:#}");
            std::process::exit(2);
        }
    }
}

/// One fault, start to end (healing included).
fn inject(c: &mut Cluster, kind: &'static str, hold: Duration, rng: &mut StdRng) -> Result<String> {
    let leader = c.wait_for_leader(Duration::from_secs(10));
    let members = c.members.clone();
    let pick_follower = |rng: &mut StdRng| -> Option<u64> {
        let fs: Vec<u64> = members
            .iter()
            .copied()
            .filter(|&m| Some(m) != leader)
            .collect();
        fs.choose(rng).copied()
    };
    let needs_leader = kind.contains("leader") || kind.starts_with("partition");
    if needs_leader && leader.is_none() {
        bail!("no leader to aim at");
    }
    let l = leader.unwrap_or(members[0]);
    let target = match kind {
        "kill-leader" => {
            c.kill9(l)?;
            std::thread::sleep(hold);
            c.start(l)?;
            format!("node {l} (leader)")
        }
        "kill-follower" => {
            let f = pick_follower(rng).context("no follower")?;
            c.kill9(f)?;
            std::thread::sleep(hold);
            c.start(f)?;
            format!("node {f}")
        }
        "kill-all" => {
            for &m in &members {
                c.kill9(m)?;
            }
            std::thread::sleep(hold.min(Duration::from_millis(500)));
            for &m in &members {
                c.start(m)?;
            }
            format!("nodes {members:?}")
        }
        "pause-leader" => {
            c.pause(l)?;
            std::thread::sleep(hold);
            c.resume(l)?;
            format!("node {l} (leader), SIGSTOP for {hold:?}")
        }
        "pause-follower" => {
            let f = pick_follower(rng).context("no follower")?;
            c.pause(f)?;
            std::thread::sleep(hold);
            c.resume(f)?;
            format!("node {f}, SIGSTOP for {hold:?}")
        }
        "partition-leader" | "partition-partial" | "partition-one-way" => {
            let others: Vec<u64> = members.iter().copied().filter(|&m| m != l).collect();
            let (pairs, what): (Vec<(u64, u64)>, String) = match kind {
                "partition-leader" => (
                    others.iter().flat_map(|&o| [(l, o), (o, l)]).collect(),
                    format!("leader {l} cut from {others:?}"),
                ),
                "partition-partial" => {
                    let f = pick_follower(rng).context("no follower")?;
                    (
                        vec![(l, f), (f, l)],
                        format!("leader {l} cut from node {f} only"),
                    )
                }
                _ => (
                    others.iter().map(|&o| (l, o)).collect(),
                    format!("packets from leader {l} to {others:?} dropped"),
                ),
            };
            c.drop_packets(&pairs)?;
            std::thread::sleep(hold);
            // The effect, not the attempt: nodes talk every 50 ms, so a
            // partition that held dropped packets.
            let dropped = c.dropped_packets()?;
            c.heal();
            if dropped == 0 {
                bail!("the partition dropped no packets");
            }
            format!("{what}, {dropped} packets dropped")
        }
        "restart" => {
            let m = *members.choose(rng).context("no member")?;
            c.terminate(m)?;
            c.start(m)?;
            format!("node {m} (SIGTERM and start)")
        }
        "membership" => {
            // Remove a member (the leader one time in three), add a fresh one.
            let victim = if rng.gen_range(0..3) == 0 {
                l
            } else {
                pick_follower(rng).unwrap_or(l)
            };
            c.remove_member(victim)
                .with_context(|| format!("removing node {victim}"))?;
            let added = c
                .add_member(Duration::from_secs(60))
                .context("adding a node")?;
            format!("removed node {victim}, added node {added}")
        }
        other => bail!("unknown fault {other}"),
    };
    Ok(target)
}

/// Runs the test and checks its history.
fn run(args: &Args) -> Result<Outcome> {
    let start = Instant::now();
    let bin = match &args.bin {
        Some(b) => b.clone(),
        None => {
            let me = std::env::current_exe()?;
            me.parent()
                .and_then(|p| p.parent())
                .map(|p| p.join("vertice-register"))
                .context("cannot find the binary next to the harness; pass --bin")?
        }
    };
    if !bin.exists() {
        bail!(
            "{} does not exist; build it with cargo build --release",
            bin.display()
        );
    }
    let out = args.out.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("vr-jepsen-{}-{}", args.seed, std::process::id()))
    });
    let mut faults: Vec<&'static str> =
        if args.faults.is_empty() {
            FAULTS.to_vec()
        } else {
            let mut v = Vec::new();
            for f in &args.faults {
                v.push(*FAULTS.iter().find(|k| *k == f).with_context(|| {
                    format!("unknown fault '{f}'; known: {}", FAULTS.join(","))
                })?);
            }
            v
        };
    let mut skipped = Vec::new();
    if !Cluster::iptables_available() {
        skipped.extend(
            faults
                .iter()
                .filter(|f| f.starts_with("partition"))
                .copied(),
        );
        faults.retain(|f| !f.starts_with("partition"));
    }
    let mut extra: Vec<String> = ["--leader-wait-ms", "2000", "--snapshot-threshold", "500"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if args.stale_reads {
        extra.push("--test-stale-reads".into());
    }
    if args.broken_leases {
        extra.push("--test-broken-leases".into());
    }
    let run_for = Duration::from_secs_f64(args.minutes * 60.0);
    println!(
        "jepsen: seed {}, {:.1} min, {} clients + {} watchers + {} heartbeaters, faults: {}",
        args.seed,
        args.minutes,
        args.clients,
        WATCHERS,
        workload::HB_SERVICES * workload::HB_INSTANCES,
        faults.join(",")
    );
    if !skipped.is_empty() {
        println!(
            "jepsen: SKIPPED (no iptables or not root): {}",
            skipped.join(",")
        );
    }
    if args.stale_reads {
        println!(
            "jepsen: nodes run with --test-stale-reads: consistent reads are NOT linearizable"
        );
    }
    if args.broken_leases {
        println!(
            "jepsen: nodes run with --test-broken-leases: instances may expire while heartbeating"
        );
    }
    if args.tls {
        println!("jepsen: nodes speak HTTPS only, with mutual TLS between them");
    }
    println!("jepsen: output in {}", out.display());

    // Run a copy, so that a rebuild during a long run changes nothing.
    std::fs::create_dir_all(&out)?;
    let copy = out.join("vertice-register");
    std::fs::copy(&bin, &copy).with_context(|| format!("copying {}", bin.display()))?;
    let pki = match args.tls {
        true => Some(cluster::Pki::new(out.join("pki"))?),
        false => None,
    };
    let mut client = reqwest::Client::builder().pool_max_idle_per_host(4);
    if let Some(pki) = &pki {
        client = client.add_root_certificate(reqwest::Certificate::from_pem(&pki.ca_pem())?);
    }
    let mut c = Cluster::new(copy, out.clone(), extra, 3, pki)?;
    c.wait_for_leader(Duration::from_secs(30))
        .context("the cluster elected no leader")?;
    log(start, "cluster up");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let shared = Arc::new(Shared {
        start,
        targets: c.targets.clone(),
        stop: AtomicBool::new(false),
        next_value: AtomicU64::new(1),
        timeout: Duration::from_secs(4),
        http: client.build()?,
    });
    let mut handles = Vec::new();
    for k in 0..args.clients {
        handles.push(rt.spawn(workload::worker(
            shared.clone(),
            k,
            args.seed.wrapping_mul(1000).wrapping_add(k as u64),
        )));
    }
    let mut client = args.clients;
    for s in 0..WATCHERS {
        handles.push(rt.spawn(workload::watcher(
            shared.clone(),
            client,
            s % workload::SERVICES,
            args.seed.wrapping_mul(1000).wrapping_add(client as u64),
        )));
        client += 1;
    }
    for s in 0..workload::HB_SERVICES {
        for i in 0..workload::HB_INSTANCES {
            handles.push(rt.spawn(workload::heartbeater(
                shared.clone(),
                client,
                s,
                i,
                args.seed.wrapping_mul(1000).wrapping_add(client as u64),
            )));
            client += 1;
        }
    }

    // The nemesis: quiet, fault, heal, wait for a leader; faults dealt from
    // a shuffled deck so that a short run still sees each kind.
    let mut rng = StdRng::seed_from_u64(args.seed);
    let end = Instant::now() + run_for;
    let mut deck: Vec<&'static str> = Vec::new();
    let mut injected: Vec<Fault> = Vec::new();
    let mut not_injected: Vec<String> = Vec::new();
    let mut liveness: Vec<String> = Vec::new();
    while Instant::now() < end && !faults.is_empty() {
        if deck.is_empty() {
            deck = faults.clone();
            deck.shuffle(&mut rng);
        }
        let quiet = Duration::from_millis(rng.gen_range(1000..3000));
        sleep_until((Instant::now() + quiet).min(end));
        if Instant::now() >= end {
            break;
        }
        let kind = deck.pop().expect("deck is not empty");
        let hold = Duration::from_millis(rng.gen_range(1500..4000));
        let at = start.elapsed();
        let t0 = Instant::now();
        match inject(&mut c, kind, hold, &mut rng) {
            Ok(target) => {
                log(
                    start,
                    format!(
                        "fault {kind}: {target} ({:.1}s)",
                        t0.elapsed().as_secs_f64()
                    ),
                );
                injected.push(Fault {
                    kind,
                    target,
                    at,
                    took: t0.elapsed(),
                });
            }
            Err(e) => {
                log(start, format!("fault {kind} not injected: {e:#}"));
                not_injected.push(format!("{kind}: {e:#}"));
                c.heal_all()?;
            }
        }
        if c.wait_for_leader(Duration::from_secs(20)).is_none() {
            let msg = format!("no leader 20 s after the fault {kind} ended");
            log(start, &msg);
            liveness.push(msg);
            c.heal_all()?;
        }
    }
    sleep_until(end);
    shared.stop.store(true, Ordering::SeqCst);
    log(start, "stopping clients");
    let mut records: Vec<Record> = Vec::new();
    for h in handles {
        records.extend(rt.block_on(h).context("a client panicked")?);
    }

    // Heal everything, converge, and read every service on every node.
    c.heal_all()?;
    let index = c
        .wait_converged(Duration::from_secs(60))
        .context("the cluster did not converge after healing")?;
    log(
        start,
        format!(
            "healed; all {} members applied index {index}",
            c.members.len()
        ),
    );
    let mut services: Vec<String> = (0..workload::SERVICES).map(workload::service).collect();
    services.extend((0..workload::HB_SERVICES).map(workload::hb_service));
    let nodes: Vec<(u64, String)> = c.members.iter().map(|&m| (m, c.url(m))).collect();
    let finals: Vec<Record> = rt.block_on(async {
        let mut out = Vec::new();
        for (id, url) in &nodes {
            for s in &services {
                let op = workload::Op {
                    kind: Kind::FinalRead,
                    after: None,
                    service: s.clone(),
                    instance: None,
                    value: None,
                    ttl: 0,
                };
                out.push(workload::run_op(&shared, usize::MAX, (*id, url), op).await);
            }
        }
        out
    });
    drop(c);
    let mut finals = finals;
    for (k, r) in records.iter_mut().enumerate() {
        r.id = k;
    }
    for (k, r) in finals.iter_mut().enumerate() {
        r.id = records.len() + k;
    }
    let history = out.join("history.jsonl");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&history)?);
        for r in records.iter().chain(&finals) {
            serde_json::to_writer(&mut f, r)?;
            f.write_all(b"\n")?;
        }
    }

    log(
        start,
        format!("checking {} operations", records.len() + finals.len()),
    );
    let report = checks::check(&records, &finals, args.budget);

    // Summary.
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n==== jepsen summary (seed {}, {:.1} min) ====",
        args.seed, args.minutes
    );
    let _ = writeln!(s, "operations:");
    let _ = writeln!(
        s,
        "  {:<16}{:>8}{:>11}{:>9}{:>9}",
        "kind", "ok", "not-found", "unknown", "failed"
    );
    let mut table: BTreeMap<Kind, [usize; 4]> = BTreeMap::new();
    for r in records.iter().chain(&finals) {
        let row = table.entry(r.kind).or_default();
        let col = match &r.result {
            Res::Ok | Res::Saw(_) => 0,
            Res::NotFound => 1,
            Res::Unknown(_) => 2,
            Res::Fail(_) => 3,
        };
        row[col] += 1;
    }
    for (k, row) in &table {
        let _ = writeln!(
            s,
            "  {:<16}{:>8}{:>11}{:>9}{:>9}",
            format!("{k:?}"),
            row[0],
            row[1],
            row[2],
            row[3]
        );
    }
    let _ = writeln!(s, "faults injected ({}):", injected.len());
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for f in &injected {
        *counts.entry(f.kind).or_default() += 1;
    }
    for (k, n) in &counts {
        let _ = writeln!(s, "  {k:<20} x{n}");
    }
    for f in &injected {
        let _ = writeln!(
            s,
            "    at {:6.1}s for {:4.1}s  {:<18} {}",
            f.at.as_secs_f64(),
            f.took.as_secs_f64(),
            f.kind,
            f.target
        );
    }
    if !skipped.is_empty() {
        let _ = writeln!(s, "  skipped: {}", skipped.join(","));
    }
    for n in &not_injected {
        let _ = writeln!(s, "  not injected: {n}");
    }
    let _ = writeln!(s, "checks:");
    let _ = writeln!(
        s,
        "  (a) {} keys with an acknowledged registration, checked on all {} nodes after healing and converging",
        report.acked_registrations_a,
        nodes.len()
    );
    let _ = writeln!(
        s,
        "  (b) {} keys, {} events checked for linearizability in {} ms ({} inconclusive)",
        report.keys_checked, report.events_checked, report.linearizability_ms, report.inconclusive
    );
    let _ = writeln!(
        s,
        "  (c) {} read answers checked (index order, same index same state, no phantom values)",
        report.reads_checked_c
    );
    let _ = writeln!(
        s,
        "  (d) short-TTL instances: {} answers showed one absent, each checked against its last acknowledged heartbeat ({} showed it present)",
        report.absences_checked_d, report.presences_checked_d
    );
    let anomalies = report.anomalies.len() + liveness.len() + report.inconclusive;
    if anomalies == 0 {
        let _ = writeln!(s, "anomalies: none");
    } else {
        let _ = writeln!(s, "anomalies: {anomalies}");
        // The first few in full; all of them in anomalies.txt.
        let mut full = String::new();
        for (k, a) in report.anomalies.iter().enumerate() {
            let _ = writeln!(full, "{}: {}", a.check, a.detail.trim_end());
            if k < 3 {
                let _ = writeln!(s, "  {}: {}", a.check, a.detail.trim_end());
            } else {
                let first = a.detail.lines().next().unwrap_or("");
                let _ = writeln!(s, "  {}: {first} ...", a.check);
            }
        }
        std::fs::write(out.join("anomalies.txt"), full)?;
        if report.anomalies.len() > 3 {
            let _ = writeln!(
                s,
                "  (every anomaly in full: {})",
                out.join("anomalies.txt").display()
            );
        }
        for l in &liveness {
            let _ = writeln!(s, "  liveness: {l}");
        }
        if report.inconclusive > 0 {
            let _ = writeln!(
                s,
                "  (b) {} keys got no verdict within the search budget",
                report.inconclusive
            );
        }
    }
    // Whether the run can be judged at all.
    let mut invalid = Vec::new();
    for kind in [
        Kind::Register,
        Kind::Deregister,
        Kind::Heartbeat,
        Kind::Read,
        Kind::ConsistentRead,
        Kind::Watch,
        Kind::FinalRead,
    ] {
        let ok = table.get(&kind).map_or(0, |row| row[0]);
        if ok < args.min_ok {
            invalid.push(format!(
                "only {ok} successful {kind:?} operations (--min-ok {})",
                args.min_ok
            ));
        }
    }
    for kind in &faults {
        if !counts.contains_key(*kind) {
            invalid.push(format!(
                "fault {kind} was requested but never took effect (a longer run, or fewer --faults)"
            ));
        }
    }
    if !skipped.is_empty() && !args.allow_skip {
        invalid.push(format!(
            "faults skipped on this machine: {} (run as root with iptables, or pass --allow-skip)",
            skipped.join(",")
        ));
    }
    for why in &invalid {
        let _ = writeln!(s, "invalid: {why}");
    }
    let _ = writeln!(s, "history: {}", history.display());
    print!("{s}");
    std::fs::write(out.join("summary.txt"), &s)?;
    let count = |check: &str| report.anomalies.iter().filter(|a| a.check == check).count();
    let outcome = Outcome {
        anomalies,
        early_expiries: count("(d) early expiry"),
        linearizability: count("(b) linearizability"),
        invalid,
    };
    let bit = if args.broken_leases {
        outcome.early_expiries
    } else {
        outcome.linearizability
    };
    let passed = outcome.invalid.is_empty()
        && match args.expect_violation {
            false => anomalies == 0,
            true => bit > 0,
        };
    if passed && !args.keep {
        let _ = std::fs::remove_dir_all(&out);
    }
    Ok(outcome)
}
