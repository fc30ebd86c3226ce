//! Opening a data directory safely: the format marker and the start-up
//! integrity check, run before the node serves anything.
//!
//! A node that serves from a damaged directory can hand out diverged data or
//! vote with a log it no longer has; refusing to start is always safer,
//! because a node with an empty directory gets everything back from the
//! leader (a snapshot and the log after it).
//!
//! What the check covers: every value in every tree is verified against its
//! CRC32 and decoded; the log must be contiguous from the purge point to its
//! last entry, each entry under its own index, with terms never going down;
//! each instance record must sit under its own key; the current snapshot's
//! checksum must match (its registry is decoded when used: sent to a
//! follower, or loaded after a crash during an install). The pass over the
//! state machine's records also loads the registry the node then serves, so
//! checking costs nothing beyond loading: 0.15-0.35 s on a 2-core machine for
//! 20,000 log entries, 20,000 instances and their 2.4 MB snapshot (the unit
//! test below prints the figure), about 1.3-2 s for a million instances
//! (`examples/storage_probe.rs`; a node's directory, with each instance's
//! origin in a record beside it, holds twice as many records).
//!
//! What sled 0.34.7 does with damaged files. Experiment
//! (`survey_of_byte_flips_in_sleds_files` in `tests/corruption.rs`): after
//! a node's first run and a clean stop the directory holds `sled/conf`,
//! `sled/db` (log-structured segments of 512 KiB) and, for values over a
//! few KiB such as our snapshot, `sled/blobs/<lsn>`. 4 bytes were flipped at
//! ~2,000 offsets of copies of a 30- and a 2,000-instance directory, and
//! each copy opened and checked (without the clean-stop record below):
//! - sled frames every record and blob with its own CRC, but at open it
//!   replays its segments and **stops at the first record whose CRC fails,
//!   taking it for a torn write: everything written after it is silently
//!   dropped**, open succeeds. Every flip in live data of `db` or in a blob
//!   did that (all 535 in the small directory, down to an empty database
//!   when the first record was hit; 128 + 1,617 in the large one). What is
//!   left is a consistent older state, so no per-value checksum can see it.
//! - sled only notices when the cut falls before the point its own snapshot
//!   file (`snap.*`, written at each open after recovery) covers: open then
//!   fails with `Error::Corruption`. Damage to a page read lazily gives
//!   `Error::Corruption` on that read. In 46 cases recovery panicked
//!   ("tried to serialize Uninitialized"); [`open_checked`] turns that into
//!   a refusal too.
//! - A damaged `conf` fails open with `Unsupported` ("created using a sled
//!   version earlier than 0.29"), except its last 4 bytes, which sled
//!   ignores. Flips in dead space (freed segments, zero padding) changed
//!   nothing: every tree read back byte for byte.
//!
//! Hence the clean-stop record: a clean stop writes a fingerprint of what
//! it leaves (the `raft` tree's values, the log's length and last entry,
//! the state machine's size and applied id) to `clean-stop` beside `sled/`,
//! and the next start compares it with what sled gave back. With it, every
//! flip above that changed anything was refused. It is removed at start, so
//! after a crash (`kill -9`, power loss) there is none: damage to records
//! written since the node's last start is then **undetectable** (sled's cut
//! looks exactly like a crash losing unflushed writes, except that flushed,
//! acknowledged writes are gone). A node's Raft peers still hold those
//! writes; a single-node registry does not.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::codec::{describe_sled, seal, unseal, Corruption, CRC_LEN};
use super::log_store::{
    self, read_format, write_format, LogCheck, FORMAT_VERSION, LOG_TREE, META_TREE,
};
use super::migrate;
use super::state_machine::{self, StateMachineCheck, SM_TREE};

/// The file, beside `sled/`, where a clean stop records what it left.
const CLEAN_STOP: &str = "clean-stop";

/// Why a data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// Damaged data: the node must not start from it.
    #[error("{0}")]
    Corrupt(String),
    /// Written by a release with another storage format.
    #[error("{0}")]
    Format(String),
    /// sled could not open it (permissions, a lock held by another process).
    #[error("{0}")]
    Open(String),
}

impl From<Corruption> for DataDirError {
    fn from(c: Corruption) -> Self {
        Self::Corrupt(c.to_string())
    }
}

/// What the start-up check read, and how long it took.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub log: LogCheck,
    pub state_machine: StateMachineCheck,
    /// How long the check took.
    pub elapsed: Duration,
    /// How long sled took to open (its recovery) before the check.
    pub open_elapsed: Duration,
}

