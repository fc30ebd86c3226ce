//! Who may do what: the token check in front of the public routes, the
//! secret-or-admin-token check in front of `/cluster/*`, the service-prefix
//! check of every write (on the node that receives it and again on the
//! leader), and how a refusal is counted, logged and audited.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::{ApiError, AppState, WriteRequest};
use crate::audit::Outcome;
use crate::auth::{request_token, Caller, Identity, Refusal, Role, Secret};

/// On a `/cluster/*` request one node passes to the leader: the original
/// caller's `ip:port`. Trusted only with the right cluster secret.
pub const CALLER_HEADER: &str = "x-registry-caller";
/// On such a request: the id of the node that passed it on.
pub const VIA_HEADER: &str = "x-registry-via";

/// The connection's `ip:port`, when the server recorded it.
pub fn peer_of(req: &Request) -> Option<String> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
}

/// The role a public route needs, and the operation name for logs.
pub(super) fn public_route(method: &Method, path: &str) -> (Role, &'static str) {
    match path {
        "/register" => (Role::Write, "register"),
        "/heartbeat" => (Role::Write, "heartbeat"),
        p if p.starts_with("/deregister/") => (Role::Write, "deregister"),
        "/metrics" => (Role::Read, "metrics"),
        "/services" => (Role::Read, "list"),
        p if p.starts_with("/services/") => (Role::Read, "get"),
        _ if *method == Method::GET => (Role::Read, "request"),
        _ => (Role::Write, "request"),
    }
}

