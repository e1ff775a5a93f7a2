//! The client WebSocket at `/ws`: checks the origin, turns text frames into typed requests and typed
//! replies and pushes into frames, streams login/resume backlogs page by page, and holds each socket to its
//! deadlines (authentication, silence, writes). All chat behaviour lives in [`Session`].

use std::time::Duration;

use tokio::time::Instant;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use replichat_shared::{
    ClientFrame, ErrorCode, ServerBody, ServerFrame, CLOSE_GOING_AWAY, CLOSE_NORMAL, CLOSE_TOO_BIG, MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
};
use std::net::SocketAddr;

use crate::replication::{Leadership, Role, Status};
use crate::session::{Pushed, Session};
use crate::{AppState, Error};

/// The transport's own hard limit. Frames between [`MAX_FRAME_BYTES`] and this are read whole and answered
/// with a clean close 1009; beyond it the transport refuses to read the frame and we still close 1009.
const TRANSPORT_LIMIT: usize = 1 << 20;
/// Close code for a socket whose push queue overflowed (RFC 6455 "policy violation"); the client resumes.
const CLOSE_TOO_SLOW: u16 = 1008;
/// Read buffer and write batching size per socket. The read buffer is allocated with the socket and kept for
/// its whole life, idle or not: the transport's default, 128 KiB, made an idle session cost about 140 KB of
/// RSS, and 8 KiB still 8 KB of the 14.6 KB it cost then (heaptrack, `bench idle`). Chat frames are a few
/// hundred bytes; a bigger one is still read whole (the buffer grows to the frame), 1 KiB per read call.
const SOCKET_BUFFER: usize = 1024;
/// How long to wait for the client's answer to our close frame before dropping the connection.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Backlog pages read at the same time, over all sockets (see [`AppState::backlog_reads`]).
pub const BACKLOG_READERS: usize = 2;
/// Close code for a socket that did not authenticate in time, or went silent (RFC 6455 "policy violation").
const CLOSE_POLICY: u16 = 1008;

/// The deadlines a `/ws` socket lives by (flags in [`crate::Config`]).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From `welcome` (or `logout`) to a successful `register`, `login` or `resume`.
    pub auth: Duration,
    /// An authenticated socket that sent nothing for this long is pinged.
    pub ping: Duration,
    /// An authenticated socket that sent nothing (not even a pong) for this long is closed.
    pub idle: Duration,
    /// Longest one write may wait for the client to read.
    pub write: Duration,
    /// How long a replica that knows no live primary (an election is under way) holds a new client before
    /// answering `not_leader` without a leader: two election timeouts.
    pub leader_wait: Duration,
}

impl Timeouts {
    /// The deadlines set by `config`.
    pub fn from_config(config: &crate::Config) -> Timeouts {
        let ms = |ms: u64| Duration::from_millis(ms.max(1));
        Timeouts {
            auth: ms(config.auth_timeout_ms),
            ping: ms(config.ping_interval_ms),
            idle: ms(config.idle_timeout_ms),
            write: ms(config.write_timeout_ms),
            leader_wait: ms(config.election_timeout_ms.saturating_mul(2)),
        }
    }
}

