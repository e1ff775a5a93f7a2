//! A replica's log as an operator keeps it: stderr redirected to a file (as the harness does, and as a
//! service manager does) is plain text, without a terminal's colour codes.

use std::time::Duration;

use crate::harness::*;
use crate::step;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_written_to_a_file_holds_no_terminal_colour_codes() {
    let cluster = Cluster::start(3, Engine::Sqlite).await;
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;
    step!("the primary's log, once it says it leads");
    let log = std::fs::read_to_string(&cluster.node(leader).log).unwrap();
    let warnings_and_info: Vec<&str> = log.lines().filter(|l| l.contains("INFO") || l.contains("WARN")).collect();
    assert!(!warnings_and_info.is_empty(), "the node logged nothing:\n{log}");
    let coloured: Vec<&str> = log.lines().filter(|l| l.contains('\u{1b}')).take(3).collect();
    assert!(coloured.is_empty(), "escape codes in a log file: {coloured:#?}");
    cluster.finish().await;
}
