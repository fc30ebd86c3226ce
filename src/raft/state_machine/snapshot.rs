//! The snapshot format: the registry as a snapshot carries it, to followers
//! and at rest (where the whole [`StoredSnapshot`] is sealed, see
//! [`super::records`]). Snapshots of the first release still load.

use std::io::Cursor;

use openraft::SnapshotMeta;
use serde::{Deserialize, Serialize};

use crate::raft::{Node, NodeId};
use crate::registry::{Instance, InstanceExt, Registry, Tombstone};

/// A snapshot as stored (sealed, in its file) and sent to followers.
#[derive(Serialize, Deserialize)]
pub(super) struct StoredSnapshot {
    pub(super) meta: SnapshotMeta<NodeId, Node>,
    pub(super) data: Vec<u8>,
}

/// The serialized form of the registry inside a snapshot: this, then (from
/// this release on) a [`SnapshotExt`] right after it. A snapshot of an
/// earlier release ends after this part; one of this release read by an
/// earlier release has its extension ignored (bincode leaves trailing bytes).
#[derive(Serialize, Deserialize)]
pub(super) struct SnapshotData {
    pub(super) instances: Vec<Instance>,
    pub(super) expiry_paused: bool,
}

/// The part of a snapshot added after the first release.
#[derive(Serialize, Deserialize, Default)]
struct SnapshotExt {
    /// `(service, instance id, ext)` of each instance whose ext is not the
    /// default.
    ext: Vec<(String, String, InstanceExt)>,
    tombstones: Vec<Tombstone>,
}

/// The metadata and data size of a sealed [`StoredSnapshot`], checking its
/// checksum, without copying out the data (160 MB at a million instances,
/// which bincode reads byte by byte).
pub(super) fn read_meta(
    sealed: &[u8],
) -> Result<(SnapshotMeta<NodeId, Node>, usize), crate::raft::codec::BadValue> {
    use crate::raft::codec::{verify, BadValue};
    let payload = verify(sealed)?;
    let mut cursor = Cursor::new(payload);
    let meta: SnapshotMeta<NodeId, Node> =
        bincode::deserialize_from(&mut cursor).map_err(BadValue::Decode)?;
    let len: u64 = bincode::deserialize_from(&mut cursor).map_err(BadValue::Decode)?;
    let rest = payload.len() as u64 - cursor.position();
    if len != rest {
        return Err(BadValue::Decode(Box::new(bincode::ErrorKind::Custom(
            format!("its data should be {len} bytes long, {rest} follow"),
        ))));
    }
    Ok((meta, rest as usize))
}

/// A snapshot's registry, both parts, written straight from the registry:
/// the borrowed forms below encode exactly as [`SnapshotData`] and
/// [`SnapshotExt`] do, without a copy of every instance (which, at a million
/// instances, cost several hundred MiB while the snapshot was built).
pub(super) fn encode_snapshot_data(registry: &Registry) -> Result<Vec<u8>, bincode::Error> {
    let data = SnapshotDataRef {
        instances: Instances(registry),
        expiry_paused: registry.expiry_paused(),
    };
    let ext = SnapshotExtRef {
        ext: registry
            .instances_ext()
            .filter(|(_, e)| **e != InstanceExt::default())
            .map(|(i, e)| (i.service_name.as_str(), i.instance_id.as_str(), e))
            .collect(),
        tombstones: registry.tombstones().collect(),
    };
    let size = bincode::serialized_size(&data)? + bincode::serialized_size(&ext)?;
    let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    bincode::serialize_into(&mut out, &data)?;
    bincode::serialize_into(&mut out, &ext)?;
    Ok(out)
}

/// [`SnapshotData`], borrowed.
#[derive(Serialize)]
struct SnapshotDataRef<'a> {
    instances: Instances<'a>,
    expiry_paused: bool,
}

/// Every live instance, as a sequence (what `Vec<Instance>` encodes to).
struct Instances<'a>(&'a Registry);

impl Serialize for Instances<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.0.instance_count()))?;
        for i in self.0.instances() {
            seq.serialize_element(i)?;
        }
        seq.end()
    }
}

/// [`SnapshotExt`], borrowed.
#[derive(Serialize)]
struct SnapshotExtRef<'a> {
    ext: Vec<(&'a str, &'a str, &'a InstanceExt)>,
    tombstones: Vec<&'a Tombstone>,
}

/// The first release's encoding, kept to show the borrowed one matches it.
#[cfg(test)]
pub(super) fn encode_snapshot_data_owned(registry: &Registry) -> Result<Vec<u8>, bincode::Error> {
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
pub(super) fn decode_snapshot_data(bytes: &[u8]) -> Result<Registry, bincode::Error> {
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
