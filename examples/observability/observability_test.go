package observability_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

const token = "tok-5c1e0b7d93a4-SeCrEt"

var t0 = time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)

// tracedSource is a host's Source that traces its own queries: their spans
// must nest under the library's span of the type.
type tracedSource struct {
	*bulkexporttest.Source
	tracer trace.Tracer
}

func (s tracedSource) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	ctx, span := s.tracer.Start(ctx, "host.query", trace.WithAttributes(attribute.String("host.type", typ)))
	defer span.End()
	return s.Source.Export(ctx, q, typ, w)
}

// knownSource holds 3 Patients and 5 Observations.
func knownSource(t *testing.T) *bulkexporttest.Source {
	t.Helper()
	src := bulkexporttest.NewSource()
	for i := range 3 {
		src.MustAdd(fmt.Sprintf(`{"resourceType":"Patient","id":"p%d","gender":"female"}`, i))
	}
	for i := range 5 {
		src.MustAdd(fmt.Sprintf(`{"resourceType":"Observation","id":"o%d","status":"final","subject":{"reference":"Patient/p%d"}}`, i, i%3))
	}
	return src
}

// fixture is a bulkexporttest.Server whose handler and worker report to an
// SDK MeterProvider (read through a ManualReader) and TracerProvider
// (spans kept in memory), with bearer-token authentication and a clock
// that only moves when told to.
type fixture struct {
	srv    *bulkexporttest.Server
	reader *sdkmetric.ManualReader
	mp     *sdkmetric.MeterProvider
	spans  *tracetest.InMemoryExporter
	tp     *sdktrace.TracerProvider
	clock  *bulkexporttest.Clock
	client *http.Client
}

func newFixture(t *testing.T, src *bulkexporttest.Source, edit func(*bulkexporttest.ServerOptions)) *fixture {
	t.Helper()
	f := &fixture{reader: sdkmetric.NewManualReader(), spans: tracetest.NewInMemoryExporter(), clock: bulkexporttest.NewClock(t0)}
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(f.reader))
	f.mp = mp
	f.tp = sdktrace.NewTracerProvider(sdktrace.WithSyncer(f.spans))
	t.Cleanup(func() {
		_ = mp.Shutdown(context.Background())
		_ = f.tp.Shutdown(context.Background())
	})
	auth := func(r *http.Request) (string, error) {
		if r.Header.Get("Authorization") != "Bearer "+token {
			return "", bulkexport.ErrUnauthorized
		}
		return "alice", nil
	}
	opts := &bulkexporttest.ServerOptions{
		Source: tracedSource{Source: src, tracer: f.tp.Tracer("host")},
		Clock:  f.clock,
		Handler: bulkexport.Options{Authenticate: auth, PollLimit: &bulkexport.PollLimit{Burst: 2, Rate: 1},
			MeterProvider: mp, TracerProvider: f.tp},
		Worker: bulkexport.WorkerOptions{MeterProvider: mp, TracerProvider: f.tp},
	}
	if edit != nil {
		edit(opts)
	}
	f.srv = bulkexporttest.NewServer(t, opts)
	f.client = f.srv.Client()
	return f
}

