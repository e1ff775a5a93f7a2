//! Replicas on separate (simulated) machines, for the bench (`bench --netsim-rtt-ms`) and the cluster test
//! suite (`Options::netsim`): each replica in its own network namespace with its own address (`<subnet>.1`,
//! `.2`, ...), joined by veth links to a bridge that the caller (in the root namespace, `<subnet>.254`) also
//! sits on, and a one-way delay on every packet a replica sends.
//!
//! `tc netem` is the usual tool for the delay, but this machine's kernel is built without `sch_netem`
//! (`CONFIG_NET_SCH_NETEM` is not set; `tc qdisc add ... netem` answers "qdisc kind is unknown"). The delay is
//! made with NFQUEUE instead, which the kernel has: in each replica's namespace, an iptables rule queues
//! every packet leaving its link to a delayer (a thread of the calling process that entered that namespace
//! with setns(2) before opening its queue), which gives each packet back to the kernel (verdict accept)
//! `delay` after it arrived, in arrival order. Between two replicas a packet is delayed once each way, so the
//! round trip gains 2 × `delay`; between the caller and a replica, only the replica's answers are delayed.
//!
//! The delayers also make partitions ([`Net::isolate`]): a packet from a replica to one it is cut off from is
//! dropped instead of accepted (silently, as on a cut cable: the sender is told nothing), including packets
//! already on their way. All links are cut at once (one shared set), so no replica goes on hearing another a
//! little longer than the rest, as it would with firewall rules added one namespace after the other.
//!
//! [`Net`] makes the namespaces, links, rules and delayers and removes them on drop (also when a test
//! panics); traffic stays on the bridge. Each user has its own [`Layout`] (name prefix and subnet), so the
//! bench's runs and the cluster tests never touch each other's namespaces; within one layout, one [`Net`] at
//! a time on the machine (the names are fixed: [`Net::create`] waits for a lock file, also held by another
//! process, e.g. another checkout's test run; leftovers of an interrupted run are removed by the next one).
//! Needs root, `ip` and `iptables-legacy`.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// The names and addresses one user of the simulated network takes.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Prefix of every name made (namespaces `<prefix>0..`, links `<prefix>0-h..`, bridge `<prefix>-br`), so a
    /// leftover is found by name. At most 9 characters (Linux link names have at most 15).
    pub prefix: &'static str,
    /// The first three octets of the /24 on the bridge.
    pub subnet: &'static str,
}

impl Layout {
    /// `bench load`/`bench chaos --netsim-rtt-ms` and bench/tests/chaos.rs.
    pub const BENCH: Layout = Layout { prefix: "rcsim", subnet: "10.77.0" };
    /// The cluster test suite (backend/tests/cluster).
    pub const CLUSTER_TESTS: Layout = Layout { prefix: "rctest", subnet: "10.78.0" };

    /// The namespace of replica `i`.
    pub fn namespace(&self, i: usize) -> String {
        format!("{}{i}", self.prefix)
    }

    /// Replica `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, i + 1)
    }

    /// The caller's address on the bridge (in the root namespace).
    pub fn host_addr(&self) -> String {
        format!("{}.254", self.subnet)
    }

    fn bridge(&self) -> String {
        format!("{}-br", self.prefix)
    }

    /// The root namespace's end of replica `i`'s link.
    fn host_link(&self, i: usize) -> String {
        format!("{}-h", self.namespace(i))
    }
}

/// The namespaces, links, rules and delayers of one simulated network; removed on drop.
#[derive(Debug)]
pub struct Net {
    layout: Layout,
    n: usize,
    /// Round-trip time added between two replicas.
    pub rtt: Duration,
    /// Tells the delayer threads to stop.
    stop: Arc<AtomicBool>,
    delayers: Vec<JoinHandle<()>>,
    /// The links cut ([`Net::isolate`]): (replica index, destination it cannot reach), read by the delayers.
    cuts: Cuts,
    /// The layout's lock file, locked while this network exists (released after `drop` removed it).
    _lock: std::fs::File,
}

