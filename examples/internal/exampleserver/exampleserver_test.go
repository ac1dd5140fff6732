package exampleserver

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// start serves a new server on httptest and runs its worker until the test
// ends.
func start(t *testing.T, cfg Config) (*Server, *httptest.Server) {
	t.Helper()
	ts := httptest.NewUnstartedServer(nil)
	cfg.Addr = ts.Listener.Addr().String()
	if cfg.StorageDir == "" {
		cfg.StorageDir = t.TempDir()
	}
	if cfg.Worker == nil {
		cfg.Worker = &bulkexport.WorkerOptions{PollInterval: 10 * time.Millisecond, Heartbeat: 20 * time.Millisecond}
	}
	srv, err := New(cfg)
	require.NoError(t, err)
	ts.Config.Handler = srv.Handler
	ts.Start()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Exports.Run(ctx) }()
	t.Cleanup(func() {
		ts.Close()
		cancel()
		require.NoError(t, <-done)
	})
	return srv, ts
}

func do(t *testing.T, method, url, token string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, nil)
	require.NoError(t, err)
	req.Header.Set("Accept", "application/fhir+json")
	req.Header.Set("Prefer", "respond-async")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, body
}

func requireOutcome(t *testing.T, body []byte, code fhirbulk.IssueType) {
	t.Helper()
	var oo fhirbulk.OperationOutcome
	require.NoError(t, json.Unmarshal(body, &oo), "%s", body)
	require.Equal(t, "OperationOutcome", oo.ResourceType)
	require.NotEmpty(t, oo.Issue)
	require.Equal(t, code, oo.Issue[0].Code)
}

// exportAll kicks off an export, polls it to completion and returns the
// manifest and the status URL.
func exportAll(t *testing.T, kickoff, token string) (*fhirbulk.Manifest, string) {
	t.Helper()
	resp, body := do(t, http.MethodGet, kickoff, token)
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
	status := resp.Header.Get("Content-Location")
	require.NotEmpty(t, status)
	// A bounded wait, not a timing assertion: the worker is notified at
	// kick-off and a small export takes milliseconds.
	for range 400 {
		resp, body = do(t, http.MethodGet, status, token)
		if resp.StatusCode != http.StatusAccepted {
			break
		}
		time.Sleep(25 * time.Millisecond)
	}
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m))
	return &m, status
}

func TestBaseURL(t *testing.T) {
	t.Parallel()
	for addr, want := range map[string]string{
		"127.0.0.1:8080": "http://127.0.0.1:8080/fhir",
		"localhost:80":   "http://localhost:80/fhir",
		":8080":          "http://localhost:8080/fhir",
		"0.0.0.0:1":      "http://localhost:1/fhir",
		"[::]:9":         "http://localhost:9/fhir",
		"[::1]:9":        "http://[::1]:9/fhir",
		"example.org:80": "http://example.org:80/fhir",
	} {
		got, err := BaseURL(addr)
		require.NoError(t, err, addr)
		require.Equal(t, want, got, addr)
	}
	for _, addr := range []string{"", "localhost", "1.2.3.4:", "a:b:c"} {
		_, err := BaseURL(addr)
		require.Error(t, err, addr)
	}
}

func TestNewRejects(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	for name, cfg := range map[string]Config{
		"no addr":       {StorageDir: dir},
		"no storage":    {Addr: "127.0.0.1:1"},
		"sqlite store":  {Addr: "127.0.0.1:1", StorageDir: dir, Store: "sqlite"},
		"negative":      {Addr: "127.0.0.1:1", StorageDir: dir, Patients: -1},
		"empty token":   {Addr: "127.0.0.1:1", StorageDir: dir, Clients: map[string]string{"a": ""}},
		"shared tokens": {Addr: "127.0.0.1:1", StorageDir: dir, Clients: map[string]string{"a": "t", "b": "t"}},
	} {
		_, err := New(cfg)
		require.Error(t, err, name)
	}
	_, err := New(Config{Addr: "127.0.0.1:1", StorageDir: dir, Store: "memory"})
	require.NoError(t, err)
}

func TestBearerAuth(t *testing.T) {
	t.Parallel()
	auth, err := BearerAuth(map[string]string{"alice": "a-token", "bob": "b-token"})
	require.NoError(t, err)
	for header, want := range map[string]string{
		"Bearer a-token":  "alice",
		"bearer b-token":  "bob",
		"Bearer  a-token": "alice",
		"":                "",
		"Bearer":          "",
		"Bearer ":         "",
		"Basic a-token":   "",
		"Bearer c-token":  "",
		"Bearer a-token2": "",
		"a-token":         "",
	} {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		if header != "" {
			r.Header.Set("Authorization", header)
		}
		got, err := auth(r)
		if want == "" {
			require.ErrorIs(t, err, bulkexport.ErrUnauthorized, header)
			continue
		}
		require.NoError(t, err, header)
		require.Equal(t, want, got, header)
	}
}

