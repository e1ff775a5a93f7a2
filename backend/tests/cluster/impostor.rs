//! A process that listens on a stopped replica's address is not that replica: the replicas that dial it give
//! it nothing it could replay (no secret, no proof, no request), and nothing it answers moves any replica's
//! term, commit index or the acks the primary counts.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use replichat_shared::{Request, ServerBody};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::server::{Request as HttpRequest, Response as HttpResponse};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;
use crate::step;

/// What the impostor saw on one connection.
#[derive(Debug, Clone, Default)]
struct Seen {
    /// The upgrade request's headers, `name: value`.
    headers: Vec<String>,
    /// Every text frame the dialling replica sent.
    frames: Vec<String>,
    /// The dialling replica closed the connection.
    closed: bool,
}

/// Accept every connection on `listener` as a WebSocket, record what arrives, and answer everything with
/// forged frames in the name of replica `victim`: a challenge with a made-up proof, acks for a million
/// entries in the current term, granted votes, and a term of 2^64-1.
fn impostor(listener: tokio::net::TcpListener, victim: u64, term: u64) -> watch::Receiver<Vec<Seen>> {
    let (tx, rx) = watch::channel(Vec::new());
    let tx = Arc::new(tx);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut headers = Vec::new();
                // The callback's error type is tungstenite's, not ours.
                #[allow(clippy::result_large_err)]
                let record = |request: &HttpRequest, response: HttpResponse| {
                    for (name, value) in request.headers() {
                        headers.push(format!("{name}: {}", String::from_utf8_lossy(value.as_bytes())));
                    }
                    Ok(response)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, record).await else { return };
                let slot = {
                    let mut slot = 0;
                    tx.send_modify(|all| {
                        slot = all.len();
                        all.push(Seen { headers, ..Seen::default() });
                    });
                    slot
                };
                let forged = [
                    json!({"type": "appended", "term": term, "from": victim, "success": true, "last_index": 1_000_000}),
                    json!({"type": "voted", "term": term, "from": victim, "granted": true, "pre": true}),
                    json!({"type": "voted", "term": term, "from": victim, "granted": true, "pre": false}),
                    json!({"type": "appended", "term": u64::MAX, "from": victim, "success": false, "last_index": 0}),
                ];
                let mut answers: Vec<Value> = forged.to_vec();
                loop {
                    for frame in answers.drain(..) {
                        let _ = ws.send(Message::Text(frame.to_string().into())).await;
                    }
                    match ws.next().await {
                        Some(Ok(Message::Text(text))) => {
                            let frame: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                            tx.send_modify(|all| all[slot].frames.push(text.to_string()));
                            if let Some(nonce) = frame["nonce"].as_str() {
                                // Echo the dialler's own nonce back with a made-up proof.
                                let proof = "00".repeat(32);
                                answers
                                    .push(json!({"type": "challenge", "from": victim, "nonce": nonce, "proof": proof}));
                            }
                            answers.extend(forged.iter().cloned());
                        }
                        Some(Ok(_)) => {}
                        None | Some(Err(_)) => break,
                    }
                }
                tx.send_modify(|all| all[slot].closed = true);
            });
        }
    });
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_on_a_stopped_peers_address_learns_nothing_and_changes_nothing() {
    let mut cluster = Cluster::start(3, Engine::Sqlite).await;
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;
    let (victim, other) = ((leader + 1) % 3, (leader + 2) % 3);
    let (mut alice, _bob) = cluster.register_alice_and_bob().await;
    cluster.wait_applied_equal(Duration::from_secs(10)).await;

    step!("node {victim} stops; an impostor listens on its address");
    cluster.stop(victim).await;
    let before = cluster.status(leader).await.unwrap();
    let term = before["term"].as_u64().unwrap();
    let victim_index = |status: &Value| status["replicas"][victim as usize]["last_index"].as_u64();
    let listener = tokio::net::TcpListener::bind(&cluster.node(victim).addr).await.expect("bind the victim's port");
    let mut seen = impostor(listener, victim, term);

    step!("both live replicas dial the impostor, and something is said");
    let talked = |all: &Vec<Seen>| all.len() >= 2 && all.iter().any(|s| !s.frames.is_empty());
    tokio::time::timeout(WAIT, seen.wait_for(talked)).await.expect("two replicas talked to the impostor").unwrap();

    step!("they gave it neither the secret nor anything it could replay: only hellos, no proof, no request");
    for s in seen.borrow().iter() {
        for line in s.headers.iter().chain(&s.frames) {
            assert!(!line.contains(&cluster.secret), "the impostor received the secret: {line}");
        }
        assert!(!s.headers.iter().any(|h| h.to_lowercase().starts_with("authorization")), "{:?}", s.headers);
        for frame in &s.frames {
            let frame: Value = serde_json::from_str(frame).unwrap();
            assert_eq!(frame["type"].as_str(), Some("hello"), "the impostor received {frame}");
        }
    }

    step!("they refuse its answers and drop it, again and again (each time it forges acks, votes, a huge term)");
    let refused = |all: &Vec<Seen>| all.iter().filter(|s| s.closed).count() >= 6;
    tokio::time::timeout(WAIT, seen.wait_for(refused)).await.expect("the replicas kept dropping the impostor").unwrap();

    step!("a write still commits on the two real replicas; nothing the impostor said was believed");
    alice.send_message("bob", "hello bob").await;
    cluster.wait_applied_equal(Duration::from_secs(10)).await;
    let after = cluster.status(leader).await.unwrap();
    assert_eq!(after["term"].as_u64(), Some(term), "the primary's term moved");
    assert_eq!(cluster.status(other).await.unwrap()["term"].as_u64(), Some(term), "the backup's term moved");
    assert_eq!(victim_index(&after), victim_index(&before), "the primary credited the impostor's acks: {after}");

    step!("node {other} stops too: with only forged acks, the primary commits nothing more");
    cluster.stop(other).await;
    let committed = cluster.status(leader).await.unwrap()["commit_index"].as_u64().unwrap();
    let send = Request::Send { to: "bob".into(), text: "only on the primary".into(), client_id: "c1".into() };
    let reply = alice.try_request(send, Duration::from_secs(3)).await;
    assert!(!matches!(reply, Ok(ServerBody::Sent { .. })), "a write was acknowledged: {reply:?}");
    let status = cluster.status(leader).await.unwrap();
    assert_eq!(status["commit_index"].as_u64(), Some(committed), "{status}");
    assert_eq!(status["term"].as_u64(), Some(term), "{status}");
    drop(seen);
    cluster.finish().await;
}
