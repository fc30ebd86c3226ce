//! The etcd backend (cargo feature `etcd`): [`Backend`] for the same
//! workloads and probes against an etcd cluster, over its gRPC API with the
//! `etcd-client` crate, modelled the way an etcd-based registry stores
//! services: one key `services/{name}/{instance_id}` per instance holding
//! the instance's JSON, attached to a lease of the instance's TTL.
//!
//! | workload | etcd operations |
//! |---|---|
//! | register | `LeaseGrant(60)` + `Put` with the lease |
//! | heartbeat, heartbeat-cold | `LeaseKeepAlive` on the client's lease (etcd renews a lease the same way whatever its age) |
//! | lookup | serializable `Range` over `services/bench-lookup/` |
//! | consistent-lookup | linearizable `Range` over the same prefix |
//! | list | serializable keys-only `Range` over `services/` |
//! | mixed | 80% lookup, 15% heartbeat, 5% register |
//! | fleet | per instance: `LeaseGrant(TTL)` + `Put` with the lease, then one `LeaseKeepAlive` per heartbeat on the instance's own stream |
//!
//! `fleet` keeps one keepalive stream per instance (10,000 instances: 10,000
//! gRPC streams over the shared connections): `etcd-client`'s `LeaseKeeper`
//! renews the one lease it was opened for, so streams cannot be pooled
//! across leases. Instance `k`'s stream is on endpoint `k mod endpoints`
//! (a stream stays on its connection), opened when the instance is
//! registered and again after an error; its heartbeats go there whatever
//! node the schedule names.
//!
//! Each endpoint gets `--etcd-conns` gRPC connections (HTTP/2, multiplexed)
//! shared by the clients; a client's `i`-th unary request goes to endpoint
//! `(client + i) mod endpoints`, its keepalive stream stays on endpoint
//! `client mod endpoints`. Leases granted by `register` are left to expire
//! (their keys are deleted after the run).

use std::future::Future;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, ConnectOptions, DeleteOptions, GetOptions, LeaseKeepAliveStream, LeaseKeeper,
    PutOptions,
};

use super::backend::{Backend, FillInstance, FleetSpec, NodeCounters, Request, FILL_TTL_SECONDS};
use super::driver::SEED_WAIT;
use super::http::{Answer, Conn, Target};
use super::{BenchArgs, Op, Workload};

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

pub struct Etcd {
    targets: Vec<String>,
    timeout: Duration,
    /// `--etcd-conns`.
    per_endpoint: usize,
    /// `conns[endpoint][k]`: the connections to each endpoint (after
    /// [`Backend::connect`]).
    conns: Vec<Vec<Client>>,
    /// One connection per target for the failover probe's writes (after
    /// [`Backend::failover_prepare`]).
    failover_conns: Vec<Client>,
}

