//! The registry backend: the workloads and probes over this project's HTTP
//! API, through [`http::Conn`](super::http::Conn).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::Method;

use super::http::{Answer, Conn, Target};
use super::{
    drive, elapsed_ms, finish, first_success, kill9, print_probe, progress, since, BenchArgs, Op,
    Probe, Recorder, Workload, WorkloadReport, FILL_SERVICES,
};
use crate::registry::lease::ACK_SLACK_MS;

/// How long seeding and the probes retry before giving up.
const SEED_WAIT: Duration = Duration::from_secs(30);

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let targets = args
        .targets
        .iter()
        .map(|u| Target::parse(u))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bench = Arc::new(Bench {
        targets,
        token: args.token.as_ref().map(|t| t.expose().to_owned()),
        timeout: Duration::from_millis(args.timeout_ms),
    });
    let clients = args.clients as usize;
    match args.probe.clone() {
        None => {
            let duration = Duration::from_secs_f64(args.seconds.max(0.0));
            let mut results = Vec::new();
            for w in &args.workloads {
                let r = bench.workload(*w, clients, duration).await?;
                progress(&args, &r);
                results.push(r);
            }
            finish(&args, results)
        }
        Some(Probe::Fill { count, offset }) => {
            let r = bench.fill(clients, offset, count).await;
            progress(&args, &r);
            finish(&args, vec![r])
        }
        Some(Probe::Leader) => {
            print_probe(&args, "leader", bench.leader().await?);
            Ok(())
        }
        Some(Probe::Index) => {
            print_probe(&args, "index", bench.index().await?);
            Ok(())
        }
        Some(Probe::Ready {
            min_index,
            since_unix_ms,
            with_leader,
            wait_secs,
        }) => {
            let start = since(since_unix_ms);
            bench
                .ready(min_index, with_leader, Duration::from_secs(wait_secs))
                .await?;
            print_probe(&args, "ready_ms", format!("{:.1}", elapsed_ms(start)));
            Ok(())
        }
        Some(Probe::Failover {
            kill_pid,
            wait_secs,
        }) => {
            let ms = bench
                .failover(kill_pid, Duration::from_secs(wait_secs))
                .await?;
            print_probe(&args, "failover_ms", format!("{ms:.1}"));
            Ok(())
        }
    }
}

struct Bench {
    targets: Vec<Target>,
    token: Option<String>,
    timeout: Duration,
}

impl Bench {
    /// One connection per target (opened on first use).
    fn conns(&self) -> Vec<Conn> {
        self.targets
            .iter()
            .map(|t| Conn::new(t.clone(), self.token.as_deref(), self.timeout))
            .collect()
    }

    async fn workload(
        self: &Arc<Self>,
        w: Workload,
        clients: usize,
        duration: Duration,
    ) -> anyhow::Result<WorkloadReport> {
        if w.reads_lookup() {
            self.seed_lookup().await?;
        }
        let hb = w.heartbeat_instances();
        if hb > 0 {
            self.seed_heartbeats(clients, hb).await?;
            if hb > 1 {
                // Let the registrations' own heartbeats age past the ack slack.
                tokio::time::sleep(Duration::from_millis(ACK_SLACK_MS.unsigned_abs() + 500)).await;
            }
        }
        let me = self.clone();
        let (rec, elapsed) = drive(clients, duration, move |c, deadline| {
            let me = me.clone();
            async move { me.client(w, c, hb, deadline).await }
        })
        .await;
        self.cleanup(w, clients).await;
        Ok(rec.report(w.name(), clients, elapsed))
    }

    async fn client(&self, w: Workload, c: usize, hb: usize, deadline: Instant) -> Recorder {
        let mut conns = self.conns();
        let n = conns.len();
        let mut rec = Recorder::default();
        let mut i = 0u64;
        while Instant::now() < deadline {
            let conn = &mut conns[(c + i as usize) % n];
            let t = Instant::now();
            let outcome = op(conn, w.op(i), c, i, hb).await;
            rec.record(t, outcome);
            i += 1;
        }
        rec
    }

