package bulkexporttest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
)

// Clock is a settable clock for Options.Now and WorkerOptions.Now, so that
// expiry and Retry-After can be tested without sleeping. It only moves when
// told to. It is safe for concurrent use.
type Clock struct {
	mu sync.Mutex
	t  time.Time
}

// NewClock returns a Clock set to t.
func NewClock(t time.Time) *Clock { return &Clock{t: t} }

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the clock forward by d.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// Set moves the clock to t.
func (c *Clock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

// discardLogger keeps test output quiet; set WorkerOptions.Logger or
// Options.Logger to see the logs.
var discardLogger = slog.New(slog.NewTextHandler(io.Discard, nil))

// ServerOptions configures NewServer. The zero value gives a server with
// an empty Source, a MemoryStore, a temporary DirStorage and a running
// Worker.
type ServerOptions struct {
	// Source serves the data. Default: NewSource().
	Source *Source
	// Store keeps the jobs. Default: bulkexport.NewMemoryStore().
	Store bulkexport.JobStore
	// Handler is passed to bulkexport.NewHandler; BaseURL, Types, Storage
	// and OnQueued are filled in (Types only when nil).
	Handler bulkexport.Options
	// Worker is passed to bulkexport.NewWorker. Default PollInterval and
	// Heartbeat are shortened to 20ms so that tests run fast.
	Worker bulkexport.WorkerOptions
	// Clock, if set, becomes Now of both the handler and the worker.
	Clock *Clock
	// NoWorker leaves jobs queued: for tests of the protocol alone.
	NoWorker bool
}

// Server is an in-process bulk export server on an httptest.Server. Its
// FHIR base URL is URL + "/fhir".
type Server struct {
	*httptest.Server
	BaseURL string
	Source  *Source
	Store   bulkexport.JobStore
	Storage *bulkexport.DirStorage
	Handler *bulkexport.Handler
	Worker  *bulkexport.Worker
	// Header is added to every request the helpers send (for example an
	// Authorization header).
	Header http.Header
}

// NewServer starts a Server and registers its shutdown with t.Cleanup:
// the HTTP server closes and the worker's Run returns before the test
// ends.
func NewServer(t testing.TB, opts *ServerOptions) *Server {
	t.Helper()
	var o ServerOptions
	if opts != nil {
		o = *opts
	}
	if o.Source == nil {
		o.Source = NewSource()
	}
	if o.Store == nil {
		o.Store = bulkexport.NewMemoryStore()
	}
	storage, err := bulkexport.NewDirStorage(t.TempDir())
	if err != nil {
		t.Fatalf("bulkexporttest: %v", err)
	}
	s := &Server{Source: o.Source, Store: o.Store, Storage: storage, Header: http.Header{}}

	wo := o.Worker
	if wo.Logger == nil {
		wo.Logger = discardLogger
	}
	if o.Handler.Logger == nil {
		o.Handler.Logger = discardLogger
	}
	if wo.PollInterval == 0 {
		wo.PollInterval = 20 * time.Millisecond
	}
	if wo.Heartbeat == 0 {
		wo.Heartbeat = 20 * time.Millisecond
	}
	ho := o.Handler
	if o.Clock != nil {
		wo.Now = o.Clock.Now
		ho.Now = o.Clock.Now
	}
	s.Worker, err = bulkexport.NewWorker(o.Store, o.Source, storage, &wo)
	if err != nil {
		t.Fatalf("bulkexporttest: %v", err)
	}

	mux := http.NewServeMux()
	s.Server = httptest.NewServer(mux)
	s.BaseURL = s.URL + "/fhir"
	ho.BaseURL = s.BaseURL
	ho.Storage = storage
	if ho.Types == nil {
		ho.Types = o.Source
	}
	if ho.OnQueued == nil && !o.NoWorker {
		ho.OnQueued = func(string) { s.Worker.Notify() }
	}
	s.Handler, err = bulkexport.NewHandler(o.Store, &ho)
	if err != nil {
		s.Server.Close()
		t.Fatalf("bulkexporttest: %v", err)
	}
	mux.Handle("/fhir/", s.Handler)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	if o.NoWorker {
		close(done)
	} else {
		go func() {
			defer close(done)
			_ = s.Worker.Run(ctx)
		}()
	}
	t.Cleanup(func() {
		s.Server.Close()
		cancel()
		<-done
	})
	return s
}

// Kickoff sends a GET kick-off to path (relative to the base URL, such as
// "/$export?_type=Patient") with Prefer: respond-async, and returns the
// status URL. It fails the test unless the answer is 202.
func (s *Server) Kickoff(t testing.TB, path string) string {
	t.Helper()
	return s.kickoff(t, http.MethodGet, path, nil)
}

// KickoffPOST sends a POST kick-off with a Parameters body.
func (s *Server) KickoffPOST(t testing.TB, path string, parameters any) string {
	t.Helper()
	body, err := json.Marshal(parameters)
	if err != nil {
		t.Fatalf("bulkexporttest: %v", err)
	}
	return s.kickoff(t, http.MethodPost, path, body)
}

func (s *Server) kickoff(t testing.TB, method, path string, body []byte) string {
	t.Helper()
	req, err := http.NewRequest(method, s.BaseURL+path, bytes.NewReader(body))
	if err != nil {
		t.Fatalf("bulkexporttest: %v", err)
	}
	req.Header.Set("Prefer", "respond-async")
	req.Header.Set("Accept", "application/fhir+json")
	if body != nil {
		req.Header.Set("Content-Type", "application/fhir+json")
	}
	resp := s.do(t, req)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("bulkexporttest: kick-off %s %s: %d %s", method, path, resp.StatusCode, b)
	}
	return resp.Header.Get("Content-Location")
}

