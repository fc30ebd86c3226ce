//! Integration tests against an in-process cluster of three real nodes.

mod common;

use std::time::{Duration, Instant};

use common::{wait_for, TestCluster};
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_through_a_follower_is_read_on_every_node() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_for_leader().await;
    let follower = c.follower_of(leader);

    let stored = c.register(follower, "osint_service", 8049).await;
    assert_eq!(stored["service_name"], "osint_service");
    assert_eq!(stored["instance_id"], "10.1.2.3:8049");
    assert_eq!(stored["health_endpoint"], "/health");
    assert_eq!(stored["ttl_seconds"], 60);
    assert!(stored["registered_at"].as_str().unwrap().ends_with('Z'));

    for id in c.running() {
        // A consistent read sees the acknowledged write at once, anywhere.
        let (status, headers, body) = c.get(id, "/services/osint_service?consistent=true").await;
        assert_eq!(status, StatusCode::OK, "node {id}: {body}");
        assert_eq!(body["url"], "http://10.1.2.3:8049");
        assert_eq!(body["instances"].as_array().unwrap().len(), 1);
        for h in [
            "x-registry-index",
            "x-registry-known-leader",
            "x-registry-last-contact",
        ] {
            assert!(headers.contains_key(h), "node {id} lacks {h}");
        }
        // A default read is local and catches up promptly.
        c.wait_for_service(id, "osint_service").await;
    }

    // A second instance, then the list.
    c.register(leader, "osint_service", 8050).await;
    c.register(follower, "nmap_service", 8047).await;
    let (status, _, list) = c.get(follower, "/services?consistent=true").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list, json!(["nmap_service", "osint_service"]));

    // Heartbeats: known → 200, unknown service or instance → 404.
    let (s, _) = c
        .post(
            follower,
            "/heartbeat",
            &json!({"service_name": "osint_service"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = c
        .post(follower, "/heartbeat", &json!({"service_name": "nope"}))
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");
    let (s, _) = c
        .post(
            follower,
            "/heartbeat",
            &json!({"service_name": "osint_service", "instance_id": "x:1"}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Deregister one instance, then the whole service; unknown → 404.
    let (s, _) = c
        .delete(
            follower,
            "/deregister/osint_service?instance_id=10.1.2.3:8049",
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (_, _, body) = c
        .get(leader, "/services/osint_service?consistent=true")
        .await;
    assert_eq!(body["instances"].as_array().unwrap().len(), 1);
    let (s, _) = c.delete(follower, "/deregister/osint_service").await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = c.delete(follower, "/deregister/osint_service").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _, _) = c
        .get(follower, "/services/osint_service?consistent=true")
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    let (s, _, health) = c.get(follower, "/health").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["role"], "follower");
    assert_eq!(health["leader_id"], leader);
    assert_eq!(health["members"], json!([1, 2, 3]));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_4xx_and_changes_nothing() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_for_leader().await;
    let node = c.follower_of(leader);
    c.register(node, "keep", 1).await;
    let (_, before, _) = c.get(node, "/services?consistent=true").await;
    let index_before = before["x-registry-index"].clone();

    let cases: Vec<(Value, &str)> = vec![
        (json!({"port": 80}), "service_name"),
        (json!({"service_name": "", "port": 80}), "service_name"),
        (
            json!({"service_name": "bad name", "port": 80}),
            "service_name",
        ),
        (
            json!({"service_name": "x".repeat(129), "port": 80}),
            "service_name",
        ),
        (json!({"service_name": 42, "port": 80}), "service_name"),
        (json!({"service_name": "a"}), "port"),
        (json!({"service_name": "a", "port": 0}), "port"),
        (json!({"service_name": "a", "port": 70000}), "port"),
        (json!({"service_name": "a", "port": "80"}), "port"),
        (json!({"service_name": "a", "port": -1}), "port"),
        (
            json!({"service_name": "a", "port": 80, "ttl_seconds": 1}),
            "ttl_seconds",
        ),
        (
            json!({"service_name": "a", "port": 80, "metadata": {"k": 1}}),
            "metadata",
        ),
        (
            json!({"service_name": "a", "port": 80, "metadata": [1]}),
            "metadata",
        ),
        (
            json!({"service_name": "a", "port": 80, "host": "a b"}),
            "host",
        ),
        (
            json!({"service_name": "a", "port": 80, "health_endpoint": 5}),
            "health_endpoint",
        ),
        (
            json!({"service_name": "a", "port": 80, "instance_id": ""}),
            "instance_id",
        ),
        (json!([]), "body"),
        (json!("text"), "body"),
    ];
    for (body, field) in cases {
        let (status, err) = c.post(node, "/register", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {err}");
        assert_eq!(err["error"], "invalid_request", "{body}");
        assert_eq!(err["field"], field, "{body} → {err}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (s, _) = c
        .post(node, "/heartbeat", &json!({"service_name": "bad/name"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, _) = c.get(node, "/services/bad%20name").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, _) = c.get(node, "/services?consistent=maybe").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = c.delete(node, "/deregister/keep?instance_id=").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);

    let raw = |body: &'static str, ctype: Option<&'static str>| {
        let mut req = c.http.post(format!("{}/register", c.url(node))).body(body);
        if let Some(t) = ctype {
            req = req.header("content-type", t);
        }
        req.send()
    };
    let malformed = raw("{\"service_name\": \"a\", ", Some("application/json"))
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let not_json = raw(
        "service_name=a&port=1",
        Some("application/x-www-form-urlencoded"),
    )
    .await
    .unwrap();
    assert_eq!(not_json.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        not_json.json::<Value>().await.unwrap()["error"],
        "unsupported_media_type"
    );
    let no_type = raw("{}", None).await.unwrap();
    assert_eq!(no_type.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let big = json!({"service_name": "a", "port": 80, "metadata": {"k": "v".repeat(100_000)}});
    let (s, err) = c.post(node, "/register", &big).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(err["error"], "payload_too_large");

    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let r = c
        .http
        .post(format!("{}/register", c.url(node)))
        .header("content-type", "application/json")
        .body(deep)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    let r = c
        .http
        .put(format!("{}/register", c.url(node)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"],
        "method_not_allowed"
    );
    let (s, body) = c.delete(node, "/no/such/route").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");

    // The internal routes refuse callers without the cluster secret.
    let r = c
        .http
        .post(format!("{}/raft/vote", c.url(node)))
        .body(vec![0u8; 8])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);

    // Nothing changed: same applied index on a consistent read, same data.
    let (_, after, list) = c.get(node, "/services?consistent=true").await;
    assert_eq!(after["x-registry-index"], index_before);
    assert_eq!(list, json!(["keep"]));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_takes_over_and_the_old_one_catches_up() {
    let mut c = TestCluster::start(3).await;
    let old = c.wait_for_leader().await;
    c.register(c.follower_of(old), "before", 1).await;

    c.stop(old).await;
    let started = Instant::now();
    let new = c.wait_for_leader().await;
    assert_ne!(new, old);
    // Writes through either survivor succeed.
    for id in c.running() {
        c.register(id, &format!("after-{id}"), 2).await;
    }
    eprintln!("new leader {new} after {:?}", started.elapsed());

    c.restart(old).await;
    for name in ["before", "after-1", "after-2", "after-3"] {
        if name != format!("after-{old}") {
            c.wait_for_service(old, name).await;
        }
    }
    let (_, _, health) = c.get(old, "/health").await;
    assert_eq!(health["role"], "follower");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_far_behind_catches_up_by_snapshot() {
    let mut c = TestCluster::start_with(3, |a| a.snapshot_threshold = 20).await;
    let leader = c.wait_for_leader().await;
    let lagging = c.follower_of(leader);
    c.stop(lagging).await;
    let writer = c.running()[0];
    for i in 0..120 {
        c.register(writer, &format!("svc-{i}"), 1000 + i).await;
    }
    let leader = c.wait_for_leader().await;
    // The leader compacts its log past what the stopped node has.
    wait_for(
        "the leader to purge its log",
        Duration::from_secs(20),
        || async {
            let purged = c.node(leader).raft.metrics().borrow().purged;
            purged.is_some_and(|p| p.index > 10).then_some(())
        },
    )
    .await;

    c.restart(lagging).await;
    wait_for(
        "the lagging node to install a snapshot",
        Duration::from_secs(20),
        || async { (c.node(lagging).state.replica.snapshots_installed() >= 1).then_some(()) },
    )
    .await;
    wait_for(
        "all 120 services on the lagging node",
        Duration::from_secs(20),
        || async {
            let (_, _, list) = c.get(lagging, "/services").await;
            (list.as_array().map_or(0, Vec::len) == 120).then_some(())
        },
    )
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consistent_read_cut_off_from_the_majority_is_503() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_for_leader().await;
    let follower = c.follower_of(leader);
    c.register(leader, "seen", 1).await;
    c.wait_for_service(follower, "seen").await;

    // A follower cut off from everyone.
    c.isolate(follower, true);
    let started = Instant::now();
    let (s, headers, body) = c.get(follower, "/services/seen?consistent=true").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "unavailable");
    assert!(headers.contains_key("retry-after"));
    assert!(started.elapsed() < Duration::from_secs(10));
    // Default reads still answer from the local replica, and say so.
    let (s, headers, _) = c.get(follower, "/services/seen").await;
    assert_eq!(s, StatusCode::OK);
    wait_for(
        "the isolated follower to lose its leader",
        Duration::from_secs(10),
        || async {
            let (_, h, _) = c.get(follower, "/services").await;
            (h["x-registry-known-leader"] == "false").then_some(())
        },
    )
    .await;
    assert!(headers.contains_key("x-registry-last-contact"));
    let (s, _) = c
        .post(
            follower,
            "/register",
            &json!({"service_name": "w", "port": 1}),
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    c.isolate(follower, false);

    // The leader itself cut off: it cannot confirm a read index.
    let leader = c.wait_for_leader().await;
    c.isolate(leader, true);
    let (s, _, body) = c.get(leader, "/services?consistent=true").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    c.isolate(leader, false);
    c.wait_for_leader().await;
    let (s, _, _) = c.get(leader, "/services?consistent=true").await;
    assert_eq!(s, StatusCode::OK);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_expires_instances_whose_ttl_ran_out() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_for_leader().await;
    let follower = c.follower_of(leader);
    for (name, port) in [("silent", 1), ("beating", 2)] {
        let (s, body) = c
            .post(
                follower,
                "/register",
                &json!({"service_name": name, "port": port, "ttl_seconds": 5}),
            )
            .await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    let registered = Instant::now();
    // Heartbeat one of them every second through a follower until the other expires.
    wait_for(
        "the silent instance to expire everywhere",
        Duration::from_secs(15),
        || async {
            let (s, _) = c
                .post(follower, "/heartbeat", &json!({"service_name": "beating"}))
                .await;
            assert_eq!(s, StatusCode::OK, "a renewed instance never expires");
            let mut gone = true;
            for id in c.running() {
                let (s, _, _) = c.get(id, "/services/silent").await;
                gone &= s == StatusCode::NOT_FOUND;
            }
            if gone {
                Some(())
            } else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                None
            }
        },
    )
    .await;
    assert!(
        registered.elapsed() >= Duration::from_secs(5),
        "expired before its TTL"
    );
    for id in c.running() {
        let (s, _, _) = c.get(id, "/services/beating").await;
        assert_eq!(s, StatusCode::OK);
    }
    c.shutdown().await;
}

/// A counter's value in a node's `/metrics` text.
fn counter(metrics: &str, name: &str) -> u64 {
    common::metric(metrics, name) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_entries_and_each_gets_its_own_answer() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_for_leader().await;
    let nodes = c.running();
    let mut sent = 0u64;
    // Writes that arrive together go into one entry. Whether they do in a
    // given round depends on timing, so send rounds until one batch formed.
    for round in 0..10u16 {
        let writes = (0..48u16).map(|i| {
            let node = nodes[usize::from(i) % nodes.len()];
            let c = &c;
            async move {
                if i % 8 == 7 {
                    // Mixed in: a deregister of an unknown instance, 404
                    // (answered without a write).
                    let (s, body) = c
                        .delete(node, &format!("/deregister/batch-{round}/nobody-{i}"))
                        .await;
                    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
                } else {
                    let port = 1000 + round * 100 + i;
                    let stored = c.register(node, &format!("batch-{round}"), port).await;
                    assert_eq!(stored["instance_id"], format!("10.1.2.3:{port}"));
                    assert_eq!(stored["port"], port);
                }
            }
        });
        futures::future::join_all(writes).await;
        sent += 42;
        let (s, _, body) = c
            .get(leader, &format!("/services/batch-{round}?consistent=true"))
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["instances"].as_array().unwrap().len(), 42);
        let m = c.metrics(leader).await;
        let commands = counter(&m, "registry_write_commands_total");
        let entries = counter(&m, "registry_write_entries_total");
        assert_eq!(
            commands, sent,
            "every registration went through the leader's queue"
        );
        // Followers pass their writes on in shared calls too.
        let mut calls_fewer_than_writes = false;
        for &f in nodes.iter().filter(|&&n| n != leader) {
            let m = c.metrics(f).await;
            let writes = counter(&m, "registry_forwarded_requests_total{kind=\"register\"}");
            let calls = counter(&m, "registry_forward_duration_seconds_count");
            assert!(
                calls <= writes,
                "node {f}: {calls} calls for {writes} writes"
            );
            calls_fewer_than_writes |= calls < writes;
        }
        if entries < commands && calls_fewer_than_writes {
            c.shutdown().await;
            return;
        }
    }
    panic!("480 concurrent writes never shared an entry and a forwarded call");
}
