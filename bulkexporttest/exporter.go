package bulkexporttest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// Exporter runs exports against any bulk export server over HTTP, the way
// a test wants them: kick off, wait, download, with every step checked and
// the test failed on anything unexpected. A Server embeds one; a host that
// tests its own wiring (its router, its authentication) points one at its
// own httptest.Server, or has Serve start one for a router that must know
// its base URL first:
//
//	e := bulkexporttest.Serve(t, "/api/fhir", func(base string) http.Handler { return newRouter(t, base) })
//	e.Header.Set("Authorization", "Bearer t0ken")
//	res := e.Export(t, "/Patient/$export?_type=Patient,Observation")
//
// Paths are relative to BaseURL. The zero Header and HTTPClient are fine.
type Exporter struct {
	// BaseURL is the server's FHIR base URL.
	BaseURL string
	// Header is added to every request (for example an Authorization
	// header).
	Header http.Header
	// HTTPClient sends the requests. Default: http.DefaultClient.
	HTTPClient *http.Client
}

// waitLimit bounds Wait: an export that takes longer fails the test.
const waitLimit = 30 * time.Second

// Kickoff sends a GET kick-off to path (relative to the base URL, such as
// "/$export?_type=Patient") with Prefer: respond-async, and returns the
// status URL. It fails the test unless the answer is 202.
func (e *Exporter) Kickoff(t testing.TB, path string) string {
	t.Helper()
	u, err := e.kickoff(context.Background(), http.MethodGet, path, nil)
	if err != nil {
		t.Fatalf("bulkexporttest: %v", err)
	}
	return u
}

// KickoffPOST sends a POST kick-off with a Parameters body (any value that
// encodes to one, such as a map or a json.RawMessage).
func (e *Exporter) KickoffPOST(t testing.TB, path string, parameters any) string {
	t.Helper()
	body, err := json.Marshal(parameters)
	if err != nil {
		t.Fatalf("bulkexporttest: %v", err)
	}
	u, err := e.kickoff(context.Background(), http.MethodPost, path, body)
	if err != nil {
		t.Fatalf("bulkexporttest: %v", err)
	}
	return u
}

func (e *Exporter) kickoff(ctx context.Context, method, path string, body []byte) (string, error) {
	req, err := http.NewRequestWithContext(ctx, method, e.BaseURL+path, bytes.NewReader(body))
	if err != nil {
		return "", err
	}
	setKickoffHeader(req.Header, body != nil)
	resp, b, err := e.send(req)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusAccepted {
		return "", fmt.Errorf("kick-off %s %s: %d %s", method, path, resp.StatusCode, b)
	}
	loc := resp.Header.Get("Content-Location")
	if loc == "" {
		return "", fmt.Errorf("kick-off %s %s: 202 without Content-Location", method, path)
	}
	return loc, nil
}

// setKickoffHeader sets the headers a kick-off sends: Prefer:
// respond-async, Accept: application/fhir+json, and Content-Type:
// application/fhir+json when it has a body.
func setKickoffHeader(h http.Header, body bool) {
	h.Set("Prefer", "respond-async")
	h.Set("Accept", "application/fhir+json")
	if body {
		h.Set("Content-Type", "application/fhir+json")
	}
}

// isKickoff reports whether a URL names an $export operation.
func isKickoff(u *url.URL) bool {
	return strings.HasSuffix(u.Path, "/$export")
}

