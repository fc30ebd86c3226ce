//! The state machine's records in sled: the keys of tree `sm`, how each
//! record is encoded (sealed with a CRC32, see [`crate::raft::codec`]) and
//! decoded, how a registry [`Change`] becomes writes, and [`check`], which
//! verifies every record and the current snapshot at start-up.
//!
//! Keys: `m/applied`, `m/membership`, `m/expiry_paused`, `m/clocks_pending`;
//! `i/{service}\0{id}`
//! an instance; `x/{service}\0{id}` what is kept beside it ([`InstanceExt`],
//! only when not the default); `t/{service}\0{id}` a tombstone. Tree
//! `snapshot` holds the current snapshot under `current`.

use openraft::StoredMembership;
use serde::Serialize;

use std::path::Path;

use super::snapshot::{read_meta, read_meta_from};
use super::snapshot_file;
use crate::raft::codec::{describe_sled, seal, show_key, unseal, Corruption};
use crate::raft::replica::Applied;
use crate::raft::{LogId, Node, NodeId};
use crate::registry::{Change, Instance, InstanceExt, RegistryBuilder, Tombstone};

pub(crate) const APPLIED: &[u8] = b"m/applied";
pub(super) const MEMBERSHIP: &[u8] = b"m/membership";
pub(super) const EXPIRY_PAUSED: &[u8] = b"m/expiry_paused";
/// Set by a restore until a leader has restarted the instances' clocks
/// (absent: not pending).
pub(super) const CLOCKS_PENDING: &[u8] = b"m/clocks_pending";
pub(super) const INSTANCE_PREFIX: &[u8] = b"i/";
/// What is kept beside an instance ([`InstanceExt`]), when not the default.
pub(super) const EXT_PREFIX: &[u8] = b"x/";
/// Tombstones of expired instances.
pub(super) const TOMBSTONE_PREFIX: &[u8] = b"t/";
pub(super) const CURRENT_SNAPSHOT: &[u8] = b"current";
pub(crate) const SM_TREE: &str = "sm";
pub(crate) const SNAPSHOT_TREE: &str = "snapshot";

