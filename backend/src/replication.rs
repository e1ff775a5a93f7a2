//! Replication: terms, elections and log shipping between replicas (Raft's rules, with a preference for the
//! lowest live id), and the commit index they agree on.
//!
//! One task owns all of it ([`Core`]): it reads inputs (frames from peers, proposals from the local primary,
//! timer ticks) one at a time, so there are no locks. It knows entries only as opaque `(index, term, op)`;
//! applying committed entries is someone else's job (the chat's applier watches [`Status::commit_index`]).
//!
//! The rules, as the code implements them (docs/ARCHITECTURE.md has the prose and the failure timeline):
//! - Terms and votes are persisted before a replica acts on them. A frame with a higher term makes the
//!   receiver adopt it and become a backup; requests with a lower term are refused. A term beyond what the
//!   sender could have reached (more than `MAX_TERM_LEAP` above ours) is refused and logged, never adopted, and
//!   term arithmetic is checked: nothing wraps at 2^64-1.
//! - An election starts when a backup has not heard a primary for its election timeout: the base timeout
//!   plus half of it for each lower id (not counting the primary it last followed) plus ≤10 % jitter, so the
//!   lowest live id tries first. It first asks for pre-votes
//!   (no term change), so a replica cut off from the others cannot inflate its term and disrupt the cluster
//!   when it returns; a replica that heard a primary recently refuses both pre-votes and votes.
//! - A vote is granted at most once per term, to a candidate whose log is at least as up to date (last term,
//!   then last index). A majority of votes makes a primary, so each term has at most one primary, and it holds
//!   every committed entry.
//! - A new primary appends a no-op entry of its own term; an entry is committed once it is durable on a
//!   majority and the primary's current-term no-op is among them.
//! - A primary that has not heard a majority within the election timeout steps down: an isolated primary stops
//!   acknowledging writes within one timeout.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use replichat_shared::{Election, PeerFrame, PeerHandshake, ReplicaView, WireEntry};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::config::{Ack, Peer};
use crate::peer_auth::{self, PeerKey, Side, Transcript};
use crate::storage::{Db, SnapshotInstall};
use crate::{Error, Result};

/// Most entries one `append` frame carries (catch-up goes in batches of this many).
const BATCH: u32 = 256;
/// Queue depth towards one peer; a full queue drops frames (the primary resends on the next heartbeat).
const OUTBOUND_DEPTH: usize = 64;
/// Most entries sent to one backup and not yet acknowledged (pipelining). Beyond it the primary sends that
/// backup heartbeats only (they follow the entries in flight on the same connection), until answers come
/// back: a backup far behind on a slow link otherwise got a new
/// 256-entry batch with every group commit, the queue towards it overflowed, dropped batches left gaps that it
/// refused, and the rewinds resent what was still on its way (measured across a 20 ms round trip under 200
/// msg/s: a restarted backup caught up at 130 entries/s, slower than the log grew, and never caught up).
const MAX_IN_FLIGHT: u64 = 4 * BATCH as u64;
/// Target size of one `snapshot_chunk` frame's rows, as JSON. Small enough that the chunks in flight (see
/// [`SNAPSHOT_WINDOW`]) are a few MiB whatever the state's size, large enough that the per-frame costs vanish.
const SNAPSHOT_CHUNK_BYTES: usize = 256 << 10;
/// Snapshot chunks sent to a backup and not yet acknowledged, at most: the stream's own flow control, so a
/// slow backup slows the primary's read instead of making it buffer the state (and leaves the outbound queue
/// room for other frames).
const SNAPSHOT_WINDOW: u64 = 8;
/// Furthest a frame's term may be ahead of the receiver's. Terms grow by one per election, and pre-votes keep
/// a cut-off replica from raising its own, so no real cluster gets near this; a frame beyond it is a bug or
/// an attack, and adopting it could exhaust the term space (a replica at 2^64-1 can never start an election).
const MAX_TERM_LEAP: u64 = 1 << 32;
/// Pause between attempts to reach a peer that is down.
const REDIAL: Duration = Duration::from_millis(100);
/// After the primary's connection closed, a refused pre-vote is asked again this many times per heartbeat, for
/// one election timeout.
const PRE_VOTE_RETRIES_PER_HEARTBEAT: u32 = 4;

/// A replica's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Accepts client writes and ships the log.
    Primary,
    /// Follows a primary.
    Backup,
    /// Asking for votes.
    Candidate,
}

impl Role {
    /// The name used by `/api/cluster`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
            Role::Candidate => "candidate",
        }
    }
}

/// What the replication core publishes after every input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// This replica's role.
    pub role: Role,
    /// Its current term.
    pub term: u64,
    /// The primary it follows (or itself), if known.
    pub leader: Option<u64>,
    /// Highest index durable on a majority (as far as this replica knows).
    pub commit_index: u64,
    /// Highest index in the local log.
    pub last_index: u64,
    /// Every replica as this one sees it.
    pub replicas: Vec<ReplicaView>,
    /// The elections this replica has seen since it started, oldest first (the last [`ELECTIONS_KEPT`]).
    pub elections: Vec<Election>,
    /// While primary: the index of this term's first entry (its no-op). Everything before it came from earlier
    /// terms; once it is applied, every write this replica did not propose itself is in the state tables.
    pub term_start: Option<u64>,
    /// Transactions that appended local proposals (group commits) since start.
    pub proposal_batches: u64,
    /// Entries those transactions appended.
    pub proposed_entries: u64,
    /// Why this replica's storage failed, if it failed within the last two election timeouts (`/healthz`
    /// answers 503 meanwhile).
    pub storage_failure: Option<String>,
    /// False while this replica is a learner: its database is new (or taken over, or restored), so it does
    /// not vote or stand for election, and its acknowledgements do not count, until it has caught up.
    pub voter: bool,
}

/// The part of the status that client sockets and waiters need: whether this replica is primary, and in
/// which term. Published only when it changes (the whole [`Status`] changes with every acknowledgement).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leadership {
    pub role: Role,
    pub term: u64,
}

/// Timings from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Interval between heartbeats from the primary.
    pub heartbeat: Duration,
    /// Base election timeout (also the primary's step-down timeout and the liveness window).
    pub election: Duration,
    /// The commit rule.
    pub ack: Ack,
}

/// An op the local primary wants appended.
struct Proposal {
    /// The index the proposer built the op for, if it depends on it; refused if it is not next.
    expected: Option<u64>,
    op: String,
    reply: oneshot::Sender<Result<u64>>,
}

/// Most proposals appended in one transaction (one fsync) and shipped in one frame.
const MAX_GROUP: usize = 512;

/// Most entries a primary keeps in memory at the end of its log ([`Core::tail`]): what is in flight to every
/// backup, with room to spare; a backup further behind is sent entries read from the database.
const TAIL: usize = 2 * MAX_IN_FLIGHT as usize;

enum Input {
    /// A request from a peer (`append`, `vote`), to be answered on `reply`.
    Request { frame: PeerFrame, reply: oneshot::Sender<PeerFrame> },
    /// An answer from a peer to one of our requests.
    Response(PeerFrame),
    /// The connection to a peer opened (true) or closed (false).
    Reachable(u64, bool),
    /// What answers at a peer's URL refused our handshake, and why (another replication format, another
    /// secret), shown in the status until a connection to it opens; `None`: the last attempt failed
    /// otherwise (nothing answered), which is no refusal.
    Refused(u64, Option<String>),
    /// The background task streaming snapshot `stream` to `peer` finished: every chunk sent, or given up.
    SnapshotDone { peer: u64, stream: u64, sent: bool },
    /// Applying committed entries failed for a machine reason (the state tables' disk is full, ...).
    ApplyFailed(String),
}

/// Handle on the replication core. Cheap to clone.
#[derive(Clone)]
pub struct Replication {
    inbox: mpsc::Sender<Input>,
    proposals: mpsc::Sender<Proposal>,
    status: watch::Receiver<Status>,
    leadership: watch::Receiver<Leadership>,
    commit: watch::Receiver<u64>,
    /// This replica's id.
    pub id: u64,
    /// Every replica, this one included, by id.
    pub peers: BTreeMap<u64, String>,
}

impl Replication {
    /// Start the core and one dialer per other replica. `noop` is the op a new primary appends. Connections
    /// to peers leave from `bind_ip` when given (the replica's own address, so that a firewall rule on
    /// addresses can cut a replica off, as the partition tests do). `compact_keep` is how many applied entries
    /// compaction keeps: the primary's in-memory tail of the log holds no more (see [`Core::tail`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        id: u64,
        peers: Vec<Peer>,
        secret: Option<String>,
        bind_ip: Option<std::net::IpAddr>,
        tls: Option<Arc<rustls::ClientConfig>>,
        timing: Timing,
        db: Db,
        voter: bool,
        noop: String,
        compact_keep: u64,
        shutdown: CancellationToken,
    ) -> Result<Replication> {
        let all: BTreeMap<u64, String> = peers.iter().map(|p| (p.id, p.url.clone())).collect();
        let (term, voted_for) = db.election_state().await?;
        let (last_index, last_term) = db.last_entry().await?;
        let commit_index = db.applied_index().await?;
        let (inbox_tx, inbox_rx) = mpsc::channel(1024);
        let (proposals_tx, proposals_rx) = mpsc::channel(4 * MAX_GROUP);
        let mut outbound = BTreeMap::new();
        for peer in peers.iter().filter(|p| p.id != id) {
            let (tx, rx) = mpsc::channel(OUTBOUND_DEPTH);
            outbound.insert(peer.id, tx);
            let key = PeerKey::derive(secret.as_deref().unwrap_or_default());
            let transport = Transport { bind_ip, tls: tls.clone() };
            tokio::spawn(dial(id, peer.clone(), key, transport, rx, inbox_tx.clone(), shutdown.clone()));
        }
        let mut core = Core {
            id,
            urls: all.clone(),
            db,
            timing,
            term,
            voted_for,
            // Alone, there is no one whose acknowledged entries it could have lost track of.
            voter: voter || all.len() <= 1,
            voter_checked: 0,
            role: Role::Backup,
            leader: None,
            last_index,
            last_term,
            commit_index,
            term_start: u64::MAX,
            progress: BTreeMap::new(),
            pre_votes: BTreeSet::new(),
            votes: BTreeSet::new(),
            real_election: false,
            election_deadline: Instant::now(),
            primary_since: Instant::now(),
            last_heartbeat: Instant::now(),
            heard_leader: None,
            primary_lost: None,
            remote_view: Vec::new(),
            outbound,
            inbox: inbox_tx.downgrade(),
            tail: VecDeque::new(),
            tail_capacity: (compact_keep as usize).clamp(1, TAIL),
            proposal_batches: 0,
            proposed_entries: 0,
            reachable: BTreeSet::new(),
            refused: BTreeMap::new(),
            heard: BTreeMap::new(),
            elections: VecDeque::new(),
            storage_failed_at: None,
            gauges: crate::metrics::ReplicaGauges::new(all.keys().copied().filter(|&peer| peer != id)),
            noop,
            status: watch::channel(Status {
                role: Role::Backup,
                term,
                leader: None,
                commit_index,
                last_index,
                replicas: Vec::new(),
                elections: Vec::new(),
                term_start: None,
                proposal_batches: 0,
                proposed_entries: 0,
                storage_failure: None,
                voter,
            })
            .0,
            leadership: watch::channel(Leadership { role: Role::Backup, term }).0,
            commit: watch::channel(commit_index).0,
            snapshots: BTreeMap::new(),
            // Random: a backup tells streams apart by it (with the term and the primary).
            last_stream: rand::random::<u64>() >> 1,
            installing: None,
        };
        core.reset_election_deadline();
        let status = core.status.subscribe();
        let (leadership, commit) = (core.leadership.subscribe(), core.commit.subscribe());
        crate::metrics::peer_connections(0);
        tracing::info!(id, term, last_index, commit_index, replicas = all.len(), "replication starting");
        if core.cluster_size() == 1 {
            // Alone: no one to wait for or to ask.
            core.start_election().await?;
        }
        core.publish();
        tokio::spawn(core.run(inbox_rx, proposals_rx, shutdown));
        Ok(Replication { inbox: inbox_tx, proposals: proposals_tx, status, leadership, commit, id, peers: all })
    }

    /// The latest status; `changed()` on the receiver wakes on every change (every acknowledgement moves a
    /// replica's view): for pages and health checks. Code that waits should watch [`Replication::leadership`]
    /// or [`Replication::commit_index`] instead.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    /// Role and term; `changed()` wakes only when either changes.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.clone()
    }

    /// The commit index as this replica knows it; `changed()` wakes only when it moves.
    pub fn commit_index(&self) -> watch::Receiver<u64> {
        self.commit.clone()
    }

    /// Append `op` to the log, as entry `expected` if given (refused if that is not the next index). Returns
    /// the entry's index once it is durable locally and on its way to the backups; it is committed later, or
    /// lost if this replica stops being primary first. Proposals that arrive together are appended in one
    /// transaction and shipped in one frame (group commit).
    pub async fn propose(&self, expected: Option<u64>, op: String) -> Result<u64> {
        let (reply, rx) = oneshot::channel();
        self.proposals.send(Proposal { expected, op, reply }).await.map_err(|_| Error::Unavailable)?;
        rx.await.map_err(|_| Error::Unavailable)?
    }

    /// Applying committed entries to the state tables failed for a machine reason. A primary steps down (it
    /// could append, but could not answer any write), and no replica stands for election right after.
    pub fn apply_failed(&self, why: String) {
        let _ = self.inbox.try_send(Input::ApplyFailed(why));
    }

    /// Answer a request frame from a peer.
    pub async fn request(&self, frame: PeerFrame) -> Option<PeerFrame> {
        let (reply, rx) = oneshot::channel();
        self.inbox.send(Input::Request { frame, reply }).await.ok()?;
        rx.await.ok()
    }
}

