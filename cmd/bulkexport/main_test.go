package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/client"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// fast keeps every wait in the millisecond range.
var fast = []string{"--min-poll", "1ms", "--max-poll", "5ms", "--retry-wait", "1ms"}

func source() *bulkexporttest.Source {
	src := bulkexporttest.NewSource()
	for i := 1; i <= 5; i++ {
		src.MustAdd(fmt.Sprintf(`{"resourceType":"Patient","id":"p%d","meta":{"lastUpdated":"2025-0%d-01T00:00:00Z"}}`, i, i))
		src.MustAdd(fmt.Sprintf(`{"resourceType":"Observation","id":"o%d","subject":{"reference":"Patient/p%d"}}`, i, i))
	}
	src.MustAdd(`{"resourceType":"Practitioner","id":"dr"}`)
	src.AddGroup("g1", "p1", "p2")
	return src
}

func newServer(t *testing.T, o *bulkexporttest.ServerOptions) *bulkexporttest.Server {
	t.Helper()
	if o.Source == nil {
		o.Source = source()
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	o.Handler.Logger, o.Worker.Logger = quiet, quiet
	return bulkexporttest.NewServer(t, o)
}

type result struct {
	code           int
	stdout, stderr string
}

func runCLI(ctx context.Context, args ...string) result {
	var stdout, stderr bytes.Buffer
	code := runContext(ctx, args, &stdout, &stderr)
	return result{code, stdout.String(), stderr.String()}
}

func cli(args ...string) result {
	var stdout, stderr bytes.Buffer
	code := run(args, &stdout, &stderr)
	return result{code, stdout.String(), stderr.String()}
}

func withFast(args ...string) []string { return append(args, fast...) }

// readDir returns the ids per type of the NDJSON files in dir, and the
// manifest.
func readDir(t *testing.T, dir string) (map[string][]string, *fhirbulk.Manifest) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	require.NoError(t, err)
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(b, &m))
	ids := map[string][]string{}
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	for _, e := range entries {
		if !strings.HasSuffix(e.Name(), ".ndjson") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		require.NoError(t, err)
		for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			var r struct{ ResourceType, ID string }
			require.NoError(t, json.Unmarshal([]byte(line), &r))
			ids[r.ResourceType] = append(ids[r.ResourceType], r.ID)
		}
	}
	return ids, &m
}

func TestExport(t *testing.T) {
	t.Parallel()
	srv := newServer(t, &bulkexporttest.ServerOptions{})

	t.Run("system", func(t *testing.T) {
		t.Parallel()
		dir := filepath.Join(t.TempDir(), "out")
		r := cli(withFast("export", srv.BaseURL, "--out", dir)...)
		require.Equal(t, exitOK, r.code, r.stderr)
		ids, m := readDir(t, dir)
		require.Len(t, ids["Patient"], 5)
		require.Len(t, ids["Observation"], 5)
		require.Equal(t, []string{"dr"}, ids["Practitioner"])
		require.Len(t, m.Output, 3)
		require.Equal(t, srv.BaseURL+"/$export", m.Request)
		require.Regexp(t, `(?m)^Patient +5 +\d+ +Patient\.000001\.c\d+\.ndjson$`, r.stdout)
		require.Regexp(t, `(?m)^TOTAL +11 +\d+ +3 files$`, r.stdout)
		require.Contains(t, r.stdout, "kick-off: accepted, status URL "+srv.BaseURL+"/$export-poll-status?_jobId=")
		require.Contains(t, r.stdout, "manifest: "+filepath.Join(dir, "manifest.json"))
		require.NotContains(t, r.stdout, "\r", "no progress bar without a terminal")
		require.Empty(t, r.stderr)
	})
	t.Run("group, flags after the URL", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		r := cli(withFast("export", srv.BaseURL, "--group", "g1", "-type", "Patient", "--type", "Observation",
			"--since", "2025-01-15T00:00:00Z", "--out", dir, "--parallel", "1")...)
		require.Equal(t, exitOK, r.code, r.stderr)
		ids, m := readDir(t, dir)
		require.Equal(t, map[string][]string{"Patient": {"p2"}, "Observation": {"o1", "o2"}}, ids)
		require.Equal(t, srv.BaseURL+"/Group/g1/$export?_since=2025-01-15T00%3A00%3A00Z&_type=Patient%2CObservation", m.Request)
	})
	t.Run("patient POST", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		r := cli(withFast("export", "--level", "patient", "--patient", "p3,p4", "--type-filter", "Patient?_id=x", "--lenient",
			"--type", "Patient", "--out", dir, srv.BaseURL)...)
		require.Equal(t, exitOK, r.code, r.stderr)
		require.Contains(t, r.stdout, "kick-off: POST "+srv.BaseURL+"/Patient/$export")
		require.Contains(t, r.stderr, "warning: not-supported")
		ids, m := readDir(t, dir)
		require.Equal(t, []string{"p3", "p4"}, ids["Patient"])
		require.Len(t, m.Error, 1, "the ignored _typeFilter is reported")
		require.Regexp(t, `(?m)^OperationOutcome \(error\) +1 `, r.stdout)
	})
}

