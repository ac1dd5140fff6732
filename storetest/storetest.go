// Package storetest is a conformance suite for bulkexport.JobStore
// implementations. It checks every point of the contract documented on
// bulkexport.JobStore: versioning and compare-and-set in Create and Update,
// the lifecycle that Update enforces through bulkexport.CheckTransition,
// Claim's ordering and leases, List's filters and ordering, copying jobs in
// and out, concurrent use, and honouring the caller's context. Its Format
// cases pin the stored form of a job (bulkexport.MarshalStoredJob) to a
// committed golden document, and check that GoldenJob, which sets every
// field of Job, comes back from the store unchanged.
//
// A store runs it from an ordinary test:
//
//	func TestMyStore(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) bulkexport.JobStore {
//			return openEmptyStore(t) // release it with t.Cleanup
//		})
//	}
//
// Run it with -race: some cases drive the store from several goroutines.
//
// What the suite tolerates, so that SQL and other serialising stores can
// pass:
//
//   - Times are compared with time.Time.Equal, so a store may drop the
//     monotonic clock reading and the location. Every time the suite stores
//     has microsecond precision (and all but one case use UTC); a store must
//     keep at least that. A zero time must come back as a zero time.
//   - json.RawMessage fields (Extension, Checkpoint) are compared by
//     meaning: a store may reformat the JSON (spacing, key order). An absent
//     value and JSON null are the same.
//   - A nil slice and an empty slice are the same.
//   - Claim may set UpdatedAt; the suite ignores UpdatedAt in Claim's
//     result. Update must store the job exactly as given (with Version+1).
package storetest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// Run runs the conformance suite against the stores that newStore makes.
//
// Every case is a named subtest (for instance "Update/StaleVersion" or
// "Claim/Order") and calls newStore once, with the subtest's t, for a store
// of its own. newStore must return an empty store; it may register cleanup
// with t.Cleanup and fail t if the store cannot be opened. The subtests run
// one after another, never in parallel, so newStore may hand out the same
// database each time after emptying it.
func Run(t *testing.T, newStore func(t *testing.T) bulkexport.JobStore) {
	t.Helper()
	groups := []struct {
		name  string
		cases []testCase
	}{
		{"Create", createCases()},
		{"Get", getCases()},
		{"Update", updateCases()},
		{"Transition", transitionCases()},
		{"Delete", deleteCases()},
		{"Claim", claimCases()},
		{"List", listCases()},
		{"Copy", copyCases()},
		{"Concurrency", concurrencyCases()},
		{"Context", contextCases()},
		{"Format", formatCases()},
		{"Units", unitCases()},
	}
	for _, g := range groups {
		t.Run(g.name, func(t *testing.T) {
			for _, c := range g.cases {
				t.Run(c.name, func(t *testing.T) {
					ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
					defer cancel()
					s := newStore(t)
					if s == nil {
						t.Fatal("storetest: newStore returned nil")
					}
					c.run(t, ctx, s)
				})
			}
		})
	}
}

type testCase struct {
	name string
	run  func(t *testing.T, ctx context.Context, s bulkexport.JobStore)
}

type (
	job      = bulkexport.Job
	jobState = bulkexport.JobState
)

const (
	queued    = bulkexport.StateQueued
	running   = bulkexport.StateRunning
	completed = bulkexport.StateCompleted
	failed    = bulkexport.StateFailed
	cancelled = bulkexport.StateCancelled
)

var allStates = []jobState{queued, running, completed, failed, cancelled}

// baseTime is the suite's "now": UTC, microsecond precision, with a
// non-zero sub-second part so that a store that drops fractions fails.
func baseTime() time.Time {
	return time.Now().UTC().Truncate(time.Second).Add(123456 * time.Microsecond)
}

// newJob returns a small queued job.
func newJob(id, owner string, created time.Time) *job {
	return &job{
		ID:    id,
		Owner: owner,
		Level: fhirbulk.LevelSystem,
		Request: bulkexport.Request{
			URL:          "https://fhir.example.org/$export",
			Method:       "GET",
			OutputFormat: "application/fhir+ndjson",
		},
		State:     queued,
		CreatedAt: created,
		UpdatedAt: created,
	}
}

// fullJob returns a queued job with every field set. Each call builds fresh
// values, so that a second call is a pristine expectation.
func fullJob(id string, base time.Time) *job {
	return &job{
		ID:      id,
		Owner:   "client-1",
		Level:   fhirbulk.LevelGroup,
		GroupID: "group-7",
		Request: bulkexport.Request{
			URL:                   "https://fhir.example.org/Group/group-7/$export?_type=Patient,Observation",
			Method:                "POST",
			OutputFormat:          "application/fhir+ndjson",
			Since:                 base.Add(-72 * time.Hour),
			Until:                 base.Add(-time.Hour),
			Types:                 []string{"Patient", "Observation"},
			TypeFilters:           []bulkexport.TypeFilter{{Type: "Observation", Query: "code=http%3A%2F%2Floinc.org%7C1234-5&status=final"}, {Type: "Patient", Query: "active=true"}},
			Elements:              []string{"Observation.code", "id"},
			IncludeAssociatedData: []string{"LatestProvenanceResources"},
			OrganizeOutputBy:      "Patient",
			AllowPartialManifests: true,
			Patients:              []string{"p-1", "p-2"},
			Lenient:               true,
			SeparateExportStatus:  true,
			Ignored: []fhirbulk.Issue{{
				Severity:    fhirbulk.SeverityWarning,
				Code:        fhirbulk.IssueNotSupported,
				Details:     &fhirbulk.CodeableConcept{Text: "ignored parameter"},
				Diagnostics: "_foo is not supported",
				Expression:  []string{"_foo"},
			}},
		},
		State:           queued,
		Progress:        bulkexport.Progress{Percent: 42.5, Message: "Observation"},
		TransactionTime: base.Add(-30 * time.Minute),
		Output: []bulkexport.File{
			{Type: "Patient", Name: "Patient-1.ndjson", Count: 10, Size: 12345},
			{Type: "Observation", Name: "Observation-1.ndjson", Count: 200, Size: 678901},
		},
		Deleted:   []bulkexport.File{{Type: "Bundle", Name: "deleted-1.ndjson", Count: 3, Size: 999}},
		Errors:    []bulkexport.File{{Type: "OperationOutcome", Name: "errors-1.ndjson", Count: 1, Size: 321}},
		Extension: json.RawMessage(`{"https://example.org/fhir/ext": {"n": 1, "s": "x", "list": [1, 2.5, "three"]}, "flag": true}`),
		Failure: &bulkexport.Failure{
			Status: 503,
			Outcome: &fhirbulk.OperationOutcome{
				ResourceType: "OperationOutcome",
				ID:           "oo-1",
				Issue: []fhirbulk.Issue{{
					Severity:    fhirbulk.SeverityFatal,
					Code:        fhirbulk.IssueException,
					Details:     &fhirbulk.CodeableConcept{Text: "source went away"},
					Diagnostics: "connection reset",
					Expression:  []string{"Observation", "Patient"},
				}},
			},
		},
		CreatedAt:      base.Add(-2 * time.Hour),
		UpdatedAt:      base.Add(-90 * time.Minute),
		StartedAt:      base.Add(-80 * time.Minute),
		CompletedAt:    base.Add(-10 * time.Minute),
		ExpiresAt:      base.Add(24 * time.Hour),
		LeaseOwner:     "worker-0",
		LeaseExpiresAt: base.Add(-time.Hour),
		Attempts:       2,
		Checkpoint:     json.RawMessage(`{"type":"Observation","cursor":"b2Zmc2V0PTEyMzQ=","done":["Patient"],"count":1234,"nested":{"k":null}}`),
	}
}

// scribble changes every part of j in place, through every slice, pointer
// and byte slice it holds, so that a store that kept (or handed out) shared
// memory shows it.
func scribble(j *job) {
	j.ID += "" // the id stays, so that the job can be looked up
	j.Owner += "-mutated"
	j.GroupID += "-mutated"
	j.Level = "mutated"
	r := &j.Request
	r.URL += "&mutated"
	r.Method += "-mutated"
	r.Since = r.Since.Add(time.Minute)
	scribbleStrings(r.Types)
	for i := range r.TypeFilters {
		r.TypeFilters[i].Type += "-mutated"
		r.TypeFilters[i].Query += "&mutated"
	}
	scribbleStrings(r.Elements)
	scribbleStrings(r.IncludeAssociatedData)
	scribbleStrings(r.Patients)
	r.Lenient = !r.Lenient
	scribbleIssues(r.Ignored)
	j.State = "mutated"
	j.Progress.Percent += 1000
	j.Progress.Message += "-mutated"
	for _, fs := range [][]bulkexport.File{j.Output, j.Deleted, j.Errors} {
		for i := range fs {
			fs[i].Name += "-mutated"
			fs[i].Count++
		}
	}
	scribbleBytes(j.Extension)
	scribbleBytes(j.Checkpoint)
	if j.Failure != nil {
		j.Failure.Status++
		if o := j.Failure.Outcome; o != nil {
			o.ID += "-mutated"
			scribbleIssues(o.Issue)
		}
	}
	j.CreatedAt = j.CreatedAt.Add(time.Hour)
	j.ExpiresAt = j.ExpiresAt.Add(time.Hour)
	j.LeaseOwner += "-mutated"
	j.Attempts += 100
	j.Version += 100
}

