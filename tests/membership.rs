//! Cluster membership through `/cluster/*`: replace a dead node without
//! downtime, refuse bad requests, and a removed node stops being a member.

mod common;

use std::time::Duration;

use common::{wait_for, TestCluster};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

fn voters(status: &Value) -> Vec<u64> {
    let mut v: Vec<u64> = status["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["voter"] == json!(true))
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_replaced_without_downtime() {
    let mut c = TestCluster::start(3).await;
    let leader = c.wait_for_leader().await;
    c.register(leader, "before", 1).await;

    // Status through a follower comes from the leader, with every member.
    let follower = c.follower_of(leader);
    let (s, status) = c
        .cluster(follower, Method::GET, "/cluster/status", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{status}");
    assert_eq!(status["leader_id"], json!(leader));
    assert_eq!(voters(&status), vec![1, 2, 3]);
    assert!(status["members"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["reachable"] == json!(true)));

    // Node 3 dies; take it out.
    let dead = if leader == 3 { 2 } else { 3 };
    c.stop(dead).await;
    let alive = c.running()[0];
    let (s, body) = c
        .cluster(
            alive,
            Method::DELETE,
            &format!("/cluster/nodes/{dead}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, _) = c
        .cluster(
            alive,
            Method::DELETE,
            &format!("/cluster/nodes/{dead}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    c.register(alive, "between", 2).await;

    // Node 4, fresh, joins through any node and becomes a voter.
    c.join_new_node(4, alive).await;
    wait_for("node 4 to be a voter", Duration::from_secs(30), || async {
        let (_, st) = c.cluster(alive, Method::GET, "/cluster/status", None).await;
        (voters(&st).contains(&4)).then_some(())
    })
    .await;
    c.wait_for_service(4, "before").await;
    c.wait_for_service(4, "between").await;
    c.register(4, "through-4", 3).await;
    let (_, status) = c.cluster(4, Method::GET, "/cluster/status", None).await;
    let mut expected: Vec<u64> = vec![1, 2, 3, 4]
        .into_iter()
        .filter(|id| *id != dead)
        .collect();
    expected.sort();
    assert_eq!(voters(&status), expected);
    for m in status["members"].as_array().unwrap() {
        assert_eq!(m["reachable"], json!(true), "{m}");
        assert!(m["lag"].as_u64().is_some(), "{m}");
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_membership_requests_are_refused_and_a_removed_node_stops_being_a_member() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_for_leader().await;
    let follower = c.follower_of(leader);

    for (body, field) in [
        (json!({"id": 0, "addr": "127.0.0.1:1"}), "id"),
        (json!({"id": "x", "addr": "127.0.0.1:1"}), "id"),
        (json!({"id": 9, "addr": "nohost"}), "addr"),
        (json!({"id": 9, "addr": "h:0"}), "addr"),
        (json!({"id": leader, "addr": "127.0.0.1:1"}), "id"),
    ] {
        let (s, err) = c
            .cluster(follower, Method::POST, "/cluster/nodes", Some(body.clone()))
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body} → {err}");
        assert_eq!(err["field"], field, "{body} → {err}");
    }
    let (s, _) = c
        .cluster(follower, Method::DELETE, "/cluster/nodes/abc", None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let r = c
        .http
        .get(format!("{}/cluster/status", c.url(follower)))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "the cluster routes need the secret"
    );

    // Remove a live follower: it stops being a member and says it is unhealthy.
    let (s, body) = c
        .cluster(
            leader,
            Method::DELETE,
            &format!("/cluster/nodes/{follower}"),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (_, status) = c
        .cluster(leader, Method::GET, "/cluster/status", None)
        .await;
    assert!(!voters(&status).contains(&follower));
    wait_for(
        "the removed node to report unhealthy",
        Duration::from_secs(10),
        || async {
            let (s, _, _) = c.get(follower, "/health").await;
            (s == StatusCode::SERVICE_UNAVAILABLE).then_some(())
        },
    )
    .await;
    // The remaining two still take writes.
    c.register(leader, "after-removal", 1).await;
    c.shutdown().await;
}
