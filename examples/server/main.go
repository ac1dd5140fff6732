// Command server is an example FHIR Bulk Data export server over a
// synthetic dataset (see examples/internal/dataset).
//
// Usage:
//
//	server [-addr 127.0.0.1:8080] [-clients NAME=TOKEN,...] [-patients 100] [-data memory|postgres:URL]
//	       [-store sqlite:./bulkexport.db|memory|postgres:URL] [-pg-schema NAME]
//	       [-storage dir:PATH|blob:URL] [-downloads proxy|signed|redirect] [-log-level info]
//	       [-lease 30s] [-checkpoint 5s] [-max-attempts 5] [-pace 0] [-partitions 8] [-unit-concurrency 2]
//	       [-read-header-timeout 10s] [-read-timeout 30s] [-write-timeout 30s]
//	       [-download-timeout 1h] [-idle-timeout 2m] [-max-header-bytes 65536]
//	       [-profile ehealth|ig] [-delete-policy ehealth|ig] [-manifest stu3|stu4]
//	       [-status-url query|path] [-signing-key HEX|@FILE] [-signed-url-expiry 5m]
//	       [-poll-limit off|on|BURST/RATE] [-max-active-jobs 10] [-max-finished-jobs 100]
//	       [-reuse-in-flight] [-allow-missing-respond-async] [-disable-separate-export-status]
//	       [-retry-after adaptive|DURATION] [-cancelled-retention 24h] [-finished-job-cache 0s] [-manifest-page-size 1000]
//	       [-max-body-bytes 1048576] [-max-param-length 8192] [-max-param-values 1000]
//	       [-retention 24h] [-max-file-resources 100000] [-max-file-bytes 268435456]
//	       [-max-files-per-job 10000]
//
// The flags from -profile on change what a client sees (protocol.go);
// their defaults are the library's, the eHealth behaviour, and -profile ig
// makes the HL7 Bulk Data IG's choices.
//
// It prints one line, "bulkexport example server: base URL http://ADDR/fhir",
// to stdout, logs to stderr, and shuts down gracefully on SIGINT or
// SIGTERM. With a durable store (SQLite, the default, or PostgreSQL) and
// the same -storage, a restarted server resumes the jobs it was running
// from their last checkpoint, even after kill -9. It serves its metrics in
// the Prometheus format at http://ADDR/metrics (docs/observability.md).
// Then, for example:
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

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/backends"
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
	addr     string
	baseURL  string
	clients  map[string]string
	patients int
	// pgData is the database URL of -data postgres:URL ("": in memory).
	pgData     string
	store      backends.StoreSpec
	pgSchema   string
	storageDir string
	// storageURL is the bucket URL of -storage blob:URL ("" with dir:).
	storageURL string
	downloads  bulkexport.DownloadMode
	logLevel   slog.Level
	// Worker settings, for crash tests.
	lease       time.Duration
	checkpoint  time.Duration
	maxAttempts int
	pace        time.Duration
	// Partitioned export (bulkexport.Partitioner).
	partitions      int
	unitConcurrency int
	// HTTP server limits (see timeouts).
	timeouts timeouts
	// protocol holds the flags a client can observe (protocol.go).
	protocol protocol
}

// timeouts are the HTTP server's limits. Zero durations mean none.
type timeouts struct {
	// readHeader bounds reading a request's headers (ReadHeaderTimeout).
	readHeader time.Duration
	// body bounds reading a request's body, from the end of its headers:
	// a per-request read deadline, lifted once the body is read, so that
	// it never cuts a long download short (http.Server.ReadTimeout would:
	// its expiry cancels the context of a request still being answered).
	body time.Duration
	// write bounds writing an answer (WriteTimeout): every answer but a
	// file download.
	write time.Duration
	// download replaces write for file downloads ([base]/bulkfiles/...),
	// which may stream gigabytes.
	download time.Duration
	// idle bounds how long a keep-alive connection waits for its next
	// request (IdleTimeout).
	idle time.Duration
	// maxHeaderBytes caps the size of a request's headers
	// (MaxHeaderBytes); 0 is net/http's default, 1 MiB.
	maxHeaderBytes int
}

