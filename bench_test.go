package bulkexport_test

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// The poll benchmarks compare the real status handler with a baseline that
// writes the same 202 answer from constants, both behind httptest.NewServer
// and polled by one keep-alive http.Client: the difference is what the
// handler (routing, query parsing, store Get and Clone, X-Progress,
// Retry-After) costs on top of net/http and the loopback round trip.

// pollFixture holds both servers and the shared client.
type pollFixture struct {
	client      *http.Client
	handler     *bulkexport.Handler
	handlerURL  string // the status URL of the running job on the real handler
	baselineURL string // the same path on the constant handler
	closers     []func()
}

func (f *pollFixture) close() {
	f.client.CloseIdleConnections()
	for _, c := range slices.Backward(f.closers) {
		c()
	}
}

// newPollHandler returns a Handler over a MemoryStore that holds one
// running job with progress, and that job's id.
func newPollHandler(tb testing.TB, base string) (*bulkexport.Handler, string) {
	tb.Helper()
	ctx := context.Background()
	now := t0
	store := bulkexport.NewMemoryStore()
	h, err := bulkexport.NewHandler(store, &bulkexport.Options{
		BaseURL: base,
		Now:     func() time.Time { return now },
		Logger:  discardLogger(),
	})
	if err != nil {
		tb.Fatal(err)
	}
	job := &bulkexport.Job{
		ID:    bulkexport.NewJobID(),
		Level: fhirbulk.LevelSystem,
		Request: bulkexport.Request{
			URL:          base + "/$export?_type=Patient,Observation,Condition&_since=2024-01-01T00:00:00Z",
			Method:       http.MethodGet,
			OutputFormat: bulkexport.FormatNDJSON,
			Since:        time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC),
			Types:        []string{"Patient", "Observation", "Condition"},
			TypeFilters:  []bulkexport.TypeFilter{{Type: "Observation", Query: "category=laboratory"}},
		},
		State:     bulkexport.StateQueued,
		Progress:  bulkexport.Progress{Percent: -1, Message: "queued"},
		CreatedAt: now,
		UpdatedAt: now,
	}
	if err := store.Create(ctx, job, bulkexport.CreateParams{}); err != nil {
		tb.Fatal(err)
	}
	j, err := store.Claim(ctx, bulkexport.ClaimParams{Worker: "bench-worker", Now: now, Lease: time.Hour})
	if err != nil {
		tb.Fatal(err)
	}
	j.Progress = bulkexport.Progress{Percent: 42, Message: "Observation"}
	j.Checkpoint = []byte(`{"type":"Observation","cursor":"eyJsYXN0SWQiOiIxMjM0NSJ9","written":123456}`)
	if err := store.Update(ctx, j); err != nil {
		tb.Fatal(err)
	}
	return h, job.ID
}

// baselineHandler writes what the real handler writes for the running job,
// from constants.
func baselineHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		h := w.Header()
		h.Set("X-Progress", "42% complete: Observation")
		h.Set("Retry-After", "1")
		w.WriteHeader(http.StatusAccepted)
	})
}

func newPollFixture(tb testing.TB) *pollFixture {
	tb.Helper()
	f := &pollFixture{client: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}}

	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	f.closers = append(f.closers, srv.Close)
	h, id := newPollHandler(tb, srv.URL+"/fhir")
	mux.Handle("/fhir/", h)
	f.handler = h
	f.handlerURL = h.StatusURL(id)

	bmux := http.NewServeMux()
	bsrv := httptest.NewServer(bmux)
	f.closers = append(f.closers, bsrv.Close)
	bmux.Handle("/fhir/", baselineHandler())
	f.baselineURL = bsrv.URL + "/fhir/$export-poll-status?_jobId=" + id

	// Both answer alike, or the comparison means nothing.
	a, b := f.get(tb, f.handlerURL), f.get(tb, f.baselineURL)
	for _, k := range []string{"X-Progress", "Retry-After", "Content-Length", "Content-Type"} {
		if a.Get(k) != b.Get(k) {
			tb.Fatalf("header %s: handler %q, baseline %q", k, a.Get(k), b.Get(k))
		}
	}
	if len(a) != len(b) {
		tb.Fatalf("headers differ: handler %v, baseline %v", a, b)
	}
	return f
}

func (f *pollFixture) get(tb testing.TB, url string) http.Header {
	res, err := f.client.Get(url)
	if err != nil {
		tb.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusAccepted {
		tb.Fatalf("GET %s: %d", url, res.StatusCode)
	}
	return res.Header
}

func pollLoop(b *testing.B, f *pollFixture, url string) {
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		f.get(b, url)
	}
}

// BenchmarkPollStatus polls a running job over a real loopback transport:
// the constant baseline, then the real handler.
func BenchmarkPollStatus(b *testing.B) {
	f := newPollFixture(b)
	defer f.close()
	b.Run("baseline", func(b *testing.B) { pollLoop(b, f, f.baselineURL) })
	b.Run("handler", func(b *testing.B) { pollLoop(b, f, f.handlerURL) })
}

