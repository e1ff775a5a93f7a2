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
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create test database");
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
