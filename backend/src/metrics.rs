//! Prometheus metrics: the recorder behind `GET /metrics`, the name and help text of every series, and one
//! small function per thing measured, so no other module spells a series name.
//!
//! The `metrics` facade has one recorder per process, so [`install`] installs it once and every server
//! started in the process shares it. A `replichat serve` process is one replica, so there the numbers are
//! that replica's; several servers in one process (the chat test suite) add up their counters and overwrite
//! each other's gauges. docs/ARCHITECTURE.md ("Metrics") lists every series.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use ::metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use replichat_shared::ErrorCode;
use tokio_util::sync::CancellationToken;

const MESSAGES_STORED: &str = "replichat_messages_stored_total";
const REQUESTS: &str = "replichat_requests_total";
const REQUEST_ERRORS: &str = "replichat_request_errors_total";
const CLIENT_CONNECTIONS: &str = "replichat_client_connections";
const PEER_CONNECTIONS: &str = "replichat_peer_connections";
const LAST_INDEX: &str = "replichat_log_last_index";
const COMMIT_INDEX: &str = "replichat_commit_index";
const APPLIED_INDEX: &str = "replichat_applied_index";
const LAG: &str = "replichat_replication_lag_entries";
const TERM: &str = "replichat_term";
const IS_PRIMARY: &str = "replichat_is_primary";
const ELECTIONS: &str = "replichat_elections_total";
const ELECTIONS_WON: &str = "replichat_elections_won_total";
const APPEND_ENTRIES: &str = "replichat_log_append_entries";
const APPEND_SECONDS: &str = "replichat_log_append_seconds";
const APPEND_WAIT_SECONDS: &str = "replichat_log_append_wait_seconds";
const APPLY_ENTRIES: &str = "replichat_apply_entries";
const APPLY_SECONDS: &str = "replichat_apply_seconds";

/// Entries per append transaction: one up to a primary's largest group (512 proposals) or a backup's
/// largest `append` frame (256 entries).
const ENTRIES_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// Entries per apply transaction: one up to a catch-up's thousands.
const APPLY_BUCKETS: &[f64] = &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0];
/// One append transaction, BEGIN to COMMIT (the fsync): from a page-cache write to a slow disk.
const SECONDS_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];
/// How often recorded histogram samples are folded into their buckets between scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the process-wide recorder on first use, and return the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let handle = match builder().install_recorder() {
                Ok(handle) => handle,
                Err(e) => {
                    // Whoever embeds the server installed a recorder of their own first: our series go there,
                    // and `/metrics` serves an empty page rather than the server failing to start.
                    tracing::warn!(error = %e, "another metrics recorder is installed; /metrics stays empty");
                    builder().build_recorder().handle()
                }
            };
            describe();
            handle
        })
        .clone()
}

/// Explicit buckets, so every histogram renders as a Prometheus histogram rather than a summary.
fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(APPEND_ENTRIES.to_owned()), ENTRIES_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(APPEND_SECONDS.to_owned()), SECONDS_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(APPEND_WAIT_SECONDS.to_owned()), SECONDS_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(APPLY_ENTRIES.to_owned()), APPLY_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(APPLY_SECONDS.to_owned()), SECONDS_BUCKETS))
        .expect("the bucket lists are not empty")
}

/// `# HELP` for every series, and a zero for each unlabelled counter, so a scrape shows them before the
/// first event.
fn describe() {
    describe_counter!(
        MESSAGES_STORED,
        "Messages stored by this replica's applier (committed send ops that stored a new message)."
    );
    describe_counter!(REQUESTS, "Client requests decoded on /ws, by protocol type.");
    describe_counter!(REQUEST_ERRORS, "Error replies sent to clients, by protocol error code.");
    describe_gauge!(CLIENT_CONNECTIONS, "Open client WebSockets on /ws.");
    describe_gauge!(PEER_CONNECTIONS, "Open connections from this replica to other replicas.");
    describe_gauge!(LAST_INDEX, "Highest index in the local log.");
    describe_gauge!(COMMIT_INDEX, "Highest index known to be committed.");
    describe_gauge!(APPLIED_INDEX, "Highest index applied to the chat state.");
    describe_gauge!(
        LAG,
        "Entries a backup is behind the primary's last index, as the primary knows it (0 off the primary)."
    );
    describe_gauge!(TERM, "Current term.");
    describe_gauge!(IS_PRIMARY, "1 while this replica is the primary, else 0.");
    describe_counter!(ELECTIONS, "Elections this replica started (term raised to ask for votes).");
    describe_counter!(ELECTIONS_WON, "Elections this replica won (it became primary).");
    describe_histogram!(APPEND_ENTRIES, "Entries written per log append transaction (group commit size per fsync).");
    describe_histogram!(APPEND_SECONDS, "Duration of one log append transaction, BEGIN to COMMIT, fsync included.");
    describe_histogram!(
        APPEND_WAIT_SECONDS,
        "How long a log append waited for a connection to write with before BEGIN (on SQLite the one writer, \
         busy with an apply, a compaction or another write)."
    );
    describe_histogram!(APPLY_ENTRIES, "Committed entries applied per apply transaction.");
    describe_histogram!(
        APPLY_SECONDS,
        "Duration of one apply transaction, BEGIN to COMMIT (on SQLite it holds the one writer connection, so \
         log appends wait meanwhile)."
    );
    for name in [MESSAGES_STORED, ELECTIONS, ELECTIONS_WON] {
        counter!(name).increment(0);
    }
    gauge!(CLIENT_CONNECTIONS).set(0.0);
}

