//! The accepting side of `/internal/replicate`: the listener's half of the peer handshake ([`peer_auth`]),
//! then each request frame from the authenticated peer (`append`, `snapshot`, `vote`) through the
//! replication core, in order, on the same socket.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use replichat_shared::{PeerFrame, PeerHandshake};

use crate::peer_auth::{self, PeerKey, Side, Transcript};
use crate::replication::Replication;
use crate::AppState;

/// Largest replication frame accepted: a batch of entries, or a whole snapshot, which travels as one frame
/// (see BENCHMARKS.md, catch-up, for the size of a 100,000-message snapshot).
const MAX_PEER_FRAME: usize = 512 << 20;
/// Largest frame accepted before the dialler proved itself (a handshake frame is ~200 bytes).
const MAX_HANDSHAKE_FRAME: usize = 1024;
/// How long a dialler has for each of its two handshake frames.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Close code for a connection that failed the handshake or named another sender (RFC 6455 "policy
/// violation").
const CLOSE_REFUSED: u16 = 1008;

/// `GET /internal/replicate`: upgrade, then authenticate the dialler by the handshake before answering
/// anything. A replica without a cluster secret refuses every peer with HTTP 401.
pub async fn upgrade(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    let Some(secret) = state.cluster_secret.as_deref().filter(|s| !s.is_empty()) else {
        tracing::warn!("refused an internal connection: this replica has no cluster secret");
        return (StatusCode::UNAUTHORIZED, "this replica has no cluster secret").into_response();
    };
    let key = PeerKey::derive(secret);
    let token = state.tracker.token();
    let replication = state.chat.replication().clone();
    let shutdown = state.shutdown.clone();
    ws.max_message_size(MAX_PEER_FRAME).max_frame_size(MAX_PEER_FRAME).on_upgrade(move |socket| async move {
        tokio::select! {
            _ = run(socket, key, replication) => {}
            _ = shutdown.cancelled() => {}
        }
        drop(token);
    })
}

async fn run(mut socket: WebSocket, key: PeerKey, replication: Replication) {
    match authenticate(&mut socket, &key, &replication).await {
        Ok(peer) => {
            tracing::info!(peer, "peer authenticated");
            if let Err(reason) = serve(&mut socket, peer, &replication).await {
                tracing::warn!(peer, reason, "dropped a peer connection");
                refuse(socket, reason).await;
            }
        }
        Err(reason) => {
            tracing::warn!(reason, "refused an internal connection: the peer did not authenticate");
            refuse(socket, reason).await;
        }
    }
}

async fn refuse(mut socket: WebSocket, reason: &'static str) {
    let close = CloseFrame { code: CLOSE_REFUSED, reason: reason.into() };
    let _ = socket.send(Message::Close(Some(close))).await;
}

/// The next handshake frame, within [`HANDSHAKE_TIMEOUT`].
async fn next_handshake(socket: &mut WebSocket) -> Result<PeerHandshake, &'static str> {
    let message = tokio::time::timeout(HANDSHAKE_TIMEOUT, socket.recv())
        .await
        .map_err(|_| "handshake timed out")?
        .ok_or("closed during the handshake")?
        .map_err(|_| "closed during the handshake")?;
    let Message::Text(text) = message else { return Err("expected a handshake frame") };
    if text.len() > MAX_HANDSHAKE_FRAME {
        return Err("handshake frame too big");
    }
    serde_json::from_str(text.as_str()).map_err(|_| "expected a handshake frame")
}

/// The listener's half of the handshake: returns the id the dialler proved to be.
async fn authenticate(socket: &mut WebSocket, key: &PeerKey, replication: &Replication) -> Result<u64, &'static str> {
    let PeerHandshake::Hello { from, to, nonce } = next_handshake(socket).await? else {
        return Err("expected hello");
    };
    if to != replication.id {
        return Err("hello addressed to another replica");
    }
    if from == replication.id || !replication.peers.contains_key(&from) {
        return Err("hello from an id that is not another replica of this cluster");
    }
    let dialler_nonce = peer_auth::parse_nonce(&nonce).ok_or("bad nonce")?;
    let transcript = Transcript { dialler: from, listener: to, dialler_nonce, listener_nonce: peer_auth::nonce() };
    let challenge = PeerHandshake::Challenge {
        from: to,
        nonce: hex::encode(transcript.listener_nonce),
        proof: key.proof(Side::Listener, &transcript),
    };
    let text = serde_json::to_string(&challenge).expect("frames serialise");
    socket.send(Message::Text(text.into())).await.map_err(|_| "closed during the handshake")?;
    let PeerHandshake::Proof { proof } = next_handshake(socket).await? else { return Err("expected proof") };
    if !key.verify(Side::Dialler, &transcript, &proof) {
        return Err("wrong proof: the dialler does not know the cluster secret");
    }
    Ok(from)
}

/// Answer `peer`'s requests until it goes away (`Ok`), or until it sends a frame in another replica's name
/// (`Err`: the connection is dropped).
async fn serve(socket: &mut WebSocket, peer: u64, replication: &Replication) -> Result<(), &'static str> {
    while let Some(Ok(message)) = socket.recv().await {
        let Message::Text(text) = message else { continue };
        let frame = match serde_json::from_str::<PeerFrame>(text.as_str()) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!(peer, error = %e, "bad frame from a peer");
                continue;
            }
        };
        let sender = match &frame {
            PeerFrame::Append { leader, .. } | PeerFrame::Snapshot { leader, .. } => *leader,
            PeerFrame::Vote { candidate, .. } => *candidate,
            PeerFrame::Appended { from, .. } | PeerFrame::Voted { from, .. } => *from,
        };
        if sender != peer {
            return Err("a frame in another replica's name");
        }
        let Some(answer) = replication.request(frame).await else { return Ok(()) };
        let text = serde_json::to_string(&answer).expect("frames serialise");
        if socket.send(Message::Text(text.into())).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}
