-- Migration 1: the jobs table and the indexes its queries use.
--
-- One row per job. data holds the whole bulkexport.Job as JSON, and it is
-- what the store reads back; the other columns copy the fields that the
-- store's queries filter and sort on, and are rewritten with data on every
-- write. Times are integer microseconds since the Unix epoch (UTC). A zero
-- ExpiresAt is NULL: the job has no expiry. A zero LeaseExpiresAt is
-- -62135596800000000, the microseconds of Go's zero time, which has
-- expired at every real time, as bulkexport.Claimable says.
CREATE TABLE IF NOT EXISTS "bulkexport_jobs" (
    id               TEXT    NOT NULL PRIMARY KEY,
    owner            TEXT    NOT NULL,
    state            TEXT    NOT NULL,
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    expires_at       INTEGER,
    lease_owner      TEXT    NOT NULL,
    lease_expires_at INTEGER NOT NULL,
    attempts         INTEGER NOT NULL,
    version          INTEGER NOT NULL,
    data             TEXT    NOT NULL
) STRICT;

-- Claim, first half: the oldest queued job is the front of the queued
-- range. Also List by state.
CREATE INDEX IF NOT EXISTS "bulkexport_jobs_claim_idx"
    ON "bulkexport_jobs" (state, created_at, id);

-- Claim, second half: running jobs whose lease has run out are the front
-- of this index, however many running jobs hold live leases.
CREATE INDEX IF NOT EXISTS "bulkexport_jobs_lease_idx"
    ON "bulkexport_jobs" (lease_expires_at, created_at, id) WHERE state = 'running';

-- The purge: terminal jobs whose expires_at has passed. Active jobs have
-- none, so the index holds only jobs that will be purged.
CREATE INDEX IF NOT EXISTS "bulkexport_jobs_expires_idx"
    ON "bulkexport_jobs" (expires_at) WHERE expires_at IS NOT NULL;

-- A client's jobs, optionally in some states (List with Owner and States).
CREATE INDEX IF NOT EXISTS "bulkexport_jobs_owner_idx"
    ON "bulkexport_jobs" (owner, state, created_at, id);
