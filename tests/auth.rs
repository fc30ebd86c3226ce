//! API tokens and the audit log against in-process nodes: who may read,
//! write and change membership; forwarding re-checked by the leader; the
//! client library, the gateway and the `cluster` subcommand with a token;
//! the audit log's lines; token files a node refuses to start with.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use common::{send, wait_for, TestCluster, SECRET};
use reqwest::header::HeaderMap;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use vertice_register::client::{ClientError, ClientOptions, Registration, RegistryClient};
use vertice_register::config::NodeArgs;
use vertice_register::node::RunningNode;

const DEPLOYER: &str = "deployer-token-4f9a1c2b";
const READER: &str = "reader-token-77d0e3aa";
const ADMIN: &str = "admin-token-1b2c3d4e5f";
const ANYWRITER: &str = "any-writer-token-9e8d7c";

fn token_file(dir: &Path) -> PathBuf {
    let path = dir.join("tokens.json");
    let body = json!({"tokens": [
        {"id": "deployer", "token": DEPLOYER, "role": "write", "services": ["payments"]},
        {"id": "reader", "token": READER, "role": "read"},
        {"id": "ops", "token": ADMIN, "role": "admin"},
        {"id": "ci", "token": ANYWRITER, "role": "write"},
    ]});
    std::fs::write(&path, body.to_string()).unwrap();
    path
}

fn audit_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("audit-{id}.log"))
}

/// A cluster of `n` whose nodes require the tokens of [`token_file`] and
/// write audit logs into `dir`.
async fn secured(n: u64, dir: &Path, public: &[&str]) -> TestCluster {
    let tokens = token_file(dir);
    let dir = dir.to_path_buf();
    let public: Vec<String> = public.iter().map(|s| s.to_string()).collect();
    TestCluster::start_tuned(
        n,
        Arc::new(move |a: &mut NodeArgs| {
            a.tokens = Some(tokens.clone());
            a.public_routes = public.clone();
            a.audit_log = Some(audit_path(&dir, a.id));
        }),
    )
    .await
}

/// Requests to a cluster's nodes as one caller: with a bearer token, or
/// (`token: None`) without one.
#[derive(Clone, Copy)]
struct User<'a> {
    c: &'a TestCluster,
    token: Option<&'a str>,
}

impl<'a> User<'a> {
    fn new(c: &'a TestCluster, token: Option<&'a str>) -> Self {
        Self { c, token }
    }

