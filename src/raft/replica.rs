//! What a node has applied, in memory: the registry, the Raft position it
//! reflects, and when each view last changed. The state machine
//! ([`super::state_machine`]) is its only writer; HTTP handlers read it
//! through a [`Replica`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use openraft::StoredMembership;
use tokio::sync::watch;

use super::{LogId, Node, NodeId};
use crate::registry::{Change, Command, CommandResult, Registry};

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

    pub(super) fn reset(&mut self, floor: u64) {
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

    pub(super) fn publish(&self, applied_index: u64) {
        self.applied_tx.send_replace(applied_index);
    }

    pub fn read(&self) -> RwLockReadGuard<'_, Applied> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn write(&self) -> RwLockWriteGuard<'_, Applied> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// How many snapshots from a leader this node has installed.
    pub fn snapshots_installed(&self) -> u64 {
        self.snapshots_installed.load(Ordering::Relaxed)
    }

    pub(super) fn count_snapshot_installed(&self) {
        self.snapshots_installed.fetch_add(1, Ordering::Relaxed);
    }
}

impl Applied {
    /// Applies one command of the entry at `index`, and records which views
    /// it changed. The commands of a `Batch` count one by one.
    pub(super) fn apply_command(
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
