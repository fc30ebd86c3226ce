//! The command line. Every flag also reads an environment variable, so a
//! container needs no arguments. Parsing only: `node.rs` acts on it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::auth::Secret;
use crate::raft::NodeId;

#[derive(Debug, Parser)]
#[command(
    name = "vertice-register",
    version,
    about = "A Raft-replicated service registry. With no subcommand: `node` with every default."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Log lines on stderr: `text` (colours only on a terminal) or `json`
    /// (one object per line, for log shippers).
    #[arg(long, env = "REGISTRY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], global = true)]
    pub log_format: String,
}

// Parsed once at start: the size of the node's flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a registry node.
    Node(NodeArgs),
    /// Run the API gateway: `/v2/{service}/{path}` routed through the registry.
    Gateway(GatewayArgs),
    /// Run a small demo service that registers itself and heartbeats.
    DemoService(DemoArgs),
    /// Inspect or change cluster membership.
    Cluster(ClusterArgs),
    /// Back up the registry, or seed a new node's data from a backup.
    Snapshot(SnapshotArgs),
    /// After a cluster lost a majority for good: make a stopped node's data
    /// a one-voter cluster of itself (keeping its data, id and address).
    Recover(RecoverArgs),
    /// Load nodes (this registry's, or etcd's) with a workload and report
    /// ops/s, p50/p99/max latency and errors; probes for scripts/bench.sh.
    Bench(crate::bench::BenchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub action: ClusterAction,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// How the `cluster` and `snapshot` commands reach the cluster.
#[derive(Debug, Clone, Args)]
pub struct RemoteArgs {
    /// Registry nodes to ask, comma-separated URLs or HOST:PORT (the first
    /// that answers).
    #[arg(
        long,
        env = "REGISTRY_URLS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8888",
        value_parser = registry_url,
        global = true
    )]
    pub registry: Vec<String>,
    /// The cluster secret (header X-Cluster-Secret).
    #[arg(
        long,
        env = "REGISTRY_CLUSTER_SECRET",
        hide_env_values = true,
        global = true
    )]
    pub cluster_secret: Option<Secret>,
    /// An admin API token (header Authorization: Bearer), accepted on
    /// /cluster/* in place of the cluster secret when the nodes have --tokens.
    #[arg(long, env = "REGISTRY_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<Secret>,
    /// CA certificate(s) (PEM) to trust for https:// nodes, e.g. the
    /// cluster's --tls-ca.
    #[arg(long, env = "REGISTRY_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct RecoverArgs {
    /// The stopped node's data directory.
    #[arg(long, env = "REGISTRY_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The node's id; by default the one the directory records (nodes of
    /// this release record it at their first start).
    #[arg(long, env = "REGISTRY_ID")]
    pub id: Option<NodeId>,
}

