//! The read queries the chat serves (accounts, sessions, history, backlogs, conversations) and the canonical
//! dump that compares replicas.

use replichat_shared::{Conversation, Message, ServerBody};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AssertSqlSafe, Row};

use super::{composed, Backend, Db, User};
use crate::wildcard::{name_key, Pattern};
use crate::{Error, Result};

/// The columns every message query selects, joined with both users' names.
pub(super) const MESSAGE_SELECT: &str =
    "SELECT m.id, m.sender_id, s.username AS sender, r.username AS recipient, m.body, m.client_id, \
     m.sent_at, m.delivered_at, m.read_at, s.deleted_at AS sender_deleted \
     FROM messages m JOIN users s ON s.id = m.sender_id JOIN users r ON r.id = m.recipient_id";

/// [`Db::events_after`]: `$1` the user, `$2` the cursor, `$3` the limit. The stored events (their JSON in
/// `event`) and the messages the user received and sent ([`MESSAGE_SELECT`]'s columns, `event` NULL), each part
/// limited on its own index range ((user_id, idx), (recipient_id, id), (sender_id, id)), so a page reads at
/// most three pages' worth of rows however long the account's history; the columns a part lacks are typed NULLs.
fn events_after_sql() -> &'static str {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let messages = |side: &str| {
            format!(
                "SELECT CAST(NULL AS TEXT) AS event, {side}.* FROM ({MESSAGE_SELECT} \
                 WHERE m.{side}_id = $1 AND m.id > $2 ORDER BY m.id LIMIT $3) AS {side}"
            )
        };
        format!(
            "SELECT * FROM ( \
               SELECT * FROM (SELECT body AS event, idx AS id, CAST(NULL AS BIGINT) AS sender_id, \
                 CAST(NULL AS TEXT) AS sender, CAST(NULL AS TEXT) AS recipient, CAST(NULL AS TEXT) AS body, \
                 CAST(NULL AS TEXT) AS client_id, CAST(NULL AS BIGINT) AS sent_at, \
                 CAST(NULL AS BIGINT) AS delivered_at, CAST(NULL AS BIGINT) AS read_at, \
                 CAST(NULL AS BIGINT) AS sender_deleted \
                 FROM events WHERE user_id = $1 AND idx > $2 ORDER BY idx LIMIT $3) AS stored \
               UNION ALL {} UNION ALL {} \
             ) AS t ORDER BY id LIMIT $3",
            messages("recipient"),
            messages("sender")
        )
    });
    &SQL
}

