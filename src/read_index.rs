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

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::api::ReadIndexReply;
use crate::raft::{CheckIsLeaderError, Raft, RaftError};

pub struct ReadIndex {
    raft: Raft,
    /// The longest one confirmation round may take.
    round_limit: Duration,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    driving: bool,
    waiting: Vec<oneshot::Sender<ReadIndexReply>>,
}

impl ReadIndex {
    pub fn new(raft: Raft, round_limit: Duration) -> Arc<Self> {
        Arc::new(Self {
            raft,
            round_limit,
            queue: Mutex::new(Queue::default()),
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
            let reply = self.round().await;
            for tx in batch {
                let _ = tx.send(reply.clone());
            }
        }
    }

    async fn round(&self) -> ReadIndexReply {
        match tokio::time::timeout(self.round_limit, self.raft.get_read_log_id()).await {
            Err(_) => ReadIndexReply::Unavailable(
                "the leader could not confirm its leadership with a quorum in time".into(),
            ),
            Ok(Ok((read_log_id, _))) => ReadIndexReply::Index(read_log_id.map_or(0, |l| l.index)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                ReadIndexReply::NotLeader(f.leader_id)
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                ReadIndexReply::Unavailable(format!("no quorum: {e}"))
            }
            Ok(Err(RaftError::Fatal(f))) => {
                ReadIndexReply::Unavailable(format!("raft stopped: {f}"))
            }
        }
    }
}