// do sends a request with the token (unless auth is false) and returns the
// status and body.
func (f *fixture) do(t *testing.T, method, url string, auth bool, header ...string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	require.NoError(t, err)
	req.Header.Set("Prefer", "respond-async")
	req.Header.Set("Accept", "application/fhir+json")
	if auth {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := f.client.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, body
}

func (f *fixture) kickoff(t *testing.T, path string) (statusURL, jobID string) {
	t.Helper()
	resp, body := f.do(t, http.MethodGet, f.srv.BaseURL+path, true)
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
	statusURL = resp.Header.Get("Content-Location")
	jobID, err := bulkexporttest.JobID(statusURL)
	require.NoError(t, err)
	return statusURL, jobID
}

// metrics collects every metric, by name.
func (f *fixture) metrics(t *testing.T) map[string]metricdata.Metrics {
	t.Helper()
	var rm metricdata.ResourceMetrics
	require.NoError(t, f.reader.Collect(context.Background(), &rm))
	out := map[string]metricdata.Metrics{}
	for _, sm := range rm.ScopeMetrics {
		for _, m := range sm.Metrics {
			if sm.Scope.Name == "github.com/bulkfhir/bulkexport" {
				out[m.Name] = m
			}
		}
	}
	return out
}

func enc(s attribute.Set) string { return s.Encoded(attribute.DefaultEncoder()) }

// sums returns the data points of an Int64 counter (or gauge) by encoded
// attribute set ("k=v,k=v", keys sorted).
func sums(t *testing.T, m metricdata.Metrics) map[string]int64 {
	t.Helper()
	out := map[string]int64{}
	switch d := m.Data.(type) {
	case metricdata.Sum[int64]:
		require.True(t, d.IsMonotonic, m.Name)
		for _, p := range d.DataPoints {
			out[enc(p.Attributes)] = p.Value
		}
	case metricdata.Gauge[int64]:
		for _, p := range d.DataPoints {
			out[enc(p.Attributes)] = p.Value
		}
	case nil:
	default:
		t.Fatalf("%s: unexpected data %T", m.Name, m.Data)
	}
	return out
}

func spansNamed(spans tracetest.SpanStubs, name string) []tracetest.SpanStub {
	var out []tracetest.SpanStub
	for _, s := range spans {
		if s.Name == name {
			out = append(out, s)
		}
	}
	return out
}

func attrOf(s tracetest.SpanStub, key string) attribute.Value {
	for _, kv := range s.Attributes {
		if string(kv.Key) == key {
			return kv.Value
		}
	}
	return attribute.Value{}
}

// TestMetricsAndSpans runs one known export (3 Patients, 5 Observations)
// with polls of every kind and downloads, and checks each instrument and
// span against what happened.
func TestMetricsAndSpans(t *testing.T) {
	t.Parallel()
	src := knownSource(t)
	pause := src.Pause("Patient", 1)
	f := newFixture(t, src, nil)
	polls := map[int]int64{}
	poll := func(url string, auth bool) (*http.Response, []byte) {
		resp, body := f.do(t, http.MethodGet, url, auth)
		polls[resp.StatusCode]++
		return resp, body
	}

	statusURL, jobID := f.kickoff(t, "/$export?_type=Patient,Observation")
	select {
	case <-pause.Reached():
	case <-time.After(10 * time.Second):
		t.Fatal("the export did not start")
	}
	m := f.metrics(t)
	require.Equal(t, map[string]int64{"bulkexport.job.state=queued": 0, "bulkexport.job.state=running": 1}, sums(t, m["bulkexport.jobs.active"]))
	require.Equal(t, map[string]int64{"": 0}, sums(t, m["bulkexport.queue.depth"]))

	// The poll limit (burst 2, and a clock that stands still) answers 429
	// from the third poll of the running job on.
	for _, want := range []int{202, 202, 429, 429} {
		resp, _ := poll(statusURL, true)
		require.Equal(t, want, resp.StatusCode)
	}
	resp, _ := poll(f.srv.BaseURL+"/$export-poll-status?_jobId="+bulkexport.NewJobID(), true)
	require.Equal(t, http.StatusNotFound, resp.StatusCode)
	resp, _ = poll(statusURL, false)
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)

	pause.Release()
	var manifest fhirbulk.Manifest
	for i := 0; ; i++ {
		require.Less(t, i, 2000, "the export did not finish")
		resp, body := poll(statusURL, true)
		if resp.StatusCode == http.StatusOK {
			require.NoError(t, json.Unmarshal(body, &manifest))
			break
		}
		require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
		time.Sleep(5 * time.Millisecond)
	}
	// DELETE is a cancel, not a poll: not counted.
	resp, _ = f.do(t, http.MethodDelete, statusURL, true)
	require.Equal(t, http.StatusNotFound, resp.StatusCode)

	// Downloads: every file plain (sendfile), one gzipped, one HEAD.
	counts := map[string]int64{}
	plain := map[string]int64{}
	var sent int64
	for _, file := range manifest.Output {
		resp, body := f.do(t, http.MethodGet, file.URL, true, "Accept-Encoding", "identity")
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.Empty(t, resp.Header.Get("Content-Encoding"))
		counts[file.Type] += *file.Count
		plain[file.Type] += int64(len(body))
		sent += int64(len(body))
	}
	resp, gz := f.do(t, http.MethodGet, manifest.Output[0].URL, true, "Accept-Encoding", "gzip")
	require.Equal(t, "gzip", resp.Header.Get("Content-Encoding"))
	sent += int64(len(gz))
	resp, _ = f.do(t, http.MethodHead, manifest.Output[0].URL, true)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	downloads := len(manifest.Output) + 2
	require.Equal(t, map[string]int64{"Patient": 3, "Observation": 5}, counts)

	// The worker records the end of the job right after the store has it.
	require.Eventually(t, func() bool {
		return len(spansNamed(f.spans.GetSpans(), "bulkexport.job")) == 1
	}, 10*time.Second, 5*time.Millisecond)

	m = f.metrics(t)
	require.Equal(t, map[string]int64{
		"bulkexport.job.level=system,bulkexport.job.state=queued":    1,
		"bulkexport.job.level=system,bulkexport.job.state=running":   1,
		"bulkexport.job.level=system,bulkexport.job.state=completed": 1,
	}, sums(t, m["bulkexport.job.transitions"]))
	require.Equal(t, map[string]int64{
		"bulkexport.file.kind=output,bulkexport.resource.type=Observation": counts["Observation"],
		"bulkexport.file.kind=output,bulkexport.resource.type=Patient":     counts["Patient"],
	}, sums(t, m["bulkexport.export.resources"]))
	require.Equal(t, map[string]int64{
		"bulkexport.file.kind=output,bulkexport.resource.type=Observation": plain["Observation"],
		"bulkexport.file.kind=output,bulkexport.resource.type=Patient":     plain["Patient"],
	}, sums(t, m["bulkexport.export.bytes"]))
	require.Equal(t, "By", m["bulkexport.export.bytes"].Unit)
	wantPolls := map[string]int64{}
	for code, n := range polls {
		wantPolls[fmt.Sprintf("http.response.status_code=%d", code)] = n
	}
	require.Equal(t, wantPolls, sums(t, m["bulkexport.poll.requests"]))
	require.Equal(t, map[string]int64{"": sent}, sums(t, m["bulkexport.download.bytes"]))
	require.Equal(t, map[string]int64{"bulkexport.job.state=queued": 0, "bulkexport.job.state=running": 0}, sums(t, m["bulkexport.jobs.active"]))
	require.Empty(t, sums(t, m["bulkexport.job.reclaims"]))

	hist, ok := m["bulkexport.job.duration"].Data.(metricdata.Histogram[float64])
	require.True(t, ok)
	require.Equal(t, "s", m["bulkexport.job.duration"].Unit)
	require.Len(t, hist.DataPoints, 1)
	require.Equal(t, "bulkexport.job.level=system,bulkexport.job.outcome=completed", enc(hist.DataPoints[0].Attributes))
	require.Equal(t, uint64(1), hist.DataPoints[0].Count)

	// Purge, once the job has expired.
	f.clock.Advance(48 * time.Hour)
	n, err := f.srv.Worker.Purge(context.Background())
	require.NoError(t, err)
	require.Equal(t, 1, n)
	m = f.metrics(t)
	require.Equal(t, map[string]int64{"bulkexport.job.level=system,bulkexport.job.state=completed": 1}, sums(t, m["bulkexport.purge.jobs"]))
	require.GreaterOrEqual(t, sums(t, m["bulkexport.purge.runs"])["bulkexport.purge.outcome=ok"], int64(2), "Run's first sweep and this one")

	// Spans.
	spans := f.spans.GetSpans()
	for _, s := range spans {
		for _, kv := range s.Attributes {
			require.NotContains(t, kv.Value.Emit(), token, "%s %s", s.Name, kv.Key)
		}
	}
	kick := spansNamed(spans, "bulkexport.kickoff")
	require.Len(t, kick, 1)
	require.Equal(t, jobID, attrOf(kick[0], "bulkexport.job.id").AsString())
	require.Equal(t, "alice", attrOf(kick[0], "bulkexport.client.id").AsString())
	require.Equal(t, "system", attrOf(kick[0], "bulkexport.job.level").AsString())
	require.Equal(t, int64(202), attrOf(kick[0], "http.response.status_code").AsInt64())

	job := spansNamed(spans, "bulkexport.job")[0]
	require.False(t, job.Parent.IsValid(), "the job span is a root")
	require.Equal(t, jobID, attrOf(job, "bulkexport.job.id").AsString())
	require.Equal(t, "completed", attrOf(job, "bulkexport.job.outcome").AsString())
	require.Equal(t, int64(1), attrOf(job, "bulkexport.job.attempt").AsInt64())
	require.Equal(t, codes.Unset, job.Status.Code)

	types := map[string]tracetest.SpanStub{}
	for _, s := range spansNamed(spans, "bulkexport.export.type") {
		require.Equal(t, job.SpanContext.SpanID(), s.Parent.SpanID(), "type spans are children of the job span")
		require.Equal(t, job.SpanContext.TraceID(), s.SpanContext.TraceID())
		typ := attrOf(s, "bulkexport.resource.type").AsString()
		types[typ] = s
		require.Equal(t, counts[typ], attrOf(s, "bulkexport.export.resources").AsInt64())
	}
	require.Len(t, types, 2)
	host := spansNamed(spans, "host.query")
	require.Len(t, host, 2)
	for _, s := range host {
		typ := attrOf(s, "host.type").AsString()
		require.Equal(t, types[typ].SpanContext.SpanID(), s.Parent.SpanID(), "the Source's span of %s nests under the type span", typ)
	}
	var committed []string
	for _, s := range spansNamed(spans, "bulkexport.file.commit") {
		typ := attrOf(s, "bulkexport.resource.type").AsString()
		require.Equal(t, types[typ].SpanContext.SpanID(), s.Parent.SpanID())
		committed = append(committed, attrOf(s, "bulkexport.file.name").AsString())
	}
	var files []string
	for _, file := range manifest.Output {
		files = append(files, file.URL[strings.LastIndex(file.URL, "/")+1:])
	}
	require.ElementsMatch(t, files, committed)

	dl := spansNamed(spans, "bulkexport.download")
	require.Len(t, dl, downloads)
	var dlBytes int64
	for _, s := range dl {
		require.Equal(t, jobID, attrOf(s, "bulkexport.job.id").AsString())
		require.Contains(t, files, attrOf(s, "bulkexport.file.name").AsString())
		require.Equal(t, int64(200), attrOf(s, "http.response.status_code").AsInt64())
		dlBytes += attrOf(s, "bulkexport.download.bytes").AsInt64()
	}
	require.Equal(t, sent, dlBytes)
}

