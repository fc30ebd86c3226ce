//! The [`Backend`] trait: what differs between the systems `bench` loads
//! (connecting, one request of each kind, seeding and removing what a
//! workload needs, the probes' questions), and the descriptions of the
//! requests the dispatcher ([`driver`](super::driver)) asks a backend to send.
//! Everything else (which node a request goes to, the clients, the
//! deadline, the latencies, the reports) is the dispatcher's, once.

use std::future::Future;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::{BenchArgs, Op, Workload, FILL_SERVICES};

/// One system under load. The dispatcher builds it with [`Backend::new`],
/// calls [`Backend::connect`] before workloads and fill (not before the
/// probes, whose targets may be down), then shares it between its client
/// tasks; hence the `Send` futures.
pub trait Backend: Sized + Send + Sync + 'static {
    /// What one client keeps between its requests (registry: a connection
    /// to every node; etcd: its lease and keepalive stream).
    type Client: Send + 'static;
    /// What seeding the heartbeat instances leaves for the clients and for
    /// the cleanup (etcd: each client's lease; registry: nothing).
    type Heartbeats: Default + Send + Sync + 'static;

    /// What the `fleet` workload keeps for its instances (registry: a pool
    /// of connections per node; etcd: each instance's lease and keepalive
    /// stream).
    type Fleet: Send + Sync + 'static;

    /// The backend for the command line's targets and options, without I/O.
    fn new(args: &BenchArgs) -> anyhow::Result<Self>;

    /// Opens what the workloads and fill share (etcd: the gRPC connections).
    /// By default nothing: each client opens its own.
    fn connect(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }

    /// An error if this backend cannot run `w` at all (before any seeding).
    /// By default every workload runs.
    fn check(&self, _w: Workload) -> anyhow::Result<()> {
        Ok(())
    }

    /// A new client `c`'s state, given what [`Backend::seed_heartbeats`] left.
    fn client(&self, c: usize, heartbeats: &Self::Heartbeats) -> Self::Client;

    /// Sends one request of a workload; `Ok` if it succeeded. Node `n` is
    /// the `n`-th target.
    fn op(
        &self,
        client: &mut Self::Client,
        req: Request,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Registers the one instance of `bench-lookup` and waits until every
    /// node serves it.
    fn seed_lookup(&self) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Registers `per_client` instances `hb-C-K` of `bench-heartbeat` for
    /// every client C, ready to be renewed.
    fn seed_heartbeats(
        &self,
        clients: usize,
        per_client: usize,
    ) -> impl Future<Output = anyhow::Result<Self::Heartbeats>> + Send;

    /// Removes what a run of `w` with `clients` clients wrote (errors only
    /// warned about, on stderr).
    fn cleanup(
        &self,
        w: Workload,
        clients: usize,
        heartbeats: &Self::Heartbeats,
    ) -> impl Future<Output = ()> + Send;

    /// Registers one instance of `bench fill` through node (target) `node`
    /// (a few tries).
    fn fill(
        &self,
        client: &mut Self::Client,
        node: usize,
        instance: &FillInstance,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// The state of a `fleet` run, before any instance is registered.
    fn fleet_new(&self, spec: &FleetSpec) -> Self::Fleet;

    /// Registers fleet instance `k` (`FleetSpec::id(k)` of
    /// `spec.service(k)`, TTL `spec.ttl_seconds`) through node `node`, ready
    /// to be renewed (a few tries).
    fn fleet_register(
        &self,
        fleet: &Self::Fleet,
        k: u64,
        node: usize,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// One heartbeat of fleet instance `k`, through node `node` (etcd: on
    /// the instance's own keepalive stream), within the request timeout.
    fn fleet_heartbeat(
        &self,
        fleet: &Self::Fleet,
        k: u64,
        node: usize,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// How many fleet instances the cluster holds (a linearizable read).
    fn fleet_count(&self, fleet: &Self::Fleet) -> impl Future<Output = anyhow::Result<u64>> + Send;

    /// Removes every fleet service (errors only warned about, on stderr).
    fn fleet_cleanup(&self, fleet: &Self::Fleet) -> impl Future<Output = ()> + Send;

    /// The sum over the targets of their leader-change counters and CPU
    /// time (each node's own `/metrics`); `None` if one could not be read.
    fn node_counters(&self) -> impl Future<Output = Option<NodeCounters>> + Send;

    /// The target that is the leader (waits for one).
    fn leader(&self) -> impl Future<Output = anyhow::Result<String>> + Send;

    /// The highest applied index (etcd: revision) among the targets.
    fn index(&self) -> impl Future<Output = anyhow::Result<u64>> + Send;

    /// Waits until the first target answers a read at `min_index` or later
    /// (and, `with_leader`, knows a live leader), for at most `wait`.
    fn ready(
        &self,
        min_index: u64,
        with_leader: bool,
        wait: Duration,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Before the failover probe's kill: opens what its writes need up
    /// front, so that the clock measures the cluster. By default nothing.
    fn failover_prepare(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }

    /// The failover probe's `n`-th write attempt, through target
    /// `n mod targets`; `Ok` once the write succeeded.
    fn failover_write(&self, n: usize)
        -> impl Future<Output = anyhow::Result<()>> + Send + 'static;

    /// After a failover write succeeded: removes what it wrote. By default
    /// nothing.
    fn failover_cleanup(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// One request of a workload, as the dispatcher asks for it.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub op: Op,
    /// The node (target) it goes to: `(client + i) mod targets`.
    pub node: usize,
    /// The client sending it.
    pub client: usize,
    /// Its number among the client's requests.
    pub i: u64,
    /// Instances the client heartbeats in turn (the workload's
    /// [`Workload::heartbeat_instances`]).
    pub heartbeat_instances: usize,
}

/// TTL of the instances `bench fill` registers: a day.
pub const FILL_TTL_SECONDS: u64 = 86_400;

/// Instance `k` of `bench fill`: instances spread over [`FILL_SERVICES`]
/// services `bench-fill-N`, with distinct addresses and two metadata keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FillInstance {
    pub service: String,
    pub id: String,
    pub host: String,
    pub port: u64,
    /// The `zone` metadata value.
    pub zone: String,
    /// The `version` metadata value.
    pub version: String,
}

impl FillInstance {
    pub fn new(k: u64) -> Self {
        Self {
            service: format!("bench-fill-{}", k % FILL_SERVICES),
            id: format!("f-{k}"),
            host: format!("10.0.{}.{}", (k / 256) % 256, k % 256),
            port: 1 + k % 60_000,
            zone: format!("z{}", k % 3),
            version: format!("1.0.{}", k % 10),
        }
    }
}

/// What the nodes count themselves, summed over the targets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodeCounters {
    pub leader_changes: u64,
    /// `process_cpu_seconds_total`, when every node reports it.
    pub cpu_seconds: Option<f64>,
}

impl NodeCounters {
    /// Sums one node's `/metrics` text into `self`: `leader` names its
    /// leader-change counter. `None` without that counter.
    pub fn add(self, metrics: &str, leader: &str) -> Option<Self> {
        let changes = counter_value(metrics, leader)?;
        let cpu = metric_value(metrics, "process_cpu_seconds_total");
        Some(Self {
            leader_changes: self.leader_changes + changes,
            cpu_seconds: self.cpu_seconds.zip(cpu).map(|(a, b)| a + b),
        })
    }

    pub const ZERO: Self = Self {
        leader_changes: 0,
        cpu_seconds: Some(0.0),
    };
}

/// The sum of the samples of counter `name` (without labels or with any)
/// in a Prometheus text exposition; `None` if there is none.
pub fn counter_value(text: &str, name: &str) -> Option<u64> {
    metric_value(text, name).map(|v| v as u64)
}

/// The sum of every series of metric `name` in a Prometheus text page, as
/// a float (`None` if it has none).
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let rest = match rest.chars().next() {
            Some(' ') => rest,
            Some('{') => rest.split_once('}').map(|(_, v)| v).unwrap_or(""),
            _ => continue,
        };
        let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
        if value.is_finite() && value >= 0.0 {
            found = Some(found.unwrap_or(0.0) + value);
        }
    }
    found
}

/// Longest TTL a registration may ask for (the API's bound).
const MAX_TTL_SECONDS: u64 = 86_400;

/// What `fleet` runs with, from the command line, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSpec {
    pub instances: u64,
    pub services: u64,
    pub period: Duration,
    /// The TTL each instance is registered with: 3 periods rounded up, at
    /// least 10 s.
    pub ttl_seconds: u64,
    pub max_in_flight: usize,
}

