//! Command-line and environment configuration: the only place that reads either.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand};

/// `replichat`: a replicated web chat.
#[derive(Debug, Parser)]
#[command(name = "replichat", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one replica: the chat server on `--listen`, state in `--db`.
    Serve(Config),
}

/// Everything a replica needs to run. Every flag is also an environment variable.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// This replica's id (0, 1, 2, ...). Shown to clients in `welcome`.
    #[arg(long, env = "REPLICHAT_ID", default_value_t = 0)]
    pub id: u64,

    /// Address to listen on for HTTP and WebSocket (`/ws`). Port 0 picks a free port.
    #[arg(long, env = "REPLICHAT_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Where the state lives: `sqlite://path/to/file.db` (created if missing) or `postgres://user@host/db`.
    #[arg(long, env = "REPLICHAT_DB", default_value = "sqlite://data/replichat.db")]
    pub db: String,

    /// The URL browsers use to reach this replica (`http://host:port`). Defaults to `http://<listen address>`.
    /// It is the endpoint announced in `welcome` and an allowed WebSocket origin.
    #[arg(long, env = "REPLICHAT_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// More origins allowed to open `/ws` from a browser, comma-separated (`https://chat.example.com`).
    /// This replica's own URL and any `localhost`, `127.0.0.1` or `[::1]` origin are always allowed.
    #[arg(long, env = "REPLICHAT_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Log filter in `tracing` EnvFilter syntax (`info`, `replichat=debug`, ...).
    #[arg(long, env = "REPLICHAT_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// A config for tests and embedding: port 0 on loopback, the given database, defaults elsewhere.
    pub fn for_tests(db: impl Into<String>) -> Self {
        Config {
            id: 0,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            db: db.into(),
            public_url: None,
            allowed_origins: Vec::new(),
            log: "info".to_owned(),
        }
    }
}
