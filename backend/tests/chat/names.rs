//! Look-alike usernames (issue 9, item 7): names that render as nothing, as a bare mark, or as someone
//! else's name are refused, and names are stored and found in NFC.

use replichat_shared::{ErrorCode, Request, ServerBody};

use crate::both;
use crate::util::*;

fn register(username: &str) -> Request {
    Request::Register { username: username.into(), password: "password123".into() }
}

fn names(reply: ServerBody) -> Vec<String> {
    match reply {
        ServerBody::Users { users, .. } => users,
        other => panic!("{other:?}"),
    }
}

both!(invisible_and_mark_only_names_are_refused, |engine| async move {
    let server = server(engine).await;
    let mut c = server.client().await;
    let before = server.db().dump().await.unwrap();
    for bad in [
        "\u{3164}\u{3164}\u{3164}", // Hangul filler: renders as blank
        "\u{34F}",                  // combining grapheme joiner alone
        "\u{301}",                  // a bare combining mark
        "\u{301}\u{302}",           // marks only
        "alice\u{34F}",             // a name plus an invisible joiner
        "alice\u{FE0F}",            // a name plus a variation selector
        "\u{FFA0}bob",              // half-width Hangul filler
    ] {
        c.expect_error(register(bad), ErrorCode::InvalidUsername).await;
    }
    assert_eq!(server.db().dump().await.unwrap(), before, "nothing was stored");
});

both!(look_alikes_of_existing_names_are_refused, |engine| async move {
    let server = server(engine).await;
    let mut me = server.user("zed").await;
    for real in ["alice", "admin", "file", "émile"] {
        server.user(real).await;
    }
    let mut c = server.client().await;
    for fake in [
        "\u{430}lice",       // Cyrillic а
        "ａｄｍｉｎ",        // full-width
        "ADMIN",             // case
        "\u{FB01}le",        // the ﬁ ligature
        "e\u{301}mile",      // decomposed é
        "\u{C9}MILE",        // upper case, precomposed
        "\u{430}dm\u{456}n", // Cyrillic а and і
    ] {
        c.expect_error(register(fake), ErrorCode::UsernameTaken).await;
    }
    let all = names(me.request(Request::List { pattern: "*".into(), after: None, limit: None }).await);
    assert_eq!(all, ["admin", "alice", "file", "zed", "émile"], "only the real names exist");
});

both!(names_are_stored_and_found_in_nfc, |engine| async move {
    let server = server(engine).await;
    let mut emile = server.client().await;
    // Registered decomposed, stored composed.
    let ServerBody::Session { username, .. } = emile.register("e\u{301}mile", "password123").await else { panic!() };
    assert_eq!(username, "\u{E9}mile");
    let mut zed = server.user("zed").await;
    let list = |pattern: &str| Request::List { pattern: pattern.into(), after: None, limit: None };
    assert_eq!(names(zed.request(list("\u{E9}mile")).await), ["\u{E9}mile"]);
    assert_eq!(names(zed.request(list("e\u{301}mile")).await), ["\u{E9}mile"]);
    assert_eq!(names(zed.request(list("e\u{301}m*")).await), ["\u{E9}mile"]);
    // A message to either form reaches the one account.
    zed.send_message("e\u{301}mile", "hello").await;
    emile.expect_message("hello").await;
    // Login with the other normal form finds the account.
    let mut again = server.client().await;
    let ServerBody::Session { username, .. } = again.login("\u{E9}mile", "password123").await else { panic!() };
    assert_eq!(username, "\u{E9}mile");
    let mut third = server.client().await;
    let ServerBody::Session { .. } = third.login("E\u{301}MILE", "password123").await else { panic!() };
});

both!(a_deleted_accounts_look_alike_is_free_again, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    alice.request(Request::DeleteAccount { password: "password123".into() }).await;
    let mut c = server.client().await;
    let ServerBody::Session { username, .. } = c.register("\u{430}lice", "password123").await else { panic!() };
    assert_eq!(username, "\u{430}lice");
});

both!(accounts_stored_before_skeletons_get_them_at_start_up, |engine| async move {
    use sqlx::Connection;
    let url = fresh_db(engine).await;
    replichat::storage::Db::open(&url).await.unwrap().close().await;
    // A row as an earlier version stored it: the key only lower-cased (so a full-width name kept its
    // full-width key), and no skeleton.
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query(
        "INSERT INTO users (id, username, name_key, live_key, password_hash, created_at) \
         VALUES (1000, $1, $1, $1, 'not-a-hash', 1)",
    )
    .bind("ａｌｉｃｅ")
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();

    let running = replichat::start(replichat::Config::for_tests(url.clone())).await.expect("server starts");
    let server = Server { addr: running.addr, running: Some(running), url };
    let dump = server.db().dump().await.unwrap();
    let users = replichat::storage::dump_section(&dump, "users");
    let row = users.iter().find(|r| r[0] == "1000").expect("the old row");
    assert_eq!((row[1], row[2], row[3]), ("ａｌｉｃｅ", "alice", "alice"), "re-keyed: {row:?}");
    assert_eq!(row[7], replichat::username::skeleton("alice"));
    let mut c = server.client().await;
    for fake in ["alice", "\u{430}lice"] {
        c.expect_error(register(fake), ErrorCode::UsernameTaken).await;
    }
    let mut zed = server.user("zed").await;
    let all = names(zed.request(Request::List { pattern: "ALICE".into(), after: None, limit: None }).await);
    assert_eq!(all, ["ａｌｉｃｅ"]);
});
