//! Streamed snapshots: read in chunks from one consistent read, installed chunk by chunk in one transaction
//! that only the last chunk commits; an install given up, or killed half-way, leaves the old state.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use replichat::storage::{Db, Snapshot, SnapshotChunk};
use replichat_shared::{Request, ServerBody};

use crate::both;
use crate::util::*;

/// Every chunk of the state of `db`, `chunk_bytes` at a time, with the index it is as of.
async fn stream_all(db: &Db, chunk_bytes: usize) -> (u64, u64, Vec<SnapshotChunk>) {
    let mut stream = db.snapshot_stream(chunk_bytes).await.unwrap();
    let mut chunks = Vec::new();
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.unwrap());
    }
    (stream.last_index, stream.last_term, chunks)
}

/// Install `chunks` into `db` one by one, as a backup does.
async fn install_chunks(db: &Db, last_index: u64, last_term: u64, chunks: &[SnapshotChunk]) {
    let mut install = db.begin_snapshot_install().await.unwrap();
    for chunk in chunks {
        install.insert(&chunk.table, &chunk.rows).await.unwrap();
    }
    install.finish(last_index, last_term).await.unwrap();
}

/// SQLite: sqlx's writer connection's page cache between two transactions (it installs snapshots); `None` on
/// PostgreSQL.
async fn writer_cache(db: &Db) -> Option<i64> {
    db.sqlite_durability().await.unwrap().map(|writers| writers[1].3)
}

/// A server whose state spans many small chunks: `n` messages from ann to ben, each read by ben (a receipt:
/// a stored event; a message's own events are derived from its row). The clients stay connected (a user's
/// last socket closing appends an entry: the state would move under the test).
async fn busy_server(engine: Engine, n: usize) -> (Server, Client, Client) {
    let server = server(engine).await;
    let mut ann = server.user("ann").await;
    let mut ben = server.user("ben").await;
    for i in 0..n {
        let id = ann.send_message("ben", &format!("message {i} {}", "x".repeat(200))).await;
        ben.request(Request::Read { with: "ann".into(), up_to: id }).await;
    }
    (server, ann, ben)
}

both!(a_state_of_many_chunks_installs_as_the_identical_state, |engine| async move {
    let (server, _ann, _ben) = busy_server(engine, 120).await;
    let (last_index, last_term, chunks) = stream_all(server.db(), 4096).await;
    assert_eq!(last_index, server.db().applied_index().await.unwrap());
    for table in ["messages", "events"] {
        let pieces = chunks.iter().filter(|c| c.table == table).count();
        assert!(pieces > 3, "{table} comes in several chunks, not {pieces}");
    }
    assert_eq!(chunks.iter().map(|c| c.count).sum::<usize>(), 2 + 2 + 120 + 120, "users, sessions, messages, receipts");
    let replica = Db::open(&fresh_db(engine).await).await.unwrap();
    install_chunks(&replica, last_index, last_term, &chunks).await;
    assert!(replica.dump_state().await.unwrap() == server.db().dump_state().await.unwrap());
    assert_eq!(replica.applied_index().await.unwrap(), last_index);
    assert_eq!(replica.compacted().await.unwrap(), (last_index, last_term));
});

both!(a_stream_is_one_consistent_read, |engine| async move {
    let (server, _ann, mut ben) = busy_server(engine, 60).await;
    let before = server.db().dump_state().await.unwrap();
    let mut stream = server.db().snapshot_stream(1024).await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    // Writes while the stream is half read are not in it.
    for i in 0..20 {
        ben.send_message("ann", &format!("late {i}")).await;
    }
    let mut chunks = vec![first];
    while let Some(chunk) = stream.next().await {
        chunks.push(chunk.unwrap());
    }
    let replica = Db::open(&fresh_db(engine).await).await.unwrap();
    install_chunks(&replica, stream.last_index, stream.last_term, &chunks).await;
    let installed = replica.dump_state().await.unwrap();
    assert!(!installed.contains("late 0"), "a write after the read began is not in the snapshot");
    assert!(installed == before, "the state as of the index the stream names");
});

