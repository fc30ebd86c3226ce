//! The API gateway: `ANY /v2/{service}/{path}` is proxied to an instance of
//! `{service}` found through the registry.
//!
//! Resolution, as in the seed: the local route cache → the registry (any
//! node; the next one on failure) → the environment → `503`. In the
//! environment, with `<NAME>` the service name upper-cased and `-`, `.` as
//! `_`, the first of these that holds an `http(s)://` URL wins (see
//! [`env_var_names`]):
//!
//! 1. `SERVICE_<NAME>_URL` (the seed's),
//! 2. `<NAME>_URL`, 3. `<NAME>_SERVICE_URL`, 4. `<NAME>_ENDPOINT` (the old
//!    gateway's),
//! 5. for a name ending in `_service`, `<BASE>_URL` then `<BASE>_ENDPOINT`
//!    with `<BASE>` the name without it: the old gateway's legacy mapping
//!    (a variable, lower-cased, its `_url`/`_endpoint` dropped and
//!    `_service` appended unless there, names a service; see
//!    [`legacy_service_name`]), so `MAXIMUS_CORE_URL` and
//!    `MAXIMUS_CORE_SERVICE_URL` both serve `/v2/maximus_core_service/`.
//!
//! A value that is not an `http(s)://` URL (empty, `redis://...`) is
//! skipped, so that unrelated variables such as `REDIS_URL` are never
//! proxied to. A registry answer wins over the environment: once a service
//! registers, its fallback route is replaced within `cache_ttl`.
//!
//! Each cached registry route is kept fresh by a watch task running
//! Consul-style blocking queries (`GET /services/{name}?index=N&wait=30s`);
//! a registry that ignores them (answers at once with the same
//! `X-Registry-Index`) is asked at most once a second. A request also
//! refreshes a route older than `cache_ttl`.
//!
//! Routes are dropped only when the registry answers 404 for the service (or
//! nobody asked for it for `watch_idle`): while every registry node is down
//! the last-known instances keep serving, and `X-Gateway-Route-Age` on each
//! proxied response (and `age_seconds` in `/gateway/status`) says how many
//! seconds ago the registry last confirmed them.
//!
//! Each instance has a circuit breaker (see [`breaker`]); requests go round
//! robin over instances whose breaker lets them through. When every breaker
//! is open the instance whose cooldown ends first still gets the request
//! (as its trial): refusing without trying would only turn a possible
//! recovery into a certain 503. A request without a body whose connection
//! fails is sent once more to another instance.
//!
//! Bodies are streamed both ways, never buffered. Paths are passed through
//! exactly as received after `/v2/{service}`; a `..` segment is refused with
//! 400 (URL parsers would resolve it and leave the upstream's path).
//!
//! The listener is the node's server loop (`crate::http::server::serve`): a request
//! head must be complete within `read_timeout` of its first byte
//! (slowloris), idle keep-alive connections close after two minutes, and
//! with `rate_limit_per_ip` each client address gets a `governor` bucket
//! (the node's [`KeyedLimit`]); over it, `429` with `Retry-After`. The
//! gateway's own routes are not limited.
//!
//! With `--registry-listen` the same process also serves the registry's one
//! stable address: every request there is passed to a registry node, the
//! next one when a node is down or has no leader (see `registry_proxy`), so
//! old services that know one registry URL keep working while any one node
//! is stopped.
//!
//! Module map: [`breaker`] (pure breaker state), `routes` (cache, registry
//! lookups, watches, status), `proxy` (forwarding and header hygiene),
//! `registry_proxy` (the stable address), `metrics` (Prometheus).
//!
//! Known limitations: HTTP/1.1 upgrades (WebSocket) are not proxied; the
//! per-request timeout bounds the wait for response headers and each read
//! of the body, not a whole long download; a 404 from a lagging registry
//! follower drops a route until the next lookup.

pub mod breaker;
mod metrics;
mod proxy;
mod registry_proxy;
mod routes;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::GatewayArgs;
use crate::http::limit::{ip_key, retry_after_secs, KeyedLimit};
use metrics::GatewayMetrics;
use routes::Routes;

