//! Cluster harness: n real `replichat serve` processes on loopback ports, each over its own database (SQLite
//! file or throw-away PostgreSQL database), wired together with `--peers`. A test can SIGKILL a node, restart
//! it on the same port and database, poll `/api/cluster` on each node, and read each node's database.
//!
//! Every node's stderr (its log) and stdout go to `<test dir>/nodeN.log`; when a test fails the tail of each
//! log is printed (in `Drop`, while panicking), and the directory is kept.
//!
//! With [`Options::netsim`] the replicas run on simulated separate machines (the `replichat-netsim` crate):
//! each in its own network namespace with its own address on a bridge, TLS on, a delay on every packet a
//! replica sends; the test reaches them from the root namespace over the bridge. The network is made by
//! [`Cluster::start_with`] and removed when the cluster is dropped (also when the test panics).
//!
//! Environment: `REPLICHAT_CLUSTER_TEST_LOG` is the nodes' `--log` filter (default `info`);
//! `REPLICHAT_CLUSTER_TEST_KEEP=1` keeps the directory (logs, SQLite files) of passing tests too.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use replichat_shared::{ErrorCode, Request, ServerBody};
use serde_json::Value;
use sqlx::Connection;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Child;
use tokio::time::Instant;

#[path = "../common/entries.rs"]
pub mod entries;

#[path = "../common/client.rs"]
#[allow(dead_code)]
mod client;
pub use client::*;

/// Heartbeat and election timeout given to every node (ms).
pub const HEARTBEAT_MS: u64 = 50;
pub const ELECTION_TIMEOUT_MS: u64 = 500;
/// How long a node may take to print its listening line.
const STARTUP: Duration = Duration::from_secs(20);
/// Pause between two polls of `/api/cluster` (polling interval, not synchronisation).
const POLL: Duration = Duration::from_millis(25);
/// Lines of each node's log printed when a test fails.
const LOG_TAIL: usize = 80;

/// Which engine the nodes store their state in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// A step marker with the wall-clock time (UTC, like the nodes' logs), so a failing test tells its story
/// and can be lined up with the node logs.
#[macro_export]
macro_rules! step {
    ($($arg:tt)*) => {
        eprintln!("[{}] STEP {}", $crate::harness::now_utc(), format_args!($($arg)*))
    };
}

/// `HH:MM:SS.mmm` UTC.
pub fn now_utc() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let secs = now.as_secs() % 86_400;
    format!("{:02}:{:02}:{:02}.{:03}", secs / 3600, secs / 60 % 60, secs % 60, now.subsec_millis())
}

/// One replica process.
pub struct Node {
    pub id: u64,
    /// `127.0.0.1:port`, fixed for the node's whole life (restarts reuse it).
    pub addr: String,
    /// Its database URL, fixed too.
    pub db: String,
    pub log: PathBuf,
    child: Option<Child>,
    starts: u32,
    /// Serves TLS only.
    tls: bool,
    /// More environment variables for its process (a test hook, e.g. `REPLICHAT_TEST_REPLICATION_FORMAT`);
    /// a test may change them before a restart.
    pub env: Vec<(String, String)>,
}

impl Node {
    pub fn http_url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("{}://{}/ws", if self.tls { "wss" } else { "ws" }, self.addr)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

pub struct Cluster {
    pub engine: Engine,
    pub secret: String,
    pub nodes: Vec<Node>,
    /// `0=http://...,1=http://...`: the `--peers` value every node gets.
    pub peers: String,
    dir: PathBuf,
    pg_databases: Vec<String>,
    /// More flags for every node (`--ack all-live`, `--compact-keep 20`, ...).
    extra_args: Vec<String>,
    /// With [`Options::tls`]: the certificates every node uses, and what clients trust.
    pub tls: Option<Tls>,
    /// With [`Options::netsim`]: the simulated network the nodes run in. Declared after `nodes`, so their
    /// processes are killed before it is removed.
    net: Option<replichat_netsim::Net>,
}

/// The port every node listens on in a simulated network (each namespace has its own port space).
const NETSIM_PORT: u16 = 9100;

/// Certificates made for one TLS cluster: a test CA, and one certificate it signed for the nodes' addresses
/// (127.0.0.1 and localhost on loopback) that every node presents.
pub struct Tls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Trusts the test CA only.
    pub client: std::sync::Arc<rustls::ClientConfig>,
}

