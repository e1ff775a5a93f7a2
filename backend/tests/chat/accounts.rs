//! register, login, list, logout, delete_account, and the rules around them.

use replichat_shared::{ErrorCode, Request, ServerBody};

use crate::both;
use crate::util::*;

both!(register_then_login_on_another_socket, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.client().await;
    let reply = alice.register("Alice", "password123").await;
    let ServerBody::Session { token: Some(token), username, .. } = reply else { panic!("{reply:?}") };
    assert_eq!(username, "Alice");
    assert_eq!(token.len(), 64, "256-bit token in hex");

    let mut again = server.client().await;
    // Case-insensitive login, reply carries the name as registered and a different token.
    let ServerBody::Session { token: Some(second), username, .. } = again.login("alice", "password123").await else {
        panic!()
    };
    assert_eq!(username, "Alice");
    assert_ne!(second, token);
    // The password is stored as an argon2id hash, never in clear.
    let dump = server.db().dump().await.unwrap();
    assert!(dump.contains("$argon2id$"), "argon2id hash stored");
    assert!(!dump.contains("password123"));
    assert!(!dump.contains(&token), "only token hashes are stored");
});

both!(usernames_are_unique_ignoring_case, |engine| async move {
    let server = server(engine).await;
    server.user("bob").await;
    let mut other = server.client().await;
    other
        .expect_error(
            Request::Register { username: "BOB".into(), password: "password123".into() },
            ErrorCode::UsernameTaken,
        )
        .await;
});

both!(username_and_password_rules, |engine| async move {
    let server = server(engine).await;
    let mut c = server.client().await;
    // Invisible formatting characters would let "alice\u{200B}" pass for "alice" in every list and chat.
    let invisible = ["alice\u{200B}", "\u{FEFF}alice", "ali\u{202E}ce", "al\u{2060}ice", "ali\u{00AD}ce"];
    for bad in
        ["", "has space", "tab\there", "new\nline", "star*", &"x".repeat(33), "bell\u{7}"].into_iter().chain(invisible)
    {
        c.expect_error(
            Request::Register { username: bad.into(), password: "password123".into() },
            ErrorCode::InvalidUsername,
        )
        .await;
    }
    c.expect_error(Request::Register { username: "carol".into(), password: "short".into() }, ErrorCode::WeakPassword)
        .await;
    // 32 characters (not bytes) is fine.
    c.register(&"é".repeat(32), "password123").await;
});

both!(login_failures_and_rate_limit, |engine| async move {
    let server = server(engine).await;
    server.user("dave").await;
    let mut c = server.client().await;
    c.expect_error(
        Request::Login { username: "nobody".into(), password: "password123".into() },
        ErrorCode::BadCredentials,
    )
    .await;
    for _ in 0..5 {
        c.expect_error(
            Request::Login { username: "dave".into(), password: "wrong-password".into() },
            ErrorCode::BadCredentials,
        )
        .await;
    }
    // More than five failures within a minute: even the right password is refused for now.
    c.expect_error(Request::Login { username: "DAVE".into(), password: "password123".into() }, ErrorCode::RateLimited)
        .await;
    // Other names are not affected.
    server.user("erin").await;
    let mut e = server.client().await;
    e.login("erin", "password123").await;
});