func TestUsage(t *testing.T) {
	t.Parallel()
	for _, args := range [][]string{
		{},
		{"frobnicate"},
		{"export"},
		{"export", "http://a/fhir", "http://b/fhir"},
		{"export", "http://a/fhir", "--since", "yesterday"},
		{"export", "http://a/fhir", "--since", "2026-01-02T00:00:00Z", "--until", "2026-01-01T00:00:00Z"},
		{"export", "http://a/fhir", "--level", "world"},
		{"export", "http://a/fhir", "--level", "group"},
		{"export", "http://a/fhir", "--level", "patient", "--group", "g"},
		{"export", "http://a/fhir", "--patient", "p1"},
		{"export", "http://a/fhir", "--parallel", "0"},
		{"export", "http://a/fhir", "--min-poll", "0s"},
		{"export", "http://a/fhir", "--retries", "-1"},
		{"export", "http://a/fhir", "--no-such-flag"},
		{"export", "ftp://a/fhir"},
		{"export", "--resume", "http://a/s", "--type", "Patient"},
		{"export", "--resume", "http://a/s", "http://a/fhir", "x"},
		{"status"},
		{"status", "a", "b"},
		{"cancel"},
	} {
		r := cli(args...)
		require.Equal(t, exitUsage, r.code, "%q: %s", args, r.stderr)
		require.Contains(t, r.stderr, "Usage", "%q", args)
		require.Empty(t, r.stdout, "%q", args)
	}
	r := cli("help")
	require.Equal(t, exitOK, r.code)
	require.Contains(t, r.stdout, "Exit codes:")
	require.Contains(t, r.stdout, "3  network failure")
	require.Contains(t, r.stdout, "6  status: the export is still in progress")
	require.Contains(t, r.stdout, "7  status: the export was cancelled")
	require.Contains(t, r.stdout, "8  status: the export has expired")
	for _, cmd := range []string{"export", "status", "cancel"} {
		r := cli(cmd, "-h")
		require.Equal(t, exitOK, r.code)
		require.Contains(t, r.stderr, "Usage: bulkexport "+cmd)
		require.Contains(t, r.stderr, "Exit codes:")
	}
	r = cli("status", "-h")
	require.Contains(t, r.stderr, "6 still in progress, 7 cancelled, 8 expired or unknown")
	r = cli("cancel", "-h")
	require.Contains(t, r.stderr, "0 cancelled (or already cancelled)")
}

