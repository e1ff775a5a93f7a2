//! `bench`: measures replichat and prints numbers (BENCHMARKS.md says which command gives which number).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use replichat_bench::procs::{default_replichat, scratch_dir, Setup, Target};
use replichat_bench::{abuse, catchup, chaos, disk, idle, load, median, plot, procs, quantile, relay, write_json};

#[derive(Parser)]
#[command(about = "Load generator, failover timer and checker for replichat")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the in-memory reference relay (started by `load --target relay`).
    Relay {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Users sending one-to-one messages over real WebSockets: throughput, latency, CPU, RSS, lost and
    /// duplicated messages, for each target, several runs each.
    Load(LoadArgs),
    /// kill -9 the primary (sometimes a backup) under load, over and over; failover times and the checker.
    Chaos(ChaosArgs),
    /// Time for a backup that missed many messages to be in sync again.
    Catchup(CatchupArgs),
    /// Memory of one replica holding many idle sessions.
    Idle(IdleArgs),
    /// Abusive clients against one replica (resumers that never read, a connection flood, slowloris) while
    /// a normal client and `/healthz` are probed: peak RSS, what was cut off, failed probes.
    Abuse(AbuseArgs),
    /// The disk under the replicas: 4 KiB write + fdatasync latency, one at a time (a floor under every
    /// acknowledgement's latency).
    Disk {
        #[arg(long, default_value_t = 60.0)]
        duration_s: f64,
        /// Pause between two syncs.
        #[arg(long, default_value_t = 10.0)]
        interval_ms: f64,
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Render the plots from result files.
    Plot {
        /// A `load` result file (its median run per target is drawn).
        #[arg(long)]
        latency: Option<PathBuf>,
        /// A `chaos` result file.
        #[arg(long)]
        chaos: Option<PathBuf>,
        /// `load` result files, each at one fixed rate (`--rate`): p99 send -> delivered against the offered
        /// load, per target (`latency-curve.svg`).
        #[arg(long, num_args = 1..)]
        curve: Vec<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "docs/bench")]
        out: PathBuf,
    },
}

/// How the systems under test are started.
#[derive(Args, Clone)]
struct System {
    /// The replichat binary (build it with `cargo build --release`).
    #[arg(long, env = "REPLICHAT_BIN")]
    replichat: Option<PathBuf>,
    /// PostgreSQL base URL for `pg3` (one database per replica is created and dropped).
    #[arg(long, env = "REPLICHAT_BENCH_PG", default_value = "postgres://replichat:replichat@127.0.0.1:5432")]
    pg: String,
    /// More flags for every replica, e.g. `--replica-arg=--election-timeout-ms=500`.
    #[arg(long = "replica-arg", allow_hyphen_values = true)]
    replica_args: Vec<String>,
    /// Keep the scratch directory (databases, node logs).
    #[arg(long)]
    keep: bool,
    /// The replicas' log filter (`info` shows elections and snapshot timings; add `--keep` to read them).
    #[arg(long, default_value = "warn")]
    node_log: String,
    /// Simulate replicas on separate machines (`sqlite3` only; root needed): each in its own network
    /// namespace and address, TLS between them and to the bench, and this many milliseconds added to the
    /// round trip between two replicas (see netsim/src/lib.rs).
    #[arg(long)]
    netsim_rtt_ms: Option<f64>,
}

impl System {
    fn setup(&self, target: Target, what: &str) -> anyhow::Result<Setup> {
        let replichat = self.replichat.clone().unwrap_or_else(default_replichat);
        if target != Target::Relay && !replichat.exists() {
            bail!(
                "{} does not exist: run `cargo build --release -p replichat` or pass --replichat",
                replichat.display()
            );
        }
        let dir = scratch_dir(what);
        let mut args = self.replica_args.clone();
        let netsim = match self.netsim_rtt_ms.filter(|_| target != Target::Relay) {
            Some(rtt_ms) => {
                let rtt = std::time::Duration::from_secs_f64(rtt_ms / 1000.0);
                let net = replichat_bench::netsim::Net::create(replichat_bench::netsim::Layout::BENCH, 3, rtt)?;
                let hosts: Vec<String> = (0..3).map(|i| net.addr(i)).collect();
                args.extend(replichat_bench::tls::make(&dir.join("tls"), &hosts)?);
                Some(std::sync::Arc::new(net))
            }
            None => None,
        };
        Ok(Setup { target, replichat, dir, pg: self.pg.clone(), args, node_log: self.node_log.clone(), netsim })
    }
}

