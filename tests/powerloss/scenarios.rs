//! Power loss under write load, on real node processes whose data
//! directories sit on [`LazyFs`]: clients register for a few seconds, the
//! victims are killed with `kill -9` while the load runs, the file system
//! drops everything the victims had not synced, the victims start again on
//! what is left, and every registration that was acknowledged with a `2xx`
//! must be there. The nodes' logs must never show one node leading twice in
//! one term (openraft's leader id is term and node id; see `vote.rs`).
//!
//! Controls, run every time, show that the test can fail: with the file
//! system ignoring `fsync`, and with the node's own syncs turned off
//! (`--unsafe-no-fsync`: sled's flush alone, the code before the syncs),
//! acknowledged writes are lost.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::blocking::{free_ports, http, poll};
use crate::lazyfs::{LazyFs, Mode};

const BIN: &str = env!("CARGO_BIN_EXE_vertice-register");
const SECRET: &str = "powerloss-secret";
/// Long enough that nothing expires during a test.
const TTL: u64 = 86_400;
/// How long a restarted node may take to answer consistent reads.
const READS: Duration = Duration::from_secs(60);

/// Mounts a [`LazyFs`] on a new temporary directory. Where FUSE cannot be
/// used (no `/dev/fuse`, no `fusermount3`), the test is skipped with a
/// message, except in CI (`CI` set), where that is a failure.
pub fn mount(mode: Mode) -> Option<(LazyFs, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    match LazyFs::mount(dir.path(), mode) {
        Ok(fs) => Some((fs, dir)),
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("SKIPPED: cannot mount the test file system ({e}); `.ci/run` installs fuse3");
            None
        }
        Err(e) => panic!("cannot mount the test file system: {e}"),
    }
}

/// Node processes with their data on a [`LazyFs`] and their logs beside
/// it (on the real disk, so a crash does not eat them). Every process still
/// running is killed on drop, before the file system is unmounted.
struct Cluster {
    children: Vec<Option<Child>>,
    ports: Vec<u16>,
    extra: Vec<String>,
    logs: tempfile::TempDir,
    fs: LazyFs,
    _mountpoint: tempfile::TempDir,
}

impl Cluster {
    fn start(fs: LazyFs, mountpoint: tempfile::TempDir, n: usize, extra: &[&str]) -> Self {
        let mut c = Self {
            children: (0..n).map(|_| None).collect(),
            ports: free_ports(n),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            logs: tempfile::tempdir().unwrap(),
            fs,
            _mountpoint: mountpoint,
        };
        for id in 1..=n {
            c.spawn(id);
        }
        c
    }

    fn n(&self) -> usize {
        self.ports.len()
    }

    fn data_dir(&self, id: usize) -> PathBuf {
        self.fs.path().join(format!("node{id}"))
    }

    fn log_path(&self, id: usize) -> PathBuf {
        self.logs.path().join(format!("node{id}.log"))
    }

