//! Ending sessions: `logout` ends every socket of that session, `logout_all` every session of the account,
//! and sessions left unused for the idle timeout expire.

use std::time::Duration;

use replichat::Config;
use replichat_shared::{ErrorCode, Request, ServerBody, SessionEnd};

use crate::both;
use crate::util::*;

/// A second socket on `token`'s session.
async fn resumed(server: &Server, token: &str) -> Client {
    let mut c = server.client().await;
    match c.request(Request::Resume { token: token.into(), cursor: 0 }).await {
        ServerBody::Session { .. } => c,
        other => panic!("resume: {other:?}"),
    }
}

/// The socket is told its session ended, then closed.
async fn ended(client: &mut Client, why: SessionEnd) {
    client.expect_push("session_ended", |b| matches!(b, ServerBody::SessionEnded { reason } if *reason == why)).await;
    client.expect_close().await;
}

both!(logout_ends_every_socket_of_that_session_and_only_those, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    let token = alice.token.clone().unwrap();
    let mut same_session = resumed(&server, &token).await;
    let mut other_session = server.client().await;
    other_session.login("alice", "password123").await;

    assert_eq!(alice.request(Request::Logout).await, ServerBody::Ok);
    // The socket that logged out stays open, logged out; the other socket of that session is ended.
    alice.expect_error(Request::Conversations, ErrorCode::Unauthenticated).await;
    ended(&mut same_session, SessionEnd::LoggedOut).await;
    // Nothing reaches the ended session any more; the other session still works and still receives.
    bob.send_message("alice", "still here?").await;
    other_session.expect_message("still here?").await;
    other_session.send_message("bob", "yes").await;
    let mut again = server.client().await;
    again.expect_error(Request::Resume { token, cursor: 0 }, ErrorCode::Unauthenticated).await;
});

both!(logout_all_ends_every_session_of_the_account, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    let first = alice.token.clone().unwrap();
    let mut same_session = resumed(&server, &first).await;
    let mut phone = server.client().await;
    phone.login("alice", "password123").await;
    let second = phone.token.clone().unwrap();

    assert_eq!(alice.request(Request::LogoutAll).await, ServerBody::Ok);
    alice.expect_error(Request::Conversations, ErrorCode::Unauthenticated).await;
    ended(&mut same_session, SessionEnd::LoggedOutEverywhere).await;
    ended(&mut phone, SessionEnd::LoggedOutEverywhere).await;
    for token in [first, second] {
        let mut c = server.client().await;
        c.expect_error(Request::Resume { token, cursor: 0 }, ErrorCode::Unauthenticated).await;
    }
    // Bob's session is untouched, and alice can log in again.
    bob.request(Request::Conversations).await;
    let mut back = server.client().await;
    back.login("alice", "password123").await;
});

both!(sessions_expire_after_the_idle_timeout_but_not_while_used, |engine| async move {
    let url = fresh_db(engine).await;
    // A 4 s timeout, used every 1 s: 3 s of margin for a slow resume (a margin of 0.8 s failed once, on both
    // engines at the same moment, in a full debug-build suite on two cores).
    let config = Config { session_idle_secs: 4, ..Config::for_tests(url.clone()) };
    let running = replichat::start(config).await.expect("server starts");
    let server = Server { addr: running.addr, running: Some(running), url };
    let alice = server.user("alice").await;
    let token = alice.token.clone().unwrap();
    alice.close().await;
    // Each use renews it, so it outlives the timeout.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        resumed(&server, &token).await.close().await;
    }
    // Then left alone longer than the timeout: gone.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let mut c = server.client().await;
    c.expect_error(Request::Resume { token, cursor: 0 }, ErrorCode::Unauthenticated).await;
});