func TestExportFailures(t *testing.T) {
	t.Parallel()
	srv := newServer(t, &bulkexporttest.ServerOptions{})

	// Refused kick-off: 1, with the OperationOutcome's diagnostics.
	r := cli(withFast("export", srv.BaseURL, "--type", "Nope", "--out", t.TempDir())...)
	require.Equal(t, exitFailed, r.code)
	require.Contains(t, r.stderr, "400 Bad Request: error not-supported: _type: resource type Nope is not exported")

	// Unknown group: 1.
	r = cli(withFast("export", srv.BaseURL, "--group", "nope", "--out", t.TempDir())...)
	require.Equal(t, exitFailed, r.code)
	require.Contains(t, r.stderr, "404 Not Found")

	// A failed job: 1.
	src := source()
	src.OnResource = func(context.Context, string, int) error { return errors.New("boom") }
	failing := newServer(t, &bulkexporttest.ServerOptions{Source: src})
	r = cli(withFast("export", failing.BaseURL, "--out", t.TempDir())...)
	require.Equal(t, exitFailed, r.code, r.stderr)
	require.Contains(t, r.stderr, "status ")

	// Nobody listening: 3.
	closed := httptest.NewServer(http.NotFoundHandler())
	closed.Close()
	r = cli(withFast("export", closed.URL+"/fhir", "--retries", "1", "--out", t.TempDir())...)
	require.Equal(t, exitNetwork, r.code, r.stderr)
	require.Contains(t, r.stderr, "connect")
	r = cli(withFast("status", closed.URL+"/status", "--retries", "0")...)
	require.Equal(t, exitNetwork, r.code)
	require.Empty(t, r.stdout)

	// The server stays unavailable: 3.
	busy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/fhir+json")
		w.WriteHeader(http.StatusServiceUnavailable)
		_ = json.NewEncoder(w).Encode(fhirbulk.NewOutcome(fhirbulk.SeverityError, fhirbulk.IssueTransient, "down for maintenance"))
	}))
	defer busy.Close()
	r = cli(withFast("export", busy.URL, "--retries", "2", "--out", t.TempDir())...)
	require.Equal(t, exitNetwork, r.code, r.stderr)
	require.Contains(t, r.stderr, "down for maintenance")

	// --out cannot be written: 5.
	file := filepath.Join(t.TempDir(), "file")
	require.NoError(t, os.WriteFile(file, nil, 0o644))
	r = cli(withFast("export", srv.BaseURL, "--out", filepath.Join(file, "sub"))...)
	require.Equal(t, exitLocal, r.code, r.stderr)

	// A file that does not match its count: 1, and the resume hint.
	lying := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasSuffix(r.URL.Path, "/$export"):
			w.Header().Set("Content-Location", "http://"+r.Host+"/status")
			w.WriteHeader(http.StatusAccepted)
		case r.URL.Path == "/status":
			n := int64(3)
			_ = json.NewEncoder(w).Encode(fhirbulk.Manifest{Output: []fhirbulk.ManifestFile{{Type: "Patient", URL: "http://" + r.Host + "/Patient.ndjson", Count: &n}}})
		default:
			_, _ = io.WriteString(w, `{"resourceType":"Patient","id":"1"}`+"\n")
		}
	}))
	defer lying.Close()
	r = cli(withFast("export", lying.URL, "--out", t.TempDir())...)
	require.Equal(t, exitFailed, r.code, r.stderr)
	require.Contains(t, r.stderr, "1 resources, the manifest says 3")
	require.Contains(t, r.stderr, "--resume 'http://"+strings.TrimPrefix(lying.URL, "http://")+"/status'")
}

