package sqlitestore

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/stretchr/testify/require"
	_ "modernc.org/sqlite"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"github.com/bulkfhir/bulkexport/storetest"
)

// dsn is the data source name the package documentation recommends for
// modernc.org/sqlite.
func dsn(path string) string {
	return "file:" + path + "?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)"
}

// openDB opens the database file at path with the recommended pool
// settings and closes it when the test ends.
func openDB(t testing.TB, path string) *sql.DB {
	t.Helper()
	db, err := sql.Open("sqlite", dsn(path))
	require.NoError(t, err)
	db.SetMaxOpenConns(4)
	db.SetMaxIdleConns(4)
	t.Cleanup(func() { db.Close() })
	return db
}

// newStore opens a fresh database in t's temporary folder and migrates it.
func newStore(t testing.TB, opts *Options) (*Store, *sql.DB) {
	t.Helper()
	db := openDB(t, filepath.Join(t.TempDir(), "jobs.db"))
	s, err := New(db, opts)
	require.NoError(t, err)
	require.NoError(t, s.Migrate(context.Background()))
	return s, db
}

func TestConformance(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T) bulkexport.JobStore {
		s, _ := newStore(t, nil)
		return s
	})
}

// TestConformanceOneConn runs the suite over a pool of one connection, the
// other setting the documentation allows.
func TestConformanceOneConn(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T) bulkexport.JobStore {
		s, db := newStore(t, &Options{Table: "jobs_one_conn"})
		db.SetMaxOpenConns(1)
		return s
	})
}

// TestConformanceSharedFile runs the suite with every case on one pool and
// one database file, each case through a store of its own table
// (Options.Table), next to the tables of the cases before it.
func TestConformanceSharedFile(t *testing.T) {
	t.Parallel()
	db := openDB(t, filepath.Join(t.TempDir(), "shared.db"))
	n := 0
	storetest.Run(t, func(t *testing.T) bulkexport.JobStore {
		n++
		s, err := New(db, &Options{Table: fmt.Sprintf("jobs_%d", n)})
		require.NoError(t, err)
		require.NoError(t, s.Migrate(context.Background()))
		return s
	})
}

func TestNew(t *testing.T) {
	t.Parallel()
	db := openDB(t, filepath.Join(t.TempDir(), "x.db"))
	_, err := New(nil, nil)
	require.Error(t, err)
	for _, bad := range []string{"1jobs", "jobs-x", `jobs"`, "jobs x", "sqlite_jobs", "SQLITE_x", strings.Repeat("a", 49), "jöbs"} {
		_, err := New(db, &Options{Table: bad})
		require.Error(t, err, "table %q", bad)
	}
	for _, good := range []string{"jobs", "_jobs", "Jobs_2", "select", strings.Repeat("a", 48)} {
		s, err := New(db, &Options{Table: good})
		require.NoError(t, err, "table %q", good)
		require.Equal(t, good, s.Table())
	}
	s, err := New(db, nil)
	require.NoError(t, err)
	require.Equal(t, DefaultTable, s.Table())
	s, err = New(db, &Options{})
	require.NoError(t, err)
	require.Equal(t, DefaultTable, s.Table())
}

func TestMigrateIdempotent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, db := newStore(t, nil)
	schema := func() string {
		rows, err := db.QueryContext(ctx, `SELECT type, name, sql FROM sqlite_schema ORDER BY name`)
		require.NoError(t, err)
		defer rows.Close()
		var b strings.Builder
		for rows.Next() {
			var typ, name string
			var text sql.NullString
			require.NoError(t, rows.Scan(&typ, &name, &text))
			fmt.Fprintf(&b, "%s %s %s\n", typ, name, text.String)
		}
		require.NoError(t, rows.Err())
		return b.String()
	}
	before := schema()
	for _, want := range []string{"table bulkexport_jobs ", "table bulkexport_jobs_schema_version ", "index bulkexport_jobs_claim_idx ", "index bulkexport_jobs_lease_idx ", "index bulkexport_jobs_expires_idx ", "index bulkexport_jobs_owner_idx ",
		"table bulkexport_jobs_units ", "index bulkexport_jobs_units_claim_idx "} {
		require.Contains(t, before, want)
	}
	job := &bulkexport.Job{ID: "job-1", Owner: "alice", State: bulkexport.StateQueued, CreatedAt: time.Now()}
	require.NoError(t, s.Create(ctx, job, bulkexport.CreateParams{}))
	for range 3 {
		require.NoError(t, s.Migrate(ctx))
	}
	require.Equal(t, before, schema())
	var n, maxV int
	require.NoError(t, db.QueryRowContext(ctx, `SELECT COUNT(*), MAX(version) FROM bulkexport_jobs_schema_version`).Scan(&n, &maxV))
	require.Equal(t, len(migrations), n)
	require.Equal(t, len(migrations), maxV)
	_, err := s.Get(ctx, "job-1")
	require.NoError(t, err, "Migrate must keep the jobs")
}

