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
    assert_eq!(
        users[3].request(Request::DeleteAccount { password: "password123".into() }).await,
        ServerBody::AccountDeleted
    );
    users[0].send_message("cat", "after the deletion").await;

    let original = server.db().dump().await.unwrap();
    let entries = server.db().entries(0, u32::MAX).await.unwrap();
    // The primary's no-op, 4 registers, 16 sends, 1 send retried (stored once), delivered, read, login,
    // logout, delete, 1 send.
    assert_eq!(entries.len(), 28, "one entry per accepted change");
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
});

both!(a_rejected_request_appends_nothing, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    let before = server.db().last_index().await.unwrap();
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
    assert_eq!(server.db().last_index().await.unwrap(), before);
});
