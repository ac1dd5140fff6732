package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// start runs the chi application on httptest, with its Worker.
func start(t *testing.T, patients int) (base string) {
	t.Helper()
	var a *app
	e := bulkexporttest.Serve(t, "/api/fhir", func(base string) http.Handler {
		var err error
		a, err = newApp(config{
			baseURL:    base,
			keys:       map[string]string{"k-alice": "alice", "k-bob": "bob"},
			patients:   patients,
			storageDir: t.TempDir(),
			logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
			worker:     bulkexport.WorkerOptions{PollInterval: 10 * time.Millisecond, Heartbeat: 20 * time.Millisecond},
		})
		require.NoError(t, err)
		return a.router
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.exports.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	return e.BaseURL
}

func get(t *testing.T, url string, header http.Header) (*http.Response, []byte) {
	t.Helper()
	e := &bulkexporttest.Exporter{Header: header}
	return e.Send(t, http.MethodGet, url, nil)
}

// TestSmokeExportThroughChi runs exports through the chi router: the
// handler under /api/fhir, behind the host's middleware.
func TestSmokeExportThroughChi(t *testing.T) {
	t.Parallel()
	base := start(t, 12)
	alice := &bulkexporttest.Exporter{BaseURL: base, Header: http.Header{"X-Api-Key": {"k-alice"}}}
	ds := dataset.New(12)

	res := alice.Export(t, "/Patient/$export?_type=Patient,Observation")
	require.True(t, res.Manifest.RequiresAccessToken)
	require.Empty(t, res.Errors)
	for _, typ := range []string{"Patient", "Observation"} {
		want, err := ds.Expected(&bulkexport.Query{Level: fhirbulk.LevelPatient}, typ)
		require.NoError(t, err)
		require.ElementsMatch(t, want, res.IDs(typ), typ)
	}
	for _, f := range res.Manifest.Output {
		require.True(t, strings.HasPrefix(f.URL, base+"/bulkfiles/"), f.URL)
	}

	res = alice.Export(t, "/Group/odd/$export?_type=Patient")
	require.Len(t, res.IDs("Patient"), 6)

	// The host's middleware turns away requests without a key, downloads
	// included; the client bound to the job through the context is the
	// only one that sees it.
	resp, body := get(t, base+"/$export", nil)
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	require.Contains(t, string(body), `"login"`)
	resp, _ = get(t, res.Manifest.Output[0].URL, nil)
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	resp, _ = get(t, res.StatusURL, http.Header{"X-Api-Key": {"k-bob"}})
	require.Equal(t, http.StatusNotFound, resp.StatusCode)
	resp, _ = get(t, res.Manifest.Output[0].URL, http.Header{"X-Api-Key": {"k-bob"}})
	require.Equal(t, http.StatusNotFound, resp.StatusCode)

	// Cancel through the router.
	statusURL := alice.Kickoff(t, "/$export")
	resp, _ = alice.Send(t, http.MethodDelete, statusURL, nil)
	require.Contains(t, []int{http.StatusAccepted, http.StatusNotFound}, resp.StatusCode, "cancelled, or already complete")
}

// TestRoutesCoexist checks that the host's own routes and the bulk data
// routes share the prefix without shadowing each other.
func TestRoutesCoexist(t *testing.T) {
	t.Parallel()
	base := start(t, 3)
	key := http.Header{"X-Api-Key": {"k-alice"}}

	resp, body := get(t, base+"/Patient/p-2", key)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, string(body), `"id":"p-2"`)

	// /Patient/$export reaches the bulk handler, not the read route: it
	// answers 400 for the missing Prefer header (which Send adds to a
	// kick-off unless told not to).
	resp, body = get(t, base+"/Patient/$export", http.Header{"X-Api-Key": {"k-alice"}, "Prefer": nil})
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	require.Contains(t, string(body), "respond-async")
	resp, _ = get(t, base+"/Group/nope/$export", key)
	require.Equal(t, http.StatusNotFound, resp.StatusCode)

	resp, _ = get(t, strings.TrimSuffix(base, "/api/fhir")+"/healthz", nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)

	// The CapabilityStatement needs no key and advertises the operations.
	resp, body = get(t, base+"/metadata", nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	var cs struct {
		Instantiates []string `json:"instantiates"`
		Rest         []struct {
			Operation []struct{ Name, Definition string } `json:"operation"`
			Resource  []struct {
				Type      string                              `json:"type"`
				Operation []struct{ Name, Definition string } `json:"operation"`
			} `json:"resource"`
		} `json:"rest"`
	}
	require.NoError(t, json.Unmarshal(body, &cs))
	require.Contains(t, cs.Instantiates, bulkexport.CapabilityBulkData)
	require.Contains(t, cs.Rest[0].Operation, struct{ Name, Definition string }{"export", bulkexport.OperationExport})
	ops := map[string]string{}
	for _, r := range cs.Rest[0].Resource {
		for _, op := range r.Operation {
			ops[r.Type+"/"+op.Name] = op.Definition
		}
	}
	require.Equal(t, bulkexport.OperationPatientExport, ops["Patient/export"])
	require.Equal(t, bulkexport.OperationGroupExport, ops["Group/export"])
}

// TestRun runs main's run on an ephemeral port until its context ends.
func TestRun(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pr, pw := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"-addr", "127.0.0.1:0", "-patients", "2", "-storage", t.TempDir()}, pw, io.Discard)
		pw.Close()
	}()
	line, err := bufio.NewReader(pr).ReadString('\n')
	require.NoError(t, err)
	base, ok := strings.CutPrefix(strings.TrimSpace(line), "bulkexport chi example: base URL ")
	require.True(t, ok, line)

	e := &bulkexporttest.Exporter{BaseURL: base, Header: http.Header{"X-Api-Key": {"k-bob"}}}
	res := e.Export(t, "/$export?_type=Patient")
	require.Len(t, res.IDs("Patient"), 2)

	cancel()
	require.NoError(t, <-done)

	require.Error(t, run(context.Background(), []string{"-keys", "nokey"}, io.Discard, io.Discard))
}