// TestMigrateConcurrent starts several "processes" (pools of their own) on
// one new file at once: every Migrate succeeds and the schema is applied
// once.
func TestMigrateConcurrent(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "jobs.db")
	var wg sync.WaitGroup
	errs := make([]error, 6)
	for i := range errs {
		db := openDB(t, path)
		s, err := New(db, nil)
		require.NoError(t, err)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = s.Migrate(context.Background())
		}()
	}
	wg.Wait()
	for i, err := range errs {
		require.NoError(t, err, "Migrate %d", i)
	}
	db := openDB(t, path)
	var n int
	require.NoError(t, db.QueryRow(`SELECT COUNT(*) FROM bulkexport_jobs_schema_version`).Scan(&n))
	require.Equal(t, len(migrations), n)
}

func TestMigrateNewerSchema(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, db := newStore(t, nil)
	_, err := db.ExecContext(ctx, `INSERT INTO bulkexport_jobs_schema_version VALUES (999, 'from_the_future', 0)`)
	require.NoError(t, err)
	err = s.Migrate(ctx)
	require.ErrorContains(t, err, "newer")
	// The refused Migrate left no transaction open on a pooled connection.
	for range 8 {
		_, err := db.ExecContext(ctx, `DELETE FROM bulkexport_jobs_schema_version WHERE version = 999`)
		require.NoError(t, err)
	}
	require.NoError(t, s.Migrate(ctx))
}

func TestMigrateCancelled(t *testing.T) {
	t.Parallel()
	db := openDB(t, filepath.Join(t.TempDir(), "jobs.db"))
	s, err := New(db, nil)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, s.Migrate(ctx), context.Canceled)
	require.NoError(t, s.Migrate(context.Background()))
}

func TestWAL(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "jobs.db")
	// Open without the journal_mode pragma: Migrate must switch it on.
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(10000)")
	require.NoError(t, err)
	defer db.Close()
	var mode string
	require.NoError(t, db.QueryRow(`PRAGMA journal_mode`).Scan(&mode))
	require.Equal(t, "delete", mode)
	s, err := New(db, nil)
	require.NoError(t, err)
	require.NoError(t, s.Migrate(context.Background()))
	require.NoError(t, db.QueryRow(`PRAGMA journal_mode`).Scan(&mode))
	require.Equal(t, "wal", mode)
	require.NoError(t, db.Close())
	// The file keeps the mode: a new pool, without the pragma, sees it.
	db2, err := sql.Open("sqlite", "file:"+path)
	require.NoError(t, err)
	defer db2.Close()
	require.NoError(t, db2.QueryRow(`PRAGMA journal_mode`).Scan(&mode))
	require.Equal(t, "wal", mode)
}

func TestMigrateInMemoryRefused(t *testing.T) {
	t.Parallel()
	db, err := sql.Open("sqlite", ":memory:")
	require.NoError(t, err)
	defer db.Close()
	s, err := New(db, nil)
	require.NoError(t, err)
	require.ErrorContains(t, s.Migrate(context.Background()), "journal_mode")
}

// queryPlan returns the detail lines of EXPLAIN QUERY PLAN for q.
func queryPlan(t *testing.T, db *sql.DB, q string, args ...any) []string {
	t.Helper()
	rows, err := db.Query("EXPLAIN QUERY PLAN "+q, args...)
	require.NoError(t, err)
	defer rows.Close()
	var out []string
	for rows.Next() {
		var id, parent, notused int
		var detail string
		require.NoError(t, rows.Scan(&id, &parent, &notused, &detail))
		out = append(out, detail)
	}
	require.NoError(t, rows.Err())
	return out
}

