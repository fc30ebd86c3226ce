//! The messages nodes exchange to get writes and consistent reads to the
//! leader: what a follower sends on `/raft/write` and `/raft/read-index`,
//! and what the leader answers. They live below both the HTTP layer (which
//! sends and receives them) and the leader's stages in [`crate::leader`]
//! (which produce the answers), so that neither reaches up into the other.
//! Bodies travel as JSON; fields added later are `#[serde(default)]`, so
//! nodes of neighbouring releases understand each other.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::raft::{ClientWriteError, NodeId, RaftError};
use crate::registry::{CommandResult, HeartbeatRequest, RegisterRequest};

/// A validated write as it travels from the receiving node to the leader.
/// The receiving node has resolved defaults that depend on the caller
/// (`host`); the leader adds the time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WriteRequest {
    Register(RegisterRequest),
    Heartbeat(HeartbeatRequest),
    Deregister {
        service_name: String,
        instance_id: Option<String>,
        /// The caller's IP address, filled in by the receiving node.
        #[serde(default)]
        origin: Option<String>,
    },
}

impl WriteRequest {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Register(_) => "register",
            Self::Heartbeat(_) => "heartbeat",
            Self::Deregister { .. } => "deregister",
        }
    }

    /// The service the write changes (what a token's prefixes limit).
    pub fn service_name(&self) -> &str {
        match self {
            Self::Register(r) => &r.service_name,
            Self::Heartbeat(h) => &h.service_name,
            Self::Deregister { service_name, .. } => service_name,
        }
    }

    /// `service/instance` (or `service` for a whole service), for the audit log.
    pub fn target(&self) -> Value {
        let instance = match self {
            Self::Register(r) => Some(r.instance_id.clone().unwrap_or_else(|| {
                format!("{}:{}", r.host.as_deref().unwrap_or("127.0.0.1"), r.port)
            })),
            Self::Heartbeat(h) => h.instance_id.clone(),
            Self::Deregister { instance_id, .. } => instance_id.clone(),
        };
        match instance {
            Some(i) => Value::from(format!("{}/{i}", self.service_name())),
            None => Value::from(self.service_name()),
        }
    }

    /// Heartbeats are too frequent for the audit log (their refusals are not).
    pub fn audited(&self) -> bool {
        !matches!(self, Self::Heartbeat(_))
    }
}

/// What the leader's `/raft/write` accepts: the envelope, or a bare
/// request from a node of an earlier release (no caller, no token).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum IncomingWrite {
    Forwarded(ForwardedWrite),
    Bare(WriteRequest),
}

#[derive(Deserialize)]
pub struct ForwardedWrite {
    pub write: WriteRequest,
    pub token: Option<String>,
    pub caller: Option<String>,
    pub via: Option<NodeId>,
}

impl std::fmt::Debug for ForwardedWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardedWrite")
            .field("write", &self.write)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("caller", &self.caller)
            .field("via", &self.via)
            .finish()
    }
}

/// The leader's answer on `/raft/write`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WriteReply {
    Done(CommandResult),
    /// The receiver is not the leader; it names the one it knows, if any.
    NotLeader(Option<NodeId>),
    /// The outcome is unknown or the cluster cannot commit now.
    Unavailable(String),
    /// The leader refused the caller (`401` or `403`); nothing changed.
    Refused {
        status: u16,
        message: String,
    },
}

impl WriteReply {
    /// Maps the outcome of `Raft::client_write` onto a reply.
    pub fn from_raft(result: Result<CommandResult, RaftError<ClientWriteError>>) -> Self {
        match result {
            Ok(r) => Self::Done(r),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Self::NotLeader(f.leader_id)
            }
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Self::Unavailable(e.to_string())
            }
            Err(RaftError::Fatal(f)) => Self::Unavailable(format!("raft stopped: {f}")),
        }
    }

    pub fn not_committed_in_time() -> Self {
        Self::Unavailable(
            "the write was not committed in time (no quorum?); its outcome is unknown and retrying it is safe"
                .into(),
        )
    }
}

/// The leader's answer on `/raft/read-index`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReadIndexReply {
    Index(u64),
    NotLeader(Option<NodeId>),
    Unavailable(String),
}

/// Why one attempt to reach the leader failed.
pub enum Attempt<T> {
    Answered(T),
    /// The request surely did not reach a leader: try again.
    Retry,
    /// The request may have been applied: stop and say so.
    Unknown(String),
}

/// A forwarded write as it goes on the wire: with the caller (so that the
/// leader checks the token again and audits who it was), or bare when this
/// node has neither tokens nor an audit log (as earlier releases sent it).
/// No `Debug`: it holds the caller's token.
#[derive(Serialize)]
#[serde(untagged)]
pub enum Outgoing {
    Envelope {
        write: WriteRequest,
        token: Option<String>,
        caller: Option<String>,
        via: NodeId,
    },
    Bare(WriteRequest),
}
