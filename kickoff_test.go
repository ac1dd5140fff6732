package bulkexport

import (
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport/fhirbulk"
	"github.com/stretchr/testify/require"
)

// testKickoffConfig is the host configuration the parsing tables run
// against: a handful of exported types, one associated-data code, output
// organised by Patient, and a _typeFilter checker that refuses one search
// parameter.
var testKickoffConfig = kickoffConfig{
	types:      []string{"Patient", "Observation", "Condition", "Encounter", "Provenance"},
	associated: []string{AssociatedLatestProvenance},
	organizeBy: []string{"Patient"},
	checkFilter: func(typ string, q url.Values) error {
		if q.Has("unsupported-param") {
			return errors.New("search parameter unsupported-param is not supported")
		}
		return nil
	},
}

// kickoffCase is one row of a parameter table. The request goes through
// the same steps as the handler's: parsePrefer, readKickoffParams,
// parseKickoff.
type kickoffCase struct {
	name   string
	level  fhirbulk.Level // default LevelSystem
	method string         // default GET
	query  string         // raw query string
	body   string         // POST Parameters body
	prefer string         // added to "Prefer: respond-async", e.g. "handling=lenient"
	cfg    *kickoffConfig

	// An error is expected when errStatus or errParam is set. errParam is
	// the parameter the OperationOutcome's expression must name.
	errStatus int // default 400
	errParam  string
	errCode   fhirbulk.IssueType

	// ignored lists, for an accepted request, the expression of every
	// Ignored issue (any order).
	ignored []string
	check   func(t *testing.T, r Request)
}

const lenient = "handling=lenient"

func (c kickoffCase) parse(t *testing.T) (Request, error) {
	t.Helper()
	method := c.method
	if method == "" {
		method = http.MethodGet
	}
	level := c.level
	if level == "" {
		level = fhirbulk.LevelSystem
	}
	target := "http://example.org/fhir/$export"
	if c.query != "" {
		target += "?" + c.query
	}
	var body io.Reader
	if c.body != "" {
		body = strings.NewReader(c.body)
	}
	r := httptest.NewRequest(method, target, body)
	if method == http.MethodPost {
		r.Header.Set("Content-Type", "application/fhir+json")
	}
	r.Header.Set("Prefer", "respond-async")
	if c.prefer != "" {
		r.Header.Add("Prefer", c.prefer)
	}
	prefs := parsePrefer(r.Header)
	require.True(t, prefs.respondAsync)
	raw, err := readKickoffParams(r, 1<<20)
	if err != nil {
		return Request{}, err
	}
	cfg := testKickoffConfig
	if c.cfg != nil {
		cfg = *c.cfg
	}
	return parseKickoff(raw, method, level, prefs.lenient, cfg)
}

func runKickoffCases(t *testing.T, cases []kickoffCase) {
	t.Helper()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			req, err := c.parse(t)
			if c.errStatus != 0 || c.errParam != "" {
				require.Error(t, err)
				wantStatus := c.errStatus
				if wantStatus == 0 {
					wantStatus = http.StatusBadRequest
				}
				status, oo := DefaultErrorMapper(err)
				require.Equal(t, wantStatus, status, "error: %v", err)
				require.Equal(t, "OperationOutcome", oo.ResourceType)
				require.Len(t, oo.Issue, 1)
				require.Equal(t, fhirbulk.SeverityError, oo.Issue[0].Severity)
				require.NotEmpty(t, oo.Issue[0].Diagnostics)
				if c.errParam != "" {
					require.Equal(t, []string{c.errParam}, oo.Issue[0].Expression)
					require.True(t, strings.HasPrefix(oo.Issue[0].Diagnostics, c.errParam+": "), oo.Issue[0].Diagnostics)
				}
				if c.errCode != "" {
					require.Equal(t, c.errCode, oo.Issue[0].Code)
				}
				return
			}
			require.NoError(t, err)
			require.Equal(t, c.prefer == lenient, req.Lenient)
			var got []string
			for _, is := range req.Ignored {
				require.Equal(t, fhirbulk.SeverityWarning, is.Severity)
				require.Len(t, is.Expression, 1)
				require.Contains(t, is.Diagnostics, "handling=lenient")
				got = append(got, is.Expression[0])
			}
			require.ElementsMatch(t, c.ignored, got)
			if c.check != nil {
				c.check(t, req)
			}
		})
	}
}

// parametersBody builds a Parameters resource from "name", valueJSON pairs,
// each value being the JSON of one "valueX": ... member (without braces).
func parametersBody(pairs ...string) string {
	var b strings.Builder
	b.WriteString(`{"resourceType":"Parameters","parameter":[`)
	for i := 0; i+1 < len(pairs); i += 2 {
		if i > 0 {
			b.WriteString(",")
		}
		b.WriteString(`{"name":"` + pairs[i] + `",` + pairs[i+1] + `}`)
	}
	b.WriteString("]}")
	return b.String()
}

func TestKickoffOutputFormat(t *testing.T) {
	t.Parallel()
	ndjson := func(t *testing.T, r Request) { require.Equal(t, FormatNDJSON, r.OutputFormat) }
	runKickoffCases(t, []kickoffCase{
		{name: "absent/default", check: ndjson},
		{name: "valid/application-fhir-ndjson-encoded", query: "_outputFormat=application%2Ffhir%2Bndjson", check: ndjson},
		{name: "valid/application-fhir-ndjson-plus-as-space", query: "_outputFormat=application/fhir+ndjson", check: ndjson},
		{name: "valid/application-ndjson", query: "_outputFormat=application/ndjson", check: ndjson},
		{name: "valid/ndjson", query: "_outputFormat=ndjson", check: ndjson},
		{name: "valid/post-valueString", method: http.MethodPost,
			body: parametersBody("_outputFormat", `"valueString":"application/fhir+ndjson"`), check: ndjson},
		{name: "invalid/csv", query: "_outputFormat=text/csv", errParam: "_outputFormat", errCode: fhirbulk.IssueNotSupported},
		{name: "invalid/empty", query: "_outputFormat=", errParam: "_outputFormat", errCode: fhirbulk.IssueNotSupported},
		{name: "invalid/case", query: "_outputFormat=NDJSON", errParam: "_outputFormat", errCode: fhirbulk.IssueNotSupported},
		{name: "lenient/csv", query: "_outputFormat=text/csv", prefer: lenient, ignored: []string{"_outputFormat"}, check: ndjson},
	})
}

