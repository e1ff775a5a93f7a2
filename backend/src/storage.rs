//! All SQL: opening the database, migrations, committing a log entry with its effect, and the read queries.
//!
//! Written once for SQLite and PostgreSQL through sqlx's `Any` driver: `$n` placeholders (both accept them),
//! BIGINT and TEXT columns only, and one per-backend fragment (the binary collation used for sorting names).
//! [`Db::commit_entry`] is the state machine: it applies an [`Op`] to the tables in the same transaction that
//! stores the log entry, reading nothing but the database and the op.

use std::str::FromStr;
use std::time::{Duration, Instant};

use replichat_shared::{Conversation, Message, ReceiptKind, ServerBody, SessionEnd};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::{AnyConnection, AnyPool, Connection, Row};

use crate::op::Op;
use crate::wildcard::{name_key, Pattern};
use crate::{Error, Result};

/// The migrations in `migrations/`, embedded at build time; one portable set for both backends.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Which database engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file (WAL mode, `synchronous=FULL`).
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

/// The rows of one `## name` section of a [`Db::dump`], each split on tabs (for tests and the bench's
/// checker, which compare replicas).
pub fn dump_section<'a>(dump: &'a str, name: &str) -> Vec<Vec<&'a str>> {
    let header = format!("## {name}");
    dump.lines()
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .map(|l| l.split('\t').collect())
        .collect()
}

/// Bound parameters per statement when installing a snapshot (SQLite allows 32,766, PostgreSQL 65,535).
const SNAPSHOT_BINDS: usize = 900;

/// A handle on the node's database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

/// A live or deleted account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Account id (the log index that created it).
    pub id: i64,
    /// Username as registered.
    pub username: String,
    /// argon2id PHC string; `None` once deleted.
    pub password_hash: Option<String>,
}

/// An event for one user, produced by applying an entry: stored for `resume` and pushed live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Who sees it.
    pub user_id: i64,
    /// The event frame: a stored event (`message`, `receipt`, `peer_deleted`), or the live-only
    /// `session_ended`, which is not stored.
    pub body: ServerBody,
    /// Only the sockets of this session (by token hash); `None`: every socket of the user.
    pub session: Option<String>,
}

/// One entry of the log as stored: the op is opaque JSON here, parsed only when applied.
pub type Entry = replichat_shared::WireEntry;

/// A table's name, its columns (name, is-integer), and its key order.
type Table = (&'static str, &'static [(&'static str, bool)], &'static str);

/// The replicated state tables, with their columns (true: integer, false: text) and key order: what a snapshot
/// carries and what `dump_state` prints.
const STATE_TABLES: &[Table] = &[
    (
        "users",
        &[
            ("id", true),
            ("username", false),
            ("name_key", false),
            ("live_key", false),
            ("password_hash", false),
            ("created_at", true),
            ("deleted_at", true),
            ("skeleton", false),
        ],
        "id",
    ),
    (
        "sessions",
        &[("token_hash", false), ("user_id", true), ("created_at", true), ("last_used_at", true)],
        "token_hash",
    ),
    (
        "messages",
        &[
            ("id", true),
            ("sender_id", true),
            ("recipient_id", true),
            ("client_id", false),
            ("body", false),
            ("sent_at", true),
            ("delivered_at", true),
            ("read_at", true),
        ],
        "id",
    ),
    ("events", &[("user_id", true), ("idx", true), ("body", false)], "user_id, idx"),
    ("login_failures", &[("user_id", true), ("failures", true), ("last_failure_at", true)], "user_id"),
];

/// Whether a replica may vote, as its database says (see [`Db::claim`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Membership {
    /// False for a learner: it neither votes nor stands for election (but for the very first election of a
    /// new cluster, where every log is empty), and the primary does not count its acknowledgements, until it
    /// has caught up with a primary.
    pub voter: bool,
    /// Random, chosen when the database was created (or taken over from another replica id): a database
    /// that was wiped or swapped has another one.
    pub incarnation: i64,
}

/// The whole replicated state as of one log entry: what a backup too far behind receives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// The last entry the state includes.
    pub last_index: u64,
    /// Its term.
    pub last_term: u64,
    /// Table name -> rows, each row its columns in `STATE_TABLES` order.
    pub tables: std::collections::BTreeMap<String, Vec<Vec<serde_json::Value>>>,
}

