//! What the registry stores: a live [`Instance`], what is kept beside it
//! ([`InstanceExt`]), and the [`Tombstone`] of one that expired. These
//! layouts are part of the Raft log, the snapshots and the sled records:
//! fields are never reordered or removed.

use serde::{Deserialize, Serialize};

use super::Metadata;

/// Milliseconds since the Unix epoch, as stamped by the leader.
pub type Millis = i64;

/// One registered instance of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub service_name: String,
    pub instance_id: String,
    pub host: String,
    pub port: u16,
    pub health_endpoint: String,
    pub metadata: Metadata,
    pub ttl_seconds: u32,
    pub registered_at: Millis,
    pub last_heartbeat: Millis,
}

impl Instance {
    /// The moment after which this instance may be expired.
    pub fn deadline(&self) -> Millis {
        self.last_heartbeat
            .saturating_add(i64::from(self.ttl_seconds) * 1000)
    }
}

/// What the registry keeps about a live instance beside its [`Instance`]
/// record (whose layout older log entries and snapshots fix).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceExt {
    /// The IP address the instance registered from, as the node that
    /// received the registration saw it (or a trusted proxy reported it).
    /// Name-only heartbeats and deregistrations from that address touch
    /// only its instances.
    pub origin: Option<String>,
    /// The instance registered an `https://` endpoint.
    pub https: bool,
}

/// An instance that expired: kept for the retention window so that a
/// heartbeat naming it brings it back (old clients never register again).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub instance: Instance,
    pub ext: InstanceExt,
    /// The leader's time of the expiry.
    pub expired_at: Millis,
}

/// How long and how many expired instances are kept as tombstones. The
/// leader stamps its flags into each expiry, so every node keeps the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TombstonePolicy {
    pub retention_ms: Millis,
    /// Most tombstones kept; beyond it the oldest go. 0 keeps none.
    pub max: u32,
}
