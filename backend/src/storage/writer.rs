//! SQLite's hot writes on a thread of their own: the log append past the end of the log and the apply of a batch
//! of sends, each one whole transaction run by one call on a dedicated thread through SQLite's own API
//! (rusqlite), instead of one hand-off to sqlx's connection thread per statement string and the conversion of
//! every row it returns. Every other write stays on sqlx's writer connection; the two take turns under the
//! same in-process lock ([`super::SqliteWriter`]), so SQLite's busy handler never sleeps between them.

use std::path::PathBuf;
use std::sync::Arc;

use rusqlite::Connection;

use super::client_ids::ClientIds;
use super::state::{deliveries_of_sends, Accounts, NewMessage};
use super::{Delivery, Entry, WRITER_CACHE};
use crate::op::Op;
use crate::{Error, Result};

type Job = Box<dyn FnOnce(&mut Slot) + Send>;

/// The thread and its queue of jobs.
pub(super) struct WriterThread {
    jobs: std::sync::mpsc::Sender<Job>,
}

/// The writer thread's connection: opened by the first job that needs it, and again after a job that failed
/// (a transaction that failed half way, on a full disk say, leaves a connection whose state cannot be trusted;
/// closing it rolls back what it left open).
struct Slot {
    path: PathBuf,
    conn: Option<Connection>,
}

impl Slot {
    fn connection(&mut self) -> Result<&mut Connection> {
        if self.conn.is_none() {
            self.conn = Some(open(&self.path)?);
        }
        Ok(self.conn.as_mut().expect("just opened"))
    }
}

impl WriterThread {
    /// Start the thread, for the SQLite file at `path`. It ends once the last handle on it is dropped.
    pub(super) fn start(path: PathBuf) -> WriterThread {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let mut slot = Slot { path, conn: None };
                for job in queue {
                    job(&mut slot);
                }
            })
            .expect("spawn the SQLite writer thread");
        WriterThread { jobs }
    }

    /// Run `job` on the writer's connection and wait for its result. A job that fails closes the connection.
    async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Connection) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let (done, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |slot: &mut Slot| {
            let outcome = slot.connection().and_then(job);
            if outcome.is_err() {
                drop(slot.conn.take());
            }
            let _ = done.send(outcome);
        });
        let gone = || Error::Stopped("the SQLite writer thread is gone".into());
        self.jobs.send(job).map_err(|_| gone())?;
        result.await.map_err(|_| gone())?
    }

    /// SQLite's `PRAGMA journal_mode`, `synchronous`, `temp_store` and `cache_size` as this connection sees them
    /// between two transactions (see [`super::Db::sqlite_durability`]).
    pub(super) async fn durability(&self) -> Result<(String, i64, i64, i64)> {
        self.run(|conn| {
            let mode: String = conn.query_row("PRAGMA journal_mode", [], |row| row.get(0))?;
            let number = |pragma: &str| conn.query_row(&format!("PRAGMA {pragma}"), [], |row| row.get::<_, i64>(0));
            Ok((mode, number("synchronous")?, number("temp_store")?, number("cache_size")?))
        })
        .await
    }

    /// Close the connection (it is opened again by the next job).
    pub(super) async fn close(&self) {
        let (done, closed) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |slot: &mut Slot| {
            drop(slot.conn.take());
            let _ = done.send(());
        });
        if self.jobs.send(job).is_ok() {
            let _ = closed.await;
        }
    }

    /// Append `entries`, which must all lie past the end of the log, in one transaction. `Ok(false)` (and nothing
    /// written) if an entry is stored at one of their indexes already.
    pub(super) async fn append_past_end(&self, entries: Vec<Entry>) -> Result<bool> {
        self.run(move |conn| append_past_end(conn, &entries)).await
    }

    /// Append `entries`, which must all lie past the end of the log and which this append alone commits (the
    /// primary of a cluster of one), and apply every entry after the applied index up to the last of them in
    /// the same transaction if they are all sends (as [`WriterThread::apply_sends`] does): one synced commit
    /// makes the entries and their state durable together. If they are not all sends, or the sends fail on
    /// their data (a row planted behind the applier's back, say: `INSERT OR ROLLBACK` ends the transaction),
    /// the entries are appended alone and the general path applies them (and names the entry at fault).
    pub(super) async fn append_and_apply(
        &self,
        entries: Vec<Entry>,
        client_ids: Arc<ClientIds>,
        accounts: Arc<Accounts>,
    ) -> Result<Appended> {
        self.run(move |conn| {
            let up_to = entries.last().map_or(0, |e| e.index);
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if !insert_entries(&tx, &entries)? {
                tx.rollback()?;
                return Ok(Appended::Conflict);
            }
            match apply_sends(&tx, up_to, &client_ids, &accounts, true) {
                Ok(applied) => {
                    tx.commit()?;
                    return Ok(applied.map_or(Appended::Alone, Appended::Applied));
                }
                Err(e) if e.is_deterministic() => {
                    tracing::warn!("applying a batch with its append failed on its data ({e}); appending it alone");
                    accounts.forget();
                }
                Err(e) => return Err(e),
            }
            // Rolled back already (`INSERT OR ROLLBACK`), or now, as the transaction is dropped.
            drop(tx);
            if !append_past_end(conn, &entries)? {
                return Err(Error::Corrupt("the log changed under its only writer".into()));
            }
            Ok(Appended::Alone)
        })
        .await
    }

    /// Apply the committed entries after the applied index up to `up_to` if every one of them is a send, in one
    /// transaction with the applied index, as `state::apply_sends` does for a run of sends: `None` (nothing
    /// written) if one is not, there is none, or the client-id map is not loaded yet, for the general path to
    /// apply them (`Db::apply_range`).
    pub(super) async fn apply_sends(
        &self,
        up_to: u64,
        client_ids: Arc<ClientIds>,
        accounts: Arc<Accounts>,
    ) -> Result<Option<AppliedSends>> {
        self.run(move |conn| {
            // Not synced at commit: see `Db::apply_range`.
            conn.execute_batch("PRAGMA synchronous = NORMAL")?;
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let applied = apply_sends(&tx, up_to, &client_ids, &accounts, false)?;
            if applied.is_some() {
                tx.commit()?;
            } else {
                tx.rollback()?;
            }
            conn.execute_batch("PRAGMA synchronous = FULL")?;
            Ok(applied)
        })
        .await
    }
}