/// (replica index, destination address) pairs whose packets the delayers drop.
type Cuts = Arc<Mutex<HashSet<(usize, Ipv4Addr)>>>;

fn run(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(args[0]).args(&args[1..]).status().with_context(|| format!("running {args:?}"))?;
    if !status.success() {
        bail!("{args:?} failed ({status})");
    }
    Ok(())
}

impl Net {
    /// Make `n` namespaces with a link each to a bridge in the root namespace, and delay every packet a
    /// replica sends by `rtt / 2` (see the module comment). Removes what an interrupted earlier run with the
    /// same layout left first. Waits while another network with this layout exists (in any process).
    pub fn create(layout: Layout, n: usize, rtt: Duration) -> anyhow::Result<Net> {
        let path = std::env::temp_dir().join(format!("replichat-netsim-{}.lock", layout.prefix));
        let lock = std::fs::File::options().create(true).truncate(false).write(true).open(&path)?;
        lock.lock().with_context(|| format!("locking {}", path.display()))?;
        remove_leftovers(layout);
        let stop = Arc::new(AtomicBool::new(false));
        let mut net = Net { layout, n, rtt, stop, delayers: Vec::new(), cuts: Cuts::default(), _lock: lock };
        let bridge = layout.bridge();
        run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        run(&["ip", "addr", "add", &format!("{}/24", layout.host_addr()), "dev", &bridge])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        for i in 0..n {
            let ns = layout.namespace(i);
            let host_side = layout.host_link(i);
            run(&["ip", "netns", "add", &ns])?;
            run(&["ip", "link", "add", &host_side, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            run(&["ip", "link", "set", &host_side, "master", &bridge, "up"])?;
            run(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", layout.addr(i)), "dev", "eth0"])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            // With a zero round trip too: the delayer also makes partitions.
            let (delay, stop, cuts) = (rtt / 2, net.stop.clone(), net.cuts.clone());
            net.delayers.push(Delayer { ns: ns.clone(), index: i, delay, stop, cuts }.spawn()?);
            // Packets leaving eth0 go to the delayer (listening already: they are all delayed).
            net.iptables(i, &["-A", "OUTPUT", "-o", "eth0", "-j", "NFQUEUE", "--queue-num", "0", "--queue-bypass"])?;
        }
        Ok(net)
    }

    /// The namespace of replica `i`.
    pub fn namespace(&self, i: usize) -> String {
        self.layout.namespace(i)
    }

    /// Replica `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        self.layout.addr(i)
    }

    /// A command that runs `program` inside replica `i`'s namespace (`ip netns exec` execs it: the child's
    /// pid is the program's).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.namespace(i)]).arg(program);
        command
    }

    /// Run `iptables-legacy args` in replica `i`'s namespace.
    fn iptables(&self, i: usize, args: &[&str]) -> anyhow::Result<()> {
        let status = self.command(i, "iptables-legacy").args(args).status().context("running iptables-legacy")?;
        if !status.success() {
            bail!("iptables-legacy {args:?} in {} failed ({status})", self.namespace(i));
        }
        Ok(())
    }

    /// A partition: every packet between replica `i` and any other replica is lost from now on, in both
    /// directions, all links at once (see the module comment). The caller in the root namespace still reaches
    /// all of them. Undone by [`Net::heal`].
    pub fn isolate(&self, i: usize) {
        let addr = |j: usize| self.addr(j).parse::<Ipv4Addr>().expect("an IPv4 address");
        let mut cuts = self.cuts.lock().expect("cuts lock");
        for other in (0..self.n).filter(|&o| o != i) {
            cuts.insert((i, addr(other)));
            cuts.insert((other, addr(i)));
        }
    }

    /// Reconnect every replica.
    pub fn heal(&self) {
        self.cuts.lock().expect("cuts lock").clear();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for delayer in self.delayers.drain(..) {
            let _ = delayer.join();
        }
        // Deleting a veth end deletes its peer; deleting a namespace removes its rules.
        for i in 0..self.n {
            let _ = Command::new("ip").args(["link", "del", &self.layout.host_link(i)]).status();
            let _ = Command::new("ip").args(["netns", "del", &self.namespace(i)]).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.layout.bridge()]).status();
    }
}