// send sends req with the Exporter's Header, then the extra headers, and
// returns the response with its body read and closed. A key with no
// values removes the header.
func (e *Exporter) send(req *http.Request, extra ...http.Header) (*http.Response, []byte, error) {
	for _, h := range append([]http.Header{e.Header}, extra...) {
		for k, v := range h {
			if len(v) == 0 {
				req.Header.Del(k)
			} else {
				req.Header[http.CanonicalHeaderKey(k)] = v
			}
		}
	}
	c := e.HTTPClient
	if c == nil {
		c = http.DefaultClient
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, nil, fmt.Errorf("%s %s: %w", req.Method, req.URL, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, nil, fmt.Errorf("%s %s: %w", req.Method, req.URL, err)
	}
	return resp, b, nil
}

// Wait polls statusURL until the job leaves the queue and returns the
// status response's code and body (the manifest when 200). It polls every
// 10ms, ignoring Retry-After, and gives up, failing the test, after 30
// seconds.
func (e *Exporter) Wait(t testing.TB, statusURL string) (int, []byte) {
	t.Helper()
	code, body, err := e.wait(context.Background(), statusURL)
	if err != nil {
		t.Fatalf("bulkexporttest: %v", err)
	}
	return code, body
}

func (e *Exporter) wait(ctx context.Context, statusURL string) (int, []byte, error) {
	wctx, cancel := context.WithTimeout(ctx, waitLimit)
	defer cancel()
	for {
		req, err := http.NewRequestWithContext(wctx, http.MethodGet, statusURL, nil)
		if err != nil {
			return 0, nil, err
		}
		req.Header.Set("Accept", "application/json")
		resp, b, err := e.send(req)
		if wctx.Err() != nil {
			if ctx.Err() != nil {
				return 0, nil, fmt.Errorf("waiting for %s: %w", statusURL, ctx.Err())
			}
			return 0, nil, fmt.Errorf("%s still in progress after %v", statusURL, waitLimit)
		}
		if err != nil {
			return 0, nil, err
		}
		if resp.StatusCode != http.StatusAccepted {
			return resp.StatusCode, b, nil
		}
		select {
		case <-time.After(10 * time.Millisecond):
		case <-wctx.Done():
		}
	}
}

// Result is a finished export, downloaded.
type Result struct {
	StatusURL string
	Manifest  fhirbulk.Manifest
	// Output holds the resources of output[] by type, in file order.
	// Organized output (organizeOutputBy), whose files hold several types,
	// is under the key "".
	Output map[string][]json.RawMessage
	// Deleted holds the Bundles of deleted[]; Errors the OperationOutcomes
	// of error[].
	Deleted []json.RawMessage
	Errors  []json.RawMessage
}

// IDs returns the ids of the exported resources of typ, in order.
func (r *Result) IDs(typ string) []string {
	var ids []string
	for _, raw := range r.Output[typ] {
		var v struct {
			ID string `json:"id"`
		}
		_ = json.Unmarshal(raw, &v)
		ids = append(ids, v.ID)
	}
	return ids
}

// Resources returns the exported resources of typ decoded into maps, in
// order, for assertions on their content.
func (r *Result) Resources(typ string) []map[string]any {
	out := make([]map[string]any, 0, len(r.Output[typ]))
	for _, raw := range r.Output[typ] {
		var m map[string]any
		_ = json.Unmarshal(raw, &m) // every line was checked to be an object
		out = append(out, m)
	}
	return out
}

// Export kicks off a GET export at path, waits for it to complete, and
// downloads every file. It fails the test if the export does not complete
// or a file breaks the manifest's promises (count, type of every line).
func (e *Exporter) Export(t testing.TB, path string) *Result {
	t.Helper()
	return e.Collect(t, e.Kickoff(t, path))
}

// ExportPOST is Export with a POST kick-off carrying parameters (see
// KickoffPOST).
func (e *Exporter) ExportPOST(t testing.TB, path string, parameters any) *Result {
	t.Helper()
	return e.Collect(t, e.KickoffPOST(t, path, parameters))
}

// ExportContext is Export without a testing.TB, for Example functions,
// TestMain and programs: it returns what would fail a test as an error.
func (e *Exporter) ExportContext(ctx context.Context, path string) (*Result, error) {
	statusURL, err := e.kickoff(ctx, http.MethodGet, path, nil)
	if err != nil {
		return nil, fmt.Errorf("bulkexporttest: %w", err)
	}
	r, err := e.collect(ctx, statusURL)
	if err != nil {
		return nil, fmt.Errorf("bulkexporttest: %w", err)
	}
	return r, nil
}

// ExportPOSTContext is ExportPOST without a testing.TB (see
// ExportContext).
func (e *Exporter) ExportPOSTContext(ctx context.Context, path string, parameters any) (*Result, error) {
	body, err := json.Marshal(parameters)
	if err != nil {
		return nil, fmt.Errorf("bulkexporttest: %w", err)
	}
	statusURL, err := e.kickoff(ctx, http.MethodPost, path, body)
	if err != nil {
		return nil, fmt.Errorf("bulkexporttest: %w", err)
	}
	r, err := e.collect(ctx, statusURL)
	if err != nil {
		return nil, fmt.Errorf("bulkexporttest: %w", err)
	}
	return r, nil
}

// Collect waits for the job at statusURL and downloads its files. It fails
// the test unless the job completes.
func (e *Exporter) Collect(t testing.TB, statusURL string) *Result {
	t.Helper()
	r, err := e.collect(context.Background(), statusURL)
	if err != nil {
		t.Fatalf("bulkexporttest: %v", err)
	}
	return r
}

func (e *Exporter) collect(ctx context.Context, statusURL string) (*Result, error) {
	code, body, err := e.wait(ctx, statusURL)
	if err != nil {
		return nil, err
	}
	if code != http.StatusOK {
		return nil, fmt.Errorf("export ended with %d: %s", code, body)
	}
	r := &Result{StatusURL: statusURL, Output: map[string][]json.RawMessage{}}
	if err := json.Unmarshal(body, &r.Manifest); err != nil {
		return nil, fmt.Errorf("manifest: %w", err)
	}
	for _, f := range r.Manifest.Output {
		lines, err := e.download(ctx, f)
		if err != nil {
			return nil, err
		}
		r.Output[f.Type] = append(r.Output[f.Type], lines...)
	}
	for _, f := range r.Manifest.Deleted {
		lines, err := e.download(ctx, f)
		if err != nil {
			return nil, err
		}
		r.Deleted = append(r.Deleted, lines...)
	}
	for _, f := range r.Manifest.Error {
		lines, err := e.download(ctx, f)
		if err != nil {
			return nil, err
		}
		r.Errors = append(r.Errors, lines...)
	}
	return r, nil
}

func (e *Exporter) download(ctx context.Context, f fhirbulk.ManifestFile) ([]json.RawMessage, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.URL, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/fhir+ndjson")
	resp, body, err := e.send(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %d %s", f.URL, resp.StatusCode, body)
	}
	var out []json.RawMessage
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 0, 64<<10), 64<<20)
	for sc.Scan() {
		line := append([]byte(nil), sc.Bytes()...)
		var v struct {
			ResourceType string `json:"resourceType"`
		}
		if err := json.Unmarshal(line, &v); err != nil {
			return nil, fmt.Errorf("%s: a line is not a JSON object: %v", f.URL, err)
		}
		if f.Type != "" && v.ResourceType != f.Type {
			return nil, fmt.Errorf("%s: a %s line in a file of %s", f.URL, v.ResourceType, f.Type)
		}
		out = append(out, line)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", f.URL, err)
	}
	if f.Count != nil && *f.Count != int64(len(out)) {
		return nil, fmt.Errorf("%s: manifest count %d, file has %d lines", f.URL, *f.Count, len(out))
	}
	return out, nil
}

