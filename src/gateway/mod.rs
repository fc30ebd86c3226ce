//! The API gateway. (Being written.)

use std::future::Future;

use crate::config::GatewayArgs;

/// Runs the gateway until `shutdown` resolves.
pub async fn run_from_cli(
    args: GatewayArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let _ = (args, shutdown);
    Err("the gateway is not built yet".into())
}
