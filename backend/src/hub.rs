//! Who is connected: the registry of open, authenticated sockets per user, and the live push to them.
//!
//! The hub is in memory only. Pushes are best effort by design: each socket has a bounded queue, and a
//! socket that falls that far behind is dropped from the hub (its task then closes it with code 1008). No
//! event is lost that way: every event is stored first, and the client `resume`s from its cursor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use replichat_shared::{ServerBody, SessionEnd};
use tokio::sync::mpsc;

/// How many pushes may wait for one socket before it counts as too slow.
pub const QUEUE_DEPTH: usize = 1024;

/// What the hub asks a socket's task to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// Write this frame.
    Frame(ServerBody),
    /// Write `account_deleted`, then close the socket.
    AccountDeleted,
    /// A session of the user ended: sockets on it (`session`: that token hash; `None`: every session) write
    /// `session_ended` and close.
    Ended { session: Option<String>, reason: SessionEnd },
}

/// A socket's identity in the hub.
pub type ConnId = u64;

/// The open sockets of one user, each with the queue its task reads.
type Sockets = Vec<(ConnId, mpsc::Sender<Push>)>;

/// The registry. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug, Default)]
pub struct Hub {
    /// user id -> that user's open sockets. A std mutex: it is never held across an `.await`.
    users: Mutex<HashMap<i64, Sockets>>,
    next_conn: AtomicU64,
}

impl Hub {
    /// A fresh id for a socket, and the queue it will receive pushes on once attached.
    pub fn channel(&self) -> (ConnId, mpsc::Sender<Push>, mpsc::Receiver<Push>) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        (id, tx, rx)
    }

    /// Attach socket `conn` to `user_id`. Returns true when it is the user's first open socket.
    pub fn attach(&self, user_id: i64, conn: ConnId, tx: mpsc::Sender<Push>) -> bool {
        let mut users = self.users.lock().expect("hub lock");
        let conns = users.entry(user_id).or_default();
        conns.push((conn, tx));
        conns.len() == 1
    }

    /// Detach socket `conn` from `user_id`. Returns true when the user had it open and now has none.
    pub fn detach(&self, user_id: i64, conn: ConnId) -> bool {
        let mut users = self.users.lock().expect("hub lock");
        let Some(conns) = users.get_mut(&user_id) else { return false };
        let before = conns.len();
        conns.retain(|(id, _)| *id != conn);
        let removed = conns.len() < before;
        if conns.is_empty() {
            users.remove(&user_id);
        }
        removed && !users.contains_key(&user_id)
    }

    /// Whether `user_id` has an open socket.
    pub fn online(&self, user_id: i64) -> bool {
        self.users.lock().expect("hub lock").contains_key(&user_id)
    }

    /// Number of sockets attached to some user.
    pub fn sessions(&self) -> usize {
        self.users.lock().expect("hub lock").values().map(Vec::len).sum()
    }

    /// Tell every socket of `user_id` that the account is gone, and forget them (their tasks close them).
    pub fn close_user(&self, user_id: i64) {
        let conns = self.users.lock().expect("hub lock").remove(&user_id).unwrap_or_default();
        for (_, tx) in conns {
            let _ = tx.try_send(Push::AccountDeleted);
        }
    }

    /// Push to every socket of `user_id`. A socket whose queue is full is dropped from the hub.
    pub fn push(&self, user_id: i64, push: Push) {
        let mut users = self.users.lock().expect("hub lock");
        let Some(conns) = users.get_mut(&user_id) else { return };
        conns.retain(|(conn, tx)| match tx.try_send(push.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(user_id, conn, "socket too slow for its pushes; dropping it, it can resume");
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if conns.is_empty() {
            users.remove(&user_id);
        }
    }
}