impl Tls {
    /// A new CA in `dir` (`<name>-ca.pem`), and a certificate and key it signed for 127.0.0.1 and localhost
    /// (`<name>-cert.pem`, `<name>-key.pem`).
    pub fn make(dir: &std::path::Path, name: &str) -> Tls {
        Tls::make_for(dir, name, &["127.0.0.1".to_owned(), "localhost".to_owned()])
    }

    /// [`Tls::make`] with a certificate for `hosts`.
    pub fn make_for(dir: &std::path::Path, name: &str, hosts: &[String]) -> Tls {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, format!("replichat test CA {name}"));
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(hosts.to_vec()).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
        let path = |what: &str| dir.join(format!("{name}-{what}.pem"));
        std::fs::write(path("ca"), ca.pem()).unwrap();
        std::fs::write(path("cert"), cert.pem()).unwrap();
        std::fs::write(path("key"), key.serialize_pem()).unwrap();
        let client = replichat::tls::client_config(&path("ca")).unwrap();
        Tls { ca: path("ca"), cert: path("cert"), key: path("key"), client }
    }

    /// The flags that make a node serve with this certificate and trust this CA.
    pub fn args(&self) -> Vec<String> {
        let path = |p: &PathBuf| p.display().to_string();
        ["--tls-cert", &path(&self.cert), "--tls-key", &path(&self.key), "--tls-ca", &path(&self.ca)]
            .map(str::to_owned)
            .to_vec()
    }
}

/// How to start a cluster.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The loopback address of each node (default 127.0.0.1 for all). Distinct addresses let a firewall rule
    /// cut one node off from the others while the test still reaches it.
    pub hosts: Option<Vec<String>>,
    /// More flags for every node.
    pub args: Vec<String>,
    /// Put these nodes' SQLite files in these directories instead of the test directory (a small tmpfs, to
    /// fill a replica's disk).
    pub sqlite_dirs: Vec<(u64, PathBuf)>,
    /// Give these nodes these database URLs instead (a PostgreSQL server of the test's own, on a small disk).
    pub db_urls: Vec<(u64, String)>,
    /// `https://` peer URLs: every node serves TLS with a certificate from a CA made for this cluster, and
    /// trusts only that CA (see [`Tls`]).
    pub tls: bool,
    /// Run the nodes on simulated separate machines with this round-trip time between two of them (see the
    /// module comment): each in its own network namespace and address, with TLS (as if `tls` were set).
    /// SQLite only: PostgreSQL listens on the root namespace's loopback, which the namespaces cannot reach.
    /// Needs root, `ip` and `iptables-legacy`.
    pub netsim: Option<Duration>,
    /// More environment variables for these nodes' processes (see [`Node::env`]).
    pub env: Vec<(u64, String, String)>,
}

impl Cluster {
    /// Start `n` replicas (ids 0..n) and wait until each prints its listening line. Does not wait for an
    /// election: see [`Cluster::wait_for_primary`].
    pub async fn start(n: usize, engine: Engine) -> Cluster {
        Cluster::start_with(n, engine, Options::default()).await
    }

