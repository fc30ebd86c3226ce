//! Starting and stopping one registry node: storage, Raft, the HTTP server,
//! and the background tasks (election watchdog, leases and TTL expiry on the
//! leader, leader-change accounting).
//!
//! The caller binds the listener (port 0 in tests) so it always knows the
//! address before the node starts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, AppState};
use crate::config::NodeArgs;
use crate::leader::leases::Leases;
use crate::metrics::Metrics;
use crate::raft::{
    self, DataDirError, DiskSync, Faults, LogStore, Network, NodeId, Raft, StateMachineStore,
};

mod background;
mod restore;
mod settings;

use background::{join, leader_changes, watchdog};
pub use settings::raft_config;
use settings::{expiry, initial_members, limits};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot open the data directory {dir}: {reason}")]
    Storage { dir: String, reason: String },
    #[error(
        "data directory {dir} is corrupt: {reason}; refusing to start. Remove the directory \
         and add the node back to the cluster: start it with --join http://<a running node> \
         (it will copy a snapshot from the leader)."
    )]
    Corrupt { dir: String, reason: String },
    #[error(
        "data directory {dir} {reason}; refusing to start. Run the release that wrote it, or \
         remove the directory and add the node back to the cluster: start it with \
         --join http://<a running node> (it will copy a snapshot from the leader)."
    )]
    Format { dir: String, reason: String },
    #[error("cannot load stored state: {0}")]
    Load(String),
    #[error("raft failed to start: {0}")]
    Raft(String),
}

