package bulkexport

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// DirStorage is a Storage that keeps export files in a local directory, one
// subdirectory per job: root/<jobID>/<name>. It is safe for concurrent use;
// each FileWriter it returns is, like a bufio.Writer, for one goroutine at a
// time.
//
// Create writes to a temporary file in the job's directory whose name
// contains '~', a character that valid names never have, so Open and List
// never see it and it cannot collide with a committed file. Writes go
// through a 64 KiB buffer. Commit flushes and fsyncs the file, renames it
// into place and fsyncs the directory: readers see either no file or the
// whole of it, and a committed file survives a crash.
//
// Delete first renames the job's directory out of the way (to a '~' name
// in root), then removes it, so files still being written for the job
// disappear with it and their Commit fails instead of resurrecting the job.
// Temporary files left behind by a crash stay invisible; the Worker removes
// a job's when it resumes the job (see SweepTemp), and they go with the job
// when it is deleted. Leftovers of interrupted Deletes are removed by
// NewDirStorage.
//
// Job ids and names must be 1 to 128 characters of [A-Za-z0-9._-], and
// neither "." nor "..". Anything else is rejected with an error wrapping
// fs.ErrInvalid, which also keeps every path inside root.
type DirStorage struct {
	root string

	// live holds the paths of the temporary files of this storage's
	// writers that are still open (neither committed, aborted nor
	// released): SweepTemp leaves them alone.
	mu   sync.Mutex
	live map[string]struct{}
}

var _ Storage = (*DirStorage)(nil)

const (
	// dirStorageBufSize is the write buffer of a DirStorage FileWriter.
	dirStorageBufSize = 64 << 10
	// dirTempPrefix starts the names of files being written. '~' is not a
	// valid name character, so List skips them and they never collide.
	dirTempPrefix = "~"
	// dirTrashPrefix starts the names of job directories being deleted.
	dirTrashPrefix = "~deleted-"
)

// dirBufPool recycles the write buffers of DirStorage FileWriters, so that
// a Create does not allocate 64 KiB.
var dirBufPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, dirStorageBufSize) }}

var (
	errDirFileCommitted = fmt.Errorf("bulkexport: DirStorage: file already committed: %w", fs.ErrClosed)
	errDirFileAborted   = fmt.Errorf("bulkexport: DirStorage: file aborted: %w", fs.ErrClosed)
	errDirFileFailed    = fmt.Errorf("bulkexport: DirStorage: file commit failed: %w", fs.ErrClosed)
	errDirFileReleased  = fmt.Errorf("bulkexport: DirStorage: file released: %w", fs.ErrClosed)
)

// NewDirStorage returns a DirStorage over root, creating the directory
// (mode 0700) if it is missing. root is made absolute, so a later change of
// working directory does not move the storage. Leftovers of Deletes that a
// crash interrupted are removed.
func NewDirStorage(root string) (*DirStorage, error) {
	if root == "" {
		return nil, errors.New("bulkexport: NewDirStorage: empty root")
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("bulkexport: NewDirStorage: %w", err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		return nil, fmt.Errorf("bulkexport: NewDirStorage: %w", err)
	}
	s := &DirStorage{root: abs}
	s.sweepTrash()
	return s, nil
}

// Root returns the absolute path of the storage's directory.
func (s *DirStorage) Root() string { return s.root }

// sweepTrash removes job directories that a Delete renamed but did not get
// to remove. Errors are ignored: the leftovers are invisible anyway.
func (s *DirStorage) sweepTrash() {
	entries, err := os.ReadDir(s.root)
	if err != nil {
		return
	}
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), dirTrashPrefix) {
			_ = os.RemoveAll(filepath.Join(s.root, e.Name()))
		}
	}
}

