package client_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport/client"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// ndjson returns n Patient lines that compress poorly (random ids), so
// that half of a gzip stream decodes to a fair part of the file.
func ndjson(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, seed))
	var b bytes.Buffer
	for i := 0; i < n; i++ {
		fmt.Fprintf(&b, `{"resourceType":"Patient","id":"p%d","identifier":[{"value":"%016x%016x"}]}`+"\n", i, rng.Uint64(), rng.Uint64())
	}
	return b.Bytes()
}

func count(n int) *int64 { c := int64(n); return &c }

func oo(code fhirbulk.IssueType, msg string) []byte {
	b, _ := json.Marshal(fhirbulk.NewOutcome(fhirbulk.SeverityError, code, msg))
	return b
}

func writeOO(w http.ResponseWriter, status int, code fhirbulk.IssueType, msg string) {
	w.Header().Set("Content-Type", "application/fhir+json")
	w.WriteHeader(status)
	_, _ = w.Write(oo(code, msg))
}

func writeManifest(w http.ResponseWriter, m any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(m)
}

// cutConnection writes a response head claiming the whole body, then part
// of it, and closes the connection.
func cutConnection(t *testing.T, w http.ResponseWriter, header string, body []byte, keep int) {
	conn, buf, err := w.(http.Hijacker).Hijack()
	if err != nil {
		t.Error(err)
		return
	}
	defer conn.Close()
	fmt.Fprintf(buf, "HTTP/1.1 200 OK\r\nContent-Type: application/fhir+ndjson\r\n%sContent-Length: %d\r\n\r\n", header, len(body))
	_, _ = buf.Write(body[:keep])
	_ = buf.Flush()
}

func gz(b []byte) []byte {
	var out bytes.Buffer
	zw := gzip.NewWriter(&out)
	_, _ = zw.Write(b)
	_ = zw.Close()
	return out.Bytes()
}

func TestWait429Flood(t *testing.T) {
	t.Parallel()
	var polls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := polls.Add(1)
		switch {
		case n <= 20:
			w.Header().Set("Retry-After", "120")
			writeOO(w, http.StatusTooManyRequests, fhirbulk.IssueThrottled, "slow down")
		case n <= 22:
			w.Header().Set("Retry-After", "2")
			w.Header().Set("X-Progress", "50% complete")
			w.WriteHeader(http.StatusAccepted)
		default:
			writeManifest(w, fhirbulk.Manifest{TransactionTime: "2026-01-01T00:00:00Z", Output: []fhirbulk.ManifestFile{}, Error: []fhirbulk.ManifestFile{}})
		}
	}))
	defer srv.Close()
	// One retry allowed: the 429s are rate limiting, not failures.
	c := newClient(t, "", func(o *client.Options) { o.MaxRetries = 1 })
	var progress []string
	st, err := c.Wait(context.Background(), srv.URL+"/status", func(s *client.Status) {
		progress = append(progress, s.Progress)
		require.Equal(t, 2*time.Second, s.RetryAfter)
	})
	require.NoError(t, err)
	require.True(t, st.Complete)
	require.Equal(t, "2026-01-01T00:00:00Z", st.Manifest.TransactionTime)
	require.EqualValues(t, 23, polls.Load())
	require.Equal(t, []string{"50% complete", "50% complete"}, progress)

	// One poll alone reports the 429 as a transient *Error.
	polls.Store(0)
	_, err = c.Status(context.Background(), srv.URL+"/status")
	var e *client.Error
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusTooManyRequests, e.StatusCode)
	require.Equal(t, 120*time.Second, e.RetryAfter)
	require.True(t, e.Transient())
	require.Equal(t, fhirbulk.IssueThrottled, e.Issue().Code)
}

func TestWaitTransient(t *testing.T) {
	t.Parallel()
	var polls atomic.Int32
	failFor := int32(3)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if n := polls.Add(1); n <= failFor {
			writeOO(w, http.StatusServiceUnavailable, fhirbulk.IssueTransient, "the job store is unavailable; retry later")
			return
		}
		writeManifest(w, fhirbulk.Manifest{Output: []fhirbulk.ManifestFile{}, Error: []fhirbulk.ManifestFile{}})
	}))
	defer srv.Close()

	c := newClient(t, "", nil) // 5 retries
	st, err := c.Wait(context.Background(), srv.URL, nil)
	require.NoError(t, err)
	require.True(t, st.Complete)
	require.EqualValues(t, 4, polls.Load())

	// Too few retries: the transient error comes back, with its outcome.
	polls.Store(0)
	c = newClient(t, "", func(o *client.Options) { o.MaxRetries = 2 })
	_, err = c.Wait(context.Background(), srv.URL, nil)
	var e *client.Error
	require.ErrorAs(t, err, &e)
	require.True(t, e.Transient())
	require.Equal(t, http.StatusServiceUnavailable, e.StatusCode)
	require.Equal(t, fhirbulk.IssueTransient, e.Issue().Code)
	require.EqualValues(t, 3, polls.Load())
	require.Contains(t, err.Error(), "503 Service Unavailable: error transient: the job store is unavailable")

	// No retries at all.
	polls.Store(0)
	c = newClient(t, "", func(o *client.Options) { o.MaxRetries = -1 })
	_, err = c.Wait(context.Background(), srv.URL, nil)
	require.True(t, client.IsTransient(err))
	require.EqualValues(t, 1, polls.Load())
}

func TestWaitFinalErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name      string
		status    int
		body      []byte
		transient bool
	}{
		{"failed job", 500, oo(fhirbulk.IssueProcessing, "the export failed"), false},
		{"503 with a non-transient outcome", 503, oo(fhirbulk.IssueProcessing, "dead"), false},
		{"500 without outcome", 500, []byte("boom"), false},
		{"cancelled", 404, oo(fhirbulk.IssueDeleted, "cancelled"), false},
		{"gateway", 502, []byte("<html>bad gateway</html>"), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var polls atomic.Int32
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				polls.Add(1)
				w.WriteHeader(tc.status)
				_, _ = w.Write(tc.body)
			}))
			defer srv.Close()
			c := newClient(t, "", func(o *client.Options) { o.MaxRetries = 2 })
			_, err := c.Wait(context.Background(), srv.URL, nil)
			var e *client.Error
			require.ErrorAs(t, err, &e)
			require.Equal(t, tc.status, e.StatusCode)
			require.Equal(t, tc.transient, e.Transient())
			if tc.transient {
				require.EqualValues(t, 3, polls.Load())
				require.Equal(t, "<html>bad gateway</html>", e.Body)
			} else {
				require.EqualValues(t, 1, polls.Load())
			}
		})
	}
}

func TestRetryAfterHTTPDate(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	var polls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch polls.Add(1) {
		case 1:
			w.Header().Set("Retry-After", now.Add(90*time.Second).Format(http.TimeFormat))
			w.WriteHeader(http.StatusAccepted)
		case 2:
			w.Header().Set("Retry-After", now.Add(time.Hour).Format(http.TimeFormat))
			writeOO(w, http.StatusTooManyRequests, fhirbulk.IssueThrottled, "later")
		default:
			writeManifest(w, fhirbulk.Manifest{})
		}
	}))
	defer srv.Close()
	c := newClient(t, "", func(o *client.Options) { o.Now = func() time.Time { return now } })
	st, err := c.Status(context.Background(), srv.URL)
	require.NoError(t, err)
	require.Equal(t, 90*time.Second, st.RetryAfter)
	_, err = c.Status(context.Background(), srv.URL)
	var e *client.Error
	require.ErrorAs(t, err, &e)
	require.Equal(t, time.Hour, e.RetryAfter)
	st, err = c.Status(context.Background(), srv.URL)
	require.NoError(t, err)
	require.True(t, st.Complete)
	require.NotNil(t, st.Manifest.Output, "output is [] even when the server left it out")

	// Wait honours the dates within MaxPollInterval (5ms here).
	polls.Store(0)
	st, err = c.Wait(context.Background(), srv.URL, nil)
	require.NoError(t, err)
	require.True(t, st.Complete)
}

