package main

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// TestMetricsEndpoint runs the server as main does, with a client token,
// exports and downloads once, and reads /metrics: the library's
// instruments are there in the Prometheus text format, and the token is
// not.
func TestMetricsEndpoint(t *testing.T) {
	t.Parallel()
	const token = "tok-metrics-9d2f7a"
	base, stop := startRun(t, "-patients", "4", "-store", "memory", "-storage", "dir:"+t.TempDir(), "-clients", "alice="+token)
	defer stop()
	get := func(method, url string) (*http.Response, []byte) {
		req, err := http.NewRequest(method, url, nil)
		require.NoError(t, err)
		req.Header.Set("Prefer", "respond-async")
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp, body
	}
	resp, body := get(http.MethodGet, base+"/$export?_type=Patient")
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
	status := resp.Header.Get("Content-Location")
	for range 400 { // a bounded wait, not a timing assertion
		if resp, body = get(http.MethodGet, status); resp.StatusCode != http.StatusAccepted {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m))
	require.Len(t, m.Output, 1)
	resp, _ = get(http.MethodGet, m.Output[0].URL)
	require.Equal(t, http.StatusOK, resp.StatusCode)

	scrape := func() string {
		resp, err := http.Get(strings.TrimSuffix(base, "/fhir") + "/metrics")
		require.NoError(t, err)
		defer resp.Body.Close()
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.Contains(t, resp.Header.Get("Content-Type"), "text/plain")
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return string(b)
	}
	// The worker counts the completion right after the store has it.
	var text string
	require.Eventually(t, func() bool {
		text = scrape()
		return strings.Contains(text, `bulkexport_job_duration_seconds_count{bulkexport_job_level="system",bulkexport_job_outcome="completed"`)
	}, 10*time.Second, 10*time.Millisecond)
	for _, want := range []string{
		`# TYPE bulkexport_job_transitions_total counter`,
		`bulkexport_job_transitions_total{bulkexport_job_level="system",bulkexport_job_state="completed"`,
		`bulkexport_export_resources_total{bulkexport_file_kind="output",bulkexport_resource_type="Patient"`,
		`# TYPE bulkexport_export_bytes_total counter`,
		`bulkexport_poll_requests_total{http_response_status_code="200"`,
		`# TYPE bulkexport_download_bytes_total counter`,
		`# TYPE bulkexport_job_duration_seconds histogram`,
		`bulkexport_jobs_active{bulkexport_job_state="running"`,
		`# TYPE bulkexport_queue_depth gauge`,
		`bulkexport_purge_runs_total{bulkexport_purge_outcome="ok"`,
		`go_goroutines `,
	} {
		require.Contains(t, text, want)
	}
	require.NotContains(t, text, token)
}
