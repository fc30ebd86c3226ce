//! Tests of the LazyFS file system itself: what survives a crash, and that
//! the operations std::fs and sled need work.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::lazyfs::{LazyFs, Mode};

/// Upper bound for one test; a hung file system is aborted after it.
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Mounts a fresh LazyFS on a temporary directory and runs `body` on it in
/// a thread of its own. After `TEST_TIMEOUT` the FUSE connection is aborted
/// (so blocked I/O fails) and the test fails. The file system is unmounted
/// before the directory is removed, also when `body` panics.
fn with_fs(mode: Mode, body: impl FnOnce(&LazyFs) + Send + 'static) {
    let Some((fs, dir)) = crate::scenarios::mount(mode) else {
        return;
    };
    let fs = Arc::new(fs);
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let body_fs = fs.clone();
    let worker = std::thread::spawn(move || {
        let _done = done_tx; // Dropped (disconnecting) however body ends.
        body(&body_fs);
    });
    let timed_out = matches!(
        done_rx.recv_timeout(TEST_TIMEOUT),
        Err(mpsc::RecvTimeoutError::Timeout)
    );
    if timed_out {
        fs.abort();
    }
    let result = worker.join();
    drop(fs); // The last reference: unmounts before `dir` is removed.
    assert!(!is_mounted(dir.path()), "still mounted after drop");
    drop(dir);
    assert!(!timed_out, "test timed out after {TEST_TIMEOUT:?}");
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// Whether `path` is a mountpoint in /proc/mounts.
fn is_mounted(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mounts = fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .any(|line| line.split(' ').nth(1) == Some(path.to_str().unwrap()))
}

fn write_file(path: &Path, bytes: &[u8]) -> File {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .expect("open for writing");
    f.write_all(bytes).expect("write");
    f
}

#[test]
fn unmounts_on_drop_even_when_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let fs = LazyFs::mount(dir.path(), Mode::Honest).unwrap();
    assert!(is_mounted(dir.path()));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let _fs = fs;
        panic!("deliberate panic while mounted");
    }));
    assert!(result.is_err());
    assert!(!is_mounted(dir.path()));
}

#[test]
fn abort_fails_blocked_io_and_drop_still_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let fs = LazyFs::mount(dir.path(), Mode::Honest).unwrap();
    let mut f = write_file(&dir.path().join("open"), b"before");
    fs.abort();
    let err = f.write_all(b"after").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(107), "ENOTCONN: {err}");
    drop(f);
    let started = Instant::now();
    drop(fs);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!is_mounted(dir.path()));
}

#[test]
fn crash_keeps_exactly_the_synced_bytes() {
    with_fs(Mode::Honest, |fs| {
        let synced = fs.path().join("synced");
        let mut f = write_file(&synced, b"durable ");
        f.sync_all().unwrap();
        f.write_all(b"lost").unwrap();
        drop(f);

        let never = fs.path().join("never-synced");
        drop(write_file(&never, b"all of this is lost"));

        assert_eq!(fs::read(&synced).unwrap(), b"durable lost");
        let report = fs.crash(fs.path());
        assert_eq!(report.files_reverted, 2);
        assert_eq!(report.bytes_dropped, 4 + 19);

        assert_eq!(fs::read(&synced).unwrap(), b"durable ");
        assert_eq!(fs::metadata(&synced).unwrap().len(), 8);
        assert!(never.exists(), "names are durable at once");
        assert_eq!(fs::read(&never).unwrap(), b"");

        // A second crash has nothing left to drop.
        assert_eq!(fs.crash(fs.path()).files_reverted, 0);
        let stats = fs.stats();
        assert_eq!(stats.fsyncs, 1);
        assert!(stats.writes >= 3, "{stats:?}");
        assert_eq!(stats.bytes_written, 8 + 4 + 19);
    });
}

#[test]
fn fdatasync_and_fsync_through_another_handle_count() {
    with_fs(Mode::Honest, |fs| {
        let a = fs.path().join("a");
        let mut f = write_file(&a, b"one");
        f.sync_data().unwrap();
        f.write_all(b"two").unwrap();
        // fsync applies to the file, whichever descriptor asks for it.
        File::open(&a).unwrap().sync_all().unwrap();
        f.write_all(b"three").unwrap();
        drop(f);
        assert_eq!(fs.stats().fsyncs, 2);

        let report = fs.crash(fs.path());
        assert_eq!(report.files_reverted, 1);
        assert_eq!(report.bytes_dropped, 5);
        assert_eq!(fs::read(&a).unwrap(), b"onetwo");
    });
}

