//! Public API handlers: validate, write through Raft or read the local
//! replica, and shape the JSON the seed's clients expect.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{ConnectInfo, Extension, FromRequest, Path, Query, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{json, Value};

use super::access::caller_ip;
use super::{ApiError, AppState, WriteRequest};
use crate::auth::Caller;
use crate::registry::{self, validate, CommandResult, Instance, InstanceExt, Millis};

/// A JSON body whose every rejection is one of our errors (400, 413, 415).
/// An object with a key given twice is refused: parsers disagree on which
/// one counts, and a proxy in front may have checked the other.
pub struct JsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), state)
            .await
            .map_err(JsonRejection::from)?;
        let again = Request::from_parts(parts, axum::body::Body::from(bytes.clone()));
        let Json(v) = Json::<Value>::from_request(again, state).await?;
        validate::no_duplicate_keys(&bytes)?;
        Ok(Self(v))
    }
}

/// Query flags shared by the read endpoints.
#[derive(Debug, Deserialize)]
pub struct ReadParams {
    consistent: Option<String>,
    /// Blocking query: wait until the view changes past this index.
    index: Option<u64>,
    /// How long a blocking query may wait (default 30s, at most 5m).
    wait: Option<String>,
}

impl ReadParams {
    fn consistent(&self) -> Result<bool, ApiError> {
        match self.consistent.as_deref() {
            None | Some("false") | Some("0") => Ok(false),
            Some("true") | Some("1") | Some("") => Ok(true),
            Some(_) => Err(ApiError::bad(
                "consistent",
                "consistent must be true or false",
            )),
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct DeregisterParams {
    instance_id: Option<String>,
}

fn rfc3339(ms: Millis) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The `endpoint` URL of an instance, as the old clients registered it.
pub fn endpoint_url(i: &Instance, https: bool) -> String {
    let scheme = if https { "https" } else { "http" };
    format!("{scheme}://{}:{}", url_host(&i.host), i.port)
}

/// The contract's JSON form of a stored instance.
pub fn instance_json(i: &Instance, https: bool) -> Value {
    json!({
        "endpoint": endpoint_url(i, https),
        "service_name": i.service_name,
        "instance_id": i.instance_id,
        "host": i.host,
        "port": i.port,
        "health_endpoint": i.health_endpoint,
        "metadata": i.metadata,
        "ttl_seconds": i.ttl_seconds,
        "registered_at": rfc3339(i.registered_at),
        "last_heartbeat": rfc3339(i.last_heartbeat),
    })
}

impl AppState {
    /// Runs a handler's work, counts the operation with its time, and turns
    /// the outcome into a response.
    async fn timed(
        &self,
        op: &str,
        work: impl Future<Output = Result<Response, ApiError>>,
    ) -> Response {
        let started = Instant::now();
        let result = work.await;
        let status = match &result {
            Ok(_) => "success",
            Err(e) => e.metric_status(),
        };
        self.metrics
            .observe(op, status, started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            if e.status().is_server_error() {
                tracing::warn!(operation = op, error = %e, "request failed");
            }
        }
        result.unwrap_or_else(IntoResponse::into_response)
    }

    /// Adds the read headers to a response that lacks them (a failed read).
    fn with_read_headers(&self, mut resp: Response) -> Response {
        if !resp.headers().contains_key("x-registry-index") {
            let index = self.replica.read().applied_index();
            resp.headers_mut().extend(self.read_headers(index));
        }
        resp
    }

    /// The three headers every read carries.
    fn read_headers(&self, applied_index: u64) -> [(HeaderName, HeaderValue); 3] {
        let view = self.leadership.leader_view();
        [
            (
                HeaderName::from_static("x-registry-index"),
                HeaderValue::from(applied_index),
            ),
            (
                HeaderName::from_static("x-registry-known-leader"),
                HeaderValue::from_static(if view.live { "true" } else { "false" }),
            ),
            (
                HeaderName::from_static("x-registry-last-contact"),
                HeaderValue::from(view.last_contact_ms),
            ),
        ]
    }
}

fn service_name_from_path(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(name) = path?;
    validate::service_name(&name, "service_name")?;
    Ok(name)
}

/// A write answered with a result of another kind: a bug, never the
/// client's fault.
fn unexpected(op: &str, result: &CommandResult) -> ApiError {
    ApiError::Internal(format!("unexpected result of {op}: {result:?}"))
}

pub async fn register(
    State(state): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(caller): Extension<Caller>,
    body: Result<JsonBody, ApiError>,
) -> Response {
    state
        .timed("register", async {
            let JsonBody(body) = body?;
            let mut req = registry::parse_register_with(&body, state.default_ttl)?;
            let ip = caller_ip(&caller).unwrap_or_else(|| peer.ip().to_canonical().to_string());
            if req.host.is_none() {
                req.host = Some(ip.clone());
            }
            req.origin = Some(ip);
            let https = req.https;
            match state.write(WriteRequest::Register(req), &caller).await? {
                CommandResult::Registered(inst) => {
                    let mut body = instance_json(&inst, https);
                    body["message"] = json!("Service registered successfully");
                    Ok(Json(body).into_response())
                }
                other => Err(unexpected("register", &other)),
            }
        })
        .await
}

pub async fn heartbeat(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    body: Result<JsonBody, ApiError>,
) -> Response {
    state
        .timed("heartbeat", async {
        let JsonBody(body) = body?;
        let mut req = registry::parse_heartbeat(&body)?;
        req.origin = caller_ip(&caller);
        let (service, instance) = (req.service_name.clone(), req.instance_id.clone());
        match state.write(WriteRequest::Heartbeat(req), &caller).await? {
            CommandResult::Touched(n) => Ok(Json(json!({
                "status": "ok",
                "message": "Heartbeat received",
                "service_name": service,
                "instance_id": instance,
                "renewed": n,
                "revived": [],
            }))
            .into_response()),
            // Expired instances a heartbeat brought back (old clients never
            // register again after a 404).
            CommandResult::Revived(ids) => Ok(Json(json!({
                "status": "ok",
                "message": format!(
                    "Heartbeat received; the expired instance(s) {} registered again with their last registration",
                    ids.join(", ")
                ),
                "service_name": service,
                "instance_id": instance,
                "renewed": 0,
                "revived": ids,
            }))
            .into_response()),
            CommandResult::NotFound => Err(not_registered(&service, instance.as_deref())),
            other => Err(unexpected("heartbeat", &other)),
        }
    })
        .await
}

fn not_registered(service: &str, instance: Option<&str>) -> ApiError {
    match instance {
        Some(id) => ApiError::NotFound(format!(
            "instance '{id}' of service '{service}' is not registered; register it again"
        )),
        None => ApiError::NotFound(format!(
            "service '{service}' is not registered; register it again"
        )),
    }
}

pub async fn deregister(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<DeregisterParams>, QueryRejection>,
) -> Response {
    state
        .timed("deregister", async {
            let service = service_name_from_path(path)?;
            let Query(q) = query?;
            if let Some(id) = &q.instance_id {
                validate::instance_id(id)?;
            }
            let req = WriteRequest::Deregister {
                service_name: service.clone(),
                instance_id: q.instance_id.clone(),
                origin: caller_ip(&caller),
            };
            match state.write(req, &caller).await? {
                CommandResult::Touched(n) => Ok(Json(json!({
                    "status": "deregistered",
                    "message": "Service deregistered",
                    "service_name": service,
                    "instance_id": q.instance_id,
                    "removed": n,
                }))
                .into_response()),
                CommandResult::NotFound => Err(not_registered(&service, q.instance_id.as_deref())),
                other => Err(unexpected("deregister", &other)),
            }
        })
        .await
}

pub async fn list_services(
    State(state): State<Arc<AppState>>,
    query: Result<Query<ReadParams>, QueryRejection>,
) -> Response {
    let resp = state
        .timed("list", async {
            let Query(q) = query?;
            let consistent = q.consistent()?;
            if let Some(after) = q.index {
                let wait = super::watch::parse_wait(q.wait.as_deref())?;
                state
                    .watching
                    .block_until_changed(after, wait, |v| v.list())
                    .await?;
            }
            if consistent {
                state.read_barrier().await?;
            }
            let (names, index) = {
                let applied = state.replica.read();
                let names: Vec<&str> = applied.registry.service_names().collect();
                (
                    serde_json::to_vec(&names).expect("strings serialize"),
                    applied.applied_index(),
                )
            };
            Ok((
                state.read_headers(index),
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                names,
            )
                .into_response())
        })
        .await;
    state.with_read_headers(resp)
}

pub async fn get_service(
    State(state): State<Arc<AppState>>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ReadParams>, QueryRejection>,
) -> Response {
    // The index a `404` was decided at, so its header matches the answer.
    let mut not_found_at = None;
    let mut resp = state
        .timed("get", async {
        let service = service_name_from_path(path)?;
        let Query(q) = query?;
        let consistent = q.consistent()?;
        if let Some(after) = q.index {
            let wait = super::watch::parse_wait(q.wait.as_deref())?;
            state
                .watching.block_until_changed(after, wait, |v| v.service(&service))
                .await?;
        }
        if consistent {
            state.read_barrier().await?;
        }
        let (body, index) = {
            let applied = state.replica.read();
            let index = applied.applied_index();
            let Some(instances) = applied.registry.service_ext(&service) else {
                drop(applied);
                not_found_at = Some(index);
                return Err(ApiError::NotFound(format!(
                    "service '{service}' is not registered"
                )));
            };
            let instances: Vec<(&Instance, &InstanceExt)> = instances.collect();
            // Clients written for the seed and the old registry read one
            // instance's fields at the top level: give them the one heard
            // from most recently.
            let (latest, latest_ext) = instances
                .iter()
                .max_by_key(|(i, _)| (i.last_heartbeat, std::cmp::Reverse(&i.instance_id)))
                .copied()
                .expect("a registered service has an instance");
            let secs = |ms: Millis| ms as f64 / 1000.0;
            let ttl_remaining = (latest.deadline() - crate::clock::now_ms()).max(0) / 1000;
            let body = json!({
                "service_name": service,
                "instances": instances.iter().map(|(i, e)| instance_json(i, e.https)).collect::<Vec<_>>(),
                "host": latest.host,
                "port": latest.port,
                "health_endpoint": latest.health_endpoint,
                "metadata": latest.metadata,
                "url": format!("http://{}:{}", url_host(&latest.host), latest.port),
                "endpoint": endpoint_url(latest, latest_ext.https),
                "registered_at": secs(latest.registered_at),
                "last_heartbeat": secs(latest.last_heartbeat),
                "ttl_remaining": ttl_remaining,
            });
            (body, index)
        };
        Ok((state.read_headers(index), Json(body)).into_response())
    })
        .await;
    if let Some(index) = not_found_at {
        resp.headers_mut().extend(state.read_headers(index));
    }
    state.with_read_headers(resp)
}

/// An IPv6 literal needs brackets inside a URL.
fn url_host(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let view = state.leadership.leader_view();
    let m = state.leadership.raft.metrics().borrow().clone();
    let (index, services, instances, expiry_paused) = {
        let applied = state.replica.read();
        (
            applied.applied_index(),
            applied.registry.service_count(),
            applied.registry.instance_count(),
            applied.registry.expiry_paused(),
        )
    };
    let membership = m.membership_config.membership();
    let members: Vec<u64> = membership.voter_ids().collect();
    let learners: Vec<u64> = membership.learner_ids().collect();
    let body = json!({
        "status": if view.live { "healthy" } else { "unhealthy" },
        "node_id": state.leadership.id,
        "role": view.role,
        "leader_id": view.leader_id,
        "term": view.term,
        "last_applied": index,
        "committed": state.log.committed_index(),
        "members": members,
        "learners": learners,
        "last_contact_ms": view.last_contact_ms,
        "services": services,
        "instances": instances,
        "expiry_paused": expiry_paused,
        // The leader's latest expiry round; null on other nodes.
        "expiry": state.leases.status(),
    });
    let status = if view.live {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut resp = (status, state.read_headers(index), Json(body)).into_response();
    if !view.live {
        resp.headers_mut().insert(
            axum::http::header::RETRY_AFTER,
            HeaderValue::from(super::error::RETRY_AFTER_SECS),
        );
    }
    resp
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = state.leadership.raft.metrics().borrow().clone();
    let metrics = &state.metrics;
    {
        let applied = state.replica.read();
        metrics
            .active_services
            .set(applied.registry.service_count() as i64);
        metrics
            .active_instances
            .set(applied.registry.instance_count() as i64);
        metrics.last_applied.set(applied.applied_index() as i64);
        metrics
            .expiry_paused
            .set(i64::from(applied.registry.expiry_paused()));
        metrics
            .tombstones
            .set(applied.registry.tombstone_count() as i64);
    }
    metrics.term.set(m.current_term as i64);
    metrics
        .is_leader
        .set(i64::from(m.state == openraft::ServerState::Leader));
    metrics.committed.set(state.log.committed_index() as i64);
    metrics.last_log.set(m.last_log_index.unwrap_or(0) as i64);
    let installed = state.replica.snapshots_installed();
    metrics
        .snapshots_installed
        .inc_by(installed.saturating_sub(metrics.snapshots_installed.get()));
    if let Ok(size) = state.db.size_on_disk() {
        metrics.db_size.set(size as i64);
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
        .into_response()
}

pub async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

pub async fn method_not_allowed(req: Request) -> ApiError {
    let _ = req;
    ApiError::MethodNotAllowed
}
