//! The Raft log and vote, stored in sled.
//!
//! Owns durability of what Raft promises: an append is reported flushed,
//! and a vote saved, only after sled's flush and an `fdatasync` of its files
//! ([`DiskSync`]) return. Appends are written as one batch and synced once,
//! so a batch of entries costs one `fdatasync` (group commit). It does not
//! know what the entries mean.
//!
//! Every value is sealed with a CRC32 (see [`super::codec`]); a value that
//! fails it is a storage error naming the entry, never a panic. [`check`]
//! verifies the whole store at start-up.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError, Vote};

use super::codec::{describe_sled, seal, show_key, unseal, Corruption};
use super::durable::DiskSync;
use super::{Entry, LogId, NodeId, StorageError, TypeConfig};

pub(crate) const LOG_TREE: &str = "log";
pub(crate) const META_TREE: &str = "raft";
const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";
/// The storage format marker: its absence in a data directory that holds
/// anything means an older format (values without checksums).
pub(crate) const FORMAT: &[u8] = b"format";
/// The format this build writes and reads: 1 = CRC32-sealed bincode values.
pub const FORMAT_VERSION: u32 = 1;

/// The sled-backed Raft log. Cheap to clone: clones share the same trees.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    sync: DiskSync,
    committed_index: Arc<AtomicU64>,
}

pub(crate) fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// What a metadata key holds, for messages.
fn meta_name(k: &[u8]) -> &'static str {
    match k {
        VOTE => "vote",
        COMMITTED => "committed log id",
        LAST_PURGED => "last purged log id",
        FORMAT => "format marker",
        _ => "raft metadata",
    }
}

/// Decodes one stored log entry, checking its checksum and that it is the
/// entry its key says.
fn decode_entry(k: &[u8], v: &[u8]) -> Result<Entry, Corruption> {
    let index = match <[u8; 8]>::try_from(k) {
        Ok(b) => u64::from_be_bytes(b),
        Err(_) => {
            return Err(Corruption::new(
                "log",
                format!("malformed key {}", show_key(k)),
            ))
        }
    };
    let entry: Entry =
        unseal(v).map_err(|why| Corruption::new(format!("log entry {index}"), why))?;
    if entry.log_id.index != index {
        return Err(Corruption::new(
            format!("log entry {index}"),
            format!("holds the entry of index {}", entry.log_id.index),
        ));
    }
    Ok(entry)
}

/// Reads the format marker: `Ok(None)` when there is none.
pub(crate) fn read_format(meta: &sled::Tree) -> Result<Option<u32>, Corruption> {
    match meta
        .get(FORMAT)
        .map_err(|e| Corruption::new("format marker", describe_sled(&e)))?
    {
        None => Ok(None),
        Some(v) => unseal(&v)
            .map(Some)
            .map_err(|why| Corruption::new("format marker", why)),
    }
}

/// Writes this build's format marker (into a new, empty data directory).
pub(crate) fn write_format(meta: &sled::Tree) -> Result<(), io::Error> {
    meta.insert(FORMAT, seal(&FORMAT_VERSION).map_err(io::Error::other)?)?;
    Ok(())
}

/// What the start-up check read from the log store.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogCheck {
    pub entries: u64,
    pub last_purged: Option<LogId>,
    pub last: Option<LogId>,
}

/// Verifies the whole log store: every metadata value, and every log entry
/// (checksum, index equal to its key, indexes contiguous from the purge
/// point to the last, terms never going down). Entries at or below the
/// purge point may remain after a crash during a purge; they are verified
/// but not required to be contiguous.
pub fn check(db: &sled::Db) -> Result<LogCheck, Corruption> {
    let sled_err = |what: &str, e: sled::Error| Corruption::new(what, describe_sled(&e));
    let meta = db
        .open_tree(META_TREE)
        .map_err(|e| sled_err("raft metadata", e))?;
    let mut last_purged: Option<LogId> = None;
    for item in meta.iter() {
        let (k, v) = item.map_err(|e| sled_err("raft metadata", e))?;
        let bad = |why| Corruption::new(meta_name(&k), why);
        match k.as_ref() {
            FORMAT => {
                unseal::<u32>(&v).map_err(bad)?;
            }
            VOTE => {
                unseal::<Vote<NodeId>>(&v).map_err(bad)?;
            }
            COMMITTED => {
                unseal::<Option<LogId>>(&v).map_err(bad)?;
            }
            LAST_PURGED => last_purged = unseal::<Option<LogId>>(&v).map_err(bad)?,
            other => {
                return Err(Corruption::new(
                    "raft metadata",
                    format!("unexpected key {}", show_key(other)),
                ))
            }
        }
    }

    let log = db.open_tree(LOG_TREE).map_err(|e| sled_err("log", e))?;
    let mut found = LogCheck {
        last_purged,
        ..LogCheck::default()
    };
    // openraft reads a log with no purge point from index 0.
    let mut expected = last_purged.map_or(0, |p| p.index + 1);
    let mut prev = last_purged;
    for item in log.iter() {
        let (k, v) = item.map_err(|e| {
            let after = found
                .last
                .map_or("the start".into(), |l| format!("entry {}", l.index));
            sled_err(&format!("log (after {after})"), e)
        })?;
        let entry = decode_entry(&k, &v)?;
        found.entries += 1;
        let id = entry.log_id;
        if last_purged.is_some_and(|p| id.index <= p.index) {
            continue;
        }
        if id.index != expected {
            return Err(Corruption::new(
                format!("log entry {expected}"),
                format!("missing (the next stored entry is {})", id.index),
            ));
        }
        if let Some(p) = prev {
            if id.leader_id.get_term() < p.leader_id.get_term() {
                return Err(Corruption::new(
                    format!("log entry {}", id.index),
                    format!(
                        "term {} is lower than the term {} before it",
                        id.leader_id.get_term(),
                        p.leader_id.get_term()
                    ),
                ));
            }
        }
        prev = Some(id);
        found.last = Some(id);
        expected = id.index + 1;
    }
    Ok(found)
}

