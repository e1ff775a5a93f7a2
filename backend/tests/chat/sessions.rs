//! resume after a dropped socket: exactly the events after the cursor, in order, then live.

use replichat_shared::{ErrorCode, Request, ServerBody};

use crate::both;
use crate::util::*;

both!(resume_after_a_dropped_socket_has_no_gap, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    alice.send_message("bob", "before").await;
    bob.expect_message("before").await;
    let token = bob.token.clone().unwrap();
    let cursor = bob.cursor;
    bob.close().await;

    // While bob is away: messages, and a receipt on bob's own message to alice.
    let mut sent = Vec::new();
    for i in 0..5 {
        sent.push(alice.send_message("bob", &format!("gap {i}")).await);
    }

    let mut bob = server.client().await;
    let reply = bob.request(Request::Resume { token: token.clone(), cursor }).await;
    assert_eq!(reply, ServerBody::Session { token: None, username: "bob".into(), cursor });
    let mut got = Vec::new();
    for _ in 0..5 {
        let ServerBody::Message { index, message } = bob.next_push().await else { panic!() };
        assert!(index > cursor);
        got.push(message.id);
    }
    assert_eq!(got, sent, "exactly the messages after the cursor, in order");
    // Then live, with nothing replayed twice.
    let live = alice.send_message("bob", "live again").await;
    let ServerBody::Message { message, .. } = bob.next_push().await else { panic!() };
    assert_eq!(message.id, live);

    // Resuming from a cursor in the middle replays only the rest.
    let mut bob3 = server.client().await;
    bob3.request(Request::Resume { token, cursor: sent[2] }).await;
    let mut rest = Vec::new();
    for _ in 0..3 {
        let ServerBody::Message { message, .. } = bob3.next_push().await else { panic!() };
        rest.push(message.id);
    }
    assert_eq!(rest, [sent[3], sent[4], live]);
});

both!(resume_replays_receipts_and_deletions, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    let mut carol = server.user("carol").await;
    let id = alice.send_message("bob", "read me").await;
    carol.send_message("alice", "bye").await;
    let token = alice.token.clone().unwrap();
    alice.close().await;

    bob.request(Request::Read { with: "alice".into(), up_to: id }).await;
    carol.request(Request::DeleteAccount { password: "password123".into() }).await;

    // From cursor 0: every stored event of alice's, in log order.
    let mut alice = server.client().await;
    alice.request(Request::Resume { token, cursor: 0 }).await;
    let mut seen = Vec::new();
    let mut last = 0;
    for _ in 0..4 {
        let event = alice.next_push().await;
        let index = event.index().expect("an event");
        assert!(index > last, "in index order");
        last = index;
        seen.push(match event {
            ServerBody::Message { message, .. } => format!("message {}", message.text),
            ServerBody::Receipt { by, up_to, kind, .. } => format!("{kind:?} by {by} up to {}", up_to == id),
            ServerBody::PeerDeleted { username, .. } => format!("deleted {username}"),
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(seen, ["message read me", "message bye", "Read by bob up to true", "deleted carol"]);
});

both!(resume_needs_a_valid_token, |engine| async move {
    let server = server(engine).await;
    let mut c = server.client().await;
    c.expect_error(Request::Resume { token: "0".repeat(64), cursor: 0 }, ErrorCode::Unauthenticated).await;
    let mut alice = server.user("alice").await;
    // A socket with a session cannot start another one.
    alice.expect_error(Request::Resume { token: "0".repeat(64), cursor: 0 }, ErrorCode::AlreadyAuthenticated).await;
    alice
        .expect_error(
            Request::Login { username: "alice".into(), password: "password123".into() },
            ErrorCode::AlreadyAuthenticated,
        )
        .await;
});

both!(a_sender_still_replays_a_message_to_an_account_deleted_since, |engine| async move {
    // The recipient's deletion removes the messages to it; their sender was pushed them and replays them as
    // sent (a message's events are derived from its row, so the deletion stores the sender's copy first).
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    let first = alice.send_message("bob", "one").await;
    let second = alice.send_message("bob", "two").await;
    let third = bob.send_message("alice", "from bob").await;
    let token = alice.token.clone().unwrap();
    alice.close().await;
    bob.request(Request::DeleteAccount { password: "password123".into() }).await;

    let mut alice = server.client().await;
    alice.request(Request::Resume { token, cursor: 0 }).await;
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(match alice.next_push().await {
            ServerBody::Message { index, message } => {
                assert_eq!(index, message.id);
                assert_eq!((message.delivered_at, message.read_at, message.from_deleted), (None, None, false));
                format!("{} {}->{}: {}", message.id, message.from, message.to, message.text)
            }
            ServerBody::PeerDeleted { username, .. } => format!("deleted {username}"),
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(
        seen,
        [
            format!("{first} alice->bob: one"),
            format!("{second} alice->bob: two"),
            format!("{third} bob->alice: from bob"),
            "deleted bob".to_owned()
        ]
    );
});