#[derive(Args)]
struct LoadArgs {
    #[command(flatten)]
    system: System,
    /// Targets, in order; ratios are to the first `relay` run.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Target::Relay, Target::Single, Target::Sqlite3, Target::Pg3])]
    target: Vec<Target>,
    #[arg(long, default_value_t = 200)]
    users: usize,
    /// Messages per second in all; 0 = as fast as acknowledgements allow.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Unacknowledged messages per user when `--rate 0`.
    #[arg(long, default_value_t = 1)]
    window: usize,
    #[arg(long, default_value_t = 2.0)]
    warmup_s: f64,
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Runs per target (each on a fresh cluster); the medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct ChaosArgs {
    #[command(flatten)]
    system: System,
    #[arg(long, default_value_t = 100)]
    cycles: u32,
    #[arg(long, default_value_t = 20)]
    users: usize,
    /// Messages per second in all.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Every N-th cycle kills a backup instead of the primary (0: never).
    #[arg(long, default_value_t = 4)]
    backup_every: u32,
    /// Seconds of steady load (counted as rate × seconds acknowledgements) before each kill.
    #[arg(long, default_value_t = 1.0)]
    steady_s: f64,
    /// `sqlite3` or `pg3`.
    #[arg(long, value_enum, default_value_t = Target::Sqlite3)]
    target: Target,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct CatchupArgs {
    #[command(flatten)]
    system: System,
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    #[arg(long, default_value_t = 50)]
    users: usize,
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Runs (each on a fresh cluster); the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    system: System,
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    #[arg(long, default_value_t = 100)]
    accounts: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct AbuseArgs {
    #[command(flatten)]
    system: System,
    /// Stored events the resumers ask for.
    #[arg(long, default_value_t = 6_000)]
    history: usize,
    /// Characters per message of the history.
    #[arg(long, default_value_t = 1_000)]
    text_chars: usize,
    /// Sockets that `resume` from cursor 0 and never read.
    #[arg(long, default_value_t = 100)]
    resumers: usize,
    /// Seconds the resumers are held (the replica's write timeout is 10 s by default).
    #[arg(long, default_value_t = 15.0)]
    hold_s: f64,
    /// Idle TCP connections opened from one address (the replica is started with
    /// `--max-connections-per-ip 1000` unless `--replica-arg` says otherwise).
    #[arg(long, default_value_t = 2_000)]
    flood: usize,
    /// Slowloris connections.
    #[arg(long, default_value_t = 300)]
    slowloris: usize,
    /// Seconds between a slowloris connection's header lines.
    #[arg(long, default_value_t = 1.0)]
    slow_every_s: f64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long)]
    out: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Relay { listen } => relay::serve(listen).await,
        Command::Load(args) => run_load(args).await,
        Command::Chaos(args) => run_chaos(args).await,
        Command::Catchup(args) => run_catchup(args).await,
        Command::Idle(args) => run_idle(args).await,
        Command::Abuse(args) => run_abuse(args).await,
        Command::Disk { duration_s, interval_ms, out } => {
            let dir = scratch_dir("disk");
            let report = tokio::task::spawn_blocking(move || {
                disk::run(&dir, Duration::from_secs_f64(duration_s), Duration::from_secs_f64(interval_ms / 1000.0))
            })
            .await??;
            println!(
                "disk: {} syncs of 4 KiB in {:.0} s: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms; \
                 {} over 10 ms, {} over 100 ms",
                report.syncs,
                report.seconds,
                report.p50_ms,
                report.p99_ms,
                report.p999_ms,
                report.max_ms,
                report.over_10_ms,
                report.over_100_ms
            );
            if let Some(out) = out {
                write_json(&out, &report)?;
            }
            Ok(())
        }
        Command::Plot { latency, chaos, curve, out } => {
            std::fs::create_dir_all(&out)?;
            if let Some(path) = latency {
                let result: LoadResult = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
                let runs: Vec<load::Summary> =
                    result.medians.iter().filter_map(|m| result.runs.get(m.median_run).cloned()).collect();
                let name = path.file_stem().context("file name")?.to_string_lossy().into_owned();
                let title = format!("Send -> delivered latency, {} users, {}", result.users, result.pace);
                plot::latency(&runs, &title, &out.join(format!("{name}.svg")))?;
            }
            if let Some(path) = chaos {
                let report: chaos::Report = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
                plot::failover(&report, 20.0, &out.join("failover.svg"))?;
            }
            if !curve.is_empty() {
                let mut points = Vec::new();
                let mut users = 0;
                for path in &curve {
                    let result: LoadResult = serde_json::from_str(&std::fs::read_to_string(path)?)?;
                    let offered: f64 = result
                        .pace
                        .strip_prefix("rate ")
                        .and_then(|r| r.strip_suffix("/s"))
                        .and_then(|r| r.parse().ok())
                        .with_context(|| format!("{}: not a fixed-rate run ({})", path.display(), result.pace))?;
                    users = result.users;
                    points.extend(result.medians.iter().map(|m| plot::CurvePoint {
                        target: m.target.clone(),
                        offered,
                        achieved: m.msgs_per_s,
                        p99_ms: m.deliver_p99_ms,
                    }));
                }
                let title = format!("p99 send -> delivered against offered load, {users} users (x: could not keep up)");
                plot::curve(&points, &title, &out.join("latency-curve.svg"))?;
            }
            Ok(())
        }
    }
}

