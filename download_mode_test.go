package bulkexport_test

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// signingStorage is a DirStorage that signs URLs the way object stores
// do: an HMAC over the object's path and the expiry, checked by a second
// HTTP server (objectServer) on another host name.
type signingStorage struct {
	*bulkexport.DirStorage
	key   []byte
	base  string // the object server, http://localhost:PORT
	nonce atomic.Int64
	fail  atomic.Bool

	mu       sync.Mutex
	expiries []time.Duration
}

func (s *signingStorage) mac(path string, exp, nonce int64) string {
	m := hmac.New(sha256.New, s.key)
	fmt.Fprintf(m, "%s|%d|%d", path, exp, nonce)
	return hex.EncodeToString(m.Sum(nil))
}

// SignedURL implements bulkexport.URLSigner.
func (s *signingStorage) SignedURL(_ context.Context, jobID, name string, expiry time.Duration) (string, error) {
	if s.fail.Load() {
		return "", errors.New("signing key unavailable")
	}
	s.mu.Lock()
	s.expiries = append(s.expiries, expiry)
	s.mu.Unlock()
	exp := time.Now().Add(expiry).Unix()
	n := s.nonce.Add(1) // every URL differs, as real presigned URLs do (their date)
	path := "/objects/" + jobID + "/" + name
	return fmt.Sprintf("%s%s?exp=%d&n=%d&sig=%s", s.base, path, exp, n, s.mac(path, exp, n)), nil
}

func (s *signingStorage) lastExpiry() time.Duration {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.expiries) == 0 {
		return 0
	}
	return s.expiries[len(s.expiries)-1]
}

// objectServer serves signingStorage's URLs, like an object store: the
// signature is the only credential, and it counts requests that carried an
// Authorization header (which a client must not send there).
type objectServer struct {
	*httptest.Server
	storage  *signingStorage
	requests atomic.Int64
	withAuth atomic.Int64
}

func (o *objectServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	o.requests.Add(1)
	if r.Header.Get("Authorization") != "" {
		o.withAuth.Add(1)
	}
	q := r.URL.Query()
	exp, _ := strconv.ParseInt(q.Get("exp"), 10, 64)
	n, _ := strconv.ParseInt(q.Get("n"), 10, 64)
	if !hmac.Equal([]byte(q.Get("sig")), []byte(o.storage.mac(r.URL.Path, exp, n))) || time.Now().Unix() > exp {
		http.Error(w, "SignatureDoesNotMatch", http.StatusForbidden)
		return
	}
	jobID, name, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/objects/"), "/")
	f, err := o.storage.Open(r.Context(), jobID, name)
	if err != nil {
		http.Error(w, "NoSuchKey", http.StatusNotFound)
		return
	}
	defer f.Close()
	w.Header().Set("Content-Type", "application/fhir+ndjson")
	http.ServeContent(w, r, name, f.ModTime(), f)
}

// signedServer is a bulk export server over a signingStorage.
type signedServer struct {
	BaseURL string
	Handler *bulkexport.Handler
	Storage *signingStorage
	Objects *objectServer
	Store   bulkexport.JobStore
}

// newSignedServer wires a handler and a worker over a signingStorage, on
// 127.0.0.1, with the object server on localhost: another host name, so
// that HTTP clients treat a redirect there as leaving the site.
func newSignedServer(t *testing.T, ho bulkexport.Options, wo bulkexport.WorkerOptions) *signedServer {
	t.Helper()
	dir, err := bulkexport.NewDirStorage(t.TempDir())
	require.NoError(t, err)
	storage := &signingStorage{DirStorage: dir, key: []byte("test signing key")}
	objects := &objectServer{storage: storage}
	objects.Server = httptest.NewServer(objects)
	t.Cleanup(objects.Close)
	u, err := url.Parse(objects.URL)
	require.NoError(t, err)
	storage.base = "http://localhost:" + u.Port()

	src := clinicalSource(t, 4)
	store := bulkexport.NewMemoryStore()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	wo.PollInterval, wo.Heartbeat, wo.Logger = 20*time.Millisecond, 20*time.Millisecond, quiet
	worker, err := bulkexport.NewWorker(store, src, storage, &wo)
	require.NoError(t, err)

	mux := http.NewServeMux()
	hs := httptest.NewServer(mux)
	t.Cleanup(hs.Close)
	ho.BaseURL = hs.URL + "/fhir"
	ho.Types = src
	ho.Storage = storage
	ho.OnQueued = func(string) { worker.Notify() }
	ho.Logger = quiet
	h, err := bulkexport.NewHandler(store, &ho)
	require.NoError(t, err)
	mux.Handle("/fhir/", h)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = worker.Run(ctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return &signedServer{BaseURL: ho.BaseURL, Handler: h, Storage: storage, Objects: objects, Store: store}
}

// send sends a request with an optional bearer token through client and
// returns the response with its body read.
func send(t *testing.T, client *http.Client, method, u, token string, hdr map[string]string) (*http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, u, nil)
	require.NoError(t, err)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := client.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return resp, body
}