func scribbleStrings(s []string) {
	for i := range s {
		s[i] += "-mutated"
	}
}

func scribbleIssues(is []fhirbulk.Issue) {
	for i := range is {
		is[i].Diagnostics += "-mutated"
		scribbleStrings(is[i].Expression)
		if is[i].Details != nil {
			is[i].Details.Text += "-mutated"
		}
	}
}

func scribbleBytes(b []byte) {
	for i := range b {
		b[i] = 'x'
	}
}

// ---------------------------------------------------------------------------
// Comparison

var (
	timeType   = reflect.TypeOf(time.Time{})
	rawType    = reflect.TypeOf(json.RawMessage(nil))
	stringType = reflect.TypeOf("")
)

// diffJobs lists the differences between want and got: times by Equal,
// raw JSON by meaning, nil and empty slices alike, everything else exactly.
func diffJobs(want, got *job) []string {
	if want == nil || got == nil {
		if want != got {
			return []string{fmt.Sprintf("job = %v, want %v", got, want)}
		}
		return nil
	}
	var out []string
	diffValue("", reflect.ValueOf(want).Elem(), reflect.ValueOf(got).Elem(), &out)
	return out
}

func diffValue(path string, w, g reflect.Value, out *[]string) {
	add := func(gs, ws string) {
		*out = append(*out, fmt.Sprintf("%s = %s, want %s", strings.TrimPrefix(path, "."), gs, ws))
	}
	switch w.Type() {
	case timeType:
		wt, gt := w.Interface().(time.Time), g.Interface().(time.Time)
		if !wt.Equal(gt) {
			add(showTime(gt), showTime(wt))
		}
		return
	case rawType:
		if !jsonEqual(w.Bytes(), g.Bytes()) {
			add(fmt.Sprintf("%q", g.Bytes()), fmt.Sprintf("%q", w.Bytes()))
		}
		return
	}
	switch w.Kind() {
	case reflect.Pointer:
		if w.IsNil() || g.IsNil() {
			if w.IsNil() != g.IsNil() {
				add(show(g), show(w))
			}
			return
		}
		diffValue(path, w.Elem(), g.Elem(), out)
	case reflect.Struct:
		for i := range w.NumField() {
			f := w.Type().Field(i)
			if f.IsExported() {
				diffValue(path+"."+f.Name, w.Field(i), g.Field(i), out)
			}
		}
	case reflect.Slice:
		if w.Len() != g.Len() {
			add(show(g), show(w))
			return
		}
		for i := range w.Len() {
			diffValue(fmt.Sprintf("%s[%d]", path, i), w.Index(i), g.Index(i), out)
		}
	default:
		if !reflect.DeepEqual(w.Interface(), g.Interface()) {
			add(show(g), show(w))
		}
	}
}

func show(v reflect.Value) string {
	if b, err := json.Marshal(v.Interface()); err == nil {
		return string(b)
	}
	return fmt.Sprintf("%#v", v.Interface())
}

func showTime(t time.Time) string {
	if t.IsZero() {
		return "zero time"
	}
	return t.Format(time.RFC3339Nano)
}

// jsonEqual compares two JSON texts by meaning. Empty and null are equal.
func jsonEqual(a, b []byte) bool {
	na, nb := jsonNull(a), jsonNull(b)
	if na || nb {
		return na == nb
	}
	var va, vb any
	if json.Unmarshal(a, &va) != nil || json.Unmarshal(b, &vb) != nil {
		return bytes.Equal(a, b)
	}
	return reflect.DeepEqual(va, vb)
}

func jsonNull(b []byte) bool {
	b = bytes.TrimSpace(b)
	return len(b) == 0 || string(b) == "null"
}

// ---------------------------------------------------------------------------
// Helpers

func assertJob(t *testing.T, what string, want, got *job) {
	t.Helper()
	for _, d := range diffJobs(want, got) {
		t.Errorf("%s: %s", what, d)
	}
}

func mustCreate(t *testing.T, ctx context.Context, s bulkexport.JobStore, j *job) {
	t.Helper()
	if err := s.Create(ctx, j, bulkexport.CreateParams{}); err != nil {
		t.Fatalf("Create(%s): %v", j.ID, err)
	}
}

func mustGet(t *testing.T, ctx context.Context, s bulkexport.JobStore, id string) *job {
	t.Helper()
	j, err := s.Get(ctx, id)
	if err != nil {
		t.Fatalf("Get(%s): %v", id, err)
	}
	if j == nil {
		t.Fatalf("Get(%s) = nil, nil; a store never answers (nil, nil)", id)
	}
	return j
}

func mustUpdate(t *testing.T, ctx context.Context, s bulkexport.JobStore, j *job) {
	t.Helper()
	if err := s.Update(ctx, j); err != nil {
		t.Fatalf("Update(%s, version %d, state %s): %v", j.ID, j.Version, j.State, err)
	}
}

func mustClaim(t *testing.T, ctx context.Context, s bulkexport.JobStore, worker string, now time.Time, lease time.Duration) *job {
	t.Helper()
	j, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: worker, Now: now, Lease: lease})
	if err != nil {
		t.Fatalf("Claim(%s): %v", worker, err)
	}
	if j == nil {
		t.Fatalf("Claim(%s) = nil, nil", worker)
	}
	return j
}

func wantNoJob(t *testing.T, ctx context.Context, s bulkexport.JobStore, worker string, now time.Time) {
	t.Helper()
	j, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: worker, Now: now, Lease: time.Minute})
	if !errors.Is(err, bulkexport.ErrNoJob) {
		id := "<nil>"
		if j != nil {
			id = j.ID + " (state " + string(j.State) + ")"
		}
		t.Fatalf("Claim(%s) = %s, %v; want ErrNoJob", worker, id, err)
	}
	if j != nil {
		t.Errorf("Claim(%s) returned job %s with ErrNoJob; want nil", worker, j.ID)
	}
}

func wantNotFound(t *testing.T, ctx context.Context, s bulkexport.JobStore, id string) {
	t.Helper()
	j, err := s.Get(ctx, id)
	if !errors.Is(err, bulkexport.ErrNotFound) {
		t.Errorf("Get(%s) error = %v, want ErrNotFound", id, err)
	}
	if j != nil {
		t.Errorf("Get(%s) returned job %+v with the error; want nil", id, j)
	}
}

// createIn creates j and walks it, through valid Updates, to state:
// queued → running → completed | failed, queued → cancelled. It returns the
// stored job.
func createIn(t *testing.T, ctx context.Context, s bulkexport.JobStore, j *job, state jobState) *job {
	t.Helper()
	var path []jobState
	switch state {
	case queued:
	case running:
		path = []jobState{running}
	case completed:
		path = []jobState{running, completed}
	case failed:
		path = []jobState{running, failed}
	case cancelled:
		path = []jobState{cancelled}
	default:
		t.Fatalf("storetest: cannot reach state %q", state)
	}
	j.State = queued
	mustCreate(t, ctx, s, j)
	for _, st := range path {
		cur := mustGet(t, ctx, s, j.ID)
		cur.State = st
		if st == failed && cur.Failure == nil {
			cur.Failure = &bulkexport.Failure{Status: 500, Outcome: fhirbulk.NewOutcome(fhirbulk.SeverityFatal, fhirbulk.IssueException, "storetest failure")}
		}
		mustUpdate(t, ctx, s, cur)
	}
	return mustGet(t, ctx, s, j.ID)
}

func ids(js []*job) []string {
	out := make([]string, len(js))
	for i, j := range js {
		if j == nil {
			out[i] = "<nil>"
		} else {
			out[i] = j.ID
		}
	}
	return out
}

func stateLabel(s jobState) string {
	if s == "" {
		return "empty"
	}
	return string(s)
}

// ---------------------------------------------------------------------------
// Create

