//! Operator routes for cluster membership: `GET /cluster/status`,
//! `POST /cluster/nodes`, `DELETE /cluster/nodes/{id}`. They sit behind the
//! cluster secret (see `internal::guard`) and are answered by the leader: a
//! follower passes them on and returns the leader's answer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header::AUTHORIZATION, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use openraft::error::ChangeMembershipError;
use openraft::{BasicNode, ChangeMembers, ServerState};
use serde_json::{json, Value};

use super::access::{CALLER_HEADER, VIA_HEADER};
use super::forward::LeaderAt;
use super::handlers::JsonBody;
use super::{ApiError, AppState};
use crate::audit::Outcome;
use crate::auth::Caller;
use crate::forwarding::Attempt;
use crate::raft::{ClientWriteError, NodeId, RaftError};

/// Marks a request one node passed on to the leader, so it is not passed on again.
const FORWARDED: &str = "x-registry-forwarded";
/// How long a new node may take to catch up before it becomes a voter,
/// unless the request says otherwise (`wait_seconds`, up to [`MAX_WAIT`]).
const CATCH_UP: Duration = Duration::from_secs(60);
/// The longest `wait_seconds` an operator may ask for.
const MAX_WAIT: u64 = 600;
/// A learner is promoted once its log is at most this many entries behind
/// the leader's (and holds the entry that added it).
const MAX_LAG: u64 = 100;
/// How long a membership change may take to commit before the answer is
/// `503` (it may still complete later).
const COMMIT_WAIT: Duration = Duration::from_secs(20);
/// How long the status waits for each member's `/health`.
const PING: Duration = Duration::from_millis(500);

impl AppState {
    /// Passes an operator request to the leader when this node is not it.
    /// `None`: answer here (this node leads, or the request was already
    /// passed on once).
    async fn to_leader(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &HeaderMap,
        caller: &Caller,
    ) -> Option<Response> {
        if headers.contains_key(FORWARDED) {
            return None;
        }
        let deadline = std::time::Instant::now() + self.leadership.leader_wait;
        let method = &method;
        let answer = self
            .with_leader(deadline, "pass the request on", |at, _| async move {
                let LeaderAt::There(addr) = at else {
                    return Ok(Attempt::Answered(None));
                };
                let mut req = self
                    .leadership
                    .net
                    .request(method.clone(), self.leadership.net.url(&addr, path))
                    .header(FORWARDED, "1")
                    .header(VIA_HEADER, self.leadership.id.to_string())
                    .timeout(Duration::from_secs(MAX_WAIT) + COMMIT_WAIT + Duration::from_secs(10));
                if let Some(a) = &caller.addr {
                    req = req.header(CALLER_HEADER, a);
                }
                // The leader checks an admin token itself (needed where
                // no cluster secret is set; names the caller in its audit).
                for name in [AUTHORIZATION.as_str(), crate::auth::REGISTRY_TOKEN_HEADER] {
                    if let Some(v) = headers.get(name) {
                        req = req.header(name, v.as_bytes());
                    }
                }
                if let Some(b) = body {
                    req = req.json(b);
                }
                Ok(match req.send().await {
                    Ok(r) => {
                        let status = StatusCode::from_u16(r.status().as_u16())
                            .unwrap_or(StatusCode::BAD_GATEWAY);
                        let body = r.bytes().await.unwrap_or_default();
                        let json = [(axum::http::header::CONTENT_TYPE, "application/json")];
                        Attempt::Answered(Some((status, json, body).into_response()))
                    }
                    Err(e) if e.is_connect() => Attempt::Retry,
                    Err(e) => Attempt::Unknown(format!("the leader at {addr} did not answer: {e}")),
                })
            })
            .await;
        answer.unwrap_or_else(|e| Some(e.into_response()))
    }

    fn membership(&self) -> (BTreeMap<NodeId, String>, BTreeSet<NodeId>) {
        let m = self
            .leadership
            .raft
            .metrics()
            .borrow()
            .membership_config
            .clone();
        let nodes = m
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        let voters = m.membership().voter_ids().collect();
        (nodes, voters)
    }

    /// A member's own view (`/health`, which is public), or `None` when it
    /// does not answer within [`PING`]. This node answers for itself.
    async fn ping(&self, id: NodeId, addr: &str) -> Option<Value> {
        if id == self.leadership.id {
            return Some(json!({"role": self.leadership.leader_view().role, "last_contact_ms": 0}));
        }
        let req = self
            .leadership
            .net
            .client
            .get(self.leadership.net.url(addr, "/health"))
            .timeout(PING);
        match req.send().await {
            Ok(r) => r.json::<Value>().await.ok(),
            Err(_) => None,
        }
    }

