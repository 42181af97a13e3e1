-- The room sequence of each queued message, so a publisher takes a room's
-- queued messages in sequence order; rows queued before this column existed
-- read 0 and go first.
ALTER TABLE outbox ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
CREATE INDEX outbox_room_seq ON outbox (room_id, seq);
