package dataset

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// memWriter is a ResourceWriter that keeps what it is given. Like the
// engine, it makes resources final only at a checkpoint: a crash
// (crashAfter checkpoints, then crashWrites more writes) loses what was
// written since the last one.
type memWriter struct {
	lines   [][]byte // recorded at a checkpoint (or at the end, see finish)
	pending [][]byte
	issues  []fhirbulk.Issue
	cursors []string

	crashAfter  int // 0: never crash
	crashWrites int
}

var errCrash = errors.New("simulated crash")

func (w *memWriter) Write(b []byte) error {
	if w.crashAfter > 0 && len(w.cursors) >= w.crashAfter && len(w.pending) >= w.crashWrites {
		return errCrash
	}
	w.pending = append(w.pending, bytes.Clone(b))
	return nil
}

func (w *memWriter) Deleted(string, time.Time) error { return errors.New("unexpected Deleted") }

func (w *memWriter) Issue(is fhirbulk.Issue) error {
	w.issues = append(w.issues, is)
	return nil
}

func (w *memWriter) Checkpoint(cursor string) error {
	if w.crashAfter > 0 && len(w.cursors) >= w.crashAfter {
		return errCrash
	}
	w.lines = append(w.lines, w.pending...)
	w.pending = nil
	w.cursors = append(w.cursors, cursor)
	return nil
}

// finish records what is pending, as the engine does when Export returns
// nil.
func (w *memWriter) finish() { w.lines, w.pending = append(w.lines, w.pending...), nil }

// resource is the part of a generated resource the tests look at.
type resource struct {
	ResourceType string `json:"resourceType"`
	ID           string `json:"id"`
	Meta         struct {
		LastUpdated string `json:"lastUpdated"`
		Tag         []struct {
			System string `json:"system"`
			Code   string `json:"code"`
		} `json:"tag"`
	} `json:"meta"`
	Subject *struct {
		Reference string `json:"reference"`
	} `json:"subject"`
	Encounter *struct {
		Reference string `json:"reference"`
	} `json:"encounter"`
	Status string `json:"status"`
	Gender string `json:"gender"`
	Code   *struct {
		Coding []struct {
			System string `json:"system"`
			Code   string `json:"code"`
		} `json:"coding"`
	} `json:"code"`
	ClinicalStatus *struct {
		Coding []struct {
			System string `json:"system"`
			Code   string `json:"code"`
		} `json:"coding"`
	} `json:"clinicalStatus"`

	raw  []byte
	keys []string
}

func (r *resource) lastUpdated(t *testing.T) time.Time {
	t.Helper()
	ts, err := fhirbulk.ParseInstant(r.Meta.LastUpdated)
	require.NoError(t, err)
	return ts
}

func decode(t *testing.T, line []byte) resource {
	t.Helper()
	var r resource
	require.NoError(t, json.Unmarshal(line, &r), "%s", line)
	var m map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(line, &m))
	for k := range m {
		r.keys = append(r.keys, k)
	}
	slices.Sort(r.keys)
	r.raw = line
	return r
}

// export runs a complete Export and returns the decoded resources.
func export(t *testing.T, d *Dataset, q *bulkexport.Query, typ string) ([]resource, *memWriter) {
	t.Helper()
	w := &memWriter{}
	require.NoError(t, d.Export(context.Background(), q, typ, w))
	w.finish()
	out := make([]resource, len(w.lines))
	for i, l := range w.lines {
		out[i] = decode(t, l)
		require.Equal(t, typ, out[i].ResourceType)
	}
	return out, w
}

// idOf returns the id of a resource without decoding the rest of it.
func idOf(t *testing.T, line []byte) string {
	t.Helper()
	var r struct {
		ID string `json:"id"`
	}
	require.NoError(t, json.Unmarshal(line, &r))
	return r.ID
}

func ids(rs []resource) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.ID)
	}
	return out
}

