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
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/exampleserver"
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
	go func() { done <- srv.Worker.Run(ctx) }()
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
	var m bulkexport.Manifest
	require.NoError(t, json.Unmarshal(body, &m))
	require.Equal(t, srv.BaseURL+"/$export", m.Request)
	require.Empty(t, m.Error)
	tx, err := bulkexport.ParseInstant(m.TransactionTime)
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

	types, err := srv.Dataset.ResourceTypes(ctx, bulkexport.LevelSystem)
	require.NoError(t, err)
	for _, typ := range types {
		want, err := srv.Dataset.Count(ctx, &bulkexport.Query{Level: bulkexport.LevelSystem, TransactionTime: tx}, typ)
		require.NoError(t, err)
		require.Equal(t, want, counts[typ], typ)
	}
	require.Equal(t, int64(25), counts["Patient"])
}

func TestParseFlags(t *testing.T) {
	t.Parallel()
	o, err := parseFlags(nil, io.Discard)
	require.NoError(t, err)
	require.Equal(t, &options{addr: "127.0.0.1:8080", clients: map[string]string{}, patients: 100, store: "memory",
		storageDir: "./bulkexport-data", logLevel: slog.LevelInfo}, o)

	o, err = parseFlags([]string{"-addr", ":9000", "-clients", "alice=s1, bob=s2", "-patients", "5",
		"-storage", "dir:/tmp/x", "-log-level", "debug"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, &options{addr: ":9000", clients: map[string]string{"alice": "s1", "bob": "s2"}, patients: 5,
		store: "memory", storageDir: "/tmp/x", logLevel: slog.LevelDebug}, o)

	for _, args := range [][]string{
		{"-store", "sqlite"},
		{"-store", "postgres"},
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

// TestRunLifecycle runs main's run on an ephemeral loopback port: it prints
// the base URL line, serves, and returns nil once its context is cancelled.
func TestRunLifecycle(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"-addr", "127.0.0.1:0", "-patients", "3", "-storage", "dir:" + t.TempDir(), "-log-level", "error"}, pw, io.Discard)
		pw.Close()
	}()
	line, err := bufio.NewReader(pr).ReadString('\n')
	require.NoError(t, err)
	base, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "bulkexport example server: base URL ")
	require.True(t, ok, line)
	require.True(t, strings.HasPrefix(base, "http://127.0.0.1:") && strings.HasSuffix(base, "/fhir"), base)

	resp, err := http.Get(base + "/metadata")
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)

	cancel()
	require.NoError(t, <-done)
	rest, _ := io.ReadAll(pr)
	require.Empty(t, rest, "only one line goes to stdout")
}