func TestManifestPaging(t *testing.T) {
	t.Parallel()
	var srvURL string
	file := func(typ string, n int) fhirbulk.ManifestFile {
		return fhirbulk.ManifestFile{Type: typ, URL: fmt.Sprintf("%s/files/%s.%d.ndjson", srvURL, typ, n), Count: count(n)}
	}
	errFile := func() fhirbulk.ManifestFile {
		return fhirbulk.ManifestFile{Type: "OperationOutcome", URL: srvURL + "/files/errors.ndjson"}
	}
	var pageHits atomic.Int32
	mux := http.NewServeMux()
	mux.HandleFunc("/status", func(w http.ResponseWriter, r *http.Request) {
		assert.Equal(t, "Bearer tok", r.Header.Get("Authorization"))
		writeManifest(w, map[string]any{
			"transactionTime": "2026-01-01T00:00:00Z", "request": srvURL + "/$export", "requiresAccessToken": true,
			"output": []fhirbulk.ManifestFile{file("Patient", 1)}, "error": []fhirbulk.ManifestFile{errFile()},
			"link": []client.ManifestLink{{Relation: "next", URL: srvURL + "/pages/2"}},
		})
	})
	mux.HandleFunc("/pages/2", func(w http.ResponseWriter, r *http.Request) {
		assert.Equal(t, "Bearer tok", r.Header.Get("Authorization"))
		if pageHits.Add(1) == 1 { // one transient failure on the way
			writeOO(w, http.StatusServiceUnavailable, fhirbulk.IssueTransient, "busy")
			return
		}
		writeManifest(w, map[string]any{
			"transactionTime": "2026-01-01T00:00:00Z", "request": srvURL + "/$export", "requiresAccessToken": true,
			"output":  []fhirbulk.ManifestFile{file("Patient", 2), file("Observation", 1)},
			"deleted": []fhirbulk.ManifestFile{file("Bundle", 1)},
			"error":   []fhirbulk.ManifestFile{errFile()},                                                           // STU3 repeats it
			"link":    []client.ManifestLink{{Relation: "previous", URL: "/nowhere"}, {Relation: "next", URL: "3"}}, // relative
		})
	})
	mux.HandleFunc("/pages/3", func(w http.ResponseWriter, r *http.Request) {
		writeManifest(w, map[string]any{
			"transactionTime": "2026-01-01T00:00:00Z", "requiresAccessToken": true,
			"output": []fhirbulk.ManifestFile{file("Observation", 2)}, "error": []fhirbulk.ManifestFile{},
		})
	})
	mux.HandleFunc("/loop", func(w http.ResponseWriter, r *http.Request) {
		writeManifest(w, map[string]any{"output": []any{}, "link": []client.ManifestLink{{Relation: "next", URL: "/loop2"}}})
	})
	mux.HandleFunc("/loop2", func(w http.ResponseWriter, r *http.Request) {
		writeManifest(w, map[string]any{"output": []any{}, "link": []client.ManifestLink{{Relation: "next", URL: "/loop"}}})
	})
	mux.HandleFunc("/badpage", func(w http.ResponseWriter, r *http.Request) {
		writeManifest(w, map[string]any{"output": []any{}, "link": []client.ManifestLink{{Relation: "next", URL: "/gone"}}})
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()
	srvURL = srv.URL

	c := newClient(t, "", func(o *client.Options) { o.Token = "tok" })
	st, err := c.Wait(context.Background(), srv.URL+"/status", nil)
	require.NoError(t, err)
	m := st.Manifest
	require.Equal(t, srv.URL+"/$export", m.Request)
	require.True(t, m.RequiresAccessToken)
	var got []string
	for _, f := range m.Output {
		got = append(got, f.URL[len(srv.URL):])
	}
	require.Equal(t, []string{"/files/Patient.1.ndjson", "/files/Patient.2.ndjson", "/files/Observation.1.ndjson", "/files/Observation.2.ndjson"}, got)
	require.Len(t, m.Deleted, 1)
	require.Len(t, m.Error, 1)

	_, err = c.Status(context.Background(), srv.URL+"/loop")
	require.ErrorContains(t, err, "loop")
	_, err = c.Status(context.Background(), srv.URL+"/badpage")
	var e *client.Error
	require.ErrorAs(t, err, &e)
	require.Equal(t, "manifest", e.Op)
	require.Equal(t, http.StatusNotFound, e.StatusCode)
}

// fileServer serves NDJSON files with Range support and optional gzip,
// after the faults of fault (which returns true when it answered).
type fileServer struct {
	t     *testing.T
	files map[string][]byte
	gzip  bool // answer gzip when asked

	mu       sync.Mutex
	requests []http.Header // per request, in order
	paths    []string
	fault    func(w http.ResponseWriter, r *http.Request, n int) bool
}

func (fs *fileServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	fs.mu.Lock()
	fs.requests = append(fs.requests, r.Header.Clone())
	fs.paths = append(fs.paths, r.URL.Path)
	n := len(fs.requests)
	fs.mu.Unlock()
	if fs.fault != nil && fs.fault(w, r, n) {
		return
	}
	body, ok := fs.files[r.URL.Path]
	if !ok {
		writeOO(w, http.StatusNotFound, fhirbulk.IssueNotFound, "no such file")
		return
	}
	w.Header().Set("Content-Type", "application/fhir+ndjson")
	if fs.gzip && r.Header.Get("Range") == "" && strings.Contains(r.Header.Get("Accept-Encoding"), "gzip") {
		w.Header().Set("Content-Encoding", "gzip")
		_, _ = w.Write(gz(body))
		return
	}
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(body))
}

func (fs *fileServer) headers() []http.Header {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return append([]http.Header(nil), fs.requests...)
}

func manifestOf(base string, requiresToken bool, files map[string][]byte, counts map[string]*int64) *fhirbulk.Manifest {
	m := &fhirbulk.Manifest{RequiresAccessToken: requiresToken, Output: []fhirbulk.ManifestFile{}, Error: []fhirbulk.ManifestFile{}}
	var names []string
	for p := range files {
		names = append(names, p)
	}
	// deterministic order
	for i := range names {
		for j := i + 1; j < len(names); j++ {
			if names[j] < names[i] {
				names[i], names[j] = names[j], names[i]
			}
		}
	}
	for _, p := range names {
		c, ok := counts[p]
		if !ok {
			c = count(bytes.Count(files[p], []byte("\n")))
		}
		m.Output = append(m.Output, fhirbulk.ManifestFile{Type: "Patient", URL: base + p, Count: c})
	}
	return m
}

func TestDownloadResumesAfterReset(t *testing.T) {
	t.Parallel()
	body := ndjson(1, 2000)
	for _, tc := range []struct {
		name  string
		gzip  bool
		first func(t *testing.T, w http.ResponseWriter)
	}{
		{"identity", false, func(t *testing.T, w http.ResponseWriter) {
			cutConnection(t, w, "", body, len(body)/3)
		}},
		{"gzip", true, func(t *testing.T, w http.ResponseWriter) {
			z := gz(body)
			cutConnection(t, w, "Content-Encoding: gzip\r\n", z, len(z)/2)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			fs := &fileServer{t: t, files: map[string][]byte{"/f/Patient.000001.ndjson": body}, gzip: tc.gzip}
			fs.fault = func(w http.ResponseWriter, r *http.Request, n int) bool {
				if n == 1 {
					tc.first(t, w)
					return true
				}
				return false
			}
			srv := httptest.NewServer(fs)
			defer srv.Close()
			c := newClient(t, "", nil)
			m := manifestOf(srv.URL, false, fs.files, nil)
			dir := t.TempDir()
			var events []client.Progress
			files, err := c.Download(context.Background(), m, dir, func(p client.Progress) { events = append(events, p) })
			require.NoError(t, err)
			require.Len(t, files, 1)
			require.Equal(t, 1, files[0].Retries)
			require.EqualValues(t, 2000, files[0].Lines)
			require.EqualValues(t, len(body), files[0].Bytes)
			got, err := os.ReadFile(filepath.Join(dir, "Patient.000001.ndjson"))
			require.NoError(t, err)
			require.Equal(t, body, got)
			require.True(t, events[len(events)-1].Done)

			h := fs.headers()
			require.Len(t, h, 2)
			require.Equal(t, "gzip", h[0].Get("Accept-Encoding"))
			require.Empty(t, h[0].Get("Range"))
			rng := h[1].Get("Range")
			require.Regexp(t, `^bytes=[1-9][0-9]*-$`, rng, "the second request resumes")
			require.Equal(t, "identity", h[1].Get("Accept-Encoding"), "a Range request asks for identity encoding")
		})
	}
}

func TestDownloadRangeIgnored(t *testing.T) {
	t.Parallel()
	body := ndjson(2, 500)
	fs := &fileServer{t: t, files: map[string][]byte{"/Patient.ndjson": body}}
	fs.fault = func(w http.ResponseWriter, r *http.Request, n int) bool {
		switch n {
		case 1:
			cutConnection(t, w, "", body, 1000)
			return true
		case 2: // a 206 from the wrong offset
			w.Header().Set("Content-Range", fmt.Sprintf("bytes 0-%d/%d", len(body)-1, len(body)))
			w.WriteHeader(http.StatusPartialContent)
			_, _ = w.Write(body)
			return true
		case 3: // ignores Range: the whole file
			assert.Empty(t, r.Header.Get("Range"))
			_, _ = w.Write(body)
			return true
		}
		return false
	}
	srv := httptest.NewServer(fs)
	defer srv.Close()
	c := newClient(t, "", nil)
	rc, err := c.Open(context.Background(), fhirbulk.ManifestFile{Type: "Patient", URL: srv.URL + "/Patient.ndjson", Count: count(500)}, false)
	require.NoError(t, err)
	got, err := io.ReadAll(rc)
	require.NoError(t, err)
	require.Equal(t, body, got)
	require.Len(t, fs.headers(), 3)
}

func TestDownloadRetries(t *testing.T) {
	t.Parallel()
	body := ndjson(3, 10)
	fs := &fileServer{t: t, files: map[string][]byte{"/a.ndjson": body, "/b.ndjson": body}}
	fs.fault = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if n <= 4 {
			switch n % 2 {
			case 0:
				w.Header().Set("Retry-After", "1")
				writeOO(w, http.StatusTooManyRequests, fhirbulk.IssueThrottled, "later")
			default:
				w.WriteHeader(http.StatusBadGateway)
			}
			return true
		}
		return false
	}
	srv := httptest.NewServer(fs)
	defer srv.Close()
	c := newClient(t, "", func(o *client.Options) { o.Parallel = 1 })
	files, err := c.Download(context.Background(), manifestOf(srv.URL, false, fs.files, nil), t.TempDir(), nil)
	require.NoError(t, err)
	require.Len(t, files, 2)
	require.Equal(t, 4, files[0].Retries+files[1].Retries)

	// 404 is final; MaxRetries bounds 5xx.
	fs2 := &fileServer{t: t, files: map[string][]byte{}}
	fs2.fault = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if r.URL.Path == "/down" {
			w.WriteHeader(http.StatusInternalServerError)
			return true
		}
		return false
	}
	srv2 := httptest.NewServer(fs2)
	defer srv2.Close()
	c = newClient(t, "", func(o *client.Options) { o.MaxRetries = 2 })
	_, err = c.Open(context.Background(), fhirbulk.ManifestFile{URL: srv2.URL + "/missing"}, false)
	var e *client.Error
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusNotFound, e.StatusCode)
	require.Len(t, fs2.headers(), 1)
	_, err = c.Open(context.Background(), fhirbulk.ManifestFile{URL: srv2.URL + "/down"}, false)
	require.ErrorAs(t, err, &e)
	require.Equal(t, http.StatusInternalServerError, e.StatusCode)
	require.Len(t, fs2.headers(), 4)
}

