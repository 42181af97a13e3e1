-- Each room's stream has an epoch: a client's sequence numbers hold under
-- the epoch it saw them in. Existing rooms take the random tail of their id.
ALTER TABLE rooms ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
UPDATE rooms SET epoch = substr(id, 25, 12);
