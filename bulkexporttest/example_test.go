package bulkexporttest_test

import (
	"context"
	"fmt"
	"log"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// A test starts the server with NewServer(t, opts), which shuts it down
// when the test ends, and runs exports with the helpers that fail the test
// on anything unexpected:
//
//	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: src})
//	res := srv.Export(t, "/Patient/$export?_type=Patient,Observation")
//	if got := res.IDs("Observation"); len(got) != 2 { t.Errorf(...) }
//
// An Example has no testing.TB, so this one uses the same server from
// StartServer and ExportContext, which return errors instead.
func ExampleNewServer() {
	src := bulkexporttest.NewSource().MustAdd(
		`{"resourceType":"Patient","id":"p1","meta":{"lastUpdated":"2025-01-01T00:00:00Z"}}`,
		`{"resourceType":"Patient","id":"p2","meta":{"lastUpdated":"2025-06-01T00:00:00Z"}}`,
		`{"resourceType":"Observation","id":"o1","meta":{"lastUpdated":"2025-01-02T00:00:00Z"},"subject":{"reference":"Patient/p1"}}`,
		`{"resourceType":"Observation","id":"o2","meta":{"lastUpdated":"2025-06-02T00:00:00Z"},"subject":{"reference":"Patient/p2"}}`,
		`{"resourceType":"Practitioner","id":"dr1"}`,
	)
	srv, err := bulkexporttest.StartServer(&bulkexporttest.ServerOptions{Source: src})
	if err != nil {
		log.Fatal(err)
	}
	defer srv.Close()

	res, err := srv.ExportContext(context.Background(), "/Patient/$export?_since=2025-03-01T00:00:00Z")
	if err != nil {
		log.Fatal(err)
	}
	for _, f := range res.Manifest.Output {
		fmt.Println(f.Type, *f.Count)
	}
	fmt.Println(res.IDs("Patient"), res.IDs("Observation"))
	// Output:
	// Observation 1
	// Patient 1
	// [p2] [o2]
}

// Recorder lets a test call a Source's Export directly and look at what it
// wrote.
func ExampleRecorder() {
	src := bulkexporttest.NewSource().MustAdd(
		`{"resourceType":"Patient","id":"p1"}`,
		`{"resourceType":"Patient","id":"p2"}`,
		`{"resourceType":"Patient","id":"p3"}`,
	).AddGroup("g", "p1", "p3")

	var rec bulkexporttest.Recorder
	q := &bulkexport.Query{Level: fhirbulk.LevelGroup, GroupID: "g"}
	if err := src.Export(context.Background(), q, "Patient", &rec); err != nil {
		log.Fatal(err)
	}
	fmt.Println(rec.IDs(), len(rec.Checkpoints))
	// Output: [p1 p3] 2
}

// FailOn makes an export fail part way, as a database that goes down does.
func ExampleSource_FailOn() {
	src := bulkexporttest.NewSource().MustAdd(
		`{"resourceType":"Patient","id":"p1"}`,
		`{"resourceType":"Patient","id":"p2"}`,
	)
	src.FailOn("Patient", 1, fmt.Errorf("connection reset: %w", bulkexport.ErrUnavailable))

	var rec bulkexporttest.Recorder
	err := src.Export(context.Background(), &bulkexport.Query{Level: fhirbulk.LevelSystem}, "Patient", &rec)
	fmt.Println(rec.IDs(), err)
	// Output: [p1] connection reset: bulkexport: temporarily unavailable
}
