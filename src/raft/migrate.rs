//! Migrating a data directory of the previous storage format in place.
//!
//! The previous format ("format 0", every release before the format marker)
//! stored the same bincode values as format 1, without the CRC32 in front
//! of each and without the marker. The trees and keys are the same, and
//! every type decodes unchanged (later fields and variants were added
//! where older values never hold them). So migrating is: copy every value
//! of every tree into a new database, sealed, write the marker, verify the
//! copy as a node verifies its directory at start-up, make it durable, and
//! put it in place of the old one.
//!
//! Crash safety. The copy is built beside the old database, which is not
//! touched until the copy is complete, synced and verified; then two
//! renames swap them and the old copy is removed:
//!
//! 1. build `sled.migrating`, verify it, sync every file and folder in it;
//! 2. rename `sled` to `sled.format0`, sync the data directory;
//! 3. rename `sled.migrating` to `sled`, sync the data directory;
//! 4. remove `sled.format0`.
//!
//! A crash in 1 leaves the old `sled` and a partial `sled.migrating`, which
//! the next start removes before migrating again. A crash between 2 and 3
//! leaves no `sled` but a complete `sled.migrating` (it is only renamed
//! once complete) and `sled.format0`: [`finish_interrupted`] completes
//! step 3. A crash in 4 leaves `sled` migrated and `sled.format0`, which the
//! next start removes. At every point the directory holds either the whole
//! old database or the whole new one under a name the next start acts on.
//! The migration needs free space for one more copy of the database.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use super::codec::{describe_sled, seal_bytes};
use super::durable::sync_path as sync;
use super::log_store::{write_format, FORMAT_VERSION, META_TREE};
use super::{open_db, open_sled, SLED_DIR};

/// The new database while it is built.
const BUILDING: &str = "sled.migrating";
/// The old database between the swap and its removal.
const REPLACED: &str = "sled.format0";

/// Values per sled batch while copying.
const BATCH: usize = 10_000;

/// How often a long copy reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Why a migration did not happen. The old database is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum Failed {
    /// Reading, writing or syncing failed (a full disk, permissions).
    #[error("{0}")]
    Io(String),
    /// The old data does not verify once sealed: damaged, or not format 0.
    #[error("{0}")]
    Invalid(String),
}

fn io_failed(what: &str) -> impl Fn(io::Error) -> Failed + '_ {
    move |e| Failed::Io(format!("{what}: {e}"))
}

fn sled_failed(what: &str) -> impl Fn(sled::Error) -> Failed + '_ {
    move |e| Failed::Io(format!("{what}: {}", describe_sled(&e)))
}

/// Completes a swap that a crash interrupted between its two renames (no
/// `sled`, a complete `sled.migrating` and the old `sled.format0`). Runs
/// before sled opens `dir`, which would otherwise create an empty database.
pub fn finish_interrupted(dir: &Path) -> io::Result<()> {
    let (sled, building, replaced) = paths(dir);
    if sled.exists() || !replaced.exists() {
        return Ok(());
    }
    if building.exists() {
        tracing::warn!(
            "completing a storage migration that was interrupted: {} becomes {}",
            building.display(),
            sled.display()
        );
        std::fs::rename(&building, &sled)?;
    } else {
        // Not a state a migration leaves; the old database is all there is.
        tracing::warn!(
            "{} without {}: putting the old database back",
            replaced.display(),
            sled.display()
        );
        std::fs::rename(&replaced, &sled)?;
    }
    sync(dir)
}

/// Removes what an interrupted migration left beside `sled`: a partial new
/// database, or the old one after a completed swap. The caller holds
/// sled's lock on `dir`'s database, so no other process is migrating it.
pub fn remove_leftovers(dir: &Path) -> io::Result<()> {
    let (_, building, replaced) = paths(dir);
    for leftover in [building, replaced] {
        if leftover.exists() {
            tracing::info!(
                "removing {}, left by an interrupted storage migration",
                leftover.display()
            );
            std::fs::remove_dir_all(&leftover)?;
            sync(dir)?;
        }
    }
    Ok(())
}

