//! One socket's session: which account it is logged in as, its push queue, and turning each typed request
//! into calls on [`Chat`] and typed replies. Knows nothing of frames or JSON (a stored event arrives encoded
//! already, and is passed on as it came).

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use replichat_shared::{Request, ServerBody, SessionEnd};

use crate::chat::{Attached, Authed, Backlog, Chat, Mailbox};
use crate::hub::{ConnId, Inbox, Push};
use crate::{Error, Result};

/// What answering one request produced.
#[derive(Debug)]
pub struct Response {
    /// The reply (it echoes the request's `req`).
    pub reply: ServerBody,
    /// Close the socket after writing (the account was deleted).
    pub close: bool,
}

impl From<ServerBody> for Response {
    fn from(reply: ServerBody) -> Self {
        Response { reply, close: false }
    }
}

/// What arrived on the push queue.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Write this frame.
    Frame(ServerBody),
    /// Write this stored event, already encoded (shared by every socket it goes to).
    Event(Utf8Bytes),
    /// The account was deleted: write `account_deleted` and close.
    AccountDeleted,
    /// The socket fell too far behind and the hub dropped it: close it; the client resumes.
    TooSlow,
    /// The socket's session ended (logged out elsewhere): write `session_ended` and close.
    SessionEnded(SessionEnd),
}

/// The protocol `type` of a request (the label of its metric).
fn kind(request: &Request) -> &'static str {
    match request {
        Request::Register { .. } => "register",
        Request::Login { .. } => "login",
        Request::Resume { .. } => "resume",
        Request::List { .. } => "list",
        Request::Send { .. } => "send",
        Request::History { .. } => "history",
        Request::Delivered { .. } => "delivered",
        Request::Read { .. } => "read",
        Request::Conversations => "conversations",
        Request::Typing { .. } => "typing",
        Request::Logout => "logout",
        Request::LogoutAll => "logout_all",
        Request::DeleteAccount { .. } => "delete_account",
        Request::Ping => "ping",
    }
}

/// Refuse text that the two engines cannot store alike. PostgreSQL's text type cannot hold U+0000 (SQLite
/// can), so a NUL anywhere would commit an entry that PostgreSQL replicas fail to apply. Every other Unicode
/// scalar value is stored identically by both (JSON's lone surrogates never parse into a `String`). Checked
/// for every text field of every request, even those never stored, so the rule is one sentence.
pub fn storable(request: &Request) -> Result<()> {
    let fields: Vec<&str> = match request {
        Request::Register { username, password } | Request::Login { username, password } => vec![username, password],
        Request::Resume { token, .. } => vec![token],
        Request::List { pattern, after, .. } => {
            [Some(pattern), after.as_ref()].into_iter().flatten().map(|s| s.as_str()).collect()
        }
        Request::Send { to, text, client_id } => vec![to, text, client_id],
        Request::History { with, .. } | Request::Read { with, .. } => vec![with],
        Request::Typing { to } => vec![to],
        Request::DeleteAccount { password } => vec![password],
        Request::Delivered { .. } | Request::Conversations | Request::Logout | Request::LogoutAll | Request::Ping => {
            Vec::new()
        }
    };
    if fields.iter().any(|field| field.contains('\0')) {
        return Err(Error::BadRequest("text fields must not contain U+0000 (NUL)".to_owned()));
    }
    Ok(())
}

/// The state of one socket.
pub struct Session {
    chat: Arc<Chat>,
    /// The client's address: login attempts are limited per address as well as per account.
    client: IpAddr,
    /// Logged in as, with the queue the hub pushes to; `None` before `register`/`login`/`resume`.
    attached: Option<(Authed, ConnId, Inbox)>,
    /// Highest event index this socket has been sent; pushes at or below it are already covered.
    floor: u64,
    /// What of the login/resume backlog is still to be written (before any push).
    backlog: Backlog,
}