/// Opens the node's database in `dir`, gives a new directory the format
/// marker, refuses another format, and verifies everything stored.
pub fn open_checked(dir: &Path) -> Result<(sled::Db, CheckReport), DataDirError> {
    // sled's recovery has a few assertions on what it reads; damage that
    // trips one is still damage, not a crash.
    std::panic::catch_unwind(|| {
        let opening = Instant::now();
        migrate::finish_interrupted(dir).map_err(|e| {
            DataDirError::Open(format!(
                "cannot finish an interrupted storage migration: {e}"
            ))
        })?;
        let mut db = super::open_db(dir).map_err(open_error)?;
        migrate::remove_leftovers(dir).map_err(|e| {
            DataDirError::Open(format!(
                "cannot remove an interrupted storage migration: {e}"
            ))
        })?;
        if ensure_format(&db)? == Stored::Older {
            db = migrate::migrate(db, dir, |new| {
                check(new, dir).map(|_| ()).map_err(|e| e.to_string())
            })
            .map_err(|e| match e {
                migrate::Failed::Io(why) => DataDirError::Open(format!(
                    "was written by an older release and could not be migrated: {why}"
                )),
                migrate::Failed::Invalid(why) => DataDirError::Format(format!(
                    "was written by an older release and cannot be migrated: {why}"
                )),
            })?;
        }
        let started = Instant::now();
        let mut report = check(&db, dir)?;
        compare_clean_stop(dir, &db)?;
        report.elapsed = started.elapsed();
        report.open_elapsed = started - opening;
        Ok((db, report))
    })
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(DataDirError::Corrupt(format!(
            "sled failed while reading it ({what})"
        )))
    })
}

/// The format marker and the full integrity check on an open database
/// (`dir` is the data directory, which holds the snapshot file).
pub fn check(db: &sled::Db, dir: &Path) -> Result<CheckReport, DataDirError> {
    let started = Instant::now();
    if ensure_format(db)? == Stored::Older {
        return Err(DataDirError::Format(
            "was written by an older release (no storage format marker: \
             values without checksums)"
                .into(),
        ));
    }
    let log = log_store::check(db)?;
    let state_machine = state_machine::check(db, dir)?;
    Ok(CheckReport {
        log,
        state_machine,
        elapsed: started.elapsed(),
        open_elapsed: Duration::ZERO,
    })
}

/// How to tell an operator about a failure to open: sled's corruption
/// reports are damage; an I/O error is the disk, the permissions or another
/// process holding the lock, which deleting the data would not fix.
fn open_error(e: sled::Error) -> DataDirError {
    match &e {
        sled::Error::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::InvalidData
            ) =>
        {
            DataDirError::Corrupt(describe_sled(&e))
        }
        sled::Error::Io(_) => DataDirError::Open(describe_sled(&e)),
        sled::Error::Corruption { .. } => DataDirError::Corrupt(describe_sled(&e)),
        // What a damaged `conf` file gives, among others.
        _ => DataDirError::Corrupt(format!("sled cannot open it ({})", describe_sled(&e))),
    }
}

/// Which format a database holds, once [`ensure_format`] has looked.
#[derive(Debug, PartialEq, Eq)]
enum Stored {
    /// This release's (a new, empty database is given its marker).
    Current,
    /// The format before the marker ([`migrate`] converts it).
    Older,
}

fn ensure_format(db: &sled::Db) -> Result<Stored, DataDirError> {
    let sled_err = |e: sled::Error| Corruption::new("database", describe_sled(&e));
    let meta = db.open_tree(META_TREE).map_err(sled_err)?;
    match read_format(&meta)? {
        Some(FORMAT_VERSION) => Ok(Stored::Current),
        Some(other) => Err(DataDirError::Format(format!(
            "is in storage format {other}, but this release reads format {FORMAT_VERSION} \
             (and migrates format 0)"
        ))),
        None => {
            for name in db.tree_names() {
                if !db.open_tree(&name).map_err(sled_err)?.is_empty() {
                    return Ok(Stored::Older);
                }
            }
            // A new directory: mark it before anything else is written.
            write_format(&meta).map_err(|e| DataDirError::Open(e.to_string()))?;
            db.flush()
                .map_err(|e| DataDirError::Open(describe_sled(&e)))?;
            Ok(Stored::Current)
        }
    }
}

#[cfg(test)]
mod tests {

