//! The applier's cache of the accounts its sends name (their names and whether deleted): a message event
//! never shows its sender or recipient as they no longer are.

use replichat::op::Op;
use replichat::storage::{Db, Delivery};
use replichat_shared::{Message, ServerBody};

use crate::both;
use crate::util::entries::{numbered, register};
use crate::util::*;

fn send(sender_id: i64, recipient_id: i64, client_id: &str) -> Op {
    Op::Send { sender_id, recipient_id, client_id: client_id.into(), text: "hi".into(), at: 7 }
}

/// Append `ops` to `log` as its next entries (term 1), and apply up to the last one.
async fn apply_after(db: &Db, log: &mut Vec<Op>, ops: Vec<Op>) -> Vec<Delivery> {
    let from = log.len();
    log.extend(ops);
    db.append_entries(&numbered(log, |_| 1)[from..]).await.unwrap();
    db.apply_committed(log.len() as u64).await.unwrap().1
}

/// The message the entry at `index` stored, as its recipient was pushed it.
fn message(deliveries: &[Delivery], index: u64) -> Message {
    deliveries
        .iter()
        .find_map(|d| match &d.body {
            ServerBody::Message { index: i, message } if *i == index => Some(message.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no message {index} in {deliveries:?}"))
}

both!(a_send_applied_after_its_senders_deletion_shows_the_sender_deleted, |engine| async move {
    let db = Db::open(&fresh_db(engine).await).await.unwrap();
    let mut log = Vec::new();
    // ann writes to bob: the applier learns both accounts, live.
    let first = apply_after(&db, &mut log, vec![register(1, "ann"), register(2, "bob"), send(1, 2, "a")]).await;
    assert!(!message(&first, 3).from_deleted);
    // ann deletes her account; a send she made before it was applied (proposed earlier) comes after.
    let later = apply_after(&db, &mut log, vec![Op::DeleteAccount { user_id: 1, at: 8 }, send(1, 2, "b")]).await;
    assert!(message(&later, 5).from_deleted, "a later apply sees the deletion");
    db.close().await;
});

both!(a_deletion_in_the_middle_of_a_batch_is_seen_by_the_sends_after_it, |engine| async move {
    let db = Db::open(&fresh_db(engine).await).await.unwrap();
    let mut log = Vec::new();
    apply_after(&db, &mut log, vec![register(1, "ann"), register(2, "bob")]).await;
    // One apply: a send (the applier learns ann, live), ann's deletion, and another send of hers.
    let ops = vec![send(1, 2, "a"), Op::DeleteAccount { user_id: 1, at: 8 }, send(1, 2, "b")];
    let deliveries = apply_after(&db, &mut log, ops).await;
    assert!(!message(&deliveries, 3).from_deleted);
    assert!(message(&deliveries, 5).from_deleted, "the send after the deletion, in the same apply");
    db.close().await;
});

both!(an_installed_snapshot_renames_the_accounts_the_applier_knew, |engine| async move {
    let db = Db::open(&fresh_db(engine).await).await.unwrap();
    let mut log = Vec::new();
    apply_after(&db, &mut log, vec![register(1, "ann"), register(2, "bob"), send(1, 2, "a")]).await;
    // Another replica's state, where account 1 is zed (and 2 is yan).
    let other = Db::open(&fresh_db(engine).await).await.unwrap();
    let mut other_log = Vec::new();
    apply_after(&other, &mut other_log, vec![register(1, "zed"), register(2, "yan"), Op::Noop]).await;
    db.install_snapshot(&other.snapshot().await.unwrap()).await.unwrap();
    // The next entry, as the other replica's primary ships it.
    other_log.push(send(1, 2, "b"));
    db.append_entries(&numbered(&other_log, |_| 1)[3..]).await.unwrap();
    let (_, deliveries) = db.apply_committed(4).await.unwrap();
    let sent = message(&deliveries, 4);
    assert_eq!((sent.from.as_str(), sent.to.as_str()), ("zed", "yan"), "the installed state's names");
    db.close().await;
    other.close().await;
});
