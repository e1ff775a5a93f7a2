//! Mutual authentication of replicas on `/internal/replicate`: an HMAC-SHA256 challenge-response over fresh
//! nonces from both sides, so that the cluster secret never travels and neither end believes the other
//! without proof (docs/PROTOCOL.md §10.2).
//!
//! The handshake, in frames of [`replichat_shared::PeerHandshake`]:
//! 1. dialler → listener `hello {from, to, nonce}`: its id, the id it means to reach, a fresh nonce `Nd`;
//! 2. listener → dialler `challenge {from, nonce, proof}`: its own fresh nonce `Nl` and
//!    `proof = HMAC(K, "listener" ‖ dialler id ‖ listener id ‖ Nd ‖ Nl)`;
//! 3. dialler → listener `proof {proof}`: `HMAC(K, "dialler" ‖ dialler id ‖ listener id ‖ Nd ‖ Nl)`, sent only
//!    after the listener's proof checked out.
//!
//! Hello and challenge also carry each end's [`REPLICATION_FORMAT`](replichat_shared::REPLICATION_FORMAT): a
//! replica refuses a peer of another format (a group never mixes two), and both proofs are computed over
//! the format, so a format altered on the way makes the proofs fail instead of joining two formats.
//!
//! `K` is derived from the cluster secret ([`PeerKey::derive`]). Binding both ids and both nonces means a proof
//! answers one challenge from one replica to one replica, once; the direction label means a dialler's proof
//! is never a listener's. A listener without the secret gets only ids and a random nonce; a dialler without it
//! gets a listener proof over its own nonce, which no later handshake accepts (each side draws a new nonce).

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Bytes of a nonce (hex on the wire: twice as many characters).
pub const NONCE_BYTES: usize = 32;

/// A fresh random nonce, from the operating system's generator.
pub fn nonce() -> [u8; NONCE_BYTES] {
    let mut bytes = [0u8; NONCE_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
}

/// A nonce from its hex form on the wire; `None` unless it is exactly [`NONCE_BYTES`] bytes.
pub fn parse_nonce(hex_text: &str) -> Option<[u8; NONCE_BYTES]> {
    let bytes = hex::decode(hex_text).ok()?;
    bytes.try_into().ok()
}

/// Which end of the connection a proof speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The replica that opened the connection.
    Dialler,
    /// The replica that accepted it.
    Listener,
}

impl Side {
    fn label(self) -> &'static [u8] {
        match self {
            Side::Dialler => b"replichat/peer-auth/v2/dialler\0",
            Side::Listener => b"replichat/peer-auth/v2/listener\0",
        }
    }
}

/// One handshake's identities and nonces: what both proofs are computed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transcript {
    /// The dialling replica's id.
    pub dialler: u64,
    /// The listening replica's id.
    pub listener: u64,
    /// The dialler's nonce.
    pub dialler_nonce: [u8; NONCE_BYTES],
    /// The listener's nonce.
    pub listener_nonce: [u8; NONCE_BYTES],
    /// The replication format both ends speak (each end puts its own: the proofs match only if they agree).
    pub format: u32,
}

