-- The client id of each accepted send, per user, for a while: a retried send
-- (its ack was lost) gets the original ack instead of posting twice.
CREATE TABLE send_keys (
    user_id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    message_id TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, client_id)
);
CREATE INDEX send_keys_created ON send_keys (created_at);
