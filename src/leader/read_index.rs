//! Leadership confirmation for linearizable answers, shared by concurrent
//! callers.
//!
//! A leader may answer from its own replica only after it has confirmed,
//! with a quorum, that it still leads, and only from a state that includes
//! everything committed before the request arrived (the read index). A
//! deposed leader that does not know it yet (partitioned away, or paused
//! with `SIGSTOP`) would otherwise answer from an old state: the harness in
//! `examples/jepsen` caught exactly that for heartbeats, which a cut-off
//! old leader answered `404` for an instance registered again through the
//! new leader.
//!
//! Each confirmation costs a round trip to the followers, so concurrent
//! callers share one: a caller joins the queue, and a single driver task
//! takes the whole queue, runs one `get_read_log_id` round, and answers
//! everyone in it. A round only ever answers callers that were queued
//! before it started, so every answer is as fresh as each caller needs.
//!
//! **Leader lease.** A round that started at `t0` and was confirmed by a
//! quorum means that each follower in that quorum heard from this leader
//! at or after `t0`. openraft's followers refuse to vote for anyone else
//! for `election_timeout_max` after hearing from their leader, and start an
//! election themselves only after `election_timeout_max` plus a random
//! election timeout; any new leader needs a vote from that quorum. So no
//! other leader can exist before `t0 + election_timeout_max`, except one
//! this leader itself voted for, which makes it step down. Until
//! `t0 + lease` (by default `election_timeout_min`, half the bound, a
//! margin for clock-rate differences and scheduling), a batch of callers
//! is answered without a network round: RaftCore is asked (one message,
//! serialized with vote handling) whether this node still leads with the
//! same vote, and the callers get its committed index at that moment (at
//! least the round's, which covers every entry of earlier terms), which
//! every acknowledged write is under. A leader paused past its lease
//! (`SIGSTOP`) finds it expired, since the monotonic clock keeps running.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::{ServerState, Vote};

use tokio::sync::oneshot;

use crate::forwarding::ReadIndexReply;
use crate::raft::{CheckIsLeaderError, NodeId, Raft, RaftError};

/// How an unavailable answer for want of a quorum starts (the rounds the
/// driver tries again).
const NO_QUORUM: &str = "no quorum";
/// Rounds tried again after one found no quorum (5, 10, ... ms apart).
const ROUND_RETRIES: u64 = 8;

pub struct ReadIndex {
    raft: Raft,
    /// The longest one confirmation round may take.
    round_limit: Duration,
    /// How long after a round's start its confirmation stands (zero: every
    /// caller waits for a round).
    leader_lease: Duration,
    queue: Mutex<Queue>,
    /// Batches answered, by how: `lease` or `round`.
    answered: Option<prometheus::IntCounterVec>,
    /// Set by the driver only.
    current: Mutex<Option<LeaderLease>>,
}

/// A confirmed leadership: valid until `until`, while the vote is the same.
#[derive(Clone, Copy)]
struct LeaderLease {
    vote: Vote<NodeId>,
    until: Instant,
    index: u64,
}

#[derive(Default)]
struct Queue {
    driving: bool,
    waiting: Vec<oneshot::Sender<ReadIndexReply>>,
}

impl ReadIndex {
    /// `leader_lease`: see the module comment; `Duration::ZERO` turns it off.
    pub fn new(
        raft: Raft,
        round_limit: Duration,
        leader_lease: Duration,
        answered: Option<prometheus::IntCounterVec>,
    ) -> Arc<Self> {
        Arc::new(Self {
            raft,
            round_limit,
            leader_lease,
            answered,
            queue: Mutex::new(Queue::default()),
            current: Mutex::new(None),
        })
    }

