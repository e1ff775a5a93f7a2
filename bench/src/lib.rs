//! The replichat bench: programs that measure a real cluster and print numbers (BENCHMARKS.md).
//!
//! Nothing here is a timed assertion: `tests/chaos.rs` runs short chaos runs and asserts their *correctness*
//! verdict (nothing lost, nothing duplicated, replicas identical), never their speed; the unit tests check
//! the tools' own arithmetic and bookkeeping.
//!
//! # Layout
//! - [`procs`]: starting the systems under test as real processes (the reference relay, one replica, three
//!   replicas on SQLite or PostgreSQL), killing and restarting them, and reading their CPU time and RSS from
//!   `/proc`.
//! - [`http`]: a minimal HTTP/1.1 GET for `/api/cluster` polls.
//! - [`relay`]: the reference point: an in-memory WebSocket relay that speaks the subset of the protocol the
//!   load uses, with no storage and no replication.
//! - [`client`]: one simulated user: follows the primary, resumes, re-sends what is unacknowledged, and
//!   records every acknowledgement and delivery.
//! - [`load`]: many users at a fixed rate or as fast as acknowledgements allow; latency histograms.
//! - [`check`]: the checker over a recorded history: lost, duplicated, out of order, replicas identical.
//! - [`chaos`]: kill -9 the primary (sometimes a backup) under load, time the failover, run the checker.
//! - [`catchup`]: how long a replica that missed many messages takes to be in sync.
//! - [`idle`]: how much memory idle connections cost a replica.
//! - [`disk`]: how long a 4 KiB write and its `fdatasync` take on the disk under the replicas.
//! - [`abuse`]: resumers that never read, a connection flood and slowloris against one replica, with a normal
//!   client probed meanwhile.
//! - [`plot`]: SVG plots of the results.

pub mod abuse;
pub mod catchup;
pub mod chaos;
pub mod check;
pub mod client;
pub mod disk;
pub mod http;
pub mod idle;
pub mod load;
pub mod plot;
pub mod procs;
pub mod relay;
pub mod tls;

/// Replicas on simulated separate machines (network namespaces, a per-packet delay): the `replichat-netsim`
/// crate, shared with the cluster test suite.
pub use replichat_netsim as netsim;

/// Median of a list of numbers (the mean of the two middle ones for an even count); `NaN` when empty.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q` quantile (0..=1) of a list by nearest rank; `NaN` when empty.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Write `value` as pretty JSON to `path` (creating its directory) and say so on stderr.
pub fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")?;
    eprintln!("bench: wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_quantile() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
    }
}
