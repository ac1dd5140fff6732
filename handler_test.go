package bulkexport_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// ---------------------------------------------------------------------------
// Fixture

var t0 = time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)

// newTestClock returns the test kit's settable clock, at t0.
func newTestClock() *bulkexporttest.Clock { return bulkexporttest.NewClock(t0) }

type mount int

const (
	mountAtPath      mount = iota // mux.Handle("/fhir/", h)
	mountStripPrefix              // mux.Handle("/fhir/", http.StripPrefix("/fhir", h))
)

func (m mount) String() string {
	if m == mountStripPrefix {
		return "strip-prefix"
	}
	return "at-path"
}

type env struct {
	srv    *httptest.Server
	client *http.Client
	store  *bulkexport.MemoryStore
	h      *bulkexport.Handler
	base   string // srv.URL + "/fhir"
	clock  *bulkexporttest.Clock
}

type envConfig struct {
	mount mount
	opts  func(*bulkexport.Options)
	// wrap, if set, puts a JobStore in front of the MemoryStore.
	wrap func(*bulkexport.MemoryStore) bulkexport.JobStore
}

func discardLogger() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func newEnv(t *testing.T, opts func(*bulkexport.Options)) *env {
	return newEnvWith(t, envConfig{opts: opts})
}

func newEnvWith(t *testing.T, cfg envConfig) *env {
	t.Helper()
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	e := &env{srv: srv, client: srv.Client(), store: bulkexport.NewMemoryStore(), base: srv.URL + "/fhir", clock: newTestClock()}
	o := &bulkexport.Options{BaseURL: e.base, Now: e.clock.Now, Logger: discardLogger()}
	if cfg.opts != nil {
		cfg.opts(o)
	}
	var store bulkexport.JobStore = e.store
	if cfg.wrap != nil {
		store = cfg.wrap(e.store)
	}
	h, err := bulkexport.NewHandler(store, o)
	require.NoError(t, err)
	e.h = h
	if cfg.mount == mountStripPrefix {
		mux.Handle("/fhir/", http.StripPrefix("/fhir", h))
	} else {
		mux.Handle("/fhir/", h)
	}
	return e
}

type response struct {
	status int
	header http.Header
	body   []byte
}

// do sends a request. target is absolute, or a path below the base URL
// ("/$export?..."). hdr holds header name/value pairs; an empty value
// removes the header.
func (e *env) do(t *testing.T, method, target, body string, hdr ...string) response {
	t.Helper()
	if strings.HasPrefix(target, "/") {
		target = e.base + target
	}
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, target, rd)
	require.NoError(t, err)
	for i := 0; i+1 < len(hdr); i += 2 {
		if hdr[i+1] == "" {
			req.Header.Del(hdr[i])
		} else {
			req.Header.Set(hdr[i], hdr[i+1])
		}
	}
	res, err := e.client.Do(req)
	require.NoError(t, err)
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	return response{status: res.StatusCode, header: res.Header, body: b}
}

// kickoff sends a kick-off with the headers a conformant client sends
// (Accept: application/fhir+json, Prefer: respond-async, and for a body
// Content-Type: application/fhir+json); hdr overrides them.
func (e *env) kickoff(t *testing.T, method, path, body string, hdr ...string) response {
	t.Helper()
	h := []string{"Accept", "application/fhir+json", "Prefer", "respond-async"}
	if body != "" {
		h = append(h, "Content-Type", "application/fhir+json")
	}
	return e.do(t, method, path, body, append(h, hdr...)...)
}

// mustKickoff kicks off a system export and returns the job id.
func (e *env) mustKickoff(t *testing.T, hdr ...string) string {
	t.Helper()
	r := e.kickoff(t, http.MethodGet, "/$export", "", hdr...)
	require.Equal(t, http.StatusAccepted, r.status, string(r.body))
	return jobIDOf(t, r.header.Get("Content-Location"))
}

func (e *env) statusURL(id string) string {
	return e.base + "/$export-poll-status?_jobId=" + id
}

// jobIDOf extracts the job id from a status URL of either style.
func jobIDOf(t *testing.T, loc string) string {
	t.Helper()
	u, err := url.Parse(loc)
	require.NoError(t, err)
	if id := u.Query().Get("_jobId"); id != "" {
		return id
	}
	_, id, ok := strings.Cut(u.Path, "/$export-poll-status/")
	require.True(t, ok, "status URL %q", loc)
	return id
}

// requireOO asserts an OperationOutcome answer with the given status and
// (when not "") the first issue's code, and returns the outcome.
func requireOO(t *testing.T, r response, status int, code fhirbulk.IssueType) *fhirbulk.OperationOutcome {
	t.Helper()
	require.Equal(t, status, r.status, "body: %s", r.body)
	require.Equal(t, "application/fhir+json", r.header.Get("Content-Type"))
	var oo fhirbulk.OperationOutcome
	require.NoError(t, json.Unmarshal(r.body, &oo), string(r.body))
	require.Equal(t, "OperationOutcome", oo.ResourceType)
	require.NotEmpty(t, oo.Issue)
	for _, is := range oo.Issue {
		require.NotEmpty(t, is.Severity)
		require.NotEmpty(t, is.Code)
	}
	if code != "" {
		require.Equal(t, code, oo.Issue[0].Code, string(r.body))
	}
	return &oo
}

// claim moves the job with the given id to running the way a worker does
// (the store must hold no other claimable job), then applies mutate
// through Update, respecting the lifecycle.
func (e *env) claim(t *testing.T, id string, mutate func(*bulkexport.Job)) *bulkexport.Job {
	t.Helper()
	ctx := context.Background()
	j, err := e.store.Claim(ctx, bulkexport.ClaimParams{Worker: "worker-1", Now: e.clock.Now(), Lease: time.Minute})
	require.NoError(t, err)
	require.Equal(t, id, j.ID, "the store held another claimable job")
	if mutate != nil {
		mutate(j)
		require.NoError(t, e.store.Update(ctx, j))
	}
	return j
}

func (e *env) complete(t *testing.T, id string, mutate func(*bulkexport.Job)) *bulkexport.Job {
	t.Helper()
	return e.claim(t, id, func(j *bulkexport.Job) {
		now := e.clock.Now()
		j.State = bulkexport.StateCompleted
		j.Progress = bulkexport.Progress{Percent: 100}
		j.TransactionTime = now.Add(-time.Minute)
		j.CompletedAt = now
		j.ExpiresAt = now.Add(time.Hour)
		if mutate != nil {
			mutate(j)
		}
	})
}

func (e *env) stored(t *testing.T, id string) *bulkexport.Job {
	t.Helper()
	j, err := e.store.Get(context.Background(), id)
	require.NoError(t, err)
	return j
}

// ---------------------------------------------------------------------------
// Collaborator fakes

// typeLister exports a fixed list of types, knows the groups in groups, and
// refuses _typeFilter searches on the parameter "unsupported".
type typeLister struct {
	types  []string
	groups map[string]bool
	err    error // returned by ResourceTypes
}

func (l *typeLister) ResourceTypes(_ context.Context, level fhirbulk.Level) ([]string, error) {
	if l.err != nil {
		return nil, l.err
	}
	if level == fhirbulk.LevelSystem {
		return append([]string{"Organization"}, l.types...), nil
	}
	return l.types, nil
}

func (l *typeLister) CheckGroup(_ context.Context, id string) error {
	if id == "unavailable" {
		return fmt.Errorf("group lookup: %w", bulkexport.ErrUnavailable)
	}
	if !l.groups[id] {
		return fmt.Errorf("Group/%s: %w", id, bulkexport.ErrNotFound)
	}
	return nil
}

func (l *typeLister) CheckTypeFilter(_ string, q url.Values) error {
	if q.Has("unsupported") {
		return errors.New("the search parameter unsupported is not supported in bulk export")
	}
	return nil
}

var (
	_ bulkexport.GroupChecker      = (*typeLister)(nil)
	_ bulkexport.TypeFilterChecker = (*typeLister)(nil)
)

func newTypeLister() *typeLister {
	return &typeLister{types: []string{"Patient", "Observation", "Condition"}, groups: map[string]bool{"g1": true, "a.b-1": true}}
}

// failingStore answers Get (and optionally Create) with an error, as a
// store whose database is down does.
type failingStore struct {
	bulkexport.JobStore
	err       error
	failWrite bool
}

func (s *failingStore) Get(context.Context, string) (*bulkexport.Job, error) { return nil, s.err }

func (s *failingStore) Create(ctx context.Context, j *bulkexport.Job, p bulkexport.CreateParams) error {
	if s.failWrite {
		return s.err
	}
	return s.JobStore.Create(ctx, j, p)
}

// racingStore lets a "worker" update the job between the handler's Get and
// its first Update, so that the handler's cancel meets ErrConflict.
type racingStore struct {
	*bulkexport.MemoryStore
	once   sync.Once
	worker func(j *bulkexport.Job)
}

