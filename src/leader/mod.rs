//! What runs only on the leader: the stages that turn client writes,
//! renewals and consistent reads into Raft entries and confirmations.
//!
//! - [`writes`]: group commit of client writes into shared entries.
//! - [`leases`]: TTL leases: acknowledging heartbeats, checkpointing
//!   renewals, expiring instances (with the mass-expiry protection), and
//!   reviving expired ones a heartbeat names.
//! - [`read_index`]: shared leadership confirmations for consistent reads
//!   and heartbeats (with the optional leader lease).
//!
//! On any other node these are idle: a follower passes writes and
//! consistent reads on to the leader (`crate::api`), with the messages of
//! [`crate::forwarding`]. They depend on the registry, Raft and the
//! forwarding messages, never on the HTTP layer above them.

pub mod leases;
pub mod read_index;
pub mod writes;
