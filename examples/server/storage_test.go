package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// TestRunBlobMem is the object storage smoke test: with -storage
// blob:mem:// the files go through blobstorage into gocloud's in-memory
// bucket, and download through the server (proxy mode).
func TestRunBlobMem(t *testing.T) {
	t.Parallel()
	base, stop := startRun(t, "-patients", "6", "-store", "memory", "-storage", "blob:mem://", "-clients", "alice=s3cret")
	do := func(method, u string) (*http.Response, []byte) {
		req, err := http.NewRequest(method, u, nil)
		require.NoError(t, err)
		req.Header.Set("Prefer", "respond-async")
		req.Header.Set("Authorization", "Bearer s3cret")
		resp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		defer resp.Body.Close()
		body, err := io.ReadAll(resp.Body)
		require.NoError(t, err)
		return resp, body
	}
	resp, body := do(http.MethodGet, base+"/$export?_type=Patient,Observation")
	require.Equal(t, http.StatusAccepted, resp.StatusCode, "%s", body)
	status := resp.Header.Get("Content-Location")
	for range 400 { // a bounded wait: the export takes milliseconds
		resp, body = do(http.MethodGet, status)
		if resp.StatusCode != http.StatusAccepted {
			break
		}
		time.Sleep(25 * time.Millisecond)
	}
	require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
	var m fhirbulk.Manifest
	require.NoError(t, json.Unmarshal(body, &m))
	require.True(t, m.RequiresAccessToken)
	require.Len(t, m.Output, 2)
	for _, f := range m.Output {
		require.True(t, strings.HasPrefix(f.URL, base+"/bulkfiles/"), f.URL)
		resp, body := do(http.MethodGet, f.URL)
		require.Equal(t, http.StatusOK, resp.StatusCode, "%s", body)
		require.Equal(t, "application/fhir+ndjson", resp.Header.Get("Content-Type"))
		sc := bufio.NewScanner(bytes.NewReader(body))
		var n int64
		for sc.Scan() {
			var r struct{ ResourceType string }
			require.NoError(t, json.Unmarshal(sc.Bytes(), &r))
			require.Equal(t, f.Type, r.ResourceType)
			n++
		}
		require.Equal(t, *f.Count, n, f.URL)
		if f.Type == "Patient" {
			require.EqualValues(t, 6, n)
		}
		// Range requests are served from range reads of the object.
		req, err := http.NewRequest(http.MethodGet, f.URL, nil)
		require.NoError(t, err)
		req.Header.Set("Authorization", "Bearer s3cret")
		req.Header.Set("Range", "bytes=1-10")
		rresp, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		part, err := io.ReadAll(rresp.Body)
		rresp.Body.Close()
		require.NoError(t, err)
		require.Equal(t, http.StatusPartialContent, rresp.StatusCode)
		require.Equal(t, body[1:11], part)
	}
	stop()
}

func TestParseStorageFlags(t *testing.T) {
	t.Parallel()
	o, err := parseFlags([]string{"-storage", "blob:s3://bucket?region=eu-west-1&prefix=exports/", "-downloads", "signed"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, "s3://bucket?region=eu-west-1&prefix=exports/", o.storageURL)
	require.Empty(t, o.storageDir)
	require.Equal(t, bulkexport.DownloadSigned, o.downloads)
	o, err = parseFlags([]string{"-storage", "blob:mem://", "-downloads", "redirect"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, "mem://", o.storageURL)
	require.Equal(t, bulkexport.DownloadRedirect, o.downloads)
	o, err = parseFlags([]string{"-storage", "dir:/x"}, io.Discard)
	require.NoError(t, err)
	require.Equal(t, "/x", o.storageDir)
	require.Empty(t, o.storageURL)
	require.Equal(t, bulkexport.DownloadProxy, o.downloads)

	for _, args := range [][]string{
		{"-storage", "blob:"},
		{"-storage", "blob:bucket"},
		{"-storage", "s3://bucket"},
		{"-downloads", "signed"}, // with the default dir: storage
		{"-downloads", "redirect", "-storage", "dir:/x"},
		{"-downloads", "direct", "-storage", "blob:mem://"},
	} {
		var stderr bytes.Buffer
		_, err := parseFlags(args, &stderr)
		require.ErrorIs(t, err, errUsage, "%v", args)
		require.NotEmpty(t, stderr.String(), "%v", args)
	}
}

// TestRunSignedNeedsSigner: memblob cannot sign URLs, so -downloads signed
// over it fails at start, not at the first poll.
func TestRunSignedNeedsSigner(t *testing.T) {
	t.Parallel()
	err := run(context.Background(), []string{"-addr", "127.0.0.1:0", "-store", "memory", "-storage", "blob:mem://", "-downloads", "signed"},
		io.Discard, io.Discard)
	require.Error(t, err)
	require.Contains(t, err.Error(), "cannot sign")
	err = run(context.Background(), []string{"-addr", "127.0.0.1:0", "-store", "memory", "-storage", "blob:nope://x"}, io.Discard, io.Discard)
	require.Error(t, err)
}
