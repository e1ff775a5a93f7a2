//! The short form of the chaos run (`bench chaos` is the long form, see BENCHMARKS.md): real replica
//! processes under steady load, kill -9 of the primary and of a backup, and the checker's verdict. Only
//! correctness is asserted, never speed.
//!
//! Needs the `replichat` binary next to the test (`cargo build -p replichat`; `scripts/test.sh` does it)
//! or `REPLICHAT_BIN`. The PostgreSQL variant runs when `REPLICHAT_TEST_PG` is set.

use std::time::Duration;

use replichat_bench::chaos::{self, Options};
use replichat_bench::procs::{default_replichat, scratch_dir, Setup, Target};

fn setup(target: Target, pg: String) -> Setup {
    let replichat = default_replichat();
    assert!(replichat.exists(), "{} missing: run `cargo build -p replichat` first", replichat.display());
    Setup {
        target,
        replichat,
        dir: scratch_dir("chaos-test"),
        pg,
        // Test timing (as in the cluster suite), so a cycle takes about a second.
        args: vec!["--heartbeat-ms=50".into(), "--election-timeout-ms=500".into()],
        // Kept (with the databases) when the run fails.
        node_log: "info".into(),
        netsim: None,
    }
}

async fn short_chaos(target: Target, pg: String) {
    check_short_chaos(setup(target, pg)).await;
}

async fn check_short_chaos(setup: Setup) {
    // Cycles 1-3 kill the primary, cycle 4 a backup.
    let options =
        Options { cycles: 4, users: 10, rate: 100.0, backup_every: 4, steady: Duration::from_millis(500), keep: false };
    let report = chaos::run(setup, &options).await.expect("chaos run");
    let h = &report.history;
    let s = &report.stored;
    eprintln!("history: {h:?}\nstored: {s:?}\ncycles: {:#?}", report.cycles);
    assert_eq!(report.cycles.len(), 4);
    assert_eq!(report.cycles.iter().filter(|c| c.victim_was_primary).count(), 3, "three primary kills");
    assert!(
        report
            .cycles
            .iter()
            .filter(|c| c.victim_was_primary)
            .all(|c| c.first_write_ms.is_some() && c.all_resumed_ms.is_some()),
        "after every primary kill a write was acknowledged and every user resumed"
    );
    assert!(report.acked >= 40, "the load ran: {} acknowledged", report.acked);
    assert!(h.failed_users.is_empty(), "no user gave up: {:?}", h.failed_users);
    assert_eq!((h.lost, h.duplicated, h.out_of_order, h.mismatched), (0, 0, 0, 0), "{:?}", h.examples);
    assert!(s.identical, "every replica holds the same state: {:?}", s.examples);
    assert_eq!(s.messages_stored, report.acked, "every acknowledged message is stored, nothing else");
    assert_eq!((s.missing, s.duplicated_or_moved), (0, 0), "{:?}", s.examples);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_chaos_on_sqlite_loses_and_duplicates_nothing() {
    short_chaos(Target::Sqlite3, String::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_chaos_on_postgres_loses_and_duplicates_nothing() {
    let Ok(pg) = std::env::var("REPLICHAT_TEST_PG") else {
        eprintln!("REPLICHAT_TEST_PG is not set: skipping (scripts/test.sh sets it)");
        return;
    };
    short_chaos(Target::Pg3, pg).await;
}

/// Three SQLite replicas in the simulated multi-machine network of `bench --netsim-rtt-ms` (the namespaces,
/// links and rules are removed when the setup is dropped), over TLS, 20 ms apart. The namespaces have fixed
/// names: one such test at a time (scripts/test.sh runs this suite with `--test-threads 1`).
fn across_20_ms() -> Setup {
    use replichat_bench::netsim::{Layout, Net};
    let net = Net::create(Layout::BENCH, 3, Duration::from_millis(20))
        .expect("the simulated network (root, ip and iptables-legacy needed)");
    let mut setup = setup(Target::Sqlite3, String::new());
    let hosts: Vec<String> = (0..3).map(|i| net.addr(i)).collect();
    setup.args.extend(replichat_bench::tls::make(&setup.dir.join("tls"), &hosts).expect("certificates"));
    setup.netsim = Some(std::sync::Arc::new(net));
    setup
}

/// The same over the simulated multi-machine network of `bench --netsim-rtt-ms` (netsim/src/lib.rs): each
/// replica in its own network namespace and address, TLS between replicas and to the bench, and 20 ms added
/// to every round trip between replicas. The namespaces, links and rules are made here and removed on drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_chaos_across_a_simulated_network_over_tls_loses_and_duplicates_nothing() {
    check_short_chaos(across_20_ms()).await;
}

/// A replica restarted after a kill catches up under load across a 20 ms round trip. Before the primary bounded
/// what it keeps in flight towards one backup, the restarted replica fell further behind with every group
/// commit (batches dropped from the full queue towards it, gaps refused, resends of what was on its way) and
/// the 30-cycle run stopped with "did not catch up within 60s" at cycles 5 and 6 of two runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_replicas_catch_up_under_load_across_a_20_ms_round_trip() {
    let mut setup = across_20_ms();
    // Default timing, as in `bench chaos`; the chaos run waits at most 60 s for each restarted replica.
    setup.args.retain(|a| !a.starts_with("--heartbeat-ms") && !a.starts_with("--election-timeout-ms"));
    let options =
        Options { cycles: 8, users: 20, rate: 200.0, backup_every: 0, steady: Duration::from_secs(1), keep: false };
    let report = chaos::run(setup, &options).await.expect("chaos run: every restarted replica caught up");
    let h = &report.history;
    assert_eq!((h.lost, h.duplicated, h.out_of_order, h.mismatched), (0, 0, 0, 0), "{:?}", h.examples);
    assert!(report.stored.identical, "every replica holds the same state: {:?}", report.stored.examples);
}
