// Package exampleserver wires a complete bulk export server out of the
// library's parts: a JobStore, a DirStorage, the synthetic dataset as the
// Source, wired by a bulkexport.Server, beside the host's own FHIR routes
// (metadata, Group and Patient reads). The example server and the demo
// both build theirs with New.
package exampleserver

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"time"

	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/examples/internal/dataset"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// StoreMemory names the MemoryStore: jobs live in memory and are lost on
// restart. The durable stores (SQLite, PostgreSQL) are opened with
// backends.OpenStore and passed in Config.JobStore.
const StoreMemory = "memory"

// Config describes a server. Addr and StorageDir (or Storage) are
// required.
type Config struct {
	// Addr is the host:port clients reach the server at; the FHIR base URL
	// is http://Addr/fhir (an unspecified host such as "" or 0.0.0.0 is
	// given as localhost).
	Addr string
	// BaseURL, if set, is the FHIR base URL the server announces (in
	// Content-Location, file URLs and the CapabilityStatement) in place of
	// http://Addr/fhir: its public URL behind a TLS-terminating proxy. Its
	// path must end in /fhir, where the server routes.
	BaseURL string
	// Clients maps client names to bearer tokens. Empty: no
	// authentication, every request is the anonymous client.
	Clients map[string]string
	// Patients is the size of the synthetic dataset.
	Patients int
	// Store names the JobStore when JobStore is nil: "memory" (the
	// default) is the only one New makes itself.
	Store string
	// JobStore is the job store (see backends.OpenStore). Default: a MemoryStore.
	JobStore bulkexport.JobStore
	// Pace pauses the Source after every patient it exports, so that a
	// small dataset makes a slow export (crash tests). Default: none. It
	// applies to the synthetic dataset only, not to Source.
	Pace time.Duration
	// Source, if set, is what the Worker exports from in place of the
	// synthetic dataset of Patients, for example a pgsource.Source loaded
	// with that dataset. The host's own reads (Patient, Group) and the
	// CapabilityStatement's types still come from the dataset, so Source
	// should serve the same data; no _typeFilter search parameters are
	// announced for it. Default: the dataset itself.
	Source bulkexport.Source
	// StorageDir is the directory export files are written to, when
	// Storage is nil.
	StorageDir string
	// Storage is where export files go (see backends.OpenStorage), for example a
	// blobstorage.Storage over a bucket. Default: a DirStorage over
	// StorageDir.
	Storage bulkexport.Storage
	// Downloads is the handler's download mode. Default:
	// bulkexport.DownloadProxy; DownloadSigned and DownloadRedirect need a
	// Storage that signs URLs (blobstorage over S3, GCS or Azure).
	Downloads bulkexport.DownloadMode
	// Logger receives the handler's and worker's logs. Default:
	// slog.Default().
	Logger *slog.Logger
	// MeterProvider and TracerProvider receive the handler's and the
	// worker's metrics and spans (docs/observability.md). Default: nil,
	// none.
	MeterProvider  metric.MeterProvider
	TracerProvider trace.TracerProvider
	// Metrics, if set, is served at /metrics (the Prometheus scrape
	// endpoint).
	Metrics http.Handler
	// Worker tunes the worker (nil: the library's defaults). Its Logger,
	// MeterProvider and TracerProvider default to the fields above.
	Worker *bulkexport.WorkerOptions
	// RetryAfter is the handler's Retry-After policy. Default:
	// bulkexport.DefaultRetryAfter.
	RetryAfter func(job *bulkexport.Job, now time.Time) time.Duration
	// Options holds the handler's other options (delete policy, manifest
	// version, status URL style, signing keys, caps...), copied. New sets
	// BaseURL, Types, Storage, OnQueued and, from the fields above,
	// Authenticate, Downloads, RetryAfter, Logger and the providers, over
	// what Options holds. Default: the library's defaults.
	Options *bulkexport.Options
}

// Server is a wired bulk export server. Exports.Serve serves Handler
// and runs the exports (or serve Handler yourself and call Exports.Run).
type Server struct {
	// Handler routes the host's own FHIR API (/fhir/metadata, GET
	// /fhir/Group, /fhir/Group/{id} and /fhir/Patient/{id}) beside the
	// bulk data routes (Exports.Register), sends any other request under
	// /fhir/ to the bulk data handler (which answers it with an
	// OperationOutcome: 404, or 405 with Allow) and answers anything else
	// with a 404 OperationOutcome.
	Handler http.Handler
	// Exports is the library's Server: the protocol handler and the
	// Worker that runs the export jobs.
	Exports *bulkexport.Server
	// BaseURL is the FHIR base URL, http://Addr/fhir.
	BaseURL string

	Dataset *dataset.Dataset
	Store   bulkexport.JobStore
	// Storage is the DirStorage New made from StorageDir; nil when
	// Config.Storage was given.
	Storage *bulkexport.DirStorage
	// Files is the storage in use: Config.Storage or Storage.
	Files bulkexport.Storage
}

