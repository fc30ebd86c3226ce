//! The one dispatcher, for any [`Backend`]: the probe subcommands, the
//! workloads (seeding, the clients spread over the nodes until the deadline,
//! the latencies recorded, the cleanup), fill, the failover timing, and the
//! reports and probe results as printed.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::backend::{Backend, FillInstance, FleetSpec, Request};
use super::fleet;
use super::stats::{drive, drive_numbered};
use super::{BenchArgs, Probe, Recorder, Report, Workload, WorkloadReport};

/// How long seeding and the probes retry before giving up.
pub const SEED_WAIT: Duration = Duration::from_secs(30);

/// Runs `bench` as the command line asks, against `backend`.
pub async fn run<B: Backend>(mut backend: B, args: &BenchArgs) -> anyhow::Result<()> {
    let (clients, nodes) = (args.clients as usize, args.targets.len());
    match args.probe.clone() {
        None => {
            backend.connect().await?;
            let backend = Arc::new(backend);
            let duration = Duration::from_secs_f64(args.seconds.max(0.0));
            let mut results = Vec::new();
            for w in &args.workloads {
                let r = if *w == Workload::Fleet {
                    backend.check(*w)?;
                    let spec = FleetSpec::from_args(args)?;
                    fleet::run(&backend, &spec, nodes, clients, duration).await?
                } else {
                    workload(&backend, *w, nodes, clients, duration).await?
                };
                progress(args, &r);
                results.push(r);
            }
            finish(args, results)
        }
        Some(Probe::Fill { count, offset }) => {
            backend.connect().await?;
            let r = fill(Arc::new(backend), nodes, clients, offset, count).await;
            progress(args, &r);
            finish(args, vec![r])
        }
        Some(Probe::Leader) => {
            print_probe(args, "leader", backend.leader().await?);
            Ok(())
        }
        Some(Probe::Index) => {
            print_probe(args, "index", backend.index().await?);
            Ok(())
        }
        Some(Probe::Ready {
            min_index,
            since_unix_ms,
            with_leader,
            wait_secs,
        }) => {
            let start = since(since_unix_ms);
            backend
                .ready(min_index, with_leader, Duration::from_secs(wait_secs))
                .await?;
            print_probe(args, "ready_ms", format!("{:.1}", elapsed_ms(start)));
            Ok(())
        }
        Some(Probe::Failover {
            kill_pid,
            wait_secs,
        }) => {
            backend.failover_prepare().await?;
            kill9(kill_pid)?;
            let t0 = Instant::now();
            let ms = first_success(t0, Duration::from_secs(wait_secs), |n| {
                backend.failover_write(n)
            })
            .await?;
            backend.failover_cleanup().await;
            print_probe(args, "failover_ms", format!("{ms:.1}"));
            Ok(())
        }
    }
}

