//! `vertice-register bench`: a load driver against any set of nodes, and the
//! probes `scripts/bench.sh` needs around it (fill, leader, index, ready,
//! failover). It owns the workloads' definitions and the reports; it does
//! not start or stop nodes (the script does).
//!
//! Every workload runs `--clients` concurrent clients for `--seconds`; each
//! client sends its `i`-th request to node `(client + i) mod nodes`, so the
//! load spreads over every node as a fleet of real clients' would, and
//! followers forward writes to the leader as they do for real clients. Each
//! workload seeds what it needs first and removes what it wrote afterwards.
//! The exception is `fleet` (module `fleet`): open loop, every heartbeat of
//! N instances sent at its scheduled time whatever earlier answers, its
//! latency counted from that time.
//!
//! Two backends, each an implementation of the trait `backend::Backend` run
//! by the one dispatcher in `driver`: this registry over HTTP (`registry`
//! module), and, with the cargo feature `etcd`, an etcd cluster over its
//! gRPC API (`etcd` module) with the equivalent operations: register =
//! lease grant + put with the lease, heartbeat = lease keepalive, lookup =
//! serializable range get of the service's prefix, consistent lookup =
//! linearizable range get, list = serializable keys-only range get of every
//! service key.
//!
//! This file holds the command line (arguments, probes, workloads and the
//! operations they send, the JSON report's shape) and picks the backend;
//! `stats` records latencies, `http` is the registry backend's client.

mod backend;
mod driver;
mod fleet;
mod http;
mod registry;
mod stats;

#[cfg(feature = "etcd")]
mod etcd;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use backend::Backend;

use crate::auth::Secret;
pub use stats::{percentile, FleetReport, Recorder, WorkloadReport};

/// Instances each client cycles through in `heartbeat-cold`: each instance
/// is renewed every few seconds, so every renewal is one the leader must
/// checkpoint into the log, as in a fleet (with `heartbeat`, one instance per
/// client, the checkpoint carries each instance once a second however often
/// it renews).
pub const COLD_INSTANCES: usize = 300;

/// Services `bench fill` spreads its instances over.
pub const FILL_SERVICES: u64 = 100;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub probe: Option<Probe>,
    /// Nodes to load, comma-separated: registry URLs (http://H:P), or etcd
    /// client endpoints with --backend etcd.
    #[arg(
        long,
        env = "BENCH_TARGETS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8888",
        global = true
    )]
    pub targets: Vec<String>,
    /// What the targets are. `etcd` needs a binary built with `--features etcd`.
    #[arg(long, env = "BENCH_BACKEND", value_enum, default_value_t = BackendKind::Registry, global = true)]
    pub backend: BackendKind,
    /// Workloads to run, in this order, comma-separated.
    #[arg(
        long,
        env = "BENCH_WORKLOADS",
        value_enum,
        value_delimiter = ',',
        default_value = "lookup,consistent-lookup,list,heartbeat,heartbeat-cold,mixed,register"
    )]
    pub workloads: Vec<Workload>,
    /// Concurrent clients (each one request at a time).
    #[arg(long, env = "BENCH_CLIENTS", default_value_t = 32, global = true,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub clients: u64,
    /// How long each workload runs, in seconds.
    #[arg(long, env = "BENCH_SECONDS", default_value_t = 10.0)]
    pub seconds: f64,
    /// Print JSON instead of lines for people.
    #[arg(long, env = "BENCH_JSON", global = true)]
    pub json: bool,
    /// API token for nodes with --tokens (Authorization: Bearer); needs
    /// write access to the `bench-` services.
    #[arg(long, env = "BENCH_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<Secret>,
    /// A request without an answer after this many milliseconds is an error.
    #[arg(long, env = "BENCH_TIMEOUT_MS", default_value_t = 5_000, global = true)]
    pub timeout_ms: u64,
    /// fleet: instances, each renewed once per --fleet-period-secs.
    #[arg(long, env = "BENCH_FLEET_INSTANCES", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub fleet_instances: u64,
    /// fleet: services the instances spread over (`bench-fleet-N`, instance
    /// k in service k mod this).
    #[arg(long, env = "BENCH_FLEET_SERVICES", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub fleet_services: u64,
    /// fleet: each instance's heartbeat period, in seconds (fractions
    /// accepted); instances register with a TTL of 3 periods (at least 10 s).
    #[arg(long, env = "BENCH_FLEET_PERIOD_SECS", default_value_t = 30.0)]
    pub fleet_period_secs: f64,
    /// fleet: the TTL the instances register with (default: 3 periods
    /// rounded up, at least 10 s). Raise it when registering the fleet
    /// takes longer than the TTL, or the first instances expire before
    /// their first heartbeat (etcd's leases do: it registers 100,000 in
    /// about 110 s here).
    #[arg(long, env = "BENCH_FLEET_TTL_SECS",
          value_parser = clap::value_parser!(u64).range(5..=86_400))]
    pub fleet_ttl_secs: Option<u64>,
    /// fleet: most heartbeats outstanding at once; a heartbeat due while
    /// they are waits for a slot, its latency still counted from its
    /// scheduled time.
    #[arg(long, env = "BENCH_MAX_IN_FLIGHT", default_value_t = 2048,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_in_flight: u64,
    /// etcd only: gRPC connections per endpoint, shared by the clients
    /// (etcd's Go client uses one).
    #[arg(long, env = "BENCH_ETCD_CONNS", default_value_t = 1, global = true)]
    pub etcd_conns: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// vertice-register nodes over HTTP.
    Registry,
    /// etcd members over gRPC (needs the cargo feature `etcd`).
    Etcd,
}

