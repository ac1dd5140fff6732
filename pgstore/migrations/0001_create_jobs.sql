-- pgstore migration 1: the jobs table and its indexes.
--
-- This file is a text/template: the table action is the quoted jobs table
-- (Options.Schema and Options.Table), and index "x" the quoted index name
-- Options.Table + "_x"; Store.Migrations returns it rendered. Every
-- statement is idempotent, so that running this file by hand and then
-- Migrate (or the reverse) is harmless.
--
-- data holds the whole job (bulkexport.Job as JSON) and is what every read
-- decodes. The other columns are a projection of it for filtering,
-- ordering and claiming; every write sets both in the same statement.
-- The "C" collation makes id ordering byte-wise, as in MemoryStore.
-- fillfactor leaves room on each page so that heartbeat updates (progress,
-- lease renewal: no indexed column changes) can be HOT updates.
CREATE TABLE IF NOT EXISTS {{table}} (
    id               text COLLATE "C" PRIMARY KEY,
    owner            text COLLATE "C" NOT NULL,
    state            text COLLATE "C" NOT NULL,
    created_at       timestamptz NOT NULL,
    expires_at       timestamptz,
    lease_owner      text NOT NULL DEFAULT '',
    lease_expires_at timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    version          bigint NOT NULL,
    data             jsonb NOT NULL
) WITH (fillfactor = 80);

-- Claim: the oldest queued, or running with an expired lease, job. Only
-- active jobs are in this index; finished ones drop out of it.
CREATE INDEX IF NOT EXISTS {{index "claim_idx"}}
    ON {{table}} (created_at, id)
    WHERE state IN ('queued', 'running');

-- The purge: jobs whose ExpiresAt has passed. Active jobs have none.
CREATE INDEX IF NOT EXISTS {{index "expires_idx"}}
    ON {{table}} (expires_at)
    WHERE expires_at IS NOT NULL;

-- A client's jobs (List with Owner, and States).
CREATE INDEX IF NOT EXISTS {{index "owner_idx"}}
    ON {{table}} (owner, state);
