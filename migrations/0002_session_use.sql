-- Sessions expire after an idle timeout (`--session-idle-secs`). `last_used_at` is when a socket last
-- resumed the session, recorded by a `touch` op at most once a day per session; NULL means "not since it
-- was created" (created_at counts).
ALTER TABLE sessions ADD COLUMN last_used_at BIGINT;