// checkDirNames returns an error wrapping fs.ErrInvalid unless jobID is a
// valid job id and, when name is not nil, *name a valid file name. This is
// the guard that keeps every path inside root.
func checkDirNames(op, jobID string, name *string) error {
	if !validJobID(jobID) {
		return fmt.Errorf("bulkexport: DirStorage.%s: invalid job id %q (want 1-128 characters of [A-Za-z0-9._-], not . or ..): %w", op, jobID, fs.ErrInvalid)
	}
	if name != nil && !validJobID(*name) {
		return fmt.Errorf("bulkexport: DirStorage.%s: invalid file name %q (want 1-128 characters of [A-Za-z0-9._-], not . or ..): %w", op, *name, fs.ErrInvalid)
	}
	return nil
}

// Create implements Storage. The file is written to a temporary file in the
// job's directory and renamed into place by Commit.
func (s *DirStorage) Create(ctx context.Context, jobID, name string) (FileWriter, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := checkDirNames("Create", jobID, &name); err != nil {
		return nil, err
	}
	dir := filepath.Join(s.root, jobID)
	var f *os.File
	for attempt := 0; ; attempt++ {
		if err := s.makeJobDir(dir); err != nil {
			return nil, fmt.Errorf("bulkexport: DirStorage.Create %s/%s: %w", jobID, name, err)
		}
		var err error
		f, err = os.CreateTemp(dir, dirTempPrefix+name+".*")
		if err == nil {
			break
		}
		// A concurrent Delete may have removed the directory between the
		// two calls: make it again, a few times.
		if !errors.Is(err, fs.ErrNotExist) || attempt == 2 {
			return nil, fmt.Errorf("bulkexport: DirStorage.Create %s/%s: %w", jobID, name, err)
		}
	}
	bw := dirBufPool.Get().(*bufio.Writer)
	bw.Reset(f)
	s.setLive(f.Name(), true)
	return &dirWriter{s: s, f: f, bw: bw, dir: dir, final: filepath.Join(dir, name)}, nil
}

// setLive adds the temporary file path to the set of open writers' files,
// or removes it.
func (s *DirStorage) setLive(path string, live bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !live {
		delete(s.live, path)
		return
	}
	if s.live == nil {
		s.live = map[string]struct{}{}
	}
	s.live[path] = struct{}{}
}

// isLive reports whether path is the temporary file of an open writer.
func (s *DirStorage) isLive(path string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.live[path]
	return ok
}

// makeJobDir creates a job's directory if it is missing and, when it made
// it, fsyncs root so that the directory's entry is durable too.
func (s *DirStorage) makeJobDir(dir string) error {
	err := os.Mkdir(dir, 0o700)
	switch {
	case err == nil:
		return syncDir(s.root)
	case errors.Is(err, fs.ErrExist):
		return nil
	default:
		return err
	}
}

