package sqlitestore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/bulkfhir/bulkexport"
)

// Options configures a Store. The zero value (or a nil *Options) gives the
// defaults.
type Options struct {
	// Table is the name of the jobs table; default DefaultTable
	// ("bulkexport_jobs"). The schema's other objects are named after it,
	// so several stores with different tables can share one database. It
	// must be 1 to 48 ASCII letters, digits and underscores, start with a
	// letter or underscore, and not start with "sqlite_".
	Table string
}

// Store is a bulkexport.JobStore in a SQLite database, reached through
// database/sql. It is safe for concurrent use by several goroutines, and
// several processes on one machine may share the database file (see the
// package documentation). A Store holds no resources of its own: closing
// the *sql.DB is the caller's business.
type Store struct {
	db    *sql.DB
	table string
	q     queries
	uq    unitQueries
	// writes lets one of the store's writes at a time go to SQLite, which
	// takes one writer at a time anyway: waiting here honours ctx and
	// wakes in turn, where waiting in SQLite's busy handler does neither.
	writes chan struct{}
}

var _ bulkexport.JobStore = (*Store)(nil)

// queries are the store's SQL statements, written for its table.
type queries struct {
	insert, insertCapped, get, del, lookup, claim, listPrefix string
	// update holds the compare-and-set UPDATE for each valid target state;
	// updateFrom holds the states from which that target may be reached.
	update     map[bulkexport.JobState]string
	updateFrom map[bulkexport.JobState][]any
}

// New returns a Store over db, a pool that the caller opened with a SQLite
// driver and keeps ownership of. New does no I/O: call Migrate (once per
// deployment, or at every start; it is idempotent) before using the store.
// New fails if db is nil or opts.Table is not a valid name.
func New(db *sql.DB, opts *Options) (*Store, error) {
	if db == nil {
		return nil, errors.New("sqlitestore: New: nil *sql.DB")
	}
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.Table == "" {
		o.Table = DefaultTable
	}
	if err := checkTable(o.Table); err != nil {
		return nil, err
	}
	return &Store{db: db, table: o.Table, q: buildQueries(o.Table), uq: buildUnitQueries(o.Table), writes: make(chan struct{}, 1)}, nil
}

func checkTable(t string) error {
	bad := len(t) == 0 || len(t) > 48 || strings.HasPrefix(strings.ToLower(t), "sqlite_") || (t[0] >= '0' && t[0] <= '9')
	for i := 0; i < len(t) && !bad; i++ {
		c := t[i]
		bad = !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_')
	}
	if bad {
		return fmt.Errorf("sqlitestore: table name %q: want 1 to 48 letters, digits and underscores, starting with a letter or underscore and not with sqlite_", t)
	}
	return nil
}

// write runs f while it holds the store's write turn, and fails with ctx's
// error if ctx is done before the turn comes.
func (s *Store) write(ctx context.Context, f func() error) error {
	select {
	case s.writes <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-s.writes }()
	return f()
}

// Table returns the name of the store's jobs table.
func (s *Store) Table() string { return s.table }

// claimable is the SQL form of bulkexport.Claimable, given the caller's now
// rounded up to a microsecond (see ceilMicros) as its one parameter.
const claimable = `(state = 'queued' OR (state = 'running' AND lease_expires_at < ?))`

// knownFormat holds for a row whose data is in a format this release reads
// (bulkexport.JobFormatVersion, or no "format" key: format 1). Claim passes
// over other rows, which a newer release wrote, rather than patch and then
// refuse them.
var knownFormat = `coalesce(json_extract(data, '$.format'), 1) = ` + strconv.Itoa(bulkexport.JobFormatVersion)