/// A `load` result file: every run, and per target the medians.
#[derive(serde::Serialize, serde::Deserialize)]
struct LoadResult {
    users: usize,
    pace: String,
    runs: Vec<load::Summary>,
    medians: Vec<Median>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Median {
    target: String,
    runs: usize,
    msgs_per_s: f64,
    /// The lowest and highest run.
    #[serde(default)]
    msgs_per_s_range: [f64; 2],
    ratio_to_relay: Option<f64>,
    /// Server CPU µs per acknowledged message (see `load::Summary`), median and range.
    #[serde(default)]
    server_cpu_us_per_msg: f64,
    #[serde(default)]
    server_cpu_us_per_msg_range: [f64; 2],
    #[serde(default)]
    replica_cpu_us_per_msg: f64,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    ack_p999_ms: f64,
    deliver_p50_ms: f64,
    deliver_p99_ms: f64,
    deliver_p999_ms: f64,
    /// Summed over the runs.
    lost: u64,
    duplicated: u64,
    out_of_order: u64,
    /// Median CPU % of each server process, then the client.
    cpu_percent: Vec<f64>,
    peak_rss_mb: Vec<f64>,
    /// Index into `runs` of the run with the median throughput (drawn in plots).
    median_run: usize,
}

async fn run_load(args: LoadArgs) -> anyhow::Result<()> {
    let plan = load::Plan::new(
        args.users,
        args.rate,
        args.window,
        Duration::from_secs_f64(args.warmup_s),
        Duration::from_secs_f64(args.duration_s),
    );
    // Interleaved: run 1 of every target, then run 2 of every target, ... so that a change in the machine's
    // load (it is shared) falls on every target alike, not on one.
    let labels: Vec<String> = args
        .target
        .iter()
        .map(|t| Ok(serde_json::to_value(t)?.as_str().unwrap_or("?").to_owned()))
        .collect::<anyhow::Result<_>>()?;
    let mut by_target: Vec<Vec<load::Summary>> = vec![Vec::new(); args.target.len()];
    for run in 1..=args.runs {
        for (t, &target) in args.target.iter().enumerate() {
            let label = &labels[t];
            let cluster = procs::Cluster::start(args.system.setup(target, label)?).await?;
            let result = load::run(&cluster, &plan, label).await;
            cluster.finish(args.system.keep || result.is_err()).await;
            let (summary, _) = result?;
            eprintln!(
                "load: {label} run {run}/{}: {:.0} msg/s acknowledged; server CPU {:.0} µs/msg (replicas {:.0}); ack p50 {:.2} p99 {:.2} ms; delivered p50 {:.2} p99 {:.2} ms; lost {} duplicated {}; sends skipped (backlog full) {}{}",
                args.runs, summary.msgs_per_s, summary.server_cpu_us_per_msg, summary.replica_cpu_us_per_msg,
                summary.ack_ms.p50, summary.ack_ms.p99, summary.deliver_ms.p50, summary.deliver_ms.p99, summary.lost,
                summary.duplicated, summary.skipped,
                summary.elections.map(|n| format!("; elections during the run {n}")).unwrap_or_default()
            );
            by_target[t].push(summary);
        }
    }
    let mut runs = Vec::new();
    let mut medians: Vec<Median> = Vec::new();
    for (label, these) in labels.iter().zip(by_target) {
        let first = runs.len();
        let col = |f: &dyn Fn(&load::Summary) -> f64| median(&these.iter().map(f).collect::<Vec<_>>());
        let spread = |f: &dyn Fn(&load::Summary) -> f64| {
            let v: Vec<f64> = these.iter().map(f).collect();
            [v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(f64::NEG_INFINITY, f64::max)]
        };
        let throughput = col(&|s| s.msgs_per_s);
        let median_run = first
            + these
                .iter()
                .enumerate()
                .min_by(|a, b| (a.1.msgs_per_s - throughput).abs().total_cmp(&(b.1.msgs_per_s - throughput).abs()))
                .map_or(0, |(i, _)| i);
        let processes = these[0].processes.len();
        medians.push(Median {
            target: label.clone(),
            runs: these.len(),
            msgs_per_s: throughput,
            msgs_per_s_range: spread(&|s| s.msgs_per_s),
            ratio_to_relay: None,
            server_cpu_us_per_msg: col(&|s| s.server_cpu_us_per_msg),
            server_cpu_us_per_msg_range: spread(&|s| s.server_cpu_us_per_msg),
            replica_cpu_us_per_msg: col(&|s| s.replica_cpu_us_per_msg),
            ack_p50_ms: col(&|s| s.ack_ms.p50),
            ack_p99_ms: col(&|s| s.ack_ms.p99),
            ack_p999_ms: col(&|s| s.ack_ms.p999),
            deliver_p50_ms: col(&|s| s.deliver_ms.p50),
            deliver_p99_ms: col(&|s| s.deliver_ms.p99),
            deliver_p999_ms: col(&|s| s.deliver_ms.p999),
            lost: these.iter().map(|s| s.lost).sum(),
            duplicated: these.iter().map(|s| s.duplicated).sum(),
            out_of_order: these.iter().map(|s| s.out_of_order).sum(),
            cpu_percent: (0..processes).map(|p| col(&|s| s.processes[p].cpu_percent)).collect(),
            peak_rss_mb: (0..processes).map(|p| col(&|s| s.processes[p].peak_rss_mb)).collect(),
            median_run,
        });
        runs.extend(these);
    }
    let relay = medians.iter().find(|m| m.target == "relay").map(|m| m.msgs_per_s);
    for m in &mut medians {
        m.ratio_to_relay = relay.map(|r| m.msgs_per_s / r);
    }
    println!("| target | msg/s (median of {}; range) | x relay | server CPU µs per acked msg (range) | ack p50 / p99 / p99.9 ms | delivered p50 / p99 / p99.9 ms | CPU % per process (servers…, client) | peak RSS MB (servers…, client) | lost | dup |", args.runs);
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for m in &medians {
        let list = |v: &[f64]| v.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" / ");
        println!(
            "| {} | {:.0} ({:.0}–{:.0}) | {} | {:.0} ({:.0}–{:.0}){} | {:.2} / {:.2} / {:.2} | {:.2} / {:.2} / {:.2} | {} | {} | {} | {} |",
            m.target,
            m.msgs_per_s,
            m.msgs_per_s_range[0],
            m.msgs_per_s_range[1],
            m.ratio_to_relay.map_or("-".into(), |r| format!("{r:.3}")),
            m.server_cpu_us_per_msg,
            m.server_cpu_us_per_msg_range[0],
            m.server_cpu_us_per_msg_range[1],
            if m.replica_cpu_us_per_msg < m.server_cpu_us_per_msg {
                format!("; replicas alone {:.0}", m.replica_cpu_us_per_msg)
            } else {
                String::new()
            },
            m.ack_p50_ms,
            m.ack_p99_ms,
            m.ack_p999_ms,
            m.deliver_p50_ms,
            m.deliver_p99_ms,
            m.deliver_p999_ms,
            list(&m.cpu_percent),
            list(&m.peak_rss_mb),
            m.lost,
            m.duplicated
        );
    }
    let pace = runs.first().map(|r| r.pace.clone()).unwrap_or_default();
    let result = LoadResult { users: args.users, pace, runs, medians };
    if let Some(out) = args.out {
        write_json(&out, &result)?;
    }
    let lost: u64 = result.medians.iter().map(|m| m.lost + m.duplicated + m.out_of_order).sum();
    if lost > 0 {
        bail!("{lost} messages lost, duplicated or out of order");
    }
    Ok(())
}