/// A running node. Dropping it does not stop it: call [`RunningNode::shutdown`].
pub struct RunningNode {
    pub id: NodeId,
    pub addr: SocketAddr,
    pub raft: Raft,
    pub state: Arc<AppState>,
    pub faults: Arc<Faults>,
    data_dir: std::path::PathBuf,
    stop: watch::Sender<bool>,
    server: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningNode {
    /// Opens storage, starts Raft and the HTTP server on `listener`, and
    /// bootstraps the cluster from `--peers` if this node has never run.
    pub async fn start(args: NodeArgs, listener: TcpListener) -> Result<Self, StartError> {
        Self::start_with_faults(args, listener, Arc::new(Faults::default())).await
    }

    pub async fn start_with_faults(
        args: NodeArgs,
        listener: TcpListener,
        faults: Arc<Faults>,
    ) -> Result<Self, StartError> {
        let addr = listener
            .local_addr()
            .map_err(|e| StartError::Config(format!("listener has no address: {e}")))?;
        let mut also = Vec::with_capacity(args.also_listen.len());
        for a in args
            .also_listen
            .iter()
            .map(|a| a.trim())
            .filter(|a| !a.is_empty())
        {
            let l = TcpListener::bind(a).await.map_err(|e| {
                StartError::Config(format!("--also-listen: cannot listen on {a}: {e}"))
            })?;
            also.push(l);
        }
        let peers = initial_members(&args)?;
        let config = Arc::new(raft_config(&args)?);
        if args.test_stale_reads {
            tracing::warn!(
                "--test-stale-reads is set: consistent reads are NOT linearizable on this node (test only)"
            );
        }
        if args.test_broken_leases {
            tracing::warn!(
                "--test-broken-leases is set: instances may expire while their heartbeats are acknowledged (test only)"
            );
        }

        // Flags that need no storage are checked before it is opened.
        let auth = Arc::new(
            crate::auth::Auth::load(args.tokens.as_deref(), &args.public_routes)
                .map_err(StartError::Config)?,
        );
        if let Some(tokens) = auth.tokens() {
            tracing::info!(tokens = tokens.len(), path = ?args.tokens, "API tokens required");
        }
        let tls = match args.tls_files().map_err(StartError::Config)? {
            Some(files) => {
                let tls = crate::tls::Tls::load(files).map_err(StartError::Config)?;
                tracing::info!(
                    cert = %tls.files().cert.display(),
                    mutual = tls.mutual(),
                    "HTTPS only{}",
                    if tls.mutual() { "; peers must present a certificate signed by --tls-ca" } else { "" }
                );
                Some(tls)
            }
            None => None,
        };
        let metrics = Arc::new(Metrics::new());
        let audit = match &args.audit_log {
            Some(path) => crate::audit::AuditLog::open(
                path,
                args.id,
                crate::audit::Rotation {
                    max_bytes: args.audit_log_max_bytes,
                    max_files: args.audit_log_max_files,
                },
                metrics.audit_dropped.clone(),
            )
            .map_err(StartError::Config)?,
            None => crate::audit::AuditLog::disabled(),
        };
        let dir = args.data_dir.display().to_string();
        std::fs::create_dir_all(&args.data_dir).map_err(|e| StartError::Storage {
            dir: dir.clone(),
            reason: e.to_string(),
        })?;
        // Before anything is served: a damaged directory is refused here.
        let (db, mut check) = raft::open_checked(&args.data_dir).map_err(|e| match e {
            DataDirError::Corrupt(reason) => StartError::Corrupt { dir, reason },
            DataDirError::Format(reason) => StartError::Format { dir, reason },
            DataDirError::Open(reason) => StartError::Storage { dir, reason },
        })?;
        raft::recover::claim_node_id(&args.data_dir, args.id).map_err(StartError::Config)?;
        tracing::info!(
            log_entries = check.log.entries,
            instances = check.state_machine.instances,
            snapshot_bytes = check.state_machine.snapshot.map_or(0, |s| s.1),
            open_ms = check.open_elapsed.as_secs_f64() * 1000.0,
            elapsed_ms = check.elapsed.as_secs_f64() * 1000.0,
            "data directory verified and registry loaded"
        );
        let sync =
            match args.unsafe_no_fsync {
                true => {
                    tracing::warn!(
                    "--unsafe-no-fsync: acknowledged writes and votes do not survive power loss"
                );
                    DiskSync::disabled()
                }
                false => DiskSync::open(&args.data_dir, Some(metrics.disk_sync.clone())).map_err(
                    |e| StartError::Storage {
                        dir: args.data_dir.display().to_string(),
                        reason: format!("cannot fsync its files: {e}"),
                    },
                )?,
            };
        let loading = std::time::Instant::now();
        let log = LogStore::open(&db, sync.clone()).map_err(|e| StartError::Load(e.to_string()))?;
        // The check loaded the registry while it verified the records.
        let sm =
            StateMachineStore::open_checked(&db, &args.data_dir, sync, &mut check.state_machine)
                .map_err(|e| StartError::Load(e.to_string()))?;
        let replica = sm.replica();
        tracing::info!(
            elapsed_ms = loading.elapsed().as_secs_f64() * 1000.0,
            "state machine loaded"
        );
        let net = Network::new(
            args.cluster_secret.as_ref().map(|s| s.expose().to_string()),
            faults.clone(),
            args.source_addr,
            tls.as_ref(),
        );

        let raft = Raft::new(args.id, config.clone(), net.clone(), log.clone(), sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;

        let (stop, stop_rx) = watch::channel(false);
        let leader_lease = match args.no_read_lease {
            true => Duration::ZERO,
            false => Duration::from_millis(config.election_timeout_min),
        };
        let read_index = crate::leader::read_index::ReadIndex::new(
            raft.clone(),
            args.leader_wait(),
            leader_lease,
            Some(metrics.read_index.clone()),
        );
        let (leases, mut tasks) = Leases::start(
            raft.clone(),
            read_index.clone(),
            replica.clone(),
            metrics.clone(),
            expiry(&args),
            audit.clone(),
            stop_rx.clone(),
        );
        let (writes, writes_task) =
            crate::leader::writes::Writes::start(raft.clone(), metrics.clone(), stop_rx.clone());
        tasks.push(writes_task);
        let (forwarder, forwarder_task) =
            api::batch_forward::ForwardQueue::start(net.clone(), metrics.clone(), stop_rx.clone());
        tasks.push(forwarder_task);
        let state = Arc::new(AppState {
            leadership: api::Leadership {
                id: args.id,
                raft: raft.clone(),
                net,
                contact: Default::default(),
                leader_wait: args.leader_wait(),
                live_bound: Duration::from_millis(config.election_timeout_max * 2),
            },
            access: api::Access {
                auth,
                audit,
                tls: tls.clone(),
                metrics: metrics.clone(),
            },
            watching: api::Watching {
                slots: Arc::new(tokio::sync::Semaphore::new(args.max_watchers)),
                stopping: stop_rx.clone(),
                replica: replica.clone(),
                metrics: metrics.clone(),
            },
            replica,
            log,
            metrics,
            leases,
            writes,
            forwarder,
            db,
            read_index,
            test_stale_reads: args.test_stale_reads,
            default_ttl: args.default_ttl_secs,
        });

        let limits = limits(&args);
        let app = api::router(state.clone(), &limits);
        let serve = crate::http::server::ServeOptions {
            head_timeout: limits.read_timeout,
            tls: tls.clone(),
            max_connections: args.max_connections,
            max_connections_per_ip: args.max_connections_per_ip,
            refused: Some(state.metrics.connections_refused.clone()),
            open: Some(state.metrics.open_connections.clone()),
        };
        // A JoinSet: aborting `server` (a stop that took too long) aborts
        // every listener's loop with it.
        let mut servers = tokio::task::JoinSet::new();
        for l in std::iter::once(listener).chain(also) {
            if let Ok(a) = l.local_addr() {
                if a != addr {
                    tracing::info!(addr = %a, "also serving the API on --also-listen");
                }
            }
            let mut server_stop = stop_rx.clone();
            let (app, serve) = (app.clone(), serve.clone());
            servers.spawn(async move {
                let shutdown = async move {
                    let _ = server_stop.wait_for(|s| *s).await;
                };
                crate::http::server::serve(l, app, serve, shutdown).await;
            });
        }
        let server = tokio::spawn(async move { while servers.join_next().await.is_some() {} });
        if let Some(tls) = &tls {
            let counter = state.metrics.tls_reloads.clone();
            tasks.push(tokio::spawn(tls.clone().watch_files(
                stop_rx.clone(),
                move |r| {
                    counter
                        .with_label_values(&[if r.is_ok() { "ok" } else { "error" }])
                        .inc();
                },
            )));
        }

        let restore = args
            .data_dir
            .join(crate::raft::state_machine::backup::RESTORE_FILE);
        if restore.exists() {
            if args.join.is_some() {
                return Err(StartError::Config(format!(
                    "{} holds a restored backup, which starts a new cluster: start this node with \
                     --peers (or alone), not --join",
                    args.data_dir.display()
                )));
            }
            restore::install(&raft, &restore, &peers).await?;
        } else if args.join.is_none() && !raft.is_initialized().await.unwrap_or(true) {
            let members: BTreeMap<NodeId, BasicNode> = peers
                .iter()
                .map(|(id, a)| (*id, BasicNode { addr: a.clone() }))
                .collect();
            tracing::info!(?members, "bootstrapping a new cluster");
            if let Err(e) = raft.initialize(members).await {
                // Another node's initialization got here first: that is fine.
                tracing::info!(error = %e, "not initializing: already part of a cluster");
            }
        }

        if let Some(url) = args.join.clone() {
            let me = args.advertise().to_string();
            tasks.push(tokio::spawn(join(state.clone(), url, me, !args.learner)));
        }
        tasks.push(tokio::spawn(watchdog(
            state.clone(),
            config.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(leader_changes(state.clone(), stop_rx)));
        tracing::info!(id = args.id, %addr, data_dir = %args.data_dir.display(), "node started");
        Ok(Self {
            id: args.id,
            addr,
            raft,
            state,
            faults,
            data_dir: args.data_dir.clone(),
            stop,
            server,
            tasks,
        })
    }

    /// Reads the `--tokens` file again (`SIGHUP`) and returns how many
    /// tokens it holds (`None` without `--tokens`). On an error the old
    /// tokens stay in force.
    pub fn reload_tokens(&self) -> Result<Option<usize>, String> {
        self.state.access.auth.reload()
    }

    /// Reads the TLS files again (`SIGHUP`; they are also checked every
    /// second). `Ok(None)` without TLS; on an error the old ones stay.
    pub fn reload_tls(&self) -> Result<Option<crate::tls::Reload>, String> {
        let Some(tls) = &self.state.access.tls else {
            return Ok(None);
        };
        let r = tls.reload();
        self.state
            .metrics
            .tls_reloads
            .with_label_values(&[match &r {
                Ok(_) => "ok",
                Err(_) => "error",
            }])
            .inc();
        r.map(Some)
    }

    /// Stops gracefully: closes the listener, stops Raft and the background
    /// tasks, and flushes and syncs sled. Safe to call on a node that is partitioned.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
        // Connections that never finish must not hold the stop forever.
        let mut server = self.server;
        if tokio::time::timeout(Duration::from_secs(3), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft did not stop cleanly");
        }
        let audit = self.state.access.audit.clone();
        let _ = tokio::task::spawn_blocking(move || audit.sync(Duration::from_secs(2))).await;
        for t in self.tasks {
            let _ = t.await;
        }
        // Durable first: the record below must never describe more than a
        // power cut right after the stop leaves.
        match self.state.log.flush().await {
            Err(e) => tracing::error!(error = %e, "final flush failed"),
            // Lets the next start tell whether sled gave back all of it.
            Ok(_) => {
                if let Err(e) = raft::integrity::record_clean_stop(&self.data_dir, &self.state.db) {
                    tracing::warn!(error = %e, "cannot record the clean stop");
                }
            }
        }
        tracing::info!(id = self.id, "node stopped");
    }
}
