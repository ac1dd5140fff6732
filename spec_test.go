package bulkexport_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// kickoff sends a kick-off with the given method, Prefer header and body.
func kickoff(t *testing.T, srv *bulkexporttest.Server, method, path, prefer string, body []byte) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, srv.BaseURL+path, strings.NewReader(string(body)))
	require.NoError(t, err)
	req.Header.Set("Prefer", prefer)
	if body != nil {
		req.Header.Set("Content-Type", "application/fhir+json")
	}
	resp, err := srv.Client().Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b := make([]byte, 0, 512)
	buf := make([]byte, 512)
	for {
		n, err := resp.Body.Read(buf)
		b = append(b, buf[:n]...)
		if err != nil {
			break
		}
	}
	return resp, b
}

func TestOrganizeOutputByPatient(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source: clinicalSource(t, 4),
		// Each block is 5 lines (header, Patient, 2 Observations, a
		// Condition): files of 3 lines force blocks across files.
		Worker: bulkexport.WorkerOptions{MaxFileResources: 3},
	})
	res := srv.Export(t, "/Patient/$export?organizeOutputBy=Patient")
	m := res.Manifest
	require.Equal(t, "Patient", m.OutputOrganizedBy)
	require.NotEmpty(t, m.Output)
	for _, f := range m.Output {
		require.Empty(t, f.Type, "organized output has no type")
	}
	require.Empty(t, m.Output[len(m.Output)-1].ContinuesInFile)

	// Read the blocks back: header, the Patient, then its resources; a
	// file that continues a block repeats the header, and the file before
	// it says so in continuesInFile.
	var blocks [][]string
	var current string
	continuations := 0
	for i, f := range m.Output {
		resp, body := srv.Send(t, http.MethodGet, f.URL, nil)
		require.Equal(t, http.StatusOK, resp.StatusCode)
		lines := strings.Split(strings.TrimSpace(string(body)), "\n")
		require.Contains(t, lines[0], `"name":"header"`, "every file starts with a block header")
		for _, l := range lines {
			var r struct {
				ResourceType string `json:"resourceType"`
				ID           string `json:"id"`
				Parameter    []struct {
					ValueReference struct{ Reference string } `json:"valueReference"`
				} `json:"parameter"`
			}
			require.NoError(t, json.Unmarshal([]byte(l), &r))
			if r.ResourceType == "Parameters" {
				ref := r.Parameter[0].ValueReference.Reference
				if l == lines[0] && i > 0 {
					continues := m.Output[i-1].ContinuesInFile == f.URL
					require.Equal(t, continues, ref == current, "continuesInFile of the file before %s", f.URL)
					if continues {
						continuations++
					}
				}
				if ref != current {
					blocks = append(blocks, nil)
					current = ref
				}
				continue
			}
			blocks[len(blocks)-1] = append(blocks[len(blocks)-1], r.ResourceType+"/"+r.ID)
		}
	}
	require.Positive(t, continuations, "blocks of 5 lines in files of 3 must span files")
	require.Len(t, blocks, 4)
	for i, b := range blocks {
		p := fmt.Sprintf("p%d", i)
		require.Equal(t, []string{"Patient/" + p, "Condition/" + p + "-c", "Observation/" + p + "-hr", "Observation/" + p + "-wt"}, b)
	}
}

func TestOrganizeOutputByUnsupported(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: clinicalSource(t, 2)})
	resp, body := kickoff(t, srv, http.MethodGet, "/$export?organizeOutputBy=Observation", "respond-async", nil)
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	require.Contains(t, string(body), `"expression":["organizeOutputBy"]`)

	resp, _ = kickoff(t, srv, http.MethodGet, "/$export?_type=Patient&organizeOutputBy=Observation", "respond-async, handling=lenient", nil)
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
	res := srv.Collect(t, resp.Header.Get("Content-Location"))
	require.Empty(t, res.Manifest.OutputOrganizedBy)
	require.Len(t, res.Output["Patient"], 2)
	require.Len(t, res.Errors, 1)
	require.Contains(t, string(res.Errors[0]), "organizeOutputBy")
}

