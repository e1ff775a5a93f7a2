//! The chat's operations: validate a request against the current state, decide everything its op needs
//! (ids, timestamps, hashes, tokens), append it to the log, and publish the events it caused.
//!
//! Nothing here touches a socket: callers pass the queue a session's pushes should go to.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::Utf8Bytes;
use rand::RngCore;
use replichat_shared::{
    Conversation, Message, ServerBody, DEFAULT_PAGE, MAX_CLIENT_ID_CHARS, MAX_PAGE, MAX_PASSWORD_CHARS, MAX_TEXT_CHARS,
    MIN_PASSWORD_CHARS,
};
use sha2::{Digest, Sha256};
use tokio::sync::{watch, RwLockWriteGuard};
use tokio_util::sync::CancellationToken;

use crate::hub::{ConnId, Hub, Push, Queue};
use crate::op::Op;
use crate::password::Hashing;
use crate::replication::{Replication, Role};
use crate::storage::{Db, Delivery, User};
use crate::throttle::{SendRate, Throttle};
use crate::wildcard::Pattern;
use crate::{Error, Result};

/// The account a socket is logged in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authed {
    /// Account id.
    pub user_id: i64,
    /// Username as registered.
    pub username: String,
    /// SHA-256 (hex) of the session token: what `logout` revokes.
    pub token_hash: String,
}

/// A successful `register`, `login` or `resume`.
#[derive(Debug)]
pub struct Attached {
    /// Who the socket now is.
    pub authed: Authed,
    /// The new token (`register`, `login`).
    pub token: Option<String>,
    /// Events with an index above this reach the socket through its push queue.
    pub cursor: u64,
    /// Events the socket must be sent before its pushes, read a page at a time with [`Chat::backlog_page`]:
    /// for `login` the undelivered messages, for `resume` every stored event after the client's cursor.
    pub backlog: Backlog,
    /// True when this socket is the account's first open one (its contacts were told it is online).
    pub first: bool,
}

/// Events a socket must be sent right after its `session` reply, and how far it got through them. Read a
/// page at a time, written before the next page is read: a client that does not read holds up one page,
/// never its whole history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Backlog {
    /// Nothing (more) to send.
    #[default]
    Done,
    /// `login`: messages to `user_id` not yet delivered, with an id above `after`, up to `up_to`.
    Undelivered { user_id: i64, after: i64, up_to: i64 },
    /// `resume`: `user_id`'s stored events with an index above `after`.
    Events { user_id: i64, after: u64 },
}

/// Events read per page of a backlog.
pub const BACKLOG_PAGE: u32 = 100;

/// A socket's push queue, handed over on attach.
pub struct Mailbox {
    /// The socket's id in the hub.
    pub conn: ConnId,
    /// Where the hub sends its pushes.
    pub tx: Queue,
}

/// The chat's configurable limits (from [`crate::Config`]).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Applied entries kept in the log before compaction.
    pub compact_keep: u64,
    /// Sessions unused for this long expire.
    pub session_idle: Duration,
    /// Sends per second per account, on average.
    pub send_rate: f64,
    /// Sends per account in a burst.
    pub send_burst: u32,
}

/// How long a write waits for its entry to be committed and applied before answering `unavailable`.
const COMMIT_WAIT: Duration = Duration::from_secs(5);

/// A backup applies what was committed once per this period, in its own slot of it ([`until_apply_slot`]):
/// nobody reads a backup's state (its clients are sent to the primary) until it becomes primary, when it
/// applies at once; fewer, larger apply transactions cost less per entry (a user's newest index pages are
/// written once per transaction, however many of their messages it holds).
const BACKUP_APPLY_PERIOD: Duration = Duration::from_millis(250);

/// How long a backup waits, at `now` (since the Unix epoch), for its next apply slot. The period is cut into
/// one slot per replica, by rank of id (`rank` of `replicas`), and slot k starts k/n of a period after each
/// multiple of the period on the wall clock; the wait is never zero and at most one period.
///
/// Why slots: a SQLite replica's apply holds its one writer connection, so its log appends wait until the
/// apply commits, and the primary commits an entry once one backup has appended it. Two backups applying at
/// the same moment delay every commit; two backups in different slots never both do (while their clocks
/// agree to within a slot, 83 ms for three replicas). Measured: applying every 250 ms on a timer of each
/// backup's own lengthened the tail (stop 18); in slots the closed loop's tail did not lengthen, and at
/// 1,000 msg/s the runs were too noisy to tell (BENCHMARKS.md, stop 19).
fn until_apply_slot(rank: u64, replicas: u64, period: Duration, now: Duration) -> Duration {
    let period = period.as_millis().max(1) as u64;
    let offset = rank % replicas.max(1) * period / replicas.max(1);
    let into = (now.as_millis() as u64 + period - offset) % period;
    Duration::from_millis(period - into)
}

