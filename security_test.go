package bulkexport_test

import (
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
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// snapshot is the store's content, for "nothing changed" assertions.
func snapshot(t *testing.T, store bulkexport.JobStore) string {
	jobs, err := store.List(context.Background(), bulkexport.Filter{})
	require.NoError(t, err)
	b, err := json.Marshal(jobs)
	require.NoError(t, err)
	return string(b)
}

// TestMaliciousRequests walks malformed and hostile requests through a
// server with one completed job, and checks each gets a 4xx
// OperationOutcome and leaves the store as it was.
func TestMaliciousRequests(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source: clinicalSource(t, 2),
		Handler: bulkexport.Options{
			Authenticate: tokenAuth(map[string]string{"good": "alice", "other": "mallory"}),
			MaxBodyBytes: 64 << 10,
		},
	})
	srv.Header.Set("Authorization", "Bearer good")
	res := srv.Export(t, "/$export?_type=Patient")
	job := lastJob(t, srv)
	file := res.Manifest.Output[0].URL
	status := res.StatusURL
	base := srv.BaseURL
	deep := strings.Repeat(`{"a":`, 100000) + "1" + strings.Repeat("}", 100000)

	type tc struct {
		name, method, url, body string
		header                  map[string]string
	}
	auth := map[string]string{"Authorization": "Bearer good", "Prefer": "respond-async"}
	with := func(kv ...string) map[string]string {
		m := map[string]string{"Authorization": "Bearer good", "Prefer": "respond-async"}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	cases := []tc{
		// Path traversal and odd paths.
		{"traversal in file name", "GET", base + "/bulkfiles/" + job.ID + "/..%2F..%2F..%2Fetc%2Fpasswd", "", auth},
		{"traversal in job id", "GET", base + "/bulkfiles/..%2F..%2Fetc/passwd", "", auth},
		{"dot-dot job", "GET", base + "/bulkfiles/%2E%2E/x", "", auth},
		{"backslash traversal", "GET", base + "/bulkfiles/" + job.ID + "/..%5C..%5Cx", "", auth},
		{"NUL in file name", "GET", base + "/bulkfiles/" + job.ID + "/a%00b", "", auth},
		{"file of another client", "GET", file, "", map[string]string{"Authorization": "Bearer other"}},
		{"file without token", "GET", file, "", nil},
		{"unlisted file", "GET", base + "/bulkfiles/" + job.ID + "/Patient.000099.ndjson", "", auth},
		{"absolute path as id", "GET", base + "/$export-poll-status?_jobId=%2Fetc%2Fpasswd", "", auth},
		{"huge job id", "GET", base + "/$export-poll-status?_jobId=" + strings.Repeat("a", 5000), "", auth},
		{"unknown route", "GET", base + "/$export-poll-status-x", "", auth},
		{"group without id", "GET", base + "/Group/$export", "", auth},
		{"group id with slash", "GET", base + "/Group/a%2Fb/$export", "", auth},
		{"group id too long", "GET", base + "/Group/" + strings.Repeat("g", 100) + "/$export", "", auth},
		// Wrong methods.
		{"PUT kick-off", "PUT", base + "/$export", "", auth},
		{"PATCH status", "PATCH", status, "", auth},
		{"DELETE file", "DELETE", file, "", auth},
		{"POST file", "POST", file, "", auth},
		{"TRACE status", "TRACE", status, "", auth},
		// Authentication.
		{"no token kick-off", "GET", base + "/$export", "", map[string]string{"Prefer": "respond-async"}},
		{"bad token kick-off", "GET", base + "/$export", "", map[string]string{"Prefer": "respond-async", "Authorization": "Bearer nope"}},
		{"basic auth", "GET", base + "/$export", "", map[string]string{"Prefer": "respond-async", "Authorization": "Basic Z29vZDo="}},
		{"other client's status", "GET", status, "", map[string]string{"Authorization": "Bearer other"}},
		{"other client's cancel", "DELETE", status, "", map[string]string{"Authorization": "Bearer other"}},
		// Invalid UTF-8 and encodings.
		{"invalid UTF-8 in _type", "GET", base + "/$export?_type=%FF%FE", "", auth},
		{"invalid UTF-8 in _since", "GET", base + "/$export?_since=%C3%28", "", auth},
		{"bad percent encoding", "GET", base + "/$export?_type=%ZZ", "", auth},
		{"bad percent in status", "GET", base + "/$export-poll-status?_jobId=%ZZ", "", auth},
		{"invalid UTF-8 body", "POST", base + "/$export", "{\"resourceType\":\"Parameters\",\"parameter\":[{\"name\":\"_type\",\"valueString\":\"\xff\"}]}", with("Content-Type", "application/fhir+json")},
		// Oversized input.
		{"huge _type value", "GET", base + "/$export?_type=" + strings.Repeat("A", 20000), "", auth},
		{"too many _type values", "GET", base + "/$export?_type=" + strings.Repeat("Patient,", 1500) + "Patient", "", auth},
		{"too many parameters", "GET", base + "/$export?" + strings.Repeat("_typeFilter=Patient%3Fgender%3Dmale&", 4500), "", auth},
		{"huge body", "POST", base + "/$export", `{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"` + strings.Repeat("A", 100<<10) + `"}]}`, with("Content-Type", "application/fhir+json")},
		{"nested JSON bomb", "POST", base + "/$export", deep[:60000], with("Content-Type", "application/fhir+json")},
		{"huge status body", "POST", status[:strings.Index(status, "?")], strings.Repeat(" ", 70<<10), with("Content-Type", "application/fhir+json")},
		// Malformed Parameters.
		{"not JSON", "POST", base + "/$export", "{{{", with("Content-Type", "application/fhir+json")},
		{"array body", "POST", base + "/$export", `[1,2,3]`, with("Content-Type", "application/fhir+json")},
		{"wrong resourceType", "POST", base + "/$export", `{"resourceType":"Patient"}`, with("Content-Type", "application/fhir+json")},
		{"parameter without name", "POST", base + "/$export", `{"resourceType":"Parameters","parameter":[{"valueString":"x"}]}`, with("Content-Type", "application/fhir+json")},
		{"two values", "POST", base + "/$export", `{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Patient","valueCode":"Patient"}]}`, with("Content-Type", "application/fhir+json")},
		{"number value", "POST", base + "/$export", `{"resourceType":"Parameters","parameter":[{"name":"_since","valueInteger":-99999999999999999999}]}`, with("Content-Type", "application/fhir+json")},
		{"null value", "POST", base + "/$export", `{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":null}]}`, with("Content-Type", "application/fhir+json")},
		{"XML body", "POST", base + "/$export", `<Parameters/>`, with("Content-Type", "application/fhir+xml")},
		{"status body with other param", "POST", status[:strings.Index(status, "?")], `{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"x"}]}`, with("Content-Type", "application/fhir+json")},
		// Bad parameter values.
		{"negative _since year", "GET", base + "/$export?_since=-2020-01-01T00:00:00Z", "", auth},
		{"overflowing _since", "GET", base + "/$export?_since=99999999-01-01T00:00:00Z", "", auth},
		{"_since month 13", "GET", base + "/$export?_since=2020-13-01T00:00:00Z", "", auth},
		{"_until before _since", "GET", base + "/$export?_since=2021-01-01T00:00:00Z&_until=2020-01-01T00:00:00Z", "", auth},
		{"_type injection", "GET", base + "/$export?_type=Patient%3BDROP%20TABLE", "", auth},
		{"_typeFilter without ?", "GET", base + "/$export?_typeFilter=Patient", "", auth},
		{"_typeFilter with _include", "GET", base + "/$export?_typeFilter=Patient%3F_include%3D*", "", auth},
		{"_typeFilter type outside _type", "GET", base + "/$export?_type=Patient&_typeFilter=Observation%3Fcode%3D1", "", auth},
		{"patient by GET", "GET", base + "/Patient/$export?patient=Patient/1", "", auth},
		{"allowPartialManifests not boolean", "GET", base + "/$export?allowPartialManifests=yes", "", auth},
		{"_outputFormat csv", "GET", base + "/$export?_outputFormat=text/csv", "", auth},
		{"_outputFormat twice", "GET", base + "/$export?_outputFormat=ndjson&_outputFormat=ndjson", "", auth},
		{"unknown parameter", "GET", base + "/$export?_exportId=x", "", auth},
		{"negative page", "GET", status + "&_page=-1", "", auth},
		{"overflowing page", "GET", status + "&_page=99999999999999999999", "", auth},
		{"_jobId twice", "GET", status + "&_jobId=" + job.ID, "", auth},
		{"unknown status parameter", "GET", status + "&_jobid=x", "", auth},
		// Headers.
		{"no Prefer", "GET", base + "/$export", "", map[string]string{"Authorization": "Bearer good"}},
		{"Prefer without respond-async", "GET", base + "/$export", "", with("Prefer", "handling=lenient")},
		{"Accept XML only", "GET", base + "/$export", "", with("Accept", "application/fhir+xml")},
		{"Accept with q=0 JSON", "GET", base + "/$export", "", with("Accept", "application/fhir+json;q=0")},
		{"_format xml", "GET", base + "/$export?_format=xml", "", auth},
		{"huge Prefer header", "GET", base + "/$export?_since=x", "", with("Prefer", "respond-async,"+strings.Repeat("x=y,", 5000))},
	}
	require.GreaterOrEqual(t, len(cases), 50)
	before := snapshot(t, srv.Store)
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	for _, c := range cases {
		req, err := http.NewRequest(c.method, c.url, strings.NewReader(c.body))
		require.NoError(t, err, c.name)
		for k, v := range c.header {
			req.Header.Set(k, v)
		}
		resp, err := client.Do(req)
		require.NoError(t, err, c.name)
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		require.True(t, resp.StatusCode >= 400 && resp.StatusCode < 500, "%s: status %d: %s", c.name, resp.StatusCode, body)
		if c.method != http.MethodHead {
			var oo fhirbulk.OperationOutcome
			require.NoError(t, json.Unmarshal(body, &oo), "%s: %s", c.name, body)
			require.Equal(t, "OperationOutcome", oo.ResourceType, c.name)
			require.NotEmpty(t, oo.Issue, c.name)
		}
		require.Equal(t, before, snapshot(t, srv.Store), "%s changed the store", c.name)
	}
	// The job and its file are intact.
	resp, _ := srv.Status(t, status)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	resp, _ = srv.Send(t, http.MethodGet, file, nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
}

func TestActiveJobLimit(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source:   clinicalSource(t, 1),
		NoWorker: true,
		Handler: bulkexport.Options{
			MaxActiveJobsPerClient: 2,
			Authenticate:           tokenAuth(map[string]string{"a": "alice", "b": "bob"}),
		},
	})
	srv.Header.Set("Authorization", "Bearer a")
	srv.Kickoff(t, "/$export")
	first := srv.Kickoff(t, "/$export?_type=Patient")
	resp, _ := kickoff(t, srv, http.MethodGet, "/$export", "respond-async", nil)
	require.Equal(t, http.StatusUnauthorized, resp.StatusCode, "kickoff() sends no token")
	req, _ := http.NewRequest(http.MethodGet, srv.BaseURL+"/$export", nil)
	req.Header.Set("Prefer", "respond-async")
	req.Header.Set("Authorization", "Bearer a")
	resp, err := srv.Client().Do(req)
	require.NoError(t, err)
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	require.NotEmpty(t, resp.Header.Get("Retry-After"))
	require.Contains(t, string(body), `"throttled"`)

	// Another client is not affected; cancelling frees a slot.
	srv.Header.Set("Authorization", "Bearer b")
	srv.Kickoff(t, "/$export")
	srv.Header.Set("Authorization", "Bearer a")
	resp, _ = srv.Send(t, http.MethodDelete, first, nil)
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
	srv.Kickoff(t, "/$export")
}

