package pgstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/bulkfhir/bulkexport"
)

// DefaultTable is the jobs table's name when Options.Table is empty.
const DefaultTable = "bulkexport_jobs"

// maxTableLen keeps the longest derived name (the table's name plus
// "_expires_idx", "_units_claim" or "_migrations") within PostgreSQL's
// 63-byte limit on identifiers, past which it would silently truncate
// them.
const maxTableLen = 50

// Options configures a Store. The zero value (or nil) gives the defaults.
type Options struct {
	// Schema is the PostgreSQL schema that holds the tables. Migrate
	// creates it when it does not exist. Default: none, so that the table
	// names are unqualified and resolved through the connection's
	// search_path (normally the schema "public").
	Schema string
	// Table is the jobs table's name. The migrations table is Table plus
	// "_migrations", the units table Table plus "_units", and index names
	// start with Table plus "_". Names are
	// quoted, so they are case-sensitive and may be any UTF-8 text without
	// NUL; Table is at most 50 bytes. Default: DefaultTable.
	Table string
	// CallerClock makes Claim judge and set leases by
	// bulkexport.ClaimParams.Now, the calling worker's clock, instead of
	// the database server's. It is meant for tests that simulate time;
	// replicas on several hosts must leave it off, or a replica whose
	// clock runs ahead takes the others' live jobs. Default: false, the
	// database's clock.
	CallerClock bool
}

// Store is a bulkexport.JobStore in a PostgreSQL table. It is safe for
// concurrent use, by any number of goroutines and processes sharing the
// database. Make one with New, and create its table with Migrate.
type Store struct {
	pool       *pgxpool.Pool
	schema     string // as given, unquoted
	name       string // the jobs table's name, unquoted
	table      string // quoted and qualified: "schema"."table"
	migTable   string // quoted and qualified migrations table
	migrations []Migration
	lockKey    int64
	// callerClock: Options.CallerClock.
	callerClock bool

	createSQL, createCappedSQL, getSQL, updateSQL, lookupSQL, deleteSQL, claimSQL string
	// uq are the UnitStore's statements.
	uq unitQueries
}

var _ bulkexport.JobStore = (*Store)(nil)