pub use proxy::split_path;
pub use routes::{env_var_name, env_var_names, legacy_service_name};

/// Looks up an environment variable: `std::env::var` in the binary, a map
/// in tests.
pub type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("gateway configuration: {0}")]
    Config(String),
}

/// Everything the gateway needs; [`GatewayConfig::new`] gives the CLI's
/// defaults.
#[derive(Clone)]
pub struct GatewayConfig {
    /// Registry node base URLs (`http://host:port`).
    pub registry: Vec<String>,
    /// Per-request timeout towards an upstream (response headers, and each
    /// read of the body).
    pub timeout: Duration,
    /// A route older than this is looked up again on the next request.
    pub cache_ttl: Duration,
    /// Consecutive failures that open a breaker (instances and registry).
    pub breaker_threshold: u32,
    /// How long an open breaker waits before one trial request.
    pub breaker_cooldown: Duration,
    /// Timeout of one plain registry request (and connect timeout of all).
    pub registry_timeout: Duration,
    /// `wait` of the watch's blocking queries.
    pub watch_wait: Duration,
    /// A service nobody asked for this long is no longer watched or cached.
    pub watch_idle: Duration,
    /// Most services cached (and watched) at once; the least recently used
    /// is forgotten first.
    pub max_services: usize,
    /// Where the fallback variables (`SERVICE_<NAME>_URL`, ...) are read from.
    pub env: EnvLookup,
    /// API token for registry lookups (`Authorization: Bearer`).
    pub token: Option<crate::auth::Secret>,
    /// Extra CA certificates to trust for https:// registry nodes and
    /// upstream instances.
    pub tls: crate::tls::ClientTls,
    /// A request head must be complete within this of its first byte, or
    /// the connection is closed (slowloris).
    pub read_timeout: Duration,
    /// HTTPS for the gateway's own listener (`--tls-cert`/`--tls-key`),
    /// reloaded when the files change.
    pub listener_tls: Option<Arc<crate::tls::Tls>>,
    /// Requests per second per client address (IPv6: per /64), bursts of
    /// twice as many; 0 = no limit.
    pub rate_limit_per_ip: u32,
    /// Sent as `X-Cluster-Secret` with what the registry listener passes on
    /// to the public routes, so that nodes trust `X-Registry-Caller`.
    pub cluster_secret: Option<crate::auth::Secret>,
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("registry", &self.registry)
            .field("timeout", &self.timeout)
            .field("cache_ttl", &self.cache_ttl)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .field("registry_timeout", &self.registry_timeout)
            .field("watch_wait", &self.watch_wait)
            .field("watch_idle", &self.watch_idle)
            .field("max_services", &self.max_services)
            .field("token", &self.token)
            .field("tls", &self.tls)
            .field("read_timeout", &self.read_timeout)
            .field("rate_limit_per_ip", &self.rate_limit_per_ip)
            .field("cluster_secret", &self.cluster_secret)
            .finish_non_exhaustive()
    }
}

impl GatewayConfig {
    /// The CLI's defaults, reading the process environment for fallbacks.
    pub fn new(registry: Vec<String>) -> Self {
        Self {
            registry,
            timeout: Duration::from_millis(30_000),
            cache_ttl: Duration::from_secs(5),
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_millis(5_000),
            registry_timeout: Duration::from_secs(2),
            watch_wait: Duration::from_secs(30),
            watch_idle: Duration::from_secs(300),
            max_services: 10_000,
            env: Arc::new(|k: &str| std::env::var(k).ok()),
            token: None,
            tls: Default::default(),
            read_timeout: Duration::from_secs(10),
            listener_tls: None,
            rate_limit_per_ip: 0,
            cluster_secret: None,
        }
    }

    pub fn from_args(args: &GatewayArgs) -> Self {
        Self {
            timeout: Duration::from_millis(args.timeout_ms),
            cache_ttl: Duration::from_secs(args.cache_ttl_secs),
            breaker_threshold: args.breaker_threshold,
            breaker_cooldown: Duration::from_millis(args.breaker_cooldown_ms),
            token: args.token.clone(),
            read_timeout: Duration::from_millis(args.read_timeout_ms),
            rate_limit_per_ip: args.rate_limit_per_ip,
            cluster_secret: args.cluster_secret.clone(),
            ..Self::new(args.registry.clone())
        }
    }

