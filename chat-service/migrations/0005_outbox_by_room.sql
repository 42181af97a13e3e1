-- The outbox keyed by room and sequence, the order it is published in: one
-- index fewer to write and delete per queued message (nothing looks a queued
-- message up by its id), and a publisher removes a room's published messages
-- as one range. Only rows queued before 0002 (which came before any
-- release) could share a room's sequence (0); if some did, this migration
-- fails in its transaction and changes nothing.
--
-- The rename comes first: on Postgres it locks the old table until this
-- transaction commits, so no row another replica queues meanwhile is left
-- behind in it: that replica's statement waits, then either finds the new
-- table or fails, and its group is answered `unavailable`, not acked.
ALTER TABLE outbox RENAME TO outbox_before_by_room;
CREATE TABLE outbox (
    room_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    message_id TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (room_id, seq)
);
INSERT INTO outbox (room_id, seq, message_id, payload, created_at)
    SELECT room_id, seq, message_id, payload, created_at FROM outbox_before_by_room;
DROP TABLE outbox_before_by_room;
-- What the relay looks for: rows queued a while ago.
CREATE INDEX outbox_created ON outbox (created_at);
