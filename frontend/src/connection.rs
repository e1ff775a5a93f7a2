//! The failover-aware connection to the cluster. No view code.
//!
//! It keeps the list of replica endpoints (learned from `welcome`, `not_leader` and `/api/cluster`) in
//! localStorage, so a reload on any live replica still knows the others. When the socket is lost it tries the
//! endpoints with exponential backoff and jitter, follows `not_leader` hints, never accepts a replica whose term
//! is lower than one it has seen, and once a primary answers it `resume`s the session with its token and cursor
//! and re-sends every message that was not acknowledged, with the same client id, so each is stored once.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use gloo_net::websocket::futures::WebSocket;
use gloo_net::websocket::Message;
use leptos::prelude::*;
use replichat_shared::{ClientFrame, Request, ServerBody, ServerFrame};

const ENDPOINTS_KEY: &str = "replichat.endpoints";
const TOKEN_KEY: &str = "replichat.token";
const CURSOR_KEY: &str = "replichat.cursor";
const OPEN_KEY: &str = "replichat.open";
const OUTBOX_KEY: &str = "replichat.outbox";
/// Backoff between rounds of attempts: starts here, doubles, capped at `MAX_BACKOFF_MS` (while the page is
/// visible: someone is waiting for their messages to go out, so at most about 2 s after a replica is back)
/// or `HIDDEN_MAX_BACKOFF_MS` (a background tab), with ±25 % jitter.
const FIRST_BACKOFF_MS: f64 = 150.0;
const MAX_BACKOFF_MS: f64 = 1600.0;
const HIDDEN_MAX_BACKOFF_MS: f64 = 8000.0;
/// How long a send answered `unavailable` waits before it is tried again on the same socket (a socket whose
/// replica stopped being the primary is closed by the server, and the resume re-sends it sooner).
const RETRY_SEND_MS: u32 = 1000;

/// What the banner shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// First connection attempt.
    Connecting,
    /// Talking to the primary, replica `node`, in `term`.
    Online { node: u64, term: u64 },
    /// Lost the primary; trying the endpoints (attempt number).
    Reconnecting { attempt: u32 },
}

/// A send the server has not acknowledged yet: re-sent after every reconnect until `sent` arrives. Kept in
/// localStorage as well, so a reload (or a closed tab) before the server answered loses nothing: the next
/// page re-sends it with the same client id, which the server stores at most once.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Pending {
    pub client_id: String,
    pub to: String,
    pub text: String,
    /// When it was written (ms since the epoch, the browser's clock): its place until the server stamps it.
    #[serde(default)]
    pub written_at: f64,
}

impl Pending {
    /// The `send` request that delivers it, with its client id (the same every time it is sent).
    fn request(self) -> Request {
        Request::Send { to: self.to, text: self.text, client_id: self.client_id }
    }
}

struct Inner {
    endpoints: Vec<String>,
    /// Where the last `not_leader` said the primary is.
    hint: Option<String>,
    /// Highest term seen; replicas answering with a lower one are ignored.
    max_term: u64,
    token: Option<String>,
    cursor: u64,
    pending: Vec<Pending>,
    /// Writes into the open socket, if any.
    socket: Option<mpsc::UnboundedSender<String>>,
    next_req: u64,
    /// Frames for the app, delivered in order by `run`.
    handler: Option<Rc<dyn Fn(ServerFrame)>>,
    /// Requests made before a primary answered (sent once one does).
    queued: VecDeque<String>,
    /// Endpoints that did not answer in this round of attempts: not tried again (nor followed as a backup's
    /// hint, which names the dead primary until the election) before the next backoff. Each failed attempt is a
    /// console error the browser logs itself.
    failed: Vec<String>,
}

/// The connection. Cheap to clone; one per page.
#[derive(Clone)]
pub struct Connection {
    inner: Rc<RefCell<Inner>>,
    /// The banner's state.
    pub state: RwSignal<LinkState>,
}

