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

    /// Every replica of the cluster, this one included, as `id=url` pairs separated by commas:
    /// `0=http://127.0.0.1:8080,1=http://127.0.0.1:8081,2=http://127.0.0.1:8082`. Empty: a cluster of one.
    #[arg(long, env = "REPLICHAT_PEERS", value_delimiter = ',', value_parser = parse_peer)]
    pub peers: Vec<Peer>,

    /// Shared secret replicas prove to each other on `/internal/replicate` (an HMAC challenge-response; the
    /// secret itself is never sent). Required with `--peers`.
    #[arg(long, env = "REPLICHAT_CLUSTER_SECRET", hide_env_values = true)]
    pub cluster_secret: Option<String>,

    /// How often the primary sends heartbeats (and unsent entries) to each backup, in milliseconds.
    #[arg(long, env = "REPLICHAT_HEARTBEAT_MS", default_value_t = 100)]
    pub heartbeat_ms: u64,

    /// A backup that hears no primary for this long (plus half of it per lower id other than the primary it
    /// followed, plus up to 10% jitter, so the lowest live id tries first) starts an election; a primary that hears no majority for this long steps down.
    /// Milliseconds.
    #[arg(long, env = "REPLICHAT_ELECTION_TIMEOUT_MS", default_value_t = 1000)]
    pub election_timeout_ms: u64,

    /// When a write is acknowledged: `majority` (durable on a majority; safe under partitions) or
    /// `all-live` (durable on every in-sync replica; a lone survivor keeps serving; can split the brain under
    /// a network partition). See docs/ARCHITECTURE.md.
    #[arg(long, env = "REPLICHAT_ACK", value_enum, default_value_t = Ack::Majority)]
    pub ack: Ack,

    /// Keep this many applied entries in the log; older ones are deleted (compaction). A backup that needs
    /// a deleted entry receives a snapshot of the whole state instead.
    #[arg(long, env = "REPLICHAT_COMPACT_KEEP", default_value_t = 10_000)]
    pub compact_keep: u64,

    /// A session (a token from `register` or `login`) that no socket has used for this long expires: `resume`
    /// with it answers `unauthenticated`. Each use renews it (recorded at most once a day, so the timeout is
    /// exact to a day). Seconds; default 30 days.
    #[arg(long, env = "REPLICHAT_SESSION_IDLE_SECS", default_value_t = 30 * 24 * 3600)]
    pub session_idle_secs: u64,

    /// Messages each account may send per second, on average (a token bucket; more answer `rate_limited`
    /// with the time to wait). People type far slower; this stops one account from filling every disk.
    #[arg(long, env = "REPLICHAT_SEND_RATE", default_value_t = 10.0)]
    pub send_rate: f64,

    /// Messages each account may send in a burst above `--send-rate` (e.g. re-sending what queued up
    /// while offline).
    #[arg(long, env = "REPLICHAT_SEND_BURST", default_value_t = 100)]
    pub send_burst: u32,

    /// Rebind the database to this replica id and cluster. A database remembers the replica (`--id`) and
    /// cluster (from `--cluster-secret`) it was created for, and a replica refuses to start on another's;
    /// pass this once after a deliberate move, or after changing the cluster secret.
    #[arg(long, env = "REPLICHAT_ADOPT_DATABASE")]
    pub adopt_database: bool,

    /// Start as a learner: neither vote nor stand for election, nor have acknowledgements counted, until
    /// caught up with a primary. Automatic for a database created at this start (a new replica, or one whose
    /// disk was wiped) or taken over from another replica id; pass it after restoring an older copy of this
    /// replica's database, which may hold less than the replica acknowledged.
    #[arg(long, env = "REPLICHAT_REJOIN_AS_LEARNER")]
    pub rejoin_as_learner: bool,

    /// PEM certificate chain (leaf first) the listener presents: with `--tls-key`, the port serves HTTPS and
    /// WSS only (clients, the admin page and peers alike), and this replica's URL in `--peers` is `https://`.
    #[arg(long, env = "REPLICHAT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "REPLICHAT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// PEM file of the certificate authorities trusted when dialling `https://` peers (a private CA that signed
    /// every replica's certificate, or a public CA bundle). Required when any other peer URL is `https://`.
    #[arg(long, env = "REPLICHAT_TLS_CA")]
    pub tls_ca: Option<std::path::PathBuf>,

    /// Directory with the browser app (index.html, style.css, pkg/ from scripts/build-frontend.sh), served at
    /// `/`; `/admin` and other unknown paths get its index.html.
    #[arg(long, env = "REPLICHAT_STATIC_DIR", default_value = "static")]
    pub static_dir: std::path::PathBuf,

    /// Most connections (HTTP and WebSocket, open at the same time) one client address may hold; the next one
    /// is answered `429 Too Many Requests` and closed. 0: no cap. Behind a reverse proxy every client has the
    /// proxy's address: raise it or set 0 there, and let the proxy enforce its own per-client cap.
    #[arg(long, env = "REPLICHAT_MAX_CONNECTIONS_PER_IP", default_value_t = 1_000)]
    pub max_connections_per_ip: usize,

    /// A connection must send a complete HTTP request head (request line and headers) within this many
    /// milliseconds of connecting, or of its previous response on a kept-alive connection; else it is closed.
    #[arg(long, env = "REPLICHAT_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,

    /// A `/ws` socket must `register`, `login` or `resume` successfully within this many milliseconds of its
    /// `welcome`, or it is closed with 1008. A socket that logs out gets the same time again.
    #[arg(long, env = "REPLICHAT_AUTH_TIMEOUT_MS", default_value_t = 60_000)]
    pub auth_timeout_ms: u64,

    /// How often the server pings an authenticated `/ws` socket that sent nothing meanwhile, in milliseconds.
    #[arg(long, env = "REPLICHAT_PING_INTERVAL_MS", default_value_t = 30_000)]
    pub ping_interval_ms: u64,

    /// An authenticated `/ws` socket from which nothing (no frame, no pong) arrived for this many milliseconds
    /// is closed with 1008.
    #[arg(long, env = "REPLICHAT_IDLE_TIMEOUT_MS", default_value_t = 75_000)]
    pub idle_timeout_ms: u64,

    /// Longest a write to a `/ws` socket may wait for the client to read, in milliseconds; a socket whose
    /// write takes longer is dropped (its client resumes).
    #[arg(long, env = "REPLICHAT_WRITE_TIMEOUT_MS", default_value_t = 10_000)]
    pub write_timeout_ms: u64,

    /// Log filter in `tracing` EnvFilter syntax (`info`, `replichat=debug`, ...). The log goes to stderr, in
    /// colour only when stderr is a terminal.
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
            peers: Vec::new(),
            cluster_secret: None,
            heartbeat_ms: 100,
            election_timeout_ms: 1000,
            compact_keep: 10_000,
            session_idle_secs: 30 * 24 * 3600,
            // Suites send hundreds of messages from one account as fast as they can; the test of the rate
            // itself sets its own.
            send_rate: 1_000_000.0,
            send_burst: 1_000_000,
            ack: Ack::Majority,
            adopt_database: false,
            rejoin_as_learner: false,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            static_dir: "static".into(),
            max_connections_per_ip: 1_000,
            header_timeout_ms: 10_000,
            auth_timeout_ms: 60_000,
            ping_interval_ms: 30_000,
            idle_timeout_ms: 75_000,
            write_timeout_ms: 10_000,
            log: "info".to_owned(),
        }
    }
}