func buildQueries(table string) queries {
	t := `"` + table + `"`
	q := queries{
		insert: `INSERT INTO ` + t + ` (id, owner, state, created_at, updated_at, expires_at, lease_owner, lease_expires_at, attempts, version, data)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?)
ON CONFLICT (id) DO NOTHING`,
		// The capped insert counts the owner's active jobs and inserts in
		// one statement, which SQLite runs under the write lock from
		// start to end: racing Creates cannot both see room for one more.
		insertCapped: `INSERT INTO ` + t + ` (id, owner, state, created_at, updated_at, expires_at, lease_owner, lease_expires_at, attempts, version, data)
SELECT ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?
WHERE (SELECT count(*) FROM ` + t + ` WHERE owner = ? AND state IN ('queued', 'running')) < ?
ON CONFLICT (id) DO NOTHING`,
		get:    `SELECT data FROM ` + t + ` WHERE id = ?`,
		del:    `DELETE FROM ` + t + ` WHERE id = ?`,
		lookup: `SELECT version, state FROM ` + t + ` WHERE id = ?`,
		// The inner SELECTs each read the front of one index: the oldest
		// queued job, and the oldest of the running jobs whose lease ran out
		// (few: they are sorted, the live ones are not read). INDEXED BY
		// keeps the planner from scanning every running job in created_at
		// order instead. The outer SELECT picks the older of the two; the
		// row is then checked again by id, which costs nothing and keeps the
		// statement right on its own terms. json_set keeps data, the job read
		// back, in step with the columns. Rows of a format this release does
		// not know (knownFormat) are passed over.
		claim: `UPDATE ` + t + ` SET
    state = 'running',
    lease_owner = ?,
    lease_expires_at = ?,
    attempts = attempts + 1,
    version = version + 1,
    updated_at = ?,
    data = json_set(data,
        '$.state', 'running',
        '$.leaseOwner', ?,
        '$.leaseExpiresAt', ?,
        '$.attempts', attempts + 1,
        '$.version', version + 1,
        '$.fence', version + 1,
        '$.updatedAt', ?)
WHERE id = (
    SELECT id FROM (
        SELECT * FROM (SELECT id, created_at FROM ` + t + ` INDEXED BY "` + table + `_claim_idx"
            WHERE state = 'queued' AND ` + knownFormat + `
            ORDER BY created_at, id LIMIT 1)
        UNION ALL
        SELECT * FROM (SELECT id, created_at FROM ` + t + ` INDEXED BY "` + table + `_lease_idx"
            WHERE state = 'running' AND lease_expires_at < ? AND ` + knownFormat + `
            ORDER BY created_at, id LIMIT 1)
    ) ORDER BY created_at, id LIMIT 1
) AND ` + claimable + `
RETURNING data`,
		listPrefix: `SELECT id, data FROM ` + t,
		update:     map[bulkexport.JobState]string{},
		updateFrom: map[bulkexport.JobState][]any{},
	}
	states := []bulkexport.JobState{bulkexport.StateQueued, bulkexport.StateRunning, bulkexport.StateCompleted, bulkexport.StateFailed, bulkexport.StateCancelled}
	for _, to := range states {
		var from []any
		for _, s := range states {
			if s.CanTransition(to) {
				from = append(from, string(s))
			}
		}
		if len(from) == 0 {
			continue
		}
		q.updateFrom[to] = from
		q.update[to] = `UPDATE ` + t + ` SET
    owner = ?, state = ?, created_at = ?, updated_at = ?, expires_at = ?,
    lease_owner = ?, lease_expires_at = ?, attempts = ?, version = version + 1, data = ?
WHERE id = ? AND version = ? AND state IN (?` + strings.Repeat(", ?", len(from)-1) + `)`
	}
	return q
}

