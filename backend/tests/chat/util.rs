//! Test harness: a fresh database per test (SQLite file or throw-away PostgreSQL database), the real
//! server on port 0, and a WebSocket client that speaks the protocol.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use replichat::{Config, Running};
use replichat_shared::{ClientFrame, ErrorCode, Request, ServerBody, ServerFrame};
use sqlx::Connection;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for a frame it expects before failing.
pub const WAIT: Duration = Duration::from_secs(10);

/// Which engine a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// Run the same test body once per engine: `both!(name, |engine| async move { ... })`.
#[macro_export]
macro_rules! both {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                $crate::util::init_tracing();
                ($body)($crate::util::Engine::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                $crate::util::init_tracing();
                ($body)($crate::util::Engine::Postgres).await
            }
        }
    };
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A database URL no other test uses. PostgreSQL needs `REPLICHAT_TEST_PG` (a server URL whose role may
/// create databases); the README's test command sets it.
pub async fn fresh_db(engine: Engine) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let unique = format!("{}_{}_{n}", std::process::id(), uuid::Uuid::new_v4().simple());
    match engine {
        Engine::Sqlite => {
            let dir = std::env::temp_dir().join("replichat-tests");
            std::fs::create_dir_all(&dir).unwrap();
            format!("sqlite://{}", dir.join(format!("{unique}.db")).display())
        }
        Engine::Postgres => {
            let base = std::env::var("REPLICHAT_TEST_PG").expect(
                "REPLICHAT_TEST_PG is not set: run the README's test command (scripts/test.sh), which starts \
                 PostgreSQL and sets it, e.g. postgres://replichat:replichat@127.0.0.1:5432",
            );
            let base = base.trim_end_matches('/');
            let name = format!("replichat_test_{unique}");
            let mut admin =
                sqlx::PgConnection::connect(&format!("{base}/postgres")).await.expect("connect to PostgreSQL");
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create test database");
            format!("{base}/{name}")
        }
    }
}

/// Start a real server on port 0 over a fresh database.
pub async fn server(engine: Engine) -> Server {
    let url = fresh_db(engine).await;
    let running = replichat::start(Config::for_tests(url.clone())).await.expect("server starts");
    Server { addr: running.addr, running: Some(running), url }
}

pub struct Server {
    pub addr: SocketAddr,
    pub running: Option<Running>,
    /// The database URL (to reopen it, or start another server on it).
    pub url: String,
}

