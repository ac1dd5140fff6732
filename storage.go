package bulkexport

import (
	"context"
	"errors"
	"io"
	"strconv"
	"strings"
	"time"
)

// Storage holds the export files, grouped by job. The Worker writes them,
// the handler serves them, and the purge removes them. Implementations
// must be safe for concurrent use. The package storagetest checks the
// contract; DirStorage (local directory) and the blobstorage module (object
// storage) implement it.
//
// Names are chosen by the engine (see FileName): 1 to 128 characters of
// [A-Za-z0-9._-], never "." or "..". Implementations may reject other
// names.
//
// What the engine's exactly-once promise needs from a Storage (see
// docs/correctness.md): Commit is atomic and durable, and a file once
// committed changes only by Delete or DeleteFile. The engine never commits
// the same name twice from two claims of a job: every name carries the
// claim's fence, and a job lists a file only through a compare-and-set
// update under that claim. storagetest checks these points.
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
//
// SignedURL returns an absolute http or https URL of one committed file
// of a job. Until expiry has passed, a plain GET of it, without any
// credentials of the client's, serves exactly the file's bytes, and a GET
// with a Range header serves that range (clients resend Range on a
// redirect); once expiry has passed it stops working, as judged by the
// clock of whatever serves it. The URL serves that one file only, never
// another file of the job or another job's. Signing need not check that
// the file exists, but the URL of a missing file serves no content (its
// GET answers an error status), and neither does a URL signed before the
// file was deleted (Delete, FileDeleter.DeleteFile). expiry must be
// positive: zero or less is an error, as are the job ids and names that
// Create and Open refuse. A Storage that implements SignedURL but cannot
// sign in its configuration (blobstorage over a driver that has no
// signing) returns an error wrapping errors.ErrUnsupported, every time.
// storagetest checks all of this except the expiry itself, which would
// take waiting for it.
type URLSigner interface {
	SignedURL(ctx context.Context, jobID, name string, expiry time.Duration) (string, error)
}

// TempSweeper is an optional interface of a Storage whose writers leave
// temporary files behind when their process dies (DirStorage does: a file
// is written under a temporary name and renamed on Commit). A resumed job
// calls SweepTemp, after checking that it still owns the job, to remove a
// job's temporary files; committed files are left alone.
type TempSweeper interface {
	SweepTemp(ctx context.Context, jobID string) error
}

// FileName is the name the engine gives an export file: the stem (the
// resource type, "Patient.deleted", "Patient.error", ...), the file's
// number in its stream when seq > 0, and the fence of the claim whose run
// wrote it, as in "Patient.000001.c7.ndjson". Two claims of one job never
// write the same name.
func FileName(stem string, seq int, fence int64) string {
	b := make([]byte, 0, len(stem)+24)
	b = append(b, stem...)
	if seq > 0 {
		b = append(b, '.')
		n := strconv.Itoa(seq)
		for i := len(n); i < 6; i++ {
			b = append(b, '0')
		}
		b = append(b, n...)
	}
	b = append(b, ".c"...)
	b = strconv.AppendInt(b, fence, 10)
	b = append(b, ".ndjson"...)
	return string(b)
}

// FileFence returns the fence that a name made by FileName carries, and
// false (with 0) for any other name.
func FileFence(name string) (int64, bool) {
	rest, ok := strings.CutSuffix(name, ".ndjson")
	if !ok {
		return 0, false
	}
	i := strings.LastIndexByte(rest, '.')
	if i < 0 || !strings.HasPrefix(rest[i+1:], "c") {
		return 0, false
	}
	digits := rest[i+2:]
	if digits == "" || digits[0] == '+' || digits[0] == '-' {
		return 0, false
	}
	n, err := strconv.ParseInt(digits, 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	return n, true
}

// FileDeleter is an optional interface of a Storage that removes single
// files. A resumed job uses it to remove files that a crashed run
// committed but never recorded; without it they stay until the job is
// purged (they are never listed in a manifest either way).
type FileDeleter interface {
	DeleteFile(ctx context.Context, jobID, name string) error
}

// SyncWriter is an optional interface of a FileWriter that can make what
// was written so far durable without committing the file, so that a file
// may stay open across the engine's checkpoints instead of being cut at
// each one. DirStorage's writers implement it.
//
// Sync flushes and fsyncs everything written so far and returns a handle,
// an opaque string that identifies the uncommitted file to the Storage's
// OpenSynced. The handle is the same for every Sync of one writer. Once
// Sync has returned, the bytes written before it survive a crash of the
// process (and of the host) until the writer is committed or aborted, or
// the job's files are deleted or swept: OpenSynced can copy them.
//
// Release ends the writer without committing and without removing the
// synced file: a later OpenSynced can still copy from it, and the
// Storage's TempSweeper (or Delete) removes it. Bytes written after the
// last Sync may or may not remain. After Release, Commit fails and Abort
// is a no-op. The engine releases, instead of aborting, a synced writer
// whose run stops before the file is full (a shutdown, a lost lease),
// since the job's recorded checkpoint still names it.
type SyncWriter interface {
	Sync() (handle string, err error)
	Release() error
}

// SyncedOpener is an optional interface of a Storage whose FileWriters
// implement SyncWriter. The engine uses the two together: when both are
// there, a checkpoint syncs the open file of each stream and records its
// handle and size instead of committing it, and a resumed job continues
// that file through OpenSynced. Without them, each checkpoint commits the
// open files, and file boundaries then depend on how often checkpoints
// come.
//
// OpenSynced returns a new FileWriter for name in the job, as Create
// does, whose content starts with exactly the first size bytes of the
// uncommitted file that a SyncWriter's Sync named handle; further writes
// are appended after them. The bytes are copied: the old file is neither
// renamed nor reused, since a stale run that still holds it open (an older
// claim of the job, paused past its lease) may keep writing to it, and
// must not change the new file. A handle that names no file (removed, or
// never synced) gives an error wrapping fs.ErrNotExist; a file that holds
// fewer than size bytes gives an error wrapping ErrSyncedShort; in both
// cases nothing is created. A writer's Commit may consume its handle (a
// DirStorage renames the file): the engine then reads the prefix from the
// committed file instead. The old file is left as it is. The writer
// returned is a SyncWriter too. storagetest checks these points.
type SyncedOpener interface {
	OpenSynced(ctx context.Context, jobID, handle string, size int64, name string) (FileWriter, error)
}

// ErrSyncedShort is what SyncedOpener.OpenSynced returns (wrapped) when the
// synced file holds fewer bytes than asked for: the durable prefix the
// engine recorded is gone, and the job cannot be resumed from it.
var ErrSyncedShort = errors.New("bulkexport: the synced file is shorter than recorded")
