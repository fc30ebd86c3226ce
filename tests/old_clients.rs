//! The old registry's clients, unchanged, against a three-node cluster.
//!
//! Every request here is what the old Python client sends, byte for byte:
//! the body as `json.dumps` writes it (no `port`, no `host`, no
//! `instance_id`, no `ttl_seconds`), `Content-Type: application/json` and
//! `X-Registry-Token: titanium-registry-token`; lookups are read the way the
//! old gateway reads them (`endpoint` at the top level). The two replicas of
//! one service connect from their own loopback addresses (127.0.0.2 and
//! 127.0.0.3), as two containers would.
//!
//! Shown to fail on a broken build: with name-only deregistration scoped to
//! nothing (`origin: None` in the handler, the behaviour before), replica
//! A's shutdown removed replica B too and the test failed at "B survives
//! A's shutdown"; with revival disabled (`HeartbeatTargets::Expired`
//! answered as `NotFound`) it failed at "revived by its heartbeat".

mod common;

use std::time::Duration;

use common::{wait_for, TestCluster};
use reqwest::StatusCode;
use serde_json::Value;

const SERVICE: &str = "osint_service";
const TOKEN: &str = "titanium-registry-token";
/// Old clients never send a TTL: the nodes' default decides.
const TTL: u32 = 5;

/// One replica of an old service: its container's host name and the
/// address its connections come from.
struct OldClient {
    http: reqwest::Client,
    hostname: &'static str,
}