    /// [`Cluster::start`] with non-default [`Options`].
    pub async fn start_with(n: usize, engine: Engine, options: Options) -> Cluster {
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join("replichat-cluster-tests").join(&unique);
        std::fs::create_dir_all(&dir).unwrap();
        let net = options.netsim.map(|rtt| {
            assert_eq!(engine, Engine::Sqlite, "a simulated network runs SQLite replicas only");
            // Waits while another test (in any process) has the suite's network: its names are fixed.
            let net = replichat_netsim::Net::create(replichat_netsim::Layout::CLUSTER_TESTS, n, rtt)
                .expect("the simulated network (root, ip and iptables-legacy needed)");
            step!("simulated network: {n} namespaces, {rtt:?} round trip between replicas");
            net
        });
        let hosts: Vec<String> = match (&net, &options.hosts) {
            (Some(net), _) => (0..n).map(|i| net.addr(i)).collect(),
            (None, Some(hosts)) => hosts.clone(),
            (None, None) => vec!["127.0.0.1".to_owned(); n],
        };
        let ports: Vec<u16> = if net.is_some() {
            vec![NETSIM_PORT; n]
        } else {
            // Hold every listener until all ports are chosen, so no two nodes get the same one.
            let listeners: Vec<_> =
                hosts.iter().map(|host| std::net::TcpListener::bind(format!("{host}:0")).unwrap()).collect();
            listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
        };
        let tls_on = options.tls || net.is_some();
        let scheme = if tls_on { "https" } else { "http" };
        let peers =
            ports.iter().enumerate().map(|(i, p)| format!("{i}={scheme}://{}:{p}", hosts[i])).collect::<Vec<_>>();
        let tls = match &net {
            Some(_) => Some(Tls::make_for(&dir, "cluster", &hosts)),
            None => options.tls.then(|| Tls::make(&dir, "cluster")),
        };
        let mut extra_args = options.args.clone();
        if let Some(tls) = &tls {
            extra_args.extend(tls.args());
        }
        let mut cluster = Cluster {
            engine,
            secret: format!("secret-{}", uuid::Uuid::new_v4().simple()),
            nodes: Vec::new(),
            peers: peers.join(","),
            dir: dir.clone(),
            pg_databases: Vec::new(),
            extra_args,
            tls,
            net,
        };
        for (i, port) in ports.iter().enumerate() {
            let own_url = options.db_urls.iter().find(|(id, _)| *id == i as u64).map(|(_, url)| url.clone());
            let db = match engine {
                _ if own_url.is_some() => own_url.unwrap(),
                Engine::Sqlite => {
                    let own = options.sqlite_dirs.iter().find(|(id, _)| *id == i as u64).map(|(_, d)| d.clone());
                    format!("sqlite://{}", own.unwrap_or(dir.clone()).join(format!("node{i}.db")).display())
                }
                Engine::Postgres => {
                    let (url, name) = fresh_pg_db(&format!("{unique}_n{i}")).await;
                    cluster.pg_databases.push(name);
                    url
                }
            };
            cluster.nodes.push(Node {
                id: i as u64,
                addr: format!("{}:{port}", hosts[i]),
                db,
                log: dir.join(format!("node{i}.log")),
                child: None,
                starts: 0,
                tls: tls_on,
                env: options
                    .env
                    .iter()
                    .filter(|(id, ..)| *id == i as u64)
                    .map(|(_, k, v)| (k.clone(), v.clone()))
                    .collect(),
            });
        }
        step!("starting {n} replicas ({engine:?}) in {}: {}", dir.display(), cluster.peers);
        let mut pending = Vec::new();
        for i in 0..n {
            pending.push(cluster.spawn(i as u64));
        }
        for (i, ready) in pending.into_iter().enumerate() {
            cluster.await_ready(i as u64, ready).await;
        }
        cluster
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[id as usize]
    }

    /// Ids of the nodes whose process is running (as far as the harness knows).
    pub fn live(&self) -> Vec<u64> {
        self.nodes.iter().filter(|n| n.is_running()).map(|n| n.id).collect()
    }

