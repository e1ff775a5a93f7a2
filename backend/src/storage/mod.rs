//! All SQL: opening the database, migrations, the log, the state machine that applies it, snapshots and the
//! read queries. Nothing outside this module spells SQL.
//!
//! Written once for SQLite and PostgreSQL through sqlx's `Any` driver: `$n` placeholders (both accept them;
//! multi-row statements spell theirs with [`Backend::values`], anonymous on SQLite),
//! BIGINT and TEXT columns only, and one per-backend fragment (the binary collation used for sorting names).
//! By job:
//! - this file: the pool and engine, start-up checks, the node's own `meta` (ownership, election state), and
//!   the shared types;
//! - [`log`]: appending, truncating, reading and compacting the replicated log;
//! - [`state`]: the state machine, which applies committed entries to the tables in one transaction with the
//!   applied index, reading nothing but the database and the op;
//! - [`writer`]: SQLite's writer thread, which runs the hot writes (a log append past the end of the log, the
//!   apply of a batch of sends, and, on the primary of a cluster of one, both in one transaction) as one job
//!   each through SQLite's own API (rusqlite), not sqlx;
//! - [`client_ids`]: the applier's in-memory map of the senders' client ids (what decides a repeated `send`);
//! - [`queries`]: the read queries the chat serves, and the canonical dump;
//! - [`snapshot`]: reading and installing the whole state.

mod client_ids;
mod log;
mod queries;
mod snapshot;
mod state;
mod writer;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use replichat_shared::ServerBody;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, AssertSqlSafe, Connection, Row, SqlSafeStr, SqlStr};

use crate::wildcard::name_key;
use crate::{Error, Result};

pub use snapshot::{Snapshot, SnapshotChunk, SnapshotInstall, SnapshotStream};

/// Bound parameters per multi-row statement: far below SQLite's limit (32,766) and PostgreSQL's (65,535), and
/// a statement of this size is already past the point where a bigger one saves anything.
const MAX_BINDS: usize = 900;

/// The SQLite writer connection's page cache: 16 MiB (see [`sqlite_writer_settings`]).
const WRITER_CACHE: &str = "PRAGMA cache_size = -16384";

/// The migrations in `migrations/`, embedded at build time; one portable set for both backends.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// SQL composed at run time, for the statements that cannot be a literal: multi-row statements (their
/// placeholder lists, [`Backend::values`] and [`Backend::params`]) and those with a per-backend fragment, a
/// table name or a column chosen from this module's own constants. sqlx (0.9) takes only `&'static str` as
/// SQL unless a string is asserted safe; this is the one place that asserts it, for strings that hold nothing
/// but this module's text and placeholders: every value is bound, never formatted in.
///
/// (sqlx's `QueryBuilder` is not used for the multi-row statements: through the `Any` driver it spells every
/// placeholder `?`, which PostgreSQL does not accept.)
fn composed(sql: String) -> SqlStr {
    AssertSqlSafe(sql).into_sql_str()
}

/// Which database engine a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file (WAL mode, `synchronous=FULL`).
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

impl Backend {
    /// The VALUES list of a multi-row INSERT of `rows` rows of `columns` each: `($1, $2), ($3, $4), …` on
    /// PostgreSQL, `(?, ?), (?, ?), …` on SQLite.
    ///
    /// SQLite gets anonymous parameters because sqlx binds each parameter after asking SQLite its name, and
    /// SQLite finds a numbered parameter's name by scanning the statement's list of names: quadratic in the
    /// number of parameters, which for a 900-parameter insert was 6.5 % of all the CPU three SQLite replicas
    /// used under load (a `perf` profile of `bench load --target sqlite3`). An anonymous `?` has no name, so
    /// the lookup returns at once; its number is its position, which is the order the values are bound in.
    fn values(self, rows: usize, columns: usize) -> String {
        let mut out = String::with_capacity(rows * columns * 6);
        for r in 0..rows {
            if r > 0 {
                out.push_str(", ");
            }
            out.push('(');
            out.push_str(&self.params(r * columns, columns));
            out.push(')');
        }
        out
    }