/// How many elections the status keeps.
const ELECTIONS_KEPT: usize = 20;

/// What a replica last heard from a peer (any frame), for `/api/cluster`.
#[derive(Debug, Clone, Copy)]
struct Heard {
    at: Instant,
    /// The same instant, milliseconds since the Unix epoch.
    wall_ms: u64,
    /// The term it spoke in.
    term: u64,
    /// The highest index known to be on it, if a frame said.
    index: Option<u64>,
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Leader-side knowledge of one backup.
#[derive(Debug, Clone, Copy)]
struct Progress {
    /// Next index to send.
    next: u64,
    /// Highest index known to be on it.
    matched: u64,
    /// When it last answered.
    last_ack: Option<Instant>,
    /// Where its snapshot is, if it needs one (one at a time).
    snapshot: SnapshotState,
    /// In the in-sync set (`--ack all-live`): every commit waits for it.
    in_sync: bool,
    /// It said it is a learner: its acknowledgements count only once it holds everything committed.
    learner: bool,
    /// When it last said it could not store entries.
    storage_failed: Option<Instant>,
    /// When `matched` last moved (or entries were last sent from `matched + 1`): entries in flight for an
    /// election timeout without an answer are taken as lost and sent again.
    advanced_at: Instant,
}

/// A backup's snapshot, as the primary tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SnapshotState {
    /// None under way.
    Idle,
    /// A background task is reading the state and streaming it (this stream id).
    InFlight(u64),
    /// Sent at this instant; not sent again for a while, so the backup can commit it and answer.
    Sent(Instant),
    /// Given up at this instant (the backup refused a chunk, went silent, or the connection changed); started
    /// over after a heartbeat.
    Failed(Instant),
}

/// The primary's end of a snapshot stream to one backup: how far the backup acknowledged it (chunks stored).
/// Dropping it tells the streaming task to stop.
struct SnapshotSending {
    stream: u64,
    last_index: u64,
    acked: watch::Sender<u64>,
}

/// A backup's snapshot install under way: the chunks of one stream go into one open transaction.
struct Installing {
    term: u64,
    leader: u64,
    stream: u64,
    last_index: u64,
    last_term: u64,
    /// The chunk expected next.
    next_seq: u64,
    install: SnapshotInstall,
    started: Instant,
    /// Time spent storing chunks (the rest is waiting for them, and the commit).
    storing: Duration,
    bytes: usize,
}

struct Core {
    id: u64,
    urls: BTreeMap<u64, String>,
    db: Db,
    timing: Timing,
    term: u64,
    voted_for: Option<u64>,
    /// False while a learner (see [`Status::voter`]); persisted once it turns true.
    voter: bool,
    /// The commit index [`Core::check_caught_up`] last looked at.
    voter_checked: u64,
    role: Role,
    leader: Option<u64>,
    last_index: u64,
    last_term: u64,
    commit_index: u64,
    /// Index of this term's no-op while primary: entries before it commit only together with it.
    term_start: u64,
    /// While primary: the last entries of its log, from this term's no-op on, consecutive and ending at
    /// `last_index` (or past it while they are being appended). Entries are shipped and probed from here, so
    /// the database is read only for a backup that is far behind. Emptied whenever the role changes.
    tail: VecDeque<WireEntry>,
    /// Entries the tail holds at most: [`TAIL`], or fewer when compaction keeps fewer, so that the tail holds
    /// nothing the database no longer has (a backup further behind gets a snapshot, with or without a tail).
    tail_capacity: usize,
    progress: BTreeMap<u64, Progress>,
    pre_votes: BTreeSet<u64>,
    votes: BTreeSet<u64>,
    /// Whether the current candidacy is past the pre-vote.
    real_election: bool,
    election_deadline: Instant,
    /// When this replica last became primary (the step-down check waits one timeout from there).
    primary_since: Instant,
    last_heartbeat: Instant,
    /// When a primary was last heard (as a backup).
    heard_leader: Option<Instant>,
    /// The primary whose connection last closed, and when (see [`Core::primary_connection_lost`]).
    primary_lost: Option<(u64, Instant)>,
    /// The primary's view of the cluster from its last heartbeat.
    remote_view: Vec<ReplicaView>,
    outbound: BTreeMap<u64, mpsc::Sender<PeerFrame>>,
    /// The core's own inbox, for background tasks to report back (weak: the core stops when the inbox closes).
    inbox: mpsc::WeakSender<Input>,
    /// Group-commit counters: transactions, and the entries they appended.
    proposal_batches: u64,
    proposed_entries: u64,
    /// Peers whose connection is open now.
    reachable: BTreeSet<u64>,
    /// Peers whose last handshake we dialled was refused, and why (see [`Input::Refused`]).
    refused: BTreeMap<u64, String>,
    /// What each peer last said (kept across terms and roles, so a replica that goes down keeps its last
    /// known index and term in the status).
    heard: BTreeMap<u64, Heard>,
    /// Elections seen since start, oldest first.
    elections: VecDeque<Election>,
    /// When and how this replica's storage last failed to make something durable (see
    /// [`Core::storage_failed`]).
    storage_failed_at: Option<(Instant, String)>,
    noop: String,
    status: watch::Sender<Status>,
    leadership: watch::Sender<Leadership>,
    commit: watch::Sender<u64>,
    /// What `/metrics` shows of the status.
    gauges: crate::metrics::ReplicaGauges,
    /// While primary: the snapshot streams under way, by backup.
    snapshots: BTreeMap<u64, SnapshotSending>,
    /// The id of the last snapshot stream started.
    last_stream: u64,
    /// While a backup: the snapshot being installed, if any.
    installing: Option<Installing>,
}