impl Connection {
    /// A connection that starts from the replica that served the page plus the endpoints remembered from
    /// earlier visits. Call [`Connection::start`] to run it.
    pub fn new() -> Connection {
        let origin = web_sys::window().and_then(|w| w.location().origin().ok()).unwrap_or_default();
        let mut endpoints: Vec<String> = load(ENDPOINTS_KEY).unwrap_or_default();
        if !endpoints.contains(&origin) {
            endpoints.insert(0, origin);
        }
        Connection {
            inner: Rc::new(RefCell::new(Inner {
                endpoints,
                hint: None,
                max_term: 0,
                token: load(TOKEN_KEY),
                cursor: load(CURSOR_KEY).unwrap_or(0),
                // What this browser wrote and the server never acknowledged, before the last reload.
                pending: load::<String>(TOKEN_KEY).and(load(OUTBOX_KEY)).unwrap_or_default(),
                socket: None,
                next_req: 0,
                handler: None,
                queued: VecDeque::new(),
                failed: Vec::new(),
            })),
            state: RwSignal::new(LinkState::Connecting),
        }
    }

    /// Run the connection loop; every frame from the server goes to `handler`.
    pub fn start(&self, handler: impl Fn(ServerFrame) + 'static) {
        self.inner.borrow_mut().handler = Some(Rc::new(handler));
        let this = self.clone();
        leptos::task::spawn_local(async move { this.run().await });
    }

    /// The known replica endpoints.
    pub fn endpoints(&self) -> Vec<String> {
        self.inner.borrow().endpoints.clone()
    }

    /// The saved session token, if any (the app resumes with it at start).
    pub fn token(&self) -> Option<String> {
        self.inner.borrow().token.clone()
    }

    /// Remember (or forget) the session token. Forgetting also resets the cursor and drops pending sends.
    pub fn set_session(&self, token: Option<String>, cursor: u64) {
        let mut inner = self.inner.borrow_mut();
        match &token {
            Some(t) => save(TOKEN_KEY, t),
            None => {
                remove(TOKEN_KEY);
                inner.pending.clear();
                remove(OUTBOX_KEY);
            }
        }
        inner.token = token;
        inner.cursor = cursor;
        save(CURSOR_KEY, &cursor);
    }

    /// Note an event index: the cursor `resume` continues from.
    pub fn saw_index(&self, index: u64) {
        let mut inner = self.inner.borrow_mut();
        if index > inner.cursor {
            inner.cursor = index;
            save(CURSOR_KEY, &index);
        }
    }

    /// Send a request; returns its `req` id. Sent at once when online, else when a primary answers.
    pub fn request(&self, request: Request) -> String {
        let req = {
            let mut inner = self.inner.borrow_mut();
            inner.next_req += 1;
            format!("c{}", inner.next_req)
        };
        self.transmit(req.clone(), request);
        req
    }

    /// Send a chat message: kept as pending until the server acknowledges it ([`Connection::acknowledged`]),
    /// and re-sent with the same client id after every reconnect. Its `req` is [`send_req`] of the client id.
    pub fn send_message(&self, pending: Pending) {
        {
            let mut inner = self.inner.borrow_mut();
            inner.pending.push(pending.clone());
            save(OUTBOX_KEY, &inner.pending);
        }
        let req = send_req(&pending.client_id);
        self.transmit(req, pending.request());
    }

    fn transmit(&self, req: String, request: Request) {
        let is_send = matches!(request, Request::Send { .. });
        let text = serde_json::to_string(&ClientFrame { req: Some(req), request }).unwrap_or_default();
        let mut inner = self.inner.borrow_mut();
        let sent = inner.socket.as_ref().is_some_and(|s| s.unbounded_send(text.clone()).is_ok());
        // Sends are re-sent from the pending list after the next resume; other requests wait in the queue.
        if !sent && !is_send {
            inner.queued.push_back(text);
        }
    }

    /// The server acknowledged (or refused) the send with this client id: stop re-sending it.
    pub fn acknowledged(&self, client_id: &str) {
        let mut inner = self.inner.borrow_mut();
        inner.pending.retain(|p| p.client_id != client_id);
        save(OUTBOX_KEY, &inner.pending);
    }

    /// The server could not take the send with this client id now (`unavailable`: nothing was stored). It stays
    /// pending: re-sent after the next resume if the socket closes (a replica that stopped being the primary
    /// closes it), or on this socket after [`RETRY_SEND_MS`] if it is still pending then. Both may happen: the
    /// same client id is stored at most once, and a repeat is answered with the original's `sent`.
    pub fn retry_later(&self, client_id: &str) {
        let conn = self.clone();
        let client_id = client_id.to_owned();
        leptos::task::spawn_local(async move {
            gloo_timers::future::TimeoutFuture::new(RETRY_SEND_MS).await;
            let pending = conn.inner.borrow().pending.iter().find(|p| p.client_id == client_id).cloned();
            if let Some(p) = pending {
                let req = send_req(&p.client_id);
                conn.transmit(req, p.request());
            }
        });
    }

