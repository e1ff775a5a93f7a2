//! Abuse limits: connections that never send a request, never authenticate, go silent, never read, or come
//! in too many from one address are cut off, and the replica keeps serving everyone else and `/healthz`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use replichat::{Config, Running};
use replichat_shared::{ClientFrame, Request, ServerBody, ServerFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::both;
use crate::util::*;

/// A server over a fresh database with `tune` applied to its test config.
async fn server_with(engine: Engine, tune: impl FnOnce(&mut Config)) -> Server {
    let url = fresh_db(engine).await;
    let mut config = Config::for_tests(url.clone());
    tune(&mut config);
    let running: Running = replichat::start(config).await.expect("server starts");
    Server { addr: running.addr, running: Some(running), url }
}

/// A TCP connection to `server` from the loopback address `from` (127.0.0.x): another client address.
async fn tcp_from(from: [u8; 4], server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::from(from), 0)).unwrap();
    socket.connect(server).await.expect("tcp connect")
}

/// `GET /healthz` from `from`: the status code and body.
async fn healthz_from(from: [u8; 4], server: SocketAddr) -> (u16, serde_json::Value) {
    let mut tcp = tcp_from(from, server).await;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: replichat\r\nconnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut response)).await.expect("healthz answers in time").unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    (status, serde_json::from_str(body).unwrap_or_default())
}

/// Wait until the connection is closed by the server (EOF or reset), reading and dropping whatever comes.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