func createCases() []testCase {
	return []testCase{
		{"SetsVersion", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			for _, v := range []int64{0, 42, -3} {
				j := newJob(fmt.Sprintf("job-v%d", v+10), "alice", baseTime())
				j.Version = v
				mustCreate(t, ctx, s, j)
				if j.Version != 1 {
					t.Errorf("Create with Version %d: argument Version = %d, want 1", v, j.Version)
				}
				if got := mustGet(t, ctx, s, j.ID); got.Version != 1 {
					t.Errorf("Create with Version %d: stored Version = %d, want 1", v, got.Version)
				}
			}
		}},
		{"Duplicate", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			mustCreate(t, ctx, s, fullJob("job-dup", base))
			dup := newJob("job-dup", "mallory", base.Add(time.Hour))
			dup.Progress.Percent = 99
			err := s.Create(ctx, dup, bulkexport.CreateParams{})
			if !errors.Is(err, bulkexport.ErrAlreadyExists) {
				t.Fatalf("second Create error = %v, want ErrAlreadyExists", err)
			}
			want := fullJob("job-dup", base)
			want.Version = 1
			assertJob(t, "stored job after duplicate Create", want, mustGet(t, ctx, s, "job-dup"))
		}},
		{"DuplicateAfterUpdate", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			j := newJob("job-dup", "alice", base)
			mustCreate(t, ctx, s, j)
			j.Progress.Percent = 10
			mustUpdate(t, ctx, s, j)
			err := s.Create(ctx, newJob("job-dup", "mallory", base), bulkexport.CreateParams{})
			if !errors.Is(err, bulkexport.ErrAlreadyExists) {
				t.Fatalf("Create over an updated job: error = %v, want ErrAlreadyExists", err)
			}
			want := newJob("job-dup", "alice", base)
			want.Progress.Percent = 10
			want.Version = 2
			assertJob(t, "stored job", want, mustGet(t, ctx, s, "job-dup"))
		}},
		{"ActiveCap", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// MaxActivePerOwner counts the owner's queued and running jobs
			// only; other owners and finished jobs do not count.
			base := baseTime()
			capped := bulkexport.CreateParams{MaxActivePerOwner: 3}
			for i, st := range []jobState{completed, failed, cancelled} {
				createIn(t, ctx, s, newJob(fmt.Sprintf("job-done-%d", i), "alice", base), st)
			}
			mustCreate(t, ctx, s, newJob("job-bob", "bob", base))
			createIn(t, ctx, s, newJob("job-a1", "alice", base), running)
			for _, id := range []string{"job-a2", "job-a3"} {
				if err := s.Create(ctx, newJob(id, "alice", base), capped); err != nil {
					t.Fatalf("Create %s under the cap: %v", id, err)
				}
			}
			err := s.Create(ctx, newJob("job-a4", "alice", base), capped)
			if !errors.Is(err, bulkexport.ErrTooManyJobs) {
				t.Fatalf("Create beyond the cap: error = %v, want ErrTooManyJobs", err)
			}
			wantNotFound(t, ctx, s, "job-a4")
			if err := s.Create(ctx, newJob("job-b2", "bob", base), capped); err != nil {
				t.Errorf("another owner's Create: %v", err)
			}
			// No cap, or a job finishing, makes room.
			if err := s.Create(ctx, newJob("job-a5", "alice", base), bulkexport.CreateParams{}); err != nil {
				t.Errorf("Create without a cap: %v", err)
			}
			j := mustGet(t, ctx, s, "job-a2")
			j.State = cancelled
			mustUpdate(t, ctx, s, j)
			j = mustGet(t, ctx, s, "job-a5")
			j.State = cancelled
			mustUpdate(t, ctx, s, j)
			if err := s.Create(ctx, newJob("job-a6", "alice", base), capped); err != nil {
				t.Errorf("Create after a job was cancelled: %v", err)
			}
		}},
		{"StringsRoundTrip", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// Whatever text the kick-off parser accepts (valid UTF-8
			// without NUL) comes back unchanged: control characters,
			// quotes, backslashes, JSON and SQL look-alikes, characters
			// outside the BMP.
			base := baseTime()
			for i, str := range roundTripStrings {
				j := newJob(fmt.Sprintf("job-str-%d", i), "alice", base)
				j.Request.Types = []string{str}
				j.Request.TypeFilters = []bulkexport.TypeFilter{{Type: "Patient", Query: str}}
				j.Request.Patients = []string{str}
				j.Request.Ignored = []fhirbulk.Issue{{Severity: fhirbulk.SeverityWarning, Code: fhirbulk.IssueNotSupported, Diagnostics: str}}
				j.Progress.Message = str
				mustCreate(t, ctx, s, j)
				want := newJob(j.ID, "alice", base)
				want.Request.Types = []string{str}
				want.Request.TypeFilters = []bulkexport.TypeFilter{{Type: "Patient", Query: str}}
				want.Request.Patients = []string{str}
				want.Request.Ignored = []fhirbulk.Issue{{Severity: fhirbulk.SeverityWarning, Code: fhirbulk.IssueNotSupported, Diagnostics: str}}
				want.Progress.Message = str
				want.Version = 1
				assertJob(t, fmt.Sprintf("job with string %q", str), want, mustGet(t, ctx, s, j.ID))
			}
		}},
		{"StringsRoundTripEveryField", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// Every free-text string of a job, in the Request and
			// elsewhere (see setStrings), and text inside Extension and
			// Checkpoint, comes back unchanged through Create, Update and
			// Claim; List finds the job by its Owner.
			base := baseTime()
			for i, str := range roundTripStrings {
				what := fmt.Sprintf("string %d (%.40q)", i, str)
				id := fmt.Sprintf("job-every-%d", i)
				mk := func() *job {
					j := fullJob(id, base)
					setStrings(reflect.ValueOf(j).Elem(), str, "")
					raw, err := json.Marshal(map[string]any{"s": str, "list": []any{str, map[string]string{str: str}}})
					if err != nil {
						t.Fatal(err)
					}
					j.Extension, j.Checkpoint = raw, json.RawMessage(string(raw))
					return j
				}
				mustCreate(t, ctx, s, mk())
				want := mk()
				want.Version = 1
				assertJob(t, what+": Get after Create", want, mustGet(t, ctx, s, id))

				if want.Owner != "" { // an empty Owner in a Filter matches every job
					listed, err := s.List(ctx, bulkexport.Filter{Owner: want.Owner})
					if err != nil {
						t.Fatalf("%s: List by owner: %v", what, err)
					}
					if got := ids(listed); len(got) != 1 || got[0] != id {
						t.Errorf("%s: List by owner = %v, want [%s]", what, got, id)
					} else {
						assertJob(t, what+": List by owner", want, listed[0])
					}
				}

				cur := mustGet(t, ctx, s, id)
				cur.Progress.Percent = 50
				mustUpdate(t, ctx, s, cur)
				want.Progress.Percent, want.Version = 50, 2
				assertJob(t, what+": Get after Update", want, mustGet(t, ctx, s, id))

				// The earlier jobs hold live leases: this one is the only
				// one to claim.
				worker := "worker " + str
				claimed := mustClaim(t, ctx, s, worker, base, time.Hour)
				if claimed.ID != id {
					t.Fatalf("%s: Claim = %s, want %s", what, claimed.ID, id)
				}
				if claimed.LeaseOwner != worker {
					t.Errorf("%s: Claim's LeaseOwner = %q, want %q", what, claimed.LeaseOwner, worker)
				}
				got := mustGet(t, ctx, s, id)
				if got.LeaseOwner != worker {
					t.Errorf("%s: LeaseOwner after Claim = %q, want %q", what, got.LeaseOwner, worker)
				}
				want.State, want.LeaseOwner, want.Version, want.Attempts, want.Fence = running, worker, 3, want.Attempts+1, 3
				want.LeaseExpiresAt, want.UpdatedAt = got.LeaseExpiresAt, got.UpdatedAt // the lease clock's
				assertJob(t, what+": Get after Claim", want, got)
			}
		}},
		{"Independent", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			a, b := newJob("job-a", "alice", base), newJob("job-b", "bob", base)
			mustCreate(t, ctx, s, a)
			mustCreate(t, ctx, s, b)
			wa, wb := newJob("job-a", "alice", base), newJob("job-b", "bob", base)
			wa.Version, wb.Version = 1, 1
			assertJob(t, "job-a", wa, mustGet(t, ctx, s, "job-a"))
			assertJob(t, "job-b", wb, mustGet(t, ctx, s, "job-b"))
		}},
	}
}

