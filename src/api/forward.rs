//! Getting writes and consistent reads to the leader.
//!
//! A write that lands on a follower travels, unstamped, to the leader's
//! internal route `/raft/write`; the leader stamps its clock into the
//! command, commits it, and answers with the result. A consistent read asks
//! the leader for a read index (`/raft/read-index`: the leader confirms with
//! a quorum that it still leads) and then waits until the local replica has
//! applied that index: the answer comes from this node but is linearizable.
//!
//! While no leader is known (an election), both wait up to `leader_wait`,
//! then fail with `503`. They retry only where it is safe: when the request
//! certainly did not reach a leader (refused connection, "not the leader").
//! Every command is an idempotent upsert or delete besides.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::{ApiError, AppState};
use crate::audit::Outcome;
use crate::auth::Caller;
use crate::clock::now_ms;
use crate::forwarding::{Attempt, Outgoing, ReadIndexReply, WriteReply, WriteRequest};
use crate::registry::{Command, CommandResult, Instance, InstanceExt, Millis, RegisterRequest};

/// The audit outcome of a write's result.
pub fn write_outcome(result: &Result<CommandResult, ApiError>) -> Outcome {
    match result {
        Ok(CommandResult::NotFound) => Outcome::Status(404),
        Ok(_) => Outcome::Ok,
        Err(e @ (ApiError::TokenRequired(_) | ApiError::Forbidden(_))) => {
            Outcome::Refused(e.status().as_u16(), format!("{} by the leader", e.code()))
        }
        Err(e) => Outcome::Status(e.status().as_u16()),
    }
}

/// A registration as a log command, stamped with the leader's time.
fn register_command(r: &RegisterRequest, now_ms: Millis) -> Command {
    let host = r.host.clone().unwrap_or_else(|| "127.0.0.1".to_string());
    let instance_id = r
        .instance_id
        .clone()
        .unwrap_or_else(|| format!("{host}:{}", r.port));
    Command::RegisterFrom {
        ext: InstanceExt {
            origin: r.origin.clone(),
            https: r.https,
        },
        instance: Instance {
            service_name: r.service_name.clone(),
            instance_id,
            host,
            port: r.port,
            health_endpoint: r.health_endpoint.clone(),
            metadata: r.metadata.clone().into(),
            ttl_seconds: r.ttl_seconds,
            registered_at: now_ms,
            last_heartbeat: now_ms,
        },
    }
}

/// The error a leader's refusal stands for.
fn refused(status: u16, message: String) -> ApiError {
    if status == 401 {
        ApiError::TokenRequired(message)
    } else {
        ApiError::Forbidden(message)
    }
}

/// Where the leader is, as this node knows it.
pub(super) enum LeaderAt {
    Here,
    /// Another node, at this address.
    There(String),
}

const RETRY_PAUSE: Duration = Duration::from_millis(50);

impl AppState {
    fn no_leader(&self, what: &str) -> ApiError {
        ApiError::Unavailable(format!(
            "no leader reachable within {} ms to {what}; retry shortly",
            self.leadership.leader_wait.as_millis()
        ))
    }

    /// Checks that `caller` may make the write, commits it through the
    /// leader, wherever it is, and audits it.
    pub async fn write(
        &self,
        req: WriteRequest,
        caller: &Caller,
    ) -> Result<CommandResult, ApiError> {
        self.access.authorize_write(caller, &req)?;
        let result = self.write_via_leader(&req, caller).await;
        if req.audited() {
            self.access.audit.record(
                Some(caller),
                req.kind(),
                req.target(),
                write_outcome(&result),
                None,
            );
        }
        result
    }

    async fn write_via_leader(
        &self,
        req: &WriteRequest,
        caller: &Caller,
    ) -> Result<CommandResult, ApiError> {
        let deadline = Instant::now() + self.leadership.leader_wait;
        self.with_leader(deadline, "commit the write", |at, remaining| async move {
            match at {
                LeaderAt::Here => Ok(match self.write_local(req, remaining).await {
                    WriteReply::Done(r) => Attempt::Answered(r),
                    WriteReply::NotLeader(_) => Attempt::Retry,
                    WriteReply::Unavailable(m) => Attempt::Unknown(m),
                    WriteReply::Refused { status, message } => {
                        return Err(refused(status, message))
                    }
                }),
                LeaderAt::There(addr) => self.forward_write(&addr, req, caller, remaining).await,
            }
        })
        .await
    }

