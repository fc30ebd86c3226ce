//! HTTP plumbing that is not the registry's: the server loop (deadlines,
//! connection caps, TLS, graceful stop) and keyed rate limits. The node's
//! API and the gateway both build on it; it knows nothing of either.

pub mod limit;
pub mod server;

/// An error and its causes: one line; reqwest's own message
/// ("error sending request for url ...") rarely says what failed.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}
