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
    pub rss_after_mb: f64,
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
    let after: Usage = cluster.usage(0);
    let report = Report {
        connections: open.len(),
        accounts,
        rss_before_mb: before.rss as f64 / 1e6,
        rss_after_mb: after.rss as f64 / 1e6,
        peak_rss_mb: after.peak_rss as f64 / 1e6,
        kb_per_connection: (after.rss.saturating_sub(before.rss)) as f64 / 1e3 / open.len() as f64,
        open_s,
    };
    drop(open);
    Ok(report)
}
