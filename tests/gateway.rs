//! The gateway against an in-process three-node cluster and real upstream
//! HTTP servers on 127.0.0.1:0. Waits poll with deadlines.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, Request};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use common::{
    client_from, get_json, get_text, get_until_429, raw, raw_request, send, wait_for, SlowHead,
    TestCluster,
};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use vertice_register::gateway::{self, Gateway, GatewayConfig};

const MB20: usize = 20 * 1024 * 1024;

/// A small upstream service: `/bytes?n=N` streams N bytes, `/slow?ms=N`
/// answers after N ms, `/status?code=N` answers N, anything else echoes.
struct Upstream {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Serves `app` on `l` until the returned sender is used or dropped.
fn serve_until_stopped(
    l: TcpListener,
    app: Router,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(l, app)
            .with_graceful_shutdown(async move {
                let _ = rx.await;
            })
            .await;
    });
    (tx, task)
}

impl Upstream {
    async fn start(name: &'static str) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(name, l)
    }

    /// Starts again on an old address (the old socket closes asynchronously).
    async fn start_on(name: &'static str, addr: SocketAddr) -> Self {
        let l = wait_for("the upstream port", Duration::from_secs(10), || async {
            TcpListener::bind(addr).await.ok()
        })
        .await;
        Self::serve(name, l)
    }

    fn serve(name: &'static str, l: TcpListener) -> Self {
        let addr = l.local_addr().unwrap();
        let app = Router::new()
            .route("/bytes", get(bytes_handler))
            .route("/slow", get(slow_handler))
            .route("/status", get(status_handler))
            .fallback(move |req: Request| echo(name, req));
        let (tx, task) = serve_until_stopped(l, app);
        Self {
            addr,
            stop: Some(tx),
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops listening and closes its connections.
    async fn kill(mut self) -> SocketAddr {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(Duration::from_secs(5), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
        self.addr
    }
}

async fn echo(name: &'static str, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut headers = BTreeMap::<String, String>::new();
    for (k, v) in &parts.headers {
        let v = v.to_str().unwrap_or("?").to_string();
        headers
            .entry(k.as_str().to_string())
            .and_modify(|old| *old = format!("{old}, {v}"))
            .or_insert(v);
    }
    let mut len = 0usize;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => len += c.len(),
            Err(_) => break,
        }
    }
    let mut resp = Json(json!({
        "instance": name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_len": len,
    }))
    .into_response();
    let h = resp.headers_mut();
    h.insert("connection", HeaderValue::from_static("x-resp-hop"));
    h.insert("x-resp-hop", HeaderValue::from_static("1"));
    h.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
    h.insert("x-resp-kept", HeaderValue::from_static("1"));
    resp
}

async fn bytes_handler(Query(q): Query<HashMap<String, usize>>) -> Response {
    let n = q.get("n").copied().unwrap_or(0);
    const CHUNK: usize = 64 * 1024;
    let chunks = (0..n.div_ceil(CHUNK)).map(move |i| {
        let size = CHUNK.min(n - i * CHUNK);
        Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; size]))
    });
    Body::from_stream(futures::stream::iter(chunks)).into_response()
}

async fn slow_handler(Query(q): Query<HashMap<String, u64>>) -> &'static str {
    tokio::time::sleep(Duration::from_millis(q.get("ms").copied().unwrap_or(0))).await;
    "late"
}

async fn status_handler(Query(q): Query<HashMap<String, u16>>) -> StatusCode {
    StatusCode::from_u16(q.get("code").copied().unwrap_or(200)).unwrap()
}

fn config(c: &TestCluster) -> GatewayConfig {
    let mut cfg = GatewayConfig::new(c.running().iter().map(|id| c.url(*id)).collect());
    cfg.timeout = Duration::from_secs(10);
    cfg.cache_ttl = Duration::from_secs(1);
    cfg.breaker_threshold = 2;
    cfg.breaker_cooldown = Duration::from_millis(300);
    cfg.registry_timeout = Duration::from_secs(1);
    cfg.with_env_map(HashMap::new())
}

async fn start_gateway(cfg: GatewayConfig) -> Gateway {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    gateway::start(l, cfg).await.unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .no_proxy()
        .build()
        .unwrap()
}