impl LogStore {
    /// The log store of `db`, made durable through `sync`.
    pub fn open(db: &sled::Db, sync: DiskSync) -> Result<Self, sled::Error> {
        let store = Self {
            db: db.clone(),
            log: db.open_tree(LOG_TREE)?,
            meta: db.open_tree(META_TREE)?,
            sync,
            committed_index: Arc::new(AtomicU64::new(0)),
        };
        if let Ok(Some(c)) = store.read_meta::<Option<LogId>>(COMMITTED) {
            store
                .committed_index
                .store(c.map_or(0, |c| c.index), Ordering::Relaxed);
        }
        Ok(store)
    }

    /// The last committed index this node has been told of.
    pub fn committed_index(&self) -> u64 {
        self.committed_index.load(Ordering::Relaxed)
    }

    fn read_meta<T: serde::de::DeserializeOwned>(
        &self,
        k: &[u8],
    ) -> Result<Option<T>, StorageError> {
        match self.meta.get(k).map_err(|e| StorageIOError::read(&e))? {
            None => Ok(None),
            Some(v) => Ok(Some(unseal(&v).map_err(|why| {
                StorageIOError::read(&Corruption::new(meta_name(k), why))
            })?)),
        }
    }

    fn write_meta<T: serde::Serialize>(&self, k: &[u8], v: &T) -> Result<(), io::Error> {
        self.meta.insert(k, seal(v).map_err(io::Error::other)?)?;
        Ok(())
    }

    /// The last membership entry in the log, if the log holds one.
    pub fn last_membership(
        &self,
    ) -> Result<Option<openraft::Membership<NodeId, super::Node>>, Corruption> {
        for item in self.log.iter().rev() {
            let (k, v) = item.map_err(|e| Corruption::new("log", describe_sled(&e)))?;
            let entry = decode_entry(&k, &v)?;
            if let openraft::EntryPayload::Membership(m) = entry.payload {
                return Ok(Some(m));
            }
        }
        Ok(None)
    }

    /// Writes `entry` after the last one, outside Raft (`recover`, on a
    /// stopped node's directory); durable after [`LogStore::flush`].
    pub(crate) fn put_entry(&self, entry: &Entry) -> Result<(), io::Error> {
        let bytes = seal(entry).map_err(io::Error::other)?;
        self.log.insert(key(entry.log_id.index), bytes)?;
        Ok(())
    }

    /// Makes everything written to the database so far durable: sled's
    /// flush and an `fdatasync` (see [`DiskSync`]).
    pub async fn flush(&self) -> Result<(), io::Error> {
        self.sync.flush(&self.db).await
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(x) => Bound::Included(key(*x)),
            Bound::Excluded(x) => Bound::Excluded(key(*x)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => Bound::Included(key(*x)),
            Bound::Excluded(x) => Bound::Excluded(key(*x)),
            Bound::Unbounded => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for item in self.log.range::<[u8; 8], _>((start, end)) {
            let (k, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            out.push(decode_entry(&k, &v).map_err(|e| StorageIOError::read_logs(&e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.read_meta(LAST_PURGED)?.flatten();
        let last = match self.log.last().map_err(|e| StorageIOError::read_logs(&e))? {
            None => None,
            Some((k, v)) => Some(
                decode_entry(&k, &v)
                    .map_err(|e| StorageIOError::read_logs(&e))?
                    .log_id,
            ),
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id: last.or(last_purged_log_id),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.write_meta(VOTE, vote)
            .map_err(|e| StorageIOError::write_vote(&e))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.read_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Not flushed: a committed index that goes back after a crash is
        // learned again from the leader, and the state machine re-applies.
        self.write_meta(COMMITTED, &committed)
            .map_err(|e| StorageIOError::write(&e))?;
        self.committed_index
            .store(committed.map_or(0, |c| c.index), Ordering::Relaxed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.read_meta(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes = seal(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            batch.insert(&key(entry.log_id.index), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        // The entries are readable now; report them durable only once synced.
        match self.flush().await {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let err = StorageIOError::write_logs(&e);
                callback.log_io_completed(Err(e));
                Err(err.into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(key(log_id.index)..) {
            let (k, _) = item.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point before deleting, so a crash in between
        // never leaves a hole that the log state does not explain.
        self.write_meta(LAST_PURGED, &Some(log_id))
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let mut batch = sled::Batch::default();
        for item in self.log.range(..=key(log_id.index)) {
            let (k, _) = item.map_err(|e| StorageIOError::write_logs(&e))?;
            batch.remove(k);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}
