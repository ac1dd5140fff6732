package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/backends"
	"github.com/bulkfhir/bulkexport/examples/internal/exampleserver"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// TestSmokeSystemExport wires the server as main does, on httptest, and
// runs a system export to completion over HTTP.
func TestSmokeSystemExport(t *testing.T) {
	t.Parallel()
	ts := httptest.NewUnstartedServer(nil)
	srv, err := exampleserver.New(exampleserver.Config{
		Addr:       ts.Listener.Addr().String(),
		Patients:   25,
		StorageDir: t.TempDir(),
		Logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
		Worker:     &bulkexport.WorkerOptions{PollInterval: 10 * time.Millisecond},
	})
	require.NoError(t, err)
	ts.Config.Handler = srv.Handler
	ts.Start()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Exports.Run(ctx) }()
	t.Cleanup(func() {
		ts.Close()
		cancel()
		require.NoError(t, <-done)
	})

	req, err := http.NewRequest(http.MethodGet, srv.BaseURL+"/$export", nil)
	require.NoError(t, err)
	req.Header.Set("Accept", "application/fhir+json")
	req.Header.Set("Prefer", "respond-async")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
	status := resp.Header.Get("Content-Location")
	require.True(t, strings.HasPrefix(status, srv.BaseURL+"/$export-poll-status"), status)

	// Poll: a bounded wait (the worker starts the job at once), not a
	// timing assertion.
	var body []byte
	for range 400 {
		resp, err = http.Get(status)
		require.NoError(t, err)
		body, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		require.NoError(t, err)
		if resp.StatusCode != http.StatusAccepted {
			break
		}
		require.NotEmpty(t, resp.Header.Get("Retry-After"))
		time.Sleep(25 * time.Millisecond)
	}
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m))
	require.Equal(t, srv.BaseURL+"/$export", m.Request)
	require.Empty(t, m.Error)
	tx, err := fhirbulk.ParseInstant(m.TransactionTime)
	require.NoError(t, err)

	counts := map[string]int64{}
	for _, f := range m.Output {
		require.NotNil(t, f.Count)
		resp, err := http.Get(f.URL)
		require.NoError(t, err)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.Equal(t, "application/fhir+ndjson", resp.Header.Get("Content-Type"))
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 1<<20)
		var lines int64
		for sc.Scan() {
			var r struct {
				ResourceType string `json:"resourceType"`
			}
			require.NoError(t, json.Unmarshal(sc.Bytes(), &r))
			require.Equal(t, f.Type, r.ResourceType)
			lines++
		}
		require.NoError(t, sc.Err())
		resp.Body.Close()
		require.Equal(t, *f.Count, lines, f.URL)
		counts[f.Type] += lines
	}

	types, err := srv.Dataset.ResourceTypes(ctx, fhirbulk.LevelSystem)
	require.NoError(t, err)
	for _, typ := range types {
		want, err := srv.Dataset.Count(ctx, &bulkexport.Query{Level: fhirbulk.LevelSystem, TransactionTime: tx}, typ)
		require.NoError(t, err)
		require.Equal(t, want, counts[typ], typ)
	}
	require.Equal(t, int64(25), counts["Patient"])
}

