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
use crate::registry::{Change, Command, CommandResult, Instance, InstanceExt, Registry, Tombstone};

pub(crate) const APPLIED: &[u8] = b"m/applied";
const MEMBERSHIP: &[u8] = b"m/membership";
const EXPIRY_PAUSED: &[u8] = b"m/expiry_paused";
const INSTANCE_PREFIX: &[u8] = b"i/";
/// What is kept beside an instance ([`InstanceExt`]), when not the default.
const EXT_PREFIX: &[u8] = b"x/";
/// Tombstones of expired instances.
const TOMBSTONE_PREFIX: &[u8] = b"t/";
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

/// The serialized form of the registry inside a snapshot: this, then (from
/// this release on) a [`SnapshotExt`] right after it. A snapshot of an
/// earlier release ends after this part; one of this release read by an
/// earlier release has its extension ignored (bincode leaves trailing bytes).
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    instances: Vec<Instance>,
    expiry_paused: bool,
}

/// The part of a snapshot added after the first release.
#[derive(Serialize, Deserialize, Default)]
struct SnapshotExt {
    /// `(service, instance id, ext)` of each instance whose ext is not the
    /// default.
    ext: Vec<(String, String, InstanceExt)>,
    tombstones: Vec<Tombstone>,
}

/// A snapshot's registry, both parts.
fn encode_snapshot_data(registry: &Registry) -> Result<Vec<u8>, bincode::Error> {
    let data = SnapshotData {
        instances: registry.instances().cloned().collect(),
        expiry_paused: registry.expiry_paused(),
    };
    let ext = SnapshotExt {
        ext: registry
            .instances_ext()
            .filter(|(_, e)| **e != InstanceExt::default())
            .map(|(i, e)| (i.service_name.clone(), i.instance_id.clone(), e.clone()))
            .collect(),
        tombstones: registry.tombstones().cloned().collect(),
    };
    let mut out = bincode::serialize(&data)?;
    bincode::serialize_into(&mut out, &ext)?;
    Ok(out)
}

/// Reads a snapshot's registry, with or without the extension.
fn decode_snapshot_data(bytes: &[u8]) -> Result<Registry, bincode::Error> {
    let mut cursor = Cursor::new(bytes);
    let data: SnapshotData = bincode::deserialize_from(&mut cursor)?;
    let ext: SnapshotExt = if (cursor.position() as usize) < bytes.len() {
        bincode::deserialize_from(&mut cursor)?
    } else {
        SnapshotExt::default()
    };
    let mut registry = Registry::new();
    registry.restore_expiry_paused(data.expiry_paused);
    for inst in data.instances {
        registry.restore(inst, InstanceExt::default());
    }
    for (service, id, e) in ext.ext {
        registry.restore_ext(&service, &id, e);
    }
    for t in ext.tombstones {
        registry.restore_tombstone(t);
    }
    Ok(registry)
}

