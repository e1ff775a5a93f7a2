//! A backup that comes back with less log than it acknowledged (a wiped disk, an empty file) is caught up by
//! the primary it acknowledged to, by entries or by snapshot, without waiting for a failover.

use std::time::Duration;

use crate::harness::*;
use crate::step;

/// Fill the log, wipe a backup's SQLite file, restart it with the same id: it catches up with the same primary
/// in the same term, to the same state.
async fn wiped_backup_catches_up(options: Options, how: &str) {
    let mut cluster = Cluster::start_with(3, Engine::Sqlite, options).await;
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;
    let backup = (leader + 1) % 3;
    let mut alice = cluster.client_to_primary().await;
    alice.register("alice", "password123").await;
    let mut bob = cluster.client_to_primary().await;
    bob.register("bob", "password123").await;
    for i in 0..30 {
        alice.send_message("bob", &format!("before the wipe {i}")).await;
    }
    let applied = cluster.wait_applied_equal(Duration::from_secs(10)).await;
    let term = cluster.status(leader).await.unwrap()["term"].as_u64().unwrap();

    step!("node {backup} loses its disk: stopped, its SQLite files deleted, restarted with the same id");
    cluster.stop(backup).await;
    let path = cluster.node(backup).db.trim_start_matches("sqlite://").to_owned();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
    assert!(!std::path::Path::new(&path).exists());
    cluster.restart(backup).await;

    step!("it catches up to index {applied} and beyond ({how}) from the same primary, in the same term");
    alice.send_message("bob", "after the wipe").await;
    let caught_up = cluster.wait_applied_equal(Duration::from_secs(20)).await;
    assert!(caught_up > applied, "{caught_up} <= {applied}");
    for id in 0..3 {
        let status = cluster.status(id).await.unwrap();
        assert_eq!((status["leader"].as_u64(), status["term"].as_u64()), (Some(leader), Some(term)), "{status}");
    }
    assert_same_dump(
        &format!("node {leader}"),
        &cluster.dump_state(leader).await,
        &format!("node {backup}"),
        &cluster.dump_state(backup).await,
    );
    alice.close().await;
    bob.close().await;
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_backup_catches_up_by_entries() {
    wiped_backup_catches_up(Options::default(), "by entries").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_backup_catches_up_by_snapshot() {
    let options = Options { args: vec!["--compact-keep".into(), "5".into()], ..Options::default() };
    wiped_backup_catches_up(options, "by snapshot: the primary compacted its log").await;
}
