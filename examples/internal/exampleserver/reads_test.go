package exampleserver

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

type testBundle struct {
	ResourceType string `json:"resourceType"`
	Type         string `json:"type"`
	Total        int    `json:"total"`
	Link         []struct {
		Relation, URL string
	} `json:"link"`
	Entry []struct {
		FullURL  string        `json:"fullUrl"`
		Resource groupResource `json:"resource"`
	} `json:"entry"`
}

// TestGroupReads: GET Group lists every group the Group export accepts (and
// each one's export answers 202); name and _count narrow it; GET Group/{id}
// reads one with its members; unknown ids and bad parameters get
// OperationOutcomes; with clients configured, reads need a token.
func TestGroupReads(t *testing.T) {
	t.Parallel()
	srv, _ := start(t, Config{Patients: 25, Clients: map[string]string{"alice": "secret"}})

	resp, body := do(t, http.MethodGet, srv.BaseURL+"/Group", "")
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
	requireOutcome(t, body, fhirbulk.IssueLogin)

	resp, body = do(t, http.MethodGet, srv.BaseURL+"/Group", "secret")
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	require.Equal(t, "application/fhir+json", resp.Header.Get("Content-Type"))
	var b testBundle
	require.NoError(t, json.Unmarshal(body, &b))
	require.Equal(t, "Bundle", b.ResourceType)
	require.Equal(t, "searchset", b.Type)
	require.Equal(t, len(dataset.Groups()), b.Total)
	require.Len(t, b.Entry, b.Total)
	for _, e := range b.Entry {
		g := e.Resource
		require.Equal(t, "Group", g.ResourceType)
		require.Equal(t, srv.BaseURL+"/Group/"+g.ID, e.FullURL)
		require.NotEmpty(t, g.Name)
		require.Len(t, g.Member, g.Quantity)
		// Every listed group is one the Group export accepts, with the
		// members it lists.
		m, _ := exportAll(t, srv.BaseURL+"/Group/"+g.ID+"/$export?_type=Patient", "secret")
		var n int64
		for _, f := range m.Output {
			require.NotNil(t, f.Count)
			n += *f.Count
		}
		require.EqualValues(t, g.Quantity, n, g.ID)
	}

	resp, body = do(t, http.MethodGet, srv.BaseURL+"/Group?name=cohort&_count=4", "secret")
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	b = testBundle{}
	require.NoError(t, json.Unmarshal(body, &b))
	require.Equal(t, 10, b.Total)
	require.Len(t, b.Entry, 4)
	require.Equal(t, "cohort-0", b.Entry[0].Resource.ID)
	var next string
	for _, l := range b.Link {
		if l.Relation == "next" {
			next = l.URL
		}
	}
	require.NotEmpty(t, next)
	resp, body = do(t, http.MethodGet, next, "secret")
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	b = testBundle{}
	require.NoError(t, json.Unmarshal(body, &b))
	require.Equal(t, "cohort-4", b.Entry[0].Resource.ID)

	resp, body = do(t, http.MethodGet, srv.BaseURL+"/Group/even", "secret")
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	var g groupResource
	require.NoError(t, json.Unmarshal(body, &g))
	require.Equal(t, "even", g.ID)
	require.Equal(t, 12, g.Quantity)
	require.Equal(t, "Patient/p-2", g.Member[0].Entity.Reference)
	require.Equal(t, "Patient/p-24", g.Member[11].Entity.Reference)

	for name, tc := range map[string]struct {
		url    string
		status int
		code   fhirbulk.IssueType
	}{
		"unknown id":     {"/Group/nope", http.StatusNotFound, fhirbulk.IssueNotFound},
		"bad _count":     {"/Group?_count=x", http.StatusBadRequest, fhirbulk.IssueInvalid},
		"negative count": {"/Group?_count=-1", http.StatusBadRequest, fhirbulk.IssueInvalid},
		"bad _offset":    {"/Group?_offset=1.5", http.StatusBadRequest, fhirbulk.IssueInvalid},
	} {
		t.Run(name, func(t *testing.T) {
			resp, body := do(t, http.MethodGet, srv.BaseURL+tc.url, "secret")
			require.Equal(t, tc.status, resp.StatusCode, "%s", body)
			requireOutcome(t, body, tc.code)
		})
	}
}

// TestGroupReadsInMetadata: the CapabilityStatement states the Group reads
// beside Group's $export.
func TestGroupReadsInMetadata(t *testing.T) {
	t.Parallel()
	srv, _ := start(t, Config{Patients: 1})
	resp, body := do(t, http.MethodGet, srv.BaseURL+"/metadata", "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	var cs struct {
		Rest []struct {
			Resource []struct {
				Type        string `json:"type"`
				Interaction []struct {
					Code string `json:"code"`
				} `json:"interaction"`
				Operation []struct {
					Name string `json:"name"`
				} `json:"operation"`
			} `json:"resource"`
		} `json:"rest"`
	}
	require.NoError(t, json.Unmarshal(body, &cs))
	found := false
	for _, r := range cs.Rest[0].Resource {
		if r.Type != "Group" {
			continue
		}
		found = true
		require.Len(t, r.Interaction, 2)
		require.Equal(t, "read", r.Interaction[0].Code)
		require.Equal(t, "search-type", r.Interaction[1].Code)
		require.Len(t, r.Operation, 1)
		require.Equal(t, "export", r.Operation[0].Name)
	}
	require.True(t, found, "no Group in the CapabilityStatement")
}

// TestRoutesBesideReads: on the example server's one http.ServeMux, the
// host's GET /fhir/Patient/{id} and the bulk data routes coexist: a
// Patient read is the host's, GET /fhir/Patient/$export a kick-off; any
// other request under the base reaches the bulk data handler, which
// answers it with an OperationOutcome.
func TestRoutesBesideReads(t *testing.T) {
	t.Parallel()
	srv, ts := start(t, Config{Patients: 4})
	base := ts.URL + "/fhir"

	resp, body := do(t, http.MethodGet, base+"/Patient/p-2", "")
	require.Equal(t, http.StatusOK, resp.StatusCode, string(body))
	require.Contains(t, string(body), `"id":"p-2"`)
	resp, body = do(t, http.MethodGet, base+"/Patient/p-99", "")
	require.Equal(t, http.StatusNotFound, resp.StatusCode, string(body))

	resp, body = do(t, http.MethodGet, base+"/Patient/$export?_type=Patient", "")
	require.Equal(t, http.StatusAccepted, resp.StatusCode, string(body))
	require.True(t, strings.HasPrefix(resp.Header.Get("Content-Location"), srv.BaseURL+"/$export-poll-status"))

	resp, body = do(t, http.MethodPut, base+"/$export", "")
	require.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode, string(body))
	require.Contains(t, string(body), `"resourceType":"OperationOutcome"`)
	resp, body = do(t, http.MethodGet, base+"/Observation/$everything", "")
	require.Equal(t, http.StatusNotFound, resp.StatusCode, string(body))
	require.Contains(t, string(body), `"resourceType":"OperationOutcome"`)
}
