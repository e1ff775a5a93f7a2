//! The applier's batched path (a run of sends applied with a few statements for the whole run) gives exactly
//! what applying every op on its own gives: the same tables, the same events, the same pushes.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use replichat::op::Op;
use replichat::storage::Db;

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

both!(batched_apply_equals_applying_op_by_op_on_random_logs, |engine| async move {
    let mut with_deletions = 0;
    for seed in 0..12u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let entries = numbered(&random_log(&mut rng, 300), |_| 1);
        let last = entries.len() as u64;
        let batched = Db::open(&fresh_db(engine).await).await.unwrap();
        let one_by_one = Db::open(&fresh_db(engine).await).await.unwrap();
        batched.append_entries(&entries).await.unwrap();
        one_by_one.append_entries(&entries).await.unwrap();
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
        let dump = batched.dump().await.unwrap();
        let reference = one_by_one.dump().await.unwrap();
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
    }
    assert!(with_deletions >= 6, "only {with_deletions} of 12 logs delete an account");
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
