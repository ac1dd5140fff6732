package pgstore

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
)

// pollBench is the fixture of BenchmarkPollStatus: a running job in a
// fresh pgstore, the real Handler over it behind httptest, and a
// keep-alive client.
type pollBench struct {
	store   *Store
	client  *http.Client
	handler http.Handler // the real handler's mux, for in-process polls
	status  string       // the job's status URL on the real handler
	rawURL  string       // the same request on the raw-select handler
	rawSQL  string
	id      string
}

func newPollBench(b *testing.B) *pollBench {
	b.Helper()
	pool := needDB(b)
	ctx := context.Background()
	s := newTestStore(b, pool)
	now := time.Now()
	job := testJob(bulkexport.NewJobID(), "", now.Add(-time.Minute))
	if err := s.Create(ctx, job, bulkexport.CreateParams{}); err != nil {
		b.Fatal(err)
	}
	j, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "bench-worker", Now: now, Lease: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	j.Progress = bulkexport.Progress{Percent: 42, Message: "Observation"}
	j.TransactionTime, j.StartedAt = now, now
	j.Checkpoint = json.RawMessage(`{"types":{"Patient":{"done":true,"seq":[1,0,0],"written":1000},"Observation":{"cursor":"4711","seq":[3,0,0],"written":123456}}}`)
	j.Output = []bulkexport.File{{Type: "Patient", Name: "Patient.000001.ndjson", Count: 1000, Size: 1 << 20}}
	if err := s.Update(ctx, j); err != nil {
		b.Fatal(err)
	}

	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	b.Cleanup(srv.Close)
	h, err := bulkexport.NewHandler(s, &bulkexport.Options{
		BaseURL: srv.URL + "/fhir",
		Logger:  slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		b.Fatal(err)
	}
	mux.Handle("/fhir/", h)
	f := &pollBench{
		store:   s,
		client:  &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}},
		handler: mux,
		status:  h.StatusURL(j.ID),
		rawSQL:  "SELECT data FROM " + s.table + " WHERE id = $1",
		id:      j.ID,
	}
	b.Cleanup(f.client.CloseIdleConnections)

	// The raw handler: the same primary-key SELECT, and a 202 with the
	// same headers written from constants.
	mux.HandleFunc("/raw/", func(w http.ResponseWriter, r *http.Request) {
		var data []byte
		if err := s.pool.QueryRow(r.Context(), f.rawSQL, r.URL.Query().Get("_jobId")).Scan(&data); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("X-Progress", "42% complete: Observation")
		w.Header().Set("Retry-After", "6")
		w.WriteHeader(http.StatusAccepted)
	})
	f.rawURL = srv.URL + "/raw/$export-poll-status?_jobId=" + j.ID

	// Warm up: connections, prepared statements; and check the answer.
	var t timings
	for i := range 30 {
		if err := t.round(f, i); err != nil {
			b.Fatal(err)
		}
	}
	return f
}

// poll GETs u, reads the body, and wants a 202.
func (f *pollBench) poll(u string) error {
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := f.client.Do(req)
	if err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		return fmt.Errorf("GET %s: status %d, want 202", u, resp.StatusCode)
	}
	return nil
}

// pollInProcess serves the poll with the real handler in process: an
// httptest.NewRecorder, no connection.
func (f *pollBench) pollInProcess() error {
	rec := httptest.NewRecorder()
	f.handler.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, f.status, nil))
	if rec.Code != http.StatusAccepted {
		return fmt.Errorf("in-process poll: status %d, want 202", rec.Code)
	}
	return nil
}

// selectRaw is the least a poll must do: one single-row SELECT by primary
// key on the same pool, the row's JSON scanned into a []byte.
func (f *pollBench) selectRaw() error {
	var data []byte
	return f.store.pool.QueryRow(context.Background(), f.rawSQL, f.id).Scan(&data)
}