/// Registers an upstream through the client library, as services do.
async fn register(c: &TestCluster, service: &str, u: &Upstream) {
    let client =
        vertice_register::client::RegistryClient::new(c.running().into_iter().map(|id| c.url(id)))
            .unwrap();
    let reg = vertice_register::client::Registration {
        service_name: service.into(),
        host: Some("127.0.0.1".into()),
        port: u.addr.port(),
        ttl_seconds: Some(60),
        ..Default::default()
    };
    client.register(&reg).await.unwrap();
}

/// Waits until every running node serves exactly `n` instances of `service`.
async fn wait_for_instances(c: &TestCluster, service: &str, n: usize) {
    for id in c.running() {
        wait_for(
            &format!("{n} instances of {service} on node {id}"),
            Duration::from_secs(15),
            || async move {
                let (status, _, body) = c.get(id, &format!("/services/{service}")).await;
                let count = body["instances"].as_array().map_or(0, Vec::len);
                (status == StatusCode::OK && count == n).then_some(())
            },
        )
        .await;
    }
}

/// The instance that answered `/v2/{service}/echo`, asserting a 200.
async fn echo_instance(http: &reqwest::Client, gw: &Gateway, service: &str) -> String {
    let (status, _, body) = get_json(http, &format!("{}/v2/{service}/echo", gw.url())).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["instance"].as_str().unwrap().to_string()
}

async fn status(http: &reqwest::Client, gw: &Gateway) -> Value {
    let (code, _, body) = get_json(http, &format!("{}/gateway/status", gw.url())).await;
    assert_eq!(code, StatusCode::OK);
    body
}

