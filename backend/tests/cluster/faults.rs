//! Faults beyond a crash: a real network partition (iptables), the all-live mode losing two of three
//! replicas, and a backup that catches up through a snapshot after compaction.

use std::time::Duration;

use replichat_shared::{Request, ServerBody};
use tokio::time::Instant;

use crate::harness::*;
use crate::step;

/// iptables rules that cut a node off from the others in both directions; removed on drop (also when the
/// test panics), so a failing test never leaves the machine partitioned. In a simulated network the delayers
/// drop the packets instead (`Net::isolate`), and the partition goes with the network.
struct Partition {
    /// Rules on loopback addresses in the root namespace.
    rules: Vec<Vec<String>>,
}

impl Partition {
    /// Cut node `isolated` off from every other node of `cluster`; the test still reaches all of them.
    fn cut_off(cluster: &Cluster, isolated: u64) -> Partition {
        if let Some(net) = cluster.net() {
            net.isolate(isolated as usize);
            step!("partition: node {isolated} cut off from the others (every link at once, by the delayers)");
            return Partition { rules: Vec::new() };
        }
        let host = |id: u64| cluster.node(id).addr.rsplit_once(':').unwrap().0.to_owned();
        let others: Vec<String> = cluster.nodes.iter().map(|n| n.id).filter(|&id| id != isolated).map(host).collect();
        let isolated = host(isolated);
        let mut partition = Partition { rules: Vec::new() };
        for other in &others {
            for (src, dst) in [(isolated.as_str(), other.as_str()), (other.as_str(), isolated.as_str())] {
                let rule: Vec<String> =
                    ["INPUT", "-s", src, "-d", dst, "-j", "DROP", "-m", "comment", "--comment", "replichat-test"]
                        .iter()
                        .map(|s| s.to_string())
                        .collect();
                let mut add = vec!["-I".to_owned()];
                add.extend(rule.iter().cloned());
                let status =
                    std::process::Command::new("iptables").args(&add).status().expect("run iptables (root needed)");
                assert!(status.success(), "iptables {add:?} failed");
                partition.rules.push(rule);
            }
        }
        step!("partition: {isolated} cut off from {others:?} ({} iptables rules)", partition.rules.len());
        partition
    }

    fn heal(mut self, cluster: &Cluster) {
        if let Some(net) = cluster.net() {
            net.heal();
        }
        self.remove();
        step!("partition healed");
    }