// selectRawCtx is selectRaw under a cancellable context, as any code
// serving a request runs (pgx then watches the context, which costs a
// little per query).
func (f *pollBench) selectRawCtx() error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var data []byte
	return f.store.pool.QueryRow(ctx, f.rawSQL, f.id).Scan(&data)
}

// timings accumulates the measurements of BenchmarkPollStatus.
type timings struct {
	poll, pollIn, raw, rawCtx, rawHTTP atomic.Int64 // nanoseconds
	n                                  atomic.Int64
}

// round runs one of each, in an order that rotates with i so that none
// always runs first.
func (t *timings) round(f *pollBench, i int) error {
	steps := [...]struct {
		run func() error
		sum *atomic.Int64
	}{
		{func() error { return f.poll(f.status) }, &t.poll},
		{f.pollInProcess, &t.pollIn},
		{f.selectRaw, &t.raw},
		{f.selectRawCtx, &t.rawCtx},
		{func() error { return f.poll(f.rawURL) }, &t.rawHTTP},
	}
	for k := range steps {
		s := steps[(i+k)%len(steps)]
		t0 := time.Now()
		if err := s.run(); err != nil {
			return err
		}
		s.sum.Add(int64(time.Since(t0)))
	}
	t.n.Add(1)
	return nil
}

func (t *timings) report(b *testing.B) {
	n := float64(t.n.Load())
	poll, pollIn := float64(t.poll.Load()), float64(t.pollIn.Load())
	raw, rawHTTP := float64(t.raw.Load()), float64(t.rawHTTP.Load())
	b.ReportMetric(poll/n, "http-poll-ns/op")
	b.ReportMetric(pollIn/n, "inproc-poll-ns/op")
	b.ReportMetric(raw/n, "select-ns/op")
	b.ReportMetric(rawHTTP/n, "http-select-ns/op")
	// Throughput ratios (time of the baseline over time of the poll): 1
	// means a poll costs no more than the baseline.
	b.ReportMetric(raw/pollIn, "inproc-poll/select")
	b.ReportMetric(float64(t.rawCtx.Load())/pollIn, "inproc-poll/select-ctx")
	b.ReportMetric(raw/poll, "http-poll/select")
	b.ReportMetric(rawHTTP/poll, "http-poll/http-select")
}

// BenchmarkPollStatus measures GET $export-poll-status of a running job
// through the real Handler against this store, and compares it in the same
// run with a raw pgx single-row SELECT by primary key on the same pool. Four
// operations alternate, in rotating order, within each iteration:
//
//   - inproc-poll: the handler's ServeHTTP with httptest.NewRecorder (no
//     connection: routing, query parsing, store Get, the 202 headers);
//   - http-poll: the same GET over an httptest.Server and a keep-alive
//     client on loopback;
//   - select: SELECT data FROM jobs WHERE id = $1, scanned into a []byte;
//   - select-ctx: the same under a cancellable context, as the handler's
//     request context is;
//   - http-select: that SELECT behind the same httptest.Server and client,
//     in a handler that writes the same 202 from constants.
//
// The ratios are throughputs relative to the baseline's, baseline time ÷
// poll time: inproc-poll/select (the handler against the least a poll must
// do), http-poll/select (including the HTTP round trip the select does not
// pay), http-poll/http-select (both over HTTP).
//
// "serial" is one client; "parallel" is 4 per CPU (b.RunParallel with
// SetParallelism(4)), where the ratios compare latencies under load, which
// for a closed loop of clients is the throughput ratio.
func BenchmarkPollStatus(b *testing.B) {
	b.Run("serial", func(b *testing.B) {
		f := newPollBench(b)
		var t timings
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if err := t.round(f, i); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		t.report(b)
	})
	b.Run("parallel", func(b *testing.B) {
		f := newPollBench(b)
		var t timings
		var next atomic.Int64
		b.SetParallelism(4)
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := t.round(f, int(next.Add(1))); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.StopTimer()
		t.report(b)
	})
}
