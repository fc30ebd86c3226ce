//! Blocking queries: `?index=N&wait=D` on the read endpoints.

mod common;

use std::time::{Duration, Instant};

use common::{wait_for, TestCluster};
use reqwest::StatusCode;
use serde_json::json;

fn index_of(headers: &reqwest::header::HeaderMap) -> u64 {
    headers["x-registry-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// A GET that reports its status, index, body and how long it took.
async fn timed_get(
    http: &reqwest::Client,
    url: String,
) -> (StatusCode, u64, serde_json::Value, Duration) {
    let started = Instant::now();
    let r = http.get(url).send().await.unwrap();
    let (status, index) = (r.status(), index_of(r.headers()));
    (
        status,
        index,
        r.json().await.unwrap_or_default(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_query_answers_when_its_view_changes_and_not_for_heartbeats() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_for_leader().await;
    let follower = c.follower_of(leader);
    c.register(leader, "web", 80).await;
    c.wait_for_service(follower, "web").await;
    let (_, headers, _) = c.get(follower, "/services/web").await;
    let index = index_of(&headers);

    // Renewals do not count as a change: the wait runs its full course.
    let waiting = tokio::spawn({
        let (http, url) = (
            c.http.clone(),
            format!("{}/services/web?index={index}&wait=2s", c.url(follower)),
        );
        async move { timed_get(&http, url).await }
    });
    for _ in 0..5 {
        let (s, _) = c
            .post(follower, "/heartbeat", &json!({"service_name": "web"}))
            .await;
        assert_eq!(s, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _, body, took) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["instances"].as_array().unwrap().len(), 1);
    assert!(
        took >= Duration::from_secs(2),
        "woke after {took:?} for a heartbeat"
    );

    // A new instance wakes it at once, on a follower, with a newer index.
    let waiting = tokio::spawn({
        let (http, url) = (
            c.http.clone(),
            format!("{}/services/web?index={index}&wait=30s", c.url(follower)),
        );
        async move { timed_get(&http, url).await }
    });
    // A barrier, not a sleep: the node holds the query (its watcher gauge
    // counts it) before anything changes.
    wait_for("the query to be held", Duration::from_secs(10), || async {
        (watchers(&c, follower).await == 1).then_some(())
    })
    .await;
    assert!(!waiting.is_finished(), "answered before anything changed");
    let changed_at = Instant::now();
    c.register(leader, "web", 81).await;
    let (status, new_index, body, _) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(new_index > index);
    assert_eq!(body["instances"].as_array().unwrap().len(), 2);
    // At once means long before the 30 s wait; the bound leaves room for a
    // busy machine (the latency itself is a benchmark's business).
    assert!(
        changed_at.elapsed() < Duration::from_secs(10),
        "took {:?}",
        changed_at.elapsed()
    );

    // Deregistration wakes it too, with a 404.
    let waiting = tokio::spawn({
        let (http, url) = (
            c.http.clone(),
            format!(
                "{}/services/web?index={new_index}&wait=30s",
                c.url(follower)
            ),
        );
        async move { timed_get(&http, url).await }
    });
    // A barrier, not a sleep: the node holds the query (its watcher gauge
    // counts it) before anything changes.
    wait_for("the query to be held", Duration::from_secs(10), || async {
        (watchers(&c, follower).await == 1).then_some(())
    })
    .await;
    assert!(!waiting.is_finished(), "answered before anything changed");
    let (s, _) = c.delete(leader, "/deregister/web").await;
    assert_eq!(s, StatusCode::OK);
    let (status, _, _, took) = waiting.await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(took < Duration::from_secs(5));

    // The list view wakes on a new name; an old index answers at once.
    let (_, headers, _) = c.get(follower, "/services").await;
    let index = index_of(&headers);
    let waiting = tokio::spawn({
        let (http, url) = (
            c.http.clone(),
            format!("{}/services?index={index}&wait=30s", c.url(follower)),
        );
        async move { timed_get(&http, url).await }
    });
    // A barrier, not a sleep: the node holds the query (its watcher gauge
    // counts it) before anything changes.
    wait_for("the query to be held", Duration::from_secs(10), || async {
        (watchers(&c, follower).await == 1).then_some(())
    })
    .await;
    assert!(!waiting.is_finished(), "answered before anything changed");
    c.register(leader, "api", 90).await;
    let (_, _, list, took) = waiting.await.unwrap();
    assert_eq!(list, json!(["api"]));
    assert!(took < Duration::from_secs(5));
    let (_, _, _, took) = timed_get(
        &c.http,
        format!("{}/services?index=0&wait=30s", c.url(follower)),
    )
    .await;
    assert!(
        took < Duration::from_secs(10),
        "an old index waited {took:?}"
    );

    // Bad values are 400s.
    let (s, _, _) = c.get(follower, "/services?index=1&wait=10h").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _, _) = c.get(follower, "/services?index=x").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    c.shutdown().await;
}

async fn watchers(c: &TestCluster, id: u64) -> i64 {
    let text = c.metrics(id).await;
    text.lines()
        .find_map(|l| l.strip_prefix("registry_watchers "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_capped_and_a_cancelled_one_frees_its_slot_at_once() {
    let c = TestCluster::start_with(3, |a| a.max_watchers = 2).await;
    let leader = c.wait_for_leader().await;
    c.register(leader, "web", 80).await;
    let (_, headers, _) = c.get(leader, "/services/web").await;
    let index = index_of(&headers);
    let url = format!("{}/services/web?index={index}&wait=60s", c.url(leader));

    // Two long waits take both slots; a third is refused with 429.
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (http, url) = (c.http.clone(), url.clone());
            tokio::spawn(async move { http.get(url).send().await })
        })
        .collect();
    wait_for("two waiters", Duration::from_secs(5), || async {
        (watchers(&c, leader).await == 2).then_some(())
    })
    .await;
    let r = c.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().contains_key("retry-after"));

    // A client that gives up frees its slot at once, not after 60 s.
    let quitter = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    for h in held {
        h.abort();
    }
    wait_for(
        "the aborted waiters to be gone",
        Duration::from_secs(5),
        || async { (watchers(&c, leader).await == 0).then_some(()) },
    )
    .await;
    // The only acceptable failure is the client's own timeout: a refusal
    // or a reset would mean no slot was granted.
    match quitter.get(&url).send().await {
        Err(e) => assert!(e.is_timeout(), "expected a client-side timeout: {e}"),
        Ok(r) => panic!("expected the wait to be held, got {}", r.status()),
    }
    wait_for(
        "the timed-out waiter to be gone",
        Duration::from_secs(5),
        || async { (watchers(&c, leader).await == 0).then_some(()) },
    )
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_query_never_answers_from_before_its_index() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_for_leader().await;
    let follower = c.follower_of(leader);
    c.register(leader, "web", 80).await;
    c.wait_for_service(follower, "web").await;

    // The follower is cut off; the cluster moves on without it.
    c.isolate(follower, true);
    c.register(leader, "web", 81).await;
    let (_, headers, _) = c.get(leader, "/services/web").await;
    let index = index_of(&headers);

    // A watcher that saw `index` on the leader moves to the cut-off node:
    // it must not be handed the older state there.
    let (status, answered_at, _, took) = timed_get(
        &c.http,
        format!("{}/services/web?index={index}&wait=1s", c.url(follower)),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(answered_at < index, "{answered_at} >= {index}");
    assert!(took >= Duration::from_millis(900), "{took:?}");

    // Healed, the same query is answered (from index on) as usual.
    c.isolate(follower, false);
    let (status, answered_at, body, _) = timed_get(
        &c.http,
        format!(
            "{}/services/web?index={}&wait=5s",
            c.url(follower),
            index - 1
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(answered_at >= index);
    assert_eq!(body["instances"].as_array().unwrap().len(), 2);
}