// roundTripStrings are texts a store must keep byte for byte: everything
// the kick-off parser accepts (valid UTF-8 without NUL) may reach a store.
var roundTripStrings = []string{
	"",
	"\x01\x1f\t\r\n\x7f",
	"\x01\x02\x03\x04\x05\x06\a\b\v\f\x0e\x0f\x10\x11\x12\x13\x14\x15\x16\x17\x18\x19\x1a\x1b\x1c\x1d\x1e",
	"\u0080\u0085\u009f", // C1 controls, NEL
	`"quoted" 'single' \back\slash`,
	`\\ \" \' \n \t \\\`,
	`\u0000 is text here, not a NUL`,
	`\ud800 \udfff \uD83D\uDE00`, // escape look-alikes, as text
	`{"resourceType":"Patient"}`,
	`{"$gt": ""} [1, null] null true`,
	`'; DROP TABLE jobs; --`,
	`" OR 1=1 -- $1 ? :name @p1 %s %% %00 %FF`,
	"E'\\x00' $$ $tag$ $tag$ /* */ -- '' \"\"",
	`</script><!-- ]]> &amp; &#0; \x00`,
	"æøå 北京 עברית 🙂 \u2028\u2029 \ufeff",
	"\u2028",
	"𝄞 🧪 👩‍👩‍👧 🏳️‍🌈 \U0010FFFF \U000E0001",       // outside the BMP, ZWJ sequences
	"\u00a0\u200b\u200d\u202e\ufffd\ufffe\uffff", // spaces, joiners, bidi, non-characters
	" leading and trailing spaces ",
	strings.Repeat("x", 8<<10),
	strings.Repeat("é🙂\u2028\"\\\x01", 2000), // long, repetitive mixed text
	noiseText(3000), // long text that does not compress
}

// noiseText returns n runes of deterministic, varied text (ASCII, control
// characters, quotes, backslashes, other planes) that no compressor
// shrinks much.
func noiseText(n int) string {
	const alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \t\n\x01\x1f\"'\\{}[]:,;%$éøß北京🙂𝄞\u2028\u2029\ufeff"
	runes := []rune(alphabet)
	var b strings.Builder
	x := uint64(0x9e3779b97f4a7c15)
	for range n {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		b.WriteRune(runes[x%uint64(len(runes))])
	}
	return b.String()
}

// setStrings sets every exported free-text string reachable from v (a
// job, or a part of one) to str: fields of type string, the elements of
// string slices, through pointers and slices of structs. It leaves the
// job's ID, the library's enumerations (named string types such as Level,
// JobState, Severity, IssueType), times and raw JSON alone.
func setStrings(v reflect.Value, str, path string) {
	switch v.Kind() {
	case reflect.String:
		if v.Type() == stringType && path != ".ID" {
			v.SetString(str)
		}
	case reflect.Pointer:
		if !v.IsNil() {
			setStrings(v.Elem(), str, path)
		}
	case reflect.Struct:
		if v.Type() == timeType {
			return
		}
		for i := range v.NumField() {
			if f := v.Type().Field(i); f.IsExported() {
				setStrings(v.Field(i), str, path+"."+f.Name)
			}
		}
	case reflect.Slice:
		if v.Type() == rawType {
			return
		}
		for i := range v.Len() {
			setStrings(v.Index(i), str, fmt.Sprintf("%s[%d]", path, i))
		}
	}
}

// ---------------------------------------------------------------------------
// Get

func getCases() []testCase {
	return []testCase{
		{"Missing", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			wantNotFound(t, ctx, s, "job-missing")
			mustCreate(t, ctx, s, newJob("job-a", "alice", baseTime()))
			wantNotFound(t, ctx, s, "job-missing")
			wantNotFound(t, ctx, s, "job-A")
		}},
		{"RoundTrip", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			mustCreate(t, ctx, s, fullJob("job-full", base))
			want := fullJob("job-full", base)
			want.Version = 1
			assertJob(t, "Get after Create", want, mustGet(t, ctx, s, "job-full"))
		}},
		{"RoundTripMinimal", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// Zero times, nil slices, nil Failure and absent JSON stay so.
			base := baseTime()
			mustCreate(t, ctx, s, newJob("job-min", "alice", base))
			want := newJob("job-min", "alice", base)
			want.Version = 1
			assertJob(t, "Get after Create", want, mustGet(t, ctx, s, "job-min"))
		}},
		{"RoundTripEveryState", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			for _, st := range allStates {
				id := "job-" + string(st)
				got := createIn(t, ctx, s, fullJob(id, base), st)
				want := fullJob(id, base)
				want.State = st
				want.Version = got.Version
				assertJob(t, "job in state "+string(st), want, got)
			}
		}},
		{"NonUTCTimes", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// The same instants in another location compare Equal.
			base := baseTime()
			loc := time.FixedZone("UTC+5:30", 5*3600+1800)
			j := fullJob("job-loc", base)
			j.CreatedAt = j.CreatedAt.In(loc)
			j.ExpiresAt = j.ExpiresAt.In(loc)
			j.Request.Since = j.Request.Since.In(loc)
			mustCreate(t, ctx, s, j)
			want := fullJob("job-loc", base)
			want.Version = 1
			assertJob(t, "Get after Create", want, mustGet(t, ctx, s, "job-loc"))
		}},
	}
}

// ---------------------------------------------------------------------------
// Update

func updateCases() []testCase {
	return []testCase{
		{"CompareAndSet", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			mustCreate(t, ctx, s, newJob("job-u", "alice", base))
			// Replace every field through Update.
			j := fullJob("job-u", base)
			j.State = running
			j.Version = 1
			mustUpdate(t, ctx, s, j)
			if j.Version != 2 {
				t.Errorf("argument Version after Update = %d, want 2", j.Version)
			}
			want := fullJob("job-u", base)
			want.State = running
			want.Version = 2
			assertJob(t, "argument after Update", want, j)
			assertJob(t, "stored job after Update", want, mustGet(t, ctx, s, "job-u"))
		}},
		{"Chain", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// The written-back Version lets the same job be updated again.
			j := newJob("job-u", "alice", baseTime())
			mustCreate(t, ctx, s, j)
			for i := 1; i <= 5; i++ {
				j.Progress = bulkexport.Progress{Percent: float64(i * 10), Message: fmt.Sprint("step ", i)}
				mustUpdate(t, ctx, s, j)
				if j.Version != int64(i+1) {
					t.Fatalf("after update %d: Version = %d, want %d", i, j.Version, i+1)
				}
			}
			got := mustGet(t, ctx, s, "job-u")
			if got.Version != 6 || got.Progress.Percent != 50 || got.Progress.Message != "step 5" {
				t.Errorf("stored job: Version %d, Progress %+v; want 6, {50 step 5}", got.Version, got.Progress)
			}
		}},
		{"StaleVersion", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			mustCreate(t, ctx, s, newJob("job-u", "alice", base))
			a := mustGet(t, ctx, s, "job-u")
			b := mustGet(t, ctx, s, "job-u")
			a.Progress.Percent = 10
			mustUpdate(t, ctx, s, a)
			b.Progress.Percent = 20
			b.Owner = "mallory"
			err := s.Update(ctx, b)
			if !errors.Is(err, bulkexport.ErrConflict) {
				t.Fatalf("Update with stale Version: error = %v, want ErrConflict", err)
			}
			if b.Version != 1 {
				t.Errorf("argument Version after a refused Update = %d, want 1 (unchanged)", b.Version)
			}
			want := newJob("job-u", "alice", base)
			want.Progress.Percent = 10
			want.Version = 2
			assertJob(t, "stored job after conflict", want, mustGet(t, ctx, s, "job-u"))
		}},
		{"FutureVersion", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// Compare-and-set means equal, not "at least".
			base := baseTime()
			mustCreate(t, ctx, s, newJob("job-u", "alice", base))
			for _, v := range []int64{0, 2, 99} {
				j := mustGet(t, ctx, s, "job-u")
				j.Version = v
				j.Progress.Percent = 50
				if err := s.Update(ctx, j); !errors.Is(err, bulkexport.ErrConflict) {
					t.Errorf("Update with Version %d over stored 1: error = %v, want ErrConflict", v, err)
				}
			}
			want := newJob("job-u", "alice", base)
			want.Version = 1
			assertJob(t, "stored job after conflicts", want, mustGet(t, ctx, s, "job-u"))
		}},
		{"Missing", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			mustCreate(t, ctx, s, newJob("job-other", "alice", baseTime()))
			for _, v := range []int64{0, 1} {
				j := newJob("job-missing", "alice", baseTime())
				j.Version = v
				err := s.Update(ctx, j)
				if !errors.Is(err, bulkexport.ErrNotFound) {
					t.Errorf("Update of a missing job (Version %d): error = %v, want ErrNotFound", v, err)
				}
				if j.Version != v {
					t.Errorf("argument Version after a refused Update = %d, want %d", j.Version, v)
				}
			}
			wantNotFound(t, ctx, s, "job-missing") // Update does not insert
		}},
		{"InvalidTransition", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			for _, c := range []struct{ from, to jobState }{
				{completed, running},
				{cancelled, queued},
				{failed, completed},
				{queued, completed},
				{queued, "bogus"},
				{running, ""},
			} {
				id := "job-" + stateLabel(c.from) + "-" + stateLabel(c.to)
				before := createIn(t, ctx, s, newJob(id, "alice", baseTime()), c.from)
				j := mustGet(t, ctx, s, id)
				j.State = c.to
				j.Progress.Percent = 66
				j.Owner = "mallory"
				err := s.Update(ctx, j)
				if !errors.Is(err, bulkexport.ErrInvalidTransition) {
					t.Errorf("Update %s → %q: error = %v, want ErrInvalidTransition", c.from, c.to, err)
				}
				if j.Version != before.Version {
					t.Errorf("Update %s → %q: argument Version = %d, want %d (unchanged)", c.from, c.to, j.Version, before.Version)
				}
				assertJob(t, fmt.Sprintf("stored job after refused %s → %q", c.from, c.to), before, mustGet(t, ctx, s, id))
			}
		}},
		{"OtherJobsUntouched", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			mustCreate(t, ctx, s, fullJob("job-a", base))
			mustCreate(t, ctx, s, newJob("job-b", "bob", base))
			b := mustGet(t, ctx, s, "job-b")
			b.State = running
			mustUpdate(t, ctx, s, b)
			want := fullJob("job-a", base)
			want.Version = 1
			assertJob(t, "job-a after updating job-b", want, mustGet(t, ctx, s, "job-a"))
		}},
	}
}

