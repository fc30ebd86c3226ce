//! The registry backend: [`Backend`] over this project's HTTP API, through
//! [`http::Conn`](super::http::Conn): each client keeps a keep-alive
//! connection to every node.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use hyper::Method;

use super::backend::{Backend, FillInstance, FleetSpec, NodeCounters, Request, FILL_TTL_SECONDS};
use super::driver::SEED_WAIT;
use super::http::{Answer, Conn, Target};
use super::{BenchArgs, Op, Workload};

/// The instance the failover probe registers.
const FAILOVER_BODY: &str =
    r#"{"service_name":"bench-failover","instance_id":"f","host":"127.0.0.1","port":1}"#;

pub struct Registry {
    targets: Vec<Target>,
    token: Option<String>,
    timeout: Duration,
}

impl Registry {
    /// One connection per target (opened on first use).
    fn conns(&self) -> Vec<Conn> {
        self.targets.iter().map(|t| self.conn(t.clone())).collect()
    }

    fn conn(&self, target: Target) -> Conn {
        Conn::new(target, self.token.as_deref(), self.timeout)
    }

    /// An idle connection to `node` from the fleet's pool, or a new one.
    fn take(&self, fleet: &RegistryFleet, node: usize) -> Conn {
        let idle = fleet.pools[node]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        idle.unwrap_or_else(|| self.conn(self.targets[node].clone()))
    }
}

/// The `fleet` workload's state: its spec and the idle connections to each
/// node (HTTP/1.1 carries one request at a time: as many connections open
/// as heartbeats are outstanding at once, reused afterwards).
pub struct RegistryFleet {
    spec: FleetSpec,
    pools: Vec<Mutex<Vec<Conn>>>,
}

impl RegistryFleet {
    fn put_back(&self, node: usize, conn: Conn) {
        self.pools[node]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }
}

impl Backend for Registry {
    /// A connection to every node.
    type Client = Vec<Conn>;
    type Heartbeats = ();
    type Fleet = RegistryFleet;

