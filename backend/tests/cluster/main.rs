//! The cluster suite: three real `replichat serve` processes replicating one log, spoken to over real
//! WebSockets and `/api/cluster`; primaries are killed with SIGKILL and restarted. Run it with
//! `--test-threads 1` on a small machine (each test runs three servers).

mod harness;

mod amnesia;
mod election;
mod exhaustion;
mod failover;
mod faults;
mod full_disk;
mod group_commit;
mod impostor;
mod logs;
mod metrics;
mod netsim;
mod poison;
mod security;
mod tls;
mod upgrade;