#[test]
fn crash_of_a_subdirectory_spares_the_rest() {
    with_fs(Mode::Honest, |fs| {
        let node1 = fs.path().join("node1");
        let node2 = fs.path().join("node2");
        fs::create_dir_all(node1.join("sled")).unwrap();
        fs::create_dir_all(node2.join("sled")).unwrap();
        for node in [&node1, &node2] {
            drop(write_file(&node.join("sled/db"), b"unsynced"));
            drop(write_file(&node.join("top"), b"unsynced"));
        }

        let report = fs.crash(&node2);
        assert_eq!(report.files_reverted, 2);
        assert_eq!(report.bytes_dropped, 16);
        assert_eq!(fs::read(node2.join("sled/db")).unwrap(), b"");
        assert_eq!(fs::read(node2.join("top")).unwrap(), b"");
        assert_eq!(fs::read(node1.join("sled/db")).unwrap(), b"unsynced");
        assert_eq!(fs::read(node1.join("top")).unwrap(), b"unsynced");

        // A single file, and a path that does not exist.
        assert_eq!(fs.crash(&node1.join("top")).files_reverted, 1);
        assert_eq!(fs::read(node1.join("sled/db")).unwrap(), b"unsynced");
        assert_eq!(fs.crash(&fs.path().join("missing")).files_reverted, 0);
    });
}

#[test]
fn ignore_fsync_loses_everything() {
    with_fs(Mode::IgnoreFsync, |fs| {
        let path = fs.path().join("f");
        let f = write_file(&path, b"fsynced, but ignored");
        f.sync_all().unwrap();
        f.sync_data().unwrap();
        drop(f);
        assert_eq!(fs.stats().fsyncs, 2);
        let report = fs.crash(fs.path());
        assert_eq!(report.files_reverted, 1);
        assert_eq!(fs::read(&path).unwrap(), b"");
    });
}

#[test]
fn rename_unlink_and_truncate() {
    with_fs(Mode::Honest, |fs| {
        let root = fs.path();
        let old = root.join("old");
        let new = root.join("new");
        write_file(&old, b"old content").sync_all().unwrap();
        write_file(&new, b"replaced").sync_all().unwrap();
        fs::rename(&old, &new).unwrap();
        assert!(!old.exists());
        assert_eq!(fs::read(&new).unwrap(), b"old content");
        assert_eq!(fs::read_dir(root).unwrap().count(), 1);
        // Renames are durable at once; the content goes with the inode.
        fs.crash(root);
        assert_eq!(fs::read(&new).unwrap(), b"old content");

        // rename of a directory, and over a non-empty directory.
        fs::create_dir(root.join("d1")).unwrap();
        fs::create_dir(root.join("d2")).unwrap();
        write_file(&root.join("d2/x"), b"x");
        let err = fs::rename(root.join("d1"), root.join("d2")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(39), "ENOTEMPTY: {err}");
        fs::rename(root.join("d2"), root.join("d3")).unwrap();
        assert_eq!(fs::read(root.join("d3/x")).unwrap(), b"x");
        let err = fs::remove_dir(root.join("d3")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(39), "ENOTEMPTY: {err}");
        fs::remove_dir_all(root.join("d3")).unwrap();
        fs::remove_dir(root.join("d1")).unwrap();

        fs::remove_file(&new).unwrap();
        assert!(!new.exists());
        let err = fs::read(&new).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);

        // Truncation is data: durable only once synced.
        let t = root.join("t");
        let f = write_file(&t, b"0123456789");
        f.sync_all().unwrap();
        f.set_len(4).unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"0123");
        fs.crash(root);
        assert_eq!(fs::read(&t).unwrap(), b"0123456789");
        f.set_len(4).unwrap();
        f.sync_all().unwrap();
        fs.crash(root);
        assert_eq!(fs::read(&t).unwrap(), b"0123");
        drop(f);

        // O_TRUNC through File::create.
        File::create(&t).unwrap().write_all(b"ab").unwrap();
        assert_eq!(fs::read(&t).unwrap(), b"ab");
        fs.crash(root);
        assert_eq!(fs::read(&t).unwrap(), b"0123");

        // Appends land at the end.
        let mut f = OpenOptions::new().append(true).open(&t).unwrap();
        f.write_all(b"45").unwrap();
        drop(f);
        assert_eq!(fs::read(&t).unwrap(), b"012345");
    });
}

