-- pgstore migration 2: the owner index becomes a hash index.
--
-- A B-tree entry may not exceed about 2.7 KB, so with the B-tree of
-- migration 1 a job whose owner (the client id the host's Authenticate
-- returns) is longer than that could not be stored. A hash index keeps
-- only a hash of the key: any owner fits, and it serves what the index is
-- for, a client's jobs (owner = $1), the state being checked on the few
-- rows one client has. Idempotent, like migration 1.
DROP INDEX IF EXISTS {{qualifiedIndex "owner_idx"}};
CREATE INDEX IF NOT EXISTS {{index "owner_idx"}}
    ON {{table}} USING hash (owner);
