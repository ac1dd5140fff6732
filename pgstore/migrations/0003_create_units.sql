-- pgstore migration 3: the units of partitioned jobs (bulkexport.UnitStore).
--
-- The units table is named Options.Table + "_units" and lives in the jobs
-- table's schema. As in the jobs table, data holds the whole unit
-- (bulkexport.Unit as JSON) and is what reads decode; the other columns
-- are a projection of it that every write sets in the same statement.
-- added numbers the units in the order AddUnits stored them.
-- claimable_after says from when ClaimUnit may take the unit: -infinity
-- for a pending unit, the lease's end for a running one, NULL for a final
-- one. Deleting a job deletes its units (ON DELETE CASCADE). Idempotent,
-- like the other migrations.
CREATE TABLE IF NOT EXISTS {{unitsTable}} (
    job_id           text COLLATE "C" NOT NULL REFERENCES {{table}} (id) ON DELETE CASCADE,
    key              text COLLATE "C" NOT NULL,
    seq              integer NOT NULL,
    added            bigint GENERATED ALWAYS AS IDENTITY,
    state            text COLLATE "C" NOT NULL,
    version          bigint NOT NULL,
    lease_owner      text NOT NULL DEFAULT '',
    lease_expires_at timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    claimable_after  timestamptz,
    data             jsonb NOT NULL,
    PRIMARY KEY (job_id, key)
) WITH (fillfactor = 80);

-- ClaimUnit: the claimable units in claim order, pending ones first (by
-- add order), then running ones by lease end. Final units are not in the
-- index, and units under a live lease lie past the claim's range.
CREATE INDEX IF NOT EXISTS {{index "units_claim"}}
    ON {{unitsTable}} (claimable_after, added)
    WHERE claimable_after IS NOT NULL;
