//! Replicas on `https://` peer URLs: replication runs over TLS (wss) with certificates from a CA the test
//! makes, clients speak wss:// and https:// to the same port, and a replica whose certificate the others'
//! `--tls-ca` did not sign is not dialled into the cluster.

use std::time::Duration;

use crate::harness::*;
use crate::step;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_tls_replicates_and_fails_over() {
    let mut cluster = Cluster::start_with(3, Engine::Sqlite, Options { tls: true, ..Options::default() }).await;
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;

    step!("clients speak wss:// to the primary; plain http:// to the same port gets no answer");
    let (mut alice, bob) = cluster.register_alice_and_bob().await;
    bob.close().await;
    for i in 0..5 {
        alice.send_message("bob", &format!("over TLS {i}")).await;
    }
    alice.close().await;
    let plain = http_get(&cluster.node(leader).addr, "/healthz").await;
    assert!(plain.is_err(), "plain HTTP got an answer from a TLS-only port: {plain:?}");
    cluster.wait_applied_equal(Duration::from_secs(10)).await;

    step!("node {leader} is killed: the others elect a new primary over TLS, and nothing is lost");
    cluster.kill(leader).await;
    let new = cluster.wait_for_primary(Duration::from_secs(10)).await;
    assert_ne!(new, leader);
    let mut alice = cluster.client_to_primary().await;
    alice.login("alice", "password123").await;
    alice.send_message("bob", "after the failover").await;
    alice.close().await;
    cluster.restart(leader).await;
    cluster.wait_applied_equal(Duration::from_secs(20)).await;
    let reference = cluster.dump_state(new).await;
    for id in 0..3 {
        assert_same_dump(&format!("node {new}"), &reference, &format!("node {id}"), &cluster.dump_state(id).await);
    }
    for text in ["over TLS 0", "over TLS 4", "after the failover"] {
        assert!(reference.contains(text), "{text} is missing");
    }
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_certificate_from_another_ca_is_not_let_in() {
    let mut cluster = Cluster::start_with(3, Engine::Sqlite, Options { tls: true, ..Options::default() }).await;
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;
    let odd = if leader == 2 { 1 } else { 2 };

    step!("node {odd} restarts presenting a certificate that another CA signed (it knows the cluster secret)");
    cluster.stop(odd).await;
    let tls = cluster.tls.as_ref().unwrap();
    let dir = tls.cert.parent().unwrap().to_owned();
    let foreign = Tls::make(&dir, "foreign");
    // The others read their certificate at start; only node {odd} sees the swap.
    std::fs::copy(&foreign.cert, &tls.cert).unwrap();
    std::fs::copy(&foreign.key, &tls.key).unwrap();
    cluster.restart(odd).await;

    step!("node {leader} refuses the TLS handshake with node {odd}, and keeps committing with the third replica");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&cluster.node(leader).log).unwrap();
        if log.lines().any(|l| l.contains("peer unreachable") && l.contains("certificate")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no TLS refusal in node {leader}'s log");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Node {odd}'s own status cannot be read with the cluster's CA either, so speak to node {leader} directly.
    let mut alice = cluster.client(leader).await;
    alice.register("alice", "password123").await;
    alice.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let view = cluster.status(leader).await.unwrap();
        let seen = view["replicas"].as_array().unwrap().iter().find(|r| r["id"].as_u64() == Some(odd)).cloned();
        if seen.is_some_and(|r| r["alive"].as_bool() == Some(false)) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "node {leader} still counts node {odd} alive: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mine, theirs) = (cluster.dump_state(leader).await, cluster.dump_state(odd).await);
    assert!(mine.contains("alice") && !theirs.contains("alice"), "node {odd} got entries it should not have");
    cluster.finish().await;
}