func system() *bulkexport.Query { return &bulkexport.Query{Level: fhirbulk.LevelSystem} }

func patientIdx(t *testing.T, ref string) int {
	t.Helper()
	s, ok := strings.CutPrefix(ref, "Patient/p-")
	require.True(t, ok, ref)
	n, err := strconv.Atoi(s)
	require.NoError(t, err)
	return n
}

func TestResourceTypes(t *testing.T) {
	t.Parallel()
	d := New(5)
	ctx := context.Background()
	sys, err := d.ResourceTypes(ctx, fhirbulk.LevelSystem)
	require.NoError(t, err)
	require.Equal(t, []string{"Patient", "Encounter", "Condition", "Observation", "MedicationRequest", "Practitioner", "Organization"}, sys)
	for _, l := range []fhirbulk.Level{fhirbulk.LevelPatient, fhirbulk.LevelGroup} {
		got, err := d.ResourceTypes(ctx, l)
		require.NoError(t, err)
		require.Equal(t, []string{"Patient", "Encounter", "Condition", "Observation", "MedicationRequest"}, got)
	}
	_, err = d.ResourceTypes(ctx, "nope")
	require.Error(t, err)

	// Changing the returned slice does not change the dataset.
	sys[0] = "X"
	again, _ := d.ResourceTypes(ctx, fhirbulk.LevelSystem)
	require.Equal(t, "Patient", again[0])
}

func TestDeterminism(t *testing.T) {
	t.Parallel()
	for _, typ := range systemTypes {
		t.Run(typ, func(t *testing.T) {
			t.Parallel()
			a, _ := export(t, New(30), system(), typ)
			b, _ := export(t, New(30), system(), typ)
			require.NotEmpty(t, a)
			require.Equal(t, len(a), len(b))
			for i := range a {
				require.Equal(t, string(a[i].raw), string(b[i].raw))
				one, err := New(30).Resource(typ, a[i].ID)
				require.NoError(t, err)
				require.Equal(t, string(a[i].raw), string(one))
			}
			// Another seed gives other data.
			c, _ := export(t, NewSeeded(30, 7), system(), typ)
			require.NotEqual(t, string(a[0].raw), string(c[0].raw))
		})
	}
}

func TestResourcesAreValid(t *testing.T) {
	t.Parallel()
	const n = 50
	d := New(n)
	seen := map[string]bool{}
	for _, typ := range systemTypes {
		rs, w := export(t, d, system(), typ)
		require.Empty(t, w.issues)
		for _, r := range rs {
			require.True(t, json.Valid(r.raw))
			require.NotContains(t, string(r.raw), "\n")
			key := typ + "/" + r.ID
			require.False(t, seen[key], "duplicate %s", key)
			seen[key] = true
			lu := r.lastUpdated(t)
			require.True(t, lu.Before(Reference) && lu.After(Reference.Add(-span)), "%s lastUpdated %s", key, lu)
			require.Empty(t, r.Meta.Tag)
			switch typ {
			case "Patient", "Practitioner", "Organization":
			default:
				require.NotNil(t, r.Subject, key)
				idx := patientIdx(t, r.Subject.Reference)
				require.True(t, idx >= 1 && idx <= n)
				if typ == "Encounter" {
					break
				}
				require.NotNil(t, r.Encounter, key)
				enc, _ := strings.CutPrefix(r.Encounter.Reference, "Encounter/")
				_, err := d.Resource("Encounter", enc)
				require.NoError(t, err, "%s refers to a missing %s", key, r.Encounter.Reference)
			}
			switch typ {
			case "Patient":
				require.Contains(t, genders, r.Gender)
				require.Subset(t, r.keys, []string{"name", "gender", "birthDate", "identifier"})
			case "Observation":
				require.Equal(t, "http://loinc.org", r.Code.Coding[0].System)
				require.Contains(t, r.keys, "valueQuantity")
			case "Condition":
				require.Equal(t, sysSNOMED, r.Code.Coding[0].System)
				require.Equal(t, sysClinical, r.ClinicalStatus.Coding[0].System)
				require.Contains(t, []string{"active", "resolved"}, r.ClinicalStatus.Coding[0].Code)
			case "MedicationRequest":
				require.Subset(t, r.keys, []string{"status", "intent", "medicationCodeableConcept"})
			}
		}
	}
	for _, ref := range []string{"Practitioner/pr-1", "Organization/org-1", "Patient/p-50"} {
		require.True(t, seen[ref], ref)
	}
}

