//! Raft plumbing: the type configuration, the sled-backed log and state
//! machine stores, and the HTTP transport between nodes.
//!
//! How it fits together: one sled database per node holds three trees: the
//! Raft log (`log`), Raft's own metadata (`raft`: vote, committed, last
//! purged) and the applied registry (`sm`); the current snapshot is a file
//! beside it (a fourth tree, `snapshot`, held it in earlier releases: see
//! `state_machine::snapshot_file`). sled writes all trees through one log, so whatever survives
//! a crash is a prefix of what was written; the log store flushes and then
//! `fdatasync`s sled's files ([`durable`]) before it reports an append or a
//! vote durable, which makes every acknowledged write survive `kill -9` and
//! power loss. The state machine does not flush on apply: after a crash it
//! is at or behind the synced log, and openraft re-applies the rest.
//!
//! Every stored value carries a CRC32 ([`codec`]), the `raft` tree holds a
//! storage format marker, and a node verifies its whole database before it
//! serves anything ([`integrity`]): a damaged directory is refused with a
//! message saying what is corrupt.
//!
//! Known limitations (openraft 0.9.25): split votes can repeat, so the node
//! runs a watchdog that triggers an election when no leader appears within a
//! bound (see `node.rs`); snapshots travel in chunks of the whole serialized
//! registry.

// openraft's `StorageError` is large, and it is the type its traits demand.
#![allow(clippy::result_large_err)]

use std::io::Cursor;

use crate::registry::{Command, CommandResult};

pub mod codec;
pub mod durable;
pub mod integrity;
pub mod log_store;
mod migrate;
pub mod network;
pub mod recover;
pub mod replica;
pub mod state_machine;

pub use durable::DiskSync;
pub use integrity::{open_checked, CheckReport, DataDirError};
pub use log_store::LogStore;
pub use network::{Faults, Network};
pub use replica::Replica;
pub use state_machine::StateMachineStore;

pub type NodeId = u64;
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// The Raft types of the registry.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type RaftError<E = openraft::error::Infallible> = openraft::error::RaftError<NodeId, E>;
pub type RPCError<E = openraft::error::Infallible> =
    openraft::error::RPCError<NodeId, Node, RaftError<E>>;
pub type ClientWriteError = openraft::error::ClientWriteError<NodeId, Node>;
pub type CheckIsLeaderError = openraft::error::CheckIsLeaderError<NodeId, Node>;

/// sled's page cache. Reads are served from the in-memory registry, never
/// from sled, so the cache only helps writes find their pages; sled's
/// default (1 GiB) let it keep every page it ever read, most of a node's
/// memory with 100,000 instances.
pub const DB_CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// The sled database's directory inside a node's data directory.
pub const SLED_DIR: &str = "sled";

/// Opens (or creates) the node's sled database in `dir`.
pub fn open_db(dir: &std::path::Path) -> Result<sled::Db, sled::Error> {
    open_sled(&dir.join(SLED_DIR))
}

/// Opens (or creates) a sled database at `path` with the node's settings.
fn open_sled(path: &std::path::Path) -> Result<sled::Db, sled::Error> {
    sled::Config::new()
        .path(path)
        .cache_capacity(DB_CACHE_BYTES)
        .mode(sled::Mode::HighThroughput)
        // We flush and fsync explicitly wherever durability is promised
        // (`durable`); the periodic flush is only a backstop.
        .flush_every_ms(Some(1000))
        .open()
}
