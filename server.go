package bulkexport

import (
	"context"
	"errors"
	"net"
	"net/http"
	"sync"
	"time"
)

// Config is what a Server is built from: the three collaborators and the
// options of its two halves.
type Config struct {
	// Store keeps the jobs. Required.
	Store JobStore
	// Source reads the host's data. Required. It is also the handler's
	// TypeLister: the types, Groups, _typeFilter searches, associated data
	// and organizeOutputBy values a kick-off may ask for are those the
	// Source itself declares through its optional interfaces (see
	// Source), so the handler never accepts an export the Worker cannot
	// run.
	Source Source
	// Storage holds the files. Required. The Worker writes to it and the
	// handler serves from it.
	Storage Storage
	// Options configures the protocol side. BaseURL is required. Leave
	// Types, Storage and OnQueued unset: the Server sets them from Source,
	// Storage and its Worker. CancelledRetention, when zero, is
	// Worker.Retention, so one setting keeps every finished job.
	Options Options
	// Worker configures the export side.
	Worker WorkerOptions
	// ShutdownTimeout bounds how long Serve waits for requests in flight
	// when it stops. Default: DefaultShutdownTimeout.
	ShutdownTimeout time.Duration
}

// DefaultShutdownTimeout is Config.ShutdownTimeout's default.
const DefaultShutdownTimeout = 10 * time.Second

// Server is the whole protocol wired over one Config: the Handler that
// serves kick-off, status, cancel and download, and the Worker that runs
// the exports, notified at once of every kick-off. It is an http.Handler;
// mount it with Register (or Routes) beside the host's own FHIR routes,
// start the exports with Run (or serve and run together with Serve), and
// Close it when done.
//
// A host that runs exports its own way uses NewHandler and NewWorker
// instead; Server is built from them and adds nothing they lack.
type Server struct {
	handler  *Handler
	worker   *Worker
	shutdown time.Duration
	closed   sync.Once
}

// NewServer checks cfg, fills the defaults and wires the Handler and the
// Worker. Errors name the field at fault.
func NewServer(cfg Config) (*Server, error) {
	switch {
	case cfg.Store == nil:
		return nil, errors.New("bulkexport: Config.Store: required")
	case cfg.Source == nil:
		return nil, errors.New("bulkexport: Config.Source: required")
	case cfg.Storage == nil:
		return nil, errors.New("bulkexport: Config.Storage: required")
	case cfg.Options.Types != nil:
		return nil, errors.New("bulkexport: Config.Options.Types: leave unset; the Server lists the types of Config.Source")
	case cfg.Options.Storage != nil:
		return nil, errors.New("bulkexport: Config.Options.Storage: leave unset; the Server uses Config.Storage")
	case cfg.Options.OnQueued != nil:
		return nil, errors.New("bulkexport: Config.Options.OnQueued: leave unset; the Server notifies its Worker")
	case cfg.ShutdownTimeout < 0:
		return nil, optionError("Config.ShutdownTimeout", "must not be negative, got %v", cfg.ShutdownTimeout)
	}
	w, err := NewWorker(cfg.Store, cfg.Source, cfg.Storage, &cfg.Worker)
	if err != nil {
		return nil, err
	}
	opts := cfg.Options
	opts.Types, opts.Storage, opts.OnQueued = cfg.Source, cfg.Storage, func(string) { w.Notify() }
	if opts.CancelledRetention == 0 {
		opts.CancelledRetention = w.opts.Retention
	}
	h, err := NewHandler(cfg.Store, &opts)
	if err != nil {
		return nil, err
	}
	s := &Server{handler: h, worker: w, shutdown: cfg.ShutdownTimeout}
	zeroDefault(&s.shutdown, DefaultShutdownTimeout)
	return s, nil
}

// ServeHTTP serves a protocol request (see Handler.ServeHTTP).
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) { s.handler.ServeHTTP(w, r) }

// Handler returns the Server's Handler, for its Capability, Manifest and
// FileURL.
func (s *Server) Handler() *Handler { return s.handler }

// Worker returns the Server's Worker.
func (s *Server) Worker() *Worker { return s.worker }

// Routes lists the methods and paths the Server serves (Handler.Routes).
func (s *Server) Routes() []Route { return s.handler.Routes() }

// Register registers the Server on mux under every route of Routes
// (Handler.Register).
func (s *Server) Register(mux *http.ServeMux) error { return s.handler.Register(mux) }

// Run runs the Worker until ctx is done (Worker.Run): it blocks, and
// returns after every goroutine it started has exited and the jobs it was
// running went back to the queue.
func (s *Server) Run(ctx context.Context) error { return s.worker.Run(ctx) }

// Serve serves hs on ln and runs the Worker until ctx is done or hs stops
// on its own, then shuts down in order: hs stops taking requests and
// finishes those in flight (for at most Config.ShutdownTimeout), the
// Worker hands its running jobs back to the queue, and the Server is
// closed. When hs.Handler is nil, hs serves the Server alone; a host with
// its own routes sets it to its mux. It returns the first error of hs and
// the Worker, nil after a shutdown through ctx.
func (s *Server) Serve(ctx context.Context, hs *http.Server, ln net.Listener) error {
	if hs.Handler == nil {
		hs.Handler = s
	}
	workCtx, stopWork := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWork()
	workDone := make(chan error, 1)
	go func() { workDone <- s.Run(workCtx) }()
	serveDone := make(chan error, 1)
	go func() { serveDone <- hs.Serve(ln) }()

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-serveDone:
	case err := <-workDone:
		// Run returns early only on an error; serve no more.
		workDone <- err
	}
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.shutdown)
	defer cancel()
	shutdownErr := hs.Shutdown(shutdownCtx)
	if errors.Is(shutdownErr, context.DeadlineExceeded) {
		shutdownErr = hs.Close()
	}
	stopWork()
	workErr := <-workDone
	if errors.Is(serveErr, http.ErrServerClosed) {
		serveErr = nil
	}
	return errors.Join(serveErr, shutdownErr, workErr, s.Close())
}

// Close releases what the Server registered (Handler.Close). It does not
// stop Run; cancel its context for that.
func (s *Server) Close() error {
	var err error
	s.closed.Do(func() { err = s.handler.Close() })
	return err
}
