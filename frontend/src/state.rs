//! The chat as the browser sees it: reactive state, and what each server frame does to it. No view code.

use std::collections::HashMap;

use leptos::prelude::*;
use replichat_shared::{Conversation, ErrorCode, Message, ReceiptKind, Request, ServerBody, ServerFrame, SessionEnd};

use crate::connection::{self, Connection, Pending, RESUME_REQ, SEND_REQ};

/// Where one of my messages is on its way.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Status {
    /// Not acknowledged yet (maybe queued while offline).
    Sending,
    /// Stored durably on the cluster.
    Sent,
    /// Reached a device of the recipient.
    Delivered,
    /// The recipient read it.
    Read,
    /// Refused; the reason.
    Failed(String),
}

impl Status {
    /// The `data-status` value.
    pub fn name(&self) -> &'static str {
        match self {
            Status::Sending => "sending",
            Status::Sent => "sent",
            Status::Delivered => "delivered",
            Status::Read => "read",
            Status::Failed(_) => "failed",
        }
    }

    fn rank(&self) -> u8 {
        match self {
            Status::Failed(_) | Status::Sending => 0,
            Status::Sent => 1,
            Status::Delivered => 2,
            Status::Read => 3,
        }
    }
}

/// One message line in a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Server id, once known.
    pub id: Option<u64>,
    pub client_id: String,
    pub from: String,
    pub text: String,
    pub sent_at: i64,
    /// For my own messages.
    pub status: Status,
    /// A message from the peer that was unread when it arrived or was loaded.
    pub unread: bool,
    /// The sender deleted their account.
    pub from_deleted: bool,
}

impl Line {
    fn from_message(message: &Message, me: &str) -> Line {
        let status = if message.read_at.is_some() {
            Status::Read
        } else if message.delivered_at.is_some() {
            Status::Delivered
        } else {
            Status::Sent
        };
        Line {
            id: Some(message.id),
            client_id: message.client_id.clone(),
            from: message.from.clone(),
            text: message.text.clone(),
            sent_at: message.sent_at,
            status,
            unread: message.from != me && message.read_at.is_none(),
            from_deleted: message.from_deleted,
        }
    }
}

/// All of the chat's reactive state. `Copy`: every field is a signal.
#[derive(Clone, Copy)]
pub struct Chat {
    /// Logged in as.
    pub me: RwSignal<Option<String>>,
    /// The last sign-up / log-in error.
    pub auth_error: RwSignal<Option<String>>,
    /// A notice on the sign-in screen (not an error): why the user is there ("Your account was deleted.").
    pub notice: RwSignal<Option<String>>,
    /// The conversation list, most recent first.
    pub conversations: RwSignal<Vec<Conversation>>,
    /// Lines per peer (by the peer's key: lower-cased username), oldest first.
    pub lines: RwSignal<HashMap<String, Vec<Line>>>,
    /// Whether older history exists, per peer key.
    pub more: RwSignal<HashMap<String, bool>>,
    /// The open conversation (peer username as the server spells it).
    pub active: RwSignal<Option<String>>,
    /// Search results.
    pub results: RwSignal<Option<Vec<String>>>,
    /// Peers typing to me, until when (ms since epoch).
    pub typing: RwSignal<HashMap<String, f64>>,
    /// Peers' presence.
    pub online: RwSignal<HashMap<String, bool>>,
    /// When each peer was last seen (ms since the epoch), as the server recorded it (`conversations`,
    /// `presence`); for an older server, when this app saw them go offline.
    pub last_seen: RwSignal<HashMap<String, f64>>,
    /// Error under the composer.
    pub composer_error: RwSignal<Option<String>>,
    /// Error in the delete dialog.
    pub delete_error: RwSignal<Option<String>>,
    /// Whether the delete dialog is open.
    pub deleting: RwSignal<bool>,
}

