//! The applier's batched path (a run of sends applied with a few statements for the whole run) gives exactly
//! what applying every op on its own gives: the same tables, the same events, the same pushes; and what
//! `resume` replays from the applied state is exactly what was pushed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use replichat::op::Op;
use replichat::storage::Db;
use replichat_shared::{Message, ServerBody};

use crate::both;
use crate::util::entries::{numbered, register};
use crate::util::*;

/// A random log of `len` ops: registrations, runs of sends (client ids drawn from a small set, so retries
/// repeat, also within one run; senders and recipients sometimes deleted), receipts, logins and logouts, and
/// account deletions in between.
fn random_log(rng: &mut StdRng, len: usize) -> Vec<Op> {
    let mut ops = vec![register(1, "u1"), register(2, "u2"), register(3, "u3")];
    let mut users = vec![1i64, 2, 3];
    let mut tokens = vec!["token-u1".to_owned(), "token-u2".to_owned(), "token-u3".to_owned()];
    while ops.len() < len {
        let index = ops.len() as i64 + 1;
        let at = index * 10;
        let pick = |rng: &mut StdRng| users[rng.gen_range(0..users.len())];
        match rng.gen_range(0..100) {
            // A run of sends: the batched path's unit.
            0..=59 => {
                for _ in 0..rng.gen_range(1..12) {
                    let sender_id = pick(rng);
                    let recipient_id = loop {
                        let r = pick(rng);
                        if r != sender_id {
                            break r;
                        }
                    };
                    let client_id = format!("c{}", rng.gen_range(0..25));
                    let text = format!("m{} from {sender_id}", ops.len());
                    ops.push(Op::Send { sender_id, recipient_id, client_id, text, at });
                }
            }
            60..=67 => {
                let name = format!("u{index}");
                tokens.push(format!("token-{name}"));
                ops.push(register(index, &name));
                users.push(index);
            }
            68..=75 => ops.push(Op::Delivered { user_id: pick(rng), up_to: index, at }),
            76..=83 => {
                let (user_id, peer_id) = (pick(rng), pick(rng));
                ops.push(Op::Read { user_id, peer_id, up_to: rng.gen_range(1..=index), at });
            }
            84..=89 => {
                let token_hash = format!("login-{index}");
                tokens.push(token_hash.clone());
                ops.push(Op::Login { user_id: pick(rng), token_hash, at });
            }
            90..=93 => ops.push(Op::Logout { token_hash: tokens[rng.gen_range(0..tokens.len())].clone() }),
            94..=97 => ops.push(Op::DeleteAccount { user_id: pick(rng), at }),
            98 => ops.push(Op::Seen { user_id: pick(rng), at }),
            _ => ops.push(Op::Noop),
        }
    }
    ops
}

/// The ids (log indexes) of the messages that applying `ops` leaves stored, decided without the applier: a send
/// stores its message unless its sender has a stored message under its client id (whatever its recipient and
/// text); an account deletion removes the messages the account received.
fn stored_by_model(ops: &[Op]) -> Vec<u64> {
    let mut stored: Vec<(u64, i64, i64, &str)> = Vec::new();
    for (at, op) in ops.iter().enumerate() {
        match op {
            Op::Send { sender_id, recipient_id, client_id, .. }
                if !stored.iter().any(|m| m.1 == *sender_id && m.3 == client_id) =>
            {
                stored.push((at as u64 + 1, *sender_id, *recipient_id, client_id));
            }
            Op::DeleteAccount { user_id, .. } => stored.retain(|m| m.2 != *user_id),
            _ => {}
        }
    }
    stored.into_iter().map(|m| m.0).collect()
}

