//! The replicated log: appending (and truncating what was never committed), reading entries for shipping and
//! catch-up, and compaction.

use std::sync::Arc;
use std::time::Instant;

use sqlx::{Connection, Row};

use super::writer::Appended;
use super::{composed, set_meta, Db, Entry};
use crate::Result;

/// Log entries per multi-row INSERT (three bound parameters each; see [`super::MAX_BINDS`]).
const ROWS_PER_INSERT: usize = super::MAX_BINDS / 3;

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
    ///
    /// A few statements per batch, not per entry: one range read of the terms already stored at the batch's
    /// indexes, at most one truncating DELETE, and multi-row INSERTs of [`ROWS_PER_INSERT`] entries each.
    ///
    /// On SQLite an append past the end of the log (the primary's always, a backup's nearly always) is first
    /// tried as one job for the writer thread ([`super::writer`]); only if an entry is stored at one of the
    /// indexes already does it take the general path.
    pub async fn append_entries(&self, entries: &[Entry]) -> Result<(u64, u64)> {
        self.append(entries, false).await
    }

    /// [`Db::append_entries`] for entries that this append alone commits (the primary of a cluster of one: a
    /// majority of one is this replica). On SQLite, when they lie past the end of the log and every entry after
    /// the applied index up to the last of them is a send, they are applied in the same transaction, made
    /// durable by the one synced commit that makes the entries so (see [`super::writer`]); their events wait
    /// for the applier's next [`Db::apply_committed`], which returns them first. Otherwise (and on
    /// PostgreSQL) this is [`Db::append_entries`], and the applier applies them.
    pub async fn append_committing(&self, entries: &[Entry]) -> Result<(u64, u64)> {
        self.append(entries, true).await
    }

    async fn append(&self, entries: &[Entry], committing: bool) -> Result<(u64, u64)> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else { return self.last_entry().await };
        let waiting = Instant::now();
        let mut conn = self.transaction_connection().await?;
        let started = Instant::now();
        crate::metrics::log_append_waited(started - waiting);
        if let Some(writer) = &self.writer {
            // Past the end of the log (the primary's appends always, a backup's nearly always): one job for the
            // writer thread, which says if an entry is stored at one of these indexes already (a re-sent append,
            // or one that replaces entries never committed); then it wrote nothing, and the entries are compared
            // with what is stored below.
            let appended = if committing {
                let (client_ids, accounts) = (Arc::clone(&self.client_ids), Arc::clone(&self.accounts));
                match writer.thread.append_and_apply(entries.to_vec(), client_ids, accounts).await? {
                    Appended::Conflict => false,
                    Appended::Alone => true,
                    Appended::Applied(mut applied) => {
                        let mut ahead = writer.applied_ahead.lock().expect("applied-ahead lock");
                        let (index, events) = ahead.get_or_insert_with(Default::default);
                        *index = applied.last;
                        events.append(&mut applied.deliveries);
                        drop(ahead);
                        crate::metrics::messages_stored(applied.messages);
                        crate::metrics::applied(applied.entries, applied.took);
                        true
                    }
                }
            } else {
                writer.thread.append_past_end(entries.to_vec()).await?
            };
            if appended {
                conn.finished();
                crate::metrics::log_appended(entries.len(), started.elapsed());
                return Ok((last.index, last.term));
            }
        }
        let mut tx = conn.begin_with(self.begin_write()).await?;
        let stored = sqlx::query("SELECT idx, term FROM log WHERE idx >= $1 AND idx <= $2 ORDER BY idx")
            .bind(first.index as i64)
            .bind(last.index as i64)
            .fetch_all(&mut *tx)
            .await?;
        // The entries already stored with the same term are kept; the first one that is not (another term, or
        // past the end of the log) starts what is written.
        let mut keep = 0;
        for (entry, row) in entries.iter().zip(&stored) {
            let (index, term) = (row.try_get::<i64, _>("idx")? as u64, row.try_get::<i64, _>("term")? as u64);
            if index != entry.index || term != entry.term {
                break;
            }
            keep += 1;
        }
        let new = &entries[keep..];
        if let Some(from) = new.first() {
            if stored.len() > keep {
                // A stored entry of another term at `from.index`: it and everything after it were never
                // committed.
                sqlx::query("DELETE FROM log WHERE idx >= $1").bind(from.index as i64).execute(&mut *tx).await?;
            }
            for chunk in new.chunks(ROWS_PER_INSERT) {
                let sql = format!("INSERT INTO log (idx, term, op) VALUES {}", self.backend.values(chunk.len(), 3));
                let mut query = sqlx::query(composed(sql));
                for entry in chunk {
                    query = query.bind(entry.index as i64).bind(entry.term as i64).bind(&entry.op);
                }
                query.execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        conn.finished();
        crate::metrics::log_appended(new.len(), started.elapsed());
        if new.is_empty() {
            // Every entry was already there; entries after them (if any) stay.
            self.last_entry().await
        } else {
            Ok((last.index, last.term))
        }
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