impl Session {
    /// A session with no account yet.
    pub fn new(chat: Arc<Chat>, client: IpAddr) -> Session {
        Session { chat, client, attached: None, floor: 0, backlog: Backlog::Done }
    }

    /// Whether the socket is logged in.
    pub fn authenticated(&self) -> bool {
        self.attached.is_some()
    }

    /// Answer one request.
    pub async fn handle(&mut self, request: Request) -> Result<Response> {
        crate::metrics::request(kind(&request));
        storable(&request)?;
        let chat = Arc::clone(&self.chat);
        match request {
            Request::Ping => Ok(ServerBody::Pong.into()),
            Request::Register { username, password } => {
                let mailbox = self.mailbox()?;
                self.attach(chat.register(&username, &password, mailbox.0, self.client).await, mailbox.1).await
            }
            Request::Login { username, password } => {
                let mailbox = self.mailbox()?;
                self.attach(chat.login(&username, &password, mailbox.0, self.client).await, mailbox.1).await
            }
            Request::Resume { token, cursor } => {
                let mailbox = self.mailbox()?;
                self.attach(chat.resume(&token, cursor, mailbox.0).await, mailbox.1).await
            }
            Request::List { pattern, after, limit } => {
                self.authed()?;
                let (users, next) = chat.list(&pattern, after.as_deref(), limit).await?;
                Ok(ServerBody::Users { users, next }.into())
            }
            Request::Send { to, text, client_id } => {
                let m = chat.send(self.authed()?, &to, &text, &client_id).await?;
                Ok(ServerBody::Sent { id: m.id, index: m.id, client_id: m.client_id, sent_at: m.sent_at }.into())
            }
            Request::History { with, before, limit } => {
                let (with, messages, more) = chat.history(self.authed()?, &with, before, limit).await?;
                Ok(ServerBody::History { with, messages, more }.into())
            }
            Request::Delivered { up_to } => {
                chat.delivered(self.authed()?, up_to).await?;
                Ok(ServerBody::Ok.into())
            }
            Request::Read { with, up_to } => {
                chat.read(self.authed()?, &with, up_to).await?;
                Ok(ServerBody::Ok.into())
            }
            Request::Conversations => {
                let conversations = chat.conversations(self.authed()?).await?;
                Ok(ServerBody::Conversations { conversations }.into())
            }
            Request::Typing { to } => {
                chat.typing(self.authed()?, &to).await?;
                Ok(ServerBody::Ok.into())
            }
            Request::Logout => {
                chat.logout(self.authed()?).await?;
                self.detach().await;
                Ok(ServerBody::Ok.into())
            }
            Request::LogoutAll => {
                chat.logout_all(self.authed()?).await?;
                self.detach().await;
                Ok(ServerBody::Ok.into())
            }
            Request::DeleteAccount { password } => {
                chat.delete_account(self.authed()?, &password, self.client).await?;
                // The hub already forgot this account's sockets; nothing to announce.
                self.attached = None;
                Ok(Response { reply: ServerBody::AccountDeleted, close: true })
            }
        }
    }

    /// Whether a `login` or `resume` left backlog to write (see [`Session::backlog_page`]).
    pub fn backlog_pending(&self) -> bool {
        !matches!(self.backlog, Backlog::Done)
    }

    /// The next page of the backlog to write after a `session` reply, oldest first; empty when it is all
    /// written. Call until empty before taking pushes.
    pub async fn backlog_page(&mut self) -> Result<Vec<ServerBody>> {
        let page = self.chat.backlog_page(&mut self.backlog).await?;
        self.floor = page.iter().filter_map(ServerBody::index).fold(self.floor, u64::max);
        Ok(page)
    }

    /// The next push for this socket, skipping events it was already sent. Pending forever while the
    /// socket has no session.
    pub async fn next_push(&mut self) -> Pushed {
        loop {
            let Some((_, _, rx)) = self.attached.as_mut() else {
                return std::future::pending().await;
            };
            let push = rx.recv().await;
            if let Some(pushed) = self.pushed(push) {
                return pushed;
            }
        }
    }