fn prefixed_key(prefix: &[u8], service: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + service.len() + 1 + id.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(service.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

fn instance_key(service: &str, id: &str) -> Vec<u8> {
    prefixed_key(INSTANCE_PREFIX, service, id)
}

/// `(service, instance id)` of a key made by [`prefixed_key`].
fn split_key(rest: &[u8]) -> Option<(String, String)> {
    let at = rest.iter().position(|&b| b == 0)?;
    Some((
        String::from_utf8(rest[..at].to_vec()).ok()?,
        String::from_utf8(rest[at + 1..].to_vec()).ok()?,
    ))
}

/// An instance's records: `i/` always, `x/` only when its ext is not the
/// default (so a registry of an earlier release stores exactly what it did).
fn put_instance(batch: &mut sled::Batch, inst: &Instance, ext: &InstanceExt) {
    batch.insert(
        instance_key(&inst.service_name, &inst.instance_id),
        encode(inst),
    );
    put_ext(batch, &inst.service_name, &inst.instance_id, ext);
}

fn put_ext(batch: &mut sled::Batch, service: &str, id: &str, ext: &InstanceExt) {
    let k = prefixed_key(EXT_PREFIX, service, id);
    if *ext == InstanceExt::default() {
        batch.remove(k);
    } else {
        batch.insert(k, encode(ext));
    }
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
    Ext(String, String, InstanceExt),
    Tombstone(Tombstone),
}

/// What a record's key names, for messages: `instance a/10.0.0.1:80`.
fn record_name(k: &[u8]) -> String {
    match k {
        APPLIED => "state machine applied log id".into(),
        MEMBERSHIP => "state machine membership".into(),
        EXPIRY_PAUSED => "state machine expiry flag".into(),
        _ => {
            let named = [
                (INSTANCE_PREFIX, "instance"),
                (EXT_PREFIX, "instance origin"),
                (TOMBSTONE_PREFIX, "tombstone"),
            ];
            for (prefix, what) in named {
                if let Some(rest) = k.strip_prefix(prefix) {
                    let name = String::from_utf8_lossy(rest).replacen('\0', "/", 1);
                    return format!("state machine {what} {name}");
                }
            }
            format!("state machine record {}", show_key(k))
        }
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
        _ if k.starts_with(EXT_PREFIX) => {
            let (service, id) = split_key(&k[EXT_PREFIX.len()..]).ok_or_else(|| {
                Corruption::new(record_name(k), "its key names no service and instance")
            })?;
            Record::Ext(service, id, unseal(v).map_err(bad)?)
        }
        _ if k.starts_with(TOMBSTONE_PREFIX) => {
            let t: Tombstone = unseal(v).map_err(bad)?;
            let i = &t.instance;
            if prefixed_key(TOMBSTONE_PREFIX, &i.service_name, &i.instance_id) != k {
                return Err(Corruption::new(
                    record_name(k),
                    format!(
                        "holds the tombstone of {}/{}",
                        i.service_name, i.instance_id
                    ),
                ));
            }
            Record::Tombstone(t)
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
fn decode_snapshot(v: &[u8]) -> Result<(StoredSnapshot, Registry), Corruption> {
    let snap: StoredSnapshot = unseal(v).map_err(|why| Corruption::new("current snapshot", why))?;
    let data = decode_snapshot_data(&snap.data).map_err(|e| {
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
            Record::Membership(_)
            | Record::ExpiryPaused(_)
            | Record::Ext(..)
            | Record::Tombstone(_) => {}
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
                Record::Instance(inst) => applied.registry.restore(inst, InstanceExt::default()),
                // Keys sort `i/` < `m/` < `t/` < `x/`: instances come first.
                Record::Ext(service, id, ext) => applied.registry.restore_ext(&service, &id, ext),
                Record::Tombstone(t) => applied.registry.restore_tombstone(t),
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
        let registry = decode_snapshot_data(&snap.data)
            .map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
        let mut batch = sled::Batch::default();
        for item in self.sm.iter().keys() {
            batch.remove(item.map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?);
        }
        for (inst, ext) in registry.instances_ext() {
            put_instance(&mut batch, inst, ext);
        }
        for t in registry.tombstones() {
            let i = &t.instance;
            batch.insert(
                prefixed_key(TOMBSTONE_PREFIX, &i.service_name, &i.instance_id),
                encode(t),
            );
        }
        batch.insert(APPLIED, encode(&snap.meta.last_log_id));
        batch.insert(MEMBERSHIP, encode(&snap.meta.last_membership));
        batch.insert(EXPIRY_PAUSED, encode(&registry.expiry_paused()));
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
                encode_snapshot_data(&applied.registry),
                applied.last_applied,
                applied.membership.clone(),
            )
        };
        // Plain bincode: this travels to followers as is. At rest the whole
        // stored snapshot is sealed.
        let data = data.map_err(|e| StorageIOError::write_snapshot(None, &e))?;
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
                    Change::Ext {
                        service_name,
                        instance_id,
                        ext,
                    } => put_ext(&mut batch, &service_name, &instance_id, &ext),
                    Change::Delete {
                        service_name,
                        instance_id,
                    } => {
                        batch.remove(instance_key(&service_name, &instance_id));
                        batch.remove(prefixed_key(EXT_PREFIX, &service_name, &instance_id));
                    }
                    Change::ExpiryPaused(p) => batch.insert(EXPIRY_PAUSED, encode(&p)),
                    Change::Bury(t) => batch.insert(
                        prefixed_key(
                            TOMBSTONE_PREFIX,
                            &t.instance.service_name,
                            &t.instance.instance_id,
                        ),
                        encode(&t),
                    ),
                    Change::Unbury {
                        service_name,
                        instance_id,
                    } => batch.remove(prefixed_key(TOMBSTONE_PREFIX, &service_name, &instance_id)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::TombstonePolicy;

    /// Expires instance `a/x` (registered at 0 with a TTL of 5 s), keeping
    /// a tombstone.
    fn expire_x() -> Command {
        Command::ExpireKeep {
            now_ms: 60_000,
            term: 1,
            instances: vec![("a".into(), "x".into())],
            keep: TombstonePolicy {
                retention_ms: 1_000_000,
                max: 10,
            },
        }
    }

    fn registry() -> Registry {
        let inst = |id: &str| Instance {
            service_name: "a".into(),
            instance_id: id.into(),
            host: "h".into(),
            port: 1,
            health_endpoint: "/health".into(),
            metadata: Default::default(),
            ttl_seconds: 5,
            registered_at: 0,
            last_heartbeat: 0,
        };
        let mut r = Registry::new();
        for id in ["x", "y", "z"] {
            let ext = InstanceExt {
                origin: (id != "z").then(|| "10.0.0.1".into()),
                https: id == "y",
            };
            let cmd = Command::RegisterFrom {
                instance: inst(id),
                ext,
            };
            r.apply(&cmd, 1, &mut Vec::new());
        }
        r.apply(&expire_x(), 1, &mut Vec::new());
        r
    }

    #[test]
    fn a_snapshot_keeps_origins_and_tombstones() {
        let r = registry();
        assert_eq!(r.tombstone_count(), 1);
        let bytes = encode_snapshot_data(&r).unwrap();
        assert_eq!(decode_snapshot_data(&bytes).unwrap(), r);
    }

    #[test]
    fn a_snapshot_of_the_first_release_still_loads() {
        // The first release wrote `SnapshotData` alone.
        let r = registry();
        let old = SnapshotData {
            instances: r.instances().cloned().collect(),
            expiry_paused: true,
        };
        let loaded = decode_snapshot_data(&bincode::serialize(&old).unwrap()).unwrap();
        assert_eq!(loaded.instance_count(), 2);
        assert!(loaded.expiry_paused());
        assert_eq!(loaded.tombstone_count(), 0);
        // And the first release reads this release's snapshot (it ignores
        // the extension: bincode leaves trailing bytes unread).
        let new = encode_snapshot_data(&r).unwrap();
        let read_by_old: SnapshotData = bincode::deserialize(&new).unwrap();
        assert_eq!(read_by_old.instances.len(), 2);
    }

    #[tokio::test]
    async fn origins_and_tombstones_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut sm = StateMachineStore::open(&db, DiskSync::disabled()).unwrap();
        let r = registry();
        let mut commands = Vec::new();
        for (i, e) in r.instances_ext() {
            commands.push(Command::RegisterFrom {
                instance: i.clone(),
                ext: e.clone(),
            });
        }
        let t = r.tombstones().next().unwrap().clone();
        commands.push(Command::RegisterFrom {
            instance: t.instance.clone(),
            ext: t.ext.clone(),
        });
        commands.push(expire_x());
        let entries: Vec<Entry> = commands
            .into_iter()
            .enumerate()
            .map(|(k, cmd)| Entry {
                log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 1), k as u64 + 1),
                payload: EntryPayload::Normal(cmd),
            })
            .collect();
        sm.apply(entries).await.unwrap();
        let before = sm.replica().read().registry.clone();
        assert_eq!(before.tombstone_count(), 1);
        drop(sm);
        let again = StateMachineStore::open(&db, DiskSync::disabled()).unwrap();
        assert_eq!(again.replica().read().registry, before);
        check(&db).unwrap();
    }
}