func TestMetadata(t *testing.T) {
	t.Parallel()
	srv, ts := start(t, Config{Patients: 1, Clients: map[string]string{"alice": "secret"}})
	resp, body := do(t, http.MethodGet, srv.BaseURL+"/metadata", "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "application/fhir+json", resp.Header.Get("Content-Type"))
	var cs struct {
		ResourceType string   `json:"resourceType"`
		Status       string   `json:"status"`
		Date         string   `json:"date"`
		Kind         string   `json:"kind"`
		FHIRVersion  string   `json:"fhirVersion"`
		Format       []string `json:"format"`
		Instantiates []string `json:"instantiates"`
		Rest         []struct {
			Mode      string `json:"mode"`
			Operation []struct {
				Name, Definition string
			} `json:"operation"`
			Resource []struct {
				Type      string `json:"type"`
				Operation []struct {
					Name, Definition string
				} `json:"operation"`
				SearchParam []struct {
					Name, Type string
				} `json:"searchParam"`
			} `json:"resource"`
		} `json:"rest"`
	}
	require.NoError(t, json.Unmarshal(body, &cs))
	require.Equal(t, "CapabilityStatement", cs.ResourceType)
	require.Equal(t, "active", cs.Status)
	require.NotEmpty(t, cs.Date)
	require.Equal(t, "instance", cs.Kind)
	require.Equal(t, "4.0.1", cs.FHIRVersion)
	require.Equal(t, []string{"json"}, cs.Format)
	require.Contains(t, cs.Instantiates, bulkexport.CapabilityBulkData)
	require.Len(t, cs.Rest, 1)
	require.Equal(t, "server", cs.Rest[0].Mode)
	require.Contains(t, cs.Rest[0].Operation, struct{ Name, Definition string }{"export", bulkexport.OperationExport})
	ops := map[string]string{}
	params := map[string][]string{}
	for _, r := range cs.Rest[0].Resource {
		for _, op := range r.Operation {
			ops[r.Type] = op.Definition
		}
		for _, p := range r.SearchParam {
			params[r.Type] = append(params[r.Type], p.Name)
		}
	}
	require.Equal(t, bulkexport.OperationPatientExport, ops["Patient"])
	require.Equal(t, bulkexport.OperationGroupExport, ops["Group"])
	require.Contains(t, params["Observation"], "code")
	require.Contains(t, params["Condition"], "clinical-status")

	resp, body = do(t, http.MethodPost, srv.BaseURL+"/metadata", "")
	require.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode)
	requireOutcome(t, body, fhirbulk.IssueNotSupported)

	resp, body = do(t, http.MethodGet, ts.URL+"/elsewhere", "")
	require.Equal(t, http.StatusNotFound, resp.StatusCode)
	requireOutcome(t, body, fhirbulk.IssueNotFound)
}

// TestAuth checks that every bulk data endpoint answers 401 with an
// OperationOutcome without a valid token, and that a job is visible to its
// client only.
func TestAuth(t *testing.T) {
	t.Parallel()
	srv, _ := start(t, Config{Patients: 5, Clients: map[string]string{"alice": "a-secret", "bob": "b-secret"}})
	base := srv.BaseURL

	m, status := exportAll(t, base+"/$export?_type=Patient,Observation", "a-secret")
	require.True(t, m.RequiresAccessToken)
	require.NotEmpty(t, m.Output)
	file := m.Output[0].URL

	endpoints := []struct{ method, url string }{
		{http.MethodGet, base + "/$export"},
		{http.MethodGet, base + "/Patient/$export"},
		{http.MethodGet, base + "/Group/all/$export"},
		{http.MethodGet, status},
		{http.MethodDelete, status},
		{http.MethodGet, file},
	}
	for _, ep := range endpoints {
		for _, token := range []string{"", "wrong"} {
			resp, body := do(t, ep.method, ep.url, token)
			require.Equal(t, http.StatusUnauthorized, resp.StatusCode, "%s %s token %q", ep.method, ep.url, token)
			require.Equal(t, "Bearer", resp.Header.Get("WWW-Authenticate"))
			requireOutcome(t, body, fhirbulk.IssueLogin)
		}
	}
	// Another client sees neither the job nor its files.
	for _, u := range []string{status, file} {
		resp, body := do(t, http.MethodGet, u, "b-secret")
		require.Equal(t, http.StatusNotFound, resp.StatusCode)
		requireOutcome(t, body, fhirbulk.IssueNotFound)
	}
	resp, _ := do(t, http.MethodGet, file, "a-secret")
	require.Equal(t, http.StatusOK, resp.StatusCode)
}

