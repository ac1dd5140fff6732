// Package sqlitestore is a bulkexport.JobStore in a SQLite database, for
// servers that run on one machine and want their export jobs to survive a
// restart without running a database server.
//
// The package talks to SQLite through database/sql and imports no driver:
// the host opens the *sql.DB with the driver it prefers and keeps owning
// it. Tests and examples use modernc.org/sqlite (pure Go, no cgo). The
// store needs SQLite 3.38 or newer (RETURNING, STRICT tables, built-in
// JSON functions), which every current driver bundles.
//
// # Usage
//
//	import (
//		"database/sql"
//
//		_ "modernc.org/sqlite"
//
//		"github.com/bulkfhir/bulkexport/sqlitestore"
//	)
//
//	db, err := sql.Open("sqlite", "file:/var/lib/fhir/jobs.db"+
//		"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)"+
//		"&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)")
//	if err != nil { ... }
//	defer db.Close()
//	db.SetMaxOpenConns(4)
//	db.SetMaxIdleConns(4)
//
//	store, err := sqlitestore.New(db, nil)
//	if err != nil { ... }
//	if err := store.Migrate(ctx); err != nil { ... }
//	// store is a bulkexport.JobStore: hand it to the handler and the Worker.
//
// # Connection settings
//
// busy_timeout and synchronous are settings of each connection, so they
// belong in the DSN, which the driver applies to every connection the pool
// opens (modernc.org/sqlite spells them _pragma=name(value); other drivers
// have their own spelling). journal_mode=WAL is a setting of the file:
// Migrate switches it on and fails if SQLite cannot (an in-memory database,
// say). WAL lets reads run while a write is under way; busy_timeout makes a
// write wait for another writer instead of failing at once with "database
// is locked".
//
// A pool of a few connections (SetMaxOpenConns and SetMaxIdleConns of 4
// to 8) is right: reads run in parallel, and the Store lets one of its
// writes at a time go to SQLite, which takes one writer at a time anyway,
// so that a waiting write honours its context and writes from one process
// never meet SQLite's busy handler. Writes from other processes on the
// same file are held off by SQLite's lock, for at most busy_timeout; SQLite
// does not notice a cancelled context while it waits there. A pool of one
// connection also works, but then every read waits for every write.
//
// # Storage
//
// Each job is one row of the table "bulkexport_jobs" (Options.Table).
// The column data holds the whole job as JSON and is what the store reads
// back; owner, state, created_at, updated_at, expires_at, lease_owner,
// lease_expires_at, attempts and version copy the fields that queries
// filter and sort on, and are written with data in the same statement.
// Times are kept in UTC with microsecond precision, in data and in the
// columns alike (Get returns them so); the columns hold microseconds since
// the Unix epoch. Comparisons with the caller's times (Claim's now,
// Filter.ExpiresBefore) agree with time.Time.Before to the nanosecond.
//
// data is the job's stored form (bulkexport.MarshalStoredJob), which
// carries its format version (bulkexport.JobFormatVersion). A job that a
// newer release stored in a format this one does not know is refused by
// Get and List with an error wrapping bulkexport.ErrUnknownJobFormat, and
// passed over by Claim.
//
// Update is a compare-and-set in one statement: UPDATE ... WHERE id = ?
// AND version = ? AND state IN (the states from which
// bulkexport.JobState.CanTransition allows the new state). Only when no
// row changes does it read the row, to return ErrNotFound, ErrConflict or
// ErrInvalidTransition.
//
// Claim is one UPDATE ... RETURNING statement that picks the oldest
// claimable job from the front of two indexes (queued jobs by created_at;
// running jobs by lease expiry) and rewrites its columns and, with
// json_set, its data. SQLite runs a writing statement under the database's
// write lock from start to end, so concurrent claims, from this process or
// another one, never hand out the same job twice.
//
// # Units
//
// Store is also a bulkexport.UnitStore. Migration 2 adds the table
// "<table>_units": one row per unit, its whole bulkexport.Unit as JSON in
// data, and columns for job_id, key, seq, state, version, lease and an
// add order (added, the rowid). The column claimable_after is the smallest
// integer for a pending unit, the lease's end for a running one and NULL
// for a final one; the partial index "<table>_units_claim_idx" on
// (claimable_after, added) holds only claimable candidates, in claim
// order. ClaimUnit is one UPDATE ... RETURNING statement that takes the
// front of that index under SQLite's write lock; like Claim, it judges and
// sets leases by the caller's ClaimParams.Now. AddUnits inserts a plan in
// one BEGIN IMMEDIATE transaction, after checking the job and that it has
// no units yet. UpdateUnit is a one-statement compare-and-set, as Update
// is. An Update that ends a job closes the job's units that are not final
// in the same transaction, and Delete removes them in the same transaction
// as the job.
//
// # Schema and migrations
//
// The schema is embedded in the package as numbered migrations. Migrate
// applies the ones that the table "<table>_schema_version" does not list,
// in one BEGIN IMMEDIATE transaction; it is idempotent, and safe to call
// from several processes at once. Hosts that manage their schema with
// their own tool apply Store.Migrations in order instead, and create
// Store.SchemaVersionTable with one row per applied migration if Migrate
// may run later. The repository's docs/sqlitestore.md shows the DDL.
//
// # Deployment
//
// One machine: one process, or several processes sharing the database
// file through WAL (which needs a local file system, not NFS or SMB). For
// several hosts use github.com/bulkfhir/bulkexport/pgstore.
package sqlitestore
