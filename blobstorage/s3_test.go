package blobstorage_test

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
	"gocloud.dev/blob"
	"gocloud.dev/blob/s3blob"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/blobstorage"
	"github.com/bulkfhir/bulkexport/storagetest"
)

// fakeS3 is an S3-compatible server (gofakes3 over its in-memory backend)
// on a loopback httptest server, reached through the real s3blob driver
// and the AWS SDK, with static credentials and path-style addressing.
type fakeS3 struct {
	*httptest.Server
	backend *s3mem.Backend
	client  *s3.Client

	mu       sync.Mutex
	requests []string // "METHOD op" of each request
	nbucket  atomic.Int64
	// presignedWithAuth counts presigned requests that also carried an
	// Authorization header (a client's bearer token, leaked).
	presignedWithAuth atomic.Int64
}

func newFakeS3(t *testing.T) *fakeS3 {
	t.Helper()
	f := &fakeS3{backend: s3mem.New()}
	faker := gofakes3.New(f.backend, gofakes3.WithLogger(gofakes3.DiscardLog()))
	h := faker.Server()
	f.Server = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		op := s3Op(r)
		f.mu.Lock()
		f.requests = append(f.requests, r.Method+" "+op)
		f.mu.Unlock()
		if op == "presigned" && r.Header.Get("Authorization") != "" {
			f.presignedWithAuth.Add(1)
		}
		h.ServeHTTP(w, r)
	}))
	// A reader that seeks away closes its request mid-body, and gofakes3
	// then logs a failed WriteHeader: expected, and not worth printing.
	f.Config.ErrorLog = log.New(io.Discard, "", 0)
	f.Start()
	t.Cleanup(f.Close)
	f.client = f.clientAt(f.URL)
	return f
}

// clientAt is an S3 client of the fake reached at endpoint: static
// credentials, path-style addressing, region us-east-1.
func (f *fakeS3) clientAt(endpoint string) *s3.Client {
	return s3.NewFromConfig(aws.Config{
		Region:      "us-east-1",
		Credentials: credentials.NewStaticCredentialsProvider("AKIDBULKEXPORTTEST", "bulkexport-test-secret", ""),
	}, func(o *s3.Options) {
		o.BaseEndpoint = aws.String(endpoint)
		o.UsePathStyle = true
	})
}

// s3Op names the S3 operation of a request by its query.
func s3Op(r *http.Request) string {
	q := r.URL.Query()
	switch {
	case q.Has("uploads"):
		return "CreateMultipartUpload"
	case q.Has("partNumber"):
		return "UploadPart"
	case q.Has("uploadId") && r.Method == http.MethodPost:
		return "CompleteMultipartUpload"
	case q.Has("uploadId") && r.Method == http.MethodDelete:
		return "AbortMultipartUpload"
	case q.Has("X-Amz-Signature"):
		return "presigned"
	case q.Has("list-type") || q.Has("prefix"):
		return "List"
	}
	return "object"
}

// count returns how many requests were op.
func (f *fakeS3) count(op string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, r := range f.requests {
		if strings.HasSuffix(r, " "+op) {
			n++
		}
	}
	return n
}

func (f *fakeS3) countRequest(req string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, r := range f.requests {
		if r == req {
			n++
		}
	}
	return n
}

