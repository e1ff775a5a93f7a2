//! Accepting connections: a cap on the connections one client address may hold, HTTP/1 with a deadline for
//! the request head, back-off when `accept` fails (out of descriptors), and graceful shutdown. Each request
//! reaches the router with its client's address ([`ConnectInfo`]).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// First pause after a failed `accept`; it doubles with each further failure, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// Longest pause after a failed `accept`.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How long a refused connection may take to receive its `429` before it is dropped.
const REFUSE_GRACE: Duration = Duration::from_secs(1);
/// How long a TLS handshake may take when there is no header timeout.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

/// The limits the listener enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most open connections per client address; 0 for no cap.
    pub per_address: usize,
    /// Deadline for a complete request head; `None` for none.
    pub header_timeout: Option<Duration>,
    /// Serve TLS only (`--tls-cert`): the TLS handshake must finish within the header timeout (10 s when
    /// there is none), and everything else runs inside it.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

/// Accept on `listener` and serve `app` until `shutdown`; then finish the requests in flight (upgraded
/// sockets are not waited for here: they watch `shutdown` themselves).
pub async fn serve(listener: TcpListener, app: Router, limits: Limits, shutdown: CancellationToken) {
    let counts = Counts::default();
    let connections = TaskTracker::new();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, client) = match accepted {
            Ok(accepted) => {
                backoff = FIRST_BACKOFF;
                accepted
            }
            // The client gave up before we accepted: nothing to do.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Typically EMFILE: out of descriptors. Retrying at once would spin a core; pause, so that
                // the connections being served can finish and give theirs back.
                tracing::error!(error = %e, pause_ms = backoff.as_millis() as u64, "accept error; backing off");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        // Small frames (acks, heartbeats, chat messages) should leave at once, not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        match counts.open(client.ip(), limits.per_address) {
            Some(slot) => {
                let io = Counted { tcp, _slot: slot };
                let (app, header_timeout, shutdown) = (app.clone(), limits.header_timeout, shutdown.clone());
                match &limits.tls {
                    None => connections.spawn(connection(io, client, app, header_timeout, shutdown)),
                    Some(tls) => {
                        let acceptor = tokio_rustls::TlsAcceptor::from(tls.clone());
                        connections.spawn(async move {
                            let deadline = header_timeout.unwrap_or(TLS_HANDSHAKE);
                            match tokio::time::timeout(deadline, acceptor.accept(io)).await {
                                Ok(Ok(tls)) => connection(tls, client, app, header_timeout, shutdown).await,
                                Ok(Err(e)) => tracing::debug!(%client, error = %e, "TLS handshake failed"),
                                Err(_) => tracing::debug!(%client, "TLS handshake timed out"),
                            }
                        })
                    }
                };
            }
            // Over TLS a plain-text 429 would not be understood: just close.
            None if limits.tls.is_some() => drop(tcp),
            None => {
                connections.spawn(refuse(tcp, limits.per_address));
            }
        }
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serve HTTP/1 (with upgrades) on one connection until it ends, or until `shutdown` and its request in
/// flight is answered.
async fn connection<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: I,
    client: SocketAddr,
    app: Router,
    header_timeout: Option<Duration>,
    shutdown: CancellationToken,
) {
    let service = app.map_request(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(client));
        request
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Without a timer hyper applies no header deadline at all (a client could send a header line every
    // few seconds forever).
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let conn = builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(service)).with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%client, error = %e, "connection ended with an error");
    }
}

/// Answer a connection over its address's cap with `429` and close it.
async fn refuse(mut tcp: TcpStream, cap: usize) {
    let body = format!("too many connections from your address (at most {cap} at a time); close some and retry\n");
    let response = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\
         retry-after: 10\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSE_GRACE, async {
        // Take in what the client sent first (its request), or closing with unread data would reset the
        // connection and the client might never see the answer.
        let mut request = [0u8; 4096];
        let _ = tokio::time::timeout(REFUSE_GRACE / 4, tcp.read(&mut request)).await;
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await
    })
    .await;
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Open connections per client address. A std mutex: never held across an `.await`.
#[derive(Debug, Default, Clone)]
struct Counts(Arc<Mutex<HashMap<IpAddr, usize>>>);

impl Counts {
    /// Count one more connection from `ip`, unless it already holds `cap` (0: no cap).
    fn open(&self, ip: IpAddr, cap: usize) -> Option<Slot> {
        let mut counts = self.0.lock().expect("connection counts lock");
        let open = counts.entry(ip).or_default();
        if cap != 0 && *open >= cap {
            return None;
        }
        *open += 1;
        if *open == cap {
            tracing::warn!(%ip, cap, "an address reached its connection cap; refusing its further connections");
        }
        Some(Slot { counts: self.clone(), ip })
    }
}

/// One counted connection; dropping it gives the slot back.
#[derive(Debug)]
struct Slot {
    counts: Counts,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().expect("connection counts lock");
        if let Some(open) = counts.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// A TCP stream that holds its address's slot for as long as it lives: through an upgrade, until the
/// WebSocket is dropped.
struct Counted {
    tcp: TcpStream,
    _slot: Slot,
}

impl AsyncRead for Counted {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_per_address_and_come_back() {
        let counts = Counts::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = counts.open(a, 2).unwrap();
        let _second = counts.open(a, 2).unwrap();
        assert!(counts.open(a, 2).is_none(), "a third from the same address is refused");
        assert!(counts.open(b, 2).is_some(), "another address is not affected");
        drop(first);
        assert!(counts.open(a, 2).is_some(), "a closed connection gives its slot back");
        let unlimited: Vec<_> = (0..10).map(|_| counts.open(b, 0).unwrap()).collect();
        drop(unlimited);
    }
}
