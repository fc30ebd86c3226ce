//! Making what sled has flushed durable: `fdatasync`/`fsync` of sled's files.
//!
//! sled 0.34.7's `flush` writes its log buffers with `pwrite` and then waits
//! on `sync_file_range`, which pushes the data pages to the device but
//! persists no metadata (the file's new size, its block allocation) and does
//! not flush the device's write cache: it survives `kill -9`, not a power
//! cut. sled calls `fsync` only from its periodic flusher thread. Large
//! values (over ~128 KiB, such as the snapshots of earlier releases; ours are
//! now files of their own) go to files of their own under `sled/blobs/`,
//! which sled never syncs.
//!
//! So wherever durability is promised (an append or a vote reported saved, a
//! truncation, a snapshot saved, a clean stop) the stores call
//! [`DiskSync::flush`]: sled's flush, then, on a blocking thread, an `fsync`
//! of every blob file not synced before (and of `blobs/` when that changed)
//! and an `fdatasync` of `sled/db`. `fsync` applies to the file, whichever
//! descriptor calls it, so one handle kept open here covers the writes
//! sled makes through its own. openraft appends a whole batch of entries
//! before it asks for one flush, so one `fdatasync` covers a group commit.
//!
//! At open, sled's files and the directories that hold them are synced once,
//! so a directory created by this start is durable before anything in it is
//! acknowledged.
//!
//! `--unsafe-no-fsync` turns the syncs off (sled's flush alone, as before
//! this module existed): for tests that must show what power loss does
//! without them, and for measuring their cost. Never in production.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// What a sync of the node's files costs, when metrics are kept.
pub type SyncTimer = prometheus::Histogram;

/// Syncs the files of one node's sled database. Cheap to clone.
#[derive(Clone)]
pub struct DiskSync {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    /// `<data dir>/sled`.
    dir: PathBuf,
    /// `sled/db`, sled's log-structured file (every tree, one log).
    db: File,
    /// Blob files already synced (names under `sled/blobs`), with the size
    /// they had then: sled writes a blob sequentially before the record that
    /// points at it, so one still being written is synced again later.
    blobs: Mutex<HashMap<OsString, u64>>,
    timer: Option<SyncTimer>,
}

/// fsync of a file or directory by path; one that vanished needs nothing.
pub(crate) fn sync_path(path: &Path) -> io::Result<()> {
    match File::open(path) {
        Ok(f) => f.sync_all(),
        // sled removes blobs it no longer needs; a vanished file needs nothing.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `bytes` to the file `path` so that a crash leaves the old file
/// (or none) or the whole new one: a temporary file beside it, synced,
/// renamed over it, then the folder synced. The temporary file is removed
/// on failure.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file name", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let tmp = dir.join(format!("{}.tmp", name.to_string_lossy()));
    let written = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

impl DiskSync {
    /// Syncs nothing: sled's flush alone (`--unsafe-no-fsync`, or tests
    /// that need no durability).
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Whether syncs are on (off only with `--unsafe-no-fsync` and in tests).
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// For the sled database in `data_dir` (opened already, so its files
    /// exist): syncs its files and directories once, then keeps `sled/db`
    /// open for the syncs to come.
    pub fn open(data_dir: &Path, timer: Option<SyncTimer>) -> io::Result<Self> {
        let dir = data_dir.join(super::SLED_DIR);
        let db = File::open(dir.join("db"))?;
        let sync = Inner {
            dir,
            db,
            blobs: Mutex::new(HashMap::new()),
            timer,
        };
        // `db`, `conf` (which sled never syncs) and any snapshot file of sled's.
        for entry in std::fs::read_dir(&sync.dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                sync_path(&entry.path())?;
            }
        }
        sync.sync_blobs(true)?;
        sync_path(&sync.dir)?;
        sync_path(data_dir)?;
        // The directory holding the data directory, which may be new too;
        // best effort, since the node may not be allowed to open it.
        if let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            let _ = sync_path(parent);
        }
        Ok(Self {
            inner: Some(Arc::new(sync)),
        })
    }

    /// sled's flush, then the sync that makes it durable. Returns once
    /// everything written to `db` before the call is on stable storage.
    pub async fn flush(&self, db: &sled::Db) -> io::Result<()> {
        db.flush_async().await.map_err(io::Error::from)?;
        let Some(inner) = self.inner.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || inner.sync())
            .await
            .map_err(io::Error::other)?
    }
}

impl Inner {
    fn sync(&self) -> io::Result<()> {
        let started = Instant::now();
        // Blobs first: a record in `db` may point at one.
        self.sync_blobs(false)?;
        self.db.sync_data()?;
        if let Some(t) = &self.timer {
            t.observe(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Syncs every blob file not synced before, and the `blobs` directory
    /// when files came or went (or when `all`).
    fn sync_blobs(&self, all: bool) -> io::Result<()> {
        let dir = self.dir.join("blobs");
        let mut names = HashMap::new();
        match std::fs::read_dir(&dir) {
            Ok(rd) => {
                for entry in rd {
                    let entry = entry?;
                    let len = match entry.metadata() {
                        Ok(m) => m.len(),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    };
                    names.insert(entry.file_name(), len);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut seen = self.blobs.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = all || seen.len() != names.len();
        for (name, len) in &names {
            if seen.get(name) != Some(len) {
                sync_path(&dir.join(name))?;
                changed = true;
            }
        }
        if changed {
            sync_path(&dir)?;
        }
        *seen = names;
        Ok(())
    }
}