    /// `count` parameters separated by commas, numbered from `after + 1` on PostgreSQL (`$3, $4`), anonymous
    /// on SQLite (`?, ?`; see [`Backend::values`]).
    fn params(self, after: usize, count: usize) -> String {
        let mut out = String::with_capacity(count * 6);
        for i in 1..=count {
            if i > 1 {
                out.push_str(", ");
            }
            match self {
                Backend::Sqlite => out.push('?'),
                Backend::Postgres => {
                    use std::fmt::Write;
                    let _ = write!(out, "${}", after + i);
                }
            }
        }
        out
    }
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

/// A handle on the node's database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
    /// Live accounts by name key, filled by lookups and emptied by the applier (see [`NameIndex`]).
    names: std::sync::Arc<NameIndex>,
    /// Which message each (sender, client id) may name, kept by the applier (see [`client_ids`]).
    client_ids: std::sync::Arc<client_ids::ClientIds>,
    /// The name and deletion of the accounts the applier's sends named (see [`state::Accounts`]).
    accounts: std::sync::Arc<state::Accounts>,
    /// SQLite: the one connection every writing transaction runs on (see [`Db::transaction_connection`]);
    /// `None` on PostgreSQL (and for an in-memory SQLite database), where writes take pooled connections.
    writer: Option<std::sync::Arc<SqliteWriter>>,
}

/// The connections SQLite writes go through, one transaction at a time, queued in-process: the writer thread's
/// ([`writer`]: log appends past the end, applies of sends) and sqlx's (every other write), which take turns
/// under one lock. SQLite has one write lock per database: writers on several connections wait for it in
/// SQLite's busy handler, which sleeps (1, 2, 5, 10 ms, ...) and retries, so a log append and an apply that
/// collide lose milliseconds. Queued on a tokio mutex instead, the next writer starts the moment the previous
/// one commits. Each connects on first use, and again after a transaction that failed on it (its state cannot
/// be trusted).
pub(crate) struct SqliteWriter {
    options: AnyConnectOptions,
    /// The log appends and the applies of sends (see [`writer`]), run while `conn`'s lock is held.
    thread: writer::WriterThread,
    /// sqlx's writer connection, and the lock both writers take turns under.
    conn: std::sync::Arc<tokio::sync::Mutex<Option<AnyConnection>>>,
    /// Entries applied in the transaction that appended them ([`Db::append_committing`]), whose events the
    /// applier has not taken yet: the applied index they reached, and the events, in index order. Set while
    /// `conn`'s lock is held, and taken under it too unless they reach as far as the applier asks (see
    /// `Db::apply_range`), so the events always come out before those of a later apply.
    applied_ahead: std::sync::Mutex<Option<(u64, Vec<Delivery>)>>,
}

impl std::fmt::Debug for SqliteWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteWriter").finish_non_exhaustive()
    }
}

/// An in-memory index of live accounts, name key -> account id: what a `send` resolves its recipient with,
/// without a query. Filled on demand from the database ([`Db::live_user_id`]); emptied whenever the
/// accounts may have changed under it: after the applier committed an op that changes accounts (before the
/// writer that proposed it is answered, so before it releases the write gate), after a snapshot install,
/// and after an apply that was rolled back. A lookup that read the database while it was emptied does not
/// fill it (the generation moved), so a name read before a deletion committed is never cached after it.
#[derive(Debug, Default)]
pub(crate) struct NameIndex {
    inner: std::sync::Mutex<(u64, std::collections::HashMap<String, i64>)>,
}

impl NameIndex {
    /// Entries kept at most; beyond that the index starts again (it is a cache, not the truth).
    const CAPACITY: usize = 100_000;

    /// The cached id for `key`, or the generation to fill it under.
    fn get(&self, key: &str) -> Result<i64, u64> {
        let inner = self.inner.lock().expect("name index lock");
        inner.1.get(key).copied().ok_or(inner.0)
    }

    /// Cache `key -> id`, read from the database in `generation`, unless the index was emptied since.
    fn fill(&self, generation: u64, key: String, id: i64) {
        let mut inner = self.inner.lock().expect("name index lock");
        if inner.0 == generation {
            if inner.1.len() >= Self::CAPACITY {
                inner.1.clear();
            }
            inner.1.insert(key, id);
        }
    }

    /// Forget everything.
    fn invalidate(&self) {
        let mut inner = self.inner.lock().expect("name index lock");
        inner.0 += 1;
        inner.1.clear();
    }
}

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
    /// A replayable event's JSON, encoded once when it is applied: the text stored in `events` (a message's
    /// events are derived from its row instead), and the very frame each of the user's sockets is sent (a push
    /// has no `req`, so its frame is the body alone). Events for several users (a message, for its recipient
    /// and its sender) share it. `None` for live-only frames.
    pub json: Option<Arc<str>>,
}

/// One entry of the log as stored: the op is opaque JSON here, parsed only when applied.
pub type Entry = replichat_shared::WireEntry;

/// See [`Db::transaction_connection`].
struct TxConnection {
    conn: Held,
    finished: bool,
}