both!(an_install_given_up_half_way_leaves_the_old_state, |engine| async move {
    let (server, mut ann, _ben) = busy_server(engine, 40).await;
    let old = server.db().snapshot().await.unwrap();
    let replica = Db::open(&fresh_db(engine).await).await.unwrap();
    replica.install_snapshot(&old).await.unwrap();
    let old_dump = replica.dump().await.unwrap();
    for i in 0..40 {
        ann.send_message("ben", &format!("newer {i}")).await;
    }
    let (last_index, last_term, chunks) = stream_all(server.db(), 2048).await;
    assert!(chunks.len() > 4);
    // Rolled back explicitly (a gap, a new term) or dropped (a lost connection): either way nothing changed,
    // and readers never saw the half-installed state meanwhile.
    for explicitly in [true, false] {
        let mut install = replica.begin_snapshot_install().await.unwrap();
        for chunk in &chunks[..chunks.len() / 2] {
            install.insert(&chunk.table, &chunk.rows).await.unwrap();
        }
        assert!(replica.dump().await.unwrap() == old_dump, "a reader during the install sees the old state");
        if explicitly {
            install.abandon().await;
        } else {
            drop(install);
        }
        assert!(replica.dump().await.unwrap() == old_dump);
        assert_eq!(replica.applied_index().await.unwrap(), old.last_index);
        // The install's own large cache is not left on the writer connection.
        assert_eq!(writer_cache(&replica).await, writer_cache(server.db()).await);
    }
    // And the next install goes through.
    install_chunks(&replica, last_index, last_term, &chunks).await;
    assert!(replica.dump_state().await.unwrap() == server.db().dump_state().await.unwrap());
    assert_eq!(writer_cache(&replica).await, writer_cache(server.db()).await, "the writer's cache after an install");
});

/// The half of `an_install_killed_half_way_restarts_with_the_old_state` that is killed: installs half of the
/// snapshot in `REPLICHAT_KILL_SNAPSHOT` into `REPLICHAT_KILL_DB`, says so, and waits to be killed.
#[tokio::test]
#[ignore = "a child process of an_install_killed_half_way_restarts_with_the_old_state"]
async fn half_install_then_wait_to_be_killed() {
    let url = std::env::var("REPLICHAT_KILL_DB").expect("run by its parent test");
    let snapshot: Snapshot =
        serde_json::from_str(&std::fs::read_to_string(std::env::var("REPLICHAT_KILL_SNAPSHOT").unwrap()).unwrap())
            .unwrap();
    let db = Db::open(&url).await.unwrap();
    let mut install = db.begin_snapshot_install().await.unwrap();
    for (table, rows) in &snapshot.tables {
        for chunk in rows.chunks(10).take(3) {
            install.insert(table, &serde_json::to_string(chunk).unwrap()).await.unwrap();
        }
    }
    println!("HALF-INSTALLED {}", install.rows);
    std::future::pending::<()>().await;
}

both!(an_install_killed_half_way_restarts_with_the_old_state, |engine| async move {
    let (server, mut ann, _ben) = busy_server(engine, 30).await;
    let old = server.db().snapshot().await.unwrap();
    let url = fresh_db(engine).await;
    let replica = Db::open(&url).await.unwrap();
    replica.install_snapshot(&old).await.unwrap();
    let old_dump = replica.dump().await.unwrap();
    replica.close().await;
    for i in 0..30 {
        ann.send_message("ben", &format!("newer {i}")).await;
    }
    let new = server.db().snapshot().await.unwrap();
    let file = std::env::temp_dir().join(format!("replichat-kill-snapshot-{}.json", uuid::Uuid::new_v4().simple()));
    std::fs::write(&file, serde_json::to_string(&new).unwrap()).unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "snapshot::half_install_then_wait_to_be_killed", "--ignored", "--nocapture"])
        .env("REPLICHAT_KILL_DB", &url)
        .env("REPLICHAT_KILL_SNAPSHOT", &file)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let said = lines.find(|line| line.as_ref().is_ok_and(|l| l.starts_with("HALF-INSTALLED")));
    assert!(said.is_some(), "the child installed half a snapshot");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    std::fs::remove_file(&file).unwrap();

    // It starts (the start-up checks pass) with the old state and log, not a mix.
    let replica = Db::open(&url).await.unwrap();
    assert!(replica.dump().await.unwrap() == old_dump);
    assert_eq!(replica.applied_index().await.unwrap(), old.last_index);
    // And takes the whole new snapshot afterwards.
    replica.install_snapshot(&new).await.unwrap();
    assert!(replica.dump_state().await.unwrap() == server.db().dump_state().await.unwrap());
});

