//! A small load generator for `scripts/quick-bench.sh`: N concurrent clients
//! spread over every node, one workload, for a fixed time; prints ops/s,
//! p50/p99/max latency and errors. (The full `bench` subcommand is planned.)
//!
//! usage: loadgen URL[,URL..] register|heartbeat|heartbeat-cold|lookup|consistent-lookup|get CLIENTS SECONDS
//!
//! `heartbeat`: each client registers its own instance, then renews it in a
//! loop (through every node in turn, as a fleet of services would).
//! `get`: plain GETs of the given URLs as they are (for the gateway bench).
//! `heartbeat-cold`: each client cycles through 300 instances of its own, so
//! every renewal finds a committed heartbeat older than the ack slack and
//! goes through a (batched) Renew entry, as with the seed's 30 s cadence.

use std::time::{Duration, Instant};

use serde_json::json;

const COLD_INSTANCES: usize = 300;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: loadgen URL[,URL..] register|heartbeat|heartbeat-cold|lookup|consistent-lookup|get CLIENTS SECONDS");
        std::process::exit(2);
    }
    let urls: Vec<String> = args[1].split(',').map(str::to_owned).collect();
    let workload = args[2].clone();
    let clients: usize = args[3].parse().expect("CLIENTS is a number");
    let secs: u64 = args[4].parse().expect("SECONDS is a number");
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()
        .unwrap();
    let per_client = if workload == "heartbeat-cold" {
        COLD_INSTANCES
    } else {
        1
    };
    if workload.starts_with("heartbeat") {
        let mut seeding = Vec::new();
        for c in 0..clients {
            let (http, url) = (http.clone(), urls[c % urls.len()].clone());
            seeding.push(tokio::spawn(async move {
                for k in 0..per_client {
                    let body = json!({"service_name": "bench-heartbeat", "instance_id": format!("i-{c}-{k}"), "port": 1});
                    let r = http.post(format!("{url}/register")).json(&body).send().await.unwrap();
                    assert!(r.status().is_success(), "registering the heartbeat targets failed");
                }
            }));
        }
        for s in seeding {
            s.await.unwrap();
        }
        // Let the registrations' own heartbeats age past the ack slack.
        if per_client > 1 {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    } else if workload != "register" && workload != "get" {
        let r = http
            .post(format!("{}/register", urls[0]))
            .json(&json!({"service_name": "bench-lookup", "port": 1}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "seeding the lookup target failed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, urls, workload) = (http.clone(), urls.clone(), workload.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = 0u64;
            while Instant::now() < deadline {
                let url = &urls[(c + i as usize) % urls.len()];
                let t = Instant::now();
                let resp = match workload.as_str() {
                    "register" => {
                        http.post(format!("{url}/register"))
                            .json(&json!({"service_name": format!("svc-{c}"), "port": 1 + (i % 60000) as u16}))
                            .send()
                            .await
                    }
                    "heartbeat" | "heartbeat-cold" => {
                        let k = i as usize % per_client;
                        http.post(format!("{url}/heartbeat"))
                            .json(&json!({"service_name": "bench-heartbeat", "instance_id": format!("i-{c}-{k}")}))
                            .send()
                            .await
                    }
                    "lookup" => http.get(format!("{url}/services/bench-lookup")).send().await,
                    "get" => http.get(url.as_str()).send().await,
                    _ => {
                        http.get(format!("{url}/services/bench-lookup?consistent=true"))
                            .send()
                            .await
                    }
                };
                match resp {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed());
                    }
                    _ => errors += 1,
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (lat, e) = t.await.unwrap();
        all.extend(lat);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    println!(
        "{workload:<18} clients={clients:<3} ops/s={:>8.0}  p50={:>6.2}ms  p99={:>6.2}ms  max={:>7.2}ms  errors={errors}",
        all.len() as f64 / elapsed,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        all.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
}