func TestCountsPerLevel(t *testing.T) {
	t.Parallel()
	const n = 40
	d := New(n)
	ctx := context.Background()
	group := func(id string) *bulkexport.Query {
		return &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: id}
	}
	tests := []struct {
		name     string
		q        *bulkexport.Query
		patients []int
	}{
		{"system", system(), seq(1, n, 1)},
		{"patient", &bulkexport.Query{Level: fhirbulk.LevelPatient}, seq(1, n, 1)},
		{"group all", group("all"), seq(1, n, 1)},
		{"group even", group("even"), seq(2, n, 2)},
		{"group odd", group("odd"), seq(1, n, 2)},
		{"group cohort-0", group("cohort-0"), seq(10, n, 10)},
		{"group cohort-3", group("cohort-3"), seq(3, n, 10)},
		{"patient list", &bulkexport.Query{Level: fhirbulk.LevelPatient, Patients: []string{"p-7", "p-3", "p-7"}}, []int{3, 7}},
		{"group with patient list", &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "even", Patients: []string{"p-4", "p-5", "p-8"}}, []int{4, 8}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			types, err := d.ResourceTypes(ctx, tt.q.Level)
			require.NoError(t, err)
			for _, typ := range types {
				rs, _ := export(t, d, tt.q, typ)
				count, err := d.Count(ctx, tt.q, typ)
				require.NoError(t, err)
				require.Equal(t, int64(len(rs)), count, typ)
				want, err := d.Expected(tt.q, typ)
				require.NoError(t, err)
				require.Equal(t, want, ids(rs), typ)

				var got []int
				switch typ {
				case "Practitioner":
					require.Len(t, rs, 1+n/20)
					continue
				case "Organization":
					require.Len(t, rs, 1+n/200)
					continue
				case "Patient":
					for _, r := range rs {
						got = append(got, patientIdx(t, "Patient/"+r.ID))
					}
					require.Equal(t, tt.patients, got)
					continue
				}
				for _, r := range rs {
					got = append(got, patientIdx(t, r.Subject.Reference))
				}
				got = slices.Compact(got)
				// Every patient has 1 to 3 resources of each type.
				require.Equal(t, tt.patients, got, typ)
				require.GreaterOrEqual(t, len(rs), len(tt.patients))
				require.LessOrEqual(t, len(rs), 3*len(tt.patients))
			}
		})
	}
}

func seq(from, to, step int) []int {
	var out []int
	for i := from; i <= to; i += step {
		out = append(out, i)
	}
	return out
}

func TestGroups(t *testing.T) {
	t.Parallel()
	d := New(10)
	ctx := context.Background()
	for _, id := range Groups() {
		require.NoError(t, d.CheckGroup(ctx, id), id)
	}
	for _, id := range []string{"", "none", "cohort-10", "cohort-", "cohort-x", "ALL", "Group/all"} {
		err := d.CheckGroup(ctx, id)
		require.ErrorIs(t, err, bulkexport.ErrNotFound, id)
	}
	err := d.Export(ctx, &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "nope"}, "Patient", &memWriter{})
	require.ErrorIs(t, err, bulkexport.ErrNotFound)
	_, err = d.Count(ctx, &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "nope"}, "Patient")
	require.ErrorIs(t, err, bulkexport.ErrNotFound)

	require.True(t, d.IsMember("all", 1))
	require.True(t, d.IsMember("even", 4))
	require.False(t, d.IsMember("even", 5))
	require.True(t, d.IsMember("cohort-0", 10))
	require.False(t, d.IsMember("all", 11))
	require.False(t, d.IsMember("nope", 1))
}