/// Lower-cased username: how conversations are keyed (usernames are unique ignoring case).
pub fn key(name: &str) -> String {
    name.to_lowercase()
}

impl Chat {
    pub fn new() -> Chat {
        Chat {
            me: RwSignal::new(None),
            auth_error: RwSignal::new(None),
            notice: RwSignal::new(None),
            conversations: RwSignal::new(Vec::new()),
            lines: RwSignal::new(HashMap::new()),
            more: RwSignal::new(HashMap::new()),
            active: RwSignal::new(None),
            results: RwSignal::new(None),
            typing: RwSignal::new(HashMap::new()),
            online: RwSignal::new(HashMap::new()),
            last_seen: RwSignal::new(HashMap::new()),
            composer_error: RwSignal::new(None),
            delete_error: RwSignal::new(None),
            deleting: RwSignal::new(false),
        }
    }

    /// Forget everything about the session (logout, deletion, revoked token).
    pub fn reset(&self) {
        self.notice.set(None);
        connection::remember_open(None);
        connection::get().set_session(None, 0);
        self.me.set(None);
        self.conversations.set(Vec::new());
        self.lines.set(HashMap::new());
        self.more.set(HashMap::new());
        self.active.set(None);
        self.results.set(None);
        self.deleting.set(false);
    }

    /// Open the conversation with `peer` and load its latest page.
    pub fn open(&self, peer: &str) {
        connection::remember_open(Some(peer));
        self.active.set(Some(peer.to_owned()));
        self.composer_error.set(None);
        connection::get().request(Request::History { with: peer.to_owned(), before: None, limit: Some(50) });
    }

    /// Put every unacknowledged send of `conn` into its conversation, as sending, unless it is there.
    fn show_pending(&self, conn: &Connection, me: &str) {
        let pending = conn.pending();
        if pending.is_empty() {
            return;
        }
        self.lines.update(|lines| {
            for p in pending {
                let list = lines.entry(key(&p.to)).or_default();
                if !list.iter().any(|l| l.client_id == p.client_id) {
                    list.push(Line {
                        id: None,
                        client_id: p.client_id,
                        from: me.to_owned(),
                        text: p.text,
                        sent_at: p.written_at as i64,
                        status: Status::Sending,
                        unread: false,
                        from_deleted: false,
                    });
                }
            }
        });
    }

    /// Close the open conversation (back to the list, on a phone).
    pub fn close(&self) {
        connection::remember_open(None);
        self.active.set(None);
    }

    /// Load the page before the oldest loaded message of the open conversation.
    pub fn load_older(&self) {
        let Some(peer) = self.active.get_untracked() else { return };
        let before = self.lines.with_untracked(|l| l.get(&key(&peer)).and_then(|v| v.iter().find_map(|l| l.id)));
        connection::get().request(Request::History { with: peer, before, limit: Some(50) });
    }

    /// Send `text` to the open conversation. Refuses empty and over-long text here already.
    pub fn send(&self, text: &str) -> bool {
        let Some(peer) = self.active.get_untracked() else { return false };
        let Some(me) = self.me.get_untracked() else { return false };
        if text.trim().is_empty() {
            self.composer_error.set(Some("Write something first: empty messages are not sent.".into()));
            return false;
        }
        let chars = text.chars().count();
        if chars > replichat_shared::MAX_TEXT_CHARS {
            self.composer_error.set(Some(format!("Too long: {chars} characters, the limit is 4000.")));
            return false;
        }
        self.composer_error.set(None);
        let client_id = connection::new_client_id();
        let line = Line {
            id: None,
            client_id: client_id.clone(),
            from: me,
            text: text.to_owned(),
            sent_at: js_sys::Date::now() as i64,
            status: Status::Sending,
            unread: false,
            from_deleted: false,
        };
        self.lines.update(|lines| lines.entry(key(&peer)).or_default().push(line));
        connection::get().send_message(Pending {
            client_id,
            to: peer,
            text: text.to_owned(),
            written_at: js_sys::Date::now(),
        });
        true
    }