// Status sends one GET to statusURL and returns the response, body read.
func (e *Exporter) Status(t testing.TB, statusURL string) (*http.Response, []byte) {
	t.Helper()
	return e.Send(t, http.MethodGet, statusURL, nil)
}

// Cancel sends DELETE to statusURL and fails the test unless the server
// answers 202 Accepted.
func (e *Exporter) Cancel(t testing.TB, statusURL string) {
	t.Helper()
	resp, body := e.Send(t, http.MethodDelete, statusURL, nil)
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("bulkexporttest: DELETE %s: %d %s", statusURL, resp.StatusCode, body)
	}
}

// Send sends one request and returns the response, body read and closed,
// for the requests the other helpers do not make, such as the negative
// tests of a protocol step. A nil body sends none. A url that starts with
// "/" is relative to BaseURL; any other is used as is (status and file
// URLs).
//
// A request to an $export operation (a URL whose path ends in "/$export")
// is sent as a kick-off, with the headers the protocol requires: Prefer:
// respond-async and Accept: application/fhir+json, and Content-Type:
// application/fhir+json when it has a body. So a kick-off that a test
// expects to fail fails for the reason the test means, not for a missing
// Prefer. Other requests get no headers of their own.
//
// The Exporter's Header is added next, then header, in order: a key there
// replaces the header, and a key with no values removes it. A test of the
// missing header sends:
//
//	resp, body := e.Send(t, http.MethodGet, "/Patient/$export", nil, http.Header{"Prefer": nil})
func (e *Exporter) Send(t testing.TB, method, rawURL string, body []byte, header ...http.Header) (*http.Response, []byte) {
	t.Helper()
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	if strings.HasPrefix(rawURL, "/") {
		rawURL = e.BaseURL + rawURL
	}
	req, err := http.NewRequest(method, rawURL, r)
	if err != nil {
		t.Fatalf("bulkexporttest: %v", err)
	}
	if isKickoff(req.URL) {
		setKickoffHeader(req.Header, body != nil)
	}
	resp, b, err := e.send(req, header...)
	if err != nil {
		t.Fatalf("bulkexporttest: %v", err)
	}
	return resp, b
}

// Serve starts an httptest.Server for a handler that must know its own
// base URL before it exists, such as a host's router with a
// bulkexport.Handler inside (Options.BaseURL), and returns an Exporter
// pointed at it with the server's client. newHandler is called once, with
// the FHIR base URL (the server's URL followed by basePath), before the
// server accepts requests. The server closes when the test ends:
//
//	e := bulkexporttest.Serve(t, "/api/fhir", func(base string) http.Handler { return newRouter(t, base) })
//	res := e.Export(t, "/Patient/$export")
func Serve(t testing.TB, basePath string, newHandler func(baseURL string) http.Handler) *Exporter {
	t.Helper()
	// The listener exists before the server starts: its address makes
	// the URL.
	ts := httptest.NewUnstartedServer(http.NotFoundHandler())
	t.Cleanup(ts.Close)
	base := "http://" + ts.Listener.Addr().String() + basePath
	h := newHandler(base)
	if h == nil {
		t.Fatal("bulkexporttest: Serve: newHandler returned nil")
	}
	ts.Config.Handler = h
	ts.Start()
	if ts.URL+basePath != base {
		t.Fatalf("bulkexporttest: Serve: the server's URL %s is not %s", ts.URL, base)
	}
	return &Exporter{BaseURL: base, Header: http.Header{}, HTTPClient: ts.Client()}
}