func TestQueryPlans(t *testing.T) {
	t.Parallel()
	s, db := newStore(t, nil)
	ctx := context.Background()
	// Some rows, and statistics, so that the planner has data to weigh.
	base := time.Now()
	for i := range 200 {
		j := &bulkexport.Job{ID: fmt.Sprintf("job-%03d", i), Owner: fmt.Sprintf("client-%d", i%7), State: bulkexport.StateQueued, CreatedAt: base.Add(time.Duration(i) * time.Second)}
		require.NoError(t, s.Create(ctx, j, bulkexport.CreateParams{}))
		if i%3 == 0 {
			j.State = bulkexport.StateRunning
			require.NoError(t, s.Update(ctx, j))
			j.State = bulkexport.StateCompleted
			j.ExpiresAt = base.Add(time.Hour)
			require.NoError(t, s.Update(ctx, j))
		}
	}
	for _, analyze := range []bool{false, true} {
		if analyze {
			_, err := db.Exec("ANALYZE")
			require.NoError(t, err)
		}
		scan := regexp.MustCompile(`^SCAN "?bulkexport_jobs"?( |$)`)
		check := func(name, q string, args []any, indexes ...string) {
			plan := queryPlan(t, db, q, args...)
			t.Logf("%s (analyze %v):\n  %s", name, analyze, strings.Join(plan, "\n  "))
			joined := strings.Join(plan, "\n")
			for _, line := range plan {
				require.False(t, scan.MatchString(line), "%s: full scan of the jobs table: %q", name, line)
			}
			for _, index := range indexes {
				require.Contains(t, joined, index, "%s does not use %s", name, index)
			}
		}
		now := ceilMicros(base)
		check("claim", s.q.claim, []any{"w", 1, 1, "w", "x", "x", now, now}, "bulkexport_jobs_claim_idx (state=?)", "bulkexport_jobs_lease_idx (lease_expires_at<?)")
		q, args := s.listQuery(bulkexport.Filter{ExpiresBefore: base, Limit: 1000})
		check("purge", q, args, "bulkexport_jobs_expires_idx (expires_at<?)")
		q, args = s.listQuery(bulkexport.Filter{Owner: "client-1", States: []bulkexport.JobState{bulkexport.StateQueued, bulkexport.StateRunning}})
		check("owner list", q, args, "bulkexport_jobs_owner_idx")
		q, args = s.listQuery(bulkexport.Filter{Owner: "client-1"})
		check("owner list, every state", q, args, "bulkexport_jobs_owner_idx")
		q, args = s.listQuery(bulkexport.Filter{States: []bulkexport.JobState{bulkexport.StateQueued}})
		check("state list", q, args, "bulkexport_jobs_claim_idx")
		check("get", s.q.get, []any{"job-001"}, "sqlite_autoindex_bulkexport_jobs_1")
		check("update", s.q.update[bulkexport.StateRunning], make([]any, 13), "sqlite_autoindex_bulkexport_jobs_1")
	}
}

func TestReopen(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "jobs.db")
	base := time.Now().UTC().Truncate(time.Microsecond)

	db, err := sql.Open("sqlite", dsn(path))
	require.NoError(t, err)
	s, err := New(db, nil)
	require.NoError(t, err)
	require.NoError(t, s.Migrate(ctx))
	job := &bulkexport.Job{ID: "job-keep", Owner: "alice", Level: fhirbulk.LevelSystem, State: bulkexport.StateQueued,
		Progress: bulkexport.Progress{Percent: 12.5, Message: "Patient"}, CreatedAt: base, UpdatedAt: base}
	require.NoError(t, s.Create(ctx, job, bulkexport.CreateParams{}))
	claimed, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "worker-1", Now: base, Lease: time.Hour})
	require.NoError(t, err)
	require.NoError(t, db.Close())

	db2 := openDB(t, path)
	s2, err := New(db2, nil)
	require.NoError(t, err)
	require.NoError(t, s2.Migrate(ctx))
	got, err := s2.Get(ctx, "job-keep")
	require.NoError(t, err)
	require.Equal(t, claimed, got)
	require.Equal(t, bulkexport.StateRunning, got.State)
	require.Equal(t, "worker-1", got.LeaseOwner)
	require.True(t, got.LeaseExpiresAt.Equal(base.Add(time.Hour)))
	_, err = s2.Claim(ctx, bulkexport.ClaimParams{Worker: "worker-2", Now: base.Add(time.Minute), Lease: time.Hour})
	require.ErrorIs(t, err, bulkexport.ErrNoJob, "the lease survives the reopen")
}