impl FleetSpec {
    /// The spec the flags ask for, or an error naming the bad flag.
    pub fn from_args(args: &BenchArgs) -> anyhow::Result<Self> {
        let (instances, services) = (args.fleet_instances, args.fleet_services);
        let period = args.fleet_period_secs;
        anyhow::ensure!(instances >= 1, "--fleet-instances must be at least 1");
        anyhow::ensure!(
            (1..=instances).contains(&services),
            "--fleet-services must be between 1 and --fleet-instances ({instances}), not {services}"
        );
        anyhow::ensure!(
            period.is_finite() && period > 0.0,
            "--fleet-period-secs must be a number of seconds above 0, not {period}"
        );
        let ttl_seconds = args.fleet_ttl_secs.unwrap_or_else(|| ttl_for(period));
        anyhow::ensure!(
            ttl_seconds <= MAX_TTL_SECONDS,
            "--fleet-period-secs {period} is too long: the TTL (3 periods) would pass {MAX_TTL_SECONDS} s"
        );
        anyhow::ensure!(
            ttl_seconds as f64 > period,
            "--fleet-ttl-secs {ttl_seconds} must be longer than the period ({period} s), or instances expire between heartbeats"
        );
        let max_in_flight = usize::try_from(args.max_in_flight)
            .ok()
            .filter(|m| (1..=Semaphore::MAX_PERMITS.min(u32::MAX as usize)).contains(m))
            .ok_or_else(|| anyhow::anyhow!("--max-in-flight must be between 1 and 100000"))?;
        Ok(Self {
            instances,
            services,
            period: Duration::from_secs_f64(period),
            ttl_seconds,
            max_in_flight,
        })
    }

