//! The replicated vocabulary: the [`Command`]s the leader puts in the Raft
//! log, what applying one produces ([`CommandResult`]), and the key
//! [`Change`]s apply reports so the persistent copy can follow. Variants are
//! only ever appended, so entries of earlier releases decode unchanged.

use serde::{Deserialize, Serialize};

use super::{Instance, InstanceExt, Millis, Tombstone, TombstonePolicy};

/// A change to the registry, as it travels through the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Insert or replace an instance. A re-registration of the same
    /// `instance_id` keeps the original `registered_at`.
    Register { instance: Instance },
    /// A checkpoint of renewals the leader acknowledged: raises each listed
    /// instance's `last_heartbeat` to the given time (never lowers it).
    /// Instances that are gone by now are skipped.
    Renew { renewals: Vec<Renewal> },
    /// Remove one instance, or the whole service when `instance_id` is `None`.
    Deregister {
        service_name: String,
        instance_id: Option<String>,
    },
    /// Remove the listed instances that are due at `now_ms`, judged with
    /// [`super::lease::LEGACY_EXPIRY_SLACK_MS`] (earlier releases; this one
    /// writes `ExpireAfter`). Apply checks each deadline again, so an expiry
    /// that arrives after a renewal removes nothing; and one stamped with a
    /// term other than its entry's (a deposed leader's) removes nothing.
    Expire {
        now_ms: Millis,
        term: u64,
        instances: Vec<(String, String)>,
    },
    /// The leader paused or resumed expiry (mass-expiry protection); kept
    /// in the replicated state so every node reports it.
    SetExpiryPaused { paused: bool },
    /// Client writes that arrived together, committed in one entry (group
    /// commit, see `crate::leader::writes`) and applied in order, each with its
    /// own result. Added last so older entries decode unchanged.
    Batch { commands: Vec<Command> },
    // Variants below were added later, after every older one, so that
    // entries written by earlier releases decode unchanged.
    /// `Register`, plus where the instance registered from and its scheme.
    RegisterFrom {
        instance: Instance,
        ext: InstanceExt,
    },
    /// `Deregister` by a caller at `origin`: without an instance id, the
    /// instances (live or tombstoned) registered from `origin` when there
    /// are any, else the whole service. Tombstones it covers go too.
    DeregisterFrom {
        service_name: String,
        instance_id: Option<String>,
        origin: Option<String>,
    },
    /// `Expire` that keeps what it removes as tombstones, under `keep`
    /// (which also prunes old ones).
    ExpireKeep {
        now_ms: Millis,
        term: u64,
        instances: Vec<(String, String)>,
        keep: TombstonePolicy,
    },
    /// A heartbeat for expired instances: each listed one whose tombstone
    /// is still there, expired at most `retention_ms` before `at` and not
    /// live again, comes back with its last registration, as registered
    /// at `at`.
    Revive {
        service_name: String,
        instance_ids: Vec<String>,
        at: Millis,
        retention_ms: Millis,
    },
    /// `ExpireKeep` judged with the margin the leader stamped: the listed
    /// instances whose committed `last_heartbeat + ttl + margin_ms <= now_ms`
    /// go (the leader has checked its own bound first, see
    /// [`super::lease`]).
    ExpireAfter {
        now_ms: Millis,
        term: u64,
        instances: Vec<(String, String)>,
        keep: TombstonePolicy,
        margin_ms: Millis,
    },
    /// After a restore from a backup: every live instance's last heartbeat
    /// becomes at least `at` (the leader's time), so each gets its whole
    /// TTL from the restore instead of expiring for the time the backup
    /// sat on disk; clears the registry's `clocks_pending`.
    RestartClocks { at: Millis },
}

/// One acknowledged renewal: the instance and the leader's time of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    pub service_name: String,
    pub instance_id: String,
    pub at: Millis,
}

/// What applying a command produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// The stored instance after a register.
    Registered(Instance),
    /// How many instances a heartbeat or deregister touched.
    Touched(usize),
    /// The service (or the named instance) is not registered.
    NotFound,
    /// How many instances an expiry removed.
    Expired(usize),
    /// A Raft-internal entry (blank or membership) that carries no command.
    None,
    /// The result of each command of a `Batch`, in order.
    Batch(Vec<CommandResult>),
    /// The instance ids a `Revive` brought back (never empty: `NotFound`).
    Revived(Vec<String>),
}

/// A key change made by `apply`, so a persistent copy can follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Instance),
    /// What is kept beside an instance was set (registration, revival);
    /// renewals leave it as it is.
    Ext {
        service_name: String,
        instance_id: String,
        ext: InstanceExt,
    },
    Delete {
        service_name: String,
        instance_id: String,
    },
    ExpiryPaused(bool),
    /// The restored registry's clocks were restarted (`false`), or a
    /// restore set them to wait for a leader (`true`).
    ClocksPending(bool),
    /// A tombstone was added (or replaced).
    Bury(Tombstone),
    /// A tombstone went (revived, deregistered, registered again, pruned).
    Unbury {
        service_name: String,
        instance_id: String,
    },
}

impl Change {
    /// The service a change touches, if it touches one.
    pub fn service_name(&self) -> Option<&str> {
        match self {
            Self::Put(i) => Some(&i.service_name),
            Self::Ext { service_name, .. } => Some(service_name),
            Self::Delete { service_name, .. } => Some(service_name),
            // Tombstones are not part of any read view.
            Self::ExpiryPaused(_)
            | Self::ClocksPending(_)
            | Self::Bury(_)
            | Self::Unbury { .. } => None,
        }
    }
}
