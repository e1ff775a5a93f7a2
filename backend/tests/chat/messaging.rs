//! send, history, receipts, conversations, typing: two users chatting.

use replichat_shared::{ErrorCode, ReceiptKind, Request, ServerBody};

use crate::both;
use crate::util::*;

both!(two_users_chat_live_with_receipts, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;

    let id = alice.send_message("bob", "hi bob").await;
    let m = bob.expect_message("hi bob").await;
    assert_eq!((m.id, m.from.as_str(), m.to.as_str()), (id, "alice", "bob"));
    assert!(m.delivered_at.is_none() && m.read_at.is_none());
    // The sender's own socket sees the echo too (for its other tabs); same id.
    assert_eq!(alice.expect_message("hi bob").await.id, id);

    let reply = bob.send_message("alice", "hi alice").await;
    assert!(reply > id, "ids grow in send order");
    alice.expect_message("hi alice").await;

    // sent -> delivered -> read, seen by the sender.
    assert_eq!(bob.request(Request::Delivered { up_to: m.id }).await, ServerBody::Ok);
    let r = alice
        .expect_push("delivered receipt", |b| matches!(b, ServerBody::Receipt { kind: ReceiptKind::Delivered, .. }))
        .await;
    let ServerBody::Receipt { by, up_to, .. } = r else { unreachable!() };
    assert_eq!((by.as_str(), up_to), ("bob", id));
    assert_eq!(bob.request(Request::Read { with: "alice".into(), up_to: m.id }).await, ServerBody::Ok);
    let r =
        alice.expect_push("read receipt", |b| matches!(b, ServerBody::Receipt { kind: ReceiptKind::Read, .. })).await;
    let ServerBody::Receipt { by, up_to, .. } = r else { unreachable!() };
    assert_eq!((by.as_str(), up_to), ("bob", id));

    let ServerBody::History { messages, more, .. } =
        alice.request(Request::History { with: "bob".into(), before: None, limit: None }).await
    else {
        panic!()
    };
    assert!(!more);
    assert_eq!(messages.iter().map(|m| m.text.as_str()).collect::<Vec<_>>(), ["hi bob", "hi alice"]);
    assert!(messages[0].delivered_at.is_some() && messages[0].read_at.is_some());
});

both!(offline_messages_arrive_in_order_at_login, |engine| async move {
    let server = server(engine).await;
    let mut bob = server.user("bob").await;
    bob.request(Request::Logout).await;
    bob.close().await;
    let mut alice = server.user("alice").await;
    let mut carol = server.user("carol").await;
    alice.send_message("bob", "one").await;
    carol.send_message("bob", "two").await;
    alice.send_message("bob", "three").await;

    let mut bob = server.client().await;
    let ServerBody::Session { cursor, .. } = bob.login("bob", "password123").await else { panic!() };
    let mut texts = Vec::new();
    for _ in 0..3 {
        let ServerBody::Message { index, message } = bob.next_push().await else { panic!("expected a message") };
        assert!(index <= cursor);
        texts.push(message.text);
    }
    assert_eq!(texts, ["one", "two", "three"]);

    // Unread until read; conversation list has the counts, newest conversation first.
    let ServerBody::Conversations { conversations } = bob.request(Request::Conversations).await else { panic!() };
    let summary: Vec<_> = conversations.iter().map(|c| (c.with.as_str(), c.unread, c.last.text.as_str())).collect();
    assert_eq!(summary, [("alice", 2, "three"), ("carol", 1, "two")]);
    assert!(conversations.iter().all(|c| c.online), "both senders are connected");

    // Once acknowledged, a later login has no backlog: the pong is the first frame after the session reply.
    assert_eq!(bob.request(Request::Delivered { up_to: cursor }).await, ServerBody::Ok);
    let mut again = server.client().await;
    again.login("bob", "password123").await;
    assert_eq!(again.request(Request::Ping).await, ServerBody::Pong);
    assert!(again.inbox().is_empty(), "no backlog after delivered: {:?}", again.inbox());
});

both!(a_retried_send_stores_one_message, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    let send = || Request::Send { to: "bob".into(), text: "exactly once".into(), client_id: "7f1c-retry".into() };
    let ServerBody::Sent { id: first, .. } = alice.request(send()).await else { panic!() };
    // The client did not see the reply and retries, even from another socket of the same account.
    let ServerBody::Sent { id: second, .. } = alice.request(send()).await else { panic!() };
    let mut alice2 = server.client().await;
    alice2.login("alice", "password123").await;
    let ServerBody::Sent { id: third, .. } = alice2.request(send()).await else { panic!() };
    assert_eq!((first, second), (first, first));
    assert_eq!(third, first);
    let ServerBody::History { messages, .. } =
        bob.request(Request::History { with: "alice".into(), before: None, limit: None }).await
    else {
        panic!()
    };
    assert_eq!(messages.len(), 1);
    // Another user may use the same client id: it is scoped to the sender.
    let ServerBody::Sent { id: bobs, .. } =
        bob.request(Request::Send { to: "alice".into(), text: "mine".into(), client_id: "7f1c-retry".into() }).await
    else {
        panic!()
    };
    assert_ne!(bobs, first);
});

