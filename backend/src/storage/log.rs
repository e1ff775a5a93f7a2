//! The replicated log: appending (and truncating what was never committed), reading entries for shipping and
//! catch-up, and compaction.

use std::time::Instant;

use sqlx::{Connection, Row};

use super::{set_meta, Db, Entry};
use crate::Result;

impl Db {
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
}