/// The columns every message query selects, joined with both users' names.
const MESSAGE_SELECT: &str = "SELECT m.id, s.username AS sender, r.username AS recipient, m.body, m.client_id, \
     m.sent_at, m.delivered_at, m.read_at, s.deleted_at AS sender_deleted \
     FROM messages m JOIN users s ON s.id = m.sender_id JOIN users r ON r.id = m.recipient_id";

/// See [`Db::transaction_connection`].
struct TxConnection {
    conn: sqlx::pool::PoolConnection<sqlx::Any>,
    finished: bool,
}

impl TxConnection {
    /// The transaction committed: the connection may be reused.
    fn finished(&mut self) {
        self.finished = true;
    }
}

impl std::ops::Deref for TxConnection {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.conn
    }
}

impl std::ops::DerefMut for TxConnection {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.conn
    }
}

impl Drop for TxConnection {
    fn drop(&mut self) {
        if !self.finished {
            tracing::warn!("a storage transaction failed; closing its connection (the next one is fresh)");
            self.conn.close_on_drop();
        }
    }
}

impl Db {
    /// Connect to `url` (`sqlite://path` or `postgres://...`), creating a SQLite file if missing, and run
    /// the migrations.
    pub async fn open(url: &str) -> Result<Db> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if url.starts_with("sqlite:") {
            create_private_sqlite(url)?;
            (Backend::Sqlite, sqlite_url(url)?)
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(Error::BadRequest(format!("unsupported database URL {url:?}: use sqlite:// or postgres://")));
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 4 } else { 8 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // Durability: a write is on disk when its commit returns. WAL lets readers run
                        // beside the single writer.
                        sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA synchronous = FULL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| damaged(e.into()))?;
        MIGRATOR.run(&pool).await.map_err(|e| damaged(e.into()))?;
        let db = Db { pool, backend };
        db.backfill_usernames().await.map_err(damaged)?;
        db.check_integrity().await.map_err(damaged)?;
        Ok(db)
    }

    /// Give accounts stored before migration 0003 their skeleton, and their key as [`name_key`] computes it
    /// now (NFKC; it was only lower case). Every replica runs the same function over the same rows, so the
    /// state stays identical. Row by row and idempotent: a row is done once its skeleton is set. Should two
    /// old live names now share a key, the later keeps its old one (a unique key cannot hold both).
    async fn backfill_usernames(&self) -> Result<()> {
        let rows = sqlx::query("SELECT id, username, live_key FROM users WHERE skeleton IS NULL ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        for row in rows {
            let id: i64 = row.try_get("id")?;
            let username: String = row.try_get("username")?;
            let live: Option<String> = row.try_get("live_key")?;
            let key = name_key(&username);
            let skeleton = crate::username::skeleton(&username);
            let rekeyed = sqlx::query("UPDATE users SET name_key = $2, live_key = $3, skeleton = $4 WHERE id = $1")
                .bind(id)
                .bind(&key)
                .bind(live.is_some().then_some(&key))
                .bind(&skeleton)
                .execute(&self.pool)
                .await;
            if rekeyed.is_err() {
                sqlx::query("UPDATE users SET skeleton = $2 WHERE id = $1")
                    .bind(id)
                    .bind(&skeleton)
                    .execute(&self.pool)
                    .await?;
            }
        }
        Ok(())
    }

    /// A pooled connection for one transaction. Unless [`TxConnection::finished`] is called after the commit,
    /// it is closed instead of going back to the pool: after a failed statement or COMMIT (a full disk) the
    /// connection's transaction state cannot be trusted. (Returned to the pool, a SQLite connection whose
    /// COMMIT failed kept a non-zero transaction depth, and every later transaction on it failed with
    /// "attempted to call begin_with at non-zero transaction depth", also once the disk had space again.)
    async fn transaction_connection(&self) -> Result<TxConnection> {
        Ok(TxConnection { conn: self.pool.acquire().await?, finished: false })
    }

    /// Refuse a database that is damaged: SQLite's `PRAGMA quick_check` (pages, b-trees, indexes), and on both
    /// engines the log's own consistency (entries contiguous from the compaction point, the applied index
    /// between the compaction point and the last entry). Run at start-up, before anything is served.
    pub async fn check_integrity(&self) -> Result<()> {
        if self.backend == Backend::Sqlite {
            let rows = sqlx::query("PRAGMA quick_check").fetch_all(&self.pool).await?;
            let findings: Vec<String> = rows.iter().map(|r| r.try_get::<String, _>(0)).collect::<Result<_, _>>()?;
            if findings != ["ok"] {
                let shown: Vec<&str> = findings.iter().take(5).map(String::as_str).collect();
                return Err(Error::Corrupt(format!("SQLite's integrity check failed: {}", shown.join("; "))));
            }
        }
        let row =
            sqlx::query("SELECT COUNT(*) AS n, MIN(idx) AS lo, MAX(idx) AS hi FROM log").fetch_one(&self.pool).await?;
        let n: i64 = row.try_get("n")?;
        let (compacted, _) = self.compacted().await?;
        let applied = self.applied_index().await?;
        let last = if n == 0 {
            compacted
        } else {
            let (lo, hi): (i64, i64) = (row.try_get("lo")?, row.try_get("hi")?);
            if lo as u64 != compacted + 1 || hi - lo + 1 != n {
                return Err(Error::Corrupt(format!(
                    "the log is not contiguous: {n} entries from {lo} to {hi}, after compaction point {compacted}"
                )));
            }
            hi as u64
        };
        if applied < compacted || applied > last {
            return Err(Error::Corrupt(format!(
                "applied index {applied} is outside the log (compaction point {compacted}, last entry {last})"
            )));
        }
        Ok(())
    }

    /// Bind this database to `replica_id` of cluster `cluster_id` on first use, and refuse it afterwards to
    /// any other replica id or cluster: a database copied or mounted under the wrong replica would otherwise
    /// be accepted silently, and its acknowledgements credited to the wrong id. `adopt` rebinds it instead
    /// (after a deliberate move, or a change of the cluster secret).
    ///
    /// Also says whether this replica may vote ([`Membership`]): a database created now (a new replica, or
    /// one whose disk was wiped), one taken over from another replica id, or one the operator marks with
    /// `rejoin` (restored from an older copy) holds less than this replica may have acknowledged, so it is a
    /// learner until it has caught up with a primary (see [`Db::become_voter`]).
    pub async fn claim(&self, replica_id: u64, cluster_id: i64, adopt: bool, rejoin: bool) -> Result<Membership> {
        let owner = (self.meta("replica_id").await?, self.meta("cluster_id").await?);
        let mine = (Some(replica_id as i64), Some(cluster_id));
        let mut voter = self.meta("voter").await?.is_none_or(|v| v != 0);
        let mut incarnation = self.meta("incarnation").await?;
        if let (Some(id), Some(cluster), true) = (owner.0, owner.1, owner != mine) {
            if !adopt {
                let whose = if id as u64 != replica_id {
                    format!("replica {id}, not replica {replica_id}")
                } else {
                    format!("replica {id} of another cluster (another cluster secret)")
                };
                return Err(Error::Corrupt(format!(
                    "this database belongs to {whose}; start the replica with its own database, or pass \
                     --adopt-database to rebind it to this replica (cluster {cluster:x} -> {cluster_id:x})"
                )));
            }
            tracing::warn!(from = id, to = replica_id, "--adopt-database: rebinding the database to this replica");
            if id as u64 != replica_id {
                // Another replica's log: this id may have acknowledged entries it does not hold.
                (voter, incarnation) = (false, None);
            }
        }
        if owner.0.is_none() {
            // Created now: a new replica, or one that lost its disk.
            (voter, incarnation) = (false, None);
        }
        if rejoin {
            voter = false;
        }
        let incarnation = incarnation.unwrap_or_else(|| rand::random::<i64>() & i64::MAX);
        let mut conn = self.pool.acquire().await?;
        let mut tx = conn.begin_with(self.begin_write()).await?;
        set_meta(&mut tx, "replica_id", replica_id as i64).await?;
        set_meta(&mut tx, "cluster_id", cluster_id).await?;
        set_meta(&mut tx, "incarnation", incarnation).await?;
        set_meta(&mut tx, "voter", voter as i64).await?;
        tx.commit().await?;
        Ok(Membership { voter, incarnation })
    }

    /// Record that this replica caught up with a primary (it holds every entry committed so far): it votes
    /// again, also after a restart.
    pub async fn become_voter(&self) -> Result<()> {
        let mut conn = self.transaction_connection().await?;
        let mut tx = conn.begin_with(self.begin_write()).await?;
        set_meta(&mut tx, "voter", 1).await?;
        tx.commit().await?;
        conn.finished();
        Ok(())
    }

    /// The engine behind this handle.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Close every connection (after in-flight queries finish).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// SQLite's `PRAGMA journal_mode` and `PRAGMA synchronous` as seen by a pooled connection; `None` on
    /// PostgreSQL. Lets tests check the durability settings are really in force.
    pub async fn sqlite_durability(&self) -> Result<Option<(String, i64)>> {
        if self.backend != Backend::Sqlite {
            return Ok(None);
        }
        let mut conn = self.pool.acquire().await?;
        let mode: String = sqlx::query("PRAGMA journal_mode").fetch_one(&mut *conn).await?.try_get(0)?;
        let sync: i64 = sqlx::query("PRAGMA synchronous").fetch_one(&mut *conn).await?.try_get(0)?;
        Ok(Some((mode, sync)))
    }

    /// The index and term of the last entry in the log (the compaction point when the log is empty).
    pub async fn last_entry(&self) -> Result<(u64, u64)> {
        let row = sqlx::query("SELECT idx, term FROM log ORDER BY idx DESC LIMIT 1").fetch_optional(&self.pool).await?;
        match row {
            Some(row) => Ok((row.try_get::<i64, _>("idx")? as u64, row.try_get::<i64, _>("term")? as u64)),
            None => self.compacted().await,
        }
    }

    /// The last entry removed by compaction (or replaced by a snapshot) and its term; (0, 0) if none.
    pub async fn compacted(&self) -> Result<(u64, u64)> {
        let index = self.meta("compacted_index").await?.unwrap_or(0) as u64;
        let term = self.meta("compacted_term").await?.unwrap_or(0) as u64;
        Ok((index, term))
    }

    /// The term of the entry at `index`: known for the compaction point and every entry after it; `None`
    /// past the end of the log or before the compaction point.
    pub async fn term_at(&self, index: u64) -> Result<Option<u64>> {
        let row =
            sqlx::query("SELECT term FROM log WHERE idx = $1").bind(index as i64).fetch_optional(&self.pool).await?;
        if let Some(row) = row {
            return Ok(Some(row.try_get::<i64, _>("term")? as u64));
        }
        let (compacted, term) = self.compacted().await?;
        Ok((index == compacted).then_some(term))
    }

    /// Drop applied entries older than the newest `keep` ones, remembering the last dropped entry's term.
    pub async fn compact(&self, keep: u64) -> Result<Option<u64>> {
        let applied = self.applied_index().await?;
        let cut = applied.saturating_sub(keep);
        let (compacted, _) = self.compacted().await?;
        if cut <= compacted {
            return Ok(None);
        }
        let Some(term) = self.term_at(cut).await? else { return Ok(None) };
        let mut conn = self.transaction_connection().await?;
        let mut tx = conn.begin_with(self.begin_write()).await?;
        sqlx::query("DELETE FROM log WHERE idx <= $1").bind(cut as i64).execute(&mut *tx).await?;
        set_meta(&mut tx, "compacted_index", cut as i64).await?;
        set_meta(&mut tx, "compacted_term", term as i64).await?;
        tx.commit().await?;
        conn.finished();
        Ok(Some(cut))
    }

    /// The applied state, consistently read in one transaction.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let mut conn = self.transaction_connection().await?;
        // Every statement below must see the same state (SQLite's read transactions always do).
        let begin = match self.backend {
            Backend::Sqlite => "BEGIN",
            Backend::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ",
        };
        let mut tx = conn.begin_with(begin).await?;
        let applied = get_meta(&mut *tx, "applied_index").await?.unwrap_or(0) as u64;
        let term = match sqlx::query("SELECT term FROM log WHERE idx = $1")
            .bind(applied as i64)
            .fetch_optional(&mut *tx)
            .await?
        {
            Some(row) => row.try_get::<i64, _>("term")? as u64,
            None => get_meta(&mut *tx, "compacted_term").await?.unwrap_or(0) as u64,
        };
        let mut tables = std::collections::BTreeMap::new();
        for (table, columns, order) in STATE_TABLES {
            let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
            let sql = format!("SELECT {} FROM {table} ORDER BY {order}", names.join(", "));
            let rows = sqlx::query(&sql).fetch_all(&mut *tx).await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let mut cells = Vec::with_capacity(columns.len());
                for (i, (_, integer)) in columns.iter().enumerate() {
                    cells.push(if *integer {
                        row.try_get::<Option<i64>, _>(i)?.map_or(serde_json::Value::Null, Into::into)
                    } else {
                        row.try_get::<Option<String>, _>(i)?.map_or(serde_json::Value::Null, Into::into)
                    });
                }
                out.push(cells);
            }
            tables.insert((*table).to_owned(), out);
        }
        tx.commit().await?;
        conn.finished();
        Ok(Snapshot { last_index: applied, last_term: term, tables })
    }

    /// Replace the whole state and log with `snapshot`, in one transaction.
    pub async fn install_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        let mut conn = self.transaction_connection().await?;
        let mut tx = conn.begin_with(self.begin_write()).await?;
        sqlx::query("DELETE FROM log").execute(&mut *tx).await?;
        for (table, columns, _) in STATE_TABLES {
            sqlx::query(&format!("DELETE FROM {table}")).execute(&mut *tx).await?;
            let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
            let rows = snapshot.tables.get(*table).map(Vec::as_slice).unwrap_or_default();
            // Many rows per statement: one statement per row made a 100,000-message snapshot take seconds to
            // install (every statement is a round trip to the driver's thread).
            for chunk in rows.chunks((SNAPSHOT_BINDS / columns.len()).max(1)) {
                let tuples: Vec<String> = (0..chunk.len())
                    .map(|r| {
                        let params: Vec<String> =
                            (1..=columns.len()).map(|c| format!("${}", r * columns.len() + c)).collect();
                        format!("({})", params.join(", "))
                    })
                    .collect();
                let sql = format!("INSERT INTO {table} ({}) VALUES {}", names.join(", "), tuples.join(", "));
                let mut query = sqlx::query(&sql);
                for row in chunk {
                    if row.len() != columns.len() {
                        return Err(Error::Corrupt(format!("snapshot row of {table} has {} cells", row.len())));
                    }
                    for (cell, (_, integer)) in row.iter().zip(columns.iter()) {
                        query = if *integer {
                            query.bind(cell.as_i64())
                        } else {
                            query.bind(cell.as_str().map(str::to_owned))
                        };
                    }
                }
                query.execute(&mut *tx).await?;
            }
        }
        set_meta(&mut tx, "applied_index", snapshot.last_index as i64).await?;
        set_meta(&mut tx, "compacted_index", snapshot.last_index as i64).await?;
        set_meta(&mut tx, "compacted_term", snapshot.last_term as i64).await?;
        tx.commit().await?;
        conn.finished();
        Ok(())
    }

    /// Durably append `entries` (consecutive, in order). An existing entry with the same index and term is
    /// kept; one with another term, and everything after it, is replaced (it was never committed). Returns
    /// the new last (index, term).
    pub async fn append_entries(&self, entries: &[Entry]) -> Result<(u64, u64)> {
        let mut conn = self.transaction_connection().await?;
        let started = Instant::now();
        let mut tx = conn.begin_with(self.begin_write()).await?;
        let mut truncated = false;
        let mut written = 0;
        for entry in entries {
            if !truncated {
                let existing = sqlx::query("SELECT term FROM log WHERE idx = $1")
                    .bind(entry.index as i64)
                    .fetch_optional(&mut *tx)
                    .await?
                    .map(|r| r.try_get::<i64, _>("term"))
                    .transpose()?;
                match existing {
                    Some(term) if term as u64 == entry.term => continue,
                    Some(_) => {
                        sqlx::query("DELETE FROM log WHERE idx >= $1")
                            .bind(entry.index as i64)
                            .execute(&mut *tx)
                            .await?;
                        truncated = true;
                    }
                    None => truncated = true,
                }
            }
            sqlx::query("INSERT INTO log (idx, term, op) VALUES ($1, $2, $3)")
                .bind(entry.index as i64)
                .bind(entry.term as i64)
                .bind(&entry.op)
                .execute(&mut *tx)
                .await?;
            written += 1;
        }
        tx.commit().await?;
        conn.finished();
        crate::metrics::log_appended(written, started.elapsed());
        self.last_entry().await
    }

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

    /// The node's durable election state: its current term and whom it voted for in that term.
    pub async fn election_state(&self) -> Result<(u64, Option<u64>)> {
        let term = self.meta("term").await?.unwrap_or(0) as u64;
        let voted = self.meta("voted_for").await?.filter(|v| *v >= 0).map(|v| v as u64);
        Ok((term, voted))
    }

    /// Durably record the term and vote (before acting on them).
    pub async fn save_election_state(&self, term: u64, voted_for: Option<u64>) -> Result<()> {
        let mut conn = self.transaction_connection().await?;
        let mut tx = conn.begin_with(self.begin_write()).await?;
        set_meta(&mut tx, "term", term as i64).await?;
        set_meta(&mut tx, "voted_for", voted_for.map_or(-1, |v| v as i64)).await?;
        tx.commit().await?;
        conn.finished();
        Ok(())
    }

    async fn meta(&self, name: &str) -> Result<Option<i64>> {
        get_meta(&self.pool, name).await
    }

    /// Log entries with an index greater than `after`, in order, at most `limit`.
    pub async fn entries(&self, after: u64, limit: u32) -> Result<Vec<Entry>> {
        let rows = sqlx::query("SELECT idx, term, op FROM log WHERE idx > $1 ORDER BY idx LIMIT $2")
            .bind(after as i64)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let index = row.try_get::<i64, _>("idx")? as u64;
                Ok(Entry { index, term: row.try_get::<i64, _>("term")? as u64, op: row.try_get("op")? })
            })
            .collect()
    }

    /// The live account with this username (ignoring case).
    pub async fn user_by_name(&self, username: &str) -> Result<Option<User>> {
        let row = sqlx::query("SELECT id, username, password_hash FROM users WHERE live_key = $1")
            .bind(name_key(username))
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(user_from_row).transpose()
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
    pub async fn message_by_client_id(&self, sender_id: i64, client_id: &str) -> Result<Option<Message>> {
        let sql = format!("{MESSAGE_SELECT} WHERE m.sender_id = $1 AND m.client_id = $2");
        let row = sqlx::query(&sql).bind(sender_id).bind(client_id).fetch_optional(&self.pool).await?;
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
        let mut query = sqlx::query(&sql).bind(after).bind(limit as i64);
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
        let rows = sqlx::query(&sql)
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
        let rows = sqlx::query(&sql).bind(me).bind(after).bind(up_to).bind(limit as i64).fetch_all(&self.pool).await?;
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
        let row = sqlx::query(&sql).bind(me).bind(up_to).bind(from.unwrap_or(-1)).fetch_one(&self.pool).await?;
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
            let last = message_from_row(&sqlx::query(&sql).bind(last_id).fetch_one(&self.pool).await?)?;
            let peer_row = sqlx::query("SELECT username, deleted_at FROM users WHERE id = $1")
                .bind(peer)
                .fetch_one(&self.pool)
                .await?;
            out.push((
                peer,
                Conversation {
                    with: peer_row.try_get("username")?,
                    deleted: peer_row.try_get::<Option<i64>, _>("deleted_at")?.is_some(),
                    online: false,
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

    /// `user_id`'s stored events with an index greater than `cursor`, in index order, at most `limit` of them
    /// (one page of a `resume` backlog), each with its index.
    pub async fn events_after(&self, user_id: i64, cursor: u64, limit: u32) -> Result<Vec<(u64, ServerBody)>> {
        let rows = sqlx::query("SELECT idx, body FROM events WHERE user_id = $1 AND idx > $2 ORDER BY idx LIMIT $3")
            .bind(user_id)
            .bind(cursor.min(i64::MAX as u64) as i64)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let index: i64 = row.try_get("idx")?;
                let body: String = row.try_get("body")?;
                let body = serde_json::from_str(&body).map_err(|e| Error::Corrupt(format!("event: {e}")))?;
                Ok((index as u64, body))
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
                "SELECT id, username, name_key, live_key, password_hash, created_at, deleted_at, skeleton \
                 FROM users ORDER BY id",
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
            for row in sqlx::query(sql).fetch_all(&self.pool).await? {
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

    /// How a writing transaction starts. SQLite must take the write lock up front: a transaction that reads
    /// first and upgrades later fails at once with "database is locked" if another writer got there first
    /// (the busy timeout does not apply to upgrades).
    fn begin_write(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        }
    }

    /// The collation that sorts names by their bytes on this backend, so paging order is the same
    /// everywhere (PostgreSQL would otherwise use the database's locale).
    fn binary_collation(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "",
            Backend::Postgres => "COLLATE \"C\"",
        }
    }
}

/// Create the SQLite file of `url` if it does not exist yet, readable and writable by its owner only (0600),
/// whatever the umask: it holds password hashes, session hashes and every message. SQLite gives the `-wal`
/// and `-shm` files it creates beside it the same mode. An existing file keeps the mode its owner gave it.
fn create_private_sqlite(url: &str) -> Result<()> {
    if url.contains(":memory:") || url.contains("mode=memory") {
        return Ok(());
    }
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?;
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut file, 0o600);
    match file.open(options.get_filename()) {
        // An empty file is an empty database to SQLite.
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// `sqlite://path` with `mode=rwc` added so the file is created on first start.
fn sqlite_url(url: &str) -> Result<String> {
    if url.contains("mode=") || url.contains(":memory:") {
        return Ok(url.to_owned());
    }
    let sep = if url.contains('?') { '&' } else { '?' };
    Ok(format!("{url}{sep}mode=rwc"))
}

/// A counter from `meta`, read through `executor` (the pool, or an open transaction).
/// Say plainly that a database SQLite finds damaged (SQLITE_CORRUPT, SQLITE_NOTADB) is damaged, and what to do.
fn damaged(error: Error) -> Error {
    let code = match &error {
        Error::Db(sqlx::Error::Database(e)) => e.code().and_then(|c| c.parse::<u32>().ok()),
        Error::Migrate(sqlx::migrate::MigrateError::Execute(sqlx::Error::Database(e))) => {
            e.code().and_then(|c| c.parse::<u32>().ok())
        }
        Error::Corrupt(_) => return corrupt_advice(error.to_string()),
        _ => None,
    };
    match code.map(|c| c & 0xff) {
        Some(11 | 26) => corrupt_advice(format!("SQLite's integrity check failed: {error}")),
        _ => error,
    }
}

fn corrupt_advice(what: String) -> Error {
    Error::Corrupt(format!(
        "the database is damaged ({what}); this replica will not start on it. Keep the file for inspection, and \
         either restore it from a backup or start this replica on an empty database, which the primary fills \
         (only while the other replicas are up and in sync)"
    ))
}

async fn get_meta<'e, E>(executor: E, name: &str) -> Result<Option<i64>>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let row = sqlx::query("SELECT value FROM meta WHERE name = $1").bind(name).fetch_optional(executor).await?;
    row.map(|r| Ok(r.try_get::<i64, _>("value")?)).transpose()
}

async fn set_meta(tx: &mut AnyConnection, name: &str, value: i64) -> Result<()> {
    sqlx::query(
        "INSERT INTO meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    )
    .bind(name)
    .bind(value)
    .execute(&mut *tx)
    .await?;
    Ok(())
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

/// Live accounts that exchanged messages with `me`, in id order.
async fn contacts<'e, E>(executor: E, me: i64) -> Result<Vec<i64>>
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

fn user_from_row(row: &AnyRow) -> Result<User> {
    Ok(User {
        id: row.try_get("id")?,
        username: row.try_get("username")?,
        password_hash: row.try_get("password_hash")?,
    })
}

fn message_from_row(row: &AnyRow) -> Result<Message> {
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

/// One cell of a dump row as text; NULL shows as `∅`.
fn cell(row: &AnyRow, i: usize) -> Result<String> {
    if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
        return Ok(v.map_or_else(|| "∅".to_owned(), |v| v.to_string()));
    }
    let v: Option<String> = row.try_get(i)?;
    Ok(v.unwrap_or_else(|| "∅".to_owned()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small tmpfs mounted for the test (root needed), unmounted on drop.
    pub(crate) struct Tmpfs(pub(crate) std::path::PathBuf);

    impl Tmpfs {
        pub(crate) fn mount(size: &str) -> Tmpfs {
            let dir = std::env::temp_dir().join(format!("replichat-tmpfs-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&dir).unwrap();
            let options = format!("size={size}");
            let status = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &options, "tmpfs"])
                .arg(&dir)
                .status()
                .expect("run mount (root needed)");
            assert!(status.success(), "mount a tmpfs on {} (root needed)", dir.display());
            Tmpfs(dir)
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }

    /// Fill the file system under `path` with a file, until it is full.
    pub(crate) fn fill(path: &std::path::Path) {
        use std::io::Write;
        let mut file = std::fs::File::create(path).unwrap();
        let block = vec![0u8; 4096];
        while file.write_all(&block).and_then(|_| file.sync_all()).is_ok() {}
    }

    #[tokio::test]
    async fn after_a_full_disk_every_connection_works_again_once_there_is_space() {
        let tmpfs = Tmpfs::mount("4m");
        let db = Db::open(&format!("sqlite://{}", tmpfs.0.join("replica.db").display())).await.unwrap();
        let filler = tmpfs.0.join("filler");
        fill(&filler);
        let entry = |index: u64| Entry { index, term: 1, op: "x".repeat(3000) };
        let mut index = 1;
        let error = loop {
            match db.append_entries(&[entry(index)]).await {
                Ok(_) => index += 1,
                Err(e) => break e,
            }
            assert!(index < 10_000, "the disk never filled up");
        };
        assert!(error.to_string().contains("full"), "{error}");
        std::fs::remove_file(&filler).unwrap();
        // More transactions than the pool has connections, each kind of write: none may still be stuck in
        // the failed one.
        for _ in 0..8 {
            db.append_entries(&[entry(index)]).await.expect("append once there is space again");
            index += 1;
            db.save_election_state(1, Some(0)).await.expect("save the election state once there is space again");
        }
        assert_eq!(db.last_entry().await.unwrap(), (index - 1, 1));
        db.close().await;
    }
}