both!(batched_apply_equals_applying_op_by_op_on_random_logs, |engine| async move {
    let mut with_deletions = 0;
    for seed in 0..12u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let ops = random_log(&mut rng, 300);
        let entries = numbered(&ops, |_| 1);
        let last = entries.len() as u64;
        let batched = Db::open(&fresh_db(engine).await).await.unwrap();
        let one_by_one = Db::open(&fresh_db(engine).await).await.unwrap();
        // A third replica whose client-id map holds every message under one hash: every send has every
        // stored message as a candidate, so the rows alone decide.
        let colliding = Db::open(&fresh_db(engine).await).await.unwrap();
        colliding.collide_client_ids();
        batched.append_entries(&entries).await.unwrap();
        one_by_one.append_entries(&entries).await.unwrap();
        colliding.append_entries(&entries).await.unwrap();
        // The batched replica applies in random steps (as commits arrive), so runs are cut anywhere.
        let mut pushed_batched = Vec::new();
        let mut applied = 0;
        while applied < last {
            let up_to = (applied + rng.gen_range(1..80)).min(last);
            let (now, caused) = batched.apply_committed(up_to).await.unwrap();
            assert_eq!(now, up_to);
            pushed_batched.extend(caused);
            applied = now;
        }
        let (now, pushed_one_by_one) = one_by_one.apply_committed_one_by_one(last).await.unwrap();
        assert_eq!(now, last);
        // A fourth applies each run of sends on its own, and each other op on its own: every batch of sends
        // alone (on a SQLite file, the writer thread's job; see `storage/writer.rs`).
        let by_runs = Db::open(&fresh_db(engine).await).await.unwrap();
        by_runs.append_entries(&entries).await.unwrap();
        let mut pushed_by_runs = Vec::new();
        for (at, op) in ops.iter().enumerate() {
            let send = |op: &Op| matches!(op, Op::Send { .. });
            if !send(op) || ops.get(at + 1).is_none_or(|next| !send(next)) {
                let (now, caused) = by_runs.apply_committed(at as u64 + 1).await.unwrap();
                assert_eq!(now, at as u64 + 1);
                pushed_by_runs.extend(caused);
            }
        }
        let mut pushed_colliding = Vec::new();
        let mut applied = 0;
        while applied < last {
            let up_to = (applied + rng.gen_range(1..80)).min(last);
            let (now, caused) = colliding.apply_committed(up_to).await.unwrap();
            pushed_colliding.extend(caused);
            applied = now;
        }
        let dump = batched.dump().await.unwrap();
        let reference = one_by_one.dump().await.unwrap();
        // Which messages exist, decided without the applier (a repeated client id stores nothing).
        let stored: Vec<u64> =
            replichat::storage::dump_section(&dump, "messages").iter().map(|row| row[0].parse().unwrap()).collect();
        assert_eq!(stored, stored_by_model(&ops), "seed {seed}: the messages a model of the log stores");
        assert_eq!(colliding.dump().await.unwrap(), reference, "seed {seed}: the same state with colliding hashes");
        assert_eq!(pushed_colliding, pushed_one_by_one, "seed {seed}: the same pushes with colliding hashes");
        assert_eq!(by_runs.dump().await.unwrap(), reference, "seed {seed}: the same state, each run of sends alone");
        assert_eq!(pushed_by_runs, pushed_one_by_one, "seed {seed}: the same pushes, each run of sends alone");
        // The first line that differs, not two whole dumps.
        let differs = dump.lines().zip(reference.lines()).find(|(a, b)| a != b);
        assert_eq!(differs, None, "seed {seed}: the same state (batched, one by one)");
        assert_eq!(dump, reference, "seed {seed}: the same state");
        assert_eq!(pushed_batched, pushed_one_by_one, "seed {seed}: the same pushes, in the same order");
        // The log really mixes stored sends, repeated client ids and deletions.
        let messages = replichat::storage::dump_section(&dump, "messages").len();
        let sends = entries.iter().filter(|e| e.op.contains("\"op\":\"send\"")).count();
        assert!(messages > 0 && messages < sends, "seed {seed}: {messages} stored of {sends} sends");
        with_deletions += usize::from(dump.contains("delete_account"));
        batched.close().await;
        one_by_one.close().await;
        colliding.close().await;
        by_runs.close().await;
    }
    assert!(with_deletions >= 6, "only {with_deletions} of 12 logs delete an account");
});

