//! A node's first start on a data directory that `snapshot restore`
//! seeded: the backup becomes the node's first Raft snapshot, with the
//! members given at start (`--peers`, or the node alone), and the file is
//! removed once that is durable.
//!
//! The snapshot sits at the backup's index with term 0, so the new
//! cluster's terms (1 and up) stay above every term in its log, and every
//! node restored from the same file with the same `--peers` holds the same
//! snapshot: they elect a leader among themselves as a new cluster does.
//! The log starts after the snapshot, so a node that joins later is sent
//! the snapshot, never entries it could not apply to an empty registry.
//! The snapshot's registry is flagged `clocks_pending`: the first leader
//! commits `RestartClocks` with its own time before any expiry round, so
//! no instance expires for the time the backup sat on disk.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;

use openraft::{
    BasicNode, CommittedLeaderId, Membership, Snapshot, SnapshotMeta, StoredMembership, Vote,
};

use super::StartError;
use crate::raft::state_machine::backup;
use crate::raft::{LogId, NodeId, Raft};

/// Installs the backup at `file` as this node's first snapshot (unless an
/// earlier start already did), then removes `file`.
pub(super) async fn install(
    raft: &Raft,
    file: &Path,
    peers: &BTreeMap<NodeId, String>,
) -> Result<(), StartError> {
    let load = |e: String| StartError::Load(format!("{}: {e}", file.display()));
    if raft.is_initialized().await.unwrap_or(false) {
        // Installed before a crash that left the file behind.
        tracing::info!(file = %file.display(), "restored backup already installed; removing the file");
    } else {
        let bytes = std::fs::read(file).map_err(|e| load(e.to_string()))?;
        let sum = backup::checksum_hex(&bytes);
        let (header, data) = backup::restore_data(&bytes).map_err(|e| load(e.to_string()))?;
        let log_id = LogId::new(CommittedLeaderId::new(0, 0), header.index);
        let voters: BTreeSet<NodeId> = peers.keys().copied().collect();
        let nodes: BTreeMap<NodeId, BasicNode> = peers
            .iter()
            .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
            .collect();
        let membership = Membership::new(vec![voters], nodes);
        let meta = SnapshotMeta {
            last_log_id: Some(log_id),
            last_membership: StoredMembership::new(Some(log_id), membership),
            snapshot_id: format!("restore-{}-{}", header.index, &sum[..16]),
        };
        let snapshot = Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        };
        raft.install_full_snapshot(Vote::default(), snapshot)
            .await
            .map_err(|e| StartError::Raft(format!("installing the restored backup: {e}")))?;
        tracing::info!(
            index = header.index,
            instances = header.instances,
            services = header.services,
            members = ?peers,
            "restored the registry from a backup; a new cluster starts from it"
        );
    }
    std::fs::remove_file(file).map_err(|e| load(format!("removing it: {e}")))?;
    if let Some(dir) = file.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| load(format!("syncing its folder: {e}")))?;
    }
    Ok(())
}
