package bulkexporttest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"strings"
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
	// Source serves the data: the host's own bulkexport.Source, to test it
	// end to end behind the real handler and Worker, or a *Source (the
	// in-memory fake). Default: NewSource().
	Source bulkexport.Source
	// Store keeps the jobs. Default: bulkexport.NewMemoryStore().
	Store bulkexport.JobStore
	// Handler is passed to bulkexport.NewHandler; BaseURL, Storage and
	// OnQueued are filled in, and Types is set to Source when nil. Its
	// Logger defaults to one that discards.
	Handler bulkexport.Options
	// Worker is passed to bulkexport.NewWorker. Default PollInterval and
	// Heartbeat are shortened to 20ms so that tests run fast; its Logger
	// defaults to one that discards.
	Worker bulkexport.WorkerOptions
	// Clock, if set, becomes Now of both the handler and the worker.
	Clock *Clock
	// NoWorker leaves jobs queued: for tests of the protocol alone, or
	// tests that run Workers of their own over Store and Storage.
	NoWorker bool
}

// Server is an in-process bulk export server on an httptest.Server: the
// real handler and Worker over a Source, a JobStore and a DirStorage in a
// temporary directory. Its FHIR base URL is BaseURL (URL + "/fhir").
//
// The embedded Exporter's helpers (Kickoff, Export, Collect, Wait, Cancel,
// ...) run exports against it with the server's own HTTP client.
type Server struct {
	*httptest.Server
	Exporter
	// Source is the in-memory Source the server serves, or nil when
	// ServerOptions.Source was a Source of another type.
	Source  *Source
	Store   bulkexport.JobStore
	Storage *bulkexport.DirStorage
	Handler *bulkexport.Handler
	Worker  *bulkexport.Worker

	stop      func()
	closeOnce sync.Once
}

// NewServer starts a Server and registers its shutdown with t.Cleanup:
// the HTTP server closes and the worker's Run returns before the test
// ends. Its files go to a directory from t.TempDir.
func NewServer(t testing.TB, opts *ServerOptions) *Server {
	t.Helper()
	s, err := start(opts, t.TempDir(), false)
	if err != nil {
		t.Fatalf("bulkexporttest: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

// StartServer starts a Server outside a test: for Example functions,
// TestMain and programs, which have no testing.TB. Its files go to a new
// temporary directory. Close shuts it down and removes the directory.
func StartServer(opts *ServerOptions) (*Server, error) {
	dir, err := os.MkdirTemp("", "bulkexporttest-")
	if err != nil {
		return nil, fmt.Errorf("bulkexporttest: %w", err)
	}
	s, err := start(opts, dir, true)
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return s, nil
}

func start(opts *ServerOptions, dir string, removeDir bool) (*Server, error) {
	var o ServerOptions
	if opts != nil {
		o = *opts
	}
	var fake *Source
	switch src := o.Source.(type) {
	case nil:
		fake = NewSource()
		o.Source = fake
	case *Source:
		if src == nil {
			src = NewSource()
			o.Source = src
		}
		fake = src
	}
	if o.Store == nil {
		o.Store = bulkexport.NewMemoryStore()
	}
	storage, err := bulkexport.NewDirStorage(dir)
	if err != nil {
		return nil, fmt.Errorf("bulkexporttest: %w", err)
	}
	s := &Server{Source: fake, Store: o.Store, Storage: storage}

	wo := o.Worker
	if wo.Logger == nil {
		wo.Logger = discardLogger
	}
	ho := o.Handler
	if ho.Logger == nil {
		ho.Logger = discardLogger
	}
	if wo.PollInterval == 0 {
		wo.PollInterval = 20 * time.Millisecond
	}
	if wo.Heartbeat == 0 {
		wo.Heartbeat = 20 * time.Millisecond
	}
	if o.Clock != nil {
		wo.Now = o.Clock.Now
		ho.Now = o.Clock.Now
	}
	s.Worker, err = bulkexport.NewWorker(o.Store, o.Source, storage, &wo)
	if err != nil {
		return nil, fmt.Errorf("bulkexporttest: %w", err)
	}

	mux := http.NewServeMux()
	s.Server = httptest.NewServer(mux)
	s.Exporter = Exporter{BaseURL: s.URL + "/fhir", Header: http.Header{}, HTTPClient: s.Server.Client()}
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
		return nil, fmt.Errorf("bulkexporttest: %w", err)
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
	s.stop = func() {
		s.Server.Close()
		cancel()
		<-done
		_ = s.Handler.Close()
		if removeDir {
			os.RemoveAll(dir)
		}
	}
	return s, nil
}

// Close shuts the server down: the HTTP server closes, and the Worker's Run
// has returned when Close does. A server from StartServer also removes its
// directory. Calling Close more than once is harmless.
func (s *Server) Close() {
	s.closeOnce.Do(s.stop)
}

// Job returns the stored job of a status URL (either form), failing the
// test if the store does not have it.
func (s *Server) Job(t testing.TB, statusURL string) *bulkexport.Job {
	t.Helper()
	id, err := JobID(statusURL)
	if err != nil {
		t.Fatalf("bulkexporttest: %v", err)
	}
	j, err := s.Store.Get(context.Background(), id)
	if err != nil {
		t.Fatalf("bulkexporttest: job %s: %v", id, err)
	}
	return j
}

// JobID returns the job id of a status URL, in the query form
// ($export-poll-status?_jobId=ID) or the path form ($export-poll-status/ID).
func JobID(statusURL string) (string, error) {
	u, err := url.Parse(statusURL)
	if err != nil {
		return "", err
	}
	if id := u.Query().Get("_jobId"); id != "" {
		return id, nil
	}
	if _, id, ok := strings.Cut(u.Path, "/$export-poll-status/"); ok && id != "" && !strings.Contains(id, "/") {
		return id, nil
	}
	return "", errors.New("bulkexporttest: no job id in " + statusURL)
}
