//! One simulated user on a real WebSocket. It behaves like the browser app's connection module: it keeps
//! the endpoint list, follows `not_leader` hints (never to a lower term), resumes its session from its
//! cursor after a reconnect, and re-sends every unacknowledged message with the same `client_id`.
//!
//! Each message's text carries the sender's index, its sequence number and the instant it was first sent,
//! so the recipient can time send -> delivered against the same clock and the checker can match deliveries
//! to acknowledgements.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use replichat_shared::{ClientFrame, ErrorCode, Request, ServerBody, ServerFrame};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a user keeps trying to reach a primary before it gives up (and the run fails).
const RECONNECT_FOR: Duration = Duration::from_secs(60);
/// How many `unavailable` answers a user's register (or login) is retried after.
const OPEN_RETRIES: u32 = 5;
/// Messages a user keeps unacknowledged at most when sending at a fixed rate: past a target's capacity the
/// ticks that find the backlog full send nothing (counted as skipped), so the run still drains within its
/// deadline and reports what the target acknowledged, instead of queueing without bound.
pub const MAX_BACKLOG: usize = 50;
/// Padding so a message is about as long as a short chat line (~80 bytes of text).
const PADDING: &str = "the quick brown fox jumps over the lazy dog and keeps running";

/// The phases of a run, broadcast to every user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Send messages.
    Run,
    /// Send nothing new; keep reading (and re-sending what is unacknowledged).
    Drain,
    /// Close the socket and report.
    Finish,
}

/// How a user paces its sends.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// One new message every `interval` (open loop; the user's share of a fixed total rate).
    Every(Duration),
    /// Keep this many messages unacknowledged (closed loop: as fast as acknowledgements allow).
    Window(usize),
}

/// What the chaos run wants to know as it happens: after `since`, the first acknowledgement from a node
/// other than `victim`, and when each user finished resuming.
#[derive(Debug)]
pub struct Probe {
    pub since: Instant,
    pub victim: u64,
    pub first_ack: Option<(Instant, u64)>,
    /// (user index, instant) of each resume that completed after `since`.
    pub resumed: Vec<(usize, Instant)>,
}

/// State shared by every user of a run and the code driving it.
pub struct Shared {
    /// The clock every timestamp in a message's text is measured from.
    pub base: Instant,
    pub phase: watch::Sender<Phase>,
    /// Messages created (first send) and acknowledged, and unique deliveries, over all users.
    pub created: AtomicU64,
    /// Fixed-rate ticks at which a user sent nothing, its backlog being full ([`MAX_BACKLOG`]).
    pub skipped: AtomicU64,
    pub acked: AtomicU64,
    pub delivered: AtomicU64,
    /// Latencies are recorded only between these two instants (ns since `base`): the measurement window.
    window_from: AtomicU64,
    window_to: AtomicU64,
    probe_armed: AtomicBool,
    /// A std mutex: never held across an await.
    probe: Mutex<Option<Probe>>,
    /// Whether new messages may still be created: closed by [`Shared::close_sending`] under the same lock a
    /// user holds while it counts a new message in `created`, so that once it is closed `created` is final.
    sending: Mutex<bool>,
}

impl Shared {
    /// No user creates a message after this returns (see `sending`): the drain can wait for `acked` to reach
    /// `created` without a user counting one more meanwhile.
    pub fn close_sending(&self) {
        *self.sending.lock().expect("not poisoned") = false;
    }

    pub fn new() -> Arc<Shared> {
        Arc::new(Shared {
            base: Instant::now(),
            phase: watch::Sender::new(Phase::Run),
            created: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            window_from: AtomicU64::new(0),
            window_to: AtomicU64::new(u64::MAX),
            probe_armed: AtomicBool::new(false),
            probe: Mutex::new(None),
            sending: Mutex::new(true),
        })
    }

    /// Record latencies only from `from` to `to`.
    pub fn set_window(&self, from: Instant, to: Instant) {
        self.window_from.store(self.nanos(from), Ordering::SeqCst);
        self.window_to.store(self.nanos(to), Ordering::SeqCst);
    }

    fn in_window(&self, at: Instant) -> bool {
        let t = self.nanos(at);
        t >= self.window_from.load(Ordering::Relaxed) && t <= self.window_to.load(Ordering::Relaxed)
    }

