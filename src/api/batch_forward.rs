//! Batched forwarding: the writes a follower passes to the leader travel
//! together.
//!
//! Each write that lands on a follower used to cost one HTTP exchange with
//! the leader. Here they queue, and every call to the leader's
//! `/raft/writes` carries all that queued while the earlier calls were out
//! (at most [`MAX_BATCH`]); the leader answers each write in order. A write
//! that finds the queue empty and a call slot free goes at once, alone, so
//! a quiet follower adds no latency. A leader of an earlier release (no
//! `/raft/writes`, `404`) gets the writes one by one on `/raft/write`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::forwarding::{Attempt, Outgoing, WriteReply};
use crate::metrics::Metrics;
use crate::raft::network::Network;

/// Most writes in one call.
pub const MAX_BATCH: usize = 64;
/// Calls to the leader out at once.
pub const MAX_IN_FLIGHT: usize = 2;

struct Queued {
    addr: String,
    write: Outgoing,
    deadline: Instant,
    done: oneshot::Sender<Attempt<WriteReply>>,
}

/// The follower's queue of writes for the leader. Cheap to share.
pub struct ForwardQueue {
    tx: mpsc::UnboundedSender<Queued>,
}

impl ForwardQueue {
    /// Starts the sender task; it ends when `stop` turns true.
    pub fn start(
        net: Network,
        metrics: Arc<Metrics>,
        stop: watch::Receiver<bool>,
    ) -> (Arc<Self>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(net, metrics, rx, stop));
        (Arc::new(Self { tx }), task)
    }

    /// Sends `write` to the leader at `addr` and waits, at most `remaining`,
    /// for its answer.
    pub(super) async fn send(
        &self,
        addr: &str,
        write: Outgoing,
        remaining: Duration,
    ) -> Attempt<WriteReply> {
        let (done, rx) = oneshot::channel();
        let queued = Queued {
            addr: addr.to_string(),
            write,
            deadline: Instant::now() + remaining,
            done,
        };
        if self.tx.send(queued).is_err() {
            return Attempt::Unknown("the node is stopping".into());
        }
        match tokio::time::timeout(remaining, rx).await {
            Ok(Ok(attempt)) => attempt,
            Ok(Err(_)) => Attempt::Unknown("the node is stopping".into()),
            Err(_) => Attempt::Unknown(format!(
                "the leader at {addr} did not answer in time; the outcome is unknown and retrying is safe"
            )),
        }
    }
}

async fn run(
    net: Network,
    metrics: Arc<Metrics>,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some((batch, slot)) =
        crate::leader::writes::next_batch(&mut rx, &slots, MAX_BATCH, &mut stop).await
    {
        // Writes queued around a leader change may name different leaders.
        let mut by_leader: HashMap<String, Vec<Queued>> = HashMap::new();
        for q in batch {
            by_leader.entry(q.addr.clone()).or_default().push(q);
        }
        let slot = Arc::new(slot);
        for (addr, writes) in by_leader {
            let (net, metrics, slot) = (net.clone(), metrics.clone(), slot.clone());
            tokio::spawn(async move {
                let attempts = call(&net, &metrics, &addr, &writes).await;
                drop(slot);
                for (q, attempt) in writes.into_iter().zip(attempts) {
                    let _ = q.done.send(attempt);
                }
            });
        }
    }
}

/// One attempt for every write, in order.
fn all(n: usize, attempt: impl Fn() -> Attempt<WriteReply>) -> Vec<Attempt<WriteReply>> {
    (0..n).map(|_| attempt()).collect()
}

/// Posts `writes` to the leader at `addr` in one call.
async fn call(
    net: &Network,
    metrics: &Metrics,
    addr: &str,
    writes: &[Queued],
) -> Vec<Attempt<WriteReply>> {
    let n = writes.len();
    if net.faults.is_isolated() {
        return all(n, || Attempt::Retry);
    }
    let now = Instant::now();
    let Some(remaining) = writes
        .iter()
        .map(|q| q.deadline.saturating_duration_since(now))
        .max()
        .filter(|r| !r.is_zero())
    else {
        return all(n, || Attempt::Retry);
    };
    let body: Vec<&Outgoing> = writes.iter().map(|q| &q.write).collect();
    let started = Instant::now();
    let sent = net
        .post(net.url(addr, "/raft/writes"))
        .json(&body)
        .timeout(remaining)
        .send()
        .await;
    let resp = match sent {
        Ok(r) => r,
        // Surely not delivered: the caller tries again (a new leader, maybe).
        Err(e) if e.is_connect() => return all(n, || Attempt::Retry),
        Err(e) => {
            let m = format!(
                "the leader at {addr} did not answer ({e}); the outcome is unknown and retrying is safe"
            );
            return all(n, || Attempt::Unknown(m.clone()));
        }
    };
    metrics
        .forward_latency
        .observe(started.elapsed().as_secs_f64());
    if resp.status() == reqwest::StatusCode::NOT_FOUND {
        return one_by_one(net, addr, writes).await;
    }
    if !resp.status().is_success() {
        // Refused before any work was done (cut off, wrong secret, stopping).
        return all(n, || Attempt::Retry);
    }
    match resp.json::<Vec<WriteReply>>().await {
        Ok(replies) if replies.len() == n => replies.into_iter().map(Attempt::Answered).collect(),
        Ok(replies) => {
            let m = format!(
                "the leader at {addr} answered {} writes for {n}; their outcome is unknown and retrying is safe",
                replies.len()
            );
            all(n, || Attempt::Unknown(m.clone()))
        }
        Err(e) => {
            let m = format!("the leader at {addr} sent an unreadable answer: {e}");
            all(n, || Attempt::Unknown(m.clone()))
        }
    }
}

/// For a leader without `/raft/writes`: each write on `/raft/write`.
async fn one_by_one(net: &Network, addr: &str, writes: &[Queued]) -> Vec<Attempt<WriteReply>> {
    let calls = writes.iter().map(|q| async move {
        let remaining = q.deadline.saturating_duration_since(Instant::now());
        let sent = net
            .post(net.url(addr, "/raft/write"))
            .json(&q.write)
            .timeout(remaining.max(Duration::from_millis(1)))
            .send()
            .await;
        match sent {
            Err(e) if e.is_connect() => Attempt::Retry,
            Err(e) => Attempt::Unknown(format!(
                "the leader at {addr} did not answer ({e}); the outcome is unknown and retrying is safe"
            )),
            Ok(r) if !r.status().is_success() => Attempt::Retry,
            Ok(r) => match r.json::<WriteReply>().await {
                Ok(reply) => Attempt::Answered(reply),
                Err(e) => Attempt::Unknown(format!(
                    "the leader at {addr} sent an unreadable answer: {e}"
                )),
            },
        }
    });
    futures::future::join_all(calls).await
}
