package hostile

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	_ "modernc.org/sqlite"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
	"github.com/bulkfhir/bulkexport/pgstore"
	"github.com/bulkfhir/bulkexport/sqlitestore"
)

// envPostgres names the PostgreSQL database of the pgstore run; without it
// that run skips. It is read inside the test, so that the test cache keys
// results on it.
const envPostgres = "BULKEXPORT_TEST_POSTGRES_URL"

// request is one HTTP request, relative to the handler's base URL.
type request struct {
	method string
	path   string // escaped path after /fhir; "{id}" is the seed job's id
	query  string // raw query; "{id}" is the seed job's id
	body   string
	prefer string // Prefer header; default "respond-async"
}

// hostileCase is one hostile request and the exact answer it must get.
type hostileCase struct {
	name   string
	req    request
	status int
	code   fhirbulk.IssueType
	// clean is the same request without the hostile bytes: it must be
	// answered 202, which shows that the bytes alone were refused. Nil
	// when no such request is valid (an unknown parameter under strict
	// handling).
	clean *request
}

// badBytes are the hostile byte sequences: in a query (percent-encoded)
// and inside a JSON string of a Parameters body (a \u escape for NUL, which
// JSON cannot carry raw, and raw bytes for invalid UTF-8).
var badBytes = []struct {
	label string
	query string
	json  string
}{
	{"nul", "%00", `\u0000`},
	{"ff", "%FF", "\xff"},
	{"c328", "%C3%28", "\xc3\x28"},
	{"overlong-slash", "%C0%AF", "\xc0\xaf"},
}

// params are the kick-off parameters under test, each with a valid value
// (query-encoded and as a Parameters entry's value[x] member, %s being the
// value's JSON string text).
var params = []struct {
	name       string
	queryValue string
	jsonValue  string // the text the hostile bytes are appended to
	jsonMember string // the value[x] member, with %s for the JSON string text
	getPath    string // GET kick-off path; the POST goes to /Patient/$export
	getValid   bool   // the clean GET is a valid kick-off
}{
	{"_type", "Patient", "Patient", `"valueString":"%s"`, "/$export", true},
	{"_typeFilter", "Patient%3Fgender%3Dmale", "Patient?gender=male", `"valueString":"%s"`, "/$export", true},
	{"_since", "2024-01-02T03:04:05Z", "2024-01-02T03:04:05Z", `"valueInstant":"%s"`, "/$export", true},
	{"_elements", "Patient.id", "Patient.id", `"valueString":"%s"`, "/$export", true},
	{"patient", "Patient%2Fp1", "Patient/p1", `"valueReference":{"reference":"%s"}`, "/Patient/$export", false},
	{"_outputFormat", "application%2Ffhir%2Bndjson", "application/fhir+ndjson", `"valueString":"%s"`, "/$export", true},
}

const (
	preferStrict  = "respond-async, handling=strict"
	preferLenient = "respond-async, handling=lenient"
)

func parametersBody(name, member string) string {
	return `{"resourceType":"Parameters","parameter":[{"name":"` + name + `",` + member + `}]}`
}

func kickoffGet(path, query, prefer string) *request {
	return &request{method: http.MethodGet, path: path, query: query, prefer: prefer}
}

func kickoffPost(body, prefer string) *request {
	return &request{method: http.MethodPost, path: "/Patient/$export", body: body, prefer: prefer}
}