// TestTables: two stores with their own tables share a database and do not
// see each other's jobs.
func TestTables(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	a, db := newStore(t, &Options{Table: "alpha"})
	b, err := New(db, &Options{Table: "beta"})
	require.NoError(t, err)
	require.NoError(t, b.Migrate(ctx))
	require.NoError(t, a.Create(ctx, &bulkexport.Job{ID: "job-1", State: bulkexport.StateQueued}, bulkexport.CreateParams{}))
	_, err = b.Get(ctx, "job-1")
	require.ErrorIs(t, err, bulkexport.ErrNotFound)
	require.NoError(t, b.Create(ctx, &bulkexport.Job{ID: "job-1", State: bulkexport.StateQueued}, bulkexport.CreateParams{}))
	var names []string
	rows, err := db.Query(`SELECT name FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%' ORDER BY name`)
	require.NoError(t, err)
	defer rows.Close()
	for rows.Next() {
		var n string
		require.NoError(t, rows.Scan(&n))
		names = append(names, n)
	}
	require.Equal(t, []string{
		"alpha", "alpha_claim_idx", "alpha_expires_idx", "alpha_lease_idx", "alpha_owner_idx", "alpha_schema_version", "alpha_units", "alpha_units_claim_idx",
		"beta", "beta_claim_idx", "beta_expires_idx", "beta_lease_idx", "beta_owner_idx", "beta_schema_version", "beta_units", "beta_units_claim_idx",
	}, names)
	for _, m := range b.Migrations() {
		require.NotContains(t, m.SQL, DefaultTable)
	}
	require.NotContains(t, b.SchemaVersionTable(), DefaultTable)
}

// TestColumnsFollowData checks, after every kind of write, that the indexed
// columns say what data says.
func TestColumnsFollowData(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, db := newStore(t, nil)
	loc := time.FixedZone("X", -7*3600)
	base := time.Date(2030, 1, 2, 3, 4, 5, 678901234, loc)
	check := func(what string) {
		t.Helper()
		var mismatches int
		require.NoError(t, db.QueryRow(`SELECT COUNT(*) FROM bulkexport_jobs WHERE
			owner IS NOT data->>'$.owner' OR state IS NOT data->>'$.state' OR
			lease_owner IS NOT COALESCE(data->>'$.leaseOwner', '') OR
			attempts IS NOT COALESCE(data->>'$.attempts', 0) OR version IS NOT data->>'$.version'`).Scan(&mismatches))
		require.Zero(t, mismatches, what)
		rows, err := db.Query(`SELECT id, created_at, updated_at, expires_at, lease_expires_at FROM bulkexport_jobs`)
		require.NoError(t, err)
		defer rows.Close()
		for rows.Next() {
			var id string
			var created, updated int64
			var lease int64
			var expires sql.NullInt64
			require.NoError(t, rows.Scan(&id, &created, &updated, &expires, &lease))
			j, err := s.Get(ctx, id)
			require.NoError(t, err)
			require.Equal(t, j.CreatedAt.UnixMicro(), created, what)
			require.Equal(t, j.UpdatedAt.UnixMicro(), updated, what)
			require.Equal(t, nullMicros(j.ExpiresAt), expires, what)
			require.Equal(t, j.LeaseExpiresAt.UnixMicro(), lease, what)
		}
		require.NoError(t, rows.Err())
	}
	j := &bulkexport.Job{ID: "job-1", Owner: "alice", State: bulkexport.StateQueued, CreatedAt: base, UpdatedAt: base, Attempts: 3}
	require.NoError(t, s.Create(ctx, j, bulkexport.CreateParams{}))
	check("after Create")
	c, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "worker-1", Now: base.Add(time.Second), Lease: time.Minute})
	require.NoError(t, err)
	check("after Claim")
	require.Equal(t, 4, c.Attempts)
	c.State = bulkexport.StateCompleted
	c.LeaseOwner = ""
	c.ExpiresAt = base.Add(time.Hour)
	require.NoError(t, s.Update(ctx, c))
	check("after Update")
}