/// Fold recorded histogram samples into their buckets every few seconds until `shutdown`, so memory stays
/// bounded however rarely `/metrics` is scraped (the exporter leaves this to whoever serves the page).
pub async fn upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(UPKEEP);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => handle.run_upkeep(),
        }
    }
}

/// The applier stored `count` new messages.
pub fn messages_stored(count: u64) {
    if count > 0 {
        counter!(MESSAGES_STORED).increment(count);
    }
}

/// A client request of protocol type `kind` arrived.
pub fn request(kind: &'static str) {
    counter!(REQUESTS, "type" => kind).increment(1);
}

/// A client was sent an error with this code.
pub fn request_failed(code: ErrorCode) {
    // The label is the code's name on the wire.
    let name = match serde_json::to_value(code) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{code:?}"),
    };
    counter!(REQUEST_ERRORS, "code" => name).increment(1);
}

/// The highest index applied to the chat state is now `index`.
pub fn applied_index(index: u64) {
    gauge!(APPLIED_INDEX).set(index as f64);
}

/// This replica started an election.
pub fn election_started() {
    counter!(ELECTIONS).increment(1);
}

/// This replica won an election.
pub fn election_won() {
    counter!(ELECTIONS_WON).increment(1);
}

/// This replica has `count` open connections to other replicas.
pub fn peer_connections(count: usize) {
    gauge!(PEER_CONNECTIONS).set(count as f64);
}

/// One append transaction wrote `entries` entries to the log in `took`.
pub fn log_appended(entries: usize, took: Duration) {
    histogram!(APPEND_ENTRIES).record(entries as f64);
    histogram!(APPEND_SECONDS).record(took);
}

/// A log append waited `waited` for its connection before it began.
pub fn log_append_waited(waited: Duration) {
    histogram!(APPEND_WAIT_SECONDS).record(waited);
}

/// One apply transaction applied `entries` committed entries in `took`.
pub fn applied(entries: u64, took: Duration) {
    histogram!(APPLY_ENTRIES).record(entries as f64);
    histogram!(APPLY_SECONDS).record(took);
}

/// Counts one open client WebSocket for as long as it lives.
pub struct ClientConnection(Gauge);

impl ClientConnection {
    /// A client socket opened.
    pub fn open() -> ClientConnection {
        let gauge = gauge!(CLIENT_CONNECTIONS);
        gauge.increment(1.0);
        ClientConnection(gauge)
    }
}

impl Drop for ClientConnection {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// The replication core's gauges, registered once; the core records its status into them after every input.
pub struct ReplicaGauges {
    term: Gauge,
    is_primary: Gauge,
    last_index: Gauge,
    commit_index: Gauge,
    /// By peer id: every replica but this one.
    lag: BTreeMap<u64, Gauge>,
}

impl ReplicaGauges {
    /// Gauges for a replica whose other replicas are `peers`.
    pub fn new(peers: impl IntoIterator<Item = u64>) -> ReplicaGauges {
        ReplicaGauges {
            term: gauge!(TERM),
            is_primary: gauge!(IS_PRIMARY),
            last_index: gauge!(LAST_INDEX),
            commit_index: gauge!(COMMIT_INDEX),
            lag: peers.into_iter().map(|id| (id, gauge!(LAG, "peer" => id.to_string()))).collect(),
        }
    }

    /// Record the replication core's status: its term, whether it is primary, its last and commit index,
    /// and `lag(peer)`, the entries each backup is behind as the primary sees it (last index minus what the
    /// backup acknowledged). A replica that is not primary ships to no one and reports 0.
    pub fn record(&self, term: u64, primary: bool, last_index: u64, commit_index: u64, lag: impl Fn(u64) -> u64) {
        self.term.set(term as f64);
        self.is_primary.set(if primary { 1.0 } else { 0.0 });
        self.last_index.set(last_index as f64);
        self.commit_index.set(commit_index as f64);
        for (id, gauge) in &self.lag {
            gauge.set(if primary { lag(*id) as f64 } else { 0.0 });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_labelled_by_their_wire_names() {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        ::metrics::with_local_recorder(&recorder, || {
            describe();
            request_failed(ErrorCode::UsernameTaken);
            log_appended(3, Duration::from_millis(2));
        });
        let page = handle.render();
        assert!(page.contains(r#"replichat_request_errors_total{code="username_taken"} 1"#), "{page}");
        assert!(page.contains("# TYPE replichat_log_append_seconds histogram"), "{page}");
        assert!(page.contains(r#"replichat_log_append_entries_bucket{le="4"} 1"#), "{page}");
        assert!(page.contains("# HELP replichat_messages_stored_total"), "{page}");
    }
}