// hostileCases builds the table.
func hostileCases() []hostileCase {
	var cases []hostileCase
	add := func(name string, req *request, status int, code fhirbulk.IssueType, clean *request) {
		cases = append(cases, hostileCase{name: name, req: *req, status: status, code: code, clean: clean})
	}
	invalid := func(name string, req, clean *request) {
		add(name, req, http.StatusBadRequest, fhirbulk.IssueInvalid, clean)
	}

	// Every parameter, the bytes in its name and in its value, GET and
	// POST, strict and lenient: always 400 invalid, lenient or not (a bad
	// name cannot even be recorded as ignored).
	for _, p := range params {
		for _, b := range badBytes {
			for _, prefer := range []string{preferStrict, preferLenient} {
				mode := "strict"
				if prefer == preferLenient {
					mode = "lenient"
				}
				var cleanGet *request
				if p.getValid {
					cleanGet = kickoffGet(p.getPath, p.name+"="+p.queryValue, prefer)
				}
				member := func(v string) string { return strings.Replace(p.jsonMember, "%s", v, 1) }
				cleanPost := kickoffPost(parametersBody(p.name, member(p.jsonValue)), prefer)
				pre := p.name + "/" + b.label + "/" + mode + "/"
				invalid(pre+"get-value", kickoffGet(p.getPath, p.name+"="+p.queryValue+b.query, prefer), cleanGet)
				invalid(pre+"get-name", kickoffGet(p.getPath, p.name+b.query+"="+p.queryValue, prefer), cleanGet)
				invalid(pre+"post-value", kickoffPost(parametersBody(p.name, member(p.jsonValue+b.json)), prefer), cleanPost)
				invalid(pre+"post-name", kickoffPost(parametersBody(p.name+b.json, member(p.jsonValue)), prefer), cleanPost)
			}
		}
	}

	// _typeFilter whose value is clean but whose search query decodes to
	// the hostile bytes (%2500 is "%00" once decoded).
	for _, b := range badBytes {
		enc := strings.ReplaceAll(b.query, "%", "%25")
		cleanGet := kickoffGet("/$export", "_typeFilter=Patient%3Fgender%3Dmale", preferStrict)
		invalid("_typeFilter/search-value-"+b.label, kickoffGet("/$export", "_typeFilter=Patient%3Fgender%3Dmale"+enc, preferStrict), cleanGet)
		invalid("_typeFilter/search-name-"+b.label, kickoffGet("/$export", "_typeFilter=Patient%3Fgen"+enc+"der%3Dmale", preferStrict), cleanGet)
		invalid("_typeFilter/search-value-"+b.label+"/post", kickoffPost(parametersBody("_typeFilter", `"valueString":"Patient?gender=male`+b.query+`"`), preferStrict),
			kickoffPost(parametersBody("_typeFilter", `"valueString":"Patient?gender=male"`), preferStrict))
	}

	// An unknown parameter: lenient handling ignores a clean one, strict
	// handling refuses it (not-supported), and either refuses the bytes.
	for _, b := range badBytes {
		for _, prefer := range []string{preferStrict, preferLenient} {
			mode, clean, cleanPost := "strict", (*request)(nil), (*request)(nil)
			if prefer == preferLenient {
				mode = "lenient"
				clean = kickoffGet("/$export", "foo=1", prefer)
				cleanPost = kickoffPost(parametersBody("foo", `"valueString":"1"`), prefer)
			}
			invalid("unknown/"+b.label+"/"+mode+"/get-name", kickoffGet("/$export", "foo"+b.query+"=1", prefer), clean)
			invalid("unknown/"+b.label+"/"+mode+"/get-value", kickoffGet("/$export", "foo=1"+b.query, prefer), clean)
			invalid("unknown/"+b.label+"/"+mode+"/get-name-only", kickoffGet("/$export", b.query+"=1", prefer), clean)
			invalid("unknown/"+b.label+"/"+mode+"/post-name", kickoffPost(parametersBody("foo"+b.json, `"valueString":"1"`), prefer), cleanPost)
			invalid("unknown/"+b.label+"/"+mode+"/post-value", kickoffPost(parametersBody("foo", `"valueString":"1`+b.json+`"`), prefer), cleanPost)
		}
	}

	// A Group id with the bytes.
	for _, b := range badBytes {
		invalid("group-id/"+b.label, kickoffGet("/Group/g1"+b.query+"/$export", "", preferStrict), kickoffGet("/Group/g1/$export", "", preferStrict))
	}

	// Parameters bodies the parser refuses before any parameter is read.
	cleanType := kickoffPost(parametersBody("_type", `"valueString":"Patient"`), preferStrict)
	add("body/raw-nul-in-json-string", kickoffPost(parametersBody("_type", "\"valueString\":\"Patient\x00\""), preferStrict),
		http.StatusBadRequest, fhirbulk.IssueStructure, cleanType)
	invalid("body/invalid-utf8-outside-strings", kickoffPost(parametersBody("_type", `"valueString":"Patient"`)+"\xff", preferStrict), cleanType)
	invalid("body/invalid-utf8-resource-type",
		kickoffPost("{\"resourceType\":\"Parameters\xc0\xaf\",\"parameter\":[{\"name\":\"_type\",\"valueString\":\"Patient\"}]}", preferStrict), cleanType)
	invalid("body/nul-in-valueCode", kickoffPost(parametersBody("_outputFormat", `"valueCode":"ndjson\u0000"`), preferStrict),
		kickoffPost(parametersBody("_outputFormat", `"valueCode":"ndjson"`), preferStrict))
	invalid("body/nul-in-valueCoding", kickoffPost(parametersBody("includeAssociatedData", `"valueCoding":{"code":"LatestProvenanceResources\u0000"}`), preferStrict),
		kickoffPost(parametersBody("includeAssociatedData", `"valueCoding":{"code":"LatestProvenanceResources"}`), preferStrict))
	// A NUL name on an entry that carries parts: the entry's shape is
	// refused first (not-supported, naming the parameter).
	add("body/nul-name-with-part", kickoffPost(`{"resourceType":"Parameters","parameter":[{"name":"_type\u0000","part":[]}]}`, preferStrict),
		http.StatusBadRequest, fhirbulk.IssueNotSupported, cleanType)
	// A POST kick-off takes no query parameters but _format.
	for _, b := range badBytes {
		r := kickoffPost(parametersBody("_type", `"valueString":"Patient"`), preferStrict)
		r.query = "_type" + b.query + "=Patient"
		invalid("post-query/"+b.label+"/name", r, cleanType)
		r = kickoffPost(parametersBody("_type", `"valueString":"Patient"`), preferStrict)
		r.query = "_format=json" + b.query
		c := *cleanType
		c.query = "_format=json"
		invalid("post-query/"+b.label+"/_format", r, &c)
	}

	// The status endpoint: the job id (query, path, POST body) and the
	// other status parameters, with and without the seed job's id in
	// front of the bytes. GET and DELETE; a DELETE must not cancel the
	// seed job.
	poll := func(method, path, query, body string) *request {
		return &request{method: method, path: path, query: query, body: body}
	}
	cleanPoll := poll(http.MethodGet, "/$export-poll-status", "_jobId={id}", "")
	for _, b := range badBytes {
		for _, m := range []string{http.MethodGet, http.MethodDelete} {
			pre := "status/" + strings.ToLower(m) + "/" + b.label + "/"
			invalid(pre+"query-id", poll(m, "/$export-poll-status", "_jobId="+b.query, ""), cleanPoll)
			invalid(pre+"query-seed-id", poll(m, "/$export-poll-status", "_jobId={id}"+b.query, ""), cleanPoll)
			invalid(pre+"query-name", poll(m, "/$export-poll-status", "_jobId"+b.query+"={id}", ""), cleanPoll)
			invalid(pre+"query-page", poll(m, "/$export-poll-status", "_jobId={id}&_page=1"+b.query, ""), cleanPoll)
			invalid(pre+"path-id", poll(m, "/$export-poll-status/"+b.query, "", ""), cleanPoll)
			invalid(pre+"path-seed-id", poll(m, "/$export-poll-status/{id}"+b.query, "", ""), cleanPoll)
		}
		pre := "status/post/" + b.label + "/"
		invalid(pre+"body-id", poll(http.MethodPost, "/$export-poll-status", "", parametersBody("_jobId", `"valueString":"{id}`+b.json+`"`)),
			poll(http.MethodPost, "/$export-poll-status", "", parametersBody("_jobId", `"valueString":"{id}"`)))
		invalid(pre+"body-name", poll(http.MethodPost, "/$export-poll-status", "", parametersBody("_jobId"+b.json, `"valueString":"{id}"`)),
			poll(http.MethodPost, "/$export-poll-status", "", parametersBody("_jobId", `"valueString":"{id}"`)))
	}
	return cases
}

