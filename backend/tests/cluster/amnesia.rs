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
    let (mut alice, bob) = cluster.register_alice_and_bob().await;
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
    let (_, states) = cluster.dumps_at_rest(&[leader, backup], true).await;
    assert_same_dump(&format!("node {leader}"), &states[0], &format!("node {backup}"), &states[1]);
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

/// Raft's amnesia hazard. Entries are committed by the primary and one backup while the other backup is down;
/// the backup that acknowledged them loses its disk; the primary stops. The stale backup lacks the committed
/// entries, and the wiped one cannot know that: if the wiped one voted as if it still had its log, the two would
/// elect the stale one and the committed messages would be gone for good. The wiped replica is a learner
/// instead, so the two wait for the old primary, and then nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_does_not_vote_until_it_has_caught_up() {
    let mut cluster = Cluster::start(3, Engine::Sqlite).await;
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;
    let (acker, stale) = ((leader + 1) % 3, (leader + 2) % 3);
    let (mut alice, bob) = cluster.register_alice_and_bob().await;
    bob.close().await;

    step!("node {stale} stops; ten messages are committed by node {leader} and node {acker} alone");
    cluster.stop(stale).await;
    for i in 0..10 {
        alice.send_message("bob", &format!("committed on two {i}")).await;
    }
    alice.close().await;
    let committed = cluster.wait_applied_equal(Duration::from_secs(10)).await;
    for id in [leader, acker] {
        assert_eq!(cluster.is_voter(id).await, Some(true), "node {id} caught up long ago");
    }

    step!("node {acker} loses its disk, node {leader} stops, nodes {stale} and {acker} start");
    cluster.stop(acker).await;
    let path = cluster.node(acker).db.trim_start_matches("sqlite://").to_owned();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{path}{suffix}"));
    }
    cluster.stop(leader).await;
    cluster.restart(stale).await;
    cluster.restart(acker).await;
    assert_eq!(cluster.is_voter(acker).await, Some(false), "a wiped replica starts as a learner");

    // An absence can only be observed over a window: ten election timeouts, in which the two would have
    // elected node {stale} many times over (it took about one without the learner rule).
    step!("for ten election timeouts, the two elect no one");
    let window = Duration::from_millis(10 * ELECTION_TIMEOUT_MS);
    let until = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < until {
        for (id, status) in cluster.statuses().await {
            let role = status.as_ref().and_then(|s| s["role"].as_str().map(str::to_owned));
            assert_ne!(role.as_deref(), Some("primary"), "node {id} was elected without the committed entries");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    step!("node {leader} returns: it is elected, and every replica gets every committed entry");
    cluster.restart(leader).await;
    assert_eq!(cluster.wait_for_primary(Duration::from_secs(15)).await, leader);
    let mut alice = cluster.client_to_primary().await;
    alice.login("alice", "password123").await;
    alice.send_message("bob", "after the return").await;
    alice.close().await;
    assert!(cluster.wait_applied_equal(Duration::from_secs(20)).await > committed);
    let (_, states) = cluster.dumps_at_rest(&[leader, acker, stale], true).await;
    let reference = &states[0];
    for (id, state) in [(acker, &states[1]), (stale, &states[2])] {
        assert_same_dump(&format!("node {leader}"), reference, &format!("node {id}"), state);
        assert_eq!(cluster.is_voter(id).await, Some(true), "node {id} caught up, so it votes again");
    }
    for i in 0..10 {
        assert!(reference.contains(&format!("committed on two {i}")), "message {i} was lost:\n{reference}");
    }
    cluster.finish().await;
}