// TestTimes: the store keeps times in UTC to the microsecond, and compares
// the caller's times with nanosecond exactness against what it keeps.
func TestTimes(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, _ := newStore(t, nil)
	loc := time.FixedZone("UTC+5:30", 5*3600+1800)
	created := time.Date(2030, 1, 2, 3, 4, 5, 123456789, loc)
	j := &bulkexport.Job{ID: "job-t", State: bulkexport.StateQueued, CreatedAt: created}
	require.NoError(t, s.Create(ctx, j, bulkexport.CreateParams{}))
	require.Equal(t, created, j.CreatedAt, "Create must not change the caller's times")
	got, err := s.Get(ctx, "job-t")
	require.NoError(t, err)
	require.Equal(t, time.Date(2030, 1, 1, 21, 34, 5, 123456000, time.UTC), got.CreatedAt)
	require.True(t, got.StartedAt.IsZero())

	// The lease ends at now+lease truncated to the microsecond: ...000 ns.
	now := time.Date(2030, 1, 2, 0, 0, 0, 500, time.UTC)
	c, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "w1", Now: now, Lease: time.Minute})
	require.NoError(t, err)
	end := c.LeaseExpiresAt
	require.Equal(t, now.Add(time.Minute).Truncate(time.Microsecond), end)
	// At end the lease is live; one nanosecond later it has expired, as
	// bulkexport.Claimable says of the stored job.
	for _, at := range []time.Time{end, end.Add(time.Nanosecond)} {
		stored, err := s.Get(ctx, "job-t")
		require.NoError(t, err)
		_, err = s.Claim(ctx, bulkexport.ClaimParams{Worker: "w2", Now: at, Lease: time.Minute})
		if bulkexport.Claimable(stored, at) {
			require.NoError(t, err, "at %s", at)
		} else {
			require.ErrorIs(t, err, bulkexport.ErrNoJob, "at %s", at)
		}
	}

	// ExpiresBefore, likewise, to the nanosecond.
	got, err = s.Get(ctx, "job-t")
	require.NoError(t, err)
	got.State = bulkexport.StateCompleted
	got.ExpiresAt = time.Date(2030, 2, 1, 0, 0, 0, 7000, time.UTC)
	require.NoError(t, s.Update(ctx, got))
	for _, before := range []time.Time{got.ExpiresAt, got.ExpiresAt.Add(time.Nanosecond), got.ExpiresAt.Add(-time.Nanosecond)} {
		list, err := s.List(ctx, bulkexport.Filter{ExpiresBefore: before})
		require.NoError(t, err)
		require.Equal(t, got.ExpiresAt.Before(before), len(list) == 1, "ExpiresBefore %s", before)
	}
}

func TestUpdateErrorsWrapped(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	s, _ := newStore(t, nil)
	require.Error(t, s.Create(ctx, nil, bulkexport.CreateParams{}))
	require.Error(t, s.Create(ctx, &bulkexport.Job{}, bulkexport.CreateParams{}))
	require.Error(t, s.Update(ctx, nil))
	j := &bulkexport.Job{ID: "job-1", State: bulkexport.StateQueued}
	require.NoError(t, s.Create(ctx, j, bulkexport.CreateParams{}))
	err := s.Create(ctx, &bulkexport.Job{ID: "job-1"}, bulkexport.CreateParams{})
	require.ErrorIs(t, err, bulkexport.ErrAlreadyExists)
	require.Contains(t, err.Error(), "job-1")
	stale := *j
	j.Progress.Percent = 1
	require.NoError(t, s.Update(ctx, j))
	err = s.Update(ctx, &stale)
	require.ErrorIs(t, err, bulkexport.ErrConflict)
	require.Contains(t, err.Error(), "version 1, stored 2")
	j.State = bulkexport.StateCompleted
	err = s.Update(ctx, j)
	require.ErrorIs(t, err, bulkexport.ErrInvalidTransition)
	require.Contains(t, err.Error(), "queued → completed")
}