// Open implements Storage. The FileReader is backed by an *os.File; its
// Size and ModTime come from the file's Stat when opened.
func (s *DirStorage) Open(ctx context.Context, jobID, name string) (FileReader, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := checkDirNames("Open", jobID, &name); err != nil {
		return nil, err
	}
	f, err := os.Open(filepath.Join(s.root, jobID, name))
	if err != nil {
		return nil, fmt.Errorf("bulkexport: DirStorage.Open %s/%s: %w", jobID, name, err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("bulkexport: DirStorage.Open %s/%s: %w", jobID, name, err)
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("bulkexport: DirStorage.Open %s/%s: not a regular file: %w", jobID, name, fs.ErrNotExist)
	}
	return &dirFile{f: f, size: fi.Size(), modTime: fi.ModTime()}, nil
}

// List implements Storage. It reports the committed files of the job
// (regular files with valid names), never files being written.
func (s *DirStorage) List(ctx context.Context, jobID string) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := checkDirNames("List", jobID, nil); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir(filepath.Join(s.root, jobID))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return []string{}, nil
		}
		return nil, fmt.Errorf("bulkexport: DirStorage.List %s: %w", jobID, err)
	}
	// os.ReadDir sorts by name, byte-wise, as sort.Strings does.
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		if e.Type().IsRegular() && validJobID(e.Name()) {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// Delete implements Storage. It removes the job's directory with every
// file in it, committed or being written. A missing job is not an error.
func (s *DirStorage) Delete(ctx context.Context, jobID string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := checkDirNames("Delete", jobID, nil); err != nil {
		return err
	}
	dir := filepath.Join(s.root, jobID)
	// Move the directory out of the way first: atomically, the job has no
	// files, and writers still open for it can no longer commit into it.
	trash := filepath.Join(s.root, dirTrashPrefix+jobID+"-"+strconv.FormatUint(rand.Uint64(), 36))
	err := os.Rename(dir, trash)
	switch {
	case err == nil:
		dir = trash
	case errors.Is(err, fs.ErrNotExist):
		return nil
	default:
		// Some systems (Windows) refuse to rename a directory with open
		// files in it: remove it in place instead.
	}
	for attempt := 0; ; attempt++ {
		err = os.RemoveAll(dir)
		// A concurrent Create can add a file while the directory is
		// removed in place; try again.
		if err == nil || attempt == 2 {
			break
		}
	}
	if err != nil {
		return fmt.Errorf("bulkexport: DirStorage.Delete %s: %w", jobID, err)
	}
	return nil
}

// syncDir fsyncs a directory, making the creation, renaming and removal of
// its entries durable.
func syncDir(dir string) error {
	if runtime.GOOS == "windows" {
		// Directories cannot be fsynced there; NTFS journals renames.
		return nil
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if errors.Is(err, syscall.EINVAL) {
		// The file system does not support fsync on directories.
		return nil
	}
	return err
}

// dirWriterState is where a dirWriter is in its life.
type dirWriterState uint8

const (
	dirWriterOpen dirWriterState = iota
	dirWriterCommitted
	dirWriterAborted
	dirWriterFailed
	dirWriterReleased
)

// dirWriter is a FileWriter of a DirStorage: a buffered temporary file that
// Commit renames into place. Like a bufio.Writer, it is for one goroutine
// at a time: Write takes no lock, so that streaming small writes costs no
// more than a bufio.Writer. (The storage itself is safe for concurrent use,
// including Delete of the job while the writer is open.)
type dirWriter struct {
	s     *DirStorage
	state dirWriterState
	// dirSynced: Sync has made the temporary file's directory entry
	// durable.
	dirSynced bool
	f         *os.File      // the temporary file
	bw        *bufio.Writer // buffers writes to f; nil once committed or aborted
	dir       string        // the job's directory
	final     string        // the committed file's path
}

// Write buffers p; the buffer is written to the temporary file whenever it
// fills. It does not allocate. Writing after Commit or Abort is an error.
func (w *dirWriter) Write(p []byte) (int, error) {
	if w.state != dirWriterOpen {
		return 0, w.closedErr()
	}
	return w.bw.Write(p)
}

// closedErr is the error of a call on a writer that is no longer open.
func (w *dirWriter) closedErr() error {
	switch w.state {
	case dirWriterCommitted:
		return errDirFileCommitted
	case dirWriterAborted:
		return errDirFileAborted
	case dirWriterReleased:
		return errDirFileReleased
	default:
		return errDirFileFailed
	}
}

// releaseBuf returns the write buffer to the pool, dropping what it holds.
func (w *dirWriter) releaseBuf() {
	w.bw.Reset(nil)
	dirBufPool.Put(w.bw)
	w.bw = nil
}

// Commit flushes the buffer, stamps the file with the commit time, fsyncs
// and closes it, renames it into place and fsyncs the directory. If it
// fails before the rename, the temporary file is removed and nothing is
// visible; an error fsyncing the directory after the rename is reported,
// but the file stays visible. A second Commit, or a Commit after Abort, is
// an error.
func (w *dirWriter) Commit() error {
	if w.state != dirWriterOpen {
		return w.closedErr()
	}
	tmp := w.f.Name()
	defer w.s.setLive(tmp, false)
	err := w.bw.Flush()
	w.releaseBuf()
	if err == nil {
		// ModTime is the commit time, even if the last write was earlier.
		now := time.Now()
		_ = os.Chtimes(tmp, now, now)
		err = w.f.Sync()
	}
	if cerr := w.f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		// This fails if Delete removed the job meanwhile: the temporary
		// file went with the job's directory.
		err = os.Rename(tmp, w.final)
	}
	if err != nil {
		w.state = dirWriterFailed
		_ = os.Remove(tmp)
		return fmt.Errorf("bulkexport: DirStorage: commit %s: %w", w.final, err)
	}
	w.state = dirWriterCommitted
	if err := syncDir(w.dir); err != nil {
		return fmt.Errorf("bulkexport: DirStorage: commit %s: sync directory: %w", w.final, err)
	}
	return nil
}

// Abort closes and removes the temporary file. After Commit, after a
// failed Commit, or a second time, it is a no-op.
func (w *dirWriter) Abort() error {
	if w.state != dirWriterOpen {
		return nil
	}
	w.state = dirWriterAborted
	w.releaseBuf()
	tmp := w.f.Name()
	defer w.s.setLive(tmp, false)
	_ = w.f.Close() // what was written is discarded anyway
	if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("bulkexport: DirStorage: abort %s: %w", w.final, err)
	}
	return nil
}