/// The replication format this replica speaks: [`replichat_shared::REPLICATION_FORMAT`], unless a test
/// starts it as a build of another format would (`REPLICHAT_TEST_REPLICATION_FORMAT`, read once).
pub fn own_format() -> u32 {
    static FORMAT: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *FORMAT.get_or_init(|| {
        std::env::var("REPLICHAT_TEST_REPLICATION_FORMAT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(replichat_shared::REPLICATION_FORMAT)
    })
}

/// Why a peer of `theirs` is refused by a replica of `ours`: for the logs of both ends and the status.
pub fn format_mismatch(ours: u32, theirs: u32) -> String {
    format!("the peer speaks replication format {theirs}, this replica {ours}")
}

/// The reason a listener closes with when it refuses a dialler of another format: its own format, which the
/// dialler reads back with [`format_of_refusal`].
pub fn format_refusal(ours: u32) -> String {
    format!("replication format {ours}")
}

/// The listener's format in a close reason made by [`format_refusal`].
pub fn format_of_refusal(reason: &str) -> Option<u32> {
    reason.strip_prefix("replication format ")?.parse().ok()
}

/// The key both proofs are made with, derived from the cluster secret. Deliberately not `Debug`.
#[derive(Clone)]
pub struct PeerKey([u8; 32]);

impl PeerKey {
    /// `K = HMAC-SHA256(secret, "replichat/peer-key/v1")`: the secret itself is never a MAC key on the wire's
    /// data, and a key for another purpose can be derived from the same secret with another label.
    pub fn derive(secret: &str) -> PeerKey {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        mac.update(b"replichat/peer-key/v1");
        PeerKey(mac.finalize().into_bytes().into())
    }

    /// The proof `side` sends for `transcript`, hex-encoded as on the wire.
    pub fn proof(&self, side: Side, transcript: &Transcript) -> String {
        hex::encode(self.mac(side, transcript).finalize().into_bytes())
    }

    /// Whether `presented` (hex, from the wire) is `side`'s proof for `transcript`, compared in constant time.
    pub fn verify(&self, side: Side, transcript: &Transcript, presented: &str) -> bool {
        let Ok(presented) = hex::decode(presented) else { return false };
        let expected = self.mac(side, transcript).finalize().into_bytes();
        presented.len() == expected.len() && bool::from(presented.as_slice().ct_eq(expected.as_slice()))
    }

    fn mac(&self, side: Side, t: &Transcript) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(side.label());
        mac.update(&t.dialler.to_be_bytes());
        mac.update(&t.listener.to_be_bytes());
        mac.update(&t.dialler_nonce);
        mac.update(&t.listener_nonce);
        mac.update(&t.format.to_be_bytes());
        mac
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript() -> Transcript {
        Transcript { dialler: 0, listener: 2, dialler_nonce: nonce(), listener_nonce: nonce(), format: 1 }
    }

    #[test]
    fn a_proof_verifies_only_for_its_key_side_ids_nonces_and_format() {
        let key = PeerKey::derive("secret");
        let t = transcript();
        let proof = key.proof(Side::Dialler, &t);
        assert!(key.verify(Side::Dialler, &t, &proof));
        assert!(!PeerKey::derive("secret2").verify(Side::Dialler, &t, &proof), "another secret");
        assert!(!key.verify(Side::Listener, &t, &proof), "a dialler's proof is not a listener's");
        for other in [
            Transcript { dialler: 1, ..t },
            Transcript { listener: 1, ..t },
            Transcript { dialler: 2, listener: 0, ..t },
            Transcript { dialler_nonce: nonce(), ..t },
            Transcript { listener_nonce: nonce(), ..t },
            Transcript { format: 2, ..t },
        ] {
            assert!(!key.verify(Side::Dialler, &other, &proof), "{other:?}");
        }
        assert!(!key.verify(Side::Dialler, &t, ""), "empty");
        assert!(!key.verify(Side::Dialler, &t, &proof[..62]), "truncated");
        assert!(!key.verify(Side::Dialler, &t, "zz"), "not hex");
    }

    #[test]
    fn a_format_refusal_reads_back_as_the_listeners_format() {
        assert_eq!(format_of_refusal(&format_refusal(7)), Some(7));
        assert_eq!(format_of_refusal("replication format x"), None);
        assert_eq!(format_of_refusal("wrong proof"), None);
        assert_eq!(format_mismatch(1, 7), "the peer speaks replication format 7, this replica 1");
    }

    #[test]
    fn the_secret_is_not_in_a_proof_and_nonces_are_fresh() {
        let key = PeerKey::derive("secret-visible");
        let proof = key.proof(Side::Listener, &transcript());
        assert!(!proof.contains(&hex::encode("secret-visible")));
        assert_ne!(nonce(), nonce());
        assert_eq!(parse_nonce(&hex::encode(nonce())).map(|n| n.len()), Some(NONCE_BYTES));
        assert_eq!(parse_nonce("00"), None);
        assert_eq!(parse_nonce("not hex"), None);
    }
}
