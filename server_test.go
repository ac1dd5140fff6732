package bulkexport_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
)

// newTestServer wires a Server over a MemoryStore, a DirStorage and src
// for baseURL.
func newTestServer(t *testing.T, baseURL string, src bulkexport.Source) *bulkexport.Server {
	t.Helper()
	storage, err := bulkexport.NewDirStorage(t.TempDir())
	require.NoError(t, err)
	s, err := bulkexport.NewServer(bulkexport.Config{
		Store: bulkexport.NewMemoryStore(), Source: src, Storage: storage,
		Options: bulkexport.Options{BaseURL: baseURL},
		Worker:  bulkexport.WorkerOptions{PollInterval: 10 * time.Millisecond, Heartbeat: 10 * time.Millisecond},
	})
	require.NoError(t, err)
	t.Cleanup(func() { require.NoError(t, s.Close()) })
	return s
}

// runServer runs s's Worker for the rest of the test.
func runServer(t *testing.T, s *bulkexport.Server) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
}

// hostReads is a host's own FHIR API: a read and a search at the base the
// bulk export routes share.
func hostReads(mux *http.ServeMux) {
	mux.HandleFunc("GET /fhir/Patient/{id}", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "host read Patient/"+r.PathValue("id"))
	})
	mux.HandleFunc("GET /fhir/{type}", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "host search "+r.PathValue("type"))
	})
	mux.HandleFunc("GET /fhir/{type}/{id}/{op}", func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "host operation "+r.PathValue("op"))
	})
}

// TestServerBesideHostRoutes: on a host's http.ServeMux that serves FHIR
// reads under the same base, Register's method-qualified routes take every
// bulk export request (Patient and Group kick-offs included) and leave the
// host its reads. The test server is made unstarted so that the base URL
// is known before the Server is built.
func TestServerBesideHostRoutes(t *testing.T) {
	t.Parallel()
	ts := httptest.NewUnstartedServer(nil)
	base := "http://" + ts.Listener.Addr().String() + "/fhir"
	src := bulkexporttest.NewSource().MustAdd(
		`{"resourceType":"Patient","id":"p1"}`, `{"resourceType":"Patient","id":"p2"}`,
		`{"resourceType":"Group","id":"g1","member":[{"entity":{"reference":"Patient/p1"}}]}`)
	s := newTestServer(t, base, src)
	mux := http.NewServeMux()
	hostReads(mux)
	require.NoError(t, s.Register(mux))
	ts.Config.Handler = mux
	ts.Start()
	defer ts.Close()
	runServer(t, s)

	e := &bulkexporttest.Exporter{BaseURL: base}
	for _, path := range []string{"/$export?_type=Patient", "/Patient/$export?_type=Patient", "/Group/g1/$export?_type=Patient"} {
		res := e.Export(t, path)
		require.NotEmpty(t, res.Output["Patient"], path)
	}
	for path, want := range map[string]string{
		"/Patient/p1":             "host read Patient/p1",
		"/Observation":            "host search Observation",
		"/Patient/p1/$everything": "host operation $everything",
	} {
		resp, err := http.Get(base + path)
		require.NoError(t, err)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		require.Equal(t, want, string(body), path)
	}

	// Registering twice is a conflict, reported as an error naming the
	// route rather than the mux's panic.
	err := s.Register(mux)
	require.ErrorContains(t, err, "GET /fhir/$export")
}

// TestRoutes: the routes cover every endpoint under the base path, and a
// catch-all mount shows why they are needed: beside the host's
// "GET /fhir/Patient/{id}", "/fhir/" loses the Patient kick-off.
func TestRoutes(t *testing.T) {
	t.Parallel()
	s := newTestServer(t, "https://ehr.example/api/fhir%20r4/", bulkexporttest.NewSource())
	var patterns []string
	for _, r := range s.Routes() {
		patterns = append(patterns, r.Pattern())
		require.Equal(t, "/api/fhir r4"+r.Endpoint, r.Path)
	}
	require.Equal(t, []string{
		"GET /api/fhir r4/$export", "POST /api/fhir r4/$export",
		"GET /api/fhir r4/Patient/$export", "POST /api/fhir r4/Patient/$export",
		"GET /api/fhir r4/Group/{id}/$export", "POST /api/fhir r4/Group/{id}/$export",
		"GET /api/fhir r4/$export-poll-status", "POST /api/fhir r4/$export-poll-status", "DELETE /api/fhir r4/$export-poll-status",
		"GET /api/fhir r4/$export-poll-status/{id}", "POST /api/fhir r4/$export-poll-status/{id}", "DELETE /api/fhir r4/$export-poll-status/{id}",
		"GET /api/fhir r4/bulkfiles/{job}/{file}",
	}, patterns)

	catchAll := http.NewServeMux()
	hostReads(catchAll)
	catchAll.Handle("/fhir/", newTestServer(t, "http://127.0.0.1/fhir", bulkexporttest.NewSource()))
	rec := httptest.NewRecorder()
	catchAll.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/fhir/Patient/$export", nil))
	require.Equal(t, "host read Patient/$export", rec.Body.String())

	routed := http.NewServeMux()
	hostReads(routed)
	require.NoError(t, newTestServer(t, "http://127.0.0.1/fhir", bulkexporttest.NewSource()).Register(routed))
	rec = httptest.NewRecorder()
	routed.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/fhir/Patient/$export", nil))
	require.Equal(t, http.StatusBadRequest, rec.Code, "the kick-off reaches the handler (no Prefer header)")
	require.Contains(t, rec.Body.String(), "respond-async")
}