both!(applying_with_the_append_equals_applying_op_by_op, |engine| async move {
    // The primary of a cluster of one commits an entry by appending it: on SQLite a batch of sends is applied
    // in the transaction that appends it (`Db::append_committing`), its events kept for the applier's next
    // call; on PostgreSQL that is an append, applied by the applier. Batches of random lengths, with the applier
    // sometimes several batches behind (and the ops that are not sends applied by it): the same state, and the
    // same pushes in the same order, as applying op by op.
    let mut with_append = 0;
    for seed in 0..8u64 {
        let mut rng = StdRng::seed_from_u64(200 + seed);
        let ops = random_log(&mut rng, 300);
        let entries = numbered(&ops, |_| 1);
        let last = entries.len() as u64;
        let reference = Db::open(&fresh_db(engine).await).await.unwrap();
        reference.append_entries(&entries).await.unwrap();
        let (_, pushed_one_by_one) = reference.apply_committed_one_by_one(last).await.unwrap();
        let db = Db::open(&fresh_db(engine).await).await.unwrap();
        let mut pushed = Vec::new();
        let mut appended = 0;
        while appended < last {
            let batch = &entries[appended as usize..(appended + rng.gen_range(1..20)).min(last) as usize];
            assert_eq!(db.append_committing(batch).await.unwrap().0, batch.last().unwrap().index);
            appended = batch.last().unwrap().index;
            // Applied by its append (nothing else applies here but the calls below).
            with_append += u64::from(db.applied_index().await.unwrap() == appended);
            if rng.gen_bool(0.5) || appended == last {
                let (now, caused) = db.apply_committed(appended).await.unwrap();
                assert_eq!(now, appended, "seed {seed}");
                pushed.extend(caused);
            }
        }
        let dump = db.dump().await.unwrap();
        let reference_dump = reference.dump().await.unwrap();
        let differs = dump.lines().zip(reference_dump.lines()).find(|(a, b)| a != b);
        assert_eq!(differs, None, "seed {seed}: the same state");
        assert_eq!(dump, reference_dump, "seed {seed}: the same state");
        assert_eq!(pushed, pushed_one_by_one, "seed {seed}: the same pushes, in the same order");
        db.close().await;
        reference.close().await;
    }
    match engine {
        Engine::Sqlite => assert!(with_append >= 40, "only {with_append} batches applied with their append"),
        Engine::Postgres => assert_eq!(with_append, 0, "PostgreSQL applies in the applier only"),
    }
});

both!(a_batch_applied_with_its_append_meeting_a_row_no_entry_wrote_is_appended_alone, |engine| async move {
    // A send that meets a message no entry wrote (planted under its index) fails the apply in the append's
    // transaction (`INSERT OR ROLLBACK`): the entries are appended alone, and the applier's apply stops on the
    // entry and names it, as for any apply.
    let ops = [register(1, "a"), register(2, "b"), a_to_b(3, "three"), a_to_b(4, "four"), a_to_b(5, "five")];
    let entries = numbered(&ops, |_| 1);
    let url = fresh_db(engine).await;
    let db = Db::open(&url).await.unwrap();
    db.append_committing(&entries[..3]).await.unwrap();
    // The applier's first apply of a send loads its client-id map; the appends after it apply their sends.
    assert_eq!(db.apply_committed(3).await.unwrap().0, 3);
    db.append_committing(&entries[3..4]).await.unwrap();
    let applied = db.applied_index().await.unwrap();
    assert_eq!(applied, if engine == Engine::Sqlite { 4 } else { 3 }, "applied with its append on SQLite only");
    plant(
        &url,
        "INSERT INTO messages (id, sender_id, recipient_id, client_id, body, sent_at) \
         VALUES (5, 2, 1, 'planted', 'not from the log', 0)",
    )
    .await;
    assert_eq!(db.append_committing(&entries[4..]).await.unwrap(), (5, 1), "appended");
    assert_eq!(db.entries(4, 10).await.unwrap(), entries[4..], "the entry is in the log");
    assert_eq!(db.applied_index().await.unwrap(), applied, "and not applied");
    let refused = db.apply_committed(5).await.expect_err("applied over the planted row").to_string();
    assert!(refused.contains("entry 5"), "{refused}");
    assert_eq!(db.applied_index().await.unwrap(), applied, "nothing more applied");
    let dump = db.dump().await.unwrap();
    let messages = replichat::storage::dump_section(&dump, "messages");
    let ids: Vec<&str> = messages.iter().map(|m| m[0]).collect();
    assert_eq!(ids, if engine == Engine::Sqlite { ["3", "4", "5"].as_slice() } else { &["3", "5"] }, "{messages:?}");
    assert_eq!(messages.last().unwrap()[3], "planted");
    db.close().await;
});