// New returns a Store that keeps its jobs in the table that opts names,
// over pool. The caller owns pool: the Store never closes it. New does
// not touch the database; call Migrate before first use (or apply the
// migrations by hand, see Migrations).
func New(pool *pgxpool.Pool, opts *Options) (*Store, error) {
	if pool == nil {
		return nil, errors.New("pgstore: New: nil pool")
	}
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.Table == "" {
		o.Table = DefaultTable
	}
	if err := checkName("Table", o.Table, maxTableLen); err != nil {
		return nil, err
	}
	if o.Schema != "" {
		if err := checkName("Schema", o.Schema, 63); err != nil {
			return nil, err
		}
	}
	s := &Store{
		pool:     pool,
		schema:   o.Schema,
		name:     o.Table,
		table:    qualify(o.Schema, o.Table),
		migTable: qualify(o.Schema, o.Table+"_migrations"),
		lockKey:  lockKey(o.Schema),

		callerClock: o.CallerClock,
	}
	var err error
	if s.migrations, err = loadMigrations(o.Schema, o.Table); err != nil {
		return nil, err
	}
	t := s.table
	s.uq = buildUnitQueries(t, qualify(o.Schema, o.Table+unitsSuffix))
	s.createSQL = `INSERT INTO ` + t + ` (id, owner, state, created_at, expires_at, lease_owner, lease_expires_at, attempts, version, data)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 1, $9)
ON CONFLICT (id) DO NOTHING`
	// The capped create runs in a transaction that first takes an
	// advisory lock on the owner ($10 is the table, so that two stores'
	// owners do not share locks), then counts and inserts in one
	// statement: under READ COMMITTED that statement sees every job
	// committed by the lock's previous holders.
	s.createCappedSQL = `INSERT INTO ` + t + ` (id, owner, state, created_at, expires_at, lease_owner, lease_expires_at, attempts, version, data)
SELECT $1, $2, $3, $4, $5, $6, $7, $8, 1, $9
WHERE (SELECT count(*) FROM ` + t + ` WHERE owner = $2 AND state IN ('queued', 'running')) < $10
ON CONFLICT (id) DO NOTHING`
	s.getSQL = `SELECT data FROM ` + t + ` WHERE id = $1`
	// The compare-and-set: $3 lists the states the new state may be
	// reached from, so that version and lifecycle are checked at once.
	s.updateSQL = `UPDATE ` + t + ` SET owner = $4, state = $5, created_at = $6, expires_at = $7,
	lease_owner = $8, lease_expires_at = $9, attempts = $10, data = $11, version = version + 1
WHERE id = $1 AND version = $2 AND state = ANY($3::text[])`
	s.lookupSQL = `SELECT version, state FROM ` + t + ` WHERE id = $1`
	s.deleteSQL = `DELETE FROM ` + t + ` WHERE id = $1`
	// The state IN (...) conjunct matches the claim index's predicate, so
	// that the planner walks that index in (created_at, id) order. A
	// running job with no lease (NULL) counts as expired, as in
	// bulkexport.Claimable.
	//
	// The lease clock is the database's, now() (the statement's
	// transaction start, to the microsecond), unless the caller's is
	// given: $1 its now rounded up, $3 the lease's end, $4 that end as
	// JSON text. $6 is the lease in microseconds.
	//
	// Rows whose data is in a format this release does not read (written
	// by a newer release; see bulkexport.JobFormatVersion) are passed
	// over, rather than patched and then refused. A row without a format
	// is format 1.
	s.claimSQL = `WITH clock AS (
	SELECT COALESCE($1::timestamptz, now()) AS now,
	       COALESCE($3::timestamptz, now() + $6::bigint * interval '1 microsecond') AS lease_end
), c AS (
	SELECT q.id FROM ` + t + ` AS q, clock
	WHERE q.state IN ('queued', 'running')
	  AND (q.state = 'queued' OR q.lease_expires_at IS NULL OR q.lease_expires_at < clock.now)
	  AND COALESCE(q.data->'format', '1'::jsonb) = '` + strconv.Itoa(bulkexport.JobFormatVersion) + `'::jsonb
	ORDER BY q.created_at, q.id
	LIMIT 1
	FOR UPDATE OF q SKIP LOCKED
)
UPDATE ` + t + ` AS j SET
	state = 'running',
	lease_owner = $2,
	lease_expires_at = clock.lease_end,
	attempts = j.attempts + 1,
	version = j.version + 1,
	data = j.data || jsonb_build_object(
		'state', 'running',
		'leaseOwner', $2::text,
		'leaseExpiresAt', COALESCE($4::text, to_char(clock.lease_end AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')),
		'attempts', j.attempts + 1,
		'version', j.version + 1,
		'fence', j.version + 1,
		'updatedAt', $5::text)
FROM c, clock
WHERE j.id = c.id
RETURNING j.data`
	return s, nil
}

// checkName refuses names PostgreSQL would reject or truncate.
func checkName(field, name string, max int) error {
	switch {
	case len(name) > max:
		return fmt.Errorf("pgstore: Options.%s %q is longer than %d bytes", field, name, max)
	case strings.IndexByte(name, 0) >= 0 || !utf8.ValidString(name):
		return fmt.Errorf("pgstore: Options.%s %q holds NUL or invalid UTF-8", field, name)
	}
	return nil
}

// qualify quotes name, prefixed with schema when there is one.
func qualify(schema, name string) string {
	if schema == "" {
		return pgx.Identifier{name}.Sanitize()
	}
	return pgx.Identifier{schema, name}.Sanitize()
}

// states lists every JobState, for Update's compare-and-set.
var states = []bulkexport.JobState{
	bulkexport.StateQueued, bulkexport.StateRunning, bulkexport.StateCompleted,
	bulkexport.StateFailed, bulkexport.StateCancelled,
}

// fromStates returns the states from which a job may move to to.
func fromStates(to bulkexport.JobState) []string {
	var out []string
	for _, s := range states {
		if s.CanTransition(to) {
			out = append(out, string(s))
		}
	}
	return out
}