// ---------------------------------------------------------------------------
// Transition: every (from, to) pair, against bulkexport.CanTransition.

func transitionCases() []testCase {
	targets := append(append([]jobState(nil), allStates...), "", "bogus")
	var cases []testCase
	for _, from := range allStates {
		for _, to := range targets {
			cases = append(cases, testCase{
				name: stateLabel(from) + "_to_" + stateLabel(to),
				run: func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
					base := baseTime()
					before := createIn(t, ctx, s, fullJob("job-t", base), from)
					j := mustGet(t, ctx, s, "job-t")
					j.State = to
					j.Progress = bulkexport.Progress{Percent: 77, Message: "transition"}
					j.LeaseExpiresAt = base.Add(time.Hour)
					err := s.Update(ctx, j)
					if from.CanTransition(to) {
						if err != nil {
							t.Fatalf("Update %s → %q: %v; the transition is allowed", from, to, err)
						}
						want := mustGet(t, ctx, s, "job-t") // checked field by field below
						exp := *before
						exp.State = to
						exp.Progress = bulkexport.Progress{Percent: 77, Message: "transition"}
						exp.LeaseExpiresAt = base.Add(time.Hour)
						exp.Version = before.Version + 1
						assertJob(t, "stored job", &exp, want)
						if j.Version != before.Version+1 {
							t.Errorf("argument Version = %d, want %d", j.Version, before.Version+1)
						}
						return
					}
					if !errors.Is(err, bulkexport.ErrInvalidTransition) {
						t.Fatalf("Update %s → %q: error = %v, want ErrInvalidTransition", from, to, err)
					}
					if j.Version != before.Version {
						t.Errorf("argument Version = %d, want %d (unchanged)", j.Version, before.Version)
					}
					assertJob(t, "stored job after refused transition", before, mustGet(t, ctx, s, "job-t"))
				},
			})
		}
	}
	return cases
}

// ---------------------------------------------------------------------------
// Delete

func deleteCases() []testCase {
	return []testCase{
		{"ThenGet", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			mustCreate(t, ctx, s, fullJob("job-d", base))
			mustCreate(t, ctx, s, newJob("job-keep", "bob", base))
			if err := s.Delete(ctx, "job-d"); err != nil {
				t.Fatalf("Delete: %v", err)
			}
			wantNotFound(t, ctx, s, "job-d")
			want := newJob("job-keep", "bob", base)
			want.Version = 1
			assertJob(t, "other job after Delete", want, mustGet(t, ctx, s, "job-keep"))
			if got, err := s.List(ctx, bulkexport.Filter{}); err != nil || len(got) != 1 {
				t.Errorf("List after Delete = %v, %v; want [job-keep]", ids(got), err)
			}
		}},
		{"Missing", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			if err := s.Delete(ctx, "job-missing"); !errors.Is(err, bulkexport.ErrNotFound) {
				t.Errorf("Delete of a missing job: error = %v, want ErrNotFound", err)
			}
		}},
		{"Twice", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			mustCreate(t, ctx, s, newJob("job-d", "alice", baseTime()))
			if err := s.Delete(ctx, "job-d"); err != nil {
				t.Fatalf("first Delete: %v", err)
			}
			if err := s.Delete(ctx, "job-d"); !errors.Is(err, bulkexport.ErrNotFound) {
				t.Errorf("second Delete: error = %v, want ErrNotFound", err)
			}
		}},
		{"ThenUpdate", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			j := newJob("job-d", "alice", baseTime())
			mustCreate(t, ctx, s, j)
			if err := s.Delete(ctx, "job-d"); err != nil {
				t.Fatalf("Delete: %v", err)
			}
			if err := s.Update(ctx, j); !errors.Is(err, bulkexport.ErrNotFound) {
				t.Errorf("Update after Delete: error = %v, want ErrNotFound", err)
			}
			wantNotFound(t, ctx, s, "job-d")
		}},
		{"ThenClaim", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			mustCreate(t, ctx, s, newJob("job-d", "alice", baseTime()))
			if err := s.Delete(ctx, "job-d"); err != nil {
				t.Fatalf("Delete: %v", err)
			}
			wantNoJob(t, ctx, s, "worker-1", baseTime())
		}},
		{"TerminalJob", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// The purge deletes terminal jobs.
			createIn(t, ctx, s, fullJob("job-d", baseTime()), completed)
			if err := s.Delete(ctx, "job-d"); err != nil {
				t.Fatalf("Delete of a completed job: %v", err)
			}
			wantNotFound(t, ctx, s, "job-d")
		}},
	}
}

// ---------------------------------------------------------------------------
// Claim