impl Core {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Input>,
        mut proposals: mpsc::Receiver<Proposal>,
        shutdown: CancellationToken,
    ) {
        loop {
            let wake = if self.role == Role::Primary {
                self.last_heartbeat + self.timing.heartbeat
            } else {
                self.election_deadline
            };
            let result = tokio::select! {
                _ = shutdown.cancelled() => break,
                input = inbox.recv() => match input {
                    Some(input) => self.handle(input).await,
                    None => break,
                },
                proposal = proposals.recv() => match proposal {
                    Some(first) => {
                        // Everything proposed meanwhile goes into the same transaction and frame.
                        let mut group = vec![first];
                        while group.len() < MAX_GROUP {
                            match proposals.try_recv() {
                                Ok(next) => group.push(next),
                                Err(_) => break,
                            }
                        }
                        self.on_propose(group).await
                    }
                    None => break,
                },
                _ = tokio::time::sleep_until(wake) => self.tick().await,
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "replication step failed");
            }
            if !self.voter && self.installing.is_none() {
                if let Err(e) = self.check_caught_up().await {
                    self.storage_failed(&e);
                }
            }
            self.publish();
        }
    }

    fn cluster_size(&self) -> usize {
        self.urls.len().max(1)
    }

    fn majority(&self) -> usize {
        self.cluster_size() / 2 + 1
    }

    /// Votes (this replica's own included) that win an election.
    fn votes_needed(&self) -> usize {
        match self.timing.ack {
            Ack::Majority => self.majority(),
            // Every replica it can reach must agree that its log is the most up to date.
            Ack::AllLive => 1 + self.reachable.len(),
        }
    }

    fn election_timeout(&self) -> Duration {
        let base = self.timing.election;
        let jitter = rand::thread_rng().gen_range(0..=base.as_millis() as u64 / 10);
        base + base / 2 * self.election_rank() + Duration::from_millis(jitter)
    }

    /// This replica's place in the election order: the replicas with a lower id, except the primary it last
    /// followed (when this timer runs out, that primary is the one presumed gone). With primary 0 dead,
    /// replica 1 waits one base timeout and replica 2 one and a half; the lowest live id still goes first.
    fn election_rank(&self) -> u32 {
        self.urls.keys().filter(|&&id| id < self.id && Some(id) != self.leader).count() as u32
    }

    fn reset_election_deadline(&mut self) {
        self.election_deadline = Instant::now() + self.election_timeout();
    }

    async fn handle(&mut self, input: Input) -> Result<()> {
        if self.installing.is_some() && !self.continues_install(&input) {
            // The install holds the database's write transaction: drop it before anything else may write.
            let what = match &input {
                Input::Request { frame: PeerFrame::SnapshotChunk { .. }, .. } => "a chunk of another stream",
                Input::Request { frame: PeerFrame::Append { .. }, .. } => "an append",
                Input::Request { .. } => "a vote request",
                Input::Response(_) => "an answer from a peer",
                Input::Reachable(..) => "the primary's connection opened or closed",
                _ => "a failed apply",
            };
            self.abandon_install(what).await;
        }
        match input {
            Input::Request { frame, reply } => {
                let stores = matches!(frame, PeerFrame::Append { .. } | PeerFrame::SnapshotChunk { .. });
                self.note_heard(&frame);
                let answer = match self.on_request(frame).await {
                    Ok(answer) => answer,
                    Err(e) => {
                        if e.is_storage() {
                            self.storage_failed(&e);
                            if stores {
                                // Say so: the primary counts nothing of it, and shows this replica as failing
                                // instead of waiting for an answer that never comes.
                                let _ = reply.send(PeerFrame::Appended {
                                    term: self.term,
                                    from: self.id,
                                    success: false,
                                    last_index: self.last_index,
                                    learner: !self.voter,
                                    storage_failed: true,
                                });
                            }
                        }
                        return Err(e);
                    }
                };
                let _ = reply.send(answer);
            }
            Input::Response(frame) => {
                self.note_heard(&frame);
                match frame {
                    PeerFrame::SnapshotAck { term, from, stream, seq, success } => {
                        self.on_snapshot_ack(term, from, stream, seq, success).await?
                    }
                    frame => {
                        if let PeerFrame::Appended { from, success: true, last_index, .. } = frame {
                            self.snapshot_answered(from, last_index);
                        }
                        self.on_response(frame).await?
                    }
                }
            }
            Input::Reachable(peer, up) => {
                // Frames queued towards it before are gone (dropped with the old connection): resend from what
                // it acknowledged.
                let resend = self.progress.get(&peer).map(|p| self.resend_point(p));
                if let (Some(progress), Some(next)) = (self.progress.get_mut(&peer), resend) {
                    progress.next = next;
                    progress.advanced_at = Instant::now();
                }
                // A snapshot stream's queued chunks went with the old connection: start it over.
                self.cancel_snapshot(peer);
                if up {
                    self.reachable.insert(peer);
                    self.refused.remove(&peer);
                } else {
                    self.reachable.remove(&peer);
                    self.primary_connection_lost(peer);
                }
                crate::metrics::peer_connections(self.reachable.len());
            }
            Input::Refused(peer, Some(why)) => {
                self.refused.insert(peer, why);
            }
            Input::Refused(peer, None) => {
                self.refused.remove(&peer);
            }
            Input::ApplyFailed(why) => self.storage_failed_because(format!("applying committed entries: {why}")),
            Input::SnapshotDone { peer, stream, sent } => {
                if self.snapshots.get(&peer).is_some_and(|s| s.stream == stream) {
                    self.snapshots.remove(&peer);
                }
                if let Some(progress) = self.progress.get_mut(&peer) {
                    if progress.snapshot == SnapshotState::InFlight(stream) {
                        let now = Instant::now();
                        progress.snapshot = if sent { SnapshotState::Sent(now) } else { SnapshotState::Failed(now) };
                    }
                }
            }
        }
        Ok(())
    }

    /// Remember what a peer's frame says about it (for the status only).
    fn note_heard(&mut self, frame: &PeerFrame) {
        let (from, term, index) = match frame {
            PeerFrame::Append { term, leader, prev_index, entries, cluster, .. } => {
                let own = cluster.iter().find(|r| r.id == *leader).map(|r| r.last_index);
                (*leader, *term, Some(own.unwrap_or(prev_index + entries.len() as u64)))
            }
            PeerFrame::SnapshotChunk { term, leader, .. } => (*leader, *term, None),
            PeerFrame::SnapshotAck { term, from, .. } => (*from, *term, None),
            // A pre-vote names the term the candidate would start; it is still in the one before.
            PeerFrame::Vote { term, candidate, last_index, pre, .. } => {
                (*candidate, if *pre { term.saturating_sub(1) } else { *term }, Some(*last_index))
            }
            // Only what on_response would believe: a backup cannot hold more than this replica sent.
            PeerFrame::Appended { term, from, success, last_index, .. } => {
                (*from, *term, (*success && *last_index <= self.last_index).then_some(*last_index))
            }
            PeerFrame::Voted { term, from, .. } => (*from, *term, None),
        };
        if from == self.id || !self.urls.contains_key(&from) {
            return;
        }
        let previous = self.heard.get(&from).and_then(|h| h.index);
        self.heard.insert(from, Heard { at: Instant::now(), wall_ms: unix_ms(), term, index: index.or(previous) });
    }

    /// Note that `leader` leads `term` (once per term).
    fn note_election(&mut self, term: u64, leader: u64) {
        if self.elections.back().is_some_and(|e| e.term >= term) {
            return;
        }
        self.elections.push_back(Election { term, leader, at_ms: unix_ms() });
        if self.elections.len() > ELECTIONS_KEPT {
            self.elections.pop_front();
        }
    }

    async fn tick(&mut self) -> Result<()> {
        // A backup's timer ran out: no chunk for an election timeout (and an election may write).
        self.abandon_install("no chunk from the primary for an election timeout").await;
        let now = Instant::now();
        match self.role {
            Role::Primary => {
                // Step down when a majority has not answered within the election timeout.
                let window = self.timing.election;
                let recent = self.progress.values().filter(|p| p.last_ack.is_some_and(|t| now - t <= window)).count();
                if self.timing.ack == Ack::AllLive {
                    // A silent replica leaves the in-sync set, so commits stop waiting for it.
                    for (id, p) in &mut self.progress {
                        if p.in_sync && p.last_ack.is_none_or(|t| now - t > window) {
                            tracing::warn!(peer = id, "backup silent for the failure timeout; out of the in-sync set");
                            p.in_sync = false;
                        }
                    }
                    self.advance_commit();
                } else if 1 + recent < self.majority() && now - self.primary_since > window {
                    tracing::warn!(term = self.term, "primary lost contact with a majority; stepping down");
                    self.step_down();
                    return Ok(());
                }
                self.broadcast_append().await
            }
            Role::Backup | Role::Candidate => {
                if now >= self.election_deadline && self.start_pre_vote() {
                    return self.start_election().await;
                }
                Ok(())
            }
        }
    }

    /// The connection to `peer` closed or was reset. If `peer` is the primary this backup follows, a crashed
    /// process (or a rebooted machine) is the likely cause: stop counting it as heard, so a pre-vote from
    /// another backup is granted, and ask for pre-votes within a few heartbeats, the lowest live id first,
    /// instead of a whole election timeout later. A primary that is in fact alive keeps its role: its next
    /// heartbeat (it dials us itself) resets the deadline, and a backup that still hears it refuses the
    /// pre-vote. The full timeout stays for silent failures (a cut cable closes nothing).
    fn primary_connection_lost(&mut self, peer: u64) {
        if self.role != Role::Backup || self.leader != Some(peer) {
            return;
        }
        self.heard_leader = None;
        self.primary_lost = Some((peer, Instant::now()));
        // The lowest live id asks at once (a refused pre-vote is retried, see `start_pre_vote`); each later one
        // two heartbeats after the one before it, so that it stands only if the lower ones cannot.
        let heartbeat = self.timing.heartbeat;
        let jitter = Duration::from_millis(rand::thread_rng().gen_range(0..=heartbeat.as_millis() as u64 / 10));
        let soon = Instant::now() + heartbeat * (2 * self.election_rank()) + jitter;
        if soon < self.election_deadline {
            tracing::info!(peer, "connection to the primary lost; asking for pre-votes early");
            self.election_deadline = soon;
        }
    }

    /// A learner becomes a voter once an entry of the current term is committed and in its log: by Raft's
    /// leader completeness, every entry committed in an earlier term comes before it, so this replica now
    /// holds everything it could ever have acknowledged. Persisted, so a restart keeps it a voter.
    async fn check_caught_up(&mut self) -> Result<()> {
        if self.commit_index == 0 || self.commit_index > self.last_index || self.commit_index == self.voter_checked {
            return Ok(());
        }
        self.voter_checked = self.commit_index;
        if self.db.term_at(self.commit_index).await? != Some(self.term) {
            return Ok(());
        }
        self.db.become_voter().await?;
        self.voter = true;
        tracing::info!(term = self.term, commit_index = self.commit_index, "caught up with the primary; voting again");
        Ok(())
    }

    /// A learner that has never known an entry to be committed: its commit index (the applied index at start,
    /// then what primaries said) is still 0. In a new cluster whose first primary stepped down before
    /// committing its first entry, every replica is such a learner and holds entries, none committed: they
    /// may stand and elect each other (on logs compared as always), or the cluster would never elect anyone.
    /// A wiped replica that has caught up with any entry of a working cluster knows its commit index, which
    /// is then above 0: it stays out until it is a voter.
    fn fresh(&self) -> bool {
        !self.voter && self.commit_index == 0
    }

    /// Stop being primary (or candidate) without a new term: a backup waiting for its election timer.
    fn step_down(&mut self) {
        self.role = Role::Backup;
        self.tail.clear();
        self.leader = None;
        self.heard_leader = None;
        self.term_start = u64::MAX;
        self.reset_election_deadline();
    }

    /// Note that this replica's storage just failed to make something durable. A primary steps down at once,
    /// so that a replica with a working disk takes over, and no replica stands for election for a while after
    /// its own storage failed.
    fn storage_failed(&mut self, error: &Error) {
        self.storage_failed_because(error.to_string());
    }

    fn storage_failed_because(&mut self, why: String) {
        if self.role != Role::Backup {
            tracing::error!(error = %why, term = self.term, role = self.role.name(), "storage failed; stepping down");
            self.step_down();
        }
        self.storage_failed_at = Some((Instant::now(), why));
    }

    /// Whether storage failed within the last two election timeouts: such a replica does not stand for election.
    fn storage_recently_failed(&self) -> bool {
        self.recent_storage_failure().is_some()
    }

    /// The last storage failure, if within the last two election timeouts.
    fn recent_storage_failure(&self) -> Option<&str> {
        let (at, why) = self.storage_failed_at.as_ref()?;
        (at.elapsed() < self.timing.election * 2).then_some(why.as_str())
    }

    /// Ask whether we could win before disturbing anyone's term. True when no answer is needed.
    fn start_pre_vote(&mut self) -> bool {
        if self.storage_recently_failed() {
            tracing::warn!(term = self.term, "not standing for election: this replica's storage failed recently");
            self.reset_election_deadline();
            return false;
        }
        if !self.voter && self.last_index > 0 && !self.fresh() {
            tracing::warn!(
                last_index = self.last_index,
                "not standing for election: this replica is a learner until it has caught up with a primary"
            );
            self.reset_election_deadline();
            return false;
        }
        let Some(next_term) = self.term.checked_add(1) else {
            // Unreachable through frames (see MAX_TERM_LEAP), but a stored term could be anything.
            tracing::error!(term = self.term, "the term space is exhausted; this replica cannot start an election");
            self.reset_election_deadline();
            return false;
        };
        tracing::info!(term = self.term, "no primary heard; asking for pre-votes");
        self.role = Role::Candidate;
        self.leader = None;
        self.real_election = false;
        self.pre_votes = BTreeSet::from([self.id]);
        self.reset_election_deadline();
        if self.primary_lost.is_some_and(|(_, at)| at.elapsed() < self.timing.election) {
            // The primary's connection closed a moment ago: a peer that refuses may simply not have noticed its own
            // connection close yet. Ask again soon rather than a whole election timeout later (a pre-vote changes
            // no term, and a peer that still hears a live primary keeps refusing).
            self.election_deadline = Instant::now() + self.timing.heartbeat / PRE_VOTE_RETRIES_PER_HEARTBEAT;
        }
        if self.pre_votes.len() >= self.votes_needed() {
            // Nobody to ask (all-live mode with every peer unreachable): go straight to the election.
            return true;
        }
        let frame = PeerFrame::Vote {
            term: next_term,
            candidate: self.id,
            last_index: self.last_index,
            last_term: self.last_term,
            pre: true,
            fresh: self.fresh(),
        };
        self.send_all(frame);
        false
    }

    async fn start_election(&mut self) -> Result<()> {
        let term = self.term.checked_add(1).ok_or_else(|| Error::Corrupt("the term space is exhausted".into()))?;
        // Durable first: a term and vote only this process's memory holds must not reach anyone.
        if let Err(e) = self.db.save_election_state(term, Some(self.id)).await {
            self.storage_failed(&e);
            return Err(e);
        }
        self.term = term;
        self.voted_for = Some(self.id);
        self.role = Role::Candidate;
        self.leader = None;
        self.real_election = true;
        self.votes = BTreeSet::from([self.id]);
        self.reset_election_deadline();
        tracing::info!(term = self.term, "election started");
        crate::metrics::election_started();
        if self.votes.len() >= self.votes_needed() {
            return self.become_primary().await;
        }
        let frame = PeerFrame::Vote {
            term: self.term,
            candidate: self.id,
            last_index: self.last_index,
            last_term: self.last_term,
            pre: false,
            fresh: self.fresh(),
        };
        self.send_all(frame);
        Ok(())
    }

    async fn become_primary(&mut self) -> Result<()> {
        self.role = Role::Primary;
        self.leader = Some(self.id);
        self.note_election(self.term, self.id);
        let next = self.last_index + 1;
        self.progress = self
            .outbound
            .keys()
            .map(|&id| {
                let in_sync = self.reachable.contains(&id);
                (
                    id,
                    Progress {
                        next,
                        matched: 0,
                        last_ack: Some(Instant::now()),
                        snapshot: SnapshotState::Idle,
                        in_sync,
                        learner: false,
                        storage_failed: None,
                        advanced_at: Instant::now(),
                    },
                )
            })
            .collect();
        let noop = WireEntry { index: next, term: self.term, op: self.noop.clone() };
        match self.db.append_entries(std::slice::from_ref(&noop)).await {
            Ok(last) => (self.last_index, self.last_term) = last,
            Err(e) => {
                self.storage_failed(&e);
                return Err(e);
            }
        }
        self.tail.clear();
        self.tail.push_back(noop);
        // The backups get one election timeout to answer from now, once the `noop` is durable: a slow write
        // must not use it up (the step-down check in `tick`).
        self.primary_since = Instant::now();
        for progress in self.progress.values_mut() {
            progress.last_ack = Some(self.primary_since);
        }
        self.term_start = next;
        tracing::info!(term = self.term, last_index = self.last_index, "became primary");
        crate::metrics::election_won();
        self.advance_commit();
        self.broadcast_append().await
    }

    /// Adopt `term` (if higher) and follow `leader`.
    async fn follow(&mut self, term: u64, leader: Option<u64>) -> Result<()> {
        if term > self.term {
            self.term = term;
            self.voted_for = None;
            self.db.save_election_state(self.term, None).await?;
            // Whoever led the old term does not lead this one.
            self.leader = None;
        }
        if self.role != Role::Backup || (leader.is_some() && self.leader != leader) {
            tracing::info!(term, ?leader, "following");
        }
        self.role = Role::Backup;
        self.tail.clear();
        if let Some(leader) = leader {
            self.note_election(self.term, leader);
            self.leader = Some(leader);
        }
        self.term_start = u64::MAX;
        Ok(())
    }

    async fn on_propose(&mut self, group: Vec<Proposal>) -> Result<()> {
        let mut entries = Vec::with_capacity(group.len());
        let mut replies = Vec::with_capacity(group.len());
        for Proposal { expected, op, reply } in group {
            let index = self.last_index + 1 + entries.len() as u64;
            if self.role != Role::Primary || expected.is_some_and(|e| e != index) {
                tracing::debug!(?expected, index, role = self.role.name(), "proposal refused");
                let _ = reply.send(Err(Error::Unavailable));
                continue;
            }
            entries.push(WireEntry { index, term: self.term, op });
            replies.push((index, reply));
        }
        if entries.is_empty() {
            return Ok(());
        }
        // Shipped first, appended here after: the backups write while this replica does. This replica counts
        // itself (`last_index`, which `advance_commit` reads) only once its own append returned. Once shipped,
        // an (index, term) names this op for good: should the local append fail, this replica steps down, and
        // it can only propose again in a later term.
        self.tail.extend(entries.iter().cloned());
        while self.tail.len() > self.tail_capacity {
            self.tail.pop_front();
        }
        let shipped = self.broadcast_append().await;
        // Committed by this append alone (a cluster of one): the storage may apply them in the same transaction.
        let last = entries.last().map_or(0, |e| e.index);
        let appended = if self.commits_alone(last) {
            self.db.append_committing(&entries).await
        } else {
            self.db.append_entries(&entries).await
        };
        match appended {
            Ok(last) => (self.last_index, self.last_term) = last,
            Err(e) => {
                // Stepped down, and seen so, before anyone hears "unavailable": a client told so must not find
                // this replica still calling itself primary (the full-disk test raced that, now and then).
                self.storage_failed(&e);
                self.publish();
                for (_, reply) in replies {
                    let _ = reply.send(Err(Error::Unavailable));
                }
                return Err(e);
            }
        }
        shipped?;
        self.proposal_batches += 1;
        self.proposed_entries += entries.len() as u64;
        // Publish before answering: a proposer that got its index must find it in the status (the exclusive
        // writer reads the next index from there once every send that held the gate has its answer).
        self.publish();
        for (index, reply) in replies {
            let _ = reply.send(Ok(index));
        }
        self.advance_commit();
        Ok(())
    }

    /// The end of the log as shipped: while primary, the tail's last entry, whose local append may still be
    /// under way (see [`Core::on_propose`]); otherwise `last_index`.
    fn log_end(&self) -> u64 {
        self.tail.back().map_or(self.last_index, |e| e.index.max(self.last_index))
    }

    /// The term of the entry at `index`: from memory for the tail and the last entry, else as the database
    /// says (`None` past the end of the log or before the compaction point). (`&mut self`: the core's future
    /// must stay `Send`, and the core is not `Sync`.)
    async fn term_at(&mut self, index: u64) -> Result<Option<u64>> {
        if let Some(first) = self.tail.front() {
            if (first.index..=self.log_end()).contains(&index) {
                return Ok(Some(self.tail[(index - first.index) as usize].term));
            }
        }
        if index == self.last_index {
            return Ok(Some(self.last_term));
        }
        self.db.term_at(index).await
    }

    /// Entries after `after`, in order, at most `limit`: from the tail when it holds the first of them, else
    /// read from the database.
    async fn entries_after(&mut self, after: u64, limit: u32) -> Result<Vec<WireEntry>> {
        if let Some(first) = self.tail.front() {
            if after + 1 >= first.index {
                let skip = (after + 1 - first.index) as usize;
                return Ok(self.tail.iter().skip(skip).take(limit as usize).cloned().collect());
            }
        }
        self.db.entries(after, limit).await
    }

    /// This replica's answer to `append` or `snapshot`.
    fn appended(&self, success: bool, last_index: u64) -> PeerFrame {
        PeerFrame::Appended {
            term: self.term,
            from: self.id,
            success,
            last_index,
            learner: !self.voter,
            storage_failed: false,
        }
    }

    /// Whether a peer could have reached `term`: no further than [`MAX_TERM_LEAP`] beyond ours.
    fn plausible(&self, term: u64) -> bool {
        term <= self.term.saturating_add(MAX_TERM_LEAP)
    }

    /// Refuse a request that no correct replica sends: an absurd term, entries that do not follow `prev_index`
    /// one by one, or terms that go backwards or beyond the sender's own. Such a frame is an error (logged; the
    /// connection that carried it is dropped), not something to adopt.
    fn check_request(&self, frame: &PeerFrame) -> Result<()> {
        let absurd = |what: String| Err(Error::BadRequest(format!("refused a peer frame: {what}")));
        let (term, last_term) = match frame {
            PeerFrame::Append { term, prev_index, prev_term, entries, .. } => {
                let mut expected = (prev_index.checked_add(1), (*prev_term).max(1));
                for entry in entries {
                    if Some(entry.index) != expected.0 || entry.term < expected.1 || entry.term > *term {
                        return absurd(format!(
                            "entry ({}, term {}) after prev_index {prev_index}, prev_term {prev_term}, in term {term}",
                            entry.index, entry.term
                        ));
                    }
                    expected = (entry.index.checked_add(1), entry.term);
                }
                (*term, *prev_term)
            }
            PeerFrame::SnapshotChunk { term, last_term, .. } | PeerFrame::Vote { term, last_term, .. } => {
                (*term, *last_term)
            }
            other => return absurd(format!("not a request: {other:?}")),
        };
        if !self.plausible(term) {
            return absurd(format!("term {term} is beyond reach from this replica's term {}", self.term));
        }
        if last_term > term {
            return absurd(format!("a last term {last_term} above the frame's term {term}"));
        }
        Ok(())
    }

    async fn on_request(&mut self, frame: PeerFrame) -> Result<PeerFrame> {
        self.check_request(&frame)?;
        match frame {
            PeerFrame::Append { term, leader, prev_index, prev_term, entries, commit, cluster } => {
                if term < self.term {
                    return Ok(self.appended(false, self.last_index));
                }
                self.follow(term, Some(leader)).await?;
                // An append the primary sent just before it died can be handled after its connection closed (it
                // comes on the other connection, read by another task): within a heartbeat of the loss it does not
                // count as hearing the primary, or it would undo the early election. A primary that is alive is
                // heard again with its next heartbeat.
                let stale =
                    self.primary_lost.is_some_and(|(p, at)| p == leader && at.elapsed() < self.timing.heartbeat);
                if stale {
                    tracing::debug!(
                        leader,
                        "an append from the primary whose connection just closed: not counted as heard"
                    );
                } else {
                    self.heard_leader = Some(Instant::now());
                    self.primary_lost = None;
                    self.reset_election_deadline();
                }
                if !cluster.is_empty() {
                    self.remote_view = cluster;
                }
                if prev_index > self.last_index || self.term_at(prev_index).await? != Some(prev_term) {
                    let hint = self.last_index.min(prev_index.saturating_sub(1));
                    return Ok(self.appended(false, hint));
                }
                let matched = prev_index + entries.len() as u64;
                if !entries.is_empty() {
                    (self.last_index, self.last_term) = self.db.append_entries(&entries).await?;
                }
                self.commit_index = self.commit_index.max(commit.min(matched));
                Ok(self.appended(true, matched))
            }
            PeerFrame::SnapshotChunk { term, leader, last_index, last_term, stream, seq, done, table, rows } => {
                if term < self.term {
                    return Ok(self.appended(false, self.last_index));
                }
                self.follow(term, Some(leader)).await?;
                self.heard_leader = Some(Instant::now());
                self.reset_election_deadline();
                let chunk = Chunk { term, leader, last_index, last_term, stream, seq, done, table, rows };
                self.on_snapshot_chunk(chunk).await
            }
            PeerFrame::Vote { term, candidate, last_index, last_term, pre, fresh } => {
                // A learner (a new, wiped or restored database) may hold less than it acknowledged before, so it
                // cannot tell whether a candidate has every committed entry: it votes only while a new cluster
                // has committed nothing, for a candidate whose log is as empty as its own, or for a candidate
                // that is a learner which never knew of a commit either, as it is itself (see [`Core::fresh`]).
                let up_to_date = (last_term, last_index) >= (self.last_term, self.last_index)
                    && (self.voter || last_index == 0 || fresh && self.fresh());
                // A replica that hears a live primary ignores candidates: a returning replica cannot depose
                // a working primary (no preemption).
                let leader_alive =
                    self.role == Role::Primary || self.heard_leader.is_some_and(|t| t.elapsed() < self.timing.election);
                if pre {
                    let granted = term > self.term && up_to_date && !leader_alive;
                    let behind = (last_term, last_index) < (self.last_term, self.last_index);
                    if !granted && behind && !leader_alive && self.voter && self.role != Role::Primary {
                        // No primary, and the candidate lacks entries this replica holds: it cannot win, so this
                        // replica stands now instead of at its own, later, turn.
                        let jitter = rand::thread_rng().gen_range(0..=self.timing.heartbeat.as_millis() as u64 / 10);
                        let soon = Instant::now() + Duration::from_millis(jitter);
                        if soon < self.election_deadline {
                            tracing::info!(candidate, "a candidate with less log asked for a pre-vote; standing now");
                            self.election_deadline = soon;
                        }
                    }
                    return Ok(PeerFrame::Voted { term: self.term, from: self.id, granted, pre: true });
                }
                if term < self.term || leader_alive && term > self.term {
                    return Ok(PeerFrame::Voted { term: self.term, from: self.id, granted: false, pre: false });
                }
                if term > self.term {
                    self.follow(term, None).await?;
                    self.leader = None;
                }
                let granted = up_to_date && self.voted_for.is_none_or(|v| v == candidate);
                if granted {
                    self.voted_for = Some(candidate);
                    self.db.save_election_state(self.term, self.voted_for).await?;
                    self.reset_election_deadline();
                }
                Ok(PeerFrame::Voted { term: self.term, from: self.id, granted, pre: false })
            }
            other => Err(Error::BadRequest(format!("not a request: {other:?}"))),
        }
    }

    async fn on_response(&mut self, frame: PeerFrame) -> Result<()> {
        match frame {
            PeerFrame::Appended { term, from, success, last_index, learner, storage_failed } => {
                if !self.plausible(term) || success && last_index > self.last_index {
                    tracing::warn!(term, from, last_index, "ignored an absurd answer from a peer");
                    return Ok(());
                }
                if term > self.term {
                    tracing::warn!(term, from, "a backup has a higher term; stepping down");
                    return self.follow(term, None).await;
                }
                if self.role != Role::Primary || term != self.term {
                    return Ok(());
                }
                let Some(progress) = self.progress.get_mut(&from) else { return Ok(()) };
                progress.last_ack = Some(Instant::now());
                if learner != progress.learner {
                    tracing::info!(peer = from, learner, "a backup's membership changed (a learner does not count)");
                    progress.learner = learner;
                }
                if storage_failed {
                    if progress.storage_failed.is_none() {
                        tracing::warn!(peer = from, "a backup could not store entries (its disk is failing)");
                    }
                    progress.storage_failed = Some(Instant::now());
                    // Resent with the next heartbeat, not at once.
                    return Ok(());
                }
                progress.storage_failed = None;
                if success {
                    if last_index > progress.matched {
                        progress.advanced_at = Instant::now();
                    }
                    progress.matched = progress.matched.max(last_index);
                    if !progress.in_sync && progress.matched >= self.commit_index {
                        tracing::info!(peer = from, "backup caught up; back in the in-sync set");
                        progress.in_sync = true;
                    }
                    progress.next = progress.next.max(progress.matched + 1);
                    self.advance_commit();
                    if self.progress[&from].next <= self.last_index {
                        self.send_append(from).await?;
                    }
                } else {
                    // The refusal names the backup's real last index. Below what it acknowledged before, it lost
                    // entries (a wiped or restored disk): follow it down, or it is never caught up.
                    if last_index < progress.matched {
                        tracing::warn!(
                            peer = from,
                            acknowledged = progress.matched,
                            last_index,
                            "a backup has less log than it acknowledged; catching it up from there"
                        );
                        progress.matched = last_index;
                        if progress.in_sync && last_index < self.commit_index {
                            // Commits must not wait for (or count) a replica that lost committed entries.
                            progress.in_sync = false;
                        }
                    }
                    progress.next =
                        last_index.saturating_add(1).min(progress.next.saturating_sub(1)).max(progress.matched + 1);
                    self.send_append(from).await?;
                }
                Ok(())
            }
            PeerFrame::Voted { term, from, granted, pre } => {
                if !self.plausible(term) {
                    tracing::warn!(term, from, "ignored an absurd answer from a peer");
                    return Ok(());
                }
                if term > self.term && !granted {
                    return self.follow(term, None).await;
                }
                if self.role != Role::Candidate || !granted {
                    return Ok(());
                }
                if pre && !self.real_election {
                    self.pre_votes.insert(from);
                    if self.pre_votes.len() >= self.votes_needed() {
                        return self.start_election().await;
                    }
                } else if !pre && self.real_election && term == self.term {
                    self.votes.insert(from);
                    if self.votes.len() >= self.votes_needed() {
                        return self.become_primary().await;
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Commit the highest index durable on a majority, once this term's no-op is among it.
    fn advance_commit(&mut self) {
        let candidate = self.commit_candidate(self.last_index);
        if candidate > self.commit_index && candidate >= self.term_start {
            self.commit_index = candidate;
        }
    }

    /// Whether this replica's own append up to `last` commits it, before any backup answers: the primary of a
    /// cluster of one (a majority of one), appending in its own term.
    fn commits_alone(&self, last: u64) -> bool {
        last >= self.term_start && self.commit_candidate(last) >= last
    }

    /// The highest index durable on a majority were this replica's log to end at `last_index`.
    fn commit_candidate(&self, last_index: u64) -> u64 {
        match self.timing.ack {
            Ack::Majority => {
                // A learner (it may hold less than it acknowledged before) counts only once it has caught up with
                // everything committed; in a new cluster, where every replica starts as a learner, that is at once.
                let commit = self.commit_index;
                let mut matched: Vec<u64> = self
                    .progress
                    .values()
                    .map(|p| if p.learner && p.matched < commit { 0 } else { p.matched })
                    .collect();
                matched.push(last_index);
                matched.sort_unstable_by(|a, b| b.cmp(a));
                matched[self.majority() - 1]
            }
            Ack::AllLive => self.progress.values().filter(|p| p.in_sync).map(|p| p.matched).fold(last_index, u64::min),
        }
    }

    async fn broadcast_append(&mut self) -> Result<()> {
        self.last_heartbeat = Instant::now();
        let peers: Vec<u64> = self.progress.keys().copied().collect();
        for peer in peers {
            self.send_append(peer).await?;
        }
        Ok(())
    }

    /// Where to send from again after frames to a backup were lost: just after what it acknowledged, or, for a
    /// backup that has not answered this primary yet, from the top of the log (a probe, as a new primary
    /// sends, which its answer moves to where its log really ends; resending the whole log from index 1 made
    /// a restarted replica's catch-up take 1.5 s instead of 0.1).
    fn resend_point(&self, progress: &Progress) -> u64 {
        if progress.matched > 0 {
            progress.matched + 1
        } else {
            self.last_index + 1
        }
    }

    async fn send_append(&mut self, peer: u64) -> Result<()> {
        let Some(mut progress) = self.progress.get(&peer).copied() else { return Ok(()) };
        if progress.next > progress.matched + 1 && progress.advanced_at.elapsed() > self.timing.election {
            // Sent long ago and never acknowledged: lost on the way (a dropped frame); send it again.
            progress.next = self.resend_point(&progress);
            progress.advanced_at = Instant::now();
            self.progress.insert(peer, progress);
        }
        // Entries sent and not acknowledged. (A new primary knows nothing of a backup yet, `matched` 0: it sends
        // a heartbeat first, and the answer says where the backup is.) Frames to one peer travel in order on one
        // connection, so a heartbeat after entries in flight reaches the backup after them.
        let in_flight = progress.next - 1 - progress.matched;
        let full = in_flight >= MAX_IN_FLIGHT;
        let prev_index = progress.next - 1;
        let Some(prev_term) = self.term_at(prev_index).await? else {
            // The entries this backup needs were compacted away: send the whole state instead.
            return self.send_snapshot(peer).await;
        };
        let entries = if !full && progress.next <= self.log_end() {
            let room = (MAX_IN_FLIGHT - in_flight).min(BATCH as u64) as u32;
            self.entries_after(prev_index, room).await?
        } else {
            Vec::new()
        };
        let cluster = if entries.is_empty() { self.view() } else { Vec::new() };
        let sent_up_to = entries.last().map(|e| e.index);
        let frame = PeerFrame::Append {
            term: self.term,
            leader: self.id,
            prev_index,
            prev_term,
            entries,
            commit: self.commit_index,
            cluster,
        };
        let Some(tx) = self.outbound.get(&peer) else { return Ok(()) };
        if tx.try_send(frame).is_ok() {
            if let Some(last) = sent_up_to {
                // Pipelining: assume they arrive; a refusal rewinds `next`, silence for a timeout resends.
                let progress = self.progress.get_mut(&peer).expect("peer");
                if progress.next == progress.matched + 1 {
                    progress.advanced_at = Instant::now();
                }
                progress.next = last + 1;
            }
        }
        Ok(())
    }

    /// Send the whole state to a backup that needs entries compacted away, as a stream of chunks. Reading and
    /// sending a large state takes seconds, so a background task does it ([`stream_snapshot`]): the core keeps
    /// heartbeating and committing meanwhile (done inline, a 100,000-message state stalled the core past the
    /// election timeout, and the cluster lost its primary over and over while the backup never caught up). The
    /// backup's answer to the last chunk moves `next` past the snapshot through the usual path.
    async fn send_snapshot(&mut self, peer: u64) -> Result<()> {
        let progress = self.progress.get_mut(&peer).expect("peer");
        let (resend_after, retry_after) = (self.timing.election * 10, self.timing.heartbeat);
        match progress.snapshot {
            SnapshotState::InFlight(_) => return Ok(()),
            SnapshotState::Sent(at) if at.elapsed() < resend_after => return Ok(()),
            SnapshotState::Failed(at) if at.elapsed() < retry_after => return Ok(()),
            _ => {}
        }
        // Not while its connection is down: the chunks would wait in the queue, and go stale.
        let Some(tx) = self.outbound.get(&peer).filter(|_| self.reachable.contains(&peer)).cloned() else {
            return Ok(());
        };
        self.last_stream = self.last_stream.wrapping_add(1);
        let stream = self.last_stream;
        progress.snapshot = SnapshotState::InFlight(stream);
        let (acked, acks) = watch::channel(0);
        let state = match self.db.snapshot_stream(SNAPSHOT_CHUNK_BYTES).await {
            Ok(state) => state,
            Err(e) => {
                progress.snapshot = SnapshotState::Failed(Instant::now());
                tracing::error!(peer, error = %e, "reading a snapshot failed");
                return Ok(());
            }
        };
        self.snapshots.insert(peer, SnapshotSending { stream, last_index: state.last_index, acked });
        let sender = StreamSender {
            peer,
            term: self.term,
            leader: self.id,
            stream,
            tx,
            acks,
            leadership: self.leadership.subscribe(),
            // A backup stores a chunk in milliseconds; one silent for this long is gone.
            stall: self.timing.election * 5,
        };
        let inbox = self.inbox.clone();
        tokio::spawn(async move {
            let sent = match stream_snapshot(sender, state).await {
                Ok(sent) => sent,
                Err(e) => {
                    tracing::error!(peer, error = %e, "reading a snapshot failed");
                    false
                }
            };
            if let Some(inbox) = inbox.upgrade() {
                let _ = inbox.send(Input::SnapshotDone { peer, stream, sent }).await;
            }
        });
        Ok(())
    }

    /// Stop streaming a snapshot to `peer` (its task sees the channel close); the next heartbeat starts over.
    fn cancel_snapshot(&mut self, peer: u64) {
        if self.snapshots.remove(&peer).is_some() {
            if let Some(progress) = self.progress.get_mut(&peer) {
                progress.snapshot = SnapshotState::Idle;
            }
        }
    }

    /// `peer` answered a snapshot chunk that was not the last.
    async fn on_snapshot_ack(&mut self, term: u64, from: u64, stream: u64, seq: u64, success: bool) -> Result<()> {
        if !self.plausible(term) {
            tracing::warn!(term, from, "ignored an absurd answer from a peer");
            return Ok(());
        }
        if term > self.term {
            tracing::warn!(term, from, "a backup has a higher term; stepping down");
            return self.follow(term, None).await;
        }
        if self.role != Role::Primary || term != self.term {
            return Ok(());
        }
        if let Some(progress) = self.progress.get_mut(&from) {
            // It is alive and installing: that counts as an answer (a long install must not look like silence),
            // and as progress: `send_append` must not take the stream for lost and send a heartbeat that would
            // come between two chunks (the backup abandons the install on anything else).
            progress.last_ack = Some(Instant::now());
            progress.advanced_at = Instant::now();
        }
        let Some(sending) = self.snapshots.get(&from).filter(|s| s.stream == stream) else { return Ok(()) };
        if success {
            sending.acked.send_if_modified(|acked| {
                let moved = seq + 1 > *acked;
                *acked = (*acked).max(seq + 1);
                moved
            });
        } else {
            tracing::warn!(peer = from, stream, seq, "a backup abandoned a snapshot install; starting over");
            self.snapshots.remove(&from);
        }
        Ok(())
    }

    /// `peer` said it holds everything up to `last_index`: a snapshot stream that ends there is no longer needed
    /// (its last chunk was answered, or the backup already had it all).
    fn snapshot_answered(&mut self, peer: u64, last_index: u64) {
        if self.snapshots.get(&peer).is_some_and(|s| last_index >= s.last_index) {
            self.snapshots.remove(&peer);
        }
    }

    /// Whether `input` may be handled while a snapshot install holds the write transaction: the stream's next
    /// chunks, and what writes nothing (pre-votes, another peer's connection coming or going).
    fn continues_install(&self, input: &Input) -> bool {
        let Some(installing) = &self.installing else { return true };
        match input {
            Input::Request { frame: PeerFrame::SnapshotChunk { term, leader, stream, .. }, .. } => {
                (*term, *leader, *stream) == (installing.term, installing.leader, installing.stream)
            }
            Input::Request { frame: PeerFrame::Vote { pre: true, .. }, .. } => true,
            Input::Reachable(peer, _) => *peer != installing.leader,
            Input::SnapshotDone { .. } => true,
            _ => false,
        }
    }

    /// Roll back the snapshot install under way, if any: the old state and log stay.
    async fn abandon_install(&mut self, why: &str) {
        if let Some(installing) = self.installing.take() {
            installing.install.abandon().await;
            tracing::warn!(
                leader = installing.leader,
                last_index = installing.last_index,
                chunks = installing.next_seq,
                why,
                "abandoned a snapshot install; the old state stays"
            );
        }
    }

    /// A chunk of a snapshot stream (its term is current and its primary followed).
    async fn on_snapshot_chunk(&mut self, chunk: Chunk) -> Result<PeerFrame> {
        let Chunk { term, leader, last_index, last_term, stream, seq, done, table, rows } = chunk;
        let answer =
            |core: &Core, success| PeerFrame::SnapshotAck { term: core.term, from: core.id, stream, seq, success };
        if seq == 0 {
            self.abandon_install("a new stream began").await;
            if last_index <= self.commit_index {
                // Nothing to install: it already holds (and may have applied) everything the snapshot has.
                return Ok(self.appended(true, last_index));
            }
            let install = self.db.begin_snapshot_install().await?;
            tracing::info!(leader, last_index, stream, "receiving a snapshot from the primary");
            self.installing = Some(Installing {
                term,
                leader,
                stream,
                last_index,
                last_term,
                next_seq: 0,
                install,
                started: Instant::now(),
                storing: Duration::ZERO,
                bytes: 0,
            });
        }
        let expected = self.installing.as_ref().is_some_and(|i| {
            (i.term, i.leader, i.stream, i.last_index, i.last_term, i.next_seq)
                == (term, leader, stream, last_index, last_term, seq)
        });
        if !expected {
            // A gap (a chunk lost with a connection), or the tail of a stream already given up.
            self.abandon_install("a snapshot chunk out of order").await;
            return Ok(answer(self, false));
        }
        let installing = self.installing.as_mut().expect("checked above");
        let started = Instant::now();
        if let Err(e) = installing.install.insert(&table, &rows).await {
            // Dropped, not rolled back: after a failed statement the connection's state is not trusted.
            self.installing = None;
            return Err(e);
        }
        installing.storing += started.elapsed();
        installing.next_seq += 1;
        installing.bytes += rows.len();
        if !done {
            return Ok(answer(self, true));
        }
        let installing = self.installing.take().expect("checked above");
        let (rows, chunks, bytes) = (installing.install.rows, installing.next_seq, installing.bytes);
        let committing = Instant::now();
        installing.install.finish(last_index, last_term).await?;
        (self.last_index, self.last_term) = (last_index, last_term);
        self.commit_index = last_index;
        tracing::info!(
            last_index,
            chunks,
            rows,
            bytes,
            total_ms = installing.started.elapsed().as_millis() as u64,
            store_ms = installing.storing.as_millis() as u64,
            commit_ms = committing.elapsed().as_millis() as u64,
            "installed a snapshot from the primary"
        );
        Ok(self.appended(true, last_index))
    }

    fn send_all(&self, frame: PeerFrame) {
        for tx in self.outbound.values() {
            let _ = tx.try_send(frame.clone());
        }
    }

    /// Every replica as this one sees it.
    fn view(&self) -> Vec<ReplicaView> {
        let window = self.timing.election;
        self.urls
            .iter()
            .map(|(&id, url)| {
                let heard = self.heard.get(&id);
                // Heard lately, over a connection that is still open (a killed process closes it at once).
                let heard_alive = heard.is_some_and(|h| h.at.elapsed() <= window) && self.reachable.contains(&id);
                let known_index = heard.and_then(|h| h.index).unwrap_or(0);
                let (role, alive, last_index, mut term, mut last_heard_ms) = if id == self.id {
                    let role = if self.role == Role::Backup && !self.voter { "learner" } else { self.role.name() };
                    (role, true, self.last_index, Some(self.term), None)
                } else if self.role == Role::Primary {
                    // A new primary starts every backup's progress at 0 and counts it as just heard (so that
                    // it does not step down at once): what it last said is the better report.
                    let p = self.progress.get(&id);
                    let alive = heard_alive && p.and_then(|p| p.last_ack).is_some_and(|t| t.elapsed() <= window);
                    let index = p.map_or(0, |p| p.matched).max(known_index);
                    let role = match p {
                        _ if !alive => "unknown",
                        Some(p) if p.storage_failed.is_some_and(|t| t.elapsed() <= window) => "failing",
                        Some(p) if p.learner => "learner",
                        _ => "backup",
                    };
                    (role, alive, index, None, None)
                } else if let Some(seen) = self.remote_view.iter().find(|r| r.id == id) {
                    let leader_alive = self.heard_leader.is_some_and(|t| t.elapsed() <= window);
                    let index =
                        if self.leader == Some(id) { seen.last_index.max(known_index) } else { seen.last_index };
                    (seen.role.as_str(), seen.alive && leader_alive, index, seen.term, seen.last_heard_ms)
                } else {
                    ("unknown", false, known_index, None, None)
                };
                if id != self.id {
                    if let Some(h) = heard {
                        term = Some(term.unwrap_or(0).max(h.term));
                        if !alive {
                            last_heard_ms = Some(last_heard_ms.unwrap_or(0).max(h.wall_ms));
                        }
                    }
                }
                if alive {
                    last_heard_ms = None;
                }
                let role = if role == "primary" && id != self.id && self.leader != Some(id) { "unknown" } else { role };
                ReplicaView {
                    id,
                    url: url.clone(),
                    role: role.to_owned(),
                    alive,
                    last_index,
                    lag: self.last_index.saturating_sub(last_index),
                    term,
                    last_heard_ms,
                    refused: if alive { None } else { self.refused.get(&id).cloned() },
                }
            })
            .collect()
    }

    /// The primary this replica follows, unless its connection closed and it has not been heard since (most
    /// likely it crashed): clients are not sent to a dead replica, and wait for the election instead.
    fn live_leader(&self) -> Option<u64> {
        self.leader.filter(|&leader| self.primary_lost.is_none_or(|(lost, _)| lost != leader))
    }

    fn publish(&self) {
        let status = Status {
            role: self.role,
            term: self.term,
            leader: self.live_leader(),
            commit_index: self.commit_index,
            last_index: self.last_index,
            replicas: self.view(),
            elections: self.elections.iter().cloned().collect(),
            term_start: (self.role == Role::Primary).then_some(self.term_start),
            proposal_batches: self.proposal_batches,
            proposed_entries: self.proposed_entries,
            storage_failure: self.recent_storage_failure().map(str::to_owned),
            voter: self.voter,
        };
        self.gauges.record(status.term, status.role == Role::Primary, status.last_index, status.commit_index, |peer| {
            status.replicas.iter().find(|r| r.id == peer).map_or(0, |r| r.lag)
        });
        let leadership = Leadership { role: status.role, term: status.term };
        self.leadership.send_if_modified(|current| std::mem::replace(current, leadership) != leadership);
        self.commit.send_if_modified(|current| std::mem::replace(current, status.commit_index) != status.commit_index);
        self.status.send_if_modified(|current| {
            if *current != status {
                *current = status;
                true
            } else {
                false
            }
        });
    }
}

/// Keep a connection to `peer` open, sending what the core queues and handing back its answers. Each
/// connection starts with the dialler's half of the handshake ([`peer_auth`]); a peer that does not prove
/// itself, or later answers in another replica's name, is dropped and dialled again.
/// One `snapshot_chunk` frame's fields, as the backup handles it.
struct Chunk {
    term: u64,
    leader: u64,
    last_index: u64,
    last_term: u64,
    stream: u64,
    seq: u64,
    done: bool,
    table: String,
    rows: String,
}

/// What the task streaming a snapshot to one backup needs.
struct StreamSender {
    peer: u64,
    term: u64,
    leader: u64,
    stream: u64,
    /// The outbound queue to the backup.
    tx: mpsc::Sender<PeerFrame>,
    /// Chunks the backup acknowledged; closed when the core gives the stream up.
    acks: watch::Receiver<u64>,
    /// Stop once this replica is no longer primary of `term`.
    leadership: watch::Receiver<Leadership>,
    /// Give up when the backup acknowledges nothing for this long.
    stall: Duration,
}

/// Send `state` to the backup chunk by chunk, at most [`SNAPSHOT_WINDOW`] chunks ahead of its
/// acknowledgements. True once the last chunk is queued; false if given up (the core dropped the stream, this
/// replica stopped leading, or the backup went silent).
async fn stream_snapshot(mut s: StreamSender, mut state: crate::storage::SnapshotStream) -> Result<bool> {
    let (started, peer, last_index, last_term) = (Instant::now(), s.peer, state.last_index, state.last_term);
    tracing::info!(peer, last_index, stream = s.stream, "sending a snapshot to a backup that is far behind");
    let (mut reading, mut waiting, mut rows, mut bytes) = (Duration::ZERO, Duration::ZERO, 0, 0);
    let mut next = state.next().await.transpose()?;
    if next.is_none() {
        // An empty state still needs its one (last) chunk, which commits the install.
        next = Some(crate::storage::SnapshotChunk { table: String::new(), rows: "[]".into(), count: 0 });
    }
    let mut seq = 0;
    while let Some(chunk) = next {
        let read = Instant::now();
        next = state.next().await.transpose()?;
        reading += read.elapsed();
        let waited = Instant::now();
        let deadline = waited + s.stall;
        loop {
            let leading = *s.leadership.borrow_and_update();
            if leading.role != Role::Primary || leading.term != s.term {
                return Ok(false);
            }
            if *s.acks.borrow_and_update() + SNAPSHOT_WINDOW > seq {
                break;
            }
            tokio::select! {
                changed = s.acks.changed() => if changed.is_err() { return Ok(false) },
                changed = s.leadership.changed() => if changed.is_err() { return Ok(false) },
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::warn!(peer, seq, "a backup acknowledged no snapshot chunk for a while; giving up");
                    return Ok(false);
                }
            }
        }
        if s.acks.has_changed().is_err() {
            return Ok(false);
        }
        rows += chunk.count;
        bytes += chunk.rows.len();
        let frame = PeerFrame::SnapshotChunk {
            term: s.term,
            leader: s.leader,
            last_index,
            last_term,
            stream: s.stream,
            seq,
            done: next.is_none(),
            table: chunk.table,
            rows: chunk.rows,
        };
        match tokio::time::timeout_at(deadline, s.tx.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return Ok(false),
        }
        waiting += waited.elapsed();
        seq += 1;
    }
    tracing::info!(
        peer,
        last_index,
        chunks = seq,
        rows,
        bytes,
        total_ms = started.elapsed().as_millis() as u64,
        read_ms = reading.as_millis() as u64,
        wait_ms = waiting.as_millis() as u64,
        "sent a snapshot to a backup"
    );
    Ok(true)
}

async fn dial(
    id: u64,
    peer: Peer,
    key: PeerKey,
    transport: Transport,
    mut outbound: mpsc::Receiver<PeerFrame>,
    inbox: mpsc::Sender<Input>,
    shutdown: CancellationToken,
) {
    let url = format!("{}/internal/replicate", peer.url.replacen("http", "ws", 1));
    // What was last logged about this peer being unreachable: each new reason once, not every 100 ms.
    let mut logged: Option<String> = None;
    while !shutdown.is_cancelled() {
        let request = match url.as_str().into_client_request() {
            Ok(request) => request,
            Err(e) => {
                tracing::error!(peer = peer.id, error = %e, "bad peer URL");
                return;
            }
        };
        let opened = async {
            let mut ws = transport.connect(request).await.map_err(|e| (false, e))?;
            authenticate(&mut ws, id, peer.id, &key).await.map_err(|e| (true, e))?;
            Ok::<_, (bool, String)>(ws)
        };
        let ws = match tokio::time::timeout(Duration::from_secs(1), opened).await {
            Ok(Ok(ws)) => ws,
            Ok(Err((reached, e))) => {
                if logged.as_deref() != Some(e.as_str()) {
                    let _ = inbox.send(Input::Refused(peer.id, reached.then(|| e.clone()))).await;
                    if reached {
                        tracing::warn!(peer = peer.id, reason = %e, "the replica at this peer's URL did not authenticate");
                    } else if e.starts_with("TLS") {
                        tracing::warn!(peer = peer.id, error = %e, "peer unreachable: its TLS certificate was refused");
                    } else {
                        tracing::info!(peer = peer.id, error = %e, "peer unreachable; retrying");
                    }
                    logged = Some(e);
                }
                tokio::select! { _ = shutdown.cancelled() => return, _ = tokio::time::sleep(REDIAL) => continue }
            }
            Err(_) => continue,
        };
        tracing::info!(peer = peer.id, "connected to peer");
        logged = None;
        let _ = inbox.send(Input::Reachable(peer.id, true)).await;
        // Frames queued while the peer was away are stale; the core resends what matters.
        while outbound.try_recv().is_ok() {}
        let (mut sink, mut stream) = ws.split();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                frame = outbound.recv() => {
                    let Some(frame) = frame else { return };
                    let text = serde_json::to_string(&frame).expect("frames serialise");
                    if sink.send(Message::Text(text.into())).await.is_err() { break; }
                }
                incoming = stream.next() => match incoming {
                    Some(Ok(Message::Text(text))) => match serde_json::from_str::<PeerFrame>(text.as_str()) {
                        Ok(frame @ (PeerFrame::Appended { from, .. } | PeerFrame::Voted { from, .. } | PeerFrame::SnapshotAck { from, .. })) if from == peer.id => {
                            if inbox.send(Input::Response(frame)).await.is_err() { return; }
                        }
                        Ok(_) => {
                            tracing::warn!(peer = peer.id, "a peer answered in another name, or not with an answer; dropping it");
                            break;
                        }
                        Err(e) => tracing::warn!(peer = peer.id, error = %e, "bad frame from peer"),
                    },
                    Some(Ok(_)) => {}
                    None | Some(Err(_)) => break,
                },
            }
        }
        tracing::info!(peer = peer.id, "connection to peer lost");
        let _ = inbox.send(Input::Reachable(peer.id, false)).await;
    }
}

/// The dialler's half of the handshake with the replica expected to be `peer`: say hello, check the
/// listener's proof, and only then send ours. Nothing else is sent before the listener proved itself.
async fn authenticate(ws: &mut PeerSocket, id: u64, peer: u64, key: &PeerKey) -> std::result::Result<(), String> {
    let dialler_nonce = peer_auth::nonce();
    let ours = peer_auth::own_format();
    let hello = PeerHandshake::Hello { from: id, to: peer, nonce: hex::encode(dialler_nonce), format: ours };
    let text = serde_json::to_string(&hello).expect("frames serialise");
    ws.send(Message::Text(text.into())).await.map_err(|_| "closed during the handshake")?;
    let challenge = loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => break text,
            // The listener's reason, if it gave one: another replication format, its own in the reason.
            Some(Ok(Message::Close(Some(frame)))) if !frame.reason.is_empty() => {
                return Err(match peer_auth::format_of_refusal(frame.reason.as_str()) {
                    Some(theirs) => peer_auth::format_mismatch(ours, theirs),
                    None => format!("refused by the peer: {}", frame.reason.as_str()),
                });
            }
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Err("refused by the peer".into()),
            Some(Ok(_)) => continue,
        }
    };
    let Ok(PeerHandshake::Challenge { from, nonce, proof, format }) = serde_json::from_str(challenge.as_str()) else {
        return Err("expected a challenge".into());
    };
    if from != peer {
        return Err("the challenge names another replica".into());
    }
    let listener_nonce = peer_auth::parse_nonce(&nonce).ok_or("bad nonce")?;
    if listener_nonce == dialler_nonce {
        return Err("the listener echoed our nonce".into());
    }
    if format != ours {
        // Checked before the proof, to say why; a format altered on the way fails the proof instead (the
        // transcript holds our own).
        return Err(peer_auth::format_mismatch(ours, format));
    }
    let transcript = Transcript { dialler: id, listener: peer, dialler_nonce, listener_nonce, format: ours };
    if !key.verify(Side::Listener, &transcript, &proof) {
        return Err("wrong proof: the listener does not know the cluster secret".into());
    }
    let proof = PeerHandshake::Proof { proof: key.proof(Side::Dialler, &transcript) };
    let text = serde_json::to_string(&proof).expect("frames serialise");
    ws.send(Message::Text(text.into())).await.map_err(|_| "closed during the handshake")?;
    // Nothing more until the listener accepts: it switches to the large frame limit in between.
    match ws.next().await {
        Some(Ok(Message::Text(text))) if serde_json::from_str(text.as_str()).ok() == Some(PeerHandshake::Accepted) => {
            Ok(())
        }
        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
            Err("refused by the peer (does it have another secret?)".into())
        }
        Some(Ok(_)) => Err("expected accepted".into()),
    }
}

