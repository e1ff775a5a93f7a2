//! The state machine: applies committed log entries to the state tables, in one transaction with the applied
//! index, reading nothing but the database and the op.

use replichat_shared::{ReceiptKind, ServerBody, SessionEnd};
use sqlx::{AnyConnection, Connection, Row};

use super::queries::{contacts, message_from_row, MESSAGE_SELECT};
use super::{get_meta, set_meta, Db, Delivery};
use crate::op::Op;
use crate::wildcard::name_key;
use crate::{Error, Result};

impl Db {
    /// The highest index applied to the state tables.
    pub async fn applied_index(&self) -> Result<u64> {
        Ok(self.meta("applied_index").await?.unwrap_or(0) as u64)
    }

    /// Apply the entries after the applied index up to `up_to` (committed ones only), in one transaction.
    /// Returns the new applied index and the events the entries caused, in index order.
    pub async fn apply_committed(&self, up_to: u64) -> Result<(u64, Vec<Delivery>)> {
        let mut conn = self.transaction_connection().await?;
        let mut tx = conn.begin_with(self.begin_write()).await?;
        let applied = get_meta(&mut *tx, "applied_index").await?.unwrap_or(0);
        let rows = sqlx::query("SELECT idx, op FROM log WHERE idx > $1 AND idx <= $2 ORDER BY idx")
            .bind(applied)
            .bind(up_to as i64)
            .fetch_all(&mut *tx)
            .await?;
        let mut deliveries = Vec::new();
        let mut last = applied;
        let mut messages = 0;
        for row in rows {
            let index: i64 = row.try_get("idx")?;
            if index != last + 1 {
                return Err(Error::Corrupt(format!("log gap: entry {index} follows applied {last}")));
            }
            let op: String = row.try_get("op")?;
            let unapplicable = |reason: String| Error::Unapplicable { index: index as u64, reason };
            let op: Op = serde_json::from_str(&op).map_err(|e| unapplicable(format!("not an op: {e}")))?;
            op.check().map_err(unapplicable)?;
            // The same op fails the same way on every retry when the data is at fault; say which entry.
            let caused = match apply(&mut tx, index, &op).await {
                Ok(caused) => caused,
                Err(e) if e.is_deterministic() => return Err(unapplicable(e.to_string())),
                Err(e) => return Err(e),
            };
            // A send that stored its message causes its pushes; a duplicate stores and causes nothing.
            if matches!(op, Op::Send { .. }) && !caused.is_empty() {
                messages += 1;
            }
            // Live-only frames (`session_ended`) are pushed, never stored or replayed.
            for d in caused.iter().filter(|d| d.body.index().is_some()) {
                let body = serde_json::to_string(&d.body).map_err(|e| Error::Corrupt(e.to_string()))?;
                sqlx::query("INSERT INTO events (user_id, idx, body) VALUES ($1, $2, $3)")
                    .bind(d.user_id)
                    .bind(index)
                    .bind(body)
                    .execute(&mut *tx)
                    .await?;
            }
            deliveries.extend(caused);
            last = index;
        }
        if last != applied {
            set_meta(&mut tx, "applied_index", last).await?;
        }
        tx.commit().await?;
        conn.finished();
        crate::metrics::messages_stored(messages);
        Ok((last as u64, deliveries))
    }
}

