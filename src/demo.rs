//! A demo service that registers itself through the client: something for
//! the gateway to route to, in tests and by hand.
//!
//! Endpoints: `GET /health`; `ANY /echo[/{*rest}]` answers what it received
//! (method, path, query, headers, body length); `GET /bytes?n=N` streams N
//! bytes (at most 1 GiB) without buffering them.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::client::{auto_register, AutoRegistration, Registration, RegistryClient};
use crate::config::DemoArgs;

/// Largest `n` that `/bytes` serves.
pub const MAX_BYTES: u64 = 1 << 30;
const CHUNK: usize = 64 * 1024;
/// How long a graceful stop waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(5);

struct DemoState {
    service: String,
    instance: String,
}

/// A running demo service.
#[derive(Debug)]
pub struct DemoHandle {
    pub addr: SocketAddr,
    instance_id: String,
    registration: Option<AutoRegistration>,
    stop: oneshot::Sender<()>,
    server: JoinHandle<()>,
}

impl DemoHandle {
    /// The instance id it registers with: `host:port`, or with a wildcard
    /// listen host the id the registry chose (once registered).
    pub fn instance_id(&self) -> String {
        self.registration
            .as_ref()
            .and_then(AutoRegistration::instance)
            .map(|i| i.instance_id)
            .unwrap_or_else(|| self.instance_id.clone())
    }

    /// The auto-registration, if the registry URLs were usable.
    pub fn registration(&self) -> Option<&AutoRegistration> {
        self.registration.as_ref()
    }

    /// Deregisters, then stops serving (requests in flight get a few
    /// seconds to finish).
    pub async fn shutdown(mut self) {
        if let Some(r) = self.registration.take() {
            r.shutdown().await;
        }
        let _ = self.stop.send(());
        if tokio::time::timeout(DRAIN, &mut self.server).await.is_err() {
            self.server.abort();
        }
    }

    /// Stops serving without deregistering, like a crash: the registry
    /// keeps the instance until its TTL runs out.
    pub fn kill(self) {
        // Dropping the registration aborts its task without a deregister.
        drop(self.registration);
        self.server.abort();
    }
}

/// Serves the demo service on `listener` and keeps it registered as `name`
/// with the registry nodes `registry`. Never fails: with unusable registry
/// URLs it serves unregistered (and logs why).
pub async fn serve(
    listener: TcpListener,
    name: &str,
    registry: Vec<String>,
    ttl_seconds: u32,
) -> DemoHandle {
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let host = addr.ip().to_canonical();
    let client = RegistryClient::new(registry);
    start(
        listener,
        name,
        client,
        register_host(&host.to_string()),
        ttl_seconds,
    )
    .await
}

/// The host to register: the listen host, unless that is a wildcard
/// (`0.0.0.0`, `::`), which would tell nobody where to go; then the
/// registry records the address it sees us at.
fn register_host(host: &str) -> Option<String> {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => None,
        _ => Some(host.to_string()),
    }
}

async fn start(
    listener: TcpListener,
    name: &str,
    client: Result<RegistryClient, crate::client::ClientError>,
    host: Option<String>,
    ttl_seconds: u32,
) -> DemoHandle {
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let instance_id = format!("{}:{}", host.as_deref().unwrap_or("0.0.0.0"), addr.port());
    let state = Arc::new(DemoState {
        service: name.to_string(),
        instance: instance_id.clone(),
    });
    let app = router(state);
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "demo service stopped");
        }
    });
    let registration = match client {
        Ok(client) => {
            let reg = Registration {
                service_name: name.to_string(),
                port: addr.port(),
                instance_id: host.as_ref().map(|_| instance_id.clone()),
                host,
                health_endpoint: Some("/health".into()),
                ttl_seconds: Some(ttl_seconds),
                ..Default::default()
            };
            Some(auto_register(client, reg).await)
        }
        Err(e) => {
            tracing::error!(error = %e, "not registering: bad registry URLs");
            None
        }
    };
    DemoHandle {
        addr,
        instance_id,
        registration,
        stop,
        server,
    }
}

fn router(state: Arc<DemoState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/echo", any(echo))
        .route("/echo/{*rest}", any(echo))
        .route("/bytes", get(bytes))
        .with_state(state)
}

async fn health(State(s): State<Arc<DemoState>>) -> Json<serde_json::Value> {
    Json(json!({"status": "ok", "service": s.service, "instance": s.instance}))
}

async fn echo(State(s): State<Arc<DemoState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in &parts.headers {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        headers
            .entry(k.as_str().to_string())
            .and_modify(|old| {
                old.push_str(", ");
                old.push_str(&v);
            })
            .or_insert(v);
    }
    // Count the body as it streams by: any size, no buffering.
    let mut body_len: u64 = 0;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => body_len += c.len() as u64,
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": "invalid_request", "message": format!("reading the body: {e}")})),
                )
                    .into_response()
            }
        }
    }
    Json(json!({
        "instance": s.instance,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query().unwrap_or(""),
        "headers": headers,
        "body_len": body_len,
    }))
    .into_response()
}

async fn bytes(Query(q): Query<BTreeMap<String, String>>) -> Response {
    let n = match q.get("n").map(|v| v.parse::<u64>()) {
        Some(Ok(n)) if n <= MAX_BYTES => n,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                Json(json!({
                    "error": "invalid_request",
                    "field": "n",
                    "message": format!("n must be an integer from 0 to {MAX_BYTES}"),
                })),
            )
                .into_response()
        }
    };
    let chunk = bytes::Bytes::from(vec![b'x'; CHUNK]);
    let stream = futures::stream::unfold(n, move |left| {
        let chunk = chunk.clone();
        async move {
            if left == 0 {
                return None;
            }
            let take = left.min(CHUNK as u64) as usize;
            Some((
                Ok::<_, std::convert::Infallible>(chunk.slice(..take)),
                left - take as u64,
            ))
        }
    });
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, n.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Runs the demo service until `shutdown` resolves: binds `args.host:args.port`,
/// serves, keeps itself registered with `args.registry`, and on shutdown
/// deregisters, then stops.
pub async fn run_from_cli(
    args: DemoArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let opts = crate::client::ClientOptions {
        token: args.token.as_ref().map(|t| t.expose().to_string()),
        tls: crate::tls::ClientTls::from_files(args.tls_ca.as_deref(), None, None)?,
        ..Default::default()
    };
    let client = RegistryClient::with_options(args.registry.clone(), opts)?;
    let bind = if args.host.contains(':') && !args.host.starts_with('[') {
        format!("[{}]:{}", args.host, args.port)
    } else {
        format!("{}:{}", args.host, args.port)
    };
    let listener = TcpListener::bind(&bind)
        .await
        .map_err(|e| format!("cannot listen on {bind}: {e}"))?;
    let addr = listener.local_addr()?;
    let host = register_host(args.host.trim_start_matches('[').trim_end_matches(']'));
    let handle = start(listener, &args.name, Ok(client), host, args.ttl_seconds).await;
    tracing::info!(service = %args.name, %addr, instance = %handle.instance_id(), "demo service listening");
    shutdown.await;
    tracing::info!("shutting down: deregistering, then stopping");
    handle.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_hosts_are_not_registered() {
        assert_eq!(register_host("0.0.0.0"), None);
        assert_eq!(register_host("::"), None);
        assert_eq!(register_host("127.0.0.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(register_host("svc.local").as_deref(), Some("svc.local"));
    }
}
