//! The state machine: applies committed log entries to the state tables, in one transaction with the applied
//! index, reading nothing but the database and the op.

use std::sync::Arc;

use replichat_shared::{Message, ReceiptKind, ServerBody, SessionEnd};
use sqlx::{AnyConnection, Row};

use super::client_ids::ClientIds;
use super::queries::{contacts, message_as_sent, message_from_row, stored_under, MESSAGE_SELECT};
use super::{composed, set_meta, Backend, Db, Delivery, TxConnection};
use crate::op::Op;
use crate::wildcard::name_key;
use crate::{Error, Result};

impl Db {
    /// Forget what the caches know of accounts (the index of live names, the applier's accounts): after a
    /// failed apply (rolled back) or a snapshot install, when any account may have changed.
    pub(super) fn forget_accounts(&self) {
        self.names.invalidate();
        self.accounts.forget();
    }

    /// The highest index applied to the state tables.
    pub async fn applied_index(&self) -> Result<u64> {
        Ok(self.meta("applied_index").await?.unwrap_or(0) as u64)
    }

    /// Apply the entries after the applied index up to `up_to` (committed ones only), in one transaction.
    /// Returns the new applied index and the events the entries caused, in index order.
    ///
    /// A run of consecutive sends is applied with a few statements for the whole run ([`apply_sends`]); every
    /// other op one by one. On a SQLite file, a batch of nothing but sends is applied the same way by the writer
    /// thread, as one job ([`super::writer`]). Should the batch fail on its data (a constraint, a value the
    /// engine refuses), it is rolled back and applied again op by op, which names the entry at fault exactly as
    /// before.
    pub async fn apply_committed(&self, up_to: u64) -> Result<(u64, Vec<Delivery>)> {
        let applied = match self.apply_range(up_to, true).await {
            Err(e) if e.is_deterministic() => {
                tracing::warn!("applying a batch failed on its data ({e}); applying it again op by op");
                self.apply_range(up_to, false).await
            }
            done => done,
        };
        if applied.is_err() {
            // Rolled back: whatever was learnt about accounts meanwhile may describe a state that never was.
            self.forget_accounts();
        }
        applied
    }

    /// For tests: make every (sender, client id) collide in the applier's client-id map (see
    /// [`super::client_ids`]), so that a repeated client id is decided by reading rows alone.
    #[doc(hidden)]
    pub fn collide_client_ids(&self) {
        self.client_ids.collide();
    }

    /// [`Db::apply_committed`] one op at a time, every send with its own statements: the reference the
    /// batched path is tested against (and its fallback).
    #[doc(hidden)]
    pub async fn apply_committed_one_by_one(&self, up_to: u64) -> Result<(u64, Vec<Delivery>)> {
        let applied = self.apply_range(up_to, false).await;
        if applied.is_err() {
            self.forget_accounts();
        }
        applied
    }

    /// Apply up to `up_to`, first taking the events of entries applied with their append
    /// ([`Db::append_committing`]), which come before any this apply causes.
    async fn apply_range(&self, up_to: u64, batched: bool) -> Result<(u64, Vec<Delivery>)> {
        // Everything up to `up_to` applied with its append (the usual case on the primary of a cluster of one):
        // taken without waiting for the writer, which may be appending the next batch. The applier is the only
        // caller, one call at a time, and an append applies only what follows every earlier apply, so nothing
        // applied before these entries can still be on its way.
        if let Some((index, mut events)) = self.take_applied_ahead(up_to) {
            encode_messages(&mut events);
            return Ok((index, events));
        }
        let mut conn = self.transaction_connection().await?;
        // Under the writer lock: whatever an append applied while this waited for it.
        let Some((index, mut events)) = self.take_applied_ahead(0) else {
            return self.apply_range_on(conn, up_to, batched).await;
        };
        if index >= up_to {
            conn.finished();
            drop(conn);
            encode_messages(&mut events);
            return Ok((index, events));
        }
        match self.apply_range_on(conn, up_to, batched).await {
            Ok((last, more)) => {
                encode_messages(&mut events);
                events.extend(more);
                Ok((last, events))
            }
            Err(e) => {
                // Not pushed yet: put back, before whatever was applied ahead since.
                if let Some(writer) = &self.writer {
                    let mut ahead = writer.applied_ahead.lock().expect("applied-ahead lock");
                    let later = ahead.take();
                    let index = later.as_ref().map_or(index, |(later, _)| *later);
                    events.extend(later.into_iter().flat_map(|(_, events)| events));
                    *ahead = Some((index, events));
                }
                Err(e)
            }
        }
    }

