//! The internal replication endpoint only talks to replicas that prove they know the cluster secret (the
//! challenge-response of docs/PROTOCOL.md §10.2), and only as the replica they proved to be.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use replichat::peer_auth::{self, PeerKey, Side, Transcript};
use replichat_shared::{PeerHandshake, REPLICATION_FORMAT};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::harness::*;
use crate::step;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// RFC 6455 "policy violation": how a replica closes a connection that failed the handshake.
const CLOSE_POLICY: u16 = 1008;
/// RFC 6455 "message too big": a frame over 1 KiB before the handshake is done.
const CLOSE_TOO_BIG: u16 = 1009;

/// Open `/internal/replicate` with no credentials at all: the upgrade itself is open; the handshake decides.
async fn open(addr: &str) -> Ws {
    let url = format!("ws://{addr}/internal/replicate");
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("an answer to the upgrade")
        .unwrap_or_else(|e| panic!("{addr}: the upgrade failed: {e}"));
    ws
}

async fn send(ws: &mut Ws, frame: impl serde::Serialize) {
    ws.send(Message::Text(serde_json::to_string(&frame).unwrap().into())).await.expect("send");
}

/// What came back: the next text frame, or how the connection ended (the close code, if any).
#[derive(Debug, PartialEq)]
enum Next {
    Frame(Value),
    Closed(Option<u16>),
}

async fn next(ws: &mut Ws) -> Next {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a frame or a close") {
            Some(Ok(Message::Text(text))) => return Next::Frame(serde_json::from_str(text.as_str()).unwrap()),
            Some(Ok(Message::Close(frame))) => return Next::Closed(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => continue,
            None | Some(Err(_)) => return Next::Closed(None),
        }
    }
}

/// Say hello as replica `from` to replica `to`; returns the dialler nonce and what came back.
async fn hello(ws: &mut Ws, from: u64, to: u64) -> ([u8; 32], Next) {
    let nonce = peer_auth::nonce();
    send(ws, PeerHandshake::Hello { from, to, nonce: hex::encode(nonce), format: REPLICATION_FORMAT }).await;
    (nonce, next(ws).await)
}

/// Run the dialler's side of the handshake as `from` towards `to` with `key`; returns the proof sent (after
/// checking the listener's proof with `listener_key`) and the listener's answer to it.
async fn handshake(ws: &mut Ws, from: u64, to: u64, key: &PeerKey, listener_key: &PeerKey) -> (String, Next) {
    let (dialler_nonce, answer) = hello(ws, from, to).await;
    let Next::Frame(challenge) = answer else { panic!("no challenge: {answer:?}") };
    let challenge: PeerHandshake = serde_json::from_value(challenge).expect("a challenge");
    let PeerHandshake::Challenge { from: listener, nonce, proof, format } = challenge else { panic!("{challenge:?}") };
    assert_eq!(format, REPLICATION_FORMAT, "the listener says which format it speaks");
    assert_eq!(listener, to, "the listener is who the dialler called");
    let listener_nonce = peer_auth::parse_nonce(&nonce).expect("a 32-byte nonce");
    let transcript = Transcript { dialler: from, listener: to, dialler_nonce, listener_nonce, format };
    assert!(listener_key.verify(Side::Listener, &transcript, &proof), "the listener proves it knows the secret");
    let mine = key.proof(Side::Dialler, &transcript);
    send(ws, PeerHandshake::Proof { proof: mine.clone() }).await;
    (mine, next(ws).await)
}

