package bulkexport_test

import (
	"context"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
)

// countingStore counts the Get calls that reach the store.
type countingStore struct {
	bulkexport.JobStore
	gets atomic.Int64
}

func (s *countingStore) Get(ctx context.Context, id string) (*bulkexport.Job, error) {
	s.gets.Add(1)
	return s.JobStore.Get(ctx, id)
}

// finishedCacheServer runs exports with Options.FinishedJobCache on a
// settable clock, over a store that counts its reads.
func finishedCacheServer(t *testing.T, opts bulkexport.Options) (*bulkexporttest.Server, *countingStore, *bulkexporttest.Clock) {
	t.Helper()
	store := &countingStore{JobStore: bulkexport.NewMemoryStore()}
	clock := bulkexporttest.NewClock(time.Now())
	src := bulkexporttest.NewSource().MustAdd(`{"resourceType":"Patient","id":"p1"}`)
	if opts.FinishedJobCache == 0 {
		opts.FinishedJobCache = 10 * time.Second
	}
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src, Store: store, Clock: clock, Handler: opts})
	return srv, store, clock
}

// TestFinishedJobCache: polls of a completed job are answered from memory
// within the cache time, with the same answer, for its owner only; the
// store is read again once the time is up, and never past the job's
// ExpiresAt.
func TestFinishedJobCache(t *testing.T) {
	t.Parallel()
	srv, store, clock := finishedCacheServer(t, bulkexport.Options{})
	res := srv.Export(t, "/$export?_type=Patient")

	before := store.gets.Load()
	resp, body := srv.Status(t, res.StatusURL)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	for range 5 {
		again, againBody := srv.Status(t, res.StatusURL)
		require.Equal(t, http.StatusOK, again.StatusCode)
		require.Equal(t, string(body), string(againBody))
		require.Equal(t, resp.Header.Get("Expires"), again.Header.Get("Expires"))
	}
	require.Equal(t, before, store.gets.Load(), "the completed job was read from the store already by Export's last poll")

	clock.Advance(11 * time.Second)
	resp, _ = srv.Status(t, res.StatusURL)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, before+1, store.gets.Load(), "past the cache time the store is read again")

	job := srv.Job(t, res.StatusURL)
	clock.Set(job.ExpiresAt)
	resp, body = srv.Status(t, res.StatusURL)
	require.Equal(t, http.StatusNotFound, resp.StatusCode, string(body))
}

// TestFinishedJobCacheOwner: a cached job stays invisible to other clients.
func TestFinishedJobCacheOwner(t *testing.T) {
	t.Parallel()
	srv, _, _ := finishedCacheServer(t, bulkexport.Options{
		Authenticate: func(r *http.Request) (string, error) { return r.Header.Get("X-Client"), nil },
	})
	srv.Header.Set("X-Client", "alice")
	res := srv.Export(t, "/$export?_type=Patient")
	resp, _ := srv.Status(t, res.StatusURL)
	require.Equal(t, http.StatusOK, resp.StatusCode)

	bob := &bulkexporttest.Exporter{BaseURL: srv.BaseURL, Header: http.Header{"X-Client": {"bob"}}}
	resp, body := bob.Status(t, res.StatusURL)
	require.Equal(t, http.StatusNotFound, resp.StatusCode, string(body))
}

// TestFinishedJobCacheDelete: under DeleteFinishedRemoves, a DELETE takes
// the job out of the cache at once: the next poll gets 404.
func TestFinishedJobCacheDelete(t *testing.T) {
	t.Parallel()
	srv, _, _ := finishedCacheServer(t, bulkexport.Options{DeletePolicy: bulkexport.DeleteFinishedRemoves})
	res := srv.Export(t, "/$export?_type=Patient")
	resp, _ := srv.Status(t, res.StatusURL)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	srv.Cancel(t, res.StatusURL)
	resp, body := srv.Status(t, res.StatusURL)
	require.Equal(t, http.StatusNotFound, resp.StatusCode, string(body))
}

// TestFinishedJobCacheEarlyExpiry: a kick-off that expires the client's
// oldest finished job (MaxFinishedJobsPerClient) takes it out of the
// cache: its next poll gets 404.
func TestFinishedJobCacheEarlyExpiry(t *testing.T) {
	t.Parallel()
	srv, _, clock := finishedCacheServer(t, bulkexport.Options{MaxFinishedJobsPerClient: 1})
	first := srv.Export(t, "/$export?_type=Patient")
	resp, _ := srv.Status(t, first.StatusURL)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	clock.Advance(time.Second) // "oldest" goes by CreatedAt
	second := srv.Export(t, "/$export?_type=Patient")
	resp, _ = srv.Status(t, first.StatusURL)
	require.Equal(t, http.StatusOK, resp.StatusCode, "two finished jobs: the second kick-off expired none")
	resp, _ = srv.Status(t, second.StatusURL)
	require.Equal(t, http.StatusOK, resp.StatusCode)

	clock.Advance(time.Second)
	srv.Kickoff(t, "/$export?_type=Patient") // now past the cap: the oldest expires
	resp, body := srv.Status(t, first.StatusURL)
	require.Equal(t, http.StatusNotFound, resp.StatusCode, string(body))
	resp, _ = srv.Status(t, second.StatusURL)
	require.Equal(t, http.StatusOK, resp.StatusCode)
}

// TestFinishedJobCacheOtherReplica: a deletion made through another
// handler over the same store is seen once the cache time is up, and not
// before: the documented bound.
func TestFinishedJobCacheOtherReplica(t *testing.T) {
	t.Parallel()
	srv, store, clock := finishedCacheServer(t, bulkexport.Options{})
	res := srv.Export(t, "/$export?_type=Patient")
	resp, _ := srv.Status(t, res.StatusURL)
	require.Equal(t, http.StatusOK, resp.StatusCode)

	job := srv.Job(t, res.StatusURL)
	require.NoError(t, store.Delete(context.Background(), job.ID))
	resp, _ = srv.Status(t, res.StatusURL)
	require.Equal(t, http.StatusOK, resp.StatusCode, "within the cache time the removal is not seen")
	clock.Advance(11 * time.Second)
	resp, body := srv.Status(t, res.StatusURL)
	require.Equal(t, http.StatusNotFound, resp.StatusCode, string(body))
}
