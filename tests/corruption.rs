//! A damaged data directory: the real binary must refuse to start, with one
//! clear line naming what is corrupt, instead of serving diverged data.
//! And an undamaged directory must still restart and serve everything.

mod blocking;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blocking::{copy_dir, http, names, poll};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_vertice-register");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A one-node registry process, killed on drop if still running.
struct Node {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Node {
    fn spawn(work: &Path, data: &Path) -> Self {
        let port = free_port();
        let log = work.join(format!("node-{port}.log"));
        let stderr = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .args(["node", "--id", "1", "--addr", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Self { child, port, log }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_leader(&mut self) {
        let client = http();
        let url = self.url();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                panic!("the node exited with {exit}:\n{}", self.stderr());
            }
            let role = client
                .get(format!("{url}/health"))
                .send()
                .ok()
                .and_then(|r| r.json::<Value>().ok())
                .and_then(|h| h["role"].as_str().map(String::from));
            if role.as_deref() == Some("leader") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no leader in time:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit on its own.
    fn exit_within(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(exit) = self.child.try_wait().unwrap() {
                return exit;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the node was still running after {timeout:?}:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sigterm(mut self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.exit_within(Duration::from_secs(15));
        assert!(exit.success(), "graceful stop exits 0, got {exit}");
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a node on `data`, registers `n` instances of service `a`, and stops
/// it with SIGTERM.
fn populate(work: &Path, data: &Path, n: u16) {
    let mut node = Node::spawn(work, data);
    node.wait_leader();
    let client = http();
    for i in 0..n {
        let r = client
            .post(format!("{}/register", node.url()))
            .json(&json!({"service_name": "a", "port": 1000 + i, "ttl_seconds": 3600}))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "register {i}: {}", r.status());
    }
    node.sigterm();
}

/// Starts the binary on a damaged `data` and returns its stderr, once it
/// has exited with a failure.
fn refused(work: &Path, data: &Path) -> String {
    let mut node = Node::spawn(work, data);
    let started = Instant::now();
    let exit = node.exit_within(Duration::from_secs(10));
    let stderr = node.stderr();
    assert!(
        !exit.success(),
        "a damaged directory must not start:\n{stderr}"
    );
    eprintln!("refused in {:?}: {stderr}", started.elapsed());
    stderr
}

/// The one `error:` line the binary prints before exiting.
fn error_line(stderr: &str) -> &str {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{stderr}");
    errors[0]
}

/// Waits until no one holds sled's lock on `data`: sled's background
/// threads let go of the file a little after the last handle is dropped.
fn wait_unlocked(data: &Path) {
    let file = std::fs::File::open(data.join("sled").join("db")).unwrap();
    poll(
        "sled's lock to be released",
        Duration::from_secs(10),
        || file.try_lock().ok(),
    );
    file.unlock().unwrap();
}

/// Runs `f` on the node's sled database, opened directly.
fn with_db<T>(data: &Path, f: impl FnOnce(&sled::Db) -> T) -> T {
    wait_unlocked(data);
    let out = {
        let db = vertice_register::raft::open_db(data).unwrap();
        let out = f(&db);
        db.flush().unwrap();
        out
    };
    wait_unlocked(data);
    out
}

/// Flips a byte in the middle of the value stored under `key` in `tree`.
fn tamper(db: &sled::Db, tree: &str, key: &[u8]) {
    let tree = db.open_tree(tree).unwrap();
    let mut value = tree.get(key).unwrap().expect("the key exists").to_vec();
    let mid = value.len() / 2;
    value[mid] ^= 0x5a;
    tree.insert(key, value).unwrap();
}

#[test]
fn a_tampered_log_entry_is_refused_naming_the_entry() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    populate(work.path(), &data, 5);

    let index = with_db(&data, |db| {
        let log = db.open_tree("log").unwrap();
        let first = log.first().unwrap().unwrap().0;
        let last = log.last().unwrap().unwrap().0;
        let (first, last) = (
            u64::from_be_bytes(first.as_ref().try_into().unwrap()),
            u64::from_be_bytes(last.as_ref().try_into().unwrap()),
        );
        assert!(
            last >= first + 5,
            "five registrations, and more: {first}..={last}"
        );
        let index = (first + last) / 2;
        tamper(db, "log", &index.to_be_bytes());
        index
    });

    let stderr = refused(work.path(), &data);
    let line = error_line(&stderr);
    assert!(line.contains("is corrupt"), "{line}");
    assert!(
        line.contains(&format!("log entry {index}: checksum mismatch")),
        "{line}"
    );
    assert!(line.contains("refusing to start"), "{line}");
    assert!(line.contains(&data.display().to_string()), "{line}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_tampered_state_machine_record_is_refused_naming_it() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    populate(work.path(), &data, 5);

    let key = with_db(&data, |db| {
        let sm = db.open_tree("sm").unwrap();
        let (key, _) = sm.scan_prefix(b"i/a\0").nth(2).unwrap().unwrap();
        tamper(db, "sm", &key);
        key.to_vec()
    });
    let id = String::from_utf8(key[b"i/a\0".len()..].to_vec()).unwrap();

    let stderr = refused(work.path(), &data);
    let line = error_line(&stderr);
    assert!(line.contains("is corrupt"), "{line}");
    assert!(
        line.contains(&format!("state machine instance a/{id}: checksum mismatch")),
        "{line}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn flipped_bytes_in_the_middle_of_sleds_file_are_refused_or_harmless() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    populate(work.path(), &data, 30);
    let pristine = verdict_of_copy(work.path(), &data);
    assert!(pristine.starts_with("accepted"), "{pristine}");

    // Flip 4 bytes at written offsets from the middle of what sled wrote
    // on (the file is preallocated: its second half may be all zeroes).
    // Where the bytes are dead space (an old copy sled has moved on from),
    // nothing may change; otherwise the damage must be refused. (sled alone
    // would accept most of these, silently dropping everything after the
    // damaged record: the record of the clean stop catches that.)
    let file = Path::new("sled").join("db");
    let bytes = std::fs::read(data.join(&file)).unwrap();
    let written: Vec<usize> = (0..bytes.len() - 4).filter(|i| bytes[*i] != 0).collect();
    let mut first_refused = None;
    let mut harmless = Vec::new();
    for &at in written[written.len() / 2..].iter().step_by(37).take(12) {
        let trial = work.path().join(format!("flip-{at}"));
        copy_dir(&data, &trial);
        let mut b = bytes.clone();
        for x in &mut b[at..at + 4] {
            *x ^= 0xff;
        }
        std::fs::write(trial.join(&file), b).unwrap();
        let v = verdict(&trial);
        if v == pristine {
            harmless.push(at);
        } else {
            assert!(
                v.starts_with("refused: "),
                "a flip at {at} went unnoticed: {v}"
            );
            first_refused.get_or_insert(trial);
        }
    }
    eprintln!(
        "file of {} bytes; flips in dead space, read back unchanged: {harmless:?}",
        bytes.len()
    );

    // The binary on a damaged copy: one clear line, no serving.
    let damaged = first_refused.expect("some flip in the middle of the file hits live data");
    wait_unlocked(&damaged);
    let stderr = refused(work.path(), &damaged);
    let line = error_line(&stderr);
    assert!(line.contains("is corrupt"), "{line}");
    assert!(line.contains("refusing to start"), "{line}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_undamaged_restart_serves_every_instance() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    populate(work.path(), &data, 20);

    let mut node = Node::spawn(work.path(), &data);
    node.wait_leader();
    let client = http();
    let body: Value = poll("service a", Duration::from_secs(30), || {
        let r = client
            .get(format!("{}/services/a?consistent=true", node.url()))
            .send()
            .ok()?;
        r.status().is_success().then(|| r.json().ok()).flatten()
    });
    let mut ports: Vec<u64> = body["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["port"].as_u64().unwrap())
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, (1000..1020).collect::<Vec<u64>>(), "{body}");
    // And it still takes writes.
    let r = client
        .post(format!("{}/register", node.url()))
        .json(&json!({"service_name": "b", "port": 1}))
        .send()
        .unwrap();
    assert!(r.status().is_success());
    node.sigterm();
}

/// A directory of this format that lost its marker looks like the format
/// before it, whose values had no checksums: sealing them again must not
/// produce a database of garbage. The migration's check refuses it, and the
/// directory stays as it was.
#[test]
fn a_data_directory_without_its_marker_is_refused_not_migrated_twice() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    populate(work.path(), &data, 1);
    with_db(&data, |db| {
        db.open_tree("raft").unwrap().remove(b"format").unwrap();
    });
    let stderr = refused(work.path(), &data);
    let line = error_line(&stderr);
    assert!(line.contains("older release"), "{line}");
    assert!(line.contains("cannot be migrated"), "{line}");
    assert!(line.contains("--join"), "{line}");
    let left = names(&data);
    assert!(!left.iter().any(|n| n.starts_with("sled.")), "{left:?}");
}

fn files(dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            files(&e.path(), out);
        } else {
            out.push((e.path(), e.metadata().unwrap().len()));
        }
    }
}

/// A fingerprint of every tree's keys and values, or the read error.
fn digest(db: &sled::Db) -> String {
    use std::hash::{Hash, Hasher};
    let mut out = Vec::new();
    for name in ["raft", "log", "sm", "snapshot"] {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for item in db.open_tree(name).unwrap().iter() {
            match item {
                Ok((k, v)) => (k.as_ref(), v.as_ref()).hash(&mut h),
                Err(e) => return format!("unreadable: {e}"),
            }
        }
        out.push(format!("{name}={:016x}", h.finish()));
    }
    out.join(" ")
}

/// What the library makes of a directory: the check's verdict, and what
/// a plain read of every tree returns.
fn verdict(data: &Path) -> String {
    let data = data.to_path_buf();
    let result = std::panic::catch_unwind(move || {
        let (db, report) = match vertice_register::raft::open_checked(&data) {
            Ok(x) => x,
            Err(e) => return format!("refused: {e}"),
        };
        format!(
            "accepted: {} log entries (last {:?}), {} instances; content {}",
            report.log.entries,
            report.log.last.map(|l| l.index),
            report.state_machine.instances,
            digest(&db)
        )
    });
    result.unwrap_or_else(|_| "PANIC".into())
}

/// The verdict on a copy of `data`, which stays as the binary left it:
/// opening a sled database writes a sled snapshot file (`snap.*`) that
/// changes what a later recovery can detect.
fn verdict_of_copy(work: &Path, data: &Path) -> String {
    let copy = work.join("pristine-copy");
    copy_dir(data, &copy);
    let v = verdict(&copy);
    std::fs::remove_dir_all(&copy).unwrap();
    v
}

/// The experiment behind the comment in `src/raft/integrity.rs`: flip
/// bytes at many offsets of every file sled leaves after writes and a clean
/// stop, and record what opening and checking the copy does. Run with
/// `cargo test --release --test corruption -- --ignored --nocapture`.
#[test]
#[ignore = "an experiment that prints a survey; run by hand"]
fn survey_of_byte_flips_in_sleds_files() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    let n = std::env::var("SURVEY_INSTANCES").map_or(30, |v| v.parse().unwrap());
    populate(work.path(), &data, n);
    let mut all = Vec::new();
    files(&data, &mut all);
    let pristine = verdict_of_copy(work.path(), &data);
    eprintln!("pristine: {pristine}");
    for (path, len) in &all {
        eprintln!(
            "file {} ({len} bytes)",
            path.strip_prefix(&data).unwrap().display()
        );
    }
    for (path, len) in all {
        let rel = path.strip_prefix(&data).unwrap().to_path_buf();
        let bytes = std::fs::read(&path).unwrap();
        // Offsets: 40 spread over the file, and 300 spread over its
        // non-zero bytes.
        let mut offsets: Vec<u64> = (0..40).map(|i| len * i / 40).collect();
        let nonzero: Vec<u64> = bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| **b != 0)
            .map(|(i, _)| i as u64)
            .collect();
        offsets.extend(nonzero.iter().step_by(nonzero.len() / 300 + 1));
        // And the tail: the last bytes written are the likeliest torn write.
        let tail: Vec<u64> = nonzero.iter().rev().take(200).copied().collect();
        offsets.extend(&tail);
        offsets.sort_unstable();
        offsets.dedup();
        let mut tally = std::collections::BTreeMap::<String, Vec<u64>>::new();
        for off in offsets {
            if off >= len {
                continue;
            }
            let trial = work.path().join(format!("trial-{off}"));
            copy_dir(&data, &trial);
            let mut b = bytes.clone();
            for x in b.iter_mut().skip(off as usize).take(4) {
                *x ^= 0xff;
            }
            std::fs::write(trial.join(&rel), b).unwrap();
            let mut v = verdict(&trial);
            if v == pristine {
                v = "accepted, same as pristine".into();
            }
            // Group by verdict, without the numbers that vary.
            let shape: String = v
                .split(|c: char| c.is_ascii_digit())
                .filter(|p| !p.is_empty())
                .collect::<Vec<_>>()
                .join("#");
            let place = if tail.contains(&off) { "tail" } else { "body" };
            tally
                .entry(format!("[{place}] {shape}"))
                .or_default()
                .push(off);
            std::fs::remove_dir_all(&trial).unwrap();
        }
        eprintln!("== {} ==", rel.display());
        for (v, offs) in tally {
            eprintln!(
                "  {} × {v}   (offsets {:?}…{:?})",
                offs.len(),
                &offs[..offs.len().min(4)],
                &offs[offs.len().saturating_sub(3)..]
            );
        }
    }
}
