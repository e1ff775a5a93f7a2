//! Who leads a fresh cluster, and what every replica says about it.

use std::time::Duration;

use replichat_shared::ServerBody;

use crate::harness::*;
use crate::step;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_elect_id_0_and_agree() {
    let cluster = Cluster::start(3, Engine::Sqlite).await;
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;
    assert_eq!(leader, 0, "the lowest id among up-to-date replicas leads a fresh cluster");

    step!("every replica reports leader 0, the same term, and the three replicas; the primary sees all alive");
    let urls = cluster.http_urls();
    let term = cluster
        .wait_until("all three replicas alive in the primary's view", Duration::from_secs(10), |all| {
            let primary = &all.iter().find(|(id, _)| *id == 0)?.1;
            let replicas = primary["replicas"].as_array()?;
            replicas.iter().all(|r| r["alive"].as_bool() == Some(true)).then_some(primary["term"].as_u64()?)
        })
        .await;
    assert!(term >= 1, "term {term}");
    for id in 0..3u64 {
        let status = cluster.status(id).await.unwrap_or_else(|| panic!("node {id} answers /api/cluster"));
        assert_eq!(status["id"].as_u64(), Some(id), "node {id}: {status}");
        assert_eq!(status["leader"].as_u64(), Some(0), "node {id}: {status}");
        assert_eq!(status["term"].as_u64(), Some(term), "node {id}: {status}");
        assert_eq!(status["role"].as_str(), Some(if id == 0 { "primary" } else { "backup" }), "node {id}: {status}");
        for field in ["commit_index", "last_index", "applied_index"] {
            assert!(status[field].is_u64(), "node {id}: {field} is a number: {status}");
        }
        let replicas = status["replicas"].as_array().unwrap_or_else(|| panic!("node {id}: replicas: {status}"));
        assert_eq!(replicas.len(), 3, "node {id}: {status}");
        let mut ids: Vec<u64> = replicas.iter().map(|r| r["id"].as_u64().expect("replica id")).collect();
        ids.sort();
        assert_eq!(ids, [0, 1, 2], "node {id}: {status}");
        for r in replicas {
            let rid = r["id"].as_u64().unwrap();
            assert_eq!(r["url"].as_str().map(|u| u.trim_end_matches('/')), Some(urls[rid as usize].as_str()), "{r}");
            assert!(r["role"].is_string() && r["alive"].is_boolean(), "node {id}: replica entry {r}");
            assert!(r["last_index"].is_u64() && r["lag"].is_u64(), "node {id}: replica entry {r}");
        }
    }

    step!("a client on the primary gets welcome with every endpoint");
    let mut alice = Client::connect(&cluster.node(0).ws_url()).await;
    let ServerBody::Welcome { node, term: welcome_term, endpoints, .. } = alice.welcome.clone() else { unreachable!() };
    assert_eq!((node, welcome_term), (0, term));
    let mut announced: Vec<String> = endpoints.iter().map(|e| e.trim_end_matches('/').to_owned()).collect();
    announced.sort();
    let mut expected = urls.clone();
    expected.sort();
    assert_eq!(announced, expected, "welcome lists every replica");
    alice.register("alice", "password123").await;

    for backup in [1u64, 2] {
        step!("a client on backup {backup} gets not_leader pointing at node 0, then a close");
        let (mut client, first) =
            Client::connect_any(&cluster.node(backup).ws_url()).await.expect("a backup accepts the socket");
        match first {
            ServerBody::NotLeader { leader, leader_url, term: hint_term, endpoints } => {
                assert_eq!(leader, Some(0), "{backup}");
                assert_eq!(leader_url.as_deref().map(|u| u.trim_end_matches('/')), Some(urls[0].as_str()));
                assert_eq!(hint_term, term);
                assert_eq!(endpoints.len(), 3, "{endpoints:?}");
            }
            other => panic!("backup {backup}: first frame {other:?}, expected not_leader"),
        }
        client.expect_close().await;
        client.close().await;
    }

    step!("the registration made on the primary reaches both backups");
    let (_, dumps) = cluster.dumps_at_rest(&[0, 1, 2], false).await;
    assert_eq!(dump_section(&dumps[0], "users").len(), 1, "{}", dumps[0]);
    for backup in [1, 2] {
        assert_same_dump("node 0", &dumps[0], &format!("node {backup}"), &dumps[backup]);
    }
    alice.close().await;
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_is_replaced_without_waiting_for_the_election_timeout() {
    // An election timeout far longer than the wait below: only noticing the closed connection can elect a
    // new primary in time. (A silent primary, e.g. a cut cable, still takes the full timeout.)
    let options = Options { args: vec!["--election-timeout-ms".into(), "20000".into()], ..Options::default() };
    let mut cluster = Cluster::start_with(3, Engine::Sqlite, options).await;
    let first = cluster.wait_for_primary(Duration::from_secs(60)).await;
    let mut alice = cluster.client_to_primary().await;
    alice.register("alice", "password123").await;

    step!("kill -9 the primary {first}; the backups see its connections close");
    cluster.kill(first).await;
    let started = std::time::Instant::now();
    let next = cluster.wait_for_primary(Duration::from_secs(8)).await;
    step!("node {next} is primary {:?} after the kill (election timeout 20 s)", started.elapsed());
    assert_ne!(next, first);
    assert_eq!(next, if first == 0 { 1 } else { 0 }, "the lowest live id takes over");
    let mut bob = cluster.client_to_primary().await;
    bob.register("bob", "password123").await;
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_kill_the_new_primary_reports_the_dead_replica_as_it_last_was() {
    let mut cluster = Cluster::start(3, Engine::Sqlite).await;
    let first = cluster.wait_for_primary(Duration::from_secs(10)).await;
    let mut alice = cluster.client_to_primary().await;
    alice.register("alice", "password123").await;
    cluster.wait_applied_equal(Duration::from_secs(10)).await;
    let before = cluster.status(first).await.expect("the primary answers /api/cluster");
    let (index_before, term_before) = (before["last_index"].as_u64().unwrap(), before["term"].as_u64().unwrap());
    let own = before["replicas"].as_array().unwrap().iter().find(|r| r["id"].as_u64() == Some(first)).unwrap();
    assert_eq!(own["term"].as_u64(), Some(term_before), "each row carries a term: {before}");

    step!("kill -9 the primary {first} (last index {index_before}, term {term_before})");
    cluster.kill(first).await;
    let next = cluster.wait_for_primary(Duration::from_secs(20)).await;
    let status = cluster.status(next).await.expect("the new primary answers /api/cluster");
    step!("the new primary {next} reports: {status}");
    let dead = status["replicas"].as_array().unwrap().iter().find(|r| r["id"].as_u64() == Some(first)).unwrap();
    assert_eq!(dead["alive"].as_bool(), Some(false), "a killed replica is not alive: {status}");
    assert_eq!(dead["role"].as_str(), Some("unknown"), "{status}");
    assert_eq!(dead["last_index"].as_u64(), Some(index_before), "its last known index, not 0: {status}");
    assert_eq!(dead["term"].as_u64(), Some(term_before), "the term it was last heard in: {status}");
    let heard = dead["last_heard_ms"].as_u64().expect("when it was last heard");
    assert!(heard <= status["now_ms"].as_u64().unwrap(), "{status}");
    let elections: Vec<(u64, u64)> = status["elections"]
        .as_array()
        .expect("elections")
        .iter()
        .map(|e| (e["term"].as_u64().unwrap(), e["leader"].as_u64().unwrap()))
        .collect();
    let term_after = status["term"].as_u64().unwrap();
    assert!(elections.contains(&(term_before, first)), "{elections:?}");
    assert!(elections.contains(&(term_after, next)), "{elections:?}");
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_that_knows_no_live_primary_holds_a_client_until_one_is_elected() {
    // An election timeout longer than the whole test: only the early path (closed connections) elects.
    let options = Options { args: vec!["--election-timeout-ms".into(), "5000".into()], ..Options::default() };
    let mut cluster = Cluster::start_with(3, Engine::Sqlite, options).await;
    let first = cluster.wait_for_primary(Duration::from_secs(60)).await;
    let mut alice = cluster.client_to_primary().await;
    alice.register("alice", "password123").await;
    cluster.wait_applied_equal(Duration::from_secs(10)).await;
    cluster.wait_all_voters(Duration::from_secs(10)).await;
    let backups: Vec<u64> = (0..3).filter(|&id| id != first).collect();
    let (alone, other) = (backups[0], backups[1]);

    step!("stop backup {other}, then kill -9 the primary {first}: node {alone} is left without a majority");
    cluster.stop(other).await;
    cluster.kill(first).await;
    // A client sent to the dead primary would only find a refused connection: the replica must stop naming it.
    cluster
        .wait_until(&format!("node {alone} to stop naming the dead primary {first}"), Duration::from_secs(10), |all| {
            all.iter().find(|(id, _)| *id == alone).and_then(|(_, s)| s["leader"].is_null().then_some(()))
        })
        .await;

    step!("a client connects to node {alone} while no primary can be known; node {other} comes back");
    let url = cluster.node(alone).ws_url();
    let held = tokio::spawn(async move { Client::connect_any(&url).await });
    cluster.restart(other).await;
    let (_client, answer) = held.await.unwrap().expect("an answer to the held client");
    let primary = cluster.wait_for_primary(Duration::from_secs(20)).await;
    step!("the held client was told: {answer:?}; the primary is node {primary}");
    match answer {
        ServerBody::Welcome { node, .. } => assert_eq!(node, primary, "welcomed by a replica that is not primary"),
        ServerBody::NotLeader { leader, .. } => assert_eq!(leader, Some(primary), "not told the new primary"),
        other => panic!("unexpected first frame: {other:?}"),
    }
    cluster.finish().await;
}
