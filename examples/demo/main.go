// Command demo runs one bulk export end to end, in one process: it starts
// the example server on a free loopback port with a temporary storage
// directory, then acts as a client over plain HTTP (net/http) — kick-off,
// polling that honours Retry-After, manifest, download of every file — and
// prints the manifest and a table of the files to stdout. What it does step
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
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/exampleserver"
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
	level    bulkexport.Level
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
	cfg := config{patients: *patients, level: bulkexport.Level(*level)}
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
	manifest *bulkexport.Manifest
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
	serveDone := make(chan error, 1)
	go func() { serveDone <- httpSrv.Serve(ln) }()
	workerCtx, stopWorker := context.WithCancel(context.Background())
	workerDone := make(chan error, 1)
	go func() { workerDone <- srv.Worker.Run(workerCtx) }()
	defer func() {
		shutdownCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		serr := httpSrv.Shutdown(shutdownCtx)
		if e := <-serveDone; !errors.Is(e, http.ErrServerClosed) {
			serr = errors.Join(serr, e)
		}
		stopWorker()
		err = errors.Join(err, serr, <-workerDone)
	}()
	fmt.Fprintf(stderr, "server: base URL %s, %d patients, files in %s\n", srv.BaseURL, cfg.patients, dir)

	c := &client{http: &http.Client{Timeout: time.Minute}, log: stderr}
	kickoff := srv.BaseURL + "/$export"
	switch cfg.level {
	case bulkexport.LevelPatient:
		kickoff = srv.BaseURL + "/Patient/$export"
	case bulkexport.LevelGroup:
		kickoff = srv.BaseURL + "/Group/all/$export"
	}
	status, err := c.kickoff(ctx, kickoff)
	if err != nil {
		return nil, err
	}
	body, err := c.poll(ctx, status)
	if err != nil {
		return nil, err
	}
	var m bulkexport.Manifest
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, fmt.Errorf("the manifest is not valid JSON: %w", err)
	}
	var indented bytes.Buffer
	if err := json.Indent(&indented, body, "", "  "); err != nil {
		return nil, err
	}
	fmt.Fprintf(stdout, "Manifest:\n%s\n\n", indented.Bytes())

	res = &result{manifest: &m}
	for _, list := range []struct {
		kind  string
		files []bulkexport.ManifestFile
	}{{"output", m.Output}, {"error", m.Error}, {"deleted", m.Deleted}} {
		for _, mf := range list.files {
			f, err := c.download(ctx, mf)
			if err != nil {
				return nil, err
			}
			f.kind = list.kind
			res.files = append(res.files, f)
		}
	}
	printTable(stdout, res.files)
	return res, nil
}

// client is a minimal bulk data client over net/http.
type client struct {
	http *http.Client
	log  io.Writer
}

// maxPolls bounds the polling loop; with waits of at most a second, it
// gives up after about ten minutes.
const maxPolls = 600

func (c *client) get(ctx context.Context, url, accept string, prefer bool) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", accept)
	if prefer {
		req.Header.Set("Prefer", "respond-async")
	}
	return c.http.Do(req)
}

// kickoff starts the export and returns the status URL.
func (c *client) kickoff(ctx context.Context, url string) (string, error) {
	fmt.Fprintf(c.log, "kick-off: GET %s\n", url)
	resp, err := c.get(ctx, url, "application/fhir+json", true)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusAccepted {
		return "", fmt.Errorf("kick-off: %s: %s", resp.Status, diagnostics(body))
	}
	status := resp.Header.Get("Content-Location")
	if status == "" {
		return "", errors.New("kick-off: 202 without Content-Location")
	}
	fmt.Fprintf(c.log, "kick-off: 202 Accepted, status URL %s\n", status)
	return status, nil
}