#[test]
fn reads_past_eof_and_sparse_writes() {
    with_fs(Mode::Honest, |fs| {
        let path = fs.path().join("sparse");
        let mut f = write_file(&path, b"abc");
        let mut buf = [7u8; 16];
        assert_eq!(f.read_at(&mut buf, 3).unwrap(), 0);
        assert_eq!(f.read_at(&mut buf, 1000).unwrap(), 0);
        assert_eq!(f.read_at(&mut buf, 1).unwrap(), 2);
        assert_eq!(&buf[..2], b"bc");

        f.write_all_at(b"xyz", 10).unwrap();
        let mut all = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut all).unwrap();
        assert_eq!(all, b"abc\0\0\0\0\0\0\0xyz");
        assert_eq!(f.metadata().unwrap().len(), 13);

        // A large write and read (several FUSE requests each).
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let big_path = fs.path().join("big");
        write_file(&big_path, &big).sync_data().unwrap();
        assert_eq!(fs::read(&big_path).unwrap(), big);
        fs.crash(fs.path());
        assert_eq!(fs::read(&big_path).unwrap(), big);
        assert_eq!(fs::read(&path).unwrap(), b"");
    });
}

#[test]
fn large_directory_lists_fully() {
    with_fs(Mode::Honest, |fs| {
        let dir = fs.path().join("many");
        fs::create_dir(&dir).unwrap();
        for i in 0..1000 {
            File::create(dir.join(format!("file-{i:04}-with-a-longer-name"))).unwrap();
        }
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names.len(), 1000);
        for (i, name) in names.iter().enumerate() {
            assert_eq!(name, &format!("file-{i:04}-with-a-longer-name"));
        }
        // Removing while listing must not skip entries.
        fs::remove_dir_all(&dir).unwrap();
        assert!(!dir.exists());
        assert_eq!(fs::read_dir(fs.path()).unwrap().count(), 0);
        File::open(fs.path()).unwrap().sync_all().unwrap();
        assert_eq!(fs.stats().fsyncdirs, 1);
    });
}

const KEYS: u32 = 1000;

fn key(i: u32) -> [u8; 4] {
    i.to_be_bytes()
}

fn value(i: u32) -> Vec<u8> {
    format!("value-{i}-{}", "x".repeat(100)).into_bytes()
}

/// Opens sled at `path` the way src/raft/mod.rs does, without the periodic
/// flusher (whose fsync would make the outcome depend on timing).
/// Opens sled at `path`. A `Db` dropped in this process releases its file
/// lock only once sled's background threads let go of the file, a moment
/// later: a lock still held is waited for (10 s at most), by polling.
fn open_sled(path: &Path) -> sled::Result<sled::Db> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let opened = sled::Config::new()
            .path(path)
            .cache_capacity(32 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .flush_every_ms(None)
            .open();
        match opened {
            Err(e)
                if format!("{e:?}").contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// How many of the keys `from..from + KEYS` are present with their value.
fn count_keys(db: &sled::Db, from: u32) -> u32 {
    (from..from + KEYS)
        .filter(|&i| db.get(key(i)).ok().flatten().as_deref() == Some(&value(i)[..]))
        .count() as u32
}

fn insert_keys(db: &sled::Db, from: u32) {
    for i in from..from + KEYS {
        db.insert(key(i), value(i)).unwrap();
    }
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            out.extend(files_under(&entry.path()));
        } else {
            out.push(entry.path());
        }
    }
    out
}

/// Reopens after a crash and reports what sled shows: `Ok(keys found)`, or
/// the error opening gave.
fn reopen_and_count(path: &Path, from: u32) -> Result<u32, String> {
    match open_sled(path) {
        Ok(db) => Ok(count_keys(&db, from)),
        Err(e) => Err(format!("{e:?}")),
    }
}

#[test]
fn sled_after_flush_then_drop_and_after_fsync() {
    with_fs(Mode::Honest, |fs| {
        let path = fs.path().join("db");

        // Round 1: flush only, then a clean drop (sled's Drop fsyncs `db`).
        let db = open_sled(&path).unwrap();
        insert_keys(&db, 0);
        db.flush().unwrap();
        let fsyncs_before_drop = fs.stats().fsyncs;
        drop(db);
        let fsyncs_from_drop = fs.stats().fsyncs - fsyncs_before_drop;
        let report = fs.crash(fs.path());
        let found = reopen_and_count(&path, 0);
        eprintln!(
            "sled, flush + drop, crash: {report:?}; fsyncs during drop: \
             {fsyncs_from_drop}; reopen: {found:?} of {KEYS} keys"
        );

        // Round 2: flush, then fsync every file of the database ourselves.
        let db = open_sled(&path).expect("sled opens after a crash");
        insert_keys(&db, KEYS);
        db.flush().unwrap();
        for file in files_under(&path) {
            File::open(&file).unwrap().sync_all().unwrap();
        }
        drop(db);
        let report = fs.crash(fs.path());
        let db = open_sled(&path).expect("sled opens after a crash");
        let found = count_keys(&db, KEYS);
        eprintln!("sled, flush + fsync of its files, crash: {report:?}; reopen: {found} keys");
        assert_eq!(found, KEYS, "synced keys must survive");
        let stats = fs.stats();
        eprintln!("lazyfs stats: {stats:?}");
    });
}