    /// The one find-the-leader-and-retry loop: runs `attempt` against the
    /// leader this node knows (itself, or another node's address) until it
    /// answers, says the outcome is unknown, or `deadline` passes (then
    /// `503`, saying `what` could not be done). While no leader is known it
    /// waits for one; it tries again only after [`Attempt::Retry`], when
    /// the request surely did not reach a leader.
    pub(super) async fn with_leader<T, F, Fut>(
        &self,
        deadline: Instant,
        what: &str,
        mut attempt: F,
    ) -> Result<T, ApiError>
    where
        F: FnMut(LeaderAt, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<Attempt<T>, ApiError>>,
    {
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(self.no_leader(what));
            }
            let view = self.leadership.leader_view();
            let at = match (view.leader_id, view.leader_addr) {
                (Some(id), _) if id == self.leadership.id => LeaderAt::Here,
                (Some(_), Some(addr)) => LeaderAt::There(addr),
                _ => {
                    self.wait_for_leader(remaining).await;
                    continue;
                }
            };
            match attempt(at, remaining).await? {
                Attempt::Answered(r) => return Ok(r),
                Attempt::Unknown(m) => return Err(ApiError::Unavailable(m)),
                Attempt::Retry => tokio::time::sleep(RETRY_PAUSE.min(remaining)).await,
            }
        }
    }

    /// Carries out a write on this node, which must be the leader.
    pub async fn write_local(&self, req: &WriteRequest, remaining: Duration) -> WriteReply {
        let cmd = match req {
            // Renewals go through the lease rules, not one entry per call.
            WriteRequest::Heartbeat(h) => return self.leases.heartbeat(h, remaining).await,
            WriteRequest::Register(r) => register_command(r, now_ms()),
            WriteRequest::Deregister {
                service_name,
                instance_id,
                origin,
            } => Command::DeregisterFrom {
                service_name: service_name.clone(),
                instance_id: instance_id.clone(),
                origin: origin.clone(),
            },
        };
        match tokio::time::timeout(remaining, self.writes.write(cmd)).await {
            Err(_) => WriteReply::not_committed_in_time(),
            Ok(reply) => reply,
        }
    }

    async fn forward_write(
        &self,
        addr: &str,
        req: &WriteRequest,
        caller: &Caller,
        remaining: Duration,
    ) -> Result<Attempt<CommandResult>, ApiError> {
        self.metrics
            .forwarded
            .with_label_values(&[req.kind()])
            .inc();
        // A node with neither tokens nor an audit log sends the bare request,
        // as earlier releases did, so that an open cluster can be upgraded
        // one node at a time.
        let write = if self.access.auth.enabled() || self.access.audit.enabled() {
            Outgoing::Envelope {
                write: req.clone(),
                token: caller.token.as_ref().map(|t| t.expose().to_string()),
                caller: caller.addr.clone(),
                via: self.leadership.id,
            }
        } else {
            Outgoing::Bare(req.clone())
        };
        let attempt = self.forwarder.send(addr, write, remaining).await;
        Ok(match attempt {
            Attempt::Answered(WriteReply::Refused { status, message }) => {
                return Err(refused(status, message))
            }
            Attempt::Answered(WriteReply::Done(r)) => Attempt::Answered(r),
            Attempt::Answered(WriteReply::NotLeader(_)) | Attempt::Retry => Attempt::Retry,
            Attempt::Answered(WriteReply::Unavailable(m)) | Attempt::Unknown(m) => {
                Attempt::Unknown(m)
            }
        })
    }

    /// Posts JSON to another node's internal route and decodes its answer.
    async fn forward<Req: Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
        remaining: Duration,
    ) -> Attempt<Resp> {
        if self.leadership.net.faults.is_isolated() {
            return Attempt::Retry;
        }
        let started = Instant::now();
        let sent = self
            .leadership
            .net
            .post(self.leadership.net.url(addr, &format!("/raft/{path}")))
            .json(req)
            .timeout(remaining)
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_connect() => return Attempt::Retry,
            Err(e) => {
                return Attempt::Unknown(format!(
                    "the leader at {addr} did not answer ({e}); the outcome is unknown and retrying is safe"
                ))
            }
        };
        self.metrics
            .forward_latency
            .observe(started.elapsed().as_secs_f64());
        if !resp.status().is_success() {
            // Refused before any work was done (cut off, wrong secret, stopping).
            return Attempt::Retry;
        }
        match resp.json::<Resp>().await {
            Ok(r) => Attempt::Answered(r),
            Err(e) => Attempt::Unknown(format!(
                "the leader at {addr} sent an unreadable answer: {e}"
            )),
        }
    }

    async fn wait_for_leader(&self, remaining: Duration) {
        let _ = self
            .leadership
            .raft
            .wait(Some(remaining.min(Duration::from_millis(200))))
            .metrics(|m| m.current_leader.is_some(), "a leader is known")
            .await;
    }

    /// Makes the next local read linearizable: returns once this replica has
    /// applied everything committed before the call.
    pub async fn read_barrier(&self) -> Result<(), ApiError> {
        if self.test_stale_reads {
            return Ok(());
        }
        let deadline = Instant::now() + self.leadership.leader_wait;
        let index = self
            .with_leader(
                deadline,
                "confirm a consistent read",
                |at, remaining| async move {
                    Ok(match at {
                        LeaderAt::Here => match self.read_index_local(remaining).await {
                            ReadIndexReply::Index(i) => Attempt::Answered(i),
                            ReadIndexReply::NotLeader(_) => Attempt::Retry,
                            ReadIndexReply::Unavailable(m) => Attempt::Unknown(m),
                        },
                        LeaderAt::There(addr) => {
                            self.metrics
                                .forwarded
                                .with_label_values(&["read_index"])
                                .inc();
                            match self
                                .forward::<_, ReadIndexReply>(&addr, "read-index", &(), remaining)
                                .await
                            {
                                Attempt::Answered(ReadIndexReply::Index(i)) => Attempt::Answered(i),
                                Attempt::Answered(ReadIndexReply::NotLeader(_))
                                | Attempt::Retry => Attempt::Retry,
                                Attempt::Answered(ReadIndexReply::Unavailable(m))
                                | Attempt::Unknown(m) => Attempt::Unknown(m),
                            }
                        }
                    })
                },
            )
            .await?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.leadership
            .raft
            .wait(Some(remaining))
            .applied_index_at_least(Some(index), "consistent read")
            .await
            .map(|_| ())
            .map_err(|_| {
                ApiError::Unavailable(format!(
                    "this node did not catch up to index {index} in time; retry shortly"
                ))
            })
    }

    /// On the leader: confirms leadership with a quorum and returns the
    /// index a linearizable read must wait for.
    pub async fn read_index_local(&self, remaining: Duration) -> ReadIndexReply {
        self.read_index.get(remaining).await
    }
}