// TestServerConfig: a Config missing a collaborator, or setting what the
// Server wires itself, is refused with an error naming the field; so are
// invalid options of either half.
func TestServerConfig(t *testing.T) {
	t.Parallel()
	store := bulkexport.NewMemoryStore()
	src := bulkexporttest.NewSource()
	storage, err := bulkexport.NewDirStorage(t.TempDir())
	require.NoError(t, err)
	ok := bulkexport.Config{Store: store, Source: src, Storage: storage, Options: bulkexport.Options{BaseURL: "https://ehr.example/fhir"}}
	for _, c := range []struct {
		field string
		edit  func(*bulkexport.Config)
	}{
		{"Config.Store", func(c *bulkexport.Config) { c.Store = nil }},
		{"Config.Source", func(c *bulkexport.Config) { c.Source = nil }},
		{"Config.Storage", func(c *bulkexport.Config) { c.Storage = nil }},
		{"Config.Options.Types", func(c *bulkexport.Config) { c.Options.Types = src }},
		{"Config.Options.Storage", func(c *bulkexport.Config) { c.Options.Storage = storage }},
		{"Config.Options.OnQueued", func(c *bulkexport.Config) { c.Options.OnQueued = func(string) {} }},
		{"Config.ShutdownTimeout", func(c *bulkexport.Config) { c.ShutdownTimeout = -time.Second }},
		{"Options.BaseURL", func(c *bulkexport.Config) { c.Options.BaseURL = "" }},
		{"Options.DeletePolicy", func(c *bulkexport.Config) { c.Options.DeletePolicy = 3 }},
		{"WorkerOptions.Heartbeat", func(c *bulkexport.Config) { c.Worker.Lease = time.Second; c.Worker.Heartbeat = 2 * time.Second }},
	} {
		cfg := ok
		c.edit(&cfg)
		_, err := bulkexport.NewServer(cfg)
		require.ErrorContains(t, err, c.field+":", c.field)
	}
	s, err := bulkexport.NewServer(ok)
	require.NoError(t, err)
	require.NoError(t, s.Close())
	require.NoError(t, s.Close(), "Close twice")
}

// TestServerServe: Serve answers requests and runs exports until its
// context ends, then shuts down and returns nil; a job it was running
// goes back to the queue.
func TestServerServe(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	base := "http://" + ln.Addr().String() + "/fhir"
	src := bulkexporttest.NewSource().MustAdd(`{"resourceType":"Patient","id":"p1"}`, `{"resourceType":"Patient","id":"p2"}`)
	pause := src.Pause("Patient", 1)
	storage, err := bulkexport.NewDirStorage(t.TempDir())
	require.NoError(t, err)
	store := bulkexport.NewMemoryStore()
	s, err := bulkexport.NewServer(bulkexport.Config{Store: store, Source: src, Storage: storage,
		Options: bulkexport.Options{BaseURL: base},
		Worker:  bulkexport.WorkerOptions{PollInterval: 10 * time.Millisecond, Heartbeat: 10 * time.Millisecond}})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- s.Serve(ctx, &http.Server{ReadHeaderTimeout: time.Second}, ln) }()

	e := &bulkexporttest.Exporter{BaseURL: base}
	statusURL := e.Kickoff(t, "/$export?_type=Patient")
	<-pause.Reached()
	cancel()
	require.NoError(t, <-served)
	pause.Release()

	id := statusURL[strings.LastIndex(statusURL, "=")+1:]
	job, err := store.Get(context.Background(), id)
	require.NoError(t, err)
	require.Equal(t, bulkexport.StateQueued, job.State, "the interrupted job went back to the queue")
	_, err = http.Get(base + "/$export-poll-status?_jobId=" + id)
	require.Error(t, err, "the listener is closed")
}
