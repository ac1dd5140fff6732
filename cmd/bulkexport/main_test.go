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
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/client"
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
func readDir(t *testing.T, dir string) (map[string][]string, *bulkexport.Manifest) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	require.NoError(t, err)
	var m bulkexport.Manifest
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
	for _, cmd := range []string{"export", "status", "cancel"} {
		r := cli(cmd, "-h")
		require.Equal(t, exitOK, r.code)
		require.Contains(t, r.stderr, "Usage: bulkexport "+cmd)
		require.Contains(t, r.stderr, "Exit codes:")
	}
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

	// The server stays unavailable: 3.
	busy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/fhir+json")
		w.WriteHeader(http.StatusServiceUnavailable)
		_ = json.NewEncoder(w).Encode(bulkexport.NewOutcome(bulkexport.SeverityError, bulkexport.IssueTransient, "down for maintenance"))
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
			_ = json.NewEncoder(w).Encode(bulkexport.Manifest{Output: []bulkexport.ManifestFile{{Type: "Patient", URL: "http://" + r.Host + "/Patient.ndjson", Count: &n}}})
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

func TestStatusAndCancel(t *testing.T) {
	t.Parallel()
	queued := newServer(t, &bulkexporttest.ServerOptions{NoWorker: true})
	statusURL := queued.Kickoff(t, "/$export")

	r := cli(withFast("status", statusURL)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	require.Equal(t, "in progress: queued (poll again in 1s)\n", r.stdout)

	r = cli(withFast("cancel", statusURL)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	require.Equal(t, "cancelled\n", r.stdout)
	r = cli(withFast("cancel", statusURL)...)
	require.Equal(t, exitFailed, r.code)
	require.Contains(t, r.stderr, "404 Not Found: error deleted")
	r = cli(withFast("status", statusURL)...)
	require.Equal(t, exitFailed, r.code)
	require.Contains(t, r.stderr, "the export job was cancelled")

	srv := newServer(t, &bulkexporttest.ServerOptions{})
	statusURL = srv.Kickoff(t, "/$export?_type=Patient")
	r = cli(withFast("status", "--wait", statusURL)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	var m bulkexport.Manifest
	require.NoError(t, json.Unmarshal([]byte(r.stdout), &m))
	require.Len(t, m.Output, 1)
	r = cli(withFast("status", statusURL)...)
	require.Equal(t, exitOK, r.code, r.stderr)
	require.True(t, strings.HasPrefix(r.stdout, "{\n  \"transactionTime\""), r.stdout)
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