    /// The events of entries applied with their append, taken if they reach `up_to`.
    fn take_applied_ahead(&self, up_to: u64) -> Option<(u64, Vec<Delivery>)> {
        let mut ahead = self.writer.as_ref()?.applied_ahead.lock().expect("applied-ahead lock");
        ahead.take_if(|(index, _)| *index >= up_to)
    }

    /// Drop the events of entries applied with their append that the applier has not taken (a snapshot
    /// install replaced the state they describe; `resume` replays what is stored).
    pub(super) fn forget_applied_ahead(&self) {
        self.take_applied_ahead(0);
    }

    async fn apply_range_on(&self, mut conn: TxConnection, up_to: u64, batched: bool) -> Result<(u64, Vec<Delivery>)> {
        let started = std::time::Instant::now();
        // SQLite: a batch of sends (nearly every batch under load) is one job for the writer thread, which
        // leaves the rest to the general path below.
        if let (Some(writer), true) = (&self.writer, batched) {
            let applied = writer
                .thread
                .apply_sends(up_to, std::sync::Arc::clone(&self.client_ids), std::sync::Arc::clone(&self.accounts))
                .await?;
            if let Some(mut applied) = applied {
                conn.finished();
                drop(conn);
                encode_messages(&mut applied.deliveries);
                crate::metrics::messages_stored(applied.messages);
                crate::metrics::applied(applied.entries, started.elapsed());
                return Ok((applied.last, applied.deliveries));
            }
        }
        // Applied state is not synced to disk at commit: the log is the truth (every entry was fsynced before
        // it was acknowledged), the state tables and the applied index commit together, and both engines
        // make a later synced commit (the next log append) durable only with everything committed before it.
        // A machine crash can therefore only lose the last applies, as one, and the restart applies those
        // entries again from the log. (Compaction reads the applied index and commits synced, so it never
        // removes an entry above a durably applied index.)
        //
        // The transaction is opened and closed with plain statements, not sqlx's `Transaction`: on SQLite the
        // opening (the pragma, `BEGIN IMMEDIATE`, the read of what to apply) is one job for the connection's
        // thread and so is the closing (the events, the applied index, `COMMIT`, the pragma back), one
        // hand-off to that thread each instead of one per statement. A failure anywhere leaves the connection
        // unfinished, and [`TxConnection`] closes it, which rolls the transaction back on both engines.
        let rows = match self.backend {
            Backend::Sqlite => {
                let sql = format!("PRAGMA synchronous = NORMAL; BEGIN IMMEDIATE; {TO_APPLY}");
                sqlx::query(composed(sql)).bind(up_to as i64).fetch_all(&mut *conn).await?
            }
            Backend::Postgres => {
                sqlx::query("BEGIN").execute(&mut *conn).await?;
                sqlx::query("SET LOCAL synchronous_commit = off").execute(&mut *conn).await?;
                sqlx::query(TO_APPLY).bind(up_to as i64).fetch_all(&mut *conn).await?
            }
        };
        let applied: i64 = match rows.first() {
            Some(row) => row.try_get("applied")?,
            None => return Err(Error::Corrupt("reading what to apply returned no row".into())),
        };
        let mut ops = Vec::with_capacity(rows.len());
        let mut last = applied;
        for row in &rows {
            // One row with no entry when there is nothing to apply (the join found none).
            let Some(index) = row.try_get::<Option<i64>, _>("idx")? else { continue };
            if index != last + 1 {
                return Err(Error::Corrupt(format!("log gap: entry {index} follows applied {last}")));
            }
            let op: String = row.try_get("op")?;
            let unapplicable = |reason: String| Error::Unapplicable { index: index as u64, reason };
            let op: Op = serde_json::from_str(&op).map_err(|e| unapplicable(format!("not an op: {e}")))?;
            op.check().map_err(unapplicable)?;
            ops.push((index, op));
            last = index;
        }
        if ops.iter().any(|(_, op)| matches!(op, Op::Send { .. })) {
            load_client_ids(&mut conn, &self.client_ids).await?;
        }
        // Messages an account deletion removed: their client ids leave the map once the deletion committed.
        let mut deleted = Vec::new();
        let mut deliveries = Vec::new();
        // Events and messages to store, written together before the commit, or before an op that could touch
        // them.
        let mut events: Vec<(i64, i64, Arc<str>)> = Vec::new();
        let mut new_messages: Vec<NewMessage> = Vec::new();
        let mut messages = 0;
        let mut rest = &ops[..];
        while let Some((index, op)) = rest.first() {
            let run = if batched { rest.iter().take_while(|(_, op)| matches!(op, Op::Send { .. })).count() } else { 0 };
            if run > 0 {
                let (stored, mut caused) = apply_sends(
                    &mut conn,
                    self.backend,
                    &self.client_ids,
                    &self.accounts,
                    &rest[..run],
                    &mut new_messages,
                )
                .await?;
                messages += stored;
                events_of(&mut caused, &mut events)?;
                deliveries.extend(caused);
                rest = &rest[run..];
                continue;
            }
            // An op other than a send may read or delete stored events and messages (an account deletion does):
            // what came before it is stored first.
            insert_messages(&mut conn, self.backend, &mut new_messages).await?;
            insert_events(&mut conn, self.backend, &mut events).await?;
            if matches!(op, Op::Register { .. } | Op::DeleteAccount { .. }) {
                // Accounts change within this transaction: the sends after it read them again.
                self.accounts.forget();
            }
            let index = *index;
            // The same op fails the same way on every retry when the data is at fault; say which entry.
            let mut caused = match apply(&mut conn, self.backend, &self.client_ids, &mut deleted, index, op).await {
                Ok(caused) => caused,
                Err(e) if e.is_deterministic() => {
                    return Err(Error::Unapplicable { index: index as u64, reason: e.to_string() })
                }
                Err(e) => return Err(e),
            };
            // A send that stored its message causes its pushes; a duplicate stores and causes nothing.
            if matches!(op, Op::Send { .. }) && !caused.is_empty() {
                messages += 1;
            }
            events_of(&mut caused, &mut events)?;
            deliveries.extend(caused);
            rest = &rest[1..];
        }
        if !ops.is_empty() && crash_test_abort_now(false) {
            tracing::error!(applied, last, "REPLICHAT_TEST_ABORT_IN_APPLY: aborting inside an apply transaction");
            std::process::abort();
        }
        insert_events(&mut conn, self.backend, &mut events).await?;
        match self.backend {
            Backend::Sqlite => {
                // The messages, the applied index and the commit: one job for the connection's thread.
                let mut sql = sqlite_insert_messages(&new_messages);
                if last != applied {
                    sql.push_str(
                        "INSERT INTO meta (name, value) VALUES ('applied_index', ?) \
                         ON CONFLICT (name) DO UPDATE SET value = excluded.value;",
                    );
                }
                // The writer connection's next transaction (a log append) is synced again.
                sql.push_str("COMMIT; PRAGMA synchronous = FULL");
                let mut query = bind_messages(sqlx::query(composed(sql)), &new_messages);
                if last != applied {
                    query = query.bind(last);
                }
                query.execute(&mut *conn).await?;
            }
            Backend::Postgres => {
                insert_messages(&mut conn, self.backend, &mut new_messages).await?;
                if last != applied {
                    set_meta(&mut conn, "applied_index", last).await?;
                }
                sqlx::query("COMMIT").execute(&mut *conn).await?;
            }
        }
        conn.finished();
        drop(conn);
        encode_messages(&mut deliveries);
        for (id, sender, client_id) in deleted {
            self.client_ids.remove(id, sender, &client_id);
        }
        // Accounts changed: the index of live names forgets them before anyone learns the op was applied.
        if ops.iter().any(|(_, op)| matches!(op, Op::Register { .. } | Op::DeleteAccount { .. })) {
            self.names.invalidate();
        }
        crate::metrics::messages_stored(messages);
        if !ops.is_empty() {
            crate::metrics::applied(ops.len() as u64, started.elapsed());
        }
        Ok((last as u64, deliveries))
    }
}

