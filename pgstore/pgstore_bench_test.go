package pgstore

import (
	"context"
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
)

// largeJob is a job late in a big export: many files and a checkpoint.
func largeJob(id string, base time.Time) *bulkexport.Job {
	j := testJob(id, "client-1", base)
	j.State = bulkexport.StateRunning
	j.Progress = bulkexport.Progress{Percent: 87.5, Message: "Observation"}
	j.TransactionTime = base
	for i := range 100 {
		j.Output = append(j.Output, bulkexport.File{Type: "Observation", Name: fmt.Sprintf("Observation.%06d.ndjson", i+1), Count: 100000, Size: 268435456})
	}
	j.Checkpoint = json.RawMessage(`{"type":"Observation","cursor":"b2Zmc2V0PTEyMzQ1Njc4OTA=","done":["Patient","Condition","Encounter"],"count":9876543}`)
	j.LeaseOwner = "worker-1"
	j.LeaseExpiresAt = base.Add(time.Minute)
	return j
}

// BenchmarkGet compares Store.Get with the least a Get can do over the
// same pool: SELECT data into a []byte, without decoding. The two
// alternate within each iteration; ns/op is Get's, raw-ns/op the select's,
// and store/raw their ratio (the cost of decoding the JSON and of the
// store's error handling).
func BenchmarkGet(b *testing.B) {
	pool := needDB(b)
	ctx := context.Background()
	for _, c := range []struct {
		name string
		job  *bulkexport.Job
	}{
		{"small", testJob("job-small", "client-1", baseTime())},
		{"large", largeJob("job-large", baseTime())},
	} {
		b.Run(c.name, func(b *testing.B) {
			s := newTestStore(b, pool)
			if err := s.Create(ctx, c.job, bulkexport.CreateParams{}); err != nil {
				b.Fatal(err)
			}
			raw := "SELECT data FROM " + s.table + " WHERE id = $1"
			var data []byte
			for range 10 { // prepare both statements, warm the caches
				if err := pool.QueryRow(ctx, raw, c.job.ID).Scan(&data); err != nil {
					b.Fatal(err)
				}
				if _, err := s.Get(ctx, c.job.ID); err != nil {
					b.Fatal(err)
				}
			}
			var storeDur, rawDur time.Duration
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				rawFirst := i%2 == 0
				if rawFirst {
					t0 := time.Now()
					if err := pool.QueryRow(ctx, raw, c.job.ID).Scan(&data); err != nil {
						b.Fatal(err)
					}
					rawDur += time.Since(t0)
				}
				t0 := time.Now()
				if _, err := s.Get(ctx, c.job.ID); err != nil {
					b.Fatal(err)
				}
				storeDur += time.Since(t0)
				if !rawFirst {
					t0 := time.Now()
					if err := pool.QueryRow(ctx, raw, c.job.ID).Scan(&data); err != nil {
						b.Fatal(err)
					}
					rawDur += time.Since(t0)
				}
			}
			b.StopTimer()
			b.ReportMetric(float64(storeDur.Nanoseconds())/float64(b.N), "ns/op")
			b.ReportMetric(float64(rawDur.Nanoseconds())/float64(b.N), "raw-ns/op")
			b.ReportMetric(float64(storeDur)/float64(rawDur), "store/raw")
			b.ReportMetric(float64(len(data)), "json-bytes")
		})
	}
}

// BenchmarkClaim claims one job at a time from 10,000 queued ones. After
// each (untimed) the claimed job is deleted and a newer queued job added,
// so every claim sees 10,000 queued jobs. "100live" also keeps 100 running
// jobs with live leases at the head of the queue, which each claim passes
// over.
func BenchmarkClaim(b *testing.B) {
	pool := needDB(b)
	ctx := context.Background()
	for _, live := range []int{0, 100} {
		b.Run(fmt.Sprintf("%dlive", live), func(b *testing.B) {
			s := newTestStore(b, pool)
			base := baseTime()
			jobs := queuedJobs(10000+live, base)
			for _, j := range jobs[:live] {
				j.State = bulkexport.StateRunning
				j.LeaseOwner = "worker-0"
				j.LeaseExpiresAt = base.Add(time.Hour)
			}
			seed(b, s, jobs)
			if _, err := pool.Exec(ctx, "ANALYZE "+s.table); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				j, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "worker-1", Now: base, Lease: time.Minute})
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if err := s.Delete(ctx, j.ID); err != nil {
					b.Fatal(err)
				}
				if err := s.Create(ctx, testJob(fmt.Sprintf("new-%09d", i), "client-1", base.Add(time.Duration(i)*time.Microsecond)), bulkexport.CreateParams{}); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}
