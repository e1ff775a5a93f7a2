//! Group commit: concurrent sends from many sockets are appended, shipped and fsynced in groups, and each
//! still lands exactly once, on every replica.

use std::time::Duration;

use serde_json::Value;

use crate::harness::*;
use crate::step;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_commit_in_groups_and_each_land_once() {
    const SENDERS: usize = 8;
    const EACH: usize = 25;
    let cluster = Cluster::start(3, Engine::Sqlite).await;
    let primary = cluster.wait_for_primary(Duration::from_secs(15)).await;
    let mut sink = cluster.client_to_primary().await;
    sink.register("sink", "password123").await;
    let health = |body: &str| serde_json::from_str::<Value>(body).expect("healthz JSON");
    let (_, before) = http_get(&cluster.node(primary).addr, "/healthz").await.expect("healthz");
    let before = health(&before);

    let mut tasks = Vec::new();
    for s in 0..SENDERS {
        let url = cluster.node(primary).ws_url();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(&url).await;
            client.register(&format!("sender{s}"), "password123").await;
            let mut ids = Vec::new();
            for i in 0..EACH {
                ids.push(client.send_message("sink", &format!("s{s} m{i}")).await);
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        let ids = task.await.expect("sender");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "each sender's messages keep its order");
        all.extend(ids);
    }
    let total = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), total, "every send got its own id");

    let (_, after) = http_get(&cluster.node(primary).addr, "/healthz").await.expect("healthz");
    let after = health(&after);
    let delta = |key: &str| after[key].as_u64().unwrap() - before[key].as_u64().unwrap();
    let (batches, entries) = (delta("proposal_batches"), delta("proposed_entries"));
    step!("{entries} entries appended in {batches} transactions ({:.1} per fsync)", entries as f64 / batches as f64);
    assert!(entries >= total as u64);
    assert!(batches < entries, "concurrent sends were grouped: {entries} entries in {batches} transactions");

    let (_, dumps) = cluster.dumps_at_rest(&[0, 1, 2], false).await;
    assert_same_dump("node 0", &dumps[0], "node 1", &dumps[1]);
    assert_same_dump("node 1", &dumps[1], "node 2", &dumps[2]);
    for s in 0..SENDERS {
        for i in 0..EACH {
            let text = format!("\ts{s} m{i}\t");
            assert_eq!(dumps[0].matches(&text).count(), 1, "{text:?} stored once");
        }
    }
    cluster.finish().await;
}
