//! Many users on real sockets: register them, run them at a fixed rate or as fast as acknowledgements
//! allow, drain, and report throughput, latency percentiles, process CPU and memory, and the checker's
//! verdict.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::check::{self, Verdict};
use crate::client::{Pace, Phase, Record, Shared, User, UserSpec};
use crate::procs::{Cluster, Usage};

/// How to load the system.
#[derive(Debug, Clone)]
pub struct Plan {
    pub users: usize,
    pub pace: Pace,
    /// Run this long before measuring (connections warm, caches warm).
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// Stop the window early once this many messages are acknowledged in all.
    pub stop_after: Option<u64>,
}

impl Plan {
    /// `rate` messages per second in all (0 = as fast as acknowledgements allow, `window` in flight each).
    pub fn new(users: usize, rate: f64, window: usize, warmup: Duration, duration: Duration) -> Plan {
        let pace = if rate > 0.0 {
            Pace::Every(Duration::from_secs_f64(users as f64 / rate))
        } else {
            Pace::Window(window.max(1))
        };
        Plan { users, pace, warmup, duration, stop_after: None }
    }
}

/// The outcome of one load run.
pub struct Outcome {
    pub records: Vec<Record>,
    pub window: Duration,
    pub acked_in_window: u64,
    pub verdict: Verdict,
    /// Each process's CPU time and memory when the window opened and when it closed.
    pub usage: (Sample, Sample),
}

/// One numbered summary of a run, as written to the results JSON.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Summary {
    pub target: String,
    pub users: usize,
    /// `rate N/s` or `window N`.
    pub pace: String,
    pub window_s: f64,
    pub acked_in_window: u64,
    pub msgs_per_s: f64,
    pub ack_ms: Percentiles,
    pub deliver_ms: Percentiles,
    /// (quantile, ms) points of both distributions, for the latency plot.
    pub ack_curve: Vec<[f64; 2]>,
    pub deliver_curve: Vec<[f64; 2]>,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// One entry per server process, then the bench client itself.
    pub processes: Vec<ProcessUsage>,
    /// Server CPU time per acknowledged message, µs: the CPU seconds every server process (each replica, or
    /// the relay; for `pg3` also every PostgreSQL process) used over the window, divided by the messages
    /// acknowledged in it. Unlike msg/s it hardly moves when other work shares the machine.
    #[serde(default)]
    pub server_cpu_us_per_msg: f64,
    /// The same without PostgreSQL's processes (equal to `server_cpu_us_per_msg` except on `pg3`).
    #[serde(default)]
    pub replica_cpu_us_per_msg: f64,
    /// Elections during the run (the highest term any replica reports, after minus before); `None` for the
    /// relay. A healthy cluster under steady load has none.
    #[serde(default)]
    pub elections: Option<u64>,
    /// Fixed-rate ticks skipped because the user's backlog was full ([`crate::client::MAX_BACKLOG`]): the
    /// offered load the target did not take.
    #[serde(default)]
    pub skipped: u64,
}