    pub fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.base).as_nanos() as u64
    }

    /// Start watching for the first acknowledgement not from `victim`, and for resumes.
    pub fn arm_probe(&self, since: Instant, victim: u64) {
        *self.probe.lock().expect("probe lock") = Some(Probe { since, victim, first_ack: None, resumed: Vec::new() });
        self.probe_armed.store(true, Ordering::SeqCst);
    }

    /// What the probe saw so far (it stays armed).
    pub fn probe<T>(&self, f: impl FnOnce(&Probe) -> T) -> Option<T> {
        self.probe.lock().expect("probe lock").as_ref().map(f)
    }

    pub fn disarm_probe(&self) -> Option<Probe> {
        self.probe_armed.store(false, Ordering::SeqCst);
        self.probe.lock().expect("probe lock").take()
    }

    fn probe_ack(&self, at: Instant, node: u64) {
        if self.probe_armed.load(Ordering::Relaxed) {
            if let Some(p) = self.probe.lock().expect("probe lock").as_mut() {
                if p.first_ack.is_none() && node != p.victim && at >= p.since {
                    p.first_ack = Some((at, node));
                }
            }
        }
    }

    fn probe_resumed(&self, user: usize, at: Instant) {
        if self.probe_armed.load(Ordering::Relaxed) {
            if let Some(p) = self.probe.lock().expect("probe lock").as_mut() {
                if at >= p.since {
                    p.resumed.push((user, at));
                }
            }
        }
    }
}

/// Who a user is and whom it writes to.
#[derive(Debug, Clone)]
pub struct UserSpec {
    pub index: usize,
    pub name: String,
    pub password: String,
    /// The recipient of every message this user sends.
    pub to: String,
    /// Unique per run: makes every `client_id` unique across users and runs.
    pub run_id: String,
}

/// An acknowledged send.
#[derive(Debug, Clone)]
pub struct Ack {
    pub seq: u64,
    pub client_id: String,
    pub id: u64,
    /// When the acknowledgement arrived, ms since [`Shared::base`].
    pub at_ms: u32,
}

/// A message received as the recipient.
#[derive(Debug, Clone, Copy)]
pub struct Delivery {
    pub from: usize,
    pub seq: u64,
    pub id: u64,
}

/// Everything a user recorded.
pub struct Record {
    pub index: usize,
    pub name: String,
    pub acks: Vec<Ack>,
    /// In arrival order.
    pub deliveries: Vec<Delivery>,
    /// Microseconds, inside the window.
    pub ack_latency: Histogram<u64>,
    pub deliver_latency: Histogram<u64>,
    pub reconnects: u32,
    /// Why the user gave up, if it did.
    pub failure: Option<String>,
}

struct Pending {
    seq: u64,
    client_id: String,
    text: String,
    first_sent: Instant,
}

/// A user's connection and bookkeeping.
pub struct User {
    spec: UserSpec,
    shared: Arc<Shared>,
    endpoints: Vec<String>,
    next_endpoint: usize,
    hint: Option<String>,
    term: u64,
    token: Option<String>,
    cursor: u64,
    pending: VecDeque<Pending>,
    next_seq: u64,
    seen: HashSet<(usize, u64)>,
    record: Record,
}

enum Ended {
    Finished,
    Disconnected(String),
}

impl User {
    pub fn new(spec: UserSpec, endpoints: Vec<String>, shared: Arc<Shared>) -> User {
        let histogram = || Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds");
        let record = Record {
            index: spec.index,
            name: spec.name.clone(),
            acks: Vec::new(),
            deliveries: Vec::new(),
            ack_latency: histogram(),
            deliver_latency: histogram(),
            reconnects: 0,
            failure: None,
        };
        let next_endpoint = spec.index % endpoints.len().max(1);
        User {
            spec,
            shared,
            endpoints,
            next_endpoint,
            hint: None,
            term: 0,
            token: None,
            cursor: 0,
            pending: VecDeque::new(),
            next_seq: 0,
            seen: HashSet::new(),
            record,
        }
    }

