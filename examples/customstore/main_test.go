package main

import (
	"bufio"
	"context"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"github.com/bulkfhir/bulkexport/storetest"
)

// TestFileStore is all a JobStore needs to prove it keeps the contract:
// the conformance suite, over a fresh store per case.
func TestFileStore(t *testing.T) {
	storetest.Run(t, func(t *testing.T) bulkexport.JobStore {
		s, err := OpenFileStore(filepath.Join(t.TempDir(), "jobs.json"))
		require.NoError(t, err)
		return s
	})
}

func TestFileStoreSurvivesReopen(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "jobs.json")
	s, err := OpenFileStore(path)
	require.NoError(t, err)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for _, id := range []string{"a", "b"} {
		require.NoError(t, s.Create(ctx, &bulkexport.Job{ID: id, Owner: "alice", Level: fhirbulk.LevelSystem,
			State: bulkexport.StateQueued, CreatedAt: now, UpdatedAt: now}, bulkexport.CreateParams{}))
	}
	claimed, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: "w1", Now: now, Lease: time.Minute})
	require.NoError(t, err)
	require.NoError(t, s.Delete(ctx, "b"))

	s2, err := OpenFileStore(path)
	require.NoError(t, err)
	got, err := s2.Get(ctx, "a")
	require.NoError(t, err)
	require.Equal(t, bulkexport.StateRunning, got.State)
	require.Equal(t, claimed.Version, got.Version)
	require.True(t, claimed.LeaseExpiresAt.Equal(got.LeaseExpiresAt))
	_, err = s2.Get(ctx, "b")
	require.ErrorIs(t, err, bulkexport.ErrNotFound)

	names, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, names, 1, "no temporary files left behind")

	require.NoError(t, os.WriteFile(path, []byte("{not json"), 0o600))
	_, err = OpenFileStore(path)
	require.Error(t, err)
}

// A change that cannot be saved is not made.
func TestFileStoreSaveFailure(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "gone")
	require.NoError(t, os.Mkdir(dir, 0o700))
	s, err := OpenFileStore(filepath.Join(dir, "jobs.json"))
	require.NoError(t, err)
	require.NoError(t, os.Remove(dir))

	job := &bulkexport.Job{ID: "a", State: bulkexport.StateQueued}
	require.Error(t, s.Create(ctx, job, bulkexport.CreateParams{}))
	require.Zero(t, job.Version)
	_, err = s.Get(ctx, "a")
	require.ErrorIs(t, err, bulkexport.ErrNotFound)
}

// TestSmokeExport runs an export over the FileStore through the real
// handler and Worker.
func TestSmokeExport(t *testing.T) {
	t.Parallel()
	jobs := filepath.Join(t.TempDir(), "jobs.json")
	store, err := OpenFileStore(jobs)
	require.NoError(t, err)
	var srv *bulkexport.Server
	e := bulkexporttest.Serve(t, "/fhir", func(base string) http.Handler {
		srv, err = newServer(store, base, t.TempDir(), 8, slog.New(slog.NewTextHandler(io.Discard, nil)),
			bulkexport.WorkerOptions{PollInterval: 10 * time.Millisecond, Heartbeat: 20 * time.Millisecond})
		require.NoError(t, err)
		return srv
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() { cancel(); require.NoError(t, <-done) })

	res := e.Export(t, "/Group/even/$export?_type=Patient,Condition")
	require.Len(t, res.IDs("Patient"), 4)
	require.NotEmpty(t, res.IDs("Condition"))

	// The completed job is in the file.
	reopened, err := OpenFileStore(jobs)
	require.NoError(t, err)
	id, err := bulkexporttest.JobID(res.StatusURL)
	require.NoError(t, err)
	j, err := reopened.Get(context.Background(), id)
	require.NoError(t, err)
	require.Equal(t, bulkexport.StateCompleted, j.State)
	require.Len(t, j.Output, len(res.Manifest.Output))
}

// TestRunRestart runs main's run twice over the same files: a job
// completed before the restart still answers after it.
func TestRunRestart(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	args := []string{"-addr", "127.0.0.1:0", "-patients", "3",
		"-jobs", filepath.Join(dir, "jobs.json"), "-storage", filepath.Join(dir, "files")}
	start := func() (base string, stop func()) {
		ctx, cancel := context.WithCancel(context.Background())
		pr, pw := io.Pipe()
		done := make(chan error, 1)
		go func() {
			done <- run(ctx, args, pw, io.Discard)
			pw.Close()
		}()
		line, err := bufio.NewReader(pr).ReadString('\n')
		require.NoError(t, err)
		base, ok := strings.CutPrefix(strings.TrimSpace(line), "bulkexport customstore example: base URL ")
		require.True(t, ok, line)
		return base, func() { cancel(); require.NoError(t, <-done) }
	}

	base, stop := start()
	e := &bulkexporttest.Exporter{BaseURL: base}
	res := e.Export(t, "/Patient/$export?_type=Patient")
	require.Len(t, res.IDs("Patient"), 3)
	stop()

	base2, stop := start()
	defer stop()
	statusURL := strings.Replace(res.StatusURL, base, base2, 1) // a new port
	resp, body := e.Send(t, http.MethodGet, statusURL, nil)
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	require.Contains(t, string(body), `"type":"Patient"`)
}
