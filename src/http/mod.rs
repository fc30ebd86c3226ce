//! HTTP plumbing that is not the registry's: the server loop (deadlines,
//! connection caps, TLS, graceful stop) and keyed rate limits. The node's
//! API and the gateway both build on it; it knows nothing of either.

pub mod limit;
pub mod server;