/// The applied index and the committed entries after it up to `$1`, in order: one row per entry, or a single
/// row with a NULL `idx` when there is none.
const TO_APPLY: &str = "SELECT a.applied, l.idx, l.op \
     FROM (SELECT COALESCE((SELECT value FROM meta WHERE name = 'applied_index'), 0) AS applied) AS a \
     LEFT JOIN log AS l ON l.idx > a.applied AND l.idx <= $1 ORDER BY l.idx";

/// Events per multi-row INSERT (three bound parameters each; see [`super::MAX_BINDS`]).
const EVENTS_PER_INSERT: usize = super::MAX_BINDS / 3;

/// Encode the events in `caused` that are stored into their [`Delivery::json`], and add them to `events`, the
/// rows to store: every replayable event but a message's (live-only frames, `session_ended`, are pushed, never
/// stored or replayed). Message events are encoded after the commit ([`encode_messages`]).
///
/// A message's events are not stored: `resume` replays them from the `messages` row (see
/// [`Db::events_after`](super::Db::events_after)), which saves two rows of the whole message, and two more
/// per-user b-tree insertions, per message. Should the row go (its recipient deletes the account), the
/// deletion stores the sender's copy first ([`apply`], `DeleteAccount`).
fn events_of(caused: &mut [Delivery], events: &mut Vec<(i64, i64, Arc<str>)>) -> Result<()> {
    for delivery in caused.iter_mut() {
        let Some(index) = delivery.body.index() else { continue };
        if matches!(delivery.body, ServerBody::Message { .. }) {
            continue;
        }
        let json: Arc<str> = serde_json::to_string(&delivery.body).map_err(|e| Error::Corrupt(e.to_string()))?.into();
        events.push((delivery.user_id, index as i64, Arc::clone(&json)));
        delivery.json = Some(json);
    }
    Ok(())
}

