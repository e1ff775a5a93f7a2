//! What the fuzz targets check, in one place: the libFuzzer targets in `fuzz/fuzz_targets/` (nightly) call
//! these, and the stable test `backend/tests/fuzz_corpus.rs` includes this file with `#[path]` to replay the
//! kept corpora through the same checks. A panic is a finding.
//!
//! Each check returns whether the input decoded as a frame (the corpus replay uses it to make sure the corpus
//! still reaches past the JSON parser).

use replichat::chat::{hash_token, validate_username};
use replichat::op::Op;
use replichat::wildcard::{name_key, Pattern};
use replichat::Error;
use replichat_shared::{ClientFrame, ErrorCode, PeerFrame, PeerHandshake, Request};

/// A client text frame, as `/ws` handles it: `ws::decode`, then the checks the server applies to what decoded.
///
/// Properties: decoding never panics; a failure is always `bad_request`; a decoded frame serialises back to a
/// frame that decodes to the same `req` and request; a username that passes validation is found by an exact
/// `list` for itself; a `list` pattern translates to a well-formed SQL `LIKE` pattern that means the same.
pub fn client_frame(data: &[u8]) -> bool {
    // WebSocket text frames are UTF-8 (the transport refuses others before `decode` sees them).
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let (req, result) = replichat::ws::decode(text);
    let request = match result {
        Ok(request) => request,
        Err(error) => {
            check_decode_error(&error);
            return false;
        }
    };
    let frame = ClientFrame { req, request };
    let json = serde_json::to_string(&frame).expect("a client frame serialises");
    match replichat::ws::decode(&json) {
        (req, Ok(request)) => {
            assert_eq!(req, frame.req, "req changed in a round trip through {json}");
            assert_eq!(request, frame.request, "request changed in a round trip through {json}");
        }
        (_, Err(error)) => panic!("{json} (re-encoded from {text:?}) does not decode: {error}"),
    }
    check_request(&frame.request);
    true
}

/// A replication frame, as `/internal/replicate` and the dialing side handle it: `serde_json` into a
/// [`PeerFrame`]; then each appended entry's op as the applier reads it, and a snapshot's state as a backup
/// installs it.
///
/// Properties: nothing panics; a decoded frame and a decoded op survive a round trip through JSON unchanged.
pub fn peer_frame(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let Ok(frame) = serde_json::from_str::<PeerFrame>(text) else { return peer_handshake(text) };
    let json = serde_json::to_string(&frame).expect("a peer frame serialises");
    let again: PeerFrame = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json} does not decode: {e}"));
    assert_eq!(again, frame, "peer frame changed in a round trip through {json}");
    match frame {
        PeerFrame::Append { entries, .. } => {
            for entry in &entries {
                check_op(&entry.op);
            }
        }
        PeerFrame::SnapshotChunk { rows, .. } => {
            // As a backup checks them before handing them to the database: a JSON array.
            let _ = serde_json::from_str::<Vec<serde_json::Value>>(&rows);
        }
        PeerFrame::Appended { .. }
        | PeerFrame::Vote { .. }
        | PeerFrame::Voted { .. }
        | PeerFrame::SnapshotAck { .. } => {}
    }
    true
}