    /// Handle one frame from the server.
    pub fn on_frame(&self, conn: &Connection, frame: ServerFrame) {
        let req = frame.req.unwrap_or_default();
        match frame.body {
            ServerBody::Session { token, username, cursor } => {
                if token.is_some() {
                    conn.set_session(token, cursor);
                }
                self.auth_error.set(None);
                self.notice.set(None);
                self.me.set(Some(username.clone()));
                // Messages written before a reload and not acknowledged yet: shown as sending again (the
                // connection re-sends them with their client ids right after the resume).
                self.show_pending(conn, &username);
                conn.request(Request::Conversations);
                // After a reconnect, the conversation that is open; after a reload, the one that was.
                if let Some(peer) = self.active.get_untracked().or_else(connection::remembered_open) {
                    self.open(&peer);
                }
            }
            ServerBody::Error { code, message, retry_after_ms } => {
                let message = match (code, retry_after_ms) {
                    (ErrorCode::RateLimited, Some(ms)) => rate_limited(&req, ms),
                    _ => message,
                };
                self.on_error(conn, &req, code, message)
            }
            ServerBody::Sent { id, client_id, sent_at, .. } => {
                conn.acknowledged(&client_id);
                self.update_line(&client_id, |line| {
                    line.id = Some(id);
                    line.sent_at = sent_at;
                    if line.status.rank() < Status::Sent.rank() {
                        line.status = Status::Sent;
                    }
                });
            }
            ServerBody::Message { message, .. } => self.on_message(conn, message),
            ServerBody::Receipt { kind, by, up_to, .. } => {
                let status = match kind {
                    ReceiptKind::Delivered => Status::Delivered,
                    ReceiptKind::Read => Status::Read,
                };
                let me = self.me.get_untracked().unwrap_or_default();
                self.lines.update(|lines| {
                    for line in lines.entry(key(&by)).or_default() {
                        if line.from == me
                            && line.id.is_some_and(|id| id <= up_to)
                            && line.status.rank() < status.rank()
                        {
                            line.status = status.clone();
                        }
                    }
                });
            }
            ServerBody::PeerDeleted { username, .. } => {
                self.conversations.update(|list| {
                    for c in list.iter_mut().filter(|c| key(&c.with) == key(&username)) {
                        c.deleted = true;
                        c.online = false;
                    }
                });
            }
            ServerBody::Typing { from } => {
                self.typing.update(|t| {
                    t.insert(key(&from), js_sys::Date::now() + 3000.0);
                });
            }
            ServerBody::Presence { username, online, last_seen } => {
                let was = self.online.get_untracked().get(&key(&username)).copied();
                self.last_seen.update(|seen| match last_seen {
                    Some(at) => {
                        seen.insert(key(&username), at as f64);
                    }
                    None if !online && was == Some(true) => {
                        seen.insert(key(&username), js_sys::Date::now());
                    }
                    None => {}
                });
                self.online.update(|o| {
                    o.insert(key(&username), online);
                });
            }
            ServerBody::AccountDeleted => {
                self.reset();
                self.notice.set(Some("Your account was deleted.".to_owned()));
            }
            ServerBody::SessionEnded { reason } => {
                self.reset();
                self.notice.set(Some(match reason {
                    SessionEnd::LoggedOut => "You were logged out.".to_owned(),
                    SessionEnd::LoggedOutEverywhere => "You were logged out on every device.".to_owned(),
                }));
            }
            ServerBody::Conversations { conversations } => {
                self.online.update(|o| {
                    for c in &conversations {
                        o.insert(key(&c.with), c.online);
                    }
                });
                self.last_seen.update(|seen| {
                    for c in &conversations {
                        if let Some(at) = c.last_seen {
                            seen.insert(key(&c.with), at as f64);
                        }
                    }
                });
                self.conversations.set(conversations);
            }
            ServerBody::History { with, messages, more } => self.on_history(conn, with, messages, more),
            ServerBody::Users { users, .. } => self.results.set(Some(users)),
            _ => {}
        }
    }