func claimCases() []testCase {
	return []testCase{
		{"Empty", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			wantNoJob(t, ctx, s, "worker-1", baseTime())
		}},
		{"Fields", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			mustCreate(t, ctx, s, fullJob("job-c", base)) // queued, Attempts 2, an old lease
			got := mustClaim(t, ctx, s, "worker-1", base, 5*time.Minute)
			want := fullJob("job-c", base)
			want.State = running
			want.LeaseOwner = "worker-1"
			want.LeaseExpiresAt = base.Add(5 * time.Minute)
			want.Attempts = 3
			want.Version = 2
			want.Fence = 2                 // the new Version
			want.UpdatedAt = got.UpdatedAt // Claim may set it
			assertJob(t, "Claim result", want, got)
			// Claim returns the stored copy.
			assertJob(t, "stored job after Claim", got, mustGet(t, ctx, s, "job-c"))
		}},
		{"Order", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// Oldest CreatedAt first, then ID; not insertion order.
			base := baseTime()
			for _, c := range []struct {
				id  string
				age time.Duration
			}{
				{"job-e", 2 * time.Hour},
				{"job-a", 1 * time.Hour},
				{"job-d", 2 * time.Hour},
				{"job-b", 3 * time.Hour},
				{"job-c", 2 * time.Hour},
			} {
				mustCreate(t, ctx, s, newJob(c.id, "alice", base.Add(-c.age)))
			}
			var got []string
			for range 5 {
				got = append(got, mustClaim(t, ctx, s, "worker-1", base, time.Hour).ID)
			}
			if want := []string{"job-b", "job-c", "job-d", "job-e", "job-a"}; !reflect.DeepEqual(got, want) {
				t.Errorf("claim order = %v, want %v", got, want)
			}
			wantNoJob(t, ctx, s, "worker-1", base)
		}},
		{"LiveLease", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			mustCreate(t, ctx, s, newJob("job-c", "alice", base.Add(-time.Hour)))
			first := mustClaim(t, ctx, s, "worker-1", base, time.Minute)
			// Before expiry, and at the expiry instant (expired means
			// LeaseExpiresAt before now), the job stays with worker-1.
			for _, at := range []time.Duration{0, time.Second, 30 * time.Second, time.Minute} {
				wantNoJob(t, ctx, s, "worker-2", base.Add(at))
			}
			assertJob(t, "stored job", first, mustGet(t, ctx, s, "job-c"))
		}},
		{"ExpiredLease", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			mustCreate(t, ctx, s, fullJob("job-c", base))
			stale := mustClaim(t, ctx, s, "worker-1", base, time.Minute)
			now := base.Add(time.Minute + time.Millisecond)
			got := mustClaim(t, ctx, s, "worker-2", now, 2*time.Minute)
			want := fullJob("job-c", base)
			want.State = running
			want.LeaseOwner = "worker-2"
			want.LeaseExpiresAt = now.Add(2 * time.Minute)
			want.Attempts = 4
			want.Version = 3
			want.Fence = 3
			want.UpdatedAt = got.UpdatedAt
			assertJob(t, "re-claimed job", want, got)
			assertJob(t, "stored job", got, mustGet(t, ctx, s, "job-c"))
			wantNoJob(t, ctx, s, "worker-3", now)
			// worker-1 lost the job: its copy is stale.
			stale.Progress.Percent = 99
			if err := s.Update(ctx, stale); !errors.Is(err, bulkexport.ErrConflict) {
				t.Errorf("Update by the worker whose lease expired: error = %v, want ErrConflict", err)
			}
		}},
		{"ExpiredBeforeNewerQueued", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// An expired running job competes with queued jobs by age.
			base := baseTime()
			mustCreate(t, ctx, s, newJob("job-old", "alice", base.Add(-2*time.Hour)))
			mustClaim(t, ctx, s, "worker-1", base.Add(-time.Hour), 10*time.Minute)
			mustCreate(t, ctx, s, newJob("job-new", "alice", base.Add(-30*time.Minute)))
			if got := mustClaim(t, ctx, s, "worker-2", base, time.Minute); got.ID != "job-old" {
				t.Errorf("Claim = %s, want job-old (running, lease expired, older)", got.ID)
			}
			if got := mustClaim(t, ctx, s, "worker-2", base, time.Minute); got.ID != "job-new" {
				t.Errorf("second Claim = %s, want job-new", got.ID)
			}
			wantNoJob(t, ctx, s, "worker-3", base)
		}},
		{"SkipsLiveLease", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// A running job with a live lease does not block younger jobs.
			base := baseTime()
			mustCreate(t, ctx, s, newJob("job-old", "alice", base.Add(-2*time.Hour)))
			mustClaim(t, ctx, s, "worker-1", base, time.Hour)
			mustCreate(t, ctx, s, newJob("job-new", "alice", base.Add(-time.Hour)))
			if got := mustClaim(t, ctx, s, "worker-2", base, time.Hour); got.ID != "job-new" {
				t.Errorf("Claim = %s, want job-new", got.ID)
			}
		}},
		{"SkipsTerminal", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			for i, st := range []jobState{completed, failed, cancelled} {
				j := newJob("job-"+string(st), "alice", base.Add(-time.Duration(10-i)*time.Hour))
				j.LeaseOwner = "worker-0"
				j.LeaseExpiresAt = base.Add(-5 * time.Hour) // long expired
				createIn(t, ctx, s, j, st)
			}
			// A job cancelled while running, lease long expired.
			mustCreate(t, ctx, s, newJob("job-run-cancel", "alice", base.Add(-20*time.Hour)))
			r := mustClaim(t, ctx, s, "worker-0", base.Add(-10*time.Hour), time.Minute)
			r.State = cancelled
			mustUpdate(t, ctx, s, r)
			wantNoJob(t, ctx, s, "worker-1", base)
			wantNoJob(t, ctx, s, "worker-1", base.Add(1000*time.Hour))
			mustCreate(t, ctx, s, newJob("job-q", "alice", base))
			if got := mustClaim(t, ctx, s, "worker-1", base, time.Minute); got.ID != "job-q" {
				t.Errorf("Claim = %s, want job-q (the only non-terminal job)", got.ID)
			}
			for _, st := range []jobState{completed, failed, cancelled} {
				if got := mustGet(t, ctx, s, "job-"+string(st)); got.State != st {
					t.Errorf("job-%s: state = %s after Claim", st, got.State)
				}
			}
		}},
		{"HandBack", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// running → queued makes the job claimable again.
			base := baseTime()
			mustCreate(t, ctx, s, newJob("job-c", "alice", base))
			j := mustClaim(t, ctx, s, "worker-1", base, time.Hour)
			j.State = queued
			j.LeaseOwner = ""
			j.LeaseExpiresAt = time.Time{}
			mustUpdate(t, ctx, s, j)
			got := mustClaim(t, ctx, s, "worker-2", base, time.Hour)
			if got.ID != "job-c" || got.LeaseOwner != "worker-2" || got.Attempts != 2 || got.Version != 4 || got.Fence != 4 {
				t.Errorf("Claim after hand-back = %s owner %q attempts %d version %d fence %d; want job-c worker-2 2 4 4",
					got.ID, got.LeaseOwner, got.Attempts, got.Version, got.Fence)
			}
		}},
		{"RunningWithoutLease", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// A running job with a zero LeaseExpiresAt has an expired lease
			// (see bulkexport.Claimable), so it is not stuck forever.
			base := baseTime()
			createIn(t, ctx, s, newJob("job-c", "alice", base), running)
			got := mustClaim(t, ctx, s, "worker-1", base, time.Minute)
			if got.ID != "job-c" || got.LeaseOwner != "worker-1" || !got.LeaseExpiresAt.Equal(base.Add(time.Minute)) {
				t.Errorf("Claim = %s owner %q lease %s; want job-c worker-1 %s",
					got.ID, got.LeaseOwner, showTime(got.LeaseExpiresAt), showTime(base.Add(time.Minute)))
			}
		}},
		{"LeaseRenewal", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// A worker extends its lease with Update; the job then stays
			// with it past the original expiry.
			base := baseTime()
			mustCreate(t, ctx, s, newJob("job-c", "alice", base))
			j := mustClaim(t, ctx, s, "worker-1", base, time.Minute)
			j.LeaseExpiresAt = base.Add(10 * time.Minute)
			mustUpdate(t, ctx, s, j)
			wantNoJob(t, ctx, s, "worker-2", base.Add(5*time.Minute))
			if got := mustClaim(t, ctx, s, "worker-2", base.Add(11*time.Minute), time.Minute); got.ID != "job-c" {
				t.Errorf("Claim after renewed lease expired = %s, want job-c", got.ID)
			}
		}},
		{"CallerClock", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// Leases are judged by the now argument, not the store's clock:
			// a lease far in the past by wall time but live at now, and one
			// in the future by wall time but expired at now.
			past := time.Date(2001, 2, 3, 4, 5, 6, 789000, time.UTC)
			mustCreate(t, ctx, s, newJob("job-p", "alice", past.Add(-time.Hour)))
			j := mustClaim(t, ctx, s, "worker-1", past, time.Minute)
			if !j.LeaseExpiresAt.Equal(past.Add(time.Minute)) {
				t.Errorf("LeaseExpiresAt = %s, want %s", showTime(j.LeaseExpiresAt), showTime(past.Add(time.Minute)))
			}
			wantNoJob(t, ctx, s, "worker-2", past.Add(30*time.Second))
			future := baseTime().Add(1000 * time.Hour)
			if got := mustClaim(t, ctx, s, "worker-2", future, time.Minute); got.ID != "job-p" {
				t.Errorf("Claim at a later now = %s, want job-p", got.ID)
			}
		}},
	}
}

// ---------------------------------------------------------------------------
// List