func (s *racingStore) Update(ctx context.Context, j *bulkexport.Job) error {
	s.once.Do(func() {
		cur, err := s.MemoryStore.Get(ctx, j.ID)
		if err == nil {
			s.worker(cur)
			_ = s.MemoryStore.Update(ctx, cur)
		}
	})
	return s.MemoryStore.Update(ctx, j)
}

// memStorage is a read-only Storage over fixed contents.
type memStorage struct {
	mu        sync.Mutex
	files     map[string]string // jobID/name → content
	deleted   []string
	deleteErr error
}

type memFile struct {
	*bytes.Reader
	mod time.Time
}

func (f memFile) Close() error       { return nil }
func (f memFile) ModTime() time.Time { return f.mod }

func (s *memStorage) Create(context.Context, string, string) (bulkexport.FileWriter, error) {
	return nil, errors.New("read-only")
}

func (s *memStorage) Open(_ context.Context, jobID, name string) (bulkexport.FileReader, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.files[jobID+"/"+name]
	if !ok {
		return nil, fs.ErrNotExist
	}
	return memFile{bytes.NewReader([]byte(c)), t0}, nil
}

func (s *memStorage) List(context.Context, string) ([]string, error) { return nil, nil }

func (s *memStorage) Delete(_ context.Context, jobID string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.deleteErr != nil {
		return s.deleteErr
	}
	s.deleted = append(s.deleted, jobID)
	return nil
}

func bearerAuth(r *http.Request) (string, error) {
	tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || tok == "" {
		return "", fmt.Errorf("no bearer token: %w", bulkexport.ErrUnauthorized)
	}
	if tok == "banned" {
		return "", fmt.Errorf("client banned: %w", bulkexport.ErrForbidden)
	}
	return tok, nil
}

// ---------------------------------------------------------------------------
// Kick-off

func TestKickoffLevels(t *testing.T) {
	t.Parallel()
	type kcase struct {
		name     string
		method   string
		path     string
		body     string
		level    fhirbulk.Level
		groupID  string
		wantURL  string // the manifest's request, relative to the base
		patients []string
	}
	params := `{"resourceType":"Parameters","parameter":[` +
		`{"name":"_type","valueString":"Patient,Observation"},` +
		`{"name":"_since","valueInstant":"2024-01-01T00:00:00Z"}]}`
	withPatient := `{"resourceType":"Parameters","parameter":[` +
		`{"name":"_type","valueString":"Patient,Observation"},` +
		`{"name":"patient","valueReference":{"reference":"Patient/p1"}}]}`
	q := "?_type=Patient,Observation&_since=2024-01-01T00:00:00Z"
	cases := []kcase{
		{name: "system/GET", method: http.MethodGet, path: "/$export" + q, level: fhirbulk.LevelSystem, wantURL: "/$export" + q},
		{name: "patient/GET", method: http.MethodGet, path: "/Patient/$export" + q, level: fhirbulk.LevelPatient, wantURL: "/Patient/$export" + q},
		{name: "group/GET", method: http.MethodGet, path: "/Group/g1/$export" + q, level: fhirbulk.LevelGroup, groupID: "g1",
			wantURL: "/Group/g1/$export" + q},
		{name: "system/GET-no-params", method: http.MethodGet, path: "/$export", level: fhirbulk.LevelSystem, wantURL: "/$export"},
		{name: "system/GET-escaped-dollar", method: http.MethodGet, path: "/%24export", level: fhirbulk.LevelSystem, wantURL: "/$export"},
		{name: "system/POST", method: http.MethodPost, path: "/$export", body: params, level: fhirbulk.LevelSystem, wantURL: "/$export"},
		{name: "patient/POST", method: http.MethodPost, path: "/Patient/$export", body: withPatient, level: fhirbulk.LevelPatient,
			wantURL: "/Patient/$export", patients: []string{"p1"}},
		{name: "group/POST", method: http.MethodPost, path: "/Group/g1/$export", body: withPatient, level: fhirbulk.LevelGroup,
			groupID: "g1", wantURL: "/Group/g1/$export", patients: []string{"p1"}},
		{name: "group/POST-format-in-query", method: http.MethodPost, path: "/Group/g1/$export?_format=json", body: params,
			level: fhirbulk.LevelGroup, groupID: "g1", wantURL: "/Group/g1/$export"},
	}
	for _, m := range []mount{mountAtPath, mountStripPrefix} {
		for _, c := range cases {
			t.Run(m.String()+"/"+c.name, func(t *testing.T) {
				t.Parallel()
				e := newEnvWith(t, envConfig{mount: m, opts: func(o *bulkexport.Options) { o.Types = newTypeLister() }})
				r := e.kickoff(t, c.method, c.path, c.body)
				oo := requireOO(t, r, http.StatusAccepted, fhirbulk.IssueInformational)
				require.Equal(t, fhirbulk.SeverityInformation, oo.Issue[0].Severity)

				loc := r.header.Get("Content-Location")
				require.True(t, strings.HasPrefix(loc, e.base+"/$export-poll-status?_jobId="), loc)
				u, err := url.Parse(loc)
				require.NoError(t, err)
				require.True(t, u.IsAbs())
				id := jobIDOf(t, loc)
				require.Len(t, id, 32)
				require.Equal(t, loc, e.h.StatusURL(id))

				j := e.stored(t, id)
				require.Equal(t, bulkexport.StateQueued, j.State)
				require.Equal(t, c.level, j.Level)
				require.Equal(t, c.groupID, j.GroupID)
				require.Equal(t, c.method, j.Request.Method)
				require.Equal(t, e.base+c.wantURL, j.Request.URL)
				if strings.Contains(c.path+c.body, "_type") {
					require.Equal(t, []string{"Patient", "Observation"}, j.Request.Types)
				} else {
					require.Empty(t, j.Request.Types)
				}
				require.Equal(t, c.patients, j.Request.Patients)
				require.Equal(t, "", j.Owner)
				require.True(t, j.CreatedAt.Equal(e.clock.Now()))

				// The status URL answers: the job is queued.
				st := e.do(t, http.MethodGet, loc, "")
				require.Equal(t, http.StatusAccepted, st.status, string(st.body))
			})
		}
	}
}

func TestKickoffStatusPathStyle(t *testing.T) {
	t.Parallel()
	for _, m := range []mount{mountAtPath, mountStripPrefix} {
		t.Run(m.String(), func(t *testing.T) {
			t.Parallel()
			e := newEnvWith(t, envConfig{mount: m, opts: func(o *bulkexport.Options) { o.StatusURLStyle = bulkexport.StatusPath }})
			r := e.kickoff(t, http.MethodGet, "/$export", "")
			require.Equal(t, http.StatusAccepted, r.status)
			loc := r.header.Get("Content-Location")
			require.True(t, strings.HasPrefix(loc, e.base+"/$export-poll-status/"), loc)
			id := jobIDOf(t, loc)
			require.Equal(t, http.StatusAccepted, e.do(t, http.MethodGet, loc, "").status)
			// The query form is served as well.
			require.Equal(t, http.StatusAccepted, e.do(t, http.MethodGet, e.statusURL(id), "").status)
		})
	}
}

func TestKickoffPreferRespondAsync(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		prefer string // "" removes the header
		allow  bool
		want   int
	}{
		{"missing", "", false, http.StatusBadRequest},
		{"other-preference", "return=minimal", false, http.StatusBadRequest},
		{"lenient-only", "handling=lenient", false, http.StatusBadRequest},
		{"respond-async", "respond-async", false, http.StatusAccepted},
		{"tokens", "handling=lenient, respond-async", false, http.StatusAccepted},
		{"case", "RESPOND-ASYNC", false, http.StatusAccepted},
		{"missing-allowed", "", true, http.StatusAccepted},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, func(o *bulkexport.Options) { o.AllowMissingRespondAsync = c.allow })
			r := e.kickoff(t, http.MethodGet, "/$export", "", "Prefer", c.prefer)
			if c.want != http.StatusAccepted {
				oo := requireOO(t, r, c.want, fhirbulk.IssueInvalid)
				require.Contains(t, oo.Issue[0].Diagnostics, "respond-async")
				jobs, err := e.store.List(context.Background(), bulkexport.Filter{})
				require.NoError(t, err)
				require.Empty(t, jobs, "no job is created")
				return
			}
			require.Equal(t, c.want, r.status, string(r.body))
		})
	}
	t.Run("repeated-headers", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		req, err := http.NewRequest(http.MethodGet, e.base+"/$export?foo=1", nil)
		require.NoError(t, err)
		req.Header.Add("Prefer", "handling=lenient")
		req.Header.Add("Prefer", "respond-async")
		res, err := e.client.Do(req)
		require.NoError(t, err)
		defer res.Body.Close()
		require.Equal(t, http.StatusAccepted, res.StatusCode)
	})
}