    /// The sends not acknowledged yet, oldest first (including those restored after a reload).
    pub fn pending(&self) -> Vec<Pending> {
        self.inner.borrow().pending.clone()
    }

    /// Merge `endpoints` into the known list and remember it across reloads.
    pub fn remember_endpoints(&self, endpoints: &[String]) {
        if endpoints.is_empty() {
            return;
        }
        let mut inner = self.inner.borrow_mut();
        let mut merged = endpoints.to_vec();
        for old in &inner.endpoints {
            if !merged.contains(old) {
                merged.push(old.clone());
            }
        }
        inner.endpoints = merged;
        save(ENDPOINTS_KEY, &inner.endpoints);
    }

    async fn run(self) {
        let mut attempt: u32 = 0;
        let mut next_endpoint = 0usize;
        loop {
            // Try the hinted primary first, then every endpoint once, then back off.
            let hint = self.inner.borrow_mut().hint.take();
            let candidates: Vec<String> = {
                let inner = self.inner.borrow();
                let n = inner.endpoints.len().max(1);
                hint.into_iter()
                    .chain((0..inner.endpoints.len()).map(|i| inner.endpoints[(next_endpoint + i) % n].clone()))
                    .filter(|e| !inner.failed.contains(e))
                    .collect()
            };
            let mut followed_hint = false;
            for base in candidates {
                match self.session(&base).await {
                    Outcome::Closed => {
                        attempt = 0;
                        break;
                    }
                    Outcome::Redirected => {
                        followed_hint = true;
                        break;
                    }
                    Outcome::Unreachable => next_endpoint += 1,
                }
            }
            if followed_hint {
                continue;
            }
            attempt += 1;
            self.state.set(if self.ever_online() {
                LinkState::Reconnecting { attempt }
            } else {
                LinkState::Connecting
            });
            let cap = if crate::state::page_visible() { MAX_BACKOFF_MS } else { HIDDEN_MAX_BACKOFF_MS };
            let backoff = (FIRST_BACKOFF_MS * 2f64.powi(attempt.min(8) as i32)).min(cap);
            let jittered = backoff * (0.75 + 0.5 * js_sys::Math::random());
            gloo_timers::future::TimeoutFuture::new(jittered as u32).await;
            self.inner.borrow_mut().failed.clear();
        }
    }

    fn ever_online(&self) -> bool {
        self.inner.borrow().max_term > 0
    }

