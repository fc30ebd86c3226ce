//! The snapshot format: the registry as a snapshot carries it, to followers
//! and at rest (where the whole [`StoredSnapshot`] is sealed, see
//! [`super::records`]). Snapshots of the first release still load.

use std::io::Cursor;

use openraft::SnapshotMeta;
use serde::{Deserialize, Serialize};

use crate::raft::{Node, NodeId};
use crate::registry::{Instance, InstanceExt, Registry, RegistryBuilder, Tombstone};

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

/// A part added after [`SnapshotExt`], read when bytes remain after it.
#[derive(Serialize, Deserialize, Default)]
struct SnapshotExt2 {
    /// Restored from a backup; a leader has yet to restart the clocks.
    clocks_pending: bool,
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
pub(super) fn read_meta(sealed: &[u8]) -> Result<MetaAndLen, crate::raft::codec::BadValue> {
    read_header(sealed).map(|(meta, len, _)| (meta, len))
}

/// [`read_meta`], and where in `sealed` the data starts.
fn read_header(
    sealed: &[u8],
) -> Result<(SnapshotMeta<NodeId, Node>, usize, usize), crate::raft::codec::BadValue> {
    use crate::raft::codec::{verify, BadValue, CRC_LEN};
    let payload = verify(sealed)?;
    let mut cursor = Cursor::new(payload);
    let meta: SnapshotMeta<NodeId, Node> =
        bincode::deserialize_from(&mut cursor).map_err(BadValue::Decode)?;
    let len: u64 = bincode::deserialize_from(&mut cursor).map_err(BadValue::Decode)?;
    let rest = payload.len() as u64 - cursor.position();
    check_length(len, rest)?;
    Ok((meta, rest as usize, CRC_LEN + cursor.position() as usize))
}

/// That the data is as long as the header says.
fn check_length(len: u64, rest: u64) -> Result<(), crate::raft::codec::BadValue> {
    if len == rest {
        return Ok(());
    }
    Err(crate::raft::codec::BadValue::Decode(Box::new(
        bincode::ErrorKind::Custom(format!(
            "its data should be {len} bytes long, {rest} follow"
        )),
    )))
}

/// A sealed [`StoredSnapshot`], verified and decoded: what `unseal` gives,
/// with the data moved rather than decoded byte by byte (bincode reads a
/// `Vec<u8>` an element at a time: 1.5 s for 195 MB, which a starting
/// node paid when Raft asked for the current snapshot).
pub(super) fn unseal_stored(
    mut sealed: Vec<u8>,
) -> Result<StoredSnapshot, crate::raft::codec::BadValue> {
    let (meta, _, data_at) = read_header(&sealed)?;
    sealed.drain(..data_at);
    Ok(StoredSnapshot { meta, data: sealed })
}

/// A snapshot's metadata and the length of its data.
pub(super) type MetaAndLen = (SnapshotMeta<NodeId, Node>, usize);

/// The most a snapshot's metadata and length take (the membership is a few
/// nodes' ids and addresses).
const HEADER_LIMIT: u64 = 1 << 20;

/// [`read_meta`] on a sealed snapshot read from `r` as a stream, without
/// holding it in memory (a starting node checks a 160 MB snapshot file this
/// way while it loads its records). The answers are [`read_meta`]'s,
/// including which error a damaged snapshot gives.
pub(super) fn read_meta_from(
    r: impl std::io::Read,
) -> std::io::Result<Result<MetaAndLen, crate::raft::codec::BadValue>> {
    use crate::raft::codec::{BadValue, CRC_LEN};
    use std::io::Read;

    /// Hashes and counts what is read through it.
    struct Hashing<R> {
        inner: R,
        hasher: crc32fast::Hasher,
        read: u64,
    }
    impl<R: Read> Read for Hashing<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.hasher.update(&buf[..n]);
            self.read += n as u64;
            Ok(n)
        }
    }

    let mut r = std::io::BufReader::with_capacity(1 << 20, r);
    let mut crc = [0u8; CRC_LEN];
    let mut got = 0;
    while got < CRC_LEN {
        match r.read(&mut crc[got..])? {
            0 => return Ok(Err(BadValue::TooShort(got))),
            n => got += n,
        }
    }
    let mut payload = Hashing {
        inner: r,
        hasher: crc32fast::Hasher::new(),
        read: 0,
    };
    // Decoded before the checksum is known, so a damaged length must not
    // make bincode allocate what it claims: the header is small, bounded.
    let header = (|| -> Result<_, bincode::Error> {
        use bincode::Options;
        let bounded = bincode::DefaultOptions::new()
            .with_fixint_encoding()
            .allow_trailing_bytes()
            .with_limit(HEADER_LIMIT);
        let meta: SnapshotMeta<NodeId, Node> = bounded.deserialize_from(&mut payload)?;
        let len: u64 = bounded.deserialize_from(&mut payload)?;
        Ok((meta, len, payload.read))
    })();
    std::io::copy(&mut payload, &mut std::io::sink())?;
    if u32::from_le_bytes(crc) != payload.hasher.finalize() {
        return Ok(Err(BadValue::Checksum));
    }
    let (meta, len, header_len) = match header {
        Ok(h) => h,
        Err(e) => return Ok(Err(BadValue::Decode(e))),
    };
    let rest = payload.read - header_len;
    if let Err(e) = check_length(len, rest) {
        return Ok(Err(e));
    }
    Ok(Ok((meta, rest as usize)))
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
    let ext2 = SnapshotExt2 {
        clocks_pending: registry.clocks_pending(),
    };
    let size = bincode::serialized_size(&data)?
        + bincode::serialized_size(&ext)?
        + bincode::serialized_size(&ext2)?;
    let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    bincode::serialize_into(&mut out, &data)?;
    bincode::serialize_into(&mut out, &ext)?;
    bincode::serialize_into(&mut out, &ext2)?;
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
    let ext2 = SnapshotExt2 {
        clocks_pending: registry.clocks_pending(),
    };
    bincode::serialize_into(&mut out, &ext2)?;
    Ok(out)
}

/// Reads a snapshot's registry, with or without the extension.
pub(super) fn decode_snapshot_data(bytes: &[u8]) -> Result<Registry, bincode::Error> {
    let mut cursor = Cursor::new(bytes);
    let data: SnapshotData = bincode::deserialize_from(&mut cursor)?;
    let more = |c: &Cursor<&[u8]>| (c.position() as usize) < bytes.len();
    let ext: SnapshotExt = if more(&cursor) {
        bincode::deserialize_from(&mut cursor)?
    } else {
        SnapshotExt::default()
    };
    let ext2: SnapshotExt2 = if more(&cursor) {
        bincode::deserialize_from(&mut cursor)?
    } else {
        SnapshotExt2::default()
    };
    let mut registry = RegistryBuilder::new();
    registry.expiry_paused(data.expiry_paused);
    registry.clocks_pending(ext2.clocks_pending);
    for inst in data.instances {
        registry.push(inst, InstanceExt::default());
    }
    for (service, id, e) in ext.ext {
        registry.ext(service, id, e);
    }
    for t in ext.tombstones {
        registry.tombstone(t);
    }
    Ok(registry.finish())
}
