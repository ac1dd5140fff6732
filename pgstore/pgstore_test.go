package pgstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"github.com/bulkfhir/bulkexport/storetest"
)

// envURL names the database the tests use. They skip when it is unset;
// .ci/postgres.sh provisions a server and sets it.
const envURL = "BULKEXPORT_TEST_POSTGRES_URL"

// The shared pool, opened by the first test that needs the database. The
// variable is read inside the tests, not in TestMain, so that Go's test
// cache keys a cached result on it: a run without it (all skipped) is never
// reused for a run with it. Each store gets a schema of its own, so tests,
// and test binaries, run in parallel.
var (
	poolOnce sync.Once
	testPool *pgxpool.Pool
	poolErr  error
)

func TestMain(m *testing.M) {
	code := m.Run()
	if testPool != nil {
		testPool.Close()
	}
	os.Exit(code)
}

// openPool connects to url and checks the connection. tweak may change
// the configuration first.
func openPool(ctx context.Context, url string, tweak func(*pgxpool.Config)) (*pgxpool.Pool, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, err
	}
	cfg.MaxConns = 20
	if tweak != nil {
		tweak(cfg)
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, err
	}
	return pool, nil
}

// needDB returns the shared pool, or skips when envURL is unset.
func needDB(tb testing.TB) *pgxpool.Pool {
	tb.Helper()
	url := os.Getenv(envURL)
	if url == "" {
		tb.Skipf("%s is not set; source .ci/postgres.sh to provision a server", envURL)
	}
	poolOnce.Do(func() { testPool, poolErr = openPool(context.Background(), url, nil) })
	if poolErr != nil {
		tb.Fatalf("%s: %v", envURL, poolErr)
	}
	return testPool
}

// secondPool opens another pool on the test database, as another replica
// would, and closes it at the end of the test.
func secondPool(tb testing.TB) *pgxpool.Pool {
	tb.Helper()
	needDB(tb)
	p, err := openPool(context.Background(), os.Getenv(envURL), nil)
	require.NoError(tb, err)
	tb.Cleanup(p.Close)
	return p
}

func randomHex() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// freshSchema names a schema that does not exist yet and drops it (with
// whatever Migrate put in it) when the test ends.
func freshSchema(tb testing.TB, pool *pgxpool.Pool) string {
	tb.Helper()
	name := "pgstore_test_" + randomHex()
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{name}.Sanitize()+" CASCADE"); err != nil {
			tb.Errorf("drop schema %s: %v", name, err)
		}
	})
	return name
}

// newTestStore returns a migrated, empty store in a schema of its own.
func newTestStore(tb testing.TB, pool *pgxpool.Pool) *Store {
	tb.Helper()
	s, err := New(pool, &Options{Schema: freshSchema(tb, pool), CallerClock: true}) // the suite simulates time
	require.NoError(tb, err)
	require.NoError(tb, s.Migrate(context.Background()))
	return s
}

// testJob returns a queued job.
func testJob(id, owner string, created time.Time) *bulkexport.Job {
	return &bulkexport.Job{
		ID:    id,
		Owner: owner,
		Level: fhirbulk.LevelSystem,
		Request: bulkexport.Request{
			URL:          "https://fhir.example.org/$export?_type=Patient,Observation",
			Method:       "GET",
			OutputFormat: "application/fhir+ndjson",
			Types:        []string{"Patient", "Observation"},
		},
		State:     bulkexport.StateQueued,
		Progress:  bulkexport.Progress{Percent: -1},
		CreatedAt: created,
		UpdatedAt: created,
	}
}

