-- Sessions expire after an idle timeout (`--session-idle-secs`). `last_used_at` is when a socket last
-- resumed the session, recorded by a `touch` op at most once a day per session; NULL means "not since it
-- was created" (created_at counts).
ALTER TABLE sessions ADD COLUMN last_used_at BIGINT;

-- Consecutive failed password checks per account (`login` and `delete_account`), replicated so that a
-- failover does not reset them: the primary derives the account's login delay from them. A success
-- (`login` op) or the account's deletion removes the row; failures 15 minutes apart start the count again.
CREATE TABLE login_failures (
    user_id         BIGINT PRIMARY KEY,
    failures        BIGINT NOT NULL,
    last_failure_at BIGINT NOT NULL
);