/// The probes `scripts/bench.sh` uses around the workloads.
#[derive(Debug, Clone, Subcommand)]
pub enum Probe {
    /// Register COUNT instances (TTL one day, over 100 services
    /// `bench-fill-N`), for memory, disk and startup figures. Not removed.
    Fill {
        /// Instances to register.
        #[arg(long)]
        count: u64,
        /// Number the instances from here (to add to an earlier fill).
        #[arg(long, default_value_t = 0)]
        offset: u64,
    },
    /// Print the URL of the target that is the leader (waits for one).
    Leader,
    /// Print the highest applied index (etcd: revision) among the targets.
    Index,
    /// Wait until the first target serves reads: prints the milliseconds
    /// from --since-unix-ms (default: the probe's start) to the first read
    /// answered at --min-index or later.
    Ready {
        /// The read must reflect at least this index (etcd: revision).
        #[arg(long, default_value_t = 0)]
        min_index: u64,
        /// Count from this moment (milliseconds since the Unix epoch), e.g.
        /// just before the node's process was started.
        #[arg(long)]
        since_unix_ms: Option<u64>,
        /// Also wait until the node knows a live leader.
        #[arg(long)]
        with_leader: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
    },
    /// `kill -9` PID (the leader), then write through the targets (the
    /// survivors) until a write succeeds; prints the milliseconds between.
    Failover {
        /// The process to kill.
        #[arg(long)]
        kill_pid: u32,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        wait_secs: u64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Register a new instance (default TTL), through any node.
    Register,
    /// Each client renews its own instance as fast as it can.
    Heartbeat,
    /// Each client renews 300 instances of its own in turn, so that every
    /// renewal finds a heartbeat older than the ack slack (etcd: the same
    /// keepalive as `heartbeat`).
    HeartbeatCold,
    /// Read one service (one instance) from the receiving node's replica.
    Lookup,
    /// The same, linearizable (`?consistent=true`).
    ConsistentLookup,
    /// The names of all services (`GET /services`).
    List,
    /// 80% lookup, 15% heartbeat, 5% register.
    Mixed,
    /// Plain GETs of the target URLs as given (e.g. through the gateway).
    Get,
    /// Open loop: --fleet-instances instances over --fleet-services
    /// services, each renewed once per --fleet-period-secs at its scheduled
    /// time whatever earlier answers, at most --max-in-flight outstanding;
    /// latency from the scheduled time.
    Fleet,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Register => "register",
            Workload::Heartbeat => "heartbeat",
            Workload::HeartbeatCold => "heartbeat-cold",
            Workload::Lookup => "lookup",
            Workload::ConsistentLookup => "consistent-lookup",
            Workload::List => "list",
            Workload::Mixed => "mixed",
            Workload::Get => "get",
            Workload::Fleet => "fleet",
        }
    }

    /// The operation a client sends as its `i`-th request.
    pub fn op(self, i: u64) -> Op {
        match self {
            Workload::Register => Op::Register,
            Workload::Heartbeat | Workload::HeartbeatCold | Workload::Fleet => Op::Heartbeat,
            Workload::Lookup => Op::Lookup,
            Workload::ConsistentLookup => Op::ConsistentLookup,
            Workload::List => Op::List,
            Workload::Get => Op::Get,
            Workload::Mixed => match i % 20 {
                0 => Op::Register,
                1..=3 => Op::Heartbeat,
                _ => Op::Lookup,
            },
        }
    }

    /// Instances each client heartbeats (registered before the run).
    pub fn heartbeat_instances(self) -> usize {
        match self {
            Workload::Heartbeat | Workload::Mixed => 1,
            Workload::HeartbeatCold => COLD_INSTANCES,
            _ => 0,
        }
    }

    /// Whether the run reads the seeded `bench-lookup` service.
    pub fn reads_lookup(self) -> bool {
        matches!(
            self,
            Workload::Lookup | Workload::ConsistentLookup | Workload::Mixed
        )
    }

    /// The services seeded for the run (removed after it).
    pub fn seeded_services(self) -> Vec<&'static str> {
        let mut names = Vec::new();
        if self.reads_lookup() {
            names.push("bench-lookup");
        }
        if self.heartbeat_instances() > 0 {
            names.push("bench-heartbeat");
        }
        names
    }

    /// Whether client `c` registers instances of `bench-register-{c}`
    /// (removed after the run).
    pub fn registers(self) -> bool {
        matches!(self, Workload::Register | Workload::Mixed)
    }
}

