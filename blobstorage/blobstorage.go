// Package blobstorage is a bulkexport.Storage over object storage: any
// bucket that gocloud.dev/blob opens (Amazon S3 and S3-compatible servers,
// Google Cloud Storage, Azure Blob Storage, a local directory, memory).
//
// The caller opens the bucket, with the driver it imports, and keeps
// ownership of it:
//
//	import (
//		"gocloud.dev/blob"
//		_ "gocloud.dev/blob/s3blob"
//	)
//
//	bucket, err := blob.OpenBucket(ctx, "s3://my-bucket?region=eu-west-1")
//	...
//	defer bucket.Close()
//	files, err := blobstorage.New(bucket, &blobstorage.Options{Prefix: "bulkexport/"})
//
// A job's files are the objects <Prefix><jobID>/<name>. Files are streamed
// to the bucket as they are written (in parts of Options.BufferSize, by
// multipart upload where the driver has one) and made visible atomically
// by Commit: object stores create an object only when its upload
// completes, so no partial file is ever listed or opened. Abort cancels
// the upload, and nothing is created.
//
// Storage implements bulkexport.FileDeleter, and bulkexport.URLSigner
// through the bucket's SignedURL where the driver can sign (s3blob,
// gcsblob, azureblob, fileblob with a URLSigner; not memblob), so that the
// handler can hand out presigned download URLs (bulkexport.DownloadSigned
// and bulkexport.DownloadRedirect).
//
// With fileblob, open the bucket with metadata=skip
// (fileblob.MetadataDontWrite): its default .attrs sidecar files are
// rewritten in place, so an Open racing a replace of the same file can
// fail. docs/storage.md in the repository covers each provider's URL and
// credentials, lifecycle rules, and the download modes.
package blobstorage

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"gocloud.dev/blob"
	"gocloud.dev/gcerrors"
	"golang.org/x/sync/errgroup"

	"github.com/bulkfhir/bulkexport"
)

// Defaults of Options.
const (
	// DefaultBufferSize is the default part size of uploads: 8 MiB. S3
	// needs parts of at least 5 MiB and allows 10,000 of them, so files of
	// up to 80 GB can be written (the Worker's default MaxFileBytes is
	// 256 MiB).
	DefaultBufferSize = 8 << 20
	// DefaultMaxConcurrency is the default number of parts of one file
	// uploaded at once: 2, so that one part is uploaded while the next is
	// filled.
	DefaultMaxConcurrency = 2
	// DefaultDeleteConcurrency is the default number of objects Delete
	// removes at once.
	DefaultDeleteConcurrency = 8
)

// contentType is the Content-Type of every object: export files, error
// files and deleted files are all FHIR NDJSON. Object stores serve it back
// on presigned downloads, where clients (Inferno among them) check it.
const contentType = "application/fhir+ndjson"

// writeBufSize is the buffer in front of each upload, so that the
// engine's small writes (a line, then its newline) do not each reach the
// driver (a pipe to the uploader for S3, a system call for fileblob).
const writeBufSize = 64 << 10

var bufPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, writeBufSize) }}

// Options configures a Storage. The zero value (or nil) is valid.
type Options struct {
	// Prefix is put before every object key, verbatim: a job's files are
	// <Prefix><jobID>/<name>. Use it to share a bucket with other data and
	// to scope a lifecycle rule; end it with "/" to make it a "folder".
	// Default: "", the jobs are at the top of the bucket.
	Prefix string

	// BufferSize is the size of the parts a file is uploaded in
	// (blob.WriterOptions.BufferSize): a file smaller than this is one
	// request, a larger one a multipart (S3), resumable (GCS) or block
	// (Azure) upload. Each file being written holds about
	// BufferSize × (MaxConcurrency + 1) bytes of memory on S3, so with the
	// defaults and a Worker writing four files at once, about 100 MiB.
	// Default: DefaultBufferSize (8 MiB). S3 refuses parts under 5 MiB;
	// GCS wants a multiple of 256 KiB.
	BufferSize int

	// MaxConcurrency is how many parts of one file are uploaded at once
	// (blob.WriterOptions.MaxConcurrency). Default: DefaultMaxConcurrency
	// (2).
	MaxConcurrency int

	// DeleteConcurrency is how many objects Delete removes at once.
	// Default: DefaultDeleteConcurrency (8).
	DeleteConcurrency int
}