// TestOutcomes checks the instruments of a cancelled and a failed job.
func TestOutcomes(t *testing.T) {
	t.Parallel()
	src := knownSource(t)
	pause := src.Pause("Patient", 1)
	src.FailOn("Observation", 2, errors.New("the database went away"))
	f := newFixture(t, src, nil)

	cancelURL, cancelID := f.kickoff(t, "/$export?_type=Patient")
	<-pause.Reached()
	resp, _ := f.do(t, http.MethodDelete, cancelURL, true)
	require.Equal(t, http.StatusAccepted, resp.StatusCode)

	failURL, failID := f.kickoff(t, "/$export?_type=Observation")
	require.Eventually(t, func() bool {
		resp, _ := f.do(t, http.MethodGet, failURL, true)
		return resp.StatusCode == http.StatusInternalServerError
	}, 10*time.Second, 5*time.Millisecond)

	jobSpans := func() map[string]tracetest.SpanStub {
		out := map[string]tracetest.SpanStub{}
		for _, s := range spansNamed(f.spans.GetSpans(), "bulkexport.job") {
			out[attrOf(s, "bulkexport.job.id").AsString()] = s
		}
		return out
	}
	require.Eventually(t, func() bool { return len(jobSpans()) == 2 }, 10*time.Second, 5*time.Millisecond)
	js := jobSpans()
	require.Equal(t, "cancelled", attrOf(js[cancelID], "bulkexport.job.outcome").AsString())
	require.Equal(t, codes.Unset, js[cancelID].Status.Code)
	require.Equal(t, "failed", attrOf(js[failID], "bulkexport.job.outcome").AsString())
	require.Equal(t, codes.Error, js[failID].Status.Code)
	for _, s := range spansNamed(f.spans.GetSpans(), "bulkexport.export.type") {
		if attrOf(s, "bulkexport.job.id").AsString() == failID {
			require.Equal(t, codes.Error, s.Status.Code)
			require.NotEmpty(t, s.Events, "the Source's error is recorded")
		}
	}

	m := f.metrics(t)
	require.Equal(t, map[string]int64{
		"bulkexport.job.level=system,bulkexport.job.state=queued":    2,
		"bulkexport.job.level=system,bulkexport.job.state=running":   2,
		"bulkexport.job.level=system,bulkexport.job.state=cancelled": 1,
		"bulkexport.job.level=system,bulkexport.job.state=failed":    1,
	}, sums(t, m["bulkexport.job.transitions"]))
	hist := m["bulkexport.job.duration"].Data.(metricdata.Histogram[float64])
	got := map[string]uint64{}
	for _, p := range hist.DataPoints {
		got[enc(p.Attributes)] = p.Count
	}
	require.Equal(t, map[string]uint64{
		"bulkexport.job.level=system,bulkexport.job.outcome=cancelled": 1,
		"bulkexport.job.level=system,bulkexport.job.outcome=failed":    1,
	}, got)
	// Both stopped before their first file was committed: nothing counts
	// as exported.
	require.Empty(t, sums(t, m["bulkexport.export.resources"]))
	require.Empty(t, sums(t, m["bulkexport.export.bytes"]))
}

