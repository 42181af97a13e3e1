-- Each key of an algorithm has a generation (1, 2, ...): a replica inserts
-- the next generation only, so replicas starting or rotating together create
-- one key, not one each.
ALTER TABLE signing_keys ADD COLUMN generation BIGINT NOT NULL DEFAULT 0;
UPDATE signing_keys SET generation = (
    SELECT COUNT(*) FROM signing_keys AS older
    WHERE older.algorithm = signing_keys.algorithm
      AND (older.created_at < signing_keys.created_at
           OR (older.created_at = signing_keys.created_at AND older.kid <= signing_keys.kid))
);
CREATE UNIQUE INDEX signing_keys_generation ON signing_keys (algorithm, generation);
