//! Where the current snapshot is kept: a file of its own beside `sled/`
//! (`<data dir>/registry-snapshot`), sealed like every record (a CRC32, see
//! [`crate::raft::codec`]), written to a temporary file, fsynced and renamed
//! into place, the directory fsynced after.
//!
//! Why not in sled, where earlier releases kept it: sled stores a value
//! that large (160 MB at a million instances) as a blob file, and blobs
//! must be fsynced before any `fdatasync` of sled's log that may point at
//! them ([`crate::raft::durable`]). The first log append after a snapshot
//! then waited for the whole blob to reach the disk, the leader's
//! AppendEntries timed out, and followers called elections: 31 leader
//! changes while filling a million instances. A file of its own is synced
//! by the thread that writes it, and the log's syncs never wait for it.
//!
//! A directory of an earlier release has its snapshot in sled's `snapshot`
//! tree: it is read from there until the first snapshot is saved here,
//! which also removes the old one.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The file's name inside the data directory.
pub(crate) const SNAPSHOT_FILE: &str = "registry-snapshot";

/// Bytes written between two syncs of a snapshot file.
const SYNC_EVERY: usize = 4 << 20;

/// The current snapshot's file in `dir`.
pub(crate) fn path(dir: &Path) -> PathBuf {
    dir.join(SNAPSHOT_FILE)
}

/// The sealed bytes of the current snapshot, if a file holds one.
pub(crate) fn read(dir: &Path) -> io::Result<Option<Vec<u8>>> {
    match std::fs::read(path(dir)) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The current snapshot's file, open for reading, if there is one.
pub(crate) fn open(dir: &Path) -> io::Result<Option<File>> {
    match File::open(path(dir)) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replaces the current snapshot with `sealed`: the new bytes are on disk
/// (and, with `fsync`, durable) before the name points at them, so a crash
/// leaves the old snapshot or the new one, never a mix.
pub(crate) fn write(dir: &Path, sealed: &[u8], fsync: bool) -> io::Result<()> {
    let tmp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        // Synced as it goes, a few MiB at a time: one sync of 160 MB at the
        // end kept the disk busy long enough that the log's own syncs, and
        // with them the answers to the leader, queued behind it.
        for chunk in sealed.chunks(SYNC_EVERY) {
            f.write_all(chunk)?;
            if fsync {
                f.sync_data()?;
            }
        }
        if fsync {
            f.sync_all()?;
        }
    }
    std::fs::rename(&tmp, path(dir))?;
    if fsync {
        #[cfg(unix)]
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_then_read_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        write(dir.path(), b"first", true).unwrap();
        assert_eq!(read(dir.path()).unwrap().as_deref(), Some(&b"first"[..]));
        write(dir.path(), b"second, longer", false).unwrap();
        assert_eq!(
            read(dir.path()).unwrap().as_deref(),
            Some(&b"second, longer"[..])
        );
        // Nothing left behind but the file itself.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [SNAPSHOT_FILE]);
    }
}
