// Command chi shows the bulk export handler inside an existing
// github.com/go-chi/chi/v5 application: mounted under the prefix
// /api/fhir, next to the host's own FHIR routes, behind the host's own
// authentication middleware, which puts the client id in the request
// context for Options.Authenticate to read.
//
// Usage:
//
//	chi [-addr 127.0.0.1:8080] [-keys NAME=KEY,...] [-patients 100] [-storage PATH]
//
// It prints one line, "bulkexport chi example: base URL http://ADDR/api/fhir",
// and serves until SIGINT or SIGTERM. Then, for example:
//
//	curl -i -H 'X-API-Key: k-alice' -H 'Prefer: respond-async' 'http://127.0.0.1:8080/api/fhir/Patient/$export?_type=Patient'
//	curl -i -H 'X-API-Key: k-alice' 'http://127.0.0.1:8080/api/fhir/Patient/p-1'
package main

import (
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
	"strings"
	"syscall"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "chi:", err)
		os.Exit(2)
	}
}

// config is what newApp needs.
type config struct {
	// baseURL is the absolute FHIR base URL: http://ADDR/api/fhir.
	baseURL string
	// keys maps API keys to client ids.
	keys       map[string]string
	patients   int
	storageDir string
	logger     *slog.Logger
	worker     bulkexport.WorkerOptions
}

// app is the host application: its router, with the bulk export
// Server's routes inside.
type app struct {
	router  http.Handler
	exports *bulkexport.Server
}

func newApp(cfg config) (*app, error) {
	ds := dataset.New(cfg.patients)
	storage, err := bulkexport.NewDirStorage(cfg.storageDir)
	if err != nil {
		return nil, err
	}
	wo := cfg.worker
	wo.Logger = cfg.logger
	exports, err := bulkexport.NewServer(bulkexport.Config{
		Store:   bulkexport.NewMemoryStore(),
		Source:  ds,
		Storage: storage,
		Options: bulkexport.Options{
			// The full base URL, prefix included: the handler takes
			// request paths relative to its path, so no StripPrefix is
			// needed.
			BaseURL:      cfg.baseURL,
			Authenticate: clientFromContext,
			Logger:       cfg.logger,
		},
		Worker: wo,
	})
	if err != nil {
		return nil, err
	}
	bulk := exports.Handler()
	metadata, err := capabilityStatement(bulk, cfg.baseURL)
	if err != nil {
		return nil, err
	}

	r := chi.NewRouter()
	r.Use(middleware.Recoverer)
	r.Get("/healthz", func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "ok\n") })
	r.Route("/api/fhir", func(r chi.Router) {
		// FHIR clients read the CapabilityStatement before they
		// authenticate.
		r.Get("/metadata", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/fhir+json")
			_, _ = w.Write(metadata)
		})
		r.Group(func(r chi.Router) {
			r.Use(apiKeyAuth(cfg.keys))
			r.Get("/Patient/{id}", readPatient(ds)) // the host's own FHIR API
			mountBulkExport(r, exports)
		})
	})
	return &app{router: r, exports: exports}, nil
}

// mountBulkExport routes the bulk data endpoints to the Server, method by
// method, from its route list. The routes' Endpoint paths are relative to
// the base, as this sub-router is; chi prefers their static segments
// ($export) to the parameters of the host's own routes (/Patient/{id}),
// so both coexist. chi routes HEAD only where it is registered, so every
// GET route registers it too (downloads answer HEAD).
func mountBulkExport(r chi.Router, exports *bulkexport.Server) {
	for _, rt := range exports.Routes() {
		r.Method(rt.Method, rt.Endpoint, exports)
		if rt.Method == http.MethodGet {
			r.Method(http.MethodHead, rt.Endpoint, exports)
		}
	}
}

// clientKey is the context key of the host's authenticated client id.
type clientKey struct{}

// apiKeyAuth is the host's authentication middleware: a known X-API-Key
// header puts its client id in the request context; anything else is
// answered 401 before it reaches a handler.
func apiKeyAuth(keys map[string]string) func(http.Handler) http.Handler {
	return func(next http.Handler) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			client, ok := keys[r.Header.Get("X-API-Key")]
			if !ok {
				writeOutcome(w, http.StatusUnauthorized, fhirbulk.IssueLogin, "a valid X-API-Key header is required")
				return
			}
			next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), clientKey{}, client)))
		})
	}
}

// clientFromContext is Options.Authenticate: the client id the middleware
// stored. Every job belongs to it; other clients get 404 for it.
func clientFromContext(r *http.Request) (string, error) {
	client, ok := r.Context().Value(clientKey{}).(string)
	if !ok {
		return "", bulkexport.ErrUnauthorized
	}
	return client, nil
}

// readPatient is one of the host's own routes: GET /api/fhir/Patient/{id}.
func readPatient(ds *dataset.Dataset) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		b, err := ds.Resource("Patient", chi.URLParam(r, "id"))
		if err != nil {
			writeOutcome(w, http.StatusNotFound, fhirbulk.IssueNotFound, "no such Patient")
			return
		}
		w.Header().Set("Content-Type", "application/fhir+json")
		_, _ = w.Write(b)
	}
}

// capabilityStatement is the host's CapabilityStatement with the bulk data
// operations merged in.
func capabilityStatement(bulk *bulkexport.Handler, base string) ([]byte, error) {
	cs := map[string]any{
		"resourceType":   "CapabilityStatement",
		"status":         "active",
		"date":           "2026-01-01",
		"kind":           "instance",
		"fhirVersion":    "4.0.1",
		"format":         []any{"json"},
		"implementation": map[string]any{"description": "bulkexport chi example", "url": base},
		"rest": []any{map[string]any{"mode": "server", "resource": []any{
			map[string]any{"type": "Patient", "interaction": []any{map[string]any{"code": "read"}}},
		}}},
	}
	bulk.Capability().MergeInto(cs)
	return json.Marshal(cs)
}

func writeOutcome(w http.ResponseWriter, status int, code fhirbulk.IssueType, msg string) {
	b, _ := json.Marshal(fhirbulk.NewOutcome(fhirbulk.SeverityError, code, msg))
	w.Header().Set("Content-Type", "application/fhir+json")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// run parses the command line, serves until ctx is done and shuts down.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("chi", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", "127.0.0.1:8080", "`host:port` to listen on")
	keyList := fs.String("keys", "alice=k-alice,bob=k-bob", "comma-separated `NAME=KEY` pairs: clients and their X-API-Key")
	patients := fs.Int("patients", 100, "number of patients in the synthetic dataset")
	storageDir := fs.String("storage", "./bulkexport-data", "`directory` for export files")
	if err := fs.Parse(args); err != nil {
		return err
	}
	keys := map[string]string{}
	for _, pair := range strings.Split(*keyList, ",") {
		name, key, ok := strings.Cut(strings.TrimSpace(pair), "=")
		if !ok || name == "" || key == "" {
			return fmt.Errorf("-keys: %q is not NAME=KEY", pair)
		}
		keys[key] = name
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))

	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		return err
	}
	defer ln.Close()
	base := "http://" + ln.Addr().String() + "/api/fhir"
	a, err := newApp(config{baseURL: base, keys: keys, patients: *patients, storageDir: *storageDir, logger: log})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "bulkexport chi example: base URL %s\n", base)
	// Serve runs the exports beside the HTTP server and, when ctx ends,
	// stops taking requests, hands running jobs back and closes.
	return a.exports.Serve(ctx, &http.Server{Handler: a.router, ReadHeaderTimeout: 10 * time.Second}, ln)
}
