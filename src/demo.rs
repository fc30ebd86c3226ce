//! A demo service that registers itself through the client. (Being written.)

use std::future::Future;

use crate::config::DemoArgs;

/// Runs the demo service until `shutdown` resolves.
pub async fn run_from_cli(
    args: DemoArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _ = (args, shutdown);
    Err("the demo service is not built yet".into())
}