/// What [`WriterThread::append_and_apply`] did.
pub(super) enum Appended {
    /// Nothing: an entry is stored at one of the indexes already.
    Conflict,
    /// Appended; applying is left to the general path.
    Alone,
    /// Appended, and applied in the same transaction.
    Applied(AppliedSends),
}

/// What [`WriterThread::apply_sends`] applied.
pub(super) struct AppliedSends {
    /// The new applied index.
    pub(super) last: u64,
    /// The events the sends caused, in index order (none for a repeated client id).
    pub(super) deliveries: Vec<Delivery>,
    /// Messages stored.
    pub(super) messages: u64,
    /// Entries applied.
    pub(super) entries: u64,
    /// How long the apply took, on the writer thread (without the commit).
    pub(super) took: std::time::Duration,
}

/// [`WriterThread::append_past_end`], on the writer thread.
fn append_past_end(conn: &mut Connection, entries: &[Entry]) -> Result<bool> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if !insert_entries(&tx, entries)? {
        tx.rollback()?;
        return Ok(false);
    }
    tx.commit()?;
    Ok(true)
}

/// Append `entries` in `tx`; `Ok(false)`, with the transaction to roll back, if an entry is stored at one of
/// their indexes already.
fn insert_entries(tx: &Connection, entries: &[Entry]) -> Result<bool> {
    let mut insert = tx.prepare_cached("INSERT INTO log (idx, term, op) VALUES (?1, ?2, ?3)")?;
    for entry in entries {
        match insert.execute((entry.index as i64, entry.term as i64, &entry.op)) {
            Ok(_) => {}
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                return Ok(false)
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// [`WriterThread::apply_sends`] in the open transaction `tx` (left to the caller to commit), on the writer
/// thread: the same steps as `state::apply_sends` (a repeated client id decided by the applier's map and, for
/// the candidates it names, the rows; the accounts from the applier's [`Accounts`] or read; the events built
/// from the ops), with prepared single-row statements. `None`, with nothing written, if an entry is not a
/// send, there is none, or the client-id map is not loaded yet. `with_append`: in the transaction of the
/// entries' append (for the crash-test hook only).
fn apply_sends(
    tx: &Connection,
    up_to: u64,
    client_ids: &ClientIds,
    accounts: &Accounts,
    with_append: bool,
) -> Result<Option<AppliedSends>> {
    if !client_ids.is_loaded() {
        return Ok(None);
    }
    let started = std::time::Instant::now();
    let applied: i64 = tx
        .prepare_cached("SELECT COALESCE((SELECT value FROM meta WHERE name = 'applied_index'), 0)")?
        .query_row([], |row| row.get(0))?;
    let mut ops = Vec::new();
    {
        let mut read = tx.prepare_cached("SELECT idx, op FROM log WHERE idx > ?1 AND idx <= ?2 ORDER BY idx")?;
        let mut rows = read.query((applied, up_to as i64))?;
        let mut last = applied;
        while let Some(row) = rows.next()? {
            let index: i64 = row.get(0)?;
            if index != last + 1 {
                return Err(Error::Corrupt(format!("log gap: entry {index} follows applied {last}")));
            }
            let op: String = row.get(1)?;
            let unapplicable = |reason: String| Error::Unapplicable { index: index as u64, reason };
            let op: Op = serde_json::from_str(&op).map_err(|e| unapplicable(format!("not an op: {e}")))?;
            op.check().map_err(unapplicable)?;
            if !matches!(op, Op::Send { .. }) {
                return Ok(None);
            }
            ops.push((index, op));
            last = index;
        }
    }
    let Some(&(last, _)) = ops.last() else { return Ok(None) };
    let mut sends: Vec<NewMessage> = Vec::with_capacity(ops.len());
    let mut fresh = std::collections::HashSet::with_capacity(ops.len());
    for (index, op) in &ops {
        let Op::Send { sender_id, recipient_id, client_id, text, at } = op else { continue };
        if fresh.contains(&(*sender_id, client_id.as_str())) || stored_before(tx, client_ids, *sender_id, client_id)? {
            continue;
        }
        fresh.insert((*sender_id, client_id.as_str()));
        sends.push((*index, *sender_id, *recipient_id, client_id.as_str(), text.as_str(), *at));
    }
    let mut ids: Vec<i64> = sends.iter().flat_map(|s| [s.1, s.2]).collect();
    ids.sort_unstable();
    ids.dedup();
    let mut users = accounts.known(&ids);
    {
        let mut read = tx.prepare_cached("SELECT username, deleted_at FROM users WHERE id = ?1")?;
        for &id in ids.iter().filter(|id| !users.contains_key(id)).collect::<Vec<_>>() {
            let Some(account) = read
                .query_row([id], |row| {
                    Ok((Arc::<str>::from(row.get::<_, String>(0)?), row.get::<_, Option<i64>>(1)?.is_some()))
                })
                .map(Some)
                .or_else(|e| if e == rusqlite::Error::QueryReturnedNoRows { Ok(None) } else { Err(e) })?
            else {
                return Err(Error::Corrupt(format!("a send names account {id}, which does not exist")));
            };
            accounts.learn(id, account.clone());
            users.insert(id, account);
        }
    }
    {
        let mut insert = tx.prepare_cached(
            "INSERT OR ROLLBACK INTO messages (id, sender_id, recipient_id, client_id, body, sent_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        for &(index, sender, recipient, client_id, text, at) in &sends {
            insert.execute((index, sender, recipient, client_id, text, at))?;
        }
    }
    let deliveries = deliveries_of_sends(&sends, &users, client_ids);
    if super::state::crash_test_abort_now(with_append) {
        tracing::error!(applied, last, with_append, "crash test: aborting inside an apply transaction");
        std::process::abort();
    }
    tx.prepare_cached(
        "INSERT INTO meta (name, value) VALUES ('applied_index', ?1) \
         ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )?
    .execute([last])?;
    Ok(Some(AppliedSends {
        last: last as u64,
        deliveries,
        messages: sends.len() as u64,
        entries: ops.len() as u64,
        took: started.elapsed(),
    }))
}

/// Whether `sender` has a stored message under `client_id`, read only when the map names candidates.
fn stored_before(tx: &Connection, client_ids: &ClientIds, sender: i64, client_id: &str) -> Result<bool> {
    let candidates = client_ids
        .candidates(sender, client_id)
        .ok_or_else(|| Error::Corrupt("the client id map is not loaded".to_owned()))?;
    let mut read = tx.prepare_cached("SELECT sender_id, client_id FROM messages WHERE id = ?1")?;
    for id in candidates {
        let row = read.query_row([id], |row| Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?)));
        match row {
            Ok((s, c)) if s == sender && c == client_id => return Ok(true),
            Ok(_) | Err(rusqlite::Error::QueryReturnedNoRows) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(false)
}

/// The writer's connection, with the settings of sqlx's writer connection (`super::sqlite_settings` and
/// `super::sqlite_writer_settings`).
fn open(path: &std::path::Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
    conn.execute_batch(&format!(
        "PRAGMA synchronous = FULL; PRAGMA busy_timeout = 10000; \
         PRAGMA wal_autocheckpoint = 10000; PRAGMA temp_store = MEMORY; {WRITER_CACHE}"
    ))?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}
