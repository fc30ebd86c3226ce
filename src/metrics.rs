//! Prometheus metrics: the seed's registry metrics plus what an operator of
//! a Raft cluster needs. Counters are bumped where things happen; gauges that
//! mirror Raft state are refreshed when `/metrics` is scraped.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub operations: IntCounterVec,
    pub duration: HistogramVec,
    pub active_services: IntGauge,
    pub active_instances: IntGauge,
    pub forwarded: IntCounterVec,
    pub term: IntGauge,
    pub is_leader: IntGauge,
    pub last_applied: IntGauge,
    pub committed: IntGauge,
    pub last_log: IntGauge,
    pub leader_changes: IntCounter,
    pub db_size: IntGauge,
    pub snapshots_installed: IntCounter,
    pub expired: IntCounter,
    /// Expired instances a heartbeat brought back (as leader).
    pub revived: IntCounter,
    /// Tombstones of expired instances kept for revival.
    pub tombstones: IntGauge,
    pub forward_latency: Histogram,
    pub renewals: IntCounterVec,
    pub checkpoints: IntCounter,
    pub expiry_paused: IntGauge,
    pub watchers: IntGauge,
    pub watch_rejected: IntCounter,
    pub auth_refused: IntCounterVec,
    pub audit_dropped: IntCounter,
    pub rate_limited: IntCounterVec,
    pub connections_refused: IntCounterVec,
    pub open_connections: IntGauge,
    pub tls_reloads: IntCounterVec,
    pub read_index: IntCounterVec,
    pub write_entries: IntCounter,
    pub write_commands: IntCounter,
    pub disk_sync: Histogram,
    /// This process's CPU time (user + system) and resident memory, read
    /// at each scrape, under the names Prometheus' clients use (the fleet
    /// benchmark reads them from etcd's nodes too).
    process_cpu: prometheus::Counter,
    process_rss: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let operations = IntCounterVec::new(
            Opts::new(
                "registry_operations_total",
                "Registry operations by outcome",
            ),
            &["operation", "status"],
        )
        .unwrap();
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "registry_operation_duration_seconds",
                "Time to answer a registry operation",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["operation"],
        )
        .unwrap();
        let g = |name: &str, help: &str| IntGauge::new(name, help).unwrap();
        let m = Self {
            operations,
            duration,
            active_services: g("registry_active_services", "Registered services"),
            active_instances: g("registry_active_instances", "Registered instances"),
            forwarded: IntCounterVec::new(
                Opts::new(
                    "registry_forwarded_requests_total",
                    "Requests this node forwarded to the leader",
                ),
                &["kind"],
            )
            .unwrap(),
            term: g("raft_term", "Current Raft term"),
            is_leader: g("raft_is_leader", "1 if this node is the leader"),
            last_applied: g(
                "raft_last_applied_index",
                "Last log index applied to the registry",
            ),
            committed: g(
                "raft_committed_index",
                "Last committed log index known to this node",
            ),
            last_log: g("raft_last_log_index", "Last log index on this node"),
            leader_changes: IntCounter::new(
                "raft_leader_changes_total",
                "Times this node saw the leader change",
            )
            .unwrap(),
            db_size: g(
                "registry_db_size_bytes",
                "Size of the sled database on disk",
            ),
            snapshots_installed: IntCounter::new(
                "raft_snapshots_installed_total",
                "Snapshots received from a leader and installed",
            )
            .unwrap(),
            expired: IntCounter::new(
                "registry_expirations_total",
                "Instances this node expired as leader",
            )
            .unwrap(),
            revived: IntCounter::new(
                "registry_revivals_total",
                "Expired instances a heartbeat brought back, as leader",
            )
            .unwrap(),
            tombstones: IntGauge::new(
                "registry_tombstones",
                "Expired instances kept (as tombstones) so that a heartbeat can bring them back",
            )
            .unwrap(),
            forward_latency: Histogram::with_opts(HistogramOpts::new(
                "registry_forward_duration_seconds",
                "Time for a forwarded request to come back from the leader",
            ))
            .unwrap(),
            renewals: IntCounterVec::new(
                Opts::new(
                    "registry_renewals_total",
                    "Heartbeat renewals this node served as leader, by how: lease (no Raft write) or committed (in a Renew entry)",
                ),
                &["mode"],
            )
            .unwrap(),
            checkpoints: IntCounter::new(
                "registry_renewal_checkpoints_total",
                "Renew entries committed (batched renewals)",
            )
            .unwrap(),
            expiry_paused: g(
                "registry_expiry_paused",
                "1 while the leader holds expiry back (mass-expiry protection)",
            ),
            watchers: g("registry_watchers", "Blocking queries waiting on this node"),
            watch_rejected: IntCounter::new(
                "registry_watch_rejected_total",
                "Blocking queries refused because every watcher slot was taken",
            )
            .unwrap(),
            auth_refused: IntCounterVec::new(
                Opts::new(
                    "registry_auth_refused_total",
                    "Requests refused by the token or cluster-secret checks, by reason",
                ),
                &["reason"],
            )
            .unwrap(),
            audit_dropped: IntCounter::new(
                "registry_audit_dropped_total",
                "Audit events dropped (writer queue full or write failed)",
            )
            .unwrap(),
            rate_limited: IntCounterVec::new(
                Opts::new(
                    "registry_rate_limited_total",
                    "Requests refused with 429 by a rate limit, by key: ip or token",
                ),
                &["by"],
            )
            .unwrap(),
            connections_refused: IntCounterVec::new(
                Opts::new(
                    "registry_connections_refused_total",
                    "Connections closed before a request, by reason: total or per_ip (a cap), plain_http (on an HTTPS listener), tls_handshake (failed or too slow)",
                ),
                &["reason"],
            )
            .unwrap(),
            open_connections: g("registry_open_connections", "Client and peer connections open on this node's listener"),
            tls_reloads: IntCounterVec::new(
                Opts::new(
                    "registry_tls_reloads_total",
                    "Reloads of changed TLS certificate files, by result: ok or error (the old ones stay)",
                ),
                &["result"],
            )
            .unwrap(),
            read_index: IntCounterVec::new(
                Opts::new(
                    "registry_read_index_batches_total",
                    "Batches of consistent reads and heartbeats this leader confirmed, by how: lease (within a recent quorum confirmation) or round (a new quorum round)",
                ),
                &["how"],
            )
            .unwrap(),
            write_entries: IntCounter::new(
                "registry_write_entries_total",
                "Log entries this leader proposed for client writes (register, deregister); several writes that arrive together share one entry",
            )
            .unwrap(),
            write_commands: IntCounter::new(
                "registry_write_commands_total",
                "Client writes (register, deregister) this leader proposed, in registry_write_entries_total entries",
            )
            .unwrap(),
            disk_sync: Histogram::with_opts(
                HistogramOpts::new(
                    "registry_disk_sync_seconds",
                    "Time to make sled's flushed writes durable (fsync of new blob files, fdatasync of sled/db), once per append, vote, truncation and snapshot save",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    1.0,
                ]),
            )
            .unwrap(),
            process_cpu: prometheus::Counter::new(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds",
            )
            .unwrap(),
            process_rss: g(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
            ),
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.disk_sync.clone())).unwrap();
        r.register(Box::new(m.write_entries.clone())).unwrap();
        r.register(Box::new(m.write_commands.clone())).unwrap();
        r.register(Box::new(m.operations.clone())).unwrap();
        r.register(Box::new(m.duration.clone())).unwrap();
        r.register(Box::new(m.forwarded.clone())).unwrap();
        r.register(Box::new(m.leader_changes.clone())).unwrap();
        r.register(Box::new(m.expired.clone())).unwrap();
        r.register(Box::new(m.revived.clone())).unwrap();
        r.register(Box::new(m.tombstones.clone())).unwrap();
        r.register(Box::new(m.snapshots_installed.clone())).unwrap();
        r.register(Box::new(m.renewals.clone())).unwrap();
        r.register(Box::new(m.checkpoints.clone())).unwrap();
        r.register(Box::new(m.process_cpu.clone())).unwrap();
        r.register(Box::new(m.process_rss.clone())).unwrap();
        r.register(Box::new(m.watch_rejected.clone())).unwrap();
        r.register(Box::new(m.auth_refused.clone())).unwrap();
        r.register(Box::new(m.audit_dropped.clone())).unwrap();
        r.register(Box::new(m.rate_limited.clone())).unwrap();
        r.register(Box::new(m.connections_refused.clone())).unwrap();
        r.register(Box::new(m.tls_reloads.clone())).unwrap();
        for reason in ["total", "per_ip", "plain_http", "tls_handshake"] {
            m.connections_refused.with_label_values(&[reason]);
        }
        r.register(Box::new(m.read_index.clone())).unwrap();
        for how in ["lease", "round"] {
            m.read_index.with_label_values(&[how]);
        }
        for result in ["ok", "error"] {
            m.tls_reloads.with_label_values(&[result]);
        }
        for by in ["ip", "token"] {
            m.rate_limited.with_label_values(&[by]);
        }
        r.register(Box::new(m.forward_latency.clone())).unwrap();
        for gauge in [
            &m.active_services,
            &m.active_instances,
            &m.term,
            &m.is_leader,
            &m.last_applied,
            &m.committed,
            &m.last_log,
            &m.db_size,
            &m.expiry_paused,
            &m.open_connections,
            &m.watchers,
        ] {
            r.register(Box::new(gauge.clone())).unwrap();
        }
        m
    }

    /// Counts one finished operation and its latency.
    pub fn observe(&self, operation: &str, status: &str, seconds: f64) {
        self.operations
            .with_label_values(&[operation, status])
            .inc();
        self.duration
            .with_label_values(&[operation])
            .observe(seconds);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        self.refresh_process();
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

impl Metrics {
    /// Reads this process's CPU time and resident memory (Linux; 10 ms
    /// resolution, as the kernel counts).
    fn refresh_process(&self) {
        #[cfg(target_os = "linux")]
        if let Ok(stat) = procfs::process::Process::myself().and_then(|p| p.stat()) {
            let ticks = procfs::ticks_per_second().max(1) as f64;
            let total = (stat.utime + stat.stime) as f64 / ticks;
            let past = self.process_cpu.get();
            if total > past {
                self.process_cpu.inc_by(total - past);
            }
            let rss = stat.rss.saturating_mul(procfs::page_size());
            self.process_rss.set(i64::try_from(rss).unwrap_or(i64::MAX));
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