// TestCancelledWhileWaiting: a write that waits for another write of the
// same store gives up when its context ends.
func TestCancelledWhileWaiting(t *testing.T) {
	t.Parallel()
	s, _ := newStore(t, nil)
	ctx := context.Background()
	require.NoError(t, s.Create(ctx, &bulkexport.Job{ID: "job-1", State: bulkexport.StateQueued}, bulkexport.CreateParams{}))
	s.writes <- struct{}{} // another write is under way
	defer func() { <-s.writes }()
	for name, call := range map[string]func(context.Context) error{
		"Create": func(ctx context.Context) error {
			return s.Create(ctx, &bulkexport.Job{ID: "job-2"}, bulkexport.CreateParams{})
		},
		"Update": func(ctx context.Context) error {
			return s.Update(ctx, &bulkexport.Job{ID: "job-1", State: bulkexport.StateRunning, Version: 1})
		},
		"Delete": func(ctx context.Context) error { return s.Delete(ctx, "job-1") },
		"Claim": func(ctx context.Context) error {
			_, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "w", Now: time.Now(), Lease: time.Minute})
			return err
		},
	} {
		cctx, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
		err := call(cctx)
		cancel()
		require.ErrorIs(t, err, context.DeadlineExceeded, name)
	}
	// Reads do not wait for writes.
	got, err := s.Get(ctx, "job-1")
	require.NoError(t, err)
	require.Equal(t, int64(1), got.Version)
	_, err = s.List(ctx, bulkexport.Filter{})
	require.NoError(t, err)
}

// TestOtherWriter: while another connection (another process, say) holds
// the write lock, a write waits for at most the busy timeout and then
// fails; reads go on meanwhile (WAL).
func TestOtherWriter(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "jobs.db")
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(200)")
	require.NoError(t, err)
	defer db.Close()
	s, err := New(db, nil)
	require.NoError(t, err)
	require.NoError(t, s.Migrate(ctx))
	require.NoError(t, s.Create(ctx, &bulkexport.Job{ID: "job-1", State: bulkexport.StateQueued}, bulkexport.CreateParams{}))

	other := openDB(t, path)
	conn, err := other.Conn(ctx)
	require.NoError(t, err)
	defer conn.Close()
	_, err = conn.ExecContext(ctx, "BEGIN IMMEDIATE")
	require.NoError(t, err)
	start := time.Now()
	_, err = s.Claim(ctx, bulkexport.ClaimParams{Worker: "w", Now: time.Now(), Lease: time.Minute})
	require.Error(t, err)
	require.NotErrorIs(t, err, bulkexport.ErrNoJob)
	require.Contains(t, strings.ToLower(err.Error()), "locked")
	require.Less(t, time.Since(start), 5*time.Second)
	got, err := s.Get(ctx, "job-1")
	require.NoError(t, err)
	require.Equal(t, bulkexport.StateQueued, got.State)

	_, err = conn.ExecContext(ctx, "ROLLBACK")
	require.NoError(t, err)
	_, err = s.Claim(ctx, bulkexport.ClaimParams{Worker: "w", Now: time.Now(), Lease: time.Minute})
	require.NoError(t, err)
}

