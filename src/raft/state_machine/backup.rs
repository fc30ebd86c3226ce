//! Backups: the registry at one applied index, in a file an operator keeps
//! (`GET /cluster/snapshot`, `vertice-register snapshot save`).
//!
//! Layout, format 1:
//!
//! ```text
//! "VRBACKUP"                    8 bytes
//! header length                 u32, little-endian
//! header                        JSON: format, index, term, who took it and when, counts, members
//! data                          the registry as a Raft snapshot carries it
//! SHA-256 of everything above   32 bytes
//! ```
//!
//! The header is JSON so that `head -c 4096 FILE | strings` tells an
//! operator what a file holds; the checksum covers it too. A reader refuses
//! a format newer than its own, a damaged file, and data that does not
//! decode, before anything is written anywhere.

use std::collections::BTreeMap;

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

use super::snapshot::{decode_snapshot_data, encode_snapshot_data};
use crate::raft::NodeId;
use crate::registry::Registry;

/// What every backup starts with.
pub const MAGIC: &[u8; 8] = b"VRBACKUP";
/// The format this release writes, and the newest it reads.
pub const FORMAT: u32 = 1;
const SUM_LEN: usize = 32;
/// The most a header may take (a few members' addresses and some numbers).
const HEADER_LIMIT: usize = 1 << 20;

/// What a backup says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    /// The Raft log index the registry was taken at, and its term.
    pub index: u64,
    pub term: u64,
    /// The node that took it, and when (wall clock, for people).
    pub taken_by: NodeId,
    pub taken_at_unix_ms: u64,
    pub services: usize,
    pub instances: usize,
    pub data_bytes: u64,
    /// The cluster's members then (id to address), for reference: a
    /// restored cluster takes its members from `--peers`.
    pub members: BTreeMap<NodeId, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a vertice-register backup (it does not start with VRBACKUP)")]
    NotABackup,
    #[error(
        "backup format {0} is newer than this release reads ({FORMAT}); use a newer vertice-register"
    )]
    NewerFormat(u32),
    #[error("the backup is damaged: {0}")]
    Damaged(String),
    #[error("encoding the backup: {0}")]
    Encode(String),
}

/// Where the registry was taken: index, term, node, wall-clock time, members.
pub struct TakenAt {
    pub index: u64,
    pub term: u64,
    pub taken_by: NodeId,
    pub taken_at_unix_ms: u64,
    pub members: BTreeMap<NodeId, String>,
}

/// The backup of `registry`, whole, and its header.
pub fn encode(registry: &Registry, at: TakenAt) -> Result<(Header, Vec<u8>), BackupError> {
    let data = encode_snapshot_data(registry).map_err(|e| BackupError::Encode(e.to_string()))?;
    let header = Header {
        format: FORMAT,
        index: at.index,
        term: at.term,
        taken_by: at.taken_by,
        taken_at_unix_ms: at.taken_at_unix_ms,
        services: registry.service_count(),
        instances: registry.instance_count(),
        data_bytes: data.len() as u64,
        members: at.members,
    };
    let json = serde_json::to_vec(&header).map_err(|e| BackupError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + json.len() + data.len() + SUM_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&data);
    let sum = sha256(&out);
    out.extend_from_slice(&sum);
    Ok((header, out))
}

/// Checks a whole backup (magic, checksum, format, lengths) and decodes
/// its registry.
pub fn decode(bytes: &[u8]) -> Result<(Header, Registry), BackupError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(BackupError::NotABackup);
    }
    if bytes.len() < MAGIC.len() + 4 + SUM_LEN {
        return Err(BackupError::Damaged(format!(
            "{} bytes is too short (cut off?)",
            bytes.len()
        )));
    }
    let (body, sum) = bytes.split_at(bytes.len() - SUM_LEN);
    if sha256(body) != sum {
        return Err(BackupError::Damaged(
            "its SHA-256 does not match (a changed or cut-off file)".into(),
        ));
    }
    let rest = &body[MAGIC.len()..];
    let (len, rest) = rest.split_at(4);
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > HEADER_LIMIT || len > rest.len() {
        return Err(BackupError::Damaged(format!(
            "a header of {len} bytes does not fit"
        )));
    }
    let (json, data) = rest.split_at(len);
    let header: Header = serde_json::from_slice(json)
        .map_err(|e| BackupError::Damaged(format!("its header: {e}")))?;
    if header.format > FORMAT {
        return Err(BackupError::NewerFormat(header.format));
    }
    if header.data_bytes != data.len() as u64 {
        return Err(BackupError::Damaged(format!(
            "the header says {} bytes of data, {} follow",
            header.data_bytes,
            data.len()
        )));
    }
    let registry = decode_snapshot_data(data)
        .map_err(|e| BackupError::Damaged(format!("its registry: {e}")))?;
    if registry.instance_count() != header.instances {
        return Err(BackupError::Damaged(format!(
            "the header says {} instances, the data holds {}",
            header.instances,
            registry.instance_count()
        )));
    }
    Ok((header, registry))
}

