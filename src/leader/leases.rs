//! The leader's side of TTL leases: acknowledging heartbeats, checkpointing
//! renewals into the log in batches, and expiring instances, with the
//! mass-expiry protection.
//!
//! A heartbeat costs no Raft entry when it comes within the instance's ack
//! window of its committed `last_heartbeat` (half the TTL plus 2 s; see
//! [`crate::registry::lease`] for why that is safe): the renewal is
//! remembered as *unsettled* and written, together with the other renewals
//! waiting, in a `Renew` checkpoint (ten a second under load, else one). So
//! a fleet renewing every TTL/2 costs a few small entries a second, not a
//! commit per beat. When the committed value is older than that, the
//! heartbeat waits for a `Renew` entry that carries it; concurrent ones
//! share one entry (group commit).
//! Followers forward heartbeats here, so the leader serves every renewal.
//!
//! Only the leader expires, once a second with jitter, at most
//! [`MAX_EXPIRE_PER_ROUND`] instances per round in entries of
//! [`EXPIRE_BATCH`], each stamped with its time, term and margin. Each round
//! first confirms leadership, then judges the instances whose committed
//! deadline has passed by the latest heartbeat anyone may have acknowledged
//! ([`lease::last_ack_bound`]): its own unsettled ones, and for earlier
//! leaders' the ack window, capped at when this node began leading.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::now_ms;
use crate::forwarding::{ReadIndexReply, WriteReply};
use crate::leader::read_index::ReadIndex;
use crate::metrics::Metrics;
use crate::raft::{Raft, Replica};
use crate::registry::lease::{self, can_ack, ExpiryGuard, Protection, EXPIRY_MARGIN_MS};
use crate::registry::{
    Command, CommandResult, HeartbeatRequest, HeartbeatTargets, Millis, Renewal, TombstonePolicy,
};

/// Most instances one expiry entry names.
pub const EXPIRE_BATCH: usize = 500;
/// Most instances expired in one round; the rest wait for the next rounds.
pub const MAX_EXPIRE_PER_ROUND: usize = 2_000;
/// Most renewals in one `Renew` entry.
const RENEW_BATCH: usize = 4_096;
/// `Renew` entries proposed and not yet committed, at most.
const RENEW_IN_FLIGHT: usize = 2;
/// Acknowledged renewals are checkpointed into the log at least this often...
const CHECKPOINT_EVERY: Duration = Duration::from_millis(1_000);
/// ...and sooner, every [`CHECKPOINT_TICK`], once this many wait: a large
/// fleet's renewals go in small entries ten times a second rather than in
/// one large one a second, which held heartbeats up behind its apply
/// (100,000 instances every 30 s: p99 34 ms with one entry a second, 6.2 ms
/// with ten).
const CHECKPOINT_SOON: usize = 256;
const CHECKPOINT_TICK: Duration = Duration::from_millis(100);

/// Expiry settings from the command line.
#[derive(Debug, Clone, Copy)]
pub struct ExpiryConfig {
    pub protection: Protection,
    /// The window over which recent expirations count towards the share.
    pub window: Duration,
    /// Longest pause before expiry resumes anyway (and says so).
    pub pause_max: Duration,
    /// How long and how many expired instances are kept for revival.
    pub tombstones: TombstonePolicy,
    /// TEST ONLY, UNSAFE (`--test-broken-leases`): renewals acknowledged
    /// without a write are neither remembered nor checkpointed, and expiry
    /// judges the committed values alone. For proving that the Jepsen-style
    /// harness catches early expiry.
    pub broken_leases: bool,
}

/// The leader's latest expiry round, for `/health`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExpiryStatus {
    pub total: usize,
    pub overdue: usize,
    pub recently_expired: usize,
    pub share: f64,
    pub threshold: f64,
    /// The protection held expiry back for longer than allowed, and expiry
    /// resumed anyway; it re-arms once the share drops below the threshold.
    pub overridden: bool,
}

type InstanceKey = (String, String);