    /// Connect and register (or log in, if `login`), then return: the user is ready.
    ///
    /// `unavailable` (the primary could not commit the entry in time, e.g. under the burst of password
    /// hashing that registering every user at once is) is retried, as docs/PROTOCOL.md says a client does: a
    /// registration that was committed after all answers the retry with `username_taken`, and the user then
    /// logs in with the same password.
    pub async fn open(&mut self, login: bool) -> anyhow::Result<Ws> {
        let (mut ws, _node) = self.connect().await?;
        let mut login = login;
        let mut unavailable = 0;
        loop {
            let (username, password) = (self.spec.name.clone(), self.spec.password.clone());
            let request =
                if login { Request::Login { username, password } } else { Request::Register { username, password } };
            match request_reply(&mut ws, request).await? {
                ServerBody::Session { token, cursor, .. } => {
                    self.token = token;
                    self.cursor = cursor;
                    return Ok(ws);
                }
                ServerBody::Error { code: ErrorCode::Unavailable, .. } if unavailable < OPEN_RETRIES => {
                    unavailable += 1;
                    // The replica may have stopped being primary: find the primary again.
                    (ws, _) = self.connect().await?;
                }
                ServerBody::Error { code: ErrorCode::UsernameTaken, .. } if unavailable > 0 && !login => login = true,
                other => bail!("{}: register/login answered {other:?}", self.spec.name),
            }
        }
    }

    /// Send and receive until the phase is [`Phase::Finish`], reconnecting as needed. `ws` is the socket
    /// [`User::open`] returned.
    pub async fn run(mut self, pace: Pace, ws: Ws) -> Record {
        let mut phase = self.shared.phase.subscribe();
        let mut ws = Some(ws);
        let mut node = 0;
        loop {
            let socket = match ws.take() {
                Some(socket) => socket,
                None => match self.reconnect().await {
                    Ok((socket, n)) => {
                        node = n;
                        socket
                    }
                    Err(e) => {
                        self.record.failure = Some(format!("{}: {e:#}", self.spec.name));
                        return self.record;
                    }
                },
            };
            match self.exchange(socket, node, pace, &mut phase).await {
                Ok(Ended::Finished) => return self.record,
                Ok(Ended::Disconnected(_why)) => self.record.reconnects += 1,
                Err(e) => {
                    self.record.failure = Some(format!("{}: {e:#}", self.spec.name));
                    return self.record;
                }
            }
        }
    }

    /// Find the primary, resume the session, and re-send everything unacknowledged, in order.
    async fn reconnect(&mut self) -> anyhow::Result<(Ws, u64)> {
        let (mut ws, node) = self.connect().await?;
        let token = self.token.clone().context("no session to resume")?;
        match request_reply(&mut ws, Request::Resume { token, cursor: self.cursor }).await? {
            ServerBody::Session { .. } => {}
            ServerBody::Error { code: ErrorCode::Unavailable, .. } => return Box::pin(self.reconnect()).await,
            other => bail!("resume answered {other:?}"),
        }
        self.shared.probe_resumed(self.spec.index, Instant::now());
        for p in &self.pending {
            send(&mut ws, &self.spec.to, p).await?;
        }
        Ok((ws, node))
    }

    /// Connect to the primary: the hint first, then the endpoints in turn, with a short backoff.
    async fn connect(&mut self) -> anyhow::Result<(Ws, u64)> {
        let deadline = Instant::now() + RECONNECT_FOR;
        let mut attempt = 0u32;
        loop {
            let url = self.hint.take().unwrap_or_else(|| {
                let url = self.endpoints[self.next_endpoint % self.endpoints.len()].clone();
                self.next_endpoint += 1;
                url
            });
            if let Ok(Ok((mut ws, _))) = tokio::time::timeout(Duration::from_secs(2), connect(url.as_str())).await {
                match tokio::time::timeout(Duration::from_secs(2), read_frame(&mut ws)).await {
                    Ok(Ok(Some(ServerFrame { body: ServerBody::Welcome { node, term, .. }, .. })))
                        if term >= self.term =>
                    {
                        self.term = term;
                        return Ok((ws, node));
                    }
                    Ok(Ok(Some(ServerFrame { body: ServerBody::NotLeader { leader_url, term, .. }, .. })))
                        if term >= self.term =>
                    {
                        self.term = term;
                        self.hint = leader_url.map(|u| format!("{}/ws", u.replacen("http", "ws", 1)));
                        if self.hint.as_ref().is_some_and(|hint| *hint != url) {
                            // Told where the primary is: go there now, no backoff.
                            continue;
                        }
                    }
                    _ => {}
                }
            }
            attempt += 1;
            if Instant::now() > deadline {
                bail!("no primary reachable within {RECONNECT_FOR:?} ({attempt} attempts)");
            }
            // Backoff between attempts: 5 ms doubling to 80 ms, with jitter (a retry pace, not a wait
            // for an event: there is nothing to wait on while no replica is primary).
            let base = 5u64 << attempt.min(4);
            tokio::time::sleep(Duration::from_millis(base + rand::random::<u64>() % base)).await;
        }
    }