/// The chat service. One per node, shared by every socket.
pub struct Chat {
    db: Db,
    replication: Replication,
    hub: Hub,
    /// The write gate. Every write but `send` takes it exclusively, from its validation until its entry is
    /// applied, so it validates against every earlier write and the index it builds its op for is the index
    /// it gets. Sends take it shared, only while they validate and propose: many sends are in flight at once
    /// and commit in groups, and an exclusive write (a deletion, say) never interleaves with a send's
    /// validation. A tokio lock because it is held across `.await`s.
    writer: tokio::sync::RwLock<()>,
    /// Sends proposed but not yet applied, by (sender, client id): a concurrent retry waits for the original
    /// instead of storing a second copy. The applier leaves each one's stored message here, which is what the
    /// sender is answered with (no read-back). A std mutex: never held across an `.await`.
    sending: Mutex<std::collections::HashMap<(i64, String), Sending>>,
    /// Highest index applied to the state tables, published by the applier.
    applied: watch::Receiver<u64>,
    /// Delays after failed password checks, per client address and per address and account.
    throttle: Throttle,
    /// This server's queue of password checks (argon2), bounded per core.
    hashing: Hashing,
    /// Each account's send rate (`--send-rate`, `--send-burst`).
    send_rate: SendRate,
    /// Why applying committed entries is failing right now (storage trouble being retried); `/healthz`
    /// reports it. A std mutex: never held across an `.await`.
    storage_problem: Mutex<Option<String>>,
    /// Why this replica stopped itself (an entry it cannot apply); `Running::wait` returns it.
    fatal: Mutex<Option<String>>,
    /// Sessions unused for this long expire (`--session-idle-secs`).
    session_idle: Duration,
    /// Cancelled when the replica stops: sockets closing then are not recorded as their users going away.
    shutdown: CancellationToken,
}

/// A send in flight on this replica (see `Chat::sending`).
#[derive(Debug)]
struct Sending {
    /// The sender's username, which tells the sender's copy of the message event from the recipient's.
    from: String,
    /// The message, once applied and stored; stays `None` for a send whose client id was already stored.
    stored: Option<Message>,
}

/// The exclusive right to write, with the index the next entry will get.
pub struct Writer<'a> {
    _guard: RwLockWriteGuard<'a, ()>,
    next: u64,
}

impl Chat {
    /// The service over an opened database and a started replication core; starts the applier, which
    /// applies committed entries in order and pushes the events they cause.
    pub async fn start(
        db: Db,
        replication: Replication,
        limits: Limits,
        shutdown: CancellationToken,
    ) -> Result<std::sync::Arc<Chat>> {
        let Limits { compact_keep, session_idle, .. } = limits;
        let (applied_tx, applied) = watch::channel(db.applied_index().await?);
        crate::metrics::applied_index(*applied.borrow());
        let chat = std::sync::Arc::new(Chat {
            db,
            replication,
            hub: Hub::default(),
            writer: tokio::sync::RwLock::new(()),
            sending: Mutex::default(),
            applied,
            throttle: Throttle::default(),
            hashing: Hashing::default(),
            send_rate: SendRate::new(limits.send_rate, limits.send_burst),
            storage_problem: Mutex::default(),
            fatal: Mutex::default(),
            session_idle,
            shutdown: shutdown.clone(),
        });
        tokio::spawn(std::sync::Arc::clone(&chat).apply_committed(applied_tx, compact_keep, shutdown));
        Ok(chat)
    }

    /// The database (for reads that need no validation).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The replication core's handle.
    pub fn replication(&self) -> &Replication {
        &self.replication
    }

    /// Why applying committed entries is failing right now, if it is (storage trouble being retried).
    pub fn storage_problem(&self) -> Option<String> {
        self.storage_problem.lock().expect("problem lock").clone()
    }