// seed writes jobs with COPY (much faster than Create), with Version 1.
func seed(tb testing.TB, s *Store, jobs []*bulkexport.Job) {
	tb.Helper()
	rows := make([][]any, len(jobs))
	for i, j := range jobs {
		r, err := encode(j, 1)
		require.NoError(tb, err)
		c := &r.job
		rows[i] = []any{c.ID, c.Owner, string(c.State), c.CreatedAt, nullTime(c.ExpiresAt),
			c.LeaseOwner, nullTime(c.LeaseExpiresAt), c.Attempts, int64(1), json.RawMessage(r.data)}
	}
	ident := pgx.Identifier{s.name}
	if s.schema != "" {
		ident = pgx.Identifier{s.schema, s.name}
	}
	n, err := s.pool.CopyFrom(context.Background(), ident,
		[]string{"id", "owner", "state", "created_at", "expires_at", "lease_owner", "lease_expires_at", "attempts", "version", "data"},
		pgx.CopyFromRows(rows))
	require.NoError(tb, err)
	require.EqualValues(tb, len(jobs), n)
}

// queuedJobs returns n queued jobs, created a millisecond apart before
// base, spread over 50 owners.
func queuedJobs(n int, base time.Time) []*bulkexport.Job {
	out := make([]*bulkexport.Job, n)
	for i := range out {
		out[i] = testJob(fmt.Sprintf("job-%06d", i), fmt.Sprintf("client-%02d", i%50), base.Add(time.Duration(i-n)*time.Millisecond))
	}
	return out
}

func baseTime() time.Time {
	return time.Now().UTC().Truncate(time.Second).Add(123456 * time.Microsecond)
}

// ---------------------------------------------------------------------------

func TestConformance(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	storetest.Run(t, func(t *testing.T) bulkexport.JobStore { return newTestStore(t, pool) })
}

// TestConformanceSimpleProtocol runs the suite over a pool that sends no
// prepared statements (as behind PgBouncer in transaction mode).
func TestConformanceSimpleProtocol(t *testing.T) {
	needDB(t)
	t.Parallel()
	pool, err := openPool(context.Background(), os.Getenv(envURL), func(c *pgxpool.Config) {
		c.ConnConfig.DefaultQueryExecMode = pgx.QueryExecModeSimpleProtocol
	})
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	storetest.Run(t, func(t *testing.T) bulkexport.JobStore { return newTestStore(t, pool) })
}

func TestNew(t *testing.T) {
	t.Parallel()
	// pgxpool connects lazily: this pool never dials.
	pool, err := pgxpool.New(context.Background(), "postgres://nobody@127.0.0.1:1/none?sslmode=disable")
	require.NoError(t, err)
	t.Cleanup(pool.Close)

	_, err = New(nil, nil)
	require.Error(t, err)

	s, err := New(pool, nil)
	require.NoError(t, err)
	require.Equal(t, `"bulkexport_jobs"`, s.table)
	require.Equal(t, `"bulkexport_jobs_migrations"`, s.migTable)

	s, err = New(pool, &Options{Schema: "Exports", Table: `my "jobs"`})
	require.NoError(t, err)
	require.Equal(t, `"Exports"."my ""jobs"""`, s.table)
	ms := s.Migrations()
	require.NotEmpty(t, ms)
	require.Equal(t, 1, ms[0].Version)
	require.Equal(t, "create_jobs", ms[0].Name)
	require.Contains(t, ms[0].SQL, `CREATE TABLE IF NOT EXISTS "Exports"."my ""jobs""" (`)
	require.Contains(t, ms[0].SQL, `CREATE INDEX IF NOT EXISTS "my ""jobs""_claim_idx"`)
	require.NotContains(t, ms[0].SQL, "{{")
	ms[0].SQL = "changed"
	require.NotEqual(t, "changed", s.Migrations()[0].SQL, "Migrations returns a copy")

	for _, o := range []*Options{
		{Table: strings.Repeat("t", maxTableLen+1)},
		{Table: "a\x00b"},
		{Table: "bad\xff"},
		{Schema: strings.Repeat("s", 64)},
		{Schema: "a\x00b"},
	} {
		_, err := New(pool, o)
		require.Error(t, err, "New(%+v)", o)
	}
	_, err = New(pool, &Options{Table: strings.Repeat("t", maxTableLen)})
	require.NoError(t, err)
}