    fn new(args: &BenchArgs) -> anyhow::Result<Self> {
        let targets = args
            .targets
            .iter()
            .map(|u| Target::parse(u))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            targets,
            token: args.token.as_ref().map(|t| t.expose().to_owned()),
            timeout: Duration::from_millis(args.timeout_ms),
        })
    }

    fn client(&self, _: usize, _: &()) -> Vec<Conn> {
        self.conns()
    }

    /// `Ok` for a 2xx answer.
    async fn op(&self, conns: &mut Vec<Conn>, req: Request) -> anyhow::Result<()> {
        let Request {
            op,
            node,
            client: c,
            i,
            heartbeat_instances: hb,
        } = req;
        let conn = &mut conns[node];
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

    /// The clients in parallel, instance `hb-C-K` through node
    /// `(C + K) mod nodes`.
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

    /// Deregisters every service the run wrote.
    async fn cleanup(&self, w: Workload, clients: usize, _: &()) {
        let mut names: Vec<String> = w.seeded_services().into_iter().map(String::from).collect();
        if w.registers() {
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

    /// At most 10 tries, 50 ms apart.
    async fn fill(
        &self,
        conns: &mut Vec<Conn>,
        node: usize,
        f: &FillInstance,
    ) -> anyhow::Result<()> {
        let body = fill_body(f);
        let deadline = Instant::now() + SEED_WAIT;
        conns[node]
            .retry(Method::POST, "/register", Some(body.into()), 10, deadline)
            .await
            .map(|_| ())
    }

    fn fleet_new(&self, spec: &FleetSpec) -> RegistryFleet {
        RegistryFleet {
            spec: spec.clone(),
            pools: self.targets.iter().map(|_| Mutex::default()).collect(),
        }
    }

    /// At most 10 tries, 50 ms apart.
    async fn fleet_register(
        &self,
        fleet: &RegistryFleet,
        k: u64,
        node: usize,
    ) -> anyhow::Result<()> {
        let body = fleet_body(&fleet.spec, k);
        let mut conn = self.take(fleet, node);
        let deadline = Instant::now() + SEED_WAIT;
        let outcome = conn
            .retry(Method::POST, "/register", Some(body.into()), 10, deadline)
            .await
            .map(|_| ());
        fleet.put_back(node, conn);
        outcome
    }

    /// `POST /heartbeat`; `Ok` for a 2xx answer.
    async fn fleet_heartbeat(
        &self,
        fleet: &RegistryFleet,
        k: u64,
        node: usize,
    ) -> anyhow::Result<()> {
        let body = format!(
            r#"{{"service_name":"{}","instance_id":"{}"}}"#,
            fleet.spec.service(k),
            FleetSpec::id(k)
        );
        let mut conn = self.take(fleet, node);
        let outcome = conn.post("/heartbeat", body).await.and_then(Answer::ok);
        fleet.put_back(node, conn);
        outcome.map(|_| ())
    }

    /// The instances of every fleet service, read with `?consistent=true`
    /// from the first target (a service not found has none).
    async fn fleet_count(&self, fleet: &RegistryFleet) -> anyhow::Result<u64> {
        let mut conn = self.take(fleet, 0);
        let mut total = 0;
        for s in 0..fleet.spec.services {
            let a = conn
                .get(&format!("/services/bench-fleet-{s}?consistent=true"))
                .await?;
            if a.status.as_u16() == 404 {
                continue;
            }
            let a = a.ok()?;
            let v: serde_json::Value = serde_json::from_slice(&a.body)?;
            let instances = v["instances"].as_array().ok_or_else(|| {
                anyhow::anyhow!("GET /services/bench-fleet-{s}: no instances array")
            })?;
            total += instances
                .iter()
                .filter(|i| {
                    i["instance_id"]
                        .as_str()
                        .is_some_and(|id| id.starts_with("fl-"))
                })
                .count() as u64;
        }
        fleet.put_back(0, conn);
        Ok(total)
    }

    /// Deregisters every fleet service.
    async fn fleet_cleanup(&self, fleet: &RegistryFleet) {
        let mut conn = self.take(fleet, 0);
        for s in 0..fleet.spec.services {
            let name = format!("bench-fleet-{s}");
            match conn.delete(&format!("/deregister/{name}")).await {
                Ok(a) if a.status.is_success() || a.status.as_u16() == 404 => {}
                Ok(a) => eprintln!("bench: cleaning up {name}: {}", a.status),
                Err(e) => eprintln!("bench: cleaning up {name}: {e:#}"),
            }
        }
    }

    /// `raft_leader_changes_total` and the CPU time of every target's
    /// `/metrics`.
    async fn node_counters(&self) -> Option<NodeCounters> {
        let mut sum = NodeCounters::ZERO;
        for conn in &mut self.conns() {
            let a = conn.get("/metrics").await.and_then(Answer::ok).ok()?;
            sum = sum.add(
                &String::from_utf8_lossy(&a.body),
                "raft_leader_changes_total",
            )?;
        }
        Some(sum)
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

    /// A read's `X-Registry-Index`, then (`with_leader`) a healthy `/health`.
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

    /// Registers `bench-failover` over a new connection (nothing is opened
    /// before the kill).
    fn failover_write(
        &self,
        n: usize,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static {
        let mut conn = self.conn(self.targets[n % self.targets.len()].clone());
        async move {
            conn.post("/register", FAILOVER_BODY.to_owned())
                .await?
                .ok()
                .map(|_| ())
        }
    }

    async fn failover_cleanup(&self) {
        let _ = self.conns()[0].delete("/deregister/bench-failover").await;
    }
}

/// The registration of a fill instance.
fn fill_body(f: &FillInstance) -> String {
    format!(
        r#"{{"service_name":"{}","instance_id":"{}","host":"{}","port":{},"ttl_seconds":{FILL_TTL_SECONDS},"metadata":{{"zone":"{}","version":"{}"}}}}"#,
        f.service, f.id, f.host, f.port, f.zone, f.version
    )
}

/// The registration of fleet instance `k`.
fn fleet_body(spec: &FleetSpec, k: u64) -> String {
    format!(
        r#"{{"service_name":"{}","instance_id":"{}","host":"10.1.{}.{}","port":{},"ttl_seconds":{}}}"#,
        spec.service(k),
        FleetSpec::id(k),
        (k / 256) % 256,
        k % 256,
        1 + k % 60_000,
        spec.ttl_seconds
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_registers_the_instance_with_a_day_ttl_and_metadata() {
        assert_eq!(
            fill_body(&FillInstance::new(257)),
            r#"{"service_name":"bench-fill-57","instance_id":"f-257","host":"10.0.1.1","port":258,"ttl_seconds":86400,"metadata":{"zone":"z2","version":"1.0.7"}}"#
        );
    }

    #[test]
    fn fleet_registers_the_instance_with_three_periods_of_ttl() {
        let spec = FleetSpec {
            instances: 1_000,
            services: 100,
            period: Duration::from_secs(30),
            ttl_seconds: 90,
            max_in_flight: 8,
        };
        assert_eq!(
            fleet_body(&spec, 257),
            r#"{"service_name":"bench-fleet-57","instance_id":"fl-257","host":"10.1.1.1","port":258,"ttl_seconds":90}"#
        );
    }
}