    fn url(&self, id: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[id - 1])
    }

    fn spawn(&mut self, id: usize) {
        let peers = self
            .ports
            .iter()
            .enumerate()
            .map(|(i, port)| format!("{}=127.0.0.1:{port}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(id))
            .unwrap();
        let mut cmd = Command::new(BIN);
        cmd.args(["node", "--id", &id.to_string()])
            .args(["--addr", &format!("127.0.0.1:{}", self.ports[id - 1])])
            .arg("--data-dir")
            .arg(self.data_dir(id))
            .args(["--peers", &peers]);
        if self.n() > 1 {
            cmd.args(["--cluster-secret", SECRET]);
        }
        let child = cmd
            .args(&self.extra)
            .env("RUST_LOG", "warn,vertice_register::node=info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children[id - 1] = Some(child);
    }

    /// `kill -9`, and waits until the process is gone (its files closed).
    fn kill9(&mut self, id: usize) {
        if let Some(mut c) = self.children[id - 1].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the node's process has exited by itself (a refused start).
    fn exited(&mut self, id: usize) -> Option<std::process::ExitStatus> {
        self.children[id - 1]
            .as_mut()
            .and_then(|c| c.try_wait().unwrap())
    }

    fn log(&self, id: usize) -> String {
        std::fs::read_to_string(self.log_path(id)).unwrap_or_default()
    }

    fn health(&self, client: &reqwest::blocking::Client, id: usize) -> Option<Value> {
        let r = client.get(format!("{}/health", self.url(id))).send().ok()?;
        r.status().is_success().then(|| r.json().ok()).flatten()
    }

    /// The leader, once every running node names the same live one (itself
    /// running, and saying it leads); or the
    /// first node that exited by itself, with its log.
    fn wait_for_leader(&mut self, timeout: Duration) -> Result<usize, String> {
        let client = http();
        let deadline = Instant::now() + timeout;
        loop {
            for id in 1..=self.n() {
                if let Some(status) = self.exited(id) {
                    return Err(format!(
                        "node {id} exited ({status}) after the crash:\n{}",
                        tail(&self.log(id), 15)
                    ));
                }
            }
            let running: Vec<usize> = (1..=self.n())
                .filter(|id| self.children[id - 1].is_some())
                .collect();
            let views: Vec<Option<u64>> = running
                .iter()
                .map(|&id| {
                    self.health(&client, id)
                        .and_then(|h| h["leader_id"].as_u64())
                })
                .collect();
            if let Some(Some(l)) = views.first() {
                let leader = *l as usize;
                let is_leader = self
                    .health(&client, leader)
                    .is_some_and(|h| h["role"] == "leader");
                if views.iter().all(|v| *v == Some(*l)) && is_leader {
                    return Ok(leader);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no leader within {timeout:?}: views {views:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Leaderships won twice: a node's log naming itself leader in a term
    /// in which it had led before. openraft's leader id is (term, node id),
    /// so two nodes may lead in one term; one node winning the same term
    /// twice means it voted twice, and two leaders with one id would write
    /// conflicting entries under the same log ids. The one exception is the
    /// same leadership resumed: a node that restarts with its vote for
    /// itself (openraft restores a leader at start-up) names itself leader
    /// of that term first thing in its new run.
    fn repeated_leaderships(&self) -> Vec<(usize, u64)> {
        let mut repeated = Vec::new();
        for id in 1..=self.n() {
            let mut won = BTreeSet::new();
            let mut last_won = None;
            let mut first_in_run = true;
            for line in self.log(id).lines() {
                if line.contains("data directory verified") {
                    first_in_run = true;
                    continue;
                }
                if !line.contains("leader changed") {
                    continue;
                }
                let leader = field(line, "leader=Some(")
                    .and_then(|v| v.trim_end_matches(')').parse::<usize>().ok());
                let term = field(line, "term=").and_then(|v| v.parse::<u64>().ok());
                let resumed = first_in_run && term.is_some() && last_won == term;
                first_in_run = false;
                if let (Some(leader), Some(term)) = (leader, term) {
                    if leader == id {
                        if !won.insert(term) && !resumed {
                            repeated.push((id, term));
                        }
                        last_won = Some(term);
                    }
                }
            }
        }
        repeated
    }

    /// How many times some node's log says it became leader.
    fn leaderships(&self) -> usize {
        (1..=self.n())
            .map(|id| {
                let me = format!("leader=Some({id})");
                self.log(id)
                    .lines()
                    .filter(|l| l.contains("leader changed") && l.contains(&me))
                    .count()
            })
            .sum()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in 1..=self.n() {
            self.kill9(id);
        }
    }
}

/// The value after `key` in a log line, up to the next space.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(key)? + key.len();
    line[at..].split_whitespace().next()
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Clients registering instances as fast as the cluster acknowledges them,
/// each on its own service, spread over the given nodes. Records every
/// registration answered with a `2xx`.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(String, String)>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(urls: Vec<String>, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|t| {
                let (stop, acked, urls) = (stop.clone(), acked.clone(), urls.clone());
                std::thread::spawn(move || {
                    let client = http();
                    let service = format!("pl-{t}");
                    let mut port: u32 = 0;
                    while !stop.load(Ordering::Relaxed) && port < 65_535 {
                        port += 1;
                        let url = &urls[(t + port as usize) % urls.len()];
                        let body = json!({
                            "service_name": service, "host": "10.9.0.1",
                            "port": port, "ttl_seconds": TTL,
                        });
                        match client.post(format!("{url}/register")).json(&body).send() {
                            Ok(r) if r.status().is_success() => acked
                                .lock()
                                .unwrap()
                                .push((service.clone(), format!("10.9.0.1:{port}"))),
                            // A node down or without a leader: try again a
                            // little later, not in a tight loop.
                            _ => std::thread::sleep(Duration::from_millis(20)),
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            acked,
            threads,
        }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until at least `n` registrations were acknowledged.
    fn wait_for(&self, n: usize, timeout: Duration) {
        poll(&format!("{n} acknowledged registrations"), timeout, || {
            (self.count() >= n).then_some(())
        });
    }

    fn finish(self) -> Vec<(String, String)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// The instance ids of each service that `node` holds, read through a
/// consistent read (so the leader confirms it is current).
fn instances_on(
    client: &reqwest::blocking::Client,
    url: &str,
    services: &BTreeSet<String>,
) -> Result<BTreeSet<(String, String)>, String> {
    let mut out = BTreeSet::new();
    for s in services {
        let r = client
            .get(format!("{url}/services/{s}?consistent=true"))
            .send()
            .map_err(|e| e.to_string())?;
        let status = r.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            continue;
        }
        if !status.is_success() {
            return Err(format!("GET /services/{s}: {status}"));
        }
        let v: Value = r.json().map_err(|e| e.to_string())?;
        for i in v["instances"].as_array().into_iter().flatten() {
            out.insert((s.clone(), i["instance_id"].as_str().unwrap().to_string()));
        }
    }
    Ok(out)
}

/// Which nodes lose power.
#[derive(Debug, Clone, Copy)]
pub enum Victims {
    Leader,
    All,
}

/// What one power cut did.
#[derive(Debug)]
pub struct Outcome {
    pub acked: usize,
    /// Acknowledged registrations that the cluster no longer has.
    pub missing: usize,
    /// Set when a victim refused to start again (its log's last lines).
    pub refused: Option<String>,
    /// (node, term) where a node led twice in one term.
    pub repeated: Vec<(usize, u64)>,
    /// Elections won, as the nodes' logs tell.
    pub leaderships: usize,
    pub bytes_dropped: u64,
}

/// Starts `n` nodes on a fresh [`LazyFs`] in `mode`, with `extra` flags,
/// loads them with registrations, cuts the power of `victims` under load,
/// restarts them and counts what is missing. `None` when FUSE is missing
/// outside CI.
pub fn power_cut(n: usize, victims: Victims, mode: Mode, extra: &[&str]) -> Option<Outcome> {
    let (fs, mnt) = mount(mode)?;
    let started = Instant::now();
    let mut c = Cluster::start(fs, mnt, n, extra);
    let leader = c
        .wait_for_leader(Duration::from_secs(30))
        .expect("the cluster starts");
    let urls = (1..=n).map(|id| c.url(id)).collect();
    let load = Load::start(urls, 2 * n + 2);
    // Enough to fill several of sled's buffers, and past its periodic
    // flusher's fsync (every second).
    load.wait_for(300, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(1500));
    let victims: Vec<usize> = match victims {
        Victims::Leader => vec![leader],
        Victims::All => (1..=n).collect(),
    };
    for &id in &victims {
        c.kill9(id);
    }
    let before_crash = Instant::now();
    let mut bytes_dropped = 0;
    for &id in &victims {
        bytes_dropped += c.fs.crash(&c.data_dir(id)).bytes_dropped;
    }
    if victims.len() < n {
        // The survivors go on acknowledging writes while the victim is
        // down: those must survive its return too.
        let _ = c.wait_for_leader(Duration::from_secs(30));
        let more = load.count() + 100;
        load.wait_for(more, Duration::from_secs(60));
    }
    let acked = load.finish();
    for &id in &victims {
        c.spawn(id);
    }
    let mut outcome = Outcome {
        acked: acked.len(),
        missing: 0,
        refused: None,
        repeated: Vec::new(),
        leaderships: 0,
        bytes_dropped,
    };
    match c.wait_for_leader(Duration::from_secs(60)) {
        Err(why) => outcome.refused = Some(why),
        Ok(_) => {
            let services: BTreeSet<String> = acked.iter().map(|(s, _)| s.clone()).collect();
            let acked: BTreeSet<(String, String)> = acked.into_iter().collect();
            let client = http();
            // Every node, once it has caught up, must hold every
            // acknowledged registration; a consistent read waits for that.
            for id in 1..=n {
                let held = poll(&format!("node {id} to answer reads"), READS, || {
                    instances_on(&client, &c.url(id), &services).ok()
                });
                let missing = acked.difference(&held).count();
                outcome.missing = outcome.missing.max(missing);
            }
        }
    }
    outcome.repeated = c.repeated_leaderships();
    outcome.leaderships = c.leaderships();
    eprintln!(
        "power cut of {victims:?} of {n} node(s), {mode:?} {extra:?}: {} acknowledged, {} missing, {} bytes dropped; {} elections won, none twice by a node in one term: {}; restart {:?} after the crash; {} fsyncs in all; {:.1} s",
        outcome.acked,
        outcome.missing,
        outcome.bytes_dropped,
        outcome.leaderships,
        outcome.repeated.is_empty(),
        before_crash.elapsed(),
        c.fs.stats().fsyncs,
        started.elapsed().as_secs_f64(),
    );
    if let Some(r) = &outcome.refused {
        eprintln!("refused to start: {r}");
    }
    Some(outcome)
}

fn assert_nothing_lost(o: &Outcome) {
    assert!(o.refused.is_none(), "a node refused to start: {o:?}");
    assert_eq!(o.missing, 0, "acknowledged registrations lost: {o:?}");
    assert!(o.repeated.is_empty(), "a node led twice in one term: {o:?}");
    assert!(
        o.leaderships >= 2,
        "the logs do not show the elections: {o:?}"
    );
    assert!(o.acked > 0);
}

/// Extra node flags for the scenarios that must lose nothing, from
/// `POWERLOSS_NODE_ARGS`: `POWERLOSS_NODE_ARGS=--unsafe-no-fsync` runs them
/// against a node without its syncs, where they must fail.
fn node_args() -> Vec<String> {
    std::env::var("POWERLOSS_NODE_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

fn must_lose_nothing(n: usize, victims: Victims) {
    let args = node_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if let Some(o) = power_cut(n, victims, Mode::Honest, &args) {
        assert_nothing_lost(&o);
    }
}

#[test]
fn one_node_loses_power_under_load_and_keeps_every_acknowledged_write() {
    must_lose_nothing(1, Victims::All);
}

#[test]
fn the_leader_loses_power_under_load_and_no_acknowledged_write_is_lost() {
    must_lose_nothing(3, Victims::Leader);
}

#[test]
fn all_three_nodes_lose_power_at_once_and_no_acknowledged_write_is_lost() {
    must_lose_nothing(3, Victims::All);
}

/// Control: a file system that ignores `fsync` keeps nothing, so the test
/// must see acknowledged writes go (or the node refuse what is left).
#[test]
fn control_a_disk_that_ignores_fsync_loses_acknowledged_writes() {
    if let Some(o) = power_cut(1, Victims::All, Mode::IgnoreFsync, &[]) {
        assert!(
            o.missing > 0 || o.refused.is_some(),
            "the test cannot see lost writes: {o:?}"
        );
    }
}

/// Control: the node without its syncs (`--unsafe-no-fsync`, sled's flush
/// alone, as before they existed) loses acknowledged writes on power loss.
/// sled's own flusher fsyncs once a second, so a cut right after it could
/// lose nothing: up to three tries.
#[test]
fn control_without_the_nodes_fsyncs_acknowledged_writes_are_lost() {
    for attempt in 1..=3 {
        let Some(o) = power_cut(1, Victims::All, Mode::Honest, &["--unsafe-no-fsync"]) else {
            return;
        };
        if o.missing > 0 || o.refused.is_some() {
            return;
        }
        eprintln!("attempt {attempt}: nothing lost this time: {o:?}");
    }
    panic!("three power cuts of a node without fsync lost nothing: the test does not bite");
}