func TestKickoffAccept(t *testing.T) {
	t.Parallel()
	cases := []struct {
		accept string
		want   int
	}{
		{"", http.StatusAccepted},
		{"application/fhir+json", http.StatusAccepted},
		{"application/json", http.StatusAccepted},
		{"*/*", http.StatusAccepted},
		{"text/html, application/fhir+json;q=0.5", http.StatusAccepted},
		{"text/html", http.StatusNotAcceptable},
		{"application/fhir+xml", http.StatusNotAcceptable},
		{"application/json;q=0", http.StatusNotAcceptable},
	}
	for _, c := range cases {
		t.Run(c.accept, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, nil)
			r := e.kickoff(t, http.MethodGet, "/$export", "", "Accept", c.accept)
			if c.want == http.StatusNotAcceptable {
				// The OperationOutcome is JSON even though the client did
				// not ask for it: there is nothing else to send.
				requireOO(t, r, c.want, fhirbulk.IssueNotSupported)
				return
			}
			require.Equal(t, c.want, r.status, string(r.body))
		})
	}
	t.Run("_format=xml", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		oo := requireOO(t, e.kickoff(t, http.MethodGet, "/$export?_format=xml", ""), http.StatusNotAcceptable, fhirbulk.IssueNotSupported)
		require.Equal(t, []string{"_format"}, oo.Issue[0].Expression)
	})
}

func TestKickoffGroupChecker(t *testing.T) {
	t.Parallel()
	cases := []struct {
		group string
		want  int
		code  fhirbulk.IssueType
	}{
		{"g1", http.StatusAccepted, fhirbulk.IssueInformational},
		{"missing", http.StatusNotFound, fhirbulk.IssueNotFound},
		{"unavailable", http.StatusServiceUnavailable, fhirbulk.IssueTransient},
	}
	for _, c := range cases {
		for _, method := range []string{http.MethodGet, http.MethodPost} {
			t.Run(c.group+"/"+method, func(t *testing.T) {
				t.Parallel()
				e := newEnv(t, func(o *bulkexport.Options) { o.Types = newTypeLister() })
				r := e.kickoff(t, method, "/Group/"+c.group+"/$export", "")
				oo := requireOO(t, r, c.want, c.code)
				if c.want == http.StatusNotFound {
					require.Contains(t, oo.Issue[0].Diagnostics, "Group/missing")
				}
			})
		}
	}
	t.Run("without-checker-any-group", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		require.Equal(t, http.StatusAccepted, e.kickoff(t, http.MethodGet, "/Group/whatever/$export", "").status)
	})
	t.Run("invalid-group-id", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, func(o *bulkexport.Options) { o.Types = newTypeLister() })
		requireOO(t, e.kickoff(t, http.MethodGet, "/Group/a%20b/$export", ""), http.StatusBadRequest, fhirbulk.IssueInvalid)
		requireOO(t, e.kickoff(t, http.MethodGet, "/Group/a.b-1/$export", ""), http.StatusAccepted, fhirbulk.IssueInformational)
		// ServeMux would redirect these unclean paths; the handler itself
		// must still answer them.
		for path, want := range map[string]int{"/fhir/Group//$export": 400, "/fhir/Group/$export": 404, "/fhir/Group/$export-poll-status": 404} {
			req := httptest.NewRequest(http.MethodGet, path, nil)
			req.Header.Set("Prefer", "respond-async")
			w := httptest.NewRecorder()
			e.h.ServeHTTP(w, req)
			requireOO(t, response{status: w.Code, header: w.Header(), body: w.Body.Bytes()}, want, "")
		}
	})
}

func TestKickoffTypesHook(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		path    string
		prefer  string
		status  int
		code    fhirbulk.IssueType
		param   string
		types   []string // stored _type on success
		ignored []string // expressions of the warning issues on success
	}{
		{name: "exported-type", path: "/Patient/$export?_type=Patient,Observation", status: 202, types: []string{"Patient", "Observation"}},
		{name: "level-specific-type", path: "/$export?_type=Organization", status: 202, types: []string{"Organization"}},
		{name: "not-at-this-level", path: "/Patient/$export?_type=Organization", status: 400, code: fhirbulk.IssueNotSupported, param: "_type"},
		{name: "unknown-type", path: "/$export?_type=Medication", status: 400, code: fhirbulk.IssueNotSupported, param: "_type"},
		{name: "lenient-drops-unknown", path: "/$export?_type=Patient,Medication", prefer: "respond-async, handling=lenient", status: 202,
			types: []string{"Patient"}, ignored: []string{"_type"}},
		{name: "lenient-all-unknown", path: "/$export?_type=Medication", prefer: "respond-async, handling=lenient", status: 400,
			code: fhirbulk.IssueNotSupported, param: "_type"},
		{name: "_elements-type", path: "/$export?_elements=Medication.code", status: 400, code: fhirbulk.IssueNotSupported, param: "_elements"},
		{name: "type-filter-supported", path: "/$export?_typeFilter=" + url.QueryEscape("Observation?code=1"), status: 202},
		{name: "type-filter-refused", path: "/$export?_typeFilter=" + url.QueryEscape("Observation?unsupported=1"), status: 400,
			code: fhirbulk.IssueNotSupported, param: "_typeFilter"},
		{name: "type-filter-refused-lenient", path: "/$export?_typeFilter=" + url.QueryEscape("Observation?unsupported=1"),
			prefer: "respond-async, handling=lenient", status: 202, ignored: []string{"_typeFilter"}},
		{name: "type-filter-type-not-exported", path: "/$export?_typeFilter=" + url.QueryEscape("Medication?code=1"), status: 400,
			code: fhirbulk.IssueNotSupported, param: "_typeFilter"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, func(o *bulkexport.Options) { o.Types = newTypeLister() })
			hdr := []string{}
			if c.prefer != "" {
				hdr = append(hdr, "Prefer", c.prefer)
			}
			r := e.kickoff(t, http.MethodGet, c.path, "", hdr...)
			if c.status != http.StatusAccepted {
				oo := requireOO(t, r, c.status, c.code)
				require.Equal(t, []string{c.param}, oo.Issue[0].Expression)
				return
			}
			oo := requireOO(t, r, http.StatusAccepted, fhirbulk.IssueInformational)
			var warned []string
			for _, is := range oo.Issue[1:] {
				require.Equal(t, fhirbulk.SeverityWarning, is.Severity)
				warned = append(warned, is.Expression...)
			}
			require.Equal(t, c.ignored, warned)
			j := e.stored(t, jobIDOf(t, r.header.Get("Content-Location")))
			require.Equal(t, c.types, j.Request.Types)
			require.Len(t, j.Request.Ignored, len(c.ignored), "the ignored issues are kept for the manifest's error[]")
		})
	}
	t.Run("lister-fails", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, func(o *bulkexport.Options) {
			o.Types = &typeLister{err: fmt.Errorf("catalogue: %w", bulkexport.ErrUnavailable)}
		})
		requireOO(t, e.kickoff(t, http.MethodGet, "/$export", ""), http.StatusServiceUnavailable, fhirbulk.IssueTransient)
	})
}

func TestKickoffParameterErrorsHTTP(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		method string
		path   string
		body   string
		hdr    []string
		status int
		code   fhirbulk.IssueType
		param  string
	}{
		{name: "unknown-parameter", path: "/$export?foo=bar", status: 400, code: fhirbulk.IssueNotSupported, param: "foo"},
		{name: "bad-since", path: "/$export?_since=yesterday", status: 400, code: fhirbulk.IssueInvalid, param: "_since"},
		{name: "since-after-until", path: "/$export?_since=2024-02-01T00:00:00Z&_until=2024-01-01T00:00:00Z", status: 400,
			code: fhirbulk.IssueInvalid, param: "_until"},
		{name: "bad-output-format", path: "/$export?_outputFormat=text/csv", status: 400, code: fhirbulk.IssueNotSupported, param: "_outputFormat"},
		{name: "organizeOutputBy-unsupported", path: "/$export?organizeOutputBy=Patient", status: 400, code: fhirbulk.IssueNotSupported,
			param: "organizeOutputBy"},
		{name: "includeAssociatedData-not-configured", path: "/$export?includeAssociatedData=LatestProvenanceResources", status: 400,
			code: fhirbulk.IssueNotSupported, param: "includeAssociatedData"},
		{name: "patient-by-GET", path: "/Patient/$export?patient=Patient/1", status: 400, code: fhirbulk.IssueNotSupported, param: "patient"},
		{name: "patient-at-system-level", method: http.MethodPost, path: "/$export",
			body:   `{"resourceType":"Parameters","parameter":[{"name":"patient","valueReference":{"reference":"Patient/1"}}]}`,
			status: 400, code: fhirbulk.IssueNotSupported, param: "patient"},
		{name: "POST-query-parameter", method: http.MethodPost, path: "/$export?_type=Patient", status: 400, code: fhirbulk.IssueInvalid, param: "_type"},
		{name: "POST-not-Parameters", method: http.MethodPost, path: "/$export", body: `{"resourceType":"Patient"}`, status: 400,
			code: fhirbulk.IssueStructure},
		{name: "POST-not-JSON", method: http.MethodPost, path: "/$export", body: `_type=Patient`, status: 400, code: fhirbulk.IssueStructure},
		{name: "POST-wrong-content-type", method: http.MethodPost, path: "/$export", body: `_type=Patient`,
			hdr: []string{"Content-Type", "application/x-www-form-urlencoded"}, status: 415, code: fhirbulk.IssueNotSupported},
		{name: "POST-too-large", method: http.MethodPost, path: "/$export", body: `{"resourceType":"Parameters","parameter":[` +
			strings.Repeat(`{"name":"_type","valueString":"Patient"},`, 20) + `{"name":"_type","valueString":"Patient"}]}`,
			status: 413, code: fhirbulk.IssueTooCostly},
		{name: "malformed-query", path: "/$export?_type=%zz", status: 400, code: fhirbulk.IssueInvalid},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, func(o *bulkexport.Options) { o.MaxBodyBytes = 512 })
			method := c.method
			if method == "" {
				method = http.MethodGet
			}
			oo := requireOO(t, e.kickoff(t, method, c.path, c.body, c.hdr...), c.status, c.code)
			if c.param != "" {
				require.Equal(t, []string{c.param}, oo.Issue[0].Expression)
			}
		})
	}
}

