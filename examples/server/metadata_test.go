package main

import (
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/examples/internal/exampleserver"
)

// TestSmokeMetadata checks that the example server's GET /fhir/metadata
// advertises bulk export as Handler.Capability().MergeInto puts it: every
// export operation named "export" with the IG's canonical definition, the
// eHealth status operation, and the IG's CapabilityStatement in
// instantiates. It needs no token.
func TestSmokeMetadata(t *testing.T) {
	t.Parallel()
	ts := httptest.NewUnstartedServer(nil)
	srv, err := exampleserver.New(exampleserver.Config{
		Addr:       ts.Listener.Addr().String(),
		Clients:    map[string]string{"alice": "s3cret"},
		Patients:   1,
		StorageDir: t.TempDir(),
		Logger:     slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	require.NoError(t, err)
	ts.Config.Handler = srv.Handler
	ts.Start()
	t.Cleanup(ts.Close)

	resp, body := (&bulkexporttest.Exporter{}).Send(t, http.MethodGet, srv.BaseURL+"/metadata", nil)
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	type op struct{ Name, Definition string }
	var cs struct {
		ResourceType string   `json:"resourceType"`
		Instantiates []string `json:"instantiates"`
		Rest         []struct {
			Operation []op `json:"operation"`
			Resource  []struct {
				Type      string `json:"type"`
				Operation []op   `json:"operation"`
			} `json:"resource"`
		} `json:"rest"`
	}
	require.NoError(t, json.Unmarshal(body, &cs))
	require.Equal(t, "CapabilityStatement", cs.ResourceType)
	require.Contains(t, cs.Instantiates, bulkexport.CapabilityBulkData)
	require.Len(t, cs.Rest, 1)
	require.Contains(t, cs.Rest[0].Operation, op{"export", bulkexport.OperationExport})
	require.Contains(t, cs.Rest[0].Operation, op{"export-poll-status", bulkexport.OperationExportPollStatus})
	byType := map[string][]op{}
	for _, r := range cs.Rest[0].Resource {
		byType[r.Type] = append(byType[r.Type], r.Operation...)
	}
	require.Equal(t, []op{{"export", bulkexport.OperationPatientExport}}, byType["Patient"])
	require.Equal(t, []op{{"export", bulkexport.OperationGroupExport}}, byType["Group"])
}