/// Apply one committed op inside the applying transaction: the chat state machine.
async fn apply(tx: &mut AnyConnection, index: i64, op: &Op) -> Result<Vec<Delivery>> {
    match op {
        Op::Register { user_id, username, password_hash, token_hash, at, skeleton } => {
            let key = name_key(username);
            let skeleton = skeleton.clone().unwrap_or_else(|| crate::username::skeleton(username));
            sqlx::query(
                "INSERT INTO users (id, username, name_key, live_key, password_hash, created_at, skeleton) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(user_id)
            .bind(username)
            .bind(&key)
            .bind(&key)
            .bind(password_hash)
            .bind(at)
            .bind(skeleton)
            .execute(&mut *tx)
            .await?;
            insert_session(tx, token_hash, *user_id, *at).await?;
            Ok(Vec::new())
        }
        Op::Login { user_id, token_hash, at } => {
            insert_session(tx, token_hash, *user_id, *at).await?;
            sqlx::query("DELETE FROM login_failures WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
            Ok(Vec::new())
        }
        Op::LoginFailed { user_id, at } => {
            // Failures further apart than the throttle forgets start the count again.
            sqlx::query(
                "INSERT INTO login_failures (user_id, failures, last_failure_at) VALUES ($1, 1, $2) \
                 ON CONFLICT (user_id) DO UPDATE SET \
                 failures = CASE WHEN $2 - login_failures.last_failure_at > $3 THEN 1 \
                 ELSE login_failures.failures + 1 END, last_failure_at = $2",
            )
            .bind(user_id)
            .bind(at)
            .bind(crate::throttle::FORGET_AFTER.as_millis() as i64)
            .execute(&mut *tx)
            .await?;
            Ok(Vec::new())
        }
        Op::Logout { token_hash } => {
            let row = sqlx::query("DELETE FROM sessions WHERE token_hash = $1 RETURNING user_id")
                .bind(token_hash)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(row) = row else { return Ok(Vec::new()) };
            Ok(vec![Delivery {
                user_id: row.try_get("user_id")?,
                body: ServerBody::SessionEnded { reason: SessionEnd::LoggedOut },
                session: Some(token_hash.clone()),
            }])
        }
        Op::LogoutAll { user_id } => {
            sqlx::query("DELETE FROM sessions WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
            Ok(vec![Delivery {
                user_id: *user_id,
                body: ServerBody::SessionEnded { reason: SessionEnd::LoggedOutEverywhere },
                session: None,
            }])
        }
        Op::Touch { token_hash, at } => {
            // Touches may be proposed concurrently and land in any order: keep the latest.
            sqlx::query(
                "UPDATE sessions SET last_used_at = $2 \
                 WHERE token_hash = $1 AND (last_used_at IS NULL OR last_used_at < $2)",
            )
            .bind(token_hash)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            Ok(Vec::new())
        }
        Op::Send { sender_id, recipient_id, client_id, text, at } => {
            let message_id = index;
            // A second send with the same client id (a retry that reached a new primary before it applied the
            // original) stores nothing and causes nothing, identically on every replica.
            let inserted = sqlx::query(
                "INSERT INTO messages (id, sender_id, recipient_id, client_id, body, sent_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (sender_id, client_id) DO NOTHING",
            )
            .bind(message_id)
            .bind(sender_id)
            .bind(recipient_id)
            .bind(client_id)
            .bind(text)
            .bind(at)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                return Ok(Vec::new());
            }
            let sql = format!("{MESSAGE_SELECT} WHERE m.id = $1");
            let message = message_from_row(&sqlx::query(&sql).bind(message_id).fetch_one(&mut *tx).await?)?;
            let body = ServerBody::Message { index: index as u64, message };
            Ok(vec![
                Delivery { user_id: *recipient_id, body: body.clone(), session: None },
                Delivery { user_id: *sender_id, body, session: None },
            ])
        }
        Op::Delivered { user_id, up_to, at } => {
            let by = username_of(tx, *user_id).await?;
            let rows = sqlx::query(
                "SELECT sender_id, MAX(id) AS up_to FROM messages \
                 WHERE recipient_id = $1 AND id <= $2 AND delivered_at IS NULL GROUP BY sender_id ORDER BY sender_id",
            )
            .bind(user_id)
            .bind(up_to)
            .fetch_all(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE messages SET delivered_at = $3 WHERE recipient_id = $1 AND id <= $2 AND delivered_at IS NULL",
            )
            .bind(user_id)
            .bind(up_to)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            rows.iter()
                .map(|row| {
                    Ok(Delivery {
                        user_id: row.try_get("sender_id")?,
                        body: ServerBody::Receipt {
                            index: index as u64,
                            kind: ReceiptKind::Delivered,
                            by: by.clone(),
                            up_to: row.try_get::<i64, _>("up_to")? as u64,
                            at: *at,
                        },
                        session: None,
                    })
                })
                .collect()
        }
        Op::Read { user_id, peer_id, up_to, at } => {
            let row = sqlx::query(
                "SELECT MAX(id) AS up_to FROM messages \
                 WHERE recipient_id = $1 AND sender_id = $2 AND id <= $3 AND read_at IS NULL",
            )
            .bind(user_id)
            .bind(peer_id)
            .bind(up_to)
            .fetch_one(&mut *tx)
            .await?;
            let Some(covered) = row.try_get::<Option<i64>, _>("up_to")? else {
                return Ok(Vec::new());
            };
            sqlx::query(
                "UPDATE messages SET read_at = $4, delivered_at = COALESCE(delivered_at, $4) \
                 WHERE recipient_id = $1 AND sender_id = $2 AND id <= $3 AND read_at IS NULL",
            )
            .bind(user_id)
            .bind(peer_id)
            .bind(up_to)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            let by = username_of(tx, *user_id).await?;
            Ok(vec![Delivery {
                user_id: *peer_id,
                body: ServerBody::Receipt {
                    index: index as u64,
                    kind: ReceiptKind::Read,
                    by,
                    up_to: covered as u64,
                    at: *at,
                },
                session: None,
            }])
        }
        Op::Noop => Ok(Vec::new()),
        Op::DeleteAccount { user_id, at } => {
            let username = username_of(tx, *user_id).await?;
            let peers = contacts(&mut *tx, *user_id).await?;
            for sql in [
                "DELETE FROM messages WHERE recipient_id = $1",
                "DELETE FROM sessions WHERE user_id = $1",
                "DELETE FROM events WHERE user_id = $1",
                "DELETE FROM login_failures WHERE user_id = $1",
            ] {
                sqlx::query(sql).bind(user_id).execute(&mut *tx).await?;
            }
            sqlx::query("UPDATE users SET live_key = NULL, password_hash = NULL, deleted_at = $2 WHERE id = $1")
                .bind(user_id)
                .bind(at)
                .execute(&mut *tx)
                .await?;
            Ok(peers
                .into_iter()
                .map(|peer| Delivery {
                    user_id: peer,
                    body: ServerBody::PeerDeleted { index: index as u64, username: username.clone() },
                    session: None,
                })
                .collect())
        }
    }
}

async fn insert_session(tx: &mut AnyConnection, token_hash: &str, user_id: i64, at: i64) -> Result<()> {
    sqlx::query("INSERT INTO sessions (token_hash, user_id, created_at) VALUES ($1, $2, $3)")
        .bind(token_hash)
        .bind(user_id)
        .bind(at)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

async fn username_of(tx: &mut AnyConnection, user_id: i64) -> Result<String> {
    let row = sqlx::query("SELECT username FROM users WHERE id = $1").bind(user_id).fetch_one(&mut *tx).await?;
    Ok(row.try_get("username")?)
}