struct BatchItem {
    renewals: Vec<Renewal>,
    /// A heartbeat waiting for its renewal; `None` for a checkpoint.
    done: Option<oneshot::Sender<WriteReply>>,
}

/// What the leader acknowledged without a write, and since when it leads.
#[derive(Default)]
struct Acks {
    /// The term this node leads in, and when it noticed (its clock).
    leading: Option<(u64, Millis)>,
    /// Renewals acknowledged without a write whose checkpoint has not been
    /// applied yet: the latest time, and whether a checkpoint carries it.
    unsettled: HashMap<InstanceKey, (Millis, bool)>,
    /// How many of those no checkpoint carries yet.
    unsent: usize,
}

impl Acks {
    /// Notes an acknowledgement without a write at `at`.
    fn record(&mut self, key: InstanceKey, at: Millis) {
        match self.unsettled.entry(key) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert((at, false));
                self.unsent += 1;
            }
            std::collections::hash_map::Entry::Occupied(mut o) => {
                let e = o.get_mut();
                if at >= e.0 {
                    if e.1 {
                        self.unsent += 1;
                    }
                    *e = (at, false);
                }
            }
        }
    }

    /// The renewals no checkpoint carries yet, marked as carried.
    fn take_for_checkpoint(&mut self) -> Vec<Renewal> {
        self.unsent = 0;
        self.unsettled
            .iter_mut()
            .filter(|(_, (_, sent))| !*sent)
            .map(|((service_name, instance_id), (at, sent))| {
                *sent = true;
                Renewal {
                    service_name: service_name.clone(),
                    instance_id: instance_id.clone(),
                    at: *at,
                }
            })
            .collect()
    }

    /// A checkpoint was applied: what it carried is in the log now, unless
    /// the instance renewed again since.
    fn settle(&mut self, renewals: &[Renewal]) {
        for r in renewals {
            let key = (r.service_name.clone(), r.instance_id.clone());
            if self.unsettled.get(&key).is_some_and(|(at, _)| *at <= r.at) {
                self.unsettled.remove(&key);
            }
        }
    }

    /// A checkpoint failed: carry its renewals again next time.
    fn resend(&mut self, renewals: &[Renewal]) {
        for r in renewals {
            let key = (r.service_name.clone(), r.instance_id.clone());
            if let Some(e) = self.unsettled.get_mut(&key) {
                if e.1 {
                    e.1 = false;
                    self.unsent += 1;
                }
            }
        }
    }
}

pub struct Leases {
    raft: Raft,
    read_index: Arc<ReadIndex>,
    replica: Arc<Replica>,
    metrics: Arc<Metrics>,
    config: ExpiryConfig,
    /// Renewals acknowledged without a write, until a checkpoint is applied.
    acks: Mutex<Acks>,
    batches: mpsc::UnboundedSender<BatchItem>,
    status: Mutex<Option<ExpiryStatus>>,
    audit: crate::audit::AuditLog,
}

impl Leases {
    /// Creates the lease manager and spawns its tasks (batcher, checkpoints,
    /// expiry), which stop when `stop` turns true.
    pub fn start(
        raft: Raft,
        read_index: Arc<ReadIndex>,
        replica: Arc<Replica>,
        metrics: Arc<Metrics>,
        config: ExpiryConfig,
        audit: crate::audit::AuditLog,
        stop: watch::Receiver<bool>,
    ) -> (Arc<Self>, Vec<tokio::task::JoinHandle<()>>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let leases = Arc::new(Self {
            raft,
            read_index,
            replica,
            metrics,
            config,
            acks: Mutex::new(Acks::default()),
            batches: tx,
            status: Mutex::new(None),
            audit,
        });
        let tasks = vec![
            tokio::spawn(leases.clone().batcher(rx, stop.clone())),
            tokio::spawn(leases.clone().checkpoints(stop.clone())),
            tokio::spawn(leases.clone().expiry(stop)),
        ];
        (leases, tasks)
    }

