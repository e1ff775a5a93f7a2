//! The upper bound for the load: an in-memory WebSocket relay that answers the frames the load sends
//! (`register`, `login`, `resume`, `send`) the way replichat does, from memory, with no storage, no
//! replication and no password hashing. A send is acknowledged with `sent` and pushed as a `message` event
//! to every socket of the recipient and of the sender (replichat echoes a user's own messages too), so the
//! relay moves the same frames as the real server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use replichat_shared::{ClientFrame, ErrorCode, Message, Request, ServerBody, ServerFrame, PROTOCOL_VERSION};
use tokio::sync::mpsc;

/// The relay's whole state.
#[derive(Default)]
struct Relay {
    /// The last id handed out (ids play the part of log indexes).
    last_id: AtomicU64,
    /// Open sockets per username. A std mutex: never held across an await.
    sockets: Mutex<HashMap<String, Vec<mpsc::UnboundedSender<String>>>>,
}

/// Serve the relay on `listen` until the process ends; prints `relay listening on http://addr`.
pub async fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let relay = Arc::new(Relay::default());
    let app = Router::new().route("/ws", get(upgrade)).with_state(relay);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("relay listening on http://{}", listener.local_addr()?);
    // Nagle off, as replichat does.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

async fn upgrade(State(relay): State<Arc<Relay>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| connection(socket, relay))
}

async fn connection(socket: WebSocket, relay: Arc<Relay>) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let welcome = ServerBody::Welcome { node: 0, term: 1, endpoints: Vec::new(), protocol: PROTOCOL_VERSION };
    let _ = tx.send(frame(None, welcome));
    let writer = tokio::spawn(async move {
        while let Some(text) = rx.recv().await {
            if sink.send(WsMessage::Text(text.into())).await.is_err() {
                break;
            }
        }
    });
    let mut me: Option<String> = None;
    while let Some(Ok(message)) = stream.next().await {
        let WsMessage::Text(text) = message else { continue };
        let Ok(ClientFrame { req, request }) = serde_json::from_str::<ClientFrame>(text.as_str()) else {
            let error =
                ServerBody::Error { code: ErrorCode::BadRequest, message: "bad frame".into(), retry_after_ms: None };
            let _ = tx.send(frame(None, error));
            continue;
        };
        let reply = match request {
            Request::Register { username, .. } | Request::Login { username, .. } => {
                attach(&relay, &username, &tx);
                me = Some(username.clone());
                let cursor = relay.last_id.load(Ordering::SeqCst);
                ServerBody::Session { token: Some(format!("token-{username}")), username, cursor }
            }
            Request::Resume { token, cursor } => {
                let username = token.trim_start_matches("token-").to_owned();
                attach(&relay, &username, &tx);
                me = Some(username.clone());
                ServerBody::Session { token: None, username, cursor }
            }
            Request::Send { to, text, client_id } => match &me {
                None => ServerBody::Error {
                    code: ErrorCode::Unauthenticated,
                    message: "log in first".into(),
                    retry_after_ms: None,
                },
                Some(from) => {
                    let id = relay.last_id.fetch_add(1, Ordering::SeqCst) + 1;
                    let sent_at = now_ms();
                    let message = Message {
                        id,
                        from: from.clone(),
                        to: to.clone(),
                        text,
                        client_id: client_id.clone(),
                        sent_at,
                        delivered_at: None,
                        read_at: None,
                        from_deleted: false,
                    };
                    let _ = tx.send(frame(req.clone(), ServerBody::Sent { id, index: id, client_id, sent_at }));
                    let event = frame(None, ServerBody::Message { index: id, message });
                    push(&relay, &to, &event);
                    push(&relay, from, &event);
                    continue;
                }
            },
            _ => ServerBody::Ok,
        };
        let _ = tx.send(frame(req, reply));
    }
    drop(tx);
    let _ = writer.await;
}

fn attach(relay: &Relay, username: &str, tx: &mpsc::UnboundedSender<String>) {
    relay.sockets.lock().expect("relay lock").entry(username.to_owned()).or_default().push(tx.clone());
}

fn push(relay: &Relay, username: &str, text: &str) {
    let mut sockets = relay.sockets.lock().expect("relay lock");
    if let Some(list) = sockets.get_mut(username) {
        list.retain(|tx| tx.send(text.to_owned()).is_ok());
    }
}

fn frame(req: Option<String>, body: ServerBody) -> String {
    serde_json::to_string(&ServerFrame { req, body }).expect("frames serialise")
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