func TestDownloadWrongCount(t *testing.T) {
	t.Parallel()
	body := ndjson(4, 7)
	fs := &fileServer{t: t, files: map[string][]byte{"/Patient.1.ndjson": body, "/Patient.2.ndjson": body}}
	srv := httptest.NewServer(fs)
	defer srv.Close()
	c := newClient(t, "", nil)
	m := manifestOf(srv.URL, false, fs.files, map[string]*int64{"/Patient.2.ndjson": count(8)})
	dir := t.TempDir()
	files, err := c.Download(context.Background(), m, dir, nil)
	require.ErrorIs(t, err, client.ErrCountMismatch)
	var e *client.Error
	require.ErrorAs(t, err, &e)
	require.Equal(t, "download", e.Op)
	require.False(t, e.Transient())
	require.Contains(t, err.Error(), "7 resources, the manifest says 8")
	require.LessOrEqual(t, len(files), 1)
	_, err = os.Stat(filepath.Join(dir, "Patient.2.ndjson"))
	require.ErrorIs(t, err, os.ErrNotExist, "an unverified file is not renamed into place")

	// Open reports it at the end instead of io.EOF.
	rc, err := c.Open(context.Background(), m.Output[1], false)
	require.NoError(t, err)
	b, err := io.ReadAll(rc)
	require.ErrorIs(t, err, client.ErrCountMismatch)
	require.Equal(t, body, b)
}

