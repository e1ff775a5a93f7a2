//! The replichat wire protocol: every JSON frame a client and a replica exchange over `/ws`.
//!
//! This crate is types only (serde), so the browser app, the server and any third-party client can share it.
//! The names here are the names in `docs/PROTOCOL.md`, one-to-one.
//!
//! Every frame is a JSON object with a `"type"` field naming it (snake_case). A request may carry a `"req"`
//! string; the reply to it, or the error it caused, echoes that string back.
//!
//! Indexes: every state change in replichat is an entry in one totally ordered log, numbered by its `index`
//! (1, 2, 3, ...). Every event a user must see is tagged with the index of the entry that caused it, and a
//! client's *cursor* is the highest index it has seen. Message ids are the index of the entry that stored them,
//! so they grow in send order too.

use serde::{Deserialize, Serialize};

/// Version of this protocol, sent in [`ServerFrame::Welcome`]. Bumped on an incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest text frame the server accepts, in bytes. A bigger frame closes the socket with code
/// [`CLOSE_TOO_BIG`].
pub const MAX_FRAME_BYTES: usize = 64 * 1024;
/// Close code sent when a frame exceeds [`MAX_FRAME_BYTES`] (RFC 6455 "message too big").
pub const CLOSE_TOO_BIG: u16 = 1009;
/// Close code sent when the server shuts down (RFC 6455 "going away").
pub const CLOSE_GOING_AWAY: u16 = 1001;
/// Close code sent after `account_deleted` (RFC 6455 "normal closure").
pub const CLOSE_NORMAL: u16 = 1000;

/// Longest message text, in characters (Unicode scalar values).
pub const MAX_TEXT_CHARS: usize = 4000;
/// Longest username, in characters.
pub const MAX_USERNAME_CHARS: usize = 32;
/// Shortest password, in characters.
pub const MIN_PASSWORD_CHARS: usize = 8;
/// Longest password, in characters (bounds the cost of hashing a hostile input).
pub const MAX_PASSWORD_CHARS: usize = 1024;
/// Longest client message id, in characters.
pub const MAX_CLIENT_ID_CHARS: usize = 64;
/// Page size used by `list` and `history` when the request gives none.
pub const DEFAULT_PAGE: u32 = 50;
/// Largest page a `list` or `history` request may ask for.
pub const MAX_PAGE: u32 = 200;

/// A frame sent by a client: an optional request id plus the request itself.
///
/// On the wire the two are flattened into one object: `{"type":"send","req":"7","to":"bob",...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Chosen by the client; echoed in the reply (or error) to this request. Any string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<String>,
    /// What the client asks for.
    #[serde(flatten)]
    pub request: Request,
}

