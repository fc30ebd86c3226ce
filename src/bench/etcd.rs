//! The etcd backend (cargo feature `etcd`): the same workloads and probes
//! against an etcd cluster, over its gRPC API with the `etcd-client` crate,
//! modelled the way an etcd-based registry stores services: one key
//! `services/{name}/{instance_id}` per instance holding the instance's JSON,
//! attached to a lease of the instance's TTL.
//!
//! | workload | etcd operations |
//! |---|---|
//! | register | `LeaseGrant(60)` + `Put` with the lease |
//! | heartbeat, heartbeat-cold | `LeaseKeepAlive` on the client's lease (etcd renews a lease the same way whatever its age) |
//! | lookup | serializable `Range` over `services/bench-lookup/` |
//! | consistent-lookup | linearizable `Range` over the same prefix |
//! | list | serializable keys-only `Range` over `services/` |
//! | mixed | 80% lookup, 15% heartbeat, 5% register |
//!
//! Each endpoint gets `--etcd-conns` gRPC connections (HTTP/2, multiplexed)
//! shared by the clients; a client's `i`-th unary request goes to endpoint
//! `(client + i) mod endpoints`, its keepalive stream stays on endpoint
//! `client mod endpoints`. Leases granted by `register` are left to expire
//! (their keys are deleted after the run).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, ConnectOptions, DeleteOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions,
};

use super::{
    drive, elapsed_ms, finish, first_success, kill9, print_probe, progress, since, BenchArgs, Op,
    Probe, Recorder, Workload, WorkloadReport, FILL_SERVICES,
};

/// How long seeding and the probes retry before giving up.
const SEED_WAIT: Duration = Duration::from_secs(30);

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let clients = args.clients as usize;
    match args.probe.clone() {
        None => {
            let bench = Arc::new(Bench::connect(&args.targets, args.etcd_conns, timeout).await?);
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
            let bench = Arc::new(Bench::connect(&args.targets, args.etcd_conns, timeout).await?);
            let r = bench.fill(clients, offset, count).await;
            progress(&args, &r);
            finish(&args, vec![r])
        }
        Some(Probe::Leader) => {
            print_probe(&args, "leader", leader(&args.targets, timeout).await?);
            Ok(())
        }
        Some(Probe::Index) => {
            print_probe(&args, "index", index(&args.targets, timeout).await?);
            Ok(())
        }
        Some(Probe::Ready {
            min_index,
            since_unix_ms,
            with_leader,
            wait_secs,
        }) => {
            let start = since(since_unix_ms);
            ready(
                &args.targets[0],
                min_index,
                with_leader,
                timeout,
                Duration::from_secs(wait_secs),
            )
            .await?;
            print_probe(&args, "ready_ms", format!("{:.1}", elapsed_ms(start)));
            Ok(())
        }
        Some(Probe::Failover {
            kill_pid,
            wait_secs,
        }) => {
            let ms = failover(
                &args.targets,
                kill_pid,
                timeout,
                Duration::from_secs(wait_secs),
            )
            .await?;
            print_probe(&args, "failover_ms", format!("{ms:.1}"));
            Ok(())
        }
    }
}

/// A client of one endpoint, with per-request and connect timeouts.
async fn connect_one(endpoint: &str, timeout: Duration) -> anyhow::Result<Client> {
    let opts = ConnectOptions::new()
        .with_timeout(timeout)
        .with_connect_timeout(timeout);
    Client::connect([endpoint], Some(opts))
        .await
        .map_err(|e| anyhow::anyhow!("connect {endpoint}: {e}"))
}

/// The value stored for an instance: the same JSON as the registry stores.
fn instance_json(
    service: &str,
    id: &str,
    host: &str,
    port: u64,
    ttl: u64,
    metadata: &str,
) -> String {
    format!(
        r#"{{"service_name":"{service}","instance_id":"{id}","host":"{host}","port":{port},"health_endpoint":"/health","metadata":{{{metadata}}},"ttl_seconds":{ttl},"registered_at":"2026-01-01T00:00:00.000Z","last_heartbeat":"2026-01-01T00:00:00.000Z"}}"#
    )
}

