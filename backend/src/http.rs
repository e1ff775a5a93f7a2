//! The HTTP surface: the router, `/healthz`, `/api/cluster`, `/metrics`, the browser security headers, and
//! the browser-origin policy for `/ws`.

use axum::extract::State;
use axum::routing::get;
use std::path::Path;

use axum::http::{header, HeaderValue, StatusCode};
use axum::{Json, Router};
use replichat_shared::ClusterStatus;
use serde_json::json;
use tower_http::compression::CompressionLayer;
use tower_http::services::{ServeDir, ServeFile};
use tower_http::set_header::SetResponseHeaderLayer;
use tower_http::trace::TraceLayer;

use crate::{ws, AppState};

/// Every route a replica serves: the API, and the browser app from `static_dir` for everything else.
pub fn router(state: AppState, static_dir: &Path) -> Router {
    // The app's files keep their names from build to build, so browsers must revalidate them (cheap: the
    // file service answers If-None-Match, against the ETag tower-http 0.7 derives from size and mtime, and
    // If-Modified-Since with 304).
    let app = ServeDir::new(static_dir).fallback(ServeFile::new(static_dir.join("index.html")));
    let policy = content_security_policy(state.node.urls.values());
    let app = tower::ServiceBuilder::new()
        .layer(SetResponseHeaderLayer::overriding(header::CACHE_CONTROL, HeaderValue::from_static("no-cache")))
        .layer(CompressionLayer::new())
        .service(app);
    Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/cluster", get(cluster))
        .route("/internal/replicate", get(crate::internal::upgrade))
        .fallback_service(app)
        // On every response, pages and assets alike (a JSON answer must not be sniffed into HTML either).
        .layer(SetResponseHeaderLayer::overriding(header::CONTENT_SECURITY_POLICY, policy))
        .layer(SetResponseHeaderLayer::overriding(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .layer(SetResponseHeaderLayer::overriding(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// The policy without the replicas' addresses.
const BASE_POLICY: &str = "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; style-src 'self'; \
     img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The `Content-Security-Policy`: scripts only from this replica's own files, plus compiling its WebAssembly
/// (`'wasm-unsafe-eval'`, which `WebAssembly.instantiateStreaming` needs); no inline script or style, no
/// framing by any page. The app talks to every replica (WebSockets to the primary, `/api/cluster` on the admin
/// page), so `connect-src` names each replica's URL in its `http(s)` and `ws(s)` forms.
fn content_security_policy<'a>(replicas: impl IntoIterator<Item = &'a String>) -> HeaderValue {
    let mut connect = vec!["'self'".to_owned()];
    for url in replicas {
        let url = url.trim_end_matches('/');
        connect.push(url.to_owned());
        if let Some(rest) = url.strip_prefix("http") {
            // http://h -> ws://h, https://h -> wss://h
            connect.push(format!("ws{rest}"));
        }
    }
    let policy = format!("{BASE_POLICY}; connect-src {}", connect.join(" "));
    HeaderValue::from_str(&policy).unwrap_or_else(|_| {
        tracing::warn!(
            "a replica URL cannot go in a header; the security policy allows connecting to this replica only"
        );
        HeaderValue::from_str(&format!("{BASE_POLICY}; connect-src 'self'")).expect("the base policy is ASCII")
    })
}

/// `GET /healthz`: 200 with the node id, role and log position while the node serves; 503 with the reason
/// while its storage is failing (it could not make its log, term, vote or applied state durable: a full or
/// broken disk), or while it is stopping on a committed entry it cannot apply.
async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let status = state.chat.replication().status().borrow().clone();
    let (health, reason) = match (state.chat.fatal(), status.storage_failure.clone().or(state.chat.storage_problem())) {
        (Some(fatal), _) => ("stopping", Some(fatal)),
        (None, Some(failure)) => ("storage_failing", Some(failure)),
        (None, None) => ("ok", None),
    };
    let code = if reason.is_some() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let body = json!({
        "status": health,
        "reason": reason,
        "id": state.node.id,
        "role": status.role.name(),
        "term": status.term,
        "last_index": status.last_index,
        "applied_index": state.chat.applied_index(),
        "sessions": state.chat.hub().sessions(),
        // Group commit at work: entries appended per transaction = proposed_entries / proposal_batches.
        "proposal_batches": status.proposal_batches,
        "proposed_entries": status.proposed_entries,
        // False while a learner: the database is new, taken over or restored, and not yet caught up.
        "voter": status.voter,
        "incarnation": format!("{:016x}", state.node.incarnation),
    });
    (code, Json(body))
}

/// The Prometheus text exposition format, version 0.0.4.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`: every series in the Prometheus text format (the list is in docs/ARCHITECTURE.md).
async fn metrics(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    ([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], state.metrics.render())
}

/// `GET /api/cluster`: this replica's view of the cluster (CORS-open, so an admin page served by any
/// replica can ask every other one).
async fn cluster(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    let status = state.chat.replication().status().borrow().clone();
    let body = ClusterStatus {
        id: state.node.id,
        role: status.role.name().to_owned(),
        term: status.term,
        leader: status.leader,
        commit_index: status.commit_index,
        last_index: status.last_index,
        applied_index: state.chat.applied_index(),
        replicas: status.replicas,
        elections: status.elections,
        now_ms: crate::replication::unix_ms(),
    };
    ([(axum::http::header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")], Json(body))
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
    /// A header that is not valid text is refused.
    pub fn allows(&self, origin: Option<&[u8]>) -> bool {
        let Some(origin) = origin else { return true };
        let Ok(origin) = std::str::from_utf8(origin) else { return false };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.allowed.contains(&origin) {
            return true;
        }
        let Some(authority) = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) else {
            return false;
        };
        let (host, port) = match authority.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((host, port)) => (host, port),
                None => return false,
            },
            None => authority.split_at(authority.find(':').unwrap_or(authority.len())),
        };
        let port_ok = port.is_empty()
            || port.strip_prefix(':').is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        port_ok && matches!(host, "localhost" | "127.0.0.1" | "::1")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_lets_the_app_reach_every_replica() {
        let urls = ["http://10.0.0.1:8080".to_owned(), "https://chat.example.com/".to_owned()];
        let policy = content_security_policy(&urls);
        let policy = policy.to_str().unwrap();
        assert!(policy.ends_with(
            "; connect-src 'self' http://10.0.0.1:8080 ws://10.0.0.1:8080 https://chat.example.com wss://chat.example.com"
        ));
        assert!(policy.contains("frame-ancestors 'none'"));
    }

    #[test]
    fn origins() {
        let origins = Origins::new(["http://chat.example.com:8080".to_owned()]);
        let origins = |o: &str| origins.allows(Some(o.as_bytes()));
        assert!(origins("http://chat.example.com:8080"));
        assert!(origins("http://localhost:3000"));
        assert!(origins("http://127.0.0.1:8081"));
        assert!(origins("http://[::1]:8082"));
        assert!(origins("https://localhost"));
        assert!(!origins("http://evil.example.com"));
        assert!(!origins("http://localhost.evil.com"));
        assert!(!origins("http://127.0.0.1.evil.com:80"));
        assert!(!origins("null"));
        assert!(!origins("http://chat.example.com:9999"));
        assert!(!origins("http://[::1"));
        assert!(!origins("http://[::1]x"));
        assert!(!origins("http://localhost:"));
        let any = Origins::new([]);
        assert!(any.allows(None));
        assert!(!any.allows(Some(b"http://localhost\xff")));
    }
}