both!(an_append_keeps_matching_entries_and_replaces_a_conflicting_suffix, |engine| async move {
    let db = Db::open(&fresh_db(engine).await).await.unwrap();
    let ops: Vec<Op> = (0..5).map(|_| Op::Noop).collect();
    let log = |db: &Db| {
        let db = db.clone();
        async move { db.entries(0, u32::MAX).await.unwrap().iter().map(|e| (e.index, e.term)).collect::<Vec<_>>() }
    };
    assert_eq!(db.append_entries(&numbered(&ops, |_| 1)).await.unwrap(), (5, 1));
    // Entries already there with the same term are kept, and so is what follows them.
    assert_eq!(db.append_entries(&numbered(&ops[..2], |_| 1)).await.unwrap(), (5, 1));
    assert_eq!(log(&db).await, [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]);
    // From the first entry of another term on, the stored suffix is replaced, past the batch's end too.
    let mut newer = numbered(&ops[..4], |i| if i < 3 { 1 } else { 2 });
    newer.drain(..2);
    assert_eq!(db.append_entries(&newer).await.unwrap(), (4, 2));
    assert_eq!(log(&db).await, [(1, 1), (2, 1), (3, 1), (4, 2)]);
    // More entries than one INSERT carries.
    let many: Vec<Op> = (0..1_000).map(|_| Op::Noop).collect();
    assert_eq!(db.append_entries(&numbered(&many, |i| if i < 3 { 1 } else { 3 })).await.unwrap(), (1_000, 3));
    let stored = log(&db).await;
    assert_eq!(stored.len(), 1_000);
    assert!(stored
        .iter()
        .enumerate()
        .all(|(i, &(index, term))| index == i as u64 + 1 && term == if i < 3 { 1 } else { 3 }));
    // Past the end again, after appends that found entries stored (on SQLite: the one-job append after its
    // fallback rolled back), in several INSERTs.
    let more = numbered(&(0..1_700).map(|_| Op::Noop).collect::<Vec<_>>(), |_| 3).split_off(1_000);
    assert_eq!(db.append_entries(&more).await.unwrap(), (1_700, 3));
    let stored = log(&db).await;
    assert_eq!(stored.len(), 1_700);
    assert!(stored.iter().enumerate().all(|(i, &(index, _))| index == i as u64 + 1));
    // Exactly what was sent, op included.
    assert_eq!(db.entries(1_699, 1).await.unwrap(), more[699..]);
    db.close().await;
});

/// Write `sql` into the database at `url` behind the applier's back: a row no applied entry wrote.
async fn plant(url: &str, sql: &str) {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(url).await.unwrap();
    // Unprepared, so that one call may hold several statements (a migration file).
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned())).execute(&mut conn).await.unwrap();
    conn.close().await.unwrap();
}