    /// The latest expiry round on this node, if it ran one as leader.
    pub fn status(&self) -> Option<ExpiryStatus> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn is_leader(&self) -> bool {
        self.raft.metrics().borrow().state == ServerState::Leader
    }

    fn acks(&self) -> std::sync::MutexGuard<'_, Acks> {
        self.acks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that `ids` of `service` were answered at `at` (unless the
    /// test-only broken rule forgets them).
    fn remember<'a>(&self, service: &str, ids: impl IntoIterator<Item = &'a String>, at: Millis) {
        if self.config.broken_leases {
            return;
        }
        let mut acks = self.acks();
        for id in ids {
            acks.record((service.to_string(), id.clone()), at);
        }
    }

    /// Serves a heartbeat on the leader: `NotFound` for an unknown service or
    /// instance (the client registers again), else every matching instance
    /// is renewed and the count returned.
    ///
    /// The answer is linearizable. An answer decided from the replica alone
    /// (`NotFound`, or an ack without a write) waits for a shared read-index
    /// round first: the leader confirms with a quorum that it still leads
    /// and waits until it has applied everything committed before the
    /// heartbeat arrived, then looks again. Without that, a deposed leader
    /// that has not noticed yet would answer from an old state (the harness
    /// in `examples/jepsen` caught a cut-off old leader answering `404`).
    /// A renewal that goes through a `Renew` entry needs no extra round:
    /// its commit, proposed after the heartbeat arrived, confirms as much.
    pub async fn heartbeat(&self, req: &HeartbeatRequest, remaining: Duration) -> WriteReply {
        let deadline = Instant::now() + remaining;
        let mut confirmed = false;
        let mut committed_once = false;
        loop {
            let now = now_ms();
            let found = self.replica.read().registry.heartbeat_targets(
                &req.service_name,
                req.instance_id.as_deref(),
                req.origin.as_deref(),
            );
            let targets = match found {
                HeartbeatTargets::Live(t) => t,
                HeartbeatTargets::Nothing => Vec::new(),
                HeartbeatTargets::Expired(ids) => {
                    // Decided from the replica: confirm first, like a 404.
                    if !confirmed {
                        if let Err(reply) = self.confirm(deadline).await {
                            return reply;
                        }
                        confirmed = true;
                        continue;
                    }
                    return self.revive(&req.service_name, ids, deadline).await;
                }
            };
            if targets.is_empty() {
                if confirmed {
                    return WriteReply::Done(CommandResult::NotFound);
                }
                if let Err(reply) = self.confirm(deadline).await {
                    return reply;
                }
                confirmed = true;
                continue;
            }
            let stale: Vec<Renewal> = targets
                .iter()
                .filter(|(_, ack_until)| !can_ack(*ack_until, now))
                .map(|(id, _)| Renewal {
                    service_name: req.service_name.clone(),
                    instance_id: id.clone(),
                    at: now,
                })
                .collect();
            if stale.is_empty() {
                if !confirmed {
                    if let Err(reply) = self.confirm(deadline).await {
                        return reply;
                    }
                    confirmed = true;
                    continue;
                }
                // Recorded after a commit too: the answer goes out at `now`,
                // later than the committed renewal's stamp by the commit's
                // latency, and the bound must cover the answer.
                self.remember(&req.service_name, targets.iter().map(|(id, _)| id), now);
                if !committed_once {
                    self.metrics
                        .renewals
                        .with_label_values(&["lease"])
                        .inc_by(targets.len() as u64);
                }
                return WriteReply::Done(CommandResult::Touched(targets.len()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return WriteReply::not_committed_in_time();
            }
            let n = stale.len() as u64;
            match tokio::time::timeout(left, self.commit(stale)).await {
                Err(_) => return WriteReply::not_committed_in_time(),
                Ok(WriteReply::Done(_)) => {
                    self.metrics
                        .renewals
                        .with_label_values(&["committed"])
                        .inc_by(n);
                    // Check again against the new committed value.
                    committed_once = true;
                    confirmed = true;
                }
                Ok(other) => return other,
            }
        }
    }

    /// Brings expired instances back for a heartbeat that named them; apply
    /// checks the tombstones and the retention window again.
    async fn revive(&self, service: &str, ids: Vec<String>, deadline: Instant) -> WriteReply {
        let cmd = Command::Revive {
            service_name: service.to_string(),
            instance_ids: ids,
            at: now_ms(),
            retention_ms: self.config.tombstones.retention_ms,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let committed = crate::leader::writes::propose(&self.raft, cmd).await;
        let reply = match tokio::time::timeout(left, committed).await {
            Err(_) => return WriteReply::not_committed_in_time(),
            Ok(r) => r,
        };
        if let WriteReply::Done(CommandResult::Revived(ids)) = &reply {
            // The answer goes out now, after the commit: as a renewal.
            self.remember(service, ids, now_ms());
            self.metrics.revived.inc_by(ids.len() as u64);
            tracing::info!(service, instances = ?ids, "a heartbeat revived expired instances");
            self.audit.record(
                None,
                "revive",
                serde_json::json!(ids
                    .iter()
                    .map(|i| format!("{service}/{i}"))
                    .collect::<Vec<_>>()),
                crate::audit::Outcome::Ok,
                None,
            );
        }
        reply
    }

    /// Confirms leadership (a shared read-index round) and waits until the
    /// replica has applied the read index.
    async fn confirm(&self, deadline: Instant) -> Result<(), WriteReply> {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let index = match self.read_index.get(remaining).await {
            ReadIndexReply::Index(i) => i,
            ReadIndexReply::NotLeader(l) => return Err(WriteReply::NotLeader(l)),
            ReadIndexReply::Unavailable(m) => return Err(WriteReply::Unavailable(m)),
        };
        let mut applied = self.replica.subscribe();
        let caught_up =
            tokio::time::timeout(deadline.saturating_duration_since(Instant::now()), async {
                applied.wait_for(|&a| a >= index).await.is_ok()
            })
            .await;
        if caught_up != Ok(true) {
            return Err(WriteReply::Unavailable(format!(
                "the leader did not apply index {index} in time; retry shortly"
            )));
        }
        Ok(())
    }

    /// Commits renewals in the next `Renew` entry and waits for it.
    async fn commit(&self, renewals: Vec<Renewal>) -> WriteReply {
        let (tx, rx) = oneshot::channel();
        let item = BatchItem {
            renewals,
            done: Some(tx),
        };
        if self.batches.send(item).is_err() {
            return WriteReply::Unavailable("the node is stopping".into());
        }
        rx.await
            .unwrap_or_else(|_| WriteReply::Unavailable("the node is stopping".into()))
    }

    /// Group commit: while `RENEW_IN_FLIGHT` `Renew` entries are being
    /// committed, renewals queue up and all go into the next one.
    async fn batcher(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<BatchItem>,
        mut stop: watch::Receiver<bool>,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(RENEW_IN_FLIGHT));
        loop {
            let first = tokio::select! {
                _ = stop.changed() => return,
                item = rx.recv() => match item { Some(i) => i, None => return },
            };
            // While every slot is taken, renewals queue behind `first`.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let mut items = vec![first];
            let mut count = items[0].renewals.len();
            while count < RENEW_BATCH {
                match rx.try_recv() {
                    Ok(item) => {
                        count += item.renewals.len();
                        items.push(item);
                    }
                    Err(_) => break,
                }
            }
            // What checkpoints carry settles once the entry is applied.
            let carried: Vec<Renewal> = items
                .iter()
                .filter(|i| i.done.is_none())
                .flat_map(|i| i.renewals.iter().cloned())
                .collect();
            let renewals: Vec<Renewal> = items
                .iter_mut()
                .flat_map(|i| std::mem::take(&mut i.renewals))
                .collect();
            // Proposed here, in order; the wait for the commit runs apart, so
            // the next entry can be proposed while this one is replicated.
            let committed =
                crate::leader::writes::propose(&self.raft, Command::Renew { renewals }).await;
            let me = self.clone();
            tokio::spawn(async move {
                let reply = committed.await;
                drop(slot);
                if matches!(reply, WriteReply::Done(_)) {
                    me.metrics.checkpoints.inc();
                    me.acks().settle(&carried);
                } else {
                    me.acks().resend(&carried);
                }
                for item in items {
                    if let Some(done) = item.done {
                        let _ = done.send(reply.clone());
                    }
                }
            });
        }
    }

    /// Every 100 ms once 256 wait, else once a second, writes the renewals
    /// acknowledged without a write, so followers (and a future leader) see
    /// a fresh `last_heartbeat`. Each instance is carried once per renewal
    /// it made, so a fleet renewing every TTL/2 puts each instance in the
    /// log once per TTL/2.
    async fn checkpoints(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(CHECKPOINT_TICK) => {}
            }
            let renewals = {
                let mut acks = self.acks();
                if acks.unsent < CHECKPOINT_SOON && last.elapsed() < CHECKPOINT_EVERY {
                    continue;
                }
                last = Instant::now();
                if acks.unsent == 0 || !self.is_leader() {
                    // A deposed leader's renewals are covered by the ack
                    // window of the committed values (see registry::lease).
                    continue;
                }
                acks.take_for_checkpoint()
            };
            for chunk in renewals.chunks(RENEW_BATCH) {
                let _ = self.batches.send(BatchItem {
                    renewals: chunk.to_vec(),
                    done: None,
                });
            }
        }
    }

