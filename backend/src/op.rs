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
    /// Every session of an account revoked ("log out everywhere").
    LogoutAll { user_id: i64 },
    /// A wrong password for the account (at `login` or `delete_account`): counts toward its login delay.
    LoginFailed { user_id: i64, at: i64 },
    /// A session was used (resumed) at `at`: it renews the idle timeout. Recorded at most once a day.
    Touch { token_hash: String, at: i64 },
    /// The account's last open socket closed at `at` (on the primary, which chose the time): it was last
    /// seen then. Recorded once per "went offline", never per message.
    Seen { user_id: i64, at: i64 },
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

impl Op {
    /// Whether the op is one a replica may apply: the rules validation holds every request to, checked
    /// again on what comes out of the log, so an entry written by a buggy or foreign node is refused the same
    /// way on every engine instead of failing on one and succeeding on another.
    pub fn check(&self) -> Result<(), String> {
        let texts: &[&str] = match self {
            Op::Register { username, password_hash, token_hash, .. } => &[username, password_hash, token_hash],
            Op::Login { token_hash, .. } | Op::Logout { token_hash } | Op::Touch { token_hash, .. } => &[token_hash],
            Op::Send { client_id, text, .. } => {
                if text.chars().count() > replichat_shared::MAX_TEXT_CHARS {
                    return Err("message text over the length limit".to_owned());
                }
                if client_id.is_empty() || client_id.chars().count() > replichat_shared::MAX_CLIENT_ID_CHARS {
                    return Err("client_id outside its length limits".to_owned());
                }
                &[client_id, text]
            }
            Op::Delivered { .. }
            | Op::Read { .. }
            | Op::DeleteAccount { .. }
            | Op::LogoutAll { .. }
            | Op::LoginFailed { .. }
            | Op::Seen { .. }
            | Op::Noop => &[],
        };
        if texts.iter().any(|t| t.contains('\0')) {
            return Err("text containing U+0000, which PostgreSQL cannot store".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_with_nul_or_oversized_text_are_refused() {
        let send = |text: &str, client_id: &str| Op::Send {
            sender_id: 1,
            recipient_id: 2,
            client_id: client_id.into(),
            text: text.into(),
            at: 0,
        };
        assert!(send("hello 😀", "c").check().is_ok());
        assert!(send("x\0y", "c").check().is_err());
        assert!(send("x", "c\0").check().is_err());
        assert!(send("x", "").check().is_err());
        assert!(send(&"x".repeat(replichat_shared::MAX_TEXT_CHARS + 1), "c").check().is_err());
        assert!(Op::Logout { token_hash: "\0".into() }.check().is_err());
        assert!(Op::Noop.check().is_ok());
    }
}
