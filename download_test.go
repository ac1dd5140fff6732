package bulkexport_test

import (
	"compress/gzip"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
)

// tokenAuth maps bearer tokens to client ids.
func tokenAuth(tokens map[string]string) func(*http.Request) (string, error) {
	return func(r *http.Request) (string, error) {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if id, known := tokens[tok]; ok && known {
			return id, nil
		}
		return "", bulkexport.ErrUnauthorized
	}
}

func TestDownloadFile(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source:  clinicalSource(t, 5),
		Handler: bulkexport.Options{Authenticate: tokenAuth(map[string]string{"tok-a": "alice", "tok-b": "bob"})},
	})
	srv.Header.Set("Authorization", "Bearer tok-a")
	res := srv.Export(t, "/$export?_type=Patient")
	require.True(t, res.Manifest.RequiresAccessToken)
	fileURL := res.Manifest.Output[0].URL
	job := lastJob(t, srv)
	want, err := os.ReadFile(filepath.Join(srv.Storage.Root(), job.ID, res.Manifest.Output[0].URL[strings.LastIndex(fileURL, "/")+1:]))
	require.NoError(t, err)

	get := func(t *testing.T, url string, hdr map[string]string) (*http.Response, []byte) {
		req, err := http.NewRequest(http.MethodGet, url, nil)
		require.NoError(t, err)
		for k, v := range hdr {
			req.Header.Set(k, v)
		}
		// A transport without automatic gzip, so that encodings are seen
		// as sent.
		c := &http.Client{Transport: &http.Transport{DisableCompression: true}}
		resp, err := c.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp, b
	}
	auth := "Bearer tok-a"

	t.Run("whole file", func(t *testing.T) {
		t.Parallel()
		resp, body := get(t, fileURL, map[string]string{"Authorization": auth, "Accept": "application/fhir+ndjson"})
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.Equal(t, "application/fhir+ndjson", resp.Header.Get("Content-Type"))
		require.Equal(t, want, body)
	})
	t.Run("range", func(t *testing.T) {
		t.Parallel()
		resp, body := get(t, fileURL, map[string]string{"Authorization": auth, "Range": "bytes=10-19"})
		require.Equal(t, http.StatusPartialContent, resp.StatusCode)
		require.Equal(t, want[10:20], body)
		resp, body = get(t, fileURL, map[string]string{"Authorization": auth, "Range": "bytes=-5"})
		require.Equal(t, http.StatusPartialContent, resp.StatusCode)
		require.Equal(t, want[len(want)-5:], body)
	})
	t.Run("gzip", func(t *testing.T) {
		t.Parallel()
		resp, body := get(t, fileURL, map[string]string{"Authorization": auth, "Accept-Encoding": "br, gzip"})
		require.Equal(t, http.StatusOK, resp.StatusCode)
		require.Equal(t, "gzip", resp.Header.Get("Content-Encoding"))
		zr, err := gzip.NewReader(strings.NewReader(string(body)))
		require.NoError(t, err)
		plain, err := io.ReadAll(zr)
		require.NoError(t, err)
		require.Equal(t, want, plain)

		resp, body = get(t, fileURL, map[string]string{"Authorization": auth, "Accept-Encoding": "gzip;q=0"})
		require.Empty(t, resp.Header.Get("Content-Encoding"))
		require.Equal(t, want, body)
	})
	t.Run("no token", func(t *testing.T) {
		t.Parallel()
		resp, body := get(t, fileURL, nil)
		require.Equal(t, http.StatusUnauthorized, resp.StatusCode)
		require.Contains(t, string(body), "OperationOutcome")
	})
	t.Run("other client", func(t *testing.T) {
		t.Parallel()
		resp, body := get(t, fileURL, map[string]string{"Authorization": "Bearer tok-b"})
		require.Equal(t, http.StatusNotFound, resp.StatusCode)
		require.Contains(t, string(body), "OperationOutcome")
	})
	t.Run("outside the job", func(t *testing.T) {
		t.Parallel()
		for _, path := range []string{
			"/bulkfiles/" + job.ID + "/..%2F..%2Fetc%2Fpasswd",
			"/bulkfiles/" + job.ID + "/../" + job.ID + "/x",
			"/bulkfiles/" + job.ID + "/Patient.999999.ndjson",
			"/bulkfiles/..%2F" + job.ID + "/Patient.000001.ndjson",
			"/bulkfiles/" + job.ID,
			"/bulkfiles/",
			"/bulkfiles/" + job.ID + "/%00",
		} {
			resp, body := get(t, srv.BaseURL+path, map[string]string{"Authorization": auth})
			require.Equal(t, http.StatusNotFound, resp.StatusCode, path)
			require.Contains(t, string(body), "OperationOutcome", path)
		}
	})
	t.Run("wrong method", func(t *testing.T) {
		t.Parallel()
		req, _ := http.NewRequest(http.MethodPut, fileURL, nil)
		req.Header.Set("Authorization", auth)
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		resp.Body.Close()
		require.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode)
	})
}

func TestDownloadAfterDelete(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{
		Source:  clinicalSource(t, 2),
		Handler: bulkexport.Options{DeletePolicy: bulkexport.DeleteFinishedRemoves},
	})
	res := srv.Export(t, "/$export?_type=Patient")
	resp, _ := srv.Send(t, http.MethodDelete, res.StatusURL, nil)
	require.Equal(t, http.StatusAccepted, resp.StatusCode)
	resp, body := srv.Send(t, http.MethodGet, res.Manifest.Output[0].URL, nil)
	require.Equal(t, http.StatusNotFound, resp.StatusCode)
	require.Contains(t, string(body), "OperationOutcome")
	resp, _ = srv.Status(t, res.StatusURL)
	require.Equal(t, http.StatusNotFound, resp.StatusCode)
}

// A file the manifest lists but the storage lost answers 404, and a
// storage failure 503 with a transient code.
func TestDownloadStorageErrors(t *testing.T) {
	t.Parallel()
	srv := bulkexporttest.NewServer(t, &bulkexporttest.ServerOptions{Source: clinicalSource(t, 2)})
	res := srv.Export(t, "/$export?_type=Patient")
	job := lastJob(t, srv)
	fileURL := res.Manifest.Output[0].URL

	h, err := bulkexport.NewHandler(srv.Store, &bulkexport.Options{BaseURL: srv.BaseURL, Storage: failingStorage{srv.Storage}})
	require.NoError(t, err)
	rec := newRecorder(h, fileURL)
	require.Equal(t, http.StatusServiceUnavailable, rec.Code)
	require.Contains(t, rec.Body.String(), `"transient"`)
	require.Equal(t, "5", rec.Header().Get("Retry-After"))

	require.NoError(t, srv.Storage.Delete(context.Background(), job.ID))
	resp, body := srv.Send(t, http.MethodGet, fileURL, nil)
	require.Equal(t, http.StatusNotFound, resp.StatusCode)
	require.Contains(t, string(body), "OperationOutcome")
}

type failingStorage struct{ bulkexport.Storage }

func (failingStorage) Open(context.Context, string, string) (bulkexport.FileReader, error) {
	return nil, errors.New("disk unplugged")
}

func newRecorder(h http.Handler, url string) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, url, nil))
	return rec
}
