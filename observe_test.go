package bulkexport_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
)

// logSink collects JSON log lines from several goroutines.
type logSink struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.Write(p)
}

// records parses every line logged so far.
func (s *logSink) records(t *testing.T) (raw string, recs []map[string]any) {
	t.Helper()
	s.mu.Lock()
	raw = s.buf.String()
	s.mu.Unlock()
	sc := bufio.NewScanner(strings.NewReader(raw))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var m map[string]any
		require.NoError(t, json.Unmarshal(sc.Bytes(), &m), "%s", sc.Bytes())
		recs = append(recs, m)
	}
	require.NoError(t, sc.Err())
	return raw, recs
}

// TestLogs runs exports with bearer-token authentication, a cancel, a
// download, rejected requests and a purge through a debug-level JSON
// logger, and checks that no line carries the token, that every line about
// a job names the job, its client and its export level, and that each
// state transition is logged once at Info, and nothing else.
func TestLogs(t *testing.T) {
	t.Parallel()
	const token = "tok-7f3a9c2e5b1d-SeCrEt"
	sink := &logSink{}
	logger := slog.New(slog.NewJSONHandler(sink, &slog.HandlerOptions{Level: slog.LevelDebug}))
	clock := bulkexporttest.NewClock(t0)
	src := clinicalSource(t, 4)
	pause := src.Pause("Observation", 1)
	auth := func(r *http.Request) (string, error) {
		switch h := r.Header.Get("Authorization"); {
		case h == "Bearer "+token+"-boom":
			// A broken introspection that quotes what it was given: a 500,
			// whose error is logged.
			return "", fmt.Errorf("introspection of %q failed", h)
		case h != "Bearer "+token:
			// An error that quotes the header: it must not reach a log.
			return "", fmt.Errorf("bad credentials %q: %w", r.Header.Get("Authorization"), bulkexport.ErrUnauthorized)
		}
		return "alice", nil
	}
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source:  src,
		Clock:   clock,
		Handler: bulkexport.Options{Authenticate: auth, Logger: logger},
		Worker:  bulkexport.WorkerOptions{Logger: logger},
	})
	srv.Header.Set("Authorization", "Bearer "+token)

	// A: cancelled while it runs.
	statusA := srv.Kickoff(t, "/$export?_type=Observation")
	select {
	case <-pause.Reached():
	case <-time.After(10 * time.Second):
		t.Fatal("the export did not start")
	}
	srv.Cancel(t, statusA)
	jobA, err := bulkexporttest.JobID(statusA)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		_, recs := sink.records(t)
		for _, r := range recs {
			if r["msg"] == "bulkexport: job stopped after cancel" && r["job"] == jobA {
				return true
			}
		}
		return false
	}, 10*time.Second, 10*time.Millisecond)

	// B: completes, and is downloaded (Collect downloads every file).
	res := srv.Export(t, "/$export?_type=Patient,Observation")
	require.NotEmpty(t, res.Output["Patient"])
	jobB, err := bulkexporttest.JobID(res.StatusURL)
	require.NoError(t, err)
	for range 5 {
		resp, _ := srv.Status(t, res.StatusURL)
		require.Equal(t, http.StatusOK, resp.StatusCode)
	}

	// Rejected: a wrong token that contains the right one, and the token
	// in a query string.
	wrong := &bulkexporttest.Exporter{BaseURL: srv.BaseURL, HTTPClient: srv.Client(),
		Header: http.Header{"Authorization": {"Bearer " + token + "-not"}}}
	for _, u := range []string{res.StatusURL, res.Manifest.Output[0].URL, srv.BaseURL + "/$export"} {
		resp, _ := wrong.Send(t, http.MethodGet, u, nil)
		require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	}
	resp, _ := srv.Send(t, http.MethodGet, res.StatusURL+"&access_token="+token, nil)
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	boom := &bulkexporttest.Exporter{BaseURL: srv.BaseURL, HTTPClient: srv.Client(),
		Header: http.Header{"Authorization": {"Bearer " + token + "-boom"}}}
	resp, _ = boom.Send(t, http.MethodGet, res.StatusURL, nil)
	require.Equal(t, http.StatusInternalServerError, resp.StatusCode)

	// Both expire and are purged.
	clock.Advance(48 * time.Hour)
	n, err := srv.Worker.Purge(context.Background())
	require.NoError(t, err)
	require.Equal(t, 2, n)

	raw, recs := sink.records(t)
	require.NotContains(t, raw, token)
	require.NotContains(t, strings.ToLower(raw), "bearer")
	require.NotContains(t, strings.ToLower(raw), "authorization")
	require.Contains(t, raw, `introspection of \"[REDACTED]\" failed`, "the 500 is logged, redacted")

	info := map[string][]string{} // job → Info messages
	for _, r := range recs {
		level, _ := r["level"].(string)
		require.Contains(t, []string{"DEBUG", "INFO", "WARN", "ERROR"}, level, "the log level is not shadowed: %v", r)
		id, ok := r["job"].(string)
		if !ok {
			require.NotEqual(t, "INFO", level, "an Info line about no job: %v", r)
			continue
		}
		require.Equal(t, "alice", r["client"], "%v", r)
		require.Equal(t, "system", r["export_level"], "%v", r)
		if level != "DEBUG" {
			info[id] = append(info[id], r["msg"].(string))
		}
	}
	require.Equal(t, map[string][]string{
		jobA: {"bulkexport: job queued", "bulkexport: job running", "bulkexport: job cancelled", "bulkexport: job purged"},
		jobB: {"bulkexport: job queued", "bulkexport: job running", "bulkexport: job completed", "bulkexport: job purged"},
	}, info)
}

// TestLogsHandBack checks the transitions of a job that a stopping
// worker hands back and another finishes.
func TestLogsHandBack(t *testing.T) {
	t.Parallel()
	sink := &logSink{}
	logger := slog.New(slog.NewJSONHandler(sink, &slog.HandlerOptions{Level: slog.LevelInfo}))
	src := clinicalSource(t, 3)
	pause := src.Pause("Patient", 1)
	store := bulkexport.NewMemoryStore()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source: src, Store: store, NoWorker: true,
		Handler: bulkexport.Options{Logger: logger},
	})
	statusURL := srv.Kickoff(t, "/Patient/$export?_type=Patient")
	runWorker := func() (stop func()) {
		w, err := bulkexport.NewWorker(store, src, srv.Storage, &bulkexport.WorkerOptions{
			Logger: logger, PollInterval: 10 * time.Millisecond, Heartbeat: 10 * time.Millisecond})
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- w.Run(ctx) }()
		return func() {
			cancel()
			require.NoError(t, <-done)
		}
	}
	stop := runWorker()
	<-pause.Reached()
	stop()
	stop = runWorker()
	t.Cleanup(stop)
	code, _ := srv.Wait(t, statusURL)
	require.Equal(t, http.StatusOK, code)

	_, recs := sink.records(t)
	var msgs []string
	for _, r := range recs {
		require.Equal(t, "patient", r["export_level"], "%v", r)
		msgs = append(msgs, r["msg"].(string))
	}
	require.Equal(t, []string{"bulkexport: job queued", "bulkexport: job running", "bulkexport: job handed back on shutdown",
		"bulkexport: job running", "bulkexport: job completed"}, msgs)
}