/// The send of entry `index` from account 1 to account 2, under client id `c{index}`.
fn a_to_b(index: i64, text: &str) -> Op {
    Op::Send { sender_id: 1, recipient_id: 2, client_id: format!("c{index}"), text: text.into(), at: index }
}

both!(a_batch_meeting_rows_no_entry_wrote_fails_and_stores_nothing, |engine| async move {
    // The batched path skips a send whose client id was stored already, and nothing else: a message or an
    // event already stored under the index being applied means the state and the applied index disagree, and
    // the apply must stop, not skip it, and name the entry (on SQLite the batch's messages are written with
    // INSERT OR ROLLBACK, its events with INSERT OR IGNORE, whose skipped rows are checked).
    let ops = [
        register(1, "a"),
        register(2, "b"),
        a_to_b(3, "three"),
        a_to_b(4, "four"),
        Op::Read { user_id: 2, peer_id: 1, up_to: 4, at: 5 },
    ];
    let entries = numbered(&ops, |_| 1);
    let planted = [
        // Message 4 under another client id: the send of entry 4 meets it by id alone.
        "INSERT INTO messages (id, sender_id, recipient_id, client_id, body, sent_at) \
         VALUES (4, 2, 1, 'planted', 'not from the log', 0)",
        // The sender's receipt of entry 5 (a message's own events are not stored: derived from its row).
        "INSERT INTO events (user_id, idx, body) VALUES (1, 5, '{}')",
    ];
    // The entry that met the row, as the error names it, applying the entries up to the op that meets it,
    // and the whole log: a batch of sends alone (on a SQLite file the writer thread's), and one with a receipt.
    let cases = [(planted[0], 4, "entry 4"), (planted[0], 5, "entry 4"), (planted[1], 5, "the events of entry 5 ")];
    for (sql, up_to, entry) in cases {
        let url = fresh_db(engine).await;
        let db = Db::open(&url).await.unwrap();
        db.append_entries(&entries).await.unwrap();
        assert_eq!(db.apply_committed(2).await.unwrap().0, 2);
        db.close().await;
        plant(&url, sql).await;
        let db = Db::open(&url).await.unwrap();
        let refused = db.apply_committed(up_to).await;
        let refused = refused.expect_err(&format!("{sql}: applied over it")).to_string();
        assert!(refused.contains(entry), "{sql}: {refused}");
        assert_eq!(db.applied_index().await.unwrap(), 2, "{sql}: nothing applied");
        let dump = db.dump().await.unwrap();
        let messages = replichat::storage::dump_section(&dump, "messages");
        assert_eq!(messages.len(), usize::from(sql.contains("planted")), "{sql}: no message stored: {messages:?}");
        db.close().await;
    }
});

/// The users of `dump` whose account is live (not deleted), by id.
fn live_users(dump: &str) -> Vec<i64> {
    // users: id, username, name_key, live_key, password_hash, created_at, deleted_at, ...
    replichat::storage::dump_section(dump, "users")
        .iter()
        .filter(|row| row[6] == "∅")
        .map(|row| row[0].parse().unwrap())
        .collect()
}

/// Every event `db` replays to `user` from cursor 0, page by page as `resume` reads them.
async fn replay(db: &Db, user: i64) -> Vec<ServerBody> {
    let mut all = Vec::new();
    let mut cursor = 0;
    loop {
        let page = db.events_after(user, cursor, 7).await.unwrap();
        let Some(&(last, _)) = page.last() else { return all };
        assert!(page.iter().all(|(index, _)| *index > cursor), "a page holds only events after its cursor");
        cursor = last;
        all.extend(page.into_iter().map(|(_, body)| body));
    }
}