both!(history_pages_backwards, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    server.user("bob").await;
    for i in 0..7 {
        alice.send_message("bob", &format!("m{i}")).await;
    }
    let page = |before| Request::History { with: "BOB".into(), before, limit: Some(3) };
    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let ServerBody::History { messages, more, with } = alice.request(page(before)).await else { panic!() };
        assert_eq!(with, "bob");
        pages.push(messages.iter().map(|m| m.text.clone()).collect::<Vec<_>>());
        before = messages.first().map(|m| m.id);
        if !more {
            break;
        }
    }
    assert_eq!(pages, [vec!["m4", "m5", "m6"], vec!["m1", "m2", "m3"], vec!["m0"]]);
    alice
        .expect_error(Request::History { with: "nobody".into(), before: None, limit: None }, ErrorCode::UnknownUser)
        .await;
});

both!(send_errors, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    server.user("bob").await;
    let send = |to: &str, text: String, cid: &str| Request::Send { to: to.into(), text, client_id: cid.into() };
    alice.expect_error(send("alice", "me".into(), "c1"), ErrorCode::SelfSend).await;
    alice.expect_error(send("ALICE", "me".into(), "c1"), ErrorCode::SelfSend).await;
    alice.expect_error(send("nobody", "hi".into(), "c2"), ErrorCode::UnknownUser).await;
    alice.expect_error(send("bob", String::new(), "c3"), ErrorCode::TooLong).await;
    alice.expect_error(send("bob", "   ".into(), "c3"), ErrorCode::TooLong).await;
    alice.expect_error(send("bob", "x".repeat(4001), "c4"), ErrorCode::TooLong).await;
    alice.expect_error(send("bob", "hi".into(), ""), ErrorCode::BadRequest).await;
    alice.expect_error(send("bob", "hi".into(), &"c".repeat(65)), ErrorCode::BadRequest).await;
    // 4000 characters of a multi-byte letter is allowed (characters, not bytes).
    let ServerBody::Sent { .. } = alice.request(send("bob", "é".repeat(4000), "c5")).await else { panic!() };
    // Nothing rejected was stored.
    let ServerBody::History { messages, .. } =
        alice.request(Request::History { with: "bob".into(), before: None, limit: None }).await
    else {
        panic!()
    };
    assert_eq!(messages.len(), 1);
});

both!(typing_and_presence_are_live, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    alice.send_message("bob", "hello").await;
    bob.expect_message("hello").await;

    assert_eq!(alice.request(Request::Typing { to: "bob".into() }).await, ServerBody::Ok);
    bob.expect_push("typing", |b| *b == ServerBody::Typing { from: "alice".into() }).await;
    alice.expect_error(Request::Typing { to: "nobody".into() }, ErrorCode::UnknownUser).await;

    // Bob's only socket closes: alice (a contact) sees him go offline; he comes back: online.
    bob.close().await;
    alice
        .expect_push(
            "bob offline",
            |b| matches!(b, ServerBody::Presence { username, online: false, .. } if username == "bob"),
        )
        .await;
    let mut bob = server.client().await;
    bob.login("bob", "password123").await;
    alice
        .expect_push("bob online", |b| {
            *b == ServerBody::Presence { username: "bob".into(), online: true, last_seen: None }
        })
        .await;
    // A second socket of an already-online user is not a presence change; closing one of two is not either.
    let mut bob2 = server.client().await;
    bob2.login("bob", "password123").await;
    bob2.close().await;
    bob.close().await;
    let next = alice.expect_push("presence", |b| matches!(b, ServerBody::Presence { .. })).await;
    assert!(matches!(next, ServerBody::Presence { username, online: false, .. } if username == "bob"));
});

both!(a_retry_pushes_nothing_and_is_answered_with_the_original, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    let send = || Request::Send { to: "bob".into(), text: "once".into(), client_id: "gone-retry".into() };
    let ServerBody::Sent { id, .. } = alice.request(send()).await else { panic!() };
    let ServerBody::Sent { id: again, .. } = alice.request(send()).await else { panic!() };
    assert_eq!(again, id);
    // Whatever the retry's `to` says: another account, the sender itself, nobody.
    server.user("cat").await;
    for to in ["cat", "alice", "nobody"] {
        let retry = Request::Send { to: to.into(), text: "other".into(), client_id: "gone-retry".into() };
        let ServerBody::Sent { id: again, .. } = alice.request(retry).await else { panic!("retry to {to}") };
        assert_eq!(again, id, "retry to {to}");
    }
    // One push each of the message (the sender's own copy, the recipient's), none for the retry.
    assert_eq!(alice.request(Request::Ping).await, ServerBody::Pong);
    assert_eq!(bob.request(Request::Ping).await, ServerBody::Pong);
    let pushes = |frames: Vec<replichat_shared::ServerFrame>| {
        frames
            .into_iter()
            .filter(|f| matches!(&f.body, ServerBody::Message { message, .. } if message.id == id))
            .count()
    };
    assert_eq!(pushes(alice.drain_inbox()), 1);
    assert_eq!(pushes(bob.drain_inbox()), 1);
    // The recipient deletes the account, which removes the messages it received: a retry is refused like any
    // send to it, as before the deletion's entry stored nothing and pushes nothing.
    assert_eq!(
        bob.request(Request::DeleteAccount { password: "password123".into() }).await,
        ServerBody::AccountDeleted
    );
    alice.drain_inbox();
    alice.expect_error(send(), replichat_shared::ErrorCode::UnknownUser).await;
    assert_eq!(alice.request(Request::Ping).await, ServerBody::Pong);
    assert!(alice.drain_inbox().iter().all(|f| !matches!(f.body, ServerBody::Message { .. })));
});