/// Encode the message events in `deliveries` into their [`Delivery::json`], once the apply committed and let go
/// of the writer connection: the writer's next transaction (a log append) does not wait for frames nobody
/// stores (measured: BENCHMARKS.md, "Stop 24"). An event for two users (a message, for its recipient and its
/// sender) is encoded once and shared. Should an event fail to encode, it keeps no JSON and its sockets encode
/// it themselves; the apply committed, so it cannot fail now.
fn encode_messages(deliveries: &mut [Delivery]) {
    let mut previous: Option<usize> = None;
    for at in 0..deliveries.len() {
        if !matches!(deliveries[at].body, ServerBody::Message { .. }) {
            continue;
        }
        let same = previous.filter(|&p| deliveries[p].body == deliveries[at].body);
        deliveries[at].json = match same.and_then(|p| deliveries[p].json.clone()) {
            Some(json) => Some(json),
            None => serde_json::to_string(&deliveries[at].body).ok().map(Arc::from),
        };
        previous = Some(at);
    }
}

/// Store `events` (and empty it) with multi-row INSERTs.
///
/// On SQLite as `INSERT OR IGNORE`, all of them one job for the connection's thread, and then checked: every
/// row must have been stored. A plain multi-row INSERT inside a transaction makes SQLite copy every page it
/// changes into a statement journal first (so that a failing row could undo just its statement), which under
/// load was a tenth of a backup's CPU; `OR IGNORE` cannot fail on a row, so SQLite keeps no such journal. The
/// check keeps the meaning of the plain INSERT: an event already stored under the index being applied is an
/// error, and the whole apply transaction rolls back (nothing here relies on undoing a single statement). On
/// PostgreSQL as `ON CONFLICT DO NOTHING`, checked the same way, so that the error names the entries on both.
async fn insert_events(tx: &mut AnyConnection, backend: Backend, events: &mut Vec<(i64, i64, Arc<str>)>) -> Result<()> {
    let (Some(first), Some(last)) = (events.first(), events.last()) else { return Ok(()) };
    let (first, last) = (first.1, last.1);
    let stored = match backend {
        Backend::Sqlite => {
            let mut sql = String::new();
            for chunk in events.chunks(EVENTS_PER_INSERT) {
                sql.push_str("INSERT OR IGNORE INTO events (user_id, idx, body) VALUES ");
                sql.push_str(&backend.values(chunk.len(), 3));
                sql.push(';');
            }
            let mut query = sqlx::query(composed(sql));
            for (user, index, body) in events.iter() {
                query = query.bind(*user).bind(*index).bind(&**body);
            }
            query.execute(&mut *tx).await?.rows_affected()
        }
        Backend::Postgres => {
            let mut stored = 0;
            for chunk in events.chunks(EVENTS_PER_INSERT) {
                let sql = format!(
                    "INSERT INTO events (user_id, idx, body) VALUES {} ON CONFLICT DO NOTHING",
                    backend.values(chunk.len(), 3)
                );
                let mut query = sqlx::query(composed(sql));
                for (user, index, body) in chunk {
                    query = query.bind(*user).bind(*index).bind(&**body);
                }
                stored += query.execute(&mut *tx).await?.rows_affected();
            }
            stored
        }
    };
    if stored != events.len() as u64 {
        let entries = if first == last { format!("entry {first}") } else { format!("entries {first} to {last}") };
        return Err(Error::Corrupt(format!(
            "{} of the events of {entries} were stored already: the state tables and the applied index disagree",
            events.len() as u64 - stored
        )));
    }
    events.clear();
    Ok(())
}