func TestDownloadGzip(t *testing.T) {
	t.Parallel()
	body := ndjson(5, 300)
	fs := &fileServer{t: t, files: map[string][]byte{"/x/Patient.ndjson": body}, gzip: true}
	srv := httptest.NewServer(fs)
	defer srv.Close()
	c := newClient(t, "", nil)
	files, err := c.Download(context.Background(), manifestOf(srv.URL, false, fs.files, nil), t.TempDir(), nil)
	require.NoError(t, err)
	got, err := os.ReadFile(files[0].Path)
	require.NoError(t, err)
	require.Equal(t, body, got)
	require.Equal(t, "gzip", fs.headers()[0].Get("Accept-Encoding"))

	// A corrupt gzip stream is an error, not retried.
	bad := &fileServer{t: t, fault: func(w http.ResponseWriter, r *http.Request, n int) bool {
		w.Header().Set("Content-Encoding", "gzip")
		z := gz(body)
		z[len(z)-6] ^= 0xff // CRC
		_, _ = w.Write(z)
		return true
	}}
	srv2 := httptest.NewServer(bad)
	defer srv2.Close()
	rc, err := c.Open(context.Background(), fhirbulk.ManifestFile{URL: srv2.URL + "/f"}, false)
	require.NoError(t, err)
	_, err = io.ReadAll(rc)
	require.ErrorIs(t, err, gzip.ErrChecksum)
	require.Len(t, bad.headers(), 1)
}