func TestKickoffAuthorize(t *testing.T) {
	t.Parallel()
	var got struct {
		sync.Mutex
		client string
		level  fhirbulk.Level
		group  string
		types  []string
	}
	e := newEnv(t, func(o *bulkexport.Options) {
		o.Authenticate = bearerAuth
		o.Authorize = func(_ context.Context, clientID string, level fhirbulk.Level, groupID string, req *bulkexport.Request) error {
			got.Lock()
			defer got.Unlock()
			got.client, got.level, got.group, got.types = clientID, level, groupID, req.Types
			if req.WantsType("Observation") {
				return fmt.Errorf("scope system/Observation.read missing: %w", bulkexport.ErrForbidden)
			}
			return nil
		}
	})
	oo := requireOO(t, e.kickoff(t, http.MethodGet, "/Group/g7/$export?_type=Observation", "", "Authorization", "Bearer a"),
		http.StatusForbidden, fhirbulk.IssueForbidden)
	require.NotContains(t, oo.Issue[0].Diagnostics, "scope", "the cause stays in the logs")
	got.Lock()
	require.Equal(t, "a", got.client)
	require.Equal(t, fhirbulk.LevelGroup, got.level)
	require.Equal(t, "g7", got.group)
	require.Equal(t, []string{"Observation"}, got.types)
	got.Unlock()
	r := e.kickoff(t, http.MethodGet, "/$export?_type=Patient", "", "Authorization", "Bearer a")
	require.Equal(t, http.StatusAccepted, r.status)
	require.Equal(t, "a", e.stored(t, jobIDOf(t, r.header.Get("Content-Location"))).Owner)
}

func TestKickoffStoreUnavailable(t *testing.T) {
	t.Parallel()
	e := newEnvWith(t, envConfig{wrap: func(m *bulkexport.MemoryStore) bulkexport.JobStore {
		return &failingStore{JobStore: m, err: errors.New("connection refused"), failWrite: true}
	}})
	oo := requireOO(t, e.kickoff(t, http.MethodGet, "/$export", ""), http.StatusServiceUnavailable, "")
	require.True(t, oo.Issue[0].Code.Transient())
	require.NotContains(t, oo.Issue[0].Diagnostics, "connection refused")
}

// ---------------------------------------------------------------------------
// Status

func TestStatusJobIDErrors(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		method string
		target string
		body   string
		status int
		code   fhirbulk.IssueType
		param  string
	}{
		{name: "missing", target: "/$export-poll-status", status: 400, code: fhirbulk.IssueRequired, param: "_jobId"},
		{name: "empty", target: "/$export-poll-status?_jobId=", status: 400, code: fhirbulk.IssueRequired, param: "_jobId"},
		{name: "empty-path", target: "/$export-poll-status/", status: 400, code: fhirbulk.IssueRequired, param: "_jobId"},
		{name: "unknown", target: "/$export-poll-status?_jobId=0123456789abcdef0123456789abcdef", status: 404, code: fhirbulk.IssueNotFound},
		{name: "unknown-path", target: "/$export-poll-status/0123456789abcdef0123456789abcdef", status: 404, code: fhirbulk.IssueNotFound},
		{name: "invalid-characters", target: "/$export-poll-status?_jobId=..%2F..%2Fetc", status: 404, code: fhirbulk.IssueNotFound},
		{name: "too-long", target: "/$export-poll-status?_jobId=" + strings.Repeat("a", 129), status: 404, code: fhirbulk.IssueNotFound},
		{name: "dot-dot-path", target: "/$export-poll-status/..", status: 404, code: fhirbulk.IssueNotFound},
		{name: "typo", target: "/$export-poll-status?_jobid=abc", status: 400, code: fhirbulk.IssueNotSupported, param: "_jobid"},
		{name: "repeated", target: "/$export-poll-status?_jobId=a&_jobId=a", status: 400, code: fhirbulk.IssueInvalid, param: "_jobId"},
		{name: "bad-escape", target: "/$export-poll-status?_jobId=%zz", status: 400, code: fhirbulk.IssueInvalid, param: "_jobId"},
		{name: "POST-missing", method: http.MethodPost, target: "/$export-poll-status", status: 400, code: fhirbulk.IssueRequired, param: "_jobId"},
		{name: "POST-unknown-parameter", method: http.MethodPost, target: "/$export-poll-status",
			body:   `{"resourceType":"Parameters","parameter":[{"name":"_exportId","valueString":"a"}]}`,
			status: 400, code: fhirbulk.IssueNotSupported, param: "_exportId"},
		{name: "POST-repeated", method: http.MethodPost, target: "/$export-poll-status",
			body:   `{"resourceType":"Parameters","parameter":[{"name":"_jobId","valueString":"a"},{"name":"_jobId","valueString":"a"}]}`,
			status: 400, code: fhirbulk.IssueInvalid, param: "_jobId"},
		{name: "POST-not-Parameters", method: http.MethodPost, target: "/$export-poll-status", body: `{"resourceType":"Bundle"}`,
			status: 400, code: fhirbulk.IssueStructure},
		{name: "DELETE-missing", method: http.MethodDelete, target: "/$export-poll-status", status: 400, code: fhirbulk.IssueRequired, param: "_jobId"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, nil)
			method := c.method
			if method == "" {
				method = http.MethodGet
			}
			oo := requireOO(t, e.do(t, method, c.target, c.body, "Accept", "application/json"), c.status, c.code)
			if c.param != "" {
				require.Equal(t, []string{c.param}, oo.Issue[0].Expression)
			}
		})
	}
}