func TestFromStates(t *testing.T) {
	t.Parallel()
	for _, to := range append(append([]bulkexport.JobState{}, states...), "", "bogus") {
		got := fromStates(to)
		for _, from := range states {
			require.Equal(t, from.CanTransition(to), contains(got, string(from)), "%s → %q", from, to)
		}
	}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestCeilMicro(t *testing.T) {
	t.Parallel()
	b := time.Date(2024, 5, 6, 7, 8, 9, 123456000, time.UTC)
	require.True(t, ceilMicro(b).Equal(b))
	require.True(t, ceilMicro(b.Add(1)).Equal(b.Add(time.Microsecond)))
	require.True(t, ceilMicro(b.Add(999)).Equal(b.Add(time.Microsecond)))
	require.True(t, ceilMicro(b.Add(-1)).Equal(b))
	require.Equal(t, time.UTC, ceilMicro(b.In(time.FixedZone("X", 3600))).Location())
}

func TestCustomTableInDefaultSchema(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	name := "pgstore_test_jobs_" + randomHex()
	t.Cleanup(func() {
		_, err := pool.Exec(context.Background(), "DROP TABLE IF EXISTS "+pgx.Identifier{name + "_units"}.Sanitize()+", "+pgx.Identifier{name}.Sanitize()+", "+pgx.Identifier{name + "_migrations"}.Sanitize())
		require.NoError(t, err)
	})
	s, err := New(pool, &Options{Table: name})
	require.NoError(t, err)
	require.NoError(t, s.Migrate(ctx))

	var indexes []string
	rows, err := pool.Query(ctx, "SELECT indexname FROM pg_indexes WHERE tablename = $1 ORDER BY indexname", name)
	require.NoError(t, err)
	indexes, err = pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.Equal(t, []string{name + "_claim_idx", name + "_expires_idx", name + "_owner_idx", name + "_pkey"}, indexes)

	base := baseTime()
	require.NoError(t, s.Create(ctx, testJob("job-1", "alice", base), bulkexport.CreateParams{}))
	j, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "w", Now: base, Lease: time.Minute})
	require.NoError(t, err)
	require.Equal(t, "job-1", j.ID)
}

// TestQuotedNames drives a store whose schema and table need quoting.
func TestQuotedNames(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	schema := freshSchema(t, pool) + ` Ü"x`
	t.Cleanup(func() {
		_, err := pool.Exec(context.Background(), "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
		require.NoError(t, err)
	})
	s, err := New(pool, &Options{Schema: schema, Table: `Jobs "v1"; DROP TABLE x`})
	require.NoError(t, err)
	require.NoError(t, s.Migrate(ctx))
	require.NoError(t, s.Migrate(ctx))

	base := baseTime()
	j := testJob("job-1", "alice", base)
	require.NoError(t, s.Create(ctx, j, bulkexport.CreateParams{}))
	j.Progress.Percent = 50
	require.NoError(t, s.Update(ctx, j))
	c, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "w", Now: base, Lease: time.Minute})
	require.NoError(t, err)
	require.EqualValues(t, 3, c.Version)
	list, err := s.List(ctx, bulkexport.Filter{Owner: "alice", States: []bulkexport.JobState{bulkexport.StateRunning}})
	require.NoError(t, err)
	require.Len(t, list, 1)
	require.NoError(t, s.Delete(ctx, "job-1"))
}

