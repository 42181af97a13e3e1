ALTER TABLE users ADD COLUMN deletion_requested_at BIGINT;
ALTER TABLE users ADD COLUMN deleted_at BIGINT;