// Create implements bulkexport.JobStore. A duplicate id is detected with
// INSERT ... ON CONFLICT DO NOTHING, whatever the driver's error types.
// With p.MaxActivePerOwner set, the count of the owner's active jobs and
// the insert are one statement.
func (s *Store) Create(ctx context.Context, job *bulkexport.Job, p bulkexport.CreateParams) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if job == nil || job.ID == "" {
		return errors.New("sqlitestore: Create: job has no id")
	}
	r, err := encode(job, 1)
	if err != nil {
		return err
	}
	var n int64
	err = s.write(ctx, func() error {
		args := []any{job.ID, r.owner, r.state, r.createdAt, r.updatedAt, r.expiresAt, r.leaseOwner, r.leaseExpiresAt, r.attempts, r.data}
		q := s.q.insert
		if p.MaxActivePerOwner > 0 {
			q = s.q.insertCapped
			args = append(args, r.owner, p.MaxActivePerOwner)
		}
		res, err := s.db.ExecContext(ctx, q, args...)
		if err != nil {
			return err
		}
		n, err = res.RowsAffected()
		return err
	})
	if err != nil {
		return fmt.Errorf("sqlitestore: create job %s: %w", job.ID, err)
	}
	if n == 0 {
		if p.MaxActivePerOwner > 0 {
			// Either the id exists or the owner is at the cap.
			var one int
			err := s.db.QueryRowContext(ctx, `SELECT 1 FROM "`+s.table+`" WHERE id = ?`, job.ID).Scan(&one)
			switch {
			case errors.Is(err, sql.ErrNoRows):
				return fmt.Errorf("sqlitestore: owner %q has %d active jobs: %w", job.Owner, p.MaxActivePerOwner, bulkexport.ErrTooManyJobs)
			case err != nil:
				return fmt.Errorf("sqlitestore: create job %s: %w", job.ID, err)
			}
		}
		return fmt.Errorf("sqlitestore: job %s: %w", job.ID, bulkexport.ErrAlreadyExists)
	}
	job.Version = 1
	return nil
}

// Get implements bulkexport.JobStore.
func (s *Store) Get(ctx context.Context, id string) (*bulkexport.Job, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var data string
	err := s.db.QueryRowContext(ctx, s.q.get, id).Scan(&data)
	if errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("sqlitestore: job %s: %w", id, bulkexport.ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("sqlitestore: get job %s: %w", id, err)
	}
	return decode("job "+id, data)
}

// Update implements bulkexport.JobStore. The happy path is one UPDATE that
// checks the version and the state the job may come from; only when it
// changes no row does Update read the row, to tell ErrNotFound, ErrConflict
// and ErrInvalidTransition apart.
func (s *Store) Update(ctx context.Context, job *bulkexport.Job) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if job == nil || job.ID == "" {
		return errors.New("sqlitestore: Update: job has no id")
	}
	if q, ok := s.q.update[job.State]; ok {
		r, err := encode(job, job.Version+1)
		if err != nil {
			return err
		}
		args := append([]any{r.owner, r.state, r.createdAt, r.updatedAt, r.expiresAt, r.leaseOwner, r.leaseExpiresAt, r.attempts, r.data,
			job.ID, job.Version}, s.q.updateFrom[job.State]...)
		var n int64
		if job.State.Terminal() {
			// The job ends: its units that are not final close in the
			// same transaction (see bulkexport.UnitStore).
			err = s.tx(ctx, func(conn *sql.Conn) error {
				res, err := conn.ExecContext(ctx, q, args...)
				if err != nil {
					return err
				}
				if n, err = res.RowsAffected(); err != nil || n != 1 {
					return err
				}
				_, err = conn.ExecContext(ctx, s.uq.closeUnits, job.ID)
				return err
			})
		} else {
			err = s.write(ctx, func() error {
				res, err := s.db.ExecContext(ctx, q, args...)
				if err != nil {
					return err
				}
				n, err = res.RowsAffected()
				return err
			})
		}
		if err != nil {
			return fmt.Errorf("sqlitestore: update job %s: %w", job.ID, err)
		}
		if n == 1 {
			job.Version++
			return nil
		}
	}
	// Nothing changed: say why.
	var (
		version int64
		state   string
	)
	err := s.db.QueryRowContext(ctx, s.q.lookup, job.ID).Scan(&version, &state)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return fmt.Errorf("sqlitestore: job %s: %w", job.ID, bulkexport.ErrNotFound)
	case err != nil:
		return fmt.Errorf("sqlitestore: update job %s: %w", job.ID, err)
	case version != job.Version:
		return fmt.Errorf("sqlitestore: job %s: version %d, stored %d: %w", job.ID, job.Version, version, bulkexport.ErrConflict)
	}
	if err := bulkexport.CheckTransition(bulkexport.JobState(state), job.State); err != nil {
		return fmt.Errorf("sqlitestore: job %s: %w", job.ID, err)
	}
	// The row matches now but did not when the UPDATE ran: it changed in
	// between (deleted and created again). Report the race as a conflict.
	return fmt.Errorf("sqlitestore: job %s: changed concurrently: %w", job.ID, bulkexport.ErrConflict)
}

