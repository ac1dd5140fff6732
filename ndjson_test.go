package bulkexport

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"unicode/utf8"

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
	// A resource with a long text, like the export benchmark's.
	long := []byte(`{"resourceType":"Observation","id":"observation-00000001","meta":{"lastUpdated":"2025-06-01T10:00:00.000Z"},"status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4","display":"Heart rate"}]},"subject":{"reference":"Patient/p-000001"},"valueQuantity":{"value":61,"unit":"/min"},"note":[{"text":"` + strings.Repeat("x", 760) + `"}]}`)
	b.Run("scanner-long", func(b *testing.B) {
		b.SetBytes(int64(len(long)))
		for i := 0; i < b.N; i++ {
			if _, _, err := checkResource(long, "Observation", nil); err != nil {
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

// refStr is the plain byte-at-a-time string scan that jsonScanner.str
// replaced, kept as an oracle: the bounds of the contents, whether they
// hold escapes, and the index after the closing quote.
func refStr(b []byte, i int) (start, end int, escaped bool, next int, ok bool) {
	i++
	start = i
	for i < len(b) {
		switch c := b[i]; {
		case c == '"':
			return start, i, escaped, i + 1, true
		case c == '\\':
			escaped = true
			if i+1 >= len(b) {
				return 0, 0, false, 0, false
			}
			switch b[i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				i += 2
			case 'u':
				if i+6 > len(b) || !isHex(b[i+2]) || !isHex(b[i+3]) || !isHex(b[i+4]) || !isHex(b[i+5]) {
					return 0, 0, false, 0, false
				}
				i += 6
			default:
				return 0, 0, false, 0, false
			}
		case c < 0x20:
			return 0, 0, false, 0, false
		default:
			i++
		}
	}
	return 0, 0, false, 0, false
}

// FuzzScanString checks the word-at-a-time string scan against refStr,
// and its UTF-8 verdict against utf8.Valid.
func FuzzScanString(f *testing.F) {
	f.Add([]byte(`"plain ascii string that is longer than sixteen bytes"`))
	f.Add([]byte(`"caf\u00e9 é \"q\" \\ \/ \n"`))
	f.Add([]byte("\"bad \xff utf8 in a long enough string\""))
	f.Add([]byte("\"surrogate \xed\xa0\x80 and truncated \xe2\x82\""))
	f.Add([]byte("\"control \x01 byte\""))
	f.Add([]byte(`"unterminated`))
	f.Fuzz(func(t *testing.T, in []byte) {
		b := append([]byte{'"'}, in...)
		s := jsonScanner{b: b}
		start, end, esc, ok := s.str()
		rs, re, resc, rnext, rok := refStr(b, 0)
		if ok != rok {
			t.Fatalf("%q: ok %v, want %v", b, ok, rok)
		}
		if !ok {
			return
		}
		if start != rs || end != re || esc != resc || s.i != rnext {
			t.Fatalf("%q: got %d %d %v %d, want %d %d %v %d", b, start, end, esc, s.i, rs, re, resc, rnext)
		}
		if s.badUTF8 == utf8.Valid(b[start:end]) {
			t.Fatalf("%q: badUTF8 %v", b, s.badUTF8)
		}
	})
}

// FuzzCheckResourceVsJSON checks checkResource's verdict against
// encoding/json: a resource json.Valid accepts is never called malformed
// (unless too deep), one it rejects is never accepted, and invalid UTF-8
// is reported as such.
func FuzzCheckResourceVsJSON(f *testing.F) {
	f.Add([]byte(sampleObservation))
	f.Add([]byte("{\"resourceType\":\"Observation\",\"id\":\"\xff\"}"))
	f.Add([]byte("{\"resourceType\":\"Observation\",\"x\":\"\xc3\xa9\"} "))
	f.Add([]byte(`{"resourceType":"Observation","a":[1,{"b":"\u12"}]}`))
	f.Fuzz(func(t *testing.T, in []byte) {
		_, _, err := checkResource(in, "Observation", nil)
		trimmed := bytes.TrimLeft(in, " \t\r\n")
		valid := json.Valid(in)
		if !valid {
			if err == nil {
				t.Fatalf("accepted invalid JSON %q", in)
			}
			return
		}
		if len(trimmed) == 0 || trimmed[0] != '{' || bytes.Count(in, []byte{'['})+bytes.Count(in, []byte{'{'}) >= maxJSONDepth {
			return
		}
		// A top-level resourceType that is not a string, or a second one,
		// is rejected as malformed on purpose.
		var m map[string]json.RawMessage
		var rt string
		if json.Unmarshal(in, &m) != nil || bytes.Count(in, []byte("resourceType")) > 1 ||
			m["resourceType"] != nil && json.Unmarshal(m["resourceType"], &rt) != nil {
			return
		}
		if err != nil && (strings.Contains(err.Error(), "malformed") || strings.Contains(err.Error(), "trailing")) {
			t.Fatalf("valid JSON %q rejected: %v", in, err)
		}
		if !utf8.Valid(in) {
			if err == nil || !strings.Contains(err.Error(), "invalid UTF-8") {
				t.Fatalf("invalid UTF-8 %q: %v", in, err)
			}
		} else if err != nil && strings.Contains(err.Error(), "invalid UTF-8") {
			t.Fatalf("valid UTF-8 %q: %v", in, err)
		}
	})
}