    use openraft::storage::RaftStateMachine;
    use openraft::{EntryPayload, RaftSnapshotBuilder};

    use super::*;
    use crate::raft::codec::seal;
    use crate::raft::log_store::{key, LOG_TREE};
    use crate::raft::{Entry, LogId, StateMachineStore};
    use crate::registry::{Command, Instance};

    fn log_id(term: u64, index: u64) -> LogId {
        openraft::testing::log_id(term, 1, index)
    }

    fn register(term: u64, index: u64) -> Entry {
        Entry {
            log_id: log_id(term, index),
            payload: EntryPayload::Normal(Command::Register {
                instance: Instance {
                    service_name: format!("svc-{}", index % 50),
                    instance_id: format!("10.0.{}.{}:{}", index / 250, index % 250, 1000),
                    host: format!("10.0.{}.{}", index / 250, index % 250),
                    port: 1000,
                    health_endpoint: "/health".into(),
                    metadata: [("zone".into(), "a".into())].into(),
                    ttl_seconds: 30,
                    registered_at: 1_700_000_000_000,
                    last_heartbeat: 1_700_000_000_000,
                },
            }),
        }
    }

    /// A database as a node leaves it: `n` entries in the log (1..=n),
    /// all applied, and a snapshot.
    async fn populated(n: u64) -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let (db, _) = open_checked(dir.path()).unwrap();
        let log = db.open_tree(LOG_TREE).unwrap();
        let mut entries = Vec::new();
        for i in 1..=n {
            let e = register(1, i);
            log.insert(key(i), seal(&e).unwrap()).unwrap();
            entries.push(e);
        }
        let sync = crate::raft::DiskSync::open(dir.path(), None).unwrap();
        let mut log_meta = crate::raft::LogStore::open(&db, sync.clone()).unwrap();
        openraft::storage::RaftLogStorage::save_vote(
            &mut log_meta,
            &openraft::Vote::new_committed(1, 1),
        )
        .await
        .unwrap();
        // Entry 0 stands for the purged start of the log.
        openraft::storage::RaftLogStorage::purge(&mut log_meta, log_id(1, 0))
            .await
            .unwrap();
        let mut sm = StateMachineStore::open(&db, dir.path(), sync).unwrap();
        sm.apply(entries).await.unwrap();
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        db.flush().unwrap();
        (dir, db)
    }

    /// Opens a directory again, once sled's threads let go of its lock.
    fn reopen(dir: &Path) -> Result<(sled::Db, CheckReport), DataDirError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match open_checked(dir) {
                Err(DataDirError::Open(e)) if e.contains("lock") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => return other,
            }
        }
    }

    fn corrupt(db: &sled::Db, dir: &Path) -> String {
        match check(db, dir) {
            Err(DataDirError::Corrupt(why)) => why,
            other => panic!("expected corruption, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn check_of_20000_entries_and_instances_is_fast() {
        let (dir, db) = populated(20_000).await;
        let report = check(&db, dir.path()).unwrap();
        assert_eq!(report.log.entries, 20_000);
        assert_eq!(report.log.last, Some(log_id(1, 20_000)));
        assert_eq!(report.state_machine.instances, 20_000);
        assert!(report.state_machine.snapshot.is_some());
        eprintln!(
            "start-up check of 20,000 log entries + 20,000 instances + a {} byte snapshot: {:?}",
            report.state_machine.snapshot.map_or(0, |s| s.1),
            report.elapsed
        );
        // Generous for slow CI machines; measured figures are in docs/design.md.
        assert!(report.elapsed < Duration::from_secs(5), "{report:?}");
    }

    #[test]
    fn a_new_directory_gets_the_format_marker_and_an_old_one_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (db, _) = open_checked(dir.path()).unwrap();
            let meta = db.open_tree(META_TREE).unwrap();
            assert_eq!(read_format(&meta).unwrap(), Some(FORMAT_VERSION));
        }
        // Opening again is fine.
        drop(reopen(dir.path()).unwrap());

        // An older release: data, but no marker.
        let old = tempfile::tempdir().unwrap();
        {
            let db = super::super::open_db(old.path()).unwrap();
            db.open_tree(LOG_TREE)
                .unwrap()
                .insert(key(0), bincode::serialize(&register(0, 0)).unwrap())
                .unwrap();
            db.flush().unwrap();
        }
        {
            let (db, report) = reopen(old.path()).unwrap();
            assert_eq!(report.log.entries, 1);
            let meta = db.open_tree(META_TREE).unwrap();
            assert_eq!(read_format(&meta).unwrap(), Some(FORMAT_VERSION));
            let stored = db
                .open_tree(LOG_TREE)
                .unwrap()
                .get(key(0))
                .unwrap()
                .unwrap();
            assert_eq!(
                format!("{:?}", unseal::<Entry>(&stored).unwrap()),
                format!("{:?}", register(0, 0))
            );
        }

        // A newer release's marker.
        let newer = tempfile::tempdir().unwrap();
        {
            let db = super::super::open_db(newer.path()).unwrap();
            db.open_tree(META_TREE)
                .unwrap()
                .insert(log_store::FORMAT, seal(&2u32).unwrap())
                .unwrap();
            db.flush().unwrap();
        }
        match reopen(newer.path()) {
            Err(DataDirError::Format(why)) => assert!(why.contains("format 2"), "{why}"),
            other => panic!("expected a format error, got {:?}", other.map(|r| r.1)),
        }
    }

    #[tokio::test]
    async fn damage_is_named() {
        let (dir, db) = populated(30).await;
        let dir = dir.path();
        let log = db.open_tree(LOG_TREE).unwrap();

        // A flipped byte in an entry.
        let good = log.get(key(17)).unwrap().unwrap();
        let mut bad = good.to_vec();
        let mid = bad.len() / 2;
        bad[mid] ^= 0x40;
        log.insert(key(17), bad).unwrap();
        assert_eq!(corrupt(&db, dir), "log entry 17: checksum mismatch");
        log.insert(key(17), good.clone()).unwrap();
        check(&db, dir).unwrap();

        // A valid entry under the wrong key.
        log.insert(key(17), log.get(key(18)).unwrap().unwrap())
            .unwrap();
        assert_eq!(
            corrupt(&db, dir),
            "log entry 17: holds the entry of index 18"
        );
        log.insert(key(17), good.clone()).unwrap();

        // A hole.
        log.remove(key(17)).unwrap();
        assert_eq!(
            corrupt(&db, dir),
            "log entry 17: missing (the next stored entry is 18)"
        );
        log.insert(key(17), good).unwrap();

        // A term that goes down.
        let last = log.get(key(30)).unwrap().unwrap();
        log.insert(key(29), seal(&register(2, 29)).unwrap())
            .unwrap();
        assert_eq!(
            corrupt(&db, dir),
            "log entry 30: term 1 is lower than the term 2 before it"
        );
        log.insert(key(29), seal(&register(1, 29)).unwrap())
            .unwrap();
        assert_eq!(log.get(key(30)).unwrap().unwrap(), last);
        check(&db, dir).unwrap();

        // The vote.
        let meta = db.open_tree(META_TREE).unwrap();
        let vote = meta.get(b"vote").unwrap().unwrap();
        meta.insert(b"vote", &vote[..vote.len() - 1]).unwrap();
        assert_eq!(corrupt(&db, dir), "vote: checksum mismatch");
        meta.insert(b"vote", vote).unwrap();

        // An instance record, and one moved under another key.
        let sm = db.open_tree("sm").unwrap();
        let (k, v) = sm.scan_prefix(b"i/svc-3\0").next().unwrap().unwrap();
        let mut bad = v.to_vec();
        *bad.last_mut().unwrap() ^= 1;
        sm.insert(&k, bad).unwrap();
        let why = corrupt(&db, dir);
        assert!(
            why.starts_with("state machine instance svc-3/10.0.0.")
                && why.ends_with(": checksum mismatch"),
            "{why}"
        );
        sm.insert(&k, v.clone()).unwrap();
        sm.insert(b"i/svc-3\0elsewhere", v).unwrap();
        assert_eq!(
            corrupt(&db, dir),
            "state machine instance svc-3/elsewhere: holds instance svc-3/10.0.0.3:1000"
        );
        sm.remove(b"i/svc-3\0elsewhere").unwrap();

        // The snapshot, in its file.
        let file = dir.join(crate::raft::state_machine::SNAPSHOT_FILE);
        let snap = std::fs::read(&file).unwrap();
        let mut bad = snap.clone();
        bad[snap.len() / 2] ^= 0xff;
        std::fs::write(&file, &bad).unwrap();
        assert_eq!(corrupt(&db, dir), "current snapshot: checksum mismatch");
        // Cut short.
        std::fs::write(&file, &snap[..snap.len() - 1]).unwrap();
        assert_eq!(corrupt(&db, dir), "current snapshot: checksum mismatch");
        std::fs::write(&file, &snap).unwrap();
        check(&db, dir).unwrap();

        // Where an earlier release kept it: sled's `snapshot` tree, read
        // when there is no file.
        std::fs::remove_file(&file).unwrap();
        assert_eq!(check(&db, dir).unwrap().state_machine.snapshot, None);
        let snaps = db.open_tree("snapshot").unwrap();
        snaps.insert(b"current", bad).unwrap();
        assert_eq!(corrupt(&db, dir), "current snapshot: checksum mismatch");
        snaps.insert(b"current", snap).unwrap();
        let found = check(&db, dir).unwrap().state_machine.snapshot;
        assert_eq!(found.map(|s| s.0), Some(Some(log_id(1, 30))));
    }
}

