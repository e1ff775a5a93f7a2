//! Hostile clients: text both engines cannot store alike, and an entry no replica can apply.

use replichat::storage::Db;
use replichat_shared::{ErrorCode, Request, ServerBody};

use crate::both;
use crate::util::*;

/// What a request with a U+0000 somewhere must get: `bad_request`, nothing appended.
async fn refused(client: &mut Client, request: Request) {
    let what = format!("{request:?}");
    match client.request(request).await {
        ServerBody::Error { code: ErrorCode::BadRequest, message, .. } => {
            assert!(message.contains("U+0000"), "{message}")
        }
        other => panic!("{what}: expected bad_request, got {other:?}"),
    }
}

both!(a_nul_in_any_text_field_is_a_bad_request_and_the_cluster_keeps_writing, |engine| async move {
    let server = server(engine).await;
    let mut a = server.user("a").await;
    let mut b = server.user("b").await;
    let before = server.db().dump().await.unwrap();
    let nul = |s: &str| format!("{s}\u{0}x");
    for request in [
        Request::Send { to: "b".into(), text: nul("x"), client_id: "k1".into() },
        Request::Send { to: "b".into(), text: "x".into(), client_id: nul("k") },
        Request::Send { to: nul("b"), text: "x".into(), client_id: "k2".into() },
        Request::History { with: nul("b"), before: None, limit: None },
        Request::List { pattern: nul("a*"), after: None, limit: None },
        Request::List { pattern: "*".into(), after: Some(nul("a")), limit: None },
        Request::Read { with: nul("b"), up_to: 1 },
        Request::Typing { to: nul("b") },
        Request::DeleteAccount { password: nul("password123") },
    ] {
        refused(&mut a, request).await;
    }
    let mut anonymous = server.client().await;
    for request in [
        Request::Login { username: nul("a"), password: "password123".into() },
        Request::Login { username: "a".into(), password: nul("password123") },
        Request::Register { username: nul("c"), password: "password123".into() },
        Request::Resume { token: nul("t"), cursor: 0 },
    ] {
        refused(&mut anonymous, request).await;
    }
    // The raw frame from the report, escaped in JSON as a client would send it.
    a.send_text(r#"{"type":"send","req":"raw","to":"b","text":"x\u0000y","client_id":"k1"}"#).await;
    match a.reply_to("raw").await {
        ServerBody::Error { code: ErrorCode::BadRequest, .. } => {}
        other => panic!("raw NUL frame: {other:?}"),
    }
    assert_eq!(server.db().dump().await.unwrap(), before, "nothing was appended or stored");
    // Every replica still applies: the next write is acknowledged and delivered.
    a.send_message("b", "still writing").await;
    b.expect_message("still writing").await;
});

/// Adversarial pieces of text: NUL (refused), 4-byte characters, combining marks, joiners, bidi, noncharacters,
/// SQL wildcards and escapes, quotes, line breaks, and long runs.
const PIECES: &[&str] = &[
    "\u{0}",
    "𝄞",
    "😀",
    "👩\u{200D}💻",
    "e\u{301}",
    "\u{301}",
    "\u{FEFF}",
    "\u{FFFF}",
    "\u{10FFFF}",
    "\u{202E}",
    "שלום",
    "%_\\",
    "'\"",
    "\r\n\t",
    "\u{7F}",
    "ǅ",
    "ß",
    "İ",
    "a",
    " ",
];

fn adversarial(rng: &mut impl rand::Rng, max_pieces: usize) -> String {
    let mut text = String::new();
    for _ in 0..rng.gen_range(1..=max_pieces) {
        let piece = PIECES[rng.gen_range(0..PIECES.len())];
        // Sometimes a long run of one piece.
        let times = if rng.gen_bool(0.05) { rng.gen_range(100..600) } else { 1 };
        text.push_str(&piece.repeat(times));
    }
    text
}

both!(every_request_that_passes_validation_applies_identically_on_both_engines, |engine| async move {
    use rand::{Rng, SeedableRng};
    let server = server(engine).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x0b0e);
    let mut alice = server.user("alice").await;
    let mut names = vec!["alice".to_owned()];
    let mut accepted = 0;
    for i in 0..160 {
        let request = match rng.gen_range(0..6) {
            // New accounts with adversarial names (most are refused; some are not).
            0 => {
                let mut c = server.client().await;
                let name = adversarial(&mut rng, 3);
                let reply =
                    c.request(Request::Register { username: name.clone(), password: "password123".into() }).await;
                if matches!(reply, ServerBody::Session { .. }) {
                    names.push(name);
                    accepted += 1;
                }
                continue;
            }
            1 | 2 => Request::Send {
                to: names[rng.gen_range(0..names.len())].clone(),
                text: adversarial(&mut rng, 6),
                client_id: if rng.gen_bool(0.8) { format!("c{i}") } else { adversarial(&mut rng, 2) },
            },
            3 => Request::List { pattern: adversarial(&mut rng, 3), after: None, limit: None },
            4 => Request::Read { with: names[rng.gen_range(0..names.len())].clone(), up_to: 10_000 },
            _ => {
                // Logins change nothing stored but must never fail inside.
                let mut anonymous = server.client().await;
                let reply = anonymous
                    .request(Request::Login { username: adversarial(&mut rng, 2), password: "password123".into() })
                    .await;
                assert!(!matches!(reply, ServerBody::Error { code: ErrorCode::Internal, .. }), "{reply:?}");
                continue;
            }
        };
        match alice.request(request).await {
            ServerBody::Error { code: ErrorCode::Internal | ErrorCode::Unavailable, message, .. } => {
                panic!("request {i}: the server failed: {message}")
            }
            ServerBody::Error { .. } => {}
            _ => accepted += 1,
        }
    }
    // JSON escapes of lone surrogates never reach an op: they are not valid text.
    alice.send_text(r#"{"type":"send","req":"s","to":"alice","text":"\ud800","client_id":"lone"}"#).await;
    alice.expect_push("bad_request", |b| matches!(b, ServerBody::Error { code: ErrorCode::BadRequest, .. })).await;
    assert!(accepted > 40, "the run exercised stored writes ({accepted} accepted)");

    let original = server.db().dump_state().await.unwrap();
    let entries = server.db().entries(0, u32::MAX).await.unwrap();
    let last = entries.last().unwrap().index;
    for target in [Engine::Sqlite, Engine::Postgres] {
        let replica = Db::open(&fresh_db(target).await).await.unwrap();
        replica.append_entries(&entries).await.unwrap();
        let (applied, _) = replica.apply_committed(last).await.unwrap();
        assert_eq!(applied, last, "{target:?} applied everything");
        assert_eq!(replica.dump_state().await.unwrap(), original, "{engine:?} log replayed on {target:?}");
    }
});

both!(an_entry_that_cannot_be_applied_stops_the_replica_loudly, |engine| async move {
    // A committed entry no replica can apply is a bug: the replica must stop and say which entry, not retry
    // for ever while every write times out.
    let url = fresh_db(engine).await;
    let db = Db::open(&url).await.unwrap();
    let entries = entries::poisoned();
    db.append_entries(&entries).await.unwrap();
    db.save_election_state(1, None).await.unwrap();
    db.close().await;

    let mut running = replichat::start(replichat::Config::for_tests(url.clone())).await.expect("starts");
    let stopped = tokio::time::timeout(WAIT, running.wait()).await.expect("the replica stops by itself");
    let error = stopped.expect_err("it stops with an error").to_string();
    assert!(error.contains("entry 3"), "the error names the entry: {error}");
    // Nothing of the bad entry was applied.
    let db = Db::open(&url).await.unwrap();
    assert!(db.applied_index().await.unwrap() < 3);
});