/// When a write counts as committed (`--ack`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Ack {
    /// Durable on a majority of the replicas. Elections need a majority of votes. Safe under partitions.
    Majority,
    /// Durable on every replica in the in-sync set (the seed's 2-fault tolerance under crash-stop). A
    /// replica silent for the election timeout leaves the set and rejoins once caught up; elections need the
    /// votes of every replica the candidate can reach, so a lone survivor takes over. Can split the brain
    /// under a network partition.
    AllLive,
}

/// One replica of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its replica id.
    pub id: u64,
    /// Its base URL, `http://host:port`.
    pub url: String,
}

fn parse_peer(s: &str) -> Result<Peer, String> {
    let (id, url) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected id=url"))?;
    let id = id.trim().parse().map_err(|_| format!("{s:?}: the id must be a number"))?;
    let url = url.trim().trim_end_matches('/').to_owned();
    if !url.starts_with("http://") && !url.starts_with("https://") {
        return Err(format!("{s:?}: the url must start with http:// or https://"));
    }
    Ok(Peer { id, url })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse() {
        assert_eq!(parse_peer("1=http://127.0.0.1:8081/"), Ok(Peer { id: 1, url: "http://127.0.0.1:8081".into() }));
        assert!(parse_peer("x=http://a").is_err());
        assert!(parse_peer("1=ftp://a").is_err());
        assert!(parse_peer("http://a").is_err());
    }
}