impl Db {
    /// The live account with this username (ignoring case).
    pub async fn user_by_name(&self, username: &str) -> Result<Option<User>> {
        let row = sqlx::query("SELECT id, username, password_hash FROM users WHERE live_key = $1")
            .bind(name_key(username))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// The id of the live account with this username (ignoring case), from the in-memory index of live
    /// accounts when it has the name ([`super::NameIndex`]), else from the database (and then cached).
    pub async fn live_user_id(&self, username: &str) -> Result<Option<i64>> {
        let key = name_key(username);
        let generation = match self.names.get(&key) {
            Ok(id) => return Ok(Some(id)),
            Err(generation) => generation,
        };
        let row = sqlx::query("SELECT id FROM users WHERE live_key = $1").bind(&key).fetch_optional(&self.pool).await?;
        let Some(row) = row else { return Ok(None) };
        let id: i64 = row.try_get("id")?;
        self.names.fill(generation, key, id);
        Ok(Some(id))
    }

    /// Whether a live account has this confusable skeleton (see [`crate::username`]).
    pub async fn skeleton_taken(&self, skeleton: &str) -> Result<bool> {
        let row = sqlx::query("SELECT 1 FROM users WHERE skeleton = $1 AND live_key IS NOT NULL LIMIT 1")
            .bind(skeleton)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// The account with this id, live or deleted.
    pub async fn user_by_id(&self, id: i64) -> Result<Option<User>> {
        let row = sqlx::query("SELECT id, username, password_hash FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// The conversation partner `me` means by `username`: the live account with that name, else the most
    /// recently deleted account of that name that `me` has messages from.
    pub async fn peer_by_name(&self, me: i64, username: &str) -> Result<Option<User>> {
        if let Some(user) = self.user_by_name(username).await? {
            return Ok(Some(user));
        }
        let row = sqlx::query(
            "SELECT u.id, u.username, u.password_hash FROM users u \
             WHERE u.name_key = $1 AND u.deleted_at IS NOT NULL \
             AND EXISTS (SELECT 1 FROM messages m WHERE m.sender_id = u.id AND m.recipient_id = $2) \
             ORDER BY u.deleted_at DESC, u.id DESC LIMIT 1",
        )
        .bind(name_key(username))
        .bind(me)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    /// The account a session token (by its hash) belongs to, and when the session was last used (created,
    /// or last touched), if the session exists.
    pub async fn session_by_token(&self, token_hash: &str) -> Result<Option<(User, i64)>> {
        let row = sqlx::query(
            "SELECT u.id, u.username, u.password_hash, COALESCE(s.last_used_at, s.created_at) AS used \
             FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(|row| Ok((user_from_row(row)?, row.try_get::<i64, _>("used")?))).transpose()
    }

    /// The account's consecutive failed password checks and when the last one was (ms since the epoch).
    pub async fn login_failures(&self, user_id: i64) -> Result<Option<(u32, i64)>> {
        let row = sqlx::query("SELECT failures, last_failure_at FROM login_failures WHERE user_id = $1")
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| {
            Ok((row.try_get::<i64, _>("failures")?.clamp(0, u32::MAX as i64) as u32, row.try_get("last_failure_at")?))
        })
        .transpose()
    }

    /// The message `sender_id` already stored under `client_id`, if any (idempotent sends).
    ///
    /// The applier's client-id map ([`super::client_ids`]) names the candidates while it is loaded (it holds
    /// every committed message, perhaps with some that are gone); only their rows are read. Before its first
    /// load, or right after a snapshot install, the sender's messages are searched instead.
    pub async fn message_by_client_id(&self, sender_id: i64, client_id: &str) -> Result<Option<Message>> {
        let row = match self.client_ids.candidates(sender_id, client_id) {
            Some(candidates) if candidates.is_empty() => return Ok(None),
            Some(candidates) => {
                let mut conn = self.pool.acquire().await?;
                stored_under(&mut conn, self.backend, &candidates, sender_id, client_id).await?
            }
            None => {
                let sql = format!("{MESSAGE_SELECT} WHERE m.sender_id = $1 AND m.client_id = $2");
                sqlx::query(composed(sql)).bind(sender_id).bind(client_id).fetch_optional(&self.pool).await?
            }
        };
        row.as_ref().map(message_from_row).transpose()
    }

    /// Live usernames matching `pattern` whose key sorts after `after`, sorted by key; at most `limit`.
    pub async fn list_users(&self, pattern: &Pattern, after: Option<&str>, limit: u32) -> Result<Vec<String>> {
        let after = after.map(name_key).unwrap_or_default();
        let collate = self.binary_collation();
        let (filter, arg) = match pattern {
            Pattern::All => ("", None),
            Pattern::Exact(key) => ("AND live_key = $3", Some(key.clone())),
            Pattern::Like(like) => ("AND live_key LIKE $3 ESCAPE '\\'", Some(like.clone())),
        };
        let sql = format!(
            "SELECT username FROM users WHERE live_key IS NOT NULL AND live_key {collate} > $1 {filter} \
             ORDER BY live_key {collate} LIMIT $2"
        );
        let mut query = sqlx::query(composed(sql)).bind(after).bind(limit as i64);
        if let Some(arg) = arg {
            query = query.bind(arg);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(|r| Ok(r.try_get("username")?)).collect()
    }

    /// Up to `limit` messages between `me` and `peer` with an id below `before`, newest first.
    pub async fn history(&self, me: i64, peer: i64, before: Option<u64>, limit: u32) -> Result<Vec<Message>> {
        let sql = format!(
            "{MESSAGE_SELECT} WHERE ((m.sender_id = $1 AND m.recipient_id = $2) \
             OR (m.sender_id = $2 AND m.recipient_id = $1)) AND m.id < $3 ORDER BY m.id DESC LIMIT $4"
        );
        let rows = sqlx::query(composed(sql))
            .bind(me)
            .bind(peer)
            .bind(before.map_or(i64::MAX, |b| b.min(i64::MAX as u64) as i64))
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(message_from_row).collect()
    }

    /// Messages addressed to `me` with an id in `after + 1 ..= up_to` that no session of theirs acknowledged
    /// as delivered, oldest first, at most `limit` of them (one page of a `login` backlog).
    pub async fn undelivered(&self, me: i64, after: i64, up_to: i64, limit: u32) -> Result<Vec<Message>> {
        let sql = format!(
            "{MESSAGE_SELECT} WHERE m.recipient_id = $1 AND m.delivered_at IS NULL AND m.id > $2 AND m.id <= $3 \
             ORDER BY m.id LIMIT $4"
        );
        let rows = sqlx::query(composed(sql))
            .bind(me)
            .bind(after)
            .bind(up_to)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(message_from_row).collect()
    }

    /// Whether any message to `me` (from `from`, if given) with an id up to `up_to` still lacks the receipt
    /// (`read` or delivered).
    pub async fn has_unacknowledged(&self, me: i64, from: Option<i64>, up_to: i64, read: bool) -> Result<bool> {
        let column = if read { "read_at" } else { "delivered_at" };
        let sql = format!(
            "SELECT COUNT(*) FROM messages WHERE recipient_id = $1 AND id <= $2 AND {column} IS NULL \
             AND ($3 < 0 OR sender_id = $3)"
        );
        let row =
            sqlx::query(composed(sql)).bind(me).bind(up_to).bind(from.unwrap_or(-1)).fetch_one(&self.pool).await?;
        Ok(row.try_get::<i64, _>(0)? > 0)
    }

    /// `me`'s conversations, most recent first, with the peer's id (for presence) and unread count.
    pub async fn conversations(&self, me: i64) -> Result<Vec<(i64, Conversation)>> {
        let rows = sqlx::query(
            "SELECT peer, MAX(id) AS last_id, \
             CAST(SUM(CASE WHEN recipient_id = $1 AND read_at IS NULL THEN 1 ELSE 0 END) AS BIGINT) AS unread \
             FROM (SELECT id, recipient_id, read_at, \
                   CASE WHEN sender_id = $1 THEN recipient_id ELSE sender_id END AS peer \
                   FROM messages WHERE sender_id = $1 OR recipient_id = $1) t \
             GROUP BY peer ORDER BY last_id DESC",
        )
        .bind(me)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let peer: i64 = row.try_get("peer")?;
            let last_id: i64 = row.try_get("last_id")?;
            let unread: i64 = row.try_get("unread")?;
            let sql = format!("{MESSAGE_SELECT} WHERE m.id = $1");
            let last = message_from_row(&sqlx::query(composed(sql)).bind(last_id).fetch_one(&self.pool).await?)?;
            let peer_row = sqlx::query("SELECT username, deleted_at, last_seen_at FROM users WHERE id = $1")
                .bind(peer)
                .fetch_one(&self.pool)
                .await?;
            out.push((
                peer,
                Conversation {
                    with: peer_row.try_get("username")?,
                    deleted: peer_row.try_get::<Option<i64>, _>("deleted_at")?.is_some(),
                    online: false,
                    last_seen: peer_row.try_get("last_seen_at")?,
                    unread: unread as u64,
                    last,
                },
            ));
        }
        Ok(out)
    }

    /// Live accounts `me` has exchanged messages with: who is told about `me`'s presence.
    pub async fn contacts(&self, me: i64) -> Result<Vec<i64>> {
        contacts(&self.pool, me).await
    }

    /// `user_id`'s events with an index greater than `cursor`, in index order, at most `limit` of them (one
    /// page of a `resume` backlog), each with its index: the stored ones, and the messages it received or
    /// sent, which are not stored as events but derived from their rows (see `events_of` in `state.rs`), each
    /// as it was when sent (no receipts, `from_deleted` false). One statement, so one consistent read: an
    /// event committed meanwhile is in it or pushed live, never skipped between two reads.
    pub async fn events_after(&self, user_id: i64, cursor: u64, limit: u32) -> Result<Vec<(u64, ServerBody)>> {
        let rows = sqlx::query(AssertSqlSafe(events_after_sql()))
            .bind(user_id)
            .bind(cursor.min(i64::MAX as u64) as i64)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let index = row.try_get::<i64, _>("id")? as u64;
                let body = match row.try_get::<Option<String>, _>("event")? {
                    Some(event) => serde_json::from_str(&event).map_err(|e| Error::Corrupt(format!("event: {e}")))?,
                    None => ServerBody::Message { index, message: message_as_sent(row)? },
                };
                Ok((index, body))
            })
            .collect()
    }

    /// A canonical text dump of the replicated state (the log and every state table, every row, in key
    /// order; not `meta`, which is each node's own): two nodes hold the same state exactly when their dumps
    /// are equal.
    pub async fn dump(&self) -> Result<String> {
        const TABLES: &[(&str, &str)] = &[
            ("log", "SELECT idx, term, op FROM log ORDER BY idx"),
            (
                "users",
                "SELECT id, username, name_key, live_key, password_hash, created_at, deleted_at, skeleton, \
                 last_seen_at FROM users ORDER BY id",
            ),
            ("sessions", "SELECT token_hash, user_id, created_at, last_used_at FROM sessions ORDER BY token_hash"),
            (
                "messages",
                "SELECT id, sender_id, recipient_id, client_id, body, sent_at, delivered_at, read_at \
                 FROM messages ORDER BY id",
            ),
            ("events", "SELECT user_id, idx, body FROM events ORDER BY user_id, idx"),
            ("login_failures", "SELECT user_id, failures, last_failure_at FROM login_failures ORDER BY user_id"),
        ];
        let mut out = String::new();
        for (name, sql) in TABLES {
            out.push_str(&format!("## {name}\n"));
            for row in sqlx::query(*sql).fetch_all(&self.pool).await? {
                let cells: Vec<String> = (0..row.len()).map(|i| cell(&row, i)).collect::<Result<_>>()?;
                out.push_str(&cells.join("\t"));
                out.push('\n');
            }
        }
        Ok(out)
    }

    /// [`Db::dump`] without the log: equal on two replicas with the same state even when they compacted
    /// their logs at different points.
    pub async fn dump_state(&self) -> Result<String> {
        let dump = self.dump().await?;
        Ok(dump[dump.find("## users").unwrap_or(0)..].to_owned())
    }
}

/// Live accounts that exchanged messages with `me`, in id order.
pub(super) async fn contacts<'e, E>(executor: E, me: i64) -> Result<Vec<i64>>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let rows = sqlx::query(
        "SELECT peer FROM ( \
           SELECT recipient_id AS peer FROM messages WHERE sender_id = $1 \
           UNION SELECT sender_id AS peer FROM messages WHERE recipient_id = $1) t \
         JOIN users u ON u.id = t.peer WHERE u.deleted_at IS NULL ORDER BY peer",
    )
    .bind(me)
    .fetch_all(executor)
    .await?;
    rows.iter().map(|r| Ok(r.try_get("peer")?)).collect()
}

/// The message among `candidates` (ids the client-id map named, see [`super::client_ids`]) that `sender_id`
/// stored under `client_id`, as [`MESSAGE_SELECT`]'s row: the row check of both the applier and
/// [`Db::message_by_client_id`]. Only these rows are read.
pub(super) async fn stored_under(
    conn: &mut AnyConnection,
    backend: Backend,
    candidates: &[i64],
    sender_id: i64,
    client_id: &str,
) -> Result<Option<AnyRow>> {
    for chunk in candidates.chunks(super::MAX_BINDS) {
        let sql = format!("{MESSAGE_SELECT} WHERE m.id IN ({})", backend.params(0, chunk.len()));
        let mut query = sqlx::query(composed(sql));
        for id in chunk {
            query = query.bind(*id);
        }
        for row in query.fetch_all(&mut *conn).await? {
            if row.try_get::<i64, _>("sender_id")? == sender_id && row.try_get::<String, _>("client_id")? == client_id {
                return Ok(Some(row));
            }
        }
    }
    Ok(None)
}

pub(super) fn message_from_row(row: &AnyRow) -> Result<Message> {
    Ok(Message {
        id: row.try_get::<i64, _>("id")? as u64,
        from: row.try_get("sender")?,
        to: row.try_get("recipient")?,
        text: row.try_get("body")?,
        client_id: row.try_get("client_id")?,
        sent_at: row.try_get("sent_at")?,
        delivered_at: row.try_get("delivered_at")?,
        read_at: row.try_get("read_at")?,
        from_deleted: row.try_get::<Option<i64>, _>("sender_deleted")?.is_some(),
    })
}

/// A [`MESSAGE_SELECT`] row as the message was when sent and first pushed: no receipts, `from_deleted` false
/// (what `resume` replays, derived or stored).
pub(super) fn message_as_sent(row: &AnyRow) -> Result<Message> {
    Ok(Message { delivered_at: None, read_at: None, from_deleted: false, ..message_from_row(row)? })
}

fn user_from_row(row: &AnyRow) -> Result<User> {
    Ok(User {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        password_hash: row.try_get("password_hash")?,
    })
}

/// One cell of a dump row as text; NULL shows as `∅`.
fn cell(row: &AnyRow, i: usize) -> Result<String> {
    if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
        return Ok(v.map_or_else(|| "∅".to_owned(), |v| v.to_string()));
    }
    let v: Option<String> = row.try_get(i)?;
    Ok(v.unwrap_or_else(|| "∅".to_owned()))
}
