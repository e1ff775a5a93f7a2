//! Limits on password guessing and sending: growing delays that slow an attacker without locking the owner
//! out, counted per client address, per address and account, and per account (replicated); a bounded
//! password-hashing queue; a send rate per account.

use std::net::IpAddr;

use replichat::Config;
use replichat_shared::{ErrorCode, Request, ServerBody};

use crate::both;
use crate::util::*;

/// A client connecting from `127.0.0.<n>`.
async fn from(server: &Server, n: u8) -> Client {
    Client::connect_from(&server.ws_url(), IpAddr::from([127, 0, 0, n])).await
}

fn login(username: &str, password: &str) -> Request {
    Request::Login { username: username.into(), password: password.into() }
}

/// The reply is `rate_limited` with a positive wait of at most `max_ms`.
fn limited(reply: &ServerBody, max_ms: u64) -> bool {
    matches!(reply, ServerBody::Error { code: ErrorCode::RateLimited, retry_after_ms: Some(ms), .. } if *ms > 0 && *ms <= max_ms)
}

both!(guessing_is_slowed_per_address_and_account_but_the_owner_is_never_locked_out, |engine| async move {
    let server = server(engine).await;
    // Alice signs up from her usual address, 127.0.0.1.
    server.user("alice").await;

    // One attacker address: five wrong guesses, then a growing delay for that address on that account.
    let mut attacker = from(&server, 2).await;
    for _ in 0..5 {
        attacker.expect_error(login("alice", "guess"), ErrorCode::BadCredentials).await;
    }
    let reply = attacker.request(login("alice", "password123")).await;
    assert!(limited(&reply, 1_000), "even the right password waits: {reply:?}");

    // The owner, from the address she signed up from, is not held up by the attack, and her success clears
    // the account's count: a new device of hers gets in too.
    let mut owner = server.client().await;
    owner.login("alice", "password123").await;
    from(&server, 9).await.login("alice", "password123").await;

    // Many attacker addresses, a few guesses each: the account itself gets a delay, capped at a minute, for
    // every address she has not logged in from.
    for (n, guesses) in [(3, 2), (4, 2), (5, 1)] {
        let mut c = from(&server, n).await;
        for _ in 0..guesses {
            c.expect_error(login("alice", "guess"), ErrorCode::BadCredentials).await;
        }
    }
    let reply = from(&server, 10).await.request(login("alice", "password123")).await;
    assert!(limited(&reply, 60_000), "a new address waits for the account's delay: {reply:?}");
    // Her known addresses still get in at once.
    server.client().await.login("alice", "password123").await;
    from(&server, 9).await.login("alice", "password123").await;
});

both!(spraying_one_password_over_many_names_is_slowed_per_address, |engine| async move {
    let server = server(engine).await;
    for name in ["ann", "ben", "cat"] {
        server.user(name).await;
    }
    let mut sprayer = from(&server, 7).await;
    for i in 0..10 {
        let name = ["ann", "ben", "cat", "nobody1", "nobody2"][i % 5];
        sprayer.expect_error(login(name, "password1"), ErrorCode::BadCredentials).await;
    }
    // Any name now, existing or not, waits.
    for name in ["ann", "zed"] {
        let reply = sprayer.request(login(name, "password1")).await;
        assert!(limited(&reply, 1_000), "{name}: {reply:?}");
    }
    // Another address is not affected.
    let mut other = from(&server, 8).await;
    other.login("ben", "password123").await;
});

both!(delete_account_is_no_password_oracle, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    for _ in 0..5 {
        alice.expect_error(Request::DeleteAccount { password: "guess".into() }, ErrorCode::BadCredentials).await;
    }
    let reply = alice.request(Request::DeleteAccount { password: "password123".into() }).await;
    assert!(limited(&reply, 1_000), "{reply:?}");
    // Shared with login: the same address and account wait there too.
    let mut c = server.client().await;
    let reply = c.request(login("alice", "password123")).await;
    assert!(limited(&reply, 1_000), "{reply:?}");
});