func TestExportErrors(t *testing.T) {
	t.Parallel()
	d := New(10)
	ctx := context.Background()
	tests := []struct {
		name string
		q    *bulkexport.Query
		typ  string
	}{
		{"unknown type", system(), "Medication"},
		{"practitioner at patient level", &bulkexport.Query{Level: fhirbulk.LevelPatient}, "Practitioner"},
		{"organization at group level", &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "all"}, "Organization"},
		{"bad level", &bulkexport.Query{Level: "galaxy"}, "Patient"},
		{"bad cursor", &bulkexport.Query{Level: fhirbulk.LevelSystem, Cursor: "x"}, "Patient"},
		{"bad filter", &bulkexport.Query{Level: fhirbulk.LevelSystem, TypeFilters: []bulkexport.TypeFilter{{Type: "Patient", Query: "name=x"}}}, "Patient"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			w := &memWriter{}
			require.Error(t, d.Export(ctx, tt.q, tt.typ, w))
			require.Empty(t, w.pending)
			_, err := d.Expected(tt.q, tt.typ)
			require.Error(t, err)
		})
	}
}

func TestPatientParameter(t *testing.T) {
	t.Parallel()
	d := New(20)
	q := &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "odd", Patients: []string{"p-3", "p-4", "p-21", "x", "p-03", "p-19"}}
	rs, w := export(t, d, q, "Patient")
	require.Equal(t, []string{"p-3", "p-19"}, ids(rs))
	require.Len(t, w.issues, 4)
	for _, is := range w.issues {
		require.Equal(t, fhirbulk.SeverityWarning, is.Severity)
		require.Equal(t, fhirbulk.IssueNotFound, is.Code)
	}
	require.Contains(t, w.issues[0].Diagnostics, "Patient/p-4 is not a member of Group/odd")

	// The other types report nothing, and only the listed patients' data.
	obs, w := export(t, d, q, "Observation")
	require.Empty(t, w.issues)
	for _, r := range obs {
		require.Contains(t, []string{"Patient/p-3", "Patient/p-19"}, r.Subject.Reference)
	}

	// A resumed Patient export does not report them again.
	q2 := *q
	q2.Cursor = "3"
	rs, w = export(t, d, &q2, "Patient")
	require.Equal(t, []string{"p-19"}, ids(rs))
	require.Empty(t, w.issues)
}

func TestSinceUntil(t *testing.T) {
	t.Parallel()
	d := New(60)
	// Half a second off the whole-second grid: no resource is updated at
	// exactly t, so since(t) and until(t) split the data in two.
	ts := Reference.Add(-300*24*time.Hour - 500*time.Millisecond)
	for _, typ := range systemTypes {
		t.Run(typ, func(t *testing.T) {
			t.Parallel()
			all, _ := export(t, d, system(), typ)
			since, _ := export(t, d, &bulkexport.Query{Level: fhirbulk.LevelSystem, Since: ts}, typ)
			until, _ := export(t, d, &bulkexport.Query{Level: fhirbulk.LevelSystem, Until: ts}, typ)
			for _, r := range since {
				require.True(t, r.lastUpdated(t).After(ts))
			}
			for _, r := range until {
				require.True(t, r.lastUpdated(t).Before(ts))
			}
			require.Equal(t, len(all), len(since)+len(until))
			if typ != "Organization" { // one organization only
				require.NotEmpty(t, since)
				require.NotEmpty(t, until)
			}

			// Both bounds are exclusive: a resource updated exactly at a
			// bound is left out.
			r := all[0]
			lu := r.lastUpdated(t)
			got, _ := export(t, d, &bulkexport.Query{Level: fhirbulk.LevelSystem, Since: lu}, typ)
			require.NotContains(t, ids(got), r.ID)
			got, _ = export(t, d, &bulkexport.Query{Level: fhirbulk.LevelSystem, Until: lu}, typ)
			require.NotContains(t, ids(got), r.ID)
			got, _ = export(t, d, &bulkexport.Query{Level: fhirbulk.LevelSystem, Since: lu.Add(-time.Second), Until: lu.Add(time.Second)}, typ)
			require.Contains(t, ids(got), r.ID)

			// The transaction time is inclusive: resources updated after
			// it are left out.
			got, _ = export(t, d, &bulkexport.Query{Level: fhirbulk.LevelSystem, TransactionTime: lu}, typ)
			require.Contains(t, ids(got), r.ID)
			for _, g := range got {
				require.False(t, g.lastUpdated(t).After(lu))
			}
			got, _ = export(t, d, &bulkexport.Query{Level: fhirbulk.LevelSystem, TransactionTime: ts}, typ)
			require.Equal(t, ids(until), ids(got))
		})
	}
}

