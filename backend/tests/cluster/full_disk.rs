//! A replica whose disk fills up is a failed replica, not a stuck cluster: the primary steps down, a replica
//! with a working disk takes over, `/healthz` says why the full one is unhealthy, and once space is freed it
//! rejoins by itself. Needs root (it mounts a small tmpfs under the primary's SQLite file).

use std::path::{Path, PathBuf};
use std::time::Duration;

use replichat_shared::{Request, ServerBody};
use serde_json::Value;

use crate::harness::*;
use crate::step;

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = std::env::temp_dir().join(format!("replichat-tmpfs-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount (root needed)");
        assert!(status.success(), "mount a tmpfs on {} (root needed)", dir.display());
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Fill the file system under `path` with one file until it is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).unwrap();
    let block = vec![0u8; 4096];
    while file.write_all(&block).and_then(|_| file.sync_all()).is_ok() {}
}

async fn healthz(cluster: &Cluster, id: u64) -> (u16, Value) {
    let (code, body) = http_get(&cluster.node(id).addr, "/healthz").await.expect("/healthz answers");
    (code, serde_json::from_str(&body).expect("/healthz is JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_with_a_full_disk_steps_down_and_rejoins_once_there_is_space() {
    let tmpfs = Tmpfs::mount("8m");
    let options = Options { sqlite_dirs: vec![(0, tmpfs.0.clone())], ..Options::default() };
    let cluster = Cluster::start_with(3, Engine::Sqlite, options).await;
    assert_eq!(cluster.wait_for_primary(Duration::from_secs(10)).await, 0, "node 0, on the tmpfs, leads");
    let mut alice = cluster.client_to_primary().await;
    alice.register("alice", "password123").await;
    let mut bob = cluster.client_to_primary().await;
    bob.register("bob", "password123").await;
    let mut acknowledged = vec![alice.send_message("bob", "before the disk filled").await];

    step!("node 0's disk fills up; writes to it fail until it steps down");
    fill(&tmpfs.0.join("filler"));
    for i in 0..200 {
        let send = Request::Send { to: "bob".into(), text: format!("m{i}"), client_id: format!("c{i}") };
        match alice.try_request(send, Duration::from_secs(5)).await {
            Ok(ServerBody::Sent { id, .. }) => acknowledged.push(id),
            _ => break,
        }
    }
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;
    assert_ne!(leader, 0, "a replica with a working disk took over");

    step!("node 0's /healthz says why it is unhealthy; node {leader} serves writes");
    let (code, body) = healthz(&cluster, 0).await;
    assert_eq!((code, body["status"].as_str()), (503, Some("storage_failing")), "{body}");
    assert!(body["reason"].as_str().is_some_and(|r| r.contains("full")), "{body}");
    assert_eq!(healthz(&cluster, leader).await.0, 200);
    let mut alice = cluster.client_to_primary().await;
    alice.login("alice", "password123").await;
    for i in 0..5 {
        acknowledged.push(alice.send_message("bob", &format!("while node 0 is full {i}")).await);
    }

    step!("space is freed: node 0 catches up by itself and is healthy again");
    std::fs::remove_file(tmpfs.0.join("filler")).unwrap();
    cluster.wait_applied_equal(Duration::from_secs(20)).await;
    // Healthy again two election timeouts after its last storage failure (polling, as the harness does).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = healthz(&cluster, 0).await;
        if code == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "node 0 still unhealthy: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    step!("every acknowledged message ({}) is on every replica", acknowledged.len());
    let state = cluster.dump_state(leader).await;
    assert_same_dump(&format!("node {leader}"), &state, "node 0", &cluster.dump_state(0).await);
    let history = alice.request(Request::History { with: "bob".into(), before: None, limit: Some(200) }).await;
    let ServerBody::History { messages, .. } = history else { panic!("{history:?}") };
    for id in &acknowledged {
        assert!(messages.iter().any(|m| m.id == *id), "acknowledged message {id} is missing");
    }
    alice.close().await;
    bob.close().await;
    cluster.finish().await;
    drop(tmpfs);
}

/// A backup whose disk fills up says so to the primary (an explicit failed `appended`, not silence): the
/// primary shows it as `failing`, keeps committing with the other backup, and the full one rejoins by itself
/// once space is freed, with every acknowledged message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_with_a_full_disk_says_so_and_rejoins_once_there_is_space() {
    let tmpfs = Tmpfs::mount("8m");
    let options = Options { sqlite_dirs: vec![(2, tmpfs.0.clone())], ..Options::default() };
    let cluster = Cluster::start_with(3, Engine::Sqlite, options).await;
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;
    assert_ne!(leader, 2, "node 2 goes last in elections");
    let mut alice = cluster.client_to_primary().await;
    alice.register("alice", "password123").await;
    let mut bob = cluster.client_to_primary().await;
    bob.register("bob", "password123").await;

    step!("node 2's disk fills up; the two others keep acknowledging every message");
    fill(&tmpfs.0.join("filler"));
    let mut acknowledged = Vec::new();
    for i in 0..50 {
        acknowledged.push(alice.send_message("bob", &format!("while node 2 is full {i}")).await);
    }
    let failing = cluster
        .wait_until("the primary to show node 2 as failing", Duration::from_secs(10), |all| {
            let primary = all.iter().find(|(id, _)| *id == leader)?;
            let node2 = primary.1["replicas"].as_array()?.iter().find(|r| r["id"].as_u64() == Some(2))?.clone();
            (node2["role"].as_str() == Some("failing") && node2["alive"].as_bool() == Some(true)).then_some(node2)
        })
        .await;
    step!("the primary's view of node 2: {failing}");
    let (code, body) = healthz(&cluster, 2).await;
    assert_eq!((code, body["status"].as_str()), (503, Some("storage_failing")), "{body}");
    assert_eq!(cluster.wait_for_primary(Duration::from_secs(5)).await, leader, "no election for a backup's disk");

    step!("space is freed: node 2 catches up by itself and is healthy again");
    std::fs::remove_file(tmpfs.0.join("filler")).unwrap();
    cluster.wait_applied_equal(Duration::from_secs(20)).await;
    cluster
        .wait_until("the primary to show node 2 as a backup again", Duration::from_secs(10), |all| {
            let primary = all.iter().find(|(id, _)| *id == leader)?;
            let node2 = primary.1["replicas"].as_array()?.iter().find(|r| r["id"].as_u64() == Some(2))?.clone();
            (node2["role"].as_str() == Some("backup")).then_some(())
        })
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = healthz(&cluster, 2).await;
        if code == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "node 2 still unhealthy: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = cluster.dump_state(leader).await;
    assert_same_dump(&format!("node {leader}"), &state, "node 2", &cluster.dump_state(2).await);
    for i in 0..50 {
        assert!(state.contains(&format!("while node 2 is full {i}")), "acknowledged message {i} is missing");
    }
    assert_eq!(acknowledged.len(), 50);
    alice.close().await;
    bob.close().await;
    cluster.finish().await;
    drop(tmpfs);
}
