//go:build unix

package crashtest

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// The example server's Handler keeps the library's default cap on a
// client's active (queued or running) jobs, Options.MaxActiveJobsPerClient.
const (
	hcActiveCap = 10
	hcBurst     = 64
	// hcBurstPace makes each job take minutes, so that none finishes (and
	// frees a place under the cap) while the test runs.
	hcBurstPace = "50ms"
)

// TestBurstKickoffCap: one client fires 64 kick-offs at once at the example
// server, on each job store. The cap on the client's active jobs must hold
// exactly: 10 kick-offs answer 202, the other 54 429 with a Retry-After and
// an OperationOutcome, none fails. Then a cancelled job frees exactly one
// place.
func TestBurstKickoffCap(t *testing.T) {
	t.Parallel()
	skipShort(t)
	sqlite := func(t *testing.T) []string {
		return []string{"-store", "sqlite:" + filepath.Join(t.TempDir(), "jobs.db")}
	}
	postgres := func(t *testing.T) []string {
		return []string{"-store", "postgres:" + needPostgres(t), "-pg-schema", freshSchema(t)}
	}
	stores := []struct {
		name    string
		args    func(t *testing.T) []string
		servers int // the kick-offs are spread over this many servers on the store
	}{
		{"memory", func(*testing.T) []string { return []string{"-store", "memory"} }, 1},
		{"sqlite", sqlite, 1},
		{"postgres", postgres, 1},
		// The cap is one count across every process on the store.
		{"sqlite-two-servers", sqlite, 2},
		{"postgres-two-servers", postgres, 2},
	}
	for _, st := range stores {
		t.Run(st.name, func(t *testing.T) {
			t.Parallel()
			h := newHarness(t, append(st.args(t), "-pace", hcBurstPace))
			var ps []*proc
			for i := range st.servers {
				ps = append(ps, h.start(string(rune('A'+i))))
			}
			hcBurstCap(t, h, ps)
		})
	}
}

// hcAnswer is what one kick-off got.
type hcAnswer struct {
	status     int
	retryAfter string
	location   string
	body       []byte
	err        error
}

// hcBurstCap fires the burst at the servers ps (in turn) and checks the
// answers.
func hcBurstCap(t *testing.T, h *harness, ps []*proc) {
	// One connection per request, all opened before the requests go.
	client := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: hcBurst}}
	defer client.CloseIdleConnections()
	u := ps[0].base + "/$export"
	answers := make([]hcAnswer, hcBurst)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range answers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			answers[i] = hcKickoff(client, ps[i%len(ps)].base+"/$export")
		}()
	}
	close(start)
	wg.Wait()

	var accepted []string // the new jobs' status URLs
	throttled := 0
	statuses := map[int]int{}
	for i, a := range answers {
		require.NoError(t, a.err, "kick-off %d", i)
		statuses[a.status]++
		switch a.status {
		case http.StatusAccepted:
			require.Contains(t, a.location, "_jobId=", "kick-off %d: Content-Location", i)
			accepted = append(accepted, a.location)
		case http.StatusTooManyRequests:
			throttled++
			hcCheckThrottled(t, a, fmt.Sprintf("kick-off %d", i))
		}
	}
	t.Logf("%d simultaneous kick-offs at %d servers: answers %v", hcBurst, len(ps), statuses)
	require.Len(t, accepted, hcActiveCap, "202 answers; all answers: %v", statuses)
	require.Equal(t, hcBurst-hcActiveCap, throttled, "429 answers; all answers: %v", statuses)

	// The accepted jobs are distinct and in progress.
	seen := map[string]bool{}
	for _, loc := range accepted {
		require.False(t, seen[loc], "two kick-offs answered with the same job %s", loc)
		seen[loc] = true
		resp, body := h.get(loc)
		require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s: %s", loc, body)
	}

	// Still at the cap: one more kick-off is refused.
	a := hcKickoff(client, u)
	require.NoError(t, a.err)
	require.Equal(t, http.StatusTooManyRequests, a.status, "a kick-off at the cap: %s", a.body)
	hcCheckThrottled(t, a, "a kick-off at the cap")

	// A cancelled job frees one place, and only one.
	req, err := http.NewRequest(http.MethodDelete, accepted[0], nil)
	require.NoError(t, err)
	resp, err := client.Do(req)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "cancel: %s", body)
	a = hcKickoff(client, u)
	require.NoError(t, a.err)
	require.Equal(t, http.StatusAccepted, a.status, "a kick-off after a cancel: %s", a.body)
	a = hcKickoff(client, u)
	require.NoError(t, a.err)
	require.Equal(t, http.StatusTooManyRequests, a.status, "a kick-off at the cap again: %s", a.body)
	hcCheckThrottled(t, a, "a kick-off at the cap again")
}

// hcKickoff sends one system kick-off. It must not call t's methods: it
// runs on goroutines of its own.
func hcKickoff(client *http.Client, u string) hcAnswer {
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		return hcAnswer{err: err}
	}
	req.Header.Set("Accept", "application/fhir+json")
	req.Header.Set("Prefer", "respond-async")
	resp, err := client.Do(req)
	if err != nil {
		return hcAnswer{err: err}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return hcAnswer{status: resp.StatusCode, retryAfter: resp.Header.Get("Retry-After"),
		location: resp.Header.Get("Content-Location"), body: body, err: err}
}

// hcCheckThrottled checks a 429: a Retry-After of whole seconds, and an
// OperationOutcome saying why.
func hcCheckThrottled(t *testing.T, a hcAnswer, what string) {
	t.Helper()
	secs, err := strconv.Atoi(a.retryAfter)
	require.NoError(t, err, "%s: Retry-After %q", what, a.retryAfter)
	require.GreaterOrEqual(t, secs, 1, "%s: Retry-After", what)
	var oo struct {
		ResourceType string `json:"resourceType"`
		Issue        []struct {
			Severity    string `json:"severity"`
			Code        string `json:"code"`
			Diagnostics string `json:"diagnostics"`
		} `json:"issue"`
	}
	require.NoError(t, json.Unmarshal(a.body, &oo), "%s: %s", what, a.body)
	require.Equal(t, "OperationOutcome", oo.ResourceType, "%s: %s", what, a.body)
	require.NotEmpty(t, oo.Issue, "%s: %s", what, a.body)
	require.Equal(t, "throttled", oo.Issue[0].Code, "%s: %s", what, a.body)
	require.True(t, strings.Contains(oo.Issue[0].Diagnostics, "in progress"), "%s: %s", what, a.body)
}
