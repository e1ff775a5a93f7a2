//! `GET /metrics` on real replica processes: the Prometheus page an operator scrapes shows the messages,
//! sockets, log positions, elections, group commits and per-backup lag the cluster really has. Each node is
//! its own process, so its numbers are its own and exact values can be asserted.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::harness::*;
use crate::step;

/// Pause between two scrapes while waiting for a value (polling interval, not synchronisation).
const POLL: Duration = Duration::from_millis(25);
/// How long a value that follows from replication may take to show.
const WITHIN: Duration = Duration::from_secs(10);

/// One scrape of a node's `/metrics`: every sample by its series as rendered (`name{label="value"}`).
struct Scrape {
    page: String,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    fn parse(page: String) -> Scrape {
        let samples = page
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("a sample line: {l:?}"));
                let value = value.parse().unwrap_or_else(|_| panic!("a number in {l:?}"));
                (series.to_owned(), value)
            })
            .collect();
        Scrape { page, samples }
    }

    fn get(&self, series: &str) -> Option<f64> {
        self.samples.get(series).copied()
    }

    /// The value of `series`, which must be on the page.
    fn value(&self, series: &str) -> f64 {
        self.get(series).unwrap_or_else(|| panic!("{series} is not on the page:\n{}", self.page))
    }
}