func TestDownloadTokenAndRedirects(t *testing.T) {
	t.Parallel()
	body := ndjson(6, 3)
	other := &fileServer{t: t, files: map[string][]byte{"/s3/Patient.ndjson": body}}
	otherSrv := httptest.NewServer(other)
	defer otherSrv.Close()
	fhir := &fileServer{t: t, files: map[string][]byte{"/local/Patient.ndjson": body}}
	fhir.fault = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if strings.HasPrefix(r.URL.Path, "/redirect/") {
			http.Redirect(w, r, otherSrv.URL+"/s3/Patient.ndjson?X-Signature=abc", http.StatusFound)
			return true
		}
		return false
	}
	fhirSrv := httptest.NewServer(fhir)
	defer fhirSrv.Close()

	c := newClient(t, "", func(o *client.Options) { o.Token = "secret" })
	for _, requires := range []bool{true, false} {
		m := &fhirbulk.Manifest{RequiresAccessToken: requires, Output: []fhirbulk.ManifestFile{
			{Type: "Patient", URL: fhirSrv.URL + "/local/Patient.ndjson", Count: count(3)},
			{Type: "Patient", URL: fhirSrv.URL + "/redirect/Patient.ndjson", Count: count(3)},
		}}
		files, err := c.Download(context.Background(), m, t.TempDir(), nil)
		require.NoError(t, err)
		require.Len(t, files, 2)
		require.Equal(t, "Patient.ndjson", filepath.Base(files[0].Path))
		require.Equal(t, "Patient-2.ndjson", filepath.Base(files[1].Path))
	}
	want := map[bool]string{true: "Bearer secret", false: ""}
	h := fhir.headers()
	require.Len(t, h, 4)
	for i, hd := range h {
		require.Equal(t, want[i < 2], hd.Get("Authorization"), "request %d to the FHIR server", i)
	}
	for i, hd := range other.headers() {
		require.Empty(t, hd.Get("Authorization"), "redirect %d to another host carried the token", i)
	}
	require.Len(t, other.headers(), 2)

	// FileHTTPClient serves token-less downloads.
	var used atomic.Int32
	c = newClient(t, "", func(o *client.Options) {
		o.Token = "secret"
		o.FileHTTPClient = &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
			used.Add(1)
			return http.DefaultTransport.RoundTrip(r)
		})}
	})
	_, err := c.Download(context.Background(), &fhirbulk.Manifest{Output: []fhirbulk.ManifestFile{{Type: "Patient", URL: fhirSrv.URL + "/local/Patient.ndjson"}}}, t.TempDir(), nil)
	require.NoError(t, err)
	require.EqualValues(t, 1, used.Load())
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

func TestDownloadResumeFromDisk(t *testing.T) {
	t.Parallel()
	a, b, c3 := ndjson(7, 100), ndjson(8, 100), ndjson(9, 100)
	fs := &fileServer{t: t, files: map[string][]byte{"/a.ndjson": a, "/b.ndjson": b, "/c.ndjson": c3, "/d.ndjson": a}}
	srv := httptest.NewServer(fs)
	defer srv.Close()
	m := manifestOf(srv.URL, false, fs.files, map[string]*int64{"/d.ndjson": nil})
	dir := t.TempDir()
	// a: complete; b: a partial part cut mid-line; c: a part holding it
	// all (416); d: complete, no count (HEAD checks the size).
	require.NoError(t, os.WriteFile(filepath.Join(dir, "a.ndjson"), a, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "b.ndjson.part"), b[:777], 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "c.ndjson.part"), c3, 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "d.ndjson"), a, 0o644))

	cl := newClient(t, "", nil)
	files, err := cl.Download(context.Background(), m, dir, nil)
	require.NoError(t, err)
	require.Len(t, files, 4)
	byName := map[string]client.File{}
	for _, f := range files {
		byName[filepath.Base(f.Path)] = f
		require.EqualValues(t, 100, f.Lines, f.Path)
		require.EqualValues(t, len(a), f.Bytes, f.Path)
	}
	require.True(t, byName["a.ndjson"].Skipped)
	require.True(t, byName["d.ndjson"].Skipped)
	require.True(t, byName["b.ndjson"].Resumed)
	require.True(t, byName["c.ndjson"].Resumed)
	for name, want := range map[string][]byte{"a.ndjson": a, "b.ndjson": b, "c.ndjson": c3, "d.ndjson": a} {
		got, err := os.ReadFile(filepath.Join(dir, name))
		require.NoError(t, err)
		require.Equal(t, want, got, name)
	}
	methods := map[string]string{}
	fs.mu.Lock()
	for i, p := range fs.paths {
		methods[p] += fs.requests[i].Get("Range") + ";"
	}
	fs.mu.Unlock()
	require.NotContains(t, methods, "/a.ndjson")
	require.Equal(t, "bytes=777-;", methods["/b.ndjson"])
	require.Equal(t, "bytes="+strconv.Itoa(len(c3))+"-;", methods["/c.ndjson"])
	require.Equal(t, ";", methods["/d.ndjson"], "one HEAD")

	// A stored file that is wrong (count) is fetched again; a part longer
	// than the remote file starts over.
	require.NoError(t, os.WriteFile(filepath.Join(dir, "a.ndjson"), a[:50], 0o644))
	require.NoError(t, os.Remove(filepath.Join(dir, "b.ndjson")))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "b.ndjson.part"), append(append([]byte(nil), b...), b...), 0o644))
	files, err = cl.Download(context.Background(), m, dir, nil)
	require.NoError(t, err)
	for _, f := range files[:2] {
		require.False(t, f.Skipped)
		got, err := os.ReadFile(f.Path)
		require.NoError(t, err)
		require.EqualValues(t, 100, f.Lines)
		require.Len(t, got, len(a))
	}
}