func TestStatus(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	failingSource := func() *bulkexporttest.Source {
		src := source()
		src.OnResource = func(context.Context, string, int) error { return errors.New("boom") }
		return src
	}
	for _, tc := range []struct {
		name string
		// setup returns the status URL of a job in the state.
		setup    func(t *testing.T) string
		code     int
		stderr   string // the whole of stderr, or
		contains []string
		manifest bool // stdout is the manifest, else empty
	}{{
		name: "running",
		setup: func(t *testing.T) string {
			return newServer(t, &bulkexporttest.ServerOptions{NoWorker: true}).Kickoff(t, "/$export")
		},
		code:   exitRunning,
		stderr: "in progress: queued (poll again in 1s)\n",
	}, {
		name: "completed",
		setup: func(t *testing.T) string {
			srv := newServer(t, &bulkexporttest.ServerOptions{Clock: bulkexporttest.NewClock(t0)})
			u := srv.Kickoff(t, "/$export")
			code, _ := srv.Wait(t, u)
			require.Equal(t, http.StatusOK, code)
			return u
		},
		code:     exitOK,
		stderr:   "completed: 3 files, 11 resources; the files expire at 2026-01-03T03:04:05Z\n",
		manifest: true,
	}, {
		name: "failed",
		setup: func(t *testing.T) string {
			srv := newServer(t, &bulkexporttest.ServerOptions{Source: failingSource()})
			u := srv.Kickoff(t, "/$export?_type=Patient")
			code, _ := srv.Wait(t, u)
			require.Equal(t, http.StatusInternalServerError, code)
			return u
		},
		code:   exitFailed,
		stderr: "failed: the export of Patient failed (500 Internal Server Error)\n",
	}, {
		name: "cancelled",
		setup: func(t *testing.T) string {
			srv := newServer(t, &bulkexporttest.ServerOptions{NoWorker: true})
			u := srv.Kickoff(t, "/$export")
			srv.Cancel(t, u)
			return u
		},
		code:   exitCancelled,
		stderr: "cancelled: the export job was cancelled\n",
	}, {
		name: "expired",
		setup: func(t *testing.T) string {
			clock := bulkexporttest.NewClock(t0)
			srv := newServer(t, &bulkexporttest.ServerOptions{Clock: clock})
			u := srv.Kickoff(t, "/$export?_type=Patient")
			code, _ := srv.Wait(t, u)
			require.Equal(t, http.StatusOK, code)
			clock.Advance(25 * time.Hour) // past the default retention of a day
			return u
		},
		code:   exitGone,
		stderr: "expired or unknown: the export job has expired and its files were removed (404 Not Found)\n",
	}, {
		name: "unknown",
		setup: func(t *testing.T) string {
			return newServer(t, &bulkexporttest.ServerOptions{NoWorker: true}).BaseURL + "/$export-poll-status?_jobId=0123456789abcdef"
		},
		code:   exitGone,
		stderr: "expired or unknown: no such export job (404 Not Found)\n",
	}, {
		name: "no answer",
		setup: func(t *testing.T) string {
			closed := httptest.NewServer(http.NotFoundHandler())
			closed.Close()
			return closed.URL + "/status"
		},
		code:     exitNetwork,
		contains: []string{"bulkexport: the server could not be reached at ", "connect"},
	}, {
		name: "unavailable",
		setup: func(t *testing.T) string {
			busy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/fhir+json")
				w.WriteHeader(http.StatusServiceUnavailable)
				_ = json.NewEncoder(w).Encode(fhirbulk.NewOutcome(fhirbulk.SeverityError, fhirbulk.IssueTransient, "down for maintenance"))
			}))
			t.Cleanup(busy.Close)
			return busy.URL + "/status"
		},
		code:   exitNetwork,
		stderr: "bulkexport: the server stayed unavailable through the retries: down for maintenance (503 Service Unavailable); try again later\n",
	}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := cli(withFast("status", tc.setup(t), "--retries", "1")...)
			require.Equal(t, tc.code, r.code, r.stderr)
			if tc.stderr != "" {
				require.Equal(t, tc.stderr, r.stderr)
			}
			for _, c := range tc.contains {
				require.Contains(t, r.stderr, c)
			}
			require.NotRegexp(t, `error (deleted|not-found|transient)|fatal processing`, r.stderr, "issue codes are put in words")
			if !tc.manifest {
				require.Empty(t, r.stdout)
				return
			}
			require.True(t, strings.HasPrefix(r.stdout, "{\n  \"transactionTime\""), r.stdout)
			var m fhirbulk.Manifest
			require.NoError(t, json.Unmarshal([]byte(r.stdout), &m))
			require.Len(t, m.Output, 3)
		})
	}
}

