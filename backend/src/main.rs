//! The `replichat` binary: parse the config, start the replica, stop cleanly on Ctrl-C or SIGTERM.

use anyhow::Context;
use clap::Parser;
use replichat::config::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let Cli { command: Command::Serve(config) } = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&config.log).context("--log")?)
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a log redirected to a file or a service manager stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Some(path) = config.db.strip_prefix("sqlite://").and_then(|p| std::path::Path::new(p).parent()) {
        if !path.as_os_str().is_empty() {
            std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        }
    }
    let mut running = replichat::start(config).await.context("starting the replica")?;
    println!("replichat listening on {}://{}", if running.tls { "https" } else { "http" }, running.addr);
    tokio::select! {
        _ = shutdown_signal() => {}
        // It stopped by itself (an entry it cannot apply): exit non-zero with the reason.
        stopped = running.wait() => return stopped.context("the replica stopped itself"),
    }
    tracing::info!("shutting down");
    running.shutdown().await.context("shutting down")?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