func TestDownloadParallelBound(t *testing.T) {
	t.Parallel()
	var inflight, peak atomic.Int32
	files := map[string][]byte{}
	for i := 0; i < 12; i++ {
		files[fmt.Sprintf("/f%02d.ndjson", i)] = ndjson(uint64(i), 50)
	}
	fs := &fileServer{t: t, files: files}
	fs.fault = func(w http.ResponseWriter, r *http.Request, n int) bool {
		cur := inflight.Add(1)
		defer inflight.Add(-1)
		for {
			p := peak.Load()
			if cur <= p || peak.CompareAndSwap(p, cur) {
				break
			}
		}
		time.Sleep(time.Millisecond)
		return false
	}
	srv := httptest.NewServer(fs)
	defer srv.Close()
	c := newClient(t, "", func(o *client.Options) { o.Parallel = 3 })
	got, err := c.Download(context.Background(), manifestOf(srv.URL, false, files, nil), t.TempDir(), nil)
	require.NoError(t, err)
	require.Len(t, got, 12)
	require.LessOrEqual(t, peak.Load(), int32(3))
}

func TestKickoffWire(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var seen []*http.Request
	var bodies []string
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		seen = append(seen, r)
		bodies = append(bodies, string(b))
		mu.Unlock()
		switch n.Add(1) {
		case 1:
			w.Header().Set("Retry-After", "1")
			writeOO(w, http.StatusTooManyRequests, fhirbulk.IssueThrottled, "one export at a time")
		case 2:
			writeOO(w, http.StatusServiceUnavailable, fhirbulk.IssueTransient, "busy")
		default:
			w.Header().Set("Content-Location", "/fhir/status/42") // relative: resolved
			w.WriteHeader(http.StatusAccepted)
		}
	}))
	defer srv.Close()
	c := newClient(t, srv.URL+"/fhir/", func(o *client.Options) { o.Token = "t0k" })
	since := time.Date(2026, 1, 2, 3, 4, 5, 6000000, time.FixedZone("", 3600))
	job, err := c.Kickoff(context.Background(), &client.KickoffRequest{
		Level: fhirbulk.LevelPatient, Method: "post", Since: since, Until: since.Add(time.Hour),
		OutputFormat: "ndjson", Types: []string{"Patient, Observation"}, Elements: []string{"Patient.id"},
		IncludeAssociatedData: []string{"LatestProvenanceResources"}, TypeFilters: []string{"Observation?code=1,2"},
		OrganizeOutputBy: "Patient", AllowPartialManifests: true, Patients: []string{"1", "Patient/2"}, Lenient: true,
	})
	require.NoError(t, err)
	require.Equal(t, srv.URL+"/fhir/status/42", job.StatusURL)
	require.Nil(t, job.Outcome)
	require.Len(t, seen, 3)
	r := seen[2]
	require.Equal(t, http.MethodPost, r.Method)
	require.Equal(t, "/fhir/Patient/$export", r.URL.Path)
	require.Equal(t, "respond-async, handling=lenient", r.Header.Get("Prefer"))
	require.Equal(t, "application/fhir+json", r.Header.Get("Accept"))
	require.Equal(t, "application/fhir+json", r.Header.Get("Content-Type"))
	require.Equal(t, "Bearer t0k", r.Header.Get("Authorization"))
	require.JSONEq(t, `{"resourceType":"Parameters","parameter":[
		{"name":"_outputFormat","valueString":"ndjson"},
		{"name":"_since","valueInstant":"2026-01-02T02:04:05.006Z"},
		{"name":"_until","valueInstant":"2026-01-02T03:04:05.006Z"},
		{"name":"_type","valueString":"Patient"},
		{"name":"_type","valueString":"Observation"},
		{"name":"_elements","valueString":"Patient.id"},
		{"name":"includeAssociatedData","valueCode":"LatestProvenanceResources"},
		{"name":"_typeFilter","valueString":"Observation?code=1,2"},
		{"name":"organizeOutputBy","valueString":"Patient"},
		{"name":"allowPartialManifests","valueBoolean":true},
		{"name":"patient","valueReference":{"reference":"Patient/1"}},
		{"name":"patient","valueReference":{"reference":"Patient/2"}}]}`, bodies[2])
	require.Equal(t, bodies[0], bodies[2], "the retries resend the body")

	// GET: the same parameters in the query string.
	n.Store(2)
	job, err = c.Kickoff(context.Background(), &client.KickoffRequest{
		Level: fhirbulk.LevelGroup, GroupID: "g1", Since: since,
		Types: []string{"Patient", "Observation"}, TypeFilters: []string{"Observation?code=1,2", "Patient?gender=male"},
		AllowPartialManifests: true,
	})
	require.NoError(t, err)
	r = seen[3]
	require.Equal(t, http.MethodGet, r.Method)
	require.Equal(t, "/fhir/Group/g1/$export", r.URL.Path)
	require.Equal(t, "respond-async", r.Header.Get("Prefer"))
	q := r.URL.Query()
	require.Equal(t, []string{"2026-01-02T02:04:05.006Z"}, q["_since"])
	require.Equal(t, []string{"Patient,Observation"}, q["_type"])
	require.Equal(t, []string{"Observation?code=1,2", "Patient?gender=male"}, q["_typeFilter"])
	require.Equal(t, []string{"true"}, q["allowPartialManifests"])

	// A 202 without Content-Location.
	srv2 := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusAccepted) }))
	defer srv2.Close()
	_, err = newClient(t, srv2.URL, nil).Kickoff(context.Background(), nil)
	require.ErrorIs(t, err, client.ErrNoStatusURL)
	// A 200: not the protocol.
	srv3 := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer srv3.Close()
	_, err = newClient(t, srv3.URL, nil).Kickoff(context.Background(), nil)
	require.ErrorIs(t, err, client.ErrUnexpectedStatus)
}