/// Where a [`TxConnection`]'s connection comes from.
enum Held {
    Pool(sqlx::pool::PoolConnection<sqlx::Any>),
    /// SQLite's writer, held exclusively; `Some` while held.
    Writer(tokio::sync::OwnedMutexGuard<Option<AnyConnection>>),
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
        match &self.conn {
            Held::Pool(conn) => conn,
            Held::Writer(conn) => conn.as_ref().expect("the writer is connected while held"),
        }
    }
}

impl std::ops::DerefMut for TxConnection {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match &mut self.conn {
            Held::Pool(conn) => conn,
            Held::Writer(conn) => conn.as_mut().expect("the writer is connected while held"),
        }
    }
}

impl Drop for TxConnection {
    fn drop(&mut self) {
        if !self.finished {
            tracing::warn!("a storage transaction failed; closing its connection (the next one is fresh)");
            match &mut self.conn {
                Held::Pool(conn) => conn.close_on_drop(),
                // Dropped: SQLite rolls back what it left open; the next writer connects again.
                Held::Writer(conn) => drop(conn.take()),
            }
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
                        sqlite_settings(conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options.clone())
            .await
            .map_err(|e| damaged(e.into()))?;
        MIGRATOR.run(&pool).await.map_err(|e| damaged(e.into()))?;
        let in_memory = url.contains(":memory:") || url.contains("mode=memory");
        let writer = match (backend, in_memory) {
            (Backend::Sqlite, false) => {
                let path = sqlx::sqlite::SqliteConnectOptions::from_str(&url)?.get_filename().to_owned();
                let thread = writer::WriterThread::start(path);
                Some(std::sync::Arc::new(SqliteWriter {
                    options,
                    thread,
                    conn: Default::default(),
                    applied_ahead: Default::default(),
                }))
            }
            _ => None,
        };
        let db = Db {
            pool,
            backend,
            names: Default::default(),
            client_ids: Default::default(),
            accounts: Default::default(),
            writer,
        };
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
    ///
    /// For a writing transaction: on SQLite the one writer connection ([`SqliteWriter`]), waited for
    /// in-process; on PostgreSQL a pooled connection.
    async fn transaction_connection(&self) -> Result<TxConnection> {
        let Some(writer) = &self.writer else { return self.read_transaction_connection().await };
        let mut conn = writer.conn.clone().lock_owned().await;
        if conn.is_none() {
            let mut fresh = AnyConnection::connect_with(&writer.options).await?;
            sqlite_settings(&mut fresh).await?;
            sqlite_writer_settings(&mut fresh).await?;
            *conn = Some(fresh);
        }
        Ok(TxConnection { conn: Held::Writer(conn), finished: false })
    }

    /// A pooled connection for one transaction that only reads (see [`Db::transaction_connection`]).
    async fn read_transaction_connection(&self) -> Result<TxConnection> {
        Ok(TxConnection { conn: Held::Pool(self.pool.acquire().await?), finished: false })
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
        let mut conn = self.transaction_connection().await?;
        let mut tx = conn.begin_with(self.begin_write()).await?;
        set_meta(&mut tx, "replica_id", replica_id as i64).await?;
        set_meta(&mut tx, "cluster_id", cluster_id).await?;
        set_meta(&mut tx, "incarnation", incarnation).await?;
        set_meta(&mut tx, "voter", voter as i64).await?;
        tx.commit().await?;
        conn.finished();
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
        if let Some(writer) = &self.writer {
            if let Some(conn) = writer.conn.lock().await.take() {
                let _ = conn.close().await;
            }
            writer.thread.close().await;
        }
        self.pool.close().await;
    }

    /// SQLite's `PRAGMA journal_mode`, `PRAGMA synchronous`, `PRAGMA temp_store` and `PRAGMA cache_size` as
    /// each writer connection sees them between two transactions: the writer thread's (which appends to the log
    /// and applies sends, see [`writer`]) and sqlx's (every other write); `None` on PostgreSQL and for an
    /// in-memory database. Lets tests check the settings are really in force.
    pub async fn sqlite_durability(&self) -> Result<Option<Vec<(String, i64, i64, i64)>>> {
        let Some(writer) = &self.writer else { return Ok(None) };
        let thread = writer.thread.durability().await?;
        let mut conn = self.transaction_connection().await?;
        let mode: String = sqlx::query("PRAGMA journal_mode").fetch_one(&mut *conn).await?.try_get(0)?;
        let sync: i64 = sqlx::query("PRAGMA synchronous").fetch_one(&mut *conn).await?.try_get(0)?;
        let temp: i64 = sqlx::query("PRAGMA temp_store").fetch_one(&mut *conn).await?.try_get(0)?;
        let cache: i64 = sqlx::query("PRAGMA cache_size").fetch_one(&mut *conn).await?.try_get(0)?;
        conn.finished();
        Ok(Some(vec![thread, (mode, sync, temp, cache)]))
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

/// Every SQLite connection's settings. Durability: a write is on disk when its commit returns. WAL lets
/// readers run beside the single writer. The busy timeout is for what still waits on SQLite's lock: a
/// reader during a checkpoint, a write at start-up.
///
/// The WAL is copied into the database file (checkpointed) once it holds 10,000 pages, 40 MB, not SQLite's
/// default 1,000: under load every commit rewrites the same few index pages of each user (the newest of their
/// messages and events), and a checkpoint copies a page once however often it was rewritten, so a larger
/// WAL writes less in all (three interleaved rounds of `bench load --target sqlite3`: 3,798–4,383 msg/s and
/// 334–360 µs per message, against 3,314–3,637 and 384–408 with the default; BENCHMARKS.md). The cost: the
/// WAL file keeps its largest size, about 40 MB per replica, and a restart after a crash reads up to that much.
async fn sqlite_settings(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
    sqlx::query("PRAGMA synchronous = FULL").execute(&mut *conn).await?;
    sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
    sqlx::query("PRAGMA wal_autocheckpoint = 10000").execute(&mut *conn).await?;
    Ok(())
}

/// The writer connection's settings, beyond [`sqlite_settings`]. Its statement journals stay in memory
/// (`temp_store = MEMORY`): a multi-row INSERT inside a transaction keeps the pages it changed in a statement
/// journal, so that a failing row undoes only its statement, and SQLite spills that journal into a new temp
/// file once it passes 64 KiB: a backup under load created, wrote and deleted 8 of them a second (strace).
/// In memory, three replicas used 1-14 % less CPU per message in three rounds whose order was not alternated
/// (BENCHMARKS.md, stop 19). The applier's INSERTs have kept no statement journal since (`INSERT OR IGNORE`,
/// see `state::insert_events`), nor do the writer thread's single-row INSERTs ([`writer`]); a log append that
/// met stored entries (its multi-row INSERT, on this connection) still does. A writing statement is at most [`MAX_BINDS`]
/// values, so its journal stays small. Readers keep the default: their sorts may be large and belong on disk.
///
/// The writer keeps 16 MiB of pages in its cache ([`WRITER_CACHE`]), not SQLite's default 2 MB: every message
/// inserts into per-user indexes (by recipient and by sender; until migration 0006 also the sender's client
/// ids), each at that user's newest page, so what a writer keeps rewriting is a few pages per active user plus
/// the tails of the log and of the messages table. 2 MB (500 pages of 4 KiB) held that for fewer than about 150
/// active users (with three indexes); past that the pages fall out of the cache between two transactions and
/// are read back from the WAL or the file on each touch. With 200 users sending (`bench load --target sqlite3`, /proc/PID/io, against
/// the build before): the backups read 8 MB/s from the OS instead of 47–50, the primary 21 instead of 43, so
/// the writer no longer depends on the OS keeping its WAL and file cached. Throughput on this machine, where
/// those reads hit the OS cache, is within the noise (four interleaved rounds: 10,917–12,471 msg/s against
/// 11,498–12,188; BENCHMARKS.md, stop 22); 64 MiB, or 16 MiB on every connection, measured the same. The
/// cost: up to 16 MiB more memory per replica once the writer has touched that many pages (an idle replica's
/// cache stays empty).
async fn sqlite_writer_settings(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    sqlx::query("PRAGMA temp_store = MEMORY").execute(&mut *conn).await?;
    sqlx::query(WRITER_CACHE).execute(&mut *conn).await?;
    Ok(())
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

/// A counter from `meta`, read through `executor` (the pool, or an open transaction).
async fn get_meta<'e, E>(executor: E, name: &str) -> Result<Option<i64>>
where
    E: sqlx::Executor<'e, Database = sqlx::Any>,
{
    let row = sqlx::query("SELECT value FROM meta WHERE name = $1").bind(name).fetch_optional(executor).await?;
    row.map(|r| Ok(r.try_get::<i64, _>("value")?)).transpose()
}

/// Set a counter in `meta` inside a writing transaction.
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

    #[test]
    fn every_migration_file_is_embedded() {
        // `sqlx::migrate!` reads `migrations/` at compile time; without `build.rs` a migration added since the
        // last build was not compiled in, and the binary and the tests ran the old schema.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../migrations");
        let files = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "sql"))
            .count();
        assert_eq!(MIGRATOR.iter().count(), files, "migrations embedded against files in {}", dir.display());
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
