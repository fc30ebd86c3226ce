//! Times a node's storage at scale without a cluster: fills a data
//! directory with N instances through the state machine (as applied log
//! entries would) and builds a snapshot, or, on an existing directory, does
//! what a starting node does (open sled, verify every record, load the
//! registry) and prints how long each step took and the process's RSS.
//!
//! ```text
//! cargo run --release --example storage_probe -- DIR 1000000   # fill
//! cargo run --release --example storage_probe -- DIR           # start-up
//! ```
//!
//! The instances look like `bench fill`'s: 1,000 services, an address each,
//! two metadata keys. Figures from it are in `docs/benchmarks.md`.

use std::path::PathBuf;
use std::time::Instant;

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::EntryPayload;
use vertice_register::raft::{open_checked, DiskSync, LogStore, StateMachineStore, TypeConfig};
use vertice_register::registry::{Command, Instance};

// The binary's allocator, so that the figures are the node's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_mib() -> f64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / 1048576.0
}

fn instance(i: u64, now: i64) -> Instance {
    let host = format!("10.{}.{}.{}", i / 65536 % 256, i / 256 % 256, i % 256);
    Instance {
        service_name: format!("bench-fill-{}", i % 1000),
        instance_id: format!("{host}:{}", 8000 + i % 1000),
        host,
        port: (8000 + i % 1000) as u16,
        health_endpoint: "/health".into(),
        metadata: [
            ("zone".to_string(), format!("z{}", i % 3)),
            ("version".to_string(), format!("1.0.{}", i % 10)),
        ]
        .into(),
        ttl_seconds: 600,
        registered_at: now,
        last_heartbeat: now,
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(dir) = args.get(1).map(PathBuf::from) else {
        eprintln!("usage: storage_probe DIR [INSTANCES_TO_ADD]");
        std::process::exit(2);
    };
    let add: u64 = match args.get(2).map(|s| s.parse()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(e)) => {
            eprintln!("INSTANCES_TO_ADD: {e}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let (db, mut report) = match open_checked(&dir) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{}: {e}", dir.display());
            std::process::exit(1);
        }
    };
    let _log = LogStore::open(&db, DiskSync::disabled()).expect("log store");
    let mut sm =
        StateMachineStore::open_checked(&db, &dir, DiskSync::disabled(), &mut report.state_machine)
            .expect("state machine");
    println!(
        "start-up: {} instances in {:.0} ms (sled open {:.0} ms, verify and load {:.0} ms), RSS {:.0} MiB",
        sm.replica().read().registry.instance_count(),
        started.elapsed().as_secs_f64() * 1000.0,
        report.open_elapsed.as_secs_f64() * 1000.0,
        report.elapsed.as_secs_f64() * 1000.0,
        rss_mib()
    );
    if add == 0 {
        return;
    }
    let t = Instant::now();
    let first = sm.replica().read().applied_index() + 1;
    let now = 1_800_000_000_000;
    let mut entries = Vec::new();
    for index in first..first + add {
        entries.push(openraft::Entry::<TypeConfig> {
            log_id: openraft::testing::log_id(1, 1, index),
            payload: EntryPayload::Normal(Command::Register {
                instance: instance(index, now),
            }),
        });
        if entries.len() == 1000 || index + 1 == first + add {
            sm.apply(std::mem::take(&mut entries)).await.expect("apply");
        }
    }
    println!(
        "filled {add} in {:.1} s, RSS {:.0} MiB",
        t.elapsed().as_secs_f64(),
        rss_mib()
    );
    let t = Instant::now();
    let mut builder = sm.get_snapshot_builder().await;
    let snap = builder.build_snapshot().await.expect("snapshot");
    println!(
        "snapshot of {} bytes built and stored in {:.0} ms, RSS {:.0} MiB",
        snap.snapshot.get_ref().len(),
        t.elapsed().as_secs_f64() * 1000.0,
        rss_mib()
    );
    db.flush().expect("flush");
    if std::env::var_os("PROBE_CRASH").is_some() {
        // Leave as `kill -9` would: no destructor runs, sled writes no
        // snapshot of its own on the way out.
        std::process::exit(0);
    }

    // What a follower that fell behind does with it: install into an empty
    // directory beside DIR.
    let beside = dir.with_extension("install");
    let _ = std::fs::remove_dir_all(&beside);
    let (fresh, mut fresh_report) = open_checked(&beside).expect("open the install directory");
    let mut follower = StateMachineStore::open_checked(
        &fresh,
        &beside,
        DiskSync::disabled(),
        &mut fresh_report.state_machine,
    )
    .expect("state machine");
    let t = Instant::now();
    let bytes = snap.snapshot.into_inner();
    follower
        .install_snapshot(&snap.meta, Box::new(std::io::Cursor::new(bytes)))
        .await
        .expect("install");
    fresh.flush().expect("flush");
    println!(
        "snapshot installed into an empty directory in {:.0} ms ({} instances), RSS {:.0} MiB",
        t.elapsed().as_secs_f64() * 1000.0,
        follower.replica().read().registry.instance_count(),
        rss_mib()
    );
    drop((follower, fresh));
    let _ = std::fs::remove_dir_all(&beside);
}