// poll polls the status URL until the export completes and returns the
// manifest. It waits as Retry-After says, but never more than a second.
func (c *client) poll(ctx context.Context, status string) ([]byte, error) {
	for i := 1; i <= maxPolls; i++ {
		resp, err := c.get(ctx, status, "application/json", false)
		if err != nil {
			return nil, err
		}
		body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
		resp.Body.Close()
		if err != nil {
			return nil, err
		}
		switch resp.StatusCode {
		case http.StatusOK:
			fmt.Fprintf(c.log, "poll %d: 200 OK, export complete\n", i)
			return body, nil
		case http.StatusAccepted, http.StatusTooManyRequests:
			wait := retryAfter(resp.Header.Get("Retry-After"), time.Now())
			fmt.Fprintf(c.log, "poll %d: %s, X-Progress %q, Retry-After %q: next poll in %v\n",
				i, resp.Status, resp.Header.Get("X-Progress"), resp.Header.Get("Retry-After"), wait)
			t := time.NewTimer(wait)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return nil, ctx.Err()
			}
		default:
			return nil, fmt.Errorf("poll: %s: %s", resp.Status, diagnostics(body))
		}
	}
	return nil, fmt.Errorf("poll: the export did not complete after %d polls", maxPolls)
}

// retryAfter turns a Retry-After header (delay-seconds or an HTTP date)
// into a wait between 100 ms and 1 s; without a usable header it is 1 s.
func retryAfter(h string, now time.Time) time.Duration {
	d := time.Second
	if secs, err := strconv.Atoi(strings.TrimSpace(h)); err == nil {
		d = time.Duration(secs) * time.Second
	} else if t, err := http.ParseTime(h); err == nil {
		d = t.Sub(now)
	}
	return min(max(d, 100*time.Millisecond), time.Second)
}

// download fetches one file, counting its lines and bytes and checking
// that every line is a resource of the manifest entry's type.
func (c *client) download(ctx context.Context, mf bulkexport.ManifestFile) (file, error) {
	f := file{typ: mf.Type, name: mf.URL[strings.LastIndexByte(mf.URL, '/')+1:]}
	resp, err := c.get(ctx, mf.URL, "application/fhir+ndjson", false)
	if err != nil {
		return f, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		return f, fmt.Errorf("download %s: %s: %s", mf.URL, resp.Status, diagnostics(body))
	}
	// The transport asks for gzip and decompresses transparently.
	br := bufio.NewReaderSize(resp.Body, 64<<10)
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			// A resource longer than the buffer: read the rest of it.
			var rest []byte
			rest, err = br.ReadBytes('\n')
			line = append(append([]byte(nil), line...), rest...)
		}
		if len(line) > 0 {
			f.bytes += int64(len(line))
			var r struct {
				ResourceType string `json:"resourceType"`
			}
			if jerr := json.Unmarshal(line, &r); jerr != nil {
				return f, fmt.Errorf("download %s: line %d: %w", mf.URL, f.count+1, jerr)
			}
			if r.ResourceType != mf.Type {
				return f, fmt.Errorf("download %s: line %d is a %s, not a %s", mf.URL, f.count+1, r.ResourceType, mf.Type)
			}
			f.count++
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return f, fmt.Errorf("download %s: %w", mf.URL, err)
		}
	}
	if mf.Count != nil && *mf.Count != f.count {
		return f, fmt.Errorf("download %s: %d resources, the manifest says %d", mf.URL, f.count, *mf.Count)
	}
	fmt.Fprintf(c.log, "download: %s: %d resources, %d bytes\n", mf.URL, f.count, f.bytes)
	return f, nil
}

// diagnostics summarises an OperationOutcome body for an error message.
func diagnostics(body []byte) string {
	var oo bulkexport.OperationOutcome
	if json.Unmarshal(body, &oo) == nil && len(oo.Issue) > 0 {
		var parts []string
		for _, is := range oo.Issue {
			parts = append(parts, fmt.Sprintf("%s %s: %s", is.Severity, is.Code, is.Diagnostics))
		}
		return strings.Join(parts, "; ")
	}
	if len(body) > 200 {
		body = body[:200]
	}
	return strings.TrimSpace(string(body))
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
