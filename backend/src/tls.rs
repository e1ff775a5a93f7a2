//! TLS for real networks: the listener's certificate (`--tls-cert`, `--tls-key`: clients and peers then
//! connect with `https://` and `wss://`), the certificate authorities a replica trusts when it dials an
//! `https://` peer (`--tls-ca`), and the warning for plain `http://` peers that are not on loopback.
//!
//! rustls with the `ring` provider; certificates and keys are PEM files. The peer handshake of
//! [`crate::peer_auth`] still runs inside TLS: TLS proves the listener holds a certificate the dialler's CAs
//! signed for the host in the peer URL, and keeps frames secret and unaltered on the way; the handshake proves
//! both ends know the cluster secret.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::Peer;
use crate::{Error, Result};

/// Anything a WebSocket can run over: plain TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn bad(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::BadRequest(format!("{what} {}: {e}", path.display()))
}

/// The listener's TLS configuration from a PEM certificate chain (leaf first) and its PEM private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad("--tls-cert", cert, e))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad("--tls-cert", cert, e))?;
    if chain.is_empty() {
        return Err(bad("--tls-cert", cert, "no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("--tls-key", key, e))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::BadRequest(format!("TLS: {e}")))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| Error::BadRequest(format!("--tls-cert and --tls-key do not go together: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS configuration for dialling `https://` peers: trust exactly the certificate authorities in the PEM
/// file `ca` (a private CA that signed every replica's certificate, or a public CA bundle).
pub fn client_config(ca: &Path) -> Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| bad("--tls-ca", ca, e))? {
        roots.add(cert.map_err(|e| bad("--tls-ca", ca, e))?).map_err(|e| bad("--tls-ca", ca, e))?;
    }
    if roots.is_empty() {
        return Err(bad("--tls-ca", ca, "no certificate in the file"));
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::BadRequest(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The name a peer's certificate must carry: the host of its URL (a DNS name or an IP address).
pub fn server_name(host: &str) -> std::result::Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned()).map_err(|e| format!("{host:?} cannot be checked against a certificate: {e}"))
}

/// Whether a URL's host is a loopback address or `localhost`.
fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.rsplit_once(':').map_or(authority, |(host, _)| host),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Check the peer list against the TLS flags: `https://` peers need `--tls-ca`, an `https://` URL for this
/// replica needs its certificate. Warn, once per peer, about plain `http://` peers off loopback: the handshake
/// keeps the secret off the wire, but everything after it could be read and altered there.
pub fn check_peers(id: u64, peers: &[Peer], has_cert: bool, has_ca: bool) -> Result<()> {
    for peer in peers {
        let https = peer.url.starts_with("https://");
        if peer.id == id {
            if https && !has_cert {
                return Err(Error::BadRequest(format!(
                    "this replica's URL {} is https://: give its certificate with --tls-cert and --tls-key",
                    peer.url
                )));
            }
        } else if https && !has_ca {
            return Err(Error::BadRequest(format!(
                "peer {} is at an https:// URL ({}): give the certificate authorities to trust with --tls-ca",
                peer.id, peer.url
            )));
        } else if !https && !is_loopback(&peer.url) {
            tracing::warn!(
                peer = peer.id,
                url = %peer.url,
                "plain http:// to a peer off loopback: replication traffic can be read and altered on the way; \
                 use https:// peer URLs (--tls-cert, --tls-key, --tls-ca) unless this network is trusted"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_recognised() {
        for url in ["http://127.0.0.1:9100", "http://localhost:1", "http://[::1]:80", "http://127.0.0.2"] {
            assert!(is_loopback(url), "{url}");
        }
        for url in ["http://10.0.0.1:9100", "http://chat.example.com", "http://[fe80::1]:80", "http://localhost.evil"] {
            assert!(!is_loopback(url), "{url}");
        }
    }

    #[test]
    fn https_peers_need_the_flags() {
        let peers =
            vec![Peer { id: 0, url: "https://127.0.0.1:1".into() }, Peer { id: 1, url: "https://127.0.0.1:2".into() }];
        assert!(check_peers(0, &peers, false, true).unwrap_err().to_string().contains("--tls-cert"));
        assert!(check_peers(0, &peers, true, false).unwrap_err().to_string().contains("--tls-ca"));
        assert!(check_peers(0, &peers, true, true).is_ok());
    }
}
