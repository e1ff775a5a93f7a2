//! Snapshots: the whole replicated state read consistently, and installed in place of the state and log (what
//! a backup too far behind receives).
//!
//! Both halves stream. [`Db::snapshot_stream`] reads the state in one read transaction (SQLite: one WAL read
//! snapshot; PostgreSQL: REPEATABLE READ, READ ONLY) and hands it out as [`SnapshotChunk`]s of a bounded size
//! through a small channel: a reader that stops taking chunks stops the scan, so the state is never all in
//! memory.
//!
//! A chunk's rows travel as JSON text built and taken apart by the database itself (`json_array` /
//! `json_build_array` per row on the way out, one `INSERT … SELECT … FROM json_each` per chunk on the way in),
//! not as a bound parameter per cell: through sqlx, binding 1.5 million cells one by one cost the backup about
//! 3.5 s of CPU for a 100,000-message state, most of it in the driver, not in SQLite. [`Db::begin_snapshot_install`] opens one writing transaction that empties the log and the state
//! tables, [`SnapshotInstall::insert`] adds each chunk as it arrives, and [`SnapshotInstall::finish`] commits:
//! until then nothing of the new state is visible, and an install dropped half-way (a lost connection, a new
//! term, a gap, a killed process) leaves the old state and log untouched.

use sqlx::Row;
use tokio::sync::mpsc;

use super::{composed, get_meta, set_meta, sqlite_writer_settings, Backend, Db, TxConnection};
use crate::{Error, Result};

/// Migration 0005's one statement: delete the stored events of messages that exist (derived from their rows).
const MESSAGE_EVENTS_CLEANUP: &str = include_str!("../../../migrations/0005_message_events_derived.sql");

/// Chunks read ahead of the consumer of a [`SnapshotStream`].
const READ_AHEAD: usize = 2;
/// Most rows in one chunk, whatever their size.
const MAX_PAGE_ROWS: usize = 2048;

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
            ("last_seen_at", true),
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

/// The whole replicated state as of one log entry, in memory (for tests and tools; replication streams it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// The last entry the state includes.
    pub last_index: u64,
    /// Its term.
    pub last_term: u64,
    /// Table name -> rows, each row its columns in `STATE_TABLES` order.
    pub tables: std::collections::BTreeMap<String, Vec<Vec<serde_json::Value>>>,
}

/// Consecutive rows of one state table, in key order: one piece of a streamed snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// The table.
    pub table: String,
    /// Its rows as a JSON array of arrays, each row its columns in `STATE_TABLES` order (integers, strings,
    /// nulls; a row may lack trailing columns, which are then NULL).
    pub rows: String,
    /// How many rows.
    pub count: usize,
}

/// The state as of one entry, read consistently and handed out chunk by chunk (see [`Db::snapshot_stream`]).
pub struct SnapshotStream {
    /// The last entry the state includes (the applied index when the read began).
    pub last_index: u64,
    /// Its term.
    pub last_term: u64,
    chunks: mpsc::Receiver<Result<SnapshotChunk>>,
}

impl SnapshotStream {
    /// The next chunk; `None` once the whole state was handed out. Dropping the stream ends the read.
    pub async fn next(&mut self) -> Option<Result<SnapshotChunk>> {
        self.chunks.recv().await
    }
}

/// A snapshot install under way: one open writing transaction (see [`Db::begin_snapshot_install`]). Dropped
/// without [`SnapshotInstall::finish`], it rolls back (SQLite's writer connection is closed, PostgreSQL's
/// connection is closed and the server rolls back), and the old state and log stay as they were.
pub struct SnapshotInstall {
    db: Db,
    conn: TxConnection,
    /// SQLite: the secondary indexes of the state tables, dropped for the install and created again (in the same
    /// transaction) before it commits.
    indexes: Vec<String>,
    /// Rows inserted so far.
    pub rows: u64,
}

