//! An in-process cluster of real nodes for integration tests: each node has
//! its own HTTP server on 127.0.0.1:0, its own temp dir and a fault switch.
//! Waits poll with deadlines; nothing sleeps blindly.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use vertice_register::config::{NodeArgs, Peers};
use vertice_register::node::RunningNode;
use vertice_register::raft::Faults;

pub const SECRET: &str = "test-secret";

/// Polls `f` until it returns `Some`, or panics after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client whose connections come from `ip` (any 127.x address works on
/// the loopback interface), so a test's source address is its own.
pub fn client_from(ip: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(15))
        .no_proxy()
        .build()
        .unwrap()
}

/// Sends `req`: (status, headers, the body as JSON, `Null` when it is not).
/// The value of the first line of Prometheus text `text` that starts with
/// `line_start` (a metric name with its labels); 0 when there is none.
pub fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

pub async fn send(req: reqwest::RequestBuilder) -> (StatusCode, HeaderMap, Value) {
    let r = req.send().await.unwrap();
    let (status, headers) = (r.status(), r.headers().clone());
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

/// `GET url`: (status, headers, the body as JSON, `Null` when it is not).
pub async fn get_json(http: &reqwest::Client, url: &str) -> (StatusCode, HeaderMap, Value) {
    send(http.get(url)).await
}

/// `GET url`: the body as text, whatever the status.
pub async fn get_text(http: &reqwest::Client, url: &str) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

/// Sends `bytes` as they are on a new connection and reads until the server
/// closes (at most 10 s): (status, body), status 0 when no response came
/// back (e.g. the server reset the connection after refusing the request).
pub async fn raw(addr: SocketAddr, bytes: Vec<u8>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = s.split();
    let write = async {
        let _ = wr.write_all(&bytes).await;
    };
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut out));
    let (_, r) = tokio::join!(write, read);
    assert!(r.is_ok(), "the server neither answered nor closed");
    let text = String::from_utf8_lossy(&out).to_string();
    let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// A request without a body, `path` byte for byte (an HTTP client would
/// normalise it), on a connection to close after it.
pub fn raw_request(addr: SocketAddr, method: &str, path: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").into_bytes()
}

/// GETs `url` from `http` until the answer is `429` (at most `tries`
/// times), asserting every answer before it is `200`, and that the `429`
/// is `too_many_requests` JSON with a `Retry-After` of 1 or 2 s: (those
/// seconds, the body).
pub async fn get_until_429(http: &reqwest::Client, url: &str, tries: usize) -> (u64, Value) {
    for _ in 0..tries {
        let r = http.get(url).send().await.unwrap();
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            let retry: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=2).contains(&retry), "Retry-After {retry}");
            let body: Value = r.json().await.unwrap();
            assert_eq!(body["error"], "too_many_requests", "{body}");
            return (retry, body);
        }
        assert_eq!(r.status(), StatusCode::OK);
    }
    panic!("{tries} requests at once to {url} never hit the rate limit");
}

/// A slowloris client: a `GET path` whose head arrives a byte every 200 ms
/// (for at most 20 s).
pub struct SlowHead {
    started: Instant,
    rd: tokio::net::tcp::OwnedReadHalf,
    trickle: tokio::task::JoinHandle<()>,
}

impl SlowHead {
    pub async fn start(addr: SocketAddr, path: &str) -> Self {
        let started = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Slow: ");
        s.write_all(head.as_bytes()).await.unwrap();
        let (rd, mut wr) = s.into_split();
        let trickle = tokio::spawn(async move {
            for _ in 0..100 {
                if wr.write_all(b"a").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self {
            started,
            rd,
            trickle,
        }
    }

    /// Waits (at most 8 s) until the server closes the connection, with no
    /// answer or a `408`: how long after the start that was.
    pub async fn closed(mut self) -> Duration {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(8), self.rd.read_to_end(&mut buf));
        assert!(
            read.await.is_ok(),
            "the slow connection was still open after 8 s"
        );
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 408"),
            "unexpected answer: {text}"
        );
        let took = self.started.elapsed();
        self.trickle.abort();
        took
    }
}

/// Adjusts a node's flags before it starts.
pub type Tune = Arc<dyn Fn(&mut NodeArgs) + Send + Sync>;

pub struct TestCluster {
    pub nodes: BTreeMap<u64, Option<RunningNode>>,
    pub addrs: BTreeMap<u64, SocketAddr>,
    pub faults: BTreeMap<u64, Arc<Faults>>,
    dirs: BTreeMap<u64, TempDir>,
    tune: Tune,
    pub http: reqwest::Client,
    /// `https` for nodes started with TLS (set it, and `http`, after start).
    pub scheme: &'static str,
}

impl TestCluster {
    pub async fn start(n: u64) -> Self {
        Self::start_with(n, |_| {}).await
    }

    /// Starts `n` voters; `tune` adjusts every node's flags.
    pub async fn start_with(n: u64, tune: fn(&mut NodeArgs)) -> Self {
        Self::start_tuned(n, Arc::new(tune)).await
    }

    /// Like [`TestCluster::start_with`], with a closure (it may capture,
    /// e.g. a token file's path).
    pub async fn start_tuned(n: u64, tune: Tune) -> Self {
        let mut listeners = BTreeMap::new();
        let mut addrs = BTreeMap::new();
        for id in 1..=n {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            addrs.insert(id, l.local_addr().unwrap());
            listeners.insert(id, l);
        }
        let mut cluster = Self {
            nodes: BTreeMap::new(),
            addrs,
            faults: (1..=n)
                .map(|id| (id, Arc::new(Faults::default())))
                .collect(),
            dirs: (1..=n)
                .map(|id| (id, tempfile::tempdir().unwrap()))
                .collect(),
            tune,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap(),
            scheme: "http",
        };
        for (id, l) in listeners {
            let node =
                RunningNode::start_with_faults(cluster.args(id), l, cluster.faults[&id].clone())
                    .await
                    .unwrap();
            cluster.nodes.insert(id, Some(node));
        }
        cluster
    }