type PeerSocket = tokio_tungstenite::WebSocketStream<Box<dyn crate::tls::Io>>;

/// How a replica reaches its peers.
#[derive(Clone)]
struct Transport {
    /// Connections leave from this address when given (so a firewall rule on addresses can cut a replica off).
    bind_ip: Option<std::net::IpAddr>,
    /// For `https://` peers: the certificate authorities to trust (`--tls-ca`).
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Transport {
    /// Open the WebSocket to a peer: TCP (from `bind_ip` if given), TLS for a `wss://` URL (the certificate must
    /// name the URL's host and chain to `--tls-ca`), then the WebSocket upgrade.
    async fn connect(
        &self,
        request: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> std::result::Result<PeerSocket, String> {
        let uri = request.uri();
        let secure = uri.scheme_str() == Some("wss");
        let host = uri.host().ok_or("no host")?.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address")?;
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }
            .map_err(|e| e.to_string())?;
        if let Some(ip) = self.bind_ip.filter(|ip| !ip.is_unspecified() && ip.is_ipv4() == addr.is_ipv4()) {
            socket.bind(std::net::SocketAddr::new(ip, 0)).map_err(|e| e.to_string())?;
        }
        let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let stream: Box<dyn crate::tls::Io> = if secure {
            let config = self.tls.clone().ok_or("an https:// peer, but no --tls-ca")?;
            let name = crate::tls::server_name(&host)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, stream)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            Box::new(tls)
        } else {
            Box::new(stream)
        };
        let (ws, _) = tokio_tungstenite::client_async(request, stream).await.map_err(|e| e.to_string())?;
        Ok(ws)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica 0 of three whose peers are unreachable (nothing listens on port 9 of loopback), over a fresh
    /// SQLite file whose stored term is `term`, with the given election timeout.
    async fn replica(term: u64, election: Duration) -> (Replication, CancellationToken) {
        let (replica, shutdown, _) = replica_and_url(term, election, 0).await;
        (replica, shutdown)
    }

    /// The same with `entries` log entries of `term` already stored.
    async fn replica_with_log(term: u64, election: Duration, entries: u64) -> (Replication, CancellationToken) {
        let (replica, shutdown, _) = replica_and_url(term, election, entries).await;
        (replica, shutdown)
    }

    /// [`replica_with_log`], and its database's URL.
    async fn replica_and_url(term: u64, election: Duration, entries: u64) -> (Replication, CancellationToken, String) {
        start_replica(term, election, entries, true).await
    }

    /// [`replica_with_log`] as a learner (a database created at this start).
    async fn learner_with_log(term: u64, election: Duration, entries: u64) -> (Replication, CancellationToken) {
        let (replica, shutdown, _) = start_replica(term, election, entries, false).await;
        (replica, shutdown)
    }

    async fn start_replica(
        term: u64,
        election: Duration,
        entries: u64,
        voter: bool,
    ) -> (Replication, CancellationToken, String) {
        let dir = std::env::temp_dir().join("replichat-replication-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join(format!("{}.db", uuid::Uuid::new_v4().simple())).display());
        let db = Db::open(&url).await.unwrap();
        db.save_election_state(term, None).await.unwrap();
        let log: Vec<WireEntry> = (1..=entries).map(|index| WireEntry { index, term, op: "{}".into() }).collect();
        db.append_entries(&log).await.unwrap();
        let peers = (0..3).map(|id| Peer { id, url: "http://127.0.0.1:9".to_owned() }).collect();
        let timing = Timing { heartbeat: election / 10, election, ack: Ack::Majority };
        let shutdown = CancellationToken::new();
        let replication = Replication::start(
            0,
            peers,
            Some("s".into()),
            None,
            None,
            timing,
            db,
            voter,
            "{}".into(),
            10_000,
            shutdown.clone(),
        )
        .await;
        (replication.unwrap(), shutdown, url)
    }

    fn heartbeat(term: u64) -> PeerFrame {
        PeerFrame::Append { term, leader: 1, prev_index: 0, prev_term: 0, entries: vec![], commit: 0, cluster: vec![] }
    }

    #[tokio::test]
    async fn an_absurd_term_is_refused_not_adopted() {
        let (replica, shutdown) = replica(3, Duration::from_secs(3600)).await;
        for absurd in [u64::MAX, 3 + MAX_TERM_LEAP + 1] {
            let answer = replica.request(heartbeat(absurd)).await;
            assert!(!matches!(answer, Some(PeerFrame::Appended { success: true, .. })), "{absurd}: {answer:?}");
            let vote =
                PeerFrame::Vote { term: absurd, candidate: 2, last_index: 9, last_term: 9, pre: false, fresh: false };
            let answer = replica.request(vote).await;
            assert!(!matches!(answer, Some(PeerFrame::Voted { granted: true, .. })), "{absurd}: {answer:?}");
            assert_eq!(replica.status().borrow().term, 3, "term {absurd} was adopted");
        }
        // Entries that do not follow `prev_index` one by one, or claim a term above the frame's, are refused.
        let entry = |index, term| WireEntry { index, term, op: "{}".into() };
        for entries in [vec![entry(2, 4)], vec![entry(1, 4), entry(3, 4)], vec![entry(1, 5)], vec![entry(1, 0)]] {
            let PeerFrame::Append { term, leader, prev_index, prev_term, commit, cluster, .. } = heartbeat(4) else {
                unreachable!()
            };
            let frame =
                PeerFrame::Append { term, leader, prev_index, prev_term, entries: entries.clone(), commit, cluster };
            let answer = replica.request(frame).await;
            assert!(!matches!(answer, Some(PeerFrame::Appended { success: true, .. })), "{entries:?}: {answer:?}");
            assert_eq!(replica.status().borrow().last_index, 0, "{entries:?} were appended");
        }
        // A plausible higher term is adopted as ever.
        let answer = replica.request(heartbeat(4)).await;
        assert!(matches!(answer, Some(PeerFrame::Appended { success: true, term: 4, .. })), "{answer:?}");
        assert_eq!(replica.status().borrow().term, 4);
        shutdown.cancel();
    }

    /// A new cluster whose first primary stepped down before committing its first entry (e2e, loaded machine:
    /// no acknowledgement within the 500 ms election timeout): every replica is a learner holding that entry,
    /// none committed. A learner with entries did not stand and voted only for an empty log, so nobody was
    /// elected again (34 s, until the test gave up).
    #[tokio::test]
    async fn learners_of_a_new_cluster_whose_first_primary_committed_nothing_elect_one_of_them() {
        let election = Duration::from_millis(100);
        let (replica, shutdown) = learner_with_log(2, election, 1).await;
        let mut status = replica.status();
        let stands = tokio::time::timeout(election * 50, status.wait_for(|s| s.role == Role::Candidate));
        assert!(stands.await.is_ok(), "a learner that never knew of a commit did not stand");
        // It votes for another such learner whose log is as up to date as its own, and only for such a one.
        let vote = |fresh| PeerFrame::Vote { term: 3, candidate: 2, last_index: 1, last_term: 2, pre: true, fresh };
        let answer = replica.request(vote(true)).await;
        assert!(matches!(answer, Some(PeerFrame::Voted { granted: true, pre: true, .. })), "{answer:?}");
        let answer = replica.request(vote(false)).await;
        assert!(matches!(answer, Some(PeerFrame::Voted { granted: false, pre: true, .. })), "{answer:?}");
        shutdown.cancel();
    }

    /// The other side: a learner that knows an entry was committed (a wiped replica that caught up with part of
    /// a working cluster's log) stays out of elections until it is a voter, as before.
    #[tokio::test]
    async fn a_learner_that_knows_of_a_commit_neither_stands_nor_votes() {
        let election = Duration::from_millis(100);
        let (replica, shutdown) = learner_with_log(3, election, 2).await;
        // The primary of term 4 says entry 1 is committed; its term is 3, so this learner is not caught up.
        let append = PeerFrame::Append {
            term: 4,
            leader: 1,
            prev_index: 2,
            prev_term: 3,
            entries: vec![],
            commit: 1,
            cluster: vec![],
        };
        let answer = replica.request(append).await;
        assert!(matches!(answer, Some(PeerFrame::Appended { success: true, learner: true, .. })), "{answer:?}");
        let mut status = replica.status();
        let knows = tokio::time::timeout(election * 10, status.wait_for(|s| s.commit_index == 1));
        assert!(knows.await.is_ok(), "the learner did not take the primary's commit index");
        // Many election timeouts without a primary: it never becomes a candidate.
        let stands = tokio::time::timeout(election * 20, status.wait_for(|s| s.role == Role::Candidate));
        assert!(stands.await.is_err(), "a learner that knows of a commit stood for election");
        // Nor, with no live primary any more, does it vote for a fresh learner with as much log.
        let vote = PeerFrame::Vote { term: 5, candidate: 2, last_index: 2, last_term: 3, pre: true, fresh: true };
        let answer = replica.request(vote).await;
        assert!(matches!(answer, Some(PeerFrame::Voted { granted: false, pre: true, .. })), "{answer:?}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_replica_asked_by_a_candidate_with_less_log_stands_at_once() {
        // An election timeout far beyond the test (and a heartbeat, the jitter's scale, of 6 s): only the refused
        // pre-vote can make this replica stand.
        let (replica, shutdown) = replica_with_log(3, Duration::from_secs(60), 5).await;
        let behind = PeerFrame::Vote { term: 4, candidate: 1, last_index: 4, last_term: 3, pre: true, fresh: false };
        let answer = replica.request(behind).await;
        assert!(matches!(answer, Some(PeerFrame::Voted { granted: false, pre: true, .. })), "{answer:?}");
        let mut status = replica.status();
        let stands = tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| s.role == Role::Candidate));
        assert!(stands.await.is_ok(), "the replica with more log did not ask for pre-votes itself");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_primary_that_cannot_append_steps_down() {
        use crate::storage::tests::{fill, Tmpfs};
        let tmpfs = Tmpfs::mount("4m");
        let db = Db::open(&format!("sqlite://{}", tmpfs.0.join("replica.db").display())).await.unwrap();
        let timing =
            Timing { heartbeat: Duration::from_millis(10), election: Duration::from_millis(100), ack: Ack::Majority };
        let shutdown = CancellationToken::new();
        let me = vec![Peer { id: 0, url: "http://127.0.0.1:9".to_owned() }];
        let replica =
            Replication::start(0, me, None, None, None, timing, db, true, "{}".into(), 10_000, shutdown.clone())
                .await
                .unwrap();
        assert_eq!(replica.status().borrow().role, Role::Primary, "a cluster of one elects itself");
        fill(&tmpfs.0.join("filler"));
        let mut proposed = 0;
        while replica.propose(None, "x".repeat(3000)).await.is_ok() {
            proposed += 1;
            assert!(proposed < 10_000, "the disk never filled up");
        }
        let mut status = replica.status();
        let stepped_down = tokio::time::timeout(Duration::from_secs(5), status.wait_for(|s| s.role != Role::Primary));
        assert!(stepped_down.await.is_ok(), "still primary after failing to append");
        let failure = replica.status().borrow().storage_failure.clone();
        assert!(failure.as_deref().is_some_and(|f| f.contains("full")), "{failure:?}");
        assert!(replica.propose(None, "{}".into()).await.is_err(), "a replica that stepped down takes no proposals");
        shutdown.cancel();
    }

    /// A new primary whose `noop` took longer than the election timeout to be durable (a slow disk) still gives
    /// its backups one election timeout to answer its first append. The grace used to start before that write,
    /// so such a primary stepped down at its first heartbeat tick unless a backup had answered within one
    /// heartbeat: primary for 77 ms, then another election (kill -9 across 20 ms on a busy machine,
    /// backend/tests/cluster/netsim.rs).
    #[tokio::test]
    async fn a_new_primary_whose_first_write_was_slow_waits_for_its_backups() {
        use sqlx::Connection;
        let election = Duration::from_millis(1000);
        let (replica, shutdown, url) = replica_and_url(1, election, 0).await;
        let mut status = replica.status();
        let granted = |term, pre| Input::Response(PeerFrame::Voted { term, from: 1, granted: true, pre });
        status.wait_for(|s| s.role == Role::Candidate).await.unwrap();
        replica.inbox.send(granted(1, true)).await.unwrap();
        status.wait_for(|s| s.term == 2).await.unwrap();
        // The slow disk: another connection holds SQLite's write lock while the vote that elects it arrives.
        let mut blocker = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query("BEGIN IMMEDIATE").execute(&mut blocker).await.unwrap();
        replica.inbox.send(granted(2, false)).await.unwrap();
        tokio::time::sleep(election * 3 / 2).await;
        sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
        status.wait_for(|s| s.elections.iter().any(|e| e.term == 2 && e.leader == 0)).await.unwrap();
        // Backup 1 answers the first append three heartbeats later: well within one election timeout.
        tokio::time::sleep(election * 3 / 10).await;
        let last_index = replica.status().borrow().last_index;
        let appended =
            PeerFrame::Appended { term: 2, from: 1, success: true, last_index, learner: false, storage_failed: false };
        replica.inbox.send(Input::Response(appended)).await.unwrap();
        // Answered once the acknowledgement before it was handled (one inbox, in order).
        let vote = PeerFrame::Vote { term: 3, candidate: 2, last_index, last_term: 2, pre: true, fresh: false };
        assert!(replica.request(vote).await.is_some());
        assert_eq!(replica.status().borrow().role, Role::Primary, "the new primary stepped down");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn the_last_term_does_not_wrap_into_an_election() {
        let election = Duration::from_millis(20);
        let (replica, shutdown) = replica(u64::MAX, election).await;
        let mut status = replica.status();
        // Several election timeouts: with `term + 1` unchecked the pre-vote overflows (a panic that ends the
        // core in a debug build; term 0 and endless candidacy in a release build).
        let changed = tokio::time::timeout(election * 20, async {
            loop {
                if status.changed().await.is_err() {
                    return "the replication core stopped";
                }
                let now = status.borrow().clone();
                if now.term != u64::MAX || now.role == Role::Primary {
                    return "the term wrapped";
                }
            }
        })
        .await;
        if let Ok(what) = changed {
            panic!("{what}");
        }
        assert_eq!(replica.status().borrow().term, u64::MAX);
        assert!(replica.request(heartbeat(u64::MAX)).await.is_some(), "the core still answers");
        shutdown.cancel();
    }
}