func TestStatusInProgress(t *testing.T) {
	t.Parallel()
	t.Run("queued", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		id := e.mustKickoff(t)
		r := e.do(t, http.MethodGet, e.statusURL(id), "", "Accept", "application/json")
		require.Equal(t, http.StatusAccepted, r.status)
		require.Equal(t, "queued", r.header.Get("X-Progress"))
		require.Equal(t, "1", r.header.Get("Retry-After"), "a fresh job is polled after the 1 s floor")
		require.Empty(t, r.body)
	})
	t.Run("running-with-progress", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		id := e.mustKickoff(t)
		e.claim(t, id, func(j *bulkexport.Job) { j.Progress = bulkexport.Progress{Percent: 42.7, Message: "Observation"} })
		r := e.do(t, http.MethodGet, e.statusURL(id), "")
		require.Equal(t, http.StatusAccepted, r.status)
		require.Equal(t, "42% complete: Observation", r.header.Get("X-Progress"))
		_, err := strconv.Atoi(r.header.Get("Retry-After"))
		require.NoError(t, err, "Retry-After is integer seconds")
	})
	t.Run("running-progress-unknown", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		id := e.mustKickoff(t)
		e.claim(t, id, nil) // the kick-off's Percent -1 and "queued" stay
		r := e.do(t, http.MethodGet, e.statusURL(id), "")
		require.Equal(t, http.StatusAccepted, r.status)
		require.Equal(t, "in progress", r.header.Get("X-Progress"))
	})
	t.Run("progress-is-short-printable-ascii", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		id := e.mustKickoff(t)
		msg := "Obs\x00ervation\r\nX-Injected: 1 ✓ " + strings.Repeat("long text ", 30)
		e.claim(t, id, func(j *bulkexport.Job) { j.Progress = bulkexport.Progress{Percent: 250, Message: msg} })
		r := e.do(t, http.MethodGet, e.statusURL(id), "")
		require.Equal(t, http.StatusAccepted, r.status)
		p := r.header.Get("X-Progress")
		require.Less(t, len(p), 100)
		require.True(t, strings.HasPrefix(p, "100% complete: ObservationX-Injected: 1  long text"), p)
		for _, c := range []byte(p) {
			require.True(t, c >= 0x20 && c < 0x7f, "byte %q in %q", c, p)
		}
		require.Empty(t, r.header.Get("X-Injected"))
	})
	t.Run("path-form-and-HEAD", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		id := e.mustKickoff(t)
		r := e.do(t, http.MethodGet, "/$export-poll-status/"+id, "")
		require.Equal(t, http.StatusAccepted, r.status)
		require.Equal(t, "queued", r.header.Get("X-Progress"))
		r = e.do(t, http.MethodHead, e.statusURL(id), "")
		require.Equal(t, http.StatusAccepted, r.status)
		require.Equal(t, "queued", r.header.Get("X-Progress"))
	})
	t.Run("POST-Parameters", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		id := e.mustKickoff(t)
		body := `{"resourceType":"Parameters","parameter":[{"name":"_jobId","valueString":"` + id + `"}]}`
		r := e.do(t, http.MethodPost, "/$export-poll-status", body, "Content-Type", "application/fhir+json")
		require.Equal(t, http.StatusAccepted, r.status, string(r.body))
		require.Equal(t, "queued", r.header.Get("X-Progress"))
		// POST with the id in the query string needs no body.
		r = e.do(t, http.MethodPost, e.statusURL(id), "")
		require.Equal(t, http.StatusAccepted, r.status, string(r.body))
	})
	t.Run("_format-tolerated", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		id := e.mustKickoff(t)
		require.Equal(t, http.StatusAccepted, e.do(t, http.MethodGet, e.statusURL(id)+"&_format=json", "").status)
		require.Equal(t, http.StatusAccepted, e.do(t, http.MethodGet, "/$export-poll-status?_format=json&%5FjobId="+id, "").status)
	})
}

func TestStatusRetryAfter(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		policy func(*bulkexport.Job, time.Time) time.Duration
		age    time.Duration
		want   string
	}{
		{"default/fresh", nil, 0, "1"},
		{"default/35s-old", nil, 35 * time.Second, "4"}, // 3.5 s rounded up
		{"default/10min-old", nil, 10 * time.Minute, "60"},
		{"default/capped", nil, 24 * time.Hour, "120"},
		{"fixed/120s", bulkexport.FixedRetryAfter(120 * time.Second), time.Hour, "120"},
		{"fixed/fraction-rounded-up", bulkexport.FixedRetryAfter(1500 * time.Millisecond), 0, "2"},
		{"fixed/zero-floored", bulkexport.FixedRetryAfter(0), 0, "1"},
		{"fixed/negative-floored", bulkexport.FixedRetryAfter(-time.Minute), 0, "1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, func(o *bulkexport.Options) { o.RetryAfter = c.policy })
			id := e.mustKickoff(t)
			e.clock.Advance(c.age)
			r := e.do(t, http.MethodGet, e.statusURL(id), "")
			require.Equal(t, http.StatusAccepted, r.status)
			require.Equal(t, c.want, r.header.Get("Retry-After"))
		})
	}
}

func TestRetryAfterPolicies(t *testing.T) {
	t.Parallel()
	job := &bulkexport.Job{CreatedAt: t0}
	cases := []struct {
		age  time.Duration
		want time.Duration
	}{
		{-time.Hour, time.Second}, // clock skew: never below the floor
		{0, time.Second},
		{9 * time.Second, time.Second},
		{10 * time.Second, time.Second},
		{35 * time.Second, 3500 * time.Millisecond},
		{10 * time.Minute, time.Minute},
		{20 * time.Minute, 2 * time.Minute},
		{30 * 24 * time.Hour, 2 * time.Minute},
	}
	for _, c := range cases {
		got := bulkexport.DefaultRetryAfter(job, t0.Add(c.age))
		require.Equal(t, c.want, got, "age %v", c.age)
		require.GreaterOrEqual(t, got, time.Second)
		require.LessOrEqual(t, got, 2*time.Minute)
	}
	for _, d := range []time.Duration{0, time.Second, 120 * time.Second, time.Hour} {
		p := bulkexport.FixedRetryAfter(d)
		require.Equal(t, d, p(job, t0))
		require.Equal(t, d, p(nil, t0.Add(time.Hour)), "the job is not looked at")
	}
}

func TestStatusCompleted(t *testing.T) {
	t.Parallel()
	type manifest struct {
		TransactionTime     string `json:"transactionTime"`
		Request             string `json:"request"`
		RequiresAccessToken bool   `json:"requiresAccessToken"`
		Output              []struct {
			Type  string `json:"type"`
			URL   string `json:"url"`
			Count *int64 `json:"count"`
		} `json:"output"`
		Deleted []struct {
			Type string `json:"type"`
			URL  string `json:"url"`
		} `json:"deleted"`
		Error []struct {
			Type string `json:"type"`
			URL  string `json:"url"`
		} `json:"error"`
		Extension map[string]any `json:"extension"`
	}
	decode := func(t *testing.T, r response) (manifest, map[string]json.RawMessage) {
		t.Helper()
		require.Equal(t, http.StatusOK, r.status, string(r.body))
		require.Equal(t, "application/json", r.header.Get("Content-Type"))
		var m manifest
		require.NoError(t, json.Unmarshal(r.body, &m))
		var raw map[string]json.RawMessage
		require.NoError(t, json.Unmarshal(r.body, &raw))
		for _, k := range []string{"transactionTime", "request", "requiresAccessToken", "output", "error"} {
			require.Contains(t, raw, k, "the manifest always has %s", k)
		}
		return m, raw
	}

	t.Run("full", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, func(o *bulkexport.Options) { o.Authenticate = bearerAuth })
		auth := []string{"Authorization", "Bearer client-a"}
		query := "?_type=Patient,Observation&_since=2024-01-01T00:00:00%2B01:00"
		r := e.kickoff(t, http.MethodGet, "/$export"+query, "", auth...)
		require.Equal(t, http.StatusAccepted, r.status, string(r.body))
		id := jobIDOf(t, r.header.Get("Content-Location"))
		tx := time.Date(2026, 3, 4, 5, 0, 0, 123456789, time.FixedZone("CET", 3600))
		expires := e.clock.Now().Add(90 * time.Minute)
		e.claim(t, id, func(j *bulkexport.Job) {
			j.State = bulkexport.StateCompleted
			j.TransactionTime = tx
			j.ExpiresAt = expires
			j.Output = []bulkexport.File{
				{Type: "Patient", Name: "Patient.000.ndjson", Count: 12, Size: 3456},
				{Type: "Observation", Name: "Observation.000.ndjson", Count: 1000, Size: 99999},
			}
		})
		r = e.do(t, http.MethodGet, e.statusURL(id), "", append(auth, "Accept", "application/json")...)
		m, raw := decode(t, r)

		require.Equal(t, expires.UTC().Format(http.TimeFormat), r.header.Get("Expires"))
		exp, err := http.ParseTime(r.header.Get("Expires"))
		require.NoError(t, err)
		require.True(t, exp.Equal(expires.Truncate(time.Second)))

		require.Equal(t, "2026-03-04T04:00:00.123Z", m.TransactionTime)
		require.Equal(t, e.base+"/$export"+query, m.Request, "the full kick-off URL")
		require.True(t, m.RequiresAccessToken, "Authenticate is set")
		require.Len(t, m.Output, 2)
		require.Equal(t, "Patient", m.Output[0].Type)
		require.Equal(t, e.base+"/bulkfiles/"+id+"/Patient.000.ndjson", m.Output[0].URL)
		require.Equal(t, e.h.FileURL(id, "Patient.000.ndjson"), m.Output[0].URL)
		u, err := url.Parse(m.Output[0].URL)
		require.NoError(t, err)
		require.True(t, u.IsAbs())
		require.Equal(t, int64(12), *m.Output[0].Count)
		require.Equal(t, "Observation", m.Output[1].Type)
		require.Equal(t, int64(1000), *m.Output[1].Count)

		require.Equal(t, "[]", string(raw["error"]), "error is [] even when empty")
		require.Contains(t, string(r.body), `"error":[]`)
		require.NotContains(t, raw, "deleted", "deleted only when there are deleted files")
		require.NotContains(t, raw, "extension")
		require.NotContains(t, string(r.body), "size", "the file size is not a manifest field")
	})

	t.Run("deleted-errors-extension", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		id := e.mustKickoff(t)
		e.complete(t, id, func(j *bulkexport.Job) {
			j.Deleted = []bulkexport.File{{Type: "Bundle", Name: "deleted.000.ndjson", Count: 3}}
			j.Errors = []bulkexport.File{{Type: "OperationOutcome", Name: "errors.000.ndjson", Count: 1}}
			j.Extension = json.RawMessage(`{"https://example.org/fhir/note":"partial","n":1}`)
		})
		r := e.do(t, http.MethodGet, e.statusURL(id), "")
		m, raw := decode(t, r)
		require.False(t, m.RequiresAccessToken, "no Authenticate: no token needed")
		require.Equal(t, "[]", string(raw["output"]), "output is [] when empty")
		require.Len(t, m.Deleted, 1)
		require.Equal(t, "Bundle", m.Deleted[0].Type)
		require.Equal(t, e.base+"/bulkfiles/"+id+"/deleted.000.ndjson", m.Deleted[0].URL)
		require.Len(t, m.Error, 1)
		require.Equal(t, "OperationOutcome", m.Error[0].Type)
		require.Equal(t, e.base+"/bulkfiles/"+id+"/errors.000.ndjson", m.Error[0].URL)
		require.Equal(t, map[string]any{"https://example.org/fhir/note": "partial", "n": float64(1)}, m.Extension)
	})

	t.Run("requiresAccessToken-override", func(t *testing.T) {
		t.Parallel()
		yes := true
		e := newEnv(t, func(o *bulkexport.Options) { o.RequiresAccessToken = &yes })
		id := e.mustKickoff(t)
		e.complete(t, id, nil)
		m, _ := decode(t, e.do(t, http.MethodGet, e.statusURL(id), ""))
		require.True(t, m.RequiresAccessToken)
	})

	t.Run("POST-and-path-form", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		id := e.mustKickoff(t)
		e.complete(t, id, nil)
		decode(t, e.do(t, http.MethodGet, "/$export-poll-status/"+id, ""))
		decode(t, e.do(t, http.MethodPost, "/$export-poll-status",
			`{"resourceType":"Parameters","parameter":[{"name":"_jobId","valueString":"`+id+`"}]}`,
			"Content-Type", "application/fhir+json"))
	})

	t.Run("expired", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		id := e.mustKickoff(t)
		e.complete(t, id, nil) // expires in an hour
		e.clock.Advance(time.Hour - time.Nanosecond)
		require.Equal(t, http.StatusOK, e.do(t, http.MethodGet, e.statusURL(id), "").status)
		e.clock.Advance(time.Nanosecond)
		requireOO(t, e.do(t, http.MethodGet, e.statusURL(id), ""), http.StatusNotFound, fhirbulk.IssueNotFound)
	})
}