/// `GET /ws`: upgrade if the origin is allowed. A request with more than one `Origin` header is refused:
/// a browser sends exactly one, and which copy a check reads must not decide the answer.
pub async fn upgrade(
    State(state): State<AppState>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> HttpResponse {
    let mut origins = headers.get_all(header::ORIGIN).iter();
    let origin = origins.next().map(|v| v.as_bytes());
    if origins.next().is_some() {
        tracing::warn!(?origin, "refused a WebSocket with more than one Origin header");
        return (StatusCode::FORBIDDEN, "more than one Origin header").into_response();
    }
    if !state.origins.allows(origin) {
        tracing::warn!(?origin, "refused a WebSocket from a foreign origin");
        return (StatusCode::FORBIDDEN, "origin not allowed").into_response();
    }
    let token = state.tracker.token();
    ws.max_message_size(TRANSPORT_LIMIT)
        .max_frame_size(TRANSPORT_LIMIT)
        .read_buffer_size(SOCKET_BUFFER)
        .write_buffer_size(SOCKET_BUFFER)
        .on_upgrade(move |socket| async move {
            serve(socket, state, client).await;
            drop(token);
        })
}

type Sink = SplitSink<WebSocket, Message>;

/// The writing half of a socket: every write gives up after [`Timeouts::write`], so a client that does not
/// read holds at most its transport buffers, and its task ends.
///
/// Most writes go out at once ([`Out::send`], [`Out::write`]). A reply to a request and a stored event are
/// *fed* instead ([`Out::feed`]): kept in the socket's write buffer until the socket's task has written
/// every push already queued for it, then flushed together ([`Out::flush`]), so a send's reply and the
/// sender's own copy of the message, which the apply queued just before the reply, leave in one write to the
/// socket instead of two, and a burst of events for one user in a few.
struct Out {
    sink: Sink,
    timeout: Duration,
    /// Fed and not flushed yet.
    unflushed: bool,
}

/// A write in flight. Writes are boxed: a socket's task holds its futures for as long as it lives, and an
/// idle socket writes nothing, so a write's few hundred bytes are better allocated per write.
type Writing<'a> = futures_util::future::BoxFuture<'a, Result<(), ()>>;

impl Out {
    fn send(&mut self, message: Message) -> Writing<'_> {
        Box::pin(self.send_inline(message))
    }

    async fn send_inline(&mut self, message: Message) -> Result<(), ()> {
        let sent = tokio::time::timeout(self.timeout, self.sink.send(message)).await;
        self.unflushed = false;
        Self::written(sent)
    }

    /// Add `message` to the socket's write buffer, for the next [`Out::flush`] (or any write that flushes).
    /// A full buffer is written out on the way, as with every write.
    fn feed(&mut self, message: Message) -> Writing<'_> {
        Box::pin(async move {
            self.unflushed = true;
            Self::written(tokio::time::timeout(self.timeout, self.sink.feed(message)).await)
        })
    }

    /// Write out what was fed.
    async fn flush(&mut self) -> Result<(), ()> {
        if !self.unflushed {
            return Ok(());
        }
        self.unflushed = false;
        Self::written(tokio::time::timeout(self.timeout, self.sink.flush()).await)
    }

    fn written<E>(result: Result<Result<(), E>, tokio::time::error::Elapsed>) -> Result<(), ()> {
        match result {
            Ok(result) => result.map_err(|_| ()),
            Err(_) => {
                tracing::info!("a client did not read for the write timeout; dropping its socket");
                Err(())
            }
        }
    }

    fn write(&mut self, req: Option<String>, body: ServerBody) -> Writing<'_> {
        Box::pin(async move { self.send_inline(text_frame(req, body)?).await })
    }

    /// [`Out::write`], fed ([`Out::feed`]).
    fn feed_frame(&mut self, req: Option<String>, body: ServerBody) -> Writing<'_> {
        Box::pin(async move { self.feed(text_frame(req, body)?).await })
    }

    async fn write_error(&mut self, req: Option<String>, error: &Error) -> Result<(), ()> {
        crate::metrics::request_failed(error.code());
        if error.code() == ErrorCode::Internal {
            tracing::error!(%error, "request failed");
        }
        let body = ServerBody::Error {
            code: error.code(),
            message: error.client_message(),
            retry_after_ms: error.retry_after_ms(),
        };
        self.write(req, body).await
    }

    /// Send a close frame and give the client a moment to answer, so it reads the frame before the
    /// connection goes away.
    async fn close(&mut self, stream: &mut SplitStream<WebSocket>, code: u16, reason: &'static str) {
        let frame = CloseFrame { code, reason: reason.into() };
        let sent = tokio::time::timeout(CLOSE_GRACE, self.sink.send(Message::Close(Some(frame)))).await;
        if matches!(sent, Ok(Ok(()))) {
            let _ = tokio::time::timeout(CLOSE_GRACE, async { while let Some(Ok(_)) = stream.next().await {} }).await;
        }
    }
}

