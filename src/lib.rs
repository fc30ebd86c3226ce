//! vertice-register: a Raft-replicated service registry.
//!
//! Module map (each owns one thing):
//! - [`registry`]: the pure state machine: instances, commands, apply, validation.
//! - [`raft`]: openraft wiring: sled log store, sled state machine, HTTP transport.
//! - [`node`]: starts and stops a node: storage, Raft, HTTP server, leader tasks.
//! - [`api`]: HTTP handlers, forwarding to the leader, the one error-to-status mapping.
//! - [`forwarding`]: the messages nodes exchange to reach the leader.
//! - [`leader`]: what runs only on the leader: group commit ([`leader::writes`]),
//!   TTL leases and expiry ([`leader::leases`]), leadership confirmations
//!   ([`leader::read_index`]).
//! - [`clock`]: the leader's clock, for stamping commands.
//! - [`metrics`]: Prometheus metrics.
//! - [`auth`]: API tokens, roles and service prefixes.
//! - [`audit`]: the audit log (JSON lines, non-blocking writer, rotation).
//! - [`config`]: the command line.
//! - [`admin`]: the `cluster` subcommand (membership requests, tables).
//! - [`client`]: the async Rust client: failover, retries, auto-registration, watch.
//! - [`gateway`]: the API gateway routing `/v2/{service}/{path}` through the registry.
//! - [`demo`]: a small demo service that registers itself through the client.
//! - [`bench`]: the load driver `bench` (this registry or etcd) and its probes.
//! - [`http`]: the server loop and keyed rate limits the node and the gateway share.
//! - [`tls`]: certificates for the node's and the gateway's listeners and clients.
//!
//! Dependencies run one way: `main` → `node`/`gateway`/`admin`/`bench` →
//! `api` → `leader` → `forwarding` → `raft` → `registry`.

pub mod admin;
pub mod api;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod client;
pub mod clock;
pub mod config;
pub mod demo;
pub mod forwarding;
pub mod gateway;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod node;
pub mod raft;
pub mod registry;
pub mod tls;
