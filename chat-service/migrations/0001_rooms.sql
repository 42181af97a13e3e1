CREATE TABLE rooms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    visibility TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    -- The sequence number of the room's latest message; incremented in the
    -- same transaction that queues the message, so sequences have no gaps.
    last_seq BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE room_members (
    room_id TEXT NOT NULL REFERENCES rooms (id),
    user_id TEXT NOT NULL,
    role TEXT NOT NULL,
    joined_at BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id)
);
CREATE INDEX room_members_user ON room_members (user_id);

-- Accepted messages not yet confirmed published to the rooms stream.
CREATE TABLE outbox (
    message_id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX outbox_created ON outbox (created_at);