// New builds a server from cfg. It starts nothing.
func New(cfg Config) (*Server, error) {
	base, err := BaseURL(cfg.Addr)
	if err != nil {
		return nil, err
	}
	if cfg.BaseURL != "" {
		u, err := url.Parse(cfg.BaseURL)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || !strings.HasSuffix(strings.TrimSuffix(u.Path, "/"), "/fhir") {
			return nil, fmt.Errorf("exampleserver: base URL %q: want an absolute http(s) URL ending in /fhir, without a query", cfg.BaseURL)
		}
		base = strings.TrimSuffix(cfg.BaseURL, "/")
	}
	if cfg.StorageDir == "" && cfg.Storage == nil {
		return nil, errors.New("exampleserver: no storage directory")
	}
	if cfg.Patients < 0 {
		return nil, fmt.Errorf("exampleserver: negative patient count %d", cfg.Patients)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	var store bulkexport.JobStore
	switch {
	case cfg.JobStore != nil:
		store = cfg.JobStore
	case cfg.Store == "" || cfg.Store == StoreMemory:
		store = bulkexport.NewMemoryStore()
	default:
		return nil, fmt.Errorf("exampleserver: unsupported store %q (New makes only %q; open others with backends.OpenStore)", cfg.Store, StoreMemory)
	}
	var dir *bulkexport.DirStorage
	storage := cfg.Storage
	if storage == nil {
		if dir, err = bulkexport.NewDirStorage(cfg.StorageDir); err != nil {
			return nil, err
		}
		storage = dir
	}
	ds := dataset.New(cfg.Patients)

	var wopts bulkexport.WorkerOptions
	if cfg.Worker != nil {
		wopts = *cfg.Worker
	}
	if wopts.Logger == nil {
		wopts.Logger = log
	}
	if wopts.MeterProvider == nil {
		wopts.MeterProvider = cfg.MeterProvider
	}
	if wopts.TracerProvider == nil {
		wopts.TracerProvider = cfg.TracerProvider
	}
	var src bulkexport.Source = ds
	switch {
	case cfg.Source != nil && cfg.Pace > 0:
		return nil, errors.New("exampleserver: Pace applies to the synthetic dataset, not to a Source of the host's")
	case cfg.Source != nil:
		src = cfg.Source
	case cfg.Pace > 0:
		src = pacedSource{Dataset: ds, pace: cfg.Pace}
	}
	opts := &bulkexport.Options{}
	if cfg.Options != nil {
		*opts = *cfg.Options
	}
	opts.BaseURL, opts.Logger = base, log
	if cfg.Downloads != bulkexport.DownloadProxy {
		opts.Downloads = cfg.Downloads
	}
	if cfg.RetryAfter != nil {
		opts.RetryAfter = cfg.RetryAfter
	}
	if cfg.MeterProvider != nil {
		opts.MeterProvider = cfg.MeterProvider
	}
	if cfg.TracerProvider != nil {
		opts.TracerProvider = cfg.TracerProvider
	}
	if len(cfg.Clients) > 0 {
		auth, err := BearerAuth(cfg.Clients)
		if err != nil {
			return nil, err
		}
		opts.Authenticate = auth
	}
	// One wiring point: the handler lists the types, Groups and searches
	// of the very Source the Worker exports from (the paced one too).
	exports, err := bulkexport.NewServer(bulkexport.Config{Store: store, Source: src, Storage: storage, Options: *opts, Worker: wopts})
	if err != nil {
		return nil, err
	}
	bulk := exports.Handler()
	metadata, err := capabilityStatement(bulk, ds, cfg.Source == nil, base, len(cfg.Clients) > 0)
	if err != nil {
		return nil, err
	}

	mux := http.NewServeMux()
	if err := exports.Register(mux); err != nil {
		exports.Close()
		return nil, err
	}
	// The host's own FHIR API at the same base: the bulk data routes are
	// method-qualified, so GET /fhir/Patient/$export reaches the export
	// handler and GET /fhir/Patient/{id} the read.
	mux.Handle("/fhir/metadata", metadataHandler(metadata))
	reads := &hostReads{ds: ds, base: base, auth: opts.Authenticate}
	mux.HandleFunc("GET /fhir/Group", reads.groupSearch)
	mux.HandleFunc("GET /fhir/Group/{id}", reads.groupRead)
	mux.HandleFunc("GET /fhir/Patient/{id}", reads.patientRead)
	// Anything else under the base (an unknown operation, PUT on
	// $export) gets the handler's OperationOutcome.
	mux.Handle("/fhir/", exports)
	if cfg.Metrics != nil {
		mux.Handle("/metrics", cfg.Metrics)
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeOutcome(w, http.StatusNotFound, fhirbulk.IssueNotFound, "nothing here; the FHIR base URL is "+base)
	})
	return &Server{Handler: mux, Exports: exports, BaseURL: base, Dataset: ds, Store: store, Storage: dir, Files: storage}, nil
}