func TestKickoffSince(t *testing.T) {
	t.Parallel()
	since := func(want time.Time) func(*testing.T, Request) {
		return func(t *testing.T, r Request) {
			require.True(t, want.Equal(r.Since), "since %v, want %v", r.Since, want)
			require.True(t, r.Until.IsZero())
		}
	}
	at := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
	runKickoffCases(t, []kickoffCase{
		{name: "valid/utc", query: "_since=2024-01-02T03:04:05Z", check: since(at)},
		{name: "valid/fraction", query: "_since=2024-01-02T03:04:05.123Z", check: since(at.Add(123 * time.Millisecond))},
		{name: "valid/offset-encoded", query: "_since=2024-01-02T05:04:05%2B02:00", check: since(at)},
		{name: "valid/offset-plus-as-space", query: "_since=2024-01-02T05:04:05+02:00", check: since(at)},
		{name: "valid/negative-offset", query: "_since=2024-01-01T22:04:05-05:00", check: since(at)},
		{name: "valid/post-valueInstant", method: http.MethodPost,
			body: parametersBody("_since", `"valueInstant":"2024-01-02T03:04:05Z"`), check: since(at)},
		{name: "invalid/date-only", query: "_since=2024-01-02", errParam: "_since", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/no-zone", query: "_since=2024-01-02T03:04:05", errParam: "_since", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/word", query: "_since=yesterday", errParam: "_since", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/month-13", query: "_since=2024-13-02T03:04:05Z", errParam: "_since", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/long", query: "_since=" + strings.Repeat("2", 100), errParam: "_since", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/repeated", query: "_since=2024-01-02T03:04:05Z&_since=2024-01-03T03:04:05Z", errParam: "_since", errCode: fhirbulk.IssueInvalid},
		{name: "lenient/word", query: "_since=yesterday", prefer: lenient, ignored: []string{"_since"}, check: since(time.Time{})},
		{name: "lenient/repeated", query: "_since=2024-01-02T03:04:05Z&_since=2024-01-03T03:04:05Z", prefer: lenient,
			ignored: []string{"_since"}, check: since(time.Time{})},
	})
}

func TestKickoffUntil(t *testing.T) {
	t.Parallel()
	until := func(want time.Time) func(*testing.T, Request) {
		return func(t *testing.T, r Request) {
			require.True(t, want.Equal(r.Until), "until %v, want %v", r.Until, want)
		}
	}
	at := time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)
	runKickoffCases(t, []kickoffCase{
		{name: "valid/utc", query: "_until=2024-01-02T03:04:05Z", check: until(at)},
		{name: "valid/plus-as-space", query: "_until=2024-01-02T04:04:05+01:00", check: until(at)},
		{name: "valid/plus-encoded", query: "_until=2024-01-02T04:04:05%2B01:00", check: until(at)},
		{name: "valid/after-since", query: "_since=2024-01-01T00:00:00Z&_until=2024-01-02T03:04:05Z", check: func(t *testing.T, r Request) {
			require.True(t, r.Since.Equal(time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC)))
			require.True(t, r.Until.Equal(at))
		}},
		{name: "invalid/no-seconds", query: "_until=2024-01-02T03:04Z", errParam: "_until", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/space-not-offset", query: "_until=2024-01-02%2003:04:05Z", errParam: "_until", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/before-since", query: "_since=2024-02-01T00:00:00Z&_until=2024-01-01T00:00:00Z",
			errParam: "_until", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/equal-to-since", query: "_since=2024-01-02T03:04:05Z&_until=2024-01-02T04:04:05+01:00",
			errParam: "_until", errCode: fhirbulk.IssueInvalid},
		{name: "lenient/garbage", query: "_until=soon", prefer: lenient, ignored: []string{"_until"}, check: until(time.Time{})},
		{name: "lenient/before-since", query: "_since=2024-02-01T00:00:00Z&_until=2024-01-01T00:00:00Z", prefer: lenient,
			ignored: []string{"_until"}, check: func(t *testing.T, r Request) {
				require.True(t, r.Since.Equal(time.Date(2024, 2, 1, 0, 0, 0, 0, time.UTC)), "_since is kept")
				require.True(t, r.Until.IsZero(), "_until is dropped")
			}},
	})
}

