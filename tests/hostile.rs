//! Hostile clients: rate limits, slow and oversized requests, hostile JSON,
//! invisible and look-alike characters, metadata bombs and path tricks.
//! Every refusal must be a 4xx (JSON where the registry writes the answer)
//! and must change nothing.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    client_from, get_json, get_text, get_until_429, raw, raw_request, SlowHead, TestCluster,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vertice_register::config::NodeArgs;

/// (applied index, instance count) as `/health` reports them.
async fn state(c: &TestCluster, http: &reqwest::Client) -> (u64, u64) {
    let (_, _, h) = get_json(http, &format!("{}/health", c.url(1))).await;
    (
        h["last_applied"].as_u64().unwrap(),
        h["instances"].as_u64().unwrap(),
    )
}

/// Asserts a JSON error with `status` and `code` (and `field` when given).
fn assert_error(got: (u16, &str), status: u16, code: &str, field: Option<&str>, what: &str) {
    assert_eq!(got.0, status, "{what}: {}", got.1);
    let v: Value = serde_json::from_str(got.1).unwrap_or_else(|_| panic!("{what}: {}", got.1));
    assert_eq!(v["error"], code, "{what}: {v}");
    if let Some(f) = field {
        assert_eq!(v["field"], f, "{what}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_rate_limit_answers_429_and_spares_others() {
    let c = TestCluster::start_with(1, |a| a.rate_limit_per_ip = 5).await;
    c.wait_for_leader().await;
    let hammer = client_from("127.0.0.11");
    let other = client_from("127.0.0.12");
    let observer = client_from("127.0.0.13");
    let url = |p: &str| format!("{}{p}", c.url(1));

    // A limit of 5/s (burst 10): 40 requests at once hit it.
    let (retry, _) = get_until_429(&hammer, &url("/services"), 40).await;
    // Also writes and unknown paths from that address.
    let mut refused = 0;
    for path in [
        "/register",
        "/register",
        "/register",
        "/no/such/path",
        "/no/such/path",
    ] {
        let r = hammer
            .post(url(path))
            .json(&json!({"service_name": "a", "port": 1}))
            .send()
            .await
            .unwrap();
        refused += usize::from(r.status() == StatusCode::TOO_MANY_REQUESTS);
    }
    assert!(refused >= 3, "only {refused} of 5 refused");

    // Not limited: another address, /health, the internal routes.
    let r = other.get(url("/services")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    for _ in 0..30 {
        let r = hammer.get(url("/health")).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    for _ in 0..15 {
        let r = hammer
            .get(url("/cluster/status"))
            .header("x-cluster-secret", common::SECRET)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }

    let metrics = get_text(&observer, &url("/metrics")).await;
    let count = |by: &str| -> u64 {
        let prefix = format!("registry_rate_limited_total{{by=\"{by}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in /metrics"))
            .parse()
            .unwrap()
    };
    assert!(count("ip") >= 2, "{metrics}");
    assert_eq!(count("token"), 0);

    // The bucket refills: after Retry-After the address is served again.
    tokio::time::sleep(Duration::from_secs(retry)).await;
    let r = hammer.get(url("/services")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_429s_is_audited_in_a_few_lines_that_count_them_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = path.clone();
    let mut c = TestCluster::start_tuned(
        1,
        Arc::new(move |a: &mut NodeArgs| {
            a.rate_limit_per_ip = 5;
            a.audit_log = Some(log.clone());
        }),
    )
    .await;
    c.wait_for_leader().await;
    let hammer = client_from("127.0.0.14");
    let url = format!("{}/services", c.url(1));
    let started = Instant::now();
    let mut refused = 0u64;
    for _ in 0..200 {
        let r = hammer.get(&url).send().await.unwrap();
        refused += u64::from(r.status() == StatusCode::TOO_MANY_REQUESTS);
    }
    assert!(refused >= 150, "only {refused} of 200 refused");
    let lines = || -> Vec<Value> {
        std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|e| e["status"] == 429)
            .collect()
    };
    // The first refusal is written at once.
    let first = common::wait_for(
        "the first 429 in the audit log",
        Duration::from_secs(10),
        || {
            let found = lines().into_iter().next();
            async move { found }
        },
    )
    .await;
    assert!(
        first["caller"].as_str().unwrap().starts_with("127.0.0.14:"),
        "{first}"
    );
    assert_eq!(first["operation"], "list");
    assert_eq!(first["target"], "/services");
    assert_eq!(first["result"], "refused: rate_limit");
    assert_eq!(first["limit"], "ip");
    assert_eq!(first["count"], 1);
    assert_eq!(first["token_id"], Value::Null);
    // The rest are counted, and written at the latest when the node stops.
    let took = started.elapsed();
    c.stop(1).await;
    let total = |got: &[Value]| -> u64 { got.iter().map(|e| e["count"].as_u64().unwrap()).sum() };
    let got = common::wait_for(
        "all 429s counted in the audit log",
        Duration::from_secs(10),
        || {
            let got = lines();
            async move { (total(&got) >= refused).then_some(got) }
        },
    )
    .await;
    assert_eq!(total(&got), refused, "{got:?}");
    // One line at once, then at most one per 10 s window.
    let most = 2 + took.as_secs() as usize / 10;
    assert!(
        got.len() <= most,
        "{} lines for {refused} refusals: {got:?}",
        got.len()
    );
    assert!(got[1..].iter().all(|e| e["since"].is_string()), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_token_rate_limit_keys_on_the_authorization_header() {
    let c = TestCluster::start_with(1, |a| a.rate_limit_per_token = 3).await;
    c.wait_for_leader().await;
    let http = client_from("127.0.0.21");
    let url = format!("{}/services", c.url(1));
    let send = |token: Option<&'static str>| {
        let mut r = http.get(&url);
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        r.send()
    };
    let mut hit = false;
    for _ in 0..30 {
        let r = send(Some("alpha")).await.unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(r.headers().contains_key("retry-after"));
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"], "too_many_requests");
            assert!(body["message"].as_str().unwrap().contains("token"));
            hit = true;
            break;
        }
    }
    assert!(hit, "token alpha was never limited");
    // Same address, another token or none: not limited (no per-address limit).
    assert_eq!(send(Some("beta")).await.unwrap().status(), StatusCode::OK);
    for _ in 0..10 {
        assert_eq!(send(None).await.unwrap().status(), StatusCode::OK);
    }
    let m = c.metrics(1).await;
    assert!(
        m.lines().any(
            |l| l.starts_with("registry_rate_limited_total{by=\"token\"} ") && !l.ends_with(" 0")
        ),
        "{m}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_are_cut_off_and_others_are_served() {
    let c = TestCluster::start_with(1, |a| a.read_timeout_ms = 1_000).await;
    c.wait_for_leader().await;
    let slow = SlowHead::start(c.addrs[&1], "/services").await;
    // Meanwhile the node serves everyone else.
    let (status, _, _) = c.get(1, "/services").await;
    assert_eq!(status, StatusCode::OK);
    let took = slow.closed().await;
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");
    let (status, _, _) = c.get(1, "/health").await;
    assert_eq!(status, StatusCode::OK);
    // The deadline runs from a head's first byte, not while a keep-alive
    // connection waits: a pooled client that pauses about as long as the
    // timeout never finds its connection closed under it.
    for pause in [900, 1_000, 1_100, 1_300] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let r = c.http.get(format!("{}/services", c.url(1))).send().await;
        assert!(
            r.is_ok_and(|r| r.status() == StatusCode::OK),
            "after {pause} ms idle"
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_gets_408_and_changes_nothing() {
    let c = TestCluster::start_with(1, |a| a.read_timeout_ms = 1_000).await;
    c.wait_for_leader().await;
    let before = state(&c, &c.http).await;
    let addr = c.addrs[&1];
    let body = json!({"service_name": "slow", "port": 80}).to_string();
    let head = format!(
        "POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let started = Instant::now();
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(head.as_bytes()).await.unwrap();
    let trickle = tokio::spawn(async move {
        for b in body.into_bytes() {
            if wr.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(8), rd.read(&mut buf))
        .await
        .expect("no answer to a trickled body within 8 s")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let json_body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    assert_error((408, json_body), 408, "request_timeout", None, "slow body");
    assert!(started.elapsed() < Duration::from_secs(5));
    trickle.abort();
    assert_eq!(state(&c, &c.http).await, before);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_heads_get_431_not_a_hang() {
    let c = TestCluster::start(1).await;
    c.wait_for_leader().await;
    let addr = c.addrs[&1];
    let started = Instant::now();
    // hyper answers 431 and closes. The close resets the connection (the
    // rest of the request is unread), but `raw` reads while it writes, so
    // the answer arrives before the reset: 200 of 200 tries of each case
    // below gave exactly these codes on a loaded 2-core machine. A node that
    // dropped the connection without answering fails here.
    // One 100 KiB header.
    let big = format!(
        "GET /services HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let (code, _) = raw(addr, big.into_bytes()).await;
    assert_eq!(code, 431, "huge header");
    // 500 small headers.
    let many: String = (0..500).map(|i| format!("X-H{i}: v\r\n")).collect();
    let req = format!("GET /services HTTP/1.1\r\nHost: x\r\n{many}Connection: close\r\n\r\n");
    let (code, _) = raw(addr, req.into_bytes()).await;
    assert_eq!(code, 431, "many headers");
    // A 100 KiB path.
    let long = format!("/services/{}", "a".repeat(100 * 1024));
    let (code, _) = raw(addr, raw_request(addr, "GET", &long)).await;
    assert_eq!(
        code, 431,
        "very long path (the request line is part of the head)"
    );
    // A path of 10 KiB fits the head: the registry refuses the name.
    let long = format!("/services/{}", "a".repeat(10 * 1024));
    let (code, body) = raw(addr, raw_request(addr, "GET", &long)).await;
    assert_error((code, &body), 400, "invalid_request", None, "10 KiB name");
    // Raw CR/LF inside the request line is not HTTP.
    let (code, _) = raw(
        addr,
        b"GET /services/a\rb HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(code, 400, "CR in the path");
    assert!(started.elapsed() < Duration::from_secs(10));
    let (status, _, _) = c.get(1, "/services").await;
    assert_eq!(status, StatusCode::OK);
    c.shutdown().await;
}

async fn post_raw(c: &TestCluster, body: String) -> (u16, String) {
    let r = c
        .http
        .post(format!("{}/register", c.url(1)))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_json_is_refused_and_changes_nothing() {
    let c = TestCluster::start(1).await;
    c.wait_for_leader().await;
    c.register(1, "keep", 1).await;
    let before = state(&c, &c.http).await;

    let cases: Vec<(String, &str)> = vec![
        (
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
            "body",
        ),
        (
            format!(
                "{{\"service_name\":\"a\",\"port\":1,\"metadata\":{}{}}}",
                "{\"k\":".repeat(10_000),
                "}".repeat(10_000)
            ),
            "body",
        ),
        (format!("[{}1]", "1,".repeat(30 * 1024)), "body"),
        (
            format!(
                "{{\"service_name\":\"a\",\"port\":1,\"metadata\":{{\"k\":[{}1]}}}}",
                "1,".repeat(29 * 1024)
            ),
            "metadata",
        ),
        (r#"{"service_name":"a","port":1e400}"#.into(), "body"),
        (
            r#"{"service_name":"a","port":18446744073709551616}"#.into(),
            "port",
        ),
        (r#"{"service_name":"a","port":-80}"#.into(), "port"),
        (r#"{"service_name":"a","port":80.5}"#.into(), "port"),
        (r#"{"service_name":"a","port":8e1}"#.into(), "port"),
        (
            r#"{"service_name":"a","port":80,"ttl_seconds":1e10}"#.into(),
            "ttl_seconds",
        ),
        (
            r#"{"service_name":"a","port":80,"ttl_seconds":4294967356}"#.into(),
            "ttl_seconds",
        ),
        (
            r#"{"service_name":"a","port":80,"service_name":"b"}"#.into(),
            "body",
        ),
        (
            r#"{"service_name":"a","port":80,"metadata":{"k":"1","k":"2"}}"#.into(),
            "body",
        ),
        (
            r#"{"service_name":"a","port":80,"\u0070ort":81}"#.into(),
            "body",
        ),
        (r#"{"service_name":"a","port":80} trailing"#.into(), "body"),
        (
            "\u{feff}{\"service_name\":\"a\",\"port\":80}".into(),
            "body",
        ),
        (
            "{\"service_name\":\"a\",\"port\":80,\"x\":\"\\ud800\"}".into(),
            "body",
        ),
    ];
    for (body, field) in cases {
        let short: String = body.chars().take(80).collect();
        let (status, text) = post_raw(&c, body).await;
        assert_error((status, &text), 400, "invalid_request", Some(field), &short);
    }
    // A heartbeat with a duplicate key, too.
    let r = c
        .http
        .post(format!("{}/heartbeat", c.url(1)))
        .header("content-type", "application/json")
        .body(r#"{"service_name":"keep","service_name":"x"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(state(&c, &c.http).await, before);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invisible_and_look_alike_characters_are_refused() {
    let c = TestCluster::start(1).await;
    c.wait_for_leader().await;
    let before = state(&c, &c.http).await;
    let hostile = [
        "p\u{0430}yments", // Cyrillic а
        "\u{ff50}ayments", // fullwidth p
        "pay\u{200d}ments",
        "pay\u{200b}ments",
        "pay\u{202e}stnem",
        "pay\u{2066}ments",
        "pay\u{feff}ments",
        "pay\0ments",
        "pay\nments",
        "pay\r\nX: y",
        "pay\u{85}ments",
        "pay\u{7f}ments",
    ];
    for s in hostile {
        let base = json!({"service_name": "svc", "port": 80});
        let with = |k: &str, v: Value| {
            let mut b = base.clone();
            b[k] = v;
            b
        };
        let cases = [
            (with("service_name", json!(s)), "service_name"),
            (with("instance_id", json!(s)), "instance_id"),
            (with("host", json!(s)), "host"),
            (
                with("health_endpoint", json!(format!("/{s}"))),
                "health_endpoint",
            ),
            (with("metadata", json!({ s: "v" })), "metadata"),
        ];
        for (body, field) in cases {
            let (status, err) = c.post(1, "/register", &body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body} → {err}");
            assert_eq!(err["field"], field, "{body} → {err}");
        }
        let (status, err) = c
            .post(
                1,
                "/heartbeat",
                &json!({"service_name": "svc", "instance_id": s}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{s:?} → {err}");
    }
    // Metadata values are free text: hidden characters are refused...
    for s in &hostile[2..] {
        let body = json!({"service_name": "svc", "port": 80, "metadata": {"k": s}});
        let (status, err) = c.post(1, "/register", &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{s:?} → {err}");
        assert_eq!(err["field"], "metadata");
    }
    assert_eq!(state(&c, &c.http).await, before);
    // ...visible non-ASCII letters are not.
    let body = json!({"service_name": "svc", "port": 80, "host": "10.0.0.1",
        "metadata": {"owner": "équipe пайментс 支付 ＡＢＣ 🙂"}});
    let (status, got) = c.post(1, "/register", &body).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["metadata"]["owner"], "équipe пайментс 支付 ＡＢＣ 🙂");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_bombs_are_refused_and_the_limits_themselves_pass() {
    let c = TestCluster::start(1).await;
    c.wait_for_leader().await;
    let before = state(&c, &c.http).await;
    let reg = |metadata: Value| json!({"service_name": "m", "port": 80, "host": "h", "metadata": metadata});
    let many: serde_json::Map<String, Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let total: serde_json::Map<String, Value> = (0..9)
        .map(|i| (format!("k{i}"), json!("v".repeat(1000))))
        .collect();
    for (what, metadata) in [
        ("65 keys", Value::Object(many)),
        ("long key", json!({ "k".repeat(129): "v" })),
        ("long value", json!({"k": "v".repeat(1025)})),
        ("9 KB in all", Value::Object(total)),
        ("nested", json!({"k": {"a": "b"}})),
        ("number", json!({"k": 1})),
        ("empty key", json!({"": "v"})),
        ("space in key", json!({"a b": "v"})),
    ] {
        let (status, err) = c.post(1, "/register", &reg(metadata)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {err}");
        assert_eq!(err["field"], "metadata", "{what}: {err}");
    }
    assert_eq!(state(&c, &c.http).await, before);
    let at_limit: serde_json::Map<String, Value> =
        (0..64).map(|i| (format!("{i:0>128}"), json!(""))).collect();
    let (status, err) = c.post(1, "/register", &reg(Value::Object(at_limit))).await;
    assert_eq!(status, StatusCode::OK, "64 keys of 128 bytes: {err}");
    let near_total: serde_json::Map<String, Value> = (0..8)
        .map(|i| (format!("k{i}"), json!("v".repeat(1020))))
        .collect();
    let (status, err) = c
        .post(1, "/register", &reg(Value::Object(near_total)))
        .await;
    assert_eq!(status, StatusCode::OK, "8 values of 1020 bytes: {err}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_on_the_registry_are_400_and_change_nothing() {
    let c = TestCluster::start(1).await;
    c.wait_for_leader().await;
    c.register(1, "keep", 1).await;
    let addr = c.addrs[&1];
    let before = state(&c, &c.http).await;
    for (method, path) in [
        ("DELETE", "/deregister/..%2F..%2Fetc"),
        ("DELETE", "/deregister/%2e%2e"),
        ("DELETE", "/deregister/%2E"),
        ("DELETE", "/deregister/.."),
        ("DELETE", "/deregister/%252e%252e"),
        ("DELETE", "/deregister/keep%00"),
        ("DELETE", "/deregister/keep%0d%0aX:%20y"),
        ("DELETE", "/deregister/keep?instance_id=a%0d%0ab"),
        ("DELETE", "/deregister/keep?instance_id=..%2f..%2fx"),
        ("DELETE", "/deregister/keep?instance_id=%ff%fe"),
        ("DELETE", "/deregister/keep%2fx"),
        ("DELETE", "/deregister/k%C3%A9ep"),
        ("GET", "/services/a%00b"),
        ("GET", "/services/%2e%2e"),
        ("GET", "/services/p%D0%B0yments"),
        ("GET", "/services/%EF%BD%90ayments"),
        ("GET", "/services/keep%E2%80%8D"),
        ("GET", "/services/%ff"),
    ] {
        let (code, body) = raw(addr, raw_request(addr, method, path)).await;
        assert_error((code, &body), 400, "invalid_request", None, path);
    }
    // Segments that are not one name: no route.
    for path in ["/deregister/keep/..", "/services/keep/../../etc"] {
        let (code, body) = raw(addr, raw_request(addr, "DELETE", path)).await;
        assert!(code == 404 || code == 405, "{path}: {code} {body}");
    }
    assert_eq!(state(&c, &c.http).await, before);
    c.wait_for_service(1, "keep").await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_on_the_gateway_are_400_and_nothing_is_forwarded() {
    let c = TestCluster::start(1).await;
    c.wait_for_leader().await;
    // An upstream that only counts connections.
    let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = upstream.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let counter = tokio::spawn(async move {
        while let Ok((_s, _)) = upstream.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    let (s, b) = c
        .post(
            1,
            "/register",
            &json!({"service_name": "svc", "port": port, "host": "127.0.0.1"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let mut cfg = vertice_register::gateway::GatewayConfig::new(vec![c.url(1)])
        .with_env_map(Default::default());
    cfg.timeout = Duration::from_secs(2);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gw = vertice_register::gateway::start(l, cfg).await.unwrap();
    let gaddr = gw.addr;
    for path in [
        "/v2/svc/../admin",
        "/v2/svc/a/%2e%2e/admin",
        "/v2/svc/a/%2E%2e%2fadmin",
        "/v2/svc/%252e%252e/admin",
        "/v2/svc/a%2fb",
        "/v2/svc/a%252fb",
        "/v2/svc/a\\b",
        "/v2/svc/a%5c..%5cb",
        "/v2/svc/http://evil.example/",
        "/v2/svc//evil.example/x",
        "/v2/svc/a%0d%0aSet-Cookie:%20x=1",
        "/v2/svc/a%00b",
        "/v2/../svc/x",
        "/v2/%2e%2e/x",
        "/v2/sv%63/x",
        "/v2/p%D0%B0yments/x",
    ] {
        let (code, body) = raw(gaddr, raw_request(gaddr, "GET", path)).await;
        assert_eq!(code, 400, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: {body}"));
        assert_eq!(v["error"], "bad_request", "{path}: {v}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0, "something was forwarded");
    counter.abort();
    gw.shutdown().await;
    c.shutdown().await;
}