    fn request(&self, id: u64, method: Method, path: &str) -> reqwest::RequestBuilder {
        let req = self
            .c
            .http
            .request(method, format!("{}{path}", self.c.url(id)));
        match self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// (status, headers, body).
    async fn call(
        &self,
        id: u64,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, HeaderMap, Value) {
        let mut req = self.request(id, method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        send(req).await
    }

    /// The body as text, whatever the status.
    async fn text(&self, id: u64, path: &str) -> String {
        let r = self.request(id, Method::GET, path).send().await.unwrap();
        r.text().await.unwrap()
    }

    async fn get(&self, id: u64, path: &str) -> (StatusCode, Value) {
        let (status, _, body) = self.call(id, Method::GET, path, None).await;
        (status, body)
    }

    async fn post(&self, id: u64, path: &str, body: Value) -> (StatusCode, Value) {
        let (status, _, body) = self.call(id, Method::POST, path, Some(body)).await;
        (status, body)
    }

    async fn delete(&self, id: u64, path: &str) -> (StatusCode, Value) {
        let (status, _, body) = self.call(id, Method::DELETE, path, None).await;
        (status, body)
    }
}

fn registration(service: &str, port: u16) -> Value {
    json!({"service_name": service, "port": port, "host": "10.4.4.4"})
}

/// The audit log's events, parsed.
fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every audit line is JSON"))
        .collect()
}

/// Waits until the audit log at `path` has an event matching `pred`.
async fn wait_for_audit(path: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    wait_for(what, Duration::from_secs(20), || {
        let found = audit_lines(path).into_iter().find(|e| pred(e));
        async move { found }
    })
    .await
}

fn assert_event_shape(e: &Value) {
    for field in [
        "time",
        "node",
        "caller",
        "token_id",
        "operation",
        "target",
        "result",
    ] {
        assert!(e.get(field).is_some(), "audit event lacks {field}: {e}");
    }
    assert!(
        chrono::DateTime::parse_from_rfc3339(e["time"].as_str().unwrap()).is_ok(),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_reads_writes_forwarding_and_cluster_routes() {
    let dir = tempfile::tempdir().unwrap();
    let c = secured(3, dir.path(), &[]).await;
    let leader = c.wait_for_leader().await;
    let follower = c.follower_of(leader);
    let anonymous = User::new(&c, None);
    let reader = User::new(&c, Some(READER));
    let deployer = User::new(&c, Some(DEPLOYER));
    let admin = User::new(&c, Some(ADMIN));

    // /health stays open.
    let (s, _) = anonymous.get(follower, "/health").await;
    assert_eq!(s, StatusCode::OK);

    // No token, a wrong token: 401 JSON with WWW-Authenticate.
    for token in [None, Some("not-a-valid-token-at-all")] {
        let user = User::new(&c, token);
        let (s, h, body) = user.call(follower, Method::GET, "/services", None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{token:?}: {body}");
        assert_eq!(body["error"], "unauthorized");
        assert!(h["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer"));
        let (s, _) = user
            .post(follower, "/register", registration("payments", 1))
            .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }

    // A read token reads, but may not write.
    let (s, body) = reader.get(follower, "/services").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body, json!([]));
    let (s, _) = reader.get(leader, "/metrics").await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = reader
        .post(follower, "/register", registration("payments", 1))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "forbidden");

    // A write token limited to `payments`: payments yes, orders no.
    let (s, body) = deployer
        .post(leader, "/register", registration("payments", 8001))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = deployer
        .post(leader, "/register", registration("orders", 8002))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(body["message"].as_str().unwrap().contains("orders"));
    let heartbeat = |service: &str| json!({ "service_name": service });
    let (s, _) = deployer
        .post(follower, "/heartbeat", heartbeat("orders"))
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _) = deployer.delete(follower, "/deregister/orders").await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // The refusal changed nothing.
    let (s, body) = reader.get(follower, "/services?consistent=true").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(body, json!(["payments"]));

    // Through a follower: forwarded with the caller's token, and allowed.
    let (s, body) = deployer
        .post(follower, "/register", registration("payments-eu", 8003))
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, _) = deployer
        .post(follower, "/heartbeat", heartbeat("payments-eu"))
        .await;
    assert_eq!(s, StatusCode::OK);