#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |v: u64| v as f64 / 1000.0;
        Percentiles {
            p50: ms(h.value_at_quantile(0.5)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// The distribution at the quantiles the latency plot shows.
fn curve(h: &Histogram<u64>) -> Vec<[f64; 2]> {
    PLOT_QUANTILES.iter().map(|&q| [q, h.value_at_quantile(q) as f64 / 1000.0]).collect()
}

/// Quantiles drawn on the latency plot.
pub const PLOT_QUANTILES: [f64; 10] = [0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999, 1.0];

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ProcessUsage {
    pub name: String,
    /// CPU time over the window / window length (100 = one core busy).
    pub cpu_percent: f64,
    /// CPU seconds (user + system) over the window.
    #[serde(default)]
    pub cpu_seconds: f64,
    pub peak_rss_mb: f64,
}

/// How a sample names a server node (the relay, or a replica) and the bench client.
const NODE: &str = "node ";
const CLIENT: &str = "bench client";

/// Register `plan.users` users on `cluster`, run the plan, drain, check, and summarise.
pub async fn run(cluster: &Cluster, plan: &Plan, label: &str) -> anyhow::Result<(Summary, Outcome)> {
    let shared = Shared::new();
    let users = open_users(cluster, plan.users, &shared).await?;
    let pg = cluster.setup.target == crate::procs::Target::Pg3;
    let sample = || {
        let mut usage: Vec<(String, Usage)> =
            cluster.live().iter().map(|&id| (format!("{NODE}{id}"), cluster.usage(id))).collect();
        if pg {
            usage.push(("postgres (all processes)".into(), Usage::postgres()));
        }
        usage.push((CLIENT.into(), Usage::own()));
        usage
    };
    let term_before = cluster.highest_term().await;
    let outcome = drive(users, plan, &shared, &sample).await?;
    let elections = term_before.zip(cluster.highest_term().await).map(|(before, after)| after - before);
    let secs = outcome.window.as_secs_f64();
    let processes: Vec<ProcessUsage> = outcome
        .usage
        .0
        .iter()
        .zip(&outcome.usage.1)
        .map(|((name, b), (_, a))| ProcessUsage {
            name: name.clone(),
            cpu_percent: 100.0 * (a.cpu_seconds - b.cpu_seconds) / secs,
            cpu_seconds: a.cpu_seconds - b.cpu_seconds,
            peak_rss_mb: a.peak_rss as f64 / 1e6,
        })
        .collect();
    let mut ack = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut deliver = ack.clone();
    for r in &outcome.records {
        ack.add(&r.ack_latency)?;
        deliver.add(&r.deliver_latency)?;
    }
    let pace = match plan.pace {
        Pace::Every(interval) => format!("rate {:.0}/s", plan.users as f64 / interval.as_secs_f64()),
        Pace::Window(w) => format!("window {w}"),
    };
    let per_msg = |include: &dyn Fn(&str) -> bool| {
        let cpu: f64 = processes.iter().filter(|p| include(&p.name)).map(|p| p.cpu_seconds).sum();
        1e6 * cpu / outcome.acked_in_window.max(1) as f64
    };
    let server_cpu_us_per_msg = per_msg(&|name| name != CLIENT);
    let replica_cpu_us_per_msg = per_msg(&|name| name.starts_with(NODE));
    let summary = Summary {
        target: label.to_owned(),
        users: plan.users,
        pace,
        window_s: secs,
        acked_in_window: outcome.acked_in_window,
        msgs_per_s: outcome.acked_in_window as f64 / secs,
        ack_ms: Percentiles::of(&ack),
        deliver_ms: Percentiles::of(&deliver),
        ack_curve: curve(&ack),
        deliver_curve: curve(&deliver),
        lost: outcome.verdict.lost,
        duplicated: outcome.verdict.duplicated,
        out_of_order: outcome.verdict.out_of_order,
        processes,
        server_cpu_us_per_msg,
        replica_cpu_us_per_msg,
        elections,
        skipped: shared.skipped.load(Ordering::SeqCst),
    };
    Ok((summary, outcome))
}

/// Register `n` users (a ring: user i writes to user i+1) on the cluster's primary.
pub async fn open_users(cluster: &Cluster, n: usize, shared: &Arc<Shared>) -> anyhow::Result<Vec<(User, WsOf)>> {
    if n < 2 {
        bail!("at least 2 users");
    }
    cluster.wait_for_primary(Duration::from_secs(30)).await?;
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let name = |i: usize| format!("u{i}x{run_id}");
    let mut set = JoinSet::new();
    let mut users = Vec::new();
    for i in 0..n {
        let spec = UserSpec {
            index: i,
            name: name(i),
            password: "bench-password".into(),
            to: name((i + 1) % n),
            run_id: run_id.clone(),
        };
        let mut user = User::new(spec, cluster.ws_urls(), shared.clone());
        set.spawn(async move {
            let ws = user.open(false).await?;
            anyhow::Ok((i, user, ws))
        });
        // Keep at most 16 registrations (argon2 hashes) in flight.
        while set.len() >= 16 {
            let (i, user, ws) = set.join_next().await.context("join")???;
            users.push((i, user, ws));
        }
    }
    while let Some(done) = set.join_next().await {
        let (i, user, ws) = done??;
        users.push((i, user, ws));
    }
    users.sort_by_key(|(i, _, _)| *i);
    Ok(users.into_iter().map(|(_, u, ws)| (u, ws)).collect())
}

/// Each process's name with its CPU time and memory at one instant.
pub type Sample = Vec<(String, Usage)>;

/// The socket type a user runs on.
pub type WsOf = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Run opened users through warmup and the window, then drain until every message is acknowledged and
/// delivered (60 s at most each), and check the history.
/// `sample` reads the processes' CPU time and memory; it is called when the window opens and when it closes.
pub async fn drive(
    users: Vec<(User, WsOf)>,
    plan: &Plan,
    shared: &Arc<Shared>,
    sample: &dyn Fn() -> Sample,
) -> anyhow::Result<Outcome> {
    let mut tasks = JoinSet::new();
    for (user, ws) in users {
        tasks.spawn(user.run(plan.pace, ws));
    }
    let start = Instant::now();
    let from = start + plan.warmup;
    let to = from + plan.duration;
    shared.set_window(from, to);
    tokio::time::sleep_until(from.into()).await;
    let acked_at_from = shared.acked.load(Ordering::SeqCst);
    let usage_from = sample();
    // The window: its end is a duration to measure over, or the moment enough messages were acknowledged.
    let end = loop {
        let now = Instant::now();
        let acked = shared.acked.load(Ordering::SeqCst);
        if now >= to || plan.stop_after.is_some_and(|n| acked >= n) || tasks.is_empty() {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(5).min(to - now)).await;
    };
    let acked_in_window = shared.acked.load(Ordering::SeqCst) - acked_at_from;
    let usage_to = sample();
    shared.set_window(from, end);
    let records = drain(shared, tasks).await?;
    let verdict = check::history(&records);
    Ok(Outcome { records, window: end - from, acked_in_window, verdict, usage: (usage_from, usage_to) })
}

/// Stop new sends, wait (60 s at most each) until every message is acknowledged and then delivered, close
/// every user, and return their records in user order.
///
/// A run that does not drain in time fails here, saying so: had it gone on to the checker, the messages still
/// on their way when the users closed would have been counted as lost (they were, in a run offered 16,000
/// msg/s against a cluster acknowledging 1,300, before each user's backlog was bounded).
pub async fn drain(shared: &Shared, mut tasks: JoinSet<Record>) -> anyhow::Result<Vec<Record>> {
    // Closed first: a user that read `Run` just before the phase changed could otherwise count one more
    // message after `acked` had reached `created`, and the run would end with it unacknowledged (a short chaos
    // run in CI stored 1,117 messages of which 1,116 were acknowledged).
    shared.close_sending();
    shared.phase.send_replace(Phase::Drain);
    let (created, acked, delivered) = (&shared.created, &shared.acked, &shared.delivered);
    let all_acked =
        wait_for(Duration::from_secs(60), || acked.load(Ordering::SeqCst) >= created.load(Ordering::SeqCst)).await;
    let all_delivered = all_acked
        && wait_for(Duration::from_secs(60), || delivered.load(Ordering::SeqCst) >= acked.load(Ordering::SeqCst)).await;
    if !all_delivered {
        bail!(
            "the run did not drain within 60 s: {} of {} messages acknowledged, {} delivered",
            acked.load(Ordering::SeqCst),
            created.load(Ordering::SeqCst),
            delivered.load(Ordering::SeqCst)
        );
    }
    shared.phase.send_replace(Phase::Finish);
    let mut records = Vec::new();
    while let Some(record) = tasks.join_next().await {
        records.push(record?);
    }
    records.sort_by_key(|r| r.index);
    Ok(records)
}

/// Poll `done` every 5 ms until it holds or `within` passes (the verdict then shows what is missing).
pub async fn wait_for(within: Duration, done: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}