// TestReclaim hands a job back by stopping its worker mid-export; another
// worker claims it again and finishes it.
func TestReclaim(t *testing.T) {
	t.Parallel()
	src := knownSource(t)
	pause := src.Pause("Patient", 1)
	store := bulkexport.NewMemoryStore()
	f := newFixture(t, src, func(o *bulkexporttest.ServerOptions) {
		o.Store = store
		o.NoWorker = true
	})
	statusURL, jobID := f.kickoff(t, "/Patient/$export?_type=Patient,Observation")
	run := func() (stop func()) {
		w, err := bulkexport.NewWorker(store, tracedSource{Source: src, tracer: f.tp.Tracer("host")}, f.srv.Storage, &bulkexport.WorkerOptions{
			Now: f.clock.Now, PollInterval: 5 * time.Millisecond, Heartbeat: 5 * time.Millisecond,
			MeterProvider: f.mp, TracerProvider: f.tp,
		})
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- w.Run(ctx) }()
		return func() { cancel(); require.NoError(t, <-done) }
	}
	stop := run()
	<-pause.Reached()
	stop()
	stop = run()
	defer stop()
	require.Eventually(t, func() bool {
		resp, _ := f.do(t, http.MethodGet, statusURL, true)
		return resp.StatusCode == http.StatusOK
	}, 10*time.Second, 5*time.Millisecond)
	require.Eventually(t, func() bool {
		return len(spansNamed(f.spans.GetSpans(), "bulkexport.job")) == 2
	}, 10*time.Second, 5*time.Millisecond)

	m := f.metrics(t)
	require.Equal(t, map[string]int64{
		"bulkexport.job.level=patient,bulkexport.job.state=queued":    2,
		"bulkexport.job.level=patient,bulkexport.job.state=running":   2,
		"bulkexport.job.level=patient,bulkexport.job.state=completed": 1,
	}, sums(t, m["bulkexport.job.transitions"]))
	require.Equal(t, map[string]int64{"bulkexport.job.level=patient": 1}, sums(t, m["bulkexport.job.reclaims"]))
	var outcomes []string
	for _, s := range spansNamed(f.spans.GetSpans(), "bulkexport.job") {
		require.Equal(t, jobID, attrOf(s, "bulkexport.job.id").AsString())
		outcomes = append(outcomes, attrOf(s, "bulkexport.job.outcome").AsString())
	}
	slices.Sort(outcomes)
	require.Equal(t, []string{"completed", "requeued"}, outcomes)
}

