//! The in-memory index of live names a `send` resolves its recipient with: it never answers with an account
//! the database no longer has under that name.

use replichat::op::Op;
use replichat::storage::Db;

use crate::both;
use crate::util::entries::{numbered, register};
use crate::util::*;

/// A fresh database holding `ops` as entries 1, 2, ..., all applied.
async fn applied(engine: Engine, ops: &[Op]) -> Db {
    let db = Db::open(&fresh_db(engine).await).await.unwrap();
    let entries = numbered(ops, |_| 1);
    db.append_entries(&entries).await.unwrap();
    db.apply_committed(entries.len() as u64).await.unwrap();
    db
}

both!(a_deleted_account_leaves_the_name_index_when_its_deletion_is_applied, |engine| async move {
    let mut ops = vec![register(1, "ann"), register(2, "Bob")];
    let db = applied(engine, &ops).await;
    // Read once from the database, then from the index.
    assert_eq!(db.live_user_id("bob").await.unwrap(), Some(2));
    assert_eq!(db.live_user_id("BOB").await.unwrap(), Some(2));
    ops.push(Op::DeleteAccount { user_id: 2, at: 3 });
    db.append_entries(&numbered(&ops, |_| 1)[2..]).await.unwrap();
    db.apply_committed(3).await.unwrap();
    assert_eq!(db.live_user_id("bob").await.unwrap(), None, "the deleted account is not found");
    // The name is free again, for a new account with a new id.
    ops.push(register(4, "bob"));
    db.append_entries(&numbered(&ops, |_| 1)[3..]).await.unwrap();
    db.apply_committed(4).await.unwrap();
    assert_eq!(db.live_user_id("Bob").await.unwrap(), Some(4));
    db.close().await;
});

both!(an_installed_snapshot_empties_the_name_index, |engine| async move {
    let db = applied(engine, &[register(1, "ann"), register(2, "bob")]).await;
    assert_eq!(db.live_user_id("bob").await.unwrap(), Some(2));
    // Another replica's state, where bob is account 3 and ann does not exist.
    let other = applied(engine, &[Op::Noop, register(2, "cat"), register(3, "bob")]).await;
    db.install_snapshot(&other.snapshot().await.unwrap()).await.unwrap();
    assert_eq!(db.live_user_id("bob").await.unwrap(), Some(3));
    assert_eq!(db.live_user_id("ann").await.unwrap(), None);
    assert_eq!(db.live_user_id("cat").await.unwrap(), Some(2));
    db.close().await;
    other.close().await;
});

both!(a_rolled_back_apply_leaves_the_name_index_true, |engine| async move {
    let db = applied(engine, &[register(1, "ann"), register(2, "bob")]).await;
    assert_eq!(db.live_user_id("bob").await.unwrap(), Some(2));
    // bob's deletion and a new account, in one apply with an entry no replica may apply: all rolled back.
    let poison = Op::Send { sender_id: 1, recipient_id: 2, client_id: "k".into(), text: "x\u{0}y".into(), at: 5 };
    let ops =
        [register(1, "ann"), register(2, "bob"), Op::DeleteAccount { user_id: 2, at: 3 }, register(4, "dan"), poison];
    db.append_entries(&numbered(&ops, |_| 1)[2..]).await.unwrap();
    let failed = db.apply_committed(5).await.unwrap_err();
    assert!(failed.to_string().contains("entry 5"), "{failed}");
    assert_eq!(db.applied_index().await.unwrap(), 2, "nothing of the batch applied");
    assert_eq!(db.live_user_id("bob").await.unwrap(), Some(2), "bob's deletion was rolled back");
    assert_eq!(db.live_user_id("dan").await.unwrap(), None, "dan's registration was rolled back");
    // Applied without the poison, the deletion and the registration show.
    db.apply_committed(4).await.unwrap();
    assert_eq!(db.live_user_id("bob").await.unwrap(), None);
    assert_eq!(db.live_user_id("dan").await.unwrap(), Some(4));
    db.close().await;
});