func TestKickoffType(t *testing.T) {
	t.Parallel()
	types := func(want ...string) func(*testing.T, Request) {
		return func(t *testing.T, r Request) { require.Equal(t, want, r.Types) }
	}
	many := strings.TrimSuffix(strings.Repeat("Patient,", 1001), ",")
	runKickoffCases(t, []kickoffCase{
		{name: "absent/every-type", check: func(t *testing.T, r Request) {
			require.Empty(t, r.Types)
			require.True(t, r.WantsType("Observation"))
		}},
		{name: "valid/comma-list", query: "_type=Patient,Observation", check: types("Patient", "Observation")},
		{name: "valid/repeats-merged-deduplicated", query: "_type=Patient&_type=Observation,Patient&_type=Condition",
			check: types("Patient", "Observation", "Condition")},
		{name: "valid/spaces-trimmed", query: "_type=%20Patient%20,%20Observation", check: types("Patient", "Observation")},
		{name: "valid/post-repeated-entries", method: http.MethodPost,
			body:  parametersBody("_type", `"valueString":"Patient,Observation"`, "_type", `"valueCode":"Condition"`, "_type", `"valueString":"Patient"`),
			check: types("Patient", "Observation", "Condition")},
		{name: "valid/any-type-without-lister", query: "_type=Medication", cfg: &kickoffConfig{}, check: types("Medication")},
		{name: "invalid/lowercase", query: "_type=patient", errParam: "_type", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/not-exported", query: "_type=Patient,Medication", errParam: "_type", errCode: fhirbulk.IssueNotSupported},
		{name: "invalid/empty-entry", query: "_type=Patient,,Observation", errParam: "_type", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/trailing-comma", query: "_type=Patient,", errParam: "_type", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/empty", query: "_type=", errParam: "_type", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/too-many", query: "_type=" + many, errParam: "_type", errCode: fhirbulk.IssueTooCostly},
		{name: "lenient/unknown-type-dropped", query: "_type=Patient,Medication,Observation", prefer: lenient,
			ignored: []string{"_type"}, check: types("Patient", "Observation")},
		{name: "lenient/two-dropped-two-issues", query: "_type=Medication,Patient,Device", prefer: lenient,
			ignored: []string{"_type", "_type"}, check: types("Patient")},
		// Dropping every listed type would widen the export to all types:
		// refused even under lenient handling.
		{name: "lenient/all-dropped-refused", query: "_type=Medication", prefer: lenient, errParam: "_type", errCode: fhirbulk.IssueNotSupported},
		{name: "lenient/empty-entry-refused", query: "_type=Patient,,Observation", prefer: lenient, errParam: "_type", errCode: fhirbulk.IssueInvalid},
		{name: "lenient/too-many-refused", query: "_type=" + many, prefer: lenient, errParam: "_type", errCode: fhirbulk.IssueTooCostly},
	})
}

func TestKickoffElements(t *testing.T) {
	t.Parallel()
	elements := func(want ...string) func(*testing.T, Request) {
		return func(t *testing.T, r Request) { require.Equal(t, want, r.Elements) }
	}
	runKickoffCases(t, []kickoffCase{
		{name: "valid/typed-and-untyped", query: "_elements=id,Patient.name,Observation.value[x]",
			check: func(t *testing.T, r Request) {
				require.Equal(t, []string{"id", "Patient.name", "Observation.value[x]"}, r.Elements)
				require.Equal(t, []string{"id", "name"}, r.ElementsFor("Patient"))
				require.Equal(t, []string{"id"}, r.ElementsFor("Condition"))
			}},
		{name: "valid/repeats-merged-deduplicated", query: "_elements=id&_elements=id,meta", check: elements("id", "meta")},
		{name: "invalid/nested", query: "_elements=Patient.name.given", errParam: "_elements", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/uppercase-element", query: "_elements=Name", errParam: "_elements", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/lowercase-type", query: "_elements=patient.name", errParam: "_elements", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/type-not-exported", query: "_elements=Medication.code", errParam: "_elements", errCode: fhirbulk.IssueNotSupported},
		{name: "invalid/empty-entry", query: "_elements=id,", errParam: "_elements", errCode: fhirbulk.IssueInvalid},
		{name: "lenient/bad-entry-dropped", query: "_elements=id,Patient.name.given", prefer: lenient,
			ignored: []string{"_elements"}, check: elements("id")},
		{name: "lenient/empty-entry-drops-parameter", query: "_elements=id,,meta", prefer: lenient,
			ignored: []string{"_elements"}, check: func(t *testing.T, r Request) { require.Empty(t, r.Elements) }},
	})
}

func TestKickoffIncludeAssociatedData(t *testing.T) {
	t.Parallel()
	assoc := func(want ...string) func(*testing.T, Request) {
		return func(t *testing.T, r Request) { require.Equal(t, want, r.IncludeAssociatedData) }
	}
	runKickoffCases(t, []kickoffCase{
		{name: "valid/latest", query: "includeAssociatedData=LatestProvenanceResources", check: assoc(AssociatedLatestProvenance)},
		{name: "valid/repeat-deduplicated", query: "includeAssociatedData=LatestProvenanceResources&includeAssociatedData=LatestProvenanceResources",
			check: assoc(AssociatedLatestProvenance)},
		{name: "valid/post-valueCoding", method: http.MethodPost,
			body:  parametersBody("includeAssociatedData", `"valueCoding":{"system":"http://hl7.org/fhir/uv/bulkdata/CodeSystem/include-associated-data","code":"LatestProvenanceResources"}`),
			check: assoc(AssociatedLatestProvenance)},
		{name: "invalid/unsupported-code", query: "includeAssociatedData=RelevantProvenanceResources",
			errParam: "includeAssociatedData", errCode: fhirbulk.IssueNotSupported},
		{name: "invalid/custom", query: "includeAssociatedData=_custom", errParam: "includeAssociatedData", errCode: fhirbulk.IssueNotSupported},
		{name: "invalid/none-configured", query: "includeAssociatedData=LatestProvenanceResources", cfg: &kickoffConfig{},
			errParam: "includeAssociatedData", errCode: fhirbulk.IssueNotSupported},
		{name: "lenient/unsupported-dropped", query: "includeAssociatedData=LatestProvenanceResources,RelevantProvenanceResources",
			prefer: lenient, ignored: []string{"includeAssociatedData"}, check: assoc(AssociatedLatestProvenance)},
	})
}

func TestKickoffOrganizeOutputBy(t *testing.T) {
	t.Parallel()
	runKickoffCases(t, []kickoffCase{
		{name: "valid/patient", query: "organizeOutputBy=Patient", check: func(t *testing.T, r Request) {
			require.Equal(t, "Patient", r.OrganizeOutputBy)
		}},
		{name: "invalid/unsupported-type", query: "organizeOutputBy=Observation", errParam: "organizeOutputBy", errCode: fhirbulk.IssueNotSupported},
		{name: "invalid/not-a-type", query: "organizeOutputBy=patient", errParam: "organizeOutputBy", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/repeated", query: "organizeOutputBy=Patient&organizeOutputBy=Patient", errParam: "organizeOutputBy", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/not-configured", query: "organizeOutputBy=Patient", cfg: &kickoffConfig{},
			errParam: "organizeOutputBy", errCode: fhirbulk.IssueNotSupported},
		{name: "lenient/unsupported", query: "organizeOutputBy=Observation", prefer: lenient,
			ignored: []string{"organizeOutputBy"}, check: func(t *testing.T, r Request) { require.Empty(t, r.OrganizeOutputBy) }},
	})
}

func TestKickoffAllowPartialManifests(t *testing.T) {
	t.Parallel()
	partial := func(want bool) func(*testing.T, Request) {
		return func(t *testing.T, r Request) { require.Equal(t, want, r.AllowPartialManifests) }
	}
	runKickoffCases(t, []kickoffCase{
		{name: "valid/true", query: "allowPartialManifests=true", check: partial(true)},
		{name: "valid/false", query: "allowPartialManifests=false", check: partial(false)},
		{name: "valid/post-valueBoolean", method: http.MethodPost,
			body: parametersBody("allowPartialManifests", `"valueBoolean":true`), check: partial(true)},
		{name: "invalid/yes", query: "allowPartialManifests=yes", errParam: "allowPartialManifests", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/1", query: "allowPartialManifests=1", errParam: "allowPartialManifests", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/uppercase", query: "allowPartialManifests=TRUE", errParam: "allowPartialManifests", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/repeated", query: "allowPartialManifests=true&allowPartialManifests=true", errParam: "allowPartialManifests", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/post-boolean-as-string", method: http.MethodPost,
			body: parametersBody("allowPartialManifests", `"valueBoolean":"true"`), errParam: "allowPartialManifests", errCode: fhirbulk.IssueInvalid},
		{name: "lenient/yes", query: "allowPartialManifests=yes", prefer: lenient,
			ignored: []string{"allowPartialManifests"}, check: partial(false)},
	})
}

func TestKickoffPatient(t *testing.T) {
	t.Parallel()
	patients := func(want ...string) func(*testing.T, Request) {
		return func(t *testing.T, r Request) { require.Equal(t, want, r.Patients) }
	}
	ref := func(id string) string { return `"valueReference":{"reference":"` + id + `"}` }
	post := http.MethodPost
	runKickoffCases(t, []kickoffCase{
		{name: "valid/patient-level", method: post, level: fhirbulk.LevelPatient,
			body:  parametersBody("patient", ref("Patient/123"), "patient", ref("Patient/abc-1.x"), "patient", ref("Patient/123")),
			check: patients("123", "abc-1.x")},
		{name: "valid/group-level", method: post, level: fhirbulk.LevelGroup,
			body: parametersBody("patient", ref("Patient/7")), check: patients("7")},
		{name: "invalid/get", level: fhirbulk.LevelPatient, query: "patient=Patient/123", errParam: "patient", errCode: fhirbulk.IssueNotSupported},
		{name: "invalid/system-level", method: post, level: fhirbulk.LevelSystem,
			body: parametersBody("patient", ref("Patient/123")), errParam: "patient", errCode: fhirbulk.IssueNotSupported},
		{name: "invalid/other-type", method: post, level: fhirbulk.LevelPatient,
			body: parametersBody("patient", ref("Observation/1")), errParam: "patient", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/no-id", method: post, level: fhirbulk.LevelPatient,
			body: parametersBody("patient", ref("Patient/")), errParam: "patient", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/bad-id", method: post, level: fhirbulk.LevelPatient,
			body: parametersBody("patient", ref("Patient/a b")), errParam: "patient", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/absolute-url", method: post, level: fhirbulk.LevelPatient,
			body: parametersBody("patient", ref("http://other.example/fhir/Patient/1")), errParam: "patient", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/empty-reference", method: post, level: fhirbulk.LevelPatient,
			body: parametersBody("patient", `"valueReference":{}`), errParam: "patient", errCode: fhirbulk.IssueInvalid},
		{name: "lenient/system-level", method: post, level: fhirbulk.LevelSystem, prefer: lenient,
			body: parametersBody("patient", ref("Patient/123")), ignored: []string{"patient"}, check: patients()},
		{name: "lenient/get", level: fhirbulk.LevelGroup, query: "patient=Patient/123", prefer: lenient,
			ignored: []string{"patient"}, check: patients()},
		{name: "lenient/bad-reference-dropped", method: post, level: fhirbulk.LevelPatient, prefer: lenient,
			body:    parametersBody("patient", ref("Observation/1"), "patient", ref("Patient/9")),
			ignored: []string{"patient"}, check: patients("9")},
		// Dropping every reference would widen the export to all patients.
		{name: "lenient/only-bad-references", method: post, level: fhirbulk.LevelPatient, prefer: lenient,
			body: parametersBody("patient", ref("Observation/1")), errParam: "patient", errCode: fhirbulk.IssueInvalid},
	})
}

func TestKickoffTypeFilter(t *testing.T) {
	t.Parallel()
	filters := func(want ...string) func(*testing.T, Request) {
		return func(t *testing.T, r Request) {
			var got []string
			for _, f := range r.TypeFilters {
				got = append(got, f.String())
			}
			require.Equal(t, want, got)
		}
	}
	cases := []kickoffCase{
		{name: "valid/one", query: "_typeFilter=Observation%3Fcode%3D1234", check: filters("Observation?code=1234")},
		{name: "valid/encoded-query", query: "_typeFilter=Observation%3Fcode%3Dhttp%253A%252F%252Floinc.org%257C1234",
			check: func(t *testing.T, r Request) {
				require.Len(t, r.TypeFilters, 1)
				require.Equal(t, "http://loinc.org|1234", r.TypeFilters[0].Values().Get("code"))
			}},
		{name: "valid/repeats-are-ored", query: "_typeFilter=Observation%3Fstatus%3Dfinal&_typeFilter=Observation%3Fstatus%3Damended",
			check: func(t *testing.T, r Request) {
				filters("Observation?status=final", "Observation?status=amended")(t, r)
				require.Len(t, r.FiltersFor("Observation"), 2)
				require.Empty(t, r.FiltersFor("Patient"))
			}},
		{name: "valid/type-among-_type", query: "_type=Observation,Patient&_typeFilter=Observation%3Fcode%3D1",
			check: filters("Observation?code=1")},
		{name: "valid/stu2-comma-joined", query: "_typeFilter=Observation%3Fstatus%3Dfinal,Condition%3Fclinical-status%3Dactive",
			check: filters("Observation?status=final", "Condition?clinical-status=active")},
		{name: "valid/comma-inside-value", query: "_typeFilter=Observation%3Fcode%3Da,b", check: filters("Observation?code=a,b")},
		{name: "valid/comma-then-lowercase", query: "_typeFilter=Observation%3Fcode%3Da,bcd%3Fx", check: filters("Observation?code=a,bcd?x")},
		{name: "valid/post", method: http.MethodPost,
			body:  parametersBody("_typeFilter", `"valueString":"Observation?code=1"`, "_typeFilter", `"valueString":"Condition?code=2"`),
			check: filters("Observation?code=1", "Condition?code=2")},
		{name: "invalid/no-query", query: "_typeFilter=Observation", errParam: "_typeFilter", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/empty-query", query: "_typeFilter=Observation%3F", errParam: "_typeFilter", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/no-type", query: "_typeFilter=%3Fcode%3D1", errParam: "_typeFilter", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/lowercase-type", query: "_typeFilter=observation%3Fcode%3D1", errParam: "_typeFilter", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/bad-escape", query: "_typeFilter=Observation%3Fcode%3D%25zz", errParam: "_typeFilter", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/type-not-among-_type", query: "_type=Patient&_typeFilter=Observation%3Fcode%3D1",
			errParam: "_typeFilter", errCode: fhirbulk.IssueInvalid},
		// The value is clean, but its search query decodes to NUL or
		// invalid UTF-8: refused like the same bytes one level up.
		{name: "invalid/encoded-nul-value", query: "_typeFilter=Patient%3Fgender%3D%2500", errParam: "_typeFilter", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/encoded-nul-name", query: "_typeFilter=Patient%3Fgen%2500der%3Dmale", errParam: "_typeFilter", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/encoded-invalid-utf8", query: "_typeFilter=Patient%3Fname%3D%25FF", errParam: "_typeFilter", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/encoded-overlong", query: "_typeFilter=Patient%3Fname%3D%25C0%25AF", errParam: "_typeFilter", errCode: fhirbulk.IssueInvalid},
		{name: "invalid/encoded-nul-post", method: http.MethodPost, level: fhirbulk.LevelPatient,
			body: parametersBody("_typeFilter", `"valueString":"Patient?gender=%00"`), errParam: "_typeFilter", errCode: fhirbulk.IssueInvalid},
		{name: "lenient/encoded-nul-dropped", query: "_typeFilter=Patient%3Fgender%3D%2500&_typeFilter=Observation%3Fcode%3D1",
			prefer: lenient, ignored: []string{"_typeFilter"}, check: filters("Observation?code=1")},
		{name: "invalid/type-not-exported", query: "_typeFilter=Medication%3Fcode%3D1", errParam: "_typeFilter", errCode: fhirbulk.IssueNotSupported},
		{name: "invalid/host-refuses", query: "_typeFilter=Observation%3Funsupported-param%3D1", errParam: "_typeFilter", errCode: fhirbulk.IssueNotSupported},
		{name: "invalid/stu2-one-bad-part", query: "_typeFilter=Observation%3Fstatus%3Dfinal,Condition%3F_sort%3Ddate",
			errParam: "_typeFilter", errCode: fhirbulk.IssueNotSupported},
		{name: "lenient/bad-value-dropped", query: "_typeFilter=Observation%3Fcode%3D1&_typeFilter=Observation%3F_sort%3Ddate",
			prefer: lenient, ignored: []string{"_typeFilter"}, check: filters("Observation?code=1")},
		{name: "lenient/type-not-among-_type", query: "_type=Patient&_typeFilter=Observation%3Fcode%3D1",
			prefer: lenient, ignored: []string{"_typeFilter"}, check: filters()},
	}
	// Search result parameters SHALL NOT appear in a _typeFilter.
	for _, p := range []string{"_include", "_revinclude", "_sort", "_elements", "_count", "_summary", "_total", "_contained", "_containedType"} {
		cases = append(cases, kickoffCase{
			name:  "invalid/forbidden-" + p,
			query: "_typeFilter=" + url.QueryEscape("Observation?code=1&"+p+"=x"), errParam: "_typeFilter", errCode: fhirbulk.IssueNotSupported,
		})
	}
	runKickoffCases(t, cases)
}

func TestKickoffFormat(t *testing.T) {
	t.Parallel()
	runKickoffCases(t, []kickoffCase{
		{name: "valid/json", query: "_format=json"},
		{name: "valid/fhir-json-encoded", query: "_format=application%2Ffhir%2Bjson"},
		{name: "valid/fhir-json-plus-as-space", query: "_format=application/fhir+json"},
		{name: "valid/application-json", query: "_format=application/json"},
		{name: "valid/post-query", method: http.MethodPost, query: "_format=json"},
		{name: "invalid/xml", query: "_format=xml", errStatus: http.StatusNotAcceptable, errParam: "_format", errCode: fhirbulk.IssueNotSupported},
		// A response format cannot be ignored: the answer would be in the
		// wrong format.
		{name: "lenient/xml-still-refused", query: "_format=xml", prefer: lenient,
			errStatus: http.StatusNotAcceptable, errParam: "_format", errCode: fhirbulk.IssueNotSupported},
	})
}

func TestKickoffUnknownAndRepeated(t *testing.T) {
	t.Parallel()
	runKickoffCases(t, []kickoffCase{
		{name: "unknown/foo", query: "foo=bar", errParam: "foo", errCode: fhirbulk.IssueNotSupported},
		{name: "unknown/_include", query: "_include=Patient:organization", errParam: "_include", errCode: fhirbulk.IssueNotSupported},
		{name: "unknown/_sort", query: "_sort=date", errParam: "_sort", errCode: fhirbulk.IssueNotSupported},
		{name: "unknown/_count", query: "_count=10", errParam: "_count", errCode: fhirbulk.IssueNotSupported},
		{name: "unknown/hapi-_exportId", query: "_exportId=abc", errParam: "_exportId", errCode: fhirbulk.IssueNotSupported},
		{name: "unknown/case-matters", query: "_Type=Patient", errParam: "_Type", errCode: fhirbulk.IssueNotSupported},
		{name: "unknown/post", method: http.MethodPost, body: parametersBody("_mdm", `"valueBoolean":true`),
			errParam: "_mdm", errCode: fhirbulk.IssueNotSupported},
		{name: "unknown/lenient", query: "foo=bar&_count=10&_type=Patient", prefer: lenient,
			ignored: []string{"_count", "foo"}, check: func(t *testing.T, r Request) { require.Equal(t, []string{"Patient"}, r.Types) }},
		{name: "repeated/_outputFormat", query: "_outputFormat=ndjson&_outputFormat=ndjson", errParam: "_outputFormat", errCode: fhirbulk.IssueInvalid},
		{name: "repeated/_until", query: "_until=2024-01-02T03:04:05Z&_until=2024-01-02T03:04:05Z", errParam: "_until", errCode: fhirbulk.IssueInvalid},
		{name: "repeated/_format", query: "_format=json&_format=json", errParam: "_format", errCode: fhirbulk.IssueInvalid},
		{name: "repeated/post", method: http.MethodPost,
			body:     parametersBody("_outputFormat", `"valueString":"ndjson"`, "_outputFormat", `"valueString":"ndjson"`),
			errParam: "_outputFormat", errCode: fhirbulk.IssueInvalid},
		{name: "repeated/post-body-and-query-_format", method: http.MethodPost, query: "_format=json",
			body: parametersBody("_format", `"valueString":"json"`), errParam: "_format", errCode: fhirbulk.IssueInvalid},
		{name: "repeated/lenient", query: "_outputFormat=ndjson&_outputFormat=ndjson", prefer: lenient, ignored: []string{"_outputFormat"}},
		{name: "lenient/one-issue-per-parameter", prefer: lenient,
			query:   "foo=1&_outputFormat=text/csv&_since=bad&_until=bad&organizeOutputBy=Observation&allowPartialManifests=maybe",
			ignored: []string{"foo", "_outputFormat", "_since", "_until", "organizeOutputBy", "allowPartialManifests"},
			check: func(t *testing.T, r Request) {
				require.Equal(t, FormatNDJSON, r.OutputFormat)
				require.True(t, r.Since.IsZero())
				require.True(t, r.Until.IsZero())
			}},
		{name: "strict-overrides-nothing", query: "foo=1", prefer: "handling=strict", errParam: "foo", errCode: fhirbulk.IssueNotSupported},
	})
}

func TestKickoffRequestErrors(t *testing.T) {
	t.Parallel()
	runKickoffCases(t, []kickoffCase{
		{name: "malformed-query", query: "_type=%zz", errStatus: http.StatusBadRequest, errCode: fhirbulk.IssueInvalid},
		{name: "invalid-utf8", query: "_type=%ff", errStatus: http.StatusBadRequest, errCode: fhirbulk.IssueInvalid},
		{name: "invalid-utf8-name", query: "%ff=1", errStatus: http.StatusBadRequest, errCode: fhirbulk.IssueInvalid},
		{name: "nameless", query: "=1", errStatus: http.StatusBadRequest, errCode: fhirbulk.IssueInvalid},
		{name: "nameless-lenient", query: "_type=Patient&=", prefer: "handling=lenient", errStatus: http.StatusBadRequest, errCode: fhirbulk.IssueInvalid},
		{name: "post-query-parameter", method: http.MethodPost, query: "_type=Patient", errParam: "_type", errCode: fhirbulk.IssueInvalid},
		{name: "post-not-parameters", method: http.MethodPost, body: `{"resourceType":"Bundle"}`, errStatus: http.StatusBadRequest, errCode: fhirbulk.IssueStructure},
		{name: "post-empty-body", method: http.MethodPost, check: func(t *testing.T, r Request) {
			require.Equal(t, http.MethodPost, r.Method)
			require.Equal(t, FormatNDJSON, r.OutputFormat)
		}},
		{name: "get-method-recorded", check: func(t *testing.T, r Request) { require.Equal(t, http.MethodGet, r.Method) }},
	})

	t.Run("post-wrong-content-type", func(t *testing.T) {
		t.Parallel()
		r := httptest.NewRequest(http.MethodPost, "/fhir/$export", strings.NewReader(parametersBody()))
		r.Header.Set("Content-Type", "text/plain")
		_, err := readKickoffParams(r, 1<<20)
		status, oo := DefaultErrorMapper(err)
		require.Equal(t, http.StatusUnsupportedMediaType, status)
		require.Equal(t, fhirbulk.IssueNotSupported, oo.Issue[0].Code)
	})
	t.Run("post-json-content-type-accepted", func(t *testing.T) {
		t.Parallel()
		r := httptest.NewRequest(http.MethodPost, "/fhir/$export", strings.NewReader(parametersBody("_type", `"valueString":"Patient"`)))
		r.Header.Set("Content-Type", "application/json; charset=utf-8")
		params, err := readKickoffParams(r, 1<<20)
		require.NoError(t, err)
		require.Equal(t, []rawParam{{"_type", "Patient"}}, params)
	})
	t.Run("post-body-too-large", func(t *testing.T) {
		t.Parallel()
		r := httptest.NewRequest(http.MethodPost, "/fhir/$export", strings.NewReader(parametersBody("_type", `"valueString":"Patient"`)))
		r.Header.Set("Content-Type", "application/fhir+json")
		_, err := readKickoffParams(r, 16)
		var mbe *http.MaxBytesError
		require.ErrorAs(t, err, &mbe)
		status, oo := DefaultErrorMapper(err)
		require.Equal(t, http.StatusRequestEntityTooLarge, status)
		require.Equal(t, fhirbulk.IssueTooCostly, oo.Issue[0].Code)
	})
}

func TestParseParametersBody(t *testing.T) {
	t.Parallel()
	type want struct {
		params []rawParam
		status int // error expected when set
		code   fhirbulk.IssueType
		param  string
	}
	body := func(params string) string { return `{"resourceType":"Parameters","parameter":[` + params + `]}` }
	cases := []struct {
		name string
		body string
		want want
	}{
		{"empty-body", "", want{}},
		{"whitespace-body", " \n\t ", want{}},
		{"no-parameters", `{"resourceType":"Parameters"}`, want{params: []rawParam{}}},
		{"valueString", body(`{"name":"_type","valueString":"Patient"}`), want{params: []rawParam{{"_type", "Patient"}}}},
		{"valueCode", body(`{"name":"_outputFormat","valueCode":"ndjson"}`), want{params: []rawParam{{"_outputFormat", "ndjson"}}}},
		{"valueInstant", body(`{"name":"_since","valueInstant":"2024-01-01T00:00:00Z"}`), want{params: []rawParam{{"_since", "2024-01-01T00:00:00Z"}}}},
		{"valueDateTime", body(`{"name":"_since","valueDateTime":"2024-01-01T00:00:00Z"}`), want{params: []rawParam{{"_since", "2024-01-01T00:00:00Z"}}}},
		{"valueBoolean-true", body(`{"name":"allowPartialManifests","valueBoolean":true}`), want{params: []rawParam{{"allowPartialManifests", "true"}}}},
		{"valueBoolean-false", body(`{"name":"allowPartialManifests","valueBoolean":false}`), want{params: []rawParam{{"allowPartialManifests", "false"}}}},
		{"valueReference", body(`{"name":"patient","valueReference":{"reference":"Patient/1","display":"x"}}`), want{params: []rawParam{{"patient", "Patient/1"}}}},
		{"valueCoding", body(`{"name":"includeAssociatedData","valueCoding":{"system":"s","code":"LatestProvenanceResources"}}`),
			want{params: []rawParam{{"includeAssociatedData", "LatestProvenanceResources"}}}},
		{"id-and-extension-ignored", body(`{"id":"p1","extension":[],"modifierExtension":[],"name":"_type","valueString":"Patient"}`),
			want{params: []rawParam{{"_type", "Patient"}}}},
		{"order-kept", body(`{"name":"_type","valueString":"A"},{"name":"_since","valueString":"B"},{"name":"_type","valueString":"C"}`),
			want{params: []rawParam{{"_type", "A"}, {"_since", "B"}, {"_type", "C"}}}},
		{"missing-name", body(`{"valueString":"Patient"}`), want{status: 400, code: fhirbulk.IssueStructure}},
		{"empty-name", body(`{"name":"","valueString":"Patient"}`), want{status: 400, code: fhirbulk.IssueStructure}},
		{"name-not-string", body(`{"name":1,"valueString":"Patient"}`), want{status: 400, code: fhirbulk.IssueStructure}},
		{"null-parameter", body(`null`), want{status: 400, code: fhirbulk.IssueStructure}},
		{"no-value", body(`{"name":"_type"}`), want{status: 400, code: fhirbulk.IssueInvalid, param: "_type"}},
		{"two-values", body(`{"name":"_type","valueString":"Patient","valueCode":"Observation"}`), want{status: 400, code: fhirbulk.IssueInvalid, param: "_type"}},
		{"value-bare", body(`{"name":"_type","value":"Patient"}`), want{status: 400, code: fhirbulk.IssueInvalid, param: "_type"}},
		{"valueInteger-unsupported", body(`{"name":"_count","valueInteger":1}`), want{status: 400, code: fhirbulk.IssueInvalid, param: "_count"}},
		{"valueString-number", body(`{"name":"_type","valueString":1}`), want{status: 400, code: fhirbulk.IssueInvalid, param: "_type"}},
		{"valueString-null", body(`{"name":"_type","valueString":null}`), want{status: 400, code: fhirbulk.IssueInvalid, param: "_type"}},
		{"valueBoolean-null", body(`{"name":"allowPartialManifests","valueBoolean":null}`), want{status: 400, code: fhirbulk.IssueInvalid, param: "allowPartialManifests"}},
		{"valueBoolean-string", body(`{"name":"allowPartialManifests","valueBoolean":"true"}`), want{status: 400, code: fhirbulk.IssueInvalid, param: "allowPartialManifests"}},
		{"valueReference-no-reference", body(`{"name":"patient","valueReference":{"display":"x"}}`), want{status: 400, code: fhirbulk.IssueInvalid, param: "patient"}},
		{"valueReference-string", body(`{"name":"patient","valueReference":"Patient/1"}`), want{status: 400, code: fhirbulk.IssueInvalid, param: "patient"}},
		{"valueCoding-no-code", body(`{"name":"includeAssociatedData","valueCoding":{"system":"s"}}`), want{status: 400, code: fhirbulk.IssueInvalid, param: "includeAssociatedData"}},
		{"part", body(`{"name":"patient","part":[{"name":"x","valueString":"y"}]}`), want{status: 400, code: fhirbulk.IssueNotSupported, param: "patient"}},
		{"resource", body(`{"name":"patient","resource":{"resourceType":"Patient"}}`), want{status: 400, code: fhirbulk.IssueNotSupported, param: "patient"}},
		{"unknown-element", body(`{"name":"_type","valueString":"Patient","foo":1}`), want{status: 400, code: fhirbulk.IssueStructure}},
		{"wrong-resourceType", `{"resourceType":"Bundle","parameter":[]}`, want{status: 400, code: fhirbulk.IssueStructure}},
		{"missing-resourceType", `{"parameter":[]}`, want{status: 400, code: fhirbulk.IssueStructure}},
		{"parameter-not-array", `{"resourceType":"Parameters","parameter":{}}`, want{status: 400, code: fhirbulk.IssueStructure}},
		{"non-json", `_type=Patient`, want{status: 400, code: fhirbulk.IssueStructure}},
		{"json-array", `[]`, want{status: 400, code: fhirbulk.IssueStructure}},
		{"truncated", `{"resourceType":"Parameters","parameter":[`, want{status: 400, code: fhirbulk.IssueStructure}},
		{"invalid-utf8", "{\"resourceType\":\"Parameters\",\"parameter\":[{\"name\":\"\xff\",\"valueString\":\"x\"}]}", want{status: 400, code: fhirbulk.IssueInvalid}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			params, err := parseParametersBody([]byte(c.body))
			if c.want.status == 0 {
				require.NoError(t, err)
				require.Equal(t, c.want.params, params)
				return
			}
			require.Error(t, err)
			status, oo := DefaultErrorMapper(err)
			require.Equal(t, c.want.status, status, "error: %v", err)
			require.Equal(t, c.want.code, oo.Issue[0].Code, "error: %v", err)
			if c.want.param != "" {
				require.Equal(t, []string{c.want.param}, oo.Issue[0].Expression)
			} else {
				require.Empty(t, oo.Issue[0].Expression)
			}
		})
	}
}

func TestParsePrefer(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		headers []string
		want    preferences
	}{
		{"none", nil, preferences{}},
		{"respond-async", []string{"respond-async"}, preferences{respondAsync: true}},
		{"tokens-in-one-header", []string{"respond-async, handling=lenient"}, preferences{respondAsync: true, lenient: true}},
		{"tokens-without-space", []string{"respond-async,separate-export-status"}, preferences{respondAsync: true, separateExportStatus: true}},
		{"repeated-headers", []string{"respond-async", "handling=lenient"}, preferences{respondAsync: true, lenient: true}},
		{"case-insensitive", []string{"Respond-Async, HANDLING=Lenient"}, preferences{respondAsync: true, lenient: true}},
		{"quoted-value", []string{`respond-async, handling="lenient"`}, preferences{respondAsync: true, lenient: true}},
		{"whitespace-around-equals", []string{"handling = lenient"}, preferences{lenient: true}},
		{"preference-parameters-ignored", []string{"respond-async; wait=10, handling=lenient; x=y"}, preferences{respondAsync: true, lenient: true}},
		{"strict", []string{"respond-async, handling=strict"}, preferences{respondAsync: true}},
		{"last-handling-wins", []string{"handling=lenient", "handling=strict"}, preferences{}},
		{"strict-then-lenient", []string{"handling=strict, handling=lenient"}, preferences{lenient: true}},
		{"other-preferences", []string{"return=minimal, wait=5"}, preferences{}},
		{"prefix-is-not-token", []string{"respond-asyncx, handlingx=lenient"}, preferences{}},
		{"empty-tokens", []string{" , ,", ""}, preferences{}},
		{"unknown-handling", []string{"handling=relaxed"}, preferences{}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			h := http.Header{}
			for _, v := range c.headers {
				h.Add("Prefer", v)
			}
			require.Equal(t, c.want, parsePrefer(h))
		})
	}
}

func TestAcceptsJSON(t *testing.T) {
	t.Parallel()
	cases := []struct {
		accept string
		want   bool
	}{
		{"", true},
		{"   ", true},
		{"*/*", true},
		{"application/*", true},
		{"application/fhir+json", true},
		{"application/json", true},
		{"application/json+fhir", true},
		{"application/fhir+json; charset=utf-8; fhirVersion=4.0", true},
		{"text/html, application/fhir+json;q=0.9", true},
		{"application/json;q=0.001", true},
		{"application/json;q=0, */*;q=0.1", true},
		{"application/json;q=0", false},
		{"application/json; q=0.0", false},
		{"application/fhir+json;q=0, application/json;q=0", false},
		{"text/html", false},
		{"text/html, application/xhtml+xml", false},
		{"application/fhir+xml", false},
		{"application/fhir+ndjson", false},
		{"text/*", false},
		{"garbage;;", false},
		{",", false},
	}
	for _, c := range cases {
		t.Run(c.accept, func(t *testing.T) {
			t.Parallel()
			require.Equal(t, c.want, acceptsJSON(c.accept))
		})
	}
}