    fn on_error(&self, conn: &Connection, req: &str, code: ErrorCode, message: String) {
        if let Some(client_id) = req.strip_prefix(SEND_REQ) {
            if code == ErrorCode::Unavailable {
                // Not refused: this replica could not commit it now (it lost its majority, or stopped being the
                // primary). Nothing was stored; the message keeps waiting, as "sending", until a primary takes it.
                conn.retry_later(client_id);
                return;
            }
            conn.acknowledged(client_id);
            let reason = match code {
                ErrorCode::UnknownUser => "No account with that name: it may have been deleted.".to_owned(),
                ErrorCode::SelfSend => "You cannot send a message to yourself.".to_owned(),
                _ => message,
            };
            self.update_line(client_id, |line| line.status = Status::Failed(reason.clone()));
            self.composer_error.set(Some(reason));
            return;
        }
        if req.starts_with(RESUME_REQ) {
            // The session is gone (logged out elsewhere, or the account deleted): back to the sign-in screen.
            if code == ErrorCode::Unauthenticated {
                self.reset();
            }
            return;
        }
        if self.deleting.get_untracked() {
            self.delete_error.set(Some(match code {
                ErrorCode::BadCredentials => "Wrong password.".to_owned(),
                _ => message,
            }));
            return;
        }
        if self.me.get_untracked().is_none() {
            self.auth_error.set(Some(match code {
                ErrorCode::UsernameTaken => "That username is taken.".to_owned(),
                ErrorCode::BadCredentials => "Wrong username or password.".to_owned(),
                ErrorCode::InvalidUsername => format!("Invalid username: {message}"),
                ErrorCode::WeakPassword => "The password needs at least 8 characters.".to_owned(),
                _ => message,
            }));
            return;
        }
        self.composer_error.set(Some(message));
    }

    fn on_message(&self, conn: &Connection, message: Message) {
        let me = self.me.get_untracked().unwrap_or_default();
        let mine = message.from == me;
        let peer = if mine { message.to.clone() } else { message.from.clone() };
        let active = self.active.get_untracked().is_some_and(|a| key(&a) == key(&peer));
        // A message from the peer in the open, visible conversation is read as it arrives.
        let seen_now = active && page_visible();
        let mut line = Line::from_message(&message, &me);
        let mut added = false;
        self.lines.update(|lines| {
            let list = lines.entry(key(&peer)).or_default();
            if let Some(existing) =
                list.iter_mut().find(|l| l.id == Some(message.id) || (mine && l.client_id == message.client_id))
            {
                existing.id = Some(message.id);
                if existing.status.rank() < line.status.rank() {
                    existing.status = line.status.clone();
                }
            } else {
                line.unread = !mine && !seen_now;
                list.push(line);
                list.sort_by_key(|l| l.id.unwrap_or(u64::MAX));
                added = true;
            }
        });
        if !mine {
            // The message they were typing has arrived.
            self.typing.update(|t| {
                t.remove(&key(&peer));
            });
        }
        if mine {
            conn.acknowledged(&message.client_id);
        } else if added {
            notify(&message.from, &message.text);
            conn.request(Request::Delivered { up_to: message.id });
            if seen_now {
                conn.request(Request::Read { with: peer.clone(), up_to: message.id });
            }
        }
        // Keep the conversation list (order, last message, unread counts) in step.
        let unread = !mine && added && !seen_now;
        let known = self.conversations.with_untracked(|list| list.iter().any(|c| key(&c.with) == key(&peer)));
        if !known {
            // A new contact: the server's list has its presence.
            conn.request(Request::Conversations);
        }
        self.conversations.update(|list| {
            let position = list.iter().position(|c| key(&c.with) == key(&peer));
            let mut conversation = match position {
                Some(i) => list.remove(i),
                None => Conversation {
                    with: peer.clone(),
                    deleted: false,
                    online: true,
                    last_seen: None,
                    unread: 0,
                    last: message.clone(),
                },
            };
            conversation.last = message.clone();
            if unread {
                conversation.unread += 1;
            }
            list.insert(0, conversation);
        });
    }