/// What a clean stop leaves, in a form cheap to compare: sled recovers a
/// prefix of what was written, so losing any write that changed the state
/// changes one of these. The snapshot tree is left out: a snapshot build
/// may still be finishing while the node stops.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Fingerprint {
    /// Every key of the `raft` tree, with its value's checksum.
    raft: Vec<(Vec<u8>, [u8; CRC_LEN])>,
    log_entries: u64,
    /// The last entry's key and checksum.
    log_last: Option<(Vec<u8>, [u8; CRC_LEN])>,
    sm_records: u64,
    /// The applied log id's checksum (it changes with every apply).
    sm_applied: Option<[u8; CRC_LEN]>,
}

impl Fingerprint {
    fn of(db: &sled::Db) -> Result<Self, Corruption> {
        let sled_err = |e: sled::Error| Corruption::new("database", describe_sled(&e));
        let crc = |v: &[u8]| {
            let mut c = [0; CRC_LEN];
            let n = CRC_LEN.min(v.len());
            c[..n].copy_from_slice(&v[..n]);
            c
        };
        let meta = db.open_tree(META_TREE).map_err(sled_err)?;
        let log = db.open_tree(LOG_TREE).map_err(sled_err)?;
        let sm = db.open_tree(SM_TREE).map_err(sled_err)?;
        let mut raft = Vec::new();
        for item in meta.iter() {
            let (k, v) = item.map_err(sled_err)?;
            raft.push((k.to_vec(), crc(&v)));
        }
        Ok(Self {
            raft,
            log_entries: log.len() as u64,
            log_last: log
                .last()
                .map_err(sled_err)?
                .map(|(k, v)| (k.to_vec(), crc(&v))),
            sm_records: sm.len() as u64,
            sm_applied: sm
                .get(state_machine::APPLIED)
                .map_err(sled_err)?
                .map(|v| crc(&v)),
        })
    }

