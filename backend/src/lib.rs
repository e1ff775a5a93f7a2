//! replichat: a replicated web chat server.
//!
//! Every state change is an operation appended to a log `(term, index, op)`; applying the log in order to
//! an empty database yields the chat's state, so a replica can be rebuilt from the log alone. Clients speak
//! JSON over a WebSocket at `/ws` (types in `replichat-shared`, described in `docs/PROTOCOL.md`).
//!
//! # Layout
//! - [`config`]: the command line and environment (clap).
//! - [`error`]: the crate's error enum and the client-facing code of each variant.
//! - [`op`]: the operations stored in the log.
//! - [`password`]: argon2id hashing, bounded to one hash per core, in reused memory.
//! - [`storage`]: all SQL, for SQLite and PostgreSQL: migrations, committing an entry with its effect (the
//!   state machine), and the read queries.
//! - [`replication`]: terms, elections, log shipping and the commit index (Raft's rules, lowest live id
//!   preferred); entries are opaque to it.
//! - [`peer_auth`]: the HMAC challenge-response by which two replicas prove the cluster secret to each other
//!   without sending it.
//! - [`tls`]: TLS for the listener and for dialling `https://` peers (rustls).
//! - [`internal`]: the accepting side of `/internal/replicate`: the listener's half of the handshake, then
//!   each request frame through the replication core.
//! - [`repeat_log`]: warnings a dialler can repeat at will (refused handshakes), logged once per interval.
//! - [`chat`]: each chat operation: validate against current state, build the op, propose it, wait until it
//!   is committed and applied; and the applier, which applies committed entries and publishes their events.
//! - [`hub`]: the in-memory registry of open sockets per user and the live push to them.
//! - [`throttle`]: growing delays after failed password checks (per address, per address and account, per
//!   account) and each account's send rate.
//! - [`username`]: the username rules: NFC storage, refused characters, the unique key (NFKC, lower
//!   case) and the confusable skeleton that keeps look-alike names out.
//! - [`wildcard`]: the `*` account-search pattern and its translation to SQL `LIKE`.
//! - [`session`]: one socket's session state; typed request in, typed reply out.
//! - [`ws`]: the `/ws` endpoint: frames in and out, size limits, close codes, the socket's deadlines
//!   (authentication, pings and silence, writes), backlogs streamed a page at a time.
//! - [`listener`]: accepting connections: the per-address connection cap, the request-head deadline,
//!   back-off on accept errors, graceful shutdown.
//! - [`http`]: the router, `/healthz`, `/api/cluster`, `/metrics`, and the allowed browser origins.
//! - [`metrics`]: the Prometheus recorder behind `/metrics`, every series' name and help text, and one
//!   function per thing measured (the other modules call those, never a series name).
//!
//! [`start`] wires them together and serves until [`Running::shutdown`].

pub mod chat;
pub mod config;
pub mod error;
pub mod http;
pub mod hub;
pub mod internal;
pub mod listener;
pub mod metrics;
pub mod op;
pub mod password;
pub mod peer_auth;
pub mod repeat_log;
pub mod replication;
pub mod session;
pub mod storage;
pub mod throttle;
pub mod tls;
pub mod username;
pub mod wildcard;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::chat::Chat;
pub use crate::config::Config;
pub use crate::error::{Error, Result};
use crate::http::Origins;
use crate::op::Op;
use crate::replication::{Replication, Timing};
use crate::storage::Db;

/// What a replica says about itself to clients.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The replica id from `--id`.
    pub id: u64,
    /// Base URLs of every replica, by id: the endpoints clients may connect to.
    pub urls: std::collections::BTreeMap<u64, String>,
    /// The database's incarnation (see [`storage::Membership`]), shown by `/healthz`.
    pub incarnation: i64,
}

impl NodeInfo {
    /// The endpoint list sent to clients, in id order.
    pub fn endpoints(&self) -> Vec<String> {
        self.urls.values().cloned().collect()
    }
}

/// Shared state handed to every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The chat service: every operation, the log and the socket registry.
    pub chat: Arc<Chat>,
    /// Who this node is, for `welcome` and `/healthz`.
    pub node: Arc<NodeInfo>,
    /// Browser origins allowed to open `/ws`.
    pub origins: Arc<Origins>,
    /// Cancelled when the server shuts down: every socket task closes with 1001.
    pub shutdown: CancellationToken,
    /// Counts open socket tasks, so shutdown can wait for them to finish their in-flight request.
    pub tracker: TaskTracker,
    /// The secret peers must present on `/internal/replicate`; `None` refuses every peer.
    pub cluster_secret: Option<Arc<str>>,
    /// Renders `/metrics` (the process-wide recorder: see [`metrics`]).
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The deadlines every `/ws` socket lives by (authentication, idleness, writes).
    pub socket_timeouts: ws::Timeouts,
    /// Backlog pages being read at once, across all sockets: a crowd of resumers must leave database
    /// connections for everyone else's requests (the SQLite pool has 4).
    pub backlog_reads: Arc<tokio::sync::Semaphore>,
}

/// The id of the cluster a replica belongs to, as stored in its database: derived from the cluster secret
/// (never the secret itself), 0 for a cluster of one without a secret.
fn cluster_id(secret: Option<&str>) -> i64 {
    use sha2::{Digest, Sha256};
    let Some(secret) = secret.filter(|s| !s.is_empty()) else { return 0 };
    let digest = Sha256::digest(format!("replichat cluster id\n{secret}").as_bytes());
    i64::from_be_bytes(digest[..8].try_into().expect("8 bytes")) & i64::MAX
}