// exportWith kicks off path with the token and polls to completion,
// returning the status URL and the last poll's response and body.
func (s *signedServer) exportWith(t *testing.T, method, path, token, prefer string, body string) (string, *http.Response, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, s.BaseURL+path, strings.NewReader(body))
	require.NoError(t, err)
	req.Header.Set("Prefer", prefer)
	req.Header.Set("Accept", "application/fhir+json")
	if body != "" {
		req.Header.Set("Content-Type", "application/fhir+json")
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
	status := resp.Header.Get("Content-Location")
	var b []byte
	for range 1500 { // a bounded wait: a small export takes milliseconds
		resp, b = send(t, http.DefaultClient, http.MethodGet, status, token, nil)
		if resp.StatusCode != http.StatusAccepted {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return status, resp, b
}

// fileOf reads a job's file straight from the storage.
func (s *signedServer) fileOf(t *testing.T, jobID, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(s.Storage.Root(), jobID, name))
	require.NoError(t, err)
	return b
}

func (s *signedServer) onlyJob(t *testing.T) *bulkexport.Job {
	t.Helper()
	jobs, err := s.Store.List(context.Background(), bulkexport.Filter{})
	require.NoError(t, err)
	require.Len(t, jobs, 1)
	return jobs[0]
}

// noRedirects is a client that returns redirects instead of following them.
var noRedirects = &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

func TestDownloadSigned(t *testing.T) {
	t.Parallel()
	srv := newSignedServer(t, bulkexport.Options{
		Authenticate: tokenAuth(map[string]string{"tok-a": "alice"}),
		Downloads:    bulkexport.DownloadSigned,
	}, bulkexport.WorkerOptions{})
	status, resp, body := srv.exportWith(t, http.MethodGet, "/$export", "tok-a", "respond-async", "")
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	require.Equal(t, "no-store", resp.Header.Get("Cache-Control"), "a manifest of capability URLs is not to be cached")
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m))
	require.False(t, m.RequiresAccessToken, "presigned URLs are capability URLs")
	require.NotEmpty(t, m.Output)
	require.Equal(t, bulkexport.DefaultSignedURLExpiry, srv.Storage.lastExpiry())
	job := srv.onlyJob(t)

	plain := &http.Client{}
	for _, f := range m.Output {
		require.True(t, strings.HasPrefix(f.URL, srv.Storage.base+"/objects/"+job.ID+"/"), f.URL)
		resp, got := send(t, plain, http.MethodGet, f.URL, "", nil)
		require.Equal(t, http.StatusOK, resp.StatusCode, "%s: %s", f.URL, got)
		require.Equal(t, "application/fhir+ndjson", resp.Header.Get("Content-Type"))
		u, err := url.Parse(f.URL)
		require.NoError(t, err)
		require.Equal(t, srv.fileOf(t, job.ID, filepath.Base(u.Path)), got)
		require.Equal(t, int(*f.Count), strings.Count(string(got), "\n"))
	}
	require.Zero(t, srv.Objects.withAuth.Load(), "no token was sent to the object store")

	// A tampered URL is refused by the store (the fake checks, as S3 does).
	resp, _ = send(t, plain, http.MethodGet, m.Output[0].URL+"0", "", nil)
	require.Equal(t, http.StatusForbidden, resp.StatusCode)

	// Each poll signs afresh, so a client whose links expired polls again.
	resp, body = send(t, http.DefaultClient, http.MethodGet, status, "tok-a", nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	var m2 fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m2))
	require.Len(t, m2.Output, len(m.Output))
	require.NotEqual(t, m.Output[0].URL, m2.Output[0].URL)

	// The handler's own file endpoint still serves the file to its owner.
	name := filepath.Base(strings.SplitN(m.Output[0].URL, "?", 2)[0])
	resp, got := send(t, http.DefaultClient, http.MethodGet, srv.Handler.FileURL(job.ID, name), "tok-a", nil)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, srv.fileOf(t, job.ID, name), got)

	// ManifestContext signs; Manifest lists the handler's URLs.
	mc, err := srv.Handler.ManifestContext(context.Background(), job)
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(mc.Output[0].URL, srv.Storage.base), mc.Output[0].URL)
	require.True(t, strings.HasPrefix(srv.Handler.Manifest(job).Output[0].URL, srv.BaseURL+"/bulkfiles/"))

	// A storage that cannot sign makes the poll a transient failure.
	srv.Storage.fail.Store(true)
	resp, body = send(t, http.DefaultClient, http.MethodGet, status, "tok-a", nil)
	require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
	require.Contains(t, string(body), `"transient"`)
	_, err = srv.Handler.ManifestContext(context.Background(), job)
	require.Error(t, err)
}