// TestHandlerClose: a Handler reports its poll counts through the
// MeterProvider until Close; after it, a collection no longer has them,
// and a second Close is harmless.
func TestHandlerClose(t *testing.T) {
	t.Parallel()
	reader := sdkmetric.NewManualReader()
	mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	defer func() { _ = mp.Shutdown(context.Background()) }()
	h, err := bulkexport.NewHandler(bulkexport.NewMemoryStore(), &bulkexport.Options{BaseURL: "http://x/fhir", MeterProvider: mp})
	require.NoError(t, err)
	poll := func() {
		w := httptest.NewRecorder()
		h.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "http://x/fhir/$export-poll-status?_jobId=0123456789abcdef0123456789abcdef", nil))
		require.Equal(t, http.StatusNotFound, w.Code)
	}
	pollRequests := func() int64 {
		var rm metricdata.ResourceMetrics
		require.NoError(t, reader.Collect(context.Background(), &rm))
		var n int64
		for _, sm := range rm.ScopeMetrics {
			for _, m := range sm.Metrics {
				if m.Name == "bulkexport.poll.requests" {
					for _, p := range m.Data.(metricdata.Sum[int64]).DataPoints {
						n += p.Value
					}
				}
			}
		}
		return n
	}
	poll()
	poll()
	require.EqualValues(t, 2, pollRequests())
	require.NoError(t, h.Close())
	poll()
	require.Zero(t, pollRequests(), "a closed handler still reports its polls")
	require.NoError(t, h.Close())

	// Without a MeterProvider there is nothing to release.
	plain, err := bulkexport.NewHandler(bulkexport.NewMemoryStore(), &bulkexport.Options{BaseURL: "http://x/fhir"})
	require.NoError(t, err)
	require.NoError(t, plain.Close())
}