impl Server {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn db(&self) -> &replichat::storage::Db {
        &self.running.as_ref().expect("running").db
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.ws_url()).await
    }

    /// A client already registered as `username` (password `password123`).
    pub async fn user(&self, username: &str) -> Client {
        let mut client = self.client().await;
        client.register(username, "password123").await;
        client
    }

    pub async fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.expect("clean shutdown");
        }
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A protocol client over a real WebSocket. Frames that arrive while it waits for something else are kept,
/// in order, for later `expect_*` calls.
pub struct Client {
    ws: Ws,
    inbox: VecDeque<ServerFrame>,
    next_req: u64,
    pub token: Option<String>,
    pub username: Option<String>,
    /// Highest event index seen.
    pub cursor: u64,
    pub welcome: ServerBody,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("WebSocket connects");
        let mut client = Client {
            ws,
            inbox: VecDeque::new(),
            next_req: 0,
            token: None,
            username: None,
            cursor: 0,
            welcome: ServerBody::Ok,
        };
        let welcome = client.next_frame().await;
        assert!(matches!(welcome.body, ServerBody::Welcome { .. }), "first frame is welcome: {welcome:?}");
        client.welcome = welcome.body;
        client
    }

    /// Send a raw text frame.
    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.ws.send(WsMessage::Text(text.into().into())).await.expect("send frame");
    }

    /// Send a raw text frame; the server may cut the connection while it is written.
    pub async fn try_send_text(&mut self, text: impl Into<String>) -> bool {
        self.ws.send(WsMessage::Text(text.into().into())).await.is_ok()
    }

    pub async fn send_raw(&mut self, message: WsMessage) {
        self.ws.send(message).await.expect("send frame");
    }

    /// Send a request and wait for the reply that echoes its `req`.
    pub async fn request(&mut self, request: Request) -> ServerBody {
        self.next_req += 1;
        let req = format!("r{}", self.next_req);
        let frame = ClientFrame { req: Some(req.clone()), request };
        self.send_text(serde_json::to_string(&frame).unwrap()).await;
        self.reply_to(&req).await
    }

    /// Wait for the frame answering `req`, keeping everything else.
    pub async fn reply_to(&mut self, req: &str) -> ServerBody {
        if let Some(pos) = self.inbox.iter().position(|f| f.req.as_deref() == Some(req)) {
            return self.inbox.remove(pos).unwrap().body;
        }
        loop {
            let frame = self.read_frame().await;
            if frame.req.as_deref() == Some(req) {
                return frame.body;
            }
            self.inbox.push_back(frame);
        }
    }

    /// A request expected to fail with `code`.
    pub async fn expect_error(&mut self, request: Request, code: ErrorCode) {
        match self.request(request.clone()).await {
            ServerBody::Error { code: got, .. } if got == code => {}
            other => panic!("{request:?}: expected error {code:?}, got {other:?}"),
        }
    }

    /// The next frame, from the inbox or the socket.
    pub async fn next_frame(&mut self) -> ServerFrame {
        match self.inbox.pop_front() {
            Some(frame) => frame,
            None => self.read_frame().await,
        }
    }

    /// The next pushed frame (no `req`), skipping nothing.
    pub async fn next_push(&mut self) -> ServerBody {
        let frame = self.next_frame().await;
        assert!(frame.req.is_none(), "expected a push, got a reply {frame:?}");
        frame.body
    }

    /// Wait for the first pushed frame matching `pred`; earlier non-matching frames are dropped.
    pub async fn expect_push(&mut self, what: &str, pred: impl Fn(&ServerBody) -> bool) -> ServerBody {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let frame = tokio::time::timeout_at(deadline, self.next_frame())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
            if pred(&frame.body) {
                return frame.body;
            }
        }
    }

    /// Whether any frame arrives within `quiet`: used to check that something is NOT delivered, after a
    /// later event proves the server has processed everything before it.
    pub fn inbox(&self) -> &VecDeque<ServerFrame> {
        &self.inbox
    }

    async fn read_frame(&mut self) -> ServerFrame {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a frame")
                .expect("socket open")
                .expect("socket ok");
            match message {
                WsMessage::Text(text) => {
                    let frame: ServerFrame = serde_json::from_str(text.as_str()).expect("server frame parses");
                    if let Some(index) = frame.body.index() {
                        self.cursor = self.cursor.max(index);
                    }
                    return frame;
                }
                WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    /// Wait for the server to close the socket; returns the close frame.
    pub async fn expect_close(&mut self) -> Option<CloseFrame> {
        loop {
            let message = tokio::time::timeout(WAIT, self.ws.next()).await.expect("timed out waiting for close");
            match message {
                Some(Ok(WsMessage::Close(frame))) => return frame,
                Some(Ok(WsMessage::Text(text))) => {
                    self.inbox.push_back(serde_json::from_str(text.as_str()).expect("server frame parses"));
                }
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return None,
            }
        }
    }

    pub async fn register(&mut self, username: &str, password: &str) -> ServerBody {
        let reply = self.request(Request::Register { username: username.into(), password: password.into() }).await;
        self.remember(&reply, username);
        reply
    }

    pub async fn login(&mut self, username: &str, password: &str) -> ServerBody {
        let reply = self.request(Request::Login { username: username.into(), password: password.into() }).await;
        self.remember(&reply, username);
        reply
    }

    fn remember(&mut self, reply: &ServerBody, username: &str) {
        match reply {
            ServerBody::Session { token, cursor, .. } => {
                self.token = token.clone();
                self.username = Some(username.to_owned());
                self.cursor = *cursor;
            }
            other => panic!("{username}: expected a session, got {other:?}"),
        }
    }

    /// Send `text` to `to` with a fresh client id; returns the `sent` reply's message id.
    pub async fn send_message(&mut self, to: &str, text: &str) -> u64 {
        let client_id = uuid::Uuid::new_v4().to_string();
        match self.request(Request::Send { to: to.into(), text: text.into(), client_id }).await {
            ServerBody::Sent { id, .. } => id,
            other => panic!("send to {to}: {other:?}"),
        }
    }

    /// Wait for a `message` event with this text.
    pub async fn expect_message(&mut self, text: &str) -> replichat_shared::Message {
        match self
            .expect_push(
                &format!("message {text:?}"),
                |b| matches!(b, ServerBody::Message { message, .. } if message.text == text),
            )
            .await
        {
            ServerBody::Message { message, .. } => message,
            _ => unreachable!(),
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}