pub(super) fn prefixed_key(prefix: &[u8], service: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + service.len() + 1 + id.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(service.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Whether `k` is `prefixed_key(prefix, service, id)` (without building it:
/// start-up checks a million keys).
fn is_key_of(prefix: &[u8], service: &str, id: &str, k: &[u8]) -> bool {
    k.len() == prefix.len() + service.len() + 1 + id.len()
        && k.starts_with(prefix)
        && k[prefix.len()..].starts_with(service.as_bytes())
        && k[prefix.len() + service.len()] == 0
        && k.ends_with(id.as_bytes())
}

pub(super) fn instance_key(service: &str, id: &str) -> Vec<u8> {
    prefixed_key(INSTANCE_PREFIX, service, id)
}

/// `(service, instance id)` of a key made by [`prefixed_key`].
pub(super) fn split_key(rest: &[u8]) -> Option<(String, String)> {
    let at = rest.iter().position(|&b| b == 0)?;
    Some((
        String::from_utf8(rest[..at].to_vec()).ok()?,
        String::from_utf8(rest[at + 1..].to_vec()).ok()?,
    ))
}

/// An instance's records: `i/` always, `x/` only when its ext is not the
/// default (so a registry of an earlier release stores exactly what it did).
pub(super) fn put_instance(batch: &mut sled::Batch, inst: &Instance, ext: &InstanceExt) {
    batch.insert(
        instance_key(&inst.service_name, &inst.instance_id),
        encode(inst),
    );
    put_ext(batch, &inst.service_name, &inst.instance_id, ext);
}

pub(super) fn put_ext(batch: &mut sled::Batch, service: &str, id: &str, ext: &InstanceExt) {
    let k = prefixed_key(EXT_PREFIX, service, id);
    if *ext == InstanceExt::default() {
        batch.remove(k);
    } else {
        batch.insert(k, encode(ext));
    }
}

pub(super) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    seal(v).expect("in-memory values always serialize")
}

/// One record of the `sm` tree, decoded.
pub(super) enum Record {
    Applied(Option<LogId>),
    Membership(StoredMembership<NodeId, Node>),
    ExpiryPaused(bool),
    ClocksPending(bool),
    Instance(Instance),
    Ext(String, String, InstanceExt),
    Tombstone(Tombstone),
}

/// What a record's key names, for messages: `instance a/10.0.0.1:80`.
pub(super) fn record_name(k: &[u8]) -> String {
    match k {
        APPLIED => "state machine applied log id".into(),
        MEMBERSHIP => "state machine membership".into(),
        EXPIRY_PAUSED => "state machine expiry flag".into(),
        CLOCKS_PENDING => "state machine restored-clocks flag".into(),
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
pub(super) fn decode_record(k: &[u8], v: &[u8]) -> Result<Record, Corruption> {
    let bad = |why| Corruption::new(record_name(k), why);
    Ok(match k {
        APPLIED => Record::Applied(unseal(v).map_err(bad)?),
        MEMBERSHIP => Record::Membership(unseal(v).map_err(bad)?),
        EXPIRY_PAUSED => Record::ExpiryPaused(unseal(v).map_err(bad)?),
        CLOCKS_PENDING => Record::ClocksPending(unseal(v).map_err(bad)?),
        _ if k.starts_with(INSTANCE_PREFIX) => {
            let inst: Instance = unseal(v).map_err(bad)?;
            if !is_key_of(INSTANCE_PREFIX, &inst.service_name, &inst.instance_id, k) {
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

/// Loads one verified record: the registry's parts into `registry`, the
/// Raft position into `applied`.
fn load_record(
    applied: &mut Applied,
    registry: &mut RegistryBuilder,
    instances: &mut u64,
    record: Record,
) {
    match record {
        Record::Applied(a) => applied.last_applied = a,
        Record::Membership(m) => applied.membership = m,
        Record::ExpiryPaused(p) => registry.expiry_paused(p),
        Record::ClocksPending(p) => registry.clocks_pending(p),
        Record::Instance(inst) => {
            *instances += 1;
            registry.push(inst, InstanceExt::default());
        }
        Record::Ext(service, id, ext) => registry.ext(service, id, ext),
        Record::Tombstone(t) => registry.tombstone(t),
    }
}

/// What the start-up check read from the state machine, and the state it
/// loaded on the way (one pass over the records serves both).
#[derive(Default)]
pub struct StateMachineCheck {
    pub instances: u64,
    pub applied: Option<LogId>,
    /// The current snapshot's last log id and size, if there is one.
    pub snapshot: Option<(Option<LogId>, usize)>,
    /// The registry and Raft position the records hold; taken by
    /// [`super::StateMachineStore::open_checked`].
    pub(crate) state: Applied,
}

impl StateMachineCheck {
    /// The registry the records hold.
    pub fn registry(&self) -> &crate::registry::Registry {
        &self.state.registry
    }
}

impl std::fmt::Debug for StateMachineCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineCheck")
            .field("instances", &self.instances)
            .field("applied", &self.applied)
            .field("snapshot", &self.snapshot)
            .finish_non_exhaustive()
    }
}

/// Verifies every record of the state machine (checksum, and that each
/// instance is stored under its own key), loading the registry they hold,
/// and the current snapshot's checksum. The registry inside the snapshot is
/// decoded only when it is used (sent to a follower, or loaded because it
/// is newer than the records, after a crash during an install): its
/// checksum already shows the bytes are those written, and decoding a
/// million instances twice was most of a node's start-up.
pub fn check(db: &sled::Db, dir: &Path) -> Result<StateMachineCheck, Corruption> {
    let sled_err = |what: &str, e: sled::Error| Corruption::new(what, describe_sled(&e));
    let sm = db
        .open_tree(SM_TREE)
        .map_err(|e| sled_err("state machine", e))?;
    let mut found = StateMachineCheck::default();
    let applied = &mut found.state;
    let mut registry = RegistryBuilder::new();
    // The snapshot file is checked on a thread of its own meanwhile.
    let file = snapshot_file::path(dir);
    let file_error = |e| Corruption::new(format!("snapshot file {}", file.display()), e);
    let file_check = |f: std::fs::File| {
        read_meta_from(f)
            .map_err(file_error)?
            .map_err(|why| Corruption::new("current snapshot", why))
    };
    let snapshot_file = snapshot_file::open(dir).map_err(file_error)?;
    let (scanned, from_file) = std::thread::scope(|scope| {
        let from_file = snapshot_file.map(|f| scope.spawn(move || file_check(f)));
        // Read and decoded on two threads, loaded here (see `scan`).
        let scanned = super::scan::scan(&sm, INSTANCE_PREFIX, decode_record, |record| {
            load_record(applied, &mut registry, &mut found.instances, record);
            Ok(())
        });
        let from_file = from_file.map(|t| t.join().expect("the snapshot check does not panic"));
        (scanned, from_file)
    });
    scanned?;
    found.state.registry = registry.finish();
    found.applied = found.state.last_applied;

    // The snapshot of an earlier release, in sled (see `snapshot_file`).
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
        let (meta, len) = read_meta(&v).map_err(|why| Corruption::new("current snapshot", why))?;
        found.snapshot = Some((meta.last_log_id, len));
    }
    if let Some(from_file) = from_file {
        let (meta, len) = from_file?;
        found.snapshot = Some((meta.last_log_id, len));
    }
    Ok(found)
}

pub(super) fn put_tombstone(batch: &mut sled::Batch, t: &Tombstone) {
    let i = &t.instance;
    batch.insert(
        prefixed_key(TOMBSTONE_PREFIX, &i.service_name, &i.instance_id),
        encode(t),
    );
}

/// The writes that make one registry change durable.
pub(super) fn write_change(batch: &mut sled::Batch, change: Change) {
    match change {
        Change::Put(inst) => batch.insert(
            instance_key(&inst.service_name, &inst.instance_id),
            encode(&inst),
        ),
        Change::Ext {
            service_name,
            instance_id,
            ext,
        } => put_ext(batch, &service_name, &instance_id, &ext),
        Change::Delete {
            service_name,
            instance_id,
        } => {
            batch.remove(instance_key(&service_name, &instance_id));
            batch.remove(prefixed_key(EXT_PREFIX, &service_name, &instance_id));
        }
        Change::ExpiryPaused(p) => batch.insert(EXPIRY_PAUSED, encode(&p)),
        // Kept only while pending, so that a directory that never saw a
        // restore holds no key an earlier release would not know.
        Change::ClocksPending(true) => batch.insert(CLOCKS_PENDING, encode(&true)),
        Change::ClocksPending(false) => batch.remove(CLOCKS_PENDING),
        Change::Bury(t) => put_tombstone(batch, &t),
        Change::Unbury {
            service_name,
            instance_id,
        } => batch.remove(prefixed_key(TOMBSTONE_PREFIX, &service_name, &instance_id)),
    }
}