/// Who may do what: API tokens (`--tokens`) and the routes open without
/// one, the audit log (`--audit-log`, or a no-op), and TLS when the node
/// speaks HTTPS.
pub struct Access {
    pub auth: Arc<crate::auth::Auth>,
    pub audit: crate::audit::AuditLog,
    pub tls: Option<Arc<crate::tls::Tls>>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Access {
    /// Counts, logs and audits a refusal, and turns it into the answer.
    pub fn refuse(
        &self,
        caller: &Caller,
        operation: &str,
        target: Value,
        refusal: &Refusal,
    ) -> ApiError {
        let message = refusal.message(caller.identity.as_deref());
        self.metrics
            .auth_refused
            .with_label_values(&[refusal.reason()])
            .inc();
        let status = refusal.status();
        if status == 401 {
            tracing::info!(
                reason = refusal.reason(),
                caller = caller.addr.as_deref().unwrap_or("-"),
                operation,
                %target,
                "refused a request without a valid API token"
            );
        } else {
            tracing::warn!(
                reason = refusal.reason(),
                token_id = caller.token_id().unwrap_or("-"),
                caller = caller.addr.as_deref().unwrap_or("-"),
                operation,
                %target,
                "refused a request its token may not make"
            );
        }
        self.audit.record(
            Some(caller),
            operation,
            target,
            Outcome::Refused(status, refusal.reason().to_string()),
            None,
        );
        if status == 401 {
            ApiError::TokenRequired(message)
        } else {
            ApiError::Forbidden(message)
        }
    }

    /// May `caller` make this write? Without `--tokens`, anyone may.
    pub fn authorize_write(&self, caller: &Caller, req: &WriteRequest) -> Result<(), ApiError> {
        if !self.auth.enabled() {
            return Ok(());
        }
        let verdict = match &caller.identity {
            None if caller.token.is_some() => Err(Refusal::InvalidToken),
            None => Err(Refusal::MissingToken),
            Some(id) => id.may_write(req.service_name()),
        };
        verdict.map_err(|r| self.refuse(caller, req.kind(), req.target(), &r))
    }

    /// On the leader: who sent a write another node passed on. The token
    /// is checked against this node's own token file.
    pub fn identify(&self, token: Option<&str>) -> Option<Arc<Identity>> {
        self.auth.tokens()?.verify(token?)
    }
}

/// The original client's address a proxy in front reported in
/// `X-Registry-Caller`, when the proxy may be trusted: it sent the cluster
/// secret, or the cluster has none (then every route is open anyway).
fn proxied_caller(state: &AppState, req: &Request) -> Option<String> {
    let reported = req.headers().get(CALLER_HEADER)?.to_str().ok()?.trim();
    let trusted = match &state.leadership.net.secret {
        None => true,
        Some(s) => req
            .headers()
            .get(crate::raft::network::SECRET_HEADER)
            .is_some_and(|g| crate::auth::secret_matches(g.as_bytes(), s.as_bytes())),
    };
    let valid =
        reported.parse::<SocketAddr>().is_ok() || reported.parse::<std::net::IpAddr>().is_ok();
    (trusted && valid).then(|| reported.to_string())
}

/// The IP address in a [`Caller`]'s `addr` (`ip:port` or a bare IP),
/// canonical (IPv4-mapped IPv6 as IPv4): what `host` defaults to and what
/// an instance's origin records.
pub fn caller_ip(caller: &Caller) -> Option<String> {
    let a = caller.addr.as_deref()?;
    let ip = a
        .parse::<SocketAddr>()
        .map(|s| s.ip())
        .or_else(|_| a.parse::<std::net::IpAddr>())
        .ok()?;
    Some(ip.to_canonical().to_string())
}

/// In front of the public routes: with `--tokens`, every request but
/// `GET /health` and `--public-routes` needs a valid token whose role fits
/// the route. Puts the [`Caller`] into the request for the handlers.
pub async fn public_guard(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let mut caller = Caller {
        addr: proxied_caller(&state, &req).or_else(|| peer_of(&req)),
        ..Default::default()
    };
    if let Some(tokens) = state.access.auth.tokens() {
        let path = req.uri().path().to_string();
        let token = request_token(req.headers());
        let identity = token.and_then(|t| tokens.verify(t));
        caller.token = token.map(Secret::from);
        caller.identity = identity.clone();
        if !state.access.auth.is_public(&path) {
            let (needed, operation) = public_route(req.method(), &path);
            let verdict = match (token, identity) {
                (None, _) => Err(Refusal::MissingToken),
                (Some(_), None) => Err(Refusal::InvalidToken),
                (Some(_), Some(id)) => id.require(needed),
            };
            if let Err(r) = verdict {
                return state
                    .access
                    .refuse(&caller, operation, json!(path), &r)
                    .into_response();
            }
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// In front of the internal routes. `/raft/*` needs the cluster secret
/// (when one is set). `/cluster/*` needs the cluster secret, or, with
/// `--tokens`, an admin token instead; with neither configured it is open.
pub async fn internal_guard(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    if state.leadership.net.faults.is_isolated() {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "isolated by the test fault switch",
        )
            .into_response();
    }
    let path = req.uri().path().to_string();
    let mut caller = Caller {
        addr: peer_of(&req),
        ..Default::default()
    };
    let secret_given = req
        .headers()
        .get(crate::raft::network::SECRET_HEADER)
        .map(|v| v.as_bytes());
    let secret_ok = match &state.leadership.net.secret {
        Some(s) => secret_given.is_some_and(|g| crate::auth::secret_matches(g, s.as_bytes())),
        None => false,
    };
    if !path.starts_with("/cluster/") {
        let needs_cert = state.access.tls.as_ref().is_some_and(|t| t.mutual());
        if needs_cert
            && req
                .extensions()
                .get::<crate::tls::PeerCertified>()
                .is_none()
        {
            return refuse_peer_cert(&state, &caller, &path);
        }
        if state.leadership.net.secret.is_some() && !secret_ok {
            return refuse_secret(&state, &caller, &path);
        }
        return next.run(req).await;
    }
    if secret_ok {
        // Another node passing an operator's request on names the operator.
        let h = |name: &str| {
            req.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if let Some(original) = h(CALLER_HEADER) {
            caller.addr = Some(original);
        }
        caller.via = h(VIA_HEADER).and_then(|v| v.parse().ok());
    }
    match state.access.auth.tokens() {
        Some(tokens) => {
            let token = request_token(req.headers());
            let identity = token.and_then(|t| tokens.verify(t));
            caller.token = token.map(Secret::from);
            caller.identity = identity.clone();
            if !secret_ok {
                let verdict = match (token, identity) {
                    (None, _) => Err(Refusal::MissingToken),
                    (Some(_), None) => Err(Refusal::InvalidToken),
                    (Some(_), Some(id)) => id.require(Role::Admin),
                };
                if let Err(r) = verdict {
                    let err = state.access.refuse(&caller, "cluster", json!(path), &r);
                    let err = match err {
                        ApiError::TokenRequired(m) => ApiError::TokenRequired(format!(
                            "{m} (the /cluster/* routes take the cluster secret in X-Cluster-Secret, or an admin token)"
                        )),
                        other => other,
                    };
                    return err.into_response();
                }
            }
        }
        None => {
            if state.leadership.net.secret.is_some() && !secret_ok {
                return refuse_secret(&state, &caller, &path);
            }
        }
    }
    req.extensions_mut().insert(caller);
    next.run(req).await
}

fn refuse_peer_cert(state: &AppState, caller: &Caller, path: &str) -> Response {
    state
        .metrics
        .auth_refused
        .with_label_values(&["peer_certificate"])
        .inc();
    tracing::warn!(
        path,
        caller = caller.addr.as_deref().unwrap_or("-"),
        "refused a node-to-node request without a client certificate signed by --tls-ca"
    );
    state.access.audit.record(
        Some(caller),
        "raft",
        json!(path),
        Outcome::Refused(403, "peer_certificate".into()),
        None,
    );
    ApiError::Forbidden(
        "node-to-node routes need a client certificate signed by the cluster's --tls-ca".into(),
    )
    .into_response()
}

fn refuse_secret(state: &AppState, caller: &Caller, path: &str) -> Response {
    state
        .metrics
        .auth_refused
        .with_label_values(&["cluster_secret"])
        .inc();
    tracing::warn!(
        path,
        caller = caller.addr.as_deref().unwrap_or("-"),
        "refused a cluster request without the right secret"
    );
    state.access.audit.record(
        Some(caller),
        if path.starts_with("/cluster/") {
            "cluster"
        } else {
            "raft"
        },
        json!(path),
        Outcome::Refused(401, "cluster_secret".into()),
        None,
    );
    ApiError::Unauthorized("missing or wrong X-Cluster-Secret".into()).into_response()
}