/// A crash-test hook: with `REPLICHAT_TEST_ABORT_IN_APPLY=n` in its environment, the process aborts (no
/// cleanup, like kill -9) inside its n-th apply transaction, before committing: after the statements of every op
/// but a run of sends, whose messages are written with the commit (on PostgreSQL just before it; on the SQLite
/// writer thread after them, before the applied index and the commit). `REPLICHAT_TEST_ABORT_IN_APPEND_APPLY=n`
/// counts instead the applies that run in the transaction of their entries' append (SQLite, a cluster of one:
/// [`Db::append_committing`]); the other counts only those that do not. Used by the chat suite's
/// `a_crash_inside_an_apply_loses_and_repeats_nothing`; unset, it costs one atomic load.
pub(super) fn crash_test_abort_now(with_append: bool) -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static AT: OnceLock<[Option<u64>; 2]> = OnceLock::new();
    static APPLIES: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];
    let at = AT.get_or_init(|| {
        ["REPLICHAT_TEST_ABORT_IN_APPLY", "REPLICHAT_TEST_ABORT_IN_APPEND_APPLY"]
            .map(|var| std::env::var(var).ok().and_then(|n| n.parse().ok()))
    })[usize::from(with_append)];
    at.is_some_and(|at| APPLIES[usize::from(with_append)].fetch_add(1, Ordering::Relaxed) + 1 == at)
}

/// A message to store: id (its index), sender, recipient, client id, text, time.
pub(super) type NewMessage<'a> = (i64, i64, i64, &'a str, &'a str, i64);

/// Apply a run of consecutive sends (every op in `run` is an [`Op::Send`]) with a few statements for the whole
/// run: a read of the accounts involved that the applier does not know ([`Accounts`]), and the new messages
/// added to `new_messages`, stored with multi-row INSERTs before the commit or the next op that is not a send
/// ([`insert_messages`]); their events are built from the ops and those accounts, not read back. Whether a send
/// repeats a client id is decided with the applier's map ([`ClientIds`]), reading the database only for a send
/// whose (sender, client id) hash is there (a retry). Returns how many messages were stored and the events, in
/// index order: exactly what applying the sends one by one with [`apply`] gives (no op in the run changes a
/// user, so one read of the users is what each send would have seen; a repeated client id, also within the run,
/// stores and causes nothing).
async fn apply_sends<'a>(
    tx: &mut AnyConnection,
    backend: Backend,
    client_ids: &ClientIds,
    accounts: &Accounts,
    run: &'a [(i64, Op)],
    new_messages: &mut Vec<NewMessage<'a>>,
) -> Result<(u64, Vec<Delivery>)> {
    let mut sends: Vec<(i64, i64, i64, &str, &str, i64)> = Vec::with_capacity(run.len());
    let mut fresh = std::collections::HashSet::with_capacity(run.len());
    for (index, op) in run {
        let Op::Send { sender_id, recipient_id, client_id, text, at } = op else { continue };
        // A repeat of an earlier send of this run, or of a message stored before: nothing to store.
        if fresh.contains(&(*sender_id, client_id.as_str()))
            || stored_before(tx, backend, client_ids, *sender_id, client_id).await?
        {
            continue;
        }
        fresh.insert((*sender_id, client_id.as_str()));
        sends.push((*index, *sender_id, *recipient_id, client_id.as_str(), text.as_str(), *at));
    }
    if sends.is_empty() {
        return Ok((0, Vec::new()));
    }
    // Who they are: name, and whether deleted (a send proposed before its sender's deletion applied), as the
    // applier last read them, and read for those it does not know.
    let mut ids: Vec<i64> = sends.iter().flat_map(|s| [s.1, s.2]).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut users = accounts.known(&ids);
    let unknown: Vec<i64> = ids.iter().copied().filter(|id| !users.contains_key(id)).collect();
    for chunk in unknown.chunks(super::MAX_BINDS) {
        let sql =
            format!("SELECT id, username, deleted_at FROM users WHERE id IN ({})", backend.params(0, chunk.len()));
        let mut query = sqlx::query(composed(sql));
        for id in chunk {
            query = query.bind(*id);
        }
        for row in query.fetch_all(&mut *tx).await? {
            let id = row.try_get::<i64, _>("id")?;
            let deleted = row.try_get::<Option<i64>, _>("deleted_at")?.is_some();
            let account = (Arc::<str>::from(row.try_get::<String, _>("username")?), deleted);
            accounts.learn(id, account.clone());
            users.insert(id, account);
        }
    }
    if let Some(missing) = ids.iter().find(|id| !users.contains_key(id)) {
        // Applied one by one, reading the message back fails on it; that path says which entry.
        return Err(Error::Corrupt(format!("a send names account {missing}, which does not exist")));
    }
    new_messages.extend_from_slice(&sends);
    let deliveries = deliveries_of_sends(&sends, &users, client_ids);
    Ok((sends.len() as u64, deliveries))
}