func TestParseFlags(t *testing.T) {
	t.Parallel()
	o, err := parseFlags(nil, io.Discard)
	require.NoError(t, err)
	require.Equal(t, &options{addr: "127.0.0.1:8080", clients: map[string]string{}, patients: 100,
		store:      backends.StoreSpec{Kind: "sqlite", Path: "./bulkexport.db"},
		storageDir: "./bulkexport-data", logLevel: slog.LevelInfo,
		lease: 30 * time.Second, checkpoint: 5 * time.Second, maxAttempts: 5,
		partitions: bulkexport.DefaultPartitions, unitConcurrency: bulkexport.DefaultUnitConcurrency,
		timeouts: timeouts{readHeader: 10 * time.Second, body: 30 * time.Second, write: 30 * time.Second,
			download: time.Hour, idle: 2 * time.Minute, maxHeaderBytes: 64 << 10},
		protocol: defaultProtocol}, o)

	o, err = parseFlags([]string{"-addr", ":9000", "-clients", "alice=s1, bob=s2", "-patients", "5",
		"-storage", "dir:/tmp/x", "-log-level", "debug", "-store", "memory",
		"-lease", "1s", "-checkpoint", "100ms", "-max-attempts", "20", "-pace", "1ms",
		"-partitions", "3", "-unit-concurrency", "5",
		"-read-header-timeout", "1s", "-read-timeout", "2s", "-write-timeout", "3s", "-download-timeout", "0",
		"-idle-timeout", "4s", "-max-header-bytes", "8192"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, &options{addr: ":9000", clients: map[string]string{"alice": "s1", "bob": "s2"}, patients: 5,
		store: backends.StoreSpec{Kind: "memory"}, storageDir: "/tmp/x", logLevel: slog.LevelDebug,
		lease: time.Second, checkpoint: 100 * time.Millisecond, maxAttempts: 20, partitions: 3, unitConcurrency: 5, pace: time.Millisecond,
		timeouts: timeouts{readHeader: time.Second, body: 2 * time.Second, write: 3 * time.Second,
			idle: 4 * time.Second, maxHeaderBytes: 8192},
		protocol: defaultProtocol}, o)

	o, err = parseFlags([]string{"-store", "sqlite:/var/lib/x/jobs.db"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, backends.StoreSpec{Kind: "sqlite", Path: "/var/lib/x/jobs.db"}, o.store)
	o, err = parseFlags([]string{"-store", "postgres:postgres://u:pw@127.0.0.1:5432/db?sslmode=disable", "-pg-schema", "exports"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, backends.StoreSpec{Kind: "postgres", URL: "postgres://u:pw@127.0.0.1:5432/db?sslmode=disable"}, o.store)
	require.Equal(t, "exports", o.pgSchema)
	require.Equal(t, "postgres:…", o.store.String(), "the URL (and its password) stays out of the logs")

	for _, args := range [][]string{
		{"-store", "sqlite"},
		{"-store", "sqlite:"},
		{"-store", "sqlite:/tmp/a?mode=ro"},
		{"-store", "postgres"},
		{"-store", "postgres:"},
		{"-store", "postgres:postgres://[::1"},
		{"-store", "mysql:x"},
		{"-pg-schema", "x"},
		{"-lease", "0s"},
		{"-checkpoint", "-1s"},
		{"-max-attempts", "0"},
		{"-pace", "-1ms"},
		{"-partitions", "0"},
		{"-unit-concurrency", "0"},
		{"-read-header-timeout", "-1s"},
		{"-read-timeout", "-1s"},
		{"-write-timeout", "-1s"},
		{"-download-timeout", "-1s"},
		{"-idle-timeout", "-1s"},
		{"-max-header-bytes", "-1"},
		{"-storage", "s3://bucket"},
		{"-storage", "dir:"},
		{"-clients", "alice"},
		{"-clients", "alice=,bob=x"},
		{"-clients", "a=1,a=2"},
		{"-patients", "-1"},
		{"-log-level", "verbose"},
		{"-nope"},
		{"extra"},
	} {
		var stderr bytes.Buffer
		_, err := parseFlags(args, &stderr)
		require.ErrorIs(t, err, errUsage, "%v", args)
		require.NotEmpty(t, stderr.String(), "%v", args)
	}
	var stderr bytes.Buffer
	_, err = parseFlags([]string{"-store", "sqlite"}, &stderr)
	require.Error(t, err)
	require.Contains(t, stderr.String(), `unsupported store "sqlite"`)
}

// startRun runs main's run with args plus an ephemeral loopback port, and
// returns the base URL it printed and a function that stops it (cancels
// its context) and checks that it returned nil having printed nothing
// else.
func startRun(t *testing.T, args ...string) (base string, stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, append([]string{"-addr", "127.0.0.1:0", "-log-level", "error"}, args...), pw, io.Discard)
		pw.Close()
	}()
	t.Cleanup(cancel)
	line, err := bufio.NewReader(pr).ReadString('\n')
	require.NoError(t, err)
	base, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "bulkexport example server: base URL ")
	require.True(t, ok, line)
	require.True(t, strings.HasPrefix(base, "http://127.0.0.1:") && strings.HasSuffix(base, "/fhir"), base)
	return base, func() {
		t.Helper()
		cancel()
		require.NoError(t, <-done)
		rest, _ := io.ReadAll(pr)
		require.Empty(t, rest, "only one line goes to stdout")
	}
}

// TestRunLifecycle runs main's run on an ephemeral loopback port: it prints
// the base URL line, serves, and returns nil once its context is cancelled.
func TestRunLifecycle(t *testing.T) {
	t.Parallel()
	base, stop := startRun(t, "-patients", "3", "-store", "memory", "-storage", "dir:"+t.TempDir())
	resp, err := http.Get(base + "/metadata")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	stop()
}

// TestRunSQLiteRestart: with -store sqlite:PATH, a job exported by one run
// is still there, with its manifest, after a restart on the same files.
func TestRunSQLiteRestart(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	args := []string{"-patients", "3", "-store", "sqlite:" + filepath.Join(dir, "jobs.db"), "-storage", "dir:" + filepath.Join(dir, "files")}
	base, stop := startRun(t, args...)
	req, err := http.NewRequest(http.MethodGet, base+"/$export?_type=Patient", nil)
	require.NoError(t, err)
	req.Header.Set("Prefer", "respond-async")
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
	status := resp.Header.Get("Content-Location")
	_, id, ok := strings.Cut(status, "_jobId=")
	require.True(t, ok, status)
	poll := func(base string) (int, []byte) {
		resp, err := http.Get(base + "/$export-poll-status?_jobId=" + id)
		require.NoError(t, err)
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp.StatusCode, body
	}
	code, body := poll(base)
	for i := 0; i < 400 && code == http.StatusAccepted; i++ { // a bounded wait
		time.Sleep(25 * time.Millisecond)
		code, body = poll(base)
	}
	require.Equal(t, http.StatusOK, code, "%s", body)
	stop()
	require.FileExists(t, filepath.Join(dir, "jobs.db"))

	base, stop = startRun(t, args...)
	code, body2 := poll(base)
	require.Equal(t, http.StatusOK, code, "%s", body2)
	var m1, m2 fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m1))
	require.NoError(t, json.Unmarshal(body2, &m2))
	require.Equal(t, m1.TransactionTime, m2.TransactionTime)
	require.Len(t, m2.Output, 1)
	require.EqualValues(t, 3, *m2.Output[0].Count)
	stop()
}