func TestMigrateIdempotent(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	s := newTestStore(t, pool) // migrated once
	require.NoError(t, s.Migrate(ctx))
	require.NoError(t, s.Create(ctx, testJob("job-1", "alice", baseTime()), bulkexport.CreateParams{}))
	require.NoError(t, s.Migrate(ctx))
	// An operator who also runs the files by hand breaks nothing.
	for _, m := range s.Migrations() {
		_, err := pool.Exec(ctx, m.SQL)
		require.NoError(t, err, "migration %d by hand", m.Version)
	}
	require.NoError(t, s.Migrate(ctx))

	_, err := s.Get(ctx, "job-1")
	require.NoError(t, err, "Migrate keeps the jobs")
	var n int
	require.NoError(t, pool.QueryRow(ctx, "SELECT count(*) FROM "+s.migTable).Scan(&n))
	require.Equal(t, len(s.Migrations()), n, "each migration recorded once")
}

// TestMigrateConcurrent starts several replicas at once against a database
// where nothing exists yet, not even the schema (or only the schema).
func TestMigrateConcurrent(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	pools := []*pgxpool.Pool{pool, secondPool(t)}
	for round := range 4 {
		schema := freshSchema(t, pool)
		if round%2 == 1 { // the schema exists: the race is on the tables
			_, err := pool.Exec(ctx, "CREATE SCHEMA "+pgx.Identifier{schema}.Sanitize())
			require.NoError(t, err)
		}
		const replicas = 4
		errs := make([]error, replicas)
		var wg sync.WaitGroup
		start := make(chan struct{})
		for i := range replicas {
			s, err := New(pools[i%2], &Options{Schema: schema})
			require.NoError(t, err)
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				errs[i] = s.Migrate(ctx)
			}()
		}
		close(start)
		wg.Wait()
		for i, err := range errs {
			require.NoError(t, err, "round %d, replica %d", round, i)
		}
		s, err := New(pool, &Options{Schema: schema})
		require.NoError(t, err)
		var n int
		require.NoError(t, pool.QueryRow(ctx, "SELECT count(*) FROM "+s.migTable).Scan(&n))
		require.Equal(t, len(s.Migrations()), n)
		require.NoError(t, s.Create(ctx, testJob("job-1", "alice", baseTime()), bulkexport.CreateParams{}))
	}
}

// explain returns the plan of query.
func explain(t *testing.T, pool *pgxpool.Pool, query string, args ...any) string {
	t.Helper()
	rows, err := pool.Query(context.Background(), "EXPLAIN "+query, args...)
	require.NoError(t, err)
	lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return strings.Join(lines, "\n")
}

// TestPlansUseIndexes checks that Claim, the purge and a client's listing
// read indexes, not the whole table, with 10,000 queued jobs.
func TestPlansUseIndexes(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	s := newTestStore(t, pool)
	base := baseTime()
	jobs := queuedJobs(10000, base)
	for i, j := range jobs[:300] {
		switch {
		case i < 100: // live leases
			j.State = bulkexport.StateRunning
			j.LeaseOwner = "worker-1"
			j.LeaseExpiresAt = base.Add(time.Minute)
		default: // finished; half of them expired
			j.State = bulkexport.StateCompleted
			j.ExpiresAt = base.Add(time.Duration(i-200) * time.Minute)
		}
	}
	seed(t, s, jobs)
	_, err := pool.Exec(ctx, "ANALYZE "+s.table)
	require.NoError(t, err)

	exp := storedTime(base.Add(time.Minute))
	plans := []struct {
		name, index string
		plan        string
	}{
		{"Claim", "_claim_idx", explain(t, pool, s.claimSQL, ceilMicro(base), "w", exp, jsonTime(exp), jsonTime(base), time.Minute.Microseconds())},
	}
	q, args := s.listSQL(bulkexport.Filter{ExpiresBefore: base, Limit: 1000}) // the Worker's purge
	plans = append(plans, struct{ name, index, plan string }{"Purge", "_expires_idx", explain(t, pool, q, args...)})
	q, args = s.listSQL(bulkexport.Filter{Owner: "client-07", States: []bulkexport.JobState{bulkexport.StateQueued, bulkexport.StateRunning}})
	plans = append(plans, struct{ name, index, plan string }{"ClientJobs", "_owner_idx", explain(t, pool, q, args...)})
	q, args = s.listSQL(bulkexport.Filter{Owner: "client-07"})
	plans = append(plans, struct{ name, index, plan string }{"ClientAllJobs", "_owner_idx", explain(t, pool, q, args...)})
	for _, p := range plans {
		t.Logf("%s plan:\n%s", p.name, p.plan)
		require.NotContains(t, p.plan, "Seq Scan", "%s scans the table", p.name)
		require.Contains(t, p.plan, s.name+p.index, "%s does not use its index", p.name)
	}

	// And the claim takes the oldest queued job, past the live leases.
	j, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "w", Now: base, Lease: time.Minute})
	require.NoError(t, err)
	require.Equal(t, "job-000300", j.ID)
	purge, err := s.List(ctx, bulkexport.Filter{ExpiresBefore: base, Limit: 1000})
	require.NoError(t, err)
	require.Len(t, purge, 100)
}

