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

// newServer wires the library over store: the synthetic dataset as the
// Source and a DirStorage, with the protocol's routes under /fhir.
func newServer(store bulkexport.JobStore, baseURL, storageDir string, patients int, log *slog.Logger, wo bulkexport.WorkerOptions) (*bulkexport.Server, error) {
	files, err := bulkexport.NewDirStorage(storageDir)
	if err != nil {
		return nil, err
	}
	wo.Logger = log
	return bulkexport.NewServer(bulkexport.Config{
		Store:   store,
		Source:  dataset.New(patients),
		Storage: files,
		Options: bulkexport.Options{BaseURL: baseURL, Logger: log},
		Worker:  wo,
	})
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
	defer srv.Close()
	mux := http.NewServeMux()
	if err := srv.Register(mux); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "bulkexport customstore example: base URL %s\n", base)
	// Running jobs go back to the queue, in the file, on shutdown.
	return srv.Serve(ctx, &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}, ln)
}