/// A client's lease (if the workload seeded heartbeats) and its keepalive
/// stream (opened on first use).
pub struct EtcdClient {
    /// The client's number: its connection to an endpoint is `c mod
    /// --etcd-conns`.
    c: usize,
    lease: Option<i64>,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl Etcd {
    /// Client `c`'s connection to endpoint `e`.
    fn conn(&self, e: usize, c: usize) -> Client {
        let these = &self.conns[e % self.conns.len()];
        these[c % these.len()].clone()
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
}

/// The `fleet` workload's state: its spec and each instance's lease (0
/// until granted) and keepalive stream.
pub struct EtcdFleet {
    spec: FleetSpec,
    slots: Vec<tokio::sync::Mutex<FleetSlot>>,
}

#[derive(Default)]
struct FleetSlot {
    lease: i64,
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl Backend for Etcd {
    type Client = EtcdClient;
    type Fleet = EtcdFleet;
    /// Client `c`'s lease is `leases[c]`.
    type Heartbeats = Vec<i64>;

    fn new(args: &BenchArgs) -> anyhow::Result<Self> {
        Ok(Self {
            targets: args.targets.clone(),
            timeout: Duration::from_millis(args.timeout_ms),
            per_endpoint: args.etcd_conns,
            conns: Vec::new(),
            failover_conns: Vec::new(),
        })
    }

    /// `--etcd-conns` connections to each endpoint.
    async fn connect(&mut self) -> anyhow::Result<()> {
        let mut conns = Vec::new();
        for t in &self.targets {
            let mut these = Vec::new();
            for _ in 0..self.per_endpoint.max(1) {
                these.push(connect_one(t, self.timeout).await?);
            }
            conns.push(these);
        }
        self.conns = conns;
        Ok(())
    }

    fn check(&self, w: Workload) -> anyhow::Result<()> {
        anyhow::ensure!(
            w != Workload::Get,
            "the get workload is for HTTP targets only"
        );
        Ok(())
    }

    fn client(&self, c: usize, leases: &Vec<i64>) -> EtcdClient {
        EtcdClient {
            c,
            lease: leases.get(c).copied(),
            keeper: None,
        }
    }

    /// A heartbeat is a keepalive on the client's own stream; every other
    /// operation a unary request to the request's node.
    async fn op(&self, client: &mut EtcdClient, req: Request) -> anyhow::Result<()> {
        let c = req.client;
        match req.op {
            Op::Heartbeat => match client.lease {
                Some(id) => self.keep_alive(&mut client.keeper, c, id).await,
                None => Err(anyhow::anyhow!("no lease to keep alive")),
            },
            op => unary(self.conn(req.node, c), op, c, req.i).await,
        }
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
    /// etcd renews a lease the same way whatever its age: one lease per
    /// client serves heartbeat-cold too, whatever `per_client`.
    async fn seed_heartbeats(
        &self,
        clients: usize,
        _per_client: usize,
    ) -> anyhow::Result<Vec<i64>> {
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

    /// Deletes the run's keys and revokes the heartbeat leases.
    async fn cleanup(&self, w: Workload, _clients: usize, leases: &Vec<i64>) {
        let mut conn = self.conn(0, 0);
        let mut prefixes: Vec<String> = w
            .seeded_services()
            .into_iter()
            .map(|s| format!("services/{s}/"))
            .collect();
        if w.registers() {
            prefixes.push("services/bench-register-".to_owned());
        }
        for p in prefixes {
            if let Err(e) = conn
                .delete(p.as_str(), Some(DeleteOptions::new().with_prefix()))
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

    /// Lease of a day + put, at most 10 tries, 50 ms apart.
    async fn fill(
        &self,
        client: &mut EtcdClient,
        node: usize,
        f: &FillInstance,
    ) -> anyhow::Result<()> {
        let metadata = format!(r#""zone":"{}","version":"{}""#, f.zone, f.version);
        let value = instance_json(
            &f.service,
            &f.id,
            &f.host,
            f.port,
            FILL_TTL_SECONDS,
            &metadata,
        );
        let key = format!("services/{}/{}", f.service, f.id);
        let mut outcome = Err(anyhow::anyhow!("not tried"));
        for _ in 0..10 {
            let mut conn = self.conn(node, client.c);
            outcome = async {
                let lease = conn.lease_grant(FILL_TTL_SECONDS as i64, None).await?.id();
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
        outcome
    }

    fn fleet_new(&self, spec: &FleetSpec) -> EtcdFleet {
        EtcdFleet {
            spec: spec.clone(),
            slots: (0..spec.instances).map(|_| Default::default()).collect(),
        }
    }

    /// Lease grant (the fleet's TTL) + put through `node`, then a first
    /// keepalive, which opens the instance's stream; at most 10 tries, 50
    /// ms apart.
    async fn fleet_register(&self, fleet: &EtcdFleet, k: u64, node: usize) -> anyhow::Result<()> {
        let (service, id) = (fleet.spec.service(k), FleetSpec::id(k));
        let host = format!("10.1.{}.{}", (k / 256) % 256, k % 256);
        let ttl = fleet.spec.ttl_seconds;
        let value = instance_json(&service, &id, &host, 1 + k % 60_000, ttl, "");
        let key = format!("services/{service}/{id}");
        let mut slot = fleet.slots[k as usize].lock().await;
        let mut outcome = Err(anyhow::anyhow!("not tried"));
        for _ in 0..10 {
            outcome = async {
                if slot.lease == 0 {
                    let mut conn = self.conn(node, k as usize);
                    let lease = conn.lease_grant(ttl as i64, None).await?.id();
                    conn.put(
                        key.clone(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await?;
                    slot.lease = lease;
                }
                let lease = slot.lease;
                self.keep_alive(&mut slot.keeper, k as usize, lease).await
            }
            .await;
            if outcome.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        outcome
    }

    /// One keepalive on the instance's stream, within the request timeout
    /// (the stream is reopened after a timeout, as after an error).
    async fn fleet_heartbeat(&self, fleet: &EtcdFleet, k: u64, _node: usize) -> anyhow::Result<()> {
        let mut slot = fleet.slots[k as usize].lock().await;
        let FleetSlot { lease, keeper } = &mut *slot;
        anyhow::ensure!(*lease != 0, "instance {k} has no lease");
        match tokio::time::timeout(self.timeout, self.keep_alive(keeper, k as usize, *lease)).await
        {
            Ok(outcome) => outcome,
            Err(_) => {
                *keeper = None;
                anyhow::bail!("no keepalive answer within {:?}", self.timeout)
            }
        }
    }

    /// A linearizable count of the keys under `services/bench-fleet-`.
    async fn fleet_count(&self, _fleet: &EtcdFleet) -> anyhow::Result<u64> {
        let opts = GetOptions::new().with_prefix().with_count_only();
        let r = self
            .conn(0, 0)
            .get("services/bench-fleet-", Some(opts))
            .await?;
        Ok(r.count().max(0) as u64)
    }

    /// Closes the keepalive streams, deletes the keys, revokes the leases
    /// (32 at a time).
    async fn fleet_cleanup(&self, fleet: &EtcdFleet) {
        let mut leases = Vec::new();
        for slot in &fleet.slots {
            let mut slot = slot.lock().await;
            slot.keeper = None;
            if slot.lease != 0 {
                leases.push(slot.lease);
            }
        }
        let p = "services/bench-fleet-";
        if let Err(e) = self
            .conn(0, 0)
            .delete(p, Some(DeleteOptions::new().with_prefix()))
            .await
        {
            eprintln!("bench: cleaning up {p}: {e}");
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (i, chunk) in leases.chunks(leases.len().div_ceil(32).max(1)).enumerate() {
            let (mut conn, chunk) = (self.conn(i, i), chunk.to_vec());
            tasks.spawn(async move {
                for id in chunk {
                    if let Err(e) = conn.lease_revoke(id).await {
                        eprintln!("bench: revoking lease {id:x}: {e}");
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// `etcd_server_leader_changes_seen_total` and the CPU time of every
    /// target's `/metrics` (served on the client URL).
    async fn node_counters(&self) -> Option<NodeCounters> {
        let mut sum = NodeCounters::ZERO;
        for t in &self.targets {
            let mut conn = Conn::new(Target::parse(t).ok()?, None, self.timeout);
            let a = conn.get("/metrics").await.and_then(Answer::ok).ok()?;
            let body = String::from_utf8_lossy(&a.body);
            sum = sum.add(&body, "etcd_server_leader_changes_seen_total")?;
        }
        Some(sum)
    }

    /// The endpoint whose member is the leader.
    async fn leader(&self) -> anyhow::Result<String> {
        let deadline = Instant::now() + SEED_WAIT;
        retry("finding the leader", deadline, || async {
            for t in &self.targets {
                let Ok(mut conn) = connect_one(t, self.timeout).await else {
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
    async fn index(&self) -> anyhow::Result<u64> {
        let mut best = None;
        for t in &self.targets {
            let Ok(mut conn) = connect_one(t, self.timeout).await else {
                continue;
            };
            let opts = GetOptions::new().with_serializable();
            if let Ok(r) = conn.get("bench/none", Some(opts)).await {
                best = best.max(r.header().map(|h| h.revision() as u64));
            }
        }
        best.ok_or_else(|| anyhow::anyhow!("no endpoint answered a read"))
    }

    /// A serializable read's revision, then (`with_leader`) a status that
    /// names a leader; connects (again) until the endpoint answers.
    async fn ready(&self, min_index: u64, with_leader: bool, wait: Duration) -> anyhow::Result<()> {
        let target = &self.targets[0];
        let deadline = Instant::now() + wait;
        let mut conn: Option<Client> = None;
        let mut last = String::from("no answer yet");
        loop {
            if conn.is_none() {
                match connect_one(target, self.timeout).await {
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

    /// Connects to every target and opens the connection with a status
    /// request: the clock is for the cluster.
    async fn failover_prepare(&mut self) -> anyhow::Result<()> {
        let mut conns = Vec::new();
        for t in &self.targets {
            let mut c = connect_one(t, self.timeout).await?;
            let _ = c.status().await;
            conns.push(c);
        }
        self.failover_conns = conns;
        Ok(())
    }

    /// Puts `bench/failover` (the key stays: the next round overwrites it).
    fn failover_write(
        &self,
        n: usize,
    ) -> impl Future<Output = anyhow::Result<()>> + Send + 'static {
        let mut conn = self.failover_conns[n % self.failover_conns.len()].clone();
        async move {
            conn.put("bench/failover", "x", None).await?;
            Ok(())
        }
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
    Fut: Future<Output = anyhow::Result<T>>,
{
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => anyhow::bail!("{what}: {e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