    /// Proposes a membership change and waits at most [`COMMIT_WAIT`] for it.
    async fn change(&self, change: ChangeMembers<NodeId, BasicNode>) -> Result<(), ApiError> {
        let changed = self.leadership.raft.change_membership(change, false);
        match tokio::time::timeout(COMMIT_WAIT, changed).await {
            Ok(r) => r.map(|_| ()).map_err(change_error),
            Err(_) => Err(ApiError::Unavailable(format!(
                "the membership change was proposed but not committed within {COMMIT_WAIT:?}: \
                 too few voters answer; it completes once enough of them are back"
            ))),
        }
    }

    /// Waits until the leader's log reaches learner `id` up to `since` and
    /// it is at most [`MAX_LAG`] entries behind; `503` after `wait`, or
    /// when this node stops leading.
    async fn caught_up(&self, id: NodeId, since: u64, wait: Duration) -> Result<(), ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = self.leadership.raft.metrics();
        loop {
            let (lag, leading) = {
                let m = rx.borrow_and_update();
                let last = m.last_log_index.unwrap_or(0);
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).copied())
                    .flatten()
                    .map(|l| l.index)
                    .filter(|i| *i >= since);
                (
                    matched.map(|i| last.saturating_sub(i)),
                    m.state == ServerState::Leader,
                )
            };
            if !leading {
                return Err(ApiError::Unavailable(format!(
                    "leadership changed while node {id} was catching up; it stays a learner; retry"
                )));
            }
            if lag.is_some_and(|l| l <= MAX_LAG) {
                return Ok(());
            }
            let behind = match lag {
                Some(l) => format!("it is {l} entries behind"),
                None => "it has not answered the leader".to_string(),
            };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(ApiError::Unavailable(format!(
                    "node {id} did not catch up within {wait:?} ({behind}); it stays a learner: \
                     check that it runs and that the leader can reach it, then add it again to \
                     make it a voter, or remove it"
                )));
            }
            let changed = tokio::time::timeout(left.min(Duration::from_millis(200)), rx.changed());
            if let Ok(Err(_)) = changed.await {
                return Err(ApiError::Unavailable("the node is stopping".into()));
            }
        }
    }
}

fn change_error(e: RaftError<ClientWriteError>) -> ApiError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
            ApiError::Unavailable("leadership changed during the request; retry".into())
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(
            ChangeMembershipError::InProgress(e),
        )) => ApiError::Unavailable(format!(
            "another membership change is in progress; retry shortly ({e})"
        )),
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ApiError::bad("id", e.to_string())
        }
        RaftError::Fatal(f) => ApiError::Unavailable(format!("raft stopped: {f}")),
    }
}

/// `GET /cluster/status`
pub async fn status(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
) -> Response {
    if let Some(resp) = state
        .to_leader(Method::GET, "/cluster/status", None, &headers, &caller)
        .await
    {
        return resp;
    }
    let m = state.leadership.raft.metrics().borrow().clone();
    let is_leader = m.state == ServerState::Leader;
    let last_log = m.last_log_index.unwrap_or(0);
    let (nodes, voters) = state.membership();
    // Ask every member for its own view, at once and briefly.
    let pings = nodes.iter().map(|(id, addr)| {
        let state = state.clone();
        async move { (*id, state.ping(*id, addr).await) }
    });
    let health: BTreeMap<NodeId, Option<Value>> =
        futures::future::join_all(pings).await.into_iter().collect();
    let members: Vec<Value> = nodes
        .iter()
        .map(|(id, addr)| {
            let matched = if *id == state.leadership.id && is_leader {
                Some(last_log)
            } else {
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(id))
                    .map(|l| l.map_or(0, |l| l.index))
            };
            let h = health.get(id).cloned().flatten();
            json!({
                "id": id,
                "addr": addr,
                "voter": voters.contains(id),
                "role": h.as_ref().map(|h| h["role"].clone()),
                "reachable": h.is_some(),
                "matched_index": matched,
                "lag": matched.map(|x| last_log.saturating_sub(x)),
                "last_contact_ms": h.as_ref().map(|h| h["last_contact_ms"].clone()),
            })
        })
        .collect();
    Json(json!({
        "leader_id": m.current_leader,
        "term": m.current_term,
        "answered_by": state.leadership.id,
        "last_log_index": last_log,
        "committed": state.log.committed_index(),
        // A joint configuration: a change waits for voters of both the old
        // and the new set.
        "membership_changing": m.membership_config.membership().get_joint_config().len() > 1,
        "members": members,
    }))
    .into_response()
}

/// `POST /cluster/nodes {"id", "addr"}`: add a node as a learner, wait
/// until it has caught up, then make it a voter.
pub async fn add(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<JsonBody, ApiError>,
) -> Response {
    let body = match body {
        Ok(JsonBody(b)) => b,
        Err(e) => return e.into_response(),
    };
    let target = json!({"id": body["id"], "addr": body["addr"], "voter": body["voter"]});
    let resp = match state
        .to_leader(
            Method::POST,
            "/cluster/nodes",
            Some(&body),
            &headers,
            &caller,
        )
        .await
    {
        Some(resp) => resp,
        None => add_here(&state, &body)
            .await
            .unwrap_or_else(IntoResponse::into_response),
    };
    state.audit_membership(&caller, "cluster.add", target, &resp);
    resp
}

