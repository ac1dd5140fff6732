package backends

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

func TestParseStoreSpec(t *testing.T) {
	t.Parallel()
	for spec, want := range map[string]StoreSpec{
		"memory":                      {Kind: "memory"},
		"sqlite:./bulkexport.db":      {Kind: "sqlite", Path: "./bulkexport.db"},
		"sqlite:/var/lib/x:y/jobs.db": {Kind: "sqlite", Path: "/var/lib/x:y/jobs.db"},
		"postgres:postgres://u@h/db":  {Kind: "postgres", URL: "postgres://u@h/db"},
		"postgres:host=h dbname=db":   {Kind: "postgres", URL: "host=h dbname=db"},
	} {
		got, err := ParseStoreSpec(spec)
		require.NoError(t, err, spec)
		require.Equal(t, want, got, spec)
	}
	for _, spec := range []string{"", "sqlite", "sqlite:", "sqlite:a?b", "sqlite:a#b", "postgres", "postgres:", "postgres:postgres://[::1", "mysql:x", "Memory"} {
		_, err := ParseStoreSpec(spec)
		require.Error(t, err, spec)
	}
	_, err := ParseStoreSpec("postgres:postgres://u:secret@[::1")
	require.Error(t, err)
	require.NotContains(t, err.Error(), "secret", "no password in the error")
	got, err := ParseStoreSpec(DefaultStore)
	require.NoError(t, err)
	require.Equal(t, DefaultStore, got.String())
}

// roundTrip creates a job in store and returns a function that checks a
// store (the same one reopened) still has it.
func roundTrip(t *testing.T, store bulkexport.JobStore) func(bulkexport.JobStore) {
	t.Helper()
	ctx := context.Background()
	now := time.Now().UTC().Truncate(time.Millisecond)
	job := &bulkexport.Job{ID: bulkexport.NewJobID(), Level: fhirbulk.LevelSystem, State: bulkexport.StateQueued,
		Progress: bulkexport.Progress{Percent: -1}, CreatedAt: now, UpdatedAt: now}
	require.NoError(t, store.Create(ctx, job, bulkexport.CreateParams{}))
	return func(s bulkexport.JobStore) {
		got, err := s.Get(ctx, job.ID)
		require.NoError(t, err)
		require.Equal(t, bulkexport.StateQueued, got.State)
		require.True(t, got.CreatedAt.Equal(now))
	}
}

func TestOpenStoreSQLite(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	spec := StoreSpec{Kind: "sqlite", Path: filepath.Join(t.TempDir(), "jobs.db")}
	s, closeStore, err := OpenStore(ctx, spec, nil)
	require.NoError(t, err)
	check := roundTrip(t, s)
	closeStore()
	// Reopened (Migrate again is a no-op), the job is still there.
	s, closeStore, err = OpenStore(ctx, spec, nil)
	require.NoError(t, err)
	defer closeStore()
	check(s)

	_, _, err = OpenStore(ctx, StoreSpec{Kind: "sqlite", Path: filepath.Join(t.TempDir(), "missing", "dir", "jobs.db")}, nil)
	require.Error(t, err)
}

func TestOpenStoreMemory(t *testing.T) {
	t.Parallel()
	s, closeStore, err := OpenStore(context.Background(), StoreSpec{Kind: "memory"}, nil)
	require.NoError(t, err)
	defer closeStore()
	roundTrip(t, s)(s)
}

// TestOpenStorePostgres needs BULKEXPORT_TEST_POSTGRES_URL (.ci/postgres.sh).
func TestOpenStorePostgres(t *testing.T) {
	u := os.Getenv("BULKEXPORT_TEST_POSTGRES_URL")
	if u == "" {
		t.Skip("BULKEXPORT_TEST_POSTGRES_URL is not set; source .ci/postgres.sh to provision a server")
	}
	t.Parallel()
	ctx := context.Background()
	var b [6]byte
	_, _ = rand.Read(b[:])
	schema := "exampleserver_test_" + hex.EncodeToString(b[:])
	t.Cleanup(func() {
		conn, err := pgx.Connect(ctx, u)
		require.NoError(t, err)
		defer conn.Close(ctx)
		_, err = conn.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE")
		require.NoError(t, err)
	})
	spec, err := ParseStoreSpec("postgres:" + u)
	require.NoError(t, err)
	s, closeStore, err := OpenStore(ctx, spec, &StoreOptions{PGSchema: schema})
	require.NoError(t, err)
	check := roundTrip(t, s)
	closeStore()
	s, closeStore, err = OpenStore(ctx, spec, &StoreOptions{PGSchema: schema})
	require.NoError(t, err)
	defer closeStore()
	check(s)
}