// storedTime is t as the store keeps it: truncated to the microsecond
// (PostgreSQL's precision), in UTC. The zero time stays zero.
func storedTime(t time.Time) time.Time {
	if t.IsZero() {
		return t
	}
	return t.Truncate(time.Microsecond).UTC()
}

// ceilMicro rounds t up to the microsecond. Stored times are whole
// microseconds, so for a stored s, s < t exactly when s < ceilMicro(t):
// comparing against it keeps "before now" exact for callers whose clock
// has nanoseconds.
func ceilMicro(t time.Time) time.Time {
	c := t.Truncate(time.Microsecond)
	if c.Before(t) {
		c = c.Add(time.Microsecond)
	}
	return c.UTC()
}

// nullTime maps the zero time to SQL NULL.
func nullTime(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t
}

// row is a job ready to write: its times normalised, and its JSON.
type row struct {
	job  bulkexport.Job // a shallow copy with stored times
	data []byte
}

// encode prepares j, with the given Version, for writing. j is not
// modified.
func encode(j *bulkexport.Job, version int64) (*row, error) {
	c := *j // shallow: only the copy's top-level values change below
	c.Version = version
	c.TransactionTime = storedTime(c.TransactionTime)
	c.CreatedAt = storedTime(c.CreatedAt)
	c.UpdatedAt = storedTime(c.UpdatedAt)
	c.StartedAt = storedTime(c.StartedAt)
	c.CompletedAt = storedTime(c.CompletedAt)
	c.ExpiresAt = storedTime(c.ExpiresAt)
	c.LeaseExpiresAt = storedTime(c.LeaseExpiresAt)
	c.Request.Since = storedTime(c.Request.Since)
	c.Request.Until = storedTime(c.Request.Until)
	data, err := bulkexport.MarshalStoredJob(&c)
	if err != nil {
		return nil, fmt.Errorf("pgstore: encode job %s: %w", j.ID, err)
	}
	return &row{job: c, data: data}, nil
}

// decode turns a data column into a Job (bulkexport.UnmarshalStoredJob);
// what names the row in an error. A job in a format this release does not
// know gives an error wrapping bulkexport.ErrUnknownJobFormat.
func decode(what string, data []byte) (*bulkexport.Job, error) {
	j, err := bulkexport.UnmarshalStoredJob(data)
	if err != nil {
		return nil, fmt.Errorf("pgstore: %s: %w", what, err)
	}
	return j, nil
}

// Create implements bulkexport.JobStore. It stores job with Version 1 and
// sets job.Version to 1; an existing id gives an error wrapping
// bulkexport.ErrAlreadyExists and leaves the stored job as it was. With
// p.MaxActivePerOwner set, it runs a short transaction that holds an
// advisory lock on the owner while it counts the owner's active jobs and
// inserts, so that the cap holds across every replica.
func (s *Store) Create(ctx context.Context, job *bulkexport.Job, p bulkexport.CreateParams) error {
	if job == nil || job.ID == "" {
		return errors.New("pgstore: Create: job has no id")
	}
	r, err := encode(job, 1)
	if err != nil {
		return err
	}
	j := &r.job
	args := []any{j.ID, j.Owner, string(j.State), j.CreatedAt,
		nullTime(j.ExpiresAt), j.LeaseOwner, nullTime(j.LeaseExpiresAt), j.Attempts, string(r.data)}
	if p.MaxActivePerOwner > 0 {
		return s.createCapped(ctx, job, args, p.MaxActivePerOwner)
	}
	tag, err := s.pool.Exec(ctx, s.createSQL, args...)
	if err != nil {
		return fmt.Errorf("pgstore: create job %s: %w", job.ID, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("pgstore: job %s: %w", job.ID, bulkexport.ErrAlreadyExists)
	}
	job.Version = 1
	return nil
}

func (s *Store) createCapped(ctx context.Context, job *bulkexport.Job, args []any, limit int) error {
	var inserted, exists bool
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtextextended($1, 0))`, s.table+"/"+job.Owner); err != nil {
			return err
		}
		tag, err := tx.Exec(ctx, s.createCappedSQL, append(args, limit)...)
		if err != nil {
			return err
		}
		if inserted = tag.RowsAffected() == 1; !inserted {
			return tx.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM `+s.table+` WHERE id = $1)`, job.ID).Scan(&exists)
		}
		return nil
	})
	switch {
	case err != nil:
		return fmt.Errorf("pgstore: create job %s: %w", job.ID, err)
	case exists:
		return fmt.Errorf("pgstore: job %s: %w", job.ID, bulkexport.ErrAlreadyExists)
	case !inserted:
		return fmt.Errorf("pgstore: owner %q has %d active jobs: %w", job.Owner, limit, bulkexport.ErrTooManyJobs)
	}
	job.Version = 1
	return nil
}