    /// The leader's expiry rounds, with the mass-expiry protection.
    async fn expiry(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let c = self.config;
        let mut guard = ExpiryGuard::new(
            c.protection,
            c.window.as_millis() as Millis,
            c.pause_max.as_millis() as Millis,
        );
        // The guard's clock: monotonic, so a wall clock step moves no window.
        let origin = Instant::now();
        let mono = || origin.elapsed().as_millis() as Millis;
        loop {
            // Jitter spreads rounds, so a burst of deadlines is not one storm.
            let pause = Duration::from_millis(800 + rand::random::<u64>() % 400);
            tokio::select! {
                _ = stop.changed() => return,
                _ = tokio::time::sleep(pause) => {}
            }
            let (leader, term) = {
                let m = self.raft.metrics();
                let m = m.borrow();
                (m.state == ServerState::Leader, m.current_term)
            };
            if !leader {
                guard.reset();
                *self.status.lock().unwrap_or_else(|p| p.into_inner()) = None;
                *self.acks() = Acks::default();
                continue;
            }
            let leading_since = {
                let mut acks = self.acks();
                match acks.leading {
                    Some((t, since)) if t == term => since,
                    _ => {
                        // A new term (or the first round that sees it). The
                        // renewals acknowledged so far stay: they are real,
                        // and a later bound is only more careful. (Dropping
                        // them lost the renewals acknowledged between the
                        // election and this round: never checkpointed.)
                        let since = now_ms();
                        acks.leading = Some((term, since));
                        since
                    }
                }
            };
            // Judge on a state that holds everything committed before now,
            // earlier leaders' renewals included.
            let confirm_by = Instant::now() + Duration::from_secs(1);
            if let Err(reply) = self.confirm(confirm_by).await {
                tracing::debug!(?reply, "expiry round skipped: leadership not confirmed");
                continue;
            }
            let now = now_ms();
            // Restored from a backup: every instance gets its whole TTL from
            // now, before anything may expire.
            if self.replica.read().registry.clocks_pending() {
                match self
                    .raft
                    .client_write(Command::RestartClocks { at: now })
                    .await
                {
                    Ok(resp) => {
                        tracing::info!(result = ?resp.data, "restarted the restored instances' clocks")
                    }
                    Err(e) => tracing::debug!(error = %e, "clock restart not committed"),
                }
                continue;
            }
            let keep = self.config.tombstones;
            let (total, mut due, paused, prune) = {
                let applied = self.replica.read();
                let r = &applied.registry;
                let prune = r.needs_pruning(now, &keep);
                let acks = self.acks();
                let due: Vec<(String, String)> = r
                    .due(now, EXPIRY_MARGIN_MS)
                    .into_iter()
                    .filter(|k| {
                        let Some(i) = r.get_instance(&k.0, &k.1) else {
                            return false;
                        };
                        if self.config.broken_leases {
                            return true;
                        }
                        let unsettled = acks.unsettled.get(k).map(|(at, _)| *at);
                        lease::may_expire(
                            i.last_heartbeat,
                            i.ttl_seconds,
                            unsettled,
                            leading_since,
                            now,
                        )
                    })
                    .collect();
                (r.instance_count(), due, r.expiry_paused(), prune)
            };
            let round = guard.round(mono(), total, due.len());
            let (a, pause_now, overridden) = (round.assessment, round.pause, round.overridden);
            if round.just_overridden {
                tracing::warn!(
                    share = a.share,
                    "expiry was paused for longer than {:?}; resuming it anyway",
                    self.config.pause_max
                );
            }
            *self.status.lock().unwrap_or_else(|p| p.into_inner()) = Some(ExpiryStatus {
                total: a.total,
                overdue: a.overdue,
                recently_expired: a.recently_expired,
                share: a.share,
                threshold: self.config.protection.threshold,
                overridden,
            });
            self.metrics.expiry_paused.set(i64::from(pause_now));
            if pause_now != paused {
                if pause_now {
                    tracing::warn!(
                        overdue = a.overdue,
                        total = a.total,
                        recently_expired = a.recently_expired,
                        share = a.share,
                        threshold = self.config.protection.threshold,
                        "pausing expiry: too many instances would expire at once; the registry or its network is likely sick, not the services"
                    );
                } else {
                    tracing::info!(share = a.share, "resuming expiry: renewals are back");
                }
                let cmd = Command::SetExpiryPaused { paused: pause_now };
                if let Err(e) = self.raft.client_write(cmd).await {
                    tracing::debug!(error = %e, "pause flag not committed");
                    continue;
                }
            }
            if pause_now {
                continue;
            }
            due.truncate(MAX_EXPIRE_PER_ROUND);
            if due.is_empty() && prune {
                // Nothing expires, but tombstones are past the window (or
                // the limit shrank): an empty expiry prunes them.
                let cmd = Command::ExpireAfter {
                    now_ms: now,
                    term,
                    instances: Vec::new(),
                    keep,
                    margin_ms: EXPIRY_MARGIN_MS,
                };
                if let Err(e) = self.raft.client_write(cmd).await {
                    tracing::debug!(error = %e, "tombstone pruning not committed");
                }
            }
            for chunk in due.chunks(EXPIRE_BATCH) {
                let cmd = Command::ExpireAfter {
                    now_ms: now,
                    term,
                    instances: chunk.to_vec(),
                    keep,
                    margin_ms: EXPIRY_MARGIN_MS,
                };
                match self.raft.client_write(cmd).await {
                    Ok(resp) => {
                        if let CommandResult::Expired(n) = resp.data {
                            if n > 0 {
                                self.metrics.expired.inc_by(n as u64);
                                guard.expired(mono(), n);
                                tracing::info!(expired = n, "expired instances whose TTL ran out");
                                // The round's candidates: apply skips any renewed meanwhile.
                                let targets: Vec<String> =
                                    chunk.iter().map(|(s, i)| format!("{s}/{i}")).collect();
                                self.audit.record(
                                    None,
                                    "expire",
                                    serde_json::json!(targets),
                                    crate::audit::Outcome::Ok,
                                    Some(serde_json::json!({ "count": n })),
                                );
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "expiry not committed");
                        break;
                    }
                }
            }
        }
    }
}