    /// The next push already queued for this socket, without waiting ([`Session::next_push`]'s filter).
    pub fn ready_push(&mut self) -> Option<Pushed> {
        loop {
            let (_, _, rx) = self.attached.as_mut()?;
            let std::task::Poll::Ready(push) = rx.try_recv() else { return None };
            if let Some(pushed) = self.pushed(push) {
                return Some(pushed);
            }
        }
    }

    /// What a push from the hub (`None`: the hub dropped the queue) means for this socket, or `None` when it
    /// is not for it: an event at or below what it was sent already, or the end of another session.
    fn pushed(&mut self, push: Option<Push>) -> Option<Pushed> {
        let authed = &self.attached.as_ref()?.0;
        match push {
            None => Some(Pushed::TooSlow),
            Some(Push::AccountDeleted) => Some(Pushed::AccountDeleted),
            Some(Push::Ended { session, reason }) => {
                session.is_none_or(|s| s == authed.token_hash).then_some(Pushed::SessionEnded(reason))
            }
            Some(Push::Event { index, json }) => (index > self.floor).then(|| {
                self.floor = index;
                Pushed::Event(json)
            }),
            Some(Push::Frame(body)) => match body.index() {
                Some(index) if index <= self.floor => None,
                Some(index) => {
                    self.floor = index;
                    Some(Pushed::Frame(body))
                }
                None => Some(Pushed::Frame(body)),
            },
        }
    }

    /// Leave the hub (socket closing).
    pub async fn close(&mut self) {
        self.detach().await;
    }

    fn authed(&self) -> Result<&Authed> {
        self.attached.as_ref().map(|(authed, _, _)| authed).ok_or(Error::Unauthenticated)
    }

    fn mailbox(&self) -> Result<(Mailbox, (ConnId, Inbox))> {
        if self.attached.is_some() {
            return Err(Error::AlreadyAuthenticated);
        }
        let (conn, tx, rx) = self.chat.hub().channel();
        Ok((Mailbox { conn, tx }, (conn, rx)))
    }

    async fn attach(&mut self, result: Result<Attached>, queue: (ConnId, Inbox)) -> Result<Response> {
        let attached = result?;
        let (conn, rx) = queue;
        self.floor = attached.cursor;
        self.backlog = attached.backlog;
        if attached.first {
            if let Err(e) = self.chat.announce_online(&attached.authed).await {
                tracing::warn!(error = %e, "could not announce presence");
            }
        }
        let reply = ServerBody::Session {
            token: attached.token,
            username: attached.authed.username.clone(),
            cursor: attached.cursor,
        };
        self.attached = Some((attached.authed, conn, rx));
        Ok(Response { reply, close: false })
    }

    async fn detach(&mut self) {
        if let Some((authed, conn, _)) = self.attached.take() {
            self.chat.detach(authed.user_id, conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_kinds_are_the_wire_types() {
        let text = String::new;
        let requests = [
            Request::Register { username: text(), password: text() },
            Request::Login { username: text(), password: text() },
            Request::Resume { token: text(), cursor: 0 },
            Request::List { pattern: text(), after: None, limit: None },
            Request::Send { to: text(), text: text(), client_id: text() },
            Request::History { with: text(), before: None, limit: None },
            Request::Delivered { up_to: 0 },
            Request::Read { with: text(), up_to: 0 },
            Request::Conversations,
            Request::Typing { to: text() },
            Request::Logout,
            Request::LogoutAll,
            Request::DeleteAccount { password: text() },
            Request::Ping,
        ];
        for request in requests {
            let wire = serde_json::to_value(&request).unwrap();
            assert_eq!(wire["type"].as_str(), Some(kind(&request)), "{wire}");
        }
    }
}