// dirFile is a FileReader of a DirStorage: an open committed file with the
// size and modification time it had when opened.
type dirFile struct {
	f       *os.File
	size    int64
	modTime time.Time
}

// Read implements io.Reader.
func (r *dirFile) Read(p []byte) (int, error) { return r.f.Read(p) }

// ReadAt implements io.ReaderAt.
func (r *dirFile) ReadAt(p []byte, off int64) (int, error) { return r.f.ReadAt(p, off) }

// Seek implements io.Seeker.
func (r *dirFile) Seek(offset int64, whence int) (int64, error) { return r.f.Seek(offset, whence) }

// Close implements io.Closer.
func (r *dirFile) Close() error { return r.f.Close() }

// Size implements FileReader: the file's length when it was opened.
func (r *dirFile) Size() int64 { return r.size }

// ModTime implements FileReader: when the file was committed.
func (r *dirFile) ModTime() time.Time { return r.modTime }

var _ FileDeleter = (*DirStorage)(nil)

// DeleteFile implements FileDeleter: it removes one committed file. A
// missing file is not an error.
func (s *DirStorage) DeleteFile(ctx context.Context, jobID, name string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := checkDirNames("DeleteFile", jobID, &name); err != nil {
		return err
	}
	err := os.Remove(filepath.Join(s.root, jobID, name))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("bulkexport: DirStorage.DeleteFile %s/%s: %w", jobID, name, err)
	}
	return nil
}

var _ TempSweeper = (*DirStorage)(nil)

// SweepTemp implements TempSweeper: it removes the temporary files in a
// job's directory, files whose writer never committed nor aborted them
// because its process died (kill -9, a crash, a power cut), or released
// them (SyncWriter.Release). The temporary files of writers that are open
// in this process, through this DirStorage, are left alone: the Worker
// calls SweepTemp when it resumes a job, after checking that it owns the
// job and after continuing the job's synced files (SyncedOpener) into new
// writers, which must survive the sweep. A run of another process that
// lost its lease but still writes sees its Commit fail, which is right; a
// stale run of this process keeps its file until it ends, and its Commit
// makes a file that no job lists.
func (s *DirStorage) SweepTemp(ctx context.Context, jobID string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if err := checkDirNames("SweepTemp", jobID, nil); err != nil {
		return err
	}
	dir := filepath.Join(s.root, jobID)
	entries, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("bulkexport: DirStorage: sweep %s: %w", jobID, err)
	}
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), dirTempPrefix) || !e.Type().IsRegular() || s.isLive(filepath.Join(dir, e.Name())) {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("bulkexport: DirStorage: sweep %s: %w", jobID, err)
		}
	}
	return nil
}

// OSFile returns the underlying file, so that the download handler can
// hand it to net/http as is and the kernel copies it to the socket
// (sendfile) without passing through user space.
func (r *dirFile) OSFile() *os.File { return r.f }

