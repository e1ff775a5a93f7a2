//! Replicas on separate (simulated) machines: each replica in its own network namespace with its own address
//! (10.77.0.1, .2, ...), joined by veth links to a bridge that the bench (in the root namespace, 10.77.0.254)
//! also sits on, and a one-way delay on every packet a replica sends.
//!
//! `tc netem` is the usual tool for the delay, but this machine's kernel is built without `sch_netem`
//! (`CONFIG_NET_SCH_NETEM` is not set; `tc qdisc add ... netem` answers "qdisc kind is unknown"). The delay is
//! made with NFQUEUE instead, which the kernel has: in each replica's namespace, an iptables rule queues
//! every packet leaving its link to a delayer process (`bench delay`, running in that namespace), which gives
//! each packet back to the kernel (verdict accept) `delay` after it arrived, in arrival order. Between two
//! replicas a packet is delayed once each way, so the round trip gains 2 × `delay`; between the bench and a
//! replica, only the replica's answers are delayed. The rules and namespaces are made and removed by
//! [`Net`]; traffic stays on the bridge.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Prefix of every name this module creates (namespaces, links), so a leftover from a crashed run is found.
const PREFIX: &str = "rcsim";
/// The bridge's address in the root namespace (the bench's side).
const BENCH_ADDR: &str = "10.77.0.254/24";

/// The namespaces, links, rules and delayers of one simulated network; removed on drop.
#[derive(Debug)]
pub struct Net {
    n: usize,
    /// Round-trip time added between two replicas.
    pub rtt: Duration,
    delayers: Vec<std::process::Child>,
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(args[0]).args(&args[1..]).status().with_context(|| format!("running {args:?}"))?;
    if !status.success() {
        bail!("{args:?} failed ({status})");
    }
    Ok(())
}

impl Net {
    /// The namespace of replica `i`.
    pub fn namespace(i: usize) -> String {
        format!("{PREFIX}{i}")
    }

    /// Replica `i`'s address.
    pub fn addr(i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    /// Make `n` namespaces with a link each to a bridge in the root namespace, and delay every packet a
    /// replica sends by `rtt / 2` (see the module comment), with `bench` (the bench binary) as the delayer.
    /// Needs root, `ip` and `iptables-legacy`.
    pub fn create(n: usize, rtt: Duration, bench: &std::path::Path) -> anyhow::Result<Net> {
        Net::remove_leftovers();
        let bridge = format!("{PREFIX}-br");
        run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        let mut net = Net { n, rtt, delayers: Vec::new() };
        run(&["ip", "addr", "add", BENCH_ADDR, "dev", &bridge])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        let one_way_us = (rtt / 2).as_micros().to_string();
        for i in 0..n {
            let ns = Net::namespace(i);
            let host_side = format!("{ns}-h");
            run(&["ip", "netns", "add", &ns])?;
            run(&["ip", "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            run(&["ip", "link", "set", &host_side, "master", &bridge, "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", Net::addr(i)), "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            if !rtt.is_zero() {
                let child = Command::new("ip")
                    .args(["netns", "exec", &ns])
                    .arg(bench)
                    .args(["delay", "--queue", "0", "--delay-us", &one_way_us])
                    .spawn()
                    .context("starting the delayer")?;
                net.delayers.push(child);
                // Packets leaving eth0 go to the delayer; while it is not listening yet they pass undelayed.
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    &ns,
                    "iptables-legacy",
                    "-A",
                    "OUTPUT",
                    "-o",
                    "eth0",
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    "0",
                    "--queue-bypass",
                ])?;
            }
        }
        Ok(net)
    }

    /// Remove whatever an earlier, interrupted run left.
    fn remove_leftovers() {
        for i in 0..8 {
            let quiet = || std::process::Stdio::null();
            let _ =
                Command::new("ip").args(["link", "del", &format!("{}-h", Net::namespace(i))]).stderr(quiet()).status();
            let _ = Command::new("ip").args(["netns", "del", &Net::namespace(i)]).stderr(quiet()).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &format!("{PREFIX}-br")])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for child in &mut self.delayers {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deleting a veth end deletes its peer; deleting a namespace removes its rules.
        for i in 0..self.n {
            let _ = Command::new("ip").args(["link", "del", &format!("{}-h", Net::namespace(i))]).status();
            let _ = Command::new("ip").args(["netns", "del", &Net::namespace(i)]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &format!("{PREFIX}-br")]).status();
    }
}

/// The delayer (`bench delay`): take every packet NFQUEUE `queue` gives this process and accept it `delay`
/// after it arrived, in arrival order. Runs until killed.
pub fn delay_loop(queue_num: u16, delay: Duration) -> anyhow::Result<()> {
    let mut queue = nfq::Queue::open().context("opening the netfilter queue (root needed)")?;
    queue.bind(queue_num).context("binding the netfilter queue")?;
    // Metadata only: the verdict does not need the payload back.
    queue.set_copy_range(queue_num, 0)?;
    queue.set_recv_gso(queue_num, true)?;
    queue.set_queue_max_len(queue_num, 65_536)?;
    queue.set_nonblocking(true);
    let mut pending: std::collections::VecDeque<(Instant, nfq::Message)> = std::collections::VecDeque::new();
    loop {
        let now = Instant::now();
        while pending.front().is_some_and(|(due, _)| *due <= now) {
            let (_, mut msg) = pending.pop_front().expect("front");
            msg.set_verdict(nfq::Verdict::Accept);
            queue.verdict(msg)?;
        }
        match queue.recv() {
            Ok(msg) => pending.push_back((Instant::now() + delay, msg)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Nothing arrived: sleep until the next packet is due, or briefly to look again.
                let next = pending.front().map_or(Duration::from_micros(200), |(due, _)| {
                    due.saturating_duration_since(Instant::now()).min(Duration::from_micros(200))
                });
                std::thread::sleep(next);
            }
            Err(e) => return Err(e.into()),
        }
    }
}