// Get implements bulkexport.JobStore. A missing job gives an error
// wrapping bulkexport.ErrNotFound, never (nil, nil).
func (s *Store) Get(ctx context.Context, id string) (*bulkexport.Job, error) {
	var data []byte
	err := s.pool.QueryRow(ctx, s.getSQL, id).Scan(&data)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("pgstore: job %s: %w", id, bulkexport.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("pgstore: get job %s: %w", id, err)
	}
	return decode("job "+id, data)
}

// Update implements bulkexport.JobStore. In the usual case it is one
// compare-and-set statement that checks the Version and the lifecycle
// together (the stored state must be one from which job.State may be
// reached). When it changes no row, a second query finds out why: a
// missing job (bulkexport.ErrNotFound), a stale Version
// (bulkexport.ErrConflict) or a refused transition
// (bulkexport.ErrInvalidTransition). On success job.Version is
// incremented; on error neither job nor the stored row changes.
func (s *Store) Update(ctx context.Context, job *bulkexport.Job) error {
	if job == nil || job.ID == "" {
		return errors.New("pgstore: Update: job has no id")
	}
	from := fromStates(job.State)
	if len(from) > 0 { // else no stored state allows it: find out why below
		r, err := encode(job, job.Version+1)
		if err != nil {
			return err
		}
		j := &r.job
		args := []any{job.ID, job.Version, from,
			j.Owner, string(j.State), j.CreatedAt, nullTime(j.ExpiresAt),
			j.LeaseOwner, nullTime(j.LeaseExpiresAt), j.Attempts, string(r.data)}
		var n int64
		if job.State.Terminal() {
			// The job ends: its units close in the same transaction.
			n, err = s.updateEnding(ctx, job, args)
		} else {
			var tag pgconn.CommandTag
			tag, err = s.pool.Exec(ctx, s.updateSQL, args...)
			n = tag.RowsAffected()
		}
		if err != nil {
			return fmt.Errorf("pgstore: update job %s: %w", job.ID, err)
		}
		if n == 1 {
			job.Version++
			return nil
		}
	}
	return s.whyNotUpdated(ctx, job)
}

// whyNotUpdated explains an Update that changed no row, checking in the
// order MemoryStore does: existence, Version, then the transition.
func (s *Store) whyNotUpdated(ctx context.Context, job *bulkexport.Job) error {
	var (
		version int64
		state   string
	)
	err := s.pool.QueryRow(ctx, s.lookupSQL, job.ID).Scan(&version, &state)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return fmt.Errorf("pgstore: job %s: %w", job.ID, bulkexport.ErrNotFound)
	case err != nil:
		return fmt.Errorf("pgstore: update job %s: %w", job.ID, err)
	case version != job.Version:
		return fmt.Errorf("pgstore: job %s: version %d, stored %d: %w", job.ID, job.Version, version, bulkexport.ErrConflict)
	}
	if err := bulkexport.CheckTransition(bulkexport.JobState(state), job.State); err != nil {
		return fmt.Errorf("pgstore: job %s: %w", job.ID, err)
	}
	// The row changed between the two statements (deleted and created
	// again with the same Version and a compatible state): the caller's
	// copy is stale all the same.
	return fmt.Errorf("pgstore: job %s: changed concurrently: %w", job.ID, bulkexport.ErrConflict)
}