/// A pre-vote request from `candidate`: it changes no state anywhere and is always answered.
fn pre_vote(candidate: u64, term: u64) -> Value {
    json!({"type": "vote", "term": term + 1, "candidate": candidate, "last_index": 0, "last_term": 0, "pre": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_replica_proving_the_secret_is_answered() {
    let cluster = Cluster::start(3, Engine::Sqlite).await;
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;
    let term = cluster.status(leader).await.unwrap()["term"].as_u64().unwrap();
    let right = PeerKey::derive(&cluster.secret);
    let wrong = PeerKey::derive(&format!("{}x", cluster.secret));
    for target in [leader, (leader + 1) % 3] {
        let addr = &cluster.node(target).addr;
        let claimed = (target + 2) % 3;

        step!("node {target}: a request before any handshake is not answered; the connection is closed");
        let mut ws = open(addr).await;
        send(&mut ws, pre_vote(claimed, term)).await;
        assert_eq!(next(&mut ws).await, Next::Closed(Some(CLOSE_POLICY)));

        step!("node {target}: a hello to another replica id, or from an unknown or its own id, is refused");
        for (from, to) in [(claimed, claimed), (7, target), (target, target)] {
            let mut ws = open(addr).await;
            let (_, answer) = hello(&mut ws, from, to).await;
            assert_eq!(answer, Next::Closed(Some(CLOSE_POLICY)), "hello from {from} to {to}");
        }

        step!("node {target}: a hello of another replication format, or of none (an older build), gets no challenge");
        for format in [Some(REPLICATION_FORMAT + 1), Some(0), None] {
            let mut ws = open(addr).await;
            let nonce = hex::encode(peer_auth::nonce());
            let mut frame = json!({"type": "hello", "from": claimed, "to": target, "nonce": nonce});
            if let Some(format) = format {
                frame["format"] = json!(format);
            }
            send(&mut ws, frame).await;
            assert_eq!(next(&mut ws).await, Next::Closed(Some(CLOSE_POLICY)), "format {format:?}");
        }

        step!("node {target}: before the handshake, a frame over 1 KiB closes the connection (1009)");
        let mut ws = open(addr).await;
        send(&mut ws, json!({"type": "hello", "from": claimed, "to": target, "nonce": "0".repeat(2048)})).await;
        assert_eq!(next(&mut ws).await, Next::Closed(Some(CLOSE_TOO_BIG)));

        step!("node {target}: a dialler with a wrong secret is refused after the challenge");
        let mut ws = open(addr).await;
        let (_, answer) = handshake(&mut ws, claimed, target, &wrong, &right).await;
        assert_eq!(answer, Next::Closed(Some(CLOSE_POLICY)));

        step!("node {target}: the right secret is accepted and answered; a replayed proof is not");
        let mut ws = open(addr).await;
        let (proof, answer) = handshake(&mut ws, claimed, target, &right, &right).await;
        assert_eq!(answer, Next::Frame(json!({"type": "accepted"})));
        send(&mut ws, pre_vote(claimed, term)).await;
        let Next::Frame(voted) = next(&mut ws).await else { panic!("no answer to an authenticated pre-vote") };
        assert_eq!((voted["type"].as_str(), voted["from"].as_u64()), (Some("voted"), Some(target)));
        let mut replay = open(addr).await;
        let (_, challenge) = hello(&mut replay, claimed, target).await;
        assert!(matches!(challenge, Next::Frame(_)), "{challenge:?}");
        send(&mut replay, PeerHandshake::Proof { proof }).await;
        assert_eq!(next(&mut replay).await, Next::Closed(Some(CLOSE_POLICY)), "a proof from another handshake");

        step!("node {target}: after the handshake, a frame naming another sender ends the connection");
        let impersonated = (claimed + 1) % 3;
        send(&mut ws, pre_vote(impersonated, term)).await;
        assert_eq!(next(&mut ws).await, Next::Closed(Some(CLOSE_POLICY)));
    }

    step!("nothing of this disturbed the cluster: same primary and term, writes still commit everywhere");
    assert_eq!(cluster.wait_for_primary(Duration::from_secs(10)).await, leader);
    assert_eq!(cluster.status(leader).await.unwrap()["term"].as_u64(), Some(term));
    let mut alice = cluster.client_to_primary().await;
    alice.register("alice", "password123").await;
    cluster.wait_applied_equal(Duration::from_secs(10)).await;
    alice.close().await;
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_handshakes_is_logged_a_few_times_not_once_each() {
    // Anyone who reaches /internal/replicate decides how often to be refused, and every refusal was a warning
    // in the replica's log: 300 bad hellos, 300 lines. Each kind of refusal is now logged once per interval.
    let cluster = Cluster::start(3, Engine::Sqlite).await;
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;
    let addr = cluster.node(leader).addr.clone();
    let refusals = || {
        let log = std::fs::read_to_string(&cluster.node(leader).log).unwrap_or_default();
        log.lines().filter(|l| l.contains("refused an internal connection") || l.contains("refused a peer")).count()
    };
    let before = refusals();
    step!("300 hellos from an id that is not a replica, each closed with 1008");
    for _ in 0..300 {
        let mut ws = open(&addr).await;
        let (_, answer) = hello(&mut ws, 7, leader).await;
        assert_eq!(answer, Next::Closed(Some(CLOSE_POLICY)));
    }
    step!("and 300 of another replication format");
    for _ in 0..300 {
        let mut ws = open(&addr).await;
        let nonce = hex::encode(peer_auth::nonce());
        let from = (leader + 1) % 3;
        send(&mut ws, json!({"type": "hello", "from": from, "to": leader, "nonce": nonce, "format": 99})).await;
        assert_eq!(next(&mut ws).await, Next::Closed(Some(CLOSE_POLICY)));
    }
    let logged = refusals() - before;
    assert!(
        (2..=6).contains(&logged),
        "{logged} lines for 600 refusals (two kinds):\n{}",
        cluster.log_tail(leader, 20)
    );
    cluster.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_of_another_format_is_logged_once() {
    // A replica of another replication format was refused with two warnings: the one that says what to do
    // (upgrade or roll back every replica) and a generic one that said the peer "did not authenticate".
    let cluster = Cluster::start(3, Engine::Sqlite).await;
    let leader = cluster.wait_for_primary(Duration::from_secs(10)).await;
    let addr = cluster.node(leader).addr.clone();
    let log = || std::fs::read_to_string(&cluster.node(leader).log).unwrap_or_default();
    let before = log().lines().count();
    step!("a hello of another replication format, closed with 1008");
    let mut ws = open(&addr).await;
    let from = (leader + 1) % 3;
    let nonce = hex::encode(peer_auth::nonce());
    send(&mut ws, json!({"type": "hello", "from": from, "to": leader, "nonce": nonce, "format": 99})).await;
    assert_eq!(next(&mut ws).await, Next::Closed(Some(CLOSE_POLICY)));
    step!("then a hello from an id that is not a replica, whose warning comes after the format's in the log");
    let mut ws = open(&addr).await;
    let (_, answer) = hello(&mut ws, 7, leader).await;
    assert_eq!(answer, Next::Closed(Some(CLOSE_POLICY)));
    let marker = "hello from an id that is not another replica";
    let deadline = tokio::time::Instant::now() + WAIT;
    while !log().lines().skip(before).any(|l| l.contains(marker)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no warning for the second hello:\n{}",
            cluster.log_tail(leader, 20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written = log();
    let format_lines: Vec<&str> =
        written.lines().skip(before).take_while(|l| !l.contains(marker)).filter(|l| l.contains("refused")).collect();
    assert_eq!(format_lines.len(), 1, "one warning for the format's refusal: {format_lines:#?}");
    assert!(format_lines[0].contains("replication format"), "{}", format_lines[0]);
    cluster.finish().await;
}
