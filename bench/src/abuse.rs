//! Abusive clients against one replica: resumers that never read (replica memory), a connection flood and
//! slowloris request heads from one address. Meanwhile a normal client on another address sends messages
//! and polls `/healthz`, and every probe that fails or takes over 2 s is counted.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use replichat_shared::{ClientFrame, Request, ServerBody, ServerFrame};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use crate::procs::{Cluster, Setup};

/// The abusers' address; the normal client and `/healthz` polls come from [`PROBE_FROM`].
const ABUSER: [u8; 4] = [127, 0, 0, 1];
const PROBE_FROM: [u8; 4] = [127, 0, 0, 2];
/// A probe slower than this counts as failed.
const PROBE_LIMIT: Duration = Duration::from_secs(2);

/// What to throw at the replica.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Stored events the resumers ask for (messages to one account).
    pub history: usize,
    /// Characters per message.
    pub text_chars: usize,
    /// Sockets that `resume` from cursor 0 and never read.
    pub resumers: usize,
    /// How long they are held.
    pub hold: Duration,
    /// Idle TCP connections opened at once from one address.
    pub flood: usize,
    /// Connections sending one header line per `slow_every`.
    pub slowloris: usize,
    pub slow_every: Duration,
}

#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Report {
    pub history: usize,
    pub text_chars: usize,
    pub resumers: usize,
    /// Replica RSS with the history stored, before the resumers.
    pub rss_idle_mb: f64,
    /// Highest RSS sampled (every 50 ms) while the resumers were held.
    pub rss_peak_mb: f64,
    pub peak_above_idle_mb: f64,
    /// RSS once they were closed.
    pub rss_after_mb: f64,
    /// Resumers whose connection the replica ended during the hold.
    pub resumers_dropped: usize,
    pub flood: usize,
    /// Flood connections answered `429` (over the per-address cap).
    pub flood_refused: usize,
    /// Flood connections the replica closed (request-head deadline) after being accepted.
    pub flood_closed: usize,
    /// Flood connections still open when the phase ended.
    pub flood_open: usize,
    pub slowloris: usize,
    /// Slowloris connections the replica cut off.
    pub slowloris_cut: usize,
    /// Longest a slowloris connection stayed open, seconds.
    pub slowloris_max_s: f64,
    /// Normal-client probes (a `send` answered and `/healthz` 200, each within 2 s) during the abuse.
    pub probes_ok: u64,
    pub probes_failed: u64,
    pub probe_max_ms: f64,
}

pub async fn run(setup: Setup, plan: &Plan) -> anyhow::Result<Report> {
    let cluster = Cluster::start(setup).await?;
    let result = measure(&cluster, plan).await;
    cluster.finish(result.is_err()).await;
    result
}