async fn serve(socket: WebSocket, state: AppState, client: SocketAddr) {
    let _counted = crate::metrics::ClientConnection::open();
    let timeouts = state.socket_timeouts;
    let (sink, mut stream) = socket.split();
    let mut out = Out { sink, timeout: timeouts.write, unflushed: false };
    // Boxed: the greeting's futures are needed once, not for the socket's whole life.
    let Some((term, mut leadership)) = Box::pin(greet(&state, &mut out, &mut stream)).await else { return };
    let mut session = Session::new(state.chat.clone(), client.ip());
    // Until it authenticates, a socket has until `auth_by`; after, it must not fall silent for `idle`.
    let mut auth_by = Instant::now() + timeouts.auth;
    let mut heard = Instant::now();
    let mut pings = tokio::time::interval_at(Instant::now() + timeouts.ping, timeouts.ping);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let close_with = loop {
        if out.unflushed {
            // What was fed (a reply, an event) leaves together with the pushes already queued behind it.
            let mut end = None;
            for _ in 0..COALESCED_PUSHES {
                let Some(pushed) = session.ready_push() else { break };
                if let Some(close) = write_push(&mut out, pushed).await {
                    end = Some(close);
                    break;
                }
            }
            if let Some(close) = end {
                break close;
            }
            if out.flush().await.is_err() {
                break None;
            }
        }
        let authenticated = session.authenticated();
        // One timer for both deadlines (each timer is part of every idle socket's task).
        let deadline = if authenticated { heard + timeouts.idle } else { auth_by };
        tokio::select! {
            _ = state.shutdown.cancelled() => break Some((CLOSE_GOING_AWAY, "server shutting down")),
            _ = tokio::time::sleep_until(deadline) => {
                if authenticated {
                    break Some((CLOSE_POLICY, "idle: no answer to pings"));
                }
                break Some((CLOSE_POLICY, "not authenticated in time"));
            }
            _ = pings.tick(), if authenticated => {
                if heard.elapsed() >= timeouts.ping && out.send(Message::Ping(Default::default())).await.is_err() {
                    break None;
                }
            }
            changed = leadership.changed() => {
                if changed.is_err() {
                    // The replication core stopped: the server is shutting down.
                    break Some((CLOSE_GOING_AWAY, "server shutting down"));
                }
                let now = *leadership.borrow_and_update();
                if now.role != Role::Primary || now.term != term {
                    let status = state.chat.replication().status().borrow().clone();
                    let _ = out.write(None, not_leader(&state, &status)).await;
                    break Some((CLOSE_NORMAL, "not the primary any more"));
                }
            }
            pushed = session.next_push() => {
                if let Some(close) = write_push(&mut out, pushed).await { break close; }
            }
            incoming = stream.next() => {
                heard = Instant::now();
                match incoming {
                    None | Some(Ok(Message::Close(_))) => break None,
                    Some(Err(e)) => {
                        if is_too_big(e) { break Some((CLOSE_TOO_BIG, "frame too big")); }
                        break None;
                    }
                    Some(Ok(Message::Text(text))) if text.len() > MAX_FRAME_BYTES => {
                        break Some((CLOSE_TOO_BIG, "frame over 64 KiB"));
                    }
                    Some(Ok(Message::Text(text))) => {
                        // Boxed: answering holds the futures of every request (storage, password hashing), a
                        // few KB, which would otherwise be part of every socket's task while it is idle.
                        match Box::pin(answer(&mut session, &mut out, text.as_str())).await {
                            Ok(false) => {}
                            Ok(true) => break Some((CLOSE_NORMAL, "account deleted")),
                            Err(()) => break None,
                        }
                        if session.backlog_pending()
                            && Box::pin(write_backlog(&mut session, &mut out, &state.backlog_reads)).await.is_err()
                        {
                            break None;
                        }
                        // Answering may have taken a while (a long backlog): the silence starts now.
                        heard = Instant::now();
                        if authenticated && !session.authenticated() {
                            // Logged out: the same time to authenticate again as a new socket.
                            auth_by = Instant::now() + timeouts.auth;
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        let error = Error::BadRequest("binary frames are not part of the protocol; send JSON text".into());
                        if out.write_error(None, &error).await.is_err() { break None; }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                }
            }
        }
    };
    // Boxed for the same reason as `answer`: leaving the hub may touch storage (last seen).
    Box::pin(session.close()).await;
    if let Some((code, reason)) = close_with {
        Box::pin(out.close(&mut stream, code, reason)).await;
    }
}

/// The text frame of a reply (`req` set) or a push.
fn text_frame(req: Option<String>, body: ServerBody) -> Result<Message, ()> {
    let text = serde_json::to_string(&ServerFrame { req, body }).map_err(|_| ())?;
    Ok(Message::Text(text.into()))
}

/// Pushes written after a fed frame before the flush, at most: a socket's task goes back to reading its
/// client after that many.
const COALESCED_PUSHES: usize = 64;

/// Write one push to the socket: a stored event is fed ([`Out::feed`]), everything else written at once.
/// `Some(close)` ends the socket's task (closing with `close`, or silently when `None`).
async fn write_push(out: &mut Out, pushed: Pushed) -> Option<Option<(u16, &'static str)>> {
    match pushed {
        Pushed::Frame(body) => out.write(None, body).await.is_err().then_some(None),
        Pushed::Event(json) => out.feed(Message::Text(json)).await.is_err().then_some(None),
        Pushed::AccountDeleted => {
            let _ = out.write(None, ServerBody::AccountDeleted).await;
            Some(Some((CLOSE_NORMAL, "account deleted")))
        }
        Pushed::TooSlow => Some(Some((CLOSE_TOO_SLOW, "too slow for pushes; resume"))),
        Pushed::SessionEnded(reason) => {
            let _ = out.write(None, ServerBody::SessionEnded { reason }).await;
            Some(Some((CLOSE_NORMAL, "session ended")))
        }
    }
}

/// Welcome the client if this replica is the primary (after waiting out an election under way); otherwise
/// tell it where the primary is and close. Returns the term it was welcomed in, and the leadership to watch.
async fn greet(
    state: &AppState,
    out: &mut Out,
    stream: &mut SplitStream<WebSocket>,
) -> Option<(u64, tokio::sync::watch::Receiver<Leadership>)> {
    let mut status = state.chat.replication().status();
    let mut first = status.borrow_and_update().clone();
    if first.role != Role::Primary && first.leader.is_none() {
        // No live primary known: most likely one just died and an election is under way. Answer once it is
        // decided (welcome, if this replica won), so the client neither backs off nor tries a dead replica.
        let decided = status.wait_for(|s| s.role == Role::Primary || s.leader.is_some());
        tokio::select! {
            _ = state.shutdown.cancelled() => {}
            decided = tokio::time::timeout(state.socket_timeouts.leader_wait, decided) => {
                if let Ok(Ok(now)) = decided {
                    first = now.clone();
                }
            }
        }
    }
    if first.role != Role::Primary {
        // Clients talk to the primary only: tell them where it is, then close.
        let _ = out.write(None, not_leader(state, &first)).await;
        out.close(stream, CLOSE_NORMAL, "not the primary").await;
        return None;
    }
    let welcome = ServerBody::Welcome {
        node: state.node.id,
        term: first.term,
        endpoints: state.node.endpoints(),
        protocol: PROTOCOL_VERSION,
    };
    out.write(None, welcome).await.ok()?;
    // From here on only a change of role or term matters, not every acknowledgement the status reports.
    let mut leadership = state.chat.replication().leadership();
    if *leadership.borrow_and_update() != (Leadership { role: Role::Primary, term: first.term }) {
        let status = state.chat.replication().status().borrow().clone();
        let _ = out.write(None, not_leader(state, &status)).await;
        out.close(stream, CLOSE_NORMAL, "not the primary any more").await;
        return None;
    }
    Some((first.term, leadership))
}

/// Where the primary is, as this replica knows it.
fn not_leader(state: &AppState, status: &Status) -> ServerBody {
    let leader = status.leader.filter(|&l| l != state.node.id || status.role == Role::Primary);
    ServerBody::NotLeader {
        leader,
        leader_url: leader.and_then(|l| state.node.urls.get(&l).cloned()),
        term: status.term,
        endpoints: state.node.endpoints(),
    }
}

/// Decode one text frame, answer it and write the reply (a backlog it opened is [`write_backlog`]'s).
/// `Ok(true)` means close the socket.
async fn answer(session: &mut Session, out: &mut Out, text: &str) -> Result<bool, ()> {
    let (req, decoded) = decode(text);
    let request = match decoded {
        Ok(request) => request,
        Err(error) => return out.write_error(req, &error).await.map(|_| false),
    };
    match session.handle(request).await {
        Ok(response) => {
            out.feed_frame(req, response.reply).await?;
            Ok(response.close)
        }
        Err(error) => out.write_error(req, &error).await.map(|_| false),
    }
}

/// The backlog of a `login` or `resume`, a page at a time: the next page is read only once this one is
/// written. A future of its own, apart from [`answer`], and each read boxed again: when thousands of sockets
/// resume at once they queue here for a permit, and each waits holding only this small future (with the backlog
/// inside `answer`, the whole request's state, 1.4 KB, waited in that queue for every socket: heaptrack, `bench
/// idle`; the allocator kept that memory after).
async fn write_backlog(session: &mut Session, out: &mut Out, backlog_reads: &tokio::sync::Semaphore) -> Result<(), ()> {
    while session.backlog_pending() {
        let permit = backlog_reads.acquire().await.map_err(|_| ())?;
        let page = Box::pin(session.backlog_page()).await;
        drop(permit);
        let page = match page {
            Ok(page) => page,
            Err(error) => {
                // The reply is out already: drop the socket, the client resumes from its cursor.
                tracing::error!(%error, "could not read a backlog page; dropping the socket");
                return Err(());
            }
        };
        for body in page {
            out.write(None, body).await?;
        }
    }
    Ok(())
}

/// Parse a client frame; the `req` is recovered even when the rest is malformed, so errors can echo it.
/// Public for the fuzz target `client_frame` (`fuzz/`).
pub fn decode(text: &str) -> (Option<String>, Result<replichat_shared::Request, Error>) {
    let value: serde_json::Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => return (req_of_object(text), Err(Error::BadRequest(format!("not JSON: {e}")))),
    };
    let req = value.get("req").and_then(|r| r.as_str()).map(str::to_owned);
    if !value.is_object() {
        return (req, Err(Error::BadRequest("a frame must be a JSON object".into())));
    }
    match serde_json::from_value::<ClientFrame>(value) {
        Ok(frame) => (req, Ok(frame.request)),
        Err(e) => (req, Err(Error::BadRequest(format!("bad frame: {e}")))),
    }
}

/// The `req` of a JSON object too deep (or otherwise too much) for a full parse: every other field is
/// skipped without being built, which needs no recursion, so only `req` itself must be well-formed.
fn req_of_object(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct ReqOnly {
        #[serde(default)]
        req: Option<serde_json::Value>,
    }
    let only: ReqOnly = serde_json::from_str(text).ok()?;
    only.req?.as_str().map(str::to_owned)
}

/// Whether a read error is the transport refusing an oversized frame.
fn is_too_big(error: axum::Error) -> bool {
    matches!(error.into_inner().downcast_ref::<tungstenite::Error>(), Some(tungstenite::Error::Capacity(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_keeps_req_on_bad_frames() {
        let (req, result) = decode(r#"{"type":"send","req":"r1","to":"bob"}"#);
        assert_eq!(req.as_deref(), Some("r1"));
        assert!(matches!(result, Err(Error::BadRequest(_))));
        let (req, result) = decode(r#"{"type":"nope","req":"r2"}"#);
        assert_eq!(req.as_deref(), Some("r2"));
        assert!(result.is_err());
        let (req, result) = decode("[1,2]");
        assert_eq!(req, None);
        assert!(result.is_err());
        assert!(decode("{").1.is_err());
    }
}