    /// One socket's life on `base`: connect, check the first frame, resume, pump frames until it closes.
    async fn session(&self, base: &str) -> Outcome {
        let url = format!("{}/ws", base.replacen("http", "ws", 1));
        let Ok(socket) = WebSocket::open(&url) else { return Outcome::Unreachable };
        let (mut sink, stream) = socket.split();
        let mut stream = stream.fuse();
        let first = match stream.next().await {
            Some(Ok(Message::Text(text))) => serde_json::from_str::<ServerFrame>(&text).ok(),
            _ => None,
        };
        let Some(first) = first else {
            self.inner.borrow_mut().failed.push(base.to_owned());
            return Outcome::Unreachable;
        };
        match first.body {
            ServerBody::Welcome { node, term, ref endpoints, .. } => {
                if term < self.inner.borrow().max_term {
                    // A stale primary (deposed, not yet aware): never go back in time.
                    return Outcome::Unreachable;
                }
                self.remember_endpoints(endpoints);
                let mut inner = self.inner.borrow_mut();
                inner.max_term = term;
                inner.failed.clear();
                drop(inner);
                self.state.set(LinkState::Online { node, term });
            }
            ServerBody::NotLeader { leader_url, term, ref endpoints, .. } => {
                self.remember_endpoints(endpoints);
                let mut inner = self.inner.borrow_mut();
                if term >= inner.max_term {
                    inner.max_term = inner.max_term.max(term);
                    if let Some(url) = leader_url.filter(|u| u != base && !inner.failed.contains(u)) {
                        inner.hint = Some(url);
                        return Outcome::Redirected;
                    }
                }
                return Outcome::Unreachable;
            }
            _ => return Outcome::Unreachable,
        }
        self.deliver(first);

        // Resume the session, then re-send what was never acknowledged, then what was queued offline.
        let (tx, mut rx) = mpsc::unbounded::<String>();
        {
            let mut inner = self.inner.borrow_mut();
            if let Some(token) = inner.token.clone() {
                inner.next_req += 1;
                let resume = ClientFrame {
                    req: Some(format!("{RESUME_REQ}{}", inner.next_req)),
                    request: Request::Resume { token, cursor: inner.cursor },
                };
                let _ = tx.unbounded_send(serde_json::to_string(&resume).unwrap_or_default());
                for p in inner.pending.clone() {
                    let send = ClientFrame { req: Some(send_req(&p.client_id)), request: p.request() };
                    let _ = tx.unbounded_send(serde_json::to_string(&send).unwrap_or_default());
                }
            }
            // Requests made while offline.
            while let Some(text) = inner.queued.pop_front() {
                let _ = tx.unbounded_send(text);
            }
            inner.socket = Some(tx);
        }
        loop {
            futures::select! {
                out = rx.next() => match out {
                    Some(text) => if sink.send(Message::Text(text)).await.is_err() { break },
                    None => break,
                },
                incoming = stream.next() => match incoming {
                    Some(Ok(Message::Text(text))) => {
                        if let Ok(frame) = serde_json::from_str::<ServerFrame>(&text) {
                            if let ServerBody::NotLeader { leader_url, term, ref endpoints, .. } = frame.body {
                                self.remember_endpoints(endpoints);
                                let mut inner = self.inner.borrow_mut();
                                if term >= inner.max_term {
                                    inner.hint = leader_url;
                                }
                                break;
                            }
                            self.deliver(frame);
                        }
                    }
                    Some(Ok(Message::Bytes(_))) => {}
                    _ => break,
                },
            }
        }
        self.inner.borrow_mut().socket = None;
        self.state.set(LinkState::Reconnecting { attempt: 0 });
        Outcome::Closed
    }

    fn deliver(&self, frame: ServerFrame) {
        if let Some(index) = frame.body.index() {
            self.saw_index(index);
        }
        let handler = self.inner.borrow().handler.clone();
        if let Some(handler) = handler {
            handler(frame);
        }
    }
}

impl Default for Connection {
    fn default() -> Self {
        Connection::new()
    }
}

enum Outcome {
    /// Was connected to the primary; the socket closed.
    Closed,
    /// A backup pointed at the primary: try it next, at once.
    Redirected,
    /// Could not talk to a primary there.
    Unreachable,
}

/// The `req` of every (re-)send of the message with this client id, so replies and errors can be matched.
pub fn send_req(client_id: &str) -> String {
    format!("{SEND_REQ}{client_id}")
}

/// Prefix of the `req` of a send ([`send_req`]).
pub const SEND_REQ: &str = "send:";
/// Prefix of the `req` of the automatic `resume` after a reconnect.
pub const RESUME_REQ: &str = "resume:";

/// A fresh client message id (UUID v4 form; randomness from the browser).
pub fn new_client_id() -> String {
    let mut bytes = [0u8; 16];
    for b in &mut bytes {
        *b = (js_sys::Math::random() * 256.0) as u8;
    }
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// Remember which conversation is open (`None`: none), so a reload reopens it.
pub fn remember_open(peer: Option<&str>) {
    match peer {
        Some(peer) => save(OPEN_KEY, peer),
        None => remove(OPEN_KEY),
    }
}

/// The conversation that was open before the page was (re)loaded.
pub fn remembered_open() -> Option<String> {
    load(OPEN_KEY)
}

fn storage() -> Option<web_sys::Storage> {
    web_sys::window()?.local_storage().ok()?
}

fn load<T: serde::de::DeserializeOwned>(key: &str) -> Option<T> {
    serde_json::from_str(&storage()?.get_item(key).ok()??).ok()
}

fn save<T: serde::Serialize + ?Sized>(key: &str, value: &T) {
    if let (Some(storage), Ok(text)) = (storage(), serde_json::to_string(value)) {
        let _ = storage.set_item(key, &text);
    }
}

fn remove(key: &str) {
    if let Some(storage) = storage() {
        let _ = storage.remove_item(key);
    }
}

thread_local! {
    /// The page's one connection (the browser runs this app on one thread).
    static CONNECTION: Connection = Connection::new();
}

/// The page's connection.
pub fn get() -> Connection {
    CONNECTION.with(Clone::clone)
}