both!(list_with_wildcards_and_paging, |engine| async move {
    let server = server(engine).await;
    let mut me = server.user("zed").await;
    for name in ["alice", "Albert", "bob", "al_x", "alxx", "100%", "1000", "a.b", "ab"] {
        server.user(name).await;
    }
    let list = |pattern: &str| Request::List { pattern: pattern.into(), after: None, limit: None };
    let names = |reply: ServerBody| match reply {
        ServerBody::Users { users, .. } => users,
        other => panic!("{other:?}"),
    };
    let all = names(me.request(list("")).await);
    assert_eq!(all, ["100%", "1000", "a.b", "ab", "al_x", "Albert", "alice", "alxx", "bob", "zed"]);
    assert_eq!(names(me.request(list("*")).await), all);
    assert_eq!(names(me.request(list("**")).await), all);
    assert_eq!(names(me.request(list("al*")).await), ["al_x", "Albert", "alice", "alxx"]);
    assert_eq!(names(me.request(list("*b")).await), ["a.b", "ab", "bob"]);
    assert_eq!(names(me.request(list("a*e")).await), ["alice"]);
    assert_eq!(names(me.request(list("A*T")).await), ["Albert"]);
    assert_eq!(names(me.request(list("BOB")).await), ["bob"]);
    assert_eq!(names(me.request(list("bo")).await), Vec::<String>::new());
    // SQL metacharacters are literal: `_` is not "any character", `%` is not "anything", `.` is a dot.
    assert_eq!(names(me.request(list("al_*")).await), ["al_x"]);
    assert_eq!(names(me.request(list("100%*")).await), ["100%"]);
    assert_eq!(names(me.request(list("a.*")).await), ["a.b"]);
    assert_eq!(names(me.request(list("a_b")).await), Vec::<String>::new());

    // Paging: three at a time walks the whole list once.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let reply = me.request(Request::List { pattern: "*".into(), after: after.clone(), limit: Some(3) }).await;
        let ServerBody::Users { users, next } = reply else { panic!() };
        assert!(users.len() <= 3);
        seen.extend(users);
        match next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(seen, all);
    me.expect_error(Request::List { pattern: "*".into(), after: None, limit: Some(0) }, ErrorCode::BadRequest).await;
    me.expect_error(Request::List { pattern: "*".into(), after: None, limit: Some(201) }, ErrorCode::BadRequest).await;
});

both!(logout_revokes_the_session, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    let token = alice.token.clone().unwrap();
    assert_eq!(alice.request(Request::Logout).await, ServerBody::Ok);
    // The socket stays open but has no session now.
    alice.expect_error(Request::Conversations, ErrorCode::Unauthenticated).await;
    // And the token no longer resumes.
    let mut other = server.client().await;
    other.expect_error(Request::Resume { token, cursor: 0 }, ErrorCode::Unauthenticated).await;
    // Logging in again on the same socket works.
    alice.login("alice", "password123").await;
});

both!(delete_account_with_two_open_sessions, |engine| async move {
    let server = server(engine).await;
    let mut bob = server.user("bob").await;
    let mut alice = server.user("alice").await;
    let mut alice2 = server.client().await;
    alice2.login("alice", "password123").await;

    bob.send_message("alice", "to alice, will vanish").await;
    alice.send_message("bob", "from alice, stays").await;
    bob.expect_message("from alice, stays").await;

    // Wrong password: nothing happens.
    alice.expect_error(Request::DeleteAccount { password: "nope-nope".into() }, ErrorCode::BadCredentials).await;
    assert_eq!(
        alice.request(Request::DeleteAccount { password: "password123".into() }).await,
        ServerBody::AccountDeleted
    );
    let frame = alice.expect_close().await.expect("close frame");
    assert_eq!(u16::from(frame.code), 1000);
    // The other session is told and closed too.
    alice2.expect_push("account_deleted", |b| *b == ServerBody::AccountDeleted).await;
    alice2.expect_close().await;
    // Bob is told, with an event he would also get on resume.
    bob.expect_push("peer_deleted", |b| matches!(b, ServerBody::PeerDeleted { username, .. } if username == "alice"))
        .await;

    // Sends to the deleted account fail; its name is free; it cannot log in.
    bob.expect_error(
        Request::Send { to: "alice".into(), text: "hello?".into(), client_id: "c-after".into() },
        ErrorCode::UnknownUser,
    )
    .await;
    let mut c = server.client().await;
    c.expect_error(
        Request::Login { username: "alice".into(), password: "password123".into() },
        ErrorCode::BadCredentials,
    )
    .await;

    // Bob's history keeps alice's message, marked as from a deleted account; the message to alice is gone.
    let ServerBody::History { messages, .. } =
        bob.request(Request::History { with: "alice".into(), before: None, limit: None }).await
    else {
        panic!()
    };
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].text, "from alice, stays");
    assert!(messages[0].from_deleted);
    let ServerBody::Conversations { conversations } = bob.request(Request::Conversations).await else { panic!() };
    assert_eq!(conversations.len(), 1);
    assert!(conversations[0].deleted);

    // A new account can take the name and does not inherit anything.
    let mut new_alice = server.user("alice").await;
    let ServerBody::Conversations { conversations } = new_alice.request(Request::Conversations).await else { panic!() };
    assert!(conversations.is_empty());
    let ServerBody::History { messages, .. } =
        bob.request(Request::History { with: "alice".into(), before: None, limit: None }).await
    else {
        panic!()
    };
    assert!(messages.is_empty(), "history with the new alice is empty");
});