func TestReuseInFlight(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source: clinicalSource(t, 1), NoWorker: true,
		Handler: bulkexport.Options{ReuseInFlight: true},
	})
	a := srv.Kickoff(t, "/$export?_type=Patient&_since=2020-01-01T00:00:00Z")
	b := srv.Kickoff(t, "/$export?_since=2020-01-01T00:00:00Z&_type=Patient")
	require.Equal(t, a, b, "the same export, parameters in another order")
	c := srv.Kickoff(t, "/$export?_type=Observation")
	require.NotEqual(t, a, c)
	d := srv.Kickoff(t, "/Patient/$export?_type=Patient&_since=2020-01-01T00:00:00Z")
	require.NotEqual(t, a, d, "another level is another export")
}

func TestPollLimit(t *testing.T) {
	t.Parallel()
	clock := bulkexporttest.NewClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source: clinicalSource(t, 1), NoWorker: true, Clock: clock,
		Handler: bulkexport.Options{
			PollLimit:  &bulkexport.PollLimit{Burst: 3, Rate: 1},
			RetryAfter: bulkexport.FixedRetryAfter(10 * time.Second),
		},
	})
	statusURL := srv.Kickoff(t, "/$export")
	for range 3 {
		resp, _ := srv.Status(t, statusURL)
		require.Equal(t, http.StatusAccepted, resp.StatusCode)
	}
	resp, body := srv.Status(t, statusURL)
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
	require.Equal(t, "10", resp.Header.Get("Retry-After"))
	require.Contains(t, string(body), "OperationOutcome")
	clock.Advance(10 * time.Second)
	resp, _ = srv.Status(t, statusURL)
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "one token back after the advised interval")
	resp, _ = srv.Status(t, statusURL)
	require.Equal(t, http.StatusTooManyRequests, resp.StatusCode)
}

