package bulkexport_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
)

func TestMarshalStoredJob(t *testing.T) {
	t.Parallel()
	j := &bulkexport.Job{ID: "j1", Owner: "o", State: bulkexport.StateQueued, Version: 3, CreatedAt: time.Date(2026, 1, 2, 3, 4, 5, 6000, time.UTC)}
	b, err := bulkexport.MarshalStoredJob(j)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(b, []byte(`{"format":1,"id":"j1",`)) {
		t.Errorf("stored form %s does not start with the format, then Job's fields", b)
	}
	plain, err := json.Marshal(j)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"format":1,` + string(plain[1:]); string(b) != want {
		t.Errorf("stored form = %s, want Job's JSON with the format first: %s", b, want)
	}
	got, err := bulkexport.UnmarshalStoredJob(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, j) {
		t.Errorf("round trip = %+v, want %+v", got, j)
	}
	if _, err := bulkexport.MarshalStoredJob(nil); err == nil {
		t.Error("MarshalStoredJob(nil) succeeded")
	}
}

// TestStoredJobFormatKey: "format" is the stored form's own key; a Job
// field with that JSON name would be shadowed by it and lost.
func TestStoredJobFormatKey(t *testing.T) {
	t.Parallel()
	var walk func(reflect.Type)
	walk = func(typ reflect.Type) {
		for i := range typ.NumField() {
			f := typ.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name == "" {
				name = f.Name
			}
			if f.Anonymous && f.Type.Kind() == reflect.Struct {
				walk(f.Type)
				continue
			}
			if strings.EqualFold(name, "format") {
				t.Errorf("Job field %s has the JSON name %q, which the stored form uses for its format version", f.Name, name)
			}
		}
	}
	walk(reflect.TypeOf(bulkexport.Job{}))
}

func TestUnmarshalStoredJobFormats(t *testing.T) {
	t.Parallel()
	// No format: a job stored before the key existed reads as format 1.
	j, err := bulkexport.UnmarshalStoredJob([]byte(`{"id":"j1","owner":"o","state":"queued","version":2}`))
	if err != nil || j.ID != "j1" || j.Version != 2 {
		t.Fatalf("a document without format = %+v, %v; want job j1", j, err)
	}
	if _, err := bulkexport.UnmarshalStoredJob([]byte(`{"format":1,"id":"j1"}`)); err != nil {
		t.Fatalf("format 1: %v", err)
	}
	for _, doc := range []string{
		`{"format":2,"id":"j1","state":"queued"}`,
		// A newer format's document need not fit this release's Job: the
		// error is about the format, not the misfit.
		`{"id":"j1","request":["a newer shape"],"format":2,"version":"two"}`,
	} {
		_, err := bulkexport.UnmarshalStoredJob([]byte(doc))
		if !errors.Is(err, bulkexport.ErrUnknownJobFormat) || !strings.Contains(err.Error(), "format 2") {
			t.Errorf("UnmarshalStoredJob(%s) = %v, want ErrUnknownJobFormat naming format 2", doc, err)
		}
	}
	for _, doc := range []string{`{"format":0}`, `{"format":-1}`} {
		if _, err := bulkexport.UnmarshalStoredJob([]byte(doc)); !errors.Is(err, bulkexport.ErrUnknownJobFormat) {
			t.Errorf("UnmarshalStoredJob(%s) = %v, want ErrUnknownJobFormat", doc, err)
		}
	}
	for _, doc := range []string{`{"format":"1"}`, `{"format":1.5}`, `{"format":1,"version":"x"}`, `{`, `[]`, ``} {
		if _, err := bulkexport.UnmarshalStoredJob([]byte(doc)); err == nil {
			t.Errorf("UnmarshalStoredJob(%q) succeeded, want an error", doc)
		}
	}
}
