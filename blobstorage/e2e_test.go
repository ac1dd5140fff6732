package blobstorage_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"gocloud.dev/blob/s3blob"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/blobstorage"
	"github.com/bulkfhir/bulkexport/bulkexporttest"
	"github.com/bulkfhir/bulkexport/fhirbulk"
)

// TestS3EndToEnd runs exports through the real handler and Worker over
// blobstorage on s3blob → gofakes3, in each download mode. The bulk data
// server is on 127.0.0.1 and the S3 endpoint on localhost: another host,
// as an object store is, so that redirected clients drop their token.
func TestS3EndToEnd(t *testing.T) {
	t.Parallel()
	f := newFakeS3(t)
	u, err := url.Parse(f.URL)
	if err != nil {
		t.Fatal(err)
	}
	endpoint := "http://localhost:" + u.Port()

	for _, mode := range []bulkexport.DownloadMode{bulkexport.DownloadProxy, bulkexport.DownloadSigned, bulkexport.DownloadRedirect} {
		t.Run(mode.String(), func(t *testing.T) {
			name := fmt.Sprintf("e2e-%s", mode)
			if err := f.backend.CreateBucket(name); err != nil {
				t.Fatal(err)
			}
			bucket, err := s3blob.OpenBucket(ctx, f.clientAt(endpoint), name, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = bucket.Close() })
			storage, err := blobstorage.New(bucket, &blobstorage.Options{Prefix: "bulk/"})
			if err != nil {
				t.Fatal(err)
			}
			base := startBulkServer(t, storage, mode)
			presignedBefore := f.count("presigned")

			status := kickoff(t, base+"/$export?_type=Patient,Observation")
			m := waitManifest(t, status)
			if want := mode != bulkexport.DownloadSigned; m.RequiresAccessToken != want {
				t.Errorf("requiresAccessToken = %v, want %v", m.RequiresAccessToken, want)
			}
			if len(m.Output) < 3 {
				t.Fatalf("%d output files, want several (MaxFileResources 4)", len(m.Output))
			}
			counts := map[string]int64{}
			for _, file := range m.Output {
				var body []byte
				switch mode {
				case bulkexport.DownloadSigned:
					if !strings.HasPrefix(file.URL, endpoint+"/"+name+"/bulk/") {
						t.Fatalf("signed URL %s is not the bucket's", file.URL)
					}
					body = get(t, file.URL, "") // a capability URL: no token
				default:
					if !strings.HasPrefix(file.URL, base+"/bulkfiles/") {
						t.Fatalf("file URL %s is not the handler's", file.URL)
					}
					body = get(t, file.URL, "Bearer tok")
				}
				n := checkNDJSON(t, file, body)
				counts[file.Type] += n
			}
			if counts["Patient"] != 9 || counts["Observation"] != 9 {
				t.Errorf("exported %v, want 9 of each", counts)
			}
			presigned := f.count("presigned") - presignedBefore
			if mode == bulkexport.DownloadProxy && presigned != 0 {
				t.Errorf("%d presigned requests in proxy mode", presigned)
			}
			if mode != bulkexport.DownloadProxy && presigned != len(m.Output) {
				t.Errorf("%d presigned requests, want one per file (%d)", presigned, len(m.Output))
			}
			if n := f.presignedWithAuth.Load(); n != 0 {
				t.Errorf("%d requests to the object store carried an Authorization header", n)
			}
		})
	}
}

// startBulkServer runs a handler and a Worker over storage on 127.0.0.1,
// with one client whose token is "tok".
func startBulkServer(t *testing.T, storage *blobstorage.Storage, mode bulkexport.DownloadMode) string {
	t.Helper()
	src := bulkexporttest.NewSource()
	for i := range 9 {
		if err := src.Add(
			fmt.Sprintf(`{"resourceType":"Patient","id":"p%d"}`, i),
			fmt.Sprintf(`{"resourceType":"Observation","id":"o%d","status":"final","code":{"text":"x"},"subject":{"reference":"Patient/p%d"}}`, i, i),
		); err != nil {
			t.Fatal(err)
		}
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	store := bulkexport.NewMemoryStore()
	worker, err := bulkexport.NewWorker(store, src, storage, &bulkexport.WorkerOptions{
		PollInterval: 20 * time.Millisecond, Heartbeat: 20 * time.Millisecond, MaxFileResources: 4, Logger: quiet,
	})
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	h, err := bulkexport.NewHandler(store, &bulkexport.Options{
		BaseURL: srv.URL + "/fhir",
		Types:   src,
		Storage: storage,
		Authenticate: func(r *http.Request) (string, error) {
			if r.Header.Get("Authorization") != "Bearer tok" {
				return "", bulkexport.ErrUnauthorized
			}
			return "client", nil
		},
		Downloads: mode,
		OnQueued:  func(string) { worker.Notify() },
		Logger:    quiet,
	})
	if err != nil {
		t.Fatal(err)
	}
	mux.Handle("/fhir/", h)
	wctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = worker.Run(wctx)
	}()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	return srv.URL + "/fhir"
}

func kickoff(t *testing.T, u string) string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, u, nil)
	req.Header.Set("Prefer", "respond-async")
	req.Header.Set("Accept", "application/fhir+json")
	req.Header.Set("Authorization", "Bearer tok")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("kick-off: %d", resp.StatusCode)
	}
	return resp.Header.Get("Content-Location")
}

func waitManifest(t *testing.T, status string) *fhirbulk.Manifest {
	t.Helper()
	for range 1000 { // a bounded wait: the export takes milliseconds
		req, _ := http.NewRequest(http.MethodGet, status, nil)
		req.Header.Set("Authorization", "Bearer tok")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		switch resp.StatusCode {
		case http.StatusAccepted:
			time.Sleep(10 * time.Millisecond)
			continue
		case http.StatusOK:
			var m fhirbulk.Manifest
			if err := json.Unmarshal(body, &m); err != nil {
				t.Fatal(err)
			}
			return &m
		default:
			t.Fatalf("poll: %d %s", resp.StatusCode, body)
		}
	}
	t.Fatal("the export did not finish")
	return nil
}

// get fetches u with Go's default redirect handling (which drops
// Authorization when a redirect leaves the host).
func get(t *testing.T, u, auth string) []byte {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, u, nil)
	req.Header.Set("Accept", "application/fhir+ndjson")
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := (&http.Client{}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %d %s", u, resp.StatusCode, body)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/fhir+ndjson") {
		t.Errorf("GET %s: Content-Type %q", u, ct)
	}
	return body
}

// checkNDJSON checks a file against its manifest entry and returns its
// line count.
func checkNDJSON(t *testing.T, f fhirbulk.ManifestFile, body []byte) int64 {
	t.Helper()
	var n int64
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		var r struct{ ResourceType string }
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil || r.ResourceType != f.Type {
			t.Fatalf("%s: line %q (%v), want a %s", f.URL, sc.Bytes(), err, f.Type)
		}
		n++
	}
	if f.Count == nil || *f.Count != n {
		t.Errorf("%s: %d lines, manifest count %v", f.URL, n, f.Count)
	}
	return n
}