/// A started server.
pub struct Running {
    /// The address it listens on (the real port when `--listen` had port 0).
    pub addr: SocketAddr,
    /// Its database (tests read it directly).
    pub db: Db,
    /// Whether it serves TLS only (`--tls-cert`).
    pub tls: bool,
    chat: Arc<Chat>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<()>>,
}

/// Open the database (running migrations), bind `config.listen`, start replication, and serve in the
/// background.
pub async fn start(config: Config) -> Result<Running> {
    // First, so every series recorded while starting is kept.
    let metrics = metrics::install();
    let db = Db::open(&config.db).await?;
    let membership = db
        .claim(config.id, cluster_id(config.cluster_secret.as_deref()), config.adopt_database, config.rejoin_as_learner)
        .await?;
    if !membership.voter {
        tracing::warn!(
            incarnation = format!("{:x}", membership.incarnation),
            "this database is new, taken over or restored: joining as a learner until caught up with a primary"
        );
    }
    let listener = TcpListener::bind(config.listen).await?;
    let addr = listener.local_addr()?;
    let mut peers = config.peers.clone();
    let public_url = match (&config.public_url, peers.iter().find(|p| p.id == config.id)) {
        (Some(url), _) => url.clone(),
        (None, Some(me)) => me.url.clone(),
        (None, None) => format!("{}://{addr}", if config.tls_cert.is_some() { "https" } else { "http" }),
    };
    if !peers.iter().any(|p| p.id == config.id) {
        peers.push(config::Peer { id: config.id, url: public_url.clone() });
    }
    tls::check_peers(config.id, &peers, config.tls_cert.is_some(), config.tls_ca.is_some())?;
    let server_tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
        _ => None,
    };
    let peer_tls = config.tls_ca.as_deref().map(tls::client_config).transpose()?;
    if peers.len() > 1 && config.cluster_secret.as_deref().is_none_or(str::is_empty) {
        return Err(Error::BadRequest("--cluster-secret is required when --peers names other replicas".into()));
    }
    let origins = Origins::new(config.allowed_origins.iter().cloned().chain(peers.iter().map(|p| p.url.clone())));
    let shutdown = CancellationToken::new();
    let timing = Timing {
        heartbeat: std::time::Duration::from_millis(config.heartbeat_ms.max(1)),
        election: std::time::Duration::from_millis(config.election_timeout_ms.max(2 * config.heartbeat_ms).max(10)),
        ack: config.ack,
    };
    let replication = Replication::start(
        config.id,
        peers,
        config.cluster_secret.clone(),
        Some(addr.ip()),
        peer_tls,
        timing,
        db.clone(),
        membership.voter,
        Op::Noop.to_json(),
        config.compact_keep,
        shutdown.clone(),
    )
    .await?;
    let urls = replication.peers.clone();
    let state = AppState {
        chat: Chat::start(
            db.clone(),
            replication,
            chat::Limits {
                compact_keep: config.compact_keep,
                session_idle: std::time::Duration::from_secs(config.session_idle_secs),
                send_rate: config.send_rate,
                send_burst: config.send_burst,
            },
            shutdown.clone(),
        )
        .await?,
        node: Arc::new(NodeInfo { id: config.id, urls, incarnation: membership.incarnation }),
        origins: Arc::new(origins),
        shutdown: shutdown.clone(),
        tracker: TaskTracker::new(),
        cluster_secret: config.cluster_secret.as_deref().map(Arc::from),
        metrics: metrics.clone(),
        socket_timeouts: ws::Timeouts::from_config(&config),
        backlog_reads: Arc::new(tokio::sync::Semaphore::new(ws::BACKLOG_READERS)),
    };
    tokio::spawn(metrics::upkeep(metrics, shutdown.clone()));
    tracing::info!(id = config.id, %addr, backend = ?db.backend(), "replica serving");
    let app = http::router(state.clone(), &config.static_dir);
    let limits = listener::Limits {
        per_address: config.max_connections_per_ip,
        header_timeout: (config.header_timeout_ms > 0).then(|| Duration::from_millis(config.header_timeout_ms)),
        tls: server_tls,
    };
    let chat = state.chat.clone();
    let task = tokio::spawn(serve(listener, limits, app, state, db.clone()));
    Ok(Running { addr, db, chat, shutdown, task, tls: config.tls_cert.is_some() })
}

async fn serve(
    listener: TcpListener,
    limits: listener::Limits,
    app: axum::Router,
    state: AppState,
    db: Db,
) -> Result<()> {
    let (shutdown, tracker) = (state.shutdown.clone(), state.tracker.clone());
    drop(state);
    listener::serve(listener, app, limits, shutdown).await;
    // Sockets see the same token: each finishes its in-flight request, closes with 1001 and ends.
    tracker.close();
    tracker.wait().await;
    db.close().await;
    tracing::info!("replica stopped");
    Ok(())
}

impl Running {
    /// Stop accepting, close every socket with 1001 after its in-flight request, close the database.
    pub async fn shutdown(mut self) -> Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Wait until the replica stops: after [`Running::shutdown`], or by itself when it meets a committed
    /// entry it cannot apply (then the error names the entry, and the binary exits non-zero).
    pub async fn wait(&mut self) -> Result<()> {
        (&mut self.task).await.map_err(|e| Error::Io(std::io::Error::other(e)))??;
        match self.chat.fatal() {
            Some(reason) => Err(Error::Stopped(reason)),
            None => Ok(()),
        }
    }
}
