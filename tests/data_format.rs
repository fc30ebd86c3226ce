//! The data directory's format. `tests/fixtures/data-format-1` is a node's
//! directory of storage format 1, written by this repository's binary on
//! 2026-12-01 (one node, snapshot threshold 3; three live instances, one of
//! them registered the old clients' way, a deregistered service, a
//! heartbeat, a snapshot, a clean stop). Every later release must open it
//! with the same registry: a change to what is stored must migrate this
//! format (and add a fixture of its own), not refuse it. Shown to fail with
//! `FORMAT_VERSION` raised to 2 and no migration: "is in storage format 1,
//! but this release reads format 2".
//!
//! `tests/fixtures/data-format-0` is a node's directory of the format
//! before the marker (values without checksums), written by the release
//! before it (commit 368b1c0) on 2026-12-01: one node, snapshot threshold 3;
//! `fixture-payments` at 10.0.0.5:8080 (metadata zone=a, one heartbeat) and
//! 10.0.0.6:8080, `fixture-gone` registered and deregistered,
//! `fixture-search` at 10.0.0.8:7000 (TTL 3600 s); applied index 6, a
//! snapshot at index 5 (in sled, where that release kept it), a clean stop.
//! It is migrated in place on open (`raft::migrate`).

mod blocking;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use blocking::{copy_dir, free_ports, http, names, poll};

const BIN: &str = env!("CARGO_BIN_EXE_vertice-register");
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/data-format-1");
const FIXTURE_0: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/data-format-0");

#[test]
fn a_format_1_directory_opens_with_its_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    copy_dir(Path::new(FIXTURE), &dir);

    let (db, report) = vertice_register::raft::open_checked(&dir).unwrap();
    assert_eq!(report.state_machine.instances, 3);
    assert_eq!(report.state_machine.applied.map(|l| l.index), Some(6));
    assert!(report.state_machine.snapshot.is_some());
    let r = report.state_machine.registry();
    let mut names: Vec<(String, String, String)> = r
        .instances()
        .map(|i| {
            (
                i.service_name.clone(),
                i.host.clone(),
                i.metadata.get("zone").unwrap_or_default().to_string(),
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            (
                "fixture-old-client".to_string(),
                "fixture-host".to_string(),
                String::new()
            ),
            ("fixture-payments".into(), "10.0.0.5".into(), "a".into()),
            ("fixture-payments".into(), "10.0.0.6".into(), String::new()),
        ]
    );
    assert!(r.instances().all(|i| i.service_name != "fixture-gone"));
    drop(db);
    let health = lead_on(&dir)["health"].clone();
    assert!(health["last_applied"].as_u64().unwrap() >= 6, "{health}");
}

/// Starts a node on `dir`, waits for it to lead its one-node cluster, stops
/// it, and returns its `/health`.
fn lead_on(dir: &Path) -> serde_json::Value {
    let port = free_ports(1)[0];
    let mut child = Command::new(BIN)
        .args(["node", "--id", "1", "--addr", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = http();
    let health = poll(
        "the node to lead on the fixture",
        Duration::from_secs(30),
        || {
            let v: serde_json::Value = client
                .get(format!("http://127.0.0.1:{port}/health"))
                .send()
                .ok()?
                .json()
                .ok()?;
            (v["role"] == "leader").then_some(v)
        },
    );
    let services: serde_json::Value = client
        .get(format!("http://127.0.0.1:{port}/services"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    serde_json::json!({"health": health, "services": services})
}

/// What the format-0 fixture holds, read from a check's report.
fn assert_fixture_0(report: &vertice_register::raft::CheckReport) {
    assert_eq!(report.state_machine.instances, 3);
    assert_eq!(report.state_machine.applied.map(|l| l.index), Some(6));
    assert_eq!(
        report.state_machine.snapshot.map(|s| s.0.map(|l| l.index)),
        Some(Some(5))
    );
    let mut found: Vec<(String, String, u32, String)> = report
        .state_machine
        .registry()
        .instances()
        .map(|i| {
            (
                i.service_name.clone(),
                i.instance_id.clone(),
                i.ttl_seconds,
                i.metadata.get("zone").unwrap_or_default().to_string(),
            )
        })
        .collect();
    found.sort();
    let want = [
        ("fixture-payments", "10.0.0.5:8080", 60, "a"),
        ("fixture-payments", "10.0.0.6:8080", 60, ""),
        ("fixture-search", "10.0.0.8:7000", 3600, ""),
    ]
    .map(|(s, i, t, z)| (s.to_string(), i.to_string(), t, z.to_string()));
    assert_eq!(found, want);
}

#[test]
fn a_format_0_directory_is_migrated_in_place_with_its_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    copy_dir(Path::new(FIXTURE_0), &dir);

    let (db, report) = vertice_register::raft::open_checked(&dir).unwrap();
    assert_fixture_0(&report);
    drop(db);
    assert_eq!(names(&dir), ["sled"], "nothing of the migration left");
    // Opened again, it is format 1 already and holds the same.
    let (db, report) = vertice_register::raft::open_checked(&dir).unwrap();
    assert_fixture_0(&report);
    drop(db);

    // A node serves it and takes writes.
    let seen = lead_on(&dir);
    assert!(
        seen["health"]["last_applied"].as_u64().unwrap() >= 6,
        "{seen}"
    );
    let services = seen["services"].to_string();
    assert!(
        services.contains("fixture-payments") && services.contains("fixture-search"),
        "{services}"
    );
    assert!(!services.contains("fixture-gone"), "{services}");
}

/// A crash at each step of the migration (see `raft::migrate`), recreated
/// by hand from the fixture and a migrated copy of it: the next open
/// completes the migration or starts it again, with the whole registry and
/// nothing left over. Shown to fail with `finish_interrupted` doing
/// nothing (between the renames, sled created an empty database and both
/// copies were then removed as leftovers: 0 instances instead of 3) and
/// with `remove_leftovers` doing nothing (`sled.format0` stayed).
#[test]
fn a_migration_interrupted_at_any_step_completes_or_starts_again() {
    let tmp = tempfile::tempdir().unwrap();
    let migrated = tmp.path().join("migrated");
    copy_dir(Path::new(FIXTURE_0), &migrated);
    drop(vertice_register::raft::open_checked(&migrated).unwrap());
    let old_sled = Path::new(FIXTURE_0).join("sled");
    let new_sled = migrated.join("sled");

    // While the copy was built: the old database and a partial copy.
    let during_copy = tmp.path().join("during-copy");
    copy_dir(&old_sled, &during_copy.join("sled"));
    copy_dir(&new_sled, &during_copy.join("sled.migrating"));
    let db_file = during_copy.join("sled.migrating/db");
    let len = std::fs::metadata(&db_file).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db_file)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    // Between the renames: no `sled`, the complete copy and the old one.
    let between_renames = tmp.path().join("between-renames");
    copy_dir(&old_sled, &between_renames.join("sled.format0"));
    copy_dir(&new_sled, &between_renames.join("sled.migrating"));

    // Before the old database was removed.
    let before_removal = tmp.path().join("before-removal");
    copy_dir(&new_sled, &before_removal.join("sled"));
    copy_dir(&old_sled, &before_removal.join("sled.format0"));

    for dir in [during_copy, between_renames, before_removal] {
        let (db, report) = vertice_register::raft::open_checked(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        assert_fixture_0(&report);
        drop(db);
        assert_eq!(names(&dir), ["sled"], "{}", dir.display());
    }
}