func TestStatusFailed(t *testing.T) {
	t.Parallel()
	custom := fhirbulk.NewOutcome(fhirbulk.SeverityError, fhirbulk.IssueProcessing, "the source rejected the query")
	cases := []struct {
		name    string
		failure *bulkexport.Failure
		status  int
		code    fhirbulk.IssueType
		diag    string
	}{
		{"no-failure", nil, 500, fhirbulk.IssueProcessing, "the export failed"},
		{"outcome-default-status", &bulkexport.Failure{Outcome: custom}, 500, fhirbulk.IssueProcessing, "the source rejected the query"},
		{"own-status", &bulkexport.Failure{Status: 422, Outcome: custom}, 422, fhirbulk.IssueProcessing, "the source rejected the query"},
		{"status-without-outcome", &bulkexport.Failure{Status: 403}, 403, fhirbulk.IssueProcessing, "the export failed"},
		{"success-status-ignored", &bulkexport.Failure{Status: 200, Outcome: custom}, 500, fhirbulk.IssueProcessing, "the source rejected the query"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, nil)
			id := e.mustKickoff(t)
			e.claim(t, id, func(j *bulkexport.Job) {
				j.State = bulkexport.StateFailed
				j.Failure = c.failure
				j.ExpiresAt = e.clock.Now().Add(time.Hour)
			})
			oo := requireOO(t, e.do(t, http.MethodGet, e.statusURL(id), ""), c.status, c.code)
			require.Equal(t, c.diag, oo.Issue[0].Diagnostics)
			// A transient code would tell the client the poll failed and the
			// job lives on: it would poll a dead job forever.
			require.False(t, oo.Issue[0].Code.Transient(), "a failed job is not reported as transient")
		})
	}
}

func TestStatusStoreUnavailable(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		err  error
	}{
		{"plain-error", errors.New("pq: connection refused")},
		{"deadline", fmt.Errorf("query: %w", context.DeadlineExceeded)},
		{"unavailable", fmt.Errorf("replica down: %w", bulkexport.ErrUnavailable)},
	}
	for _, c := range cases {
		for _, method := range []string{http.MethodGet, http.MethodPost, http.MethodDelete} {
			t.Run(c.name+"/"+method, func(t *testing.T) {
				t.Parallel()
				e := newEnvWith(t, envConfig{wrap: func(m *bulkexport.MemoryStore) bulkexport.JobStore {
					return &failingStore{JobStore: m, err: c.err}
				}})
				id := e.mustKickoff(t)
				oo := requireOO(t, e.do(t, method, e.statusURL(id), ""), http.StatusServiceUnavailable, "")
				require.True(t, oo.Issue[0].Code.Transient(), "code %s tells the client to retry", oo.Issue[0].Code)
				require.Equal(t, fhirbulk.SeverityError, oo.Issue[0].Severity)
				require.NotContains(t, oo.Issue[0].Diagnostics, "pq:")
				require.Equal(t, bulkexport.StateQueued, e.stored(t, id).State)
			})
		}
	}
}

// ---------------------------------------------------------------------------
// Cancel