// TestTwoReplicasClaim: two pools (two replicas' connections), several
// workers each, claiming at once; no job is handed out twice.
func TestTwoReplicasClaim(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	a := newTestStore(t, pool)
	b, err := New(secondPool(t), &Options{Schema: a.schema})
	require.NoError(t, err)
	require.NoError(t, b.Migrate(ctx))

	base := baseTime()
	const n = 300
	jobs := queuedJobs(n, base)
	seed(t, a, jobs)

	var (
		mu     sync.Mutex
		claims = map[string]string{}
		wg     sync.WaitGroup
	)
	start := make(chan struct{})
	for r, s := range []*Store{a, b} {
		for w := range 4 {
			worker := fmt.Sprintf("replica-%d-worker-%d", r, w)
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				for {
					j, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: worker, Now: base, Lease: time.Hour})
					if errors.Is(err, bulkexport.ErrNoJob) {
						return
					}
					if err != nil {
						t.Errorf("%s: %v", worker, err)
						return
					}
					mu.Lock()
					if prev, dup := claims[j.ID]; dup {
						t.Errorf("%s claimed by %s and %s", j.ID, prev, worker)
					}
					claims[j.ID] = worker
					mu.Unlock()
				}
			}()
		}
	}
	close(start)
	wg.Wait()
	require.Len(t, claims, n)
	perReplica := map[string]int{}
	for id, worker := range claims {
		j, err := a.Get(ctx, id)
		require.NoError(t, err)
		require.Equal(t, worker, j.LeaseOwner)
		require.Equal(t, bulkexport.StateRunning, j.State)
		require.Equal(t, 1, j.Attempts)
		perReplica[worker[:9]]++
	}
	t.Logf("claims per replica: %v", perReplica)
	_, err = b.Claim(ctx, bulkexport.ClaimParams{Worker: "late", Now: base, Lease: time.Minute})
	require.ErrorIs(t, err, bulkexport.ErrNoJob)
}

