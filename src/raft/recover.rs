//! `vertice-register recover --data-dir DIR --id N`: on a stopped node's
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

/// Rewrites the membership of the stopped node `id` whose data is in `dir`.
pub async fn recover(dir: &Path, id: NodeId) -> Result<Recovered, String> {
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
