//! The HTTP surface: the router, `/healthz`, and the browser-origin policy for `/ws`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tower_http::trace::TraceLayer;

use crate::{ws, AppState};

/// Every route a replica serves.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/healthz", get(healthz))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// `GET /healthz`: 200 with the node id and log position while the node serves.
async fn healthz(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "id": state.node.id,
        "term": state.chat.log().term().await,
        "last_index": state.chat.log().last_index().await,
        "sessions": state.chat.hub().sessions(),
    }))
}

/// Which browser origins may open `/ws` (protection against cross-site WebSocket hijacking).
#[derive(Debug, Clone)]
pub struct Origins {
    allowed: Vec<String>,
}

impl Origins {
    /// Allow exactly these origins (`scheme://host[:port]`), plus any loopback origin.
    pub fn new(allowed: impl IntoIterator<Item = String>) -> Origins {
        Origins { allowed: allowed.into_iter().map(|o| o.trim_end_matches('/').to_ascii_lowercase()).collect() }
    }

    /// Whether a request with this `Origin` header may upgrade. No header means not a browser: allowed.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.allowed.contains(&origin) {
            return true;
        }
        let Some(rest) = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) else {
            return false;
        };
        let host = if rest.starts_with('[') {
            rest.split(']').next().map(|h| format!("{h}]")).unwrap_or_default()
        } else {
            rest.split(':').next().unwrap_or_default().to_owned()
        };
        let port_ok = rest[host.len()..].is_empty()
            || rest[host.len()..]
                .strip_prefix(':')
                .is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        port_ok && matches!(host.as_str(), "localhost" | "127.0.0.1" | "[::1]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let origins = Origins::new(["http://chat.example.com:8080".to_owned()]);
        assert!(origins.allows(None));
        assert!(origins.allows(Some("http://chat.example.com:8080")));
        assert!(origins.allows(Some("http://localhost:3000")));
        assert!(origins.allows(Some("http://127.0.0.1:8081")));
        assert!(origins.allows(Some("http://[::1]:8082")));
        assert!(origins.allows(Some("https://localhost")));
        assert!(!origins.allows(Some("http://evil.example.com")));
        assert!(!origins.allows(Some("http://localhost.evil.com")));
        assert!(!origins.allows(Some("http://127.0.0.1.evil.com:80")));
        assert!(!origins.allows(Some("null")));
        assert!(!origins.allows(Some("http://chat.example.com:9999")));
    }
}
