//! The state machine's records in sled: the keys of tree `sm`, how each
//! record is encoded (sealed with a CRC32, see [`crate::raft::codec`]) and
//! decoded, how a registry [`Change`] becomes writes, and [`check`], which
//! verifies every record and the current snapshot at start-up.
//!
//! Keys: `m/applied`, `m/membership`, `m/expiry_paused`; `i/{service}\0{id}`
//! an instance; `x/{service}\0{id}` what is kept beside it ([`InstanceExt`],
//! only when not the default); `t/{service}\0{id}` a tombstone. Tree
//! `snapshot` holds the current snapshot under `current`.

use openraft::StoredMembership;
use serde::Serialize;

use super::snapshot::{decode_snapshot_data, StoredSnapshot};
use crate::raft::codec::{describe_sled, seal, show_key, unseal, Corruption};
use crate::raft::{LogId, Node, NodeId};
use crate::registry::{Change, Instance, InstanceExt, Registry, Tombstone};

pub(crate) const APPLIED: &[u8] = b"m/applied";
pub(super) const MEMBERSHIP: &[u8] = b"m/membership";
pub(super) const EXPIRY_PAUSED: &[u8] = b"m/expiry_paused";
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
pub(super) fn decode_snapshot(v: &[u8]) -> Result<(StoredSnapshot, Registry), Corruption> {
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
        Change::Bury(t) => put_tombstone(batch, &t),
        Change::Unbury {
            service_name,
            instance_id,
        } => batch.remove(prefixed_key(TOMBSTONE_PREFIX, &service_name, &instance_id)),
    }
}
