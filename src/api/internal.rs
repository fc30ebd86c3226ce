//! Routes other nodes and operators call: the Raft RPCs (bincode), the
//! leader's side of forwarding (JSON) and the `/cluster/*` membership routes.
//! All of them sit behind the cluster secret, when one is set, and behind
//! the test fault switch.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::forward::write_outcome;
use super::{AppState, MAX_RAFT_BODY};
use crate::audit::Outcome;
use crate::auth::{Caller, Secret};
use crate::forwarding::{IncomingWrite, ReadIndexReply, WriteReply};

pub fn router(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/write", post(write))
        .route("/raft/writes", post(writes))
        .route("/raft/read-index", post(read_index))
        .route("/cluster/status", get(super::membership::status))
        .route("/cluster/nodes", post(super::membership::add))
        .route("/cluster/nodes/{id}", delete(super::membership::remove))
        .route(
            "/cluster/nodes/{id}/promote",
            post(super::membership::promote),
        )
        .route("/cluster/snapshot", get(super::backup::snapshot))
        .layer(DefaultBodyLimit::max(MAX_RAFT_BODY))
        .layer(middleware::from_fn_with_state(
            state,
            super::access::internal_guard,
        ))
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
    let result = state.leadership.raft.append_entries(req).await;
    if result.is_ok() {
        state.leadership.contact.touch();
    }
    encode(&result)
}

async fn vote(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    match decode(&body) {
        Ok(req) => encode(&state.leadership.raft.vote(req).await),
        Err(e) => bad_message(&e),
    }
}

async fn snapshot(State(state): State<Arc<AppState>>, body: Bytes) -> Response {
    let req = match decode(&body) {
        Ok(r) => r,
        Err(e) => return bad_message(&e),
    };
    let result = state.leadership.raft.install_snapshot(req).await;
    if result.is_ok() {
        state.leadership.contact.touch();
    }
    encode(&result)
}

/// The leader's side of a forwarded write. Never forwards again: a node that
/// is not the leader says so, and the sender looks for the leader itself.
///
/// The leader checks the caller's token again against its own token file
/// (the receiving node checked it too): a write the caller may not make is
/// refused here whatever the forwarding node said.
async fn write(
    State(state): State<Arc<AppState>>,
    Json(incoming): Json<IncomingWrite>,
) -> Json<WriteReply> {
    Json(leader_write(&state, incoming).await)
}

/// Most writes one `/raft/writes` call may carry (senders send at most
/// [`super::batch_forward::MAX_BATCH`]).
const MAX_FORWARDED_BATCH: usize = 1024;

/// Several forwarded writes in one call (batched forwarding): each is
/// checked, committed and audited as on `/raft/write`, all at once, so they
/// share log entries; the answers come back in the same order.
async fn writes(
    State(state): State<Arc<AppState>>,
    Json(incoming): Json<Vec<IncomingWrite>>,
) -> Response {
    if incoming.len() > MAX_FORWARDED_BATCH {
        return (
            StatusCode::BAD_REQUEST,
            format!("at most {MAX_FORWARDED_BATCH} writes per call"),
        )
            .into_response();
    }
    let replies =
        futures::future::join_all(incoming.into_iter().map(|w| leader_write(&state, w))).await;
    Json(replies).into_response()
}

/// The leader's side of one forwarded write.
async fn leader_write(state: &AppState, incoming: IncomingWrite) -> WriteReply {
    let view = state.leadership.leader_view();
    if view.leader_id != Some(state.leadership.id) {
        return WriteReply::NotLeader(view.leader_id);
    }
    let (req, caller) = match incoming {
        IncomingWrite::Forwarded(f) => {
            let caller = Caller {
                identity: state.access.identify(f.token.as_deref()),
                token: f.token.map(Secret::from),
                addr: f.caller,
                via: f.via,
            };
            (f.write, caller)
        }
        IncomingWrite::Bare(req) => (req, Caller::default()),
    };
    if let Err(e) = state.access.authorize_write(&caller, &req) {
        return WriteReply::Refused {
            status: e.status().as_u16(),
            message: e.to_string(),
        };
    }
    let reply = state.write_local(&req, state.leadership.leader_wait).await;
    if req.audited() {
        let outcome = match &reply {
            WriteReply::Done(r) => write_outcome(&Ok(r.clone())),
            WriteReply::NotLeader(_) | WriteReply::Unavailable(_) => Outcome::Status(503),
            WriteReply::Refused { status, .. } => Outcome::Status(*status),
        };
        state
            .access
            .audit
            .record(Some(&caller), req.kind(), req.target(), outcome, None);
    }
    reply
}

async fn read_index(State(state): State<Arc<AppState>>) -> Json<ReadIndexReply> {
    let view = state.leadership.leader_view();
    if view.leader_id != Some(state.leadership.id) {
        return Json(ReadIndexReply::NotLeader(view.leader_id));
    }
    Json(state.read_index_local(state.leadership.leader_wait).await)
}
