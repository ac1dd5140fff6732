package blobstorage_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"gocloud.dev/blob"
	"gocloud.dev/blob/fileblob"
	"gocloud.dev/blob/memblob"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/blobstorage"
	"github.com/bulkfhir/bulkexport/storagetest"
)

var ctx = context.Background()

// newStorage wraps bucket, closing the bucket when the test ends.
func newStorage(t *testing.T, bucket *blob.Bucket, opts *blobstorage.Options) *blobstorage.Storage {
	t.Helper()
	t.Cleanup(func() { _ = bucket.Close() })
	s, err := blobstorage.New(bucket, opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestMemblobConformance(t *testing.T) {
	t.Parallel()
	storagetest.Run(t, func(t *testing.T) bulkexport.Storage {
		return newStorage(t, memblob.OpenBucket(nil), nil)
	})
}

func TestMemblobConformanceWithPrefix(t *testing.T) {
	t.Parallel()
	storagetest.Run(t, func(t *testing.T) bulkexport.Storage {
		bucket := memblob.OpenBucket(nil)
		// Other data in the bucket, some of it under the same prefix.
		for _, key := range []string{"other/job1/f", "bulk/job1", "bulkx/job1/f", "job1/f"} {
			if err := bucket.WriteAll(ctx, key, []byte("not ours"), nil); err != nil {
				t.Fatal(err)
			}
		}
		return newStorage(t, bucket, &blobstorage.Options{Prefix: "bulk/"})
	})
}

func openFileblob(t *testing.T, dir string, opts *fileblob.Options) *blob.Bucket {
	t.Helper()
	bucket, err := fileblob.OpenBucket(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	return bucket
}

// TestFileblobConformance runs the suite over fileblob as recommended
// (metadata=skip: no sidecar files) and with its default sidecars.
func TestFileblobConformance(t *testing.T) {
	t.Parallel()
	t.Run("metadata=skip", func(t *testing.T) {
		storagetest.Run(t, func(t *testing.T) bulkexport.Storage {
			return newStorage(t, openFileblob(t, t.TempDir(), &fileblob.Options{Metadata: fileblob.MetadataDontWrite}), nil)
		})
	})
	t.Run("sidecar", func(t *testing.T) {
		storagetest.Run(t, func(t *testing.T) bulkexport.Storage {
			if strings.HasSuffix(t.Name(), "/ConcurrentReplace") {
				// fileblob rewrites a replaced object's .attrs sidecar in
				// place (os.Create, then JSON), so an Open racing the
				// replace can read it truncated and fail. The engine never
				// replaces a file that is being served; docs/storage.md
				// recommends metadata=skip.
				t.Skip("fileblob's sidecar metadata is not replaced atomically")
			}
			return newStorage(t, openFileblob(t, t.TempDir(), nil), nil)
		})
	})
}

// TestFileblobSignedConformance runs the suite over fileblob with its
// HMAC URL signer, so that the URLSigner cases run: each storage comes
// with a loopback server that serves its signed URLs as an application
// would (checking them with KeyFromURL, then serving the object with
// http.ServeContent, Range included).
func TestFileblobSignedConformance(t *testing.T) {
	t.Parallel()
	storagetest.Run(t, func(t *testing.T) bulkexport.Storage {
		return newStorage(t, signedFileblob(t), &blobstorage.Options{Prefix: "signed/"})
	})
}

// signedFileblob opens a fileblob bucket in a new directory, with an HMAC
// URL signer whose URLs a loopback server serves until the test ends.
func signedFileblob(t *testing.T) *blob.Bucket {
	t.Helper()
	var (
		signer *fileblob.URLSignerHMAC
		bucket *blob.Bucket
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key, err := signer.KeyFromURL(r.Context(), r.URL)
		if err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		br, err := bucket.NewReader(r.Context(), key, nil)
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		defer br.Close()
		w.Header().Set("Content-Type", br.ContentType())
		http.ServeContent(w, r, "", br.ModTime(), br)
	}))
	t.Cleanup(srv.Close)
	base, err := url.Parse(srv.URL + "/files")
	if err != nil {
		t.Fatal(err)
	}
	signer = fileblob.NewURLSignerHMAC(base, []byte("storagetest-secret"))
	bucket = openFileblob(t, t.TempDir(), &fileblob.Options{URLSigner: signer, Metadata: fileblob.MetadataDontWrite})
	return bucket
}

// TestFileblobURL opens fileblob by URL, as the example server does.
func TestFileblobURL(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	bucket, err := blob.OpenBucket(ctx, "file://"+filepath.ToSlash(dir)+"?metadata=skip")
	if err != nil {
		t.Fatal(err)
	}
	s := newStorage(t, bucket, &blobstorage.Options{Prefix: "x/"})
	write(t, s, "job1", "f.ndjson", []byte("{}\n"))
	if _, err := os.Stat(filepath.Join(dir, "x", "job1", "f.ndjson")); err != nil {
		t.Fatal(err)
	}
}

// write writes a committed file.
func write(t *testing.T, s bulkexport.Storage, jobID, name string, data []byte) {
	t.Helper()
	w, err := s.Create(ctx, jobID, name)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
}

// keys lists every key of a bucket.
func keys(t *testing.T, b *blob.Bucket) []string {
	t.Helper()
	var out []string
	it := b.List(nil)
	for {
		obj, err := it.Next(ctx)
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, obj.Key)
	}
}

