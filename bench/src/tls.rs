//! TLS for the simulated multi-machine runs ([`crate::netsim`]): a CA made for the run, one certificate it
//! signed for every replica address, and the client configuration the bench's own connections (WebSockets
//! and `/api/cluster` polls) use once [`make`] has run.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;

/// What the latest [`make`] set up (each run makes its own CA).
static CLIENT: Mutex<Option<(Arc<rustls::ClientConfig>, Vec<String>)>> = Mutex::new(None);

/// The client configuration for `addr` (`host:port`), when it is a replica that serves TLS.
pub fn client_for(addr: &str) -> Option<Arc<rustls::ClientConfig>> {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
    let current = CLIENT.lock().expect("TLS client lock");
    current.as_ref().filter(|(_, hosts)| hosts.iter().any(|h| h == host)).map(|(config, _)| config.clone())
}

/// Make a CA and a certificate for `hosts` in `dir`; return the replica flags that use them, and make the
/// bench's connections trust that CA.
pub fn make(dir: &Path, hosts: &[String]) -> anyhow::Result<Vec<String>> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "replichat bench CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let cert = CertificateParams::new(hosts.to_vec())?.signed_by(&key, &ca, &ca_key)?;
    let (ca_path, cert_path, key_path) = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&ca_path, ca.pem())?;
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    let client = replichat::tls::client_config(&ca_path).context("the bench's own TLS configuration")?;
    *CLIENT.lock().expect("TLS client lock") = Some((client, hosts.to_vec()));
    let path = |p: &Path| p.display().to_string();
    Ok(vec![
        "--tls-cert".into(),
        path(&cert_path),
        "--tls-key".into(),
        path(&key_path),
        "--tls-ca".into(),
        path(&ca_path),
    ])
}
