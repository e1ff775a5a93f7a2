//! Idle connections: open many sockets to one replica, each resumed into a session, and read the
//! replica's memory.

use std::time::Instant;

use anyhow::bail;
use replichat_shared::{Request, ServerBody};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::client::{connect_raw, request_reply};
use crate::procs::{Cluster, Setup, Usage};

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    pub connections: usize,
    /// Accounts the sessions belong to (each socket resumes one of their tokens, like several devices).
    pub accounts: usize,
    pub rss_before_mb: f64,
    /// Once the replica is idle (see [`settle`]): the figure reported.
    pub rss_after_mb: f64,
    /// Right after the last `session` reply, while the replica may still be writing backlogs.
    #[serde(default)]
    pub rss_after_open_mb: f64,
    /// From the last `session` reply until the replica's CPU went quiet.
    #[serde(default)]
    pub settle_s: f64,
    pub peak_rss_mb: f64,
    pub kb_per_connection: f64,
    pub open_s: f64,
}

pub async fn run(setup: Setup, connections: usize, accounts: usize) -> anyhow::Result<Report> {
    let cluster = Cluster::start(setup).await?;
    let result = measure(&cluster, connections, accounts).await;
    cluster.finish(result.is_err()).await;
    result
}

async fn measure(cluster: &Cluster, connections: usize, accounts: usize) -> anyhow::Result<Report> {
    let url = cluster.node(0).ws_url();
    let run_id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let mut tokens = Vec::new();
    for i in 0..accounts {
        let (mut ws, _) = connect_raw(&url).await?;
        let request = Request::Register { username: format!("idle{i}x{run_id}"), password: "bench-password".into() };
        match request_reply(&mut ws, request).await? {
            ServerBody::Session { token: Some(token), .. } => tokens.push(token),
            other => bail!("register answered {other:?}"),
        }
    }
    let before = cluster.usage(0);
    let started = Instant::now();
    let mut open = Vec::with_capacity(connections);
    let mut set = JoinSet::new();
    for i in 0..connections {
        let (url, token) = (url.clone(), tokens[i % tokens.len()].clone());
        set.spawn(async move {
            let (mut ws, _) = connect_raw(&url).await?;
            match request_reply(&mut ws, Request::Resume { token, cursor: 0 }).await? {
                ServerBody::Session { .. } => anyhow::Ok(ws),
                other => bail!("resume answered {other:?}"),
            }
        });
        // At most 100 handshakes in flight.
        while set.len() >= 100 {
            if let Some(done) = set.join_next().await {
                open.push(done??);
            }
        }
    }
    while let Some(done) = set.join_next().await {
        open.push(done??);
    }
    let open_s = started.elapsed().as_secs_f64();
    let after_open = cluster.usage(0);
    let settling = Instant::now();
    let after: Usage = settle(cluster).await;
    let report = Report {
        connections: open.len(),
        accounts,
        rss_before_mb: before.rss as f64 / 1e6,
        rss_after_mb: after.rss as f64 / 1e6,
        rss_after_open_mb: after_open.rss as f64 / 1e6,
        settle_s: settling.elapsed().as_secs_f64(),
        peak_rss_mb: after.peak_rss as f64 / 1e6,
        kb_per_connection: (after.rss.saturating_sub(before.rss)) as f64 / 1e3 / open.len() as f64,
        open_s,
    };
    drop(open);
    Ok(report)
}

/// The replica's usage once it is idle. The last `session` reply is not that moment: after it, each socket's
/// task still reads and writes its backlog (at most two pages at once across all sockets), and 10,000 of them
/// queue for that (heaptrack saw each queued request's state, 1.4 KB, alive at that moment). Idle is when the
/// replica's CPU time stops advancing: under 10 ms in 500 ms, checked for at most 60 s.
async fn settle(cluster: &Cluster) -> Usage {
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let mut last = cluster.usage(0);
    while Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let now = cluster.usage(0);
        if now.cpu_seconds - last.cpu_seconds < 0.010 {
            return now;
        }
        last = now;
    }
    last
}
