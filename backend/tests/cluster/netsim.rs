//! The failover, partition and storage-fault tests again, with the replicas on simulated separate machines
//! (`Options::netsim`, the `replichat-netsim` crate): each replica in its own network namespace with its own
//! address on a bridge (veth links), TLS between replicas and to the test, and 1 ms or 20 ms added to every
//! round trip between two replicas (an NFQUEUE delay: this kernel has no `tc netem`). The namespaces, links,
//! rules and delayers are made by the harness and removed when the cluster is dropped, also on failure.
//! SQLite only: the replicas in their namespaces cannot reach the PostgreSQL server on the root namespace's
//! loopback. Needs root, `ip` and `iptables-legacy`; one simulated network at a time (the harness serialises).

/// The four tests in a module `$module`, at a round trip of `$rtt_ms` between replicas.
macro_rules! at_round_trip {
    ($module:ident, $rtt_ms:expr) => {
        mod $module {
            use crate::harness::{Engine, Options};

            fn options() -> Options {
                Options { netsim: Some(std::time::Duration::from_millis($rtt_ms)), ..Options::default() }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_killed_primary_loses_nothing_and_rejoins_as_backup() {
                crate::failover::rejoins_and_catches_up(Engine::Sqlite, options()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn an_isolated_primary_steps_down_and_nothing_diverges() {
                crate::faults::isolated_primary_steps_down(options()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_primary_with_a_full_disk_steps_down_and_rejoins() {
                crate::full_disk::full_primary_disk(options()).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn a_backup_with_a_full_disk_says_so_and_rejoins() {
                crate::full_disk::full_backup_disk(options()).await;
            }
        }
    };
}

at_round_trip!(at_1_ms, 1);
at_round_trip!(at_20_ms, 20);
