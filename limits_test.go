package bulkexport_test

import (
	"context"
	"io"
	"net/http"
	"strconv"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
)

// TestConcurrentKickoffsCap: a burst of simultaneous kick-offs by one
// client gets exactly the active-job cap accepted; every other answer is a
// 429 with Retry-After and an OperationOutcome, none a 5xx.
func TestConcurrentKickoffsCap(t *testing.T) {
	t.Parallel()
	const burst, limit = 64, 10
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source: clinicalSource(t, 1), NoWorker: true,
		Handler: bulkexport.Options{MaxActiveJobsPerClient: limit},
	})
	statuses := make([]int, burst)
	bodies := make([]string, burst)
	retry := make([]string, burst)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range burst {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, err := http.NewRequest(http.MethodGet, srv.BaseURL+"/$export?_type=Patient", nil)
			if err != nil {
				statuses[i] = -1
				return
			}
			req.Header.Set("Prefer", "respond-async")
			req.Header.Set("Accept", "application/fhir+json")
			<-start
			resp, err := srv.Client().Do(req)
			if err != nil {
				statuses[i] = -1
				bodies[i] = err.Error()
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			statuses[i], bodies[i], retry[i] = resp.StatusCode, string(b), resp.Header.Get("Retry-After")
		}()
	}
	close(start)
	wg.Wait()
	accepted := 0
	for i, st := range statuses {
		switch st {
		case http.StatusAccepted:
			accepted++
		case http.StatusTooManyRequests:
			require.Contains(t, bodies[i], `"OperationOutcome"`)
			n, err := strconv.Atoi(retry[i])
			require.NoError(t, err, "Retry-After %q", retry[i])
			require.Positive(t, n)
		default:
			t.Fatalf("kick-off %d: status %d: %s", i, st, bodies[i])
		}
	}
	require.Equal(t, limit, accepted)
	active, err := srv.Store.List(context.Background(), bulkexport.Filter{States: []bulkexport.JobState{bulkexport.StateQueued}})
	require.NoError(t, err)
	require.Len(t, active, limit, "the store holds exactly the accepted jobs")
}

// TestFinishedJobsCapped: a kick-off that takes a client past
// MaxFinishedJobsPerClient expires its oldest finished jobs; other
// clients' jobs are untouched.
func TestFinishedJobsCapped(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source: clinicalSource(t, 2),
		Handler: bulkexport.Options{
			MaxFinishedJobsPerClient: 2,
			Authenticate:             tokenAuth(map[string]string{"a": "alice", "b": "bob"}),
		},
	})
	srv.Header.Set("Authorization", "Bearer b")
	bob := srv.Kickoff(t, "/$export?_type=Patient")
	srv.Collect(t, bob)

	srv.Header.Set("Authorization", "Bearer a")
	var done []string
	for range 3 {
		u := srv.Kickoff(t, "/$export?_type=Patient")
		srv.Collect(t, u)
		done = append(done, u)
	}
	// Three finished, cap two: the kick-off of the fourth expires the
	// oldest.
	srv.Collect(t, srv.Kickoff(t, "/$export?_type=Patient"))
	resp, body := srv.Status(t, done[0])
	require.Equal(t, http.StatusNotFound, resp.StatusCode, "%s", body)
	for _, u := range done[1:] {
		resp, body := srv.Status(t, u)
		require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	}
	srv.Header.Set("Authorization", "Bearer b")
	resp, body = srv.Status(t, bob)
	require.Equal(t, http.StatusOK, resp.StatusCode, "another client's job: %s", body)
}
