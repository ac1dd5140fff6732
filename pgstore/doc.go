// Package pgstore is a bulkexport.JobStore kept in PostgreSQL, for hosts
// that run several replicas: every replica's handler and Worker share the
// jobs, workers claim them with FOR UPDATE SKIP LOCKED and leases, and a
// job whose replica died is claimed again once its lease runs out and
// resumes from its last checkpoint.
//
// # Usage
//
// The store works over a *pgxpool.Pool that the host opens, sizes and
// closes; it starts no goroutines of its own. Migrate creates (or
// upgrades) the table; every replica may call it at start-up:
//
//	pool, err := pgxpool.New(ctx, os.Getenv("DATABASE_URL"))
//	if err != nil {
//		return err
//	}
//	defer pool.Close()
//	store, err := pgstore.New(pool, nil) // table "bulkexport_jobs"
//	if err != nil {
//		return err
//	}
//	if err := store.Migrate(ctx); err != nil {
//		return err
//	}
//	// Every replica shares the database AND the files: a DirStorage on a
//	// shared volume, or object storage.
//	storage, err := bulkexport.NewDirStorage("/mnt/shared/bulkexport")
//	if err != nil {
//		return err
//	}
//	h, err := bulkexport.NewHandler(store, &bulkexport.Options{
//		BaseURL: "https://fhir.example.org/fhir",
//		Storage: storage,
//	})
//	if err != nil {
//		return err
//	}
//	w, err := bulkexport.NewWorker(store, source, storage, nil)
//	if err != nil {
//		return err
//	}
//	go w.Run(ctx)
//	mux.Handle("/fhir/", h)
//
// # Schema
//
// One table (default "bulkexport_jobs", see Options) holds one row per
// job. The column data is the whole job as jsonb and is the only column
// reads decode; id, owner, state, created_at, expires_at, lease_owner,
// lease_expires_at, attempts and version are a projection of it that the
// indexes, Claim and List work on. Every write (Create, Update, Claim)
// sets the projection and data in the same statement, so the two always
// agree: Claim patches data with jsonb || jsonb_build_object(...), using
// times formatted in Go exactly as encoding/json formats them. Partial
// indexes keep Claim and the purge off the table: active jobs (queued or
// running) ordered by (created_at, id), and jobs with an ExpiresAt.
//
// data is the job's stored form (bulkexport.MarshalStoredJob), which
// carries its format version (bulkexport.JobFormatVersion). A job that a
// newer release stored in a format this one does not know is refused by
// Get and List with an error wrapping bulkexport.ErrUnknownJobFormat, and
// passed over by Claim.
//
// # Units
//
// Store is also a bulkexport.UnitStore. Migration 3 adds the table
// Options.Table + "_units": one row per unit, the whole bulkexport.Unit
// as jsonb in data, and a projection (job_id, key, seq, state, version,
// lease, attempts, an identity column added for the add order, and
// claimable_after). claimable_after is -infinity for a pending unit, the
// lease's end for a running one and NULL for a final one, and the partial
// index Options.Table + "_units_claim" on (claimable_after, added) WHERE
// claimable_after IS NOT NULL lists the claimable units in claim order.
// ClaimUnit is one statement in the style of Claim: a range scan of that
// index up to now, LIMIT 1 FOR UPDATE SKIP LOCKED, then UPDATE ...
// RETURNING, with Claim's lease clock (the database's, or the caller's
// with Options.CallerClock). AddUnits locks the job's row and inserts the
// plan with one INSERT, in one transaction. UpdateUnit is a one-statement
// compare-and-set. An Update that ends a job closes its units that are not
// final in the same transaction; Delete removes them by ON DELETE CASCADE.
//
// The migrations are embedded SQL files (see Store.Migrations), applied
// in order in one transaction under pg_advisory_xact_lock, and recorded
// in a second table, the jobs table's name plus "_migrations". They are
// idempotent, so that an operator may also apply them by hand.
//
// # Time
//
// Every time is stored with microsecond precision, in UTC: the store
// truncates a job's times to the microsecond when it writes them and
// returns UTC times, which are Equal to what was written at that
// precision. Claim and ClaimUnit judge and set leases by the database
// server's clock, which every replica shares, unless Options.CallerClock
// makes them use ClaimParams.Now (for tests that simulate time).
//
// # Limits
//
// PostgreSQL cannot store the NUL character in text or jsonb: a job with
// "\x00" in any string field fails to save with an error. Strings should
// be valid UTF-8 (encoding/json replaces invalid bytes in data).
package pgstore