/// One workload run: seeds what `w` needs, runs `clients` clients for
/// `duration` (client `c` sends its `i`-th request to node
/// `(c + i) mod nodes`, the `nodes` targets), removes what it wrote.
async fn workload<B: Backend>(
    backend: &Arc<B>,
    w: Workload,
    nodes: usize,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<WorkloadReport> {
    backend.check(w)?;
    if w.reads_lookup() {
        backend.seed_lookup().await?;
    }
    let hb = w.heartbeat_instances();
    let heartbeats = Arc::new(if hb > 0 {
        backend.seed_heartbeats(clients, hb).await?
    } else {
        B::Heartbeats::default()
    });
    let (rec, elapsed) = {
        let (backend, heartbeats) = (backend.clone(), heartbeats.clone());
        drive(clients, duration, move |c, deadline| {
            let (backend, heartbeats) = (backend.clone(), heartbeats.clone());
            async move {
                let mut client = backend.client(c, &heartbeats);
                let mut rec = Recorder::default();
                let mut i = 0u64;
                while Instant::now() < deadline {
                    let req = Request {
                        op: w.op(i),
                        node: (c + i as usize) % nodes,
                        client: c,
                        i,
                        heartbeat_instances: hb,
                    };
                    let t = Instant::now();
                    let outcome = backend.op(&mut client, req).await;
                    rec.record(t, outcome);
                    i += 1;
                }
                rec
            }
        })
        .await
    };
    backend.cleanup(w, clients, &heartbeats).await;
    Ok(rec.report(w.name(), clients, elapsed))
}

/// Registers fill instances `offset..offset+count` with `clients` in
/// parallel, instance `k` through node `(c + k) mod nodes`.
async fn fill<B: Backend>(
    backend: Arc<B>,
    nodes: usize,
    clients: usize,
    offset: u64,
    count: u64,
) -> WorkloadReport {
    let before = backend.node_counters().await;
    let init = {
        let backend = backend.clone();
        move |c| backend.client(c, &B::Heartbeats::default())
    };
    let counters = backend.clone();
    let (rec, elapsed) = drive_numbered(
        clients,
        offset..offset + count,
        init,
        move |mut client, c, k| {
            let backend = backend.clone();
            async move {
                let node = (c + k as usize) % nodes;
                let outcome = backend.fill(&mut client, node, &FillInstance::new(k)).await;
                (client, outcome)
            }
        },
    )
    .await;
    let mut report = rec.report("fill", clients, elapsed);
    let after = counters.node_counters().await;
    report.leader_changes = before
        .zip(after)
        .map(|(b, a)| a.leader_changes.saturating_sub(b.leader_changes));
    report
}

/// Prints a workload's report (a line, or nothing with `--json`: the whole
/// report is printed at the end).
fn progress(args: &BenchArgs, r: &WorkloadReport) {
    if !args.json {
        println!("{}", r.line());
    }
}

/// Prints the result of a probe: the bare value, or `{"key": value}` with `--json`.
fn print_probe<T: Serialize + std::fmt::Display>(args: &BenchArgs, key: &str, value: T) {
    if args.json {
        println!("{}", serde_json::json!({ key: value }));
    } else {
        println!("{value}");
    }
}

/// The finished report: JSON with `--json`, else nothing more (each line was
/// printed as its workload ended).
fn finish(args: &BenchArgs, results: Vec<WorkloadReport>) -> anyhow::Result<()> {
    if args.json {
        let report = Report {
            backend: args.backend,
            targets: args.targets.clone(),
            clients: args.clients,
            results,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}

/// The moment `ready` counts from.
fn since(since_unix_ms: Option<u64>) -> (Instant, f64) {
    let now = Instant::now();
    let offset_ms = match since_unix_ms {
        None => 0.0,
        Some(t) => {
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64() * 1e3)
                .unwrap_or(0.0);
            (now_ms - t as f64).max(0.0)
        }
    };
    (now, offset_ms)
}

/// Milliseconds since the start that [`since`] returned.
fn elapsed_ms(start: (Instant, f64)) -> f64 {
    start.0.elapsed().as_secs_f64() * 1e3 + start.1
}

/// How often [`first_success`] starts another attempt.
const ATTEMPT_EVERY: Duration = Duration::from_millis(10);
/// Most attempts [`first_success`] keeps in flight.
const MAX_ATTEMPTS_IN_FLIGHT: usize = 256;

/// Starts `attempt(n)` every [`ATTEMPT_EVERY`] (each in its own task, with
/// its own timeout) until one succeeds; returns the milliseconds from `t0`
/// to that success. Overlapping attempts measure when a write first became
/// possible, whatever a single attempt's timeout (a write sent to an etcd
/// follower while there is no leader waits until its timeout even after a
/// new leader is elected).
async fn first_success<F, Fut>(t0: Instant, wait: Duration, mut attempt: F) -> anyhow::Result<f64>
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(ATTEMPT_EVERY);
    let mut n = 0;
    let mut last = String::from("no attempt finished");
    loop {
        tokio::select! {
            _ = tick.tick() => {
                anyhow::ensure!(t0.elapsed() < wait, "no write succeeded within {wait:?}: {last}");
                if tasks.len() < MAX_ATTEMPTS_IN_FLIGHT {
                    tasks.spawn(attempt(n));
                    n += 1;
                }
            }
            Some(done) = tasks.join_next() => match done {
                Ok(Ok(())) => return Ok(t0.elapsed().as_secs_f64() * 1e3),
                Ok(Err(e)) => last = format!("{e:#}"),
                Err(e) => last = format!("attempt failed: {e}"),
            },
        }
    }
}

/// `kill -9 pid`; returns once the signal is sent.
fn kill9(pid: u32) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -9 {pid} failed");
    Ok(())
}