    /// Confirms leadership with a quorum (in a round that starts after this
    /// call) and returns the index a linearizable answer must wait for.
    pub async fn get(self: &Arc<Self>, within: Duration) -> ReadIndexReply {
        let (tx, rx) = oneshot::channel();
        let start_driver = {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            q.waiting.push(tx);
            !std::mem::replace(&mut q.driving, true)
        };
        if start_driver {
            tokio::spawn(self.clone().drive());
        }
        match tokio::time::timeout(within, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => ReadIndexReply::Unavailable("the node is stopping".into()),
            Err(_) => ReadIndexReply::Unavailable(
                "the leader could not confirm its leadership with a quorum in time".into(),
            ),
        }
    }

    async fn drive(self: Arc<Self>) {
        loop {
            let batch = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                if q.waiting.is_empty() {
                    q.driving = false;
                    return;
                }
                std::mem::take(&mut q.waiting)
            };
            let (mut reply, how) = match self.under_leader_lease().await {
                Some(index) => (ReadIndexReply::Index(index), "lease"),
                None => (self.round().await, "round"),
            };
            // A round that found no quorum in time (followers slow to
            // answer under load) is tried again while anyone in the batch
            // still waits: a later round starts after every caller arrived
            // too, so it confirms as much. Load then costs latency, not 503s.
            let mut tries = 0;
            while tries < ROUND_RETRIES
                && matches!(&reply, ReadIndexReply::Unavailable(m) if m.starts_with(NO_QUORUM))
                && batch.iter().any(|tx| !tx.is_closed())
            {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(5 * tries)).await;
                reply = self.round().await;
            }
            if let Some(c) = &self.answered {
                c.with_label_values(&[how]).inc();
            }
            for tx in batch {
                let _ = tx.send(reply.clone());
            }
        }
    }

    /// This node's vote and committed index, if it leads (asked of
    /// RaftCore itself, so a vote it granted to another candidate is seen
    /// at once).
    async fn leading_vote(&self) -> Option<(Vote<NodeId>, u64)> {
        self.raft
            .with_raft_state(|st| {
                (st.server_state == ServerState::Leader)
                    .then(|| (*st.vote_ref(), st.committed.map_or(0, |c| c.index)))
            })
            .await
            .ok()
            .flatten()
    }

    /// The index to wait for under a lease that still stands, checked now:
    /// everything committed so far. (The round's own index is not enough
    /// for a follower asking on behalf of a reader: writes acknowledged
    /// since the round are applied here, but not yet there.)
    async fn under_leader_lease(&self) -> Option<u64> {
        let lease = (*self.current.lock().unwrap_or_else(|p| p.into_inner()))?;
        if Instant::now() >= lease.until {
            return None;
        }
        let (vote, committed) = self.leading_vote().await?;
        // The check itself must have happened within the lease.
        (vote == lease.vote && Instant::now() < lease.until).then_some(committed.max(lease.index))
    }

    async fn round(&self) -> ReadIndexReply {
        let started = Instant::now();
        let vote = match self.leader_lease.is_zero() {
            true => None,
            false => self.leading_vote().await.map(|(v, _)| v),
        };
        let reply = self.confirm().await;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let (ReadIndexReply::Index(index), Some(vote)) = (&reply, vote) {
            // The quorum confirmed the vote held before the round; it must
            // still be this node's now (the driver is the only writer).
            if self.leading_vote().await.map(|(v, _)| v) == Some(vote) {
                *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(LeaderLease {
                    vote,
                    until: started + self.leader_lease,
                    index: *index,
                });
            }
        }
        reply
    }

    async fn confirm(&self) -> ReadIndexReply {
        match tokio::time::timeout(self.round_limit, self.raft.get_read_log_id()).await {
            Err(_) => ReadIndexReply::Unavailable(format!(
                "{NO_QUORUM} in time: the leader could not confirm its leadership"
            )),
            Ok(Ok((read_log_id, _))) => ReadIndexReply::Index(read_log_id.map_or(0, |l| l.index)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                ReadIndexReply::NotLeader(f.leader_id)
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                ReadIndexReply::Unavailable(format!("{NO_QUORUM}: {e}"))
            }
            Ok(Err(RaftError::Fatal(f))) => {
                ReadIndexReply::Unavailable(format!("raft stopped: {f}"))
            }
        }
    }
}