/// The events of `sends` (messages about to be stored, in index order): for each, its recipient's and its
/// sender's, built from the op and the accounts in `users`; each message goes into `client_ids` (before the
/// commit: the map holds every committed message, and perhaps some that were rolled back).
pub(super) fn deliveries_of_sends(
    sends: &[NewMessage<'_>],
    users: &std::collections::HashMap<i64, (Arc<str>, bool)>,
    client_ids: &ClientIds,
) -> Vec<Delivery> {
    let mut deliveries = Vec::with_capacity(2 * sends.len());
    for &(index, sender, recipient, client_id, text, at) in sends {
        client_ids.insert(index, sender, client_id);
        let (from, from_deleted) = &users[&sender];
        let message = Message {
            id: index as u64,
            from: from.to_string(),
            to: users[&recipient].0.to_string(),
            text: text.to_owned(),
            client_id: client_id.to_owned(),
            sent_at: at,
            delivered_at: None,
            read_at: None,
            from_deleted: *from_deleted,
        };
        let body = ServerBody::Message { index: index as u64, message };
        deliveries.push(Delivery { user_id: recipient, body: body.clone(), session: None, json: None });
        deliveries.push(Delivery { user_id: sender, body, session: None, json: None });
    }
    deliveries
}

/// Store `new_messages` (and empty it) with multi-row INSERTs. A message's id is its entry's index, so a row
/// whose id is taken fails the apply: on SQLite as `INSERT OR ROLLBACK`, which ends the transaction at once
/// and, like `OR IGNORE`, keeps no statement journal (see [`insert_events`]); on PostgreSQL as `ON CONFLICT DO
/// NOTHING RETURNING id`, checked. Either way the failure is deterministic, and [`Db::apply_committed`] applies
/// the batch again op by op, which names the entry.
async fn insert_messages(
    tx: &mut AnyConnection,
    backend: Backend,
    new_messages: &mut Vec<NewMessage<'_>>,
) -> Result<()> {
    if new_messages.is_empty() {
        return Ok(());
    }
    match backend {
        Backend::Sqlite => {
            let query = bind_messages(sqlx::query(composed(sqlite_insert_messages(new_messages))), new_messages);
            query.execute(&mut *tx).await?;
        }
        Backend::Postgres => {
            let mut stored = std::collections::HashSet::with_capacity(new_messages.len());
            for chunk in new_messages.chunks(MESSAGES_PER_INSERT) {
                let sql = format!(
                    "INSERT INTO messages (id, sender_id, recipient_id, client_id, body, sent_at) VALUES {} \
                     ON CONFLICT (id) DO NOTHING RETURNING id",
                    backend.values(chunk.len(), 6)
                );
                for row in bind_messages(sqlx::query(composed(sql)), chunk).fetch_all(&mut *tx).await? {
                    stored.insert(row.try_get::<i64, _>("id")?);
                }
            }
            if let Some(&(index, ..)) = new_messages.iter().find(|m| !stored.contains(&m.0)) {
                return Err(Error::Unapplicable {
                    index: index as u64,
                    reason: "a message is stored under its index already".to_owned(),
                });
            }
        }
    }
    new_messages.clear();
    Ok(())
}

/// `query` with the six values of each of `rows` bound, in order (see [`sqlite_insert_messages`]).
fn bind_messages<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>,
    rows: &[NewMessage<'q>],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments> {
    for &(index, sender, recipient, client_id, text, at) in rows {
        query = query.bind(index).bind(sender).bind(recipient).bind(client_id).bind(text).bind(at);
    }
    query
}

/// Messages per multi-row INSERT (six bound parameters each; see [`super::MAX_BINDS`]).
const MESSAGES_PER_INSERT: usize = super::MAX_BINDS / 6;

/// SQLite: the statements that store `new_messages`, to be bound with their six values each, in order.
fn sqlite_insert_messages(new_messages: &[NewMessage<'_>]) -> String {
    let mut sql = String::new();
    for chunk in new_messages.chunks(MESSAGES_PER_INSERT) {
        sql.push_str(
            "INSERT OR ROLLBACK INTO messages (id, sender_id, recipient_id, client_id, body, sent_at) VALUES ",
        );
        sql.push_str(&Backend::Sqlite.values(chunk.len(), 6));
        sql.push(';');
    }
    sql
}

/// The name and deletion of accounts, by id, as the applier read them: what a run of sends needs to build its
/// events without reading `users` again for the senders and recipients it knows. Only the applier reads and
/// fills it, on the writer's transaction, and it forgets everything when accounts may change under it: before an
/// op that changes accounts is applied (a registration, a deletion; also in the middle of a batch), after an
/// apply that failed (rolled back, so what it read may never have been), and after a snapshot install.
#[derive(Debug, Default)]
pub(super) struct Accounts {
    known: std::sync::Mutex<std::collections::HashMap<i64, (Arc<str>, bool)>>,
}

impl Accounts {
    /// Accounts kept at most; beyond that it starts again (a cache, not the truth).
    const CAPACITY: usize = 100_000;

    /// Those of `ids` it knows.
    pub(super) fn known(&self, ids: &[i64]) -> std::collections::HashMap<i64, (Arc<str>, bool)> {
        let known = self.known.lock().expect("accounts lock");
        ids.iter().filter_map(|id| known.get(id).map(|account| (*id, account.clone()))).collect()
    }

    /// Remember `id`'s name and whether it is deleted, read in the applier's transaction.
    pub(super) fn learn(&self, id: i64, account: (Arc<str>, bool)) {
        let mut known = self.known.lock().expect("accounts lock");
        if known.len() >= Self::CAPACITY {
            known.clear();
        }
        known.insert(id, account);
    }

    /// Forget every account.
    pub(super) fn forget(&self) {
        self.known.lock().expect("accounts lock").clear();
    }
}

/// Load the client-id map from the state this transaction sees, unless it is loaded: once after start-up or
/// a snapshot install, before the first send is applied.
async fn load_client_ids(tx: &mut AnyConnection, client_ids: &ClientIds) -> Result<()> {
    use futures_util::TryStreamExt;
    if client_ids.is_loaded() {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let mut loader = client_ids.loader();
    let mut rows = sqlx::query("SELECT id, sender_id, client_id FROM messages").fetch(&mut *tx);
    while let Some(row) = rows.try_next().await? {
        loader.add(row.try_get("id")?, row.try_get("sender_id")?, &row.try_get::<String, _>("client_id")?);
    }
    drop(rows);
    loader.finish();
    tracing::info!(
        messages = client_ids.len(),
        ms = started.elapsed().as_millis() as u64,
        "loaded the client ids of the stored messages"
    );
    Ok(())
}

/// Whether `sender` has a stored message under `client_id` (as this transaction sees it): read only when the
/// map names candidates, and then only those rows.
async fn stored_before(
    tx: &mut AnyConnection,
    backend: Backend,
    client_ids: &ClientIds,
    sender: i64,
    client_id: &str,
) -> Result<bool> {
    let candidates = client_ids
        .candidates(sender, client_id)
        .ok_or_else(|| Error::Corrupt("the client id map is not loaded".to_owned()))?;
    Ok(!candidates.is_empty() && stored_under(tx, backend, &candidates, sender, client_id).await?.is_some())
}

/// Apply one committed op inside the applying transaction: the chat state machine.
async fn apply(
    tx: &mut AnyConnection,
    backend: Backend,
    client_ids: &ClientIds,
    deleted: &mut Vec<(i64, i64, String)>,
    index: i64,
    op: &Op,
) -> Result<Vec<Delivery>> {
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
            seen(tx, *user_id, *at).await?;
            Ok(Vec::new())
        }
        Op::Login { user_id, token_hash, at } => {
            insert_session(tx, token_hash, *user_id, *at).await?;
            seen(tx, *user_id, *at).await?;
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
                json: None,
            }])
        }
        Op::LogoutAll { user_id } => {
            sqlx::query("DELETE FROM sessions WHERE user_id = $1").bind(user_id).execute(&mut *tx).await?;
            Ok(vec![Delivery {
                user_id: *user_id,
                body: ServerBody::SessionEnded { reason: SessionEnd::LoggedOutEverywhere },
                session: None,
                json: None,
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
            let row = sqlx::query("SELECT user_id FROM sessions WHERE token_hash = $1")
                .bind(token_hash)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(row) = row {
                seen(tx, row.try_get("user_id")?, *at).await?;
            }
            Ok(Vec::new())
        }
        Op::Seen { user_id, at } => {
            seen(tx, *user_id, *at).await?;
            Ok(Vec::new())
        }
        Op::Send { sender_id, recipient_id, client_id, text, at } => {
            let message_id = index;
            // A second send with the same client id (a retry that reached a new primary before it applied the
            // original) stores nothing and causes nothing, identically on every replica.
            if stored_before(tx, backend, client_ids, *sender_id, client_id).await? {
                return Ok(Vec::new());
            }
            sqlx::query(
                "INSERT INTO messages (id, sender_id, recipient_id, client_id, body, sent_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(message_id)
            .bind(sender_id)
            .bind(recipient_id)
            .bind(client_id)
            .bind(text)
            .bind(at)
            .execute(&mut *tx)
            .await?;
            client_ids.insert(message_id, *sender_id, client_id);
            let sql = format!("{MESSAGE_SELECT} WHERE m.id = $1");
            let message = message_from_row(&sqlx::query(composed(sql)).bind(message_id).fetch_one(&mut *tx).await?)?;
            let body = ServerBody::Message { index: index as u64, message };
            Ok(vec![
                Delivery { user_id: *recipient_id, body: body.clone(), session: None, json: None },
                Delivery { user_id: *sender_id, body, session: None, json: None },
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
                        json: None,
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
                json: None,
            }])
        }
        Op::Noop => Ok(Vec::new()),
        Op::DeleteAccount { user_id, at } => {
            let username = username_of(tx, *user_id).await?;
            let peers = contacts(&mut *tx, *user_id).await?;
            // The messages to the account go; their live senders keep the event they were pushed, which
            // `resume` can no longer derive from the row.
            let mut copies = senders_copies(tx, *user_id).await?;
            insert_events(tx, backend, &mut copies).await?;
            let rows = sqlx::query("DELETE FROM messages WHERE recipient_id = $1 RETURNING id, sender_id, client_id")
                .bind(user_id)
                .fetch_all(&mut *tx)
                .await?;
            for row in rows {
                deleted.push((row.try_get("id")?, row.try_get("sender_id")?, row.try_get("client_id")?));
            }
            for sql in [
                "DELETE FROM sessions WHERE user_id = $1",
                "DELETE FROM events WHERE user_id = $1",
                "DELETE FROM login_failures WHERE user_id = $1",
            ] {
                sqlx::query(sql).bind(user_id).execute(&mut *tx).await?;
            }
            sqlx::query(
                "UPDATE users SET live_key = NULL, password_hash = NULL, last_seen_at = NULL, deleted_at = $2 \
                 WHERE id = $1",
            )
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
                    json: None,
                })
                .collect())
        }
    }
}