both!(a_snapshot_from_a_build_before_0005_replays_each_message_once, |engine| async move {
    // A build before migration 0005 stored both events of every message, and its snapshots carry them; the
    // installed state must not replay a message twice (beside the event derived from its row).
    let (server, _ann, _ben) = busy_server(engine, 10).await;
    let (last_index, last_term, mut chunks) = stream_all(server.db(), 4096).await;
    let dump = server.db().dump().await.unwrap();
    let users: Vec<i64> =
        replichat::storage::dump_section(&dump, "users").iter().map(|row| row[0].parse().unwrap()).collect();
    let mut replays = Vec::new();
    let mut old_rows = Vec::new();
    for &user in &users {
        let replay = server.db().events_after(user, 0, 1000).await.unwrap();
        for (index, body) in &replay {
            if matches!(body, ServerBody::Message { .. }) {
                old_rows.push(serde_json::json!([user, index, serde_json::to_string(body).unwrap()]));
            }
        }
        replays.push(replay);
    }
    assert_eq!(old_rows.len(), 20, "both events of each of the 10 messages");
    chunks.push(SnapshotChunk { table: "events".into(), rows: serde_json::to_string(&old_rows).unwrap(), count: 20 });
    let replica = Db::open(&fresh_db(engine).await).await.unwrap();
    install_chunks(&replica, last_index, last_term, &chunks).await;
    for (user, replay) in users.iter().zip(&replays) {
        assert_eq!(&replica.events_after(*user, 0, 1000).await.unwrap(), replay, "user {user}");
    }
    assert!(replica.dump_state().await.unwrap() == server.db().dump_state().await.unwrap());
});

both!(a_repeated_client_id_is_known_after_a_snapshot_install_and_a_restart, |engine| async move {
    // The applier decides a repeated client id from its in-memory map of the stored messages: a snapshot
    // install replaces the messages under it, and a restart starts without it.
    use crate::util::entries::{numbered, register};
    use replichat::op::Op;
    let send = |sender_id: i64, client_id: &str| Op::Send {
        sender_id,
        recipient_id: 3 - sender_id,
        client_id: client_id.into(),
        text: format!("{client_id} from {sender_id}"),
        at: 1,
    };
    let messages = |db: &Db| {
        let db = db.clone();
        async move {
            let dump = db.dump().await.unwrap();
            let ids: Vec<String> =
                replichat::storage::dump_section(&dump, "messages").iter().map(|row| row[0].to_owned()).collect();
            ids.join(" ")
        }
    };
    // The snapshot's state: message 3 is 1's "in-snapshot".
    let source = Db::open(&fresh_db(engine).await).await.unwrap();
    source
        .append_entries(&numbered(&[register(1, "a"), register(2, "b"), send(1, "in-snapshot")], |_| 1))
        .await
        .unwrap();
    source.apply_committed(3).await.unwrap();
    let (last_index, last_term, chunks) = stream_all(&source, 4096).await;
    assert_eq!(last_index, 3);

    // A replica that applied another message 3 ("old-state", loading its map) installs the snapshot.
    let url = fresh_db(engine).await;
    let replica = Db::open(&url).await.unwrap();
    replica
        .append_entries(&numbered(&[register(1, "a"), register(2, "b"), send(1, "old-state")], |_| 1))
        .await
        .unwrap();
    assert_eq!(replica.apply_committed(3).await.unwrap().1.len(), 2, "message 3 stored and pushed");
    install_chunks(&replica, last_index, last_term, &chunks).await;
    let ops = [
        register(1, "a"),
        register(2, "b"),
        send(1, "in-snapshot"),
        send(1, "in-snapshot"), // 4: a retry of the snapshot's message: nothing
        send(1, "old-state"),   // 5: the old state's message is gone: stored
        send(1, "old-state"),   // 6: a retry of 5: nothing
        send(2, "old-state"),   // 7: another sender's: stored
        send(1, "in-snapshot"), // 8 (after the restart): nothing
        send(2, "old-state"),   // 9 (after the restart): nothing
        send(1, "new"),         // 10 (after the restart): stored
    ];
    let entries = numbered(&ops, |_| last_term);
    replica.append_entries(&entries[3..7]).await.unwrap();
    let (_, pushed) = replica.apply_committed(7).await.unwrap();
    let pushed: Vec<u64> = pushed.iter().filter_map(|d| d.body.index()).collect();
    assert_eq!(pushed, [5, 5, 7, 7], "pushes for the stored messages only (recipient, then sender)");
    assert_eq!(messages(&replica).await, "3 5 7");
    replica.close().await;

    let replica = Db::open(&url).await.unwrap();
    replica.append_entries(&entries[7..]).await.unwrap();
    replica.apply_committed(10).await.unwrap();
    assert_eq!(messages(&replica).await, "3 5 7 10");
    // The state a replica applying the whole log one op at a time reaches.
    let reference = Db::open(&fresh_db(engine).await).await.unwrap();
    reference.append_entries(&entries).await.unwrap();
    reference.apply_committed_one_by_one(10).await.unwrap();
    assert!(replica.dump_state().await.unwrap() == reference.dump_state().await.unwrap());
    replica.close().await;
});