    /// Registers `bench-lookup` and waits until every target serves it.
    async fn seed_lookup(&self) -> anyhow::Result<()> {
        let mut conns = self.conns();
        let body = r#"{"service_name":"bench-lookup","instance_id":"lookup-1","host":"127.0.0.1","port":1}"#;
        let deadline = Instant::now() + SEED_WAIT;
        conns[0]
            .retry(
                Method::POST,
                "/register",
                Some(body.into()),
                usize::MAX,
                deadline,
            )
            .await
            .map_err(|e| anyhow::anyhow!("registering bench-lookup: {e:#}"))?;
        for conn in &mut conns {
            conn.retry(
                Method::GET,
                "/services/bench-lookup",
                None,
                usize::MAX,
                deadline,
            )
            .await
            .map_err(|e| anyhow::anyhow!("reading bench-lookup from every node: {e:#}"))?;
        }
        Ok(())
    }

    /// Registers `per_client` instances `hb-C-K` of `bench-heartbeat` for
    /// every client C, the clients in parallel.
    async fn seed_heartbeats(&self, clients: usize, per_client: usize) -> anyhow::Result<()> {
        let mut tasks = Vec::new();
        for c in 0..clients {
            let mut conns = self.conns();
            tasks.push(tokio::spawn(async move {
                let n = conns.len();
                for k in 0..per_client {
                    let body = format!(
                        r#"{{"service_name":"bench-heartbeat","instance_id":"hb-{c}-{k}","host":"127.0.0.1","port":1}}"#
                    );
                    let conn = &mut conns[(c + k) % n];
                    let deadline = Instant::now() + SEED_WAIT;
                    conn.retry(Method::POST, "/register", Some(body.into()), usize::MAX, deadline)
                        .await
                        .map_err(|e| anyhow::anyhow!("registering the heartbeat instances: {e:#}"))?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        Ok(())
    }

    /// Deregisters what the workload wrote (errors only warned about).
    async fn cleanup(&self, w: Workload, clients: usize) {
        let mut names = Vec::new();
        if w.reads_lookup() {
            names.push("bench-lookup".to_owned());
        }
        if w.heartbeat_instances() > 0 {
            names.push("bench-heartbeat".to_owned());
        }
        if matches!(w, Workload::Register | Workload::Mixed) {
            names.extend((0..clients).map(|c| format!("bench-register-{c}")));
        }
        let mut conns = self.conns();
        for name in names {
            match conns[0].delete(&format!("/deregister/{name}")).await {
                Ok(a) if a.status.is_success() || a.status.as_u16() == 404 => {}
                Ok(a) => eprintln!("bench: cleaning up {name}: {}", a.status),
                Err(e) => eprintln!("bench: cleaning up {name}: {e:#}"),
            }
        }
    }

    /// Registers instances `offset..offset+count` with `clients` in parallel.
    async fn fill(self: &Arc<Self>, clients: usize, offset: u64, count: u64) -> WorkloadReport {
        let next = Arc::new(AtomicU64::new(offset));
        let end = offset + count;
        let me = self.clone();
        let (rec, elapsed) = drive(clients, Duration::from_secs(86_400), move |c, _| {
            let (me, next) = (me.clone(), next.clone());
            async move {
                let mut conns = me.conns();
                let n = conns.len();
                let mut rec = Recorder::default();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= end {
                        return rec;
                    }
                    let body = format!(
                        r#"{{"service_name":"bench-fill-{}","instance_id":"f-{k}","host":"10.0.{}.{}","port":{},"ttl_seconds":86400,"metadata":{{"zone":"z{}","version":"1.0.{}"}}}}"#,
                        k % FILL_SERVICES,
                        (k / 256) % 256,
                        k % 256,
                        1 + k % 60_000,
                        k % 3,
                        k % 10
                    );
                    let conn = &mut conns[(c + k as usize) % n];
                    let t = Instant::now();
                    let deadline = t + SEED_WAIT;
                    let outcome = conn
                        .retry(Method::POST, "/register", Some(body.into()), 10, deadline)
                        .await;
                    rec.record(t, outcome.map(|_| ()));
                }
            }
        })
        .await;
        rec.report("fill", clients, elapsed)
    }

    /// The URL of the target whose `/health` says it is the leader.
    async fn leader(&self) -> anyhow::Result<String> {
        let mut conns = self.conns();
        let deadline = Instant::now() + SEED_WAIT;
        loop {
            for conn in &mut conns {
                // /health answers 503 with the same body on an unhealthy node.
                if let Ok(a) = conn.get("/health").await {
                    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_default();
                    if v["role"] == "leader" {
                        return Ok(conn.target().url.clone());
                    }
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no target is the leader after {SEED_WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The highest `X-Registry-Index` among the targets' reads.
    async fn index(&self) -> anyhow::Result<u64> {
        let mut best = None;
        for conn in &mut self.conns() {
            if let Ok(a) = conn.get("/services").await.and_then(Answer::ok) {
                best = best.max(a.index());
            }
        }
        best.ok_or_else(|| anyhow::anyhow!("no target answered a read with X-Registry-Index"))
    }

    /// Waits until the first target answers a read at `min_index` or later
    /// (and, `with_leader`, says healthy).
    async fn ready(&self, min_index: u64, with_leader: bool, wait: Duration) -> anyhow::Result<()> {
        let mut conn = self.conns().swap_remove(0);
        let deadline = Instant::now() + wait;
        let mut last;
        loop {
            match conn.get("/services").await.and_then(Answer::ok) {
                Ok(a) if a.index().unwrap_or(0) >= min_index => {
                    if !with_leader {
                        return Ok(());
                    }
                    match conn.get("/health").await.and_then(Answer::ok) {
                        Ok(_) => return Ok(()),
                        Err(e) => last = format!("health: {e:#}"),
                    }
                }
                Ok(a) => last = format!("index {:?} < {min_index}", a.index()),
                Err(e) => last = format!("{e:#}"),
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} not ready after {wait:?}: {last}",
                conn.target().url
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Kills `pid`, then writes through the targets in turn, a new attempt
    /// every 10 ms, until one succeeds; the milliseconds from the kill to
    /// that answer.
    async fn failover(&self, pid: u32, wait: Duration) -> anyhow::Result<f64> {
        kill9(pid)?;
        let t0 = Instant::now();
        let body =
            r#"{"service_name":"bench-failover","instance_id":"f","host":"127.0.0.1","port":1}"#;
        let ms = first_success(t0, wait, |n| {
            let mut conn = Conn::new(
                self.targets[n % self.targets.len()].clone(),
                self.token.as_deref(),
                self.timeout,
            );
            async move {
                conn.post("/register", body.to_owned())
                    .await?
                    .ok()
                    .map(|_| ())
            }
        })
        .await?;
        let _ = self.conns()[0].delete("/deregister/bench-failover").await;
        Ok(ms)
    }
}

/// One request of a workload; `Ok` for a 2xx answer.
async fn op(conn: &mut Conn, op: Op, c: usize, i: u64, hb: usize) -> anyhow::Result<()> {
    let answer = match op {
        Op::Register => {
            let body = format!(
                r#"{{"service_name":"bench-register-{c}","instance_id":"r-{i}","host":"127.0.0.1","port":{}}}"#,
                1 + i % 60_000
            );
            conn.post("/register", body).await?
        }
        Op::Heartbeat => {
            let body = format!(
                r#"{{"service_name":"bench-heartbeat","instance_id":"hb-{c}-{}"}}"#,
                i as usize % hb.max(1)
            );
            conn.post("/heartbeat", body).await?
        }
        Op::Lookup => conn.get("/services/bench-lookup").await?,
        Op::ConsistentLookup => conn.get("/services/bench-lookup?consistent=true").await?,
        Op::List => conn.get("/services").await?,
        Op::Get => {
            let path = conn.target().path.clone();
            conn.get(&path).await?
        }
    };
    answer.ok().map(|_| ())
}