func TestPartialManifests(t *testing.T) {
	t.Parallel()
	src := clinicalSource(t, 6)
	gate := make(chan struct{})
	var held atomic.Bool
	src.OnResource = func(ctx context.Context, typ string, n int) error {
		// Hold the Patient export at its last patient, until the test has
		// seen the partial manifest.
		if typ == "Patient" && n == 5 && held.CompareAndSwap(false, true) {
			select {
			case <-gate:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	}
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source:  src,
		Handler: bulkexport.Options{ManifestPageSize: 2},
		Worker:  bulkexport.WorkerOptions{MaxFileResources: 1, CheckpointInterval: time.Nanosecond, TypeConcurrency: 1},
	})
	resp, _ := kickoff(t, srv, http.MethodGet, "/$export?_type=Patient,Condition&allowPartialManifests=true", "respond-async", nil)
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
	statusURL := resp.Header.Get("Content-Location")

	// Five Patient files are final: pages 1 and 2 are full and served
	// with the 202; page 3 is not.
	var page1 fhirbulk.Manifest
	require.Eventually(t, func() bool {
		resp, body := srv.Status(t, statusURL)
		if resp.StatusCode != http.StatusAccepted || len(body) == 0 {
			return false
		}
		require.Equal(t, "application/json", resp.Header.Get("Content-Type"))
		require.NoError(t, json.Unmarshal(body, &page1))
		return len(page1.Link) == 1
	}, 20*time.Second, 5*time.Millisecond)
	require.Len(t, page1.Output, 2)
	require.NotNil(t, page1.Error)
	require.Equal(t, "next", page1.Link[0].Relation)
	resp, body := srv.Status(t, page1.Link[0].URL)
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
	var page2 fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &page2))
	require.Len(t, page2.Output, 2)
	require.Empty(t, page2.Link, "page 3 is not final yet")
	resp, body = srv.Status(t, statusURL+"&_page=3")
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
	require.Empty(t, body)

	close(gate)
	code, _ := srv.Wait(t, statusURL)
	require.Equal(t, http.StatusOK, code)

	// Walk the pages: served pages are unchanged but for a next link, and
	// the pages together list every file once.
	var all []fhirbulk.ManifestFile
	url := statusURL
	for k := 1; url != ""; k++ {
		resp, body := srv.Status(t, url)
		require.Equal(t, http.StatusOK, resp.StatusCode, "page %d", k)
		var m fhirbulk.Manifest
		require.NoError(t, json.Unmarshal(body, &m))
		switch k {
		case 1:
			require.Equal(t, page1.Output, m.Output)
		case 2:
			require.Equal(t, page2.Output, m.Output)
			require.Len(t, m.Link, 1, "page 2 gained its next link")
		}
		all = append(all, m.Output...)
		url = ""
		if len(m.Link) > 0 {
			url = m.Link[0].URL
		}
	}
	require.Len(t, all, 12, "6 Patient files and 6 Condition files")
	seen := map[string]bool{}
	for _, f := range all {
		require.False(t, seen[f.URL], "listed once")
		seen[f.URL] = true
	}
	resp, _ = srv.Status(t, statusURL+"&_page=99")
	require.Equal(t, http.StatusNotFound, resp.StatusCode)
}

func TestIncludeAssociatedData(t *testing.T) {
	t.Parallel()
	src := clinicalSource(t, 2)
	for i, rec := range []string{"2025-02-01T00:00:00Z", "2025-03-01T00:00:00Z"} {
		require.NoError(t, src.Add(fmt.Sprintf(`{"resourceType":"Provenance","id":"prov-%d","target":[{"reference":"Observation/p0-hr"}],"recorded":%q}`, i, rec)))
	}
	require.NoError(t, src.Add(`{"resourceType":"Provenance","id":"prov-p1","target":[{"reference":"Patient/p1"}],"recorded":"2025-01-01T00:00:00Z"}`))
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src})

	tests := []struct {
		query string
		want  []string
	}{
		{"", []string{"prov-0", "prov-1", "prov-p1"}}, // the IG's default: every Provenance
		{"&includeAssociatedData=RelevantProvenanceResources", []string{"prov-0", "prov-1", "prov-p1"}},
		{"&includeAssociatedData=LatestProvenanceResources", []string{"prov-1", "prov-p1"}},
		{"&includeAssociatedData=LatestProvenanceResources,RelevantProvenanceResources", []string{"prov-0", "prov-1", "prov-p1"}},
	}
	for _, tc := range tests {
		res := srv.Export(t, "/Patient/$export?_type=Provenance"+tc.query)
		require.ElementsMatch(t, tc.want, res.IDs("Provenance"), tc.query)
	}
	resp, body := kickoff(t, srv, http.MethodGet, "/$export?includeAssociatedData=_everything", "respond-async", nil)
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	require.Contains(t, string(body), "includeAssociatedData")
}

