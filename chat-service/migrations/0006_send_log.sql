-- SQLite only: the send keys become a log, appended in the order written
-- (each group's keys go to the end of one B-tree, not to a page per sender
-- in a key index), and chat-service finds a key through an index it holds
-- in memory (`messages::send_log`). On SQLite only one connection writes at a
-- time, so each instance on the file reads what the others appended at the
-- start of its own transaction. Postgres keeps `send_keys`: its writers run
-- at once, and its unique index is what refuses a key stored twice.
CREATE TABLE send_log (
    id INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    message_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
INSERT INTO send_log (user_id, client_id, seq, message_id, created_at)
    SELECT user_id, client_id, seq, message_id, created_at FROM send_keys
    ORDER BY created_at;
DROP TABLE send_keys;
