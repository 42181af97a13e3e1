ALTER TABLE sessions ADD COLUMN last_used_at BIGINT;
CREATE TABLE retired_refresh_tokens (
    hash TEXT PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (id),
    retired_at BIGINT NOT NULL
);
CREATE INDEX retired_refresh_tokens_session ON retired_refresh_tokens (session_id);