    pub fn http_urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::http_url).collect()
    }

    pub fn ws_urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::ws_url).collect()
    }

    /// Spawn node `id`'s process; the receiver yields its announced base URL once it is listening.
    fn spawn(&mut self, id: u64) -> tokio::sync::oneshot::Receiver<String> {
        let (peers, secret, extra) = (self.peers.clone(), self.secret.clone(), self.extra_args.clone());
        let node = &mut self.nodes[id as usize];
        assert!(node.child.is_none(), "node {id} is already running");
        node.starts += 1;
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log).unwrap();
        {
            use std::io::Write;
            writeln!(log, "===== harness {}: starting node {id} (start #{}) =====", now_utc(), node.starts).unwrap();
        }
        let node_log = std::env::var("REPLICHAT_CLUSTER_TEST_LOG").unwrap_or_else(|_| "info".into());
        // A test may give its own election timeout in the extra flags.
        let election = if extra.iter().any(|a| a == "--election-timeout-ms") {
            Vec::new()
        } else {
            vec!["--election-timeout-ms".to_owned(), ELECTION_TIMEOUT_MS.to_string()]
        };
        let exe = env!("CARGO_BIN_EXE_replichat");
        let mut command = match &self.net {
            Some(net) => tokio::process::Command::from(net.command(id as usize, exe)),
            None => tokio::process::Command::new(exe),
        };
        let node = &mut self.nodes[id as usize];
        let mut child = command
            .args(["serve", "--id", &id.to_string(), "--listen", &node.addr, "--peers", &peers, "--db", &node.db])
            .args(["--cluster-secret", &secret, "--heartbeat-ms", &HEARTBEAT_MS.to_string()])
            .args(&election)
            .args(["--log", &node_log])
            // Load tests send as fast as they can from one account.
            .args(["--send-rate", "1000000", "--send-burst", "1000000"])
            .args(&extra)
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn replichat");
        // Forward stdout to the log (the process must never write into a closed pipe), and report the
        // listening line.
        let stdout = child.stdout.take().unwrap();
        let log_path = node.log.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("replichat listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url.trim().to_owned());
                    }
                }
                if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&log_path) {
                    use std::io::Write;
                    let _ = writeln!(f, "[stdout] {line}");
                }
            }
        });
        node.child = Some(child);
        rx
    }

    async fn await_ready(&mut self, id: u64, ready: tokio::sync::oneshot::Receiver<String>) {
        match tokio::time::timeout(STARTUP, ready).await {
            Ok(Ok(url)) => {
                assert_eq!(url, self.node(id).http_url(), "node {id} announces the address it was given");
                step!("node {id} listening on {url}");
            }
            Ok(Err(_)) => {
                let status = self.nodes[id as usize].child.as_mut().unwrap().wait().await;
                panic!("node {id} exited before listening ({status:?}); log:\n{}", self.log_tail(id, LOG_TAIL));
            }
            Err(_) => panic!("node {id} did not print its listening line within {STARTUP:?}"),
        }
    }

    /// SIGKILL node `id` and reap it: when this returns, the process is gone.
    pub async fn kill(&mut self, id: u64) {
        let node = &mut self.nodes[id as usize];
        let mut child = node.child.take().unwrap_or_else(|| panic!("node {id} is not running"));
        child.start_kill().expect("SIGKILL");
        let status = child.wait().await.expect("reap");
        append_marker(&node.log, &format!("SIGKILL (exit status {status:?})"));
        step!("node {id} killed with SIGKILL");
    }

    /// SIGTERM node `id` and wait for it to exit (SIGKILL after 15 s).
    pub async fn stop(&mut self, id: u64) {
        let node = &mut self.nodes[id as usize];
        let Some(mut child) = node.child.take() else { return };
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        }
        let status = match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
            Ok(status) => format!("{status:?}"),
            Err(_) => {
                let _ = child.start_kill();
                format!("did not stop on SIGTERM within 15 s, killed: {:?}", child.wait().await)
            }
        };
        append_marker(&node.log, &format!("stopped with SIGTERM (exit status {status})"));
        step!("node {id} stopped: {status}");
    }

    pub async fn stop_all(&mut self) {
        for id in self.live() {
            self.stop(id).await;
        }
    }

    /// Start node `id` again, on the same port and database, and wait until it listens.
    pub async fn restart(&mut self, id: u64) {
        let ready = self.spawn(id);
        self.await_ready(id, ready).await;
    }

    /// `GET /api/cluster` on node `id`: `None` when it does not answer 200 with JSON (dead, starting, ...).
    pub async fn status(&self, id: u64) -> Option<Value> {
        match self.get(id, "/api/cluster").await {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    /// `GET path` on node `id`, over TLS in a TLS cluster.
    pub async fn get(&self, id: u64, path: &str) -> Result<(u16, String), String> {
        match &self.tls {
            None => http_get(&self.node(id).addr, path).await,
            Some(tls) => https_get(&self.node(id).addr, path, tls.client.clone()).await,
        }
    }

    /// The simulated network the nodes run in ([`Options::netsim`]).
    pub fn net(&self) -> Option<&replichat_netsim::Net> {
        self.net.as_ref()
    }

    /// [`Client::connect_any`] to `url`, over TLS in a TLS cluster.
    pub async fn connect_any(&self, url: &str) -> Result<(Client, ServerBody), String> {
        match &self.tls {
            None => Client::connect_any(url).await,
            Some(tls) => Client::connect_any_tls(url, tls.client.clone()).await,
        }
    }

    /// A client of node `id` (over wss in a TLS cluster), expecting `welcome`.
    pub async fn client(&self, id: u64) -> Client {
        match &self.tls {
            None => Client::connect(&self.node(id).ws_url()).await,
            Some(tls) => Client::connect_tls(&self.node(id).ws_url(), tls.client.clone()).await,
        }
    }

    /// `GET /healthz` on node `id`: its status code and JSON body (`Err` when it does not answer with JSON).
    pub async fn healthz(&self, id: u64) -> Result<(u16, Value), String> {
        let (code, body) = self.get(id, "/healthz").await?;
        Ok((code, serde_json::from_str(&body).map_err(|e| format!("/healthz is not JSON: {e}: {body}"))?))
    }

    /// `/healthz`'s `voter` on node `id` (false while it is a learner; `None` when it does not answer).
    pub async fn is_voter(&self, id: u64) -> Option<bool> {
        self.healthz(id).await.ok()?.1["voter"].as_bool()
    }

    /// Register accounts alice and bob (password `password123`) on the primary; their sockets, in that order.
    pub async fn register_alice_and_bob(&self) -> (Client, Client) {
        let alice = self.register_on_primary("alice", "password123").await;
        let bob = self.register_on_primary("bob", "password123").await;
        (alice, bob)
    }

    /// A client of the primary with `username` registered. `unavailable` (the primary lost its term or could
    /// not commit in time: on a stalled two-core machine a new cluster's first primary sometimes does) is
    /// retried on whichever replica is primary then, as docs/PROTOCOL.md tells clients; a registration that
    /// was committed after all answers the retry `username_taken`, and the client logs in instead.
    pub async fn register_on_primary(&self, username: &str, password: &str) -> Client {
        let deadline = Instant::now() + Duration::from_secs(30);
        let (mut login, mut unavailable) = (false, 0);
        loop {
            let mut client = self.client_to_primary().await;
            let (name, secret) = (username.to_owned(), password.to_owned());
            let request = if login {
                Request::Login { username: name, password: secret }
            } else {
                Request::Register { username: name, password: secret }
            };
            match client.try_open(request).await {
                ServerBody::Session { .. } => return client,
                ServerBody::Error { code: ErrorCode::Unavailable, .. } if Instant::now() < deadline => unavailable += 1,
                ServerBody::Error { code: ErrorCode::UsernameTaken, .. } if unavailable > 0 && !login => login = true,
                other => panic!("registering {username} on the primary: {other:?}"),
            }
            client.close().await;
        }
    }

    /// Wait until every running node is a voter (a new cluster's replicas are learners until they have an entry
    /// of the first primary's term), or panic at the deadline.
    pub async fn wait_all_voters(&self, within: Duration) {
        let deadline = Instant::now() + within;
        for id in self.live() {
            while self.is_voter(id).await != Some(true) {
                assert!(Instant::now() < deadline, "node {id} is not a voter after {within:?}");
                tokio::time::sleep(POLL).await;
            }
        }
    }

    /// Statuses of every running node (`None` for a node that did not answer).
    pub async fn statuses(&self) -> Vec<(u64, Option<Value>)> {
        let mut out = Vec::new();
        for id in self.live() {
            out.push((id, self.status(id).await));
        }
        out
    }

    /// Poll every running node's status until `cond` holds on them (all must answer), or panic at the
    /// deadline with the last statuses seen.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        within: Duration,
        mut cond: impl FnMut(&[(u64, Value)]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            let statuses = self.statuses().await;
            if statuses.iter().all(|(_, s)| s.is_some()) {
                let all: Vec<(u64, Value)> = statuses.iter().map(|(id, s)| (*id, s.clone().unwrap())).collect();
                if let Some(result) = cond(&all) {
                    return result;
                }
            }
            if Instant::now() >= deadline {
                let mut report = String::new();
                for (id, status) in &statuses {
                    let status = status.as_ref().map_or("no answer".into(), Value::to_string);
                    let _ = writeln!(report, "  node {id}: {status}");
                }
                panic!("timed out after {within:?} waiting for {what}; last /api/cluster answers:\n{report}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Wait until every running node answers, they all name the same leader in the same term, that leader is
    /// running and reports itself `primary`, and every other running node reports `backup`. Returns its id.
    pub async fn wait_for_primary(&self, within: Duration) -> u64 {
        let started = Instant::now();
        let leader = self
            .wait_until("an agreed primary", within, |all| {
                let leader = all[0].1["leader"].as_u64()?;
                let term = all[0].1["term"].as_u64()?;
                let agreed = all.iter().all(|(id, s)| {
                    s["leader"].as_u64() == Some(leader)
                        && s["term"].as_u64() == Some(term)
                        && s["role"].as_str() == Some(if *id == leader { "primary" } else { "backup" })
                });
                (agreed && all.iter().any(|(id, _)| *id == leader)).then_some(leader)
            })
            .await;
        step!("primary is node {leader} (agreed after {:?})", started.elapsed());
        leader
    }

    /// Wait until every running node has applied the same index, has nothing more in its log
    /// (`last_index == applied_index`) and knows it committed (`commit_index == applied_index`): the
    /// replicated state is at rest and identical everywhere. Returns that index.
    pub async fn wait_applied_equal(&self, within: Duration) -> u64 {
        let index = self
            .wait_until("equal applied_index on every running node", within, |all| {
                let applied = all[0].1["applied_index"].as_u64()?;
                all.iter()
                    .all(|(_, s)| {
                        s["applied_index"].as_u64() == Some(applied)
                            && s["last_index"].as_u64() == Some(applied)
                            && s["commit_index"].as_u64() == Some(applied)
                    })
                    .then_some(applied)
            })
            .await;
        step!("nodes {:?} all applied index {index}", self.live());
        index
    }

    /// Dumps of the running nodes `ids` (the whole database, or the state without the log) taken while the
    /// cluster is at rest: [`Cluster::wait_applied_equal`], the dumps, then the same check again; repeated
    /// if an entry arrived meanwhile (a socket that closes makes the primary record when its user was last
    /// seen, a write of its own the test does not wait for).
    /// Returns the applied index they are dumps of, and the dumps in the order of `ids`.
    pub async fn dumps_at_rest(&self, ids: &[u64], state_only: bool) -> (u64, Vec<String>) {
        for _ in 0..10 {
            let index = self.wait_applied_equal(Duration::from_secs(20)).await;
            let mut dumps = Vec::new();
            for &id in ids {
                dumps.push(if state_only { self.dump_state(id).await } else { self.dump(id).await });
            }
            if self.wait_applied_equal(Duration::from_secs(20)).await == index {
                return (index, dumps);
            }
            step!("an entry arrived while dumping index {index}; dumping again");
        }
        panic!("the cluster never stayed at rest long enough to dump nodes {ids:?}");
    }

    /// Every entry that two of the running nodes `ids` both hold, at rest, is the same on both: same term, same
    /// op (logs may start at different points, as each compacts on its own).
    pub async fn assert_logs_agree(&self, ids: &[u64]) {
        let (_, dumps) = self.dumps_at_rest(ids, false).await;
        let logs: Vec<std::collections::BTreeMap<&str, (&str, &str)>> = dumps
            .iter()
            .map(|dump| {
                replichat::storage::dump_section(dump, "log")
                    .into_iter()
                    .map(|row| (row[0], (row[1], row[2])))
                    .collect()
            })
            .collect();
        for (a, log_a) in ids.iter().zip(&logs) {
            for (b, log_b) in ids.iter().zip(&logs) {
                for (index, entry) in log_a {
                    if let Some(other) = log_b.get(index) {
                        assert_eq!(entry, other, "entry {index} differs between node {a} and node {b}");
                    }
                }
            }
        }
    }

    /// A client connected to the current primary (after waiting for one).
    pub async fn client_to_primary(&self) -> Client {
        let leader = self.wait_for_primary(Duration::from_secs(15)).await;
        let client = self.client(leader).await;
        let ServerBody::Welcome { node, .. } = client.welcome else { unreachable!() };
        assert_eq!(node, leader, "the primary's welcome names it");
        client
    }

    /// The canonical dump of node `id`'s database (the process may be running: SQLite WAL allows a reader).
    pub async fn dump(&self, id: u64) -> String {
        let db = replichat::storage::Db::open(&self.node(id).db).await.expect("open a node's database");
        let dump = db.dump().await.expect("dump");
        db.close().await;
        dump
    }

    /// Node `id`'s replicated state without the log (equal on replicas that compacted at different points).
    pub async fn dump_state(&self, id: u64) -> String {
        let db = replichat::storage::Db::open(&self.node(id).db).await.expect("open a node's database");
        let dump = db.dump_state().await.expect("dump");
        db.close().await;
        dump
    }

    /// The last `lines` lines of node `id`'s log.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.node(id).log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stop every node, drop the PostgreSQL databases and remove the test directory. Call at the end of a
    /// passing test; a failing test keeps everything for inspection.
    pub async fn finish(mut self) {
        self.stop_all().await;
        if !self.pg_databases.is_empty() {
            if let Ok(mut admin) = sqlx::PgConnection::connect(&format!("{}/postgres", pg_base())).await {
                for name in &self.pg_databases {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                        .execute(&mut admin)
                        .await;
                }
            }
        }
        if std::env::var_os("REPLICHAT_CLUSTER_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("\n===== cluster test failed ({:?}); node logs are in {} =====", self.engine, self.dir.display());
            for id in 0..self.nodes.len() {
                // A process the harness did not stop may have died on its own (or been signalled by someone
                // else): say so, with its exit status.
                let state = match self.nodes[id].child.as_mut().map(Child::try_wait) {
                    None => "not running".to_owned(),
                    Some(Ok(None)) => "running".to_owned(),
                    Some(Ok(Some(status))) => format!("EXITED UNEXPECTEDLY: {status}"),
                    Some(Err(e)) => format!("state unknown: {e}"),
                };
                let node = &self.nodes[id];
                eprintln!(
                    "----- node {} ({}, {state}) last {LOG_TAIL} log lines -----\n{}",
                    node.id,
                    node.addr,
                    self.log_tail(node.id, LOG_TAIL)
                );
            }
            eprintln!("===== end of node logs =====");
        }
        // Otherwise the processes die with the harness (kill_on_drop); without `finish` the files stay.
    }
}

fn append_marker(log: &std::path::Path, what: &str) {
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(log) {
        let _ = writeln!(f, "===== harness {}: {what} =====", now_utc());
    }
}

fn pg_base() -> String {
    std::env::var("REPLICHAT_TEST_PG")
        .expect(
            "REPLICHAT_TEST_PG is not set: run the README's test command (scripts/test.sh), which starts \
             PostgreSQL and sets it, e.g. postgres://replichat:replichat@127.0.0.1:5432",
        )
        .trim_end_matches('/')
        .to_owned()
}

/// A new empty PostgreSQL database; returns its URL and name. Named `replichat_test_*` so `scripts/test.sh`
/// drops it if a run is interrupted.
async fn fresh_pg_db(unique: &str) -> (String, String) {
    let base = pg_base();
    let name = format!("replichat_test_{unique}");
    let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres")).await.expect("connect to PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .expect("create test database");
    (format!("{base}/{name}"), name)
}

/// A minimal HTTP/1.1 GET (`Connection: close`) over a raw socket: the status code and the body. Fails fast
/// (an `Err`) when nothing listens, and after 2 s in any case.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String), String> {
    http_get_with_head(addr, path).await.map(|(status, _, body)| (status, body))
}

/// [`http_get`] over TLS, trusting what `config` trusts (the host checked is 127.0.0.1 or the name in `addr`).
pub async fn https_get(
    addr: &str,
    path: &str,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> Result<(u16, String), String> {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host).to_owned();
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let name = replichat::tls::server_name(&host)?;
        tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map_err(|e| format!("TLS {addr}: {e}"))
    };
    let stream = tokio::time::timeout(Duration::from_secs(2), connect)
        .await
        .map_err(|_| format!("GET {addr}{path}: timed out connecting"))??;
    get_over(stream, addr, path).await.map(|(status, _, body)| (status, body))
}

/// [`http_get`], with the response head (status line and headers) too.
pub async fn http_get_with_head(addr: &str, path: &str) -> Result<(u16, String, String), String> {
    let stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("GET {addr}{path}: timed out connecting"))?
        .map_err(|e| format!("connect {addr}: {e}"))?;
    get_over(stream, addr, path).await
}

async fn get_over(
    mut stream: impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    addr: &str,
    path: &str,
) -> Result<(u16, String, String), String> {
    let request = async {
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(|e| format!("read: {e}"))?;
        Ok::<_, String>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(2), request)
        .await
        .map_err(|_| format!("GET {addr}{path}: timed out"))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("GET {addr}{path}: no header end"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("GET {addr}{path}: bad status line in {head:?}"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_owned() };
    Ok((status, head.to_owned(), body))
}

fn dechunk(mut rest: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or("bad chunk header")?;
        let size = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).map_err(|e| e.to_string())?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).ok_or("short chunk")?);
        rest = after.get(size + 2..).ok_or("short chunk")?;
    }
}

