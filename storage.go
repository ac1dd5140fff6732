package bulkexport

import (
	"context"
	"io"
	"time"
)

// Storage holds the export files, grouped by job. The Worker writes them,
// the handler serves them, and the purge removes them. Implementations
// must be safe for concurrent use. The package storagetest checks the
// contract; DirStorage (local directory) and the blobstorage module (object
// storage) implement it.
//
// Names are chosen by the engine: 1 to 128 characters of [A-Za-z0-9._-],
// never "." or "..". Implementations may reject other names.
type Storage interface {
	// Create starts a new file. Nothing is visible to Open or List until
	// Commit succeeds; Abort (or a failed Commit) leaves no trace. Creating
	// a name that already exists replaces it on Commit.
	Create(ctx context.Context, jobID, name string) (FileWriter, error)

	// Open returns a committed file for reading. A missing file gives an
	// error wrapping fs.ErrNotExist.
	Open(ctx context.Context, jobID, name string) (FileReader, error)

	// List returns the names of a job's committed files, sorted. A job with
	// no files gives an empty list, not an error.
	List(ctx context.Context, jobID string) ([]string, error)

	// Delete removes every file of a job, committed or in progress. A job
	// with no files is not an error.
	Delete(ctx context.Context, jobID string) error
}

// FileWriter is a file being written. Exactly one of Commit or Abort must
// be called.
type FileWriter interface {
	io.Writer
	// Commit makes the file visible under its name, atomically and
	// durably: readers see either no file or the whole of it.
	Commit() error
	// Abort discards what was written. Calling it after Commit is a no-op.
	Abort() error
}

// FileReader is a committed file. It seeks, so that downloads can serve
// Range requests.
type FileReader interface {
	io.ReadSeekCloser
	// Size is the file's length in bytes.
	Size() int64
	// ModTime is when the file was committed.
	ModTime() time.Time
}

// URLSigner is an optional interface of a Storage that can hand out
// direct, expiring download URLs (for example presigned object-store
// URLs). Options.Downloads uses it: under DownloadSigned the manifest lists
// such URLs and requiresAccessToken is false; under DownloadRedirect the
// file endpoint redirects to one.
type URLSigner interface {
	SignedURL(ctx context.Context, jobID, name string, expiry time.Duration) (string, error)
}

// FileDeleter is an optional interface of a Storage that removes single
// files. A resumed job uses it to remove files that a crashed run
// committed but never recorded; without it they stay until the job is
// purged (they are never listed in a manifest either way).
type FileDeleter interface {
	DeleteFile(ctx context.Context, jobID, name string) error
}