func TestStateLines(t *testing.T) {
	t.Parallel()
	n := func(v int64) *int64 { return &v }
	file := func(count *int64) fhirbulk.ManifestFile { return fhirbulk.ManifestFile{URL: "u", Count: count} }
	for _, tc := range []struct {
		st   client.Status
		want string
	}{
		{client.Status{Manifest: &fhirbulk.Manifest{}}, "completed: 0 files"},
		{client.Status{Manifest: &fhirbulk.Manifest{Output: []fhirbulk.ManifestFile{file(nil), file(nil)}}}, "completed: 2 files"},
		{client.Status{Manifest: &fhirbulk.Manifest{Output: []fhirbulk.ManifestFile{file(n(1))}}}, "completed: 1 file, 1 resource"},
		{client.Status{Manifest: &fhirbulk.Manifest{Output: []fhirbulk.ManifestFile{file(n(4)), file(nil)}}},
			"completed: 2 files, at least 4 resources (1 of 2 output files give a count)"},
		{client.Status{Manifest: &fhirbulk.Manifest{Output: []fhirbulk.ManifestFile{file(n(4)), file(n(3))},
			Deleted: []fhirbulk.ManifestFile{file(n(9))}, Error: []fhirbulk.ManifestFile{file(n(1))}},
			Expires: time.Date(2026, 3, 4, 5, 6, 7, 0, time.FixedZone("x", 3600))},
			"completed: 4 files (2 output, 1 of deleted resources, 1 of errors), 7 resources; the files expire at 2026-03-04T04:06:07Z"},
	} {
		require.Equal(t, tc.want, completedLine(&tc.st))
	}
	require.Equal(t, "in progress: 42% complete: Patient", runningLine(&client.Status{Progress: "42% complete: Patient"}))
	require.Equal(t, "in progress: the server gives no progress (poll again in 2s)", runningLine(&client.Status{RetryAfter: 2 * time.Second}))

	// Issue codes without diagnostics are put in words.
	oo := &fhirbulk.OperationOutcome{Issue: []fhirbulk.Issue{
		{Severity: fhirbulk.SeverityWarning, Code: fhirbulk.IssueInformational, Diagnostics: "ignored"},
		{Severity: fhirbulk.SeverityFatal, Code: fhirbulk.IssueTooCostly},
		{Severity: fhirbulk.SeverityError, Code: fhirbulk.IssueProcessing, Details: &fhirbulk.CodeableConcept{Text: "disk full"}},
		{Severity: fhirbulk.SeverityError, Code: "made-up-code"},
	}}
	require.Equal(t, "the export is too costly for the server; disk full; made up code", outcomeText(oo))
	require.Equal(t, "the server answered 502 Bad Gateway", answerText(&client.Error{StatusCode: http.StatusBadGateway}))
	require.Equal(t, "<html> (502 Bad Gateway)", answerText(&client.Error{StatusCode: http.StatusBadGateway, Body: "<html>"}))
}

// signalWriter is a writer that closes signal the first time it is
// written text containing mark.
type signalWriter struct {
	bytes.Buffer
	mark   string
	signal chan struct{}
	once   sync.Once
}

func (w *signalWriter) Write(p []byte) (int, error) {
	n, err := w.Buffer.Write(p)
	if strings.Contains(w.Buffer.String(), w.mark) {
		w.once.Do(func() { close(w.signal) })
	}
	return n, err
}

func TestStatusWait(t *testing.T) {
	t.Parallel()
	// The export runs until the command has shown its progress.
	stderr := &signalWriter{mark: "exporting: ", signal: make(chan struct{})}
	src := source()
	src.OnResource = func(ctx context.Context, typ string, n int) error {
		select {
		case <-stderr.signal:
		case <-ctx.Done():
			return ctx.Err()
		}
		return nil
	}
	srv := newServer(t, &bulkexporttest.ServerOptions{Source: src})
	statusURL := srv.Kickoff(t, "/$export?_type=Patient")
	var stdout bytes.Buffer
	code := run(withFast("status", "--wait", statusURL), &stdout, stderr)
	require.Equal(t, exitOK, code, stderr.String())
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(stdout.Bytes(), &m))
	require.Len(t, m.Output, 1)
	lines := strings.Split(strings.TrimSuffix(stderr.String(), "\n"), "\n")
	require.GreaterOrEqual(t, len(lines), 2, stderr.String())
	for _, l := range lines[:len(lines)-1] {
		require.True(t, strings.HasPrefix(l, "exporting: "), "a progress line: %q", l)
	}
	require.Regexp(t, `^completed: 1 file, 5 resources; the files expire at \S+Z$`, lines[len(lines)-1])
	require.NotContains(t, stderr.String(), "\r", "no redrawn line without a terminal")

	// A job that fails while waited for ends the wait with its state.
	failing := source()
	failing.OnResource = func(context.Context, string, int) error { return errors.New("boom") }
	srv = newServer(t, &bulkexporttest.ServerOptions{Source: failing})
	r := cli(withFast("status", "--wait", srv.Kickoff(t, "/$export?_type=Patient"))...)
	require.Equal(t, exitFailed, r.code, r.stderr)
	require.Contains(t, r.stderr, "failed: the export of Patient failed (500 Internal Server Error)\n")
	require.Empty(t, r.stdout)

	// Interrupted while waiting: 4, and the export is left alone.
	queued := newServer(t, &bulkexporttest.ServerOptions{NoWorker: true})
	statusURL = queued.Kickoff(t, "/$export")
	ctx, interrupt := context.WithCancel(context.Background())
	defer interrupt()
	stderr = &signalWriter{mark: "exporting: queued", signal: make(chan struct{})}
	go func() {
		<-stderr.signal
		interrupt()
	}()
	stdout.Reset()
	code = runContext(ctx, withFast("status", "--wait", statusURL), &stdout, stderr)
	require.Equal(t, exitInterrupted, code, stderr.String())
	require.Empty(t, stdout.String())
	require.True(t, strings.HasSuffix(stderr.String(), "\nbulkexport: interrupted; the export is unaffected on the server\n"), stderr.String())
	require.Equal(t, bulkexport.StateQueued, queued.Job(t, statusURL).State)
}

