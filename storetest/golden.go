package storetest

import (
	"bytes"
	"context"
	_ "embed"
	"encoding/json"
	"fmt"
	"reflect"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// goldenJSON is the stored form (bulkexport.MarshalStoredJob) of
// GoldenJob, indented: format 1 as this release writes it.
//
//go:embed job-format-1.json
var goldenJSON []byte

// GoldenJobJSON returns the committed stored form of GoldenJob in format
// bulkexport.JobFormatVersion, compact, byte for byte as
// bulkexport.MarshalStoredJob writes it (the committed file is indented
// for reading). A store's own tests can write it straight into their
// table, as a job saved by an earlier release, and check that Get reads
// GoldenJob back.
func GoldenJobJSON() []byte {
	var buf bytes.Buffer
	if err := json.Compact(&buf, goldenJSON); err != nil {
		panic("storetest: the golden document is not JSON: " + err.Error())
	}
	return buf.Bytes()
}

// goldenTime is a fixed instant of the golden job: UTC, microsecond
// precision, with a sub-second part.
func goldenTime(day, hour, min int) time.Time {
	return time.Date(2026, time.March, day, hour, min, 26, 535897000, time.UTC)
}

// GoldenJob returns a job with every exported field set, down through the
// types it holds (Request, File, Failure, Issue, ...), to fixed values:
// the job whose stored form is GoldenJobJSON. Its Version is 1, as Create
// stores it. A field added to Job, or to a type it holds, fails the suite's
// Format cases until it is set here and the golden document is updated;
// see bulkexport.JobFormatVersion for when the format version must grow.
func GoldenJob() *bulkexport.Job {
	return &bulkexport.Job{
		ID:      "0123456789abcdef0123456789abcdef",
		Owner:   "client-golden",
		Level:   fhirbulk.LevelGroup,
		GroupID: "group-7",
		Request: bulkexport.Request{
			URL:                   "https://fhir.example.org/Group/group-7/$export?_type=Patient,Observation",
			Method:                "POST",
			OutputFormat:          "application/fhir+ndjson",
			Since:                 goldenTime(1, 8, 0),
			Until:                 goldenTime(13, 8, 0),
			Types:                 []string{"Patient", "Observation"},
			TypeFilters:           []bulkexport.TypeFilter{{Type: "Observation", Query: "code=http%3A%2F%2Floinc.org%7C1234-5&status=final"}},
			Elements:              []string{"Observation.code", "id"},
			IncludeAssociatedData: []string{"LatestProvenanceResources"},
			OrganizeOutputBy:      "Patient",
			AllowPartialManifests: true,
			Patients:              []string{"Patient/p-1", "Patient/p-2"},
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
		State:           bulkexport.StateQueued,
		Progress:        bulkexport.Progress{Percent: 42.5, Message: "Observation"},
		TransactionTime: goldenTime(14, 9, 30),
		Output: []bulkexport.File{
			{Type: "Patient", Name: "Patient.000001.c3.ndjson", Count: 10, Size: 12345, ContinuesIn: "Patient.000002.c3.ndjson"},
			{Type: "Observation", Name: "Patient.000002.c3.ndjson", Count: 200, Size: 678901, ContinuesIn: "Patient.000003.c3.ndjson"},
		},
		Deleted:   []bulkexport.File{{Type: "Bundle", Name: "Patient.deleted.c3.ndjson", Count: 3, Size: 999, ContinuesIn: "Patient.deleted.000002.c3.ndjson"}},
		Errors:    []bulkexport.File{{Type: "OperationOutcome", Name: "Patient.error.c3.ndjson", Count: 1, Size: 321, ContinuesIn: "Patient.error.000002.c3.ndjson"}},
		Extension: json.RawMessage(`{"https://example.org/fhir/ext":{"n":1,"list":[1,2.5,"three"]}}`),
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
					Expression:  []string{"Observation"},
				}},
			},
		},
		CreatedAt:      goldenTime(14, 9, 0),
		UpdatedAt:      goldenTime(14, 9, 45),
		StartedAt:      goldenTime(14, 9, 15),
		CompletedAt:    goldenTime(14, 10, 0),
		ExpiresAt:      goldenTime(15, 10, 0),
		Version:        1,
		LeaseOwner:     "worker-0",
		LeaseExpiresAt: goldenTime(14, 9, 50),
		Attempts:       2,
		Fence:          3,
		Checkpoint:     json.RawMessage(`{"type":"Observation","cursor":"b2Zmc2V0PTEyMzQ=","done":["Patient"]}`),
	}
}