    fn args(&self, id: u64) -> NodeArgs {
        let mut a = NodeArgs::default();
        a.id = id;
        a.addr = self.addrs[&id].to_string();
        a.data_dir = self.dirs[&id].path().to_path_buf();
        a.peers = Some(Peers(
            self.addrs
                .iter()
                .map(|(i, a)| (*i, a.to_string()))
                .collect(),
        ));
        a.cluster_secret = Some(SECRET.into());
        a.leader_wait_ms = 3000;
        (self.tune)(&mut a);
        a
    }

    pub fn url(&self, id: u64) -> String {
        format!("{}://{}", self.scheme, self.addrs[&id])
    }

    pub fn node(&self, id: u64) -> &RunningNode {
        self.nodes[&id].as_ref().expect("node is running")
    }

    pub fn running(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// Waits until every running, connected node names the same leader,
    /// and that leader is one of them.
    pub async fn wait_for_leader(&self) -> u64 {
        let ids: Vec<u64> = self
            .running()
            .into_iter()
            .filter(|id| !self.faults[id].is_isolated())
            .collect();
        wait_for(
            "a leader all running nodes agree on",
            Duration::from_secs(20),
            || {
                let ids = ids.clone();
                async move {
                    let leaders: Vec<Option<u64>> = ids
                        .iter()
                        .map(|id| self.node(*id).raft.metrics().borrow().current_leader)
                        .collect();
                    let first = leaders[0]?;
                    let agreed = leaders.iter().all(|l| *l == Some(first)) && ids.contains(&first);
                    let is_leader = agreed
                        && self.node(first).raft.metrics().borrow().state
                            == openraft::ServerState::Leader;
                    is_leader.then_some(first)
                }
            },
        )
        .await
    }

    pub fn follower_of(&self, leader: u64) -> u64 {
        self.running().into_iter().find(|id| *id != leader).unwrap()
    }

    /// Stops a node (in process: a graceful stop; the binary tests use kill -9).
    pub async fn stop(&mut self, id: u64) {
        if let Some(node) = self.nodes.get_mut(&id).and_then(Option::take) {
            node.shutdown().await;
        }
    }

    /// Starts a stopped node again on its old address and data dir.
    pub async fn restart(&mut self, id: u64) {
        let addr = self.addrs[&id];
        let args = self.args(id);
        let faults = self.faults[&id].clone();
        let node = wait_for("the node to start again", Duration::from_secs(20), || {
            let args = args.clone();
            let faults = faults.clone();
            async move {
                // The old listener and sled's file lock go away asynchronously.
                let l = TcpListener::bind(addr).await.ok()?;
                RunningNode::start_with_faults(args, l, faults).await.ok()
            }
        })
        .await;
        self.nodes.insert(id, Some(node));
    }

    /// Starts a brand-new node (fresh data dir) that asks node `via` to add it.
    pub async fn join_new_node(&mut self, id: u64, via: u64) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.addrs.insert(id, l.local_addr().unwrap());
        self.faults.insert(id, Arc::new(Faults::default()));
        self.dirs.insert(id, tempfile::tempdir().unwrap());
        let mut args = self.args(id);
        args.join = Some(self.url(via));
        let node = RunningNode::start_with_faults(args, l, self.faults[&id].clone())
            .await
            .unwrap();
        self.nodes.insert(id, Some(node));
    }

    /// An operator request to `/cluster/*` with the cluster secret.
    pub async fn cluster(
        &self,
        id: u64,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url(id)))
            .header("x-cluster-secret", SECRET);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let (status, _, body) = send(req).await;
        (status, body)
    }

    pub fn isolate(&self, id: u64, on: bool) {
        self.faults[&id].set_isolated(on);
    }

    pub async fn shutdown(mut self) {
        for id in self.running() {
            self.stop(id).await;
        }
    }

    pub async fn post(&self, id: u64, path: &str, body: &Value) -> (StatusCode, Value) {
        let url = format!("{}{path}", self.url(id));
        let (status, _, body) = send(self.http.post(url).json(body)).await;
        (status, body)
    }

    pub async fn get(
        &self,
        id: u64,
        path: &str,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        get_json(&self.http, &format!("{}{path}", self.url(id))).await
    }

    pub async fn delete(&self, id: u64, path: &str) -> (StatusCode, Value) {
        let url = format!("{}{path}", self.url(id));
        let (status, _, body) = send(self.http.delete(url)).await;
        (status, body)
    }

    /// Node `id`'s `/metrics` text.
    pub async fn metrics(&self, id: u64) -> String {
        get_text(&self.http, &format!("{}/metrics", self.url(id))).await
    }

    /// Registers `name` on node `id` and asserts success.
    pub async fn register(&self, id: u64, name: &str, port: u16) -> Value {
        let (status, body) = self
            .post(
                id,
                "/register",
                &serde_json::json!({"service_name": name, "port": port, "host": "10.1.2.3"}),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::OK,
            "register {name} on node {id}: {body}"
        );
        body
    }

    /// Waits until node `id`'s local replica serves `name`.
    pub async fn wait_for_service(&self, id: u64, name: &str) -> Value {
        wait_for(
            &format!("{name} on node {id}"),
            Duration::from_secs(15),
            || async {
                let (status, _, body) = self.get(id, &format!("/services/{name}")).await;
                (status == StatusCode::OK).then_some(body)
            },
        )
        .await
    }
}
