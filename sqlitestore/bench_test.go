package sqlitestore

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

const benchJobs = 10000

// seedQueued inserts n queued jobs, one second apart, in one transaction.
func seedQueued(b *testing.B, s *Store, n int, base time.Time) {
	b.Helper()
	ctx := context.Background()
	tx, err := s.db.BeginTx(ctx, nil)
	require.NoError(b, err)
	for i := range n {
		j := benchJob(fmt.Sprintf("job-%06d", i), base.Add(time.Duration(i)*time.Second))
		r, err := encode(j, 1)
		require.NoError(b, err)
		_, err = tx.ExecContext(ctx, s.q.insert, j.ID, r.owner, r.state, r.createdAt, r.updatedAt, r.expiresAt, r.leaseOwner, r.leaseExpiresAt, r.attempts, r.data)
		require.NoError(b, err)
	}
	require.NoError(b, tx.Commit())
}

// benchJob is a queued job of a realistic size (about 1 KB of JSON).
func benchJob(id string, created time.Time) *bulkexport.Job {
	return &bulkexport.Job{
		ID:    id,
		Owner: "client-" + id[len(id)-1:],
		Level: fhirbulk.LevelSystem,
		Request: bulkexport.Request{
			URL:          "https://fhir.example.org/$export?_type=Patient,Observation,Condition,Encounter",
			Method:       "GET",
			OutputFormat: "application/fhir+ndjson",
			Types:        []string{"Patient", "Observation", "Condition", "Encounter"},
		},
		State:     bulkexport.StateQueued,
		CreatedAt: created,
		UpdatedAt: created,
		Output: []bulkexport.File{
			{Type: "Patient", Name: "Patient.000001.ndjson", Count: 1000, Size: 1 << 20},
			{Type: "Observation", Name: "Observation.000001.ndjson", Count: 50000, Size: 50 << 20},
			{Type: "Condition", Name: "Condition.000001.ndjson", Count: 3000, Size: 3 << 20},
		},
	}
}

func benchStore(b *testing.B) *Store {
	b.Helper()
	s, _ := newStore(b, nil)
	return s
}

func BenchmarkGet(b *testing.B) {
	s := benchStore(b)
	seedQueued(b, s, benchJobs, time.Now())
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if _, err := s.Get(ctx, fmt.Sprintf("job-%06d", i%benchJobs)); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkGetParallel(b *testing.B) {
	s := benchStore(b)
	seedQueued(b, s, benchJobs, time.Now())
	ctx := context.Background()
	var n atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := s.Get(ctx, fmt.Sprintf("job-%06d", n.Add(1)%benchJobs)); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkClaim claims from a table of 10,000 queued jobs; when they are
// all running it hands them back (untimed) and goes on.
func BenchmarkClaim(b *testing.B) {
	s := benchStore(b)
	base := time.Now()
	seedQueued(b, s, benchJobs, base)
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		_, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "worker-1", Now: base, Lease: time.Hour})
		if err == bulkexport.ErrNoJob {
			b.StopTimer()
			_, err = s.db.ExecContext(ctx, `UPDATE bulkexport_jobs SET state = 'queued', data = json_set(data, '$.state', 'queued')`)
			require.NoError(b, err)
			b.StartTimer()
			_, err = s.Claim(ctx, bulkexport.ClaimParams{Worker: "worker-1", Now: base, Lease: time.Hour})
		}
		if err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkClaimParallel is BenchmarkClaim from GOMAXPROCS goroutines, a
// store's worst write contention.
func BenchmarkClaimParallel(b *testing.B) {
	s := benchStore(b)
	base := time.Now()
	// Enough jobs that the benchmark does not run out: b.N is at most a
	// few tens of thousands here.
	seedQueued(b, s, 5*benchJobs, base)
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "worker-1", Now: base, Lease: time.Hour}); err != nil && err != bulkexport.ErrNoJob {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkUpdateParallel updates one job per goroutine, concurrently:
// progress reports from several workers.
func BenchmarkUpdateParallel(b *testing.B) {
	s := benchStore(b)
	ctx := context.Background()
	var g atomic.Int64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		j := benchJob(fmt.Sprintf("job-p%03d", g.Add(1)), time.Now())
		if err := s.Create(ctx, j, bulkexport.CreateParams{}); err != nil {
			b.Error(err)
			return
		}
		for pb.Next() {
			j.Progress.Percent++
			if err := s.Update(ctx, j); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkCreate inserts new jobs one by one.
func BenchmarkCreate(b *testing.B) {
	s := benchStore(b)
	ctx := context.Background()
	base := time.Now()
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if err := s.Create(ctx, benchJob(fmt.Sprintf("job-%08d", i), base), bulkexport.CreateParams{}); err != nil {
			b.Fatal(err)
		}
	}
}
