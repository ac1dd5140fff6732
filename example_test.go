package bulkexport_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// The handler answers the whole protocol under its base URL. Here it is
// driven with httptest.NewRecorder; a server mounts it on its mux.
func ExampleNewHandler() {
	store := bulkexport.NewMemoryStore()
	h, err := bulkexport.NewHandler(store, &bulkexport.Options{
		BaseURL: "https://fhir.example.org/fhir",
		// Types validates _type; any Source fits (here the test kit's).
		Types: bulkexporttest.NewSource().MustAdd(`{"resourceType":"Patient","id":"p1"}`),
		// The host's authentication: the client id a job belongs to.
		Authenticate: func(r *http.Request) (string, error) {
			if r.Header.Get("Authorization") != "Bearer s3cret" {
				return "", bulkexport.ErrUnauthorized
			}
			return "alice", nil
		},
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/fhir/", h)

	send := func(method, url string) *httptest.ResponseRecorder {
		req := httptest.NewRequest(method, url, nil)
		req.Header.Set("Authorization", "Bearer s3cret")
		req.Header.Set("Prefer", "respond-async")
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, req)
		return rec
	}
	rec := send(http.MethodGet, "https://fhir.example.org/fhir/$export?_type=Patient")
	statusURL := rec.Header().Get("Content-Location")
	fmt.Println("kick-off:", rec.Code, strings.HasPrefix(statusURL, "https://fhir.example.org/fhir/$export-poll-status?_jobId="))

	// No Worker runs here, so the job stays queued.
	rec = send(http.MethodGet, statusURL)
	fmt.Println("poll:", rec.Code, rec.Header().Get("X-Progress"))

	rec = send(http.MethodGet, "https://fhir.example.org/fhir/$export?_type=Nope")
	fmt.Println("bad _type:", rec.Code, rec.Header().Get("Content-Type"))
	// Output:
	// kick-off: 202 true
	// poll: 202 queued
	// bad _type: 400 application/fhir+json
}

// A host server's limits for the handler: headers, bodies, idle
// connections and header size are bounded for every request; answers get
// WriteTimeout, except file downloads, which get a longer per-request write
// deadline. There is no ReadTimeout: it counts from the start of the
// request for its whole life, and its expiry cancels the context of a
// request still being answered, such as a long download; a per-request
// read deadline bounds the bodies instead. (The handler itself answers
// 401, 415 and other early rejections without waiting for a body, and
// closes such connections.)
func ExampleHandler_timeouts() {
	h, err := bulkexport.NewHandler(bulkexport.NewMemoryStore(), &bulkexport.Options{BaseURL: "https://fhir.example.org/fhir"})
	if err != nil {
		log.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.Handle("/fhir/", h)
	deadlines := func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			rc := http.NewResponseController(w)
			if r.ContentLength != 0 { // a POST kick-off or status body
				_ = rc.SetReadDeadline(time.Now().Add(30 * time.Second))
			}
			if strings.HasPrefix(r.URL.Path, "/fhir/bulkfiles/") { // downloads
				_ = rc.SetWriteDeadline(time.Now().Add(time.Hour))
			}
			next.ServeHTTP(w, r)
		})
	}
	srv := &http.Server{
		Addr:              "127.0.0.1:8080",
		Handler:           deadlines(mux),
		ReadHeaderTimeout: 10 * time.Second,
		WriteTimeout:      30 * time.Second, // every answer but downloads
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
	}
	fmt.Println(srv.Addr) // then srv.ListenAndServeTLS(cert, key)
	// Output: 127.0.0.1:8080
}

