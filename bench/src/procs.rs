//! The systems under test as real processes: the reference relay, or `replichat serve` replicas over
//! SQLite files or per-node PostgreSQL databases. Nodes can be SIGKILLed and restarted on the same port and
//! database; `/proc` gives each one's CPU time and peak RSS.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Child;

use crate::http;

/// What the load runs against (the reference points of BENCHMARKS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// (a) The in-memory relay of [`crate::relay`]: no storage, no replication.
    Relay,
    /// (b) One replichat replica on SQLite.
    Single,
    /// (c) Three replicas, each on its own SQLite file.
    Sqlite3,
    /// (d) Three replicas, each on its own PostgreSQL database.
    Pg3,
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct Setup {
    pub target: Target,
    /// The `replichat` binary (a release build for numbers worth quoting).
    pub replichat: PathBuf,
    /// Where the SQLite files and node logs go.
    pub dir: PathBuf,
    /// PostgreSQL base URL (`postgres://user:pass@host:port`) for [`Target::Pg3`].
    pub pg: String,
    /// Flags for every replica (`--heartbeat-ms`, ...).
    pub args: Vec<String>,
    /// The replicas' `--log` filter (their logs go to `<dir>/nodeN.log`).
    pub node_log: String,
    /// Run each replica in its own network namespace of this simulated network, over TLS (`args` then carries
    /// the TLS flags: see [`crate::tls::make`]). SQLite only.
    pub netsim: Option<std::sync::Arc<crate::netsim::Net>>,
}

/// One process of the system under test.
pub struct Node {
    pub id: u64,
    /// `127.0.0.1:port`, the same across restarts.
    pub addr: String,
    db: String,
    log: PathBuf,
    child: Option<Child>,
    pid: u32,
    /// Serves TLS (wss://).
    tls: bool,
}

