package bulkexport_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
	"github.com/bulkfhir/bulkexport/storagetest"
)

// newTestDirStorage returns a DirStorage over a fresh temporary directory.
func newTestDirStorage(t testing.TB) *bulkexport.DirStorage {
	t.Helper()
	s, err := bulkexport.NewDirStorage(t.TempDir())
	if err != nil {
		t.Fatalf("NewDirStorage: %v", err)
	}
	return s
}

func TestDirStorage(t *testing.T) {
	storagetest.Run(t, func(t *testing.T) bulkexport.Storage { return newTestDirStorage(t) })
}

func TestNewDirStorage(t *testing.T) {
	parent := t.TempDir()
	root := filepath.Join(parent, "a", "b")
	s, err := bulkexport.NewDirStorage(root)
	if err != nil {
		t.Fatalf("NewDirStorage of a missing directory: %v", err)
	}
	if s.Root() != root {
		t.Errorf("Root() = %q, want %q", s.Root(), root)
	}
	fi, err := os.Stat(root)
	if err != nil || !fi.IsDir() {
		t.Fatalf("root not created: %v", err)
	}
	if runtime.GOOS != "windows" && fi.Mode().Perm() != 0o700 {
		t.Errorf("root mode = %v, want 0700", fi.Mode().Perm())
	}
	if _, err := bulkexport.NewDirStorage(root); err != nil {
		t.Errorf("NewDirStorage of an existing directory: %v", err)
	}

	if _, err := bulkexport.NewDirStorage(""); err == nil {
		t.Errorf("NewDirStorage(\"\") succeeded, want an error")
	}
	file := filepath.Join(parent, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := bulkexport.NewDirStorage(file); err == nil {
		t.Errorf("NewDirStorage of a regular file succeeded, want an error")
	}

	// A relative root is made absolute.
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(parent, "rel")
	rel, err := filepath.Rel(wd, want)
	if err != nil {
		t.Skipf("no relative path to the temporary directory: %v", err)
	}
	s, err = bulkexport.NewDirStorage(rel)
	if err != nil {
		t.Fatalf("NewDirStorage(%q): %v", rel, err)
	}
	if s.Root() != want {
		t.Errorf("NewDirStorage(%q).Root() = %q, want %q", rel, s.Root(), want)
	}
}

func TestDirStorageLayout(t *testing.T) {
	ctx := context.Background()
	s := newTestDirStorage(t)
	w, err := s.Create(ctx, "job1", "Patient.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("p\n")); err != nil {
		t.Fatal(err)
	}
	// The file being written is in the job's directory, under a name no
	// valid name can take.
	jobDir := filepath.Join(s.Root(), "job1")
	entries, err := os.ReadDir(jobDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || !strings.Contains(entries[0].Name(), "~") {
		t.Errorf("job directory while writing = %v, want one temporary file with ~ in its name", entries)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(jobDir, "Patient.ndjson"))
	if err != nil || string(got) != "p\n" {
		t.Errorf("committed file = %q, %v; want \"p\\n\"", got, err)
	}
	entries, _ = os.ReadDir(jobDir)
	if len(entries) != 1 {
		t.Errorf("job directory after Commit = %v, want only the committed file", entries)
	}
	if runtime.GOOS != "windows" {
		for path, want := range map[string]fs.FileMode{jobDir: 0o700, filepath.Join(jobDir, "Patient.ndjson"): 0o600} {
			fi, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if fi.Mode().Perm() != want {
				t.Errorf("%s: mode %v, want %v", path, fi.Mode().Perm(), want)
			}
		}
	}

	// Abort removes the temporary file.
	w, err = s.Create(ctx, "job1", "Observation.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Abort(); err != nil {
		t.Fatal(err)
	}
	entries, _ = os.ReadDir(jobDir)
	if len(entries) != 1 || entries[0].Name() != "Patient.ndjson" {
		t.Errorf("job directory after Abort = %v, want only Patient.ndjson", entries)
	}

	// Delete removes the job's directory, leaving nothing in root.
	if err := s.Delete(ctx, "job1"); err != nil {
		t.Fatal(err)
	}
	entries, _ = os.ReadDir(s.Root())
	if len(entries) != 0 {
		t.Errorf("root after Delete = %v, want empty", entries)
	}
}

func TestDirStorageWriterStates(t *testing.T) {
	ctx := context.Background()
	s := newTestDirStorage(t)

	w, err := s.Create(ctx, "job1", "f")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(); err == nil {
		t.Errorf("second Commit succeeded, want an error")
	}
	if _, err := w.Write([]byte("y")); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("Write after Commit = %v, want fs.ErrClosed", err)
	}
	if err := w.Abort(); err != nil {
		t.Errorf("Abort after Commit = %v, want nil", err)
	}

	w, err = s.Create(ctx, "job1", "g")
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Abort(); err != nil {
		t.Fatal(err)
	}
	if err := w.Abort(); err != nil {
		t.Errorf("second Abort = %v, want nil", err)
	}
	if err := w.Commit(); err == nil {
		t.Errorf("Commit after Abort succeeded, want an error")
	}
	if _, err := w.Write([]byte("y")); !errors.Is(err, fs.ErrClosed) {
		t.Errorf("Write after Abort = %v, want fs.ErrClosed", err)
	}

	// A Commit after Delete fails and leaves nothing behind.
	w, err = s.Create(ctx, "job2", "h")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte("z")); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, "job2"); err != nil {
		t.Fatal(err)
	}
	if err := w.Commit(); err == nil {
		t.Errorf("Commit after Delete succeeded, want an error")
	}
	if err := w.Abort(); err != nil {
		t.Errorf("Abort after a failed Commit = %v, want nil", err)
	}
	if _, err := os.Stat(filepath.Join(s.Root(), "job2")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("job directory after Commit-after-Delete: %v, want it gone", err)
	}
	entries, _ := os.ReadDir(s.Root())
	if len(entries) != 1 || entries[0].Name() != "job1" {
		t.Errorf("root = %v, want only job1", entries)
	}
}

