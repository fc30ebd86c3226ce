//! `GET /cluster/snapshot`: a backup of the registry (see
//! [`crate::raft::state_machine::backup`] for the format), behind the
//! cluster secret or an admin token like the other `/cluster/*` routes.
//!
//! The node answering first makes its replica as fresh as a consistent read
//! (it has applied everything committed before the request), then shares
//! the registry's state under the lock for a moment (a pointer per service)
//! and encodes it off the async workers: writes go on meanwhile, and the
//! backup is the registry at exactly the applied index its header names.

use std::sync::Arc;

use axum::extract::{Extension, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{ApiError, AppState};
use crate::auth::Caller;
use crate::raft::state_machine::backup::{self, TakenAt};

/// The header that carries the backup's applied index.
pub const INDEX_HEADER: &str = "x-registry-backup-index";
/// The header that carries the backup's SHA-256 (hex).
pub const SHA256_HEADER: &str = "x-registry-backup-sha256";

pub async fn snapshot(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
) -> Response {
    let resp = take(&state)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    state.audit_membership(&caller, "cluster.snapshot", json!(null), &resp);
    resp
}

async fn take(state: &AppState) -> Result<Response, ApiError> {
    state.read_barrier().await?;
    let (view, at) = {
        let applied = state.replica.read();
        let (index, term) = applied
            .last_applied
            .map_or((0, 0), |l| (l.index, l.leader_id.get_term()));
        let members = applied
            .membership
            .membership()
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        let at = TakenAt {
            index,
            term,
            taken_by: state.leadership.id,
            taken_at_unix_ms: crate::clock::now_ms().max(0) as u64,
            members,
        };
        (applied.registry.for_snapshot(), at)
    };
    let (header, bytes) = tokio::task::spawn_blocking(move || backup::encode(&view, at))
        .await
        .map_err(|e| ApiError::Internal(format!("taking the backup: {e}")))?
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    tracing::info!(
        index = header.index,
        instances = header.instances,
        bytes = bytes.len(),
        "backup taken"
    );
    let sum = backup::checksum_hex(&bytes);
    let name = format!(
        "attachment; filename=\"vertice-register-{}.backup\"",
        header.index
    );
    Ok((
        [
            (CONTENT_TYPE, "application/octet-stream".to_string()),
            (CONTENT_DISPOSITION, name),
            (
                INDEX_HEADER.parse().expect("a valid header name"),
                header.index.to_string(),
            ),
            (SHA256_HEADER.parse().expect("a valid header name"), sum),
        ],
        bytes,
    )
        .into_response())
}