    /// Why the replica stopped itself, if it did.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().expect("fatal lock").clone()
    }

    /// Highest index applied to the state tables.
    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// The applier: whenever the commit index moves, apply the new entries in one transaction and push the
    /// events they caused, in index order (a backup waits for its slot first, [`until_apply_slot`]).
    async fn apply_committed(
        self: std::sync::Arc<Self>,
        applied: watch::Sender<u64>,
        compact_keep: u64,
        shutdown: CancellationToken,
    ) {
        let mut commits = self.replication.commit_index();
        let mut leadership = self.replication.leadership();
        let rank = self.replication.peers.range(..self.replication.id).count() as u64;
        let replicas = self.replication.peers.len() as u64;
        let mut compacted_at = 0;
        let mut failures = 0u32;
        loop {
            let commit = *commits.borrow_and_update();
            if commit > *applied.borrow() {
                match self.db.apply_committed(commit).await {
                    Ok((index, deliveries)) => {
                        if failures > 0 {
                            failures = 0;
                            *self.storage_problem.lock().expect("problem lock") = None;
                            tracing::info!(index, "applying committed entries works again");
                        }
                        self.note_stored_sends(&deliveries);
                        self.push_deliveries(deliveries);
                        applied.send_replace(index);
                        crate::metrics::applied_index(index);
                        // Compact in steps of a tenth of what is kept, not after every entry.
                        if index >= compacted_at + compact_keep / 10 + compact_keep.max(1) {
                            match self.db.compact(compact_keep).await {
                                Ok(cut) => {
                                    compacted_at = cut.unwrap_or(compacted_at).max(index.saturating_sub(compact_keep))
                                }
                                Err(e) => tracing::warn!(error = %e, "log compaction failed"),
                            }
                        }
                        continue;
                    }
                    Err(e) if e.is_deterministic() => {
                        // Retrying cannot help and every write would time out behind it: stop, loudly.
                        tracing::error!(error = %e, commit, "a committed entry cannot be applied; stopping the replica");
                        *self.fatal.lock().expect("fatal lock") = Some(e.to_string());
                        shutdown.cancel();
                        return;
                    }
                    Err(e) => {
                        // The machine, not the data (a full disk, a lost connection): report it on /healthz and
                        // retry with a growing pause until it passes.
                        tracing::error!(error = %e, commit, "applying committed entries failed; retrying");
                        *self.storage_problem.lock().expect("problem lock") = Some(e.to_string());
                        self.replication.apply_failed(e.to_string());
                        failures += 1;
                        let pause = Duration::from_millis(100 << failures.min(5));
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(pause) => continue,
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = commits.changed() => if changed.is_err() { return },
            }
            if leadership.borrow_and_update().role != Role::Primary {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(until_apply_slot(rank, replicas, BACKUP_APPLY_PERIOD, Duration::from_millis(crate::replication::unix_ms()))) => {}
                    _ = leadership.wait_for(|l| l.role == Role::Primary) => {}
                }
            }
        }
    }

    /// Push what an apply caused to the sockets of the users it is for. A stored event goes out as the JSON
    /// the apply encoded: copied once into a frame that the users' sockets share (a message's recipient and
    /// sender get the same one), never encoded again.
    fn push_deliveries(&self, deliveries: Vec<Delivery>) {
        let mut last: Option<(Arc<str>, Utf8Bytes)> = None;
        for Delivery { user_id, body, session, json } in deliveries {
            let push = match (body, json) {
                (ServerBody::SessionEnded { reason }, _) => Push::Ended { session, reason },
                // A stored event (it has an index, and the apply encoded it) goes out as encoded.
                (body, json) => match body.index().zip(json) {
                    Some((index, json)) => {
                        let frame = match &last {
                            Some((shared, frame)) if Arc::ptr_eq(shared, &json) => frame.clone(),
                            _ => {
                                let frame = Utf8Bytes::from(String::from(&*json));
                                last = Some((json, frame.clone()));
                                frame
                            }
                        };
                        Push::Event { index, json: frame }
                    }
                    None => Push::Frame(body),
                },
            };
            self.hub.push(user_id, push);
        }
    }

    /// Hand each in-flight send on this replica the message its entry stored (the sender's copy of the event).
    fn note_stored_sends(&self, deliveries: &[Delivery]) {
        let mut sending = self.sending.lock().expect("sending lock");
        if sending.is_empty() {
            return;
        }
        for d in deliveries {
            if let ServerBody::Message { message, .. } = &d.body {
                if let Some(send) = sending.get_mut(&(d.user_id, message.client_id.clone())) {
                    if send.from == message.from {
                        send.stored = Some(message.clone());
                    }
                }
            }
        }
    }

    /// Wait for the right to write: only the primary writes, and only once everything in its log is applied.
    async fn writer(&self) -> Result<Writer<'_>> {
        let guard = self.writer.write().await;
        let last = {
            let status = self.replication.status();
            let status = status.borrow();
            if status.role != Role::Primary {
                return Err(Error::Unavailable);
            }
            status.last_index
        };
        self.wait_applied(last).await?;
        let next = self.replication.status().borrow().last_index + 1;
        Ok(Writer { _guard: guard, next })
    }

    /// Propose `op` as the next entry and wait until it is committed and applied (its events pushed).
    async fn commit(&self, writer: &mut Writer<'_>, op: Op) -> Result<u64> {
        let index = self.replication.propose(Some(writer.next), op.to_json()).await?;
        self.wait_applied(index).await?;
        writer.next = index + 1;
        Ok(index)
    }

    /// Wait until `index` is applied; `unavailable` if this replica stops being primary or it takes too long.
    async fn wait_applied(&self, index: u64) -> Result<()> {
        let mut applied = self.applied.clone();
        let mut leadership = self.replication.leadership();
        let term = leadership.borrow().term;
        let wait = async {
            loop {
                if *applied.borrow_and_update() >= index {
                    return Ok(());
                }
                {
                    let now = leadership.borrow_and_update();
                    if now.role != Role::Primary || now.term != term {
                        return Err(Error::Unavailable);
                    }
                }
                tokio::select! {
                    changed = applied.changed() => changed.map_err(|_| Error::Unavailable)?,
                    changed = leadership.changed() => changed.map_err(|_| Error::Unavailable)?,
                }
            }
        };
        tokio::time::timeout(COMMIT_WAIT, wait).await.map_err(|_| Error::Unavailable)?
    }

    /// The registry of open sockets.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// `register`: create the account and its first session, attached to `mailbox`.
    pub async fn register(&self, username: &str, password: &str, mailbox: Mailbox, client: IpAddr) -> Result<Attached> {
        let name = crate::username::parse(username)?;
        let username = name.name.as_str();
        validate_password(password)?;
        let password_hash = self.hashing.hash(password).await?;
        let (token, token_hash) = new_token();
        let mut writer = self.writer().await?;
        // A look-alike of a live name (same confusable skeleton) is as taken as the name itself. Decided here,
        // under the write gate, against the stored skeletons: replicas only apply the answer.
        if self.db.user_by_name(username).await?.is_some() || self.db.skeleton_taken(&name.skeleton).await? {
            return Err(Error::UsernameTaken);
        }
        let user_id = writer.next as i64;
        let op = Op::Register {
            user_id,
            username: username.to_owned(),
            password_hash,
            token_hash: token_hash.clone(),
            at: now_ms(),
            skeleton: Some(name.skeleton),
        };
        let cursor = self.commit(&mut writer, op).await?;
        let first = self.hub.attach(user_id, mailbox.conn, mailbox.tx);
        drop(writer);
        self.throttle.succeeded(client, &crate::wildcard::name_key(username));
        let authed = Authed { user_id, username: username.to_owned(), token_hash };
        Ok(Attached { authed, token: Some(token), cursor, backlog: Backlog::Done, first })
    }

    /// `login`: check the password (rate-limited per username), open a session attached to `mailbox`, and
    /// return the messages no session of the account has acknowledged, oldest first.
    pub async fn login(&self, username: &str, password: &str, mailbox: Mailbox, client: IpAddr) -> Result<Attached> {
        let key = crate::wildcard::name_key(username);
        let user = self.db.user_by_name(username).await?;
        self.check_password(user.as_ref(), &key, password, client).await?;
        let Some(user) = user else { return Err(Error::BadCredentials) };
        let (token, token_hash) = new_token();
        let mut writer = self.writer().await?;
        // The account may have been deleted while the password was being checked.
        if self.db.user_by_name(username).await?.map(|u| u.id) != Some(user.id) {
            return Err(Error::BadCredentials);
        }
        let op = Op::Login { user_id: user.id, token_hash: token_hash.clone(), at: now_ms() };
        let cursor = self.commit(&mut writer, op).await?;
        self.throttle.succeeded(client, &key);
        let first = self.hub.attach(user.id, mailbox.conn, mailbox.tx);
        drop(writer);
        // Read after attaching, page by page as the socket writes them (`backlog_page`).
        let backlog = Backlog::Undelivered { user_id: user.id, after: 0, up_to: cursor as i64 };
        let authed = Authed { user_id: user.id, username: user.username, token_hash };
        Ok(Attached { authed, token: Some(token), cursor, backlog, first })
    }

    /// `resume`: re-attach to the session `token` names and return its events after `cursor`.
    pub async fn resume(&self, token: &str, cursor: u64, mailbox: Mailbox) -> Result<Attached> {
        let token_hash = hash_token(token);
        // A cursor from before a failover may be ahead of what this new primary has applied, or even knows to
        // be committed, yet; never of its log: a client only saw committed events, and a new primary holds
        // every committed entry. It is applied once the new primary's first entry commits.
        if cursor > self.applied_index() {
            if cursor > self.replication.status().borrow().last_index {
                return Err(Error::BadRequest(format!("cursor {cursor} is beyond the end of the log")));
            }
            self.wait_applied(cursor).await?;
        }
        let (user, used) = self.db.session_by_token(&token_hash).await?.ok_or(Error::Unauthenticated)?;
        let now = now_ms();
        let idle = self.session_idle.as_millis() as i64;
        if now.saturating_sub(used) > idle {
            // Expired: revoke it for good (best effort; it stays refused either way).
            let _ = self.propose_quietly(Op::Logout { token_hash: token_hash.clone() }).await;
            return Err(Error::Unauthenticated);
        }
        // Renew the idle timeout, recorded at most once a day (or a quarter of the timeout, if shorter).
        if now.saturating_sub(used) > (idle / 4).min(24 * 3600 * 1000) {
            let _ = self.propose_quietly(Op::Touch { token_hash: token_hash.clone(), at: now }).await;
        }
        // Attach before reading, so an event committed meanwhile is either read here or pushed.
        let first = self.hub.attach(user.id, mailbox.conn, mailbox.tx);
        let backlog = Backlog::Events { user_id: user.id, after: cursor };
        let authed = Authed { user_id: user.id, username: user.username, token_hash };
        Ok(Attached { authed, token: None, cursor, backlog, first })
    }

    /// The next page of `backlog`, oldest first, and `backlog` moved past it; empty once everything was read.
    pub async fn backlog_page(&self, backlog: &mut Backlog) -> Result<Vec<ServerBody>> {
        let page: Vec<ServerBody> = match *backlog {
            Backlog::Done => return Ok(Vec::new()),
            Backlog::Undelivered { user_id, after, up_to } => {
                let messages = self.db.undelivered(user_id, after, up_to, BACKLOG_PAGE).await?;
                if let Some(last) = messages.last() {
                    *backlog = Backlog::Undelivered { user_id, after: last.id as i64, up_to };
                }
                messages.into_iter().map(|message| ServerBody::Message { index: message.id, message }).collect()
            }
            Backlog::Events { user_id, after } => {
                let events = self.db.events_after(user_id, after, BACKLOG_PAGE).await?;
                if let Some(&(last, _)) = events.last() {
                    *backlog = Backlog::Events { user_id, after: last };
                }
                events.into_iter().map(|(_, body)| body).collect()
            }
        };
        if page.len() < BACKLOG_PAGE as usize {
            *backlog = Backlog::Done;
        }
        Ok(page)
    }

    /// Tell `user_id`'s contacts that it came online (after its first socket attached).
    pub async fn announce_online(&self, authed: &Authed) -> Result<()> {
        let presence = ServerBody::Presence { username: authed.username.clone(), online: true, last_seen: None };
        for contact in self.db.contacts(authed.user_id).await? {
            self.hub.push(contact, Push::Frame(presence.clone()));
        }
        Ok(())
    }

    /// Detach socket `conn` from `user_id`; if it was the last one and the user has contacts (the only people
    /// shown presence), record in the log when the user was last seen, and once that is applied tell the
    /// contacts it went offline, and when. That is the one write presence costs: once per "went offline",
    /// never per message. Not recorded while the replica stops (its sockets close because of it, not because
    /// their users left) or once it is no longer primary; a later contact sees the last sign-in instead.
    pub async fn detach(&self, user_id: i64, conn: ConnId) {
        if !self.hub.detach(user_id, conn) {
            return;
        }
        let at = now_ms();
        let (user, contacts) = match self.db.user_by_id(user_id).await {
            Ok(Some(user)) => match self.db.contacts(user_id).await {
                Ok(contacts) if !contacts.is_empty() => (user, contacts),
                Ok(_) => return,
                Err(e) => return tracing::warn!(error = %e, "could not announce presence"),
            },
            Ok(None) => return,
            Err(e) => return tracing::warn!(error = %e, "could not announce presence"),
        };
        if !self.shutdown.is_cancelled() {
            let recorded = match self.propose_quietly(Op::Seen { user_id, at }).await {
                Ok(index) => self.wait_applied(index).await,
                Err(e) => Err(e),
            };
            if let Err(e) = recorded {
                tracing::debug!(error = %e, user_id, "could not record when the user was last seen");
            }
        }
        // Back in the meantime (a reload): then they never looked offline.
        if self.hub.online(user_id) {
            return;
        }
        let presence = ServerBody::Presence { username: user.username, online: false, last_seen: Some(at) };
        for contact in contacts {
            self.hub.push(contact, Push::Frame(presence.clone()));
        }
    }

    /// `list`: one page of usernames matching `pattern`, and the `after` for the next page.
    pub async fn list(
        &self,
        pattern: &str,
        after: Option<&str>,
        limit: Option<u32>,
    ) -> Result<(Vec<String>, Option<String>)> {
        let limit = page(limit)?;
        let mut users = self.db.list_users(&Pattern::parse(pattern), after, limit + 1).await?;
        let next = if users.len() > limit as usize {
            users.truncate(limit as usize);
            users.last().cloned()
        } else {
            None
        };
        Ok((users, next))
    }

    /// `send`: store a message (or find the one this `client_id` already stored) and push it to both sides.
    pub async fn send(&self, me: &Authed, to: &str, text: &str, client_id: &str) -> Result<Message> {
        self.send_rate.take(me.user_id).map_err(|retry_after| Error::RateLimited { what: "messages", retry_after })?;
        if text.trim().is_empty() {
            return Err(Error::TooLong("the message is empty"));
        }
        if text.chars().count() > MAX_TEXT_CHARS {
            return Err(Error::TooLong("the message is longer than 4000 characters"));
        }
        if client_id.is_empty() || client_id.chars().count() > MAX_CLIENT_ID_CHARS {
            return Err(Error::BadRequest("client_id must have 1 to 64 characters".to_owned()));
        }
        let key = (me.user_id, client_id.to_owned());
        let index = loop {
            let gate = self.writer.read().await;
            let Some(term_start) = self.replication.status().borrow().term_start else {
                return Err(Error::Unavailable);
            };
            // A new primary may hold an earlier try of this very send from the old primary's term, committed
            // but not applied yet: validate only once everything before this term is applied.
            self.wait_applied(term_start).await?;
            // The recipient from the index of live names, no query; whether this client id was stored already
            // is decided when the entry is applied (the applier's client-id map), not looked up here.
            let Some(recipient_id) = self.db.live_user_id(to).await? else {
                // A retry of a send that was stored, to an account deleted since: answer with the original.
                if let Some(original) = self.db.message_by_client_id(me.user_id, client_id).await? {
                    return Ok(original);
                }
                return Err(Error::UnknownUser(to.to_owned()));
            };
            if recipient_id == me.user_id {
                // A retry is answered with its original whatever its `to` says (docs/PROTOCOL.md, `send`).
                if let Some(original) = self.db.message_by_client_id(me.user_id, client_id).await? {
                    return Ok(original);
                }
                return Err(Error::SelfSend);
            }
            // The same send may be in flight right now (a retry racing its original): wait for it to land.
            let racing = {
                let mut sending = self.sending.lock().expect("sending lock");
                let racing = sending.contains_key(&key);
                if !racing {
                    sending.insert(key.clone(), Sending { from: me.username.clone(), stored: None });
                }
                racing
            };
            if racing {
                drop(gate);
                self.wait_for_send(&key).await?;
                continue;
            }
            let op = Op::Send {
                sender_id: me.user_id,
                recipient_id,
                client_id: client_id.to_owned(),
                text: text.to_owned(),
                at: now_ms(),
            };
            let proposed = self.replication.propose(None, op.to_json()).await;
            drop(gate);
            match proposed {
                Ok(index) => break index,
                Err(e) => {
                    self.sending.lock().expect("sending lock").remove(&key);
                    return Err(e);
                }
            }
        };
        let applied = self.wait_applied(index).await;
        let stored = self.sending.lock().expect("sending lock").remove(&key).and_then(|s| s.stored);
        applied?;
        if let Some(message) = stored {
            return Ok(message);
        }
        // The entry stored nothing: the client id was stored before (a retry). Answer with the original.
        self.db
            .message_by_client_id(me.user_id, client_id)
            .await?
            .ok_or_else(|| Error::Corrupt("a committed message is missing".to_owned()))
    }

    /// Append `op` alongside the sends (under the shared gate) without waiting for it to be applied: for
    /// bookkeeping ops whose effect nobody waits for (session touches and expiries).
    async fn propose_quietly(&self, op: Op) -> Result<u64> {
        let _gate = self.writer.read().await;
        if self.replication.status().borrow().role != Role::Primary {
            return Err(Error::Unavailable);
        }
        self.replication.propose(None, op.to_json()).await
    }

    /// Wait until the in-flight send `key` is no longer in flight (applied, or failed).
    async fn wait_for_send(&self, key: &(i64, String)) -> Result<()> {
        let mut applied = self.applied.clone();
        let wait = async {
            while self.sending.lock().expect("sending lock").contains_key(key) {
                applied.changed().await.map_err(|_| Error::Unavailable)?;
            }
            Ok(())
        };
        tokio::time::timeout(COMMIT_WAIT, wait).await.map_err(|_| Error::Unavailable)?
    }

    /// `history`: one page of the conversation with `with`, oldest first within the page, and whether
    /// older messages exist.
    pub async fn history(
        &self,
        me: &Authed,
        with: &str,
        before: Option<u64>,
        limit: Option<u32>,
    ) -> Result<(String, Vec<Message>, bool)> {
        let limit = page(limit)?;
        let peer = self.peer(me, with).await?;
        let mut messages = self.db.history(me.user_id, peer.id, before, limit + 1).await?;
        let more = messages.len() > limit as usize;
        messages.truncate(limit as usize);
        messages.reverse();
        Ok((peer.username, messages, more))
    }

    /// `delivered`: every message to me up to `up_to` reached a device.
    pub async fn delivered(&self, me: &Authed, up_to: u64) -> Result<()> {
        let mut writer = self.writer().await?;
        let up_to = up_to.min(writer.next - 1) as i64;
        // A receipt that covers nothing new is not worth a log entry.
        if self.db.has_unacknowledged(me.user_id, None, up_to, false).await? {
            self.commit(&mut writer, Op::Delivered { user_id: me.user_id, up_to, at: now_ms() }).await?;
        }
        Ok(())
    }

    /// `read`: I read `with`'s messages up to `up_to`.
    pub async fn read(&self, me: &Authed, with: &str, up_to: u64) -> Result<()> {
        let mut writer = self.writer().await?;
        let peer = self.peer(me, with).await?;
        let up_to = up_to.min(writer.next - 1) as i64;
        if self.db.has_unacknowledged(me.user_id, Some(peer.id), up_to, true).await? {
            let op = Op::Read { user_id: me.user_id, peer_id: peer.id, up_to, at: now_ms() };
            self.commit(&mut writer, op).await?;
        }
        Ok(())
    }

    /// `conversations`: most recent first, with unread counts, whether each peer is online and when they were
    /// last seen.
    pub async fn conversations(&self, me: &Authed) -> Result<Vec<Conversation>> {
        let rows = self.db.conversations(me.user_id).await?;
        Ok(rows
            .into_iter()
            .map(|(peer, mut conversation)| {
                conversation.online = self.hub.online(peer);
                conversation
            })
            .collect())
    }

    /// `typing`: tell `to`'s open sockets that I am typing. Not stored.
    pub async fn typing(&self, me: &Authed, to: &str) -> Result<()> {
        let peer = self.db.user_by_name(to).await?.ok_or_else(|| Error::UnknownUser(to.to_owned()))?;
        if peer.id == me.user_id {
            return Err(Error::SelfSend);
        }
        self.hub.push(peer.id, Push::Frame(ServerBody::Typing { from: me.username.clone() }));
        Ok(())
    }

    /// `logout`: revoke the session. The caller detaches the socket.
    pub async fn logout(&self, me: &Authed) -> Result<()> {
        let mut writer = self.writer().await?;
        self.commit(&mut writer, Op::Logout { token_hash: me.token_hash.clone() }).await?;
        Ok(())
    }

    /// `logout_all`: revoke every session of the account. The caller detaches the socket.
    pub async fn logout_all(&self, me: &Authed) -> Result<()> {
        let mut writer = self.writer().await?;
        self.commit(&mut writer, Op::LogoutAll { user_id: me.user_id }).await?;
        Ok(())
    }

    /// `delete_account`: with the password as confirmation, delete the account; every open socket of it
    /// is told and closed.
    pub async fn delete_account(&self, me: &Authed, password: &str, client: IpAddr) -> Result<()> {
        let user = self.db.user_by_name(&me.username).await?.filter(|u| u.id == me.user_id);
        if user.as_ref().is_none_or(|u| u.password_hash.is_none()) {
            return Err(Error::Unauthenticated);
        }
        self.check_password(user.as_ref(), &crate::wildcard::name_key(&me.username), password, client).await?;
        let mut writer = self.writer().await?;
        // Another session of the account may have deleted it while the password was being checked.
        if self.db.user_by_id(me.user_id).await?.and_then(|u| u.password_hash).is_none() {
            return Err(Error::Unauthenticated);
        }
        self.commit(&mut writer, Op::DeleteAccount { user_id: me.user_id, at: now_ms() }).await?;
        self.hub.close_user(me.user_id);
        Ok(())
    }

    /// The conversation partner named `with`: not yourself, and existing (or deleted, with history).
    async fn peer(&self, me: &Authed, with: &str) -> Result<User> {
        let peer = self.db.peer_by_name(me.user_id, with).await?.ok_or_else(|| Error::UnknownUser(with.to_owned()))?;
        if peer.id == me.user_id {
            return Err(Error::SelfSend);
        }
        Ok(peer)
    }

    /// Check `password` for `user` (absent: no such live account; the check then takes as long and fails),
    /// under the limits of [`crate::throttle`]: `rate_limited` before any hashing while a delay is running
    /// for this address, this address and account, or this account (unless this address logged in to it
    /// recently). A failure counts for the address, the pair and, replicated, the account.
    async fn check_password(&self, user: Option<&User>, key: &str, password: &str, client: IpAddr) -> Result<()> {
        let limited = |retry_after| Error::RateLimited { what: "failed password checks", retry_after };
        if let Some(wait) = self.throttle.wait(client, key) {
            return Err(limited(wait));
        }
        if let Some(user) = user.filter(|_| !self.throttle.trusted(client, key)) {
            if let Some((failures, last)) = self.db.login_failures(user.id).await? {
                if let Some(wait) = crate::throttle::account_wait(failures, last, now_ms()) {
                    return Err(limited(wait));
                }
            }
        }
        let verified = match user {
            Some(User { password_hash: Some(hash), .. }) => self.hashing.verify(password, hash).await?,
            _ => {
                // Spend the same time as a real check so response times don't reveal which names exist.
                self.hashing.verify(password, dummy_hash()).await?;
                false
            }
        };
        if verified {
            return Ok(());
        }
        self.throttle.failed(client, key);
        if let Some(user) = user {
            // Replicated, so the next check (on this primary or the next) sees it.
            let index = self.propose_quietly(Op::LoginFailed { user_id: user.id, at: now_ms() }).await?;
            self.wait_applied(index).await?;
        }
        Err(Error::BadCredentials)
    }
}