/// One request of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Register,
    Heartbeat,
    Lookup,
    ConsistentLookup,
    List,
    Get,
}

/// The report of `bench` (without a probe).
#[derive(Debug, Serialize)]
pub struct Report {
    pub backend: BackendKind,
    pub targets: Vec<String>,
    pub clients: u64,
    pub results: Vec<WorkloadReport>,
}

/// Runs `bench` as the command line asks.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(!args.targets.is_empty(), "no --targets");
    anyhow::ensure!(
        args.seconds.is_finite() && args.seconds >= 0.0,
        "--seconds must be a number of seconds, 0 or more, not {}",
        args.seconds
    );
    backend::FleetSpec::from_args(&args)?;
    match args.backend {
        BackendKind::Registry => driver::run(registry::Registry::new(&args)?, &args).await,
        #[cfg(feature = "etcd")]
        BackendKind::Etcd => driver::run(etcd::Etcd::new(&args)?, &args).await,
        #[cfg(not(feature = "etcd"))]
        BackendKind::Etcd => anyhow::bail!(
            "this binary was built without etcd support: cargo build --release --features etcd (needs protoc)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_is_eighty_fifteen_five() {
        let ops: Vec<Op> = (0..20).map(|i| Workload::Mixed.op(i)).collect();
        let count = |o: Op| ops.iter().filter(|x| **x == o).count();
        assert_eq!(count(Op::Lookup), 16);
        assert_eq!(count(Op::Heartbeat), 3);
        assert_eq!(count(Op::Register), 1);
    }

    #[test]
    fn what_each_workload_writes() {
        assert_eq!(Workload::Lookup.seeded_services(), ["bench-lookup"]);
        assert_eq!(
            Workload::HeartbeatCold.seeded_services(),
            ["bench-heartbeat"]
        );
        assert_eq!(
            Workload::Mixed.seeded_services(),
            ["bench-lookup", "bench-heartbeat"]
        );
        assert!(Workload::List.seeded_services().is_empty());
        let registering: Vec<_> = Workload::value_variants()
            .iter()
            .filter(|w| w.registers())
            .collect();
        assert_eq!(registering, [&Workload::Register, &Workload::Mixed]);
    }

    #[test]
    fn workload_names_round_trip() {
        for w in Workload::value_variants() {
            assert_eq!(Workload::from_str(w.name(), false).unwrap(), *w);
        }
    }
}