func TestNetworkErrors(t *testing.T) {
	t.Parallel()
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close() // nothing listens there now
	c := newClient(t, url, func(o *client.Options) { o.MaxRetries = 2 })
	ctx := context.Background()
	_, err := c.Kickoff(ctx, nil)
	var e *client.Error
	require.ErrorAs(t, err, &e)
	require.Zero(t, e.StatusCode)
	require.True(t, e.Network())
	require.True(t, e.Transient())
	_, err = c.Wait(ctx, url+"/status", nil)
	require.True(t, client.IsTransient(err))
	require.ErrorAs(t, err, &e)
	require.Equal(t, "status", e.Op)
	err = c.Cancel(ctx, url+"/status")
	require.True(t, client.IsTransient(err))
	_, err = c.Open(ctx, fhirbulk.ManifestFile{URL: url + "/f"}, false)
	require.True(t, client.IsTransient(err))

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err = c.Kickoff(cctx, nil)
	require.ErrorIs(t, err, context.Canceled)
	require.False(t, client.IsTransient(err))
}

func TestCancelRetries(t *testing.T) {
	t.Parallel()
	var n atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		assert.Equal(t, http.MethodDelete, r.Method)
		switch n.Add(1) {
		case 1:
			writeOO(w, http.StatusServiceUnavailable, fhirbulk.IssueLockError, "locked")
		case 2:
			// The cancel went through, but the answer is lost.
			conn, _, _ := w.(http.Hijacker).Hijack()
			conn.Close()
		default:
			writeOO(w, http.StatusNotFound, fhirbulk.IssueDeleted, "the export job was already cancelled")
		}
	}))
	defer srv.Close()
	c := newClient(t, "", nil)
	require.NoError(t, c.Cancel(context.Background(), srv.URL))
	require.EqualValues(t, 3, n.Load())
}
