//! What this node knows about the cluster's leader and how it reaches it:
//! the Raft handle, the node-to-node client, when the leader was last
//! heard from, and how long to wait for one. Writes and consistent reads
//! go through [`super::forward`], which builds on this.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use openraft::ServerState;

use crate::raft::{Network, NodeId, Raft};

/// When this node last heard from a leader, for `X-Registry-Last-Contact`.
#[derive(Debug)]
pub struct LastContact {
    origin: Instant,
    /// Milliseconds after `origin`, plus one; zero means never.
    at: AtomicU64,
}

impl Default for LastContact {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            at: AtomicU64::new(0),
        }
    }
}

impl LastContact {
    pub fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64 + 1;
        self.at.store(ms, Ordering::Relaxed);
    }

    /// Milliseconds since the last contact, or `None` if there was none.
    pub fn millis_since(&self) -> Option<u64> {
        match self.at.load(Ordering::Relaxed) {
            0 => None,
            at => Some((self.origin.elapsed().as_millis() as u64 + 1).saturating_sub(at)),
        }
    }

    /// Milliseconds since the last contact; a node that never had one
    /// reports the time since it started.
    pub fn millis_since_or_start(&self) -> u64 {
        self.millis_since()
            .unwrap_or_else(|| self.origin.elapsed().as_millis() as u64)
    }
}

/// This node's view of the leader, and its ways of reaching it.
pub struct Leadership {
    pub id: NodeId,
    pub raft: Raft,
    /// The client for calls to other nodes (forwarding, membership, joins).
    pub net: Network,
    pub contact: LastContact,
    /// How long a write or consistent read waits for a leader before `503`.
    pub leader_wait: Duration,
    /// A leader not heard from for this long is not considered live.
    pub live_bound: Duration,
}

/// What this node knows about the leader, read from Raft's metrics.
#[derive(Debug, Clone)]
pub struct LeaderView {
    pub role: &'static str,
    pub leader_id: Option<NodeId>,
    pub leader_addr: Option<String>,
    pub term: u64,
    /// This node knows a leader and has heard from it recently (or is a
    /// leader that a quorum acknowledged recently).
    pub live: bool,
    /// Milliseconds since this node last heard from the leader; 0 on the leader.
    pub last_contact_ms: u64,
}

impl Leadership {
    pub fn leader_view(&self) -> LeaderView {
        // Borrow, don't clone: this runs on every read.
        let rx = self.raft.metrics();
        let m = rx.borrow();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let membership = m.membership_config.membership();
        let leader_addr = m
            .current_leader
            .and_then(|id| membership.get_node(&id).map(|n| n.addr.clone()));
        let bound = self.live_bound.as_millis() as u64;
        let (live, last_contact_ms) = if m.state == ServerState::Leader {
            let single = membership.voter_ids().nth(1).is_none();
            let acked = m.millis_since_quorum_ack.is_some_and(|ms| ms <= bound);
            (single || acked, 0)
        } else {
            let since = self.contact.millis_since();
            (
                m.current_leader.is_some() && since.is_some_and(|ms| ms <= bound),
                self.contact.millis_since_or_start(),
            )
        };
        LeaderView {
            role,
            leader_id: m.current_leader,
            leader_addr,
            term: m.current_term,
            live,
            last_contact_ms,
        }
    }
}