    fn remove(&mut self) {
        for rule in self.rules.drain(..) {
            let mut delete = vec!["-D".to_owned()];
            delete.extend(rule);
            let _ = std::process::Command::new("iptables").args(&delete).status();
        }
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Three replicas on SQLite with `options`; node 0 elected; accounts alice and bob registered. Returns the
/// cluster and alice's socket (on node 0).
async fn start_with_alice_and_bob(options: Options) -> (Cluster, Client) {
    let cluster = Cluster::start_with(3, Engine::Sqlite, options).await;
    assert_eq!(cluster.wait_for_primary(Duration::from_secs(15)).await, 0);
    let (alice, _bob) = cluster.register_alice_and_bob().await;
    (cluster, alice)
}

async fn role(cluster: &Cluster, id: u64) -> Option<String> {
    cluster.status(id).await.and_then(|s| s["role"].as_str().map(str::to_owned))
}

/// Majority mode: a primary isolated by a real partition acknowledges nothing, steps down within one
/// election timeout, the majority side elects a new primary, and after healing every replica converges to
/// the same log and state, without the write the isolated primary could not commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_primary_steps_down_and_nothing_diverges() {
    let hosts: Vec<String> = ["127.0.0.10", "127.0.0.11", "127.0.0.12"].iter().map(|h| h.to_string()).collect();
    isolated_primary_steps_down(Options { hosts: Some(hosts), ..Options::default() }).await;
}

/// The partition test on a cluster started with `options` (distinct addresses, loopback or simulated).
pub async fn isolated_primary_steps_down(options: Options) {
    let (cluster, mut alice) = start_with_alice_and_bob(options).await;
    let before = alice.send_message("bob", "before the partition").await;
    step!("acknowledged message {before} before the partition");

    let partition = Partition::cut_off(&cluster, 0);
    let cut = Instant::now();
    // The isolated primary must not acknowledge this: it cannot reach a majority.
    let reply = alice
        .try_request(
            Request::Send { to: "bob".into(), text: "during the partition".into(), client_id: "cut-off".into() },
            Duration::from_secs(10),
        )
        .await;
    match &reply {
        Ok(ServerBody::Sent { .. }) => panic!("the isolated primary acknowledged a write: {reply:?}"),
        other => step!("write to the isolated primary: {other:?}"),
    }
    // It steps down within one election timeout (plus a heartbeat tick and polling slack).
    let deadline = cut + Duration::from_millis(ELECTION_TIMEOUT_MS * 2 + 500);
    loop {
        if role(&cluster, 0).await.as_deref() != Some("primary") {
            break;
        }
        assert!(Instant::now() < deadline, "node 0 still primary {:?} after the partition", cut.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    step!("node 0 stepped down {:?} after the partition", cut.elapsed());

    // The majority side elects node 1 and serves.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s1 = cluster.status(1).await;
        if s1.as_ref().is_some_and(|s| s["role"] == "primary") {
            break;
        }
        assert!(Instant::now() < deadline, "no new primary on the majority side: {s1:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut carol = cluster.client(1).await;
    carol.register("carol", "password123").await;
    let during = carol.send_message("bob", "majority side").await;
    step!("majority side acknowledged {during}");

    partition.heal(&cluster);
    let primary = cluster.wait_for_primary(Duration::from_secs(20)).await;
    assert_eq!(primary, 1, "no preemption: node 0 rejoins as a backup");
    let (_, dumps) = cluster.dumps_at_rest(&[0, 1, 2], false).await;
    assert_same_dump("node 0", &dumps[0], "node 1", &dumps[1]);
    assert_same_dump("node 1", &dumps[1], "node 2", &dumps[2]);
    assert!(dumps[1].contains("before the partition") && dumps[1].contains("majority side"));
    assert!(!dumps[0].contains("during the partition"), "the uncommitted write was discarded everywhere");
    cluster.finish().await;
}

/// All-live mode: two of three replicas die; the survivor becomes primary alone and keeps accepting writes;
/// nothing acknowledged before is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_live_survivor_of_two_crashes_keeps_writing() {
    let options = Options { args: vec!["--ack".into(), "all-live".into()], ..Options::default() };
    let (mut cluster, mut alice) = start_with_alice_and_bob(options).await;
    let mut acked = Vec::new();
    for i in 0..10 {
        acked.push(alice.send_message("bob", &format!("before #{i}")).await);
    }
    cluster.kill(1).await;
    cluster.kill(0).await;
    let killed = Instant::now();
    // The survivor hears no one and takes over alone.
    let deadline = killed + Duration::from_secs(15);
    while role(&cluster, 2).await.as_deref() != Some("primary") {
        assert!(Instant::now() < deadline, "node 2 did not take over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    step!("node 2 primary {:?} after losing two replicas", killed.elapsed());
    let mut alice = Client::connect(&cluster.node(2).ws_url()).await;
    alice.login("alice", "password123").await;
    for i in 0..5 {
        acked.push(alice.send_message("bob", &format!("after #{i}")).await);
    }
    let ServerBody::History { messages, .. } =
        alice.request(Request::History { with: "bob".into(), before: None, limit: Some(100) }).await
    else {
        panic!("history")
    };
    let ids: Vec<u64> = messages.iter().map(|m| m.id).collect();
    assert_eq!(ids, acked, "every acknowledged message, once, in order, on the survivor");

    // The others come back, catch up, and agree.
    cluster.restart(0).await;
    cluster.restart(1).await;
    assert_eq!(cluster.wait_for_primary(Duration::from_secs(20)).await, 2, "no preemption");
    let (_, dumps) = cluster.dumps_at_rest(&[0, 1, 2], false).await;
    assert_same_dump("node 0", &dumps[0], "node 2", &dumps[2]);
    assert_same_dump("node 1", &dumps[1], "node 2", &dumps[2]);
    cluster.finish().await;
}

/// A backup restarted after the primary compacted its log past what the backup has catches up through a
/// snapshot, and ends with the same state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_behind_compaction_catches_up_by_snapshot() {
    let options = Options { args: vec!["--compact-keep".into(), "20".into()], ..Options::default() };
    let (mut cluster, mut alice) = start_with_alice_and_bob(options).await;
    cluster.kill(2).await;
    for i in 0..80 {
        alice.send_message("bob", &format!("while node 2 is down #{i}")).await;
    }
    cluster.restart(2).await;
    let (_, states) = cluster.dumps_at_rest(&[0, 1, 2], true).await;
    let log = std::fs::read_to_string(&cluster.node(2).log).unwrap_or_default();
    assert!(log.contains("installed a snapshot"), "node 2 caught up through a snapshot");
    assert_same_dump("node 0", &states[0], "node 2", &states[2]);
    assert_same_dump("node 1", &states[1], "node 2", &states[2]);
    assert!(states[2].contains("while node 2 is down #79"));
    // And it keeps following: a later write reaches it too.
    alice.send_message("bob", "after the snapshot").await;
    cluster.wait_applied_equal(Duration::from_secs(20)).await;
    assert!(cluster.dump_state(2).await.contains("after the snapshot"));
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_streams_in_many_chunks_and_survives_a_kill_mid_install_sqlite() {
    snapshot_streams_in_many_chunks(Engine::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_streams_in_many_chunks_and_survives_a_kill_mid_install_postgres() {
    snapshot_streams_in_many_chunks(Engine::Postgres).await;
}

/// A state of several MiB reaches a backup as many `snapshot_chunk`s. The backup is killed (SIGKILL) once its
/// install began; restarted, it starts (its start-up checks pass on what the kill left), gets a new stream,
/// and ends with the same state as the others; a later write reaches it.
async fn snapshot_streams_in_many_chunks(engine: Engine) {
    let options = Options { args: vec!["--compact-keep".into(), "20".into()], ..Options::default() };
    let mut cluster = Cluster::start_with(3, engine, options).await;
    assert_eq!(cluster.wait_for_primary(Duration::from_secs(15)).await, 0);
    let (mut alice, _bob) = cluster.register_alice_and_bob().await;
    cluster.kill(2).await;
    step!("300 messages of 4,000 characters while node 2 is down: a state of about 3.6 MB");
    for i in 0..300 {
        alice.send_message("bob", &format!("#{i} {}", "y".repeat(3990))).await;
    }
    let log = cluster.node(2).log.clone();
    let installs_before = std::fs::read_to_string(&log).unwrap_or_default().matches("installed a snapshot").count();
    cluster.restart(2).await;
    // Polls the log for the first chunk (the install is under way), then kills node 2 at once.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.matches("receiving a snapshot").count() > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "node 2 never began an install");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cluster.kill(2).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let finished_before_the_kill = text.matches("installed a snapshot").count() > installs_before;
    step!("killed mid-install: {}", !finished_before_the_kill);
    cluster.restart(2).await;
    let (_, states) = cluster.dumps_at_rest(&[0, 1, 2], true).await;
    assert_same_dump("node 0", &states[0], "node 2", &states[2]);
    assert_same_dump("node 1", &states[1], "node 2", &states[2]);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let installed = text.lines().rfind(|l| l.contains("installed a snapshot")).expect("an install");
    let chunks: u64 = installed
        .split_whitespace()
        .find_map(|field| field.strip_prefix("chunks=").and_then(|n| n.parse().ok()))
        .expect("the install's chunk count");
    assert!(chunks > 5, "the state came in many chunks, not {chunks}: {installed}");
    alice.send_message("bob", "after the snapshot").await;
    cluster.wait_applied_equal(Duration::from_secs(20)).await;
    assert!(cluster.dump_state(2).await.contains("after the snapshot"));
    cluster.finish().await;
}