func TestLayoutAndAttributes(t *testing.T) {
	t.Parallel()
	bucket := memblob.OpenBucket(nil)
	s := newStorage(t, bucket, &blobstorage.Options{Prefix: "exports/"})
	write(t, s, "job1", "Patient.000001.ndjson", []byte("{}\n"))
	if got := keys(t, bucket); !slices.Equal(got, []string{"exports/job1/Patient.000001.ndjson"}) {
		t.Fatalf("keys = %q", got)
	}
	if k := s.Key("job1", "Patient.000001.ndjson"); k != "exports/job1/Patient.000001.ndjson" {
		t.Errorf("Key = %q", k)
	}
	attrs, err := bucket.Attributes(ctx, "exports/job1/Patient.000001.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	if attrs.ContentType != "application/fhir+ndjson" {
		t.Errorf("ContentType = %q, want application/fhir+ndjson (served as is on presigned downloads)", attrs.ContentType)
	}
	if s.Bucket() != bucket {
		t.Error("Bucket() is not the bucket")
	}
}

func TestListSkipsForeignObjects(t *testing.T) {
	t.Parallel()
	bucket := memblob.OpenBucket(nil)
	s := newStorage(t, bucket, nil)
	write(t, s, "job1", "a.ndjson", []byte("a\n"))
	for _, key := range []string{"job1/sub/b.ndjson", "job1/bad name", "job1/é", "job10/c.ndjson", "job1"} {
		if err := bucket.WriteAll(ctx, key, []byte("x"), nil); err != nil {
			t.Fatal(err)
		}
	}
	names, err := s.List(ctx, "job1")
	if err != nil || !slices.Equal(names, []string{"a.ndjson"}) {
		t.Fatalf("List = %q, %v; want only a.ndjson", names, err)
	}
	// Delete removes everything under the job's prefix, and nothing else.
	if err := s.Delete(ctx, "job1"); err != nil {
		t.Fatal(err)
	}
	if got := keys(t, bucket); !slices.Equal(got, []string{"job1", "job10/c.ndjson"}) {
		t.Fatalf("keys after Delete = %q", got)
	}
}

func TestNothingUntilCommit(t *testing.T) {
	t.Parallel()
	bucket := memblob.OpenBucket(nil)
	s := newStorage(t, bucket, nil)
	w, err := s.Create(ctx, "job1", "f.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	big := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB, past every buffer
	if _, err := w.Write(big); err != nil {
		t.Fatal(err)
	}
	if got := keys(t, bucket); len(got) != 0 {
		t.Fatalf("keys before Commit = %q, want none", got)
	}
	if err := w.Abort(); err != nil {
		t.Fatal(err)
	}
	if got := keys(t, bucket); len(got) != 0 {
		t.Fatalf("keys after Abort = %q, want none", got)
	}
	if err := w.Commit(); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("Commit after Abort = %v, want fs.ErrClosed", err)
	}
	if _, err := w.Write([]byte("x")); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("Write after Abort = %v, want fs.ErrClosed", err)
	}
}

func TestCreateContextCancelAborts(t *testing.T) {
	t.Parallel()
	bucket := memblob.OpenBucket(nil)
	s := newStorage(t, bucket, nil)
	cctx, cancel := context.WithCancel(ctx)
	w, err := s.Create(cctx, "job1", "f.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("data\n")); err != nil {
		t.Fatal(err)
	}
	cancel()
	if err := w.Commit(); err == nil {
		t.Fatal("Commit after the context was cancelled succeeded")
	}
	if got := keys(t, bucket); len(got) != 0 {
		t.Fatalf("keys = %q, want none", got)
	}
	if err := w.Abort(); err != nil {
		t.Errorf("Abort after a failed Commit = %v, want nil", err)
	}
}

func TestDeleteCancelsOpenUploads(t *testing.T) {
	t.Parallel()
	bucket := memblob.OpenBucket(nil)
	s := newStorage(t, bucket, nil)
	write(t, s, "job1", "done.ndjson", []byte("done\n"))
	w, err := s.Create(ctx, "job1", "partial.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	other, err := s.Create(ctx, "job2", "f.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("partial\n")); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "job1"); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Commit of a deleted job's file = %v, want an error wrapping fs.ErrNotExist", err)
	}
	if _, err := other.Write([]byte("other\n")); err != nil {
		t.Fatal(err)
	}
	if err := other.Commit(); err != nil {
		t.Errorf("Commit of another job's file: %v", err)
	}
	if got := keys(t, bucket); !slices.Equal(got, []string{"job2/f.ndjson"}) {
		t.Fatalf("keys = %q, want only job2's file", got)
	}
	// A new writer of the deleted job is not affected.
	write(t, s, "job1", "again.ndjson", []byte("again\n"))
	if names, _ := s.List(ctx, "job1"); !slices.Equal(names, []string{"again.ndjson"}) {
		t.Fatalf("List = %q", names)
	}
}

