//! The Raft state machine: applies committed commands to the registry, keeps
//! a persistent copy of it in sled, and builds and installs snapshots.
//!
//! The live registry sits in memory behind a [`Replica`] that the HTTP layer
//! reads; sled holds the same data (tree `sm`, laid out in [`records`]) so a
//! restart does not replay the whole log. Apply never reads the clock: times
//! come inside commands. The snapshot format is in [`snapshot`].
//!
//! Every value is sealed with a CRC32 (see [`super::codec`]); [`check`]
//! verifies every record and the current snapshot at start-up.

pub mod backup;
mod records;
mod scan;
mod snapshot;
mod snapshot_file;

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};

use super::codec::Corruption;
use super::durable::DiskSync;
use super::replica::{Applied, Replica, ViewIndex};
use super::{Entry, LogId, Node, NodeId, StorageError, TypeConfig};
use crate::registry::CommandResult;

pub use records::{check, StateMachineCheck};
use records::{
    encode, put_instance, put_tombstone, write_change, CLOCKS_PENDING, CURRENT_SNAPSHOT,
    EXPIRY_PAUSED, MEMBERSHIP,
};
pub(crate) use records::{APPLIED, SM_TREE, SNAPSHOT_TREE};
use snapshot::{decode_snapshot_data, encode_snapshot_data, StoredSnapshot};
#[cfg(test)]
pub(crate) use snapshot_file::SNAPSHOT_FILE;

/// Runs CPU-heavy snapshot work (encoding, sealing and storing a million
/// instances takes seconds) on a thread of its own, at a lower CPU priority
/// where the OS allows (nice 10 on Linux, for that thread only): on a busy
/// machine the threads that answer the leader's heartbeats and clients come
/// first. All three nodes snapshot at the same index, so on two cores three
/// such threads at full priority starved the Raft cores and caused
/// elections.
async fn in_background<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("snapshot".into())
        .spawn(move || {
            #[cfg(target_os = "linux")]
            // SAFETY: setpriority takes no pointers; on Linux, `who` 0 with
            // PRIO_PROCESS names the calling thread. A failure leaves the
            // priority as it was, which is only slower.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, 10);
            }
            let _ = tx.send(work());
        })?;
    rx.await
        .map_err(|_| std::io::Error::other("the snapshot thread stopped before finishing"))
}

/// Runs blocking work on a multi-threaded runtime without holding up the
/// worker's other tasks (`block_in_place`); elsewhere (tests on a
/// current-thread runtime) just runs it.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Records per sled batch when a snapshot replaces the state.
const INSTALL_BATCH: usize = 10_000;

/// The sled-backed state machine. Clones share everything.
#[derive(Clone)]
pub struct StateMachineStore {
    replica: Arc<Replica>,
    sync: DiskSync,
    sm: sled::Tree,
    /// Where an earlier release kept the snapshot (see [`snapshot_file`]).
    snapshots: sled::Tree,
    /// The data directory, which holds the snapshot file.
    dir: PathBuf,
}

impl StateMachineStore {
    /// Opens the state machine, loading the applied registry from sled, or
    /// from the current snapshot when that is newer (a crash during install).
    /// Snapshots are made durable through `sync`.
    /// `dir` is the data directory (the snapshot's file goes there).
    pub fn open(db: &sled::Db, dir: &Path, sync: DiskSync) -> Result<Self, StorageError> {
        let mut found = check(db, dir).map_err(|e| StorageIOError::read_state_machine(&e))?;
        Self::open_checked(db, dir, sync, &mut found)
    }

    /// [`Self::open`] with the state [`check`] loaded (the node checks its
    /// whole database before it starts, and loads the registry on the way).
    pub fn open_checked(
        db: &sled::Db,
        dir: &Path,
        sync: DiskSync,
        found: &mut StateMachineCheck,
    ) -> Result<Self, StorageError> {
        let store = Self {
            replica: Arc::new(Replica::default()),
            sync,
            sm: db
                .open_tree(SM_TREE)
                .map_err(|e| StorageIOError::read_state_machine(&e))?,
            snapshots: db
                .open_tree(SNAPSHOT_TREE)
                .map_err(|e| StorageIOError::read_state_machine(&e))?,
            dir: dir.to_path_buf(),
        };
        let mut applied = std::mem::take(&mut found.state);
        let floor = applied.applied_index();
        applied.views.reset(floor);
        *store.replica.write() = applied;
        store.replica.publish(floor);
        // A snapshot newer than the records: a crash during an install.
        if found.snapshot.is_some_and(|(last, _)| last > found.applied) {
            if let Some(snap) = store.read_snapshot()? {
                store.load_snapshot(&snap)?;
            }
        }
        Ok(store)
    }

