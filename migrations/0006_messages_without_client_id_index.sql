-- 0006: `messages` without the unique index on (sender_id, client_id). Whether a send repeats a client id is
-- decided by the applier from an in-memory map of the stored messages' client ids (backend/src/storage/
-- client_ids.rs), which reads only the rows it names: the index cost every stored message one more per-user
-- b-tree page written, and nothing reads through it any more. Same columns, same rows, same other indexes.
-- SQLite cannot drop a table's UNIQUE constraint, so the table is rebuilt (on both engines: one portable file).
-- Portable SQL (SQLite and PostgreSQL). Never edit this file once landed.
CREATE TABLE messages_0006 (
    id           BIGINT PRIMARY KEY,
    sender_id    BIGINT NOT NULL,
    recipient_id BIGINT NOT NULL,
    client_id    TEXT   NOT NULL,
    body         TEXT   NOT NULL,
    sent_at      BIGINT NOT NULL,
    delivered_at BIGINT,
    read_at      BIGINT
);
INSERT INTO messages_0006 (id, sender_id, recipient_id, client_id, body, sent_at, delivered_at, read_at)
    SELECT id, sender_id, recipient_id, client_id, body, sent_at, delivered_at, read_at FROM messages;
DROP TABLE messages;
ALTER TABLE messages_0006 RENAME TO messages;
CREATE INDEX messages_by_recipient ON messages (recipient_id, id);
CREATE INDEX messages_by_sender ON messages (sender_id, id);