func listCases() []testCase {
	seed := func(t *testing.T, ctx context.Context, s bulkexport.JobStore, base time.Time) {
		t.Helper()
		type spec struct {
			id, owner string
			state     jobState
			age       time.Duration
			expires   time.Duration // 0: zero ExpiresAt
		}
		// Inserted out of order; ordered job-1, job-2, job-3, job-6, job-4, job-5.
		for _, sp := range []spec{
			{"job-4", "alice", failed, 2 * time.Hour, 3 * time.Hour},
			{"job-6", "alice", queued, 3 * time.Hour, 0},
			{"job-2", "bob", running, 4 * time.Hour, 0},
			{"job-5", "bob", cancelled, 1 * time.Hour, 2 * time.Hour},
			{"job-1", "alice", queued, 5 * time.Hour, 0},
			{"job-3", "alice", completed, 3 * time.Hour, 1 * time.Hour},
		} {
			j := newJob(sp.id, sp.owner, base.Add(-sp.age))
			if sp.expires != 0 {
				j.ExpiresAt = base.Add(sp.expires)
			}
			createIn(t, ctx, s, j, sp.state)
		}
	}
	terminal := []jobState{completed, failed, cancelled}
	type listCase struct {
		name string
		f    func(base time.Time) bulkexport.Filter
		want []string
	}
	table := []listCase{
		{"All", func(time.Time) bulkexport.Filter { return bulkexport.Filter{} }, []string{"job-1", "job-2", "job-3", "job-6", "job-4", "job-5"}},
		{"Owner", func(time.Time) bulkexport.Filter { return bulkexport.Filter{Owner: "alice"} }, []string{"job-1", "job-3", "job-6", "job-4"}},
		{"OwnerNoMatch", func(time.Time) bulkexport.Filter { return bulkexport.Filter{Owner: "carol"} }, nil},
		{"OneState", func(time.Time) bulkexport.Filter { return bulkexport.Filter{States: []jobState{queued}} }, []string{"job-1", "job-6"}},
		{"SeveralStates", func(time.Time) bulkexport.Filter { return bulkexport.Filter{States: terminal} }, []string{"job-3", "job-4", "job-5"}},
		{"StateNoMatch", func(time.Time) bulkexport.Filter { return bulkexport.Filter{Owner: "bob", States: []jobState{queued}} }, nil},
		{"OwnerAndStates", func(time.Time) bulkexport.Filter {
			return bulkexport.Filter{Owner: "bob", States: []jobState{running, cancelled}}
		}, []string{"job-2", "job-5"}},
		// job-5 expires exactly at base+2h: not before it.
		{"ExpiresBefore", func(b time.Time) bulkexport.Filter { return bulkexport.Filter{ExpiresBefore: b.Add(2 * time.Hour)} }, []string{"job-3"}},
		{"ExpiresBeforeJustAfter", func(b time.Time) bulkexport.Filter {
			return bulkexport.Filter{ExpiresBefore: b.Add(3*time.Hour + time.Microsecond)}
		}, []string{"job-3", "job-4", "job-5"}},
		// Zero ExpiresAt never matches, however late ExpiresBefore is.
		{"ExpiresBeforeFarFuture", func(b time.Time) bulkexport.Filter {
			return bulkexport.Filter{ExpiresBefore: b.Add(100000 * time.Hour)}
		}, []string{"job-3", "job-4", "job-5"}},
		{"ExpiresBeforeNone", func(b time.Time) bulkexport.Filter { return bulkexport.Filter{ExpiresBefore: b} }, nil},
		// job-5 expires exactly at base+2h: expired at it, not just before.
		{"NotExpiredAt", func(b time.Time) bulkexport.Filter { return bulkexport.Filter{NotExpiredAt: b.Add(2 * time.Hour)} },
			[]string{"job-1", "job-2", "job-6", "job-4"}},
		{"NotExpiredAtJustBefore", func(b time.Time) bulkexport.Filter {
			return bulkexport.Filter{NotExpiredAt: b.Add(2*time.Hour - time.Nanosecond)}
		}, []string{"job-1", "job-2", "job-6", "job-4", "job-5"}},
		{"NotExpiredAtJustAfter", func(b time.Time) bulkexport.Filter {
			return bulkexport.Filter{NotExpiredAt: b.Add(2*time.Hour + time.Nanosecond)}
		}, []string{"job-1", "job-2", "job-6", "job-4"}},
		{"NotExpiredAtFinished", func(b time.Time) bulkexport.Filter {
			return bulkexport.Filter{Owner: "alice", States: terminal, NotExpiredAt: b.Add(time.Hour)}
		}, []string{"job-4"}},
		{"Limit", func(time.Time) bulkexport.Filter { return bulkexport.Filter{Limit: 2} }, []string{"job-1", "job-2"}},
		{"LimitOne", func(time.Time) bulkexport.Filter { return bulkexport.Filter{Limit: 1} }, []string{"job-1"}},
		{"LimitAboveCount", func(time.Time) bulkexport.Filter { return bulkexport.Filter{Limit: 100} }, []string{"job-1", "job-2", "job-3", "job-6", "job-4", "job-5"}},
		{"LimitAfterFilter", func(time.Time) bulkexport.Filter { return bulkexport.Filter{Owner: "alice", Limit: 3} }, []string{"job-1", "job-3", "job-6"}},
		{"Combined", func(b time.Time) bulkexport.Filter {
			return bulkexport.Filter{Owner: "alice", States: terminal, ExpiresBefore: b.Add(4 * time.Hour), Limit: 1}
		}, []string{"job-3"}},
	}
	cases := []testCase{
		{"Empty", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			for _, f := range []bulkexport.Filter{{}, {Owner: "alice"}, {States: []jobState{queued}}, {ExpiresBefore: base}, {Limit: 3}} {
				got, err := s.List(ctx, f)
				if err != nil {
					t.Errorf("List(%+v) on an empty store: %v; an empty result is not an error", f, err)
				}
				if len(got) != 0 {
					t.Errorf("List(%+v) on an empty store = %v, want none", f, ids(got))
				}
			}
		}},
	}
	for _, c := range table {
		cases = append(cases, testCase{c.name, func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			seed(t, ctx, s, base)
			f := c.f(base)
			got, err := s.List(ctx, f)
			if err != nil {
				t.Fatalf("List(%+v): %v", f, err)
			}
			if g := ids(got); !reflect.DeepEqual(g, append([]string{}, c.want...)) {
				t.Fatalf("List(%+v) = %v, want %v", f, g, c.want)
			}
			for _, j := range got {
				assertJob(t, "listed "+j.ID, mustGet(t, ctx, s, j.ID), j)
			}
		}})
	}
	cases = append(cases, testCase{"FullJobs", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
		// List returns whole jobs, not summaries.
		base := baseTime()
		mustCreate(t, ctx, s, fullJob("job-full", base))
		got, err := s.List(ctx, bulkexport.Filter{Owner: "client-1"})
		if err != nil || len(got) != 1 {
			t.Fatalf("List = %v, %v; want [job-full]", ids(got), err)
		}
		want := fullJob("job-full", base)
		want.Version = 1
		assertJob(t, "listed job", want, got[0])
	}})
	return cases
}

// ---------------------------------------------------------------------------
// Copy: jobs are copied in and out.

func copyCases() []testCase {
	check := func(t *testing.T, ctx context.Context, s bulkexport.JobStore, want *job) {
		t.Helper()
		assertJob(t, "stored job after mutating a caller's copy", want, mustGet(t, ctx, s, want.ID))
	}
	expected := func(base time.Time, version int64) *job {
		w := fullJob("job-copy", base)
		w.Version = version
		return w
	}
	return []testCase{
		{"CreateArgument", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			j := fullJob("job-copy", base)
			mustCreate(t, ctx, s, j)
			scribble(j)
			check(t, ctx, s, expected(base, 1))
		}},
		{"GetResult", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			mustCreate(t, ctx, s, fullJob("job-copy", base))
			scribble(mustGet(t, ctx, s, "job-copy"))
			check(t, ctx, s, expected(base, 1))
		}},
		{"UpdateArgument", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			mustCreate(t, ctx, s, newJob("job-copy", "alice", base))
			j := fullJob("job-copy", base)
			j.Version = 1
			mustUpdate(t, ctx, s, j)
			scribble(j)
			check(t, ctx, s, expected(base, 2))
		}},
		{"RefusedUpdateArgument", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			mustCreate(t, ctx, s, fullJob("job-copy", base))
			j := fullJob("job-copy", base)
			j.Version = 7
			if err := s.Update(ctx, j); !errors.Is(err, bulkexport.ErrConflict) {
				t.Fatalf("Update with Version 7: error = %v, want ErrConflict", err)
			}
			scribble(j)
			check(t, ctx, s, expected(base, 1))
		}},
		{"ClaimResult", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			mustCreate(t, ctx, s, fullJob("job-copy", base))
			c := mustClaim(t, ctx, s, "worker-1", base, time.Minute)
			updated := c.UpdatedAt
			scribble(c)
			want := expected(base, 2)
			want.State = running
			want.LeaseOwner = "worker-1"
			want.LeaseExpiresAt = base.Add(time.Minute)
			want.Attempts = 3
			want.Fence = 2
			want.UpdatedAt = updated
			check(t, ctx, s, want)
		}},
		{"GetResultsIndependent", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// Two Gets hand out copies that share nothing with each other.
			base := baseTime()
			mustCreate(t, ctx, s, fullJob("job-copy", base))
			a := mustGet(t, ctx, s, "job-copy")
			b := mustGet(t, ctx, s, "job-copy")
			scribble(a)
			assertJob(t, "second Get's copy after mutating the first", expected(base, 1), b)
		}},
		{"ListResult", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			mustCreate(t, ctx, s, fullJob("job-copy", base))
			got, err := s.List(ctx, bulkexport.Filter{})
			if err != nil || len(got) != 1 {
				t.Fatalf("List = %v, %v; want one job", ids(got), err)
			}
			scribble(got[0])
			check(t, ctx, s, expected(base, 1))
		}},
	}
}

// ---------------------------------------------------------------------------
// Concurrency (run with -race)

const (
	goroutines   = 8
	perGoroutine = 25
	claimJobs    = 40
	maxRetries   = 10000
)

