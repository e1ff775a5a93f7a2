//! Snapshots: the whole replicated state read consistently, and installed in place of the state and log (what
//! a backup too far behind receives).

use sqlx::{Connection, Row};

use super::{get_meta, set_meta, Backend, Db};
use crate::{Error, Result};

/// Bound parameters per statement when installing a snapshot (SQLite allows 32,766, PostgreSQL 65,535).
const SNAPSHOT_BINDS: usize = 900;

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

impl Db {
    /// The applied state, consistently read in one transaction.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let mut conn = self.read_transaction_connection().await?;
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
        let installed = self.install_snapshot_tables(snapshot).await;
        // Every account may have changed (and a failed install was rolled back): forget the live names.
        self.names.invalidate();
        installed
    }

    async fn install_snapshot_tables(&self, snapshot: &Snapshot) -> Result<()> {
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
                    // A replica from before a column was added sends rows without it: those cells are NULL.
                    if row.len() > columns.len() {
                        return Err(Error::Corrupt(format!("snapshot row of {table} has {} cells", row.len())));
                    }
                    let null = serde_json::Value::Null;
                    let cells = row.iter().chain(std::iter::repeat(&null));
                    for (cell, (_, integer)) in cells.zip(columns.iter()) {
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
}