/// What a client can ask of the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Create an account and log in. Reply: [`ServerFrame::Session`] with a new token.
    Register {
        /// 1-32 characters, no whitespace, control characters or `*`; unique ignoring case.
        username: String,
        /// At least 8 characters (at most 1024).
        password: String,
    },
    /// Log in. Reply: [`ServerFrame::Session`] with a new token, then one [`ServerFrame::Message`] for each
    /// message addressed to this user that no session of theirs has acknowledged with `delivered`, oldest first.
    Login {
        /// Case-insensitive.
        username: String,
        /// The account's password.
        password: String,
    },
    /// Re-attach this socket to an existing session (after a reconnect). Reply: [`ServerFrame::Session`]
    /// without a token, then every event of this user with an index greater than `cursor`, in index order.
    Resume {
        /// The token a `register` or `login` reply gave.
        token: String,
        /// The highest event index the client has seen (0 for none).
        cursor: u64,
    },
    /// List usernames matching a pattern. Reply: [`ServerFrame::Users`]. Needs a session.
    List {
        /// `*` stands for any run of characters (possibly empty); empty or `*` lists everyone; a pattern
        /// without `*` is an exact match. Matching ignores case.
        #[serde(default)]
        pattern: String,
        /// Only names sorting after this one (the `next` of the previous page).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        /// Page size, 1-200; default 50.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Send a message to one other user. Reply: [`ServerFrame::Sent`]. Needs a session.
    Send {
        /// Recipient's username (case-insensitive); not yourself.
        to: String,
        /// 1-4000 characters.
        text: String,
        /// The client's own id for this message (a UUID is recommended; 1-64 characters). Sending again with
        /// the same `client_id` stores nothing new and replies with the original message's id and index.
        client_id: String,
    },
    /// One page of the conversation with a user, newest page first. Reply: [`ServerFrame::History`].
    History {
        /// The other user's username.
        with: String,
        /// Only messages with an id lower than this (the lowest id of the previous page).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        before: Option<u64>,
        /// Page size, 1-200; default 50.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// Receipt: every message addressed to me with an id up to `up_to` reached a device of mine.
    /// Reply: [`ServerFrame::Ok`]. Each sender concerned receives a [`ServerFrame::Receipt`].
    Delivered {
        /// Highest message id covered.
        up_to: u64,
    },
    /// Receipt: I have read the messages from `with` with an id up to `up_to` (implies delivered).
    /// Reply: [`ServerFrame::Ok`]. The sender receives a [`ServerFrame::Receipt`].
    Read {
        /// The sender whose messages were read.
        with: String,
        /// Highest message id covered.
        up_to: u64,
    },
    /// My conversations, most recent first. Reply: [`ServerFrame::Conversations`].
    Conversations,
    /// I am typing to `to`. Reply: [`ServerFrame::Ok`]; `to`'s sessions receive [`ServerFrame::Typing`].
    Typing {
        /// The user being typed to.
        to: String,
    },
    /// Revoke the session this socket is using. Reply: [`ServerFrame::Ok`]; the socket stays open, logged out.
    Logout,
    /// Log out everywhere: revoke every session of my account, this one included. Reply:
    /// [`ServerFrame::Ok`]; this socket stays open, logged out; every other socket of the account gets
    /// [`ServerFrame::SessionEnded`] and is closed.
    LogoutAll,
    /// Delete my account; the password is the confirmation. Reply: [`ServerFrame::AccountDeleted`], sent to
    /// every open socket of the account, each then closed.
    DeleteAccount {
        /// The account's password, again.
        password: String,
    },
    /// Liveness check. Reply: [`ServerFrame::Pong`]. Allowed without a session.
    Ping,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionEnd {
    /// Another socket of the same session sent `logout`.
    LoggedOut,
    /// A socket of the account sent `logout_all`.
    LoggedOutEverywhere,
}

/// Whether a receipt says a message reached a device or was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptKind {
    /// The message reached a device of the recipient.
    Delivered,
    /// The recipient read the message.
    Read,
}

/// A stored one-to-one message as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Server-assigned id: the log index of the entry that stored the message. Grows in send order.
    pub id: u64,
    /// Sender's username.
    pub from: String,
    /// Recipient's username.
    pub to: String,
    /// The text, exactly as sent. Render it as text, never as HTML.
    pub text: String,
    /// The sender's `client_id`.
    pub client_id: String,
    /// When the server accepted it, milliseconds since the Unix epoch.
    pub sent_at: i64,
    /// When the recipient acknowledged delivery, if they have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<i64>,
    /// When the recipient read it, if they have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_at: Option<i64>,
    /// True when the sender has since deleted their account.
    #[serde(default)]
    pub from_deleted: bool,
}

/// One line of the conversation list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// The other user's username.
    pub with: String,
    /// True when the other user deleted their account (their messages stay, replies are refused).
    pub deleted: bool,
    /// True when the other user has at least one open session on this server.
    pub online: bool,
    /// When the other user was last seen (ms since the epoch): when their last open socket closed, or when
    /// they last signed in, as the primary recorded it in the log. Absent if never recorded (or deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<i64>,
    /// Messages from them to me not yet marked read.
    pub unread: u64,
    /// The latest message either way.
    pub last: Message,
}

