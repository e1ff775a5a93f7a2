//! Who is connected: the registry of open, authenticated sockets per user, and the live push to them.
//!
//! The hub is in memory only. Pushes are best effort by design: each socket has a queue bounded in pushes and
//! in bytes, and a socket that falls that far behind is dropped from the hub (its task then closes it with
//! code 1008). No event is lost that way: every event is stored first, and the client `resume`s from its cursor.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use axum::extract::ws::Utf8Bytes;
use replichat_shared::{ServerBody, SessionEnd};
use tokio::sync::Notify;

/// How many pushes may wait for one socket before it counts as too slow.
pub const QUEUE_DEPTH: usize = 1024;
/// How many bytes of pushes (about their size as JSON) may wait for one socket before it counts as too slow:
/// 1024 messages of 4,000 four-byte characters would otherwise be 16 MB for one socket that stopped reading.
pub const QUEUE_BYTES: usize = 1 << 20;

/// What the hub asks a socket's task to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// Write this live-only frame (presence, typing).
    Frame(ServerBody),
    /// Write this stored event (log index `index`), encoded once when it was applied: the same text for every
    /// socket it goes to, which each gets by reference (see [`crate::storage::Delivery::json`]).
    Event { index: u64, json: Utf8Bytes },
    /// Write `account_deleted`, then close the socket.
    AccountDeleted,
    /// A session of the user ended: sockets on it (`session`: that token hash; `None`: every session) write
    /// `session_ended` and close.
    Ended { session: Option<String>, reason: SessionEnd },
}

impl Push {
    /// About how many bytes this push takes while it waits (an event's JSON and the queue's bookkeeping).
    fn weight(&self) -> usize {
        const FRAME: usize = 160;
        match self {
            Push::Event { json, .. } => FRAME + json.len(),
            _ => FRAME,
        }
    }
}

/// A socket's identity in the hub.
pub type ConnId = u64;

/// One socket's push queue, shared by its two halves. Not a tokio channel: that allocates its first block of
/// 32 slots when it is made, 800 bytes per idle socket even with boxed slots (5 KB with `Push` inline;
/// heaptrack, `bench idle`). A `VecDeque` allocates only when pushes wait, and is given back once drained.
#[derive(Debug, Default)]
struct Shared {
    state: Mutex<Waiting>,
    /// Wakes the inbox when a push arrives or the queue is dropped (it keeps a wake-up that finds no waiter).
    ready: Notify,
}

#[derive(Debug, Default)]
struct Waiting {
    pushes: VecDeque<Push>,
    /// About how many bytes wait (see [`Push::weight`]).
    bytes: usize,
    /// The hub dropped the queue: once `pushes` is drained, the inbox ends.
    queue_gone: bool,
    /// The socket's task dropped the inbox: pushes are refused.
    inbox_gone: bool,
}

/// The sending half of a socket's push queue: what the hub holds.
#[derive(Debug)]
pub struct Queue {
    shared: Arc<Shared>,
}

impl Queue {
    /// Queue `push` unless the queue is full, by count or by bytes, or closed.
    fn try_send(&self, push: Push) -> Result<(), Refused> {
        let weight = push.weight();
        {
            let mut waiting = self.shared.state.lock().expect("push queue lock");
            if waiting.inbox_gone {
                return Err(Refused::Closed);
            }
            if waiting.pushes.len() >= QUEUE_DEPTH || waiting.bytes + weight > QUEUE_BYTES {
                return Err(Refused::Full);
            }
            waiting.pushes.push_back(push);
            waiting.bytes += weight;
        }
        self.shared.ready.notify_one();
        Ok(())
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        self.shared.state.lock().expect("push queue lock").queue_gone = true;
        self.shared.ready.notify_one();
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
    shared: Arc<Shared>,
}

impl Inbox {
    /// The next push; `None` once the hub dropped the queue (the socket was too slow, or detached) and
    /// everything queued before was read.
    pub async fn recv(&mut self) -> Option<Push> {
        loop {
            if let Poll::Ready(push) = self.try_recv() {
                return push;
            }
            // A push or drop between the unlock and here left a wake-up behind: no push is missed.
            self.shared.ready.notified().await;
        }
    }

