//! Applying the same log to an empty database gives the identical state: the property replication needs.

use replichat::storage::Db;
use replichat_shared::{Request, ServerBody};

use crate::both;
use crate::util::*;

both!(replaying_the_log_of_a_busy_run_rebuilds_identical_state, |engine| async move {
    let server = server(engine).await;
    // A busy run touching every op: registers, logins, sends (with a retry), receipts, logout, deletion.
    let mut users = Vec::new();
    for name in ["ann", "ben", "cat", "dan"] {
        users.push(server.user(name).await);
    }
    for round in 0..5 {
        for (i, from) in ["ann", "ben", "cat", "dan"].iter().enumerate() {
            let to = ["ann", "ben", "cat", "dan"][(i + round + 1) % 4];
            if to != *from {
                users[i].send_message(to, &format!("{from}->{to} #{round}")).await;
            }
        }
    }
    let retry = Request::Send { to: "ben".into(), text: "retry".into(), client_id: "same".into() };
    users[0].request(retry.clone()).await;
    users[0].request(retry).await;
    users[1].request(Request::Delivered { up_to: 1_000 }).await;
    users[2].request(Request::Read { with: "ann".into(), up_to: 1_000 }).await;
    let mut extra = server.client().await;
    extra.login("dan", "password123").await;
    extra.request(Request::Logout).await;
    // Eve, a contact of ann's, logs out her only socket: the server records when she was last seen (a `seen`
    // entry, applied before the reply).
    let mut eve = server.user("eve").await;
    eve.send_message("ann", "bye").await;
    eve.request(Request::Logout).await;
    assert_eq!(
        users[3].request(Request::DeleteAccount { password: "password123".into() }).await,
        ServerBody::AccountDeleted
    );
    users[0].send_message("cat", "after the deletion").await;

    let original = server.db().dump().await.unwrap();
    let entries = server.db().entries(0, u32::MAX).await.unwrap();
    // The primary's no-op, 4 registers, 16 sends, 1 send and its retry (an entry each: whether a client id is
    // stored already is decided when the entry is applied, and the retry's stores nothing), delivered, read,
    // login, logout, eve's register, send, logout and seen, delete, 1 send.
    assert_eq!(entries.len(), 33, "one entry per accepted change");
    assert!(entries.iter().any(|e| e.op.contains("\"op\":\"seen\"")), "the run records a last-seen time");
    assert_eq!(entries.iter().map(|e| e.index).collect::<Vec<_>>(), (1..=entries.len() as u64).collect::<Vec<_>>());
    assert_eq!(server.db().applied_index().await.unwrap(), entries.len() as u64, "everything committed is applied");

    // Replay into a fresh database of the same engine.
    let replica = Db::open(&fresh_db(engine).await).await.unwrap();
    replica.append_entries(&entries).await.unwrap();
    let (applied, _) = replica.apply_committed(entries.len() as u64).await.unwrap();
    assert_eq!(applied, entries.len() as u64);
    let replayed = replica.dump().await.unwrap();
    assert_eq!(replayed, original);
    assert!(original.contains("after the deletion") && original.contains("$argon2id$"));
    let users = replichat::storage::dump_section(&original, "users");
    // id, username, name_key, live_key, password_hash, created_at, deleted_at, skeleton, last_seen_at: every
    // live account was seen (it registered), the deleted one is not any more.
    assert!(users.iter().all(|row| (row[6] == "∅") == (row[8] != "∅")), "last seen of the live only: {users:?}");
});

both!(a_rejected_request_appends_nothing, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    let before = server.db().last_entry().await.unwrap();
    alice
        .expect_error(
            Request::Send { to: "ghost".into(), text: "boo".into(), client_id: "x".into() },
            replichat_shared::ErrorCode::UnknownUser,
        )
        .await;
    let mut other = server.client().await;
    other
        .expect_error(
            Request::Register { username: "ALICE".into(), password: "password123".into() },
            replichat_shared::ErrorCode::UsernameTaken,
        )
        .await;
    assert_eq!(server.db().last_entry().await.unwrap(), before);
});

both!(a_send_committed_twice_with_one_client_id_is_stored_once, |engine| async move {
    // After a failover, a client's retry can reach the new primary before it applied the original try from
    // the old term; both entries commit. Applying the second must store nothing and fail nothing.
    use replichat::op::Op;
    let db = Db::open(&fresh_db(engine).await).await.unwrap();
    let send =
        |text: &str| Op::Send { sender_id: 1, recipient_id: 2, client_id: "same".into(), text: text.into(), at: 2 };
    let ops = [entries::register(1, "alice"), entries::register(2, "bob"), send("first try"), send("retry")];
    let entries = entries::numbered(&ops, |i| 1 + i as u64 / 3);
    db.append_entries(&entries).await.unwrap();
    let (applied, deliveries) = db.apply_committed(4).await.unwrap();
    assert_eq!(applied, 4, "both entries applied, none failed");
    assert_eq!(
        deliveries.iter().filter_map(|d| d.body.index()).collect::<Vec<_>>(),
        [3, 3],
        "events of the first only"
    );
    let history = db.history(1, 2, None, 10).await.unwrap();
    assert_eq!(history.iter().map(|m| (m.id, m.text.as_str())).collect::<Vec<_>>(), [(3, "first try")]);
});