/// The file a restore leaves in a data directory; the node installs it at
/// its first start and then deletes it.
pub const RESTORE_FILE: &str = "restore.backup";

/// A checked backup as the data of the snapshot a restored node installs:
/// its registry, flagged so that the first leader restarts every
/// instance's clock before anything may expire.
pub fn restore_data(bytes: &[u8]) -> Result<(Header, Vec<u8>), BackupError> {
    let (header, mut registry) = decode(bytes)?;
    registry.restore_clocks_pending(true);
    let data = encode_snapshot_data(&registry).map_err(|e| BackupError::Encode(e.to_string()))?;
    Ok((header, data))
}

/// The SHA-256 a backup ends with, in hex (what `snapshot save` prints).
pub fn checksum_hex(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(SUM_LEN);
    bytes[start..].iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> Vec<u8> {
    let mut ctx = Context::new(&SHA256);
    ctx.update(bytes);
    ctx.finish().as_ref().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Instance, InstanceExt, RegistryBuilder};

    fn registry() -> Registry {
        let mut b = RegistryBuilder::new();
        for (s, id) in [("a", "1"), ("a", "2"), ("b", "1")] {
            let inst = Instance {
                service_name: s.into(),
                instance_id: id.into(),
                host: "10.0.0.1".into(),
                port: 80,
                health_endpoint: "/health".into(),
                metadata: Default::default(),
                ttl_seconds: 30,
                registered_at: 1_000,
                last_heartbeat: 2_000,
            };
            b.push(inst, InstanceExt::default());
        }
        b.finish()
    }

    fn at() -> TakenAt {
        TakenAt {
            index: 42,
            term: 3,
            taken_by: 2,
            taken_at_unix_ms: 5_000,
            members: BTreeMap::from([(1, "h:1".into()), (2, "h:2".into())]),
        }
    }

    #[test]
    fn a_backup_decodes_to_the_same_registry_and_header() {
        let r = registry();
        let (header, bytes) = encode(&r, at()).unwrap();
        assert_eq!(
            (header.index, header.term, header.instances, header.services),
            (42, 3, 3, 2)
        );
        let (h2, r2) = decode(&bytes).unwrap();
        assert_eq!(h2, header);
        assert_eq!(
            r2.instances().collect::<Vec<_>>(),
            r.instances().collect::<Vec<_>>()
        );
        assert_eq!(checksum_hex(&bytes).len(), 64);
    }

    /// Shown to fail with the checksum check removed: a member's address
    /// with a flipped byte (`h:1` read as `(:1`) was accepted.
    #[test]
    fn every_flipped_byte_and_every_cut_is_refused() {
        let (_, bytes) = encode(&registry(), at()).unwrap();
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            let err = decode(&b).unwrap_err();
            if i < MAGIC.len() {
                assert!(matches!(err, BackupError::NotABackup), "byte {i}: {err}");
            } else {
                assert!(matches!(err, BackupError::Damaged(_)), "byte {i}: {err}");
            }
        }
        for n in 0..bytes.len() {
            assert!(decode(&bytes[..n]).is_err(), "cut at {n}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
    }

    #[test]
    fn a_newer_format_is_refused_by_name() {
        let (mut header, bytes) = encode(&registry(), at()).unwrap();
        header.format = FORMAT + 1;
        let json = serde_json::to_vec(&header).unwrap();
        let old_len = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&bytes[12 + old_len..bytes.len() - SUM_LEN]);
        let sum = sha256(&out);
        out.extend_from_slice(&sum);
        assert!(matches!(decode(&out), Err(BackupError::NewerFormat(2))));
    }
}
