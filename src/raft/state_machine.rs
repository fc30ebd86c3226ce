//! The Raft state machine: applies committed commands to the registry, keeps
//! a persistent copy of it in sled, and builds and installs snapshots.
//!
//! The live registry sits in memory behind a [`Replica`] that the HTTP layer
//! reads; sled holds the same data (tree `sm`) so a restart does not replay
//! the whole log. Apply never reads the clock: times come inside commands.
//!
//! Every value is sealed with a CRC32 (see [`super::codec`]); [`check`]
//! verifies every record and the current snapshot at start-up.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::codec::{describe_sled, seal, show_key, unseal, Corruption};
use super::durable::DiskSync;
use super::{Entry, LogId, Node, NodeId, StorageError, TypeConfig};
use crate::registry::{Change, Command, CommandResult, Instance, Registry};

pub(crate) const APPLIED: &[u8] = b"m/applied";
const MEMBERSHIP: &[u8] = b"m/membership";
const EXPIRY_PAUSED: &[u8] = b"m/expiry_paused";
const INSTANCE_PREFIX: &[u8] = b"i/";
const CURRENT_SNAPSHOT: &[u8] = b"current";
pub(crate) const SM_TREE: &str = "sm";
pub(crate) const SNAPSHOT_TREE: &str = "snapshot";

/// What a node has applied: the registry and the Raft position it reflects.
#[derive(Debug, Default)]
pub struct Applied {
    pub registry: Registry,
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership<NodeId, Node>,
    /// When each view last changed, for blocking queries.
    pub views: ViewIndex,
}

/// The log index at which each view last changed: one service's instances,
/// and the list of service names. Renewals (`Renew`) only move
/// `last_heartbeat` and do not count, so watchers are not woken every
/// second. Kept in memory only: after a restart or a snapshot install every
/// view counts as changed at that point, so a watcher may wake once for
/// nothing but never misses a change.
#[derive(Debug, Default)]
pub struct ViewIndex {
    floor: u64,
    services: HashMap<String, u64>,
    list: u64,
}

impl ViewIndex {
    /// The index of the last change to `service` (including its removal).
    pub fn service(&self, service: &str) -> u64 {
        self.services.get(service).copied().unwrap_or(self.floor)
    }

    /// The index of the last change to the list of service names.
    pub fn list(&self) -> u64 {
        self.list.max(self.floor)
    }

    fn reset(&mut self, floor: u64) {
        *self = Self {
            floor,
            ..Self::default()
        };
    }
}

impl Applied {
    pub fn applied_index(&self) -> u64 {
        self.last_applied.map_or(0, |l| l.index)
    }
}

/// The node's applied state, shared between the state machine (writer) and
/// the HTTP handlers (readers).
///
/// A `std::sync::RwLock`, not tokio's: every critical section is short and
/// never awaits, and readers must not yield while holding it.
#[derive(Debug)]
pub struct Replica {
    state: RwLock<Applied>,
    snapshots_installed: AtomicU64,
    /// The applied index, published after every apply: blocking queries
    /// wait on it (one wake-up shared by every waiter).
    applied_tx: watch::Sender<u64>,
}

impl Default for Replica {
    fn default() -> Self {
        Self {
            state: RwLock::default(),
            snapshots_installed: AtomicU64::new(0),
            applied_tx: watch::channel(0).0,
        }
    }
}

impl Replica {
    /// Wakes whenever this replica applies something.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    fn publish(&self, applied_index: u64) {
        self.applied_tx.send_replace(applied_index);
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// How many snapshots from a leader this node has installed.
    pub fn snapshots_installed(&self) -> u64 {
        self.snapshots_installed.load(Ordering::Relaxed)
    }
}

/// A snapshot as stored in sled and sent to followers.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// The serialized form of the registry inside a snapshot.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    instances: Vec<Instance>,
    expiry_paused: bool,
}