    /// What differs between what was left and what is there.
    fn differs(&self, now: &Self) -> Option<&'static str> {
        if self.raft != now.raft {
            Some("raft metadata")
        } else if (self.log_entries, &self.log_last) != (now.log_entries, &now.log_last) {
            Some("log")
        } else if (self.sm_records, self.sm_applied) != (now.sm_records, now.sm_applied) {
            Some("state machine")
        } else {
            None
        }
    }
}

/// Records what a clean stop leaves, once everything is flushed, so the
/// next start can tell whether sled gave all of it back (see the module
/// documentation: sled silently drops everything after a damaged record).
pub fn record_clean_stop(dir: &Path, db: &sled::Db) -> io::Result<()> {
    let fp = Fingerprint::of(db).map_err(io::Error::other)?;
    let bytes = seal(&fp).map_err(io::Error::other)?;
    super::durable::write_file(&dir.join(CLEAN_STOP), &bytes)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// After a clean stop, what sled recovered must be what the stop left. The
/// record is then removed (durably) before the node writes anything, so it
/// never describes a later state.
fn compare_clean_stop(dir: &Path, db: &sled::Db) -> Result<(), DataDirError> {
    let path = dir.join(CLEAN_STOP);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(DataDirError::Open(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        }
    };
    let left: Fingerprint =
        unseal(&bytes).map_err(|why| Corruption::new("the record of the last clean stop", why))?;
    if let Some(what) = left.differs(&Fingerprint::of(db)?) {
        return Err(DataDirError::Corrupt(format!(
            "sled gave back older {what} than the node left at its last clean stop \
             (sled silently drops everything after a damaged record in its files)"
        )));
    }
    std::fs::remove_file(&path)
        .and_then(|()| sync_dir(dir))
        .map_err(|e| DataDirError::Open(format!("cannot remove {}: {e}", path.display())))
}