// Storage is a bulkexport.Storage over a *blob.Bucket. It is safe for
// concurrent use; each FileWriter and FileReader it returns is for one
// goroutine at a time.
//
// Names and job ids must be 1 to 128 characters of [A-Za-z0-9._-], and
// neither "." nor ".."; anything else is refused with an error wrapping
// fs.ErrInvalid. Objects under a job's prefix whose names are not valid
// (or that lie deeper, in "subfolders") are never listed or opened, but
// Delete removes them with the job.
//
// Delete cancels the uploads of the job that this Storage still has open,
// so that their Commit fails instead of bringing the job back, as with
// bulkexport.DirStorage. Uploads opened by another process (another
// replica sharing the bucket) cannot be seen: a file committed there after
// the Delete stays until a purge or a bucket lifecycle rule removes it.
type Storage struct {
	bucket   *blob.Bucket
	prefix   string
	bufSize  int
	maxConc  int
	delConc  int
	mu       sync.Mutex
	inflight map[string]*jobUploads // job id → its open uploads
}

// jobUploads are the open uploads of one job.
type jobUploads struct {
	// commit is held shared by each Commit while it completes its upload,
	// and exclusively by Delete while it cancels the job's uploads, so that
	// an upload that is completing when Delete starts is finished (and
	// then deleted) rather than missed.
	commit sync.RWMutex
	open   map[*writer]struct{} // guarded by Storage.mu
}

var (
	_ bulkexport.Storage     = (*Storage)(nil)
	_ bulkexport.FileDeleter = (*Storage)(nil)
	_ bulkexport.URLSigner   = (*Storage)(nil)
)

// New returns a Storage over bucket. The bucket stays the caller's: close
// it after the Storage is no longer used.
func New(bucket *blob.Bucket, opts *Options) (*Storage, error) {
	if bucket == nil {
		return nil, errors.New("blobstorage: New: nil bucket")
	}
	var o Options
	if opts != nil {
		o = *opts
	}
	if o.BufferSize < 0 || o.MaxConcurrency < 0 || o.DeleteConcurrency < 0 {
		return nil, errors.New("blobstorage: New: negative BufferSize, MaxConcurrency or DeleteConcurrency")
	}
	if o.BufferSize == 0 {
		o.BufferSize = DefaultBufferSize
	}
	if o.MaxConcurrency == 0 {
		o.MaxConcurrency = DefaultMaxConcurrency
	}
	if o.DeleteConcurrency == 0 {
		o.DeleteConcurrency = DefaultDeleteConcurrency
	}
	return &Storage{
		bucket:   bucket,
		prefix:   o.Prefix,
		bufSize:  o.BufferSize,
		maxConc:  o.MaxConcurrency,
		delConc:  o.DeleteConcurrency,
		inflight: make(map[string]*jobUploads),
	}, nil
}

// Bucket returns the bucket the Storage writes to.
func (s *Storage) Bucket() *blob.Bucket { return s.bucket }

// Key returns the object key of a job's file: <Prefix><jobID>/<name>. It
// does not check the names.
func (s *Storage) Key(jobID, name string) string { return s.prefix + jobID + "/" + name }

// jobPrefix is the key prefix of a job's files.
func (s *Storage) jobPrefix(jobID string) string { return s.prefix + jobID + "/" }