var (
	_ SyncedOpener = (*DirStorage)(nil)
	_ SyncWriter   = (*dirWriter)(nil)
)

// Sync implements SyncWriter: it flushes the buffer and fsyncs the
// temporary file, and the first time also the job's directory, so that
// the temporary file's name survives a crash too. The handle is the
// temporary file's base name. Syncing a writer that is no longer open is
// an error.
func (w *dirWriter) Sync() (string, error) {
	if w.state != dirWriterOpen {
		return "", w.closedErr()
	}
	if err := w.bw.Flush(); err != nil {
		return "", fmt.Errorf("bulkexport: DirStorage: sync %s: %w", w.final, err)
	}
	if err := w.f.Sync(); err != nil {
		return "", fmt.Errorf("bulkexport: DirStorage: sync %s: %w", w.final, err)
	}
	if !w.dirSynced {
		if err := syncDir(w.dir); err != nil {
			return "", fmt.Errorf("bulkexport: DirStorage: sync %s: sync directory: %w", w.final, err)
		}
		w.dirSynced = true
	}
	return filepath.Base(w.f.Name()), nil
}

// Release implements SyncWriter: it closes the temporary file without
// flushing the buffer, and leaves the file in place for OpenSynced and,
// later, SweepTemp. On a writer that is no longer open it is a no-op.
func (w *dirWriter) Release() error {
	if w.state != dirWriterOpen {
		return nil
	}
	w.state = dirWriterReleased
	w.releaseBuf()
	tmp := w.f.Name()
	w.s.setLive(tmp, false)
	if err := w.f.Close(); err != nil {
		return fmt.Errorf("bulkexport: DirStorage: release %s: %w", w.final, err)
	}
	return nil
}

// validDirHandle reports whether h can be a handle that dirWriter.Sync
// returned: a temporary file's base name, '~' and then characters of
// [A-Za-z0-9._-] only, so that it stays inside the job's directory.
func validDirHandle(h string) bool {
	rest, ok := strings.CutPrefix(h, dirTempPrefix)
	if !ok || rest == "" || len(rest) > 255 || rest == "." || rest == ".." {
		return false
	}
	for i := 0; i < len(rest); i++ {
		c := rest[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// OpenSynced implements SyncedOpener: it creates a writer for name, as
// Create does, and copies into its temporary file the first size bytes of
// the temporary file handle (a base name that dirWriter.Sync returned).
// The old file is only read: a stale writer that still holds it can go on
// writing to it without touching the new file. Nothing is fsynced here;
// the new writer's Sync or Commit does that. A handle that is not a
// temporary file's name is rejected with an error wrapping fs.ErrInvalid.
func (s *DirStorage) OpenSynced(ctx context.Context, jobID, handle string, size int64, name string) (FileWriter, error) {
	if err := checkDirNames("OpenSynced", jobID, &name); err != nil {
		return nil, err
	}
	if !validDirHandle(handle) || size < 0 {
		return nil, fmt.Errorf("bulkexport: DirStorage.OpenSynced %s: invalid handle %q or size %d: %w", jobID, handle, size, fs.ErrInvalid)
	}
	old, err := os.Open(filepath.Join(s.root, jobID, handle))
	if err != nil {
		return nil, fmt.Errorf("bulkexport: DirStorage.OpenSynced %s/%s: %w", jobID, handle, err)
	}
	defer old.Close()
	fw, err := s.Create(ctx, jobID, name)
	if err != nil {
		return nil, err
	}
	w := fw.(*dirWriter)
	n, err := io.CopyN(w.f, old, size)
	if err != nil {
		_ = w.Abort()
		if errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("bulkexport: DirStorage.OpenSynced %s/%s: %d bytes, want %d: %w", jobID, handle, n, size, ErrSyncedShort)
		}
		return nil, fmt.Errorf("bulkexport: DirStorage.OpenSynced %s/%s: %w", jobID, handle, err)
	}
	return w, nil
}