func TestGroupExport(t *testing.T) {
	t.Parallel()
	srv, _ := start(t, Config{Patients: 30})

	resp, body := do(t, http.MethodGet, srv.BaseURL+"/Group/nope/$export", "")
	require.Equal(t, http.StatusNotFound, resp.StatusCode)
	requireOutcome(t, body, fhirbulk.IssueNotFound)

	resp, body = do(t, http.MethodGet, srv.BaseURL+"/$export?_typeFilter=Observation%3Fvalue-quantity%3D5", "")
	require.Equal(t, http.StatusBadRequest, resp.StatusCode)
	requireOutcome(t, body, fhirbulk.IssueNotSupported)
	require.Contains(t, string(body), "value-quantity")

	m, _ := exportAll(t, srv.BaseURL+"/Group/cohort-3/$export?_type=Patient,Condition&_typeFilter=Condition%3Fclinical-status%3Dactive", "")
	require.False(t, m.RequiresAccessToken)
	got := map[string][]string{}
	for _, f := range m.Output {
		resp, err := http.Get(f.URL)
		require.NoError(t, err)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 1<<20)
		n := int64(0)
		for sc.Scan() {
			var r struct {
				ResourceType string `json:"resourceType"`
				ID           string `json:"id"`
			}
			require.NoError(t, json.Unmarshal(sc.Bytes(), &r))
			require.Equal(t, f.Type, r.ResourceType)
			got[f.Type] = append(got[f.Type], r.ID)
			n++
		}
		require.NoError(t, sc.Err())
		resp.Body.Close()
		require.Equal(t, *f.Count, n)
	}
	q := &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "cohort-3"}
	want, err := srv.Dataset.Expected(q, "Patient")
	require.NoError(t, err)
	require.Equal(t, []string{"p-3", "p-13", "p-23"}, want)
	require.Equal(t, want, got["Patient"])
	q.TypeFilters = []bulkexport.TypeFilter{{Type: "Condition", Query: "clinical-status=active"}}
	want, err = srv.Dataset.Expected(q, "Condition")
	require.NoError(t, err)
	require.Equal(t, want, got["Condition"])
	require.True(t, strings.HasPrefix(m.Request, srv.BaseURL+"/Group/cohort-3/$export?"))
}

// TestSubsetExport runs a system export with _since, _elements and
// _typeFilter through the protocol.
func TestSubsetExport(t *testing.T) {
	t.Parallel()
	srv, _ := start(t, Config{Patients: 40})
	since := "2025-06-01T00:00:00Z"
	m, _ := exportAll(t, srv.BaseURL+"/$export?_type=Observation,Patient&_since="+since+
		"&_elements=Observation.valueQuantity,gender&_typeFilter=Observation%3Fcode%3Dhttp%3A%2F%2Floinc.org%7C8867-4", "")
	sinceT, err := fhirbulk.ParseInstant(since)
	require.NoError(t, err)
	tx, err := fhirbulk.ParseInstant(m.TransactionTime)
	require.NoError(t, err)
	got := map[string][]string{}
	for _, f := range m.Output {
		resp, err := http.Get(f.URL)
		require.NoError(t, err)
		sc := bufio.NewScanner(resp.Body)
		for sc.Scan() {
			var r map[string]json.RawMessage
			require.NoError(t, json.Unmarshal(sc.Bytes(), &r))
			require.Contains(t, string(r["meta"]), `"SUBSETTED"`)
			keys := []string{}
			for k := range r {
				keys = append(keys, k)
			}
			if f.Type == "Observation" {
				require.ElementsMatch(t, []string{"resourceType", "id", "meta", "status", "code", "valueQuantity"}, keys)
				require.Contains(t, string(r["code"]), `"8867-4"`)
			} else {
				require.ElementsMatch(t, []string{"resourceType", "id", "meta", "gender"}, keys)
			}
			var id string
			require.NoError(t, json.Unmarshal(r["id"], &id))
			got[f.Type] = append(got[f.Type], id)
		}
		require.NoError(t, sc.Err())
		resp.Body.Close()
	}
	for _, typ := range []string{"Observation", "Patient"} {
		q := &bulkexport.Query{Level: fhirbulk.LevelSystem, Since: sinceT, TransactionTime: tx}
		if typ == "Observation" {
			q.TypeFilters = []bulkexport.TypeFilter{{Type: typ, Query: "code=http%3A%2F%2Floinc.org%7C8867-4"}}
		}
		want, err := srv.Dataset.Expected(q, typ)
		require.NoError(t, err)
		require.NotEmpty(t, want, typ)
		require.Equal(t, want, got[typ], typ)
	}
}

// TestPublicBaseURL: behind a TLS-terminating proxy the server announces
// its public base URL in every URL it hands out; a base URL it could not
// serve under is refused.
func TestPublicBaseURL(t *testing.T) {
	t.Parallel()
	srv, ts := start(t, Config{Patients: 2, BaseURL: "https://fhir.example.org/fhir/"})
	require.Equal(t, "https://fhir.example.org/fhir", srv.BaseURL)
	resp, body := do(t, http.MethodGet, ts.URL+"/fhir/$export?_type=Patient", "")
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
	require.True(t, strings.HasPrefix(resp.Header.Get("Content-Location"), "https://fhir.example.org/fhir/$export-poll-status"), resp.Header.Get("Content-Location"))
	resp, body = do(t, http.MethodGet, ts.URL+"/fhir/metadata", "")
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Contains(t, string(body), `"url":"https://fhir.example.org/fhir"`)

	for _, bad := range []string{"fhir.example.org/fhir", "ftp://x/fhir", "https://x/api", "https://x/fhir?a=b", "https:///fhir"} {
		_, err := New(Config{Addr: "127.0.0.1:1", StorageDir: t.TempDir(), BaseURL: bad})
		require.Error(t, err, bad)
	}
}