impl AppState {
    /// Audits a membership change this node made or passed on.
    pub(super) fn audit_membership(
        &self,
        caller: &Caller,
        op: &str,
        target: Value,
        resp: &Response,
    ) {
        let status = resp.status();
        let outcome = if status.is_success() {
            Outcome::Ok
        } else {
            Outcome::Status(status.as_u16())
        };
        self.access
            .audit
            .record(Some(caller), op, target, outcome, None);
    }
}

async fn add_here(state: &AppState, body: &Value) -> Result<Response, ApiError> {
    let id = body["id"]
        .as_u64()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::bad("id", "id must be a positive integer"))?;
    let addr = body["addr"]
        .as_str()
        .filter(|a| {
            a.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0))
        })
        .ok_or_else(|| ApiError::bad("addr", "addr must be HOST:PORT"))?
        .to_string();
    let wait = wait_seconds(body)?;
    let voter = match &body["voter"] {
        Value::Null => true,
        Value::Bool(b) => *b,
        _ => return Err(ApiError::bad("voter", "voter must be true or false")),
    };
    let (nodes, voters) = state.membership();
    if let Some((other, _)) = nodes
        .iter()
        .find(|(i, a)| **i != id && a.eq_ignore_ascii_case(&addr))
    {
        return Err(ApiError::bad(
            "addr",
            format!("{addr} is already the address of node {other}; give the new node its own"),
        ));
    }
    let since = match nodes.get(&id) {
        Some(existing) if *existing != addr => {
            return Err(ApiError::bad(
                "id",
                format!("node {id} is already a member at {existing}; remove it first"),
            ));
        }
        Some(_) if voters.contains(&id) => {
            if !voter {
                return Err(ApiError::bad(
                    "voter",
                    format!("node {id} is a voter; remove it first to add it back as a learner"),
                ));
            }
            return Ok(Json(
                json!({"id": id, "addr": addr, "voter": true, "changed": false, "voters": voters}),
            )
            .into_response());
        }
        Some(_) if !voter => {
            return Ok(Json(
                json!({"id": id, "addr": addr, "voter": false, "changed": false, "voters": voters}),
            )
            .into_response());
        }
        // A learner already: promote it once it has caught up.
        Some(_) => membership_index(state),
        None => {
            tracing::info!(id, %addr, "adding a node: learner first");
            let added =
                state
                    .leadership
                    .raft
                    .add_learner(id, BasicNode { addr: addr.clone() }, false);
            match tokio::time::timeout(COMMIT_WAIT, added).await {
                Err(_) => {
                    return Err(ApiError::Unavailable(format!(
                    "adding node {id} as a learner was not committed within {COMMIT_WAIT:?}; retry"
                )))
                }
                Ok(Err(e)) => return Err(change_error(e)),
                Ok(Ok(r)) => r.log_id.index,
            }
        }
    };
    if !voter {
        tracing::info!(id, %addr, "node added as a learner (read replica)");
        return Ok(Json(
            json!({"id": id, "addr": addr, "voter": false, "changed": true, "voters": voters}),
        )
        .into_response());
    }
    promote_here(state, id, &addr, since, wait).await
}

/// The node id in a `/cluster/nodes/{id}` path: a positive integer.
fn path_node_id(path: Result<Path<String>, PathRejection>) -> Result<NodeId, ApiError> {
    let Path(raw) = path?;
    raw.parse()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::bad("id", "id must be a positive integer"))
}

/// `wait_seconds` in a body: how long a learner may take to catch up.
fn wait_seconds(body: &Value) -> Result<Duration, ApiError> {
    match &body["wait_seconds"] {
        Value::Null => Ok(CATCH_UP),
        v => v
            .as_u64()
            .filter(|s| (1..=MAX_WAIT).contains(s))
            .map(Duration::from_secs)
            .ok_or_else(|| {
                ApiError::bad(
                    "wait_seconds",
                    format!("wait_seconds must be a whole number of seconds from 1 to {MAX_WAIT}"),
                )
            }),
    }
}

/// The log index of the membership in force.
fn membership_index(state: &AppState) -> u64 {
    state
        .leadership
        .raft
        .metrics()
        .borrow()
        .membership_config
        .log_id()
        .map_or(0, |l| l.index)
}

