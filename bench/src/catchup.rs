//! Catch-up: stop a backup, acknowledge `messages` messages without it, restart it, and time how long it
//! takes to have applied everything the primary committed.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::client::Pace;
use crate::http;
use crate::load::{self, Plan};
use crate::procs::{Cluster, Setup};

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    /// Messages acknowledged while the backup was down.
    pub messages_missed: u64,
    /// Log entries the backup was behind when it came back.
    pub entries_behind: u64,
    /// Start of the process -> listening.
    pub startup_ms: f64,
    /// Listening -> applied up to the primary's commit index.
    pub sync_ms: f64,
    /// Both.
    pub total_ms: f64,
    /// Entries per second of catch-up (entries behind / sync time).
    pub entries_per_s: f64,
    pub replica_args: Vec<String>,
}

pub async fn run(setup: Setup, messages: u64, users: usize, window: usize, keep: bool) -> anyhow::Result<Report> {
    let replica_args = setup.args.clone();
    let mut cluster = Cluster::start(setup).await?;
    let result = measure(&mut cluster, messages, users, window, replica_args).await;
    cluster.finish(keep || result.is_err()).await;
    result
}

async fn measure(
    cluster: &mut Cluster,
    messages: u64,
    users: usize,
    window: usize,
    replica_args: Vec<String>,
) -> anyhow::Result<Report> {
    let primary = cluster.wait_for_primary(Duration::from_secs(30)).await?;
    let victim = cluster.live().into_iter().filter(|&id| id != primary).max().context("a backup")?;
    cluster.wait_caught_up(victim, Duration::from_secs(30)).await?;
    let before = http::cluster_status(&cluster.node(victim).addr).await?.applied_index;
    cluster.kill(victim).await?;
    eprintln!("catchup: node {victim} down; sending {messages} messages");
    let plan = Plan {
        users,
        pace: Pace::Window(window),
        warmup: Duration::ZERO,
        duration: Duration::from_secs(3600),
        stop_after: Some(messages),
    };
    let (summary, outcome) = load::run(cluster, &plan, "catchup").await?;
    if !outcome.verdict.is_clean() {
        anyhow::bail!("the load itself went wrong: {:?}", outcome.verdict);
    }
    let commit = http::cluster_status(&cluster.node(primary).addr).await?.commit_index;
    eprintln!(
        "catchup: {} acknowledged at {:.0}/s; primary commit index {commit}; restarting node {victim}",
        summary.acked_in_window, summary.msgs_per_s
    );
    let start = Instant::now();
    cluster.restart(victim).await?;
    let listening = Instant::now();
    let synced = cluster.wait_caught_up(victim, Duration::from_secs(600)).await?;
    let sync = synced - listening;
    Ok(Report {
        messages_missed: outcome.verdict.acked,
        entries_behind: commit - before,
        startup_ms: (listening - start).as_secs_f64() * 1000.0,
        sync_ms: sync.as_secs_f64() * 1000.0,
        total_ms: (synced - start).as_secs_f64() * 1000.0,
        entries_per_s: (commit - before) as f64 / sync.as_secs_f64(),
        replica_args,
    })
}