impl OldClient {
    fn new(ip: &str, hostname: &'static str) -> Self {
        Self {
            http: common::client_from(ip),
            hostname,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (StatusCode, Value) {
        let (s, _, v) = common::send(req.header("X-Registry-Token", TOKEN)).await;
        (s, v)
    }

    /// `RegistryClient.register`, as the old module sends it.
    async fn register(&self, base: &str) -> (StatusCode, Value) {
        let body = format!(
            r#"{{"service_name": "{SERVICE}", "endpoint": "http://{}:8049", "health_endpoint": "/health", "metadata": {{"version": "1.0.0"}}}}"#,
            self.hostname
        );
        let req = self
            .http
            .post(format!("{base}/register"))
            .header("Content-Type", "application/json")
            .body(body);
        self.send(req).await
    }

    /// `RegistryClient.heartbeat`: the name only.
    async fn heartbeat(&self, base: &str) -> (StatusCode, Value) {
        let req = self
            .http
            .post(format!("{base}/heartbeat"))
            .header("Content-Type", "application/json")
            .body(format!(r#"{{"service_name": "{SERVICE}"}}"#));
        self.send(req).await
    }

    /// `RegistryClient.deregister(name)`: the name only.
    async fn deregister(&self, base: &str) -> (StatusCode, Value) {
        let req = self.http.delete(format!("{base}/deregister/{SERVICE}"));
        self.send(req).await
    }
}

/// The old gateway's lookup: `GET /services/{name}`, then `endpoint`.
async fn gateway_lookup(c: &TestCluster, node: u64) -> Option<(String, Value)> {
    let (s, _, body) =
        common::get_json(&c.http, &format!("{}/services/{SERVICE}", c.url(node))).await;
    if s == StatusCode::NOT_FOUND {
        return None;
    }
    assert_eq!(s, StatusCode::OK, "{body}");
    let endpoint = body["endpoint"]
        .as_str()
        .unwrap_or_else(|| panic!("the old gateway needs `endpoint`: {body}"))
        .to_string();
    assert!(body["registered_at"].is_number(), "{body}");
    assert!(body["last_heartbeat"].is_number(), "{body}");
    assert!(body["ttl_remaining"].is_u64(), "{body}");
    Some((endpoint, body))
}

fn endpoints(body: &Value) -> Vec<String> {
    let mut v: Vec<String> = body["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["endpoint"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_old_client_and_gateway_work_unchanged() {
    let c = TestCluster::start_with(3, |a| a.default_ttl_secs = TTL).await;
    c.wait_for_leader().await;
    let a = OldClient::new("127.0.0.2", "osint-a");
    let b = OldClient::new("127.0.0.3", "osint-b");
    let (url1, url2, url3) = (c.url(1), c.url(2), c.url(3));

    // Each replica registers through a different node; any 2xx is success.
    let (s, body) = a.register(&url1).await;
    assert!(s.is_success(), "{s} {body}");
    assert_eq!(body["message"], "Service registered successfully");
    assert_eq!(body["service_name"], SERVICE);
    assert_eq!(body["instance_id"], "osint-a:8049");
    assert_eq!(body["ttl_seconds"], TTL);
    let (s, body) = b.register(&url2).await;
    assert!(s.is_success(), "{s} {body}");

    // The old gateway finds the service on a third node.
    let (endpoint, body) = wait_for(
        "both replicas on node 3",
        Duration::from_secs(10),
        || async {
            gateway_lookup(&c, 3)
                .await
                .filter(|(_, b)| endpoints(b).len() == 2)
        },
    )
    .await;
    assert!(endpoint.starts_with("http://osint-"), "{endpoint}");
    assert_eq!(
        endpoints(&body),
        ["http://osint-a:8049", "http://osint-b:8049"]
    );
    let (s, _, list) = common::get_json(&c.http, &format!("{url1}/services")).await;
    assert_eq!((s, list), (StatusCode::OK, serde_json::json!([SERVICE])));

    // A name-only heartbeat renews the caller's own instance only.
    for (client, url) in [(&a, &url3), (&b, &url1)] {
        let (s, body) = client.heartbeat(url).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["message"], "Heartbeat received");
        assert_eq!(body["renewed"], 1, "{body}");
    }

    // A shuts down: its name-only deregistration removes A alone.
    let (s, body) = a.deregister(&url2).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["message"], "Service deregistered");
    assert_eq!(body["removed"], 1, "B survives A's shutdown: {body}");
    let (s, body) = b.heartbeat(&url3).await;
    assert_eq!(
        (s, &body["renewed"]),
        (StatusCode::OK, &Value::from(1)),
        "{body}"
    );
    let (endpoint, _) = gateway_lookup(&c, 1).await.expect("B is still registered");
    assert_eq!(endpoint, "http://osint-b:8049");

    // B is cut off for longer than its TTL: it expires...
    wait_for("B to expire", Duration::from_secs(30), || async {
        gateway_lookup(&c, 2).await.is_none().then_some(())
    })
    .await;
    // ...and its next heartbeat (an old client never registers again)
    // brings it back with its last registration.
    let (s, body) = b.heartbeat(&url2).await;
    assert_eq!(s, StatusCode::OK, "revived by its heartbeat: {body}");
    assert_eq!(
        body["revived"],
        serde_json::json!(["osint-b:8049"]),
        "{body}"
    );
    let (endpoint, body) = wait_for("B back on node 1", Duration::from_secs(10), || async {
        gateway_lookup(&c, 1).await
    })
    .await;
    assert_eq!(endpoint, "http://osint-b:8049");
    assert_eq!(body["metadata"]["version"], "1.0.0");
    let (s, body) = b.heartbeat(&url1).await;
    assert_eq!(
        (s, &body["renewed"]),
        (StatusCode::OK, &Value::from(1)),
        "{body}"
    );

    // A deregistered instance stays gone: no heartbeat brings it back.
    let (s, body) = b.deregister(&url1).await;
    assert_eq!(
        (s, &body["removed"]),
        (StatusCode::OK, &Value::from(1)),
        "{body}"
    );
    let (s, body) = b.heartbeat(&url3).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    wait_for("node 3 to see B gone", Duration::from_secs(10), || async {
        gateway_lookup(&c, 3).await.is_none().then_some(())
    })
    .await;

    // An instance that expired and was then deregistered stays gone too.
    let (s, _) = a.register(&url1).await;
    assert!(s.is_success());
    // Seen first, so that "gone" below is the expiry and not a read that
    // ran ahead of the registration reaching node 1.
    wait_for("node 1 to see A", Duration::from_secs(10), || async {
        gateway_lookup(&c, 1).await.map(|_| ())
    })
    .await;
    wait_for("A to expire", Duration::from_secs(30), || async {
        gateway_lookup(&c, 1).await.is_none().then_some(())
    })
    .await;
    let (s, body) = a.deregister(&url2).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "nothing live to remove: {body}");
    let (s, body) = a.heartbeat(&url3).await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "its tombstone went with the deregistration: {body}"
    );

    let text = c.metrics(c.wait_for_leader().await).await;
    assert!(
        common::metric(&text, "registry_revivals_total") >= 1.0,
        "{text}"
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_endpoints_are_refused_and_change_nothing() {
    let c = TestCluster::start(1).await;
    c.wait_for_leader().await;
    for bad in [
        "osint:8049",
        "http://osint",
        "http://osint:8049/api",
        "http://user:pw@osint:8049",
        "http://osint:65536",
        "http://bücher:8049",
    ] {
        let (s, body) = c
            .post(
                1,
                "/register",
                &serde_json::json!({"service_name": SERVICE, "endpoint": bad}),
            )
            .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {body}");
        assert_eq!(body["field"], "endpoint", "{bad}: {body}");
    }
    let (s, body) = c
        .post(
            1,
            "/register",
            &serde_json::json!({"service_name": SERVICE, "endpoint": "http://osint:8049", "port": 9}),
        )
        .await;
    assert_eq!(
        (s, &body["field"]),
        (StatusCode::BAD_REQUEST, &Value::from("port"))
    );
    let (s, _, list) = common::get_json(&c.http, &format!("{}/services", c.url(1))).await;
    assert_eq!((s, list), (StatusCode::OK, serde_json::json!([])));
    c.shutdown().await;
}

/// A proxy in front (the gateway's registry listener) passes the client's
/// address on in `X-Registry-Caller`; the node believes it only with the
/// cluster secret, so a client cannot pose as another address.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proxied_callers_address_is_trusted_only_with_the_secret() {
    let c = TestCluster::start(1).await;
    c.wait_for_leader().await;
    let register = |secret: &'static str| {
        c.http
            .post(format!("{}/register", c.url(1)))
            .header("X-Registry-Caller", "10.1.2.3:5555")
            .header("X-Cluster-Secret", secret)
            .json(&serde_json::json!({"service_name": SERVICE, "port": 8049}))
    };
    let (s, _, body) = common::send(register(common::SECRET)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["host"], "10.1.2.3", "{body}");
    let (s, _, body) = common::send(register("not-the-secret")).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["host"], "127.0.0.1", "{body}");
    c.shutdown().await;
}