func parseFlags(args []string, stderr io.Writer) (*options, error) {
	fs := flag.NewFlagSet("server", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:8080", "`host:port` to listen on")
	baseURL := fs.String("base-url", "", "public FHIR base `URL` to announce (Content-Location, file URLs, metadata), e.g. https://fhir.example.org/fhir behind a TLS-terminating proxy; its path must end in /fhir; default: http://ADDR/fhir")
	clients := fs.String("clients", "", "comma-separated `NAME=TOKEN` pairs of clients allowed in with \"Authorization: Bearer TOKEN\"; none: no authentication")
	patients := fs.Int("patients", 100, "number of patients in the synthetic dataset")
	data := fs.String("data", "memory", "where the synthetic dataset is exported from: memory (generated on the fly), or postgres:URL (loaded at start into the table "+pgDataTable+" of that database, replacing its content, and exported by examples/internal/pgsource; see docs/pgsource.md)")
	store := fs.String("store", backends.DefaultStore, "job store: sqlite:PATH (a SQLite file, created if missing), memory, or postgres:URL")
	pgSchema := fs.String("pg-schema", "", "PostgreSQL schema of the jobs table with -store postgres:URL, created if missing; default: the search_path")
	storage := fs.String("storage", "dir:./bulkexport-data", "where export files go: dir:PATH, or blob:URL for a bucket (file://, mem://; s3://, gs://, azblob:// in a build with -tags cloud; see docs/storage.md)")
	downloads := fs.String("downloads", "proxy", "how clients download files: proxy (this server streams them), signed (the manifest lists presigned bucket URLs) or redirect (file URLs redirect to presigned bucket URLs); signed and redirect need -storage blob: on S3, GCS or Azure")
	level := fs.String("log-level", "info", "log level: debug, info, warn or error")
	lease := fs.Duration("lease", 30*time.Second, "worker lease: a job whose server died is taken over by another worker this long after its last renewal")
	checkpoint := fs.Duration("checkpoint", 5*time.Second, "least time between two recorded checkpoints of a resource type; a resumed job redoes at most this much work per type")
	maxAttempts := fs.Int("max-attempts", 5, "a job claimed this many times without finishing is failed")
	pace := fs.Duration("pace", 0, "pause after every patient an export visits, to make exports slow (testing); 0: none")
	partitions := fs.Int("partitions", bulkexport.DefaultPartitions, "split each resource type of an export into at most this many parts (ranges of patients) that every server sharing the job store exports at once; 1: no splitting")
	unitConcurrency := fs.Int("unit-concurrency", bulkexport.DefaultUnitConcurrency, "parts of split exports (of any server's jobs) this server exports at once")
	readHeader := fs.Duration("read-header-timeout", 10*time.Second, "longest time to read a request's headers; 0: none")
	readBody := fs.Duration("read-timeout", 30*time.Second, "longest time to read a request's body (POST kick-off or status), counted from the end of its headers; a body cut off gets 408 and the connection is closed; 0: none")
	write := fs.Duration("write-timeout", 30*time.Second, "longest time to write an answer other than a file download; 0: none")
	download := fs.Duration("download-timeout", time.Hour, "longest time to write a file download (replaces -write-timeout for [base]/bulkfiles/...); 0: none")
	idle := fs.Duration("idle-timeout", 2*time.Minute, "an idle keep-alive connection is closed after this long; 0: none")
	maxHeader := fs.Int("max-header-bytes", 64<<10, "largest request header block, in bytes (net/http allows 4 KiB more); larger gets 431; 0: net/http's default, 1 MiB")
	proto := defineProtocolFlags(fs)
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
	o := &options{addr: *addr, baseURL: *baseURL, patients: *patients, pgSchema: *pgSchema,
		lease: *lease, checkpoint: *checkpoint, maxAttempts: *maxAttempts, pace: *pace,
		partitions: *partitions, unitConcurrency: *unitConcurrency,
		timeouts: timeouts{readHeader: *readHeader, body: *readBody, write: *write, download: *download,
			idle: *idle, maxHeaderBytes: *maxHeader}}
	var err error
	if o.clients, err = parseClients(*clients); err != nil {
		return bad("-clients: %v", err)
	}
	if o.patients < 0 {
		return bad("-patients: must not be negative")
	}
	if o.pgData, err = parseData(*data); err != nil {
		return bad("-data: %v", err)
	}
	if o.pgData != "" && o.pace > 0 {
		return bad("-pace: only with -data memory")
	}
	if o.store, err = backends.ParseStoreSpec(*store); err != nil {
		return bad("-store: %v", err)
	}
	if o.pgSchema != "" && o.store.Kind != "postgres" {
		return bad("-pg-schema: only with -store postgres:URL")
	}
	switch {
	case o.lease <= 0:
		return bad("-lease: must be positive")
	case o.checkpoint <= 0:
		return bad("-checkpoint: must be positive")
	case o.maxAttempts <= 0:
		return bad("-max-attempts: must be positive")
	case o.pace < 0:
		return bad("-pace: must not be negative")
	case o.partitions <= 0:
		return bad("-partitions: must be positive")
	case o.unitConcurrency <= 0:
		return bad("-unit-concurrency: must be positive")
	case o.timeouts.readHeader < 0:
		return bad("-read-header-timeout: must not be negative")
	case o.timeouts.body < 0:
		return bad("-read-timeout: must not be negative")
	case o.timeouts.write < 0:
		return bad("-write-timeout: must not be negative")
	case o.timeouts.download < 0:
		return bad("-download-timeout: must not be negative")
	case o.timeouts.idle < 0:
		return bad("-idle-timeout: must not be negative")
	case o.timeouts.maxHeaderBytes < 0:
		return bad("-max-header-bytes: must not be negative")
	}
	spec, err := backends.ParseStorageSpec(*storage)
	if err != nil {
		return bad("-storage: %v", err)
	}
	o.storageDir, o.storageURL = spec.Path, spec.URL
	switch *downloads {
	case "proxy":
		o.downloads = bulkexport.DownloadProxy
	case "signed":
		o.downloads = bulkexport.DownloadSigned
	case "redirect":
		o.downloads = bulkexport.DownloadRedirect
	default:
		return bad("-downloads: %q is not one of proxy, signed, redirect", *downloads)
	}
	if o.downloads != bulkexport.DownloadProxy && o.storageURL == "" {
		return bad("-downloads %s: needs -storage blob:URL", *downloads)
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if o.protocol, err = proto.parse(set); err != nil {
		return bad("%v", err)
	}
	if o.protocol.signingKey != nil && o.downloads != bulkexport.DownloadProxy {
		return bad("-signing-key: only with -downloads proxy (-downloads %s presigns bucket URLs)", *downloads)
	}
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
	meters, metrics, err := newMetrics() // served at /metrics
	if err != nil {
		return err
	}
	defer func() { _ = meters.Shutdown(context.Background()) }()

	store, closeStore, err := backends.OpenStore(ctx, o.store, &backends.StoreOptions{PGSchema: o.pgSchema})
	if err != nil {
		return err
	}
	defer closeStore()
	var files bulkexport.Storage // nil: a DirStorage over storageDir
	if o.storageURL != "" {
		spec := backends.StorageSpec{Kind: "blob", URL: o.storageURL}
		s, closeFiles, err := backends.OpenStorage(ctx, spec)
		if err != nil {
			return err
		}
		defer closeFiles()
		if c, ok := s.(interface{ CheckSigning(context.Context) error }); ok && o.downloads != bulkexport.DownloadProxy {
			if err := c.CheckSigning(ctx); err != nil {
				return fmt.Errorf("-downloads: %w", err)
			}
		}
		files = s
	}
	var src bulkexport.Source // nil: the dataset in memory
	if o.pgData != "" {
		s, closeSource, err := openPGSource(ctx, o.pgData, o.patients)
		if err != nil {
			return err
		}
		defer closeSource()
		src = s
	}
	ln, err := net.Listen("tcp", o.addr)
	if err != nil {
		return err
	}
	defer ln.Close()
	workerOpts := &bulkexport.WorkerOptions{
		Lease:              o.lease,
		CheckpointInterval: o.checkpoint,
		MaxAttempts:        o.maxAttempts,
		Partitions:         o.partitions,
		UnitConcurrency:    o.unitConcurrency,
	}
	o.protocol.workerOptions(workerOpts)
	srv, err := exampleserver.New(exampleserver.Config{
		Addr:       ln.Addr().String(),
		BaseURL:    o.baseURL,
		Clients:    o.clients,
		Patients:   o.patients,
		JobStore:   store,
		StorageDir: o.storageDir,
		Storage:    files,
		Downloads:  o.downloads,
		Logger:     log,
		Pace:       o.pace,
		Source:     src,

		MeterProvider: meters,
		Metrics:       metrics,
		Worker:        workerOpts,
		Options:       o.protocol.handlerOptions(),
		RetryAfter:    o.protocol.retryAfterPolicy(),
	})
	if err != nil {
		return err
	}
	httpSrv := newHTTPServer(srv.Handler, o.timeouts)
	httpSrv.ErrorLog = slog.NewLogLogger(log.Handler(), slog.LevelWarn)

	fmt.Fprintf(stdout, "bulkexport example server: base URL %s\n", srv.BaseURL)
	storageDesc := backends.StorageSpec{Kind: "blob", URL: o.storageURL}.String() // no query: no credentials in the logs
	if srv.Storage != nil {
		storageDesc = "dir:" + srv.Storage.Root()
	}
	log.Info("serving", "addr", ln.Addr().String(), "patients", o.patients, "data", dataDesc(o.pgData), "storage", storageDesc, "downloads", o.downloads.String(),
		"store", o.store.String(), "clients", len(o.clients), "lease", o.lease, "checkpoint", o.checkpoint,
		"profile", o.protocol.profile, "signed_file_urls", o.protocol.signingKey != nil)

	stopped := context.AfterFunc(ctx, func() { log.Info("shutting down") })
	defer stopped()
	// Serve answers requests and runs the exports until ctx ends, then
	// stops taking requests (finishing those in flight for up to 10 s),
	// hands running jobs back to the queue and closes.
	return srv.Exports.Serve(ctx, httpSrv, ln)
}

// newHTTPServer returns the http.Server for h with the limits t:
// ReadHeaderTimeout, WriteTimeout, IdleTimeout and MaxHeaderBytes, plus
// per-request deadlines (withDeadlines) for bodies and downloads. It sets
// no ReadTimeout: that one would also cut off long downloads.
func newHTTPServer(h http.Handler, t timeouts) *http.Server {
	return &http.Server{
		Handler:           withDeadlines(h, t),
		ReadHeaderTimeout: t.readHeader,
		WriteTimeout:      t.write,
		IdleTimeout:       t.idle,
		MaxHeaderBytes:    t.maxHeaderBytes,
	}
}

// filesPath is the path prefix of the file downloads.
const filesPath = "/fhir/bulkfiles/"

// withDeadlines sets a request's deadlines through
// http.ResponseController: a request with a body must deliver it within
// t.body (the deadline is lifted once it is read, so the answer itself is
// not cut short), and a file download may take t.download to write
// instead of the server's WriteTimeout.
func withDeadlines(h http.Handler, t timeouts) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rc := http.NewResponseController(w)
		if strings.HasPrefix(r.URL.Path, filesPath) {
			var dl time.Time // zero: none
			if t.download > 0 {
				dl = time.Now().Add(t.download)
			}
			_ = rc.SetWriteDeadline(dl)
		}
		if t.body > 0 && r.ContentLength != 0 && r.Body != nil && r.Body != http.NoBody {
			if rc.SetReadDeadline(time.Now().Add(t.body)) == nil {
				r = r.WithContext(r.Context()) // a copy: net/http's request keeps its own body
				r.Body = &deadlineBody{ReadCloser: r.Body, rc: rc}
			}
		}
		h.ServeHTTP(w, r)
	})
}

// deadlineBody lifts the read deadline once the body has been read to its
// end. (net/http then watches the connection for the client going away;
// a deadline left in place would end that watch by cancelling the
// request's context.)
type deadlineBody struct {
	io.ReadCloser
	rc   *http.ResponseController
	done bool
}

func (b *deadlineBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF && !b.done {
		b.done = true
		_ = b.rc.SetReadDeadline(time.Time{})
	}
	return n, err
}