// BaseURL returns the FHIR base URL of a server reached at addr (host:port).
func BaseURL(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil || port == "" {
		return "", fmt.Errorf("exampleserver: address %q is not host:port", addr)
	}
	if ip := net.ParseIP(host); host == "" || ip != nil && ip.IsUnspecified() {
		host = "localhost"
	}
	return "http://" + net.JoinHostPort(host, port) + "/fhir", nil
}

// BearerAuth returns an Options.Authenticate hook that accepts
// "Authorization: Bearer <token>" with one of the clients' tokens and
// answers the client's name. Anything else is an error wrapping
// bulkexport.ErrUnauthorized (401 with an OperationOutcome).
func BearerAuth(clients map[string]string) (func(*http.Request) (string, error), error) {
	type client struct{ name, token string }
	var list []client
	seen := map[string]string{}
	for name, token := range clients {
		if name == "" || token == "" {
			return nil, errors.New("exampleserver: clients need a name and a token")
		}
		if other, ok := seen[token]; ok {
			return nil, fmt.Errorf("exampleserver: clients %q and %q share a token", other, name)
		}
		seen[token] = name
		list = append(list, client{name, token})
	}
	return func(r *http.Request) (string, error) {
		scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
		token = strings.TrimSpace(token)
		if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
			return "", fmt.Errorf("no bearer token: %w", bulkexport.ErrUnauthorized)
		}
		match := ""
		for _, c := range list {
			// Compare every token in constant time, so that timing tells
			// nothing about which one (if any) matched.
			if subtle.ConstantTimeCompare([]byte(c.token), []byte(token)) == 1 {
				match = c.name
			}
		}
		if match == "" {
			return "", fmt.Errorf("unknown bearer token: %w", bulkexport.ErrUnauthorized)
		}
		return match, nil
	}, nil
}

// capabilityStatement builds the server's CapabilityStatement: a minimal
// R4 one listing the exported types and their _typeFilter search
// parameters (those of the dataset, when it is the Source: searches is
// true), with the library's bulk data fragment merged in.
func capabilityStatement(bulk *bulkexport.Handler, ds *dataset.Dataset, searches bool, base string, auth bool) ([]byte, error) {
	var resources []any
	types, err := ds.ResourceTypes(context.Background(), fhirbulk.LevelSystem)
	if err != nil {
		return nil, err
	}
	for _, typ := range types {
		res := map[string]any{"type": typ}
		var params []any
		for _, p := range dataset.SearchParams(typ) {
			if !searches {
				break
			}
			params = append(params, map[string]any{"name": p, "type": "token"})
		}
		if params != nil {
			res["searchParam"] = params
		}
		resources = append(resources, res)
	}
	// Group: read and search (groupReads); MergeInto adds its $export.
	resources = append(resources, map[string]any{
		"type":        "Group",
		"interaction": []any{map[string]any{"code": "read"}, map[string]any{"code": "search-type"}},
		"searchParam": []any{map[string]any{"name": "name", "type": "string"}},
	})
	rest := map[string]any{"mode": "server", "resource": resources}
	if auth {
		rest["security"] = map[string]any{"description": "Send Authorization: Bearer <token> on every bulk data request, file downloads included."}
	}
	cs := map[string]any{
		"resourceType": "CapabilityStatement",
		"status":       "active",
		"date":         time.Now().UTC().Format("2006-01-02"),
		"publisher":    "bulkexport examples",
		"kind":         "instance",
		"software":     map[string]any{"name": "bulkexport example server"},
		"implementation": map[string]any{
			"description": "FHIR Bulk Data export over a synthetic dataset",
			"url":         base,
		},
		"fhirVersion": "4.0.1",
		"format":      []any{"json"},
		"rest":        []any{rest},
	}
	bulk.Capability().MergeInto(cs)
	return json.Marshal(cs)
}

// metadataHandler serves GET [base]/metadata. It needs no token, as FHIR
// clients read it before they authenticate.
func metadataHandler(body []byte) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			writeOutcome(w, http.StatusMethodNotAllowed, fhirbulk.IssueNotSupported, "method not allowed; use GET")
			return
		}
		w.Header().Set("Content-Type", "application/fhir+json")
		w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		if r.Method == http.MethodHead {
			return
		}
		_, _ = w.Write(body)
	})
}

func writeOutcome(w http.ResponseWriter, status int, code fhirbulk.IssueType, msg string) {
	b, _ := json.Marshal(fhirbulk.NewOutcome(fhirbulk.SeverityError, code, msg))
	w.Header().Set("Content-Type", "application/fhir+json")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}
