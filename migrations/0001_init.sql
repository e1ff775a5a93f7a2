-- 0001: the replicated log and the chat state it drives.
-- Portable SQL: the same file runs on SQLite and PostgreSQL. Every integer is BIGINT, booleans are
-- NULL-or-timestamp columns, and every id is decided by the node that accepted the request and carried in
-- the log entry, so applying the same log on another node yields the same rows (no autoincrement).
-- Never edit this file once landed: add 0002_... instead.

-- The log: one row per state change, in order. `op` is the JSON of the operation (see backend/src/op.rs).
CREATE TABLE log (
    idx  BIGINT PRIMARY KEY,
    term BIGINT NOT NULL,
    op   TEXT   NOT NULL
);

-- Small durable counters of the node itself (e.g. the highest applied index), keyed by name.
CREATE TABLE meta (
    name  TEXT   PRIMARY KEY,
    value BIGINT NOT NULL
);

-- Accounts. A deleted account keeps a tombstone row (deleted_at set, live_key and password_hash NULL)
-- so the messages it sent can still name it, while its username is free for a new account.
CREATE TABLE users (
    id            BIGINT PRIMARY KEY,
    username      TEXT   NOT NULL,     -- as registered
    name_key      TEXT   NOT NULL,     -- lower-cased username (computed by the node, not by SQL lower())
    live_key      TEXT   UNIQUE,       -- name_key while the account exists; NULL once deleted
    password_hash TEXT,                -- argon2id PHC string; NULL once deleted
    created_at    BIGINT NOT NULL,
    deleted_at    BIGINT
);

-- Sessions: only the SHA-256 of a token is stored.
CREATE TABLE sessions (
    token_hash TEXT   PRIMARY KEY,
    user_id    BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX sessions_by_user ON sessions (user_id);

-- Messages. id is the log index of the entry that stored the message. (sender_id, client_id) makes sends
-- idempotent.
CREATE TABLE messages (
    id           BIGINT PRIMARY KEY,
    sender_id    BIGINT NOT NULL,
    recipient_id BIGINT NOT NULL,
    client_id    TEXT   NOT NULL,
    body         TEXT   NOT NULL,
    sent_at      BIGINT NOT NULL,
    delivered_at BIGINT,
    read_at      BIGINT,
    UNIQUE (sender_id, client_id)
);
CREATE INDEX messages_by_recipient ON messages (recipient_id, id);
CREATE INDEX messages_by_sender ON messages (sender_id, id);

-- Per-user events, each tied to the log index that caused it: what `resume` replays after a cursor.
-- `body` is the JSON of the server frame body (shared::ServerBody).
CREATE TABLE events (
    user_id BIGINT NOT NULL,
    idx     BIGINT NOT NULL,
    body    TEXT   NOT NULL,
    PRIMARY KEY (user_id, idx)
);