func TestTypeFilters(t *testing.T) {
	t.Parallel()
	d := New(80)
	coding := func(r resource) (string, string) { return r.Code.Coding[0].System, r.Code.Coding[0].Code }
	tests := []struct {
		typ     string
		filters []string
		want    func(r resource) bool
	}{
		{"Observation", []string{"code=8867-4"}, func(r resource) bool { _, c := coding(r); return c == "8867-4" }},
		{"Observation", []string{"code=http://loinc.org|8480-6"}, func(r resource) bool { _, c := coding(r); return c == "8480-6" }},
		{"Observation", []string{"code=http://snomed.info/sct|8480-6"}, func(resource) bool { return false }},
		{"Observation", []string{"code=|8480-6"}, func(resource) bool { return false }},
		{"Observation", []string{"code=http://loinc.org|"}, func(resource) bool { return true }},
		{"Observation", []string{"code=8867-4,29463-7"}, func(r resource) bool { _, c := coding(r); return c == "8867-4" || c == "29463-7" }},
		{"Observation", []string{"code=8867-4", "code=29463-7"}, func(r resource) bool { _, c := coding(r); return c == "8867-4" || c == "29463-7" }},
		{"Observation", []string{"code=8867-4&status=final"}, func(r resource) bool { _, c := coding(r); return c == "8867-4" && r.Status == "final" }},
		{"Observation", []string{"category=laboratory"}, func(r resource) bool { _, c := coding(r); return c == "2339-0" }},
		{"Condition", []string{"clinical-status=active"}, func(r resource) bool { return r.ClinicalStatus.Coding[0].Code == "active" }},
		{"Condition", []string{"clinical-status=" + url.QueryEscape(sysClinical+"|resolved")}, func(r resource) bool { return r.ClinicalStatus.Coding[0].Code == "resolved" }},
		{"Condition", []string{"code=38341003"}, func(r resource) bool { _, c := coding(r); return c == "38341003" }},
		{"Patient", []string{"gender=female"}, func(r resource) bool { return r.Gender == "female" }},
		{"Patient", []string{"gender=male", "gender=female"}, func(r resource) bool { return r.Gender == "male" || r.Gender == "female" }},
		{"Encounter", []string{"status=finished"}, func(r resource) bool { return r.Status == "finished" }},
		{"Encounter", []string{"status=in-progress,cancelled"}, func(r resource) bool { return r.Status != "finished" }},
		{"MedicationRequest", []string{"status=active"}, func(r resource) bool { return r.Status == "active" }},
		{"MedicationRequest", []string{"intent=order&status=completed"}, func(r resource) bool { return r.Status == "completed" }},
	}
	for _, tt := range tests {
		t.Run(tt.typ+"?"+strings.Join(tt.filters, "|"), func(t *testing.T) {
			t.Parallel()
			q := system()
			for _, f := range tt.filters {
				vals, err := url.ParseQuery(f)
				require.NoError(t, err)
				require.NoError(t, d.CheckTypeFilter(tt.typ, vals))
				q.TypeFilters = append(q.TypeFilters, bulkexport.TypeFilter{Type: tt.typ, Query: f})
			}
			// Filters on other types do not apply.
			q.TypeFilters = append(q.TypeFilters, bulkexport.TypeFilter{Type: "Organization", Query: "name=none"})
			all, _ := export(t, d, system(), tt.typ)
			var want []string
			for _, r := range all {
				if tt.want(r) {
					want = append(want, r.ID)
				}
			}
			got, _ := export(t, d, q, tt.typ)
			require.Equal(t, want, ids(got))
			n, err := d.Count(context.Background(), q, tt.typ)
			require.NoError(t, err)
			require.Equal(t, int64(len(want)), n)
		})
	}

	// The dataset is varied enough for the filters to select subsets.
	obs, _ := export(t, d, system(), "Observation")
	hr, _ := export(t, d, &bulkexport.Query{Level: fhirbulk.LevelSystem, TypeFilters: []bulkexport.TypeFilter{{Type: "Observation", Query: "code=8867-4"}}}, "Observation")
	require.NotEmpty(t, hr)
	require.Less(t, len(hr), len(obs))
}

