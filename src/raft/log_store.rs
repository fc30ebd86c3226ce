//! The Raft log and vote, stored in sled.
//!
//! Owns durability of what Raft promises: an append is reported flushed,
//! and a vote saved, only after `sled::Db::flush_async` returns. Appends are
//! written as one batch and flushed once, so a batch of entries costs one
//! fsync (group commit). It does not know what the entries mean.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError, Vote};

use super::{Entry, LogId, NodeId, StorageError, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last_purged";

/// The sled-backed Raft log. Cheap to clone: clones share the same trees.
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    committed_index: Arc<AtomicU64>,
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(bytes)
}

impl LogStore {
    pub fn open(db: &sled::Db) -> Result<Self, sled::Error> {
        let store = Self {
            db: db.clone(),
            log: db.open_tree("log")?,
            meta: db.open_tree("raft")?,
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
            Some(v) => Ok(Some(decode(&v).map_err(|e| StorageIOError::read(&e))?)),
        }
    }

    fn write_meta<T: serde::Serialize>(&self, k: &[u8], v: &T) -> Result<(), sled::Error> {
        let bytes = bincode::serialize(v).expect("raft metadata always serializes");
        self.meta.insert(k, bytes)?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), io::Error> {
        self.db
            .flush_async()
            .await
            .map(|_| ())
            .map_err(io::Error::from)
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
            let (_, v) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            out.push(decode::<Entry>(&v).map_err(|e| StorageIOError::read_logs(&e))?);
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
            Some((_, v)) => Some(
                decode::<Entry>(&v)
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
            let bytes = bincode::serialize(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            batch.insert(&key(entry.log_id.index), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        // The entries are readable now; report them durable only once flushed.
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