    /// The shared applied state that HTTP handlers read.
    pub fn replica(&self) -> Arc<Replica> {
        self.replica.clone()
    }

    /// The current snapshot: its file, else (a directory of an earlier
    /// release) sled's `snapshot` tree.
    fn read_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        let sealed = match snapshot_file::read(&self.dir)
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?
        {
            Some(bytes) => Some(bytes),
            None => self
                .snapshots
                .get(CURRENT_SNAPSHOT)
                .map_err(|e| StorageIOError::read_snapshot(None, &e))?
                .map(|v| v.to_vec()),
        };
        match sealed {
            None => Ok(None),
            Some(v) => Ok(Some(
                snapshot::unseal_stored(v)
                    .map_err(|why| Corruption::new("current snapshot", why))
                    .map_err(|e| StorageIOError::read_snapshot(None, &e))?,
            )),
        }
    }

    /// Stores `snap` as the current snapshot, durably (unless fsyncs are
    /// off), and gives it back.
    async fn save_snapshot(&self, snap: StoredSnapshot) -> Result<StoredSnapshot, StorageError> {
        let sig = Some(snap.meta.signature());
        let (dir, fsync) = (self.dir.clone(), self.sync.enabled());
        // Sealing and writing 160 MB (a million instances) is blocking work.
        let snap =
            in_background(move || snapshot_file::write(&dir, &encode(&snap), fsync).map(|()| snap))
                .await
                .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?
                .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?;
        // An earlier release's snapshot in sled is now out of date: the file
        // wins when both exist, so losing this removal in a crash is fine.
        if self
            .snapshots
            .contains_key(CURRENT_SNAPSHOT)
            .map_err(|e| StorageIOError::write_snapshot(sig.clone(), &e))?
        {
            self.snapshots
                .remove(CURRENT_SNAPSHOT)
                .map_err(|e| StorageIOError::write_snapshot(sig, &e))?;
        }
        Ok(snap)
    }

    /// Replaces the applied state, in memory and in sled, with a snapshot's.
    ///
    /// Written in batches of [`INSTALL_BATCH`] records, the applied log id
    /// last: one batch of a million records took sled 38 s and 9 GiB. A
    /// crash part-way leaves the old applied id (or none) beside a mix of
    /// records; the saved snapshot is then newer than the state, so
    /// [`Self::open_checked`] loads it again.
    fn load_snapshot(&self, snap: &StoredSnapshot) -> Result<(), StorageError> {
        let sig = Some(snap.meta.signature());
        let write_err = |e: &sled::Error| StorageIOError::write_snapshot(sig.clone(), e);
        let registry = decode_snapshot_data(&snap.data)
            .map_err(|e| StorageIOError::read_snapshot(sig.clone(), &e))?;
        let mut batch = sled::Batch::default();
        // Counts a record added to `batch`, writing the batch once it is full.
        let mut pending = 0;
        let mut added = |batch: &mut sled::Batch| {
            pending += 1;
            if pending < INSTALL_BATCH {
                return Ok(());
            }
            pending = 0;
            self.sm.apply_batch(std::mem::take(batch))
        };
        // The applied id goes first, so that no batch but the last leaves
        // one that claims the new state.
        batch.remove(APPLIED);
        for item in self.sm.iter().keys() {
            batch.remove(item.map_err(|e| write_err(&e))?);
            added(&mut batch).map_err(|e| write_err(&e))?;
        }
        for (inst, ext) in registry.instances_ext() {
            put_instance(&mut batch, inst, ext);
            added(&mut batch).map_err(|e| write_err(&e))?;
        }
        for t in registry.tombstones() {
            put_tombstone(&mut batch, t);
            added(&mut batch).map_err(|e| write_err(&e))?;
        }
        batch.insert(MEMBERSHIP, encode(&snap.meta.last_membership));
        batch.insert(EXPIRY_PAUSED, encode(&registry.expiry_paused()));
        if registry.clocks_pending() {
            batch.insert(CLOCKS_PENDING, encode(&true));
        } else {
            batch.remove(CLOCKS_PENDING);
        }
        batch.insert(APPLIED, encode(&snap.meta.last_log_id));
        self.sm.apply_batch(batch).map_err(|e| write_err(&e))?;
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
        // Under the lock only long enough to share the instances (a pointer
        // per service): encoding a million instances took 1.4 s, and
        // holding the lock that long stalled apply, every read and, with
        // them, the runtime's two workers, so that followers building a
        // snapshot missed the leader's heartbeats and called elections.
        let (view, last_log_id, last_membership) = {
            let applied = self.replica.read();
            (
                applied.registry.for_snapshot(),
                applied.last_applied,
                applied.membership.clone(),
            )
        };
        // Plain bincode: this travels to followers as is. At rest the whole
        // stored snapshot is sealed. Encoded off the async workers, below
        // their priority.
        let data = in_background(move || encode_snapshot_data(&view))
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
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
        let stored = self.save_snapshot(stored).await?;
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
                write_change(&mut batch, change);
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
        let stored = self.save_snapshot(stored).await?;
        // Seconds of sled writes at a million instances: other tasks (the
        // Raft core's heartbeats among them) move to another thread.
        blocking(|| self.load_snapshot(&stored))?;
        self.replica.count_snapshot_installed();
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
    use super::snapshot::SnapshotData;
    use super::*;
    use crate::registry::{Command, Instance, InstanceExt, Registry, TombstonePolicy};

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
        // Written from borrowed parts, byte for byte what the owned ones give.
        assert_eq!(bytes, snapshot::encode_snapshot_data_owned(&r).unwrap());
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

    /// A starting node checks its snapshot file as a stream; the answers
    /// are those of the check on the whole bytes, for every damaged byte.
    #[test]
    fn a_snapshot_read_as_a_stream_or_moved_out_gives_what_bincode_gives() {
        use crate::raft::codec::seal;
        let meta = openraft::SnapshotMeta::<NodeId, Node> {
            last_log_id: Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(2, 1),
                7,
            )),
            last_membership: Default::default(),
            snapshot_id: "2-1-7".into(),
        };
        let sealed = seal(&StoredSnapshot {
            meta,
            data: encode_snapshot_data(&registry()).unwrap(),
        })
        .unwrap();
        let show = |r: Result<(openraft::SnapshotMeta<NodeId, Node>, usize), _>| match r {
            Ok((m, len)) => format!("{:?} {len}", m.last_log_id),
            Err(e) => format!("{e}"),
        };
        let mut cases = vec![sealed.clone(), sealed[..2].to_vec(), Vec::new()];
        for at in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[at] ^= 0x40;
            cases.push(bad);
        }
        let mut longer = sealed.clone();
        longer.push(0);
        cases.push(longer);
        let show_stored = |r: Result<StoredSnapshot, _>| match r {
            Ok(s) => format!("{:?} {:?}", s.meta.last_log_id, s.data),
            Err(e) => format!("{e}"),
        };
        for (i, bytes) in cases.iter().enumerate() {
            let whole = show(snapshot::read_meta(bytes));
            let streamed = show(snapshot::read_meta_from(&bytes[..]).unwrap());
            assert_eq!(streamed, whole, "case {i}");
            // And the whole snapshot, data moved out, as bincode decodes it.
            let decoded = show_stored(crate::raft::codec::unseal(bytes));
            assert_eq!(show_stored(snapshot::unseal_stored(bytes.clone())), decoded);
        }
        assert!(show(snapshot::read_meta(&sealed)).contains("7"));
    }

    #[tokio::test]
    async fn origins_and_tombstones_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let mut sm = StateMachineStore::open(&db, dir.path(), DiskSync::disabled()).unwrap();
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
        let again = StateMachineStore::open(&db, dir.path(), DiskSync::disabled()).unwrap();
        assert_eq!(again.replica().read().registry, before);
        check(&db, dir.path()).unwrap();
    }
}