struct Bench {
    /// `conns[endpoint][k]`: the connections to each endpoint.
    conns: Vec<Vec<Client>>,
}

impl Bench {
    async fn connect(
        targets: &[String],
        per_endpoint: usize,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut conns = Vec::new();
        for t in targets {
            let mut these = Vec::new();
            for _ in 0..per_endpoint.max(1) {
                these.push(connect_one(t, timeout).await?);
            }
            conns.push(these);
        }
        Ok(Self { conns })
    }

    /// Client `c`'s connection to endpoint `e`.
    fn conn(&self, e: usize, c: usize) -> Client {
        let these = &self.conns[e % self.conns.len()];
        these[c % these.len()].clone()
    }

    async fn workload(
        self: &Arc<Self>,
        w: Workload,
        clients: usize,
        duration: Duration,
    ) -> anyhow::Result<WorkloadReport> {
        anyhow::ensure!(
            w != Workload::Get,
            "the get workload is for HTTP targets only"
        );
        if w.reads_lookup() {
            self.seed_lookup().await?;
        }
        // etcd renews a lease the same way whatever its age: one lease per
        // client serves heartbeat-cold too.
        let leases = if w.heartbeat_instances() > 0 {
            self.seed_heartbeats(clients).await?
        } else {
            Vec::new()
        };
        let leases = Arc::new(leases);
        let me = self.clone();
        let (rec, elapsed) = {
            let leases = leases.clone();
            drive(clients, duration, move |c, deadline| {
                let (me, leases) = (me.clone(), leases.clone());
                async move { me.client(w, c, leases.get(c).copied(), deadline).await }
            })
            .await
        };
        self.cleanup(w, &leases).await;
        Ok(rec.report(w.name(), clients, elapsed))
    }

