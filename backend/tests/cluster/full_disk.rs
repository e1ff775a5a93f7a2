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

/// Poll node `id`'s `/healthz` until it answers 200 (healthy again two election timeouts after its last
/// storage failure), or fail after 10 s.
async fn wait_healthy(cluster: &Cluster, id: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = healthz(cluster, id).await;
        if code == 200 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "node {id} still unhealthy: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every message id in `acknowledged` is in `client`'s history with `with` (read page by page, newest first).
async fn assert_all_in_history(client: &mut Client, with: &str, acknowledged: &[u64]) {
    let mut stored = std::collections::BTreeSet::new();
    let mut before = None;
    loop {
        let history = client.request(Request::History { with: with.into(), before, limit: Some(200) }).await;
        let ServerBody::History { messages, .. } = history else { panic!("{history:?}") };
        let Some(first) = messages.first() else { break };
        before = Some(first.id);
        stored.extend(messages.iter().map(|m| m.id));
    }
    for id in acknowledged {
        assert!(stored.contains(id), "acknowledged message {id} is missing");
    }
}

/// Once at rest, `nodes` hold identical states, and `client` (alice) finds every acknowledged message in her
/// history with bob.
async fn assert_all_acknowledged_on_both(
    cluster: &Cluster,
    nodes: [u64; 2],
    client: &mut Client,
    acknowledged: &[u64],
) {
    step!("every acknowledged message ({}) is on every replica", acknowledged.len());
    let (_, states) = cluster.dumps_at_rest(&nodes, true).await;
    assert_same_dump(&format!("node {}", nodes[0]), &states[0], &format!("node {}", nodes[1]), &states[1]);
    assert_all_in_history(client, "bob", acknowledged).await;
}

async fn healthz(cluster: &Cluster, id: u64) -> (u16, Value) {
    cluster.healthz(id).await.expect("/healthz answers with JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_with_a_full_disk_steps_down_and_rejoins_once_there_is_space() {
    full_primary_disk(Options::default()).await;
}

/// Node 0 leads with its SQLite file on a small tmpfs, which fills up: it steps down, another replica takes
/// over, `/healthz` says why node 0 is unhealthy, and once space is freed it catches up and is healthy again,
/// with every acknowledged message. On a cluster started with `options` (loopback or simulated).
pub async fn full_primary_disk(options: Options) {
    let tmpfs = Tmpfs::mount("8m");
    let options = Options { sqlite_dirs: vec![(0, tmpfs.0.clone())], ..options };
    let cluster = Cluster::start_with(3, Engine::Sqlite, options).await;
    assert_eq!(cluster.wait_for_primary(Duration::from_secs(10)).await, 0, "node 0, on the tmpfs, leads");
    let (mut alice, bob) = cluster.register_alice_and_bob().await;
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
    wait_healthy(&cluster, 0).await;

    assert_all_acknowledged_on_both(&cluster, [leader, 0], &mut alice, &acknowledged).await;
    // Node 0 shipped its last entries before its own append failed: the replicas that stored them and node 0,
    // which took them from the new primary, hold the same op under each (index, term).
    cluster.assert_logs_agree(&[0, 1, 2]).await;
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
    full_backup_disk(Options::default()).await;
}

/// Node 2, a backup, has its SQLite file on a small tmpfs, which fills up: the primary shows it as failing
/// and keeps committing with node 1; once space is freed node 2 rejoins with every acknowledged message. On a
/// cluster started with `options` (loopback or simulated).
pub async fn full_backup_disk(options: Options) {
    let tmpfs = Tmpfs::mount("8m");
    let options = Options { sqlite_dirs: vec![(2, tmpfs.0.clone())], ..options };
    let cluster = Cluster::start_with(3, Engine::Sqlite, options).await;
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;
    assert_ne!(leader, 2, "node 2 goes last in elections");
    let (mut alice, bob) = cluster.register_alice_and_bob().await;

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
    wait_healthy(&cluster, 2).await;
    let (_, states) = cluster.dumps_at_rest(&[leader, 2], true).await;
    assert_same_dump(&format!("node {leader}"), &states[0], "node 2", &states[1]);
    let state = &states[0];
    for i in 0..50 {
        assert!(state.contains(&format!("while node 2 is full {i}")), "acknowledged message {i} is missing");
    }
    assert_eq!(acknowledged.len(), 50);
    alice.close().await;
    bob.close().await;
    cluster.finish().await;
    drop(tmpfs);
}

/// A PostgreSQL server of the test's own whose data directory is on a small tmpfs (its write-ahead log on the
/// normal disk, as a separate WAL volume would be: a full WAL disk makes PostgreSQL itself stop), on a free
/// port; stopped and unmounted on drop. Needs root and PostgreSQL 15's binaries.
struct SmallPostgres {
    data: Tmpfs,
    wal: PathBuf,
    port: u16,
}

impl SmallPostgres {
    const BIN: &'static str = "/usr/lib/postgresql/15/bin";

    fn as_postgres(args: &[&str]) {
        let status = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("runuser");
        assert!(status.success(), "{args:?} failed");
    }

    fn start(size: &str) -> SmallPostgres {
        let data = Tmpfs::mount(size);
        let wal = std::env::temp_dir().join(format!("replichat-pgwal-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&wal).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        for dir in [&data.0, &wal] {
            assert!(std::process::Command::new("chown").arg("postgres").arg(dir).status().unwrap().success());
        }
        let pgdata = data.0.join("pgdata");
        let (pgdata_s, wal_s) = (pgdata.display().to_string(), wal.join("wal").display().to_string());
        Self::as_postgres(&[
            &format!("{}/initdb", Self::BIN),
            "-D",
            &pgdata_s,
            "--waldir",
            &wal_s,
            "-A",
            "trust",
            "-U",
            "replichat",
        ]);
        let log = wal.join("server.log").display().to_string();
        let options = format!("-p {port} -k /tmp -c listen_addresses=127.0.0.1 -c shared_buffers=1MB");
        Self::as_postgres(&[
            &format!("{}/pg_ctl", Self::BIN),
            "-D",
            &pgdata_s,
            "-l",
            &log,
            "-o",
            &options,
            "-w",
            "start",
        ]);
        SmallPostgres { data, wal, port }
    }

    /// A new database on it.
    async fn database(&self, name: &str) -> String {
        use sqlx::Connection;
        let base = format!("postgres://replichat@127.0.0.1:{}", self.port);
        let mut admin = sqlx::PgConnection::connect(&format!("{base}/postgres")).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create database");
        format!("{base}/{name}")
    }
}

impl Drop for SmallPostgres {
    fn drop(&mut self) {
        let pgdata = self.data.0.join("pgdata").display().to_string();
        let _ = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{}/pg_ctl", Self::BIN), "-D", &pgdata, "-m", "immediate", "stop"])
            .stdout(std::process::Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.wal);
    }
}

/// The same on PostgreSQL: node `full` keeps its database on a server whose data disk fills up. Nothing
/// acknowledged is lost, the other two keep serving (a full primary steps down), `/healthz` says why, and the
/// replica rejoins by itself once space is freed (PostgreSQL itself keeps running: its WAL has room).
async fn full_postgres_disk(full: u64) {
    let small = SmallPostgres::start("64m");
    let url = small.database("node_full").await;
    let options = Options { db_urls: vec![(full, url)], ..Options::default() };
    let cluster = Cluster::start_with(3, Engine::Postgres, options).await;
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;
    let (mut alice, bob) = cluster.register_alice_and_bob().await;
    let mut acknowledged = vec![alice.send_message("bob", "before the disk filled").await];

    step!("node {full}'s PostgreSQL data disk fills up; messages keep being sent");
    fill(&small.data.0.join("filler"));
    for i in 0..300 {
        let send =
            Request::Send { to: "bob".into(), text: format!("m{i} {}", "x".repeat(900)), client_id: format!("c{i}") };
        match alice.try_request(send, Duration::from_secs(5)).await {
            Ok(ServerBody::Sent { id, .. }) => acknowledged.push(id),
            _ => break,
        }
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = healthz(&cluster, full).await;
        if code == 503 {
            assert_eq!(body["status"].as_str(), Some("storage_failing"), "{body}");
            step!("node {full}: {body}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "node {full} never reported its full disk: {body}");
        // Keep writing: a backup's disk is only found full when it must store something.
        let mut writer = cluster.client_to_primary().await;
        writer.login("alice", "password123").await;
        acknowledged
            .push(writer.send_message("bob", &format!("probe {} {}", acknowledged.len(), "y".repeat(900))).await);
        writer.close().await;
    }
    let leader_now = cluster.wait_for_primary(Duration::from_secs(10)).await;
    assert_ne!(leader_now, full, "a replica with a full disk does not lead");
    if full != leader {
        assert_eq!(leader_now, leader, "no election for a backup's disk");
    }
    let mut alice = cluster.client_to_primary().await;
    alice.login("alice", "password123").await;
    for i in 0..5 {
        acknowledged.push(alice.send_message("bob", &format!("while node {full} is full {i}")).await);
    }

    step!("space is freed: node {full} catches up by itself and is healthy again");
    std::fs::remove_file(small.data.0.join("filler")).unwrap();
    cluster.wait_applied_equal(Duration::from_secs(30)).await;
    wait_healthy(&cluster, full).await;
    assert_all_acknowledged_on_both(&cluster, [leader_now, full], &mut alice, &acknowledged).await;
    alice.close().await;
    bob.close().await;
    cluster.finish().await;
    drop(small);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_on_a_full_postgres_disk_steps_down_and_rejoins() {
    full_postgres_disk(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_on_a_full_postgres_disk_says_so_and_rejoins() {
    full_postgres_disk(2).await;
}
