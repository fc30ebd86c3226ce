//! The data directory's format. `tests/fixtures/data-format-1` is a node's
//! directory of storage format 1, written by this repository's binary on
//! 2026-12-01 (one node, snapshot threshold 3; three live instances, one of
//! them registered the old clients' way, a deregistered service, a
//! heartbeat, a snapshot, a clean stop). Every later release must open it
//! with the same registry: a change to what is stored must migrate this
//! format (and add a fixture of its own), not refuse it. Shown to fail with
//! `FORMAT_VERSION` raised to 2 and no migration: "is in storage format 1,
//! but this release reads format 2".

mod blocking;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use blocking::{copy_dir, free_ports, http, poll};

const BIN: &str = env!("CARGO_BIN_EXE_vertice-register");
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/data-format-1");

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

    // A node starts on it and leads its one-node cluster.
    let port = free_ports(1)[0];
    let mut child = Command::new(BIN)
        .args(["node", "--id", "1", "--addr", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(&dir)
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
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(health["last_applied"].as_u64().unwrap() >= 6, "{health}");
}