// Delete implements bulkexport.JobStore. A missing job gives an error
// wrapping bulkexport.ErrNotFound. The job's units go with it, by the
// units table's ON DELETE CASCADE, in the same statement.
func (s *Store) Delete(ctx context.Context, id string) error {
	tag, err := s.pool.Exec(ctx, s.deleteSQL, id)
	if err != nil {
		return fmt.Errorf("pgstore: delete job %s: %w", id, err)
	}
	if tag.RowsAffected() == 0 {
		return fmt.Errorf("pgstore: job %s: %w", id, bulkexport.ErrNotFound)
	}
	return nil
}

// Claim implements bulkexport.JobStore in one statement: it locks the
// oldest claimable job with FOR UPDATE SKIP LOCKED, so that concurrent
// claims (from any process) pass over each other's rows instead of
// waiting, and moves it to running under the worker's lease. Leases are
// judged and set by the database server's clock, which every replica
// shares, so that replicas with skewed clocks cannot take each other's
// live jobs (Options.CallerClock uses p.Now instead). With nothing
// claimable it returns bulkexport.ErrNoJob. It sets UpdatedAt to p.Now.
func (s *Store) Claim(ctx context.Context, p bulkexport.ClaimParams) (*bulkexport.Job, error) {
	updated := storedTime(p.Now)
	var nowArg, endArg, endJSON any
	if s.callerClock {
		end := storedTime(p.Now.Add(p.Lease))
		nowArg, endArg, endJSON = ceilMicro(p.Now), end, jsonTime(end)
	}
	var data []byte
	err := s.pool.QueryRow(ctx, s.claimSQL, nowArg, p.Worker, endArg,
		endJSON, jsonTime(updated), p.Lease.Microseconds()).Scan(&data)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, bulkexport.ErrNoJob
	}
	if err != nil {
		return nil, fmt.Errorf("pgstore: claim: %w", err)
	}
	return decode("claimed job", data)
}

// jsonTime formats t as encoding/json does (time.Time.MarshalJSON), for
// the JSON that Claim patches into data.
func jsonTime(t time.Time) string {
	return t.Format(time.RFC3339Nano)
}

// List implements bulkexport.JobStore: the jobs that match every set
// field of f, oldest CreatedAt first, then by ID (byte-wise).
func (s *Store) List(ctx context.Context, f bulkexport.Filter) ([]*bulkexport.Job, error) {
	query, args := s.listSQL(f)
	rows, err := s.pool.Query(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("pgstore: list: %w", err)
	}
	var out []*bulkexport.Job
	var (
		id   string
		data []byte
	)
	_, err = pgx.ForEachRow(rows, []any{&id, &data}, func() error {
		j, err := decode("job "+id, data)
		if err != nil {
			return err
		}
		out = append(out, j)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("pgstore: list: %w", err)
	}
	return out, nil
}

// listSQL builds List's query. The purge's filter (ExpiresBefore and
// Limit) is answered from the expires index.
func (s *Store) listSQL(f bulkexport.Filter) (string, []any) {
	var (
		b    strings.Builder
		args []any
	)
	arg := func(v any) string {
		args = append(args, v)
		return "$" + strconv.Itoa(len(args))
	}
	b.WriteString("SELECT id, data FROM ")
	b.WriteString(s.table)
	sep := " WHERE "
	if f.Owner != "" {
		b.WriteString(sep + "owner = " + arg(f.Owner))
		sep = " AND "
	}
	if len(f.States) > 0 {
		st := make([]string, len(f.States))
		for i, x := range f.States {
			st[i] = string(x)
		}
		b.WriteString(sep + "state = ANY(" + arg(st) + "::text[])")
		sep = " AND "
	}
	if !f.ExpiresBefore.IsZero() {
		// NULL (a zero ExpiresAt) never compares before anything.
		b.WriteString(sep + "expires_at < " + arg(ceilMicro(f.ExpiresBefore)))
		sep = " AND "
	}
	if !f.NotExpiredAt.IsZero() {
		// For a stored (whole-microsecond) x, x > t exactly when x is
		// after t rounded down to the microsecond.
		b.WriteString(sep + "(expires_at IS NULL OR expires_at > " + arg(f.NotExpiredAt.Truncate(time.Microsecond).UTC()) + ")")
	}
	b.WriteString(" ORDER BY created_at, id")
	if f.Limit > 0 {
		b.WriteString(" LIMIT " + arg(f.Limit))
	}
	return b.String(), args
}
