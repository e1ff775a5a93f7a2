//! The accepting side of `/internal/replicate`: the listener's half of the peer handshake ([`peer_auth`]),
//! then each request frame from the authenticated peer (`append`, `snapshot_chunk`, `vote`) through the
//! replication core, in order, on the same socket.
//!
//! The upgrade is done by hand (hyper's upgrade, then tokio-tungstenite) rather than with axum's
//! `WebSocketUpgrade`, because the frame limit must change half-way: 1 KiB while the dialler is unproven, the
//! peers' 512 MiB only after it proved the cluster secret.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use replichat_shared::{PeerFrame, PeerHandshake};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::peer_auth::{self, PeerKey, Side, Transcript};
use crate::repeat_log::RepeatLog;
use crate::replication::Replication;
use crate::AppState;

/// Largest replication frame accepted from an authenticated peer: a batch of entries, or a snapshot chunk
/// (about 256 KiB of rows). Far above both; it was sized when a snapshot travelled as one frame.
const MAX_PEER_FRAME: usize = 512 << 20;
/// Largest frame accepted before the dialler proved itself (a handshake frame is ~200 bytes).
const MAX_HANDSHAKE_FRAME: usize = 1024;
/// How long a dialler has for each of its two handshake frames.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

type PeerSocket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Why a connection is closed: the close code and the reason sent with it (and logged).
type Refusal = (CloseCode, std::borrow::Cow<'static, str>);

/// A refused handshake: the refusal, and whether it was logged already where it was decided (with what the
/// operator needs to know), so that it is not logged a second time as a generic refusal.
struct Refused {
    refusal: Refusal,
    logged: bool,
}

impl From<Refusal> for Refused {
    fn from(refusal: Refusal) -> Self {
        Refused { refusal, logged: false }
    }
}

/// The refusals logged so far: a dialler decides how often it is refused, so each kind is logged once per
/// [`crate::repeat_log::INTERVAL`] at most, with the count of those in between.
static REFUSALS: std::sync::LazyLock<RepeatLog> = std::sync::LazyLock::new(RepeatLog::default);

/// `GET /internal/replicate`: upgrade, then authenticate the dialler by the handshake before answering
/// anything. A replica without a cluster secret refuses every peer with HTTP 401.
pub async fn upgrade(State(state): State<AppState>, mut request: Request) -> Response {
    let Some(secret) = state.cluster_secret.as_deref().filter(|s| !s.is_empty()) else {
        if let Some(held) = REFUSALS.admit("no cluster secret", Instant::now()) {
            tracing::warn!(
                not_logged_since = held,
                "refused an internal connection: this replica has no cluster secret"
            );
        }
        return (StatusCode::UNAUTHORIZED, "this replica has no cluster secret").into_response();
    };
    let headers = request.headers();
    let websocket = headers.get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let Some(client_key) = headers.get(header::SEC_WEBSOCKET_KEY).filter(|_| websocket) else {
        return (StatusCode::BAD_REQUEST, "expected a WebSocket upgrade").into_response();
    };
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(client_key.as_bytes());
    let upgraded = hyper::upgrade::on(&mut request);
    let key = PeerKey::derive(secret);
    let token = state.tracker.token();
    let replication = state.chat.replication().clone();
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        if let Ok(upgraded) = upgraded.await {
            let handshake = WebSocketConfig::default()
                .max_message_size(Some(MAX_HANDSHAKE_FRAME))
                .max_frame_size(Some(MAX_HANDSHAKE_FRAME));
            let socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(handshake)).await;
            tokio::select! {
                _ = run(socket, key, replication) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        drop(token);
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept)
        .body(Body::empty())
        .expect("a valid response")
}

async fn run(mut socket: PeerSocket, key: PeerKey, replication: Replication) {
    let peer = match authenticate(&mut socket, &key, &replication).await {
        Ok(peer) => peer,
        Err(Refused { refusal, logged }) => {
            if !logged {
                if let Some(held) = REFUSALS.admit(&refusal.1, Instant::now()) {
                    tracing::warn!(
                        reason = %refusal.1,
                        not_logged_since = held,
                        "refused an internal connection: the peer did not authenticate"
                    );
                }
            }
            return refuse(socket, refusal).await;
        }
    };
    tracing::info!(peer, "peer authenticated");
    // The dialler sends nothing between its proof and `accepted`, so nothing is buffered in the handshake's
    // socket: its stream can be taken over with the authenticated peer's frame limit.
    let authenticated =
        WebSocketConfig::default().max_message_size(Some(MAX_PEER_FRAME)).max_frame_size(Some(MAX_PEER_FRAME));
    let mut socket = WebSocketStream::from_raw_socket(socket.into_inner(), Role::Server, Some(authenticated)).await;
    if let Err(refusal) = serve(&mut socket, peer, &replication).await {
        tracing::warn!(peer, reason = %refusal.1, "dropped a peer connection");
        refuse(socket, refusal).await;
    }
}

async fn refuse(mut socket: PeerSocket, (code, reason): Refusal) {
    let _ = socket.close(Some(CloseFrame { code, reason: reason.into_owned().into() })).await;
}

async fn send(socket: &mut PeerSocket, frame: &impl serde::Serialize) -> Result<(), Refusal> {
    let text = serde_json::to_string(frame).expect("frames serialise");
    socket.send(Message::Text(text.into())).await.map_err(|_| (CloseCode::Policy, "closed during the handshake".into()))
}

/// The next handshake frame, within [`HANDSHAKE_TIMEOUT`].
async fn next_handshake(socket: &mut PeerSocket) -> Result<PeerHandshake, Refusal> {
    let closed = (CloseCode::Policy, "closed during the handshake".into());
    let message = match tokio::time::timeout(HANDSHAKE_TIMEOUT, socket.next()).await {
        Err(_) => return Err((CloseCode::Policy, "handshake timed out".into())),
        Ok(None) => return Err(closed),
        Ok(Some(Err(WsError::Capacity(_)))) => return Err((CloseCode::Size, "handshake frame too big".into())),
        Ok(Some(Err(_))) => return Err(closed),
        Ok(Some(Ok(message))) => message,
    };
    let Message::Text(text) = message else { return Err((CloseCode::Policy, "expected a handshake frame".into())) };
    serde_json::from_str(text.as_str()).map_err(|_| (CloseCode::Policy, "expected a handshake frame".into()))
}

/// The listener's half of the handshake: returns the id the dialler proved to be.
async fn authenticate(socket: &mut PeerSocket, key: &PeerKey, replication: &Replication) -> Result<u64, Refused> {
    let refused = |reason: &'static str| Refused::from((CloseCode::Policy, reason.into()));
    let PeerHandshake::Hello { from, to, nonce, format } = next_handshake(socket).await? else {
        return Err(refused("expected hello"));
    };
    if to != replication.id {
        return Err(refused("hello addressed to another replica"));
    }
    if from == replication.id || !replication.peers.contains_key(&from) {
        return Err(refused("hello from an id that is not another replica of this cluster"));
    }
    let dialler_nonce = peer_auth::parse_nonce(&nonce).ok_or(refused("bad nonce"))?;
    let ours = peer_auth::own_format();
    if format != ours {
        if let Some(held) = REFUSALS.admit("another replication format", Instant::now()) {
            tracing::warn!(
                peer = from,
                reason = %peer_auth::format_mismatch(ours, format),
                not_logged_since = held,
                "refused a peer: a group runs one replication format (upgrade or roll back every replica; until \
                 then the peer is kept out)"
            );
        }
        // Our format goes back to the dialler, whose log and status then say which formats met.
        return Err(Refused { refusal: (CloseCode::Policy, peer_auth::format_refusal(ours).into()), logged: true });
    }
    let transcript =
        Transcript { dialler: from, listener: to, dialler_nonce, listener_nonce: peer_auth::nonce(), format: ours };
    let challenge = PeerHandshake::Challenge {
        from: to,
        nonce: hex::encode(transcript.listener_nonce),
        proof: key.proof(Side::Listener, &transcript),
        format: ours,
    };
    send(socket, &challenge).await?;
    let PeerHandshake::Proof { proof } = next_handshake(socket).await? else { return Err(refused("expected proof")) };
    if !key.verify(Side::Dialler, &transcript, &proof) {
        return Err(refused("wrong proof: the dialler does not know the cluster secret"));
    }
    send(socket, &PeerHandshake::Accepted).await?;
    Ok(from)
}

/// Answer `peer`'s requests until it goes away (`Ok`), or until it sends a frame in another replica's name
/// (`Err`: the connection is dropped).
async fn serve(socket: &mut PeerSocket, peer: u64, replication: &Replication) -> Result<(), Refusal> {
    while let Some(Ok(message)) = socket.next().await {
        let Message::Text(text) = message else { continue };
        let frame = match serde_json::from_str::<PeerFrame>(text.as_str()) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!(peer, error = %e, "bad frame from a peer");
                continue;
            }
        };
        let sender = match &frame {
            PeerFrame::Append { leader, .. } | PeerFrame::SnapshotChunk { leader, .. } => *leader,
            PeerFrame::Vote { candidate, .. } => *candidate,
            PeerFrame::Appended { from, .. } | PeerFrame::Voted { from, .. } | PeerFrame::SnapshotAck { from, .. } => {
                *from
            }
        };
        if sender != peer {
            return Err((CloseCode::Policy, "a frame in another replica's name".into()));
        }
        let Some(answer) = replication.request(frame).await else { return Ok(()) };
        let text = serde_json::to_string(&answer).expect("frames serialise");
        if socket.send(Message::Text(text.into())).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}