/// A handshake frame, the first frames of every replication connection (before any [`PeerFrame`]), as
/// `internal.rs` and the dialling side read it: `serde_json` into a [`PeerHandshake`], then its nonce and proof
/// as `peer_auth` reads them.
///
/// Properties: nothing panics; a decoded frame survives a round trip through JSON unchanged; a nonce parses
/// only as exactly 32 bytes; a proof made up by the input never verifies.
fn peer_handshake(text: &str) -> bool {
    use replichat::peer_auth::{parse_nonce, PeerKey, Side, Transcript};
    let Ok(frame) = serde_json::from_str::<PeerHandshake>(text) else { return false };
    let json = serde_json::to_string(&frame).expect("a handshake frame serialises");
    let again: PeerHandshake = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json} does not decode: {e}"));
    assert_eq!(again, frame, "handshake frame changed in a round trip through {json}");
    let (nonce, proof) = match &frame {
        PeerHandshake::Hello { nonce, .. } => (Some(nonce), None),
        PeerHandshake::Challenge { nonce, proof, .. } => (Some(nonce), Some(proof)),
        PeerHandshake::Proof { proof } => (None, Some(proof)),
        PeerHandshake::Accepted => (None, None),
    };
    let nonce = nonce.and_then(|n| parse_nonce(n.as_str()));
    if let Some(proof) = proof {
        let transcript = Transcript {
            dialler: 0,
            listener: 1,
            dialler_nonce: nonce.unwrap_or_default(),
            listener_nonce: [7; 32],
            format: replichat_shared::REPLICATION_FORMAT,
        };
        let key = PeerKey::derive("fuzz");
        assert!(!key.verify(Side::Dialler, &transcript, proof), "a made-up proof verified: {proof}");
    }
    true
}

/// An entry's op, as `storage.rs` reads it from the log before applying it.
fn check_op(text: &str) {
    let Ok(op) = serde_json::from_str::<Op>(text) else { return };
    let json = op.to_json();
    let again: Op = serde_json::from_str(&json).unwrap_or_else(|e| panic!("op {json} does not decode: {e}"));
    assert_eq!(again, op, "op changed in a round trip through {json}");
}

fn check_decode_error(error: &Error) {
    assert_eq!(error.code(), ErrorCode::BadRequest, "decode failed with a non-client error: {error:?}");
    assert!(!error.client_message().is_empty());
}

fn check_request(request: &Request) {
    match request {
        Request::Register { username, .. } | Request::Login { username, .. } => check_username(username),
        Request::List { pattern, .. } => check_pattern(pattern),
        Request::Resume { token, .. } => {
            let hash = hash_token(token);
            assert!(hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()), "token hash {hash:?}");
        }
        _ => {}
    }
}

/// A valid username is matched by an exact search for itself (it has no `*` and nothing `trim` removes).
fn check_username(username: &str) {
    match validate_username(username) {
        Ok(()) => assert_eq!(Pattern::parse(username), Pattern::Exact(name_key(username)), "username {username:?}"),
        Err(error) => assert_eq!(error.code(), ErrorCode::InvalidUsername, "{error:?}"),
    }
}

/// The `LIKE` translation, undone, gives back the (trimmed, lower-cased) pattern with runs of `*` collapsed:
/// every `\` escapes one of `%`, `_`, `\`; every unescaped `%` came from a `*`; no unescaped `_` is left.
fn check_pattern(pattern: &str) {
    let key = name_key(pattern.trim());
    match Pattern::parse(pattern) {
        Pattern::All => assert!(key.chars().all(|c| c == '*'), "{pattern:?} lists everyone"),
        Pattern::Exact(exact) => {
            assert!(!exact.contains('*'), "{pattern:?} gave exact {exact:?}");
            assert_eq!(exact, key, "{pattern:?}");
        }
        Pattern::Like(like) => {
            assert!(key.contains('*'), "{pattern:?} without a star gave LIKE {like:?}");
            let mut undone = String::with_capacity(like.len());
            let mut chars = like.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some(escaped @ ('%' | '_' | '\\')) => undone.push(escaped),
                        other => panic!("{pattern:?} gave LIKE {like:?}: backslash before {other:?}"),
                    },
                    '%' => undone.push('*'),
                    '_' => panic!("{pattern:?} gave LIKE {like:?} with an unescaped '_'"),
                    c => undone.push(c),
                }
            }
            let mut collapsed = String::with_capacity(key.len());
            for c in key.chars() {
                if !(c == '*' && collapsed.ends_with('*')) {
                    collapsed.push(c);
                }
            }
            assert_eq!(undone, collapsed, "{pattern:?} gave LIKE {like:?}");
        }
    }
}