// Delete implements bulkexport.JobStore. The job's units go with it, in
// the same transaction.
func (s *Store) Delete(ctx context.Context, id string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	var n int64
	err := s.tx(ctx, func(conn *sql.Conn) error {
		res, err := conn.ExecContext(ctx, s.q.del, id)
		if err != nil {
			return err
		}
		if n, err = res.RowsAffected(); err != nil || n == 0 {
			return err
		}
		_, err = conn.ExecContext(ctx, s.uq.deleteUnits, id)
		return err
	})
	if err != nil {
		return fmt.Errorf("sqlitestore: delete job %s: %w", id, err)
	}
	if n == 0 {
		return fmt.Errorf("sqlitestore: job %s: %w", id, bulkexport.ErrNotFound)
	}
	return nil
}

// Claim implements bulkexport.JobStore with one UPDATE ... RETURNING
// statement. SQLite runs a writing statement under the database's write
// lock from start to end, so the job it picks cannot be picked by a
// concurrent Claim, in this process or another one. UpdatedAt is set to
// now, and LeaseExpiresAt to now+lease (in UTC, to the microsecond). The
// lease clock is the caller's (p.Now): the processes sharing a SQLite file
// run on one machine, with one clock.
func (s *Store) Claim(ctx context.Context, p bulkexport.ClaimParams) (*bulkexport.Job, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	worker, now, lease := p.Worker, p.Now, p.Lease
	leaseEnd := normTime(now.Add(lease))
	updated := normTime(now)
	nowCeil := ceilMicros(now)
	var data string
	err := s.write(ctx, func() error {
		return s.db.QueryRowContext(ctx, s.q.claim,
			worker, micros(leaseEnd), micros(updated),
			worker, jsonTime(leaseEnd), jsonTime(updated),
			nowCeil, nowCeil,
		).Scan(&data)
	})
	if errors.Is(err, sql.ErrNoRows) {
		return nil, bulkexport.ErrNoJob
	}
	if err != nil {
		return nil, fmt.Errorf("sqlitestore: claim: %w", err)
	}
	return decode("claimed job", data)
}

// List implements bulkexport.JobStore. Owner, States, ExpiresBefore and NotExpiredAt
// become WHERE terms on indexed columns; the order is created_at, then id.
func (s *Store) List(ctx context.Context, f bulkexport.Filter) ([]*bulkexport.Job, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	q, args := s.listQuery(f)
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("sqlitestore: list: %w", err)
	}
	defer rows.Close()
	var out []*bulkexport.Job
	for rows.Next() {
		var id, data string
		if err := rows.Scan(&id, &data); err != nil {
			return nil, fmt.Errorf("sqlitestore: list: %w", err)
		}
		j, err := decode("job "+id, data)
		if err != nil {
			return nil, err
		}
		out = append(out, j)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("sqlitestore: list: %w", err)
	}
	return out, nil
}

func (s *Store) listQuery(f bulkexport.Filter) (string, []any) {
	var (
		b     strings.Builder
		args  []any
		where []string
	)
	b.WriteString(s.q.listPrefix)
	if f.Owner != "" {
		where = append(where, "owner = ?")
		args = append(args, f.Owner)
	}
	if len(f.States) > 0 {
		where = append(where, "state IN (?"+strings.Repeat(", ?", len(f.States)-1)+")")
		for _, st := range f.States {
			args = append(args, string(st))
		}
	}
	if !f.ExpiresBefore.IsZero() {
		// NULL (a zero ExpiresAt) never compares true.
		where = append(where, "expires_at < ?")
		args = append(args, ceilMicros(f.ExpiresBefore))
	}
	if !f.NotExpiredAt.IsZero() {
		// For a stored (whole-microsecond) x, x > t exactly when
		// micros(x) > micros(t), t rounded down.
		where = append(where, "(expires_at IS NULL OR expires_at > ?)")
		args = append(args, micros(f.NotExpiredAt))
	}
	if len(where) > 0 {
		b.WriteString(" WHERE ")
		b.WriteString(strings.Join(where, " AND "))
	}
	b.WriteString(" ORDER BY created_at, id")
	if f.Limit > 0 {
		b.WriteString(" LIMIT ?")
		args = append(args, f.Limit)
	}
	return b.String(), args
}