func TestDeleteFile(t *testing.T) {
	t.Parallel()
	s := newStorage(t, memblob.OpenBucket(nil), nil)
	var _ bulkexport.FileDeleter = s
	write(t, s, "job1", "a", []byte("a"))
	write(t, s, "job1", "b", []byte("b"))
	if err := s.DeleteFile(ctx, "job1", "a"); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteFile(ctx, "job1", "a"); err != nil {
		t.Errorf("DeleteFile of a missing file = %v, want nil", err)
	}
	if names, _ := s.List(ctx, "job1"); !slices.Equal(names, []string{"b"}) {
		t.Fatalf("List = %q", names)
	}
	if err := s.DeleteFile(ctx, "job1", "../b"); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("DeleteFile of an invalid name = %v, want fs.ErrInvalid", err)
	}
}

func TestReaderDetectsReplacement(t *testing.T) {
	t.Parallel()
	s := newStorage(t, memblob.OpenBucket(nil), nil)
	write(t, s, "job1", "f", bytes.Repeat([]byte("a"), 100))
	r, err := s.Open(ctx, "job1", "f")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	time.Sleep(2 * time.Millisecond) // memblob's ModTime is the commit time
	write(t, s, "job1", "f", bytes.Repeat([]byte("b"), 100))
	if _, err := r.Seek(50, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(r); err == nil || !strings.Contains(err.Error(), "replaced") {
		t.Errorf("reading a replaced object at a new offset = %v, want an error", err)
	}
}

func TestReaderClosed(t *testing.T) {
	t.Parallel()
	s := newStorage(t, memblob.OpenBucket(nil), nil)
	write(t, s, "job1", "f", []byte("abc"))
	r, err := s.Open(ctx, "job1", "f")
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Read(make([]byte, 1)); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("Read after Close = %v", err)
	}
	if _, err := r.Seek(0, io.SeekStart); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("Seek after Close = %v", err)
	}
}

func TestOptions(t *testing.T) {
	t.Parallel()
	if _, err := blobstorage.New(nil, nil); err == nil {
		t.Error("New(nil) succeeded")
	}
	b := memblob.OpenBucket(nil)
	defer b.Close()
	for _, o := range []blobstorage.Options{{BufferSize: -1}, {MaxConcurrency: -1}, {DeleteConcurrency: -1}} {
		if _, err := blobstorage.New(b, &o); err == nil {
			t.Errorf("New(%+v) succeeded", o)
		}
	}
}

func TestSignedURLUnsupported(t *testing.T) {
	t.Parallel()
	s := newStorage(t, memblob.OpenBucket(nil), nil)
	_, err := s.SignedURL(ctx, "job1", "f", time.Minute)
	if !errors.Is(err, errors.ErrUnsupported) || !errors.Is(err, blobstorage.ErrCannotSign) {
		t.Fatalf("SignedURL over memblob = %v, want errors.ErrUnsupported and ErrCannotSign", err)
	}
	if err := s.CheckSigning(ctx); !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("CheckSigning over memblob = %v", err)
	}
	if _, err := s.SignedURL(ctx, "job1", "../f", time.Minute); !errors.Is(err, fs.ErrInvalid) {
		t.Errorf("SignedURL of an invalid name = %v", err)
	}
}

// TestFileblobSignedURL signs with fileblob's HMAC signer, and serves the
// URLs as an application would, checking them with KeyFromURL.
func TestFileblobSignedURL(t *testing.T) {
	t.Parallel()
	var signer *fileblob.URLSignerHMAC
	bucketFor := func() *blob.Bucket { return nil }
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Authorization") != "" {
			http.Error(w, "no credentials here", http.StatusBadRequest)
			return
		}
		key, err := signer.KeyFromURL(r.Context(), r.URL)
		if err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
			return
		}
		b, err := bucketFor().ReadAll(r.Context(), key)
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		_, _ = w.Write(b)
	}))
	defer srv.Close()
	base, _ := url.Parse(srv.URL + "/files")
	signer = fileblob.NewURLSignerHMAC(base, []byte("secret"))
	bucket := openFileblob(t, t.TempDir(), &fileblob.Options{URLSigner: signer})
	bucketFor = func() *blob.Bucket { return bucket }
	s := newStorage(t, bucket, &blobstorage.Options{Prefix: "p/"})
	write(t, s, "job1", "Patient.000001.ndjson", []byte("{\"resourceType\":\"Patient\"}\n"))
	if err := s.CheckSigning(ctx); err != nil {
		t.Fatal(err)
	}
	u, err := s.SignedURL(ctx, "job1", "Patient.000001.ndjson", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || string(body) != "{\"resourceType\":\"Patient\"}\n" {
		t.Fatalf("GET %s = %d %q", u, resp.StatusCode, body)
	}
	if _, err := s.SignedURL(ctx, "job1", "f", 0); err == nil {
		t.Error("SignedURL with no expiry succeeded")
	}
}