// A Worker runs the jobs the handler queues: it reads the Source and
// writes NDJSON files to the Storage. Run blocks until its context is done.
func ExampleNewWorker() {
	dir, err := os.MkdirTemp("", "bulkexport-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	files, err := bulkexport.NewDirStorage(dir)
	if err != nil {
		log.Fatal(err)
	}
	store := bulkexport.NewMemoryStore()
	src := bulkexporttest.NewSource().MustAdd(
		`{"resourceType":"Patient","id":"p1"}`,
		`{"resourceType":"Patient","id":"p2"}`,
		`{"resourceType":"Observation","id":"o1","subject":{"reference":"Patient/p1"}}`,
	)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	worker, err := bulkexport.NewWorker(store, src, files, &bulkexport.WorkerOptions{PollInterval: 10 * time.Millisecond, Logger: quiet})
	if err != nil {
		log.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- worker.Run(ctx) }()
	defer func() { stop(); <-done }() // Run returns once its goroutines have exited

	h, err := bulkexport.NewHandler(store, &bulkexport.Options{
		BaseURL:  "https://fhir.example.org/fhir",
		Types:    src,
		Storage:  files,
		OnQueued: func(string) { worker.Notify() }, // start new jobs at once
		Logger:   quiet,
	})
	if err != nil {
		log.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodGet, "https://fhir.example.org/fhir/$export", nil)
	req.Header.Set("Prefer", "respond-async")
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	id, err := bulkexporttest.JobID(rec.Header().Get("Content-Location"))
	if err != nil {
		log.Fatal(err)
	}

	for {
		job, err := store.Get(ctx, id)
		if err != nil {
			log.Fatal(err)
		}
		if job.State.Terminal() {
			fmt.Println(job.State)
			for _, f := range job.Output {
				fmt.Println(f.Name, f.Count)
			}
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Output:
	// completed
	// Observation.000001.c2.ndjson 1
	// Patient.000001.c2.ndjson 2
}

// A JobStore keeps jobs with optimistic concurrency: every Update names the
// Version it read, and a stale one gets ErrConflict.
func ExampleMemoryStore() {
	ctx := context.Background()
	store := bulkexport.NewMemoryStore()
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)

	job := &bulkexport.Job{ID: bulkexport.NewJobID(), Owner: "alice", Level: fhirbulk.LevelSystem,
		State: bulkexport.StateQueued, CreatedAt: now, UpdatedAt: now}
	if err := store.Create(ctx, job, bulkexport.CreateParams{}); err != nil {
		log.Fatal(err)
	}
	fmt.Println("created, version", job.Version)

	// A worker claims it: running, leased, version 2.
	claimed, err := store.Claim(ctx, bulkexport.ClaimParams{Worker: "worker-1", Now: now, Lease: 30 * time.Second})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("claimed:", claimed.State, claimed.LeaseOwner, claimed.Version)

	// The copy read before the claim is stale.
	job.State = bulkexport.StateCancelled
	fmt.Println("stale update:", errors.Is(store.Update(ctx, job), bulkexport.ErrConflict))

	// Re-read, then update: the cancel wins.
	cur, err := store.Get(ctx, job.ID)
	if err != nil {
		log.Fatal(err)
	}
	cur.State = bulkexport.StateCancelled
	if err := store.Update(ctx, cur); err != nil {
		log.Fatal(err)
	}
	fmt.Println("cancelled, version", cur.Version)

	_, err = store.Claim(ctx, bulkexport.ClaimParams{Worker: "worker-2", Now: now, Lease: 30 * time.Second})
	fmt.Println("nothing to claim:", errors.Is(err, bulkexport.ErrNoJob))
	// Output:
	// created, version 1
	// claimed: running worker-1 2
	// stale update: true
	// cancelled, version 3
	// nothing to claim: true
}

// A Server wires the handler and the Worker from one Config. Register
// mounts it beside the host's own FHIR routes on an http.ServeMux: its
// patterns are method-qualified, so the host's GET /fhir/Patient/{id}
// and the Patient-level kick-off coexist.
func ExampleServer() {
	dir, err := os.MkdirTemp("", "bulkexport-example-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	files, err := bulkexport.NewDirStorage(dir)
	if err != nil {
		log.Fatal(err)
	}
	exports, err := bulkexport.NewServer(bulkexport.Config{
		Store:   bulkexport.NewMemoryStore(),
		Source:  bulkexporttest.NewSource().MustAdd(`{"resourceType":"Patient","id":"p1"}`),
		Storage: files,
		Options: bulkexport.Options{BaseURL: "https://fhir.example.org/fhir"},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer exports.Close()

	mux := http.NewServeMux()
	mux.HandleFunc("GET /fhir/Patient/{id}", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintln(w, "the host reads Patient", r.PathValue("id"))
	})
	if err := exports.Register(mux); err != nil {
		log.Fatal(err)
	}
	for _, path := range []string{"/fhir/Patient/p1", "/fhir/Patient/$export"} {
		req := httptest.NewRequest(http.MethodGet, path, nil)
		req.Header.Set("Prefer", "respond-async")
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, req)
		if loc := rec.Header().Get("Content-Location"); loc != "" {
			fmt.Println(path, rec.Code, strings.HasPrefix(loc, "https://fhir.example.org/fhir/$export-poll-status?_jobId="))
			continue
		}
		fmt.Println(path, rec.Code, strings.TrimSpace(rec.Body.String()))
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // a real host runs the exports until it shuts down
	fmt.Println("run:", exports.Run(ctx))
	// Output:
	// /fhir/Patient/p1 200 the host reads Patient p1
	// /fhir/Patient/$export 202 true
	// run: <nil>
}