/// Migrates the format-0 database `old`, open on `dir`, to this release's
/// format and returns the migrated database, open. `verify` checks the new
/// database before it replaces the old one (the node's start-up check).
pub fn migrate(
    old: sled::Db,
    dir: &Path,
    verify: impl FnOnce(&sled::Db) -> Result<(), String>,
) -> Result<sled::Db, Failed> {
    let started = Instant::now();
    let (sled, building, replaced) = paths(dir);
    tracing::warn!(
        dir = %dir.display(),
        "the data directory is in the storage format of an earlier release (values \
         without checksums): migrating it to format {FORMAT_VERSION}; the old database \
         stays in place until the new one is complete"
    );
    let copied = match build(&old, &building, verify) {
        Ok(copied) => copied,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&building);
            return Err(e);
        }
    };
    // sled's lock on the old database goes with its last handle.
    drop(old);
    std::fs::rename(&sled, &replaced).map_err(io_failed("renaming the old database"))?;
    sync(dir).map_err(io_failed("syncing the data directory"))?;
    std::fs::rename(&building, &sled).map_err(io_failed("renaming the new database"))?;
    sync(dir).map_err(io_failed("syncing the data directory"))?;
    std::fs::remove_dir_all(&replaced).map_err(io_failed("removing the old database"))?;
    sync(dir).map_err(io_failed("syncing the data directory"))?;
    let db = open_db(dir).map_err(sled_failed("opening the migrated database"))?;
    tracing::info!(
        values = copied,
        elapsed_ms = started.elapsed().as_secs_f64() * 1000.0,
        "storage migrated to format {FORMAT_VERSION}"
    );
    Ok(db)
}

/// Builds the sealed copy of `old` at `path`, verified and durable; returns
/// how many values it copied.
fn build(
    old: &sled::Db,
    path: &Path,
    verify: impl FnOnce(&sled::Db) -> Result<(), String>,
) -> Result<u64, Failed> {
    if path.exists() {
        std::fs::remove_dir_all(path).map_err(io_failed("removing a partial copy"))?;
    }
    let new = open_sled(path).map_err(sled_failed("creating the new database"))?;
    let mut copied = 0u64;
    let mut reported = Instant::now();
    for name in old.tree_names() {
        let what = String::from_utf8_lossy(&name).into_owned();
        let from = old.open_tree(&name).map_err(sled_failed(&what))?;
        let to = new.open_tree(&name).map_err(sled_failed(&what))?;
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        for item in from.iter() {
            let (k, v) = item.map_err(sled_failed(&what))?;
            batch.insert(k, seal_bytes(&v));
            in_batch += 1;
            copied += 1;
            if in_batch == BATCH {
                to.apply_batch(std::mem::take(&mut batch))
                    .map_err(sled_failed(&what))?;
                in_batch = 0;
            }
            if reported.elapsed() >= PROGRESS_EVERY {
                tracing::info!(values = copied, tree = %what, "migrating storage");
                reported = Instant::now();
            }
        }
        to.apply_batch(batch).map_err(sled_failed(&what))?;
    }
    let meta = new.open_tree(META_TREE).map_err(sled_failed("raft"))?;
    write_format(&meta).map_err(io_failed("writing the format marker"))?;
    verify(&new).map_err(|why| {
        Failed::Invalid(format!(
            "its data does not verify in format {FORMAT_VERSION} ({why})"
        ))
    })?;
    new.flush()
        .map_err(sled_failed("flushing the new database"))?;
    drop(new);
    sync_all_in(path).map_err(io_failed("syncing the new database"))?;
    Ok(copied)
}

/// `sled`, `sled.migrating` and `sled.format0` in `dir`.
fn paths(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    (dir.join(SLED_DIR), dir.join(BUILDING), dir.join(REPLACED))
}

/// fsync of every file and folder under `path`, and of `path`.
fn sync_all_in(path: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_all_in(&entry.path())?;
        } else {
            sync(&entry.path())?;
        }
    }
    sync(path)
}