#[derive(Debug, Clone, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub action: SnapshotAction,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum SnapshotAction {
    /// Save a consistent, checksummed backup of the registry to FILE
    /// (written to a temporary file, synced, then renamed into place).
    Save {
        /// Where to write the backup.
        file: PathBuf,
    },
    /// Check a backup and seed an empty data directory with it; a node
    /// started there (with --peers, or alone) forms a new cluster holding
    /// the backup's registry.
    Restore {
        /// The backup `snapshot save` wrote.
        file: PathBuf,
        /// The new node's data directory (absent or empty).
        #[arg(long, env = "REGISTRY_DATA_DIR")]
        data_dir: PathBuf,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum ClusterAction {
    /// Leader, term, and every member's address, role, reachability and lag.
    Status,
    /// Add a node: a learner first, a voter once it has answered the leader
    /// and caught up; if it has not within --wait, it stays a learner.
    Add {
        /// The new node's id.
        id: NodeId,
        /// The address other nodes reach it at (HOST:PORT).
        addr: String,
        /// How long the node may take to catch up, in seconds (1-600).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=600))]
        wait: u64,
    },
    /// Make a learner (e.g. a read replica started with --learner) a voter,
    /// once it has caught up.
    Promote {
        /// The learner's id.
        id: NodeId,
        /// How long it may take to catch up, in seconds (1-600).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=600))]
        wait: u64,
    },
    /// Remove a node from the cluster.
    Remove {
        /// The node's id.
        id: NodeId,
        /// Remove a voter even when too few of the remaining voters answer to
        /// form a majority (the cluster then commits nothing until they are
        /// back).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Listen address.
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: String,
    /// Registry nodes, comma-separated URLs.
    #[arg(
        long,
        env = "GATEWAY_REGISTRY",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8888",
        value_parser = registry_url
    )]
    pub registry: Vec<String>,
    /// Per-request timeout towards an upstream, in milliseconds.
    #[arg(long, env = "GATEWAY_TIMEOUT_MS", default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// How long a route looked up in the registry is served from the cache
    /// without asking again, in seconds (watches refresh it sooner).
    #[arg(long, env = "GATEWAY_CACHE_TTL_SECS", default_value_t = 5)]
    pub cache_ttl_secs: u64,
    /// Consecutive failures that open an instance's circuit breaker.
    #[arg(long, env = "GATEWAY_BREAKER_THRESHOLD", default_value_t = 3)]
    pub breaker_threshold: u32,
    /// How long an open breaker waits before letting one request through.
    #[arg(long, env = "GATEWAY_BREAKER_COOLDOWN_MS", default_value_t = 5_000)]
    pub breaker_cooldown_ms: u64,
    /// API token for the registry lookups (a read token is enough), sent as
    /// Authorization: Bearer.
    #[arg(long, env = "GATEWAY_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// CA certificate(s) (PEM) to trust, beyond the public web roots, for
    /// https:// registry nodes and upstream instances.
    #[arg(long, env = "GATEWAY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The gateway's own certificate chain (PEM): with --tls-key, its
    /// listener speaks HTTPS only. Reloaded when the files change.
    #[arg(long, env = "GATEWAY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "GATEWAY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// A request's head must be complete within this many milliseconds of
    /// its first byte, else the connection is closed.
    #[arg(long, env = "GATEWAY_READ_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub read_timeout_ms: u64,
    /// Requests per second one client address may make (bursts of twice as
    /// many; IPv6 clients count per /64); beyond it `429`. 0 = no limit.
    /// `/health`, `/gateway/status` and `/gateway/metrics` are exempt.
    #[arg(long, env = "GATEWAY_RATE_LIMIT_PER_IP", default_value_t = 0)]
    pub rate_limit_per_ip: u32,
    /// Also listen here as the registry's one stable address: every request
    /// is passed to the --registry nodes, the next one when a node cannot be
    /// reached or has no leader (like the Nginx in front of the old
    /// registry). Plain HTTP, no rate limit.
    #[arg(long, env = "GATEWAY_REGISTRY_LISTEN")]
    pub registry_listen: Option<String>,
    /// The cluster secret: requests passed on by --registry-listen carry it
    /// (header X-Cluster-Secret) so that nodes trust X-Registry-Caller, the
    /// original client's address.
    #[arg(long, env = "REGISTRY_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<Secret>,
}

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Service name to register.
    #[arg(long, env = "DEMO_NAME")]
    pub name: String,
    /// Port to listen on (127.0.0.1 unless --host says otherwise).
    #[arg(long, env = "DEMO_PORT")]
    pub port: u16,
    /// Address to listen on and to register.
    #[arg(long, env = "DEMO_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Registry nodes, comma-separated URLs.
    #[arg(
        long,
        env = "DEMO_REGISTRY",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8888"
    )]
    pub registry: Vec<String>,
    /// TTL to register with, in seconds.
    #[arg(long, env = "DEMO_TTL_SECS", default_value_t = 60)]
    pub ttl_seconds: u32,
    /// API token (a write token for this service's name), sent as
    /// Authorization: Bearer.
    #[arg(long, env = "DEMO_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,
    /// CA certificate(s) (PEM) to trust for https:// registry nodes.
    #[arg(long, env = "DEMO_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// This node's id, unique in the cluster.
    #[arg(long, env = "REGISTRY_ID", default_value_t = 1)]
    pub id: NodeId,
    /// Listen address for the public API and the Raft routes.
    #[arg(long, env = "REGISTRY_ADDR", default_value = "127.0.0.1:8888")]
    pub addr: String,
    /// More addresses serving the same API, comma-separated (e.g.
    /// `0.0.0.0:80` for clients that know the registry on port 80). Peers
    /// use --advertise; these are for clients only.
    #[arg(long, env = "REGISTRY_ALSO_LISTEN", value_delimiter = ',')]
    pub also_listen: Vec<String>,
    /// Address peers use to reach this node (default: --addr).
    #[arg(long, env = "REGISTRY_ADVERTISE")]
    pub advertise: Option<String>,
    /// Where the node keeps its data.
    #[arg(long, env = "REGISTRY_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Initial voters, the same list on every node: 1=H:P,2=H:P,3=H:P.
    /// Default: this node alone.
    #[arg(long, env = "REGISTRY_PEERS", value_parser = parse_peers)]
    pub peers: Option<Peers>,
    /// Ask a running cluster (any node's URL) to add this node: it becomes a
    /// learner, then a voter once it has caught up. --peers is then ignored.
    #[arg(long, env = "REGISTRY_JOIN")]
    pub join: Option<String>,
    /// With --join: stay a learner, a read replica that serves reads (and
    /// forwards writes) but does not vote; `cluster promote ID` makes it a
    /// voter later.
    #[arg(long, env = "REGISTRY_LEARNER", requires = "join")]
    pub learner: bool,
    /// Shared secret required on /raft/* and /cluster/* (header X-Cluster-Secret).
    #[arg(long, env = "REGISTRY_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<Secret>,
    /// Allow more than one voter without a cluster secret.
    #[arg(long, env = "REGISTRY_INSECURE")]
    pub insecure: bool,
    /// Raft heartbeat interval in milliseconds.
    #[arg(long, env = "REGISTRY_HEARTBEAT_MS", default_value_t = 50)]
    pub heartbeat_ms: u64,
    /// Minimum election timeout in milliseconds (the maximum is twice this).
    /// A follower starts an election after hearing nothing from the leader
    /// for the maximum plus a random timeout between minimum and maximum.
    #[arg(long, env = "REGISTRY_ELECTION_TIMEOUT_MS", default_value_t = 100)]
    pub election_timeout_ms: u64,
    /// Build a snapshot (and compact the log) every this many entries.
    #[arg(long, env = "REGISTRY_SNAPSHOT_THRESHOLD", default_value_t = 10_000)]
    pub snapshot_threshold: u64,
    /// How long a write or consistent read waits for a leader before 503.
    #[arg(long, env = "REGISTRY_LEADER_WAIT_MS", default_value_t = 5_000)]
    pub leader_wait_ms: u64,
    /// Pause expiry when more than this share (0-1) of instances is overdue
    /// or recently expired at once; 1 disables the protection.
    #[arg(long, env = "REGISTRY_EXPIRY_PAUSE_THRESHOLD", default_value_t = 0.5, value_parser = parse_share)]
    pub expiry_pause_threshold: f64,
    /// The protection applies only with at least this many instances.
    #[arg(
        long,
        env = "REGISTRY_EXPIRY_PAUSE_MIN_INSTANCES",
        default_value_t = 10
    )]
    pub expiry_pause_min_instances: usize,
    /// Expirations within this many seconds count towards the share.
    #[arg(long, env = "REGISTRY_EXPIRY_WINDOW_SECS", default_value_t = 60)]
    pub expiry_window_secs: u64,
    /// Local IP address for connections to other nodes (default: the
    /// kernel's choice). For multi-homed hosts, and for chaos tests that
    /// cut nodes apart with firewall rules on one machine.
    #[arg(long, env = "REGISTRY_SOURCE_ADDR")]
    pub source_addr: Option<std::net::IpAddr>,
    /// Requests per second one client address may make to the public API
    /// (bursts of twice as many; IPv6 clients count per /64); beyond it
    /// `429`. 0 = no limit. `/health` and the internal routes are exempt.
    #[arg(long, env = "REGISTRY_RATE_LIMIT_PER_IP", default_value_t = 0)]
    pub rate_limit_per_ip: u32,
    /// Requests per second per API token (`Authorization: Bearer` or
    /// `X-Registry-Token`; kept hashed),
    /// bursts of twice as many; beyond it `429`. 0 = no limit.
    #[arg(long, env = "REGISTRY_RATE_LIMIT_PER_TOKEN", default_value_t = 0)]
    pub rate_limit_per_token: u32,
    /// A request's head must be complete within this many milliseconds of
    /// its first byte (else the connection is closed), and then its body
    /// within as many again (else `408`).
    #[arg(long, env = "REGISTRY_READ_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(100..))]
    pub read_timeout_ms: u64,
    /// Most connections open on this node at once (clients and peers);
    /// beyond it a new connection gets `503` and is closed. 0 = no cap.
    #[arg(long, env = "REGISTRY_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// Most connections open at once from one client address (IPv6: per
    /// /64); beyond it a new connection gets `429` and is closed. 0 = no cap.
    /// Count a gateway's or a NAT's whole pool when setting it.
    #[arg(long, env = "REGISTRY_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,
    /// This node's TLS certificate chain (PEM). With --tls-key the node
    /// speaks HTTPS only, to clients and to peers (which must too).
    #[arg(long, env = "REGISTRY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "REGISTRY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM) for mutual TLS between nodes: peers must
    /// present a certificate it signed to use /raft/*, and this node
    /// presents its own to them. Without it peers are checked against the
    /// public web roots. Files are reloaded when they change.
    #[arg(long, env = "REGISTRY_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Most blocking queries (`?index=&wait=`) waiting on this node at once.
    #[arg(long, env = "REGISTRY_MAX_WATCHERS", default_value_t = 4096)]
    pub max_watchers: usize,
    /// API tokens (JSON file, see docs/security.md). With it, every request
    /// but GET /health and --public-routes needs Authorization: Bearer (or X-Registry-Token).
    #[arg(long, env = "REGISTRY_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// Routes reachable without a token when --tokens is set, comma-separated:
    /// /metrics, /services, /services/* (GET /health always is).
    #[arg(long, env = "REGISTRY_PUBLIC_ROUTES", value_delimiter = ',')]
    pub public_routes: Vec<String>,
    /// Append one JSON line per mutation and per refused request to this file.
    #[arg(long, env = "REGISTRY_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Rotate the audit log when it would grow past this many bytes.
    #[arg(long, env = "REGISTRY_AUDIT_LOG_MAX_BYTES", default_value_t = 100 * 1024 * 1024)]
    pub audit_log_max_bytes: u64,
    /// Rotated audit logs to keep (FILE.1 .. FILE.N).
    #[arg(long, env = "REGISTRY_AUDIT_LOG_MAX_FILES", default_value_t = 5)]
    pub audit_log_max_files: usize,
    /// The TTL of a registration that names none, in seconds (the old
    /// registry's clients never do).
    #[arg(long, env = "REGISTRY_DEFAULT_TTL_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u32).range(5..=86_400))]
    pub default_ttl_secs: u32,
    /// How long an expired instance is kept as a tombstone, in seconds: a
    /// heartbeat naming it within this window brings it back with its last
    /// registration (the old clients never register again). 0 keeps none.
    #[arg(
        long,
        env = "REGISTRY_TOMBSTONE_RETENTION_SECS",
        default_value_t = 86_400
    )]
    pub tombstone_retention_secs: u64,
    /// Most tombstones kept (the oldest go first); each holds one expired
    /// registration, at most ~10 KiB. 0 keeps none.
    #[arg(long, env = "REGISTRY_MAX_TOMBSTONES", default_value_t = 10_000)]
    pub max_tombstones: u32,
    /// Longest pause, in seconds, before expiry resumes anyway.
    #[arg(long, env = "REGISTRY_EXPIRY_PAUSE_MAX_SECS", default_value_t = 900)]
    pub expiry_pause_max_secs: u64,
    /// Confirm leadership with a quorum round for every batch of consistent
    /// reads and heartbeats, instead of trusting a confirmation for
    /// --election-timeout-ms after it (the leader lease; see docs/api.md
    /// "Consistency").
    #[arg(long, env = "REGISTRY_NO_READ_LEASE")]
    pub no_read_lease: bool,
    /// TEST ONLY, UNSAFE: `?consistent=true` skips the read index and answers
    /// from the local replica like a default read. Exists so that the
    /// linearizability harness (`scripts/jepsen.sh --stale-reads`) can prove
    /// that its checker catches stale reads. Never set it in production.
    #[arg(long, hide = true)]
    pub test_stale_reads: bool,
    /// TEST ONLY, UNSAFE: renewals acknowledged without a write are neither
    /// remembered nor checkpointed, and expiry judges committed values
    /// alone, so instances can expire while their heartbeats are being
    /// acknowledged. Exists so that the Jepsen-style harness
    /// (`scripts/jepsen.sh --broken-leases`) can prove that its early-expiry
    /// check catches it. Never set it in production.
    #[arg(long, hide = true)]
    pub test_broken_leases: bool,
    /// UNSAFE: acknowledge appends and votes once sled has flushed, without
    /// the `fdatasync` that makes them survive power loss (sled's flush alone
    /// survives `kill -9` only). For the power-loss tests, which must show
    /// that they catch the loss, and for measuring what the syncs cost.
    /// Never set it in production.
    #[arg(long, env = "REGISTRY_UNSAFE_NO_FSYNC")]
    pub unsafe_no_fsync: bool,
}

