//! A protocol client over a real WebSocket, for the integration suites (included with `#[path]`).
//! It panics on anything unexpected: it is test code.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use replichat_shared::{ClientFrame, ErrorCode, Request, ServerBody, ServerFrame};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for a frame it expects before failing.
pub const WAIT: Duration = Duration::from_secs(10);

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
    /// Connect and expect `welcome` as the first frame (the replica is the primary).
    pub async fn connect(url: &str) -> Client {
        let (client, first) = Client::connect_any(url).await.unwrap_or_else(|e| panic!("connect: {e}"));
        assert!(matches!(first, ServerBody::Welcome { .. }), "first frame is welcome: {first:?}");
        client
    }

    /// A client over an open WebSocket, before its first frame is read.
    fn over(ws: Ws) -> Client {
        Client {
            ws,
            inbox: VecDeque::new(),
            next_req: 0,
            token: None,
            username: None,
            cursor: 0,
            welcome: ServerBody::Ok,
        }
    }

    /// [`Client::connect`] to a `wss://` URL, trusting what `config` trusts.
    pub async fn connect_tls(url: &str, config: std::sync::Arc<rustls::ClientConfig>) -> Client {
        let connector = tokio_tungstenite::Connector::Rustls(config);
        let (ws, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::connect_async_tls_with_config(url, None, true, Some(connector)),
        )
        .await
        .unwrap_or_else(|_| panic!("{url}: timed out connecting"))
        .unwrap_or_else(|e| panic!("{url}: {e}"));
        let mut client = Client::over(ws);
        let first = client.next_frame().await;
        assert!(matches!(first.body, ServerBody::Welcome { .. }), "first frame is welcome: {first:?}");
        client.welcome = first.body;
        client
    }

    /// Connect from the loopback address `from` (e.g. `127.0.0.2`): to the server, another client address.
    pub async fn connect_from(url: &str, from: std::net::IpAddr) -> Client {
        let addr = url.trim_start_matches("ws://").split('/').next().unwrap().parse::<std::net::SocketAddr>().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::new(from, 0)).expect("bind the client address");
        let stream = socket.connect(addr).await.expect("connect");
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await.expect("handshake");
        let mut client = Client::over(ws);
        let first = client.next_frame().await;
        assert!(matches!(first.body, ServerBody::Welcome { .. }), "first frame is welcome: {first:?}");
        client.welcome = first.body;
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

    /// `register` or `login` (`request`), remembering the session if it opened one, and returning any other
    /// reply instead of panicking (for callers that retry `unavailable`).
    pub async fn try_open(&mut self, request: Request) -> ServerBody {
        let username = match &request {
            Request::Register { username, .. } | Request::Login { username, .. } => username.clone(),
            other => panic!("try_open is for register and login, not {other:?}"),
        };
        let reply = self.request(request).await;
        if matches!(reply, ServerBody::Session { .. }) {
            self.remember(&reply, &username);
        }
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

    /// Close the socket and wait (a bounded while) for the server's close frame: by then the server has
    /// finished with the session, including recording when its user was last seen.
    pub async fn close(mut self) {
        if self.ws.close(None).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(WAIT, async {
            while let Some(Ok(message)) = self.ws.next().await {
                if matches!(message, WsMessage::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// Non-panicking variants, for clients that must survive a replica dying under them (the cluster suite).
#[allow(dead_code)]
impl Client {
    /// Connect and read the first frame whatever it is (`welcome` on a primary, `not_leader` on a backup).
    /// Never panics: a refused connection, a failed handshake, a timeout or a socket closed before any frame
    /// is an `Err`. The first frame is also kept in `welcome`.
    pub async fn connect_any(url: &str) -> Result<(Client, ServerBody), String> {
        Client::connect_any_over(url, None, false).await
    }

    /// [`Client::connect_any`] to a `wss://` URL, trusting what `config` trusts.
    pub async fn connect_any_tls(
        url: &str,
        config: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<(Client, ServerBody), String> {
        Client::connect_any_over(url, Some(tokio_tungstenite::Connector::Rustls(config)), true).await
    }

    async fn connect_any_over(
        url: &str,
        connector: Option<tokio_tungstenite::Connector>,
        disable_nagle: bool,
    ) -> Result<(Client, ServerBody), String> {
        let connect = tokio_tungstenite::connect_async_tls_with_config(url, None, disable_nagle, connector);
        let (ws, _) = tokio::time::timeout(WAIT, connect)
            .await
            .map_err(|_| format!("{url}: timed out connecting"))?
            .map_err(|e| format!("{url}: {e}"))?;
        let mut client = Client::over(ws);
        let first = client.try_read_frame(WAIT).await.map_err(|e| format!("{url}: first frame: {e}"))?;
        client.welcome = first.body.clone();
        Ok((client, first.body))
    }

    /// Send a request and wait (at most `wait`) for the reply echoing its `req`, keeping everything else in
    /// the inbox. Never panics: a send failure, a closed socket or a timeout is an `Err`.
    pub async fn try_request(&mut self, request: Request, wait: Duration) -> Result<ServerBody, String> {
        self.next_req += 1;
        let req = format!("r{}", self.next_req);
        let frame = ClientFrame { req: Some(req.clone()), request };
        self.ws
            .send(WsMessage::Text(serde_json::to_string(&frame).unwrap().into()))
            .await
            .map_err(|e| format!("sending {req}: {e}"))?;
        if let Some(pos) = self.inbox.iter().position(|f| f.req.as_deref() == Some(req.as_str())) {
            return Ok(self.inbox.remove(pos).unwrap().body);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self.try_read_frame(left).await.map_err(|e| format!("waiting for {req}: {e}"))?;
            if frame.req.as_deref() == Some(req.as_str()) {
                return Ok(frame.body);
            }
            self.inbox.push_back(frame);
        }
    }

    /// The next frame from the socket (not the inbox), or why there is none: timeout, close (with its
    /// frame), transport error, or a frame that is not a server frame.
    pub async fn try_read_frame(&mut self, wait: Duration) -> Result<ServerFrame, String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let message = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Err(format!("no frame within {wait:?}")),
                Ok(None) => return Err("socket closed".into()),
                Ok(Some(Err(e))) => return Err(format!("socket error: {e}")),
                Ok(Some(Ok(message))) => message,
            };
            match message {
                WsMessage::Text(text) => {
                    let frame: ServerFrame =
                        serde_json::from_str(text.as_str()).map_err(|e| format!("bad server frame {text:?}: {e}"))?;
                    if let Some(index) = frame.body.index() {
                        self.cursor = self.cursor.max(index);
                    }
                    return Ok(frame);
                }
                WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
                WsMessage::Close(frame) => return Err(format!("closed by the server: {frame:?}")),
                other => return Err(format!("unexpected message {other:?}")),
            }
        }
    }

    /// Take every frame kept so far (pushes that arrived while waiting for replies).
    pub fn drain_inbox(&mut self) -> Vec<ServerFrame> {
        self.inbox.drain(..).collect()
    }
}
