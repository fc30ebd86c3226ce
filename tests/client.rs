//! The async client, auto-registration, watch and the demo service against
//! an in-process three-node cluster.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{get_json, send, wait_for, TestCluster};
use futures::StreamExt;
use reqwest::StatusCode;
use vertice_register::client::{
    auto_register, ClientError, ClientOptions, Registration, RegistryClient,
};

/// A URL where nothing listens: a port bound, then released.
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

fn urls(c: &TestCluster) -> Vec<String> {
    c.addrs.keys().map(|id| c.url(*id)).collect()
}

fn reg(name: &str, port: u16, instance_id: Option<&str>, ttl: u32) -> Registration {
    Registration {
        service_name: name.into(),
        port,
        host: Some("10.9.8.7".into()),
        instance_id: instance_id.map(Into::into),
        ttl_seconds: Some(ttl),
        ..Default::default()
    }
}

/// Instance ids of `name` in a linearizable read; empty if the service is gone.
async fn instance_ids(client: &RegistryClient, name: &str) -> Vec<String> {
    match client.service_consistent(name).await {
        Ok(s) => s.instances.into_iter().map(|i| i.instance_id).collect(),
        Err(ClientError::NotFound(_)) => Vec::new(),
        Err(e) => panic!("consistent read of {name}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_calls_against_a_cluster() {
    let c = TestCluster::start(3).await;
    c.wait_for_leader().await;
    let client = RegistryClient::new(urls(&c)).unwrap();

    let mut r = reg("api", 8080, None, 30);
    r.metadata = BTreeMap::from([("version".to_string(), "1.2.3".to_string())]);
    let inst = client.register(&r).await.unwrap();
    assert_eq!(inst.service_name, "api");
    assert_eq!(inst.instance_id, "10.9.8.7:8080");
    assert_eq!(inst.host, "10.9.8.7");
    assert_eq!(inst.port, 8080);
    assert_eq!(inst.health_endpoint, "/health");
    assert_eq!(inst.ttl_seconds, 30);
    assert_eq!(inst.metadata["version"], "1.2.3");

    let svc = client.service_consistent("api").await.unwrap();
    assert_eq!(svc.service_name, "api");
    assert_eq!(svc.instances.len(), 1);
    assert_eq!(svc.instances[0].instance_id, inst.instance_id);
    // Default reads come from the local replica: poll until it caught up.
    let names = wait_for(
        "api in the local replica",
        Duration::from_secs(15),
        || async {
            let names = client.services().await.unwrap();
            names.contains(&"api".to_string()).then_some(names)
        },
    )
    .await;
    assert_eq!(names, ["api"]);
    assert_eq!(client.service("api").await.unwrap().instances.len(), 1);

    assert_eq!(
        client
            .heartbeat("api", Some("10.9.8.7:8080"))
            .await
            .unwrap(),
        1
    );
    client.register(&reg("api", 8081, None, 30)).await.unwrap();
    assert_eq!(client.heartbeat("api", None).await.unwrap(), 2);

    assert!(matches!(
        client.heartbeat("ghost", None).await,
        Err(ClientError::NotFound(m)) if m.contains("ghost")
    ));
    assert!(matches!(
        client.heartbeat("api", Some("nope:1")).await,
        Err(ClientError::NotFound(_))
    ));
    assert!(matches!(
        client.service("ghost").await,
        Err(ClientError::NotFound(_))
    ));
    assert!(matches!(
        client.service_consistent("ghost").await,
        Err(ClientError::NotFound(_))
    ));
    match client.register(&reg("bad name", 80, None, 30)).await {
        Err(ClientError::BadRequest { field, message }) => {
            assert_eq!(field.as_deref(), Some("service_name"));
            assert!(!message.is_empty());
        }
        other => panic!("expected BadRequest, got {other:?}"),
    }
    assert!(matches!(
        client.register(&reg("api", 80, None, 1)).await,
        Err(ClientError::BadRequest { field: Some(f), .. }) if f == "ttl_seconds"
    ));
    assert!(matches!(
        client.register(&reg("api", 0, None, 30)).await,
        Err(ClientError::BadRequest { field: Some(f), .. }) if f == "port"
    ));

    let health = client.health().await.unwrap();
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["members"].as_array().unwrap().len(), 3);

    // A blocking query against a server that answers at once still
    // returns the view and an index.
    let (view, index) = client
        .wait_service("api", 0, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(view.unwrap().instances.len(), 2);
    assert!(index > 0);
    let (view, index) = client
        .wait_service("ghost", 0, Duration::from_secs(1))
        .await
        .unwrap();
    assert!(view.is_none());
    assert!(index > 0);

    assert_eq!(
        client
            .deregister("api", Some("10.9.8.7:8080"))
            .await
            .unwrap(),
        1
    );
    assert!(matches!(
        client.deregister("api", Some("10.9.8.7:8080")).await,
        Err(ClientError::NotFound(_))
    ));
    assert_eq!(client.deregister("api", None).await.unwrap(), 1);
    assert!(matches!(
        client.deregister("api", None).await,
        Err(ClientError::NotFound(_))
    ));
    assert!(instance_ids(&client, "api").await.is_empty());

    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_over_past_dead_and_stopped_nodes() {
    let mut c = TestCluster::start(3).await;
    c.wait_for_leader().await;
    let dead = dead_url();
    let mut list = vec![dead.clone()];
    list.extend(urls(&c));
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(2),
        retry_budget: Duration::from_secs(20),
        ..Default::default()
    };
    let client = RegistryClient::with_options(list, opts).unwrap();

    client.register(&reg("fo", 1, None, 60)).await.unwrap();
    assert_ne!(
        client.current_url(),
        dead,
        "the client moved off the dead URL"
    );
    assert_eq!(instance_ids(&client, "fo").await, ["10.9.8.7:1"]);

    // Stop the node the client sticks to (it may be the leader).
    let stuck = client.current_url().to_string();
    let id = *c.addrs.keys().find(|id| c.url(**id) == stuck).unwrap();
    c.stop(id).await;

    client.register(&reg("fo", 2, None, 60)).await.unwrap();
    assert_ne!(client.current_url(), stuck);
    assert_ne!(client.current_url(), dead);
    assert_eq!(client.heartbeat("fo", None).await.unwrap(), 2);
    assert_eq!(instance_ids(&client, "fo").await.len(), 2);
    assert!(client.services().await.unwrap().contains(&"fo".into()));

    // With every node gone the client answers Unavailable within its budget.
    let lone = RegistryClient::with_options(
        [dead_url(), dead_url()],
        ClientOptions {
            request_timeout: Duration::from_secs(1),
            retry_budget: Duration::from_millis(500),
            ..Default::default()
        },
    )
    .unwrap();
    let started = Instant::now();
    assert!(matches!(
        lone.services().await,
        Err(ClientError::Unavailable(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(5));

    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_register_runs_standalone_until_the_registry_appears() {
    let mut c = TestCluster::start(3).await;
    c.wait_for_leader().await;
    c.stop(3).await;
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(1),
        retry_budget: Duration::from_secs(1),
        ..Default::default()
    };
    let client = RegistryClient::with_options([dead_url(), dead_url(), c.url(3)], opts).unwrap();
    let auto = auto_register(client.clone(), reg("solo", 7000, None, 10)).await;

    // Standalone: the task keeps trying; nothing is registered for a while.
    assert!(!auto.wait_registered(Duration::from_secs(3)).await);
    assert!(!auto.is_registered());
    assert!(auto.instance().is_none());

    c.restart(3).await;
    assert!(
        auto.wait_registered(Duration::from_secs(60)).await,
        "registered once node 3 is back"
    );
    assert_eq!(auto.instance().unwrap().instance_id, "10.9.8.7:7000");
    let other = RegistryClient::new(urls(&c)).unwrap();
    assert_eq!(instance_ids(&other, "solo").await, ["10.9.8.7:7000"]);

    auto.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_register_registers_again_after_a_404() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_for_leader().await;
    let client = RegistryClient::new(urls(&c)).unwrap();
    // TTL 5 s: a heartbeat every 2.5 s.
    let auto = auto_register(client.clone(), reg("phoenix", 9000, None, 5)).await;
    assert!(auto.wait_registered(Duration::from_secs(20)).await);
    let first = auto.instance().unwrap();

    let (status, body) = c.delete(leader, "/deregister/phoenix").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(instance_ids(&client, "phoenix").await.is_empty());

    // The next heartbeat gets 404 and the task registers again.
    let again = wait_for(
        "phoenix registered again",
        Duration::from_secs(30),
        || async {
            let ids = instance_ids(&client, "phoenix").await;
            (!ids.is_empty()).then_some(ids)
        },
    )
    .await;
    assert_eq!(again, [first.instance_id]);
    assert!(auto.wait_registered(Duration::from_secs(10)).await);

    auto.shutdown().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deregisters_only_its_own_instance() {
    let c = TestCluster::start(3).await;
    c.wait_for_leader().await;
    let client = RegistryClient::new(urls(&c)).unwrap();
    let a = auto_register(client.clone(), reg("pair", 1, Some("a"), 5)).await;
    let b = auto_register(client.clone(), reg("pair", 2, Some("b"), 5)).await;
    assert!(a.wait_registered(Duration::from_secs(20)).await);
    assert!(b.wait_registered(Duration::from_secs(20)).await);
    let mut ids = instance_ids(&client, "pair").await;
    ids.sort();
    assert_eq!(ids, ["a", "b"]);

    a.shutdown().await;
    assert_eq!(instance_ids(&client, "pair").await, ["b"]);
    // b keeps heartbeating on its own: still there after more than its TTL.
    let until = Instant::now() + Duration::from_secs(7);
    while Instant::now() < until {
        assert_eq!(instance_ids(&client, "pair").await, ["b"]);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(b.is_registered());

    b.shutdown().await;
    assert!(instance_ids(&client, "pair").await.is_empty());
    c.shutdown().await;
}

async fn next_item<S: futures::Stream + Unpin>(s: &mut S) -> S::Item {
    tokio::time::timeout(Duration::from_secs(30), s.next())
        .await
        .expect("the watch yields within 30 s")
        .expect("the watch never ends")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_yields_the_first_view_and_changes() {
    let c = TestCluster::start(3).await;
    let leader = c.wait_for_leader().await;
    let client = RegistryClient::new(urls(&c)).unwrap();
    let mut watch = Box::pin(client.watch_service("watched"));

    let first: Result<Option<_>, ClientError> = next_item(&mut watch).await;
    assert!(first.unwrap().is_none(), "the service does not exist yet");

    c.register(leader, "watched", 1).await;
    let seen = next_item(&mut watch)
        .await
        .unwrap()
        .expect("the service now exists");
    assert_eq!(seen.instances.len(), 1);

    c.register(leader, "watched", 2).await;
    let seen = next_item(&mut watch).await.unwrap().unwrap();
    assert_eq!(seen.instances.len(), 2);

    drop(watch);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_service_serves_registers_and_leaves() {
    let c = TestCluster::start(3).await;
    c.wait_for_leader().await;
    let client = RegistryClient::new(urls(&c)).unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap();

    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let demo = vertice_register::demo::serve(l, "demo", urls(&c), 5).await;
    let base = format!("http://{}", demo.addr);
    assert_eq!(demo.instance_id(), demo.addr.to_string());
    assert!(
        demo.registration()
            .unwrap()
            .wait_registered(Duration::from_secs(20))
            .await
    );
    let svc = client.service_consistent("demo").await.unwrap();
    assert_eq!(svc.instances.len(), 1);
    assert_eq!(svc.instances[0].host, "127.0.0.1");
    assert_eq!(svc.instances[0].port, demo.addr.port());
    assert_eq!(svc.instances[0].instance_id, demo.instance_id());

    let (_, _, health) = get_json(&http, &format!("{base}/health")).await;
    assert_eq!(health["status"], "ok");
    assert_eq!(health["service"], "demo");

    let post = http
        .post(format!("{base}/echo/a/b?x=1&y=2"))
        .header("x-test", "yes")
        .body("hello");
    let (_, _, echo) = send(post).await;
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo/a/b");
    assert_eq!(echo["query"], "x=1&y=2");
    assert_eq!(echo["headers"]["x-test"], "yes");
    assert_eq!(echo["body_len"], 5);
    assert_eq!(echo["instance"], demo.instance_id());
    let (_, _, echo) = get_json(&http, &format!("{base}/echo")).await;
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["body_len"], 0);

    let resp = http
        .get(format!("{base}/bytes?n=300001"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.bytes().await.unwrap().len(), 300_001);
    for bad in ["n=1073741825", "n=-1", "n=x", ""] {
        let resp = http
            .get(format!("{base}/bytes?{bad}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{bad}");
    }

    demo.shutdown().await;
    assert!(instance_ids(&client, "demo").await.is_empty());
    assert!(http.get(format!("{base}/health")).send().await.is_err());

    // kill: stops serving but stays registered, like a crash.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let crashed = vertice_register::demo::serve(l, "demo", urls(&c), 60).await;
    let id = crashed.instance_id();
    let crashed_base = format!("http://{}", crashed.addr);
    assert!(
        crashed
            .registration()
            .unwrap()
            .wait_registered(Duration::from_secs(20))
            .await
    );
    crashed.kill();
    wait_for(
        "the killed demo to stop answering",
        Duration::from_secs(10),
        || {
            let http = http.clone();
            let url = format!("{crashed_base}/health");
            async move { http.get(url).send().await.is_err().then_some(()) }
        },
    )
    .await;
    assert_eq!(instance_ids(&client, "demo").await, [id]);

    c.shutdown().await;
}

/// A stub node: `/services` answers 503 (Retry-After: 0) `fail` times, then
/// 200; `/services/locked` always answers 401; `/services/same` answers at
/// once, always the same view and index. Returns its URL and a hit counter.
async fn stub_node(
    fail: usize,
) -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    use axum::http::header::RETRY_AFTER;
    use axum::response::IntoResponse;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let hits = Arc::new(AtomicUsize::new(0));
    let h1 = hits.clone();
    let h2 = hits.clone();
    let app = axum::Router::new()
        .route(
            "/services",
            axum::routing::get(move || {
                let hits = h1.clone();
                async move {
                    if hits.fetch_add(1, Ordering::SeqCst) < fail {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            [(RETRY_AFTER, "0")],
                            axum::Json(serde_json::json!({"error": "unavailable", "message": "no leader yet"})),
                        )
                            .into_response()
                    } else {
                        axum::Json(serde_json::json!(["x"])).into_response()
                    }
                }
            }),
        )
        .route(
            "/services/locked",
            axum::routing::get(move || {
                let hits = h2.clone();
                async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    (
                        StatusCode::UNAUTHORIZED,
                        axum::Json(serde_json::json!({"error": "unauthorized", "message": "token needed"})),
                    )
                }
            }),
        );
    let h3 = hits.clone();
    let app = app.route(
        "/services/same",
        axum::routing::get(move || {
            let hits = h3.clone();
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                (
                    [("x-registry-index", "7")],
                    axum::Json(serde_json::json!({"service_name": "same", "instances": []})),
                )
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        axum::serve(l, app).await.unwrap();
    });
    (url, hits, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_503_within_the_budget_and_not_other_4xx() {
    use std::sync::atomic::Ordering;

    let (url, hits, task) = stub_node(3).await;
    let client = RegistryClient::new([url.clone()]).unwrap();
    assert_eq!(client.services().await.unwrap(), ["x"]);
    assert_eq!(
        hits.load(Ordering::SeqCst),
        4,
        "three 503s, then the answer"
    );

    hits.store(0, Ordering::SeqCst);
    match client.service("locked").await {
        Err(ClientError::Rejected { status, message }) => {
            assert_eq!(status, 401);
            assert_eq!(message, "token needed");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    assert_eq!(hits.load(Ordering::SeqCst), 1, "a 401 is not retried");

    // Always 503: Unavailable once the budget is spent, with the server's message.
    let (always, _, task2) = stub_node(usize::MAX).await;
    let short_always = RegistryClient::with_options(
        [always],
        ClientOptions {
            request_timeout: Duration::from_secs(2),
            retry_budget: Duration::from_millis(300),
            ..Default::default()
        },
    )
    .unwrap();
    let started = Instant::now();
    match short_always.services().await {
        Err(ClientError::Unavailable(m)) => assert!(m.contains("no leader yet"), "{m}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3));

    task.abort();
    task2.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_run_from_cli_deregisters_on_shutdown() {
    use vertice_register::config::DemoArgs;

    let c = TestCluster::start(3).await;
    c.wait_for_leader().await;
    let client = RegistryClient::new(urls(&c)).unwrap();
    // Reserve a port (a small race with other processes, acceptable here).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let args = DemoArgs {
        name: "cli-demo".into(),
        port,
        host: "127.0.0.1".into(),
        registry: urls(&c),
        ttl_seconds: 5,
        token: None,
        tls_ca: None,
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(vertice_register::demo::run_from_cli(args, async {
        let _ = stopped.await;
    }));
    let id = format!("127.0.0.1:{port}");
    wait_for("cli-demo registered", Duration::from_secs(30), || async {
        (instance_ids(&client, "cli-demo").await == [id.clone()]).then_some(())
    })
    .await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .expect("run_from_cli returns after shutdown")
        .unwrap()
        .unwrap();
    assert!(instance_ids(&client, "cli-demo").await.is_empty());

    // Bad registry URLs are an error at start, not a silent standalone run.
    let bad = DemoArgs {
        name: "x".into(),
        port: 0,
        host: "127.0.0.1".into(),
        registry: vec!["not-a-url".into()],
        ttl_seconds: 5,
        token: None,
        tls_ca: None,
    };
    assert!(vertice_register::demo::run_from_cli(bad, async {})
        .await
        .is_err());
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_does_not_busy_loop_on_a_server_that_answers_at_once() {
    use std::sync::atomic::Ordering;

    let (url, hits, task) = stub_node(0).await;
    let client = RegistryClient::new([url]).unwrap();
    let mut watch = Box::pin(client.watch_service("same"));
    let first = next_item(&mut watch).await.unwrap().unwrap();
    assert!(first.instances.is_empty());
    // Nothing changes: no item, and at most about one query a second.
    let start = hits.load(Ordering::SeqCst);
    let quiet = tokio::time::timeout(Duration::from_secs(3), watch.next()).await;
    assert!(quiet.is_err(), "an unchanged view is not yielded again");
    let queries = hits.load(Ordering::SeqCst) - start;
    assert!(queries <= 5, "{queries} queries in 3 s");
    drop(watch);
    task.abort();
}
