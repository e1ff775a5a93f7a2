//! The disk under the replicas: how long a 4 KiB write and its `fdatasync` take, one at a time, in the
//! directory where `load` puts the replicas' databases. Every acknowledged message waits for at least one such
//! sync (the primary's log append) and usually two (a backup's too), so this distribution is a floor under the
//! `load` latencies: a p99 goal below the disk's own p99 cannot be met on that disk.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::quantile;

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Report {
    pub syncs: usize,
    pub seconds: f64,
    pub interval_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// Syncs that took longer than 10 ms and than 100 ms.
    pub over_10_ms: usize,
    pub over_100_ms: usize,
}

/// Write 4 KiB at offset 0 of a file in `dir` and `fdatasync` it, every `interval`, for `duration`.
pub fn run(dir: &Path, duration: Duration, interval: Duration) -> anyhow::Result<Report> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("disk-probe");
    let mut file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path)?;
    file.write_all(&[0; 4096])?;
    file.sync_all()?;
    let page = [b'x'; 4096];
    let mut took = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        let at = Instant::now();
        file.write_all_at(&page, 0)?;
        file.sync_data()?;
        took.push(at.elapsed());
        std::thread::sleep(interval);
    }
    drop(file);
    std::fs::remove_file(&path)?;
    let _ = std::fs::remove_dir(dir);
    let ms: Vec<f64> = took.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    Ok(Report {
        syncs: ms.len(),
        seconds: started.elapsed().as_secs_f64(),
        interval_ms: interval.as_secs_f64() * 1000.0,
        p50_ms: quantile(&ms, 0.5),
        p99_ms: quantile(&ms, 0.99),
        p999_ms: quantile(&ms, 0.999),
        max_ms: quantile(&ms, 1.0),
        over_10_ms: ms.iter().filter(|&&m| m > 10.0).count(),
        over_100_ms: ms.iter().filter(|&&m| m > 100.0).count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_probe_counts_its_syncs_and_leaves_nothing_behind() {
        let dir = crate::procs::scratch_dir("disk-test");
        let report = run(&dir, Duration::from_millis(200), Duration::from_millis(5)).unwrap();
        assert!(report.syncs >= 2, "{report:?}");
        assert!(report.p50_ms > 0.0 && report.p50_ms <= report.p99_ms, "{report:?}");
        assert!(report.p99_ms <= report.p999_ms && report.p999_ms <= report.max_ms, "{report:?}");
        assert!(report.over_100_ms <= report.over_10_ms && report.over_10_ms <= report.syncs, "{report:?}");
        assert!(!dir.exists(), "the probe file and its directory are removed");
    }
}