    /// Reads fallbacks from `vars` instead of the process environment.
    pub fn with_env_map(mut self, vars: HashMap<String, String>) -> Self {
        self.env = Arc::new(move |k: &str| vars.get(k).cloned());
        self
    }

    fn check(&self) -> Result<(), GatewayError> {
        if self.registry.is_empty() {
            return Err(GatewayError::Config("no registry node given".into()));
        }
        if self.timeout.is_zero() {
            return Err(GatewayError::Config("the timeout must be positive".into()));
        }
        self.tls
            .apply(reqwest::Client::builder())
            .map_err(GatewayError::Config)?
            .build()
            .map_err(|e| GatewayError::Config(format!("HTTP client: {e}")))?;
        if self.read_timeout.is_zero() {
            return Err(GatewayError::Config(
                "the read timeout must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// State shared by the handlers.
pub(crate) struct Shared {
    cfg: Arc<GatewayConfig>,
    routes: Arc<Routes>,
    client: reqwest::Client,
    metrics: Arc<GatewayMetrics>,
    /// `--rate-limit-per-ip`, when set.
    limit: Option<Arc<KeyedLimit<IpAddr>>>,
}

/// `{"error","message"}` with a status.
pub(crate) fn error_response(status: StatusCode, error: &str, message: &str) -> Response {
    (status, Json(json!({"error": error, "message": message}))).into_response()
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            "/health",
            get(|| async { Json(json!({"status": "healthy"})) }),
        )
        .route("/gateway/status", get(status))
        .route("/gateway/metrics", get(metrics_text))
        .route("/v2/{service}", any(proxy::proxy))
        .route("/v2/{service}/", any(proxy::proxy))
        .route("/v2/{service}/{*path}", any(proxy::proxy))
        .fallback(|| async {
            error_response(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; proxy through /v2/{service}/{path}",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            rate_limit,
        ))
        .with_state(shared)
}

/// The gateway's own routes, which `--rate-limit-per-ip` leaves alone (load
/// balancers and monitoring poll them).
fn exempt(path: &str) -> bool {
    matches!(path, "/health" | "/gateway/status" | "/gateway/metrics")
}

/// `429` with `Retry-After` for a client address over `--rate-limit-per-ip`.
async fn rate_limit(
    axum::extract::State(gw): axum::extract::State<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(limit) = &gw.limit {
        let peer = req.extensions().get::<ConnectInfo<SocketAddr>>();
        if let (Some(ConnectInfo(peer)), false) = (peer, exempt(req.uri().path())) {
            if let Err(wait) = limit.check(&ip_key(peer.ip())) {
                gw.metrics.rate_limited.inc();
                let secs = retry_after_secs(wait);
                let message = format!(
                    "rate limit of {} requests/s for this client address exceeded; retry in {secs} s",
                    limit.rate()
                );
                let mut resp =
                    error_response(StatusCode::TOO_MANY_REQUESTS, "too_many_requests", &message);
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(secs));
                return resp;
            }
        }
    }
    next.run(req).await
}

async fn status(axum::extract::State(gw): axum::extract::State<Arc<Shared>>) -> Response {
    Json(gw.routes.status()).into_response()
}

async fn metrics_text(axum::extract::State(gw): axum::extract::State<Arc<Shared>>) -> Response {
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        gw.metrics.render(),
    )
        .into_response()
}

/// Serves on `listener` until `shutdown` resolves, then stops watching and
/// waits for open requests to finish.
pub async fn serve(
    listener: TcpListener,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    serve_with_registry(listener, None, config, shutdown).await
}

/// [`serve`], and with `registry_listener` also the registry's stable
/// address there (`--registry-listen`), until the same `shutdown`.
pub async fn serve_with_registry(
    listener: TcpListener,
    registry_listener: Option<TcpListener>,
    config: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    config.check()?;
    let cfg = Arc::new(config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = Arc::new(GatewayMetrics::new());
    let registry_server = match registry_listener {
        Some(l) => {
            let front = Arc::new(registry_proxy::RegistryProxy::new(&cfg, metrics.clone())?);
            let mut opts = crate::http::server::ServeOptions::plain(cfg.read_timeout);
            opts.refused = Some(metrics.connections_refused.clone());
            tracing::info!(addr = ?l.local_addr().ok(), nodes = ?cfg.registry, "registry stable address listening");
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(crate::http::server::serve(
                l,
                registry_proxy::router(front),
                opts,
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )))
        }
        None => None,
    };
    let routes = Arc::new(Routes::new(cfg.clone(), metrics.clone(), stop_rx));
    let builder = cfg
        .tls
        .apply(reqwest::Client::builder())
        .map_err(GatewayError::Config)?;
    let client = builder
        .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
        .read_timeout(cfg.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|e| GatewayError::Config(format!("HTTP client: {e}")))?;
    let limit = KeyedLimit::swept(cfg.rate_limit_per_ip);
    let shared = Arc::new(Shared {
        cfg,
        routes: routes.clone(),
        client,
        metrics,
        limit,
    });
    let mut serve_opts = crate::http::server::ServeOptions::plain(shared.cfg.read_timeout);
    if let Some(tls) = &shared.cfg.listener_tls {
        serve_opts.tls = Some(tls.clone());
        tokio::spawn(tls.clone().watch_files(stop_tx.subscribe(), |_| {}));
    }
    serve_opts.refused = Some(shared.metrics.connections_refused.clone());
    tracing::info!(addr = ?listener.local_addr().ok(), https = serve_opts.tls.is_some(), "gateway listening");
    // The node's server loop: a head deadline (slowloris) and idle
    // keep-alive connections closed, which `axum::serve` does not do.
    crate::http::server::serve(listener, router(shared), serve_opts, async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await;
    routes.stop_watching();
    if let Some(server) = registry_server {
        let _ = server.await;
    }
    Ok(())
}

/// A running gateway, for tests and embedding.
pub struct Gateway {
    pub addr: SocketAddr,
    /// The registry listener's address, when it has one.
    pub registry_addr: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<(), GatewayError>>,
}

/// Starts serving on `listener` in a task.
pub async fn start(listener: TcpListener, config: GatewayConfig) -> Result<Gateway, GatewayError> {
    start_with_registry(listener, None, config).await
}

/// Starts serving on `listener`, and the registry's stable address on
/// `registry_listener` when given, in a task.
pub async fn start_with_registry(
    listener: TcpListener,
    registry_listener: Option<TcpListener>,
    config: GatewayConfig,
) -> Result<Gateway, GatewayError> {
    config.check()?;
    let addr = listener.local_addr()?;
    let registry_addr = match &registry_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(serve_with_registry(
        listener,
        registry_listener,
        config,
        async move {
            let _ = rx.await;
        },
    ));
    Ok(Gateway {
        addr,
        registry_addr,
        stop: Some(tx),
        server,
    })
}

impl Gateway {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://` + the registry listener's address.
    pub fn registry_url(&self) -> Option<String> {
        self.registry_addr.map(|a| format!("http://{a}"))
    }

    /// Stops serving; connections still open after 3 s are cut.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(Duration::from_secs(3), &mut self.server)
            .await
            .is_err()
        {
            self.server.abort();
        }
    }
}

/// Runs the gateway until `shutdown` resolves.
pub async fn run_from_cli(
    args: GatewayArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut config = GatewayConfig::from_args(&args);
    config.tls = crate::tls::ClientTls::from_files(args.tls_ca.as_deref(), None, None)?;
    if let Some(files) =
        crate::tls::TlsFiles::from_flags(args.tls_cert.as_deref(), args.tls_key.as_deref(), None)?
    {
        config.listener_tls = Some(crate::tls::Tls::load(files)?);
    }
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let registry_listener = match &args.registry_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} (--registry-listen): {e}"))?,
        ),
        None => None,
    };
    serve_with_registry(listener, registry_listener, config, shutdown).await?;
    Ok(())
}