func TestCancel(t *testing.T) {
	t.Parallel()
	queued := newServer(t, &bulkexporttest.ServerOptions{NoWorker: true})
	statusURL := queued.Kickoff(t, "/$export")

	// Running: 202, cancelled.
	r := cli(withFast("cancel", statusURL)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	require.Equal(t, "cancelled\n", r.stdout)
	require.Empty(t, r.stderr)
	require.Equal(t, bulkexport.StateCancelled, queued.Job(t, statusURL).State)

	// Again: the server answers 404 deleted, which is no error.
	r = cli(withFast("cancel", statusURL)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	require.Equal(t, "already cancelled\n", r.stdout)
	require.Empty(t, r.stderr)

	// Completed: the server refuses, in words.
	srv := newServer(t, &bulkexporttest.ServerOptions{})
	statusURL = srv.Kickoff(t, "/$export?_type=Patient")
	code, _ := srv.Wait(t, statusURL)
	require.Equal(t, http.StatusOK, code)
	r = cli(withFast("cancel", statusURL)...)
	require.Equal(t, exitFailed, r.code, r.stderr)
	require.Equal(t, "bulkexport: the export cannot be cancelled: the export job has already completed and cannot be cancelled (404 Not Found)\n", r.stderr)
	require.Empty(t, r.stdout)

	// Unknown: refused too.
	r = cli(withFast("cancel", srv.BaseURL+"/$export-poll-status?_jobId=0123456789abcdef")...)
	require.Equal(t, exitFailed, r.code, r.stderr)
	require.Equal(t, "bulkexport: the export cannot be cancelled: no such export job (404 Not Found)\n", r.stderr)
}

func TestResume(t *testing.T) {
	t.Parallel()
	srv := newServer(t, &bulkexporttest.ServerOptions{})
	dir := t.TempDir()
	r := cli(withFast("export", srv.BaseURL, "--out", dir)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	want, m := readDir(t, dir)
	statusURL := strings.TrimSpace(strings.SplitAfter(r.stdout, "status URL ")[1])
	statusURL = strings.SplitN(statusURL, "\n", 2)[0]

	// Lose one file, cut another short into a part, keep the third.
	obs := filepath.Join(dir, "Observation.000001.c2.ndjson")
	b, err := os.ReadFile(obs)
	require.NoError(t, err)
	require.NoError(t, os.Remove(obs))
	require.NoError(t, os.WriteFile(obs+".part", b[:len(b)/2], 0o644))
	require.NoError(t, os.Remove(filepath.Join(dir, "Patient.000001.c2.ndjson")))
	require.NoError(t, os.Remove(filepath.Join(dir, "manifest.json")))

	r = cli(withFast("export", "--resume", statusURL, "--out", dir)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	require.Contains(t, r.stdout, "resume: status URL "+statusURL)
	require.Contains(t, r.stdout, "downloaded (resumed) Observation.000001.c2.ndjson: 5 resources")
	require.Contains(t, r.stdout, "downloaded Patient.000001.c2.ndjson: 5 resources")
	require.Contains(t, r.stdout, "already complete Practitioner.000001.c2.ndjson: 1 resources")
	got, m2 := readDir(t, dir)
	require.Equal(t, want, got)
	require.Equal(t, m, m2)

	// A BASE_URL may be given with --resume; an export still running is
	// waited for.
	src := source()
	release := make(chan struct{})
	src.OnResource = func(ctx context.Context, typ string, n int) error {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	}
	slow := newServer(t, &bulkexporttest.ServerOptions{Source: src})
	statusURL = slow.Kickoff(t, "/$export?_type=Patient")
	close(release)
	dir = t.TempDir()
	r = cli(withFast("export", slow.BaseURL, "--resume", statusURL, "--out", dir)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	got, _ = readDir(t, dir)
	require.Len(t, got["Patient"], 5)

	// An unknown job: 1.
	r = cli(withFast("export", "--resume", srv.BaseURL+"/$export-poll-status?_jobId=0123456789abcdef", "--out", t.TempDir())...)
	require.Equal(t, exitFailed, r.code)
	require.Contains(t, r.stderr, "no such export job")
}

func TestInterrupt(t *testing.T) {
	t.Parallel()
	for _, keep := range []bool{false, true} {
		t.Run(fmt.Sprintf("keep=%v", keep), func(t *testing.T) {
			t.Parallel()
			src := source()
			started := make(chan struct{}, 1)
			src.OnResource = func(ctx context.Context, typ string, n int) error {
				select {
				case started <- struct{}{}:
				default:
				}
				<-ctx.Done() // the export runs until it is cancelled
				return ctx.Err()
			}
			srv := newServer(t, &bulkexporttest.ServerOptions{Source: src})
			ctx, interrupt := context.WithCancel(context.Background())
			go func() {
				<-started
				interrupt() // Ctrl-C
			}()
			args := withFast("export", srv.BaseURL, "--out", t.TempDir())
			if keep {
				args = append(args, "--keep")
			}
			r := runCLI(ctx, args...)
			require.Equal(t, exitInterrupted, r.code, r.stderr)
			statusURL := strings.TrimSpace(strings.SplitN(strings.SplitAfter(r.stdout, "status URL ")[1], "\n", 2)[0])
			resp, body := srv.Status(t, statusURL)
			if keep {
				require.Contains(t, r.stderr, "keeps running on the server")
				require.Contains(t, r.stderr, "bulkexport export --resume '"+statusURL+"'")
				require.Equal(t, http.StatusAccepted, resp.StatusCode, "the export still runs")
				return
			}
			require.Contains(t, r.stderr, "the export was cancelled on the server")
			require.Equal(t, http.StatusNotFound, resp.StatusCode)
			require.Contains(t, string(body), "cancelled")
		})
	}
}

func TestIsTerminal(t *testing.T) {
	t.Parallel()
	require.False(t, isTerminal(&bytes.Buffer{}))
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	require.NoError(t, err)
	defer f.Close()
	require.False(t, isTerminal(f))

	// The terminal rendering: one line redrawn in place.
	var b bytes.Buffer
	u := &ui{w: &b, tty: true, bytes: map[string]int64{}}
	u.startDownload(2)
	u.downloaded(progress("a", 10, false))
	u.downloaded(progress("a", 2048, true))
	u.downloaded(progress("b", 1<<20, true))
	u.end()
	out := b.String()
	require.Contains(t, out, "\r\033[K[###############---------------] 1/2 files  2.0 KiB")
	require.True(t, strings.HasSuffix(out, "\r\033[K[##############################] 2/2 files  1.0 MiB\n"), "%q", out)
	require.Equal(t, "512 B", humanBytes(512))
	require.Equal(t, "1.5 GiB", humanBytes(3<<29))
}

func progress(path string, n int64, done bool) client.Progress {
	return client.Progress{File: client.File{Path: path, Bytes: n}, Done: done}
}