/// A stable machine-readable error code. Clients branch on these, never on the message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON, is not text, has an unknown `type`, or a field is missing or mistyped.
    BadRequest,
    /// The request needs a session and this socket has none (or its token is not valid).
    Unauthenticated,
    /// `register`, `login` or `resume` on a socket that already has a session.
    AlreadyAuthenticated,
    /// The username breaks the rules (length, whitespace, control characters, `*`).
    InvalidUsername,
    /// The password is shorter than 8 or longer than 1024 characters.
    WeakPassword,
    /// Another account has this username (ignoring case).
    UsernameTaken,
    /// Unknown username or wrong password (deliberately not told apart).
    BadCredentials,
    /// No account with that username.
    UnknownUser,
    /// A message to yourself.
    SelfSend,
    /// Message text empty (or only whitespace), or over 4000 characters.
    TooLong,
    /// Too many attempts: failed password checks (`login`, `delete_account`; per address, per address and
    /// account, per account), messages (`send`, per account), or the server's password-hashing queue is full.
    /// The error carries `retry_after_ms`.
    RateLimited,
    /// The server could not complete the request; nothing was changed. Retry later.
    Internal,
    /// This replica cannot serve the request now (it stopped being the primary while the request was in
    /// flight, or it is still catching up). Nothing was acknowledged; retry, on the primary.
    Unavailable,
}

/// A frame sent by the server: a reply (echoing `req`), an event, or a live notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerFrame {
    /// The `req` of the request this frame answers; absent on pushes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub req: Option<String>,
    /// The frame itself.
    #[serde(flatten)]
    pub body: ServerBody,
}