// TestTwoProcesses: stores on two pools of their own (as two processes
// would have) share one file. Their claims never hand a job out twice, and
// their writes wait for each other through busy_timeout without failing.
func TestTwoProcesses(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "jobs.db")
	var stores []*Store
	for range 2 {
		s, err := New(openDB(t, path), nil)
		require.NoError(t, err)
		require.NoError(t, s.Migrate(ctx))
		stores = append(stores, s)
	}
	const jobs = 150
	base := time.Now()
	for i := range jobs {
		require.NoError(t, stores[i%2].Create(ctx, &bulkexport.Job{ID: fmt.Sprintf("job-%03d", i), State: bulkexport.StateQueued, CreatedAt: base.Add(time.Duration(i%11) * time.Millisecond)}, bulkexport.CreateParams{}))
	}
	var (
		mu     sync.Mutex
		claims = map[string]string{}
		wg     sync.WaitGroup
	)
	for p, s := range stores {
		for g := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				worker := fmt.Sprintf("p%d-w%d", p, g)
				for {
					j, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: worker, Now: base, Lease: time.Hour})
					if errors.Is(err, bulkexport.ErrNoJob) {
						return
					}
					if err != nil {
						t.Errorf("%s: Claim: %v", worker, err)
						return
					}
					mu.Lock()
					if prev, dup := claims[j.ID]; dup {
						t.Errorf("%s claimed by %s and %s", j.ID, prev, worker)
					}
					claims[j.ID] = worker
					mu.Unlock()
					// A progress report, as a worker would make.
					j.Progress.Percent = 50
					if err := s.Update(ctx, j); err != nil {
						t.Errorf("%s: Update %s: %v", worker, j.ID, err)
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	require.Len(t, claims, jobs)
	list, err := stores[0].List(ctx, bulkexport.Filter{States: []bulkexport.JobState{bulkexport.StateRunning}})
	require.NoError(t, err)
	require.Len(t, list, jobs)
	for _, j := range list {
		require.Equal(t, claims[j.ID], j.LeaseOwner)
		require.Equal(t, int64(3), j.Version)
	}
}

func TestLoadMigrations(t *testing.T) {
	t.Parallel()
	for name, fsys := range map[string]fstest.MapFS{
		"gap":     {"migrations/0001_a.sql": {}, "migrations/0003_c.sql": {}},
		"no name": {"migrations/0001.sql": {}},
		"zero":    {"migrations/0000_a.sql": {}},
		"not num": {"migrations/abc_a.sql": {}},
		"empty":   {},
	} {
		_, err := loadMigrations(fsys)
		require.Error(t, err, name)
	}
	ms, err := loadMigrations(fstest.MapFS{"migrations/0002_b.sql": {Data: []byte("B")}, "migrations/0001_a.sql": {Data: []byte("A")}})
	require.NoError(t, err)
	require.Equal(t, []Migration{{1, "a", "A"}, {2, "b", "B"}}, ms)
}

func TestSplitStatements(t *testing.T) {
	t.Parallel()
	got := splitStatements("-- c\nCREATE TABLE x (\n  a INTEGER -- trailing\n);\n\n  -- more\nCREATE INDEX i\n  ON x (a);\nSELECT 1")
	require.Equal(t, []string{"CREATE TABLE x (\n  a INTEGER -- trailing\n);", "CREATE INDEX i\n  ON x (a);", "SELECT 1"}, got)
	require.Len(t, splitStatements(migrations[0].SQL), 5)
}

// TestDocsSchema keeps docs/sqlitestore.md's copy of the schema in step
// with the embedded migrations.
func TestDocsSchema(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile(filepath.Join("..", "docs", "sqlitestore.md"))
	if errors.Is(err, os.ErrNotExist) {
		t.Skip("no ../docs/sqlitestore.md (module used outside its repository)")
	}
	require.NoError(t, err)
	doc := string(b)
	for _, m := range migrations {
		require.Contains(t, doc, m.SQL, "docs/sqlitestore.md lacks migration %d verbatim", m.Version)
	}
	require.Contains(t, doc, versionTableDDL)
}

// TestNoDriver: the package leaves the choice of SQLite driver to its
// users, so its non-test files import only the standard library and
// bulkexport.
func TestNoDriver(t *testing.T) {
	t.Parallel()
	files, err := filepath.Glob("*.go")
	require.NoError(t, err)
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(token.NewFileSet(), f, nil, parser.ImportsOnly)
		require.NoError(t, err)
		for _, imp := range af.Imports {
			p, _ := strconv.Unquote(imp.Path.Value)
			first, _, _ := strings.Cut(p, "/")
			require.True(t, p == "github.com/bulkfhir/bulkexport" || !strings.Contains(first, "."), "%s imports %s", f, p)
		}
	}
}
