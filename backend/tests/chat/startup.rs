//! What a replica checks before it serves: that the database is its own (replica id and cluster), and that it
//! is not damaged (SQLite's integrity check, the log's own consistency).

use replichat::Config;
use sqlx::Connection;

use crate::both;
use crate::util::*;

/// Start a replica on `url` with this id and secret; the error text if it refuses.
async fn start(url: &str, id: u64, secret: Option<&str>, adopt: bool) -> Result<replichat::Running, String> {
    let config = Config {
        id,
        cluster_secret: secret.map(str::to_owned),
        adopt_database: adopt,
        ..Config::for_tests(url.to_owned())
    };
    replichat::start(config).await.map_err(|e| e.to_string())
}

both!(a_database_serves_only_the_replica_and_cluster_it_belongs_to, |engine| async move {
    let url = fresh_db(engine).await;
    start(&url, 0, Some("secret-a"), false).await.expect("a new database is bound").shutdown().await.unwrap();
    // Restarted as itself: fine.
    start(&url, 0, Some("secret-a"), false).await.expect("its own replica").shutdown().await.unwrap();

    let error = start(&url, 1, Some("secret-a"), false).await.err().expect("another replica id is refused");
    assert!(error.contains("belongs to replica 0, not replica 1") && error.contains("--adopt-database"), "{error}");
    let error = start(&url, 0, Some("secret-b"), false).await.err().expect("another cluster is refused");
    assert!(error.contains("another cluster"), "{error}");

    // Rebinding on purpose works, and sticks.
    start(&url, 1, Some("secret-b"), true).await.expect("adopted").shutdown().await.unwrap();
    start(&url, 1, Some("secret-b"), false).await.expect("now replica 1's").shutdown().await.unwrap();
    assert!(start(&url, 0, Some("secret-a"), false).await.is_err());
});

both!(a_log_with_a_hole_refuses_to_start, |engine| async move {
    let mut server = server(engine).await;
    let mut alice = server.user("alice").await;
    server.user("bob").await;
    for i in 0..5 {
        alice.send_message("bob", &format!("m{i}")).await;
    }
    alice.close().await;
    server.stop().await;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&server.url).await.unwrap();
    sqlx::query("DELETE FROM log WHERE idx = 4").execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
    let error = start(&server.url, 0, None, false).await.err().expect("refused");
    assert!(error.contains("the database is damaged") && error.contains("the log is not contiguous"), "{error}");
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_sqlite_file_refuses_to_start_with_a_clear_message() {
    init_tracing();
    let mut server = server(Engine::Sqlite).await;
    let mut alice = server.user("alice").await;
    server.user("bob").await;
    for i in 0..300 {
        alice.send_message("bob", &format!("message {i} {}", "x".repeat(200))).await;
    }
    alice.close().await;
    server.stop().await;
    // 8 KiB of garbage in the middle of the file (the WAL was checkpointed into it when the last connection
    // closed).
    let path = server.url.trim_start_matches("sqlite://").to_owned();
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(len > 64 * 1024, "the file has pages to damage ({len} bytes)");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.seek(SeekFrom::Start(len / 2 / 4096 * 4096)).unwrap();
        file.write_all(&[0xA5; 8192]).unwrap();
    }
    let error = start(&server.url, 0, None, false).await.err().expect("a damaged database is refused");
    assert!(error.contains("the database is damaged") && error.contains("integrity check failed"), "{error}");
}