func TestDirStorageCommitTime(t *testing.T) {
	ctx := context.Background()
	s := newTestDirStorage(t)
	w, err := s.Create(ctx, "job1", "f")
	if err != nil {
		t.Fatal(err)
	}
	// Fill the buffer exactly, so that it is written out before Commit.
	if _, err := w.Write(make([]byte, 64<<10)); err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-time.Hour)
	matches, _ := filepath.Glob(filepath.Join(s.Root(), "job1", "~*"))
	if len(matches) != 1 {
		t.Fatalf("temporary files = %q, want one", matches)
	}
	if err := os.Chtimes(matches[0], old, old); err != nil {
		t.Fatal(err)
	}
	before := time.Now().Add(-2 * time.Second) // allow for coarse file times
	if err := w.Commit(); err != nil {
		t.Fatal(err)
	}
	r, err := s.Open(ctx, "job1", "f")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.ModTime().Before(before) {
		t.Errorf("ModTime() = %v, want the commit time (after %v)", r.ModTime(), before)
	}
}

func TestDirStoragePathTraversal(t *testing.T) {
	ctx := context.Background()
	parent := t.TempDir()
	sentinel := filepath.Join(parent, "sentinel")
	if err := os.WriteFile(sentinel, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(parent, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	s, err := bulkexport.NewDirStorage(filepath.Join(parent, "root"))
	if err != nil {
		t.Fatal(err)
	}
	bad := []string{"", ".", "..", "../x", "../sentinel", "a/b", "/etc", `..\x`, "x\x00y", strings.Repeat("a", 129), "~x"}
	for _, b := range bad {
		if w, err := s.Create(ctx, "job1", b); !errors.Is(err, fs.ErrInvalid) {
			if err == nil {
				_ = w.Abort()
			}
			t.Errorf("Create(job1, %q) = %v, want fs.ErrInvalid", b, err)
		}
		if _, err := s.Open(ctx, "job1", b); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Open(job1, %q) = %v, want fs.ErrInvalid", b, err)
		}
		if w, err := s.Create(ctx, b, "f"); !errors.Is(err, fs.ErrInvalid) {
			if err == nil {
				_ = w.Abort()
			}
			t.Errorf("Create(%q, f) = %v, want fs.ErrInvalid", b, err)
		}
		if _, err := s.Open(ctx, b, "sentinel"); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Open(%q, sentinel) = %v, want fs.ErrInvalid", b, err)
		}
		if _, err := s.List(ctx, b); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("List(%q) = %v, want fs.ErrInvalid", b, err)
		}
		if err := s.Delete(ctx, b); !errors.Is(err, fs.ErrInvalid) {
			t.Errorf("Delete(%q) = %v, want fs.ErrInvalid", b, err)
		}
	}
	// Nothing outside root was touched, and nothing inside was made.
	if got, err := os.ReadFile(sentinel); err != nil || string(got) != "keep" {
		t.Errorf("sentinel = %q, %v; want it untouched", got, err)
	}
	entries, _ := os.ReadDir(parent)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if strings.Join(names, ",") != "root,sentinel,x" {
		t.Errorf("parent directory = %q, want root, sentinel, x", names)
	}
	if entries, _ := os.ReadDir(filepath.Join(parent, "x")); len(entries) != 0 {
		t.Errorf("directory outside root = %v, want empty", entries)
	}
	if entries, _ := os.ReadDir(s.Root()); len(entries) != 0 {
		t.Errorf("root = %v, want empty", entries)
	}
}