impl Db {
    /// The applied state, consistently read in one transaction, all in memory.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let mut stream = self.snapshot_stream(1 << 20).await?;
        let mut tables = std::collections::BTreeMap::new();
        for (table, _, _) in STATE_TABLES {
            tables.insert((*table).to_owned(), Vec::new());
        }
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            let rows: Vec<Vec<serde_json::Value>> =
                serde_json::from_str(&chunk.rows).map_err(|e| Error::Corrupt(format!("snapshot rows: {e}")))?;
            tables.entry(chunk.table).or_insert_with(Vec::new).extend(rows);
        }
        Ok(Snapshot { last_index: stream.last_index, last_term: stream.last_term, tables })
    }

    /// Start reading the applied state, as of the applied index now, in chunks of about `chunk_bytes` of JSON,
    /// of one table each. The read is one transaction, so every chunk comes from the same state; a background
    /// task scans the tables and stays at most [`READ_AHEAD`] chunks ahead of the consumer.
    pub async fn snapshot_stream(&self, chunk_bytes: usize) -> Result<SnapshotStream> {
        let mut conn = self.read_transaction_connection().await?;
        // Every statement below must see the same state. (SQLite's read transaction takes its snapshot at the
        // first SELECT, the meta read below; PostgreSQL's REPEATABLE READ at the first statement too.)
        let begin = match self.backend {
            Backend::Sqlite => "BEGIN",
            Backend::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        };
        if self.backend == Backend::Sqlite {
            // Read through a memory map: the scan touches every page once, and reading them one `pread` at a
            // time through the connection's 2 MB cache was a visible share of the primary's CPU.
            sqlx::query("PRAGMA mmap_size = 1073741824").execute(&mut *conn).await?;
        }
        sqlx::query(begin).execute(&mut *conn).await?;
        let applied = get_meta(&mut *conn, "applied_index").await?.unwrap_or(0) as u64;
        let term = match sqlx::query("SELECT term FROM log WHERE idx = $1")
            .bind(applied as i64)
            .fetch_optional(&mut *conn)
            .await?
        {
            Some(row) => row.try_get::<i64, _>("term")? as u64,
            None => get_meta(&mut *conn, "compacted_term").await?.unwrap_or(0) as u64,
        };
        let (tx, chunks) = mpsc::channel(READ_AHEAD);
        let backend = self.backend;
        tokio::spawn(async move {
            let scanned = scan_state(&mut conn, backend, chunk_bytes.max(1), &tx).await;
            if backend == Backend::Sqlite && scanned.is_ok() {
                // The pooled connection goes back to its usual reads.
                let _ = sqlx::query("PRAGMA mmap_size = 0").execute(&mut *conn).await;
            }
            if let Err(e) = scanned {
                // The consumer sees the error; a closed channel means it stopped listening (nothing to tell).
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(SnapshotStream { last_index: applied, last_term: term, chunks })
    }

    /// Begin replacing the whole state and log: one writing transaction that first empties the log and the
    /// state tables. See [`SnapshotInstall`].
    pub async fn begin_snapshot_install(&self) -> Result<SnapshotInstall> {
        let mut conn = self.transaction_connection().await?;
        if self.backend == Backend::Sqlite {
            // The whole install is one transaction: with SQLite's default 2 MB page cache it spills pages to the
            // WAL while inserting (measured: 4.4 s -> 3.1 s for a 100,000-message state with this). Only while
            // it runs; the writer's own settings (`sqlite_writer_settings`, its cache among them) are set back in
            // `finish` and `abandon` (a dropped install drops the connection).
            sqlx::query("PRAGMA cache_size = -262144").execute(&mut *conn).await?;
        }
        sqlx::query(self.begin_write()).execute(&mut *conn).await?;
        sqlx::query("DELETE FROM log").execute(&mut *conn).await?;
        for (table, _, _) in STATE_TABLES {
            sqlx::query(composed(format!("DELETE FROM {table}"))).execute(&mut *conn).await?;
        }
        let mut indexes = Vec::new();
        if self.backend == Backend::Sqlite {
            // Building an index once from sorted rows is cheaper than keeping it up to date through 100,000
            // inserts in random key order (measured on a 100,000-message state: the install 1.6 -> 1.3 s of CPU). SQLite's DDL is part of the
            // transaction: a rolled-back install leaves the indexes as they were, and readers never miss them.
            // (Not on PostgreSQL: DROP INDEX would lock the table against the backup's readers until the commit.)
            let tables: Vec<String> = STATE_TABLES.iter().map(|(table, _, _)| format!("'{table}'")).collect();
            let sql = format!(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL AND tbl_name IN ({})",
                tables.join(", ")
            );
            for row in sqlx::query(composed(sql)).fetch_all(&mut *conn).await? {
                let name: String = row.try_get("name")?;
                indexes.push(row.try_get("sql")?);
                sqlx::query(composed(format!("DROP INDEX \"{name}\""))).execute(&mut *conn).await?;
            }
        }
        Ok(SnapshotInstall { db: self.clone(), conn, indexes, rows: 0 })
    }

    /// Replace the whole state and log with `snapshot`, in one transaction, `chunk_rows` rows per chunk.
    pub async fn install_snapshot_in_chunks(&self, snapshot: &Snapshot, chunk_rows: usize) -> Result<()> {
        let mut install = self.begin_snapshot_install().await?;
        for (table, rows) in &snapshot.tables {
            for chunk in rows.chunks(chunk_rows.max(1)) {
                let text = serde_json::to_string(chunk).map_err(|e| Error::Corrupt(format!("snapshot rows: {e}")))?;
                install.insert(table, &text).await?;
            }
        }
        install.finish(snapshot.last_index, snapshot.last_term).await
    }

    /// Replace the whole state and log with `snapshot`, in one transaction.
    pub async fn install_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        self.install_snapshot_in_chunks(snapshot, 1000).await
    }
}

/// Read every state table in key order into `tx`, chunk by chunk, then end the read transaction. Each chunk is
/// one query that builds the page's JSON in the database (keyset paging on the table's key, which leads every
/// row): row by row through sqlx, the driver's per-row cost was larger than SQLite's (measured: ~1.5 s of CPU
/// for the 300,000 rows of a 100,000-message state, of which 0.6 s in SQLite).
async fn scan_state(
    conn: &mut TxConnection,
    backend: Backend,
    chunk_bytes: usize,
    tx: &mpsc::Sender<Result<SnapshotChunk>>,
) -> Result<()> {
    let (row_json, concat) = match backend {
        Backend::Sqlite => ("json_array", "group_concat"),
        Backend::Postgres => ("json_build_array", "string_agg"),
    };
    for (table, columns, order) in STATE_TABLES {
        let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
        let keys: Vec<&str> = order.split(", ").collect();
        debug_assert_eq!(keys, names[..keys.len()], "a table's key leads its rows");
        let page = |after: bool| {
            let after = if after {
                let params: Vec<String> = (1..=keys.len()).map(|i| format!("${i}")).collect();
                format!("WHERE ({order}) > ({})", params.join(", "))
            } else {
                String::new()
            };
            let limit = if after.is_empty() { 1 } else { keys.len() + 1 };
            format!(
                "SELECT {concat}(j, ',' ORDER BY {order}), COUNT(*) FROM (SELECT {order}, CAST({row_json}({}) AS TEXT) \
                 AS j FROM {table} {after} ORDER BY {order} LIMIT ${limit}) AS page",
                names.join(", ")
            )
        };
        let (first, next) = (composed(page(false)), composed(page(true)));
        let mut last_key: Option<Vec<serde_json::Value>> = None;
        // Rows per page, adjusted to the rows' size so that a page is about `chunk_bytes`.
        let mut limit: i64 = 16;
        loop {
            let mut query = sqlx::query(if last_key.is_some() { next.clone() } else { first.clone() });
            for cell in last_key.iter().flatten() {
                query = match cell {
                    serde_json::Value::Number(n) => query.bind(n.as_i64()),
                    other => query.bind(other.as_str().map(str::to_owned)),
                };
            }
            let row = query.bind(limit).fetch_one(&mut **conn).await?;
            let count = row.try_get::<i64, _>(1)? as usize;
            let Some(text) = row.try_get::<Option<String>, _>(0)?.filter(|_| count > 0) else { break };
            let rows = format!("[{text}]");
            // The last row's key, where the next page starts.
            let parsed: Vec<&serde_json::value::RawValue> =
                serde_json::from_str(&rows).map_err(|e| Error::Corrupt(format!("snapshot page of {table}: {e}")))?;
            let last: Vec<serde_json::Value> = serde_json::from_str(parsed.last().expect("count > 0").get())
                .map_err(|e| Error::Corrupt(format!("snapshot page of {table}: {e}")))?;
            last_key = Some(last.into_iter().take(keys.len()).collect());
            // At most doubling, and at most MAX_PAGE_ROWS: a page sized on small rows must not become a huge frame
            // when large ones follow (the largest row is a few tens of KiB).
            let fitting = limit as usize * chunk_bytes / rows.len().max(1);
            limit = fitting.clamp(16, (2 * limit as usize).min(MAX_PAGE_ROWS)) as i64;
            if tx.send(Ok(SnapshotChunk { table: (*table).to_owned(), rows, count })).await.is_err() {
                // The consumer is gone.
                return end_read(conn).await;
            }
        }
    }
    end_read(conn).await
}

/// End a snapshot's read transaction (it wrote nothing), keeping the connection.
async fn end_read(conn: &mut TxConnection) -> Result<()> {
    sqlx::query("ROLLBACK").execute(&mut **conn).await?;
    conn.finished();
    Ok(())
}

impl SnapshotInstall {
    /// Add `rows` of `table` (a JSON array of arrays, as in [`SnapshotChunk::rows`]) to the install, in one
    /// statement.
    pub async fn insert(&mut self, table: &str, rows: &str) -> Result<()> {
        // Checked here, so that a malformed chunk is a bad frame, not a storage failure.
        let count = serde_json::from_str::<Vec<serde::de::IgnoredAny>>(rows)
            .map_err(|e| Error::Corrupt(format!("snapshot rows of {table}: {e}")))?
            .len();
        if count == 0 {
            return Ok(());
        }
        let Some((table, columns, _)) = STATE_TABLES.iter().find(|(name, _, _)| *name == table) else {
            return Err(Error::Corrupt(format!("snapshot rows of an unknown table {table:?}")));
        };
        let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
        let (cells, source) = match self.db.backend {
            Backend::Sqlite => {
                (columns.iter().enumerate().map(|(i, _)| format!("value ->> {i}")).collect::<Vec<_>>(), "json_each($1)")
            }
            Backend::Postgres => (
                columns
                    .iter()
                    .enumerate()
                    .map(
                        |(i, (_, integer))| {
                            if *integer {
                                format!("CAST(value ->> {i} AS BIGINT)")
                            } else {
                                format!("value ->> {i}")
                            }
                        },
                    )
                    .collect(),
                "json_array_elements(CAST($1 AS JSON)) AS value",
            ),
        };
        let sql = format!("INSERT INTO {table} ({}) SELECT {} FROM {source}", names.join(", "), cells.join(", "));
        sqlx::query(composed(sql)).bind(rows).execute(&mut *self.conn).await?;
        self.rows += count as u64;
        Ok(())
    }

    /// Give the install up: roll back, and the old state and log stay.
    pub async fn abandon(mut self) {
        if sqlx::query("ROLLBACK").execute(&mut *self.conn).await.is_ok() {
            if self.db.backend == Backend::Sqlite {
                let _ = sqlite_writer_settings(&mut self.conn).await;
            }
            self.conn.finished();
        }
    }

    /// Record that the state is as of entry `last_index` (of `last_term`), with no log after it, and commit.
    pub async fn finish(mut self, last_index: u64, last_term: u64) -> Result<()> {
        // The client-id map describes the old messages: unloaded before the new ones are committed, so that no
        // reader trusts it for them, and loaded again by the next apply.
        self.db.client_ids.unload();
        let committed = self.commit(last_index, last_term).await;
        // Every account may have changed (and a failed install was rolled back): forget the live names, and the
        // accounts the applier knew.
        self.db.forget_accounts();
        self.db.forget_applied_ahead();
        committed
    }

    async fn commit(&mut self, last_index: u64, last_term: u64) -> Result<()> {
        for index in std::mem::take(&mut self.indexes) {
            sqlx::query(composed(index)).execute(&mut *self.conn).await?;
        }
        // A snapshot from a build before migration 0005 carries both events of every message, which this build
        // derives from the message's row: removed as that migration removed them, or they would replay twice.
        sqlx::query(MESSAGE_EVENTS_CLEANUP).execute(&mut *self.conn).await?;
        set_meta(&mut self.conn, "applied_index", last_index as i64).await?;
        set_meta(&mut self.conn, "compacted_index", last_index as i64).await?;
        set_meta(&mut self.conn, "compacted_term", last_term as i64).await?;
        sqlx::query("COMMIT").execute(&mut *self.conn).await?;
        if self.db.backend == Backend::Sqlite {
            sqlite_writer_settings(&mut self.conn).await?;
        }
        self.conn.finished();
        Ok(())
    }
}