both!(a_replay_from_zero_is_every_event_a_live_user_was_pushed, |engine| async move {
    // A message's events are derived from its row, not stored (a recipient's deletion stores its senders'
    // copies): what `resume` replays must still be exactly what was pushed, in order, with each message as it
    // was when sent (from_deleted false, as PROTOCOL.md promises; a send applied after its sender's deletion
    // was pushed with true).
    for seed in 0..6u64 {
        let mut rng = StdRng::seed_from_u64(100 + seed);
        let entries = numbered(&random_log(&mut rng, 300), |_| 1);
        let db = Db::open(&fresh_db(engine).await).await.unwrap();
        db.append_entries(&entries).await.unwrap();
        let mut pushed = Vec::new();
        let mut applied = 0;
        while applied < entries.len() as u64 {
            let up_to = (applied + rng.gen_range(1..40)).min(entries.len() as u64);
            let (now, caused) = db.apply_committed(up_to).await.unwrap();
            pushed.extend(caused);
            applied = now;
        }
        let dump = db.dump().await.unwrap();
        let users = live_users(&dump);
        assert!(users.len() >= 2, "seed {seed}: live users left: {users:?}");
        let mut messages = 0;
        for user in users {
            let expected: Vec<ServerBody> = pushed
                .iter()
                .filter(|d| d.user_id == user && d.body.index().is_some())
                .map(|d| match d.body.clone() {
                    ServerBody::Message { index, message } => {
                        ServerBody::Message { index, message: Message { from_deleted: false, ..message } }
                    }
                    other => other,
                })
                .collect();
            messages += expected.iter().filter(|b| matches!(b, ServerBody::Message { .. })).count();
            assert_eq!(replay(&db, user).await, expected, "seed {seed}: user {user}");
        }
        assert!(messages > 20, "seed {seed}: only {messages} messages replayed");
        db.close().await;
    }
});

/// A fresh database, at its URL, that applied a random log of 200 ops (from `seed`) in one go; with how many
/// entries it applied and what they pushed.
async fn applied_random_log(engine: Engine, seed: u64) -> (Db, String, u64, Vec<replichat::storage::Delivery>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let entries = numbered(&random_log(&mut rng, 200), |_| 1);
    let url = fresh_db(engine).await;
    let db = Db::open(&url).await.unwrap();
    db.append_entries(&entries).await.unwrap();
    let last = entries.len() as u64;
    let (_, pushed) = db.apply_committed(last).await.unwrap();
    (db, url, last, pushed)
}

both!(migration_0005_removes_the_message_events_an_earlier_version_stored, |engine| async move {
    // Before migration 0005 both events of every message were stored; replayed beside the events derived
    // from the messages now, each message would come twice. The migration removes them, and only them.
    let (db, url, _, pushed) = applied_random_log(engine, 7).await;
    let dump = db.dump().await.unwrap();
    let users = live_users(&dump);
    let mut replays = Vec::new();
    for &user in &users {
        replays.push(replay(&db, user).await);
    }
    let events = replichat::storage::dump_section(&dump, "events").len();
    let stored: std::collections::HashSet<&str> =
        replichat::storage::dump_section(&dump, "messages").iter().map(|row| row[0]).collect();
    db.close().await;

    // The rows an earlier version stored: every message's event for its recipient and its sender, for the
    // messages that still exist (a recipient's deletion removed the others, with the recipient's events).
    let old_rows: Vec<String> = pushed
        .iter()
        .filter(|d| matches!(&d.body, ServerBody::Message { message, .. } if stored.contains(&*message.id.to_string())))
        .map(|d| {
            let json = d.json.as_deref().expect("a stored event is encoded").replace('\'', "''");
            format!("({}, {}, '{json}')", d.user_id, d.body.index().unwrap())
        })
        .collect();
    assert!(old_rows.len() > 40, "{} message events", old_rows.len());
    plant(&url, &format!("INSERT INTO events (user_id, idx, body) VALUES {}", old_rows.join(", "))).await;
    let db = Db::open(&url).await.unwrap();
    let mut twice = false;
    for (user, expected) in users.iter().zip(&replays) {
        twice |= replay(&db, *user).await.len() > expected.len();
    }
    assert!(twice, "the planted rows are replayed beside the derived events");
    db.close().await;

    plant(&url, include_str!("../../../migrations/0005_message_events_derived.sql")).await;
    let db = Db::open(&url).await.unwrap();
    for (user, expected) in users.iter().zip(&replays) {
        assert_eq!(&replay(&db, *user).await, expected, "user {user}: replayed as before");
    }
    let dump = db.dump().await.unwrap();
    assert_eq!(replichat::storage::dump_section(&dump, "events").len(), events, "every other event kept");
    db.close().await;
});