func concurrencyCases() []testCase {
	return []testCase{
		{"NoLostUpdates", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// Read-modify-write with retry on ErrConflict: every increment
			// lands exactly once.
			mustCreate(t, ctx, s, newJob("job-n", "alice", baseTime()))
			increment := func() error {
				for range maxRetries {
					j, err := s.Get(ctx, "job-n")
					if err != nil {
						return err
					}
					j.Attempts++
					j.Progress.Percent++
					err = s.Update(ctx, j)
					if err == nil {
						return nil
					}
					if !errors.Is(err, bulkexport.ErrConflict) {
						return err
					}
				}
				return fmt.Errorf("still conflicting after %d retries", maxRetries)
			}
			var wg sync.WaitGroup
			start := make(chan struct{}) // all goroutines begin together
			for g := range goroutines {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					for i := range perGoroutine {
						if err := increment(); err != nil {
							t.Errorf("goroutine %d, increment %d: %v", g, i, err)
							return
						}
					}
				}()
			}
			close(start)
			wg.Wait()
			got := mustGet(t, ctx, s, "job-n")
			const n = goroutines * perGoroutine
			if got.Attempts != n || got.Progress.Percent != n || got.Version != n+1 {
				t.Errorf("after %d increments: Attempts %d, Percent %v, Version %d; want %d, %d, %d",
					n, got.Attempts, got.Progress.Percent, got.Version, n, n, n+1)
			}
		}},
		{"ClaimEachJobOnce", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			for i := range claimJobs {
				mustCreate(t, ctx, s, newJob(fmt.Sprintf("job-%03d", i), "alice", base.Add(time.Duration(i%7)*time.Second)))
			}
			var (
				mu     sync.Mutex
				claims = map[string]string{} // id → worker
				wg     sync.WaitGroup
			)
			start := make(chan struct{}) // all goroutines begin together
			for g := range goroutines {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					worker := fmt.Sprintf("worker-%d", g)
					for range claimJobs + 1 {
						j, err := s.Claim(ctx, bulkexport.ClaimParams{Worker: worker, Now: base, Lease: time.Hour})
						if errors.Is(err, bulkexport.ErrNoJob) {
							return
						}
						if err != nil {
							t.Errorf("%s: Claim: %v", worker, err)
							return
						}
						if j == nil {
							t.Errorf("%s: Claim = nil, nil", worker)
							return
						}
						if j.State != running || j.LeaseOwner != worker || j.Attempts != 1 {
							t.Errorf("%s: claimed %s with state %s, owner %q, attempts %d", worker, j.ID, j.State, j.LeaseOwner, j.Attempts)
						}
						mu.Lock()
						if prev, dup := claims[j.ID]; dup {
							t.Errorf("%s handed to %s and again to %s while the lease is live", j.ID, prev, worker)
						}
						claims[j.ID] = worker
						mu.Unlock()
					}
					t.Errorf("%s: more claims than jobs", worker)
				}()
			}
			close(start)
			wg.Wait()
			if len(claims) != claimJobs {
				t.Errorf("%d distinct jobs claimed, want %d", len(claims), claimJobs)
			}
			wantNoJob(t, ctx, s, "worker-late", base)
			for id, worker := range claims {
				j := mustGet(t, ctx, s, id)
				if j.State != running || j.LeaseOwner != worker || j.Attempts != 1 || j.Version != 2 {
					t.Errorf("stored %s: state %s, owner %q, attempts %d, version %d; want running, %s, 1, 2",
						id, j.State, j.LeaseOwner, j.Attempts, j.Version, worker)
				}
			}
		}},
		{"CreateSameID", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			base := baseTime()
			var (
				wg      sync.WaitGroup
				mu      sync.Mutex
				winners []string
			)
			start := make(chan struct{}) // all goroutines begin together
			for g := range goroutines {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					owner := fmt.Sprintf("client-%d", g)
					err := s.Create(ctx, newJob("job-race", owner, base), bulkexport.CreateParams{})
					switch {
					case err == nil:
						mu.Lock()
						winners = append(winners, owner)
						mu.Unlock()
					case !errors.Is(err, bulkexport.ErrAlreadyExists):
						t.Errorf("%s: Create: %v, want nil or ErrAlreadyExists", owner, err)
					}
				}()
			}
			close(start)
			wg.Wait()
			if len(winners) != 1 {
				t.Fatalf("%d concurrent Creates of one id succeeded (%v), want exactly 1", len(winners), winners)
			}
			if got := mustGet(t, ctx, s, "job-race"); got.Owner != winners[0] || got.Version != 1 {
				t.Errorf("stored job: owner %q version %d, want %q 1", got.Owner, got.Version, winners[0])
			}
		}},
		{"ActiveCap", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// 64 Creates for one owner race against a cap of 10: exactly
			// 10 win, whatever the interleaving.
			const racers, limit = 64, 10
			base := baseTime()
			var (
				wg      sync.WaitGroup
				mu      sync.Mutex
				winners int
			)
			start := make(chan struct{})
			for g := range racers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					err := s.Create(ctx, newJob(fmt.Sprintf("job-cap-%02d", g), "alice", base),
						bulkexport.CreateParams{MaxActivePerOwner: limit})
					switch {
					case err == nil:
						mu.Lock()
						winners++
						mu.Unlock()
					case !errors.Is(err, bulkexport.ErrTooManyJobs):
						t.Errorf("racer %d: Create: %v, want nil or ErrTooManyJobs", g, err)
					}
				}()
			}
			close(start)
			wg.Wait()
			if winners != limit {
				t.Errorf("%d of %d racing Creates succeeded under a cap of %d", winners, racers, limit)
			}
			active, err := s.List(ctx, bulkexport.Filter{Owner: "alice", States: []jobState{queued, running}})
			if err != nil {
				t.Fatal(err)
			}
			if len(active) != limit {
				t.Errorf("List after the race: %d active jobs, want %d", len(active), limit)
			}
		}},
		{"Mixed", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// Every method at once, each goroutine on its own job.
			base := baseTime()
			var wg sync.WaitGroup
			start := make(chan struct{}) // all goroutines begin together
			for g := range goroutines {
				wg.Add(1)
				go func() {
					defer wg.Done()
					<-start
					id, owner := fmt.Sprintf("job-m%d", g), fmt.Sprintf("client-%d", g)
					j := fullJob(id, base)
					j.Owner = owner
					if err := s.Create(ctx, j, bulkexport.CreateParams{}); err != nil {
						t.Errorf("%s: Create: %v", id, err)
						return
					}
					for i := range 5 {
						j.Progress.Percent = float64(i)
						if err := s.Update(ctx, j); err != nil {
							t.Errorf("%s: Update %d: %v", id, i, err)
							return
						}
						got, err := s.Get(ctx, id)
						if err != nil || got.Version != j.Version || got.Progress.Percent != float64(i) {
							t.Errorf("%s: Get after update %d = %+v, %v", id, i, got, err)
							return
						}
						list, err := s.List(ctx, bulkexport.Filter{Owner: owner})
						if err != nil || len(list) != 1 || list[0].ID != id {
							t.Errorf("%s: List(owner) = %v, %v", id, ids(list), err)
							return
						}
						if _, err := s.List(ctx, bulkexport.Filter{States: []jobState{queued}}); err != nil {
							t.Errorf("%s: List(states): %v", id, err)
							return
						}
					}
					if err := s.Delete(ctx, id); err != nil {
						t.Errorf("%s: Delete: %v", id, err)
						return
					}
					if _, err := s.Get(ctx, id); !errors.Is(err, bulkexport.ErrNotFound) {
						t.Errorf("%s: Get after Delete: %v, want ErrNotFound", id, err)
					}
				}()
			}
			close(start)
			wg.Wait()
			if got, err := s.List(ctx, bulkexport.Filter{}); err != nil || len(got) != 0 {
				t.Errorf("List after every job was deleted = %v, %v; want none", ids(got), err)
			}
		}},
	}
}

// ---------------------------------------------------------------------------
// Context: a cancelled context makes every method fail.

func contextCases() []testCase {
	cancelledCtx := func() context.Context {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		return ctx
	}
	seed := func(t *testing.T, ctx context.Context, s bulkexport.JobStore) *job {
		t.Helper()
		mustCreate(t, ctx, s, newJob("job-x", "alice", baseTime()))
		return mustGet(t, ctx, s, "job-x")
	}
	return []testCase{
		{"Create", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			if err := s.Create(cancelledCtx(), newJob("job-x", "alice", baseTime()), bulkexport.CreateParams{}); err == nil {
				t.Error("Create with a cancelled context succeeded")
			}
		}},
		{"Get", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			seed(t, ctx, s)
			if _, err := s.Get(cancelledCtx(), "job-x"); err == nil {
				t.Error("Get with a cancelled context succeeded")
			}
		}},
		{"Update", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			j := seed(t, ctx, s)
			j.Progress.Percent = 50
			if err := s.Update(cancelledCtx(), j); err == nil {
				t.Error("Update with a cancelled context succeeded")
			}
		}},
		{"Delete", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			seed(t, ctx, s)
			if err := s.Delete(cancelledCtx(), "job-x"); err == nil {
				t.Error("Delete with a cancelled context succeeded")
			}
		}},
		{"Claim", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			seed(t, ctx, s)
			if _, err := s.Claim(cancelledCtx(), bulkexport.ClaimParams{Worker: "worker-1", Now: baseTime(), Lease: time.Minute}); err == nil {
				t.Error("Claim with a cancelled context succeeded")
			}
		}},
		{"List", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			seed(t, ctx, s)
			if _, err := s.List(cancelledCtx(), bulkexport.Filter{}); err == nil {
				t.Error("List with a cancelled context succeeded")
			}
		}},
	}
}