func TestMaxFilesPerJob(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source: clinicalSource(t, 10),
		Worker: bulkexport.WorkerOptions{MaxFileResources: 1, MaxFilesPerJob: 5},
	})
	code, body := srv.Wait(t, srv.Kickoff(t, "/$export?_type=Patient"))
	require.Equal(t, http.StatusRequestEntityTooLarge, code)
	require.Contains(t, string(body), "too-costly")
}

// FuzzParametersBody feeds arbitrary bodies to a POST kick-off.
func FuzzParametersBody(f *testing.F) {
	f.Add(`{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Patient"}]}`)
	f.Add(`{"resourceType":"Parameters","parameter":[{"name":"patient","valueReference":{"reference":"Patient/1"}}]}`)
	f.Add(`{"resourceType":"Parameters","parameter":[{"name":"includeAssociatedData","valueCoding":{"code":"LatestProvenanceResources"}}]}`)
	f.Add(`{"resourceType":"Parameters","parameter":[{"name":"x","part":[]}]}`)
	f.Add(`{"resourceType":"Parameters","parameter":null}`)
	f.Add(`[]`)
	h := fuzzHandler(f)
	f.Fuzz(func(t *testing.T, body string) {
		for _, path := range []string{"/fhir/$export", "/fhir/Patient/$export", "/fhir/Group/g1/$export"} {
			req := httptest.NewRequest(http.MethodPost, path, strings.NewReader(body))
			req.Header.Set("Prefer", "respond-async")
			req.Header.Set("Content-Type", "application/fhir+json")
			checkFuzzAnswer(t, h, req)
		}
	})
}