// ---- Reading a canonical dump (backend/src/storage.rs `Db::dump`). ----

pub use replichat::storage::dump_section;

/// Assert two dumps are equal, naming the first differing section and line when they are not.
pub fn assert_same_dump(a_name: &str, a: &str, b_name: &str, b: &str) {
    if a == b {
        return;
    }
    let sections = |d: &str| -> Vec<String> { d.lines().filter(|l| l.starts_with("## ")).map(str::to_owned).collect() };
    let mut report = String::new();
    for section in sections(a).into_iter().chain(sections(b)) {
        let name = section.trim_start_matches("## ");
        let (ra, rb) = (dump_section(a, name), dump_section(b, name));
        if ra != rb {
            let _ = writeln!(report, "section {name}: {} rows on {a_name}, {} rows on {b_name}", ra.len(), rb.len());
            if let Some(i) = (0..ra.len().max(rb.len())).find(|i| ra.get(*i) != rb.get(*i)) {
                let _ = writeln!(report, "  first difference at row {i}:");
                let _ = writeln!(report, "    {a_name}: {:?}", ra.get(i).map(|r| r.join("\t")));
                let _ = writeln!(report, "    {b_name}: {:?}", rb.get(i).map(|r| r.join("\t")));
            }
            break;
        }
    }
    panic!("the canonical dumps of {a_name} and {b_name} differ:\n{report}");
}