// bucket creates a new bucket and opens it with s3blob.
func (f *fakeS3) bucket(t *testing.T) (*blob.Bucket, string) {
	t.Helper()
	name := fmt.Sprintf("bucket-%d", f.nbucket.Add(1))
	if err := f.backend.CreateBucket(name); err != nil {
		t.Fatal(err)
	}
	b, err := s3blob.OpenBucket(ctx, f.client, name, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b, name
}

func TestS3Conformance(t *testing.T) {
	t.Parallel()
	f := newFakeS3(t)
	storagetest.Run(t, func(t *testing.T) bulkexport.Storage {
		b, _ := f.bucket(t)
		s, err := blobstorage.New(b, &blobstorage.Options{Prefix: "exports/"})
		if err != nil {
			t.Fatal(err)
		}
		return s
	})
}

// waitFor polls cond for up to 10 seconds (uploads run in the
// background); a bounded wait, not a timing assertion.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for range 1000 {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

func TestS3Multipart(t *testing.T) {
	t.Parallel()
	f := newFakeS3(t)
	b, _ := f.bucket(t)
	s, err := blobstorage.New(b, &blobstorage.Options{BufferSize: 5 << 20})
	if err != nil {
		t.Fatal(err)
	}

	// 12 MiB in 5 MiB parts: three parts.
	const size = 12 << 20
	data := make([]byte, size)
	for i := range data {
		data[i] = byte('a' + i*7%26)
	}
	w, err := s.Create(ctx, "job1", "big.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	for off := 0; off < size; off += 4096 {
		if _, err := w.Write(data[off : off+4096]); err != nil {
			t.Fatal(err)
		}
	}
	// Parts are uploaded, but the object does not exist until Commit.
	waitFor(t, "a part upload", func() bool { return f.count("UploadPart") >= 1 })
	if names, err := s.List(ctx, "job1"); err != nil || len(names) != 0 {
		t.Fatalf("List during the upload = %q, %v; want nothing", names, err)
	}
	if got := keys(t, b); len(got) != 0 {
		t.Fatalf("keys during the upload = %q, want none", got)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	if n := f.count("CreateMultipartUpload"); n != 1 {
		t.Errorf("%d CreateMultipartUpload requests, want 1", n)
	}
	if n := f.count("UploadPart"); n != 3 {
		t.Errorf("%d UploadPart requests, want 3", n)
	}
	if n := f.count("CompleteMultipartUpload"); n != 1 {
		t.Errorf("%d CompleteMultipartUpload requests, want 1", n)
	}

	r, err := s.Open(ctx, "job1", "big.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Size() != size {
		t.Errorf("Size = %d, want %d", r.Size(), size)
	}
	h := sha256.New()
	if _, err := io.Copy(h, r); err != nil {
		t.Fatal(err)
	}
	if want := sha256.Sum256(data); !bytes.Equal(h.Sum(nil), want[:]) {
		t.Error("content differs from what was written")
	}
	// A seek across a part boundary reads with a range request.
	if _, err := r.Seek(5<<20-3, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 6)
	if _, err := io.ReadFull(r, got); err != nil || !bytes.Equal(got, data[5<<20-3:5<<20+3]) {
		t.Errorf("range read = %q, %v; want %q", got, err, data[5<<20-3:5<<20+3])
	}

	// An aborted multipart upload leaves no object.
	w, err = s.Create(ctx, "job1", "aborted.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	parts := f.count("UploadPart")
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a part upload", func() bool { return f.count("UploadPart") > parts })
	if err := w.Abort(); err != nil {
		t.Fatal(err)
	}
	if names, err := s.List(ctx, "job1"); err != nil || !slices.Equal(names, []string{"big.ndjson"}) {
		t.Fatalf("List after Abort = %q, %v; want only big.ndjson", names, err)
	}
}

// TestS3ReadRequests checks that reading costs one GET however
// http.ServeContent probes the size, and a range read one more.
func TestS3ReadRequests(t *testing.T) {
	t.Parallel()
	f := newFakeS3(t)
	b, _ := f.bucket(t)
	s, err := blobstorage.New(b, nil)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("0123456789"), 1000)
	write(t, s, "job1", "f.ndjson", data)
	gets := func() int { return f.countRequest("GET object") }

	before := gets()
	r, err := s.Open(ctx, "job1", "f.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	if r.ModTime().IsZero() {
		t.Error("ModTime is zero")
	}
	// As the file endpoint does: Content-Type set, so nothing is sniffed.
	rec := httptest.NewRecorder()
	rec.Header().Set("Content-Type", "application/fhir+ndjson")
	http.ServeContent(rec, httptest.NewRequest(http.MethodGet, "/f", nil), "f.ndjson", r.ModTime(), r)
	if rec.Code != http.StatusOK || !bytes.Equal(rec.Body.Bytes(), data) {
		t.Fatalf("ServeContent = %d, %d bytes", rec.Code, rec.Body.Len())
	}
	if n := gets() - before; n != 1 {
		t.Errorf("a whole download took %d GETs, want 1", n)
	}
	r.Close()

	before = gets()
	r, err = s.Open(ctx, "job1", "f.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	req := httptest.NewRequest(http.MethodGet, "/f", nil)
	req.Header.Set("Range", "bytes=5000-5009")
	rec = httptest.NewRecorder()
	rec.Header().Set("Content-Type", "application/fhir+ndjson")
	http.ServeContent(rec, req, "f.ndjson", r.ModTime(), r)
	if rec.Code != http.StatusPartialContent || !bytes.Equal(rec.Body.Bytes(), data[5000:5010]) {
		t.Fatalf("ranged ServeContent = %d, %q", rec.Code, rec.Body.Bytes())
	}
	if n := gets() - before; n != 2 {
		t.Errorf("a range download took %d GETs, want 2 (Open's, then the range)", n)
	}
	r.Close()
}

func TestS3SignedURL(t *testing.T) {
	t.Parallel()
	f := newFakeS3(t)
	b, bucketName := f.bucket(t)
	s, err := blobstorage.New(b, &blobstorage.Options{Prefix: "bulk/"})
	if err != nil {
		t.Fatal(err)
	}
	data := []byte("{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n")
	write(t, s, "job1", "Patient.000001.ndjson", data)
	if err := s.CheckSigning(ctx); err != nil {
		t.Fatal(err)
	}

	signed, err := s.SignedURL(ctx, "job1", "Patient.000001.ndjson", 5*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(signed)
	if err != nil {
		t.Fatal(err)
	}
	if want := "/" + bucketName + "/bulk/job1/Patient.000001.ndjson"; u.Path != want {
		t.Errorf("signed URL path = %q, want %q (path style)", u.Path, want)
	}
	q := u.Query()
	if q.Get("X-Amz-Expires") != "300" || q.Get("X-Amz-Signature") == "" || q.Get("X-Amz-Algorithm") != "AWS4-HMAC-SHA256" {
		t.Errorf("signed URL query = %v, want a SigV4 presign for 300 s", q)
	}
	if !strings.HasPrefix(signed, f.URL+"/") {
		t.Errorf("signed URL %q is not on the endpoint %s", signed, f.URL)
	}

	// A plain client, with no credentials, gets the bytes.
	resp, err := (&http.Client{}).Get(signed)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, data) {
		t.Fatalf("GET presigned = %d %q", resp.StatusCode, body)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "application/fhir+ndjson" {
		t.Errorf("Content-Type = %q, want application/fhir+ndjson", ct)
	}
	if f.count("presigned") != 1 {
		t.Errorf("the presigned GET was not seen")
	}
}