// validName reports whether s is a valid job id or file name: 1 to 128
// characters of [A-Za-z0-9._-], not "." or "..". (bulkexport has the same
// rule, unexported.)
func validName(s string) bool {
	if len(s) == 0 || len(s) > 128 || s == "." || s == ".." {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// checkNames returns an error wrapping fs.ErrInvalid unless jobID and,
// when name is not nil, *name are valid. It keeps every key inside the
// job's prefix.
func checkNames(op, jobID string, name *string) error {
	if !validName(jobID) {
		return fmt.Errorf("blobstorage: %s: invalid job id %q (want 1-128 characters of [A-Za-z0-9._-], not . or ..): %w", op, jobID, fs.ErrInvalid)
	}
	if name != nil && !validName(*name) {
		return fmt.Errorf("blobstorage: %s: invalid file name %q (want 1-128 characters of [A-Za-z0-9._-], not . or ..): %w", op, *name, fs.ErrInvalid)
	}
	return nil
}

// wrapErr adds context to a bucket error, and makes a NotFound one wrap
// fs.ErrNotExist.
func wrapErr(op, key string, err error) error {
	if gcerrors.Code(err) == gcerrors.NotFound {
		return fmt.Errorf("blobstorage: %s %s: %w (%w)", op, key, fs.ErrNotExist, err)
	}
	return fmt.Errorf("blobstorage: %s %s: %w", op, key, err)
}

// Create implements bulkexport.Storage. The upload runs under ctx:
// cancelling ctx before Commit aborts the file.
func (s *Storage) Create(ctx context.Context, jobID, name string) (bulkexport.FileWriter, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := checkNames("Create", jobID, &name); err != nil {
		return nil, err
	}
	key := s.Key(jobID, name)
	uctx, cancel := context.WithCancel(ctx)
	bw, err := s.bucket.NewWriter(uctx, key, &blob.WriterOptions{
		BufferSize:     s.bufSize,
		MaxConcurrency: s.maxConc,
		ContentType:    contentType,
		CacheControl:   "private, no-store",
	})
	if err != nil {
		cancel()
		return nil, wrapErr("Create", key, err)
	}
	buf := bufPool.Get().(*bufio.Writer)
	buf.Reset(bw)
	w := &writer{s: s, jobID: jobID, key: key, bw: bw, buf: buf, cancel: cancel}

	s.mu.Lock()
	ju := s.inflight[jobID]
	if ju == nil {
		ju = &jobUploads{open: make(map[*writer]struct{})}
		s.inflight[jobID] = ju
	}
	ju.open[w] = struct{}{}
	w.ju = ju
	s.mu.Unlock()
	return w, nil
}

// forget removes a finished writer from the open uploads.
func (s *Storage) forget(w *writer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(w.ju.open, w)
	if len(w.ju.open) == 0 && s.inflight[w.jobID] == w.ju {
		delete(s.inflight, w.jobID)
	}
}

// Open implements bulkexport.Storage. The FileReader reads under ctx; its
// first read continues the request Open made, and a Seek elsewhere starts
// a range read at the new offset.
func (s *Storage) Open(ctx context.Context, jobID, name string) (bulkexport.FileReader, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := checkNames("Open", jobID, &name); err != nil {
		return nil, err
	}
	key := s.Key(jobID, name)
	r, size, modTime, err := openRange(ctx, s.bucket, key, 0)
	if err != nil {
		return nil, wrapErr("Open", key, err)
	}
	return &reader{ctx: ctx, bucket: s.bucket, key: key, r: r, size: size, modTime: modTime}, nil
}

// List implements bulkexport.Storage: the valid names directly under the
// job's prefix, sorted.
func (s *Storage) List(ctx context.Context, jobID string) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := checkNames("List", jobID, nil); err != nil {
		return nil, err
	}
	prefix := s.jobPrefix(jobID)
	it := s.bucket.List(&blob.ListOptions{Prefix: prefix, Delimiter: "/"})
	names := []string{}
	for {
		obj, err := it.Next(ctx)
		if err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			return nil, wrapErr("List", prefix, err)
		}
		if obj.IsDir {
			continue
		}
		if name := strings.TrimPrefix(obj.Key, prefix); validName(name) {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}

// Delete implements bulkexport.Storage: it cancels the job's open uploads
// and removes every object under the job's prefix, "subfolders" included.
// A job with no objects is not an error.
func (s *Storage) Delete(ctx context.Context, jobID string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := checkNames("Delete", jobID, nil); err != nil {
		return err
	}
	s.mu.Lock()
	ju := s.inflight[jobID]
	s.mu.Unlock()
	if ju != nil {
		// Wait for commits that are completing, then kill the uploads
		// still open: their Commit will fail.
		ju.commit.Lock()
		s.mu.Lock()
		for w := range ju.open {
			w.kill()
		}
		s.mu.Unlock()
		ju.commit.Unlock()
	}

	prefix := s.jobPrefix(jobID)
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(s.delConc)
	it := s.bucket.List(&blob.ListOptions{Prefix: prefix})
	for {
		obj, err := it.Next(gctx)
		if err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			// A failed deletion cancels gctx, and so the listing: report
			// the deletion's error.
			if werr := g.Wait(); werr != nil {
				return werr
			}
			return wrapErr("Delete", prefix, err)
		}
		if obj.IsDir {
			continue
		}
		key := obj.Key
		g.Go(func() error {
			if err := s.bucket.Delete(gctx, key); err != nil && gcerrors.Code(err) != gcerrors.NotFound {
				return wrapErr("Delete", key, err)
			}
			return nil
		})
	}
	return g.Wait()
}

// DeleteFile implements bulkexport.FileDeleter: it removes one committed
// file. A missing file is not an error.
func (s *Storage) DeleteFile(ctx context.Context, jobID, name string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := checkNames("DeleteFile", jobID, &name); err != nil {
		return err
	}
	key := s.Key(jobID, name)
	if err := s.bucket.Delete(ctx, key); err != nil && gcerrors.Code(err) != gcerrors.NotFound {
		return wrapErr("DeleteFile", key, err)
	}
	return nil
}

// ErrCannotSign is wrapped by SignedURL's error when the bucket's driver
// cannot sign URLs (memblob; fileblob without Options.URLSigner). It wraps
// errors.ErrUnsupported.
var ErrCannotSign = fmt.Errorf("blobstorage: the bucket's driver cannot sign URLs: %w", errors.ErrUnsupported)

// SignedURL implements bulkexport.URLSigner: a presigned GET URL of a
// job's file that works without other credentials until expiry. The URL
// is signed locally (no request is made for S3, GCS with a private key,
// or Azure with a shared key) and does not check that the file exists.
// When the driver cannot sign, the error wraps ErrCannotSign and
// errors.ErrUnsupported.
func (s *Storage) SignedURL(ctx context.Context, jobID, name string, expiry time.Duration) (string, error) {
	if err := checkNames("SignedURL", jobID, &name); err != nil {
		return "", err
	}
	if expiry <= 0 {
		return "", fmt.Errorf("blobstorage: SignedURL: expiry %v is not positive: %w", expiry, fs.ErrInvalid)
	}
	key := s.Key(jobID, name)
	u, err := s.bucket.SignedURL(ctx, key, &blob.SignedURLOptions{Method: http.MethodGet, Expiry: expiry})
	if err != nil {
		if gcerrors.Code(err) == gcerrors.Unimplemented {
			return "", fmt.Errorf("%w: %w", ErrCannotSign, err)
		}
		return "", fmt.Errorf("blobstorage: SignedURL %s: %w", key, err)
	}
	return u, nil
}

// CheckSigning reports whether the bucket's driver can sign URLs, by
// signing one for a key that need not exist. A host can call it at start
// before it configures bulkexport.DownloadSigned or DownloadRedirect. The
// error wraps ErrCannotSign when the driver has no signing at all.
func (s *Storage) CheckSigning(ctx context.Context) error {
	_, err := s.SignedURL(ctx, "check", "signing", time.Minute)
	return err
}

// writerState is where a writer is in its life.
type writerState uint8

const (
	writerOpen writerState = iota
	writerCommitted
	writerAborted
	writerFailed
)

var (
	errCommitted = fmt.Errorf("blobstorage: file already committed: %w", fs.ErrClosed)
	errAborted   = fmt.Errorf("blobstorage: file aborted: %w", fs.ErrClosed)
	errFailed    = fmt.Errorf("blobstorage: file commit failed: %w", fs.ErrClosed)
	errDeleted   = fmt.Errorf("blobstorage: the file's job was deleted while it was written: %w", fs.ErrNotExist)
)

// writer is a FileWriter: a buffered blob.Writer whose Close, the end of
// the upload, is Commit.
type writer struct {
	s      *Storage
	ju     *jobUploads
	jobID  string
	key    string
	state  writerState
	bw     *blob.Writer
	buf    *bufio.Writer // in front of bw; nil once finished
	cancel context.CancelFunc
	killed atomic.Bool // the job was deleted: the upload is cancelled
}

// kill cancels the upload of a job being deleted. It is called from
// another goroutine than the writer's.
func (w *writer) kill() {
	w.killed.Store(true)
	w.cancel()
}

func (w *writer) closedErr() error {
	switch w.state {
	case writerCommitted:
		return errCommitted
	case writerAborted:
		return errAborted
	default:
		return errFailed
	}
}

// Write buffers p; full buffers go to the upload. Writing after Commit or
// Abort is an error.
func (w *writer) Write(p []byte) (int, error) {
	if w.state != writerOpen {
		return 0, w.closedErr()
	}
	n, err := w.buf.Write(p)
	if err != nil {
		if w.killed.Load() {
			err = errDeleted
		}
		return n, fmt.Errorf("blobstorage: write %s: %w", w.key, err)
	}
	return n, nil
}

// release returns the buffer to the pool and forgets the upload.
func (w *writer) release() {
	w.buf.Reset(nil)
	bufPool.Put(w.buf)
	w.buf = nil
	w.s.forget(w)
}

// Commit flushes the buffer and completes the upload: the object appears
// whole, or not at all if Commit fails. A second Commit, or one after
// Abort, is an error.
func (w *writer) Commit() error {
	if w.state != writerOpen {
		return w.closedErr()
	}
	// Under the shared lock, Delete cannot kill the upload: it is either
	// killed already, and then aborted here, or completed before Delete
	// lists the job's objects (and then deleted by it).
	w.ju.commit.RLock()
	killed := w.killed.Load()
	err := w.buf.Flush()
	if err != nil || killed {
		// Close aborts an upload whose context is cancelled.
		w.cancel()
	}
	cerr := w.bw.Close()
	w.ju.commit.RUnlock()
	w.cancel()
	if err == nil {
		err = cerr
	}
	if killed {
		err = errDeleted
	}
	if err != nil {
		w.state = writerFailed
		w.release()
		return fmt.Errorf("blobstorage: commit %s: %w", w.key, err)
	}
	w.state = writerCommitted
	w.release()
	return nil
}

// Abort cancels the upload: nothing is created, and an object the name
// already had stays as it was. After Commit, after a failed Commit, or a
// second time, it is a no-op.
func (w *writer) Abort() error {
	if w.state != writerOpen {
		return nil
	}
	w.state = writerAborted
	// Cancelling the writer's context before Close is how gocloud aborts
	// a write.
	w.cancel()
	_ = w.bw.Close() // reports the cancellation
	w.release()
	return nil
}