func TestCheckTypeFilterRejects(t *testing.T) {
	t.Parallel()
	d := New(1)
	tests := []struct {
		typ, query, msg string
	}{
		{"Observation", "value-quantity=5", `search parameter "value-quantity" is not supported on Observation (supported: category, code, status)`},
		{"Observation", "code:text=heart", "modifier :text of search parameter code is not supported"},
		{"Observation", "code=", "search parameter code has an empty value"},
		{"Observation", "code=1,,2", "empty value"},
		{"Condition", "clinical-status=active&onset-date=gt2020", `"onset-date" is not supported on Condition`},
		{"Patient", "name=Smith", `"name" is not supported on Patient (supported: gender)`},
		{"Practitioner", "name=Smith", "no search parameters are supported on Practitioner"},
		{"Organization", "_id=org-1", "no search parameters are supported on Organization"},
		{"Medication", "code=1", "not in the dataset"},
	}
	for _, tt := range tests {
		t.Run(tt.typ+"?"+tt.query, func(t *testing.T) {
			t.Parallel()
			vals, err := url.ParseQuery(tt.query)
			require.NoError(t, err)
			err = d.CheckTypeFilter(tt.typ, vals)
			require.Error(t, err)
			require.Contains(t, err.Error(), tt.msg)
		})
	}
	require.Error(t, d.CheckTypeFilter("Observation", url.Values{}))
	require.Equal(t, []string{"category", "code", "status"}, SearchParams("Observation"))
	require.Empty(t, SearchParams("Organization"))
}