func TestSeparateExportStatus(t *testing.T) {
	t.Parallel()
	src := clinicalSource(t, 3)
	gate := make(chan struct{})
	src.OnResource = func(ctx context.Context, typ string, n int) error {
		select {
		case <-gate:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src})
	resp, _ := kickoff(t, srv, http.MethodGet, "/$export?_type=Patient", "respond-async, separate-export-status", nil)
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
	require.Equal(t, "respond-async, separate-export-status", resp.Header.Get("Preference-Applied"))
	statusURL := resp.Header.Get("Content-Location")

	resp, _ = srv.Status(t, statusURL)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "202 Accepted", resp.Header.Get("X-Export-Status"))
	require.NotEmpty(t, resp.Header.Get("X-Progress"))

	close(gate)
	require.Eventually(t, func() bool {
		resp, _ := srv.Status(t, statusURL)
		return resp.Header.Get("X-Export-Status") == "200 OK"
	}, 20*time.Second, 5*time.Millisecond)
	resp, body := srv.Status(t, statusURL)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m))
	require.Len(t, m.Output, 1)

	// A failed job: 200, the failure in X-Export-Status.
	src2 := clinicalSource(t, 1)
	src2.OnResource = func(context.Context, string, int) error { return fmt.Errorf("boom") }
	srv2 := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src2})
	resp, _ = kickoff(t, srv2, http.MethodGet, "/$export", "respond-async,separate-export-status", nil)
	statusURL = resp.Header.Get("Content-Location")
	require.Eventually(t, func() bool {
		resp, _ := srv2.Status(t, statusURL)
		return resp.Header.Get("X-Export-Status") == "500 Internal Server Error"
	}, 20*time.Second, 5*time.Millisecond)
	resp, body = srv2.Status(t, statusURL)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, string(body), "OperationOutcome")

	// A server that does not honour it answers as usual.
	srv3 := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: clinicalSource(t, 1), Handler: bulkexport.Options{DisableSeparateExportStatus: true}})
	resp, _ = kickoff(t, srv3, http.MethodGet, "/$export", "respond-async, separate-export-status", nil)
	require.Empty(t, resp.Header.Get("Preference-Applied"))
	code, _ := srv3.Wait(t, resp.Header.Get("Content-Location"))
	require.Equal(t, http.StatusOK, code)
}

func TestManifestSTU4(t *testing.T) {
	t.Parallel()
	src := clinicalSource(t, 2)
	src.AddDeleted("Patient", "gone", epoch.Add(time.Hour))
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source:  src,
		Handler: bulkexport.Options{ManifestVersion: bulkexport.ManifestSTU4},
	})
	resp, body := kickoff(t, srv, http.MethodGet, "/$export", "respond-async", nil)
	require.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode, "STU4 kick-off is POST only")
	require.Equal(t, "POST", resp.Header.Get("Allow"))
	require.Contains(t, string(body), "OperationOutcome")

	params := `{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Patient"},{"name":"_since","valueInstant":"2024-12-01T00:00:00Z"},{"name":"_bogus","valueString":"x"}]}`
	resp, _ = kickoff(t, srv, http.MethodPost, "/$export", "respond-async, handling=lenient", []byte(params))
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
	code, body := srv.Wait(t, resp.Header.Get("Content-Location"))
	require.Equal(t, http.StatusOK, code)
	var m map[string]any
	require.NoError(t, json.Unmarshal(body, &m))
	require.Equal(t, fhirbulk.ManifestTypeURL, m["manifestType"])
	require.Equal(t, "application/fhir+ndjson", m["outputFormat"])
	require.NotContains(t, m, "request")
	require.NotContains(t, m, "error")
	require.Len(t, m["outcome"], 1, "the ignored parameter")
	out := m["output"].([]any)[0].(map[string]any)
	require.Equal(t, "Patient", out["type"])
	require.Greater(t, out["fileSize"], 0.0)
	del := m["deleted"].([]any)[0].(map[string]any)
	require.NotContains(t, del, "type", "STU4 deleted items have no type")
	require.Contains(t, del, "fileSize")
}
