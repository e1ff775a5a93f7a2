//! The operations stored in the log: what a node decided when it accepted a request.
//!
//! An op carries every id, timestamp and hash its effect needs, so applying it is a pure function of the
//! database and the op: no clock, no randomness. Ids are the log index of the entry that created the row.
//! The JSON form of an op is what the `log` table stores and what replicas ship; never change the meaning
//! of an existing variant, add new ones.

use serde::{Deserialize, Serialize};

/// One state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// A new account, logged in with a first session. `skeleton` is the name's confusable skeleton as the
    /// accepting node computed it (so every replica stores the same, whatever its Unicode tables); entries
    /// written before it existed have none, and the applier computes it.
    Register {
        user_id: i64,
        username: String,
        password_hash: String,
        token_hash: String,
        at: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        skeleton: Option<String>,
    },
    /// A new session for an existing account.
    Login { user_id: i64, token_hash: String, at: i64 },
    /// A session revoked.
    Logout { token_hash: String },
    /// A message stored. Its id is the index of the entry (sends are proposed concurrently, so the node
    /// learns the index only when the entry is appended; the index is part of the entry, so applying stays
    /// deterministic).
    Send { sender_id: i64, recipient_id: i64, client_id: String, text: String, at: i64 },
    /// The recipient's device got every message to them with an id up to `up_to`.
    Delivered { user_id: i64, up_to: i64, at: i64 },
    /// The recipient read every message from `peer_id` with an id up to `up_to`.
    Read { user_id: i64, peer_id: i64, up_to: i64, at: i64 },
    /// An account deleted: sessions and received messages removed, sent messages kept, username freed.
    DeleteAccount { user_id: i64, at: i64 },
    /// Nothing: the entry a new primary appends at the start of its term, so that committing it commits
    /// every earlier entry too (a primary only counts replicas for entries of its own term).
    Noop,
}

impl Op {
    /// The JSON stored in the log and shipped to replicas.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("an op always serialises")
    }
}