func TestElements(t *testing.T) {
	t.Parallel()
	d := New(10)
	base := []string{"id", "meta", "resourceType"}
	tests := []struct {
		typ      string
		elements []string
		keys     []string // besides resourceType, id, meta
	}{
		{"Observation", []string{"valueQuantity"}, []string{"code", "status", "valueQuantity"}},
		{"Observation", []string{"value[x]"}, []string{"code", "status", "valueQuantity"}},
		{"Observation", []string{"value", "subject"}, []string{"code", "status", "subject", "valueQuantity"}},
		{"Observation", []string{"nothing"}, []string{"code", "status"}},
		{"Patient", []string{"gender"}, []string{"gender"}},
		{"Patient", []string{"name", "birthDate", "id"}, []string{"birthDate", "name"}},
		{"Condition", []string{"code"}, []string{"code", "subject"}},
		{"Encounter", []string{"period"}, nil}, // status and class, plus period where there is one
		{"MedicationRequest", []string{"authoredOn"}, []string{"authoredOn", "intent", "medicationCodeableConcept", "status", "subject"}},
		{"Practitioner", []string{"name"}, []string{"name"}},
		{"Organization", []string{"name", "identifier"}, []string{"identifier", "name"}},
	}
	for _, tt := range tests {
		t.Run(tt.typ+"."+strings.Join(tt.elements, ","), func(t *testing.T) {
			t.Parallel()
			full, _ := export(t, d, system(), tt.typ)
			got, _ := export(t, d, &bulkexport.Query{Level: fhirbulk.LevelSystem, Elements: tt.elements}, tt.typ)
			require.Equal(t, ids(full), ids(got))
			for i, r := range got {
				require.Len(t, r.Meta.Tag, 1)
				require.Equal(t, "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", r.Meta.Tag[0].System)
				require.Equal(t, "SUBSETTED", r.Meta.Tag[0].Code)
				require.Equal(t, full[i].Meta.LastUpdated, r.Meta.LastUpdated)
				want := append(slices.Clone(base), tt.keys...)
				if tt.typ == "Encounter" {
					want = append(want, "class", "status")
					if slices.Contains(full[i].keys, "period") {
						want = append(want, "period")
					}
				}
				slices.Sort(want)
				require.Equal(t, want, r.keys)
				// Kept elements are as in the full resource.
				var a, b map[string]json.RawMessage
				require.NoError(t, json.Unmarshal(full[i].raw, &a))
				require.NoError(t, json.Unmarshal(r.raw, &b))
				for k, v := range b {
					if k != "meta" {
						require.JSONEq(t, string(a[k]), string(v))
					}
				}
			}
		})
	}
}

// TestResume interrupts exports at various points and resumes them from
// the last recorded cursor: every resource must be written exactly once.
func TestResume(t *testing.T) {
	t.Parallel()
	d := New(12)
	queries := map[string]*bulkexport.Query{
		"system":   system(),
		"group":    {Level: fhirbulk.LevelGroup, GroupID: "odd"},
		"patients": {Level: fhirbulk.LevelPatient, Patients: []string{"p-2", "p-9", "p-10", "p-12", "p-99"}},
		"filtered": {Level: fhirbulk.LevelSystem, Since: Reference.Add(-365 * 24 * time.Hour),
			TypeFilters: []bulkexport.TypeFilter{{Type: "Observation", Query: "code=8867-4,8480-6"}}},
	}
	for name, q := range queries {
		for _, typ := range []string{"Patient", "Observation", "MedicationRequest", "Practitioner"} {
			if typ == "Practitioner" && q.Level != fhirbulk.LevelSystem {
				continue
			}
			t.Run(name+"/"+typ, func(t *testing.T) {
				t.Parallel()
				full, fw := export(t, d, q, typ)
				for crashAfter := 1; crashAfter <= len(fw.cursors); crashAfter++ {
					for _, crashWrites := range []int{0, 1, 2} {
						w := &memWriter{crashAfter: crashAfter, crashWrites: crashWrites}
						err := d.Export(context.Background(), q, typ, w)
						if err == nil {
							// The crash point was past the end.
							w.finish()
							require.Equal(t, len(full), len(w.lines))
							continue
						}
						require.ErrorIs(t, err, errCrash)
						first := w.lines
						rq := *q
						rq.Cursor = w.cursors[len(w.cursors)-1]
						_, rest := export(t, d, &rq, typ)
						want, err := d.Expected(&rq, typ)
						require.NoError(t, err)
						require.Len(t, rest.lines, len(want))

						var got []string
						for _, l := range append(first, rest.lines...) {
							got = append(got, idOf(t, l))
						}
						require.Equal(t, ids(full), got, "crash after %d checkpoints and %d writes", crashAfter, crashWrites)
						// Resumed issues are not repeated.
						require.Len(t, append(w.issues, rest.issues...), len(fw.issues))
					}
				}
			})
		}
	}
}