async fn run_chaos(args: ChaosArgs) -> anyhow::Result<()> {
    if !matches!(args.target, Target::Sqlite3 | Target::Pg3) {
        bail!("chaos needs three replicas: --target sqlite3 or pg3");
    }
    let options = chaos::Options {
        cycles: args.cycles,
        users: args.users,
        rate: args.rate,
        backup_every: args.backup_every,
        steady: Duration::from_secs_f64(args.steady_s),
        keep: args.system.keep,
    };
    let report = chaos::run(args.system.setup(args.target, "chaos")?, &options).await?;
    let primary: Vec<&chaos::Cycle> = report.cycles.iter().filter(|c| c.victim_was_primary).collect();
    let first: Vec<f64> = primary.iter().filter_map(|c| c.first_write_ms).collect();
    let resumed: Vec<f64> = primary.iter().filter_map(|c| c.all_resumed_ms).collect();
    let rejoin: Vec<f64> = report.cycles.iter().map(|c| c.rejoin_ms).collect();
    println!(
        "cycles: {} ({} primary kills, {} backup kills)",
        report.cycles.len(),
        primary.len(),
        report.cycles.len() - primary.len()
    );
    println!("acknowledged messages: {}", report.acked);
    println!(
        "lost: {}  duplicated: {}  out of order: {}  mismatched: {}  failed users: {}",
        report.history.lost,
        report.history.duplicated,
        report.history.out_of_order,
        report.history.mismatched,
        report.history.failed_users.len()
    );
    println!(
        "replicas identical: {}  stored messages: {}  acknowledged but missing: {}  stored twice or moved: {}",
        report.stored.identical,
        report.stored.messages_stored,
        report.stored.missing,
        report.stored.duplicated_or_moved
    );
    let dist = |v: &[f64]| {
        format!(
            "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (n={})",
            quantile(v, 0.5),
            quantile(v, 0.99),
            quantile(v, 1.0),
            v.len()
        )
    };
    println!("kill -9 primary -> first write acknowledged: {}", dist(&first));
    println!("kill -9 primary -> every user resumed: {}", dist(&resumed));
    println!("restarted replica -> caught up: {}", dist(&rejoin));
    for e in report.history.examples.iter().chain(&report.stored.examples) {
        println!("  {e}");
    }
    if let Some(out) = &args.out {
        write_json(out, &report)?;
    }
    if !report.is_clean() {
        bail!("the checker found problems");
    }
    Ok(())
}

