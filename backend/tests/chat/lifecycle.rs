//! The process around the chat: durability settings, restart, graceful shutdown, health.

use replichat_shared::{Request, ServerBody};

use crate::both;
use crate::util::*;

#[tokio::test]
async fn sqlite_runs_in_wal_mode_with_full_sync() {
    let server = server(Engine::Sqlite).await;
    let writers = server.db().sqlite_durability().await.unwrap().expect("sqlite");
    assert_eq!(writers.len(), 2, "the writer thread's connection and sqlx's");
    for (mode, sync, temp, cache) in writers {
        assert_eq!(mode.to_lowercase(), "wal");
        assert_eq!(sync, 2, "synchronous = FULL");
        assert_eq!(temp, 2, "the writer's statement journals stay in memory (temp_store = MEMORY)");
        assert_eq!(cache, -16 * 1024, "the writer caches 16 MiB of pages (SQLite's default: 2 MB)");
    }
    // Applies are not synced (the log is), but the next log append on the same connection must be again: on
    // both writers, an apply of sends (the writer thread) and of another op (sqlx's writer).
    let mut alice = server.user("alice").await;
    server.user("bob").await;
    alice.send_message("bob", "applied without a sync of its own").await;
    for (_, sync, _, _) in server.db().sqlite_durability().await.unwrap().expect("sqlite") {
        assert_eq!(sync, 2, "the writer is back to synchronous = FULL after an apply");
    }
}

#[cfg(unix)]
#[tokio::test]
async fn the_sqlite_files_a_server_creates_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let server = server(Engine::Sqlite).await;
    let mut alice = server.user("alice").await;
    server.user("bob").await;
    alice.send_message("bob", "password hashes and messages live here").await;
    let path = server.url.strip_prefix("sqlite://").expect("a sqlite url").to_owned();
    let mut checked = 0;
    for file in [path.clone(), format!("{path}-wal"), format!("{path}-shm")] {
        let Ok(meta) = std::fs::metadata(&file) else { continue };
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{file} is readable by its owner only");
        checked += 1;
    }
    assert!(checked >= 2, "the database and its WAL exist");
}

both!(state_survives_a_restart, |engine| async move {
    let mut server = server(engine).await;
    let mut alice = server.user("alice").await;
    server.user("bob").await;
    let id = alice.send_message("bob", "persisted").await;
    let token = alice.token.clone().unwrap();
    server.stop().await;

    let running = replichat::start(replichat::Config::for_tests(server.url.clone())).await.unwrap();
    let mut again = Client::connect(&format!("ws://{}/ws", running.addr)).await;
    // The session, the log position and the message all survived.
    again.request(Request::Resume { token, cursor: 0 }).await;
    let ServerBody::Message { message, .. } = again.next_push().await else { panic!() };
    assert_eq!((message.id, message.text.as_str()), (id, "persisted"));
    let next = again.send_message("bob", "after restart").await;
    assert!(next > id, "indexes continue after a restart");
    running.shutdown().await.unwrap();
});

/// The real binary: `/healthz`, then SIGTERM closes sockets with 1001 and exits 0.
#[tokio::test]
async fn sigterm_closes_sockets_with_1001_and_exits_0() {
    init_tracing();
    let db = fresh_db(Engine::Sqlite).await;
    let process = Process::spawn(&db, &[]).await;
    let base = process.base.clone();

    let health = http_get(&format!("{}/healthz", base.trim_start_matches("http://"))).await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.contains(r#""id":3"#), "{health}");

    let mut client = Client::connect(&process.ws_url()).await;
    let ServerBody::Welcome { node, .. } = client.welcome.clone() else { panic!() };
    assert_eq!(node, 3);
    client.register("alice", "password123").await;

    let pid = process.child.id().expect("pid").to_string();
    let closing = tokio::spawn(async move { client.expect_close().await });
    let exit = process.terminate().await;
    let frame = closing.await.unwrap().expect("close frame");
    assert_eq!(u16::from(frame.code), 1001);
    assert!(exit.success(), "exit status {exit:?} of {pid}");
}

// `/metrics` on an in-process server. Every server this test binary starts shares one recorder (one per
// process), so only growth is asserted here; the cluster suite checks exact values on real processes.
both!(metrics_grow_with_a_send, |engine| async move {
    let server = server(engine).await;
    let url = format!("{}/metrics", server.addr);
    let before = http_get(&url).await;
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    assert!(before.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{before}");
    let mut alice = server.user("alice").await;
    server.user("bob").await;
    alice.send_message("bob", "counted").await;
    let after = http_get(&url).await;
    for series in ["replichat_messages_stored_total", r#"replichat_requests_total{type="send"}"#] {
        assert!(sample(&after, series) >= sample(&before, series) + 1.0, "{series}:\n{after}");
    }
    assert!(sample(&after, "replichat_log_append_seconds_count") >= 1.0, "{after}");
});

// Every page and asset carries the browser security headers, and the page itself has no inline script
// (the policy forbids it, so the app must start from a file).
#[tokio::test]
async fn pages_and_assets_carry_security_headers() {
    init_tracing();
    let url = fresh_db(Engine::Sqlite).await;
    let config = replichat::Config {
        static_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../static").into(),
        ..replichat::Config::for_tests(url.clone())
    };
    let running = replichat::start(config).await.expect("server starts");
    let server = Server { addr: running.addr, running: Some(running), url };
    for path in ["", "admin", "style.css", "boot.js", "healthz", "api/cluster", "no/such/file"] {
        let response = http_get(&format!("{}/{path}", server.addr)).await;
        let (head, _) = response.split_once("\r\n\r\n").expect("a complete response");
        assert!(head.starts_with("HTTP/1.1 200"), "/{path}: {head}");
        let header = |name: &str| {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(header("x-content-type-options"), ["nosniff"], "/{path}: {head}");
        assert_eq!(header("referrer-policy"), ["no-referrer"], "/{path}: {head}");
        let csp = header("content-security-policy");
        assert_eq!(csp.len(), 1, "/{path}: one policy: {head}");
        let directives: Vec<&str> = csp[0].split(';').map(str::trim).collect();
        assert!(directives.contains(&"script-src 'self' 'wasm-unsafe-eval'"), "/{path}: {csp:?}");
        assert!(directives.contains(&"frame-ancestors 'none'"), "/{path}: {csp:?}");
        assert!(directives.contains(&"default-src 'none'"), "/{path}: {csp:?}");
        assert!(!csp[0].contains("unsafe-inline"), "/{path}: {csp:?}");
    }
    let page = http_get(&format!("{}/", server.addr)).await;
    let body = page.split_once("\r\n\r\n").unwrap().1;
    assert!(body.contains("<script"), "the page loads the app: {body}");
    for tag in body.split("<script").skip(1) {
        let open = &tag[..tag.find('>').unwrap()];
        let content = &tag[tag.find('>').unwrap() + 1..tag.find("</script>").unwrap()];
        assert!(open.contains("src="), "no inline script: <script{open}>");
        assert!(content.trim().is_empty(), "no inline script: {content}");
    }
}

/// The value of `series` on a Prometheus page (0 when it is not there yet).
fn sample(page: &str, series: &str) -> f64 {
    page.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok()).unwrap_or(0.0)
}

/// A minimal HTTP/1.1 GET over a raw socket (no HTTP client dependency needed for one request).
async fn http_get(host_and_path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, path) = host_and_path.split_once('/').unwrap();
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    stream
        .write_all(format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}
