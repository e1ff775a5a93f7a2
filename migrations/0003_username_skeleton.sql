-- 0003: the confusable skeleton of each username (Unicode TS #39, computed by the node that accepted the
-- registration and carried in its log entry), so a look-alike of a live name (Cyrillic "аlice" for
-- "alice") is refused. Not UNIQUE: rows stored before this migration are backfilled at start-up and may
-- already collide; the primary checks new names against live rows (backend/src/chat.rs `register`).
-- Portable SQL (SQLite and PostgreSQL). Never edit this file once landed.
ALTER TABLE users ADD COLUMN skeleton TEXT;
CREATE INDEX users_by_skeleton ON users (skeleton);