// ---------------------------------------------------------------------------
// Encoding

// row is a job as the table's columns hold it.
type row struct {
	owner, state, leaseOwner string
	createdAt, updatedAt     int64
	expiresAt                sql.NullInt64
	leaseExpiresAt           int64
	attempts                 int64
	data                     string
}

// encode turns job into column values, with version as the stored Version.
// Every time is stored as normTime leaves it, in data and in the columns
// alike. job itself is not changed.
func encode(job *bulkexport.Job, version int64) (row, error) {
	c := *job // shallow: only value fields are replaced below
	c.Version = version
	c.TransactionTime = normTime(c.TransactionTime)
	c.CreatedAt = normTime(c.CreatedAt)
	c.UpdatedAt = normTime(c.UpdatedAt)
	c.StartedAt = normTime(c.StartedAt)
	c.CompletedAt = normTime(c.CompletedAt)
	c.ExpiresAt = normTime(c.ExpiresAt)
	c.LeaseExpiresAt = normTime(c.LeaseExpiresAt)
	c.Request.Since = normTime(c.Request.Since)
	c.Request.Until = normTime(c.Request.Until)
	data, err := bulkexport.MarshalStoredJob(&c)
	if err != nil {
		return row{}, fmt.Errorf("sqlitestore: encode job %s: %w", job.ID, err)
	}
	return row{
		owner:          c.Owner,
		state:          string(c.State),
		leaseOwner:     c.LeaseOwner,
		createdAt:      micros(c.CreatedAt),
		updatedAt:      micros(c.UpdatedAt),
		expiresAt:      nullMicros(c.ExpiresAt),
		leaseExpiresAt: micros(c.LeaseExpiresAt),
		attempts:       int64(c.Attempts),
		data:           string(data),
	}, nil
}

// decode reads a data column (bulkexport.UnmarshalStoredJob). what names
// the row in an error. A job in a format this release does not know gives
// an error wrapping bulkexport.ErrUnknownJobFormat.
func decode(what, data string) (*bulkexport.Job, error) {
	j, err := bulkexport.UnmarshalStoredJob([]byte(data))
	if err != nil {
		return nil, fmt.Errorf("sqlitestore: %s: %w", what, err)
	}
	return j, nil
}

// normTime is t as the store keeps it: in UTC, truncated to the
// microsecond, without a monotonic reading. A zero time stays zero.
func normTime(t time.Time) time.Time {
	if t.IsZero() {
		return time.Time{}
	}
	return t.UTC().Truncate(time.Microsecond)
}

// micros is t in microseconds since the Unix epoch, rounded down.
func micros(t time.Time) int64 { return t.UnixMicro() }

// ceilMicros is t in microseconds since the Unix epoch, rounded up. For a
// stored (whole-microsecond) time x, x < t holds exactly when
// micros(x) < ceilMicros(t), so comparisons against the caller's times
// agree with time.Time.Before to the nanosecond.
func ceilMicros(t time.Time) int64 {
	m := t.UnixMicro()
	if t.Nanosecond()%1000 != 0 {
		m++
	}
	return m
}

// nullMicros is micros(t), or NULL for a zero time.
func nullMicros(t time.Time) sql.NullInt64 {
	if t.IsZero() {
		return sql.NullInt64{}
	}
	return sql.NullInt64{Int64: micros(t), Valid: true}
}

// jsonTime is t as encoding/json writes a time.Time, without the quotes.
func jsonTime(t time.Time) string { return t.Format(time.RFC3339Nano) }
