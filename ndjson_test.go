package bulkexport

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const sampleObservation = `{"resourceType":"Observation","id":"obs-1","meta":{"lastUpdated":"2025-01-02T03:04:05.000Z"},"status":"final","category":[{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs","display":"Vital Signs"}]}],"code":{"coding":[{"system":"http://loinc.org","code":"8867-4","display":"Heart rate"}],"text":"Heart rate"},"subject":{"reference":"Patient/p-1"},"encounter":{"reference":"Encounter/e-1"},"effectiveDateTime":"2025-01-02T03:04:05Z","valueQuantity":{"value":72.5,"unit":"beats/minute","system":"http://unitsofmeasure.org","code":"/min"},"note":[{"text":"Measured at rest, \"sitting\" \u00e9"}],"interpretation":[{"coding":[{"code":"N"}]}],"referenceRange":[{"low":{"value":60},"high":{"value":100}}],"extra":[1,2,3,-4.5e10,true,false,null]}`

func TestCheckResource(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, in, typ, want string
		wantErr             bool
	}{
		{name: "single line", in: sampleObservation, typ: "Observation", want: sampleObservation},
		{name: "spaces trimmed", in: "  " + sampleObservation + " ", typ: "Observation", want: sampleObservation},
		{name: "multi-line compacted", in: "{\n  \"resourceType\": \"Patient\",\n  \"id\": \"a\"\n}\n", typ: "Patient", want: `{"resourceType":"Patient","id":"a"}`},
		{name: "escaped resourceType", in: `{"resourceType":"Pati\u0065nt"}`, typ: "Patient", want: `{"resourceType":"Pati\u0065nt"}`},
		{name: "wrong type", in: `{"resourceType":"Patient"}`, typ: "Observation", wantErr: true},
		{name: "no resourceType", in: `{"id":"x"}`, typ: "Patient", wantErr: true},
		{name: "nested resourceType only", in: `{"contained":[{"resourceType":"Patient"}]}`, typ: "Patient", wantErr: true},
		{name: "resourceType not string", in: `{"resourceType":1}`, typ: "Patient", wantErr: true},
		{name: "duplicate resourceType", in: `{"resourceType":"Patient","resourceType":"Patient"}`, typ: "Patient", wantErr: true},
		{name: "array", in: `[{"resourceType":"Patient"}]`, typ: "Patient", wantErr: true},
		{name: "two objects", in: `{"resourceType":"Patient"}{"resourceType":"Patient"}`, typ: "Patient", wantErr: true},
		{name: "two lines", in: "{\"resourceType\":\"Patient\"}\n{\"resourceType\":\"Patient\"}", typ: "Patient", wantErr: true},
		{name: "truncated", in: `{"resourceType":"Patient","id":"a`, typ: "Patient", wantErr: true},
		{name: "raw newline in string", in: "{\"resourceType\":\"Patient\",\"id\":\"a\nb\"}", typ: "Patient", wantErr: true},
		{name: "bad escape", in: `{"resourceType":"Patient","id":"\x"}`, typ: "Patient", wantErr: true},
		{name: "bad number", in: `{"resourceType":"Patient","n":01}`, typ: "Patient", wantErr: true},
		{name: "invalid utf8", in: "{\"resourceType\":\"Patient\",\"id\":\"\xff\"}", typ: "Patient", wantErr: true},
		{name: "empty", in: ``, typ: "Patient", wantErr: true},
		{name: "too deep", in: `{"resourceType":"Patient","x":` + strings.Repeat("[", 300) + strings.Repeat("]", 300) + `}`, typ: "Patient", wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, _, err := checkResource([]byte(tc.in), tc.typ, nil)
			if tc.wantErr {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tc.want, string(got))
		})
	}
}

// FuzzCheckResource checks that whatever checkResource accepts is one line
// of valid JSON, and that it accepts every valid single object with the
// right resourceType.
func FuzzCheckResource(f *testing.F) {
	f.Add([]byte(sampleObservation))
	f.Add([]byte("{\n\"resourceType\":\"Observation\"}"))
	f.Add([]byte(`{"resourceType":"Observation","a":[1,{"b":"\u12"}]}`))
	f.Add([]byte(`{"resourceType":"Observation","a":-0.5E+3}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		line, _, err := checkResource(in, "Observation", nil)
		if err != nil {
			return
		}
		if !json.Valid(line) || bytes.ContainsAny(line, "\r\n") {
			t.Fatalf("accepted %q as %q", in, line)
		}
		var m map[string]json.RawMessage
		if json.Unmarshal(line, &m) != nil {
			t.Fatalf("accepted non-object %q", in)
		}
		var rt string
		if json.Unmarshal(m["resourceType"], &rt) != nil || rt != "Observation" {
			t.Fatalf("accepted %q with resourceType %s", in, m["resourceType"])
		}
	})
}

func BenchmarkCheckResource(b *testing.B) {
	raw := []byte(sampleObservation)
	b.Run("scanner", func(b *testing.B) {
		b.SetBytes(int64(len(raw)))
		for i := 0; i < b.N; i++ {
			if _, _, err := checkResource(raw, "Observation", nil); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("json.Valid", func(b *testing.B) {
		b.SetBytes(int64(len(raw)))
		for i := 0; i < b.N; i++ {
			if !json.Valid(raw) {
				b.Fatal("invalid")
			}
		}
	})
}
