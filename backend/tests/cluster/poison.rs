//! A committed entry that no replica can apply (a bug, or a foreign writer) stops the real binary loudly: a
//! non-zero exit naming the entry, not a retry loop that answers every write `unavailable`.

use replichat::storage::Db;

#[tokio::test]
async fn an_unapplicable_entry_makes_the_binary_exit_non_zero_naming_it() {
    let dir = std::env::temp_dir().join("replichat-tests").join(format!("poison-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}", dir.join("node0.db").display());
    let db = Db::open(&url).await.unwrap();
    let entries = crate::harness::entries::poisoned();
    db.append_entries(&entries).await.unwrap();
    db.save_election_state(1, None).await.unwrap();
    db.close().await;

    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_replichat"))
        .args(["serve", "--id", "0", "--listen", "127.0.0.1:0", "--db", &url, "--log", "warn"])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(std::time::Duration::from_secs(30), run)
        .await
        .expect("the replica stops by itself")
        .expect("runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "exit status {:?}; stderr:\n{stderr}", output.status);
    assert!(stderr.contains("committed entry 3 cannot be applied"), "stderr names the entry:\n{stderr}");
    let db = Db::open(&url).await.unwrap();
    assert!(db.applied_index().await.unwrap() < 3, "nothing of the bad entry was applied");
    let _ = std::fs::remove_dir_all(&dir);
}
