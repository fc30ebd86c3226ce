//! The HTTP layer: public handlers, forwarding to the leader, and the
//! internal routes other nodes call. Handlers depend on [`AppState`] only;
//! errors become status codes in `error.rs` and nowhere else.

mod access;
pub mod backup;
pub mod batch_forward;
pub mod error;
mod forward;
mod handlers;
mod internal;
mod leadership;
pub mod limits;
mod membership;
mod refusal_audit;
mod watch;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use axum::Router;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

pub use crate::forwarding::{ReadIndexReply, WriteReply, WriteRequest};
pub use access::{Access, CALLER_HEADER, VIA_HEADER};
pub use error::ApiError;
pub use leadership::{LastContact, LeaderView, Leadership};
pub use limits::LimitConfig;
pub use watch::Watching;

use crate::leader::leases::Leases;
use crate::metrics::Metrics;
use crate::raft::{LogStore, Replica};

/// Largest body the public API accepts.
pub const MAX_BODY: usize = 64 * 1024;
/// Largest body the internal Raft routes accept (log batches, snapshot chunks).
pub const MAX_RAFT_BODY: usize = 64 * 1024 * 1024;

/// Everything a handler needs; one per node, shared by all requests.
/// Grouped by concern: each group's methods live with it
/// ([`Leadership::leader_view`], [`Access::refuse`],
/// [`Watching::block_until_changed`]); what spans them (the write path,
/// `forward.rs`; answers' headers, `handlers.rs`) is on `AppState`.
pub struct AppState {
    /// The leader, and how this node reaches it.
    pub leadership: Leadership,
    /// Tokens, the audit log and TLS.
    pub access: Access,
    /// Blocking queries.
    pub watching: Watching,
    pub replica: Arc<Replica>,
    pub log: LogStore,
    pub db: sled::Db,
    pub metrics: Arc<Metrics>,
    pub leases: Arc<Leases>,
    /// Client writes on the leader, batched into shared entries.
    pub writes: Arc<crate::leader::writes::Writes>,
    /// Writes on their way to the leader, batched into shared calls.
    pub forwarder: Arc<batch_forward::ForwardQueue>,
    /// Shared leadership confirmations (read index) for consistent reads.
    pub read_index: Arc<crate::leader::read_index::ReadIndex>,
    /// Test only (`--test-stale-reads`): consistent reads skip the read index.
    pub test_stale_reads: bool,
    /// `ttl_seconds` of a registration that gives none (`--default-ttl-secs`).
    pub default_ttl: u32,
}

/// The node's whole HTTP surface, behind the request limits of `limits`.
pub fn router(state: Arc<AppState>, limits: &LimitConfig) -> Router {
    let audit =
        state.access.audit.enabled().then(|| {
            limits::RefusalAudit::new(state.access.audit.clone(), state.access.auth.clone())
        });
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
