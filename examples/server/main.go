// Command server is an example FHIR Bulk Data export server over a
// synthetic dataset (see examples/internal/dataset).
//
// Usage:
//
//	server [-addr 127.0.0.1:8080] [-clients NAME=TOKEN,...] [-patients 100]
//	       [-store memory] [-storage dir:PATH] [-log-level info]
//
// It prints one line, "bulkexport example server: base URL http://ADDR/fhir",
// to stdout, logs to stderr, and shuts down gracefully on SIGINT or
// SIGTERM. Then, for example:
//
//	curl -i -H 'Prefer: respond-async' 'http://127.0.0.1:8080/fhir/$export?_type=Patient,Observation'
//	curl -i 'http://127.0.0.1:8080/fhir/$export-poll-status?_jobId=...'
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/bulkfhir/bulkexport/examples/internal/exampleserver"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	switch {
	case errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case errors.Is(err, errUsage):
		os.Exit(2)
	case err != nil:
		fmt.Fprintln(os.Stderr, "server:", err)
		os.Exit(1)
	}
}

// errUsage marks a bad command line (the flag package has printed why).
var errUsage = errors.New("usage")

// options are the parsed command line.
type options struct {
	addr       string
	clients    map[string]string
	patients   int
	store      string
	storageDir string
	logLevel   slog.Level
}

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:8080", "`host:port` to listen on")
	clients := fs.String("clients", "", "comma-separated `NAME=TOKEN` pairs of clients allowed in with \"Authorization: Bearer TOKEN\"; none: no authentication")
	patients := fs.Int("patients", 100, "number of patients in the synthetic dataset")
	store := fs.String("store", exampleserver.StoreMemory, "job store: memory")
	storage := fs.String("storage", "dir:./bulkexport-data", "where export files go: dir:PATH")
	level := fs.String("log-level", "info", "log level: debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil, err
		}
		return nil, errUsage
	}
	bad := func(format string, a ...any) (*options, error) {
		fmt.Fprintf(stderr, format+"\n", a...)
		fs.Usage()
		return nil, errUsage
	}
	if fs.NArg() > 0 {
		return bad("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	o := &options{addr: *addr, patients: *patients, store: *store}
	var err error
	if o.clients, err = parseClients(*clients); err != nil {
		return bad("-clients: %v", err)
	}
	if o.patients < 0 {
		return bad("-patients: must not be negative")
	}
	if o.store != exampleserver.StoreMemory {
		return bad("-store: unsupported store %q: only %q is available for now", o.store, exampleserver.StoreMemory)
	}
	scheme, path, ok := strings.Cut(*storage, ":")
	if !ok || scheme != "dir" || path == "" {
		return bad("-storage: unsupported storage %q: use dir:PATH", *storage)
	}
	o.storageDir = path
	switch *level {
	case "debug":
		o.logLevel = slog.LevelDebug
	case "info":
		o.logLevel = slog.LevelInfo
	case "warn":
		o.logLevel = slog.LevelWarn
	case "error":
		o.logLevel = slog.LevelError
	default:
		return bad("-log-level: %q is not one of debug, info, warn, error", *level)
	}
	return o, nil
}

// parseClients parses NAME=TOKEN,NAME=TOKEN.
func parseClients(s string) (map[string]string, error) {
	clients := map[string]string{}
	if strings.TrimSpace(s) == "" {
		return clients, nil
	}
	for _, pair := range strings.Split(s, ",") {
		name, token, ok := strings.Cut(strings.TrimSpace(pair), "=")
		if !ok || name == "" || token == "" {
			return nil, fmt.Errorf("%q is not NAME=TOKEN", pair)
		}
		if _, dup := clients[name]; dup {
			return nil, fmt.Errorf("client %q is given twice", name)
		}
		clients[name] = token
	}
	return clients, nil
}

// run serves until ctx is done, then shuts down: it stops accepting
// requests, lets those in flight finish, stops the worker (running jobs go
// back to the queue) and waits for it.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: o.logLevel}))

	ln, err := net.Listen("tcp", o.addr)
	if err != nil {
		return err
	}
	defer ln.Close()
	srv, err := exampleserver.New(exampleserver.Config{
		Addr:       ln.Addr().String(),
		Clients:    o.clients,
		Patients:   o.patients,
		Store:      o.store,
		StorageDir: o.storageDir,
		Logger:     log,
	})
	if err != nil {
		return err
	}
	httpSrv := &http.Server{
		Handler:           srv.Handler,
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}

	workerCtx, stopWorker := context.WithCancel(context.Background())
	defer stopWorker()
	workerDone := make(chan error, 1)
	go func() { workerDone <- srv.Worker.Run(workerCtx) }()
	serveDone := make(chan error, 1)
	go func() { serveDone <- httpSrv.Serve(ln) }()

	fmt.Fprintf(stdout, "bulkexport example server: base URL %s\n", srv.BaseURL)
	log.Info("serving", "addr", ln.Addr().String(), "patients", o.patients, "storage", srv.Storage.Root(),
		"store", o.store, "clients", len(o.clients))

	var serveErr error
	select {
	case <-ctx.Done():
		log.Info("shutting down")
	case serveErr = <-serveDone:
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := httpSrv.Shutdown(shutdownCtx); err != nil {
		log.Warn("shutdown", "err", err)
	}
	stopWorker()
	werr := <-workerDone
	if errors.Is(serveErr, http.ErrServerClosed) {
		serveErr = nil
	}
	return errors.Join(serveErr, werr)
}