/// Page size from a request: default 50, 1..=200.
fn page(limit: Option<u32>) -> Result<u32> {
    match limit.unwrap_or(DEFAULT_PAGE) {
        n @ 1..=MAX_PAGE => Ok(n),
        _ => Err(Error::BadRequest(format!("limit must be between 1 and {MAX_PAGE}"))),
    }
}

/// The username rules live in [`crate::username`]; kept under this name for the fuzz checks.
pub use crate::username::validate as validate_username;

fn validate_password(password: &str) -> Result<()> {
    let chars = password.chars().count();
    if (MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&chars) {
        Ok(())
    } else {
        Err(Error::WeakPassword)
    }
}

/// A valid argon2id hash of a password nobody has, for constant-time failures on unknown names.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| crate::password::hash_now(b"no account has this password").expect("argon2"))
}

/// A fresh 256-bit session token (hex) and the hash that is stored.
fn new_token() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    let hash = hash_token(&token);
    (token, hash)
}

/// What the database stores of a token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Milliseconds since the Unix epoch: the time a node stamps on an op when it accepts it.
fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords() {
        assert!(validate_password("12345678").is_ok());
        assert!(validate_password("1234567").is_err());
        assert!(validate_password(&"p".repeat(1025)).is_err());
    }

    #[test]
    fn backups_apply_in_slots_of_their_own() {
        let period = Duration::from_millis(250);
        let slot = |rank: u64, now_ms: u64| {
            let wait = until_apply_slot(rank, 3, period, Duration::from_millis(now_ms));
            assert!(wait > Duration::ZERO && wait <= period, "rank {rank} at {now_ms}: {wait:?}");
            (now_ms + wait.as_millis() as u64) % 250
        };
        for now_ms in (1_764_000_000_000..1_764_000_000_600).step_by(7) {
            assert_eq!(slot(0, now_ms), 0);
            assert_eq!(slot(1, now_ms), 83);
            assert_eq!(slot(2, now_ms), 166);
        }
        // At the very start of its slot, a backup that just applied waits a whole period.
        assert_eq!(until_apply_slot(1, 3, period, Duration::from_millis(1_000 + 83)), period);
        // One replica, or a rank past the count, still gets a slot.
        assert_eq!(until_apply_slot(0, 1, period, Duration::from_millis(1_100)), Duration::from_millis(150));
        assert!(until_apply_slot(5, 3, period, Duration::from_millis(1_100)) <= period);
    }

    #[test]
    fn tokens_are_256_bit_and_stored_hashed() {
        let (token, hash) = new_token();
        assert_eq!(token.len(), 64);
        assert_ne!(token, hash);
        assert_eq!(hash, hash_token(&token));
        assert_ne!(new_token().0, token);
    }
}
