//! The HTTP layer: public handlers, forwarding to the leader, and the
//! internal routes other nodes call. Handlers depend on [`AppState`] only;
//! errors become status codes in `error.rs` and nowhere else.

mod access;
pub mod batch_forward;
pub mod error;
mod forward;
mod handlers;
mod internal;
pub mod limits;
mod membership;
mod refusal_audit;
mod watch;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::Router;
use openraft::ServerState;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

pub use crate::forwarding::{ReadIndexReply, WriteReply, WriteRequest};
pub use access::{CALLER_HEADER, VIA_HEADER};
pub use error::ApiError;
pub use limits::LimitConfig;

use crate::leader::leases::Leases;
use crate::metrics::Metrics;
use crate::raft::{LogStore, Network, NodeId, Raft, Replica};

/// Largest body the public API accepts.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest body the internal Raft routes accept (log batches, snapshot chunks).
pub const MAX_RAFT_BODY: usize = 64 * 1024 * 1024;

/// When this node last heard from a leader, for `X-Registry-Last-Contact`.
#[derive(Debug)]
pub struct LastContact {
    origin: Instant,
    /// Milliseconds after `origin`, plus one; zero means never.
    at: AtomicU64,
}

impl Default for LastContact {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            at: AtomicU64::new(0),
        }
    }
}

impl LastContact {
    pub fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64 + 1;
        self.at.store(ms, Ordering::Relaxed);
    }

    /// Milliseconds since the last contact, or `None` if there was none.
    pub fn millis_since(&self) -> Option<u64> {
        match self.at.load(Ordering::Relaxed) {
            0 => None,
            at => Some((self.origin.elapsed().as_millis() as u64 + 1).saturating_sub(at)),
        }
    }

    /// Milliseconds since the last contact; a node that never had one
    /// reports the time since it started.
    pub fn millis_since_or_start(&self) -> u64 {
        self.millis_since()
            .unwrap_or_else(|| self.origin.elapsed().as_millis() as u64)
    }
}

/// Everything a handler needs; one per node, shared by all requests.
pub struct AppState {
    pub id: NodeId,
    pub raft: Raft,
    pub replica: Arc<Replica>,
    pub log: LogStore,
    pub net: Network,
    pub metrics: Arc<Metrics>,
    pub leases: Arc<Leases>,
    /// Client writes on the leader, batched into shared entries.
    pub writes: Arc<crate::leader::writes::Writes>,
    /// Writes on their way to the leader, batched into shared calls.
    pub forwarder: Arc<batch_forward::ForwardQueue>,
    pub db: sled::Db,
    pub contact: LastContact,
    /// How long a write or consistent read waits for a leader before `503`.
    pub leader_wait: Duration,
    /// A leader not heard from for this long is not considered live.
    pub live_bound: Duration,
    /// Slots for blocking queries; a request that finds none gets `429`.
    pub watchers: Arc<tokio::sync::Semaphore>,
    /// Turns true when the node stops: blocking queries answer at once.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Shared leadership confirmations (read index) for consistent reads.
    pub read_index: Arc<crate::leader::read_index::ReadIndex>,
    /// Test only (`--test-stale-reads`): consistent reads skip the read index.
    pub test_stale_reads: bool,
    /// `ttl_seconds` of a registration that gives none (`--default-ttl-secs`).
    pub default_ttl: u32,
    /// API tokens (`--tokens`) and the routes open without one.
    pub auth: Arc<crate::auth::Auth>,
    /// The audit log (`--audit-log`), or a no-op.
    pub audit: crate::audit::AuditLog,
    /// TLS (`--tls-cert`/`--tls-key`/`--tls-ca`), when the node speaks HTTPS.
    pub tls: Option<Arc<crate::tls::Tls>>,
}

/// What this node knows about the leader, read from Raft's metrics.
#[derive(Debug, Clone)]
pub struct LeaderView {
    pub role: &'static str,
    pub leader_id: Option<NodeId>,
    pub leader_addr: Option<String>,
    pub term: u64,
    /// This node knows a leader and has heard from it recently (or is a
    /// leader that a quorum acknowledged recently).
    pub live: bool,
    /// Milliseconds since this node last heard from the leader; 0 on the leader.
    pub last_contact_ms: u64,
}

impl AppState {
    pub fn leader_view(&self) -> LeaderView {
        // Borrow, don't clone: this runs on every read.
        let rx = self.raft.metrics();
        let m = rx.borrow();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let membership = m.membership_config.membership();
        let leader_addr = m
            .current_leader
            .and_then(|id| membership.get_node(&id).map(|n| n.addr.clone()));
        let bound = self.live_bound.as_millis() as u64;
        let (live, last_contact_ms) = if m.state == ServerState::Leader {
            let single = membership.voter_ids().nth(1).is_none();
            let acked = m.millis_since_quorum_ack.is_some_and(|ms| ms <= bound);
            (single || acked, 0)
        } else {
            let since = self.contact.millis_since();
            (
                m.current_leader.is_some() && since.is_some_and(|ms| ms <= bound),
                self.contact.millis_since_or_start(),
            )
        };
        LeaderView {
            role,
            leader_id: m.current_leader,
            leader_addr,
            term: m.current_term,
            live,
            last_contact_ms,
        }
    }
}

/// The node's whole HTTP surface, behind the request limits of `limits`.
pub fn router(state: Arc<AppState>, limits: &LimitConfig) -> Router {
    let audit = state
        .audit
        .enabled()
        .then(|| limits::RefusalAudit::new(state.audit.clone(), state.auth.clone()));
    let limits = limits::Limits::new(limits, state.metrics.rate_limited.clone(), audit);
    let public = Router::new()
        .route("/register", post(handlers::register))
        .route("/heartbeat", post(handlers::heartbeat))
        .route("/deregister/{name}", delete(handlers::deregister))
        .route("/services", get(handlers::list_services))
        .route("/services/{name}", get(handlers::get_service))
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::metrics))
        // Only matched routes: an unknown path is a plain 404.
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            access::public_guard,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY));
    let app = public
        .merge(internal::router(state.clone()))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(limits, limits::guard));
    // Request traces only when asked for (`RUST_LOG=tower_http=debug`): with
    // its events filtered out the layer still wraps every request and
    // response body and reads the clock twice per request.
    let app = if tracing::enabled!(target: "tower_http::trace", Level::DEBUG) {
        // 503s are routine during elections; handlers log real failures.
        app.layer(
            TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(Level::DEBUG)),
        )
    } else {
        app
    };
    app.with_state(state)
}
