//! The client side of node-to-node Raft RPCs over HTTP.
//!
//! One shared `reqwest::Client` (connection pooling) sends bincode bodies to
//! `/raft/{append,vote,snapshot}` on the target. A refused connection is
//! reported as `Unreachable`, so openraft backs off instead of spinning.
//! [`Faults`] is the switch that tests use to cut a node off without touching
//! the OS network; the server side (`api::internal`) honours it too.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RemoteError, Unreachable};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Node, NodeId, RPCError, RaftError, TypeConfig};

/// Header that carries the cluster secret, between nodes and from operators.
pub const SECRET_HEADER: &str = "x-cluster-secret";

/// A fault switch for tests: when isolated, this node neither sends nor
/// accepts Raft RPCs or forwarded requests, as if its network were cut.
#[derive(Debug, Default)]
pub struct Faults {
    isolated: AtomicBool,
}

impl Faults {
    pub fn set_isolated(&self, on: bool) {
        self.isolated.store(on, Ordering::SeqCst);
    }

    pub fn is_isolated(&self) -> bool {
        self.isolated.load(Ordering::SeqCst)
    }
}

/// An error `reqwest` can produce while the fault switch is on.
#[derive(Debug, thiserror::Error)]
#[error("network cut by the test fault switch")]
pub struct Isolated;

/// The shared transport for every outgoing node-to-node request.
#[derive(Clone)]
pub struct Network {
    pub client: reqwest::Client,
    pub secret: Option<Arc<str>>,
    pub faults: Arc<Faults>,
    /// `https` when the node runs with TLS (then so do its peers).
    pub scheme: &'static str,
}

impl Network {
    /// `source`: the local address outgoing connections use (the kernel
    /// picks one when `None`). With `tls`, peers are called over HTTPS,
    /// presenting this node's certificate (see [`crate::tls`]).
    pub fn new(
        secret: Option<String>,
        faults: Arc<Faults>,
        source: Option<std::net::IpAddr>,
        tls: Option<&Arc<crate::tls::Tls>>,
    ) -> Self {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .local_address(source);
        if let Some(tls) = tls {
            builder = builder.use_preconfigured_tls(tls.client_config());
        }
        let client = builder
            .build()
            .expect("the HTTP client builds with static settings");
        Self {
            client,
            secret: secret.map(Arc::from),
            faults,
            scheme: if tls.is_some() { "https" } else { "http" },
        }
    }

    /// The URL of `path` (starting with `/`) on the node at `addr` (HOST:PORT).
    pub fn url(&self, addr: &str, path: &str) -> String {
        format!("{}://{addr}{path}", self.scheme)
    }

    /// A request to another node with the cluster secret attached.
    pub fn request(
        &self,
        method: reqwest::Method,
        url: impl reqwest::IntoUrl,
    ) -> reqwest::RequestBuilder {
        let req = self.client.request(method, url);
        match &self.secret {
            Some(s) => req.header(SECRET_HEADER, s.as_ref()),
            None => req,
        }
    }

    /// A POST to another node with the cluster secret attached.
    pub fn post(&self, url: impl reqwest::IntoUrl) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::POST, url)
    }

    async fn rpc<Req, Resp, E>(
        &self,
        target: NodeId,
        node: &Node,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        if self.faults.is_isolated() {
            return Err(RPCError::Unreachable(Unreachable::new(&Isolated)));
        }
        let body = bincode::serialize(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let resp = self
            .post(self.url(&node.addr, &format!("/raft/{path}")))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .timeout(timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    RPCError::Unreachable(Unreachable::new(&e))
                } else {
                    RPCError::Network(NetworkError::new(&e))
                }
            })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if !status.is_success() {
            let msg = String::from_utf8_lossy(&bytes).into_owned();
            let e = std::io::Error::other(format!("{status}: {msg}"));
            // A node that refuses us (wrong secret, cut off) is as good as
            // unreachable: back off rather than retry at once.
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        }
        let result: Result<Resp, RaftError<E>> =
            bincode::deserialize(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result
            .map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(target, node.clone(), e)))
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> Connection {
        Connection {
            net: self.clone(),
            target,
            node: node.clone(),
        }
    }
}

/// A connection to one peer; cheap, since the HTTP client pools sockets.
pub struct Connection {
    net: Network,
    target: NodeId,
    node: Node,
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        req: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError> {
        self.net
            .rpc(self.target, &self.node, "append", &req, option.hard_ttl())
            .await
    }

    async fn install_snapshot(
        &mut self,
        req: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<InstallSnapshotError>> {
        self.net
            .rpc(self.target, &self.node, "snapshot", &req, option.hard_ttl())
            .await
    }

    async fn vote(
        &mut self,
        req: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError> {
        self.net
            .rpc(self.target, &self.node, "vote", &req, option.hard_ttl())
            .await
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}
