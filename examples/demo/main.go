// Command demo runs one bulk export end to end, in one process: it starts
// the example server on a free loopback port with a temporary storage
// directory, then acts as a client through the library's client package —
// kick-off, polling that honours Retry-After, manifest, parallel download
// of every file — and prints the manifest and a table of the files to
// stdout. What it does step
// by step goes to stderr. It removes its files and exits 0 when done.
//
// Usage:
//
//	demo [-patients 100] [-level system|patient|group]
//
// The group level exports Group/all.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/bulkfhir/bulkexport/client"
	"github.com/bulkfhir/bulkexport/examples/internal/exampleserver"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	switch {
	case errors.Is(err, flag.ErrHelp):
	case errors.Is(err, errUsage):
		os.Exit(2)
	case err != nil:
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

// config is the parsed command line.
type config struct {
	patients int
	level    fhirbulk.Level
}

func parseFlags(args []string, stderr io.Writer) (config, error) {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	patients := fs.Int("patients", 100, "number of patients in the synthetic dataset")
	level := fs.String("level", "system", "export level: system, patient or group (Group/all)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return config{}, err
		}
		return config{}, errUsage
	}
	cfg := config{patients: *patients, level: fhirbulk.Level(*level)}
	var msg string
	switch {
	case fs.NArg() > 0:
		msg = "unexpected arguments: " + strings.Join(fs.Args(), " ")
	case cfg.patients < 0:
		msg = "-patients must not be negative"
	case !cfg.level.Valid():
		msg = fmt.Sprintf("-level %q is not one of system, patient, group", *level)
	}
	if msg != "" {
		fmt.Fprintln(stderr, msg)
		fs.Usage()
		return config{}, errUsage
	}
	return cfg, nil
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	cfg, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	_, err = demo(ctx, cfg, stdout, stderr)
	return err
}

// file is what the demo found in one downloaded file.
type file struct {
	kind  string // output, error or deleted
	typ   string
	name  string
	count int64 // lines
	bytes int64 // bytes of NDJSON (after any transfer decoding)
}

// result is what demo did, for tests.
type result struct {
	manifest *fhirbulk.Manifest
	files    []file
}

// demo starts the server, runs the export and prints the result.
func demo(ctx context.Context, cfg config, stdout, stderr io.Writer) (res *result, err error) {
	dir, err := os.MkdirTemp("", "bulkexport-demo-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	srv, err := exampleserver.New(exampleserver.Config{
		Addr:       ln.Addr().String(),
		Patients:   cfg.patients,
		StorageDir: dir,
		Logger:     slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		ln.Close()
		return nil, err
	}
	httpSrv := &http.Server{Handler: srv.Handler, ReadHeaderTimeout: 10 * time.Second}
	serveCtx, stopServing := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Exports.Serve(serveCtx, httpSrv, ln) }()
	defer func() {
		stopServing()
		err = errors.Join(err, <-served)
	}()
	fmt.Fprintf(stderr, "server: base URL %s, %d patients, files in %s\n", srv.BaseURL, cfg.patients, dir)

	c, err := client.New(srv.BaseURL, &client.Options{
		HTTPClient: &http.Client{Timeout: time.Minute},
		// Retry-After is honoured, but the demo never waits more than a
		// second between polls.
		MinPollInterval: 100 * time.Millisecond,
		MaxPollInterval: time.Second,
	})
	if err != nil {
		return nil, err
	}
	// Parallel downloads may leave connections the server's Shutdown would
	// wait for.
	defer c.CloseIdleConnections()
	req := &client.KickoffRequest{Level: cfg.level}
	if cfg.level == fhirbulk.LevelGroup {
		req.GroupID = "all"
	}
	kickoffURL, err := c.KickoffURL(req)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(stderr, "kick-off: GET %s\n", kickoffURL)
	job, err := c.Kickoff(ctx, req)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(stderr, "kick-off: 202 Accepted, status URL %s\n", job.StatusURL)

	polls := 0
	st, err := c.Wait(ctx, job.StatusURL, func(s *client.Status) {
		polls++
		fmt.Fprintf(stderr, "poll %d: 202 Accepted, X-Progress %q, Retry-After %v\n", polls, s.Progress, s.RetryAfter)
	})
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(stderr, "poll %d: 200 OK, export complete\n", polls+1)
	m := st.Manifest
	indented, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(stdout, "Manifest:\n%s\n\n", indented)

	downloadDir, err := os.MkdirTemp("", "bulkexport-demo-download-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(downloadDir)
	downloads, err := c.Download(ctx, m, downloadDir, nil)
	if err != nil {
		return nil, err
	}
	res = &result{manifest: m}
	for _, d := range downloads {
		if err := checkTypes(d); err != nil {
			return nil, err
		}
		fmt.Fprintf(stderr, "download: %s: %d resources, %d bytes\n", d.URL, d.Lines, d.Bytes)
		res.files = append(res.files, file{kind: d.Kind, typ: d.Type, name: filepath.Base(d.Path), count: d.Lines, bytes: d.Bytes})
	}
	printTable(stdout, res.files)
	return res, nil
}

// checkTypes checks that every line of a downloaded file is a resource of
// the manifest entry's type (the client has checked the count).
func checkTypes(f client.File) error {
	in, err := os.Open(f.Path)
	if err != nil {
		return err
	}
	defer in.Close()
	br := bufio.NewReaderSize(in, 64<<10)
	for n := 1; ; n++ {
		line, err := br.ReadBytes('\n')
		if len(bytes.TrimSpace(line)) > 0 {
			var r struct {
				ResourceType string `json:"resourceType"`
			}
			if jerr := json.Unmarshal(line, &r); jerr != nil {
				return fmt.Errorf("download %s: line %d: %w", f.URL, n, jerr)
			}
			if r.ResourceType != f.Type {
				return fmt.Errorf("download %s: line %d is a %s, not a %s", f.URL, n, r.ResourceType, f.Type)
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

// printTable prints one row per file (type, count, bytes, file name) and
// a total.
func printTable(w io.Writer, files []file) {
	type row struct{ typ, count, bytes, name string }
	rows := []row{{"TYPE", "COUNT", "BYTES", "FILE"}}
	var count, size int64
	for _, f := range files {
		typ := f.typ
		if f.kind != "output" {
			typ += " (" + f.kind + ")"
		}
		rows = append(rows, row{typ, strconv.FormatInt(f.count, 10), strconv.FormatInt(f.bytes, 10), f.name})
		count += f.count
		size += f.bytes
	}
	rows = append(rows, row{"TOTAL", strconv.FormatInt(count, 10), strconv.FormatInt(size, 10), fmt.Sprintf("%d files", len(files))})
	var wt, wc, wb int
	for _, r := range rows {
		wt, wc, wb = max(wt, len(r.typ)), max(wc, len(r.count)), max(wb, len(r.bytes))
	}
	for _, r := range rows {
		fmt.Fprintf(w, "%-*s  %*s  %*s  %s\n", wt, r.typ, wc, r.count, wb, r.bytes, r.name)
	}
}
