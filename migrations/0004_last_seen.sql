-- 0004: when each account was last seen (ms since the epoch): the time its last open socket closed (a `seen`
-- op, chosen by the primary and carried in the log entry), or its latest `register`, `login` or `touch`,
-- whichever is later. Shown to the account's contacts as "last seen ..."; NULL when never recorded (rows from
-- before this migration, until the account's next sign-in) and for deleted accounts.
-- Portable SQL (SQLite and PostgreSQL). Never edit this file once landed.
ALTER TABLE users ADD COLUMN last_seen_at BIGINT;
