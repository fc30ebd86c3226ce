//! `vertice-register recover --data-dir DIR [--id N]`: on a stopped node's
//! directory, after the cluster lost a majority for good, makes the node a
//! cluster of one voter, itself, keeping its data, id and address.
//!
//! Raft cannot change its membership without a majority, so this is done
//! outside it, on the stopped node's log: a new membership entry (this node
//! alone) goes after the last entry, in a term above every term the node has
//! seen, with the node's vote moved to that term. Started as usual, the
//! node counts only itself, elects itself, and commits that entry and every
//! entry before it it had received. What is lost: entries the cluster had
//! committed that this node never received. Nodes of the old cluster must
//! not be started again on their old directories: start them empty with
//! `--join`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::storage::RaftLogStorage;
use openraft::{BasicNode, CommittedLeaderId, EntryPayload, Membership, Vote};

use super::{open_checked, DiskSync, Entry, LogId, LogStore, NodeId};

/// The file in a data directory that names the node it belongs to
/// (written at the node's first start by this release and later).
pub const NODE_ID_FILE: &str = "node-id";

/// The node id a data directory records, if it records one.
pub fn recorded_node_id(dir: &Path) -> Result<Option<NodeId>, String> {
    let path = dir.join(NODE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{} does not hold a node id", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Records that `dir` belongs to node `id` (durably), or refuses when it
/// belongs to another node: a directory started under another id would
/// vote and acknowledge as a node it is not.
pub fn claim_node_id(dir: &Path, id: NodeId) -> Result<(), String> {
    match recorded_node_id(dir)? {
        Some(own) if own == id => Ok(()),
        Some(own) => Err(format!(
            "{} is node {own}'s data directory; start it with --id {own}, or give node {id} an empty directory",
            dir.display()
        )),
        None => super::durable::write_file(&dir.join(NODE_ID_FILE), format!("{id}\n").as_bytes())
            .map_err(|e| format!("cannot record the node id in {}: {e}", dir.display())),
    }
}

/// What `recover` did, for the operator.
#[derive(Debug)]
pub struct Recovered {
    pub id: NodeId,
    pub addr: String,
    /// The members the directory knew before.
    pub before: BTreeMap<NodeId, String>,
    /// The new membership entry's log id.
    pub entry: LogId,
    pub instances: u64,
}

/// Rewrites the membership of the stopped node whose data is in `dir`: node
/// `id`, or the node the directory records.
pub async fn recover(dir: &Path, id: Option<NodeId>) -> Result<Recovered, String> {
    let id = match (id, recorded_node_id(dir)?) {
        (Some(given), Some(own)) if given != own => {
            return Err(format!(
                "{} is node {own}'s data directory, not node {given}'s",
                dir.display()
            ))
        }
        (Some(id), _) | (None, Some(id)) => id,
        (None, None) => {
            return Err(format!(
                "{} does not record its node's id (nodes of earlier releases did not): give --id",
                dir.display()
            ))
        }
    };
    let (db, report) = open_checked(dir).map_err(|e| {
        format!("{e} (is the node still running? stop it first: recover works on a stopped node's directory)")
    })?;
    let sync =
        DiskSync::open(dir, None).map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
    let mut log = LogStore::open(&db, sync).map_err(|e| format!("cannot open the log: {e}"))?;
    let membership = match log.last_membership().map_err(|e| e.to_string())? {
        Some(m) => m,
        None => report.state_machine.state.membership.membership().clone(),
    };
    let before: BTreeMap<NodeId, String> = membership
        .nodes()
        .map(|(i, n)| (*i, n.addr.clone()))
        .collect();
    let Some(addr) = before.get(&id).cloned() else {
        return Err(format!(
            "node {id} is not a member of the cluster {} knows (members: {before:?}); give this node's own --id",
            dir.display()
        ));
    };
    let state = log.get_log_state().await.map_err(|e| e.to_string())?;
    let Some(last) = state.last_log_id else {
        return Err(format!(
            "{} holds no cluster yet: start the node with --peers instead",
            dir.display()
        ));
    };
    let vote = log
        .read_vote()
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or_default();
    let term = vote.leader_id().get_term().max(last.leader_id.get_term()) + 1;
    let entry = Entry {
        log_id: LogId::new(CommittedLeaderId::new(term, id), last.index + 1),
        payload: EntryPayload::Membership(Membership::new(
            vec![BTreeSet::from([id])],
            BTreeMap::from([(id, BasicNode { addr: addr.clone() })]),
        )),
    };
    // The vote first: an entry of a term the vote has not reached would
    // be out of order if we stopped in between.
    log.save_vote(&Vote::new(term, id))
        .await
        .map_err(|e| format!("cannot save the vote: {e}"))?;
    log.put_entry(&entry)
        .map_err(|e| format!("cannot write the membership entry: {e}"))?;
    log.flush()
        .await
        .map_err(|e| format!("cannot sync the log: {e}"))?;
    Ok(Recovered {
        id,
        addr,
        before,
        entry: entry.log_id,
        instances: report.state_machine.instances,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_belongs_to_the_node_that_first_started_on_it() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(recorded_node_id(dir.path()).unwrap(), None);
        claim_node_id(dir.path(), 2).unwrap();
        claim_node_id(dir.path(), 2).unwrap();
        assert_eq!(recorded_node_id(dir.path()).unwrap(), Some(2));
        let err = claim_node_id(dir.path(), 3).unwrap_err();
        assert!(
            err.contains("node 2's data directory") && err.contains("--id 2"),
            "{err}"
        );
        std::fs::write(dir.path().join(NODE_ID_FILE), "x").unwrap();
        assert!(recorded_node_id(dir.path()).is_err());
    }
}
