//! The accepting side of `/internal/replicate`: checks the cluster secret, then answers each request frame
//! from a peer (`append`, `vote`) through the replication core, in order, on the same socket.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use replichat_shared::PeerFrame;
use subtle::ConstantTimeEq;

use crate::replication::Replication;
use crate::AppState;

/// Largest replication frame accepted: a batch of entries, or a whole snapshot, which travels as one frame
/// (see BENCHMARKS.md, catch-up, for the size of a 100,000-message snapshot).
const MAX_PEER_FRAME: usize = 512 << 20;

/// `GET /internal/replicate`: upgrade for a peer presenting `Authorization: Bearer <cluster secret>`.
pub async fn upgrade(State(state): State<AppState>, headers: HeaderMap, ws: WebSocketUpgrade) -> Response {
    let presented = headers.get(header::AUTHORIZATION).and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    let authorised = match (presented, state.cluster_secret.as_deref()) {
        (Some(presented), Some(secret)) => bool::from(presented.ct_eq(secret.as_bytes())),
        _ => false,
    };
    if !authorised {
        tracing::warn!(has_credentials = presented.is_some(), "refused an internal connection: bad cluster secret");
        return (StatusCode::UNAUTHORIZED, "cluster secret required").into_response();
    }
    let token = state.tracker.token();
    let replication = state.chat.replication().clone();
    let shutdown = state.shutdown.clone();
    ws.max_message_size(MAX_PEER_FRAME).max_frame_size(MAX_PEER_FRAME).on_upgrade(move |socket| async move {
        tokio::select! {
            _ = serve(socket, replication) => {}
            _ = shutdown.cancelled() => {}
        }
        drop(token);
    })
}

async fn serve(mut socket: WebSocket, replication: Replication) {
    while let Some(Ok(message)) = socket.recv().await {
        let Message::Text(text) = message else { continue };
        let frame = match serde_json::from_str::<PeerFrame>(text.as_str()) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!(error = %e, "bad frame from a peer");
                continue;
            }
        };
        let Some(answer) = replication.request(frame).await else { return };
        let text = serde_json::to_string(&answer).expect("frames serialise");
        if socket.send(Message::Text(text.into())).await.is_err() {
            return;
        }
    }
}