async fn scrape(cluster: &Cluster, id: u64) -> Scrape {
    let (status, page) = http_get(&cluster.node(id).addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(status, 200, "node {id}: {page}");
    Scrape::parse(page)
}

/// Scrape node `id` until `cond` holds, or panic at the deadline with the last page.
async fn wait_for(cluster: &Cluster, id: u64, what: &str, cond: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + WITHIN;
    loop {
        let scrape = scrape(cluster, id).await;
        if cond(&scrape) {
            return scrape;
        }
        if Instant::now() >= deadline {
            panic!("node {id}: timed out after {WITHIN:?} waiting for {what}; last page:\n{}", scrape.page);
        }
        tokio::time::sleep(POLL).await;
    }
}

fn lag(peer: u64) -> String {
    format!("replichat_replication_lag_entries{{peer=\"{peer}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_messages_sockets_log_positions_and_backup_lag() {
    let mut cluster = Cluster::start(3, Engine::Sqlite).await;
    let primary = cluster.wait_for_primary(Duration::from_secs(15)).await;
    let backups: Vec<u64> = (0..3).filter(|&id| id != primary).collect();
    let term = cluster.status(primary).await.expect("the primary answers")["term"].as_u64().unwrap();

    step!("the page is Prometheus text, and every series has its help and type");
    let (status, head, page) = http_get_with_head(&cluster.node(primary).addr, "/metrics").await.expect("GET");
    assert_eq!(status, 200, "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    for (name, kind) in [
        ("replichat_messages_stored_total", "counter"),
        ("replichat_client_connections", "gauge"),
        ("replichat_peer_connections", "gauge"),
        ("replichat_log_last_index", "gauge"),
        ("replichat_commit_index", "gauge"),
        ("replichat_applied_index", "gauge"),
        ("replichat_replication_lag_entries", "gauge"),
        ("replichat_term", "gauge"),
        ("replichat_is_primary", "gauge"),
        ("replichat_elections_total", "counter"),
        ("replichat_elections_won_total", "counter"),
        ("replichat_log_append_entries", "histogram"),
        ("replichat_log_append_seconds", "histogram"),
        ("replichat_log_append_wait_seconds", "histogram"),
        ("replichat_apply_entries", "histogram"),
        ("replichat_apply_seconds", "histogram"),
    ] {
        let (help, kind_line) = (format!("# HELP {name} "), format!("# TYPE {name} {kind}"));
        assert!(page.lines().any(|l| l.starts_with(&help)), "no help for {name}:\n{page}");
        assert!(page.lines().any(|l| l == kind_line), "{name} is not a {kind}:\n{page}");
    }

    step!("alice and bob register on the primary; alice sends bob a message");
    let mut alice = Client::connect(&cluster.node(primary).ws_url()).await;
    alice.register("alice", "password123").await;
    let mut bob = Client::connect(&cluster.node(primary).ws_url()).await;
    bob.register("bob", "password123").await;
    let index = alice.send_message("bob", "hello, metrics").await;
    bob.expect_message("hello, metrics").await;
    step!("the send is entry {index}");

    step!("the primary: one message stored, two sockets, the send committed and applied, both backups caught up");
    let s = wait_for(&cluster, primary, "the send applied and both backups caught up", |s| {
        s.get("replichat_applied_index") >= Some(index as f64) && backups.iter().all(|&b| s.get(&lag(b)) == Some(0.0))
    })
    .await;
    assert_eq!(s.value("replichat_messages_stored_total"), 1.0);
    assert_eq!(s.value(r#"replichat_requests_total{type="register"}"#), 2.0);
    assert_eq!(s.value(r#"replichat_requests_total{type="send"}"#), 1.0);
    assert_eq!(s.value("replichat_client_connections"), 2.0);
    assert_eq!(s.value("replichat_peer_connections"), 2.0);
    assert!(s.value("replichat_commit_index") >= index as f64);
    assert!(s.value("replichat_log_last_index") >= s.value("replichat_commit_index"));
    assert_eq!(s.value("replichat_is_primary"), 1.0);
    assert_eq!(s.value("replichat_term"), term as f64);
    assert!(s.value("replichat_elections_won_total") >= 1.0);
    assert!(s.value("replichat_elections_total") >= s.value("replichat_elections_won_total"));
    for histogram in [
        "replichat_log_append_entries",
        "replichat_log_append_seconds",
        "replichat_log_append_wait_seconds",
        "replichat_apply_entries",
        "replichat_apply_seconds",
    ] {
        let count = s.value(&format!("{histogram}_count"));
        assert!(count >= 1.0, "{histogram}: {count} observations");
        assert_eq!(s.value(&format!("{histogram}_bucket{{le=\"+Inf\"}}")), count, "{histogram}: +Inf bucket");
    }
    // Every entry in the primary's log was written by one of its append transactions, and applied by one of
    // its apply transactions; every append waited (if only a moment) for the writer.
    assert!(s.value("replichat_log_append_entries_sum") >= index as f64);
    assert!(s.value("replichat_apply_entries_sum") >= index as f64);
    assert_eq!(s.value("replichat_log_append_wait_seconds_count"), s.value("replichat_log_append_seconds_count"));

    step!("each backup: the message stored by its own applier, no sockets, not primary, no lag to report");
    for &backup in &backups {
        let s =
            wait_for(&cluster, backup, "the send applied", |s| s.get("replichat_applied_index") >= Some(index as f64))
                .await;
        assert_eq!(s.value("replichat_messages_stored_total"), 1.0, "backup {backup}");
        assert_eq!(s.value("replichat_client_connections"), 0.0, "backup {backup}");
        assert_eq!(s.value("replichat_is_primary"), 0.0, "backup {backup}");
        assert_eq!(s.value("replichat_term"), term as f64, "backup {backup}");
        assert!(s.value("replichat_commit_index") >= index as f64, "backup {backup}");
        assert!(s.value("replichat_log_append_entries_count") >= 1.0, "backup {backup}");
        assert!(s.value("replichat_apply_entries_sum") >= index as f64, "backup {backup}");
        for peer in (0..3).filter(|&p| p != backup) {
            assert_eq!(s.value(&lag(peer)), 0.0, "backup {backup}: lag of {peer}");
        }
    }

    step!("bob's socket closes: the primary counts one");
    bob.close().await;
    wait_for(&cluster, primary, "one client socket", |s| s.get("replichat_client_connections") == Some(1.0)).await;

    let down = backups[1];
    step!("backup {down} is killed and alice sends again: its lag grows on the primary, the other's does not");
    cluster.kill(down).await;
    let second = alice.send_message("bob", "while a backup is down").await;
    let s = wait_for(&cluster, primary, "the second send committed", |s| {
        s.get("replichat_commit_index") >= Some(second as f64) && s.get("replichat_peer_connections") == Some(1.0)
    })
    .await;
    assert!(s.value(&lag(down)) >= 1.0, "backup {down} is behind:\n{}", s.page);
    assert_eq!(s.value(&lag(backups[0])), 0.0);
    assert_eq!(s.value("replichat_messages_stored_total"), 2.0);

    step!("backup {down} restarts and catches up: its lag is back to 0");
    cluster.restart(down).await;
    wait_for(&cluster, primary, "the restarted backup caught up", |s| s.get(&lag(down)) == Some(0.0)).await;
    cluster.wait_applied_equal(WITHIN).await;

    alice.close().await;
    cluster.finish().await;
}