both!(the_account_delay_survives_a_restart_like_a_failover, |engine| async move {
    let mut server = server(engine).await;
    server.user("alice").await;
    for (n, guesses) in [(2, 2), (3, 2), (4, 1)] {
        let mut c = from(&server, n).await;
        for _ in 0..guesses {
            c.expect_error(login("alice", "guess"), ErrorCode::BadCredentials).await;
        }
    }
    server.stop().await;
    // Another process on the same state: what a new primary has (the count is in the replicated log).
    let running = replichat::start(Config::for_tests(server.url.clone())).await.expect("restarts");
    let server = Server { addr: running.addr, running: Some(running), url: server.url.clone() };
    let mut c = from(&server, 9).await;
    let reply = c.request(login("alice", "password123")).await;
    assert!(limited(&reply, 60_000), "{reply:?}");
});

both!(a_flood_of_logins_is_refused_at_once_when_the_hashing_queue_is_full, |engine| async move {
    let server = server(engine).await;
    server.user("alice").await;
    // Far more concurrent wrong logins than the queue holds, from many addresses and sockets.
    let mut tasks = Vec::new();
    for i in 0..120u8 {
        let url = server.ws_url();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect_from(&url, IpAddr::from([127, 0, 1, i])).await;
            c.request(login("nobody", "wrong-password")).await
        }));
    }
    let mut refused = 0;
    for task in tasks {
        match task.await.unwrap() {
            ServerBody::Error { code: ErrorCode::BadCredentials, .. } => {}
            ref reply if limited(reply, 1_000) => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(refused > 0, "the queue is bounded: some were refused at once");
    // Afterwards the owner logs in normally.
    let mut owner = server.client().await;
    owner.login("alice", "password123").await;
});

both!(a_flood_of_password_checks_on_one_server_refuses_nothing_on_another_in_the_same_process, |engine| async move {
    // The queue of password checks belongs to a server: a `replichat serve` process is one server, and a
    // process that runs several (this test suite, two engine variants at a time) must not let one server's
    // flood refuse another's sign-ups, as it did when the queue was process-wide (a CI run failed that way).
    let flooded = server(engine).await;
    let other = server(engine).await;
    let (refused_tx, mut refused_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..120u8 {
        let (url, refused_tx) = (flooded.ws_url(), refused_tx.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect_from(&url, IpAddr::from([127, 0, 2, i])).await;
            let reply = c.request(login("nobody", "wrong-password")).await;
            if limited(&reply, 1_000) {
                let _ = refused_tx.send(());
            }
        }));
    }
    // The flooded server's queue is full now (it refused a check), and stays full for the queued hashes.
    refused_rx.recv().await.expect("the flood is refused in part");
    let mut bob = other.client().await;
    let reply = bob.request(Request::Register { username: "bob".into(), password: "password123".into() }).await;
    assert!(matches!(reply, ServerBody::Session { .. }), "the other server signs bob up: {reply:?}");
    for task in tasks {
        task.await.unwrap();
    }
});

both!(each_account_has_a_send_rate, |engine| async move {
    let url = fresh_db(engine).await;
    let config = Config { send_rate: 1.0, send_burst: 5, ..Config::for_tests(url.clone()) };
    let running = replichat::start(config).await.expect("server starts");
    let server = Server { addr: running.addr, running: Some(running), url };
    let mut alice = server.user("alice").await;
    let mut carol = server.user("carol").await;
    server.user("bob").await;
    for i in 0..5 {
        alice.send_message("bob", &format!("burst {i}")).await;
    }
    let reply =
        alice.request(Request::Send { to: "bob".into(), text: "one too many".into(), client_id: "x".into() }).await;
    assert!(limited(&reply, 1_000), "{reply:?}");
    // Another account has its own bucket.
    carol.send_message("bob", "hello").await;
});