    // The leader checks a forwarded write again, whatever the sender says:
    // forged envelopes (with the cluster secret, as a node would send them).
    let raft_write = |body: Value| {
        c.http
            .post(format!("{}/raft/write", c.url(leader)))
            .header("x-cluster-secret", SECRET)
            .json(&body)
            .send()
    };
    let write = json!({"Register": {"service_name": "orders", "port": 9, "host": "10.0.0.9",
        "health_endpoint": "/health", "metadata": {}, "instance_id": null, "ttl_seconds": 60}});
    for (token, status) in [
        (json!(READER), 403),
        (json!(DEPLOYER), 403),
        (json!("forged-token-000000000"), 401),
        (Value::Null, 401),
    ] {
        let envelope =
            json!({"write": write, "token": token, "caller": "6.6.6.6:6", "via": follower});
        let r = raft_write(envelope).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let reply: Value = r.json().await.unwrap();
        assert_eq!(reply["Refused"]["status"], status, "{token}: {reply}");
    }
    // An old-style bare request carries no token: refused too.
    let reply: Value = raft_write(write.clone())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(reply["Refused"]["status"], 401, "{reply}");
    // A token that may write `orders` goes through.
    let envelope =
        json!({"write": write, "token": ANYWRITER, "caller": "6.6.6.6:6", "via": follower});
    let reply: Value = raft_write(envelope).await.unwrap().json().await.unwrap();
    assert!(reply.get("Done").is_some(), "{reply}");
    // Batched forwarding (/raft/writes): each write of one call is checked
    // on its own and answered in order.
    let batch = json!([
        {"write": write, "token": READER, "caller": "6.6.6.6:6", "via": follower},
        {"write": write, "token": ANYWRITER, "caller": "6.6.6.6:6", "via": follower},
        write,
        {"write": write, "token": "forged-token-000000000", "caller": "6.6.6.6:6", "via": follower},
    ]);
    let r = c
        .http
        .post(format!("{}/raft/writes", c.url(leader)))
        .header("x-cluster-secret", SECRET)
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let replies: Value = r.json().await.unwrap();
    assert_eq!(replies[0]["Refused"]["status"], 403, "{replies}");
    assert!(replies[1].get("Done").is_some(), "{replies}");
    assert_eq!(replies[2]["Refused"]["status"], 401, "{replies}");
    assert_eq!(replies[3]["Refused"]["status"], 401, "{replies}");
    assert_eq!(replies.as_array().unwrap().len(), 4);
    // Without the cluster secret, both are closed whatever the token.
    for path in ["/raft/write", "/raft/writes"] {
        let r = c
            .http
            .post(format!("{}{path}", c.url(leader)))
            .bearer_auth(ADMIN)
            .json(&json!({"write": write, "token": ADMIN}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
    }

    // A deregister through the follower.
    let (s, body) = deployer
        .delete(follower, "/deregister/payments?instance_id=10.4.4.4:8001")
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");

    // Cluster routes: the secret as before, or an admin token instead.
    let (s, body) = c
        .cluster(follower, Method::GET, "/cluster/status", None)
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, body) = admin.get(follower, "/cluster/status").await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["members"].as_array().unwrap().len(), 3);
    let (s, body) = User::new(&c, Some(ANYWRITER))
        .get(follower, "/cluster/status")
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    let (s, h, _) = anonymous
        .call(follower, Method::GET, "/cluster/status", None)
        .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    assert!(h.contains_key("www-authenticate"));
    // A membership change with an admin token through a follower is audited
    // on both nodes (here: removing a node that is not a member: 404).
    let (s, _) = admin.delete(follower, "/cluster/nodes/42").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // The `cluster` subcommand with a token and no secret.
    let args = vertice_register::config::ClusterArgs {
        action: vertice_register::config::ClusterAction::Status,
        remote: vertice_register::config::RemoteArgs {
            registry: vec![c.url(follower)],
            cluster_secret: None,
            token: Some(ADMIN.into()),
            tls_ca: None,
        },
    };
    let table = vertice_register::admin::run(&args).await.unwrap();
    assert!(table.starts_with(&format!("leader {leader}")), "{table}");
    let args = vertice_register::config::ClusterArgs {
        remote: vertice_register::config::RemoteArgs {
            token: Some(READER.into()),
            ..args.remote
        },
        ..args
    };
    assert!(matches!(
        vertice_register::admin::run(&args).await,
        Err(vertice_register::admin::AdminError::Refused { status: 403, .. })
    ));

    // Refusals are counted.
    let _ = anonymous.get(follower, "/metrics").await;
    let text = reader.text(follower, "/metrics").await;
    for reason in ["missing_token", "invalid_token", "role", "service"] {
        assert!(
            text.contains(&format!(
                "registry_auth_refused_total{{reason=\"{reason}\"}}"
            )),
            "no {reason} in\n{text}"
        );
    }

