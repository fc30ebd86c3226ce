//! Group commit for client writes on the leader.
//!
//! openraft 0.9 appends and flushes each proposed entry before it looks at
//! the next one, so one entry per write caps writes at one flush (and one
//! replication round) each. Here, writes that arrive while earlier ones are
//! still being committed queue up and go into the next entry together, as a
//! [`Command::Batch`]: one append, one flush on each node, one replication
//! round and one apply for all of them. Each write still gets its own
//! result. A write that arrives alone, with nothing in flight, is proposed
//! at once as a plain entry, so an idle cluster pays no extra latency.
//!
//! At most [`MAX_IN_FLIGHT`] entries are in flight, so that the next batch
//! fills while one is flushed and replicated; entries are proposed in the
//! order their writes arrived.

use std::sync::Arc;

use openraft::error::Fatal;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::forwarding::WriteReply;
use crate::metrics::Metrics;
use crate::raft::{Raft, RaftError};
use crate::registry::{Command, CommandResult};

/// Most writes in one entry (a registration is at most ~10 KiB).
pub const MAX_BATCH: usize = 64;
/// Entries of batched writes proposed and not yet committed, at most.
pub const MAX_IN_FLIGHT: usize = 2;

struct Pending {
    cmd: Command,
    done: oneshot::Sender<WriteReply>,
}

/// The leader's write queue. Cheap to share.
pub struct Writes {
    tx: mpsc::UnboundedSender<Pending>,
}

fn stopped() -> WriteReply {
    WriteReply::Unavailable("the node is stopping".into())
}

impl Writes {
    /// Starts the proposer task; it ends when `stop` turns true.
    pub fn start(
        raft: Raft,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(raft, metrics, rx, stop));
        (Arc::new(Self { tx }), task)
    }

    /// Commits `cmd` (with whatever other writes arrive with it) and
    /// answers with its own result.
    pub async fn write(&self, cmd: Command) -> WriteReply {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Pending { cmd, done }).is_err() {
            return stopped();
        }
        rx.await.unwrap_or_else(|_| stopped())
    }
}

async fn run(
    raft: Raft,
    metrics: Arc<Metrics>,
    mut rx: mpsc::UnboundedReceiver<Pending>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some((mut batch, slot)) = next_batch(&mut rx, &slots, MAX_BATCH, &mut stop).await {
        metrics.write_entries.inc();
        metrics.write_commands.inc_by(batch.len() as u64);
        let (cmd, dones): (Command, Vec<_>) = if batch.len() == 1 {
            let p = batch.pop().expect("one write");
            (p.cmd, vec![p.done])
        } else {
            let (commands, dones) = batch.into_iter().map(|p| (p.cmd, p.done)).unzip();
            (Command::Batch { commands }, dones)
        };
        // Proposed here, in arrival order; the wait for the commit runs apart.
        let committed = propose(&raft, cmd).await;
        tokio::spawn(async move {
            let reply = committed.await;
            drop(slot);
            answer(dones, reply);
        });
    }
}

/// Proposes `cmd` now (entries keep the order of these calls) and returns
/// the wait for its commit, to run apart, so that the next entry can be
/// proposed while this one is replicated.
pub async fn propose(
    raft: &Raft,
    cmd: Command,
) -> impl std::future::Future<Output = WriteReply> + Send + 'static {
    let proposed = raft.client_write_ff(cmd).await;
    async move {
        let result = match proposed {
            Err(fatal) => Err(RaftError::Fatal(fatal)),
            Ok(rx) => match rx.await {
                Err(_) => Err(RaftError::Fatal(Fatal::Stopped)),
                Ok(r) => r.map(|resp| resp.data).map_err(RaftError::APIError),
            },
        };
        WriteReply::from_raft(result)
    }
}

/// Group commit's queue discipline, shared by the leader's write queue and
/// the follower's forwarding queue: waits for a first item, then for a free
/// slot (meanwhile later items queue behind it), then takes whatever else is
/// queued, at most `max` in all. `None` once `stop` turns true or the queue
/// closes.
pub async fn next_batch<T>(
    rx: &mut mpsc::UnboundedReceiver<T>,
    slots: &Arc<Semaphore>,
    max: usize,
    stop: &mut watch::Receiver<bool>,
) -> Option<(Vec<T>, OwnedSemaphorePermit)> {
    let first = tokio::select! {
        _ = stop.wait_for(|s| *s) => return None,
        item = rx.recv() => item?,
    };
    let slot = slots.clone().acquire_owned().await.ok()?;
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(item) => batch.push(item),
            Err(_) => break,
        }
    }
    Some((batch, slot))
}

/// Hands each write its answer: a batch's results one by one, anything
/// else (an error) to every write of the entry.
fn answer(dones: Vec<oneshot::Sender<WriteReply>>, reply: WriteReply) {
    let shared = match reply {
        WriteReply::Done(CommandResult::Batch(results)) if results.len() == dones.len() => {
            for (done, r) in dones.into_iter().zip(results) {
                let _ = done.send(WriteReply::Done(r));
            }
            return;
        }
        WriteReply::Done(r) if dones.len() == 1 => WriteReply::Done(r),
        WriteReply::Done(other) => {
            // Cannot happen: apply answers a batch with one result per command.
            tracing::error!(result = ?other, writes = dones.len(), "a batched write got a result of the wrong shape");
            WriteReply::Unavailable(
                "internal error: the write's result was lost; retrying it is safe".into(),
            )
        }
        other => other,
    };
    for done in dones {
        let _ = done.send(shared.clone());
    }
}