async fn run_catchup(args: CatchupArgs) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for run in 1..=args.runs {
        let report = catchup::run(
            args.system.setup(Target::Sqlite3, "catchup")?,
            args.messages,
            args.users,
            args.window,
            args.system.keep,
        )
        .await?;
        eprintln!(
            "catchup: run {run}/{}: {} entries behind; in sync {:.0} ms after listening ({:.0} ms after start)",
            args.runs, report.entries_behind, report.sync_ms, report.total_ms
        );
        reports.push(report);
    }
    let sync: Vec<f64> = reports.iter().map(|r| r.sync_ms).collect();
    let total: Vec<f64> = reports.iter().map(|r| r.total_ms).collect();
    println!(
        "catch-up of {} missed messages: median {:.0} ms from listening, {:.0} ms from process start (runs: {:?})",
        args.messages,
        median(&sync),
        median(&total),
        total.iter().map(|t| t.round()).collect::<Vec<_>>()
    );
    if let Some(out) = &args.out {
        write_json(out, &reports)?;
    }
    Ok(())
}

async fn run_idle(args: IdleArgs) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for run in 1..=args.runs {
        let report = idle::run(args.system.setup(Target::Single, "idle")?, args.connections, args.accounts).await?;
        eprintln!(
            "idle: run {run}/{}: {} sessions; RSS {:.1} MB -> {:.1} MB once idle ({:.1} KB each; {:.1} MB right \
             after opening); opened in {:.1} s, idle {:.1} s later",
            args.runs,
            report.connections,
            report.rss_before_mb,
            report.rss_after_mb,
            report.kb_per_connection,
            report.rss_after_open_mb,
            report.open_s,
            report.settle_s
        );
        reports.push(report);
    }
    let rss: Vec<f64> = reports.iter().map(|r| r.rss_after_mb).collect();
    let per: Vec<f64> = reports.iter().map(|r| r.kb_per_connection).collect();
    println!(
        "{} idle sessions on one replica: median RSS {:.1} MB ({:.1} KB per connection)",
        args.connections,
        median(&rss),
        median(&per)
    );
    if let Some(out) = &args.out {
        write_json(out, &reports)?;
    }
    Ok(())
}