/// Makes learner `id` a voter once its log holds index `since` and it has
/// caught up; `503` after `wait`, and it stays a learner.
async fn promote_here(
    state: &AppState,
    id: NodeId,
    addr: &str,
    since: u64,
    wait: Duration,
) -> Result<Response, ApiError> {
    state.caught_up(id, since, wait).await?;
    state
        .change(ChangeMembers::AddVoterIds(BTreeSet::from([id])))
        .await?;
    tracing::info!(id, %addr, "node is a voter now");
    let (_, voters) = state.membership();
    Ok(
        Json(json!({"id": id, "addr": addr, "voter": true, "changed": true, "voters": voters}))
            .into_response(),
    )
}

/// `POST /cluster/nodes/{id}/promote [{"wait_seconds"}]`: make a learner a
/// voter once it has caught up (as an addition does).
pub async fn promote(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: axum::body::Bytes,
) -> Response {
    let mut target = Value::Null;
    let result = async {
        let id = path_node_id(path)?;
        target = json!({ "id": id });
        // The body is optional: none, or a JSON object.
        let body: Value = if body.iter().all(u8::is_ascii_whitespace) {
            json!({})
        } else {
            serde_json::from_slice(&body)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(|| ApiError::bad("body", "the body must be empty or a JSON object"))?
        };
        let wait = wait_seconds(&body)?;
        if let Some(resp) = state
            .to_leader(
                Method::POST,
                &format!("/cluster/nodes/{id}/promote"),
                Some(&body),
                &headers,
                &caller,
            )
            .await
        {
            return Ok(resp);
        }
        let (nodes, voters) = state.membership();
        let Some(addr) = nodes.get(&id) else {
            return Err(ApiError::NotFound(format!("node {id} is not a member")));
        };
        if voters.contains(&id) {
            return Ok(Json(
                json!({"id": id, "addr": addr, "voter": true, "changed": false, "voters": voters}),
            )
            .into_response());
        }
        promote_here(&state, id, addr, membership_index(&state), wait).await
    }
    .await;
    let resp = result.unwrap_or_else(IntoResponse::into_response);
    if !target.is_null() {
        state.audit_membership(&caller, "cluster.promote", target, &resp);
    }
    resp
}

/// `?force=true` on `DELETE /cluster/nodes/{id}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

/// `DELETE /cluster/nodes/{id}[?force=true]`: remove a node from the
/// cluster. Removing a voter that would leave fewer reachable voters than a
/// majority of those remaining is refused (`409`) unless forced: the
/// cluster could commit nothing, that change included, until they return.
pub async fn remove(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<RemoveQuery>, QueryRejection>,
) -> Response {
    let mut target = Value::Null;
    let result = async {
        let id = path_node_id(path)?;
        let Query(RemoveQuery { force }) = query.map_err(|e| {
            ApiError::bad(
                "force",
                format!("the only parameter is force=true|false ({})", e.body_text()),
            )
        })?;
        target = json!({ "id": id, "force": force });
        let path = if force {
            format!("/cluster/nodes/{id}?force=true")
        } else {
            format!("/cluster/nodes/{id}")
        };
        if let Some(resp) = state
            .to_leader(Method::DELETE, &path, None, &headers, &caller)
            .await
        {
            return Ok(resp);
        }
        let (nodes, voters) = state.membership();
        if !nodes.contains_key(&id) {
            return Err(ApiError::NotFound(format!("node {id} is not a member")));
        }
        if voters.len() == 1 && voters.contains(&id) {
            return Err(ApiError::bad("id", "cannot remove the last voter"));
        }
        if voters.contains(&id) && !force {
            let remaining: Vec<NodeId> = voters.iter().copied().filter(|v| *v != id).collect();
            let answers = futures::future::join_all(remaining.iter().map(|v| {
                let addr = nodes.get(v).cloned().unwrap_or_default();
                let state = &state;
                async move { (*v, state.ping(*v, &addr).await.is_some()) }
            }))
            .await;
            let reachable: Vec<NodeId> = answers
                .iter()
                .filter(|(_, up)| *up)
                .map(|(v, _)| *v)
                .collect();
            let need = remaining.len() / 2 + 1;
            if reachable.len() < need {
                return Err(ApiError::Conflict(format!(
                    "removing node {id} would leave voters {remaining:?}, of which only \
                     {reachable:?} answer: fewer than the {need} needed to commit anything, this \
                     change included, until the others are back; bring them back (or remove a \
                     node that is down instead), or force it with force=true \
                     (`cluster remove {id} --force`)"
                )));
            }
        }
        let change = if voters.contains(&id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        tracing::info!(id, force, "removing a node");
        state.change(change).await?;
        let (_, voters) = state.membership();
        Ok(Json(json!({"removed": id, "voters": voters})).into_response())
    }
    .await;
    let resp = result.unwrap_or_else(IntoResponse::into_response);
    if !target.is_null() {
        state.audit_membership(&caller, "cluster.remove", target, &resp);
    }
    resp
}