both!(a_snapshot_installs_as_the_identical_state, |engine| async move {
    let server = server(engine).await;
    let mut ann = server.user("ann").await;
    let _ben = server.user("ben").await;
    // Enough rows that installing takes several multi-row statements per table.
    for i in 0..400 {
        ann.send_message("ben", &format!("message {i}")).await;
    }
    let snapshot = server.db().snapshot().await.unwrap();
    let applied = server.db().applied_index().await.unwrap();
    assert_eq!(snapshot.last_index, applied);
    let replica = Db::open(&fresh_db(engine).await).await.unwrap();
    replica.install_snapshot(&snapshot).await.unwrap();
    assert_eq!(replica.dump_state().await.unwrap(), server.db().dump_state().await.unwrap());
    assert_eq!(replica.applied_index().await.unwrap(), applied);
    assert!(replica.dump_state().await.unwrap().contains("message 399"));

    // A snapshot from a replica that predates the last-seen column (users rows one cell shorter) installs,
    // with last-seen unknown.
    let mut old = snapshot.clone();
    for row in old.tables.get_mut("users").unwrap() {
        row.pop();
    }
    let replica = Db::open(&fresh_db(engine).await).await.unwrap();
    replica.install_snapshot(&old).await.unwrap();
    let users = replichat::storage::dump_section(&replica.dump_state().await.unwrap(), "users")
        .into_iter()
        .map(|row| row.iter().map(|c| c.to_string()).collect::<Vec<_>>())
        .collect::<Vec<_>>();
    assert_eq!(users.len(), 2);
    assert!(users.iter().all(|row| row[8] == "∅"), "{users:?}");
});

// A crash inside an apply: the real binary aborts (as abruptly as kill -9) inside an apply transaction, after
// writing the state and before committing it. Restarted, it applies again from the log whatever was appended;
// the client's retry with the same client id gets the original answer, or stores the message if its entry went
// with the crash (it was never acknowledged); nothing is lost or stored twice, and the state is exactly what
// replaying the log into an empty database gives. Two crashes: in an apply of its own, after the entries'
// append committed (the no-op and two registrations are the first three applies; on PostgreSQL the eighth is
// the fifth send's; on SQLite the fourth is the first send's, the only one applied on its own: it loads the
// client-id map); and, on SQLite, where the primary of a cluster of one applies a batch of sends in the
// transaction that appends it, inside that transaction (the third such is the fourth send's).
both!(a_crash_inside_an_apply_loses_and_repeats_nothing, |engine| async move {
    match engine {
        Engine::Postgres => crash_inside_an_apply(engine, ("REPLICHAT_TEST_ABORT_IN_APPLY", "8"), 4).await,
        Engine::Sqlite => {
            crash_inside_an_apply(engine, ("REPLICHAT_TEST_ABORT_IN_APPLY", "4"), 0).await;
            crash_inside_an_apply(engine, ("REPLICHAT_TEST_ABORT_IN_APPEND_APPLY", "3"), 3).await;
        }
    }
});

/// With `crash` in its environment, the replica aborts in the apply of send `crashing` (counted from 0).
async fn crash_inside_an_apply(engine: Engine, crash: (&str, &str), crashing: usize) {
    let db = fresh_db(engine).await;
    let process = Process::spawn(&db, &[crash]).await;
    let mut alice = Client::connect(&process.ws_url()).await;
    alice.register("alice", "password123").await;
    // Bob stays connected until the crash: his socket closing would append a `Seen` entry at a moment
    // of the scheduler's choosing, and the crash counts apply transactions.
    let mut bob = Client::connect(&process.ws_url()).await;
    bob.register("bob", "password123").await;
    let send = |i: usize| Request::Send {
        to: "bob".into(),
        text: format!("message {i}"),
        client_id: format!("client-id-{i}"),
    };
    let mut acked = Vec::new();
    let mut crashed_at = None;
    for i in 0..20 {
        match alice.try_request(send(i), WAIT).await {
            Ok(ServerBody::Sent { id, .. }) => acked.push((i, id)),
            Ok(other) => panic!("send {i}: {other:?}"),
            Err(_) => {
                crashed_at = Some(i);
                break;
            }
        }
    }
    let crashed_at = crashed_at.unwrap_or_else(|| panic!("{crash:?}: the replica aborted inside an apply"));
    assert_eq!(crashed_at, crashing, "{crash:?}: the send whose apply aborted");
    let mut process = process;
    let exit = tokio::time::timeout(WAIT, process.child.wait()).await.expect("the process ended").unwrap();
    drop(bob);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(exit.signal(), Some(6), "aborted (SIGABRT) inside the apply: {exit:?}");

    let process = Process::spawn(&db, &[]).await;
    let mut alice = Client::connect(&process.ws_url()).await;
    alice.login("alice", "password123").await;
    // The unanswered send again (same client id), then the rest.
    for i in crashed_at..20 {
        let ServerBody::Sent { id, .. } = alice.request(send(i)).await else { panic!("send {i} after the restart") };
        acked.push((i, id));
    }
    let mut bob = Client::connect(&process.ws_url()).await;
    bob.login("bob", "password123").await;
    let ServerBody::History { messages, .. } =
        bob.request(Request::History { with: "alice".into(), before: None, limit: Some(100) }).await
    else {
        panic!("history")
    };
    let stored: Vec<(String, u64)> = messages.iter().map(|m| (m.text.clone(), m.id)).collect();
    let expected: Vec<(String, u64)> = acked.iter().map(|(i, id)| (format!("message {i}"), *id)).collect();
    assert_eq!(stored, expected, "every acknowledged message once, under its acknowledged id, in order");
    assert!(process.terminate().await.success());

    let db = Db::open(&db).await.unwrap();
    let entries = db.entries(0, u32::MAX).await.unwrap();
    assert_eq!(db.applied_index().await.unwrap(), entries.last().unwrap().index, "everything was applied");
    let replica = Db::open(&fresh_db(engine).await).await.unwrap();
    replica.append_entries(&entries).await.unwrap();
    replica.apply_committed(entries.len() as u64).await.unwrap();
    assert_eq!(replica.dump().await.unwrap(), db.dump().await.unwrap(), "the state is the log's, replayed");
}