    fn on_history(&self, conn: &Connection, with: String, messages: Vec<Message>, more: bool) {
        let me = self.me.get_untracked().unwrap_or_default();
        let peer_key = key(&with);
        self.more.update(|m| {
            m.insert(peer_key.clone(), more);
        });
        self.lines.update(|lines| {
            let list = lines.entry(peer_key.clone()).or_default();
            for message in &messages {
                if !list.iter().any(|l| l.id == Some(message.id)) {
                    list.push(Line::from_message(message, &me));
                }
            }
            list.sort_by_key(|l| l.id.unwrap_or(u64::MAX));
        });
        // Opening the conversation reads it.
        let newest_unread = messages.iter().filter(|m| m.from != me && m.read_at.is_none()).map(|m| m.id).max();
        if let Some(up_to) = newest_unread {
            if self.active.get_untracked().is_some_and(|a| key(&a) == peer_key) && page_visible() {
                conn.request(Request::Read { with: with.clone(), up_to });
                self.conversations.update(|list| {
                    for c in list.iter_mut().filter(|c| key(&c.with) == peer_key) {
                        c.unread = 0;
                    }
                });
            }
        }
        if self.active.get_untracked().is_some_and(|a| key(&a) == peer_key) {
            self.active.set(Some(with));
        }
    }

    fn update_line(&self, client_id: &str, change: impl Fn(&mut Line)) {
        self.lines.update(|lines| {
            for list in lines.values_mut() {
                for line in list.iter_mut().filter(|l| l.client_id == client_id) {
                    change(line);
                }
            }
        });
    }
}

impl Default for Chat {
    fn default() -> Self {
        Chat::new()
    }
}

/// Whether the page is visible (a read receipt is sent only for messages the user can see).
/// What to tell a person about a `rate_limited` answer to the request `req`, waiting `ms`.
fn rate_limited(req: &str, ms: u64) -> String {
    let seconds = ms.div_ceil(1000).max(1);
    let wait = if seconds == 1 { "a second".to_owned() } else { format!("{seconds} seconds") };
    if req.starts_with(SEND_REQ) {
        format!("You are sending too fast: wait {wait}, then send again.")
    } else {
        format!("Too many wrong passwords: try again in {wait}.")
    }
}

/// The Notification API's permission ("default", "granted" or "denied"); `None` where there is no such API.
pub fn notification_permission() -> Option<&'static str> {
    let window = web_sys::window()?;
    if !js_sys::Reflect::has(&window, &"Notification".into()).unwrap_or(false) {
        return None;
    }
    Some(match web_sys::Notification::permission() {
        web_sys::NotificationPermission::Granted => "granted",
        web_sys::NotificationPermission::Denied => "denied",
        _ => "default",
    })
}

/// A desktop notification for a message from `from`, if the page is hidden and the user allowed them.
fn notify(from: &str, text: &str) {
    if page_visible() || notification_permission() != Some("granted") {
        return;
    }
    let options = web_sys::NotificationOptions::new();
    options.set_body(text);
    // One notification per conversation: a newer message replaces the older one.
    options.set_tag(&key(from));
    let _ = web_sys::Notification::new_with_options(from, &options);
}

/// Whether the page is visible (not a background tab).
pub fn page_visible() -> bool {
    web_sys::window()
        .and_then(|w| w.document())
        .map(|d| d.visibility_state() == web_sys::VisibilityState::Visible)
        .unwrap_or(true)
}