func TestCheckpointsEveryOwner(t *testing.T) {
	t.Parallel()
	d := New(12)
	_, w := export(t, d, &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "cohort-1"}, "Condition")
	require.Equal(t, []string{"1", "11"}, w.cursors)
	_, w = export(t, d, system(), "Practitioner")
	require.Equal(t, []string{"1"}, w.cursors)
	_, w = export(t, d, system(), "Patient")
	require.Len(t, w.cursors, 12)
	require.Equal(t, "12", w.cursors[11])
}

// cancelWriter cancels the export's context after a number of writes.
type cancelWriter struct {
	memWriter
	cancel context.CancelFunc
	after  int
	n      int
}

func (w *cancelWriter) Write(b []byte) error {
	if w.n++; w.n == w.after {
		w.cancel()
	}
	return nil
}

// TestLargeDataset checks that a million-patient dataset is generated on
// the fly: a cancelled export stops at once, single patients at the end of
// the range are there, and counting a group is a cheap pass.
func TestLargeDataset(t *testing.T) {
	t.Parallel()
	d := New(1_000_000)
	require.Equal(t, 50_001, d.Practitioners())
	require.Equal(t, 5_001, d.Organizations())

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	w := &cancelWriter{cancel: cancel, after: 1000}
	err := d.Export(ctx, system(), "Observation", w)
	require.ErrorIs(t, err, context.Canceled)
	require.Equal(t, 1000, w.n)

	rs, _ := export(t, d, &bulkexport.Query{Level: fhirbulk.LevelPatient, Patients: []string{"p-1000000", "p-1000001"}}, "Patient")
	require.Equal(t, []string{"p-1000000"}, ids(rs))
	rs, _ = export(t, d, &bulkexport.Query{Level: fhirbulk.LevelPatient, Patients: []string{"p-999999"}}, "Encounter")
	require.NotEmpty(t, rs)
	require.Equal(t, "Patient/p-999999", rs[0].Subject.Reference)

	n, err := d.Count(context.Background(), &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "cohort-7"}, "Patient")
	require.NoError(t, err)
	require.Equal(t, int64(100_000), n)
}

func TestResource(t *testing.T) {
	t.Parallel()
	d := New(10)
	for _, tt := range []struct {
		typ, id string
		ok      bool
	}{
		{"Patient", "p-1", true},
		{"Patient", "p-10", true},
		{"Patient", "p-11", false},
		{"Patient", "p-0", false},
		{"Patient", "p-01", false},
		{"Patient", "x-1", false},
		{"Encounter", "e-1-1", true},
		{"Encounter", "e-1-4", false},
		{"Encounter", "e-1", false},
		{"Practitioner", "pr-1", true},
		{"Practitioner", "pr-2", false},
		{"Organization", "org-1", true},
		{"Medication", "x-1", false},
	} {
		b, err := d.Resource(tt.typ, tt.id)
		if !tt.ok {
			require.ErrorIs(t, err, bulkexport.ErrNotFound, "%s/%s", tt.typ, tt.id)
			continue
		}
		require.NoError(t, err)
		r := decode(t, b)
		require.Equal(t, tt.typ, r.ResourceType)
		require.Equal(t, tt.id, r.ID)
	}
}

func TestAppendString(t *testing.T) {
	t.Parallel()
	for _, s := range []string{"", "plain", `q"uote\`, "tab\tnl\nctl\x01", "Sørensen", "bad\xffutf8"} {
		b := appendString(nil, s)
		require.True(t, json.Valid(b), "%q", b)
		var back string
		require.NoError(t, json.Unmarshal(b, &back))
		if s != "bad\xffutf8" {
			require.Equal(t, s, back)
		}
	}
	require.Equal(t, "12.5", string(appendTenths(nil, 125)))
	require.Equal(t, "7", string(appendTenths(nil, 70)))
	require.Equal(t, fmt.Sprint(0), string(appendTenths(nil, 0)))
}