async fn measure(cluster: &Cluster, plan: &Plan) -> anyhow::Result<Report> {
    let node = cluster.node(0);
    let addr: SocketAddr = node.addr.parse()?;
    let url = node.ws_url();
    let mb = |bytes: u64| bytes as f64 / 1e6;

    // The history: `sender` sends `history` messages to `victim`, pipelined.
    let (mut sender, _) = connect_from(PROBE_FROM, addr, &url).await?;
    register(&mut sender, "sender").await?;
    let (mut victim, _) = connect_from(PROBE_FROM, addr, &url).await?;
    let victim_token = register(&mut victim, "victim").await?;
    drop(victim);
    let text = "x".repeat(plan.text_chars);
    let mut next = 0;
    let mut acked = 0;
    while acked < plan.history {
        while next < plan.history && next - acked < 200 {
            let request = Request::Send { to: "victim".into(), text: text.clone(), client_id: format!("h{next}") };
            send(&mut sender, Some(format!("h{next}")), request).await?;
            next += 1;
        }
        let frame = read(&mut sender).await?;
        if let ServerBody::Sent { .. } = frame.body {
            acked += 1;
        } else if frame.req.is_some() {
            bail!("send answered {:?}", frame.body);
        }
    }

    // The probe: a normal client on another address sends and polls /healthz until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(ProbeStats::default());
    let probe = tokio::spawn(probe(addr, url.clone(), sender, Arc::clone(&stop), Arc::clone(&stats)));

    // 1. Resumers that never read.
    let idle = cluster.usage(0);
    let mut resumers = Vec::new();
    for _ in 0..plan.resumers {
        let (mut ws, _) = connect_from(ABUSER, addr, &url).await?;
        send(&mut ws, Some("r".into()), Request::Resume { token: victim_token.clone(), cursor: 0 }).await?;
        resumers.push(ws);
    }
    let mut peak = idle.rss;
    let until = Instant::now() + plan.hold;
    while Instant::now() < until {
        peak = peak.max(cluster.usage(0).rss);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A socket the replica ended reads to its end quickly; one still open has more to read or blocks.
    let mut dropped = 0;
    for mut ws in resumers {
        let ended = tokio::time::timeout(Duration::from_secs(5), async { while let Some(Ok(_)) = ws.next().await {} })
            .await
            .is_ok();
        dropped += usize::from(ended);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = cluster.usage(0);

    stats.phase.store(1, Ordering::Relaxed);
    // 2. A connection flood from one address: idle TCP connections, never a byte sent.
    let mut flood = Vec::new();
    for _ in 0..plan.flood {
        match tcp_from(ABUSER, addr).await {
            Ok(tcp) => flood.push(tcp),
            Err(e) => eprintln!("abuse: flood connect failed: {e}"),
        }
    }
    let mut refused = 0;
    let mut closed = 0;
    let mut open = 0;
    let waits: Vec<_> = flood
        .into_iter()
        .map(|mut tcp| {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                let mut got = Vec::new();
                let ended = tokio::time::timeout(Duration::from_secs(15), async {
                    loop {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                })
                .await
                .is_ok();
                (ended, got.starts_with(b"HTTP/1.1 429"))
            })
        })
        .collect();
    for wait in waits {
        match wait.await? {
            (_, true) => refused += 1,
            (true, false) => closed += 1,
            (false, false) => open += 1,
        }
    }

    stats.phase.store(2, Ordering::Relaxed);
    // 3. Slowloris: a request head that never ends, one header line at a time.
    let started = Instant::now();
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..plan.slowloris {
        let every = plan.slow_every;
        slow.spawn(async move {
            let Ok(mut tcp) = tcp_from(ABUSER, addr).await else { return (false, 0.0) };
            let opened = Instant::now();
            if tcp.write_all(b"GET /ws HTTP/1.1\r\nhost: replichat\r\n").await.is_err() {
                return (true, 0.0);
            }
            let mut buf = [0u8; 1024];
            while opened.elapsed() < Duration::from_secs(60) {
                if tcp.write_all(b"x-slow: 1\r\n").await.is_err() {
                    return (true, opened.elapsed().as_secs_f64());
                }
                if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(every, tcp.read(&mut buf)).await {
                    return (true, opened.elapsed().as_secs_f64());
                }
            }
            (false, opened.elapsed().as_secs_f64())
        });
    }
    let (mut cut, mut longest) = (0, 0f64);
    while let Some(done) = slow.join_next().await {
        let (was_cut, lived) = done?;
        cut += usize::from(was_cut);
        longest = longest.max(lived);
    }
    eprintln!("abuse: slowloris phase took {:.1} s", started.elapsed().as_secs_f64());

    stop.store(true, Ordering::Relaxed);
    probe.await?;
    Ok(Report {
        history: plan.history,
        text_chars: plan.text_chars,
        resumers: plan.resumers,
        rss_idle_mb: mb(idle.rss),
        rss_peak_mb: mb(peak),
        peak_above_idle_mb: mb(peak.saturating_sub(idle.rss)),
        rss_after_mb: mb(after.rss),
        resumers_dropped: dropped,
        flood: plan.flood,
        flood_refused: refused,
        flood_closed: closed,
        flood_open: open,
        slowloris: plan.slowloris,
        slowloris_cut: cut,
        slowloris_max_s: longest,
        probes_ok: stats.ok.load(Ordering::Relaxed),
        probes_failed: stats.failed.load(Ordering::Relaxed),
        probe_max_ms: stats.max_us.load(Ordering::Relaxed) as f64 / 1e3,
    })
}

#[derive(Default)]
struct ProbeStats {
    ok: AtomicU64,
    failed: AtomicU64,
    max_us: AtomicU64,
    /// Which abuse is under way (an index into [`PHASES`]), for the failure messages.
    phase: AtomicU64,
}

const PHASES: [&str; 3] = ["non-reading resumers", "connection flood", "slowloris"];

impl ProbeStats {
    fn phase(&self) -> &'static str {
        PHASES[self.phase.load(Ordering::Relaxed) as usize % PHASES.len()]
    }
}