/// What `alice`'s conversation list says of `peer`: (online, last seen).
async fn presence_in_list(alice: &mut Client, peer: &str) -> (bool, Option<i64>) {
    let ServerBody::Conversations { conversations } = alice.request(Request::Conversations).await else { panic!() };
    let c = conversations.iter().find(|c| c.with == peer).expect("a conversation with the peer");
    (c.online, c.last_seen)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

both!(a_contact_who_signs_in_later_reads_when_a_peer_was_last_seen, |engine| async move {
    let mut server = server(engine).await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    alice.send_message("bob", "see you").await;
    bob.expect_message("see you").await;
    alice.close().await;

    tracing::info!("bob logs out while alice is away: the server records when");
    let before = now_ms();
    assert_eq!(bob.request(Request::Logout).await, ServerBody::Ok);
    let after = now_ms();

    tracing::info!("alice signs in afterwards: her list says when bob was last seen");
    let mut alice = server.client().await;
    alice.login("alice", "password123").await;
    let (online, seen) = presence_in_list(&mut alice, "bob").await;
    assert!(!online);
    let seen = seen.expect("bob's last-seen time");
    assert!((before..=after).contains(&seen), "last seen {seen} within the logout ({before}..={after})");

    tracing::info!("bob comes back and closes his socket: alice is told when, and a fresh list says the same");
    let mut bob = server.client().await;
    bob.login("bob", "password123").await;
    alice.expect_push("bob online", |b| matches!(b, ServerBody::Presence { online: true, .. })).await;
    assert!(presence_in_list(&mut alice, "bob").await.0, "online in the list");
    bob.close().await;
    let ServerBody::Presence { online: false, last_seen: Some(closed), .. } =
        alice.expect_push("bob offline", |b| matches!(b, ServerBody::Presence { online: false, .. })).await
    else {
        panic!("going offline carries the last-seen time")
    };
    assert!(closed >= seen);
    assert_eq!(presence_in_list(&mut alice, "bob").await, (false, Some(closed)));

    tracing::info!("a stranger learns nothing of bob's presence");
    let mut carol = server.user("carol").await;
    let ServerBody::Conversations { conversations } = carol.request(Request::Conversations).await else { panic!() };
    assert!(conversations.is_empty());

    tracing::info!("someone without contacts leaving is told to nobody, and costs no write");
    let before = server.db().last_entry().await.unwrap();
    carol.close().await;
    assert_eq!(server.db().last_entry().await.unwrap(), before);

    tracing::info!("it is durable: a restart keeps it");
    alice.close().await;
    server.stop().await;
    let running = replichat::start(replichat::Config::for_tests(server.url.clone())).await.unwrap();
    let mut alice = Client::connect(&format!("ws://{}/ws", running.addr)).await;
    alice.login("alice", "password123").await;
    assert_eq!(presence_in_list(&mut alice, "bob").await, (false, Some(closed)));
    running.shutdown().await.unwrap();
});

both!(frames_many_times_the_read_buffer_are_read_and_written_whole, |engine| async move {
    // A socket reads 1 KiB at a time (ws.rs `SOCKET_BUFFER`): frames up to the 64 KiB protocol limit must still
    // arrive whole, in both directions.
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    // The longest message there is: 4,000 four-byte characters, a 16 KB frame each way.
    let longest = "😀".repeat(4000);
    let id = alice.send_message("bob", &longest).await;
    assert_eq!(bob.expect_message(&longest).await.id, id);
    // A frame just under the 64 KiB limit (a ping padded with JSON whitespace) is answered.
    let padded = format!(r#"{{"type":"ping","req":"padded"{}}}"#, " ".repeat(64 * 1024 - 64));
    assert!(padded.len() > 60 * 1024 && padded.len() <= 64 * 1024);
    alice.send_text(padded).await;
    assert_eq!(alice.reply_to("padded").await, ServerBody::Pong);
    // And the socket goes on as before.
    alice.send_message("bob", "after").await;
    bob.expect_message("after").await;
});
