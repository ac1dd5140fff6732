package exampleserver

import (
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
)

// countingSource is the dataset, counting Export calls.
type countingSource struct {
	*dataset.Dataset
	exports atomic.Int32
}

func (s *countingSource) Export(ctx context.Context, q *bulkexport.Query, typ string, w bulkexport.ResourceWriter) error {
	s.exports.Add(1)
	return s.Dataset.Export(ctx, q, typ, w)
}

// TestCustomSource: Config.Source is what the Worker exports from, and
// the CapabilityStatement announces no _typeFilter searches for it.
func TestCustomSource(t *testing.T) {
	t.Parallel()
	src := &countingSource{Dataset: dataset.New(4)}
	srv, _ := start(t, Config{Patients: 4, Source: src})
	m, _ := exportAll(t, srv.BaseURL+"/$export?_type=Patient,Observation", "")
	require.Len(t, m.Output, 2)
	require.EqualValues(t, 2, src.exports.Load())

	resp, body := do(t, http.MethodGet, srv.BaseURL+"/metadata", "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.NotContains(t, string(body), `"type":"token"`, "no _typeFilter searches are announced")
	require.True(t, strings.Contains(string(body), `"type":"Observation"`), "%s", body)

	_, err := New(Config{StorageDir: t.TempDir(), Source: src, Pace: 1})
	require.Error(t, err, "Pace with a Source")
}