/// Every 100 ms: a `send` on the normal client's socket and a `GET /healthz`, each within [`PROBE_LIMIT`].
async fn probe(addr: SocketAddr, url: String, mut ws: Ws, stop: Arc<AtomicBool>, stats: Arc<ProbeStats>) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let started = Instant::now();
        let req = format!("p{n}");
        let attempt = tokio::time::timeout(PROBE_LIMIT, async {
            let request = Request::Send { to: "victim".into(), text: "probe".into(), client_id: req.clone() };
            send(&mut ws, Some(req.clone()), request).await?;
            loop {
                let frame = read(&mut ws).await?;
                if frame.req.as_deref() == Some(req.as_str()) {
                    anyhow::ensure!(matches!(frame.body, ServerBody::Sent { .. }), "send: {:?}", frame.body);
                    break;
                }
            }
            let status = healthz(addr).await?;
            anyhow::ensure!(status == 200, "/healthz answered {status}");
            anyhow::Ok(())
        })
        .await;
        match attempt {
            Ok(Ok(())) => {
                stats.ok.fetch_add(1, Ordering::Relaxed);
                stats.max_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                eprintln!("abuse: probe failed during the {}: {e:#}", stats.phase());
                stats.failed.fetch_add(1, Ordering::Relaxed);
                if let Ok((fresh, _)) = connect_from(PROBE_FROM, addr, &url).await {
                    ws = fresh;
                    let _ = register(&mut ws, &format!("probe{n}")).await;
                }
            }
            Err(_) => {
                eprintln!("abuse: probe took over {PROBE_LIMIT:?} during the {}", stats.phase());
                stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

type Ws = WebSocketStream<TcpStream>;

async fn tcp_from(from: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::from(from), 0))?;
    socket.connect(addr).await
}

async fn connect_from(from: [u8; 4], addr: SocketAddr, url: &str) -> anyhow::Result<(Ws, ServerBody)> {
    let tcp = tcp_from(from, addr).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(url, tcp).await.context("websocket handshake")?;
    let first = read(&mut ws).await?;
    Ok((ws, first.body))
}

async fn send(ws: &mut Ws, req: Option<String>, request: Request) -> anyhow::Result<()> {
    ws.send(WsMessage::Text(serde_json::to_string(&ClientFrame { req, request })?.into())).await?;
    Ok(())
}

async fn read(ws: &mut Ws) -> anyhow::Result<ServerFrame> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await.context("no frame within 30 s")? {
            Some(Ok(WsMessage::Text(text))) => return Ok(serde_json::from_str(text.as_str())?),
            Some(Ok(WsMessage::Close(_))) | None => bail!("socket closed"),
            Some(Err(e)) => return Err(e.into()),
            Some(Ok(_)) => {}
        }
    }
}

/// Register `name` (password `bench-password`) and return the token.
async fn register(ws: &mut Ws, name: &str) -> anyhow::Result<String> {
    send(ws, Some("reg".into()), Request::Register { username: name.into(), password: "bench-password".into() })
        .await?;
    loop {
        let frame = read(ws).await?;
        if frame.req.as_deref() == Some("reg") {
            match frame.body {
                ServerBody::Session { token: Some(token), .. } => return Ok(token),
                other => bail!("register {name}: {other:?}"),
            }
        }
    }
}

/// `GET /healthz` from the probe's address: the status code.
async fn healthz(addr: SocketAddr) -> anyhow::Result<u16> {
    let mut tcp = tcp_from(PROBE_FROM, addr).await?;
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: replichat\r\nconnection: close\r\n\r\n").await?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await?;
    let head = String::from_utf8_lossy(&response[..response.len().min(32)]).into_owned();
    head.split(' ').nth(1).and_then(|s| s.parse().ok()).context("no status line")
}