fn instance_key(service: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(INSTANCE_PREFIX.len() + service.len() + 1 + id.len());
    k.extend_from_slice(INSTANCE_PREFIX);
    k.extend_from_slice(service.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    seal(v).expect("in-memory values always serialize")
}

/// One record of the `sm` tree, decoded.
enum Record {
    Applied(Option<LogId>),
    Membership(StoredMembership<NodeId, Node>),
    ExpiryPaused(bool),
    Instance(Instance),
}

/// What a record's key names, for messages: `instance a/10.0.0.1:80`.
fn record_name(k: &[u8]) -> String {
    match k {
        APPLIED => "state machine applied log id".into(),
        MEMBERSHIP => "state machine membership".into(),
        EXPIRY_PAUSED => "state machine expiry flag".into(),
        _ => match k.strip_prefix(INSTANCE_PREFIX) {
            Some(rest) => {
                let name = String::from_utf8_lossy(rest).replacen('\0', "/", 1);
                format!("state machine instance {name}")
            }
            None => format!("state machine record {}", show_key(k)),
        },
    }
}

/// Decodes one record of the `sm` tree, checking its checksum and that it
/// belongs under its key.
fn decode_record(k: &[u8], v: &[u8]) -> Result<Record, Corruption> {
    let bad = |why| Corruption::new(record_name(k), why);
    Ok(match k {
        APPLIED => Record::Applied(unseal(v).map_err(bad)?),
        MEMBERSHIP => Record::Membership(unseal(v).map_err(bad)?),
        EXPIRY_PAUSED => Record::ExpiryPaused(unseal(v).map_err(bad)?),
        _ if k.starts_with(INSTANCE_PREFIX) => {
            let inst: Instance = unseal(v).map_err(bad)?;
            if instance_key(&inst.service_name, &inst.instance_id) != k {
                return Err(Corruption::new(
                    record_name(k),
                    format!("holds instance {}/{}", inst.service_name, inst.instance_id),
                ));
            }
            Record::Instance(inst)
        }
        _ => {
            return Err(Corruption::new(
                "state machine",
                format!("unexpected key {}", show_key(k)),
            ))
        }
    })
}

/// Decodes the stored snapshot, and the registry inside it.
fn decode_snapshot(v: &[u8]) -> Result<(StoredSnapshot, SnapshotData), Corruption> {
    let snap: StoredSnapshot = unseal(v).map_err(|why| Corruption::new("current snapshot", why))?;
    let data = bincode::deserialize(&snap.data).map_err(|e| {
        Corruption::new(
            format!("snapshot {}", snap.meta.snapshot_id),
            format!("its registry does not decode ({e})"),
        )
    })?;
    Ok((snap, data))
}

/// What the start-up check read from the state machine.
#[derive(Debug, Clone, Default)]
pub struct StateMachineCheck {
    pub instances: u64,
    pub applied: Option<LogId>,
    /// The current snapshot's last log id and size, if there is one.
    pub snapshot: Option<(Option<LogId>, usize)>,
}

/// Verifies every record of the state machine (checksum, and that each
/// instance is stored under its own key) and the current snapshot
/// (checksum, and that its registry decodes).
pub fn check(db: &sled::Db) -> Result<StateMachineCheck, Corruption> {
    let sled_err = |what: &str, e: sled::Error| Corruption::new(what, describe_sled(&e));
    let sm = db
        .open_tree(SM_TREE)
        .map_err(|e| sled_err("state machine", e))?;
    let mut found = StateMachineCheck::default();
    for item in sm.iter() {
        let (k, v) = item.map_err(|e| sled_err("state machine", e))?;
        match decode_record(&k, &v)? {
            Record::Applied(a) => found.applied = a,
            Record::Instance(_) => found.instances += 1,
            Record::Membership(_) | Record::ExpiryPaused(_) => {}
        }
    }
    let snapshots = db
        .open_tree(SNAPSHOT_TREE)
        .map_err(|e| sled_err("snapshot", e))?;
    for item in snapshots.iter() {
        let (k, v) = item.map_err(|e| sled_err("snapshot", e))?;
        if k.as_ref() != CURRENT_SNAPSHOT {
            return Err(Corruption::new(
                "snapshot",
                format!("unexpected key {}", show_key(&k)),
            ));
        }
        let (snap, _) = decode_snapshot(&v)?;
        found.snapshot = Some((snap.meta.last_log_id, snap.data.len()));
    }
    Ok(found)
}

/// The sled-backed state machine. Clones share everything.
#[derive(Clone)]
pub struct StateMachineStore {
    replica: Arc<Replica>,
    db: sled::Db,
    sync: DiskSync,
    sm: sled::Tree,
    snapshots: sled::Tree,
}

impl StateMachineStore {
    /// Opens the state machine, loading the applied registry from sled, or
    /// from the current snapshot when that is newer (a crash during install).
    /// Snapshots are made durable through `sync`.
    pub fn open(db: &sled::Db, sync: DiskSync) -> Result<Self, StorageError> {
        let store = Self {
            replica: Arc::new(Replica::default()),
            db: db.clone(),
            sync,
            sm: db
                .open_tree(SM_TREE)
                .map_err(|e| StorageIOError::read_state_machine(&e))?,
            snapshots: db
                .open_tree(SNAPSHOT_TREE)
                .map_err(|e| StorageIOError::read_state_machine(&e))?,
        };
        let mut applied = Applied::default();
        for item in store.sm.iter() {
            let (k, v) = item.map_err(|e| StorageIOError::read_state_machine(&e))?;
            match decode_record(&k, &v).map_err(|e| StorageIOError::read_state_machine(&e))? {
                Record::Applied(a) => applied.last_applied = a,
                Record::Membership(m) => applied.membership = m,
                Record::ExpiryPaused(p) => applied.registry.restore_expiry_paused(p),
                Record::Instance(inst) => applied.registry.restore(inst),
            }
        }
        let floor = applied.applied_index();
        applied.views.reset(floor);
        *store.replica.write() = applied;
        store.replica.publish(floor);
        if let Some(snap) = store.read_snapshot()? {
            if snap.meta.last_log_id > store.replica.read().last_applied {
                store.load_snapshot(&snap)?;
            }
        }
        Ok(store)
    }

    /// The shared applied state that HTTP handlers read.
    pub fn replica(&self) -> Arc<Replica> {
        self.replica.clone()
    }

    fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        match self
            .snapshots
            .get(CURRENT_SNAPSHOT)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
        {
            None => Ok(None),
            Some(v) => Ok(Some(
                unseal(&v)
                    .map_err(|why| Corruption::new("current snapshot", why))
                    .map_err(|e| StorageIOError::read_snapshot(None, &e))?,
            )),
        }
    }

    async fn save_snapshot(&self, snap: &StoredSnapshot) -> Result<(), StorageError> {
        let sig = Some(snap.meta.signature());
        self.snapshots
            .insert(CURRENT_SNAPSHOT, encode(snap))
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        self.sync
            .flush(&self.db)
            .await
            .map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
        Ok(())
    }

    /// Replaces the applied state, in memory and in sled, with a snapshot's.
    fn load_snapshot(&self, snap: &StoredSnapshot) -> Result<(), StorageError> {
        let sig = Some(snap.meta.signature());
        let data: SnapshotData = bincode::deserialize(&snap.data)
            .map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
        let mut registry = Registry::new();
        registry.restore_expiry_paused(data.expiry_paused);
        let mut batch = sled::Batch::default();
        for item in self.sm.iter().keys() {
            batch.remove(item.map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?);
        }
        for inst in data.instances {
            batch.insert(
                instance_key(&inst.service_name, &inst.instance_id),
                encode(&inst),
            );
            registry.restore(inst);
        }
        batch.insert(APPLIED, encode(&snap.meta.last_log_id));
        batch.insert(MEMBERSHIP, encode(&snap.meta.last_membership));
        batch.insert(EXPIRY_PAUSED, encode(&data.expiry_paused));
        self.sm
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
        let floor = snap.meta.last_log_id.map_or(0, |l| l.index);
        let mut views = ViewIndex::default();
        views.reset(floor);
        *self.replica.write() = Applied {
            registry,
            last_applied: snap.meta.last_log_id,
            membership: snap.meta.last_membership.clone(),
            views,
        };
        self.replica.publish(floor);
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (data, last_log_id, last_membership) = {
            let applied = self.replica.read();
            (
                SnapshotData {
                    instances: applied.registry.instances().cloned().collect(),
                    expiry_paused: applied.registry.expiry_paused(),
                },
                applied.last_applied,
                applied.membership.clone(),
            )
        };
        // Plain bincode: this travels to followers as is. At rest the whole
        // stored snapshot is sealed.
        let data =
            bincode::serialize(&data).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        // The id only has to be unique; the wall clock is fine here because
        // building a snapshot is not part of apply.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let snapshot_id = match last_log_id {
            Some(l) => format!("{}-{}-{nanos}", l.leader_id, l.index),
            None => format!("none-{nanos}"),
        };
        let meta = SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        };
        let stored = StoredSnapshot { meta, data };
        self.save_snapshot(&stored).await?;
        tracing::info!(
            snapshot = %stored.meta.snapshot_id,
            bytes = stored.data.len(),
            "built snapshot"
        );
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl Applied {
    /// Applies one command of the entry at `index`, and records which views
    /// it changed. The commands of a `Batch` count one by one.
    fn apply_command(
        &mut self,
        cmd: &Command,
        term: u64,
        index: u64,
        changes: &mut Vec<Change>,
    ) -> CommandResult {
        match cmd {
            Command::Batch { commands } => CommandResult::Batch(
                commands
                    .iter()
                    .map(|c| self.apply_command(c, term, index, changes))
                    .collect(),
            ),
            // Renewals only move `last_heartbeat`: no view changes.
            Command::Renew { .. } => self.registry.apply(cmd, term, changes),
            _ => {
                let (first_change, services_before) =
                    (changes.len(), self.registry.service_count());
                let result = self.registry.apply(cmd, term, changes);
                for name in changes[first_change..]
                    .iter()
                    .filter_map(Change::service_name)
                {
                    self.views.services.insert(name.to_string(), index);
                }
                // A single command adds or removes services, never both.
                if self.registry.service_count() != services_before {
                    self.views.list = index;
                }
                result
            }
        }
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, Node>), StorageError> {
        let applied = self.replica.read();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut results = Vec::new();
        let mut changes = Vec::new();
        let mut batch = sled::Batch::default();
        let last_index = {
            let mut guard = self.replica.write();
            let applied = &mut *guard;
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                let result = match entry.payload {
                    EntryPayload::Blank => CommandResult::None,
                    EntryPayload::Normal(cmd) => applied.apply_command(
                        &cmd,
                        entry.log_id.leader_id.get_term(),
                        entry.log_id.index,
                        &mut changes,
                    ),
                    EntryPayload::Membership(m) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), m);
                        batch.insert(MEMBERSHIP, encode(&applied.membership));
                        CommandResult::None
                    }
                };
                results.push(result);
            }
            for change in changes.drain(..) {
                match change {
                    Change::Put(inst) => batch.insert(
                        instance_key(&inst.service_name, &inst.instance_id),
                        encode(&inst),
                    ),
                    Change::Delete {
                        service_name,
                        instance_id,
                    } => batch.remove(instance_key(&service_name, &instance_id)),
                    Change::ExpiryPaused(p) => batch.insert(EXPIRY_PAUSED, encode(&p)),
                }
            }
            batch.insert(APPLIED, encode(&applied.last_applied));
            applied.applied_index()
        };
        // One atomic batch per call: data and applied index move together.
        // Not flushed: the flushed log is the source of truth after a crash.
        self.sm
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.replica.publish(last_index);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: snapshot.into_inner(),
        };
        // Save first: if we crash while replacing the state, `open` finds a
        // snapshot newer than the state and loads it again.
        self.save_snapshot(&stored).await?;
        self.load_snapshot(&stored)?;
        self.replica
            .snapshots_installed
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot from leader");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self.read_snapshot()?.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
