CREATE TABLE messages (
    message_id TEXT PRIMARY KEY,
    room_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    sender TEXT NOT NULL,
    body TEXT NOT NULL,
    sent_at BIGINT NOT NULL,
    stored_at BIGINT NOT NULL,
    UNIQUE (room_id, seq)
);
