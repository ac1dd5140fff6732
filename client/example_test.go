package client_test

import (
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/client"
)

// startServer runs a small bulk export server in-process: two patients
// with three observations, a MemoryStore, a DirStorage in a temporary
// directory and a Worker. stop shuts it all down.
func startServer() (baseURL string, stop func()) {
	src := bulkexporttest.NewSource().MustAdd(
		`{"resourceType":"Patient","id":"p1"}`,
		`{"resourceType":"Patient","id":"p2"}`,
		`{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p1"}}`,
		`{"resourceType":"Observation","id":"o2","subject":{"reference":"Patient/p1"}}`,
		`{"resourceType":"Observation","id":"o3","subject":{"reference":"Patient/p2"}}`,
	)
	dir, err := os.MkdirTemp("", "bulkexport-example-")
	if err != nil {
		log.Fatal(err)
	}
	storage, err := bulkexport.NewDirStorage(dir)
	if err != nil {
		log.Fatal(err)
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	store := bulkexport.NewMemoryStore()
	worker, err := bulkexport.NewWorker(store, src, storage, &bulkexport.WorkerOptions{
		PollInterval: 10 * time.Millisecond, Heartbeat: 10 * time.Millisecond, Logger: quiet,
	})
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	h, err := bulkexport.NewHandler(store, &bulkexport.Options{
		BaseURL:  srv.URL + "/fhir",
		Types:    src,
		Storage:  storage,
		OnQueued: func(string) { worker.Notify() },
		Logger:   quiet,
	})
	if err != nil {
		log.Fatal(err)
	}
	mux.Handle("/fhir/", h)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = worker.Run(ctx) }()
	return srv.URL + "/fhir", func() {
		srv.Close()
		cancel()
		<-done
		os.RemoveAll(dir)
	}
}

// Export everything of two resource types, wait for the export, and
// download the files.
func Example() {
	baseURL, stop := startServer()
	defer stop()
	ctx := context.Background()

	c, err := client.New(baseURL, &client.Options{
		// The server advises Retry-After: 1; poll faster for the example.
		MinPollInterval: 10 * time.Millisecond,
		MaxPollInterval: 50 * time.Millisecond,
	})
	if err != nil {
		log.Fatal(err)
	}
	job, err := c.Kickoff(ctx, &client.KickoffRequest{Types: []string{"Patient", "Observation"}})
	if err != nil {
		log.Fatal(err)
	}
	st, err := c.Wait(ctx, job.StatusURL, func(s *client.Status) {
		// s.Progress holds X-Progress, such as "50% complete: Patient".
	})
	if err != nil {
		log.Fatal(err) // an *client.Error with the OperationOutcome
	}

	dir, err := os.MkdirTemp("", "bulkexport-download-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	files, err := c.Download(ctx, st.Manifest, dir, nil)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(len(files), "files")
	for _, f := range files {
		fmt.Printf("%s: %d resources in %s\n", f.Type, f.Lines, filepath.Base(f.Path))
	}
	// Output:
	// 2 files
	// Observation: 3 resources in Observation.000001.c2.ndjson
	// Patient: 2 resources in Patient.000001.c2.ndjson
}
