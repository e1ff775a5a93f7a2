//! Who is connected: the registry of open, authenticated sockets per user, and the live push to them.
//!
//! The hub is in memory only. Pushes are best effort by design: each socket has a queue bounded in pushes and
//! in bytes, and a socket that falls that far behind is dropped from the hub (its task then closes it with
//! code 1008). No event is lost that way: every event is stored first, and the client `resume`s from its cursor.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use replichat_shared::{ServerBody, SessionEnd};
use tokio::sync::mpsc;

/// How many pushes may wait for one socket before it counts as too slow.
pub const QUEUE_DEPTH: usize = 1024;
/// How many bytes of pushes (about their size as JSON) may wait for one socket before it counts as too slow:
/// 1024 messages of 4,000 four-byte characters would otherwise be 16 MB for one socket that stopped reading.
pub const QUEUE_BYTES: usize = 1 << 20;

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

impl Push {
    /// About how many bytes this push takes while it waits (its JSON size, give or take the field names).
    fn weight(&self) -> usize {
        const FRAME: usize = 160;
        match self {
            Push::Frame(ServerBody::Message { message, .. }) => {
                FRAME + message.text.len() + message.client_id.len() + message.from.len() + message.to.len()
            }
            _ => FRAME,
        }
    }
}

/// A socket's identity in the hub.
pub type ConnId = u64;

/// The sending half of a socket's push queue: what the hub holds.
#[derive(Debug, Clone)]
pub struct Queue {
    tx: mpsc::Sender<Push>,
    /// Bytes waiting (see [`Push::weight`]), shared with the [`Inbox`].
    bytes: Arc<AtomicUsize>,
}

impl Queue {
    /// Queue `push` unless the queue is full, by count or by bytes, or closed.
    fn try_send(&self, push: Push) -> Result<(), Refused> {
        let weight = push.weight();
        // Counted before it is queued, so the inbox never subtracts what was not added yet.
        if self.bytes.fetch_add(weight, Ordering::Relaxed) + weight > QUEUE_BYTES {
            self.bytes.fetch_sub(weight, Ordering::Relaxed);
            return Err(Refused::Full);
        }
        self.tx.try_send(push).map_err(|e| {
            self.bytes.fetch_sub(weight, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(_) => Refused::Full,
                mpsc::error::TrySendError::Closed(_) => Refused::Closed,
            }
        })
    }
}

/// Why a push was not queued.
enum Refused {
    /// The socket is too far behind.
    Full,
    /// The socket's task is gone.
    Closed,
}

/// The receiving half of a socket's push queue: what the socket's task reads.
#[derive(Debug)]
pub struct Inbox {
    rx: mpsc::Receiver<Push>,
    bytes: Arc<AtomicUsize>,
}

impl Inbox {
    /// The next push; `None` once the hub dropped the queue (the socket was too slow, or detached).
    pub async fn recv(&mut self) -> Option<Push> {
        let push = self.rx.recv().await?;
        self.bytes.fetch_sub(push.weight(), Ordering::Relaxed);
        Some(push)
    }
}

/// The open sockets of one user, each with the queue its task reads.
type Sockets = Vec<(ConnId, Queue)>;

/// The registry. Cheap to share behind an `Arc`; every method takes `&self`.
#[derive(Debug, Default)]
pub struct Hub {
    /// user id -> that user's open sockets. A std mutex: it is never held across an `.await`.
    users: Mutex<HashMap<i64, Sockets>>,
    next_conn: AtomicU64,
}

impl Hub {
    /// A fresh id for a socket, and the queue it will receive pushes on once attached.
    pub fn channel(&self) -> (ConnId, Queue, Inbox) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
        let bytes = Arc::new(AtomicUsize::new(0));
        (id, Queue { tx, bytes: bytes.clone() }, Inbox { rx, bytes })
    }

    /// Attach socket `conn` to `user_id`. Returns true when it is the user's first open socket.
    pub fn attach(&self, user_id: i64, conn: ConnId, tx: Queue) -> bool {
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
            Err(Refused::Full) => {
                tracing::warn!(user_id, conn, "socket too slow for its pushes; dropping it, it can resume");
                false
            }
            Err(Refused::Closed) => false,
        });
        if conns.is_empty() {
            users.remove(&user_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replichat_shared::Message;

    fn message(text: &str) -> Push {
        let message = Message {
            id: 1,
            from: "alice".into(),
            to: "bob".into(),
            text: text.into(),
            client_id: "c".into(),
            sent_at: 0,
            delivered_at: None,
            read_at: None,
            from_deleted: false,
        };
        Push::Frame(ServerBody::Message { index: 1, message })
    }

    #[tokio::test]
    async fn a_socket_that_stops_reading_is_dropped_once_a_mebibyte_waits_for_it() {
        let hub = Hub::default();
        let (conn, queue, mut inbox) = hub.channel();
        hub.attach(7, conn, queue);
        // 4,000 four-byte characters: 16 KB a message, so the byte bound comes long before the 1024 pushes.
        let big = "😀".repeat(4000);
        let fit = QUEUE_BYTES / message(&big).weight();
        for _ in 0..fit {
            hub.push(7, message(&big));
        }
        assert!(hub.online(7), "{fit} messages fit");
        hub.push(7, message(&big));
        assert!(!hub.online(7), "one more than a mebibyte: dropped from the hub");
        // What was queued is still read, then the queue ends (the socket's task closes it with 1008).
        for _ in 0..fit {
            assert!(matches!(inbox.recv().await, Some(Push::Frame(_))));
        }
        assert!(inbox.recv().await.is_none());
        assert!(fit < QUEUE_DEPTH);
    }

    #[tokio::test]
    async fn a_socket_that_reads_is_never_dropped() {
        let hub = Hub::default();
        let (conn, queue, mut inbox) = hub.channel();
        hub.attach(7, conn, queue);
        let big = "x".repeat(16_000);
        for _ in 0..10 * QUEUE_DEPTH {
            hub.push(7, message(&big));
            assert!(inbox.recv().await.is_some());
        }
        assert!(hub.online(7));
    }
}