fn breaker_of(status: &Value, service: &str, url: &str) -> Option<(String, u64)> {
    status["routes"][service]["instances"]
        .as_array()?
        .iter()
        .find(|i| i["url"] == url)
        .map(|i| {
            (
                i["breaker"].as_str().unwrap().to_string(),
                i["failures"].as_u64().unwrap(),
            )
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_requests_bodies_headers_and_errors() {
    let c = TestCluster::start(3).await;
    c.wait_for_leader().await;
    let up = Upstream::start("a").await;
    let legacy = Upstream::start("legacy").await;
    register(&c, "echo-svc", &up).await;
    wait_for_instances(&c, "echo-svc", 1).await;

    let env = HashMap::from([("SERVICE_LEGACY_APP_V1_URL".to_string(), legacy.url())]);
    let gw = start_gateway(config(&c).with_env_map(env)).await;
    let http = client();
    let base = gw.url();

    // GET with a query string; the path is passed as given.
    let (code, headers, body) =
        get_json(&http, &format!("{base}/v2/echo-svc/a/b%20c?x=1&y=two")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/a/b%20c");
    assert_eq!(body["query"], "x=1&y=two");
    assert!(headers.contains_key("x-gateway-route-age"));
    let (_, _, body) = get_json(&http, &format!("{base}/v2/echo-svc")).await;
    assert_eq!(body["path"], "/");

    // POST with a body.
    let r = http
        .post(format!("{base}/v2/echo-svc/submit?k=v"))
        .body("hello world")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["method"], "POST");
    assert_eq!(body["query"], "k=v");
    assert_eq!(body["body_len"], 11);

    // 20 MB up, as a chunked stream, and 20 MB down.
    let chunks = (0..MB20 / 65536).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![7u8; 65536])));
    let r = http
        .put(format!("{base}/v2/echo-svc/upload"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["body_len"], MB20);
    assert_eq!(body["method"], "PUT");
    let r = http
        .get(format!("{base}/v2/echo-svc/bytes?n={MB20}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let mut got = 0usize;
    let mut stream = r.bytes_stream();
    while let Some(chunk) = stream.next().await {
        got += chunk.unwrap().len();
    }
    assert_eq!(got, MB20);

    // Hop-by-hop headers are dropped both ways; X-Forwarded-* are added.
    let r = http
        .get(format!("{base}/v2/echo-svc/headers"))
        .header("connection", "keep-alive, x-hop-custom")
        .header("x-hop-custom", "1")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic abc")
        .header("te", "trailers")
        .header("x-forwarded-for", "10.9.8.7")
        .header("x-end", "kept")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for h in ["x-resp-hop", "proxy-authenticate"] {
        assert!(!r.headers().contains_key(h), "response header {h} leaked");
    }
    assert_eq!(r.headers()["x-resp-kept"], "1");
    let body: Value = r.json().await.unwrap();
    let seen = &body["headers"];
    for h in ["x-hop-custom", "keep-alive", "proxy-authorization", "te"] {
        assert!(seen.get(h).is_none(), "request header {h} leaked: {seen}");
    }
    if let Some(conn) = seen.get("connection") {
        assert!(!conn.as_str().unwrap().contains("x-hop-custom"), "{conn}");
    }
    assert_eq!(seen["x-end"], "kept");
    assert_eq!(seen["x-forwarded-for"], "10.9.8.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], gw.addr.to_string());
    assert_eq!(seen["host"], up.addr.to_string());

    // The environment fallback, through the override map.
    let (code, headers, body) = get_json(&http, &format!("{base}/v2/legacy.app-v1/x?q=1")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["instance"], "legacy");
    assert_eq!(body["path"], "/x");
    assert!(!headers.contains_key("x-gateway-route-age"));

    // Unknown service, bad name, path tricks, unknown route.
    let (code, headers, body) = get_json(&http, &format!("{base}/v2/no-such-service/x")).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["error"], "service_unavailable", "{body}");
    assert!(body["message"].is_string());
    assert!(headers.contains_key("retry-after"));
    // Sent raw: an HTTP client would resolve the dots itself.
    for bad in [
        "/v2/bad%20name/x",
        "/v2/echo-svc/../x",
        "/v2/echo-svc/a/%2e%2e/x",
        "/v2/echo-svc/a/..%5c..",
    ] {
        let (code, body) = raw(gw.addr, raw_request(gw.addr, "GET", bad)).await;
        assert_eq!(code, 400, "{bad}: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "bad_request");
    }
    let long = "a".repeat(129);
    let (code, _, _) = get_json(&http, &format!("{base}/v2/{long}/x")).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let (code, _, body) = get_json(&http, &format!("{base}/nope")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "not_found");

    // Status, health and metrics.
    let (code, _, _) = get_json(&http, &format!("{base}/health")).await;
    assert_eq!(code, StatusCode::OK);
    let s = status(&http, &gw).await;
    assert_eq!(s["gateway"], "operational");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["circuit_breaker"]["open"], false);
    assert_eq!(s["circuit_breaker"]["threshold"], 2);
    assert_eq!(s["cache"]["ttl"], 1);
    let services = s["cache"]["services"].as_array().unwrap();
    assert!(services.contains(&json!("echo-svc")), "{s}");
    assert_eq!(s["routes"]["echo-svc"]["source"], "registry");
    assert_eq!(s["routes"]["legacy.app-v1"]["source"], "environment");
    assert_eq!(
        breaker_of(&s, "echo-svc", &up.url()),
        Some(("closed".to_string(), 0))
    );
    let m = get_text(&http, &format!("{base}/gateway/metrics")).await;
    for name in [
        "gateway_requests_total{service=\"echo-svc\",status=\"2xx\"}",
        "gateway_upstream_duration_seconds_bucket",
        "gateway_registry_lookups_total",
        "gateway_route_cache_size",
    ] {
        assert!(m.contains(name), "{name} missing from:\n{m}");
    }
    // The registry ignores index/wait today: the watch must not spin.
    let lookups: f64 = m
        .lines()
        .filter(|l| l.starts_with("gateway_registry_lookups_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        lookups < 100.0,
        "{lookups} registry lookups: the watch spins"
    );

    // 503 answers count against the instance's breaker and reach the caller.
    for _ in 0..2 {
        let (code, headers, _) =
            get_json(&http, &format!("{base}/v2/echo-svc/status?code=503")).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(headers.contains_key("x-gateway-instance"));
    }
    let s = status(&http, &gw).await;
    assert_eq!(
        breaker_of(&s, "echo-svc", &up.url()),
        Some(("open".to_string(), 2))
    );
    // Every instance open: the one whose cooldown ends first still gets the
    // request as its trial, and its success closes the breaker.
    assert_eq!(echo_instance(&http, &gw, "echo-svc").await, "a");
    let s = status(&http, &gw).await;
    assert_eq!(
        breaker_of(&s, "echo-svc", &up.url()),
        Some(("closed".to_string(), 0))
    );

    // An upstream slower than the timeout: 504.
    let mut cfg = config(&c);
    cfg.timeout = Duration::from_millis(300);
    let quick = start_gateway(cfg).await;
    let (code, _, body) =
        get_json(&http, &format!("{}/v2/echo-svc/slow?ms=3000", quick.url())).await;
    assert_eq!(code, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body["error"], "gateway_timeout");

    quick.shutdown().await;

    // The only instance is gone: 502.
    up.kill().await;
    let (code, _, body) = get_json(&http, &format!("{base}/v2/echo-svc/echo")).await;
    assert_eq!(code, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(body["error"], "bad_gateway");
    assert!(body["message"].is_string());

    gw.shutdown().await;
    legacy.kill().await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_and_a_breaker_that_opens_and_closes_again() {
    let c = TestCluster::start(3).await;
    c.wait_for_leader().await;
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let d = Upstream::start("d").await;
    for u in [&a, &b, &d] {
        register(&c, "rr", u).await;
    }
    wait_for_instances(&c, "rr", 3).await;
    let gw = start_gateway(config(&c)).await;
    let http = client();

    let mut counts = BTreeMap::<String, usize>::new();
    for _ in 0..30 {
        *counts
            .entry(echo_instance(&http, &gw, "rr").await)
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|n| (8..=12).contains(n)), "{counts:?}");

    // Kill b: requests keep succeeding (a bodiless request is retried on
    // another instance) and b's breaker opens.
    let b_url = b.url();
    let b_addr = b.kill().await;
    let s = wait_for("b's breaker to open", Duration::from_secs(15), || async {
        echo_instance(&http, &gw, "rr").await;
        let s = status(&http, &gw).await;
        let (state, failures) = breaker_of(&s, "rr", &b_url)?;
        (state != "closed" && failures >= 2).then_some(s)
    })
    .await;
    assert_eq!(s["routes"]["rr"]["instances"].as_array().unwrap().len(), 3);
    for _ in 0..20 {
        assert_ne!(echo_instance(&http, &gw, "rr").await, "b");
    }

    // b comes back on the same port: after a cooldown its trial succeeds.
    let b = Upstream::start_on("b", b_addr).await;
    wait_for("b to be used again", Duration::from_secs(15), || async {
        (echo_instance(&http, &gw, "rr").await == "b").then_some(())
    })
    .await;
    let s = status(&http, &gw).await;
    assert_eq!(
        breaker_of(&s, "rr", &b_url),
        Some(("closed".to_string(), 0))
    );
    let m = get_text(&http, &format!("{}/gateway/metrics", gw.url())).await;
    assert!(
        m.contains("gateway_breaker_opens_total{service=\"rr\"}"),
        "{m}"
    );

    gw.shutdown().await;
    for u in [a, b, d] {
        u.kill().await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistration_and_a_dead_registry() {
    let mut c = TestCluster::start(3).await;
    c.wait_for_leader().await;
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    register(&c, "dr", &a).await;
    register(&c, "dr", &b).await;
    wait_for_instances(&c, "dr", 2).await;
    let gw = start_gateway(config(&c)).await;
    let http = client();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(echo_instance(&http, &gw, "dr").await);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // Deregister b: the watch drops it. Nothing else can: between the
    // deregistration and the check below no request goes through the
    // gateway (only `/gateway/status`, which resolves nothing), so no
    // cache refresh runs. The bound is loose for a busy machine; how fast
    // the watch is belongs to a benchmark.
    let deregistered = std::time::Instant::now();
    let (code, body) = c
        .delete(
            1,
            &format!("/deregister/dr?instance_id=127.0.0.1:{}", b.addr.port()),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let b_url = b.url();
    wait_for(
        "the gateway to forget b",
        Duration::from_secs(10),
        || async {
            let s = status(&http, &gw).await;
            breaker_of(&s, "dr", &b_url).is_none().then_some(())
        },
    )
    .await;
    let forgot = deregistered.elapsed();
    eprintln!("the gateway stopped routing to b {forgot:?} after its deregistration");
    assert!(forgot < Duration::from_secs(10), "took {forgot:?}");
    for _ in 0..10 {
        assert_eq!(echo_instance(&http, &gw, "dr").await, "a");
    }

    // Every registry node down: the last-known route keeps serving, and says
    // how old it is.
    for id in c.running() {
        c.stop(id).await;
    }
    let age = wait_for("the route to age", Duration::from_secs(20), || async {
        let r = http
            .get(format!("{}/v2/dr/echo", gw.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let age: u64 = r.headers()["x-gateway-route-age"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["instance"], "a");
        (age >= 2).then_some(age)
    })
    .await;
    let s = wait_for(
        "the registry breaker to open",
        Duration::from_secs(20),
        || async {
            let s = status(&http, &gw).await;
            (s["circuit_breaker"]["open"] == true).then_some(s)
        },
    )
    .await;
    assert!(
        s["routes"]["dr"]["age_seconds"].as_u64().unwrap() >= age,
        "{s}"
    );
    assert_eq!(s["routes"]["dr"]["source"], "registry");

    gw.shutdown().await;
    a.kill().await;
    b.kill().await;
    c.shutdown().await;
}

/// A gateway with no registry to ask: `echo` comes from the environment.
async fn standalone_gateway(up: &Upstream, tune: impl FnOnce(&mut GatewayConfig)) -> Gateway {
    let mut cfg = GatewayConfig::new(vec!["http://127.0.0.1:1".into()])
        .with_env_map(HashMap::from([("SERVICE_ECHO_URL".to_string(), up.url())]));
    cfg.registry_timeout = Duration::from_millis(200);
    tune(&mut cfg);
    start_gateway(cfg).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_head_is_cut_off_and_others_are_served() {
    let up = Upstream::start("a").await;
    let gw = standalone_gateway(&up, |c| c.read_timeout = Duration::from_secs(1)).await;
    let http = client();
    let slow = SlowHead::start(gw.addr, "/v2/echo/x").await;
    // Meanwhile the gateway serves everyone else.
    assert_eq!(echo_instance(&http, &gw, "echo").await, "a");
    let took = slow.closed().await;
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");
    // A pooled connection idle for longer than the deadline still works:
    // the deadline runs from a head's first byte.
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(echo_instance(&http, &gw, "echo").await, "a");
    gw.shutdown().await;
    up.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_address_gets_429_and_other_addresses_pass() {
    let up = Upstream::start("a").await;
    let gw = standalone_gateway(&up, |c| c.rate_limit_per_ip = 5).await;
    let hammer = client_from("127.0.0.41");
    let other = client_from("127.0.0.42");
    let url = |p: &str| format!("{}{p}", gw.url());

    // A limit of 5/s (burst 10): 40 requests at once hit it.
    let (_, body) = get_until_429(&hammer, &url("/v2/echo/x"), 40).await;
    assert!(body["message"].as_str().unwrap().contains("5 requests/s"));
    // Unknown paths count too.
    let (code, _, _) = get_json(&hammer, &url("/nope")).await;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS);

    // Another address passes; the gateway's own routes are not limited.
    let (code, _, body) = get_json(&other, &url("/v2/echo/x")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    for _ in 0..10 {
        for path in ["/health", "/gateway/status", "/gateway/metrics"] {
            let r = hammer.get(url(path)).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "{path}");
        }
    }
    let m = get_text(&other, &url("/gateway/metrics")).await;
    let limited: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("gateway_rate_limited_total "))
        .unwrap_or_else(|| panic!("no gateway_rate_limited_total in\n{m}"))
        .parse()
        .unwrap();
    assert!(limited >= 2, "{m}");
    gw.shutdown().await;
    up.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_gateways_environment_variables_are_fallbacks_in_order() {
    let seed = Upstream::start("seed").await;
    let plain = Upstream::start("plain").await;
    let service = Upstream::start("service").await;
    let endpoint = Upstream::start("endpoint").await;
    let legacy = Upstream::start("legacy").await;
    let env = HashMap::from([
        // Every form for `a`: SERVICE_<NAME>_URL wins.
        ("SERVICE_A_URL".to_string(), seed.url()),
        ("A_URL".to_string(), plain.url()),
        ("A_SERVICE_URL".to_string(), service.url()),
        ("A_ENDPOINT".to_string(), endpoint.url()),
        // `b-c.d`: <NAME>_URL before <NAME>_SERVICE_URL; not a URL: skipped.
        (
            "SERVICE_B_C_D_URL".to_string(),
            "redis://r:6379".to_string(),
        ),
        ("B_C_D_URL".to_string(), format!("{}/", plain.url())),
        ("B_C_D_SERVICE_URL".to_string(), service.url()),
        // Only the later forms.
        ("E_SERVICE_URL".to_string(), service.url()),
        ("F_ENDPOINT".to_string(), endpoint.url()),
        ("G_URL".to_string(), String::new()),
        ("G_ENDPOINT".to_string(), endpoint.url()),
        // The legacy mapping: MAXIMUS_CORE_URL names maximus_core_service.
        ("MAXIMUS_CORE_URL".to_string(), legacy.url()),
        ("NMAP_ENDPOINT".to_string(), legacy.url()),
    ]);
    let mut cfg = GatewayConfig::new(vec!["http://127.0.0.1:1".into()]).with_env_map(env);
    cfg.registry_timeout = Duration::from_millis(200);
    let gw = start_gateway(cfg).await;
    let http = client();
    for (service, instance) in [
        ("a", "seed"),
        ("b-c.d", "plain"),
        ("e", "service"),
        ("f", "endpoint"),
        ("g", "endpoint"),
        ("maximus_core_service", "legacy"),
        ("nmap_service", "legacy"),
        // <NAME>_URL and <NAME>_ENDPOINT themselves.
        ("maximus_core", "legacy"),
        ("nmap", "legacy"),
    ] {
        assert_eq!(
            echo_instance(&http, &gw, service).await,
            instance,
            "{service}"
        );
    }
    for unknown in ["h", "maximus", "core_service", "maximus_core_service_x"] {
        let (code, _, body) = get_json(&http, &format!("{}/v2/{unknown}/x", gw.url())).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{unknown}: {body}");
    }
    let s = status(&http, &gw).await;
    assert_eq!(s["routes"]["maximus_core_service"]["source"], "environment");
    assert_eq!(
        s["routes"]["maximus_core_service"]["variable"],
        "MAXIMUS_CORE_URL"
    );
    assert_eq!(s["routes"]["b-c.d"]["variable"], "B_C_D_URL");
    assert_eq!(
        s["routes"]["b-c.d"]["instances"][0]["url"],
        plain.url(),
        "the trailing / is dropped"
    );
    gw.shutdown().await;
    for u in [seed, plain, service, endpoint, legacy] {
        u.kill().await;
    }
}

/// How a fake registry node answers every request.
#[derive(Clone, Copy)]
enum NodeMode {
    /// `200` with what it received: method, path, query, headers, body.
    Echo,
    /// `503` as a node without a leader answers a write.
    NoLeader,
    /// `503` as a leader answers a write whose commit timed out: it may
    /// have been applied.
    Unknown,
}

/// A fake registry node on 127.0.0.1:0 that counts the requests it gets.
struct FakeNode {
    addr: SocketAddr,
    hits: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl FakeNode {
    async fn start(mode: NodeMode) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        let app = Router::new().fallback(move |req: Request| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            fake_node_answer(mode, req)
        });
        let (stop, task) = serve_until_stopped(l, app);
        Self {
            addr,
            hits,
            stop,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn kill(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(5), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

async fn fake_node_answer(mode: NodeMode, req: Request) -> Response {
    let unavailable = |message: &str| {
        let mut r = (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "unavailable", "message": message})),
        )
            .into_response();
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("1"));
        r
    };
    match mode {
        NodeMode::NoLeader => {
            unavailable("no leader reachable within 3000 ms to commit the write; retry shortly")
        }
        NodeMode::Unknown => unavailable(
            "the write was not committed in time (no quorum?); its outcome is unknown and retrying it is safe",
        ),
        NodeMode::Echo => {
            let (parts, body) = req.into_parts();
            let headers: BTreeMap<String, String> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
                .collect();
            let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
            Json(json!({
                "method": parts.method.as_str(),
                "path": parts.uri.path(),
                "query": parts.uri.query(),
                "headers": headers,
                "body": String::from_utf8_lossy(&body),
            }))
            .into_response()
        }
    }
}

/// An address where nothing listens: connections are refused.
async fn dead_address() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}")
}

/// A gateway whose registry listener passes requests to `nodes`, in order.
async fn registry_front(nodes: Vec<String>, secret: Option<&str>) -> Gateway {
    let mut cfg = GatewayConfig::new(nodes).with_env_map(HashMap::new());
    cfg.registry_timeout = Duration::from_secs(1);
    cfg.timeout = Duration::from_secs(10);
    cfg.cluster_secret = secret.map(Into::into);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let r = TcpListener::bind("127.0.0.1:0").await.unwrap();
    gateway::start_with_registry(l, Some(r), cfg).await.unwrap()
}

fn failovers(metrics: &str, reason: &str) -> f64 {
    common::metric(
        metrics,
        &format!("gateway_registry_proxy_failovers_total{{reason=\"{reason}\"}}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_listener_fails_over_and_names_the_original_caller() {
    let dead = dead_address().await;
    let no_leader = FakeNode::start(NodeMode::NoLeader).await;
    let live = FakeNode::start(NodeMode::Echo).await;
    let gw = registry_front(
        vec![dead.clone(), no_leader.url(), live.url()],
        Some("s3cret"),
    )
    .await;
    let lb = gw.registry_url().unwrap();
    let http = client_from("127.0.0.77");

    // A write: the dead node is skipped (connect refused), the node without
    // a leader too (nothing applied); the live one gets the whole body.
    let body = json!({"service_name": "old", "endpoint": "http://old-host:9000",
                      "health_endpoint": "/health", "metadata": {}})
    .to_string();
    let (code, headers, seen) = send(
        http.post(format!("{lb}/register?x=1"))
            .header("content-type", "application/json")
            .header("x-registry-token", "tok")
            .header("x-registry-caller", "6.6.6.6:1")
            .header("x-cluster-secret", "guess")
            .body(body.clone()),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{seen}");
    assert_eq!(headers["x-gateway-registry-node"], live.url().as_str());
    assert_eq!(seen["method"], "POST");
    assert_eq!(seen["path"], "/register");
    assert_eq!(seen["query"], "x=1");
    assert_eq!(seen["body"], body.as_str());
    let h = &seen["headers"];
    let caller = h["x-registry-caller"].as_str().unwrap();
    assert!(caller.starts_with("127.0.0.77:"), "{h}");
    assert_ne!(caller, "127.0.0.77:0");
    assert_eq!(h["x-cluster-secret"], "s3cret");
    assert_eq!(h["x-registry-token"], "tok");
    assert_eq!(h["x-forwarded-for"], "127.0.0.77");
    assert_eq!(h["content-length"], body.len().to_string());
    assert_eq!((no_leader.hits(), live.hits()), (1, 1));

    // The next request starts at the node that answered.
    let (code, _, seen) = send(http.delete(format!("{lb}/deregister/old"))).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(seen["method"], "DELETE");
    assert_eq!(seen["body"], "");
    assert_eq!((no_leader.hits(), live.hits()), (1, 2));

    // Operator routes carry the client's secret, never the proxy's.
    let (_, _, seen) = send(
        http.get(format!("{lb}/cluster/status"))
            .header("x-cluster-secret", "operator"),
    )
    .await;
    assert_eq!(seen["headers"]["x-cluster-secret"], "operator");
    let (_, _, seen) = get_json(&http, &format!("{lb}/cluster/status")).await;
    assert!(seen["headers"].get("x-cluster-secret").is_none(), "{seen}");

    // More than the nodes' 64 KiB: 413, and no node sees it.
    let before = live.hits();
    let r = http
        .post(format!("{lb}/register"))
        .body(vec![b'x'; 64 * 1024 + 1])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let chunks = (0..5).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 16 * 1024])));
    let r = http
        .post(format!("{lb}/register"))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE, "chunked");
    assert_eq!(live.hits(), before);

    let m = get_text(&http, &format!("{}/gateway/metrics", gw.url())).await;
    assert_eq!(failovers(&m, "connect"), 1.0, "{m}");
    assert_eq!(failovers(&m, "no_leader"), 1.0, "{m}");
    assert!(
        common::metric(&m, "gateway_registry_proxy_requests_total{status=\"2xx\"}") >= 4.0,
        "{m}"
    );
    gw.shutdown().await;
    no_leader.kill().await;
    live.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_may_have_been_applied_is_not_sent_to_another_node() {
    let unknown = FakeNode::start(NodeMode::Unknown).await;
    let live = FakeNode::start(NodeMode::Echo).await;
    let gw = registry_front(vec![unknown.url(), live.url()], None).await;
    let lb = gw.registry_url().unwrap();
    let http = client();

    // The leader's "outcome unknown" 503 goes back to the client as is.
    let (code, headers, body) = send(
        http.post(format!("{lb}/heartbeat"))
            .json(&json!({"service_name": "x"})),
    )
    .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("outcome is unknown"));
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["x-gateway-registry-node"], unknown.url().as_str());
    assert_eq!((unknown.hits(), live.hits()), (1, 0));

    // A read changes nothing: it goes on to the next node.
    let (code, headers, seen) = get_json(&http, &format!("{lb}/services/x")).await;
    assert_eq!(code, StatusCode::OK, "{seen}");
    assert_eq!(headers["x-gateway-registry-node"], live.url().as_str());
    // Without --cluster-secret no secret is sent, the caller header is.
    assert!(seen["headers"].get("x-cluster-secret").is_none());
    assert!(seen["headers"]["x-registry-caller"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    let m = get_text(&http, &format!("{}/gateway/metrics", gw.url())).await;
    assert_eq!(failovers(&m, "read"), 1.0, "{m}");

    // Every node unreachable: 503 in the nodes' format, with Retry-After.
    let gone = registry_front(vec![dead_address().await, dead_address().await], None).await;
    let (code, headers, body) = send(
        http.post(format!("{}/register", gone.registry_url().unwrap()))
            .json(&json!({"service_name": "x", "port": 1})),
    )
    .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "unavailable");
    assert!(headers.contains_key("retry-after"));
    assert!(!headers.contains_key("x-gateway-registry-node"));

    gone.shutdown().await;
    gw.shutdown().await;
    unknown.kill().await;
    live.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_clients_keep_one_registry_url_while_nodes_stop() {
    let mut c = TestCluster::start(3).await;
    c.wait_for_leader().await;
    let gw = registry_front(
        c.running().iter().map(|id| c.url(*id)).collect(),
        Some(common::SECRET),
    )
    .await;
    let lb = gw.registry_url().unwrap();
    // Two old services on two hosts, one replica each, knowing one URL.
    let (a, b) = (client_from("127.0.0.78"), client_from("127.0.0.79"));
    let register = |http: &reqwest::Client, host: &str| {
        send(
            http.post(format!("{lb}/register"))
                .header("x-registry-token", "unused")
                .json(&json!({
                    "service_name": "old_svc",
                    "endpoint": format!("http://{host}:9000"),
                    "health_endpoint": "/health",
                    "metadata": {},
                })),
        )
    };
    let (code, headers, body) = register(&a, "host-a").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let first = headers["x-gateway-registry-node"]
        .to_str()
        .unwrap()
        .to_string();

    // The node the listener uses stops: the next write goes to another.
    let stopped = c
        .running()
        .into_iter()
        .find(|id| c.url(*id) == first)
        .unwrap();
    c.stop(stopped).await;
    let (code, headers, body) = register(&b, "host-b").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_ne!(headers["x-gateway-registry-node"], first.as_str());
    let (code, _, body) = send(
        a.post(format!("{lb}/heartbeat"))
            .json(&json!({"service_name": "old_svc"})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (code, _, body) = get_json(&a, &format!("{lb}/services/old_svc")).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["instances"].as_array().unwrap().len(), 2, "{body}");

    // The nodes saw each client's own address, not the listener's: a
    // deregistration by name from b removes b's replica only, and a
    // registration without a host records the client's address.
    let (code, _, body) = send(b.delete(format!("{lb}/deregister/old_svc"))).await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let (_, _, body) = get_json(&a, &format!("{lb}/services/old_svc")).await;
    let hosts: Vec<&str> = body["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["host-a"], "{body}");
    let (code, _, body) = send(
        b.post(format!("{lb}/register"))
            .json(&json!({"service_name": "plain", "port": 9001})),
    )
    .await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["host"], "127.0.0.79", "{body}");

    // The leader stops too, a follower survives: its 503 is what a real
    // node says without a leader, which the listener must recognise. (A
    // leader left alone says instead that the outcome is unknown.)
    let second = c.wait_for_leader().await;
    c.stop(second).await;
    let (code, _, body) = register(&a, "host-a").await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "unavailable");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .starts_with("no leader reachable"),
        "{body}"
    );

    c.restart(stopped).await;
    c.restart(second).await;
    c.wait_for_leader().await;
    let (code, _, body) = register(&a, "host-a").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    let m = get_text(&a, &format!("{}/gateway/metrics", gw.url())).await;
    assert!(failovers(&m, "connect") >= 1.0, "{m}");
    gw.shutdown().await;
    c.shutdown().await;
}

#[test]
fn the_registry_listener_flags_parse() {
    use clap::Parser;
    use vertice_register::config::{Cli, Command};
    let cli = Cli::try_parse_from([
        "vertice-register",
        "gateway",
        "--registry-listen",
        "0.0.0.0:8888",
        "--cluster-secret",
        "s",
    ])
    .unwrap();
    let Some(Command::Gateway(g)) = cli.command else {
        panic!("not the gateway")
    };
    assert_eq!(g.registry_listen.as_deref(), Some("0.0.0.0:8888"));
    assert_eq!(g.cluster_secret.as_ref().unwrap().expose(), "s");
    let cfg = GatewayConfig::from_args(&g);
    assert_eq!(cfg.cluster_secret.unwrap().expose(), "s");
}