fn parse_share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a share between 0 and 1")),
    }
}

impl Default for NodeArgs {
    fn default() -> Self {
        Self::parse_from(["node"])
    }
}

impl NodeArgs {
    /// Parses only node flags (and their environment variables).
    fn parse_from<I: IntoIterator<Item = &'static str>>(args: I) -> Self {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            node: NodeArgs,
        }
        Only::parse_from(args).node
    }

    pub fn advertise(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.addr)
    }

    /// The TLS files, checked to come as a set; `None`: plain HTTP.
    pub fn tls_files(&self) -> Result<Option<crate::tls::TlsFiles>, String> {
        crate::tls::TlsFiles::from_flags(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_ca.as_deref(),
        )
    }

    pub fn leader_wait(&self) -> Duration {
        Duration::from_millis(self.leader_wait_ms)
    }
}

/// The initial voters: node id → advertised address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers(pub BTreeMap<NodeId, String>);

pub fn parse_peers(s: &str) -> Result<Peers, String> {
    let mut peers = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("peer '{part}' must look like ID=HOST:PORT"))?;
        let id: NodeId = id
            .trim()
            .parse()
            .map_err(|_| format!("peer id '{id}' must be a positive integer"))?;
        let addr = addr.trim();
        if !addr.contains(':') {
            return Err(format!("peer address '{addr}' must be HOST:PORT"));
        }
        if peers.insert(id, addr.to_string()).is_some() {
            return Err(format!("peer id {id} appears twice"));
        }
    }
    if peers.is_empty() {
        return Err("the peer list is empty".into());
    }
    Ok(Peers(peers))
}