func TestDirStorageIgnoresStrays(t *testing.T) {
	ctx := context.Background()
	s := newTestDirStorage(t)
	jobDir := filepath.Join(s.Root(), "job1")
	if err := os.MkdirAll(filepath.Join(jobDir, "subdir"), 0o700); err != nil {
		t.Fatal(err)
	}
	// A temporary file left by a crash, and a directory.
	if err := os.WriteFile(filepath.Join(jobDir, "~f.123"), []byte("half"), 0o600); err != nil {
		t.Fatal(err)
	}
	names, err := s.List(ctx, "job1")
	if err != nil || len(names) != 0 {
		t.Errorf("List = %q, %v; want no names", names, err)
	}
	if _, err := s.Open(ctx, "job1", "subdir"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Open of a directory = %v, want fs.ErrNotExist", err)
	}
	if err := s.Delete(ctx, "job1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(jobDir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("job directory after Delete: %v, want it gone", err)
	}

	// Leftovers of an interrupted Delete go when the storage is opened.
	trash := filepath.Join(s.Root(), "~deleted-job2-xyz")
	if err := os.MkdirAll(filepath.Join(trash, "d"), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, err := bulkexport.NewDirStorage(s.Root()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(trash); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("trash after NewDirStorage: %v, want it gone", err)
	}
}

func TestDirStorageWriteDoesNotAllocate(t *testing.T) {
	s := newTestDirStorage(t)
	w, err := s.Create(context.Background(), "job1", "f")
	if err != nil {
		t.Fatal(err)
	}
	defer w.Abort()
	line := bytes.Repeat([]byte("x"), 1<<10)
	if n := testing.AllocsPerRun(1000, func() { _, _ = w.Write(line) }); n != 0 {
		t.Errorf("Write allocates %v times per call, want 0", n)
	}
}

// BenchmarkDirStorageWrite creates a file in a DirStorage, writes 64 MiB
// of 1 KiB lines through its FileWriter and commits it; the framework's
// ns/op, MB/s and allocs/op are for that. Each iteration also creates an
// os.File in the same file system, writes the same lines through a 64 KiB
// bufio.Writer, then flushes, fsyncs and closes it: the baseline, timed
// apart. Reported besides: baseline-ns/op, ratio (DirStorage time /
// baseline time, the whole of each) and write-ratio (the same for the
// Write calls only, leaving out creating, committing, flushing, fsyncing
// and closing).
func BenchmarkDirStorageWrite(b *testing.B) {
	const lineSize, total = 1 << 10, 64 << 20
	ctx := context.Background()
	line := bytes.Repeat([]byte("x"), lineSize)
	line[lineSize-1] = '\n'
	dir := b.TempDir()
	s, err := bulkexport.NewDirStorage(filepath.Join(dir, "storage"))
	if err != nil {
		b.Fatal(err)
	}
	basePath := filepath.Join(dir, "baseline.ndjson")

	viaStorage := func() (writes, all time.Duration) {
		start := time.Now()
		w, err := s.Create(ctx, "job1", "bench.ndjson")
		if err != nil {
			b.Fatal(err)
		}
		wstart := time.Now()
		for i := 0; i < total/lineSize; i++ {
			if _, err := w.Write(line); err != nil {
				b.Fatal(err)
			}
		}
		writes = time.Since(wstart)
		if err := w.Commit(); err != nil {
			b.Fatal(err)
		}
		return writes, time.Since(start)
	}
	viaBaseline := func() (writes, all time.Duration) {
		start := time.Now()
		f, err := os.Create(basePath)
		if err != nil {
			b.Fatal(err)
		}
		bw := bufio.NewWriterSize(f, 64<<10)
		wstart := time.Now()
		for i := 0; i < total/lineSize; i++ {
			if _, err := bw.Write(line); err != nil {
				b.Fatal(err)
			}
		}
		writes = time.Since(wstart)
		if err := bw.Flush(); err != nil {
			b.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
		if err := f.Close(); err != nil {
			b.Fatal(err)
		}
		return writes, time.Since(start)
	}
	// Both sides start from a missing file in an existing directory, as
	// the files of a running job do.
	storagePath := filepath.Join(s.Root(), "job1", "bench.ndjson")
	cleanup := func() {
		for _, p := range []string{storagePath, basePath} {
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				b.Fatal(err)
			}
		}
	}

	var sWrites, sAll, bWrites, bAll time.Duration
	baseline := func() {
		b.StopTimer()
		w, a := viaBaseline()
		bWrites += w
		bAll += a
		b.StartTimer()
	}
	b.SetBytes(total)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		cleanup()
		b.StartTimer()
		// Alternate the order, so that neither side always runs on a
		// disk still busy with the other's data.
		if i%2 == 1 {
			baseline()
		}
		w, a := viaStorage()
		sWrites += w
		sAll += a
		if i%2 == 0 {
			baseline()
		}
	}
	b.StopTimer()
	n := float64(b.N)
	b.ReportMetric(float64(bAll.Nanoseconds())/n, "baseline-ns/op")
	b.ReportMetric(float64(sAll)/float64(bAll), "ratio")
	b.ReportMetric(float64(sWrites)/float64(bWrites), "write-ratio")
}