func (s *Server) do(t testing.TB, req *http.Request) *http.Response {
	t.Helper()
	for k, v := range s.Header {
		req.Header[k] = v
	}
	resp, err := s.Client().Do(req)
	if err != nil {
		t.Fatalf("bulkexporttest: %s %s: %v", req.Method, req.URL, err)
	}
	return resp
}

// Wait polls statusURL until the job leaves the queue and returns the
// status response's code and body (the manifest when 200). It gives up,
// failing the test, after about 30 seconds.
func (s *Server) Wait(t testing.TB, statusURL string) (int, []byte) {
	t.Helper()
	for i := 0; i < 3000; i++ {
		req, _ := http.NewRequest(http.MethodGet, statusURL, nil)
		req.Header.Set("Accept", "application/json")
		resp := s.do(t, req)
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted {
			return resp.StatusCode, b
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("bulkexporttest: %s still in progress after 30s", statusURL)
	return 0, nil
}

// Result is a finished export, downloaded.
type Result struct {
	StatusURL string
	Manifest  bulkexport.Manifest
	// Output holds the resources of output[] by type, in file order.
	// Organized output (organizeOutputBy), whose files hold several types,
	// is under the key "".
	Output map[string][]json.RawMessage
	// Deleted holds the Bundles of deleted[]; Errors the OperationOutcomes
	// of error[].
	Deleted []json.RawMessage
	Errors  []json.RawMessage
}

// IDs returns the ids of the exported resources of typ, in order.
func (r *Result) IDs(typ string) []string {
	var ids []string
	for _, raw := range r.Output[typ] {
		var v struct {
			ID string `json:"id"`
		}
		_ = json.Unmarshal(raw, &v)
		ids = append(ids, v.ID)
	}
	return ids
}

// Export kicks off a GET export at path, waits for it to complete, and
// downloads every file. It fails the test if the export does not complete
// or a file breaks the manifest's promises (count, type of every line).
func (s *Server) Export(t testing.TB, path string) *Result {
	t.Helper()
	return s.Collect(t, s.Kickoff(t, path))
}

// Collect waits for the job at statusURL and downloads its files.
func (s *Server) Collect(t testing.TB, statusURL string) *Result {
	t.Helper()
	code, body := s.Wait(t, statusURL)
	if code != http.StatusOK {
		t.Fatalf("bulkexporttest: export ended with %d: %s", code, body)
	}
	r := &Result{StatusURL: statusURL, Output: map[string][]json.RawMessage{}}
	if err := json.Unmarshal(body, &r.Manifest); err != nil {
		t.Fatalf("bulkexporttest: manifest: %v", err)
	}
	for _, f := range r.Manifest.Output {
		r.Output[f.Type] = append(r.Output[f.Type], s.download(t, f)...)
	}
	for _, f := range r.Manifest.Deleted {
		r.Deleted = append(r.Deleted, s.download(t, f)...)
	}
	for _, f := range r.Manifest.Error {
		r.Errors = append(r.Errors, s.download(t, f)...)
	}
	return r
}

func (s *Server) download(t testing.TB, f bulkexport.ManifestFile) []json.RawMessage {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, f.URL, nil)
	req.Header.Set("Accept", "application/fhir+ndjson")
	resp := s.do(t, req)
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("bulkexporttest: GET %s: %d %s", f.URL, resp.StatusCode, b)
	}
	var out []json.RawMessage
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 64<<20)
	for sc.Scan() {
		line := append([]byte(nil), sc.Bytes()...)
		var v struct {
			ResourceType string `json:"resourceType"`
		}
		if err := json.Unmarshal(line, &v); err != nil {
			t.Fatalf("bulkexporttest: %s: a line is not JSON: %v", f.URL, err)
		}
		if f.Type != "" && v.ResourceType != f.Type {
			t.Fatalf("bulkexporttest: %s: a %s line in a file of %s", f.URL, v.ResourceType, f.Type)
		}
		out = append(out, line)
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("bulkexporttest: %s: %v", f.URL, err)
	}
	if f.Count != nil && *f.Count != int64(len(out)) {
		t.Fatalf("bulkexporttest: %s: manifest count %d, file has %d lines", f.URL, *f.Count, len(out))
	}
	return out
}

// Status sends one GET to statusURL and returns the response, body read.
func (s *Server) Status(t testing.TB, statusURL string) (*http.Response, []byte) {
	t.Helper()
	return s.Send(t, http.MethodGet, statusURL, nil)
}

// Send sends a request with the server's Header and returns the response,
// body read and closed.
func (s *Server) Send(t testing.TB, method, url string, body []byte) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		t.Fatalf("bulkexporttest: %v", err)
	}
	resp := s.do(t, req)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, b
}
