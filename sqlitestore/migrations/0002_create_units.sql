-- Migration 2: the units of partitioned jobs (bulkexport.UnitStore).
--
-- One row per unit. As in the jobs table, data holds the whole
-- bulkexport.Unit as JSON and is what the store reads back; the other
-- columns copy what the store's statements filter, sort and check on.
-- added is the rowid: it grows with every insert, so it is the order in
-- which AddUnits stored the units. claimable_after says when ClaimUnit may
-- take the unit: the smallest integer for a pending unit, the lease's end
-- (microseconds since the Unix epoch) for a running one, and NULL for a
-- final one, which is then not in the claim index at all. A job's units
-- are removed with it by Delete, and closed by the Update that ends it.
CREATE TABLE IF NOT EXISTS "bulkexport_jobs_units" (
    added            INTEGER NOT NULL PRIMARY KEY,
    job_id           TEXT    NOT NULL,
    key              TEXT    NOT NULL,
    seq              INTEGER NOT NULL,
    state            TEXT    NOT NULL,
    version          INTEGER NOT NULL,
    lease_owner      TEXT    NOT NULL,
    lease_expires_at INTEGER NOT NULL,
    attempts         INTEGER NOT NULL,
    claimable_after  INTEGER,
    data             TEXT    NOT NULL,
    UNIQUE (job_id, key)
) STRICT;

-- ClaimUnit: the claimable units in claim order, pending ones first (by
-- add order), then running ones by lease end. The front of the index is
-- the next unit to claim; live leases and final units are never read.
CREATE INDEX IF NOT EXISTS "bulkexport_jobs_units_claim_idx"
    ON "bulkexport_jobs_units" (claimable_after, added) WHERE claimable_after IS NOT NULL;
