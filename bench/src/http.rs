//! A minimal HTTP/1.1 GET over a fresh TCP connection: enough for `/api/cluster` polls without an HTTP
//! client crate.

use std::time::Duration;

use anyhow::{bail, Context};
use replichat_shared::ClusterStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on `addr` (`host:port`): status code and body. Times out after 2 s.
pub async fn get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    tokio::time::timeout(Duration::from_secs(2), async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        // Over TLS when the replicas serve it (the simulated multi-machine runs).
        let mut stream: Box<dyn replichat::tls::Io> = match crate::tls::client_for(addr) {
            Some(config) => {
                let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host);
                let name = replichat::tls::server_name(host).map_err(anyhow::Error::msg)?;
                Box::new(tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?)
            }
            None => Box::new(tcp),
        };
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        let text = String::from_utf8(raw).context("response is not UTF-8")?;
        let (head, body) = text.split_once("\r\n\r\n").context("no end of headers")?;
        let status = head.split_whitespace().nth(1).context("no status")?.parse()?;
        let chunked = head.lines().any(|l| {
            let l = l.to_ascii_lowercase();
            l.starts_with("transfer-encoding:") && l.contains("chunked")
        });
        let body = if chunked { dechunk(body)? } else { body.to_owned() };
        Ok((status, body))
    })
    .await
    .context("timed out")?
}

/// `GET /api/cluster` on `addr`, parsed.
pub async fn cluster_status(addr: &str) -> anyhow::Result<ClusterStatus> {
    let (status, body) = get(addr, "/api/cluster").await?;
    if status != 200 {
        bail!("/api/cluster answered {status}");
    }
    Ok(serde_json::from_str(&body)?)
}

fn dechunk(mut rest: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").context("bad chunk")?;
        let size = usize::from_str_radix(size.trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(after.get(..size).context("short chunk")?);
        rest = after.get(size + 2..).context("short chunk")?;
    }
}