/// The body of a server frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerBody {
    /// First frame on every socket.
    Welcome {
        /// This server's replica id.
        node: u64,
        /// The current term (1 on a single node).
        term: u64,
        /// Base URLs (`http://host:port`) of every replica a client may connect to.
        endpoints: Vec<String>,
        /// [`PROTOCOL_VERSION`].
        protocol: u32,
    },
    /// Reply to `register`, `login` and `resume`: the socket now belongs to this session.
    Session {
        /// The session token (only on `register` and `login`). Keep it to `resume` after a reconnect.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
        /// The account's username, as registered.
        username: String,
        /// For `register`/`login`: the current log index; start your cursor here. For `resume`: the cursor the
        /// client sent. Events with a higher index follow on this socket.
        cursor: u64,
    },
    /// Reply to `list`.
    Users {
        /// Matching usernames, sorted case-insensitively.
        users: Vec<String>,
        /// Pass as `after` to get the next page; absent on the last page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    /// Reply to `send`: the message is stored durably.
    Sent {
        /// The message id (the same on a retry).
        id: u64,
        /// The log index that stored it (equals `id`).
        index: u64,
        /// The `client_id` the request gave.
        client_id: String,
        /// The server's timestamp for the message.
        sent_at: i64,
    },
    /// Reply to `history`: messages in ascending id order (oldest first within the page).
    History {
        /// The other user's username.
        with: String,
        /// The page.
        messages: Vec<Message>,
        /// True if older messages exist (ask again with `before` = the first id here).
        more: bool,
    },
    /// Reply to `conversations`.
    Conversations {
        /// Most recent first.
        conversations: Vec<Conversation>,
    },
    /// Reply to `delivered`, `read`, `typing` and `logout`.
    Ok,
    /// Reply to `ping`.
    Pong,
    /// A request failed; nothing was changed. The socket stays open.
    Error {
        /// Stable code to branch on.
        code: ErrorCode,
        /// Human-readable explanation (may change between versions).
        message: String,
        /// With `rate_limited`: wait this many milliseconds before trying again.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// Event: a message to or from me (my own messages are echoed to all my sessions, including the sending
    /// one; de-duplicate by `message.id`).
    Message {
        /// Log index of the event (equals `message.id`).
        index: u64,
        /// The message.
        message: Message,
    },
    /// Event: a recipient acknowledged or read my messages to them with ids up to `up_to`.
    Receipt {
        /// Log index of the event.
        index: u64,
        /// Delivered or read.
        kind: ReceiptKind,
        /// The recipient's username.
        by: String,
        /// Highest message id covered; every earlier message of mine to `by` is covered too.
        up_to: u64,
        /// When it happened, milliseconds since the Unix epoch.
        at: i64,
    },
    /// Event: someone I had a conversation with deleted their account.
    PeerDeleted {
        /// Log index of the event.
        index: u64,
        /// Their former username (now free to be registered again by someone else).
        username: String,
    },
    /// Live only: `from` is typing to me. Not stored, not replayed.
    Typing {
        /// Who is typing.
        from: String,
    },
    /// Live only: a contact's first session opened (`online`) or last one closed. Not stored, not replayed.
    Presence {
        /// The contact.
        username: String,
        /// Whether they now have an open session.
        online: bool,
        /// With `online: false`: when their last socket closed (ms since the epoch), as recorded in the log.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_seen: Option<i64>,
    },
    /// My account was deleted (by this or another of my sessions); the socket closes next.
    AccountDeleted,
    /// Live only: the session this socket uses has ended (logged out elsewhere, or expired); the socket
    /// closes next (1000). Drop the token and sign in again.
    SessionEnded {
        /// Why.
        reason: SessionEnd,
    },
    /// This replica is not the primary: connect to `leader_url` (or try the `endpoints`). Sent instead of
    /// `welcome` by a backup, or to open sockets of a primary that was deposed; the socket closes next.
    NotLeader {
        /// The primary's replica id, if this replica knows one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        leader: Option<u64>,
        /// The primary's base URL (`http://host:port`), if known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        leader_url: Option<String>,
        /// This replica's current term. Never follow a hint whose term is lower than one you have seen.
        term: u64,
        /// Base URLs of every replica.
        endpoints: Vec<String>,
    },
}

impl ServerBody {
    /// The log index of an event frame, `None` for replies and live-only frames.
    pub fn index(&self) -> Option<u64> {
        match self {
            ServerBody::Message { index, .. }
            | ServerBody::Receipt { index, .. }
            | ServerBody::PeerDeleted { index, .. } => Some(*index),
            _ => None,
        }
    }
}

impl From<ServerBody> for ServerFrame {
    fn from(body: ServerBody) -> Self {
        ServerFrame { req: None, body }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frame_flattens_req_and_type() {
        let frame: ClientFrame =
            serde_json::from_str(r#"{"type":"send","req":"7","to":"bob","text":"hi","client_id":"c1"}"#).unwrap();
        assert_eq!(frame.req.as_deref(), Some("7"));
        assert_eq!(frame.request, Request::Send { to: "bob".into(), text: "hi".into(), client_id: "c1".into() });
        let unit: ClientFrame = serde_json::from_str(r#"{"type":"conversations"}"#).unwrap();
        assert_eq!(unit.request, Request::Conversations);
    }

    #[test]
    fn server_frame_round_trips() {
        let frame = ServerFrame {
            req: Some("1".into()),
            body: ServerBody::Error { code: ErrorCode::UsernameTaken, message: "taken".into(), retry_after_ms: None },
        };
        let text = serde_json::to_string(&frame).unwrap();
        assert_eq!(text, r#"{"req":"1","type":"error","code":"username_taken","message":"taken"}"#);
        assert_eq!(serde_json::from_str::<ServerFrame>(&text).unwrap(), frame);
        let ok = serde_json::to_string(&ServerFrame::from(ServerBody::Ok)).unwrap();
        assert_eq!(ok, r#"{"type":"ok"}"#);
    }
}

/// A frame between replicas on the internal WebSocket `/internal/replicate`.
///
/// Every replica dials every other one and sends its *requests* (`append`, `vote`) on the connection it
/// dialed; the answers (`appended`, `voted`) come back on that same connection, in order. A connection carries
/// these only after the [`PeerHandshake`] proved each end to the other; the sender id in every frame
/// (`leader`, `candidate`, `from`) must be the id that end proved. Every frame carries the sender's term: a
/// replica that sees a higher term adopts it (and becomes a backup); requests from a lower term are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PeerFrame {
    /// Primary -> backup: entries to append after `prev_index` (none: a heartbeat).
    Append {
        /// The primary's term.
        term: u64,
        /// The primary's replica id.
        leader: u64,
        /// Index of the entry just before `entries` (0: the start of the log).
        prev_index: u64,
        /// Term of that entry; the backup refuses if its own entry there has another term.
        prev_term: u64,
        /// Consecutive entries starting at `prev_index + 1`.
        entries: Vec<WireEntry>,
        /// The primary's commit index: entries up to it are durable on a majority and may be applied.
        commit: u64,
        /// The primary's view of every replica (on heartbeats), so backups can show the whole cluster.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        cluster: Vec<ReplicaView>,
    },
    /// Backup -> primary: the answer to `append`, sent after the entries are durable.
    Appended {
        /// The backup's term.
        term: u64,
        /// The backup's replica id.
        from: u64,
        /// True when the entries now follow `prev_index` in the backup's log.
        success: bool,
        /// On success, the index of the last entry the backup holds that matches the primary's log; on
        /// failure, the backup's last index (where the primary should resume).
        last_index: u64,
        /// The backup is a learner (its database is new, taken over or restored): the primary does not count
        /// its acknowledgements until it says otherwise (docs/PROTOCOL.md §10.4).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        learner: bool,
        /// The backup could not store the entries (a full or failing disk): the primary stops resending
        /// until the next heartbeat and shows the backup as failing.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        storage_failed: bool,
    },
    /// Primary -> backup: the backup is so far behind that the entries it needs were compacted away; replace
    /// its whole state with the state as of entry `last_index`, which arrives as a stream of chunks `seq` = 0,
    /// 1, 2, … (each the rows of one slice of one table, in key order), read by the primary in one consistent
    /// read. The backup installs them as they arrive, in one transaction that commits with the chunk marked
    /// `done`; a chunk out of order (or anything else in between) abandons the install, and the old state stays.
    /// Chunks before the last are answered with `snapshot_ack`, the last with `appended` (`last_index` = the
    /// snapshot's). docs/PROTOCOL.md §10.3, `snapshot_chunk`.
    SnapshotChunk {
        /// The primary's term.
        term: u64,
        /// The primary's replica id.
        leader: u64,
        /// The last entry the snapshot includes.
        last_index: u64,
        /// Its term.
        last_term: u64,
        /// Which stream this chunk belongs to (chosen by the primary, new for every attempt).
        stream: u64,
        /// Position of this chunk in its stream, from 0.
        seq: u64,
        /// The last chunk: the backup commits the install once it has stored it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        done: bool,
        /// The state table these rows belong to.
        table: String,
        /// The rows, as JSON text: an array of arrays, each row its columns in the order the storage layer
        /// defines for `table` (opaque to replication; the databases build and read it).
        rows: String,
    },
    /// Backup -> primary: the answer to a `snapshot_chunk` that is not the last. With `success`, every chunk of
    /// `stream` up to `seq` is stored (in the install's open transaction); without, the backup abandoned the
    /// install (a gap, another stream), and the primary starts over.
    SnapshotAck {
        /// The backup's term.
        term: u64,
        /// The backup's replica id.
        from: u64,
        /// The stream answered.
        stream: u64,
        /// The chunk answered.
        seq: u64,
        /// Whether the chunk was stored.
        success: bool,
    },
    /// Candidate -> everyone: vote for me in `term`.
    Vote {
        /// The candidate's (new) term.
        term: u64,
        /// The candidate's replica id.
        candidate: u64,
        /// Index of the candidate's last entry.
        last_index: u64,
        /// Term of the candidate's last entry.
        last_term: u64,
        /// A pre-vote: "would you vote for me in `term`?". Changes no state on either side; a candidate
        /// starts a real election (and raises its term) only after a majority says yes.
        #[serde(default)]
        pre: bool,
        /// The candidate is a learner that has never known an entry to be committed (a new cluster whose
        /// first primary committed nothing): another such learner may vote for it. Omitted when `false`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        fresh: bool,
    },
    /// The answer to `vote`. A replica grants at most one vote per term, persisted before answering, and
    /// only to a candidate whose log is at least as up to date as its own (last term, then last index).
    Voted {
        /// The voter's term.
        term: u64,
        /// The voter's replica id.
        from: u64,
        /// Whether the vote was granted.
        granted: bool,
        /// Answers a pre-vote.
        #[serde(default)]
        pre: bool,
    },
}

/// The replication format this build speaks: what the ops in the log, the rows of a snapshot, the peer frames
/// and the state a replay derives from mean. Raised whenever one of them changes meaning (a migration that
/// changes what the state holds, a new op, a changed frame). Replicas exchange it in the handshake and refuse
/// a peer of another format (docs/PROTOCOL.md §10.2), so a group never mixes two: to the group, a replica of
/// another format is a partitioned one. 0 is what a build from before the exchange is taken to speak; 1 is the
/// format since migration 0005 (a message's events derived from its row).
pub const REPLICATION_FORMAT: u32 = 1;

/// The handshake that opens every `/internal/replicate` connection, before any [`PeerFrame`]: each end proves
/// it knows the cluster secret without sending it (an HMAC over both ids and both nonces; docs/PROTOCOL.md
/// §10.2). Nonces and proofs are lowercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PeerHandshake {
    /// Dialler -> listener, the first frame.
    Hello {
        /// The dialler's replica id.
        from: u64,
        /// The replica id the dialler means to reach (the listener refuses if it is not its own).
        to: u64,
        /// The dialler's fresh nonce (32 bytes).
        nonce: String,
        /// The dialler's [`REPLICATION_FORMAT`] (absent, 0, from a build before it was exchanged).
        #[serde(default)]
        format: u32,
    },
    /// Listener -> dialler: its own nonce, and its proof over both ids and both nonces.
    Challenge {
        /// The listener's replica id.
        from: u64,
        /// The listener's fresh nonce (32 bytes).
        nonce: String,
        /// HMAC-SHA256 with the "listener" label (32 bytes).
        proof: String,
        /// The listener's [`REPLICATION_FORMAT`] (absent, 0, from a build before it was exchanged).
        #[serde(default)]
        format: u32,
    },
    /// Dialler -> listener, sent only once the listener's proof checked out: the dialler's proof.
    Proof {
        /// HMAC-SHA256 with the "dialler" label (32 bytes).
        proof: String,
    },
    /// Listener -> dialler: the dialler's proof checked out. The dialler sends nothing between its proof and
    /// this; requests follow it.
    Accepted,
}

/// One log entry on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireEntry {
    /// Position in the log, from 1.
    pub index: u64,
    /// Term of the primary that created it.
    pub term: u64,
    /// The operation, opaque to replication (JSON text).
    pub op: String,
}

/// One replica as some replica sees it: the rows of `GET /api/cluster`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaView {
    /// Replica id.
    pub id: u64,
    /// Its base URL.
    pub url: String,
    /// `primary`, `backup`, `candidate`, or `unknown`.
    pub role: String,
    /// Whether it answered within the failure timeout (as the reporting replica sees it).
    pub alive: bool,
    /// Highest log index known to be on it.
    pub last_index: u64,
    /// How many entries it is behind the reporting replica's last index.
    pub lag: u64,
    /// The term it last spoke in, as the reporting replica knows it (`None`: not heard since it started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
    /// While it is not alive: when the reporting replica last heard from it (milliseconds since the Unix epoch,
    /// the reporter's clock; `None` while alive or when never heard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heard_ms: Option<u64>,
    /// While it is not alive: why the reporting replica's last connection to it was refused in the handshake
    /// (another replication format, another cluster secret), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

/// An election as some replica saw it: `leader` became primary of `term`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Election {
    /// The term won.
    pub term: u64,
    /// The replica that won it.
    pub leader: u64,
    /// When the reporting replica learnt of it (milliseconds since the Unix epoch, its clock): the winner
    /// itself when it won, the others at the new primary's first heartbeat.
    pub at_ms: u64,
}

/// `GET /api/cluster`: the cluster as one replica sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The reporting replica's id.
    pub id: u64,
    /// Its role: `primary`, `backup` or `candidate`.
    pub role: String,
    /// Its current term.
    pub term: u64,
    /// The primary it follows (or is), if known.
    pub leader: Option<u64>,
    /// Highest index known to be durable on a majority.
    pub commit_index: u64,
    /// Highest index in its own log.
    pub last_index: u64,
    /// Highest index applied to its state tables.
    pub applied_index: u64,
    /// Every replica, itself included.
    pub replicas: Vec<ReplicaView>,
    /// The elections it has seen since it started, oldest first (the last 20).
    #[serde(default)]
    pub elections: Vec<Election>,
    /// Its clock when it answered (milliseconds since the Unix epoch), to read `last_heard_ms` and `at_ms`
    /// against.
    #[serde(default)]
    pub now_ms: u64,
}