func TestCancel(t *testing.T) {
	t.Parallel()
	t.Run("queued", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		id := e.mustKickoff(t)
		r := e.do(t, http.MethodDelete, e.statusURL(id), "", "Accept", "application/json")
		oo := requireOO(t, r, http.StatusAccepted, fhirbulk.IssueInformational)
		require.Equal(t, fhirbulk.SeverityInformation, oo.Issue[0].Severity)

		j := e.stored(t, id)
		require.Equal(t, bulkexport.StateCancelled, j.State)
		require.True(t, j.ExpiresAt.Equal(e.clock.Now().Add(24*time.Hour)), "kept for CancelledRetention (default 24h)")

		// Every later poll: 404 with an OperationOutcome.
		for _, method := range []string{http.MethodGet, http.MethodPost} {
			requireOO(t, e.do(t, method, e.statusURL(id), ""), http.StatusNotFound, fhirbulk.IssueDeleted)
		}
		requireOO(t, e.do(t, http.MethodGet, "/$export-poll-status/"+id, ""), http.StatusNotFound, fhirbulk.IssueDeleted)
		// A second DELETE: 404.
		requireOO(t, e.do(t, http.MethodDelete, e.statusURL(id), ""), http.StatusNotFound, fhirbulk.IssueDeleted)
		// After the retention the record is gone from the client's view.
		e.clock.Advance(24 * time.Hour)
		requireOO(t, e.do(t, http.MethodGet, e.statusURL(id), ""), http.StatusNotFound, fhirbulk.IssueNotFound)
	})
	t.Run("running-path-form", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, func(o *bulkexport.Options) { o.CancelledRetention = time.Minute })
		id := e.mustKickoff(t)
		e.claim(t, id, func(j *bulkexport.Job) { j.Progress = bulkexport.Progress{Percent: 10, Message: "Patient"} })
		requireOO(t, e.do(t, http.MethodDelete, "/$export-poll-status/"+id, ""), http.StatusAccepted, fhirbulk.IssueInformational)
		j := e.stored(t, id)
		require.Equal(t, bulkexport.StateCancelled, j.State)
		require.True(t, j.ExpiresAt.Equal(e.clock.Now().Add(time.Minute)))
		requireOO(t, e.do(t, http.MethodGet, e.statusURL(id), ""), http.StatusNotFound, fhirbulk.IssueDeleted)
	})
	t.Run("unknown", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, nil)
		requireOO(t, e.do(t, http.MethodDelete, e.statusURL(bulkexport.NewJobID()), ""), http.StatusNotFound, fhirbulk.IssueNotFound)
	})
	for _, state := range []bulkexport.JobState{bulkexport.StateCompleted, bulkexport.StateFailed} {
		t.Run(string(state)+"/default-not-found", func(t *testing.T) {
			t.Parallel()
			st := &memStorage{}
			e := newEnv(t, func(o *bulkexport.Options) { o.Storage = st })
			id := e.mustKickoff(t)
			e.complete(t, id, func(j *bulkexport.Job) { j.State = state })
			oo := requireOO(t, e.do(t, http.MethodDelete, e.statusURL(id), ""), http.StatusNotFound, fhirbulk.IssueNotFound)
			require.Contains(t, oo.Issue[0].Diagnostics, string(state))
			require.Equal(t, state, e.stored(t, id).State, "the job is kept")
			require.Empty(t, st.deleted, "the files are kept")
			require.NotEqual(t, http.StatusNotFound, e.do(t, http.MethodGet, e.statusURL(id), "").status, "polls still answer")
		})
		t.Run(string(state)+"/removes", func(t *testing.T) {
			t.Parallel()
			st := &memStorage{}
			e := newEnv(t, func(o *bulkexport.Options) {
				o.DeletePolicy = bulkexport.DeleteFinishedRemoves
				o.Storage = st
			})
			id := e.mustKickoff(t)
			e.complete(t, id, func(j *bulkexport.Job) { j.State = state })
			requireOO(t, e.do(t, http.MethodDelete, e.statusURL(id), ""), http.StatusAccepted, fhirbulk.IssueInformational)
			_, err := e.store.Get(context.Background(), id)
			require.ErrorIs(t, err, bulkexport.ErrNotFound, "the job is removed")
			require.Equal(t, []string{id}, st.deleted, "and its files")
			requireOO(t, e.do(t, http.MethodGet, e.statusURL(id), ""), http.StatusNotFound, fhirbulk.IssueNotFound)
			requireOO(t, e.do(t, http.MethodDelete, e.statusURL(id), ""), http.StatusNotFound, fhirbulk.IssueNotFound)
		})
	}
	t.Run("removes/storage-fails", func(t *testing.T) {
		t.Parallel()
		st := &memStorage{deleteErr: errors.New("bucket unreachable")}
		e := newEnv(t, func(o *bulkexport.Options) {
			o.DeletePolicy = bulkexport.DeleteFinishedRemoves
			o.Storage = st
		})
		id := e.mustKickoff(t)
		e.complete(t, id, nil)
		oo := requireOO(t, e.do(t, http.MethodDelete, e.statusURL(id), ""), http.StatusServiceUnavailable, fhirbulk.IssueTransient)
		require.NotContains(t, oo.Issue[0].Diagnostics, "bucket")
		require.Equal(t, bulkexport.StateCompleted, e.stored(t, id).State, "the job stays until its files are gone")
	})
	t.Run("removes/queued-is-cancelled", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, func(o *bulkexport.Options) { o.DeletePolicy = bulkexport.DeleteFinishedRemoves })
		id := e.mustKickoff(t)
		requireOO(t, e.do(t, http.MethodDelete, e.statusURL(id), ""), http.StatusAccepted, fhirbulk.IssueInformational)
		require.Equal(t, bulkexport.StateCancelled, e.stored(t, id).State)
	})
	t.Run("conflict-with-worker-progress", func(t *testing.T) {
		t.Parallel()
		var rs *racingStore
		e := newEnvWith(t, envConfig{wrap: func(m *bulkexport.MemoryStore) bulkexport.JobStore {
			rs = &racingStore{MemoryStore: m, worker: func(j *bulkexport.Job) { j.Progress.Percent = 50 }}
			return rs
		}})
		id := e.mustKickoff(t)
		e.claim(t, id, nil)
		requireOO(t, e.do(t, http.MethodDelete, e.statusURL(id), ""), http.StatusAccepted, fhirbulk.IssueInformational)
		j := e.stored(t, id)
		require.Equal(t, bulkexport.StateCancelled, j.State)
		require.Equal(t, float64(50), j.Progress.Percent, "the worker's update was not lost")
	})
	t.Run("conflict-with-worker-completing", func(t *testing.T) {
		t.Parallel()
		e := newEnvWith(t, envConfig{wrap: func(m *bulkexport.MemoryStore) bulkexport.JobStore {
			return &racingStore{MemoryStore: m, worker: func(j *bulkexport.Job) { j.State = bulkexport.StateCompleted }}
		}})
		id := e.mustKickoff(t)
		e.claim(t, id, nil)
		// The job completed under the DELETE: the default policy keeps it.
		requireOO(t, e.do(t, http.MethodDelete, e.statusURL(id), ""), http.StatusNotFound, fhirbulk.IssueNotFound)
		require.Equal(t, bulkexport.StateCompleted, e.stored(t, id).State)
	})
}

// ---------------------------------------------------------------------------
// Authentication and ownership

func TestAuthenticate(t *testing.T) {
	t.Parallel()
	e := newEnv(t, func(o *bulkexport.Options) {
		o.Authenticate = bearerAuth
		o.Types = newTypeLister()
	})
	asA := []string{"Authorization", "Bearer client-a"}
	asB := []string{"Authorization", "Bearer client-b"}
	id := e.mustKickoff(t, asA...)
	require.Equal(t, "client-a", e.stored(t, id).Owner)
	params := `{"resourceType":"Parameters","parameter":[{"name":"_jobId","valueString":"` + id + `"}]}`

	endpoints := []struct {
		method, target, body string
	}{
		{http.MethodGet, "/$export", ""},
		{http.MethodPost, "/$export", `{"resourceType":"Parameters"}`},
		{http.MethodGet, "/Patient/$export", ""},
		{http.MethodPost, "/Patient/$export", ""},
		{http.MethodGet, "/Group/g1/$export", ""},
		{http.MethodPost, "/Group/g1/$export", ""},
		{http.MethodGet, e.statusURL(id), ""},
		{http.MethodHead, e.statusURL(id), ""},
		{http.MethodPost, e.statusURL(id), ""},
		{http.MethodPost, "/$export-poll-status", params},
		{http.MethodDelete, e.statusURL(id), ""},
		{http.MethodGet, "/$export-poll-status/" + id, ""},
		{http.MethodDelete, "/$export-poll-status/" + id, ""},
		{http.MethodGet, "/bulkfiles/" + id + "/Patient.000.ndjson", ""},
	}
	for _, ep := range endpoints {
		t.Run("no-token/"+ep.method+" "+ep.target, func(t *testing.T) {
			t.Parallel()
			r := e.kickoff(t, ep.method, ep.target, ep.body)
			require.Equal(t, http.StatusUnauthorized, r.status)
			require.Equal(t, "Bearer", r.header.Get("WWW-Authenticate"))
			if ep.method != http.MethodHead {
				requireOO(t, r, http.StatusUnauthorized, fhirbulk.IssueLogin)
			}
		})
		t.Run("forbidden/"+ep.method+" "+ep.target, func(t *testing.T) {
			t.Parallel()
			r := e.kickoff(t, ep.method, ep.target, ep.body, "Authorization", "Bearer banned")
			require.Equal(t, http.StatusForbidden, r.status)
			require.Empty(t, r.header.Get("WWW-Authenticate"))
		})
	}

	t.Run("other-client", func(t *testing.T) {
		t.Parallel()
		for _, ep := range endpoints[6:] {
			r := e.do(t, ep.method, ep.target, ep.body, asB...)
			require.Equal(t, http.StatusNotFound, r.status, "%s %s", ep.method, ep.target)
			if ep.method != http.MethodHead {
				oo := requireOO(t, r, http.StatusNotFound, fhirbulk.IssueNotFound)
				if !strings.Contains(ep.target, "/bulkfiles/") {
					require.Equal(t, "no such export job", oo.Issue[0].Diagnostics, "the same answer as for an unknown job")
				}
			}
		}
		j := e.stored(t, id)
		require.Equal(t, bulkexport.StateQueued, j.State, "client B's DELETE changed nothing")
		require.Equal(t, http.StatusAccepted, e.do(t, http.MethodGet, e.statusURL(id), "", asA...).status)
	})
}

// ---------------------------------------------------------------------------
// Routing

func TestMethodNotAllowed(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	id := e.mustKickoff(t)
	cases := []struct {
		method, target, allow string
	}{
		{http.MethodPut, "/$export", "GET, POST"},
		{http.MethodDelete, "/$export", "GET, POST"},
		{http.MethodHead, "/$export", "GET, POST"},
		{http.MethodPatch, "/Patient/$export", "GET, POST"},
		{http.MethodOptions, "/Group/g1/$export", "GET, POST"},
		{http.MethodPut, e.statusURL(id), "GET, HEAD, POST, DELETE"},
		{http.MethodPatch, "/$export-poll-status/" + id, "GET, HEAD, POST, DELETE"},
		{http.MethodPost, "/bulkfiles/" + id + "/x.ndjson", "GET, HEAD"},
		{http.MethodDelete, "/bulkfiles/" + id + "/x.ndjson", "GET, HEAD"},
	}
	for _, c := range cases {
		t.Run(c.method+" "+c.target, func(t *testing.T) {
			t.Parallel()
			r := e.kickoff(t, c.method, c.target, "")
			require.Equal(t, http.StatusMethodNotAllowed, r.status)
			require.Equal(t, c.allow, r.header.Get("Allow"))
			if c.method != http.MethodHead {
				requireOO(t, r, http.StatusMethodNotAllowed, fhirbulk.IssueNotSupported)
			}
		})
	}
	require.Equal(t, bulkexport.StateQueued, e.stored(t, id).State)
}

