// Command customstore runs a bulk export server over a JobStore of its
// own, FileStore (store.go): every job in one JSON file, rewritten
// atomically on each change, so that jobs survive a restart. It shows
// what a third-party JobStore takes: six methods with the contract of
// bulkexport.JobStore, and a test that runs storetest.Run against it
// (main_test.go).
//
// Usage:
//
//	customstore [-addr 127.0.0.1:8080] [-jobs ./bulkexport-jobs.json] [-storage ./bulkexport-data] [-patients 100]
//
// It prints one line, "bulkexport customstore example: base URL http://ADDR/fhir",
// and serves until SIGINT or SIGTERM. Then, for example:
//
//	curl -i -H 'Prefer: respond-async' 'http://127.0.0.1:8080/fhir/$export?_type=Patient'
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
	"syscall"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "customstore:", err)
		os.Exit(2)
	}
}

// server is the wired server: the handler to serve and the worker to run.
type server struct {
	handler http.Handler
	worker  *bulkexport.Worker
}

// newServer wires the library's parts over store: the synthetic dataset
// as the Source, a DirStorage, the Worker and the Handler at /fhir/.
func newServer(store bulkexport.JobStore, baseURL, storageDir string, patients int, log *slog.Logger, wo bulkexport.WorkerOptions) (*server, error) {
	ds := dataset.New(patients)
	files, err := bulkexport.NewDirStorage(storageDir)
	if err != nil {
		return nil, err
	}
	wo.Logger = log
	worker, err := bulkexport.NewWorker(store, ds, files, &wo)
	if err != nil {
		return nil, err
	}
	h, err := bulkexport.NewHandler(store, &bulkexport.Options{
		BaseURL:  baseURL,
		Types:    ds,
		Storage:  files,
		OnQueued: func(string) { worker.Notify() },
		Logger:   log,
	})
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("/fhir/", h)
	return &server{handler: mux, worker: worker}, nil
}

// run parses the command line, serves until ctx is done and shuts down.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("customstore", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:8080", "`host:port` to listen on")
	jobs := fs.String("jobs", "./bulkexport-jobs.json", "the job store's `file`")
	storageDir := fs.String("storage", "./bulkexport-data", "`directory` for export files")
	patients := fs.Int("patients", 100, "number of patients in the synthetic dataset")
	if err := fs.Parse(args); err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))

	store, err := OpenFileStore(*jobs)
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	defer ln.Close()
	base := "http://" + ln.Addr().String() + "/fhir"
	srv, err := newServer(store, base, *storageDir, *patients, log, bulkexport.WorkerOptions{})
	if err != nil {
		return err
	}
	httpSrv := &http.Server{Handler: srv.handler, ReadHeaderTimeout: 10 * time.Second}

	workerCtx, stopWorker := context.WithCancel(context.Background())
	defer stopWorker()
	workerDone := make(chan error, 1)
	go func() { workerDone <- srv.worker.Run(workerCtx) }()
	serveDone := make(chan error, 1)
	go func() { serveDone <- httpSrv.Serve(ln) }()
	fmt.Fprintf(stdout, "bulkexport customstore example: base URL %s\n", base)

	var serveErr error
	select {
	case <-ctx.Done():
	case serveErr = <-serveDone:
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = httpSrv.Shutdown(shutdownCtx)
	stopWorker() // running jobs go back to the queue, in the file
	werr := <-workerDone
	if errors.Is(serveErr, http.ErrServerClosed) {
		serveErr = nil
	}
	return errors.Join(serveErr, werr)
}