both!(migration_0006_keeps_every_message_and_drops_only_the_client_id_key, |engine| async move {
    // 0006 rebuilds `messages` without UNIQUE (sender_id, client_id): the applier's in-memory map decides a
    // repeated client id since. Rebuilt, the table holds the same rows and both per-user indexes, and a
    // retry of a message stored before the migration still stores nothing.
    let (db, url, last, _) = applied_random_log(engine, 11).await;
    let before = db.dump().await.unwrap();
    db.close().await;
    // The table as migrations 0001-0005 left it, with the rows it holds now.
    plant(
        &url,
        "CREATE TABLE messages_old (id BIGINT PRIMARY KEY, sender_id BIGINT NOT NULL, recipient_id BIGINT NOT NULL, \
         client_id TEXT NOT NULL, body TEXT NOT NULL, sent_at BIGINT NOT NULL, delivered_at BIGINT, read_at BIGINT, \
         UNIQUE (sender_id, client_id))",
    )
    .await;
    for sql in [
        "INSERT INTO messages_old SELECT id, sender_id, recipient_id, client_id, body, sent_at, delivered_at, read_at \
         FROM messages",
        "DROP TABLE messages",
        "ALTER TABLE messages_old RENAME TO messages",
        "CREATE INDEX messages_by_recipient ON messages (recipient_id, id)",
        "CREATE INDEX messages_by_sender ON messages (sender_id, id)",
    ] {
        plant(&url, sql).await;
    }
    let (sender, recipient, client_id, id): (i64, i64, String, i64) = {
        let rows = replichat::storage::dump_section(&before, "messages");
        let row = rows.last().expect("the log stored messages");
        (row[1].parse().unwrap(), row[2].parse().unwrap(), row[3].to_owned(), row[0].parse().unwrap())
    };
    let duplicate = format!(
        "INSERT INTO messages (id, sender_id, recipient_id, client_id, body, sent_at) \
         VALUES (100000, {sender}, {recipient}, '{client_id}', 'again', 0)"
    );
    let mut conn = {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        sqlx::AnyConnection::connect(&url).await.unwrap()
    };
    let refused = sqlx::query(sqlx::AssertSqlSafe(duplicate.clone())).execute(&mut conn).await;
    assert!(refused.is_err(), "before 0006 the key refuses a repeated client id");
    drop(conn);

    plant(&url, include_str!("../../../migrations/0006_messages_without_client_id_index.sql")).await;
    let db = Db::open(&url).await.unwrap();
    assert_eq!(db.dump().await.unwrap(), before, "the same rows after the rebuild");
    // A retry of the newest message (its sender may since have been deleted: the map decides all the same).
    let retry = Op::Send {
        sender_id: sender,
        recipient_id: recipient,
        client_id: client_id.clone(),
        text: "a retry".into(),
        at: 1,
    };
    db.append_entries(&[replichat::storage::Entry { index: last + 1, term: 1, op: retry.to_json() }]).await.unwrap();
    let (_, caused) = db.apply_committed(last + 1).await.unwrap();
    assert!(caused.is_empty(), "a retry of message {id} stores and pushes nothing: {caused:?}");
    let stored = replichat::storage::dump_section(&db.dump().await.unwrap(), "messages").len();
    assert_eq!(stored, replichat::storage::dump_section(&before, "messages").len(), "nothing stored");
    db.close().await;
    // And the key is gone: the same (sender, client id) twice is for the applier to refuse, not the table.
    plant(&url, &duplicate).await;
});