/// A normal client from another address still gets a session and a reply, and `/healthz` answers.
async fn others_are_served(server: &Server, name: &str) {
    let (status, health) = healthz_from([127, 0, 0, 3], server.addr).await;
    assert_eq!(status, 200, "/healthz answers meanwhile");
    assert_eq!(health["role"], "primary");
    let tcp = tcp_from([127, 0, 0, 3], server.addr).await;
    let (mut ws, _) = tokio_tungstenite::client_async(server.ws_url(), tcp).await.expect("another client connects");
    let frame = ClientFrame {
        req: Some("1".into()),
        request: Request::Register { username: name.into(), password: "password123".into() },
    };
    ws.send(WsMessage::Text(serde_json::to_string(&frame).unwrap().into())).await.unwrap();
    let reply = tokio::time::timeout(WAIT, async {
        while let Some(Ok(message)) = ws.next().await {
            if let WsMessage::Text(text) = message {
                let frame: ServerFrame = serde_json::from_str(text.as_str()).unwrap();
                if frame.req.as_deref() == Some("1") {
                    return frame.body;
                }
            }
        }
        panic!("socket closed before the reply");
    })
    .await
    .expect("another client is answered in time");
    assert!(matches!(reply, ServerBody::Session { .. }), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_request_is_closed() {
    init_tracing();
    let server = server_with(Engine::Sqlite, |c| c.header_timeout_ms = 300).await;
    let mut silent = tcp_from([127, 0, 0, 1], server.addr).await;
    others_are_served(&server, "other").await;
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await, "a silent connection is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_request_head_is_cut_off() {
    init_tracing();
    let server = server_with(Engine::Sqlite, |c| c.header_timeout_ms = 500).await;
    let mut slow = tcp_from([127, 0, 0, 1], server.addr).await;
    slow.write_all(b"GET /ws HTTP/1.1\r\n").await.unwrap();
    let started = Instant::now();
    let mut cut = false;
    // One header line every 100 ms: each arrives well within the deadline, the head never completes.
    while started.elapsed() < Duration::from_secs(4) {
        if slow.write_all(b"x-slow: 1\r\n").await.is_err() || closed_within(&mut slow, Duration::from_millis(100)).await
        {
            cut = true;
            break;
        }
    }
    assert!(cut, "the connection is closed once the head takes longer than the deadline");
    assert!(started.elapsed() < Duration::from_secs(3), "closed after {:?}", started.elapsed());
    others_are_served(&server, "other").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_does_not_authenticate_is_closed_with_1008() {
    init_tracing();
    let server = server_with(Engine::Sqlite, |c| c.auth_timeout_ms = 300).await;
    let mut idle = server.client().await;
    // `ping` is allowed before authenticating, but does not extend the deadline.
    assert_eq!(idle.request(Request::Ping).await, ServerBody::Pong);
    let close = idle.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "not authenticated in time");
    // A socket that authenticates in time stays open past the deadline.
    let mut alice = server.user("alice").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(alice.request(Request::Ping).await, ServerBody::Pong);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_authenticated_socket_is_pinged_then_closed() {
    init_tracing();
    let server = server_with(Engine::Sqlite, |c| {
        c.ping_interval_ms = 100;
        c.idle_timeout_ms = 500;
    })
    .await;
    let mut alive = server.user("alive").await;
    let mut silent = server.user("silent").await;
    // `alive` keeps reading (its client answers pings); `silent` reads nothing, so it answers none.
    let deadline = Instant::now() + Duration::from_millis(1200);
    while Instant::now() < deadline {
        let _ = alive.try_read_frame(Duration::from_millis(50)).await;
    }
    assert_eq!(alive.request(Request::Ping).await, ServerBody::Pong, "a socket answering pings stays open");
    let close = silent.expect_close().await.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason.as_str(), "idle: no answer to pings");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_address_cap_are_refused_with_429() {
    init_tracing();
    let server = server_with(Engine::Sqlite, |c| c.max_connections_per_ip = 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(server.client().await);
    }
    let refused = tokio_tungstenite::connect_async(server.ws_url()).await.expect_err("the fourth is refused");
    let tokio_tungstenite::tungstenite::Error::Http(response) = refused else { panic!("{refused:?}") };
    assert_eq!(response.status(), 429);
    let body = String::from_utf8(response.body().clone().unwrap_or_default()).unwrap();
    assert!(body.contains("too many connections from your address"), "{body}");
    // Plain HTTP from that address is refused too; other addresses are not affected.
    let (status, _) = healthz_from([127, 0, 0, 1], server.addr).await;
    assert_eq!(status, 429);
    others_are_served(&server, "other").await;
    // Closing one gives its slot back.
    held.pop().unwrap().close().await;
    let deadline = Instant::now() + WAIT;
    loop {
        match Client::connect_any(&server.ws_url()).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => tracing::info!("still refused: {e}"),
            Err(e) => panic!("a slot should have come back: {e}"),
        }
        tokio::task::yield_now().await;
    }
}

/// `from` sends `count` messages of `chars` characters to `to`, pipelined (the replica commits them in
/// groups); returns their ids in order.
async fn send_many(from: &mut Client, to: &str, count: usize, chars: usize) -> Vec<u64> {
    let text = "x".repeat(chars);
    for i in 0..count {
        let frame = ClientFrame {
            req: Some(format!("many{i}")),
            request: Request::Send { to: to.into(), text: text.clone(), client_id: format!("many{i}") },
        };
        from.send_text(serde_json::to_string(&frame).unwrap()).await;
    }
    let mut ids = Vec::with_capacity(count);
    for i in 0..count {
        match from.reply_to(&format!("many{i}")).await {
            ServerBody::Sent { id, .. } => ids.push(id),
            other => panic!("send {i}: {other:?}"),
        }
    }
    from.drain_inbox();
    ids
}

both!(login_and_resume_backlogs_longer_than_a_page_arrive_whole_and_in_order, |engine| async move {
    let server = server(engine).await;
    let mut alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let token = bob.token.clone().unwrap();
    bob.close().await;
    let sent = send_many(&mut alice, "bob", 250, 10).await;

    // login: every undelivered message, oldest first, over several pages.
    let mut phone = server.client().await;
    let ServerBody::Session { cursor, .. } = phone.login("bob", "password123").await else { panic!() };
    let mut got = Vec::new();
    for _ in 0..sent.len() {
        let ServerBody::Message { message, .. } = phone.next_push().await else { panic!() };
        got.push(message.id);
    }
    assert_eq!(got, sent);

    // resume from 0: every stored event (the same messages), then live pushes, nothing twice.
    let mut laptop = server.client().await;
    laptop.request(Request::Resume { token, cursor: 0 }).await;
    let mut replayed = Vec::new();
    for _ in 0..sent.len() {
        let ServerBody::Message { index, message } = laptop.next_push().await else { panic!() };
        assert!(index <= cursor);
        replayed.push(message.id);
    }
    assert_eq!(replayed, sent);
    let live = alice.send_message("bob", "live").await;
    let ServerBody::Message { message, .. } = laptop.next_push().await else { panic!() };
    assert_eq!(message.id, live, "the first push after the replay is the live message");
});

both!(a_client_that_does_not_read_its_resume_is_dropped_and_others_are_served, |engine| async move {
    let server = server_with(engine, |c| c.write_timeout_ms = 1_000).await;
    let mut alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let token = bob.token.clone().unwrap();
    bob.close().await;
    // About 6 MB of events for bob: more than the kernel buffers between the replica and a client that
    // does not read (the replica's send buffer grows to 4 MiB at most here: net.ipv4.tcp_wmem).
    send_many(&mut alice, "bob", 1_500, 4_000).await;

    // A client with a tiny receive buffer asks for all of it and never reads.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.addr).await.unwrap();
    let (mut stuck, _) = tokio_tungstenite::client_async(server.ws_url(), tcp).await.unwrap();
    let resume = ClientFrame { req: Some("1".into()), request: Request::Resume { token, cursor: 0 } };
    stuck.send(WsMessage::Text(serde_json::to_string(&resume).unwrap().into())).await.unwrap();

    others_are_served(&server, "carol").await;
    assert_eq!(alice.request(Request::Ping).await, ServerBody::Pong);
    // The replica gives up on it: its session goes away; alice's stays (carol's closed with its socket).
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, health) = healthz_from([127, 0, 0, 3], server.addr).await;
        if health["sessions"] == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the non-reading socket is still open: {health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(stuck);
});
