package client_test

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/client"
)

// The client reads every answer shape the library's handler can give:
// separate-export-status, the STU4 manifest (outcome[]), and paged
// manifests.
func TestServerVariants(t *testing.T) {
	t.Parallel()
	src := bulkexporttest.NewSource()
	for _, id := range []string{"a", "b", "c"} {
		require.NoError(t, src.Add(`{"resourceType":"Patient","id":"`+id+`"}`))
	}
	tests := []struct {
		name string
		opts bulkexport.Options
		req  client.KickoffRequest
	}{
		{"separate-export-status", bulkexport.Options{}, client.KickoffRequest{SeparateExportStatus: true}},
		{"STU4", bulkexport.Options{ManifestVersion: bulkexport.ManifestSTU4}, client.KickoffRequest{Method: "POST", Lenient: true, Types: []string{"Patient"}}},
		{"paged", bulkexport.Options{ManifestPageSize: 1}, client.KickoffRequest{AllowPartialManifests: true}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
				Source: src, Handler: tc.opts,
				Worker: bulkexport.WorkerOptions{MaxFileResources: 1},
			})
			c, err := client.New(srv.BaseURL, &client.Options{HTTPClient: srv.Client(), MinPollInterval: 1})
			require.NoError(t, err)
			req := tc.req
			if tc.name == "STU4" {
				// An unknown parameter under lenient handling puts an
				// OperationOutcome in outcome[].
				req.Elements = []string{"Patient.bogus-Element"}
			}
			job, err := c.Kickoff(context.Background(), &req)
			require.NoError(t, err)
			st, err := c.Wait(context.Background(), job.StatusURL, nil)
			require.NoError(t, err)
			require.True(t, st.Complete)
			require.Len(t, st.Manifest.Output, 3)
			if tc.name == "STU4" {
				require.Len(t, st.Manifest.Error, 1, "outcome[] is read as error[]")
			}
			n, err := c.Download(context.Background(), st.Manifest, t.TempDir(), nil)
			_ = n
			require.NoError(t, err)
		})
	}
}
