//! The leader's clock. Only the leader reads it, to stamp time into commands
//! before they enter the log; applying a command never does.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::registry::Millis;

/// The wall clock in milliseconds since the Unix epoch.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}