// TestReclaimFromDeadReplica: replica A claims a job, checkpoints, and
// stops renewing its lease (it died); replica B takes the job over once the
// lease has run out, with A's checkpoint, and A's stale copy is refused.
func TestReclaimFromDeadReplica(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	a := newTestStore(t, pool)
	// The test plays with time, so both replicas use the caller's clock.
	b, err := New(secondPool(t), &Options{Schema: a.schema, CallerClock: true})
	require.NoError(t, err)

	t0 := baseTime()
	require.NoError(t, a.Create(ctx, testJob("job-1", "alice", t0.Add(-time.Minute)), bulkexport.CreateParams{}))
	ja, err := a.Claim(ctx, bulkexport.ClaimParams{Worker: "replica-a", Now: t0, Lease: 30 * time.Second})
	require.NoError(t, err)
	ja.Checkpoint = json.RawMessage(`{"type":"Observation","cursor":"abc"}`)
	ja.Progress = bulkexport.Progress{Percent: 40, Message: "Observation"}
	require.NoError(t, a.Update(ctx, ja)) // version 3

	_, err = b.Claim(ctx, bulkexport.ClaimParams{Worker: "replica-b", Now: t0.Add(10 * time.Second), Lease: 30 * time.Second})
	require.ErrorIs(t, err, bulkexport.ErrNoJob, "the lease is live")
	_, err = b.Claim(ctx, bulkexport.ClaimParams{Worker: "replica-b", Now: t0.Add(30 * time.Second), Lease: 30 * time.Second})
	require.ErrorIs(t, err, bulkexport.ErrNoJob, "expiry is LeaseExpiresAt before now")

	jb, err := b.Claim(ctx, bulkexport.ClaimParams{Worker: "replica-b", Now: t0.Add(31 * time.Second), Lease: 30 * time.Second})
	require.NoError(t, err)
	require.Equal(t, "job-1", jb.ID)
	require.Equal(t, "replica-b", jb.LeaseOwner)
	require.Equal(t, 2, jb.Attempts)
	require.EqualValues(t, 4, jb.Version)
	require.JSONEq(t, string(ja.Checkpoint), string(jb.Checkpoint), "B resumes from A's checkpoint")
	require.Equal(t, 40.0, jb.Progress.Percent)
	require.True(t, jb.UpdatedAt.Equal(t0.Add(31*time.Second)))

	ja.Progress.Percent = 41 // A wakes up and heartbeats
	require.ErrorIs(t, a.Update(ctx, ja), bulkexport.ErrConflict)
	got, err := a.Get(ctx, "job-1")
	require.NoError(t, err)
	require.Equal(t, "replica-b", got.LeaseOwner)
}

// TestColumnsMatchData checks that the indexed columns and the jsonb job
// agree after every kind of write.
func TestColumnsMatchData(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	s := newTestStore(t, pool)
	base := baseTime()
	check := func(what string) {
		t.Helper()
		var (
			owner, state, leaseOwner string
			created                  time.Time
			expires, leaseExpires    *time.Time
			attempts                 int
			version                  int64
			data                     []byte
		)
		require.NoError(t, pool.QueryRow(ctx, `SELECT owner, state, created_at, expires_at, lease_owner, lease_expires_at, attempts, version, data
FROM `+s.table+` WHERE id = 'job-1'`).Scan(&owner, &state, &created, &expires, &leaseOwner, &leaseExpires, &attempts, &version, &data))
		j, err := decode("job-1", data)
		require.NoError(t, err)
		require.Equal(t, j.Owner, owner, what)
		require.Equal(t, string(j.State), state, what)
		require.True(t, j.CreatedAt.Equal(created), what)
		require.Equal(t, j.ExpiresAt.IsZero(), expires == nil, what)
		if expires != nil {
			require.True(t, j.ExpiresAt.Equal(*expires), what)
		}
		require.Equal(t, j.LeaseOwner, leaseOwner, what)
		require.Equal(t, j.LeaseExpiresAt.IsZero(), leaseExpires == nil, what)
		if leaseExpires != nil {
			require.True(t, j.LeaseExpiresAt.Equal(*leaseExpires), what)
		}
		require.Equal(t, j.Attempts, attempts, what)
		require.Equal(t, j.Version, version, what)
	}
	j := testJob("job-1", "alice", base)
	require.NoError(t, s.Create(ctx, j, bulkexport.CreateParams{}))
	check("after Create")
	c, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "worker-1", Now: base, Lease: time.Minute})
	require.NoError(t, err)
	check("after Claim")
	c.LeaseExpiresAt = base.Add(2 * time.Minute)
	c.Progress.Percent = 10
	require.NoError(t, s.Update(ctx, c))
	check("after renewal")
	c, err = s.Claim(ctx, bulkexport.ClaimParams{Worker: "worker-2", Now: base.Add(3 * time.Minute), Lease: time.Minute})
	require.NoError(t, err)
	check("after re-Claim")
	c.State = bulkexport.StateCompleted
	c.ExpiresAt = base.Add(24 * time.Hour)
	c.LeaseOwner, c.LeaseExpiresAt = "", time.Time{}
	require.NoError(t, s.Update(ctx, c))
	check("after completion")
}

