//! Snapshots: the whole replicated state read consistently, and installed in place of the state and log (what
//! a backup too far behind receives).
//!
//! Both halves stream. [`Db::snapshot_stream`] reads the state in one read transaction (SQLite: one WAL read
//! snapshot; PostgreSQL: REPEATABLE READ, READ ONLY) and hands it out as [`SnapshotChunk`]s of a bounded size
//! through a small channel: a reader that stops taking chunks stops the scan, so the state is never all in
//! memory. [`Db::begin_snapshot_install`] opens one writing transaction that empties the log and the state
//! tables, [`SnapshotInstall::insert`] adds each chunk as it arrives, and [`SnapshotInstall::finish`] commits:
//! until then nothing of the new state is visible, and an install dropped half-way (a lost connection, a new
//! term, a gap, a killed process) leaves the old state and log untouched.

use futures_util::TryStreamExt;
use sqlx::Row;
use tokio::sync::mpsc;

use super::{get_meta, placeholders, set_meta, Backend, Db, TxConnection, MAX_BINDS};
use crate::{Error, Result};

/// Chunks read ahead of the consumer of a [`SnapshotStream`].
const READ_AHEAD: usize = 2;

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
    /// Its rows, each its columns in `STATE_TABLES` order.
    pub rows: Vec<Vec<serde_json::Value>>,
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
    /// Rows inserted so far.
    pub rows: u64,
}

/// Roughly how many bytes a cell takes in a JSON frame (what bounds a chunk).
fn cell_size(cell: &serde_json::Value) -> usize {
    match cell {
        serde_json::Value::String(s) => s.len() + 3,
        _ => 12,
    }
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
            tables.entry(chunk.table).or_insert_with(Vec::new).extend(chunk.rows);
        }
        Ok(Snapshot { last_index: stream.last_index, last_term: stream.last_term, tables })
    }

    /// Start reading the applied state, as of the applied index now, in chunks of about `chunk_bytes` (as JSON)
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
        tokio::spawn(async move {
            if let Err(e) = scan_state(&mut conn, chunk_bytes.max(1), &tx).await {
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
        sqlx::query(self.begin_write()).execute(&mut *conn).await?;
        sqlx::query("DELETE FROM log").execute(&mut *conn).await?;
        for (table, _, _) in STATE_TABLES {
            sqlx::query(&format!("DELETE FROM {table}")).execute(&mut *conn).await?;
        }
        Ok(SnapshotInstall { db: self.clone(), conn, rows: 0 })
    }

    /// Replace the whole state and log with `snapshot`, in one transaction.
    pub async fn install_snapshot(&self, snapshot: &Snapshot) -> Result<()> {
        let mut install = self.begin_snapshot_install().await?;
        for (table, rows) in &snapshot.tables {
            install.insert(table, rows).await?;
        }
        install.finish(snapshot.last_index, snapshot.last_term).await
    }
}

/// Read every state table in key order into `tx`, chunk by chunk, then end the read transaction.
async fn scan_state(
    conn: &mut TxConnection,
    chunk_bytes: usize,
    tx: &mpsc::Sender<Result<SnapshotChunk>>,
) -> Result<()> {
    for (table, columns, order) in STATE_TABLES {
        let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
        let sql = format!("SELECT {} FROM {table} ORDER BY {order}", names.join(", "));
        let mut rows = sqlx::query(&sql).fetch(&mut **conn);
        let (mut out, mut bytes) = (Vec::new(), 0);
        while let Some(row) = rows.try_next().await? {
            let mut cells = Vec::with_capacity(columns.len());
            for (i, (_, integer)) in columns.iter().enumerate() {
                let cell = if *integer {
                    row.try_get::<Option<i64>, _>(i)?.map_or(serde_json::Value::Null, Into::into)
                } else {
                    row.try_get::<Option<String>, _>(i)?.map_or(serde_json::Value::Null, Into::into)
                };
                bytes += cell_size(&cell);
                cells.push(cell);
            }
            out.push(cells);
            if bytes >= chunk_bytes {
                let chunk = SnapshotChunk { table: (*table).to_owned(), rows: std::mem::take(&mut out) };
                bytes = 0;
                if tx.send(Ok(chunk)).await.is_err() {
                    // The consumer is gone: the connection (in its read transaction) is closed on drop.
                    return Ok(());
                }
            }
        }
        drop(rows);
        if !out.is_empty() && tx.send(Ok(SnapshotChunk { table: (*table).to_owned(), rows: out })).await.is_err() {
            return Ok(());
        }
    }
    sqlx::query("COMMIT").execute(&mut **conn).await?;
    conn.finished();
    Ok(())
}

impl SnapshotInstall {
    /// Add rows of `table` (columns in `STATE_TABLES` order) to the install, many rows per statement.
    pub async fn insert(&mut self, table: &str, rows: &[Vec<serde_json::Value>]) -> Result<()> {
        let Some((table, columns, _)) = STATE_TABLES.iter().find(|(name, _, _)| *name == table) else {
            return Err(Error::Corrupt(format!("snapshot rows of an unknown table {table:?}")));
        };
        let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
        // Many rows per statement: one statement per row made a 100,000-message snapshot take seconds to install
        // (every statement is a round trip to the driver's thread).
        let per_statement = (MAX_BINDS / columns.len()).max(1);
        let full_sql =
            |n: usize| format!("INSERT INTO {table} ({}) VALUES {}", names.join(", "), placeholders(n, columns.len()));
        let full = full_sql(per_statement);
        for chunk in rows.chunks(per_statement) {
            let partial;
            let sql = if chunk.len() == per_statement {
                &full
            } else {
                partial = full_sql(chunk.len());
                &partial
            };
            let mut query = sqlx::query(sql);
            for row in chunk {
                // A replica from before a column was added sends rows without it: those cells are NULL.
                if row.len() > columns.len() {
                    return Err(Error::Corrupt(format!("snapshot row of {table} has {} cells", row.len())));
                }
                let null = serde_json::Value::Null;
                let cells = row.iter().chain(std::iter::repeat(&null));
                for (cell, (_, integer)) in cells.zip(columns.iter()) {
                    query =
                        if *integer { query.bind(cell.as_i64()) } else { query.bind(cell.as_str().map(str::to_owned)) };
                }
            }
            query.execute(&mut *self.conn).await?;
        }
        self.rows += rows.len() as u64;
        Ok(())
    }

    /// Record that the state is as of entry `last_index` (of `last_term`), with no log after it, and commit.
    pub async fn finish(mut self, last_index: u64, last_term: u64) -> Result<()> {
        let committed = self.commit(last_index, last_term).await;
        // Every account may have changed (and a failed install was rolled back): forget the live names.
        self.db.names.invalidate();
        committed
    }

    async fn commit(&mut self, last_index: u64, last_term: u64) -> Result<()> {
        set_meta(&mut self.conn, "applied_index", last_index as i64).await?;
        set_meta(&mut self.conn, "compacted_index", last_index as i64).await?;
        set_meta(&mut self.conn, "compacted_term", last_term as i64).await?;
        sqlx::query("COMMIT").execute(&mut *self.conn).await?;
        self.conn.finished();
        Ok(())
    }
}
