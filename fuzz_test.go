package bulkexport

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// fuzzLister is the host the fuzzed handler runs against: a few types, one
// known Group, a _typeFilter checker that refuses the parameter "bad".
type fuzzLister struct{}

func (fuzzLister) ResourceTypes(context.Context, fhirbulk.Level) ([]string, error) {
	return []string{"Patient", "Observation", "Condition", "Encounter"}, nil
}

func (fuzzLister) CheckGroup(_ context.Context, id string) error {
	if id == "g1" {
		return nil
	}
	return ErrNotFound
}

func (fuzzLister) CheckTypeFilter(_ string, q url.Values) error {
	if q.Has("bad") {
		return errors.New("unsupported")
	}
	return nil
}

var fuzzNow = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func newFuzzHandler(t *testing.T, store JobStore) *Handler {
	t.Helper()
	h, err := NewHandler(store, &Options{
		BaseURL:        "https://fhir.example.org/fhir",
		Types:          fuzzLister{},
		AssociatedData: []string{AssociatedLatestProvenance},
		MaxBodyBytes:   4096,
		MaxParamValues: 50,
		Now:            func() time.Time { return fuzzNow },
		Logger:         slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	return h
}

// newFuzzRequest builds a server-side request without the validation
// httptest.NewRequest applies, so that any path, query and method reach the
// handler.
func newFuzzRequest(method, path, query, body string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "https://fhir.example.org/fhir", strings.NewReader(body))
	r.Method = method
	r.URL.Path = path
	r.URL.RawPath = ""
	r.URL.RawQuery = query
	r.RequestURI = r.URL.RequestURI()
	return r
}

// checkAnswer asserts the protocol's promises for any input: never a 5xx,
// every error an OperationOutcome in FHIR JSON, every kick-off acceptance
// an absolute Content-Location.
func checkAnswer(t *testing.T, w *httptest.ResponseRecorder, what string) {
	t.Helper()
	if w.Code >= 500 {
		t.Fatalf("%s: status %d: %s", what, w.Code, w.Body.Bytes())
	}
	if w.Code < 400 {
		return
	}
	if ct := w.Header().Get("Content-Type"); ct != contentTypeFHIRJSON {
		t.Fatalf("%s: status %d with Content-Type %q", what, w.Code, ct)
	}
	var oo fhirbulk.OperationOutcome
	if err := json.Unmarshal(w.Body.Bytes(), &oo); err != nil {
		t.Fatalf("%s: status %d, body is not JSON: %v: %q", what, w.Code, err, w.Body.Bytes())
	}
	if oo.ResourceType != "OperationOutcome" || len(oo.Issue) == 0 {
		t.Fatalf("%s: status %d, body is not an OperationOutcome: %s", what, w.Code, w.Body.Bytes())
	}
	for _, is := range oo.Issue {
		if is.Severity == "" || is.Code == "" {
			t.Fatalf("%s: issue without severity or code: %s", what, w.Body.Bytes())
		}
	}
}

// checkParseError asserts that a parsing error becomes a 4xx
// OperationOutcome.
func checkParseError(t *testing.T, err error, what string) {
	t.Helper()
	var e *Error
	var mbe *http.MaxBytesError
	if !errors.As(err, &e) && !errors.As(err, &mbe) {
		t.Fatalf("%s: error of type %T is not a protocol error: %v", what, err, err)
	}
	status, oo := DefaultErrorMapper(err)
	if status < 400 || status >= 500 || oo == nil || len(oo.Issue) != 1 {
		t.Fatalf("%s: error %v maps to %d %+v", what, err, status, oo)
	}
}

// checkCleanStrings asserts that every string reachable from v is valid
// UTF-8 without NUL: what a parser accepts, every store can hold.
func checkCleanStrings(t *testing.T, v reflect.Value, path string) {
	t.Helper()
	switch v.Kind() {
	case reflect.String:
		if badBytes(v.String()) {
			t.Fatalf("%s = %q is not valid UTF-8 without NUL", path, v.String())
		}
	case reflect.Pointer, reflect.Interface:
		if !v.IsNil() {
			checkCleanStrings(t, v.Elem(), path)
		}
	case reflect.Struct:
		for i := range v.NumField() {
			if v.Type().Field(i).IsExported() {
				checkCleanStrings(t, v.Field(i), path+"."+v.Type().Field(i).Name)
			}
		}
	case reflect.Slice, reflect.Array:
		for i := range v.Len() {
			checkCleanStrings(t, v.Index(i), fmt.Sprintf("%s[%d]", path, i))
		}
	case reflect.Map:
		for it := v.MapRange(); it.Next(); {
			checkCleanStrings(t, it.Key(), path+"{key}")
			checkCleanStrings(t, it.Value(), fmt.Sprintf("%s[%v]", path, it.Key()))
		}
	}
}

// checkRequest asserts the invariants of an accepted kick-off.
func checkRequest(t *testing.T, req Request, method string, level fhirbulk.Level, lenient bool) {
	t.Helper()
	checkCleanStrings(t, reflect.ValueOf(req), "Request")
	if req.OutputFormat != FormatNDJSON {
		t.Fatalf("output format %q", req.OutputFormat)
	}
	if req.Method != method || req.Lenient != lenient {
		t.Fatalf("method %q lenient %v", req.Method, req.Lenient)
	}
	if !lenient && len(req.Ignored) > 0 {
		t.Fatalf("ignored issues without lenient handling: %+v", req.Ignored)
	}
	for _, is := range req.Ignored {
		if len(is.Expression) != 1 || is.Expression[0] == "" {
			t.Fatalf("ignored issue without its parameter: %+v", is)
		}
	}
	exported := []string{"Patient", "Observation", "Condition", "Encounter"}
	for i, typ := range req.Types {
		if !slices.Contains(exported, typ) || slices.Contains(req.Types[i+1:], typ) {
			t.Fatalf("_type %v", req.Types)
		}
	}
	for _, f := range req.TypeFilters {
		if !slices.Contains(exported, f.Type) || (len(req.Types) > 0 && !slices.Contains(req.Types, f.Type)) {
			t.Fatalf("_typeFilter %v with _type %v", f, req.Types)
		}
		if len(f.Values()) == 0 {
			t.Fatalf("_typeFilter %v has no query", f)
		}
		// What the Source receives is clean too.
		checkCleanStrings(t, reflect.ValueOf(f.Values()), "TypeFilter.Values()")
	}
	if !req.Since.IsZero() && !req.Until.IsZero() && !req.Since.Before(req.Until) {
		t.Fatalf("_since %v not before _until %v", req.Since, req.Until)
	}
	if len(req.Patients) > 0 && (level == fhirbulk.LevelSystem || method != http.MethodPost) {
		t.Fatalf("patient %v at %s level by %s", req.Patients, level, method)
	}
	for _, id := range req.Patients {
		if !validID(id) {
			t.Fatalf("patient id %q", id)
		}
	}
}

func FuzzKickoff(f *testing.F) {
	const lenientPrefer = "respond-async, handling=lenient"
	params := func(s string) string { return `{"resourceType":"Parameters","parameter":[` + s + `]}` }
	f.Add("GET", "/$export", "_type=Patient,Observation&_since=2024-01-01T00:00:00Z", "", "", "respond-async")
	f.Add("GET", "/Patient/$export", "_outputFormat=application/fhir+ndjson&_until=2024-01-01T00:00:00+01:00", "", "", "respond-async")
	f.Add("GET", "/Group/g1/$export", "_typeFilter=Observation%3Fcode%3D1,Condition%3Fstatus%3Dactive", "", "", lenientPrefer)
	f.Add("GET", "/Group/$export", "", "", "", "respond-async")
	f.Add("GET", "/$export", "_type=Patient,,Observation&foo=1&_elements=id,Patient.name.given", "", "", lenientPrefer)
	f.Add("POST", "/Patient/$export", "", params(`{"name":"patient","valueReference":{"reference":"Patient/1"}},{"name":"_type","valueString":"Patient"}`),
		"application/fhir+json", "respond-async")
	f.Add("POST", "/$export", "_format=json", params(`{"name":"allowPartialManifests","valueBoolean":null}`), "application/json", lenientPrefer)
	f.Add("POST", "/Group/g1/$export", "", params(`{"name":"patient","part":[{"name":"x","valueString":"y"}]}`), "", "respond-async")
	f.Add("POST", "/$export", "", `[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]`, "application/fhir+json", "respond-async")
	f.Add("PUT", "/$export", "", "", "", "")
	f.Add("GET", "/$export-poll-status", "_jobId=abc", "", "", "")
	f.Add("GET", "/$export", "%ff=%fe&_since=2024-13-01T00:00:00Z", "", "", "respond-async")

	f.Fuzz(func(t *testing.T, method, path, query, body, contentType, prefer string) {
		if method == "" {
			method = http.MethodGet
		}

		// 1. The parsers, at every level.
		if method == http.MethodGet || method == http.MethodPost {
			for _, level := range []fhirbulk.Level{fhirbulk.LevelSystem, fhirbulk.LevelPatient, fhirbulk.LevelGroup} {
				r := newFuzzRequest(method, "/fhir/$export", query, body)
				if contentType != "" {
					r.Header.Set("Content-Type", contentType)
				}
				r.Header.Set("Prefer", prefer)
				prefs := parsePrefer(r.Header)
				raw, err := readKickoffParams(r, 4096)
				if err != nil {
					checkParseError(t, err, "readKickoffParams")
					break
				}
				cfg := kickoffConfig{
					types:       []string{"Patient", "Observation", "Condition", "Encounter"},
					associated:  []string{AssociatedLatestProvenance},
					organizeBy:  []string{"Patient"},
					checkFilter: fuzzLister{}.CheckTypeFilter,
					maxValues:   50,
				}
				req, err := parseKickoff(raw, method, level, prefs.lenient, cfg)
				if err != nil {
					checkParseError(t, err, "parseKickoff")
					continue
				}
				checkRequest(t, req, method, level, prefs.lenient)
			}
		}

		// 2. The handler.
		store := NewMemoryStore()
		h := newFuzzHandler(t, store)
		r := newFuzzRequest(method, "/fhir"+path, query, body)
		if contentType != "" {
			r.Header.Set("Content-Type", contentType)
		}
		r.Header.Set("Prefer", prefer)
		r.Header.Set("Accept", "application/fhir+json")
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		checkAnswer(t, w, method+" "+path+"?"+query)
		if w.Code == http.StatusAccepted && strings.HasSuffix(path, "$export") {
			loc := w.Header().Get("Content-Location")
			if !strings.HasPrefix(loc, "https://fhir.example.org/fhir/$export-poll-status?_jobId=") {
				t.Fatalf("Content-Location %q", loc)
			}
			id := strings.TrimPrefix(loc, "https://fhir.example.org/fhir/$export-poll-status?_jobId=")
			j, err := store.Get(context.Background(), id)
			if err != nil {
				t.Fatalf("the accepted job is not stored: %v", err)
			}
			checkRequest(t, j.Request, method, j.Level, j.Request.Lenient)
			checkCleanStrings(t, reflect.ValueOf(j), "Job")
			if !strings.HasPrefix(j.Request.URL, "https://fhir.example.org/fhir/") {
				t.Fatalf("request URL %q", j.Request.URL)
			}
		}
	})
}

func FuzzJobID(f *testing.F) {
	f.Add("_jobId=known-job", "known-job", "")
	f.Add("_jobId=0123456789abcdef0123456789abcdef", "..", "")
	f.Add("_jobId=%zz", "%zz", "")
	f.Add("%zz=1", "a/b", "")
	f.Add("_jobId=a&_jobId=b", "", "")
	f.Add("_jobId=..%2F..%2Fetc%2Fpasswd", "../../etc/passwd", "")
	f.Add("&&&_jobId=known-job&&", "known-job/", "")
	f.Add("_jobId", "\x00", `{"resourceType":"Parameters","parameter":[{"name":"_jobId","valueString":"known-job"}]}`)
	f.Add("_jobId=known+job", "known job", `{"resourceType":"Parameters","parameter":[{"name":"_jobId","valueString":"known-job"},{"name":"_jobId","valueString":"x"}]}`)
	f.Add("_format=json&_jobId=known-job", "known-job", "not json")
	f.Add("_jobid=known-job", "KNOWN-JOB", `{"resourceType":"Parameters","parameter":[{"name":"_jobId","valueBoolean":null}]}`)

	f.Fuzz(func(t *testing.T, raw, pathID, body string) {
		// 1. parseStatusQuery alone.
		queryJobID := func(raw string) (string, error) {
			id, _, err := parseStatusQuery(raw)
			return id, err
		}
		id, err := queryJobID(raw)
		if err != nil {
			checkParseError(t, err, "queryJobID")
		} else if id != "" {
			// What it returns, it reads back once encoded.
			back, err := queryJobID("_jobId=" + url.QueryEscape(id))
			if err != nil || back != id {
				t.Fatalf("queryJobID(%q) = %q; re-encoded: %q, %v", raw, id, back, err)
			}
		}
		// Any clean string, properly encoded, is read back exactly; one
		// with invalid UTF-8 or a NUL is a 400.
		for _, s := range []string{raw, pathID} {
			got, err := queryJobID("_jobId=" + url.QueryEscape(s) + "&_format=json")
			if badBytes(s) {
				if status, _ := DefaultErrorMapper(err); err == nil || status != http.StatusBadRequest {
					t.Fatalf("queryJobID(encoded %q) = %q, %v; want a 400", s, got, err)
				}
				continue
			}
			if err != nil || got != s {
				t.Fatalf("queryJobID(encoded %q) = %q, %v", s, got, err)
			}
		}

		// 2. The status endpoint, query and path forms, every method.
		for _, method := range []string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodDelete, http.MethodPatch} {
			for _, form := range []struct{ path, query string }{
				{"/fhir/$export-poll-status", raw},
				{"/fhir/$export-poll-status/" + pathID, raw},
				{"/fhir/$export-poll-status/" + pathID, ""},
			} {
				store := NewMemoryStore()
				job := &Job{ID: "known-job", State: StateQueued, CreatedAt: fuzzNow, UpdatedAt: fuzzNow,
					Progress: Progress{Percent: -1, Message: "queued"}}
				if err := store.Create(context.Background(), job, CreateParams{}); err != nil {
					t.Fatal(err)
				}
				h := newFuzzHandler(t, store)
				r := newFuzzRequest(method, form.path, form.query, body)
				w := httptest.NewRecorder()
				h.ServeHTTP(w, r)
				checkAnswer(t, w, method+" "+form.path+"?"+form.query)
				if w.Code == http.StatusAccepted && method != http.MethodDelete && w.Header().Get("X-Progress") != "queued" {
					t.Fatalf("202 without X-Progress for %s %s?%s", method, form.path, form.query)
				}
			}
			// The same through the server's own URL parsing, raw bytes as
			// a client would send them.
			u, err := url.ParseRequestURI("/fhir/$export-poll-status/" + pathID + "?" + raw)
			if err != nil {
				continue
			}
			store := NewMemoryStore()
			h := newFuzzHandler(t, store)
			r := newFuzzRequest(method, u.Path, u.RawQuery, body)
			r.URL.RawPath = u.RawPath
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			checkAnswer(t, w, method+" "+u.String())
		}
	})
}
