package observability_test

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"go.opentelemetry.io/otel/metric"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// The poll benchmarks here follow the root module's BenchmarkPollStatusRatio
// (bench_test.go): a constant handler that writes the same 202 as the
// baseline, the real handler polled over loopback by one keep-alive
// client. They add a second real handler whose Options.MeterProvider is an
// SDK MeterProvider, so that one run compares the ratio without metrics
// and with them.

// newPollHandler returns a Handler over a MemoryStore holding one running
// job with progress, and that job's id, as in the root benchmark.
func newPollHandler(tb testing.TB, base string, mp metric.MeterProvider) (*bulkexport.Handler, string) {
	tb.Helper()
	ctx := context.Background()
	now := t0
	store := bulkexport.NewMemoryStore()
	h, err := bulkexport.NewHandler(store, &bulkexport.Options{
		BaseURL:       base,
		Now:           func() time.Time { return now },
		Logger:        slog.New(slog.NewTextHandler(io.Discard, nil)),
		MeterProvider: mp,
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

func pollOnce(tb testing.TB, c *http.Client, url string) {
	res, err := c.Get(url)
	if err != nil {
		tb.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, res.Body)
	res.Body.Close()
	if res.StatusCode != http.StatusAccepted {
		tb.Fatalf("GET %s: %d", url, res.StatusCode)
	}
}

// BenchmarkPollStatusRatioMetrics reports, in one run, the root benchmark's
// ratio (baseline ns/op ÷ handler ns/op) for a handler without metrics
// (ratio-nometrics) and for one with an SDK MeterProvider (ratio-metrics),
// and how much lower the second is, in percent (ratio-drop-%; the budget is
// 5). Each op is one poll of each of the three servers; they alternate in
// chunks of 2 over one keep-alive connection to one server, each round
// starting with another of them, so that noise from the machine hits all
// alike.
func BenchmarkPollStatusRatioMetrics(b *testing.B) {
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer func() { _ = mp.Shutdown(context.Background()) }()
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
	defer client.CloseIdleConnections()

	// One server and one keep-alive connection for all three, so that
	// they differ only in the handler.
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	defer srv.Close()
	hOff, idOff := newPollHandler(b, srv.URL+"/off/fhir", nil)
	mux.Handle("/off/fhir/", hOff)
	hOn, idOn := newPollHandler(b, srv.URL+"/on/fhir", mp)
	mux.Handle("/on/fhir/", hOn)
	mux.Handle("/base/fhir/", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		h := w.Header()
		h.Set("X-Progress", "42% complete: Observation")
		h.Set("Retry-After", "1")
		w.WriteHeader(http.StatusAccepted)
	}))
	urls := [3]string{
		srv.URL + "/base/fhir/$export-poll-status?_jobId=" + idOff,
		hOff.StatusURL(idOff),
		hOn.StatusURL(idOn),
	}
	for _, u := range urls {
		pollOnce(b, client, u) // warm the connections
	}

	const chunk = 2
	var took [3]time.Duration
	b.ReportAllocs()
	b.ResetTimer()
	for done, round := 0, 0; done < b.N; round++ {
		n := min(chunk, b.N-done)
		for k := range 3 {
			i := (round + k) % 3
			start := time.Now()
			for range n {
				pollOnce(b, client, urls[i])
			}
			took[i] += time.Since(start)
		}
		done += n
	}
	b.StopTimer()

	perOp := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / float64(b.N) }
	ratioOff := float64(took[0]) / float64(took[1])
	ratioOn := float64(took[0]) / float64(took[2])
	b.ReportMetric(perOp(took[0]), "baseline-ns/op")
	b.ReportMetric(perOp(took[1]), "nometrics-ns/op")
	b.ReportMetric(perOp(took[2]), "metrics-ns/op")
	b.ReportMetric(ratioOff, "ratio-nometrics")
	b.ReportMetric(ratioOn, "ratio-metrics")
	b.ReportMetric((1-ratioOn/ratioOff)*100, "ratio-drop-%")

	// The metered handler did count every poll.
	var rm metricdata.ResourceMetrics
	if err := reader.Collect(context.Background(), &rm); err != nil {
		b.Fatal(err)
	}
	if got := pollCount(rm); got < int64(b.N) {
		b.Fatalf("the poll counter says %d, want at least %d", got, b.N)
	}
}

func pollCount(rm metricdata.ResourceMetrics) int64 {
	var n int64
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if s, ok := m.Data.(metricdata.Sum[int64]); ok && m.Name == "bulkexport.poll.requests" {
				for _, p := range s.DataPoints {
					n += p.Value
				}
			}
		}
	}
	return n
}

// BenchmarkPollServeHTTPMetrics measures the handler alone, without a
// transport, with and without an SDK MeterProvider: the difference is the
// whole cost of counting a poll (allocs/op included).
func BenchmarkPollServeHTTPMetrics(b *testing.B) {
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewManualReader()))
	defer func() { _ = mp.Shutdown(context.Background()) }()
	for _, c := range []struct {
		name string
		mp   metric.MeterProvider
	}{{"nometrics", nil}, {"metrics", mp}} {
		b.Run(c.name, func(b *testing.B) {
			h, id := newPollHandler(b, "https://fhir.example.org/fhir", c.mp)
			req := httptest.NewRequest(http.MethodGet, h.StatusURL(id), nil)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				w := httptest.NewRecorder()
				h.ServeHTTP(w, req)
				if w.Code != http.StatusAccepted {
					b.Fatalf("status %d", w.Code)
				}
			}
		})
	}
}