async fn run_abuse(args: AbuseArgs) -> anyhow::Result<()> {
    let plan = abuse::Plan {
        history: args.history,
        text_chars: args.text_chars,
        resumers: args.resumers,
        hold: Duration::from_secs_f64(args.hold_s),
        flood: args.flood,
        slowloris: args.slowloris,
        slow_every: Duration::from_secs_f64(args.slow_every_s),
    };
    let mut reports = Vec::new();
    for run in 1..=args.runs {
        let mut setup = args.system.setup(Target::Single, "abuse")?;
        // A cap for the flood to hit; a later --replica-arg overrides it.
        setup.args.splice(0..0, ["--max-connections-per-ip".to_owned(), "1000".to_owned()]);
        let r = abuse::run(setup, &plan).await?;
        eprintln!(
            "abuse: run {run}/{}: {} non-reading resumers over {} events: RSS {:.1} MB idle, peak {:.1} MB (+{:.1}), \
             {:.1} MB after; {} dropped by the replica. flood {}: {} refused (429), {} closed, {} still open. \
             slowloris {}: {} cut, longest {:.1} s. probes: {} ok, {} failed, slowest {:.0} ms",
            args.runs,
            r.resumers,
            r.history,
            r.rss_idle_mb,
            r.rss_peak_mb,
            r.peak_above_idle_mb,
            r.rss_after_mb,
            r.resumers_dropped,
            r.flood,
            r.flood_refused,
            r.flood_closed,
            r.flood_open,
            r.slowloris,
            r.slowloris_cut,
            r.slowloris_max_s,
            r.probes_ok,
            r.probes_failed,
            r.probe_max_ms
        );
        reports.push(r);
    }
    let above: Vec<f64> = reports.iter().map(|r| r.peak_above_idle_mb).collect();
    let (min, max) = (above.iter().copied().fold(f64::INFINITY, f64::min), above.iter().copied().fold(0.0, f64::max));
    let failed: u64 = reports.iter().map(|r| r.probes_failed).sum();
    println!(
        "{} non-reading resumers over {} events: peak RSS above idle median {:.1} MB (min {:.1}, max {:.1}); \
         failed probes in all runs: {failed}",
        args.resumers,
        args.history,
        median(&above),
        min,
        max
    );
    if let Some(out) = &args.out {
        write_json(out, &reports)?;
    }
    if failed > 0 {
        bail!("{failed} probes of a normal client or /healthz failed during the abuse");
    }
    Ok(())
}