// TestSubMicrosecond: times are kept to the microsecond, and comparisons
// with the caller's nanosecond clock stay exact.
func TestSubMicrosecond(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	s := newTestStore(t, pool)
	base := time.Date(2030, 1, 2, 3, 4, 5, 123456789, time.FixedZone("X", -7*3600))
	j := testJob("job-1", "alice", base)
	j.ExpiresAt = base.Add(time.Hour)
	require.NoError(t, s.Create(ctx, j, bulkexport.CreateParams{}))
	got, err := s.Get(ctx, "job-1")
	require.NoError(t, err)
	require.Equal(t, base.Truncate(time.Microsecond).UTC(), got.CreatedAt)
	require.Equal(t, time.UTC, got.CreatedAt.Location())

	// ExpiresAt is stored as E (whole µs); E+1ns is after it.
	e := got.ExpiresAt
	for _, c := range []struct {
		before time.Time
		want   int
	}{{e, 0}, {e.Add(1), 1}, {e.Add(-1), 0}} {
		list, err := s.List(ctx, bulkexport.Filter{ExpiresBefore: c.before})
		require.NoError(t, err)
		require.Len(t, list, c.want, "ExpiresBefore %s", c.before.Format(time.RFC3339Nano))
	}

	// The lease ends at L = now+lease truncated; L+1ns is past it.
	now := base.Add(500) // sub-µs
	c, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "w1", Now: now, Lease: time.Minute})
	require.NoError(t, err)
	l := c.LeaseExpiresAt
	require.Equal(t, now.Add(time.Minute).Truncate(time.Microsecond).UTC(), l)
	_, err = s.Claim(ctx, bulkexport.ClaimParams{Worker: "w2", Now: l, Lease: time.Minute})
	require.ErrorIs(t, err, bulkexport.ErrNoJob)
	c, err = s.Claim(ctx, bulkexport.ClaimParams{Worker: "w2", Now: l.Add(1), Lease: time.Minute})
	require.NoError(t, err)
	require.Equal(t, "w2", c.LeaseOwner)
}

// TestUnstorableJob: PostgreSQL refuses NUL in text and jsonb; the store
// answers with an error and stores nothing.
func TestUnstorableJob(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	s := newTestStore(t, pool)
	j := testJob("job-1", "alice", baseTime())
	j.Progress.Message = "a\x00b"
	require.Error(t, s.Create(ctx, j, bulkexport.CreateParams{}))
	_, err := s.Get(ctx, "job-1")
	require.ErrorIs(t, err, bulkexport.ErrNotFound)

	j.Progress.Message = ""
	require.NoError(t, s.Create(ctx, j, bulkexport.CreateParams{}))
	j.Progress.Message = "a\x00b"
	require.Error(t, s.Update(ctx, j))
	require.EqualValues(t, 1, j.Version)
}

