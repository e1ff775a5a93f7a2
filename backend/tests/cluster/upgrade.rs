//! A group runs one replication format. A replica started as a build of another format would be (the format
//! raised by a test hook) is refused by its peers and refuses them, which to the group is a partition: the
//! two replicas of one format elect a primary and commit between them, the other gets no vote, no entry and
//! no snapshot; restarted on the group's format, it catches up and holds the identical state.

use std::time::Duration;

use crate::harness::*;
use crate::step;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_another_replication_format_is_kept_out_until_it_runs_the_groups() {
    let other = (replichat_shared::REPLICATION_FORMAT + 1).to_string();
    let options =
        Options { env: vec![(2, "REPLICHAT_TEST_REPLICATION_FORMAT".to_owned(), other.clone())], ..Options::default() };
    let mut cluster = Cluster::start_with(3, Engine::Sqlite, options).await;

    step!("nodes 0 and 1 elect a primary between them, node 2 speaking format {other}");
    let leader = cluster
        .wait_until("a primary among nodes 0 and 1", WAIT, |all| {
            all.iter().find(|(id, s)| *id < 2 && s["role"].as_str() == Some("primary")).map(|(id, _)| *id)
        })
        .await;
    let mut alice = cluster.client(leader).await;
    alice.register("alice", "password123").await;
    let mut bob = cluster.client(leader).await;
    bob.register("bob", "password123").await;
    for i in 0..5 {
        alice.send_message("bob", &format!("while node 2 speaks another format {i}")).await;
    }

    step!("what was acknowledged is applied on nodes 0 and 1, and nothing of it reached node 2");
    let applied = cluster
        .wait_until("nodes 0 and 1 at rest", WAIT, |all| {
            let at = |id: u64| all.iter().find(|(n, _)| *n == id).map(|(_, s)| s["applied_index"].as_u64());
            let (a, b) = (at(0)??, at(1)??);
            (a == b && a > 0).then_some(a)
        })
        .await;
    let node2 = cluster.status(2).await.expect("node 2 answers");
    assert_eq!(node2["last_index"].as_u64(), Some(0), "no entry reached node 2: {node2}");
    assert_eq!(node2["applied_index"].as_u64(), Some(0), "{node2}");
    assert_ne!(node2["role"].as_str(), Some("primary"), "{node2}");
    let primary = cluster.status(leader).await.expect("the primary answers");
    assert_eq!(primary["role"].as_str(), Some("primary"), "still primary: {primary}");
    assert!(applied >= 7, "two registrations and five messages at least, applied {applied}");

    step!("the primary's /api/cluster says why node 2 is out: its connection to node 2 was refused");
    let view = |status: &serde_json::Value, id: u64| {
        status["replicas"].as_array().unwrap().iter().find(|r| r["id"].as_u64() == Some(id)).cloned().unwrap()
    };
    let seen = view(&primary, 2);
    assert_eq!(seen["alive"].as_bool(), Some(false), "{seen}");
    let why =
        format!("the peer speaks replication format {other}, this replica {}", replichat_shared::REPLICATION_FORMAT);
    assert_eq!(seen["refused"].as_str(), Some(why.as_str()), "the reason it was refused: {seen}");

    step!("each end's log says why");
    for id in [leader, 2] {
        let log = std::fs::read_to_string(&cluster.node(id).log).unwrap();
        assert!(log.contains("replication format"), "node {id}'s log names the format:\n{}", cluster.log_tail(id, 40));
    }

    step!("node 2 restarted on the group's format catches up to the identical state");
    cluster.stop(2).await;
    cluster.nodes[2].env.clear();
    cluster.restart(2).await;
    let (_, dumps) = cluster.dumps_at_rest(&[0, 1, 2], true).await;
    assert_same_dump("node 0", &dumps[0], "node 2", &dumps[2]);
    assert_same_dump("node 1", &dumps[1], "node 2", &dumps[2]);
    let primary = cluster.status(cluster.wait_for_primary(WAIT).await).await.expect("the primary answers");
    let seen = view(&primary, 2);
    assert_eq!((seen["alive"].as_bool(), seen.get("refused")), (Some(true), None), "back in the group: {seen}");
    alice.close().await;
    bob.close().await;
    cluster.finish().await;
}
