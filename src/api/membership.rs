//! Operator routes for cluster membership: `GET /cluster/status`,
//! `POST /cluster/nodes`, `DELETE /cluster/nodes/{id}`. They sit behind the
//! cluster secret (see `internal::guard`) and are answered by the leader: a
//! follower passes them on and returns the leader's answer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
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
/// How long a new node may take to catch up before it becomes a voter.
const CATCH_UP: Duration = Duration::from_secs(60);
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
                    .timeout(CATCH_UP + Duration::from_secs(10));
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
        let (state, id, addr) = (state.clone(), *id, addr.clone());
        async move {
            if id == state.leadership.id {
                return (
                    id,
                    Some(
                        json!({"role": state.leadership.leader_view().role, "last_contact_ms": 0}),
                    ),
                );
            }
            // `/health` is public: no secret needed.
            let req = state
                .leadership
                .net
                .client
                .get(state.leadership.net.url(&addr, "/health"))
                .timeout(PING);
            let health = match req.send().await {
                Ok(r) => r.json::<Value>().await.ok(),
                Err(_) => None,
            };
            (id, health)
        }
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
    let target = json!({"id": body["id"], "addr": body["addr"]});
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
    fn audit_membership(&self, caller: &Caller, op: &str, target: Value, resp: &Response) {
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
    let (nodes, voters) = state.membership();
    if let Some(existing) = nodes.get(&id) {
        if *existing != addr {
            return Err(ApiError::bad(
                "id",
                format!("node {id} is already a member at {existing}; remove it first"),
            ));
        }
        if voters.contains(&id) {
            return Ok(
                Json(json!({"id": id, "addr": addr, "voter": true, "changed": false}))
                    .into_response(),
            );
        }
    }
    tracing::info!(id, %addr, "adding a node: learner first");
    let added = tokio::time::timeout(
        CATCH_UP,
        state
            .leadership
            .raft
            .add_learner(id, BasicNode { addr: addr.clone() }, true),
    )
    .await;
    match added {
        Err(_) => {
            return Err(ApiError::Unavailable(format!(
                "node {id} did not catch up within {CATCH_UP:?}; it stays a learner; retry to make it a voter"
            )))
        }
        Ok(Err(e)) => return Err(change_error(e)),
        Ok(Ok(_)) => {}
    }
    state
        .leadership
        .raft
        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
        .await
        .map_err(change_error)?;
    tracing::info!(id, %addr, "node is a voter now");
    let (_, voters) = state.membership();
    Ok(
        Json(json!({"id": id, "addr": addr, "voter": true, "changed": true, "voters": voters}))
            .into_response(),
    )
}

/// `DELETE /cluster/nodes/{id}`: remove a node from the cluster.
pub async fn remove(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let mut target = Value::Null;
    let result = async {
        let Path(raw) = path?;
        let id: NodeId = raw
            .parse()
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| ApiError::bad("id", "id must be a positive integer"))?;
        target = json!({ "id": id });
        if let Some(resp) = state
            .to_leader(
                Method::DELETE,
                &format!("/cluster/nodes/{id}"),
                None,
                &headers,
                &caller,
            )
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
        let change = if voters.contains(&id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        tracing::info!(id, "removing a node");
        state
            .leadership
            .raft
            .change_membership(change, false)
            .await
            .map_err(change_error)?;
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