/// A registry node's URL: `http://` or `https://`, or a bare `HOST:PORT`
/// (taken as `http://HOST:PORT`).
pub fn registry_url(s: &str) -> Result<String, String> {
    let s = s.trim();
    let url = if s.contains("://") {
        s.to_string()
    } else {
        format!("http://{s}")
    };
    match reqwest::Url::parse(&url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            Ok(url.trim_end_matches('/').to_string())
        }
        Ok(u) if !matches!(u.scheme(), "http" | "https") => Err(format!(
            "{s}: the scheme must be http:// or https://, not {}://",
            u.scheme()
        )),
        Ok(_) => Err(format!("{s}: no host (want http://HOST:PORT or HOST:PORT)")),
        Err(e) => Err(format!("{s}: {e} (want http://HOST:PORT or HOST:PORT)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_and_reject() {
        let p = parse_peers("1=a:1, 2=b:2,3=c:3").unwrap();
        assert_eq!(p.0.len(), 3);
        assert_eq!(p.0[&2], "b:2");
        assert!(parse_peers("1=a:1,1=b:2").is_err());
        assert!(parse_peers("x=a:1").is_err());
        assert!(parse_peers("1=a").is_err());
        assert!(parse_peers("").is_err());
    }

    #[test]
    fn gateway_hardening_flags() {
        let parse = |args: &[&str]| {
            let mut all = vec!["vertice-register", "gateway"];
            all.extend_from_slice(args);
            match Cli::try_parse_from(all).map(|c| c.command) {
                Ok(Some(Command::Gateway(g))) => Ok(g),
                Ok(_) => panic!("not the gateway"),
                Err(e) => Err(e),
            }
        };
        let g = parse(&[]).unwrap();
        assert_eq!((g.read_timeout_ms, g.rate_limit_per_ip), (10_000, 0));
        let g = parse(&["--read-timeout-ms", "100", "--rate-limit-per-ip", "50"]).unwrap();
        assert_eq!((g.read_timeout_ms, g.rate_limit_per_ip), (100, 50));
        assert!(parse(&["--read-timeout-ms", "99"]).is_err());
    }

    #[test]
    fn registry_urls_take_a_bare_address_and_refuse_other_schemes() {
        assert_eq!(
            registry_url("127.0.0.1:19001").unwrap(),
            "http://127.0.0.1:19001"
        );
        assert_eq!(
            registry_url("https://r.example:443/").unwrap(),
            "https://r.example:443"
        );
        assert_eq!(registry_url(" http://h:1 ").unwrap(), "http://h:1");
        assert!(registry_url("ftp://h:1")
            .unwrap_err()
            .contains("http:// or https://"));
        assert!(registry_url("http://").is_err());
        assert!(registry_url("h:notaport").is_err());
        let cli = Cli::try_parse_from([
            "vertice-register",
            "cluster",
            "status",
            "--registry",
            "127.0.0.1:1,https://b:2",
        ])
        .unwrap();
        let Some(Command::Cluster(c)) = cli.command else {
            panic!("not the cluster command")
        };
        assert_eq!(c.remote.registry, ["http://127.0.0.1:1", "https://b:2"]);
    }

    #[test]
    fn the_log_format_is_text_or_json_on_any_subcommand() {
        let parse = |args: &[&str]| Cli::try_parse_from(args.iter().copied()).map(|c| c.log_format);
        assert_eq!(parse(&["vertice-register"]).unwrap(), "text");
        assert_eq!(
            parse(&["vertice-register", "--log-format", "json"]).unwrap(),
            "json"
        );
        assert_eq!(
            parse(&["vertice-register", "node", "--log-format", "json"]).unwrap(),
            "json"
        );
        assert!(parse(&["vertice-register", "--log-format", "xml"]).is_err());
    }

    #[test]
    fn defaults_match_the_contract() {
        let a = NodeArgs::default();
        assert_eq!(a.id, 1);
        assert_eq!(a.addr, "127.0.0.1:8888");
        assert_eq!(a.advertise(), "127.0.0.1:8888");
        assert_eq!(a.data_dir, PathBuf::from("./data"));
    }
}
