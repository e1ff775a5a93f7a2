//! Test harness: a fresh database per test (SQLite file or throw-away PostgreSQL database), the real
//! server on port 0, and a WebSocket client that speaks the protocol.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use replichat::{Config, Running};
use sqlx::Connection;

// Shared with the cluster suite, which uses parts this suite does not.
#[allow(dead_code)]
#[path = "../common/client.rs"]
mod client;
pub use client::*;

#[path = "../common/entries.rs"]
pub mod entries;

/// Which engine a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// Run the same test body once per engine: `both!(name, |engine| async move { ... })`.
#[macro_export]
macro_rules! both {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::util::init_tracing();
                ($body)($crate::util::Engine::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $crate::util::init_tracing();
                ($body)($crate::util::Engine::Postgres).await
            }
        }
    };
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A database URL no other test uses. PostgreSQL needs `REPLICHAT_TEST_PG` (a server URL whose role may
/// create databases); the README's test command sets it.
pub async fn fresh_db(engine: Engine) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let unique = format!("{}_{}_{n}", std::process::id(), uuid::Uuid::new_v4().simple());
    match engine {
        Engine::Sqlite => {
            let dir = std::env::temp_dir().join("replichat-tests");
            std::fs::create_dir_all(&dir).unwrap();
            format!("sqlite://{}", dir.join(format!("{unique}.db")).display())
        }
        Engine::Postgres => {
            let base = std::env::var("REPLICHAT_TEST_PG").expect(
                "REPLICHAT_TEST_PG is not set: run the README's test command (scripts/test.sh), which starts \
                 PostgreSQL and sets it, e.g. postgres://replichat:replichat@127.0.0.1:5432",
            );
            let base = base.trim_end_matches('/');
            let name = format!("replichat_test_{unique}");
            let mut admin =
                sqlx::PgConnection::connect(&format!("{base}/postgres")).await.expect("connect to PostgreSQL");
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut admin)
                .await
                .expect("create test database");
            format!("{base}/{name}")
        }
    }
}

/// Start a real server on port 0 over a fresh database.
pub async fn server(engine: Engine) -> Server {
    let url = fresh_db(engine).await;
    let running = replichat::start(Config::for_tests(url.clone())).await.expect("server starts");
    Server { addr: running.addr, running: Some(running), url }
}

pub struct Server {
    pub addr: SocketAddr,
    pub running: Option<Running>,
    /// The database URL (to reopen it, or start another server on it).
    pub url: String,
}

impl Server {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn db(&self) -> &replichat::storage::Db {
        &self.running.as_ref().expect("running").db
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.ws_url()).await
    }

    /// A client already registered as `username` (password `password123`).
    pub async fn user(&self, username: &str) -> Client {
        let mut client = self.client().await;
        client.register(username, "password123").await;
        client
    }

    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.expect("clean shutdown");
        }
    }
}

/// The real `replichat` binary serving `db` alone on a free loopback port, with `env` set, its stdout read up
/// to the listening line. Killed when dropped.
pub struct Process {
    pub child: tokio::process::Child,
    /// `http://127.0.0.1:port`.
    pub base: String,
}

impl Process {
    pub async fn spawn(db: &str, env: &[(&str, &str)]) -> Process {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_replichat"))
            .args(["serve", "--id", "3", "--listen", "127.0.0.1:0", "--db", db])
            .args(["--send-rate", "1000000", "--send-burst", "1000000"])
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn replichat");
        let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(WAIT, lines.next_line()).await.expect("startup line").unwrap().expect("a line");
        let base = line.strip_prefix("replichat listening on ").expect("announces its address").to_owned();
        Process { child, base }
    }

    pub fn ws_url(&self) -> String {
        format!("{}/ws", self.base.replace("http://", "ws://"))
    }

    /// SIGTERM, then wait (at most 15 s) for the exit status.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("pid").to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        tokio::time::timeout(std::time::Duration::from_secs(15), self.child.wait()).await.expect("exits").unwrap()
    }
}
