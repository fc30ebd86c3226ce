//! Routes other nodes and operators call: the Raft RPCs (bincode), the
//! leader's side of forwarding (JSON) and the `/cluster/*` membership routes.
//! All of them sit behind the cluster secret, when one is set, and behind
//! the test fault switch.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::forward::{ReadIndexReply, WriteReply, WriteRequest};
use super::{ApiError, AppState, MAX_RAFT_BODY};
use crate::raft::network::SECRET_HEADER;

pub fn router(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/write", post(write))
        .route("/raft/read-index", post(read_index))
        .route("/cluster/status", get(super::cluster::status))
        .route("/cluster/nodes", post(super::cluster::add))
        .route("/cluster/nodes/{id}", delete(super::cluster::remove))
        .layer(DefaultBodyLimit::max(MAX_RAFT_BODY))
        .layer(middleware::from_fn_with_state(state, guard))
}

/// Compares secrets in time that does not depend on where they differ.
pub fn secret_matches(given: &[u8], expected: &[u8]) -> bool {
    if given.len() != expected.len() {
        return false;
    }
    given
        .iter()
        .zip(expected)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

/// Refuses requests without the cluster secret, and every request while the
/// test fault switch cuts this node off.
async fn guard(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.net.faults.is_isolated() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "isolated by the test fault switch",
        )
            .into_response();
    }
    if let Some(secret) = &state.net.secret {
        let given = req
            .headers()
            .get(SECRET_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if !secret_matches(given, secret.as_bytes()) {
            tracing::warn!(path = %req.uri().path(), "refused a cluster request without the right secret");
            return ApiError::Unauthorized("missing or wrong X-Cluster-Secret".into())
                .into_response();
        }
    }
    next.run(req).await
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(body)
}

#[cold]
fn bad_message(e: &bincode::Error) -> Response {
    (
        StatusCode::BAD_REQUEST,
        format!("undecodable raft message: {e}"),
    )
        .into_response()
}

fn encode<T: Serialize>(v: &T) -> Response {
    match bincode::serialize(v) {
        Ok(bytes) => bytes.into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn append(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let req = match decode(&body) {
        Ok(r) => r,
        Err(e) => return bad_message(&e),
    };
    let result = state.raft.append_entries(req).await;
    if result.is_ok() {
        state.contact.touch();
    }
    encode(&result)
}

async fn vote(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match decode(&body) {
        Ok(req) => encode(&state.raft.vote(req).await),
        Err(e) => bad_message(&e),
    }
}

async fn snapshot(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let req = match decode(&body) {
        Ok(r) => r,
        Err(e) => return bad_message(&e),
    };
    let result = state.raft.install_snapshot(req).await;
    if result.is_ok() {
        state.contact.touch();
    }
    encode(&result)
}

/// The leader's side of a forwarded write. Never forwards again: a node that
/// is not the leader says so, and the sender looks for the leader itself.
async fn write(
    State(state): State<Arc<AppState>>,
    Json(req): Json<WriteRequest>,
) -> Json<WriteReply> {
    let view = state.leader_view();
    if view.leader_id != Some(state.id) {
        return Json(WriteReply::NotLeader(view.leader_id));
    }
    Json(state.write_local(&req, state.leader_wait).await)
}

async fn read_index(State(state): State<Arc<AppState>>) -> Json<ReadIndexReply> {
    let view = state.leader_view();
    if view.leader_id != Some(state.id) {
        return Json(ReadIndexReply::NotLeader(view.leader_id));
    }
    Json(state.read_index_local(state.leader_wait).await)
}