/// Environment variable naming the database the child process writes to.
const CHILD_DB_ENV: &str = "LAZYFS_SELFTEST_SLED_CHILD_DB";
/// Set to "1" when the child first writes and fsyncs a round of keys.
const CHILD_SYNC_FIRST_ENV: &str = "LAZYFS_SELFTEST_SLED_CHILD_SYNC_FIRST";
/// Line the child prints once its flush returned.
const CHILD_READY: &str = "LAZYFS_SELFTEST_CHILD_FLUSHED";

/// Not a test: the child process of the `sled_killed_*` tests. It inserts
/// the keys `0..KEYS` and flushes (with `CHILD_SYNC_FIRST_ENV`, first also
/// keys `KEYS..2 * KEYS`, flushed and fsynced), says so, and waits to be
/// killed.
#[test]
#[ignore = "child process of the sled_killed_* tests"]
fn sled_child_process() {
    let Some(path) = std::env::var_os(CHILD_DB_ENV) else {
        return;
    };
    let path = Path::new(&path);
    let db = open_sled(path).unwrap();
    if std::env::var(CHILD_SYNC_FIRST_ENV).as_deref() == Ok("1") {
        insert_keys(&db, KEYS);
        db.flush().unwrap();
        for file in files_under(path) {
            File::open(&file).unwrap().sync_all().unwrap();
        }
    }
    insert_keys(&db, 0);
    db.flush().unwrap();
    println!("{CHILD_READY}");
    std::io::stdout().flush().unwrap();
    let deadline = Instant::now() + TEST_TIMEOUT;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `sled_child_process` on `path` and kills it (`kill -9`) once it has
/// flushed.
fn run_and_kill_sled_child(path: &Path, sync_first: bool) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "fs_selftest::sled_child_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DB_ENV, path)
        .env(CHILD_SYNC_FIRST_ENV, if sync_first { "1" } else { "0" })
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.contains(CHILD_READY) {
                let _ = tx.send(());
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(60));
    let _ = child.kill(); // SIGKILL; fails only if the child already exited.
    let status = child.wait().unwrap();
    assert!(ready.is_ok(), "child never flushed (exit status {status})");
}

/// What sled shows after `kill -9` right after `flush()` returned, then a
/// power loss: only sled's own syncs count (none, with the flusher off).
#[test]
fn sled_killed_after_flush_only() {
    with_fs(Mode::Honest, |fs| {
        let path = fs.path().join("db");
        run_and_kill_sled_child(&path, false);
        let stats = fs.stats();
        let report = fs.crash(fs.path());
        let found = reopen_and_count(&path, 0);
        eprintln!(
            "sled, flush + kill -9, crash: {report:?}; fsyncs by the child: {}; \
             reopen: {found:?} of {KEYS} keys",
            stats.fsyncs
        );
        // Either outcome is information, not a failure: the point is that
        // opening neither hangs nor panics.
        if let Ok(found) = found {
            assert!(found <= KEYS);
        }
    });
}

/// The same after a first round of keys was flushed and fsynced: the synced
/// keys must survive the unsynced tail being dropped.
#[test]
fn sled_killed_after_flush_keeps_what_was_synced_before() {
    with_fs(Mode::Honest, |fs| {
        let path = fs.path().join("db");
        run_and_kill_sled_child(&path, true);
        let report = fs.crash(fs.path());
        let db = open_sled(&path).expect("sled opens after a crash");
        let synced = count_keys(&db, KEYS);
        let flushed_only = count_keys(&db, 0);
        eprintln!(
            "sled, fsynced round then flush + kill -9, crash: {report:?}; reopen: \
             {synced} of {KEYS} synced keys, {flushed_only} of {KEYS} flushed-only keys"
        );
        assert_eq!(synced, KEYS, "synced keys must survive");
    });
}