    /// [`Inbox::recv`] without waiting: `Pending` while nothing is queued and the queue is still there.
    pub fn try_recv(&mut self) -> Poll<Option<Push>> {
        let mut waiting = self.shared.state.lock().expect("push queue lock");
        if let Some(push) = waiting.pushes.pop_front() {
            waiting.bytes -= push.weight();
            if waiting.pushes.is_empty() && waiting.pushes.capacity() > IDLE_CAPACITY {
                // A burst is over: an idle socket holds no queue memory.
                waiting.pushes = VecDeque::new();
            }
            return Poll::Ready(Some(push));
        }
        if waiting.queue_gone {
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    /// Room allocated for waiting pushes (tests: an idle socket holds none).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.shared.state.lock().expect("push queue lock").pushes.capacity()
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let mut waiting = self.shared.state.lock().expect("push queue lock");
        waiting.inbox_gone = true;
        waiting.pushes = VecDeque::new();
    }
}

/// Pushes a drained queue may keep room for; beyond that its memory is given back.
const IDLE_CAPACITY: usize = 4;

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
        let shared = Arc::new(Shared::default());
        (id, Queue { shared: shared.clone() }, Inbox { shared })
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
        let json = serde_json::to_string(&ServerBody::Message { index: 1, message }).unwrap();
        Push::Event { index: 1, json: json.into() }
    }

    #[test]
    fn a_stored_event_is_the_frame_a_socket_would_write_for_it() {
        // Pushes carry the JSON stored in `events` as the frame itself: that is only right while a push's
        // frame (no `req`) is its body alone, for every kind of stored event.
        let Push::Event { json, .. } = message("hi") else { panic!("a message is an event") };
        let by = "bob".to_owned();
        let events = [
            serde_json::from_str::<ServerBody>(&json).unwrap(),
            ServerBody::Receipt { index: 2, kind: replichat_shared::ReceiptKind::Read, by, up_to: 1, at: 5 },
            ServerBody::PeerDeleted { index: 3, username: "carol".into() },
        ];
        for body in events {
            let stored = serde_json::to_string(&body).unwrap();
            let frame = serde_json::to_string(&replichat_shared::ServerFrame { req: None, body }).unwrap();
            assert_eq!(stored, frame);
        }
    }

    #[tokio::test]
    async fn an_idle_queue_holds_no_room_for_pushes() {
        let hub = Hub::default();
        let (conn, queue, mut inbox) = hub.channel();
        assert_eq!(inbox.capacity(), 0, "nothing allocated before the first push");
        hub.attach(7, conn, queue);
        for i in 0..100 {
            hub.push(7, message(&format!("burst {i}")));
        }
        assert!(inbox.capacity() >= 100);
        for i in 0..100 {
            assert_eq!(inbox.recv().await, Some(message(&format!("burst {i}"))), "in order");
        }
        assert_eq!(inbox.capacity(), 0, "a drained queue gives its memory back");
        // A push that arrives while the inbox waits wakes it.
        let waiting = tokio::spawn(async move { inbox.recv().await });
        tokio::task::yield_now().await;
        hub.push(7, message("later"));
        assert_eq!(waiting.await.unwrap(), Some(message("later")));
    }

    #[tokio::test]
    async fn a_detached_socket_reads_what_was_queued_then_ends() {
        let hub = Hub::default();
        let (conn, queue, mut inbox) = hub.channel();
        hub.attach(7, conn, queue);
        hub.push(7, message("queued"));
        assert!(hub.detach(7, conn));
        assert_eq!(inbox.recv().await, Some(message("queued")));
        assert_eq!(inbox.recv().await, None);
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
            assert!(matches!(inbox.recv().await, Some(Push::Event { .. })));
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