impl Node {
    pub fn ws_url(&self) -> String {
        format!("{}://{}/ws", if self.tls { "wss" } else { "ws" }, self.addr)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The pid of the current (or last) process.
    pub fn pid(&self) -> u32 {
        self.pid
    }
}

/// The running system under test.
pub struct Cluster {
    pub setup: Setup,
    pub nodes: Vec<Node>,
    peers: String,
    secret: String,
    pg_databases: Vec<String>,
}

impl Cluster {
    /// Start every node of `setup.target` and wait until each listens.
    pub async fn start(setup: Setup) -> anyhow::Result<Cluster> {
        std::fs::create_dir_all(&setup.dir)?;
        let n = match setup.target {
            Target::Relay | Target::Single => 1,
            Target::Sqlite3 | Target::Pg3 => 3,
        };
        // Ports below the kernel's ephemeral range (32768 and up by default): a killed node's port must still
        // be free when it restarts, and the bench's own outgoing connections (thousands of them, every poll a
        // new one) would take a port from the ephemeral range. Every listener is held until all are chosen,
        // so no two nodes get the same one.
        let mut listeners = Vec::new();
        let simulated = setup.netsim.is_some();
        if simulated && setup.target != Target::Sqlite3 {
            bail!("the simulated network runs three SQLite replicas only (sqlite3)");
        }
        while !simulated && listeners.len() < n {
            let port = 20_000 + rand::random::<u16>() % 12_000;
            if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
                listeners.push(listener);
            }
        }
        let addrs: Vec<String> = if let Some(net) = &setup.netsim {
            // Each replica has its own address (and port space) in its own namespace.
            (0..n).map(|i| format!("{}:9100", net.addr(i))).collect()
        } else {
            listeners.iter().map(|l| l.local_addr().map(|a| a.to_string())).collect::<Result<_, _>>()?
        };
        drop(listeners);
        let unique = uuid::Uuid::new_v4().simple().to_string();
        let mut pg_databases = Vec::new();
        let mut nodes = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let db = match setup.target {
                Target::Pg3 => {
                    let name = format!("replichat_bench_{}_{i}", &unique[..12]);
                    psql(&setup.pg, &format!("CREATE DATABASE {name}"))?;
                    pg_databases.push(name.clone());
                    format!("{}/{name}", setup.pg.trim_end_matches('/'))
                }
                _ => format!("sqlite://{}", setup.dir.join(format!("node{i}.db")).display()),
            };
            let log = setup.dir.join(format!("node{i}.log"));
            nodes.push(Node { id: i as u64, addr: addr.clone(), db, log, child: None, pid: 0, tls: simulated });
        }
        let peers = if n > 1 {
            let scheme = if simulated { "https" } else { "http" };
            addrs.iter().enumerate().map(|(i, a)| format!("{i}={scheme}://{a}")).collect::<Vec<_>>().join(",")
        } else {
            String::new()
        };
        let mut cluster = Cluster { setup, nodes, peers, secret: format!("bench-{unique}"), pg_databases };
        for id in 0..n as u64 {
            cluster.restart(id).await?;
        }
        Ok(cluster)
    }

    /// Ids of the nodes whose process runs.
    pub fn live(&self) -> Vec<u64> {
        self.nodes.iter().filter(|n| n.is_running()).map(|n| n.id).collect()
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[id as usize]
    }

    /// Every node's `ws://.../ws` URL, in id order: the client's endpoint list.
    pub fn ws_urls(&self) -> Vec<String> {
        self.nodes.iter().map(Node::ws_url).collect()
    }

    /// Start node `id` (again, on the same port and database) and wait until it prints its listening line.
    pub async fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let setup = &self.setup;
        let node = &mut self.nodes[id as usize];
        if node.child.is_some() {
            bail!("node {id} is already running");
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let mut command = match setup.target {
            Target::Relay => {
                let mut c = tokio::process::Command::new(std::env::current_exe()?);
                c.args(["relay", "--listen", &node.addr]);
                c
            }
            _ => {
                let mut c = match &setup.netsim {
                    // `ip netns exec` execs the replica: the child's pid is the replica's.
                    Some(net) => tokio::process::Command::from(net.command(id as usize, &setup.replichat)),
                    None => tokio::process::Command::new(&setup.replichat),
                };
                c.args(["serve", "--id", &id.to_string(), "--listen", &node.addr, "--db", &node.db]);
                c.args(["--log", &setup.node_log]);
                // The load generator sends as fast as acknowledgements allow: no per-account send rate.
                c.args(["--send-rate", "1000000", "--send-burst", "1000000"]);
                // The load generator opens every socket from 127.0.0.1 (10,000 for `bench idle`): no per-address
                // cap, unless `setup.args` sets one (`bench abuse` does).
                if !setup.args.iter().any(|a| a.starts_with("--max-connections-per-ip")) {
                    c.args(["--max-connections-per-ip", "0"]);
                }
                if !self.peers.is_empty() {
                    c.args(["--peers", &self.peers, "--cluster-secret", &self.secret]);
                }
                c.args(&setup.args);
                c
            }
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("spawning {:?}", command.as_std().get_program()))?;
        node.pid = child.id().context("no pid")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let mut tx = Some(tx);
            let mut lines = BufReader::new(stdout).lines();
            // Keep reading to the end so the process never writes into a closed pipe.
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(" listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
            }
        });
        node.child = Some(child);
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(())) => Ok(()),
            _ => bail!("node {id} did not start listening; see {}", node.log.display()),
        }
    }

    /// SIGKILL node `id` and reap it. Returns the instant just before the signal was sent.
    pub async fn kill(&mut self, id: u64) -> anyhow::Result<Instant> {
        let node = &mut self.nodes[id as usize];
        let mut child = node.child.take().with_context(|| format!("node {id} is not running"))?;
        let at = Instant::now();
        child.start_kill()?;
        child.wait().await?;
        Ok(at)
    }

    /// SIGTERM every node and wait for each to exit.
    pub async fn stop_all(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = std::process::Command::new("kill").args(["-TERM", &node.pid.to_string()]).status();
                if tokio::time::timeout(Duration::from_secs(15), child.wait()).await.is_err() {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            }
        }
    }

    /// Stop everything and drop the PostgreSQL databases; the directory stays only when `keep`.
    pub async fn finish(mut self, keep: bool) {
        self.stop_all().await;
        for name in std::mem::take(&mut self.pg_databases) {
            let _ = psql(&self.setup.pg, &format!("DROP DATABASE IF EXISTS {name}"));
        }
        if !keep {
            let _ = std::fs::remove_dir_all(&self.setup.dir);
        }
    }

    /// The replica that says it is the primary and is followed by a majority, polled every 10 ms until
    /// `within` passes.
    pub async fn wait_for_primary(&self, within: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(id) = self.primary().await {
                return Ok(id);
            }
            if Instant::now() > deadline {
                bail!("no primary within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The current primary: a running replica that reports itself primary with a non-zero commit index.
    pub async fn primary(&self) -> Option<u64> {
        if self.nodes.len() == 1 {
            return self.nodes[0].is_running().then_some(0);
        }
        for id in self.live() {
            if let Ok(status) = http::cluster_status(&self.node(id).addr).await {
                if status.role == "primary" && status.commit_index > 0 {
                    return Some(id);
                }
            }
        }
        None
    }

    /// The highest term any running replica reports (`None` when none answers `/api/cluster`, e.g. the relay).
    pub async fn highest_term(&self) -> Option<u64> {
        let mut highest = None;
        for id in self.live() {
            if let Ok(status) = http::cluster_status(&self.node(id).addr).await {
                highest = highest.max(Some(status.term));
            }
        }
        highest
    }

    /// Wait until node `id` has applied everything the primary had committed when the wait began (just after
    /// the node restarted): see [`CatchUp`]. Returns when it had.
    pub async fn wait_caught_up(&self, id: u64, within: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + within;
        let mut catch_up = CatchUp::default();
        loop {
            if let Some(primary) = self.primary().await {
                if let (Ok(me), Ok(p)) = (
                    http::cluster_status(&self.node(id).addr).await,
                    http::cluster_status(&self.node(primary).addr).await,
                ) {
                    if catch_up.caught_up(me.applied_index, p.commit_index) {
                        return Ok(Instant::now());
                    }
                }
            }
            if Instant::now() > deadline {
                bail!("node {id} did not catch up within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Wait until every running replica reports the same applied index (the load has stopped).
    pub async fn wait_applied_equal(&self, within: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + within;
        loop {
            let mut applied = Vec::new();
            for id in self.live() {
                applied
                    .push(http::cluster_status(&self.node(id).addr).await.map(|s| (s.applied_index, s.commit_index)));
            }
            if let Ok(all) = applied.into_iter().collect::<Result<Vec<_>, _>>() {
                if all.windows(2).all(|w| w[0].0 == w[1].0) && all.iter().all(|(a, c)| a == c) {
                    return Ok(all[0].0);
                }
            }
            if Instant::now() > deadline {
                bail!("replicas did not converge within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Node `id`'s replicated state (users, messages, events; not the log), read from its database.
    pub async fn dump_state(&self, id: u64) -> anyhow::Result<String> {
        let db = replichat::storage::Db::open(&self.node(id).db).await?;
        let dump = db.dump_state().await?;
        db.close().await;
        Ok(dump)
    }

    /// CPU time and RSS of node `id`'s current process.
    pub fn usage(&self, id: u64) -> Usage {
        Usage::of(self.node(id).pid)
    }
}

/// CPU time and memory of one process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User + system CPU seconds so far.
    pub cpu_seconds: f64,
    /// Resident set now, bytes.
    pub rss: u64,
    /// Peak resident set (VmHWM), bytes.
    pub peak_rss: u64,
}

impl Usage {
    /// Read it for `pid` (zeros if the process is gone).
    pub fn of(pid: u32) -> Usage {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
        let rest: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
        let ticks = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let cpu_seconds = (ticks(11) + ticks(12)) as f64 / clock_ticks() as f64;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kb = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
                .unwrap_or(0)
                * 1024
        };
        Usage { cpu_seconds, rss: kb("VmRSS:"), peak_rss: kb("VmHWM:") }
    }

    /// This process.
    pub fn own() -> Usage {
        Usage::of(std::process::id())
    }

    /// Every PostgreSQL server process together (the pg3 replicas' databases do their work there). The
    /// peak RSS is the sum of the processes' peaks, which over-counts shared buffers.
    pub fn postgres() -> Usage {
        let mut total = Usage::default();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres") {
                let u = Usage::of(pid);
                total.cpu_seconds += u.cpu_seconds;
                total.rss += u.rss;
                total.peak_rss += u.peak_rss;
            }
        }
        total
    }
}

/// `getconf CLK_TCK`, read once (100 on Linux in practice).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Run one SQL statement against the `postgres` database of `base` with psql.
fn psql(base: &str, sql: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("psql")
        .args([&format!("{}/postgres", base.trim_end_matches('/')), "-qc", sql])
        .stdout(Stdio::null())
        .status()
        .context("running psql")?;
    if !status.success() {
        bail!("psql {sql:?} failed");
    }
    Ok(())
}

/// The `replichat` binary next to this one (`target/<profile>/`), or `REPLICHAT_BIN`.
pub fn default_replichat() -> PathBuf {
    if let Ok(path) = std::env::var("REPLICHAT_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // Test binaries live one level deeper, in target/<profile>/deps.
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join("replichat")
}

/// A fresh scratch directory under the system temp dir.
pub fn scratch_dir(what: &str) -> PathBuf {
    std::env::temp_dir().join("replichat-bench").join(format!("{what}-{}", uuid::Uuid::new_v4().simple()))
}

/// When a restarted replica has caught up: once it has applied the primary's commit index as first read after
/// the restart, everything committed while it was away. Not "the commit index of a moment ago": under load
/// the primary commits every few milliseconds, and a backup applies what it knows to be committed only in its
/// slot, every 250 ms, so its applied index trails any recent commit index by design, and a poll finds it
/// ahead of the one read 10 ms earlier only by luck of timing (that rule reported rejoins of 11 and 35 s in a
/// chaos run whose primary had the replica back in sync within 50 ms).
#[derive(Debug, Default)]
pub struct CatchUp {
    target: Option<u64>,
}

impl CatchUp {
    /// One poll: the replica's applied index and the primary's commit index, read together.
    pub fn caught_up(&mut self, applied: u64, primary_commit: u64) -> bool {
        applied >= *self.target.get_or_insert(primary_commit)
    }
}

#[cfg(test)]
mod tests {
    use super::CatchUp;

    /// A backup applying in slots: the primary commits 5 entries every 10-ms poll, and the backup applies
    /// every 25th poll (250 ms) what it knew to be committed a little over a poll earlier (it learns of a
    /// commit with the next append, and its apply takes time).
    fn polls() -> impl Iterator<Item = (u64, u64)> {
        let mut applied = 900;
        (0..200u64).map(move |poll| {
            let commit = 1_000 + 5 * poll;
            if poll % 25 == 24 {
                applied = commit - 8;
            }
            (applied, commit)
        })
    }

    #[test]
    fn a_backup_applying_in_slots_catches_up_at_its_first_apply() {
        let mut catch_up = CatchUp::default();
        let at = polls().position(|(applied, commit)| catch_up.caught_up(applied, commit));
        assert_eq!(at, Some(24), "at its first apply after the restart");
        // The rule it replaces (applied at least the commit index read one poll earlier) never held.
        let mut previous = None;
        assert!(!polls().any(|(applied, commit)| {
            let held = previous.is_some_and(|c| applied >= c);
            previous = Some(commit);
            held
        }));
    }

    #[test]
    fn the_target_is_the_first_commit_index_read() {
        let mut catch_up = CatchUp::default();
        assert!(!catch_up.caught_up(10, 20));
        assert!(!catch_up.caught_up(19, 500));
        assert!(catch_up.caught_up(20, 900));
    }
}
