//! Log entries written by hand, for tests that need a log no replica would write (included with `#[path]`).

use replichat::op::Op;
use replichat::storage::Entry;

/// The registration of `name` as account `user_id`, with a stub password hash, as entries written before
/// skeletons were carried (the applier computes it).
pub fn register(user_id: i64, name: &str) -> Op {
    Op::Register {
        user_id,
        username: name.into(),
        password_hash: "$argon2id$stub".into(),
        token_hash: format!("token-{name}"),
        at: 1,
        skeleton: None,
    }
}

/// `ops` as entries 1, 2, ..., entry `i` (from 0) in term `term(i)`.
pub fn numbered(ops: &[Op], term: impl Fn(usize) -> u64) -> Vec<Entry> {
    ops.iter().enumerate().map(|(i, op)| Entry { index: i as u64 + 1, term: term(i), op: op.to_json() }).collect()
}

/// Accounts 1 (`a`) and 2 (`b`), then a message holding U+0000, which PostgreSQL cannot store: entry 3 is one
/// no replica may apply.
pub fn poisoned() -> Vec<Entry> {
    let poison = Op::Send { sender_id: 1, recipient_id: 2, client_id: "k".into(), text: "x\u{0}y".into(), at: 2 };
    numbered(&[register(1, "a"), register(2, "b"), poison], |_| 1)
}