    /// One connected stretch: send per `pace`, handle replies and events, until the socket ends or the
    /// run finishes.
    async fn exchange(
        &mut self,
        mut ws: Ws,
        node: u64,
        pace: Pace,
        phase: &mut watch::Receiver<Phase>,
    ) -> anyhow::Result<Ended> {
        let mut ticker = match pace {
            Pace::Every(interval) => {
                // Spread the users' ticks over one interval.
                let offset = interval.mul_f64(rand::random::<f64>());
                let mut t = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                Some(t)
            }
            Pace::Window(_) => None,
        };
        loop {
            let now_phase = *phase.borrow_and_update();
            if now_phase == Phase::Finish {
                // Wait for the server's close frame: by then it has recorded when this user was last seen (an
                // entry of its own), so the replicas the run compares next are at rest.
                if ws.close(None).await.is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Some(Ok(message)) = ws.next().await {
                            if message.is_close() {
                                break;
                            }
                        }
                    })
                    .await;
                }
                return Ok(Ended::Finished);
            }
            if let (Pace::Window(w), Phase::Run) = (pace, now_phase) {
                while self.pending.len() < w && self.send_new(&mut ws).await? {}
            }
            tokio::select! {
                frame = read_frame(&mut ws) => match frame {
                    Ok(Some(frame)) => {
                        if let Some(ended) = self.handle(frame, node)? {
                            return Ok(ended);
                        }
                    }
                    Ok(None) => return Ok(Ended::Disconnected("closed".into())),
                    Err(e) => return Ok(Ended::Disconnected(format!("{e:#}"))),
                },
                _ = async { ticker.as_mut().expect("ticker").tick().await }, if ticker.is_some() => {
                    if now_phase == Phase::Run {
                        if self.pending.len() < MAX_BACKLOG {
                            self.send_new(&mut ws).await?;
                        } else {
                            self.shared.skipped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                _ = phase.changed() => {}
            }
        }
    }

    /// Create and send the next message; false (nothing sent) once the run stopped creating messages.
    async fn send_new(&mut self, ws: &mut Ws) -> anyhow::Result<bool> {
        {
            let sending = self.shared.sending.lock().expect("not poisoned");
            if !*sending {
                return Ok(false);
            }
            self.shared.created.fetch_add(1, Ordering::SeqCst);
        }
        self.next_seq += 1;
        let seq = self.next_seq;
        let now = Instant::now();
        let text = format!("{}:{}:{} {PADDING}", self.spec.index, seq, self.shared.nanos(now));
        let client_id = format!("{}-{}-{}", self.spec.run_id, self.spec.index, seq);
        let p = Pending { seq, client_id, text, first_sent: now };
        // A failed write surfaces as a read error next; the message stays pending and is re-sent.
        let _ = send(ws, &self.spec.to, &p).await;
        self.pending.push_back(p);
        Ok(true)
    }

    fn handle(&mut self, frame: ServerFrame, node: u64) -> anyhow::Result<Option<Ended>> {
        let now = Instant::now();
        match frame.body {
            ServerBody::Sent { id, client_id, .. } => {
                let Some(pos) = self.pending.iter().position(|p| p.client_id == client_id) else {
                    // A second `sent` for a message re-sent after a reconnect: already counted.
                    return Ok(None);
                };
                let p = self.pending.remove(pos).expect("position is in range");
                if self.shared.in_window(now) {
                    let _ = self.record.ack_latency.record(micros(now - p.first_sent));
                }
                self.shared.acked.fetch_add(1, Ordering::Relaxed);
                self.shared.probe_ack(now, node);
                let at_ms = now.saturating_duration_since(self.shared.base).as_millis() as u32;
                self.record.acks.push(Ack { seq: p.seq, client_id, id, at_ms });
            }
            ServerBody::Message { index, message } => {
                self.cursor = self.cursor.max(index);
                if message.to.eq_ignore_ascii_case(&self.spec.name) {
                    let (from, seq, t) =
                        parse_text(&message.text).ok_or_else(|| anyhow!("foreign text {:?}", message.text))?;
                    self.record.deliveries.push(Delivery { from, seq, id: message.id });
                    if self.seen.insert((from, seq)) {
                        self.shared.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    if self.shared.in_window(now) {
                        let sent = self.shared.base + Duration::from_nanos(t);
                        let _ = self.record.deliver_latency.record(micros(now.saturating_duration_since(sent)));
                    }
                }
            }
            ServerBody::Receipt { index, .. } | ServerBody::PeerDeleted { index, .. } => {
                self.cursor = self.cursor.max(index);
            }
            ServerBody::NotLeader { leader_url, term, .. } => {
                if term >= self.term {
                    self.term = term;
                    self.hint = leader_url.map(|u| format!("{}/ws", u.replacen("http", "ws", 1)));
                }
                return Ok(Some(Ended::Disconnected("not the primary any more".into())));
            }
            ServerBody::Error { code: ErrorCode::Unavailable, .. } => {
                // The primary lost its majority mid-request: the write may or may not commit; re-send it
                // (same client id) from wherever the primary is now.
                return Ok(Some(Ended::Disconnected("unavailable".into())));
            }
            ServerBody::Error { code, message, .. } => bail!("{}: error {code:?}: {message}", self.spec.name),
            _ => {}
        }
        Ok(None)
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// `from:seq:nanos rest` -> (from, seq, nanos).
fn parse_text(text: &str) -> Option<(usize, u64, u64)> {
    let head = text.split(' ').next()?;
    let mut parts = head.split(':');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

async fn send(ws: &mut Ws, to: &str, p: &Pending) -> anyhow::Result<()> {
    let frame = ClientFrame {
        req: None,
        request: Request::Send { to: to.to_owned(), text: p.text.clone(), client_id: p.client_id.clone() },
    };
    ws.send(WsMessage::Text(serde_json::to_string(&frame)?.into())).await?;
    Ok(())
}

/// Open a WebSocket with Nagle's algorithm off, as a browser does: small frames leave at once.
async fn connect(
    url: &str,
) -> Result<(Ws, tokio_tungstenite::tungstenite::handshake::client::Response), tokio_tungstenite::tungstenite::Error> {
    // Over wss:// (the simulated multi-machine runs) with the run's CA; plain ws:// otherwise.
    let authority = url.split("://").nth(1).and_then(|rest| rest.split('/').next()).unwrap_or_default();
    let connector = crate::tls::client_for(authority).map(tokio_tungstenite::Connector::Rustls);
    tokio_tungstenite::connect_async_tls_with_config(url, None, true, connector).await
}

/// The next server frame; `None` when the socket closed.
async fn read_frame(ws: &mut Ws) -> anyhow::Result<Option<ServerFrame>> {
    loop {
        match ws.next().await {
            None | Some(Ok(WsMessage::Close(_))) => return Ok(None),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(WsMessage::Text(text))) => return Ok(Some(serde_json::from_str(text.as_str())?)),
            Some(Ok(_)) => {}
        }
    }
}

/// Send `request` and wait (10 s at most) for the reply; events that arrive first are impossible here
/// (no session yet, or a resume whose events follow its reply).
pub async fn request_reply(ws: &mut Ws, request: Request) -> anyhow::Result<ServerBody> {
    let frame = ClientFrame { req: Some("r".into()), request };
    ws.send(WsMessage::Text(serde_json::to_string(&frame)?.into())).await?;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), read_frame(ws))
            .await
            .context("no reply within 30 s")??
            .context("socket closed before the reply")?;
        if frame.req.as_deref() == Some("r") {
            return Ok(frame.body);
        }
    }
}

/// Connect to one URL and read its first frame (for the idle-connection count).
pub async fn connect_raw(url: &str) -> anyhow::Result<(Ws, ServerBody)> {
    let (mut ws, _) = connect(url).await?;
    let first = read_frame(&mut ws).await?.context("closed before the first frame")?;
    Ok((ws, first.body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip() {
        assert_eq!(parse_text("3:17:123456 the quick"), Some((3, 17, 123456)));
        assert_eq!(parse_text("hello"), None);
    }
}