/// The events the live senders of the messages to `recipient` were pushed for them, as stored events (user,
/// index, JSON): each message as it was when sent (no receipts, `from_deleted` false, as a replay shows it).
async fn senders_copies(tx: &mut AnyConnection, recipient: i64) -> Result<Vec<(i64, i64, Arc<str>)>> {
    let sql = format!("{MESSAGE_SELECT} WHERE m.recipient_id = $1 AND s.deleted_at IS NULL ORDER BY m.id");
    let rows = sqlx::query(composed(sql)).bind(recipient).fetch_all(&mut *tx).await?;
    rows.iter()
        .map(|row| {
            let message = message_as_sent(row)?;
            let (sender, index) = (row.try_get::<i64, _>("sender_id")?, message.id as i64);
            let body = ServerBody::Message { index: message.id, message };
            let json = serde_json::to_string(&body).map_err(|e| Error::Corrupt(e.to_string()))?;
            Ok((sender, index, json.into()))
        })
        .collect()
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

/// `user_id` was seen at `at`: keep the latest time (ops proposed concurrently may land in any order, and a
/// new primary's clock may lag the old one's). A deleted account is never seen again.
async fn seen(tx: &mut AnyConnection, user_id: i64, at: i64) -> Result<()> {
    sqlx::query(
        "UPDATE users SET last_seen_at = $2 \
         WHERE id = $1 AND deleted_at IS NULL AND (last_seen_at IS NULL OR last_seen_at < $2)",
    )
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