// TestErrorsWrapped: the contract's sentinels come wrapped, with the id.
func TestErrorsWrapped(t *testing.T) {
	pool := needDB(t)
	t.Parallel()
	ctx := context.Background()
	s := newTestStore(t, pool)
	_, err := s.Get(ctx, "job-x")
	require.ErrorIs(t, err, bulkexport.ErrNotFound)
	require.ErrorContains(t, err, "job-x")
	require.ErrorIs(t, s.Delete(ctx, "job-x"), bulkexport.ErrNotFound)
	j := testJob("job-x", "alice", baseTime())
	require.ErrorIs(t, s.Update(ctx, j), bulkexport.ErrNotFound)
	require.NoError(t, s.Create(ctx, j, bulkexport.CreateParams{}))
	require.ErrorIs(t, s.Create(ctx, testJob("job-x", "bob", baseTime()), bulkexport.CreateParams{}), bulkexport.ErrAlreadyExists)
	j.State = bulkexport.StateCompleted
	err = s.Update(ctx, j)
	require.ErrorIs(t, err, bulkexport.ErrInvalidTransition)
	require.ErrorContains(t, err, "queued → completed")
	j.State = bulkexport.StateQueued
	j.Version = 5
	require.ErrorIs(t, s.Update(ctx, j), bulkexport.ErrConflict)
	require.Error(t, s.Create(ctx, &bulkexport.Job{}, bulkexport.CreateParams{}))
	require.Error(t, s.Create(ctx, nil, bulkexport.CreateParams{}))
	require.Error(t, s.Update(ctx, nil))
}

// TestDocsSchema keeps docs/pgstore.md's copy of the schema in step with
// the embedded migrations.
func TestDocsSchema(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile(filepath.Join("..", "docs", "pgstore.md"))
	if errors.Is(err, os.ErrNotExist) {
		t.Skip("no ../docs/pgstore.md (module used outside its repository)")
	}
	require.NoError(t, err)
	doc := string(b)
	ms, err := loadMigrations("", DefaultTable)
	require.NoError(t, err)
	for _, m := range ms {
		require.Contains(t, doc, m.SQL, "docs/pgstore.md lacks migration %d verbatim", m.Version)
	}
	require.Contains(t, doc, migrationsTableDDL(qualify("", DefaultTable+"_migrations")))
}

// TestClaimPatchKeys: Claim patches data by JSON key (jsonb_build_object)
// and reads its format key; every key it names must be one of
// bulkexport.Job's JSON keys (or the stored form's "format"), or the patch
// would add a key that nothing reads while the job keeps its old value.
func TestClaimPatchKeys(t *testing.T) {
	t.Parallel()
	q := testStoreSQL(t).claimSQL
	tags := jobJSONKeys()
	patched := regexp.MustCompile(`(?m)^\s*'(\w+)',`).FindAllStringSubmatch(q, -1)
	read := regexp.MustCompile(`->>?'(\w+)'`).FindAllStringSubmatch(q, -1)
	seen := map[string]bool{}
	for _, k := range append(patched, read...) {
		seen[k[1]] = true
		require.True(t, tags[k[1]] || k[1] == "format", "Claim names the data key %q, which is no JSON key of bulkexport.Job", k[1])
	}
	for _, k := range []string{"state", "leaseOwner", "leaseExpiresAt", "attempts", "version", "fence", "updatedAt", "format"} {
		require.True(t, seen[k], "Claim does not name the data key %q", k)
	}

	now := time.Now()
	b, err := json.Marshal(&bulkexport.Job{UpdatedAt: now})
	require.NoError(t, err)
	var m map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(b, &m))
	var tm time.Time
	require.NoError(t, json.Unmarshal([]byte(`"`+jsonTime(storedTime(now))+`"`), &tm))
	require.True(t, tm.Equal(storedTime(now)))
	require.JSONEq(t, string(m["updatedAt"]), `"`+jsonTime(now)+`"`, "jsonTime formats as encoding/json does")
}

// jobJSONKeys returns the JSON keys of bulkexport.Job's fields.
func jobJSONKeys() map[string]bool {
	keys := map[string]bool{}
	typ := reflect.TypeOf(bulkexport.Job{})
	for i := range typ.NumField() {
		f := typ.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		keys[name] = true
	}
	return keys
}

// testStoreSQL returns a store over a pool that never dials, for its SQL.
func testStoreSQL(t *testing.T) *Store {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), "postgres://nobody@127.0.0.1:1/none?sslmode=disable")
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	s, err := New(pool, nil)
	require.NoError(t, err)
	return s
}