    /// The service of instance `k`.
    pub fn service(&self, k: u64) -> String {
        format!("bench-fleet-{}", k % self.services)
    }

    /// The id of instance `k`.
    pub fn id(k: u64) -> String {
        format!("fl-{k}")
    }

    /// Heartbeats per second the schedule asks for: N / period.
    pub fn offered_per_sec(&self) -> f64 {
        self.instances as f64 / self.period.as_secs_f64()
    }
}

/// The TTL for a heartbeat period: three periods rounded up, at least 10 s
/// (saturating for absurd periods, which [`FleetSpec::from_args`] refuses).
pub fn ttl_for(period_secs: f64) -> u64 {
    let ttl = (3.0 * period_secs).ceil();
    if ttl >= u64::MAX as f64 {
        u64::MAX
    } else {
        (ttl as u64).max(10)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counters_from_prometheus_text() {
        let text = "# HELP raft_leader_changes_total x\n# TYPE raft_leader_changes_total counter\nraft_leader_changes_total 3\nraft_leader_changes_totalx 9\n";
        assert_eq!(counter_value(text, "raft_leader_changes_total"), Some(3));
        let cpu = "process_cpu_seconds_total 1.25\nprocess_cpu_seconds_total_x 7\n";
        assert_eq!(metric_value(cpu, "process_cpu_seconds_total"), Some(1.25));
        assert_eq!(metric_value(cpu, "process_cpu_seconds"), None);
        assert_eq!(counter_value("a{x=\"1\"} 2\na{x=\"2\"} 5\n", "a"), Some(7));
        assert_eq!(counter_value("b 1\n", "a"), None);
        assert_eq!(counter_value("a 1e+00\n", "a"), Some(1));
    }

    use super::*;

    #[test]
    fn ttl_is_three_periods_at_least_ten_seconds() {
        assert_eq!(ttl_for(30.0), 90);
        assert_eq!(ttl_for(10.0), 30);
        assert_eq!(ttl_for(1.0), 10);
        assert_eq!(ttl_for(0.5), 10);
        assert_eq!(ttl_for(3.4), 11);
        assert_eq!(ttl_for(1e300), u64::MAX);
    }

    #[test]
    fn fill_instances_spread_over_services_and_addresses() {
        let f = FillInstance::new(257);
        assert_eq!(f.service, "bench-fill-57");
        assert_eq!(f.id, "f-257");
        assert_eq!(f.host, "10.0.1.1");
        assert_eq!(f.port, 258);
        assert_eq!((f.zone.as_str(), f.version.as_str()), ("z2", "1.0.7"));
    }
}