    // The audit logs.
    let leader_log = audit_path(dir.path(), leader);
    let follower_log = audit_path(dir.path(), follower);
    let e = wait_for_audit(&leader_log, "the leader's register", |e| {
        e["operation"] == "register" && e["target"] == "payments/10.4.4.4:8001"
    })
    .await;
    assert_event_shape(&e);
    assert_eq!(e["result"], "ok");
    assert_eq!(e["token_id"], "deployer");
    assert_eq!(e["node"], leader);
    assert!(
        e["caller"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{e}"
    );
    let e = wait_for_audit(&leader_log, "the leader's refusal of orders", |e| {
        e["operation"] == "register" && e["target"] == "orders/10.4.4.4:8002"
    })
    .await;
    assert_eq!(e["result"], "refused: service");
    assert_eq!(e["status"], 403);
    assert_eq!(e["token_id"], "deployer");
    // The forged envelopes were refused at the leader and audited there.
    let e = wait_for_audit(&leader_log, "a forged forward refused", |e| {
        e["caller"] == "6.6.6.6:6" && e["token_id"] == "reader"
    })
    .await;
    assert_eq!(e["result"], "refused: role");
    assert_eq!(e["via"], follower);
    // The forwarded register: on the follower (caller) and the leader (via).
    let e = wait_for_audit(&follower_log, "the follower's forwarded register", |e| {
        e["operation"] == "register" && e["target"] == "payments-eu/10.4.4.4:8003"
    })
    .await;
    assert_event_shape(&e);
    assert_eq!(e["result"], "ok");
    assert_eq!(e["node"], follower);
    let e = wait_for_audit(&leader_log, "the leader's forwarded register", |e| {
        e["operation"] == "register" && e["target"] == "payments-eu/10.4.4.4:8003"
    })
    .await;
    assert_eq!(e["via"], follower);
    assert_eq!(e["token_id"], "deployer");
    let e = wait_for_audit(&follower_log, "the deregister", |e| {
        e["operation"] == "deregister" && e["result"] == "ok"
    })
    .await;
    assert_event_shape(&e);
    assert_eq!(e["target"], "payments/10.4.4.4:8001");
    assert_eq!(e["token_id"], "deployer");
    let e = wait_for_audit(&follower_log, "the refused deregister", |e| {
        e["operation"] == "deregister" && e["status"] == 403
    })
    .await;
    assert_eq!(e["target"], "orders");
    assert_eq!(e["result"], "refused: service");
    let e = wait_for_audit(&follower_log, "a 401", |e| {
        e["result"] == "refused: missing_token"
    })
    .await;
    assert_event_shape(&e);
    assert_eq!(e["token_id"], Value::Null);
    assert_eq!(e["status"], 401);
    wait_for_audit(&follower_log, "the membership request", |e| {
        e["operation"] == "cluster.remove" && e["token_id"] == "ops" && e["status"] == 404
    })
    .await;
    wait_for_audit(&leader_log, "the membership request at the leader", |e| {
        e["operation"] == "cluster.remove" && e["via"] == follower
    })
    .await;
    // Heartbeats are not audited; their refusals are.
    assert!(!audit_lines(&leader_log)
        .iter()
        .chain(audit_lines(&follower_log).iter())
        .any(|e| e["operation"] == "heartbeat" && e["result"] == "ok"));
    wait_for_audit(&follower_log, "a refused heartbeat", |e| {
        e["operation"] == "heartbeat" && e["status"] == 403
    })
    .await;
    // No token ever reaches a log.
    for path in [&leader_log, &follower_log] {
        let text = std::fs::read_to_string(path).unwrap();
        for t in [DEPLOYER, READER, ADMIN, ANYWRITER] {
            assert!(!text.contains(t), "a token in {}", path.display());
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_routes_client_gateway_and_expiry_audit() {
    let dir = tempfile::tempdir().unwrap();
    let c = secured(1, dir.path(), &["/metrics"]).await;
    c.wait_for_leader().await;

    // --public-routes /metrics: metrics open, the rest not.
    let anonymous = User::new(&c, None);
    let (s, _) = anonymous.get(1, "/metrics").await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = anonymous.get(1, "/services").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // The client library sends its token.
    let with = |token: Option<&str>| {
        RegistryClient::with_options(
            [c.url(1)],
            ClientOptions {
                token: token.map(Into::into),
                retry_budget: Duration::from_secs(2),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let none = with(None);
    assert!(matches!(
        none.services().await,
        Err(ClientError::Rejected { status: 401, .. })
    ));
    let writer = with(Some(DEPLOYER));
    let upstream = upstream().await;
    let reg = Registration {
        service_name: "payments".into(),
        host: Some("127.0.0.1".into()),
        port: upstream.port(),
        ttl_seconds: Some(60),
        ..Default::default()
    };
    let stored = writer.register(&reg).await.unwrap();
    assert_eq!(stored.service_name, "payments");
    assert!(matches!(
        writer
            .register(&Registration {
                service_name: "orders".into(),
                ..reg.clone()
            })
            .await,
        Err(ClientError::Rejected { status: 403, .. })
    ));
    assert_eq!(writer.services().await.unwrap(), vec!["payments"]);
    assert_eq!(writer.heartbeat("payments", None).await.unwrap(), 1);

    // The gateway with a read token routes; without one it cannot look up.
    let mut cfg = vertice_register::gateway::GatewayConfig::new(vec![c.url(1)])
        .with_env_map(Default::default());
    cfg.registry_timeout = Duration::from_secs(1);
    let mut open_cfg = cfg.clone();
    cfg.token = Some(READER.into());
    assert!(!format!("{cfg:?}").contains(READER));
    open_cfg.token = None;
    for (cfg, want) in [
        (cfg, StatusCode::OK),
        (open_cfg, StatusCode::SERVICE_UNAVAILABLE),
    ] {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = vertice_register::gateway::start(l, cfg).await.unwrap();
        let r = c
            .http
            .get(format!("{}/v2/payments/hello", gw.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want);
        if want == StatusCode::OK {
            assert_eq!(r.text().await.unwrap(), "hello");
        }
        gw.shutdown().await;
    }

    // An expiry round is audited on the leader: count and instances.
    let short = Registration {
        service_name: "payments".into(),
        host: Some("10.5.5.5".into()),
        port: 7,
        ttl_seconds: Some(5),
        ..Default::default()
    };
    writer.register(&short).await.unwrap();
    let e = wait_for_audit(&audit_path(dir.path(), 1), "an expiry round", |e| {
        e["operation"] == "expire"
    })
    .await;
    assert_event_shape(&e);
    assert_eq!(e["count"], 1);
    assert_eq!(e["target"], json!(["payments/10.5.5.5:7"]));
    assert_eq!(e["token_id"], Value::Null);
    c.shutdown().await;
}

/// A tiny upstream answering `hello` on every path; lives for the test.
async fn upstream() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let app = axum::Router::new().fallback(get(|| async { "hello" }));
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    addr
}

async fn start_err(dir: &Path, tune: impl FnOnce(&mut NodeArgs)) -> String {
    let mut a = NodeArgs {
        data_dir: tempfile::tempdir_in(dir).unwrap().keep(),
        cluster_secret: Some(SECRET.into()),
        ..Default::default()
    };
    tune(&mut a);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    a.addr = l.local_addr().unwrap().to_string();
    match RunningNode::start(a, l).await {
        Ok(node) => {
            node.shutdown().await;
            panic!("the node started");
        }
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_errors_refuse_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        (d.join("missing.json"), "cannot read it"),
        (
            file_with(d, "bad.json", "{\"tokens\": "),
            "not a valid token file",
        ),
        (
            file_with(
                d,
                "dup-id.json",
                r#"{"tokens":[{"id":"a","token":"0123456789abcdef","role":"read"},{"id":"a","token":"0123456789abcdeX","role":"read"}]}"#,
            ),
            "appears twice",
        ),
        (
            file_with(
                d,
                "dup-token.json",
                r#"{"tokens":[{"id":"a","token":"0123456789abcdef","role":"read"},{"id":"b","token":"0123456789abcdef","role":"read"}]}"#,
            ),
            "another entry's token",
        ),
        (
            file_with(
                d,
                "role.json",
                r#"{"tokens":[{"id":"a","token":"0123456789abcdef","role":"owner"}]}"#,
            ),
            "unknown variant",
        ),
        (
            file_with(
                d,
                "empty.json",
                r#"{"tokens":[{"id":"a","token":"","role":"read"}]}"#,
            ),
            "the token is empty",
        ),
        (
            file_with(
                d,
                "short.json",
                r#"{"tokens":[{"id":"a","token":"0123456789","role":"read"}]}"#,
            ),
            "shorter than 16",
        ),
    ];
    for (path, needle) in cases {
        let err = start_err(d, |a| a.tokens = Some(path.clone())).await;
        assert!(
            err.contains(needle),
            "{}: '{err}' lacks '{needle}'",
            path.display()
        );
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
    // Tokens without a cluster secret would leave /raft/* open.
    let good = token_file(d);
    let err = start_err(d, |a| {
        a.tokens = Some(good.clone());
        a.cluster_secret = None;
    })
    .await;
    assert!(err.contains("--cluster-secret"), "{err}");
    // A route that may not be public.
    let err = start_err(d, |a| {
        a.tokens = Some(good.clone());
        a.public_routes = vec!["/register".into()];
    })
    .await;
    assert!(err.contains("cannot be public"), "{err}");
    // An audit log that cannot be opened.
    let err = start_err(d, |a| a.audit_log = Some(d.join("no/such/dir/audit.log"))).await;
    assert!(err.contains("audit log"), "{err}");
}

fn file_with(d: &Path, name: &str, text: &str) -> PathBuf {
    let p = d.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tokens_the_api_stays_open() {
    let c = TestCluster::start(1).await;
    c.wait_for_leader().await;
    c.register(1, "payments", 1).await;
    let (s, _, _) = c.get(1, "/services").await;
    assert_eq!(s, StatusCode::OK);
    // The cluster routes still need the secret, and a bearer token does not replace it.
    let (s, _) = User::new(&c, Some(ADMIN)).get(1, "/cluster/status").await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = c.cluster(1, Method::GET, "/cluster/status", None).await;
    assert_eq!(s, StatusCode::OK);
    c.shutdown().await;
}