    async fn client(
        &self,
        w: Workload,
        c: usize,
        lease: Option<i64>,
        deadline: Instant,
    ) -> Recorder {
        let mut rec = Recorder::default();
        let mut keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)> = None;
        let mut i = 0u64;
        while Instant::now() < deadline {
            let t = Instant::now();
            let outcome = match w.op(i) {
                Op::Heartbeat => match lease {
                    Some(id) => self.keep_alive(&mut keeper, c, id).await,
                    None => Err(anyhow::anyhow!("no lease to keep alive")),
                },
                op => {
                    let conn = self.conn(c + i as usize, c);
                    unary(conn, op, c, i).await
                }
            };
            rec.record(t, outcome);
            i += 1;
        }
        rec
    }

    /// One keepalive on client `c`'s stream (opened on first use, on
    /// endpoint `c mod endpoints`, and again after an error).
    async fn keep_alive(
        &self,
        keeper: &mut Option<(LeaseKeeper, LeaseKeepAliveStream)>,
        c: usize,
        id: i64,
    ) -> anyhow::Result<()> {
        if keeper.is_none() {
            let mut conn = self.conn(c, c);
            *keeper = Some(conn.lease_keep_alive(id).await?);
        }
        let (k, stream) = keeper.as_mut().expect("opened above");
        let result = async {
            k.keep_alive().await?;
            match stream.message().await? {
                Some(r) if r.ttl() > 0 => Ok(()),
                Some(_) => Err(anyhow::anyhow!("lease {id:x} expired")),
                None => Err(anyhow::anyhow!("keepalive stream closed")),
            }
        }
        .await;
        if result.is_err() {
            *keeper = None;
        }
        result
    }

    /// Puts `services/bench-lookup/lookup-1` and waits until every endpoint
    /// serves it.
    async fn seed_lookup(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + SEED_WAIT;
        let value = instance_json("bench-lookup", "lookup-1", "127.0.0.1", 1, 60, "");
        retry("putting bench-lookup", deadline, || {
            let (mut conn, value) = (self.conn(0, 0), value.clone());
            async move {
                let lease = conn.lease_grant(60, None).await?.id();
                conn.put(
                    "services/bench-lookup/lookup-1",
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await?;
                Ok(())
            }
        })
        .await?;
        for e in 0..self.conns.len() {
            retry("reading bench-lookup from every endpoint", deadline, || {
                let mut conn = self.conn(e, 0);
                async move {
                    let opts = GetOptions::new().with_prefix().with_serializable();
                    let r = conn.get("services/bench-lookup/", Some(opts)).await?;
                    anyhow::ensure!(!r.kvs().is_empty(), "not there yet");
                    Ok(())
                }
            })
            .await?;
        }
        Ok(())
    }

    /// Grants each client a lease (TTL 60 s) with an instance key on it.
    async fn seed_heartbeats(&self, clients: usize) -> anyhow::Result<Vec<i64>> {
        let deadline = Instant::now() + SEED_WAIT;
        let mut leases = Vec::with_capacity(clients);
        for c in 0..clients {
            let id = format!("hb-{c}-0");
            let value = instance_json("bench-heartbeat", &id, "127.0.0.1", 1, 60, "");
            let key = format!("services/bench-heartbeat/{id}");
            let lease = retry("granting the heartbeat leases", deadline, || {
                let (mut conn, key, value) = (self.conn(c, c), key.clone(), value.clone());
                async move {
                    let lease = conn.lease_grant(60, None).await?.id();
                    conn.put(key, value, Some(PutOptions::new().with_lease(lease)))
                        .await?;
                    Ok(lease)
                }
            })
            .await?;
            leases.push(lease);
        }
        Ok(leases)
    }

    /// Deletes the workload's keys and revokes the heartbeat leases (errors
    /// only warned about).
    async fn cleanup(&self, w: Workload, leases: &[i64]) {
        let mut conn = self.conn(0, 0);
        let mut prefixes = Vec::new();
        if w.reads_lookup() {
            prefixes.push("services/bench-lookup/");
        }
        if w.heartbeat_instances() > 0 {
            prefixes.push("services/bench-heartbeat/");
        }
        if matches!(w, Workload::Register | Workload::Mixed) {
            prefixes.push("services/bench-register-");
        }
        for p in prefixes {
            if let Err(e) = conn
                .delete(p, Some(DeleteOptions::new().with_prefix()))
                .await
            {
                eprintln!("bench: cleaning up {p}: {e}");
            }
        }
        for id in leases {
            if let Err(e) = conn.lease_revoke(*id).await {
                eprintln!("bench: revoking lease {id:x}: {e}");
            }
        }
    }

    /// Registers instances `offset..offset+count` (lease of a day + put),
    /// with `clients` in parallel.
    async fn fill(self: &Arc<Self>, clients: usize, offset: u64, count: u64) -> WorkloadReport {
        let next = Arc::new(AtomicU64::new(offset));
        let end = offset + count;
        let me = self.clone();
        let (rec, elapsed) = drive(clients, Duration::from_secs(86_400), move |c, _| {
            let (me, next) = (me.clone(), next.clone());
            async move {
                let mut rec = Recorder::default();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= end {
                        return rec;
                    }
                    let service = format!("bench-fill-{}", k % FILL_SERVICES);
                    let id = format!("f-{k}");
                    let host = format!("10.0.{}.{}", (k / 256) % 256, k % 256);
                    let metadata = format!(r#""zone":"z{}","version":"1.0.{}""#, k % 3, k % 10);
                    let value =
                        instance_json(&service, &id, &host, 1 + k % 60_000, 86_400, &metadata);
                    let key = format!("services/{service}/{id}");
                    let t = Instant::now();
                    let mut outcome = Err(anyhow::anyhow!("not tried"));
                    for _ in 0..10 {
                        let mut conn = me.conn(c + k as usize, c);
                        outcome = async {
                            let lease = conn.lease_grant(86_400, None).await?.id();
                            conn.put(
                                key.clone(),
                                value.clone(),
                                Some(PutOptions::new().with_lease(lease)),
                            )
                            .await?;
                            anyhow::Ok(())
                        }
                        .await;
                        if outcome.is_ok() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    rec.record(t, outcome);
                }
            }
        })
        .await;
        rec.report("fill", clients, elapsed)
    }
}

/// One unary request of a workload.
async fn unary(mut conn: Client, op: Op, c: usize, i: u64) -> anyhow::Result<()> {
    match op {
        Op::Register => {
            let id = format!("r-{i}");
            let service = format!("bench-register-{c}");
            let value = instance_json(&service, &id, "127.0.0.1", 1 + i % 60_000, 60, "");
            let lease = conn.lease_grant(60, None).await?.id();
            conn.put(
                format!("services/{service}/{id}"),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        }
        Op::Lookup | Op::ConsistentLookup => {
            let mut opts = GetOptions::new().with_prefix();
            if op == Op::Lookup {
                opts = opts.with_serializable();
            }
            let r = conn.get("services/bench-lookup/", Some(opts)).await?;
            anyhow::ensure!(!r.kvs().is_empty(), "bench-lookup not found");
        }
        Op::List => {
            let opts = GetOptions::new()
                .with_prefix()
                .with_keys_only()
                .with_serializable();
            conn.get("services/", Some(opts)).await?;
        }
        Op::Heartbeat | Op::Get => anyhow::bail!("{op:?} is not a unary etcd request"),
    }
    Ok(())
}

/// Retries `f` 50 ms apart until it succeeds or `deadline` passes.
async fn retry<T, F, Fut>(what: &str, deadline: Instant, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => anyhow::bail!("{what}: {e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// The endpoint whose member is the leader.
async fn leader(targets: &[String], timeout: Duration) -> anyhow::Result<String> {
    let deadline = Instant::now() + SEED_WAIT;
    retry("finding the leader", deadline, || async {
        for t in targets {
            let Ok(mut conn) = connect_one(t, timeout).await else {
                continue;
            };
            if let Ok(s) = conn.status().await {
                if s.header().map(|h| h.member_id()) == Some(s.leader()) {
                    return Ok(t.clone());
                }
            }
        }
        anyhow::bail!("no endpoint is the leader")
    })
    .await
}

/// The highest revision among the endpoints' serializable reads.
async fn index(targets: &[String], timeout: Duration) -> anyhow::Result<u64> {
    let mut best = None;
    for t in targets {
        let Ok(mut conn) = connect_one(t, timeout).await else {
            continue;
        };
        let opts = GetOptions::new().with_serializable();
        if let Ok(r) = conn.get("bench/none", Some(opts)).await {
            best = best.max(r.header().map(|h| h.revision() as u64));
        }
    }
    best.ok_or_else(|| anyhow::anyhow!("no endpoint answered a read"))
}

/// Waits until `target` answers a serializable read at revision
/// `min_index` or later (and, `with_leader`, knows a leader).
async fn ready(
    target: &str,
    min_index: u64,
    with_leader: bool,
    timeout: Duration,
    wait: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + wait;
    let mut conn: Option<Client> = None;
    let mut last = String::from("no answer yet");
    loop {
        if conn.is_none() {
            match connect_one(target, timeout).await {
                Ok(c) => conn = Some(c),
                Err(e) => last = format!("{e:#}"),
            }
        }
        if let Some(c) = &mut conn {
            let opts = GetOptions::new().with_serializable();
            match c.get("bench/none", Some(opts)).await {
                Ok(r) => {
                    let rev = r.header().map(|h| h.revision() as u64).unwrap_or(0);
                    if rev < min_index {
                        last = format!("revision {rev} < {min_index}");
                    } else if !with_leader {
                        return Ok(());
                    } else {
                        match c.status().await {
                            Ok(s) if s.leader() != 0 => return Ok(()),
                            Ok(_) => last = "no leader known".to_owned(),
                            Err(e) => last = format!("status: {e}"),
                        }
                    }
                }
                Err(e) => last = format!("{e}"),
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{target} not ready after {wait:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Kills `pid`, then puts through the targets in turn, a new attempt every
/// 10 ms, until one succeeds; the milliseconds from the kill to that answer.
async fn failover(
    targets: &[String],
    pid: u32,
    timeout: Duration,
    wait: Duration,
) -> anyhow::Result<f64> {
    let mut conns = Vec::new();
    for t in targets {
        let mut c = connect_one(t, timeout).await?;
        // Open the connections first: the clock is for the cluster.
        let _ = c.status().await;
        conns.push(c);
    }
    kill9(pid)?;
    let t0 = Instant::now();
    first_success(t0, wait, |n| {
        let mut conn = conns[n % conns.len()].clone();
        async move {
            conn.put("bench/failover", "x", None).await?;
            Ok(())
        }
    })
    .await
}