func TestUnknownPath(t *testing.T) {
	t.Parallel()
	for _, m := range []mount{mountAtPath, mountStripPrefix} {
		e := newEnvWith(t, envConfig{mount: m})
		for _, p := range []string{
			"/", "/metadata", "/Observation/$export", "/Patient/1/$export", "/Group/$export", "/Group/g1/$everything",
			"/$export/extra", "/$exports", "/Group/g1/$export/x", "/$export-poll-statuses", "/bulkfiles/",
		} {
			t.Run(m.String()+p, func(t *testing.T) {
				t.Parallel()
				requireOO(t, e.kickoff(t, http.MethodGet, p, ""), http.StatusNotFound, fhirbulk.IssueNotFound)
			})
		}
	}
}

func TestDownload(t *testing.T) {
	t.Parallel()
	st := &memStorage{files: map[string]string{}}
	e := newEnv(t, func(o *bulkexport.Options) {
		o.Authenticate = bearerAuth
		o.Storage = st
	})
	asA := []string{"Authorization", "Bearer a"}
	id := e.mustKickoff(t, asA...)
	content := `{"resourceType":"Patient","id":"1"}` + "\n"
	st.mu.Lock()
	st.files[id+"/Patient.000.ndjson"] = content
	st.files[id+"/unlisted.ndjson"] = content
	st.mu.Unlock()
	e.complete(t, id, func(j *bulkexport.Job) {
		j.Output = []bulkexport.File{{Type: "Patient", Name: "Patient.000.ndjson", Count: 1}}
		j.Errors = []bulkexport.File{{Type: "OperationOutcome", Name: "gone.ndjson", Count: 1}}
	})
	fileURL := e.h.FileURL(id, "Patient.000.ndjson")

	r := e.do(t, http.MethodGet, fileURL, "", asA...)
	require.Equal(t, http.StatusOK, r.status)
	require.Equal(t, "application/fhir+ndjson", r.header.Get("Content-Type"))
	require.Equal(t, content, string(r.body))

	r = e.do(t, http.MethodGet, fileURL, "", append(asA, "Range", "bytes=0-16")...)
	require.Equal(t, http.StatusPartialContent, r.status)
	require.Equal(t, content[:17], string(r.body))

	requireOO(t, e.do(t, http.MethodGet, fileURL, "", "Authorization", "Bearer b"), http.StatusNotFound, fhirbulk.IssueNotFound)
	requireOO(t, e.do(t, http.MethodGet, e.h.FileURL(id, "unlisted.ndjson"), "", asA...), http.StatusNotFound, fhirbulk.IssueNotFound)
	requireOO(t, e.do(t, http.MethodGet, e.h.FileURL(id, "gone.ndjson"), "", asA...), http.StatusNotFound, fhirbulk.IssueNotFound)
	requireOO(t, e.do(t, http.MethodGet, "/bulkfiles/"+id+"/..%2F..%2Fsecret", "", asA...), http.StatusNotFound, fhirbulk.IssueNotFound)
}

// ---------------------------------------------------------------------------
// Construction, capability

func TestNewHandler(t *testing.T) {
	t.Parallel()
	store := bulkexport.NewMemoryStore()
	for _, base := range []string{"", "fhir", "/fhir", "ftp://example.org/fhir", "http:///fhir", "http://example.org/fhir?x=1",
		"http://example.org/fhir#top", "://bad"} {
		_, err := bulkexport.NewHandler(store, &bulkexport.Options{BaseURL: base})
		require.Error(t, err, "BaseURL %q", base)
	}
	_, err := bulkexport.NewHandler(store, nil)
	require.Error(t, err)
	_, err = bulkexport.NewHandler(nil, &bulkexport.Options{BaseURL: "https://example.org/fhir"})
	require.Error(t, err)

	for _, base := range []string{"https://example.org/fhir", "https://example.org/fhir/"} {
		h, err := bulkexport.NewHandler(store, &bulkexport.Options{BaseURL: base})
		require.NoError(t, err)
		require.Equal(t, "https://example.org/fhir/$export-poll-status?_jobId=abc", h.StatusURL("abc"))
		require.Equal(t, "https://example.org/fhir/bulkfiles/abc/Patient.000.ndjson", h.FileURL("abc", "Patient.000.ndjson"))
	}
	h, err := bulkexport.NewHandler(store, &bulkexport.Options{BaseURL: "http://localhost:8080", StatusURLStyle: bulkexport.StatusPath})
	require.NoError(t, err)
	require.Equal(t, "http://localhost:8080/$export-poll-status/abc", h.StatusURL("abc"))
}

func TestHandlerAtRoot(t *testing.T) {
	t.Parallel()
	// BaseURL without a path, handler mounted at "/".
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	h, err := bulkexport.NewHandler(bulkexport.NewMemoryStore(), &bulkexport.Options{BaseURL: srv.URL, Logger: discardLogger()})
	require.NoError(t, err)
	mux.Handle("/", h)
	req, err := http.NewRequest(http.MethodGet, srv.URL+"/$export", nil)
	require.NoError(t, err)
	req.Header.Set("Prefer", "respond-async")
	res, err := srv.Client().Do(req)
	require.NoError(t, err)
	res.Body.Close()
	require.Equal(t, http.StatusAccepted, res.StatusCode)
	loc := res.Header.Get("Content-Location")
	require.True(t, strings.HasPrefix(loc, srv.URL+"/$export-poll-status?_jobId="), loc)
	res, err = srv.Client().Get(loc)
	require.NoError(t, err)
	res.Body.Close()
	require.Equal(t, http.StatusAccepted, res.StatusCode)
}

func TestCapability(t *testing.T) {
	t.Parallel()
	e := newEnv(t, nil)
	c := e.h.Capability()
	require.Equal(t, []string{bulkexport.CapabilityBulkData}, c.Instantiates)
	require.Equal(t, []bulkexport.CapabilityOperation{
		{Name: "export", Definition: bulkexport.OperationExport},
		{Name: "export-poll-status", Definition: bulkexport.OperationExportPollStatus},
	}, c.Operations)
	require.Equal(t, []bulkexport.CapabilityResource{
		{Type: "Patient", Operation: []bulkexport.CapabilityOperation{{Name: "export", Definition: bulkexport.OperationPatientExport}}},
		{Type: "Group", Operation: []bulkexport.CapabilityOperation{{Name: "export", Definition: bulkexport.OperationGroupExport}}},
	}, c.Resources)

	t.Run("merge-into-empty", func(t *testing.T) {
		t.Parallel()
		cs := map[string]any{}
		c.MergeInto(cs)
		b, err := json.Marshal(cs)
		require.NoError(t, err)
		require.JSONEq(t, `{
			"instantiates": ["http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"],
			"rest": [{
				"mode": "server",
				"operation": [
					{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"},
					{"name": "export-poll-status", "definition": "http://ehealth.sundhed.dk/fhir/OperationDefinition/-s-export-poll-status"}
				],
				"resource": [
					{"type": "Patient", "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"}]},
					{"type": "Group", "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"}]}
				]
			}]
		}`, string(b))
	})

	t.Run("merge-into-existing", func(t *testing.T) {
		t.Parallel()
		var cs map[string]any
		require.NoError(t, json.Unmarshal([]byte(`{
			"resourceType": "CapabilityStatement",
			"instantiates": ["http://hl7.org/fhir/us/core/CapabilityStatement/us-core-server"],
			"rest": [{
				"mode": "server",
				"operation": [{"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"}],
				"resource": [
					{"type": "Observation", "interaction": [{"code": "read"}]},
					{"type": "Patient", "interaction": [{"code": "read"}],
					 "operation": [{"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}]}
				]
			}]
		}`), &cs))
		c.MergeInto(cs)
		b, err := json.Marshal(cs)
		require.NoError(t, err)
		require.JSONEq(t, `{
			"resourceType": "CapabilityStatement",
			"instantiates": [
				"http://hl7.org/fhir/us/core/CapabilityStatement/us-core-server",
				"http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"
			],
			"rest": [{
				"mode": "server",
				"operation": [
					{"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"},
					{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/export"},
					{"name": "export-poll-status", "definition": "http://ehealth.sundhed.dk/fhir/OperationDefinition/-s-export-poll-status"}
				],
				"resource": [
					{"type": "Observation", "interaction": [{"code": "read"}]},
					{"type": "Patient", "interaction": [{"code": "read"}], "operation": [
						{"name": "everything", "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"},
						{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/patient-export"}
					]},
					{"type": "Group", "operation": [{"name": "export", "definition": "http://hl7.org/fhir/uv/bulkdata/OperationDefinition/group-export"}]}
				]
			}]
		}`, string(b))
	})
}