/// Remove whatever an earlier, interrupted run with `layout` left.
fn remove_leftovers(layout: Layout) {
    let quiet = || Stdio::null();
    for i in 0..8 {
        let _ = Command::new("ip").args(["link", "del", &layout.host_link(i)]).stderr(quiet()).status();
        let _ = Command::new("ip").args(["netns", "del", &layout.namespace(i)]).stderr(quiet()).status();
    }
    let _ = Command::new("ip").args(["link", "del", &layout.bridge()]).stderr(quiet()).status();
}

/// The delayer of replica `index`'s namespace `ns`.
struct Delayer {
    ns: String,
    index: usize,
    delay: Duration,
    stop: Arc<AtomicBool>,
    cuts: Cuts,
}

impl Delayer {
    /// A thread that enters the namespace and runs [`Delayer::run`] on queue 0 there until `stop`; returns
    /// once the queue is bound.
    fn spawn(self) -> anyhow::Result<JoinHandle<()>> {
        let ns = self.ns.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new().name(format!("delay-{ns}")).spawn(move || {
            let path = format!("/var/run/netns/{}", self.ns);
            let entered = std::fs::File::open(&path).with_context(|| format!("opening {path}")).and_then(|file| {
                // Only this thread changes namespace; the queue opened next belongs to `ns`.
                let network = Some(rustix::thread::LinkNameSpaceType::Network);
                rustix::thread::move_into_link_name_space(file.as_fd(), network)
                    .with_context(|| format!("setns into {path}"))
            });
            if let Err(e) = entered.and_then(|()| self.run(0, &ready_tx)) {
                // After a failed start the receiver has the error; a failure later is only reported here.
                let message = format!("{e:#}");
                if ready_tx.send(Err(e)).is_err() {
                    eprintln!("netsim: the delayer in {path} stopped: {message}");
                }
            }
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(thread),
            Ok(Err(e)) => Err(e.context("starting the delayer (root needed)")),
            Err(_) => bail!("the delayer thread for {ns} ended before it started"),
        }
    }

    /// Take every packet NFQUEUE `queue_num` gives and, `delay` after it arrived and in arrival order, accept
    /// it, or drop it when its link is cut by then. Says `Ok` on `ready` once the queue is bound.
    fn run(&self, queue_num: u16, ready: &std::sync::mpsc::SyncSender<anyhow::Result<()>>) -> anyhow::Result<()> {
        let mut queue = nfq::Queue::open().context("opening the netfilter queue (root needed)")?;
        queue.bind(queue_num).context("binding the netfilter queue")?;
        // The IPv4 header only (its destination tells a cut link); the verdict does not need the packet back.
        queue.set_copy_range(queue_num, 20)?;
        queue.set_recv_gso(queue_num, true)?;
        queue.set_queue_max_len(queue_num, 65_536)?;
        queue.set_nonblocking(true);
        let _ = ready.send(Ok(()));
        let mut pending: std::collections::VecDeque<(Instant, nfq::Message)> = std::collections::VecDeque::new();
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            while pending.front().is_some_and(|(due, _)| *due <= now) {
                let (_, mut msg) = pending.pop_front().expect("front");
                let cut = self.is_cut(msg.get_payload());
                msg.set_verdict(if cut { nfq::Verdict::Drop } else { nfq::Verdict::Accept });
                queue.verdict(msg)?;
            }
            match queue.recv() {
                Ok(msg) => pending.push_back((Instant::now() + self.delay, msg)),
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
        Ok(())
    }

    /// Whether the IPv4 packet starting with `header` goes to a replica this one is cut off from.
    fn is_cut(&self, header: &[u8]) -> bool {
        let Some(&[a, b, c, d]) = header.get(16..20) else { return false };
        let cuts = self.cuts.lock().expect("cuts lock");
        !cuts.is_empty() && cuts.contains(&(self.index, Ipv4Addr::new(a, b, c, d)))
    }
}