// FuzzFilePath feeds arbitrary paths to the download endpoint.
func FuzzFilePath(f *testing.F) {
	for _, s := range []string{"abc/Patient.000001.ndjson", "../../etc/passwd", "%2e%2e/%2e%2e/x", "a/b/c", "", "/", "a\x00b/c", strings.Repeat("x", 300)} {
		f.Add(s)
	}
	h := fuzzHandler(f)
	f.Fuzz(func(t *testing.T, p string) {
		req := httptest.NewRequest(http.MethodGet, "/fhir/bulkfiles/x", nil)
		req.URL.Path = "/fhir/bulkfiles/" + p
		req.URL.RawPath = ""
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code != http.StatusNotFound && rec.Code != http.StatusBadRequest {
			t.Fatalf("path %q: status %d", p, rec.Code)
		}
	})
}

// FuzzHeaders feeds arbitrary Prefer and Accept headers to a kick-off.
func FuzzHeaders(f *testing.F) {
	f.Add("respond-async", "application/fhir+json")
	f.Add("respond-async, handling=lenient", "*/*")
	f.Add("respond-async;separate-export-status", "application/json;q=0.5, text/html")
	f.Add("HANDLING=LENIENT,RESPOND-ASYNC", "")
	f.Add(`respond-async; handling="lenient"`, "application/fhir+json;q=0")
	h := fuzzHandler(f)
	f.Fuzz(func(t *testing.T, prefer, accept string) {
		req := httptest.NewRequest(http.MethodGet, "/fhir/$export?_type=Patient", nil)
		req.Header["Prefer"] = []string{prefer}
		req.Header["Accept"] = []string{accept}
		checkFuzzAnswer(t, h, req)
	})
}

func fuzzHandler(f *testing.F) http.Handler {
	src := bulkexporttest.NewSource().AddGroup("g1", "p1")
	src.MustAdd(`{"resourceType":"Patient","id":"p1"}`)
	h, err := bulkexport.NewHandler(bulkexport.NewMemoryStore(), &bulkexport.Options{
		BaseURL: "http://example.org/fhir", Types: src, MaxActiveJobsPerClient: -1,
		Logger: quietLogger,
	})
	if err != nil {
		f.Fatal(err)
	}
	return h
}

// checkFuzzAnswer: never a panic or a 5xx, and every error is an
// OperationOutcome.
func checkFuzzAnswer(t *testing.T, h http.Handler, req *http.Request) {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if rec.Code >= 500 {
		t.Fatalf("%s %s: %d %s", req.Method, req.URL, rec.Code, rec.Body)
	}
	if rec.Code >= 400 {
		var oo fhirbulk.OperationOutcome
		if err := json.Unmarshal(rec.Body.Bytes(), &oo); err != nil || oo.ResourceType != "OperationOutcome" {
			t.Fatalf("%s %s: %d is not an OperationOutcome: %s", req.Method, req.URL, rec.Code, rec.Body)
		}
	}
}
