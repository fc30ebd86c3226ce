//! The `vertice-register` binary: parses the command line and runs the
//! chosen subcommand. All logic lives in the library.

use std::process::ExitCode;

use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use vertice_register::config::{Cli, Command, NodeArgs};
use vertice_register::node::RunningNode;

// glibc's malloc took a quarter of a loaded node's CPU (many small
// allocations across threads); mimalloc cuts that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn,sled=warn"));
    // Logs go to stderr; stdout stays free for command output.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        // Colour codes only for a terminal, not in log files or `docker logs`.
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let result = match cli.command {
        None => run_node(NodeArgs::default()).await,
        Some(Command::Node(args)) => run_node(args).await,
        Some(Command::Gateway(args)) => {
            vertice_register::gateway::run_from_cli(args, shutdown_signal())
                .await
                .map_err(|e| anyhow::anyhow!(e))
        }
        Some(Command::Cluster(args)) => vertice_register::admin::run(&args)
            .await
            .map(|out| print!("{out}"))
            .map_err(|e| anyhow::anyhow!(e)),
        Some(Command::Snapshot(args)) => vertice_register::admin::snapshot(&args)
            .await
            .map(|out| print!("{out}"))
            .map_err(|e| anyhow::anyhow!(e)),
        Some(Command::Recover(args)) => {
            vertice_register::raft::recover::recover(&args.data_dir, args.id)
                .await
                .map(|r| {
                    let before: Vec<String> =
                        r.before.iter().map(|(i, a)| format!("{i}={a}")).collect();
                    println!(
                        "node {} ({}) is now a cluster of one voter, itself: membership entry {} in term {} \
                         (members before: {}); {} instances kept.\n\
                         Start it as usual; start new nodes with empty data directories and --join http://{}. \
                         Never start the old nodes on their old data.",
                        r.id,
                        r.addr,
                        r.entry.index,
                        r.entry.leader_id.get_term(),
                        before.join(","),
                        r.instances,
                        r.addr
                    )
                })
                .map_err(|e| anyhow::anyhow!(e))
        }
        Some(Command::Bench(args)) => vertice_register::bench::run(args).await,
        Some(Command::DemoService(args)) => {
            vertice_register::demo::run_from_cli(args, shutdown_signal())
                .await
                .map_err(|e| anyhow::anyhow!(e))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&args.addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.addr))?;
    let node = RunningNode::start(args, listener).await?;
    #[cfg(unix)]
    {
        // SIGHUP reloads the --tokens file and the TLS files; a bad file
        // keeps the old ones.
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(|e| anyhow::anyhow!("cannot install the SIGHUP handler: {e}"))?;
        let stop = shutdown_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = hup.recv() => {
                    match node.reload_tokens() {
                        Ok(Some(n)) => tracing::info!(tokens = n, "SIGHUP: token file reloaded"),
                        Ok(None) => tracing::info!("SIGHUP: no --tokens file to reload"),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: token file not reloaded; the old tokens stay"),
                    }
                    match node.reload_tls() {
                        Ok(Some(r)) => tracing::info!(result = ?r, "SIGHUP: TLS files checked"),
                        Ok(None) => {}
                        Err(e) => tracing::error!(error = %e, "SIGHUP: TLS files not reloaded; the old ones stay"),
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    shutdown_signal().await;
    tracing::info!("stopping: signal received");
    node.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
