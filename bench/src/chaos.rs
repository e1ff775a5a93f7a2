//! Chaos: under steady load, kill -9 the primary (every fourth cycle a backup instead), time the
//! failover, restart the victim and time its catch-up; at the end drain, and run the checker over the
//! history and over every replica's database.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::check::{self, Stored, Verdict};
use crate::client::{Pace, Shared};
use crate::load::{self, wait_for};
use crate::procs::{Cluster, Setup};

/// How to run it.
#[derive(Debug, Clone)]
pub struct Options {
    pub cycles: u32,
    pub users: usize,
    /// Messages per second in all.
    pub rate: f64,
    /// Every `backup_every`-th cycle kills a backup instead of the primary (0: never).
    pub backup_every: u32,
    /// Steady load before each kill, counted in acknowledgements: `rate × steady` of them after the
    /// previous victim caught up.
    pub steady: Duration,
    /// Keep the scratch directory (node logs, databases) also after a clean run.
    pub keep: bool,
}

/// One kill.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Cycle {
    pub cycle: u32,
    pub victim: u64,
    pub victim_was_primary: bool,
    /// When the SIGKILL was sent, ms since the load started.
    pub killed_at_ms: f64,
    /// kill -9 -> first write acknowledged by another replica (the new primary, or the same primary when
    /// a backup was killed).
    pub first_write_ms: Option<f64>,
    /// kill -9 -> the last user connected to the killed primary resumed its session on the new one.
    pub all_resumed_ms: Option<f64>,
    pub new_primary: Option<u64>,
    /// Restart of the victim (process start) -> it has applied everything the primary had committed one
    /// 10 ms poll earlier.
    pub rejoin_ms: f64,
}

/// The whole run.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    pub cycles: Vec<Cycle>,
    pub users: usize,
    pub rate: f64,
    pub replica_args: Vec<String>,
    pub acked: u64,
    pub history: Verdict,
    pub stored: Stored,
    /// Acknowledgements per 100 ms since the load started (for the throughput-over-failover plot).
    pub acks_per_100ms: Vec<u32>,
    pub duration_s: f64,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.history.is_clean() && self.stored.is_clean()
    }
}

/// Run the chaos on a fresh three-replica cluster described by `setup`.
pub async fn run(setup: Setup, options: &Options) -> anyhow::Result<Report> {
    let replica_args = setup.args.clone();
    let mut cluster = Cluster::start(setup).await?;
    let result = cycles(&mut cluster, options, replica_args).await;
    let keep = options.keep || !matches!(&result, Ok(r) if r.is_clean());
    if keep {
        eprintln!("chaos: keeping {} (node logs, databases)", cluster.setup.dir.display());
    }
    cluster.finish(keep).await;
    result
}

async fn cycles(cluster: &mut Cluster, options: &Options, replica_args: Vec<String>) -> anyhow::Result<Report> {
    let shared = Shared::new();
    let users = load::open_users(cluster, options.users, &shared).await?;
    let pace = Pace::Every(Duration::from_secs_f64(options.users as f64 / options.rate));
    let mut tasks = JoinSet::new();
    for (user, ws) in users {
        tasks.spawn(user.run(pace, ws));
    }
    let started = Instant::now();
    let ms = |t: Instant| t.saturating_duration_since(started).as_secs_f64() * 1000.0;
    let mut report_cycles = Vec::new();
    for cycle in 1..=options.cycles {
        // Steady load first (at least one write per user), so every cycle kills a replica that is busy.
        let acked = shared.acked.load(Ordering::SeqCst);
        let steady = ((options.rate * options.steady.as_secs_f64()) as u64).max(options.users as u64);
        if !wait_for(Duration::from_secs(30), || shared.acked.load(Ordering::SeqCst) >= acked + steady).await {
            bail!("cycle {cycle}: no writes acknowledged before the kill");
        }
        // Which replica leads is asked just before the kill, not before the steady load: a primary that stepped
        // down meanwhile (PostgreSQL once stalled 1.4 s on all three databases during it) had its users move to
        // the new one before the probe was armed, and the cycle then waited in vain for them to resume.
        let primary = cluster.wait_for_primary(Duration::from_secs(30)).await?;
        let kill_backup = options.backup_every > 0 && cycle % options.backup_every == 0;
        let victim = if kill_backup {
            let backups: Vec<u64> = cluster.live().into_iter().filter(|&id| id != primary).collect();
            backups[rand::random::<usize>() % backups.len()]
        } else {
            primary
        };
        shared.arm_probe(Instant::now(), victim);
        let killed_at = cluster.kill(victim).await?;
        // Failover: a write acknowledged by another replica, and every user back (when the primary died,
        // every user was on it).
        let recovered = wait_for(Duration::from_secs(60), || {
            shared
                .probe(|p| {
                    let resumed: std::collections::HashSet<usize> = p.resumed.iter().map(|(u, _)| *u).collect();
                    p.first_ack.is_some() && (victim != primary || resumed.len() == options.users)
                })
                .unwrap_or(false)
        })
        .await;
        let probe = shared.disarm_probe().context("probe")?;
        if !recovered {
            bail!("cycle {cycle}: no recovery within 60 s after killing node {victim}: {probe:?}");
        }
        let first_write = probe.first_ack.map(|(t, _)| (t - killed_at).as_secs_f64() * 1000.0);
        let all_resumed = (victim == primary)
            .then(|| probe.resumed.iter().map(|(_, t)| (*t - killed_at).as_secs_f64() * 1000.0).fold(0.0, f64::max));
        let restart_at = Instant::now();
        cluster.restart(victim).await?;
        let caught_up = cluster.wait_caught_up(victim, Duration::from_secs(60)).await?;
        let c = Cycle {
            cycle,
            victim,
            victim_was_primary: victim == primary,
            killed_at_ms: ms(killed_at),
            first_write_ms: first_write,
            all_resumed_ms: all_resumed,
            new_primary: probe.first_ack.map(|(_, n)| n),
            rejoin_ms: (caught_up - restart_at).as_secs_f64() * 1000.0,
        };
        eprintln!(
            "chaos: cycle {cycle}/{}: killed node {victim}{}; first write after {:.0} ms{}; rejoined in {:.0} ms",
            options.cycles,
            if c.victim_was_primary { " (primary)" } else { " (backup)" },
            first_write.unwrap_or(f64::NAN),
            all_resumed.map(|a| format!(", all users resumed after {a:.0} ms")).unwrap_or_default(),
            c.rejoin_ms
        );
        report_cycles.push(c);
    }
    let duration_s = started.elapsed().as_secs_f64();
    let records = load::drain(&shared, tasks).await?;
    let history = check::history(&records);
    // Every replica applies everything, then each database is read.
    cluster.wait_applied_equal(Duration::from_secs(60)).await?;
    cluster.stop_all().await;
    let mut dumps = Vec::new();
    for node in &cluster.nodes {
        dumps.push((node.id, cluster.dump_state(node.id).await?));
    }
    let stored = check::stored(&dumps, &records);
    let buckets = (duration_s * 10.0).ceil() as usize + 1;
    let mut acks_per_100ms = vec![0u32; buckets];
    let offset = started.saturating_duration_since(shared.base).as_millis() as u32;
    for r in &records {
        for a in &r.acks {
            if let Some(slot) = acks_per_100ms.get_mut((a.at_ms.saturating_sub(offset) / 100) as usize) {
                *slot += 1;
            }
        }
    }
    Ok(Report {
        cycles: report_cycles,
        users: options.users,
        rate: options.rate,
        replica_args,
        acked: history.acked,
        history,
        stored,
        acks_per_100ms,
        duration_s,
    })
}
