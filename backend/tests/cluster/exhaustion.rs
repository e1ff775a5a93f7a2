//! File-descriptor exhaustion, against the real binary with a low descriptor limit (`ulimit -n`): one
//! address flooding idle connections must not take the replica's descriptors, and when the descriptors do
//! run out, `accept` backs off (no spinning) and serving resumes once connections close.

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::Child;
use tokio::time::Instant;

use crate::step;

/// One replica running alone under `ulimit -n <fds>`, on SQLite in a temp dir.
struct Replica {
    child: Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

impl Replica {
    async fn start(fds: u32, args: &[&str]) -> Replica {
        let dir = std::env::temp_dir().join("replichat-cluster-tests").join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let log = dir.join("node0.log");
        let db = format!("sqlite://{}", dir.join("node0.db").display());
        let mut child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {fds} && exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_replichat"))
            .args(["serve", "--listen", &addr.to_string(), "--db", &db, "--log", "info"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn replichat");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let listening = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("listening on") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(listening, Ok(true), "the replica starts; log:\n{}", std::fs::read_to_string(&log).unwrap());
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Replica { child, addr, log }
    }

    /// User + system CPU seconds the replica has used.
    fn cpu_seconds(&self) -> f64 {
        let pid = self.child.id().unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
        (rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap()) as f64 / 100.0
    }
}

async fn tcp_from(from: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::from(from), 0))?;
    socket.connect(to).await
}

/// `GET /healthz` from `from`, within `within`: the status code, or why not.
async fn healthz_from(from: [u8; 4], to: SocketAddr, within: Duration) -> Result<u16, String> {
    tokio::time::timeout(within, async {
        let mut tcp = tcp_from(from, to).await.map_err(|e| e.to_string())?;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: replichat\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.map_err(|e| e.to_string())?;
        response.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or(format!("bad answer {response:?}"))
    })
    .await
    .map_err(|_| format!("no answer within {within:?}"))?
}

/// Open `n` idle TCP connections from 127.0.0.1 (never a byte sent).
async fn flood(to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut open = Vec::new();
    for _ in 0..n {
        if let Ok(tcp) = tcp_from([127, 0, 0, 1], to).await {
            open.push(tcp);
        }
    }
    open
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_flooding_idle_connections_cannot_exhaust_the_descriptors() {
    let replica = Replica::start(256, &["--max-connections-per-ip", "50"]).await;
    step!("flooding {} from 127.0.0.1 with 600 idle connections (the replica may open 256 files)", replica.addr);
    let held = flood(replica.addr, 600).await;
    step!("{} connections opened; /healthz from 127.0.0.2", held.len());
    let deadline = Instant::now() + Duration::from_secs(5);
    for _ in 0..5 {
        let status = healthz_from([127, 0, 0, 2], replica.addr, deadline - Instant::now()).await;
        assert_eq!(
            status,
            Ok(200),
            "/healthz from another address; log:\n{}",
            std::fs::read_to_string(&replica.log).unwrap()
        );
    }
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_accept_backs_off_and_serving_resumes() {
    let replica = Replica::start(128, &["--max-connections-per-ip", "0", "--header-timeout-ms", "2000"]).await;
    let held = flood(replica.addr, 300).await;
    step!("{} idle connections open; the replica is out of descriptors", held.len());
    let before = replica.cpu_seconds();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = replica.cpu_seconds() - before;
    assert!(used < 0.3, "accept errors must not spin a core: {used:.2} CPU s in 1 s");
    // The request-head deadline closes the idle connections; their descriptors come back.
    let status = healthz_from([127, 0, 0, 2], replica.addr, Duration::from_secs(10)).await;
    assert_eq!(status, Ok(200), "serving resumes; log:\n{}", std::fs::read_to_string(&replica.log).unwrap());
    let log = std::fs::read_to_string(&replica.log).unwrap();
    assert!(log.contains("accept error; backing off"), "the exhaustion is logged:\n{log}");
    drop(held);
}