// fixture is one store behind a live handler.
type fixture struct {
	store bulkexport.JobStore
	srv   *httptest.Server
	seed  *bulkexport.Job // a queued job no case may change
}

// lister is the host's resource types, the same at every level.
type lister struct{}

func (lister) ResourceTypes(context.Context, fhirbulk.Level) ([]string, error) {
	return []string{"Patient", "Observation", "Condition"}, nil
}

func newFixture(t *testing.T, store bulkexport.JobStore) *fixture {
	h, err := bulkexport.NewHandler(store, &bulkexport.Options{
		BaseURL:        "http://fhir.example.org/fhir",
		Types:          lister{},
		AssociatedData: []string{bulkexport.AssociatedLatestProvenance},
		Logger:         slog.New(slog.DiscardHandler),
	})
	require.NoError(t, err)
	mux := http.NewServeMux()
	mux.Handle("/fhir/", h)
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	f := &fixture{store: store, srv: srv}
	id := f.kickoff(t, kickoffGet("/$export", "_type=Patient", ""))
	f.seed, err = store.Get(context.Background(), id)
	require.NoError(t, err)
	return f
}

// send sends r, with "{id}" replaced by the seed job's id.
func (f *fixture) send(t *testing.T, r *request) (int, http.Header, []byte) {
	t.Helper()
	seed := ""
	if f.seed != nil {
		seed = f.seed.ID
	}
	target := f.srv.URL + "/fhir" + strings.ReplaceAll(r.path, "{id}", seed)
	if r.query != "" {
		target += "?" + strings.ReplaceAll(r.query, "{id}", seed)
	}
	var body io.Reader
	if r.body != "" {
		body = strings.NewReader(strings.ReplaceAll(r.body, "{id}", seed))
	}
	req, err := http.NewRequest(r.method, target, body)
	require.NoError(t, err)
	prefer := r.prefer
	if prefer == "" {
		prefer = "respond-async"
	}
	req.Header.Set("Prefer", prefer)
	req.Header.Set("Accept", "application/fhir+json")
	if r.body != "" {
		req.Header.Set("Content-Type", "application/fhir+json")
	}
	resp, err := f.srv.Client().Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, resp.Header, b
}

