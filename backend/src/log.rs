//! The log's write side: hands out the next index and commits entries one at a time, in index order.
//!
//! The log knows nothing of chat semantics: an entry is a term, an index and an opaque [`Op`] that
//! [`Db::commit_entry`] stores and applies. Whoever holds an [`Appender`] is the only writer, so a request
//! can be validated against the current state and appended without another write slipping in between.

use tokio::sync::{Mutex, MutexGuard};

use crate::op::Op;
use crate::storage::{Db, Delivery, Entry};
use crate::Result;

/// The term every entry gets on a single node (replication will raise it on each election).
pub const SINGLE_NODE_TERM: u64 = 1;

/// The writer's view of the log's end.
#[derive(Debug)]
struct Tail {
    last_index: u64,
    term: u64,
}

/// The sequencer in front of the database.
#[derive(Debug)]
pub struct Log {
    db: Db,
    /// A tokio mutex because the guard is held across the validation reads and the commit `.await`s: that
    /// is what makes "validate, then append" atomic.
    tail: Mutex<Tail>,
}

/// Exclusive right to append, held while a request is validated and its entry committed.
pub struct Appender<'a> {
    db: &'a Db,
    tail: MutexGuard<'a, Tail>,
}

impl Log {
    /// Open the log over `db`, continuing after its last entry.
    pub async fn open(db: Db) -> Result<Log> {
        let last_index = db.last_index().await?;
        Ok(Log { db, tail: Mutex::new(Tail { last_index, term: SINGLE_NODE_TERM }) })
    }

    /// Wait for the right to append.
    pub async fn appender(&self) -> Appender<'_> {
        Appender { db: &self.db, tail: self.tail.lock().await }
    }

    /// The index of the last committed entry.
    pub async fn last_index(&self) -> u64 {
        self.tail.lock().await.last_index
    }

    /// The current term.
    pub async fn term(&self) -> u64 {
        self.tail.lock().await.term
    }
}

impl Appender<'_> {
    /// The index the next appended entry will get: ops use it as the id of the row they create.
    pub fn next_index(&self) -> u64 {
        self.tail.last_index + 1
    }

    /// The index of the last committed entry.
    pub fn last_index(&self) -> u64 {
        self.tail.last_index
    }

    /// Durably store and apply `op` as the next entry. Returns its index and the events it caused.
    /// On error nothing was stored and the next index stays the same.
    pub async fn append(&mut self, op: Op) -> Result<(u64, Vec<Delivery>)> {
        let entry = Entry { index: self.next_index(), term: self.tail.term, op };
        let deliveries = self.db.commit_entry(&entry).await?;
        self.tail.last_index = entry.index;
        Ok((entry.index, deliveries))
    }
}