// unsetFields lists the paths of the exported fields reachable from v that
// hold their zero value (an empty slice counts as unset; a slice's
// elements, and what pointers point to, are checked too).
func unsetFields(path string, v reflect.Value, out *[]string) {
	if v.Type() == timeType {
		if v.Interface().(time.Time).IsZero() {
			*out = append(*out, path)
		}
		return
	}
	switch v.Kind() {
	case reflect.Pointer:
		if v.IsNil() {
			*out = append(*out, path)
			return
		}
		unsetFields(path, v.Elem(), out)
	case reflect.Struct:
		for i := range v.NumField() {
			if f := v.Type().Field(i); f.IsExported() {
				unsetFields(path+"."+f.Name, v.Field(i), out)
			}
		}
	case reflect.Slice:
		if v.Len() == 0 {
			*out = append(*out, path)
			return
		}
		if v.Type().Elem().Kind() == reflect.Uint8 {
			return // raw JSON, bytes
		}
		for i := range v.Len() {
			unsetFields(fmt.Sprintf("%s[%d]", path, i), v.Index(i), out)
		}
	case reflect.Map:
		if v.Len() == 0 {
			*out = append(*out, path)
		}
	default:
		if v.IsZero() {
			*out = append(*out, path)
		}
	}
}

// indentJSON indents a JSON document as the golden file is: two spaces,
// a final newline.
func indentJSON(t *testing.T, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := json.Indent(&buf, b, "", "  "); err != nil {
		t.Fatalf("indenting %s: %v", b, err)
	}
	buf.WriteByte('\n')
	return buf.Bytes()
}

func formatCases() []testCase {
	return []testCase{
		{"GoldenJobSetsEveryField", func(t *testing.T, _ context.Context, _ bulkexport.JobStore) {
			var unset []string
			unsetFields("Job", reflect.ValueOf(GoldenJob()).Elem(), &unset)
			for _, p := range unset {
				t.Errorf("storetest.GoldenJob leaves %s unset: set it, and update the golden document job-format-1.json (a new field changes the stored format; see bulkexport.JobFormatVersion)", p)
			}
		}},
		{"GoldenJSON", func(t *testing.T, _ context.Context, _ bulkexport.JobStore) {
			// The stored form of the golden job is the committed document:
			// Job's json tags are the stores' on-disk format.
			b, err := bulkexport.MarshalStoredJob(GoldenJob())
			if err != nil {
				t.Fatalf("MarshalStoredJob: %v", err)
			}
			if got := indentJSON(t, b); !bytes.Equal(got, goldenJSON) {
				t.Errorf("the stored form of GoldenJob differs from the golden document job-format-1.json: the on-disk format changed (see bulkexport.JobFormatVersion).\ngot:\n%s\nwant:\n%s", got, goldenJSON)
			}
			var keys map[string]json.RawMessage
			if err := json.Unmarshal(b, &keys); err != nil {
				t.Fatal(err)
			}
			if want := fmt.Sprint(bulkexport.JobFormatVersion); string(keys["format"]) != want {
				t.Errorf(`stored form has "format": %s, want %s`, keys["format"], want)
			}
			j, err := bulkexport.UnmarshalStoredJob(goldenJSON)
			if err != nil {
				t.Fatalf("UnmarshalStoredJob of the golden document: %v", err)
			}
			assertJob(t, "UnmarshalStoredJob of the golden document", GoldenJob(), j)
		}},
		{"GoldenRoundTrip", func(t *testing.T, ctx context.Context, s bulkexport.JobStore) {
			// The golden job comes back from the store as it went in.
			mustCreate(t, ctx, s, GoldenJob())
			id := GoldenJob().ID
			assertJob(t, "Get of the golden job", GoldenJob(), mustGet(t, ctx, s, id))
			js, err := s.List(ctx, bulkexport.Filter{Owner: GoldenJob().Owner})
			if err != nil {
				t.Fatalf("List: %v", err)
			}
			if len(js) != 1 {
				t.Fatalf("List of the golden job's owner = %d jobs, want 1", len(js))
			}
			assertJob(t, "List of the golden job", GoldenJob(), js[0])
			// And so does a copy Update stored, with the next Version.
			j := mustGet(t, ctx, s, id)
			mustUpdate(t, ctx, s, j)
			want := GoldenJob()
			want.Version = 2
			assertJob(t, "Get of the golden job after Update", want, mustGet(t, ctx, s, id))
		}},
	}
}