// TestDirStorageSweepSkipsLiveWriters: SweepTemp leaves alone the
// temporary files of writers open through the same DirStorage (a resumed
// run's continued files are made before its sweep), and removes those of
// another process's writers (another DirStorage over the same root) and of
// released writers.
func TestDirStorageSweepSkipsLiveWriters(t *testing.T) {
	ctx := context.Background()
	s := newTestDirStorage(t)
	other, err := bulkexport.NewDirStorage(s.Root())
	if err != nil {
		t.Fatal(err)
	}
	live, err := s.Create(ctx, "job-l", "live.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := live.Write([]byte("live\n")); err != nil {
		t.Fatal(err)
	}
	released, err := s.Create(ctx, "job-l", "released.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	h, err := released.(bulkexport.SyncWriter).Sync()
	if err != nil {
		t.Fatal(err)
	}
	if err := released.(bulkexport.SyncWriter).Release(); err != nil {
		t.Fatal(err)
	}
	dead, err := other.Create(ctx, "job-l", "dead.ndjson")
	if err != nil {
		t.Fatal(err)
	}
	defer dead.Abort() //nolint:errcheck // swept
	if err := s.SweepTemp(ctx, "job-l"); err != nil {
		t.Fatal(err)
	}
	entries, err := os.ReadDir(filepath.Join(s.Root(), "job-l"))
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 || !strings.HasPrefix(entries[0].Name(), "~live.ndjson.") {
		t.Fatalf("after the sweep: %v, want the live writer's file only", entries)
	}
	if _, err := s.OpenSynced(ctx, "job-l", h, 0, "x.ndjson"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("OpenSynced of a swept released file = %v, want fs.ErrNotExist", err)
	}
	if err := live.Commit(); err != nil {
		t.Fatalf("Commit of the live writer after the sweep: %v", err)
	}
}