// kickoff sends a kick-off that must be accepted, checks that its job is
// stored, and returns the job's id.
func (f *fixture) kickoff(t *testing.T, r *request) string {
	t.Helper()
	status, hdr, body := f.send(t, r)
	require.Equal(t, http.StatusAccepted, status, "kick-off %s %s?%s: %s", r.method, r.path, r.query, body)
	loc := hdr.Get("Content-Location")
	id, ok := strings.CutPrefix(loc, "http://fhir.example.org/fhir/$export-poll-status?_jobId=")
	require.True(t, ok, "Content-Location %q", loc)
	_, err := f.store.Get(context.Background(), id)
	require.NoError(t, err, "the accepted job is not stored")
	return id
}

// onlySeed asserts that the store holds the seed job, unchanged, and
// nothing else.
func (f *fixture) onlySeed(t *testing.T) {
	t.Helper()
	jobs, err := f.store.List(context.Background(), bulkexport.Filter{})
	require.NoError(t, err)
	ids := make([]string, len(jobs))
	for i, j := range jobs {
		ids[i] = j.ID
	}
	require.Equal(t, []string{f.seed.ID}, ids, "the store holds a job a hostile request created")
	require.Equal(t, bulkexport.StateQueued, jobs[0].State, "seed job")
	require.Equal(t, f.seed.Version, jobs[0].Version, "seed job changed")
}

func runCases(t *testing.T, store bulkexport.JobStore) {
	f := newFixture(t, store)
	ctx := context.Background()
	for _, c := range hostileCases() {
		t.Run(c.name, func(t *testing.T) {
			status, hdr, body := f.send(t, &c.req)
			require.Equal(t, c.status, status, "body: %s", body)
			require.Equal(t, "application/fhir+json", hdr.Get("Content-Type"))
			require.Empty(t, hdr.Get("Content-Location"))
			var oo fhirbulk.OperationOutcome
			require.NoError(t, json.Unmarshal(body, &oo), "body: %q", body)
			require.Equal(t, "OperationOutcome", oo.ResourceType)
			require.Len(t, oo.Issue, 1, "body: %s", body)
			require.Equal(t, fhirbulk.SeverityError, oo.Issue[0].Severity)
			require.Equal(t, c.code, oo.Issue[0].Code, "body: %s", body)
			f.onlySeed(t)

			// Without the bytes, the same request is answered.
			if c.clean != nil {
				status, hdr, body := f.send(t, c.clean)
				require.Equal(t, http.StatusAccepted, status, "clean request: %s", body)
				if id, ok := strings.CutPrefix(hdr.Get("Content-Location"), "http://fhir.example.org/fhir/$export-poll-status?_jobId="); ok {
					require.NoError(t, f.store.Delete(ctx, id))
				}
			}
			// The store still takes a normal kick-off.
			id := f.kickoff(t, kickoffGet("/$export", "_type=Patient,Observation", ""))
			require.NoError(t, f.store.Delete(ctx, id))
			f.onlySeed(t)
		})
	}
}

func TestHostileMemory(t *testing.T) {
	t.Parallel()
	runCases(t, bulkexport.NewMemoryStore())
}

func TestHostileSQLite(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "jobs.db")
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=journal_mode(WAL)&_pragma=busy_timeout(10000)")
	require.NoError(t, err)
	t.Cleanup(func() { db.Close() })
	s, err := sqlitestore.New(db, nil)
	require.NoError(t, err)
	require.NoError(t, s.Migrate(context.Background()))
	runCases(t, s)
}

func TestHostilePostgres(t *testing.T) {
	t.Parallel()
	url := os.Getenv(envPostgres)
	if url == "" {
		t.Skipf("%s is not set; source .ci/postgres.sh to provision a server", envPostgres)
	}
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, url)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	var b [6]byte
	_, _ = rand.Read(b[:])
	schema := "hostile_" + hex.EncodeToString(b[:])
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if _, err := pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgx.Identifier{schema}.Sanitize()+" CASCADE"); err != nil {
			t.Errorf("drop schema %s: %v", schema, err)
		}
	})
	s, err := pgstore.New(pool, &pgstore.Options{Schema: schema})
	require.NoError(t, err)
	require.NoError(t, s.Migrate(ctx))
	runCases(t, s)
}