func TestDownloadSignedExpiryOption(t *testing.T) {
	t.Parallel()
	srv := newSignedServer(t, bulkexport.Options{Downloads: bulkexport.DownloadSigned, SignedURLExpiry: 90 * time.Second},
		bulkexport.WorkerOptions{})
	_, resp, body := srv.exportWith(t, http.MethodGet, "/$export?_type=Patient", "", "respond-async", "")
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	require.Equal(t, 90*time.Second, srv.Storage.lastExpiry())
}

func TestDownloadSignedContinuesInFile(t *testing.T) {
	t.Parallel()
	// Blocks of 5 lines in files of 3: blocks span files, and
	// continuesInFile must be the signed url of the next file.
	srv := newSignedServer(t, bulkexport.Options{Downloads: bulkexport.DownloadSigned},
		bulkexport.WorkerOptions{MaxFileResources: 3})
	_, resp, body := srv.exportWith(t, http.MethodGet, "/Patient/$export?organizeOutputBy=Patient", "", "respond-async", "")
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m))
	continued := 0
	for i, f := range m.Output {
		require.True(t, strings.HasPrefix(f.URL, srv.Storage.base), f.URL)
		if f.ContinuesInFile != "" {
			require.Less(t, i+1, len(m.Output))
			require.Equal(t, m.Output[i+1].URL, f.ContinuesInFile)
			continued++
		}
	}
	require.Positive(t, continued)
}

func TestDownloadSignedSTU4(t *testing.T) {
	t.Parallel()
	srv := newSignedServer(t, bulkexport.Options{Downloads: bulkexport.DownloadSigned, ManifestVersion: bulkexport.ManifestSTU4},
		bulkexport.WorkerOptions{})
	params := `{"resourceType":"Parameters","parameter":[{"name":"_type","valueString":"Patient"},{"name":"_bogus","valueString":"x"}]}`
	_, resp, body := srv.exportWith(t, http.MethodPost, "/$export", "", "respond-async, handling=lenient", params)
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m))
	require.False(t, m.RequiresAccessToken)
	require.Len(t, m.Outcome, 1, "the ignored parameter")
	for _, f := range append(m.Output, m.Outcome...) {
		require.True(t, strings.HasPrefix(f.URL, srv.Storage.base), f.URL)
		resp, _ := send(t, http.DefaultClient, http.MethodGet, f.URL, "", nil)
		require.Equal(t, http.StatusOK, resp.StatusCode)
	}
}

