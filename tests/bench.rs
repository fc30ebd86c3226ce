//! `vertice-register bench` against a real one-node cluster (the binary):
//! every workload for about a second, the JSON report's fields, the probes,
//! and that a workload removes what it wrote.

mod blocking;

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use blocking::{http, poll};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vertice-register");

/// A one-node cluster of the real binary, killed on drop.
struct Node {
    _dir: tempfile::TempDir,
    child: Child,
    url: String,
}

impl Node {
    fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(BIN)
            .args(["node", "--addr", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let client = http();
        poll("the node to be healthy", Duration::from_secs(30), || {
            let r = client.get(format!("{url}/health")).send().ok()?;
            r.status().is_success().then_some(())
        });
        Self {
            _dir: dir,
            child,
            url,
        }
    }

    fn bench(&self, args: &[&str]) -> Output {
        let out = Command::new(BIN)
            .args(["bench", "--targets", &self.url])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bench {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn services(&self) -> Vec<String> {
        http()
            .get(format!("{}/services", self.url))
            .send()
            .unwrap()
            .json()
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Checks one workload's report: it did work, without errors, and its
/// figures are ordered.
fn check(r: &Value, workload: &str, clients: u64) {
    assert_eq!(r["workload"], workload, "{r}");
    assert_eq!(r["clients"], clients, "{r}");
    assert!(r["ops"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["errors"], 0, "{r}");
    assert!(r["first_error"].is_null(), "{r}");
    let f = |k: &str| r[k].as_f64().unwrap();
    assert!(f("seconds") > 0.0, "{r}");
    assert!(f("ops_per_sec") > 0.0, "{r}");
    assert!(0.0 < f("p50_ms") && f("p50_ms") <= f("p99_ms"), "{r}");
    assert!(f("p99_ms") <= f("max_ms"), "{r}");
}

#[test]
fn every_workload_reports_sane_figures_and_cleans_up() {
    let node = Node::start();
    let workloads = [
        "lookup",
        "consistent-lookup",
        "list",
        "heartbeat",
        "heartbeat-cold",
        "mixed",
        "register",
    ];
    let out = node.bench(&[
        "--clients",
        "2",
        "--seconds",
        "1",
        "--json",
        "--workloads",
        &workloads.join(","),
    ]);
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(report["backend"], "registry");
    assert_eq!(report["clients"], 2);
    assert_eq!(report["targets"][0], node.url.as_str());
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), workloads.len());
    for (r, w) in results.iter().zip(workloads) {
        check(r, w, 2);
    }
    // Every bench- service the workloads wrote is gone again.
    let left: Vec<String> = node
        .services()
        .into_iter()
        .filter(|s| s.starts_with("bench-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn get_workload_and_lines_for_people() {
    let node = Node::start();
    let out = Command::new(BIN)
        .args(["bench", "--targets", &format!("{}/health", node.url)])
        .args(["--clients", "2", "--seconds", "0.5", "--workloads", "get"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout(&out);
    assert!(line.starts_with("get "), "{line}");
    assert!(
        line.contains("ops/s=") && line.contains("errors=0"),
        "{line}"
    );
}

#[test]
fn probes_fill_leader_index_ready() {
    let node = Node::start();
    let out = node.bench(&["--clients", "4", "--json", "fill", "--count", "40"]);
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let fill = &report["results"][0];
    check(fill, "fill", 4);
    assert_eq!(fill["ops"], 40);
    // 40 instances over min(40, 100) services.
    let filled = node
        .services()
        .into_iter()
        .filter(|s| s.starts_with("bench-fill-"))
        .count();
    assert_eq!(filled, 40);

    assert_eq!(stdout(&node.bench(&["leader"])).trim(), node.url);
    let index: u64 = stdout(&node.bench(&["index"])).trim().parse().unwrap();
    // 4 clients: at most 4 registrations share an entry (group commit).
    assert!(index >= 10, "index {index}");
    let ms: f64 =
        stdout(&node.bench(&["ready", "--min-index", &index.to_string(), "--with-leader"]))
            .trim()
            .parse()
            .unwrap();
    assert!((0.0..30_000.0).contains(&ms), "ready after {ms} ms");
    let json: Value = serde_json::from_str(&stdout(&node.bench(&["--json", "index"]))).unwrap();
    assert!(json["index"].as_u64().unwrap() >= index);

    // A read at an index the node has not reached is not ready.
    let out = Command::new(BIN)
        .args(["bench", "--targets", &node.url, "ready", "--min-index"])
        .arg((index + 1_000_000).to_string())
        .args(["--wait-secs", "1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not ready"));
}

#[cfg(not(feature = "etcd"))]
#[test]
fn etcd_backend_says_how_to_build_it() {
    let out = Command::new(BIN)
        .args([
            "bench",
            "--backend",
            "etcd",
            "--targets",
            "http://127.0.0.1:1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--features etcd"));
}

/// Three nodes: `bench failover` kills the leader and times the next write
/// through the survivors.
#[test]
fn failover_probe_kills_the_leader_and_times_the_next_write() {
    let ports: Vec<u16> = {
        let ls: Vec<TcpListener> = (0..3)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        ls.iter().map(|l| l.local_addr().unwrap().port()).collect()
    };
    let peers = (1..=3)
        .map(|id| format!("{id}=127.0.0.1:{}", ports[id - 1]))
        .collect::<Vec<_>>()
        .join(",");
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Child> = (1..=3)
        .map(|id| {
            Command::new(BIN)
                .args(["node", "--id", &id.to_string()])
                .args(["--addr", &format!("127.0.0.1:{}", ports[id - 1])])
                .arg("--data-dir")
                .arg(dir.path().join(format!("n{id}")))
                .args(["--peers", &peers, "--cluster-secret", "bench-test"])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let urls: Vec<String> = ports
        .iter()
        .map(|p| format!("http://127.0.0.1:{p}"))
        .collect();
    let run = |targets: &[String], args: &[&str]| {
        Command::new(BIN)
            .args(["bench", "--targets", &targets.join(",")])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&urls, &["leader"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let leader = stdout(&out).trim().to_owned();
    let i = urls.iter().position(|u| *u == leader).unwrap();
    let survivors: Vec<String> = urls.iter().filter(|u| **u != leader).cloned().collect();
    let pid = nodes[i].id().to_string();
    let out = run(&survivors, &["failover", "--kill-pid", &pid]);
    let ok = out.status.success();
    let ms: f64 = stdout(&out).trim().parse().unwrap_or(-1.0);
    for n in &mut nodes {
        let _ = n.kill();
        let _ = n.wait();
    }
    assert!(ok, "{}", String::from_utf8_lossy(&out.stderr));
    assert!((1.0..30_000.0).contains(&ms), "failover after {ms} ms");
}

/// `fleet`, open loop: 200 instances renewed every second for 3 s, every
/// heartbeat answered, none missing at the end, and the fleet services gone
/// afterwards.
#[test]
fn fleet_workload_renews_every_instance_on_schedule_and_cleans_up() {
    let node = Node::start();
    let out = node.bench(&[
        "--json",
        "--workloads",
        "fleet",
        "--seconds",
        "3",
        "--fleet-instances",
        "200",
        "--fleet-services",
        "7",
        "--fleet-period-secs",
        "1",
        "--max-in-flight",
        "64",
    ]);
    let report: Value = serde_json::from_str(&stdout(&out)).unwrap();
    let r = &report["results"][0];
    check(r, "fleet", 64);
    let f = &r["fleet"];
    assert_eq!(f["instances"], 200, "{f}");
    assert_eq!(f["services"], 7, "{f}");
    assert_eq!(f["period_secs"], 1.0, "{f}");
    assert_eq!(f["ttl_seconds"], 10, "{f}");
    assert_eq!(f["max_in_flight"], 64, "{f}");
    assert_eq!(f["offered_per_sec"], 200.0, "{f}");
    // Three periods of 200 instances, each heartbeat answered.
    assert_eq!(f["scheduled"], 600, "{f}");
    assert_eq!(r["ops"], 600, "{r}");
    let achieved = f["achieved_per_sec"].as_f64().unwrap();
    assert_eq!(achieved, r["ops_per_sec"].as_f64().unwrap());
    // 600 answers over a run of 3 s plus the last answers' latency.
    assert!((100.0..=201.0).contains(&achieved), "{f}");
    assert_eq!(f["missing"], 0, "{f}");
    // One node: it became the leader before the run, never again.
    assert_eq!(f["leader_changes"], 0, "{f}");
    assert!(f["register_seconds"].as_f64().unwrap() > 0.0, "{f}");
    assert!(f["max_send_lag_ms"].as_f64().unwrap() >= 0.0, "{f}");
    // The node's CPU over the run, from its process_cpu_seconds_total.
    let cpu = f["node_cpu_seconds"].as_f64().unwrap();
    let per = f["cpu_ms_per_heartbeat"].as_f64().unwrap();
    assert!(cpu > 0.0 && (per - cpu * 1e3 / 600.0).abs() < 1e-9, "{f}");
    let left: Vec<String> = node
        .services()
        .into_iter()
        .filter(|s| s.starts_with("bench-fleet-"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn fleet_flags_are_checked() {
    for (flag, value, says) in [
        ("--fleet-period-secs", "0", "--fleet-period-secs"),
        ("--fleet-period-secs", "-1", "--fleet-period-secs"),
        ("--fleet-period-secs", "NaN", "--fleet-period-secs"),
        ("--fleet-period-secs", "100000", "too long"),
        ("--fleet-instances", "0", "--fleet-instances"),
        ("--fleet-services", "20000", "--fleet-services"),
        ("--max-in-flight", "0", "--max-in-flight"),
        ("--seconds", "inf", "--seconds"),
        ("--fleet-ttl-secs", "4", "--fleet-ttl-secs"),
        ("--fleet-ttl-secs", "86401", "--fleet-ttl-secs"),
        // The default period is 30 s: a TTL of 30 s would expire instances
        // between their heartbeats.
        ("--fleet-ttl-secs", "30", "must be longer than the period"),
    ] {
        let out = Command::new(BIN)
            .args(["bench", "--targets", "http://127.0.0.1:1", "--workloads"])
            .args(["fleet", &format!("{flag}={value}")])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} accepted");
        assert!(err.contains(says), "{flag} {value}: {err}");
        assert!(!err.contains("panicked"), "{flag} {value}: {err}");
    }
}