// BenchmarkPollStatusRatio reports ratio = baseline ns/op ÷ handler ns/op
// (1 means the handler costs nothing over net/http; the target is ≥ 0.8),
// with baseline-ns/op and handler-ns/op. Each op is one poll of each; they
// alternate in small chunks, each chunk starting with the other side, so
// that noise from the machine hits both alike.
//
// It cannot call testing.Benchmark for the two sides: that blocks forever
// inside a running benchmark (both take the testing package's benchmark
// lock), so it times them itself.
func BenchmarkPollStatusRatio(b *testing.B) {
	f := newPollFixture(b)
	defer f.close()
	const chunk = 32
	var base, hand time.Duration
	poll := func(url string, n int) time.Duration {
		start := time.Now()
		for range n {
			f.get(b, url)
		}
		return time.Since(start)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for done, round := 0, 0; done < b.N; round++ {
		n := min(chunk, b.N-done)
		if round%2 == 0 {
			base += poll(f.baselineURL, n)
			hand += poll(f.handlerURL, n)
		} else {
			hand += poll(f.handlerURL, n)
			base += poll(f.baselineURL, n)
		}
		done += n
	}
	b.ReportMetric(float64(base.Nanoseconds())/float64(b.N), "baseline-ns/op")
	b.ReportMetric(float64(hand.Nanoseconds())/float64(b.N), "handler-ns/op")
	b.ReportMetric(float64(base)/float64(hand), "ratio")
}

// BenchmarkPollStatusServeHTTP measures the handler alone, without a
// transport.
func BenchmarkPollStatusServeHTTP(b *testing.B) {
	h, id := newPollHandler(b, "https://fhir.example.org/fhir")
	cases := []struct{ name, target string }{
		{"running/query", h.StatusURL(id)},
		{"running/path", "https://fhir.example.org/fhir/$export-poll-status/" + id},
		{"unknown", h.StatusURL(bulkexport.NewJobID())},
	}
	for _, c := range cases {
		b.Run(c.name, func(b *testing.B) {
			req := httptest.NewRequest(http.MethodGet, c.target, nil)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				w := httptest.NewRecorder()
				h.ServeHTTP(w, req)
				if w.Code != http.StatusAccepted && w.Code != http.StatusNotFound {
					b.Fatalf("status %d", w.Code)
				}
			}
		})
	}
	b.Run("parallel", func(b *testing.B) {
		target := h.StatusURL(id)
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			req := httptest.NewRequest(http.MethodGet, target, nil)
			for pb.Next() {
				w := httptest.NewRecorder()
				h.ServeHTTP(w, req)
				if w.Code != http.StatusAccepted {
					b.Errorf("status %d", w.Code)
					return
				}
			}
		})
	})
}

// kickoffFixture is a handler over a MemoryStore in which one client has
// backlog finished jobs that expired and wait for the purge, as after a
// client looped small exports faster than the purge runs.
type kickoffFixture struct {
	h     *bulkexport.Handler
	store *bulkexport.MemoryStore
	now   time.Time
}

func newKickoffFixture(b *testing.B, backlog int) *kickoffFixture {
	b.Helper()
	f := &kickoffFixture{store: bulkexport.NewMemoryStore(), now: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
	h, err := bulkexport.NewHandler(f.store, &bulkexport.Options{
		BaseURL: "https://x/fhir", Now: func() time.Time { return f.now }, Logger: discardLogger(),
		Authenticate: func(*http.Request) (string, error) { return "alice", nil },
	})
	if err != nil {
		b.Fatal(err)
	}
	f.h = h
	for i := range backlog {
		j := &bulkexport.Job{ID: bulkexport.NewJobID(), Owner: "alice", Level: fhirbulk.LevelSystem, State: bulkexport.StateCompleted,
			CreatedAt: f.now.Add(-time.Hour + time.Duration(i)), ExpiresAt: f.now.Add(-time.Minute),
			Output: []bulkexport.File{{Type: "Patient", Name: "Patient.c1.ndjson", Count: 1, Size: 10}}}
		if err := f.store.Create(context.Background(), j, bulkexport.CreateParams{}); err != nil {
			b.Fatal(err)
		}
	}
	return f
}

// kickoff kicks off one export and finishes its job at once (outside the
// measured time), so that the active-jobs cap never bites.
func (f *kickoffFixture) kickoff(b *testing.B) time.Duration {
	req := httptest.NewRequest(http.MethodGet, "https://x/fhir/$export?_type=Patient", nil)
	req.Header.Set("Prefer", "respond-async")
	w := httptest.NewRecorder()
	start := time.Now()
	f.h.ServeHTTP(w, req)
	d := time.Since(start)
	if w.Code != http.StatusAccepted {
		b.Fatal(w.Code, w.Body.String())
	}
	ctx := context.Background()
	j, err := f.store.Claim(ctx, bulkexport.ClaimParams{Worker: "w", Now: f.now, Lease: time.Hour})
	if err != nil {
		b.Fatal(err)
	}
	j.State, j.ExpiresAt = bulkexport.StateCompleted, f.now.Add(time.Hour)
	if err := f.store.Update(ctx, j); err != nil {
		b.Fatal(err)
	}
	return d
}

// BenchmarkKickoffFinishedBacklog: kick-off latency with 5,000 expired,
// not yet purged finished jobs of the same client, against the same
// kick-off with none, alternating; ratio is empty ÷ backlog (1.0: the
// backlog costs nothing). The finished-jobs cap lists only unexpired jobs
// (Filter.NotExpiredAt) and the MemoryStore indexes jobs by owner.
func BenchmarkKickoffFinishedBacklog(b *testing.B) {
	empty, full := newKickoffFixture(b, 0), newKickoffFixture(b, 5000)
	var base, loaded time.Duration
	b.ResetTimer()
	for i := range b.N {
		if i%2 == 0 {
			base += empty.kickoff(b)
			loaded += full.kickoff(b)
		} else {
			loaded += full.kickoff(b)
			base += empty.kickoff(b)
		}
	}
	b.ReportMetric(float64(base.Nanoseconds())/float64(b.N), "empty-ns/op")
	b.ReportMetric(float64(loaded.Nanoseconds())/float64(b.N), "backlog-ns/op")
	b.ReportMetric(float64(base)/float64(loaded), "ratio")
}