func TestDownloadRedirect(t *testing.T) {
	t.Parallel()
	srv := newSignedServer(t, bulkexport.Options{
		Authenticate: tokenAuth(map[string]string{"tok-a": "alice", "tok-b": "bob"}),
		Downloads:    bulkexport.DownloadRedirect,
	}, bulkexport.WorkerOptions{})
	_, resp, body := srv.exportWith(t, http.MethodGet, "/$export", "tok-a", "respond-async", "")
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	require.Empty(t, resp.Header.Get("Cache-Control"), "the manifest holds no capability URL")
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m))
	require.True(t, m.RequiresAccessToken, "the listed URLs are the handler's, behind the token")
	job := srv.onlyJob(t)
	f := m.Output[0]
	name := filepath.Base(f.URL)
	require.Equal(t, srv.Handler.FileURL(job.ID, name), f.URL)
	want := srv.fileOf(t, job.ID, name)

	t.Run("redirect", func(t *testing.T) {
		for _, method := range []string{http.MethodGet, http.MethodHead} {
			resp, _ := send(t, noRedirects, method, f.URL, "tok-a", nil)
			require.Equal(t, http.StatusTemporaryRedirect, resp.StatusCode, method)
			loc := resp.Header.Get("Location")
			require.True(t, strings.HasPrefix(loc, srv.Storage.base+"/objects/"+job.ID+"/"+name+"?"), loc)
			require.Equal(t, "private, no-store", resp.Header.Get("Cache-Control"))
			require.Equal(t, bulkexport.DefaultSignedURLExpiry, srv.Storage.lastExpiry())
		}
	})
	t.Run("auth first", func(t *testing.T) {
		resp, body := send(t, noRedirects, http.MethodGet, f.URL, "", nil)
		require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
		require.Empty(t, resp.Header.Get("Location"))
		require.Contains(t, string(body), "OperationOutcome")
		resp, _ = send(t, noRedirects, http.MethodGet, f.URL, "tok-b", nil)
		require.Equal(t, http.StatusNotFound, resp.StatusCode, "another client's job")
		require.Empty(t, resp.Header.Get("Location"))
		resp, _ = send(t, noRedirects, http.MethodGet, srv.Handler.FileURL(job.ID, "Nope.000001.ndjson"), "tok-a", nil)
		require.Equal(t, http.StatusNotFound, resp.StatusCode, "a file not in the manifest")
	})
	t.Run("follow", func(t *testing.T) {
		// Go's client, like Inferno's, follows the redirect and drops
		// Authorization, as the store is on another host.
		before := srv.Objects.requests.Load()
		resp, got := send(t, &http.Client{}, http.MethodGet, f.URL, "tok-a", map[string]string{"Accept": "application/fhir+ndjson"})
		require.Equal(t, http.StatusOK, resp.StatusCode, "%s", got)
		require.Equal(t, want, got)
		require.Equal(t, "application/fhir+ndjson", resp.Header.Get("Content-Type"))
		resp, got = send(t, &http.Client{}, http.MethodGet, f.URL, "tok-a", map[string]string{"Range": "bytes=5-9"})
		require.Equal(t, http.StatusPartialContent, resp.StatusCode)
		require.Equal(t, want[5:10], got)
		require.Equal(t, before+2, srv.Objects.requests.Load())
		require.Zero(t, srv.Objects.withAuth.Load(), "the bearer token never reached the object store")
	})
	t.Run("cannot sign", func(t *testing.T) {
		srv.Storage.fail.Store(true)
		defer srv.Storage.fail.Store(false)
		resp, body := send(t, noRedirects, http.MethodGet, f.URL, "tok-a", nil)
		require.Equal(t, http.StatusServiceUnavailable, resp.StatusCode)
		require.Contains(t, string(body), `"transient"`)
	})
}

func TestDownloadModeOptions(t *testing.T) {
	t.Parallel()
	dir, err := bulkexport.NewDirStorage(t.TempDir())
	require.NoError(t, err)
	signer := &signingStorage{DirStorage: dir}
	yes := true
	no := false
	base := "http://fhir.example.org/fhir"
	for name, o := range map[string]bulkexport.Options{
		"signed without storage":        {Downloads: bulkexport.DownloadSigned},
		"redirect without storage":      {Downloads: bulkexport.DownloadRedirect},
		"signed without a signer":       {Downloads: bulkexport.DownloadSigned, Storage: dir},
		"redirect without a signer":     {Downloads: bulkexport.DownloadRedirect, Storage: dir},
		"signed requiring a token":      {Downloads: bulkexport.DownloadSigned, Storage: signer, RequiresAccessToken: &yes},
		"negative expiry":               {Downloads: bulkexport.DownloadRedirect, Storage: signer, SignedURLExpiry: -time.Second},
		"unknown mode":                  {Downloads: bulkexport.DownloadMode(9), Storage: signer},
		"unknown mode without a signer": {Downloads: bulkexport.DownloadMode(-1), Storage: dir},
	} {
		o.BaseURL = base
		_, err := bulkexport.NewHandler(bulkexport.NewMemoryStore(), &o)
		require.Error(t, err, name)
	}
	for name, o := range map[string]bulkexport.Options{
		"proxy over a plain storage": {Storage: dir},
		"proxy without storage":      {},
		"signed":                     {Downloads: bulkexport.DownloadSigned, Storage: signer, RequiresAccessToken: &no},
		"redirect":                   {Downloads: bulkexport.DownloadRedirect, Storage: signer, SignedURLExpiry: time.Minute},
	} {
		o.BaseURL = base
		_, err := bulkexport.NewHandler(bulkexport.NewMemoryStore(), &o)
		require.NoError(t, err, name)
	}
	require.Equal(t, "proxy", bulkexport.DownloadProxy.String())
	require.Equal(t, "signed", bulkexport.DownloadSigned.String())
	require.Equal(t, "redirect", bulkexport.DownloadRedirect.String())
	require.Equal(t, "DownloadMode(7)", bulkexport.DownloadMode(7).String())
}
