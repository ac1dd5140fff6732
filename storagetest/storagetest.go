// Package storagetest checks that an implementation of bulkexport.Storage
// keeps the contract documented on that interface. An implementation's
// tests call Run with a constructor:
//
//	func TestMyStorage(t *testing.T) {
//		storagetest.Run(t, func(t *testing.T) bulkexport.Storage {
//			return newMyStorage(t) // empty, cleaned up with t.Cleanup
//		})
//	}
//
// It uses the standard library only.
package storagetest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/bulkfhir/bulkexport"
)

// Run checks the Storage contract in named subtests. newStorage is called
// once per subtest, with that subtest's t, and must return an empty
// storage; it can register its cleanup with t.Cleanup. The subtests run
// one after another (none calls t.Parallel), but several of them use the
// storage from many goroutines, so run them with -race.
func Run(t *testing.T, newStorage func(t *testing.T) bulkexport.Storage) {
	t.Helper()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := newStorage(t)
			if s == nil {
				t.Fatal("newStorage returned nil")
			}
			c.fn(t, s)
		})
	}
}

// cases are Run's subtests, in order.
var cases = []struct {
	name string
	fn   func(t *testing.T, s bulkexport.Storage)
}{
	{"InvisibleBeforeCommit", testInvisibleBeforeCommit},
	{"CommitRoundTrip", testCommitRoundTrip},
	{"EmptyFile", testEmptyFile},
	{"Seek", testSeek},
	{"IndependentReaders", testIndependentReaders},
	{"AbortLeavesNoTrace", testAbortLeavesNoTrace},
	{"AbortAfterCommitIsNoop", testAbortAfterCommit},
	{"ReplaceOnCommit", testReplaceOnCommit},
	{"AbortedReplaceKeepsOld", testAbortedReplace},
	{"ListSorted", testListSorted},
	{"ListIsolatesJobs", testListIsolatesJobs},
	{"ListUnknownJob", testListUnknownJob},
	{"OpenMissing", testOpenMissing},
	{"Delete", testDelete},
	{"DeleteInProgress", testDeleteInProgress},
	{"DeleteUnknownJob", testDeleteUnknownJob},
	{"ValidEdgeNames", testValidEdgeNames},
	{"InvalidNames", testInvalidNames},
	{"ConcurrentWriters", testConcurrentWriters},
	{"ConcurrentReplace", testConcurrentReplace},
	{"LargeFile", testLargeFile},
	{"FencedNames", testFencedNames},
	{"DeleteFile", testDeleteFile},
	{"SweepTempKeepsCommitted", testSweepTempKeepsCommitted},
	{"SyncedOpenCopiesPrefix", testSyncedOpenCopiesPrefix},
	{"SyncedOpenAfterRelease", testSyncedOpenAfterRelease},
	{"SyncedOpenMissing", testSyncedOpenMissing},
	{"SyncedOpenShort", testSyncedOpenShort},
	{"SignedURL", testSignedURL},
	{"SignedURLMissingFile", testSignedURLMissing},
	{"SignedURLRefusals", testSignedURLRefusals},
}

// ctx is the context of every call: the contract says nothing of
// cancellation.
var ctx = context.Background()

// put writes a committed file.
func put(t *testing.T, s bulkexport.Storage, jobID, name string, data []byte) {
	t.Helper()
	w, err := s.Create(ctx, jobID, name)
	if err != nil {
		t.Fatalf("Create(%q, %q): %v", jobID, name, err)
	}
	write(t, w, data)
	if err := w.Commit(); err != nil {
		t.Fatalf("Commit %s/%s: %v", jobID, name, err)
	}
}

// write writes data through w, failing on a short write or an error.
func write(t *testing.T, w bulkexport.FileWriter, data []byte) {
	t.Helper()
	n, err := w.Write(data)
	if err != nil || n != len(data) {
		t.Fatalf("Write(%d bytes) = %d, %v", len(data), n, err)
	}
}

// open opens a file that must exist.
func open(t *testing.T, s bulkexport.Storage, jobID, name string) bulkexport.FileReader {
	t.Helper()
	r, err := s.Open(ctx, jobID, name)
	if err != nil {
		t.Fatalf("Open(%q, %q): %v", jobID, name, err)
	}
	if r == nil {
		t.Fatalf("Open(%q, %q) returned a nil FileReader and no error", jobID, name)
	}
	return r
}

// read returns the whole content of a file that must exist.
func read(t *testing.T, s bulkexport.Storage, jobID, name string) []byte {
	t.Helper()
	r := open(t, s, jobID, name)
	defer r.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("reading %s/%s: %v", jobID, name, err)
	}
	return b
}

// wantContent checks a file's bytes and Size.
func wantContent(t *testing.T, s bulkexport.Storage, jobID, name string, want []byte) {
	t.Helper()
	r := open(t, s, jobID, name)
	defer r.Close()
	if r.Size() != int64(len(want)) {
		t.Errorf("%s/%s: Size() = %d, want %d", jobID, name, r.Size(), len(want))
	}
	got, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("reading %s/%s: %v", jobID, name, err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s/%s: content = %s, want %s", jobID, name, abbrev(got), abbrev(want))
	}
}

// wantMissing checks that Open fails with an error wrapping fs.ErrNotExist.
func wantMissing(t *testing.T, s bulkexport.Storage, jobID, name string) {
	t.Helper()
	r, err := s.Open(ctx, jobID, name)
	if err == nil {
		r.Close()
		t.Errorf("Open(%q, %q) succeeded, want an error wrapping fs.ErrNotExist", jobID, name)
		return
	}
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Open(%q, %q) = %v, want an error wrapping fs.ErrNotExist", jobID, name, err)
	}
}

// list returns List's answer, failing on an error.
func list(t *testing.T, s bulkexport.Storage, jobID string) []string {
	t.Helper()
	names, err := s.List(ctx, jobID)
	if err != nil {
		t.Fatalf("List(%q): %v", jobID, err)
	}
	return names
}

// wantList checks List's answer; want nil or empty means no files.
func wantList(t *testing.T, s bulkexport.Storage, jobID string, want ...string) {
	t.Helper()
	got := list(t, s, jobID)
	if len(got) != len(want) || (len(want) > 0 && !slices.Equal(got, want)) {
		t.Errorf("List(%q) = %q, want %q", jobID, got, want)
	}
}

// abbrev describes content for an error message.
func abbrev(b []byte) string {
	if len(b) <= 64 {
		return fmt.Sprintf("%q", b)
	}
	return fmt.Sprintf("%q... (%d bytes)", b[:64], len(b))
}

// lines returns n NDJSON-like lines, each tagged with tag.
func lines(tag string, n int) []byte {
	var b bytes.Buffer
	for i := 0; i < n; i++ {
		fmt.Fprintf(&b, "{\"resourceType\":\"Patient\",\"id\":\"%s-%d\"}\n", tag, i)
	}
	return b.Bytes()
}

func testInvisibleBeforeCommit(t *testing.T, s bulkexport.Storage) {
	w, err := s.Create(ctx, "job1", "Patient.ndjson")
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	data := lines("p", 100)
	write(t, w, data)
	wantMissing(t, s, "job1", "Patient.ndjson")
	wantList(t, s, "job1")
	if err := w.Commit(); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	wantList(t, s, "job1", "Patient.ndjson")
	wantContent(t, s, "job1", "Patient.ndjson", data)
}

func testCommitRoundTrip(t *testing.T, s bulkexport.Storage) {
	// Write in pieces of varied sizes, including an empty one.
	data := lines("x", 500)
	w, err := s.Create(ctx, "job1", "Observation.ndjson")
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	for off, step := 0, 0; off < len(data); step++ {
		n := min(step*37%4096, len(data)-off)
		write(t, w, data[off:off+n])
		off += n
	}
	before := time.Now()
	if err := w.Commit(); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	wantContent(t, s, "job1", "Observation.ndjson", data)

	r := open(t, s, "job1", "Observation.ndjson")
	mt := r.ModTime()
	if mt.IsZero() {
		t.Errorf("ModTime() is zero")
	} else if d := mt.Sub(before); d < -24*time.Hour || d > 24*time.Hour {
		t.Errorf("ModTime() = %v, far from the commit at %v", mt, before)
	}
	if err := r.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
}

func testEmptyFile(t *testing.T, s bulkexport.Storage) {
	put(t, s, "job1", "empty.ndjson", nil)
	wantList(t, s, "job1", "empty.ndjson")
	r := open(t, s, "job1", "empty.ndjson")
	defer r.Close()
	if r.Size() != 0 {
		t.Errorf("Size() = %d, want 0", r.Size())
	}
	n, err := r.Read(make([]byte, 16))
	if n != 0 || err != io.EOF {
		t.Errorf("Read on an empty file = %d, %v; want 0, io.EOF", n, err)
	}
}

// seekTo seeks and checks the new offset.
func seekTo(t *testing.T, r io.Seeker, offset int64, whence int, want int64) {
	t.Helper()
	got, err := r.Seek(offset, whence)
	if err != nil || got != want {
		t.Fatalf("Seek(%d, %d) = %d, %v; want %d, nil", offset, whence, got, err, want)
	}
}

// readN reads exactly len(want) bytes and compares them.
func readN(t *testing.T, r io.Reader, want []byte) {
	t.Helper()
	got := make([]byte, len(want))
	if _, err := io.ReadFull(r, got); err != nil {
		t.Fatalf("reading %d bytes: %v", len(want), err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %q, want %q", got, want)
	}
}

// pattern returns n bytes that differ at every offset of a small window, so
// that a read at the wrong offset shows.
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"[i%62]
		if i%61 == 60 {
			b[i] = '\n'
		}
	}
	return b
}

func testSeek(t *testing.T, s bulkexport.Storage) {
	data := pattern(10000)
	size := int64(len(data))
	put(t, s, "job1", "seek.ndjson", data)
	r := open(t, s, "job1", "seek.ndjson")
	defer r.Close()

	seekTo(t, r, 100, io.SeekStart, 100)
	readN(t, r, data[100:150])
	seekTo(t, r, 0, io.SeekCurrent, 150)
	seekTo(t, r, 1000, io.SeekCurrent, 1150)
	readN(t, r, data[1150:1160])
	seekTo(t, r, -60, io.SeekCurrent, 1100)
	readN(t, r, data[1100:1110])
	seekTo(t, r, -10, io.SeekEnd, size-10)
	readN(t, r, data[size-10:])
	if n, err := r.Read(make([]byte, 8)); n != 0 || err != io.EOF {
		t.Errorf("Read at the end = %d, %v; want 0, io.EOF", n, err)
	}
	seekTo(t, r, 0, io.SeekEnd, size)
	if n, err := r.Read(make([]byte, 8)); n != 0 || err != io.EOF {
		t.Errorf("Read after Seek(0, SeekEnd) = %d, %v; want 0, io.EOF", n, err)
	}
	// A read across the end stops at the end.
	seekTo(t, r, -5, io.SeekEnd, size-5)
	got, err := io.ReadAll(r)
	if err != nil || !bytes.Equal(got, data[size-5:]) {
		t.Errorf("ReadAll from 5 before the end = %q, %v; want %q", got, err, data[size-5:])
	}
	seekTo(t, r, 0, io.SeekStart, 0)
	got, err = io.ReadAll(r)
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("ReadAll after Seek(0, SeekStart) = %s, %v; want the whole file", abbrev(got), err)
	}
	if _, err := r.Seek(-1, io.SeekStart); err == nil {
		t.Errorf("Seek(-1, SeekStart) succeeded, want an error")
	}
	if _, err := r.Seek(-size-1, io.SeekEnd); err == nil {
		t.Errorf("Seek(-size-1, SeekEnd) succeeded, want an error")
	}
	if r.Size() != size {
		t.Errorf("Size() = %d after seeking, want %d", r.Size(), size)
	}
}

func testIndependentReaders(t *testing.T, s bulkexport.Storage) {
	data := pattern(4096)
	put(t, s, "job1", "f", data)
	r1 := open(t, s, "job1", "f")
	defer r1.Close()
	r2 := open(t, s, "job1", "f")
	defer r2.Close()
	seekTo(t, r1, 2000, io.SeekStart, 2000)
	readN(t, r2, data[:100])
	readN(t, r1, data[2000:2100])
	readN(t, r2, data[100:200])
	if err := r1.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	readN(t, r2, data[200:300])
}

func testAbortLeavesNoTrace(t *testing.T, s bulkexport.Storage) {
	// In a job with no other files...
	w, err := s.Create(ctx, "job1", "a.ndjson")
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	write(t, w, lines("a", 100))
	if err := w.Abort(); err != nil {
		t.Fatalf("Abort: %v", err)
	}
	wantMissing(t, s, "job1", "a.ndjson")
	wantList(t, s, "job1")

	// ...and next to a committed one.
	put(t, s, "job2", "keep.ndjson", []byte("keep\n"))
	w, err = s.Create(ctx, "job2", "b.ndjson")
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	write(t, w, lines("b", 100))
	if err := w.Abort(); err != nil {
		t.Fatalf("Abort: %v", err)
	}
	wantMissing(t, s, "job2", "b.ndjson")
	wantList(t, s, "job2", "keep.ndjson")
	wantContent(t, s, "job2", "keep.ndjson", []byte("keep\n"))

	// An aborted name can be written again.
	put(t, s, "job1", "a.ndjson", []byte("again\n"))
	wantContent(t, s, "job1", "a.ndjson", []byte("again\n"))
	wantList(t, s, "job1", "a.ndjson")
}

func testAbortAfterCommit(t *testing.T, s bulkexport.Storage) {
	w, err := s.Create(ctx, "job1", "f.ndjson")
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	write(t, w, []byte("data\n"))
	if err := w.Commit(); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	if err := w.Abort(); err != nil {
		t.Errorf("Abort after Commit = %v, want nil (a no-op)", err)
	}
	wantList(t, s, "job1", "f.ndjson")
	wantContent(t, s, "job1", "f.ndjson", []byte("data\n"))
}

func testReplaceOnCommit(t *testing.T, s bulkexport.Storage) {
	v1, v2 := lines("v1", 50), lines("version-two", 20)
	put(t, s, "job1", "f.ndjson", v1)
	w, err := s.Create(ctx, "job1", "f.ndjson")
	if err != nil {
		t.Fatalf("Create of an existing name: %v", err)
	}
	write(t, w, v2)
	// The old content stays until Commit.
	wantContent(t, s, "job1", "f.ndjson", v1)
	wantList(t, s, "job1", "f.ndjson")
	if err := w.Commit(); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	wantContent(t, s, "job1", "f.ndjson", v2)
	wantList(t, s, "job1", "f.ndjson")
}

func testAbortedReplace(t *testing.T, s bulkexport.Storage) {
	v1 := lines("v1", 50)
	put(t, s, "job1", "f.ndjson", v1)
	w, err := s.Create(ctx, "job1", "f.ndjson")
	if err != nil {
		t.Fatalf("Create of an existing name: %v", err)
	}
	write(t, w, lines("v2", 10))
	if err := w.Abort(); err != nil {
		t.Fatalf("Abort: %v", err)
	}
	wantContent(t, s, "job1", "f.ndjson", v1)
	wantList(t, s, "job1", "f.ndjson")
}

func testListSorted(t *testing.T, s bulkexport.Storage) {
	names := []string{
		"Patient.ndjson", "Observation.2.ndjson", "Observation.10.ndjson",
		"Observation.1.ndjson", "a.ndjson", "Z.ndjson", "_x", "-y", ".z", "0",
	}
	for _, n := range names {
		put(t, s, "job1", n, []byte(n+"\n"))
	}
	want := slices.Clone(names)
	slices.Sort(want)
	wantList(t, s, "job1", want...)
	for _, n := range names {
		wantContent(t, s, "job1", n, []byte(n+"\n"))
	}
}

func testListIsolatesJobs(t *testing.T, s bulkexport.Storage) {
	put(t, s, "job1", "Patient.ndjson", []byte("1\n"))
	put(t, s, "job1", "Observation.ndjson", []byte("1o\n"))
	put(t, s, "job2", "Patient.ndjson", []byte("2\n"))
	put(t, s, "job10", "Encounter.ndjson", []byte("10\n"))
	wantList(t, s, "job1", "Observation.ndjson", "Patient.ndjson")
	wantList(t, s, "job2", "Patient.ndjson")
	wantList(t, s, "job10", "Encounter.ndjson")
	wantContent(t, s, "job1", "Patient.ndjson", []byte("1\n"))
	wantContent(t, s, "job2", "Patient.ndjson", []byte("2\n"))
	wantMissing(t, s, "job2", "Observation.ndjson")
	wantMissing(t, s, "job1", "Encounter.ndjson")
	// A job whose id prefixes another's sees only its own files.
	wantList(t, s, "job")
}

func testListUnknownJob(t *testing.T, s bulkexport.Storage) {
	names, err := s.List(ctx, "no-such-job")
	if err != nil {
		t.Fatalf("List of an unknown job: %v, want no error", err)
	}
	if len(names) != 0 {
		t.Errorf("List of an unknown job = %q, want none", names)
	}
}

func testOpenMissing(t *testing.T, s bulkexport.Storage) {
	wantMissing(t, s, "no-such-job", "Patient.ndjson")
	put(t, s, "job1", "Patient.ndjson", []byte("p\n"))
	wantMissing(t, s, "job1", "Observation.ndjson")
	wantMissing(t, s, "job1", "patient.ndjson")
	wantMissing(t, s, "job2", "Patient.ndjson")
}

func testDelete(t *testing.T, s bulkexport.Storage) {
	put(t, s, "job1", "Patient.ndjson", []byte("p1\n"))
	put(t, s, "job1", "Observation.ndjson", []byte("o1\n"))
	put(t, s, "job2", "Patient.ndjson", []byte("p2\n"))
	if err := s.Delete(ctx, "job1"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	wantList(t, s, "job1")
	wantMissing(t, s, "job1", "Patient.ndjson")
	wantMissing(t, s, "job1", "Observation.ndjson")
	// Other jobs keep their files.
	wantList(t, s, "job2", "Patient.ndjson")
	wantContent(t, s, "job2", "Patient.ndjson", []byte("p2\n"))
	// A deleted job's id can be used again.
	put(t, s, "job1", "Patient.ndjson", []byte("new\n"))
	wantList(t, s, "job1", "Patient.ndjson")
	wantContent(t, s, "job1", "Patient.ndjson", []byte("new\n"))
}

func testDeleteInProgress(t *testing.T, s bulkexport.Storage) {
	put(t, s, "job1", "done.ndjson", lines("done", 10))
	w, err := s.Create(ctx, "job1", "partial.ndjson")
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	written := lines("first", 200)
	write(t, w, written)
	if err := s.Delete(ctx, "job1"); err != nil {
		t.Fatalf("Delete with a file in progress: %v", err)
	}
	wantList(t, s, "job1")
	wantMissing(t, s, "job1", "done.ndjson")
	wantMissing(t, s, "job1", "partial.ndjson")

	// The writer outlived its job. Writing and committing may fail or
	// succeed, but must not panic, and must not leave half a file.
	more := lines("second", 200)
	if n, err := w.Write(more); err == nil && n == len(more) {
		written = append(written, more...)
	}
	if err := w.Commit(); err != nil {
		_ = w.Abort()
		wantMissing(t, s, "job1", "partial.ndjson")
	} else if slices.Contains(list(t, s, "job1"), "partial.ndjson") {
		if got := read(t, s, "job1", "partial.ndjson"); !bytes.Equal(got, written) {
			t.Errorf("a writer committed after Delete left %s, want nothing or all of %s", abbrev(got), abbrev(written))
		}
	}

	// The job can be used again.
	put(t, s, "job1", "again.ndjson", []byte("again\n"))
	if names := list(t, s, "job1"); !slices.Contains(names, "again.ndjson") {
		t.Errorf("List after writing again = %q, want again.ndjson in it", names)
	}
	wantContent(t, s, "job1", "again.ndjson", []byte("again\n"))
	if err := s.Delete(ctx, "job1"); err != nil {
		t.Fatalf("second Delete: %v", err)
	}
	wantList(t, s, "job1")
}

func testDeleteUnknownJob(t *testing.T, s bulkexport.Storage) {
	if err := s.Delete(ctx, "no-such-job"); err != nil {
		t.Errorf("Delete of an unknown job = %v, want nil", err)
	}
	put(t, s, "job1", "f", []byte("x"))
	if err := s.Delete(ctx, "job1"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	if err := s.Delete(ctx, "job1"); err != nil {
		t.Errorf("Delete of a deleted job = %v, want nil", err)
	}
}

func testValidEdgeNames(t *testing.T, s bulkexport.Storage) {
	names := []string{
		"a", "0", "-", "_", ".x", "..x", "x..", "...", "A.b-C_9.ndjson",
		strings.Repeat("n", 128),
	}
	for _, n := range names {
		put(t, s, "job1", n, []byte(n))
	}
	jobs := []string{".job", "..job", "-", strings.Repeat("j", 128)}
	for _, j := range jobs {
		put(t, s, j, "f", []byte(j))
	}
	want := slices.Clone(names)
	slices.Sort(want)
	wantList(t, s, "job1", want...)
	for _, n := range names {
		wantContent(t, s, "job1", n, []byte(n))
	}
	for _, j := range jobs {
		wantList(t, s, j, "f")
		wantContent(t, s, j, "f", []byte(j))
	}
}

// invalidNames are names and job ids outside the contract.
var invalidNames = []string{
	"", ".", "..", "../x", "a/b", "/abs", `a\b`, `..\x`, "x\x00y", "a b",
	"a\nb", "é", "x:y", "*", strings.Repeat("x", 129), strings.Repeat("x", 200),
}

func testInvalidNames(t *testing.T, s bulkexport.Storage) {
	put(t, s, "job1", "ok", []byte("ok"))
	for _, bad := range invalidNames {
		if w, err := s.Create(ctx, "job1", bad); err == nil {
			_ = w.Abort()
			t.Errorf("Create(job1, %q) succeeded, want an error", bad)
		}
		if r, err := s.Open(ctx, "job1", bad); err == nil {
			r.Close()
			t.Errorf("Open(job1, %q) succeeded, want an error", bad)
		}
		if w, err := s.Create(ctx, bad, "f"); err == nil {
			_ = w.Abort()
			t.Errorf("Create(%q, f) succeeded, want an error", bad)
		}
		if r, err := s.Open(ctx, bad, "f"); err == nil {
			r.Close()
			t.Errorf("Open(%q, f) succeeded, want an error", bad)
		}
	}
	// Nothing was made by the refused calls.
	wantList(t, s, "job1", "ok")
	wantContent(t, s, "job1", "ok", []byte("ok"))
	wantList(t, s, "x")
	wantList(t, s, "a")
}

// content is the deterministic content of one file in the concurrency
// tests: chunks lines of 1 KiB, tagged with the job and name.
func content(jobID, name string, chunks int) []byte {
	line := make([]byte, 1024)
	b := make([]byte, 0, chunks*len(line))
	for i := 0; i < chunks; i++ {
		copy(line, fmt.Sprintf("%s/%s/%06d ", jobID, name, i))
		for j := len(jobID) + len(name) + 9; j < len(line)-1; j++ {
			line[j] = byte('a' + (i+j)%26)
		}
		line[len(line)-1] = '\n'
		b = append(b, line...)
	}
	return b
}

func testConcurrentWriters(t *testing.T, s bulkexport.Storage) {
	jobs := []string{"jobA", "jobB", "jobC"}
	const files, chunks = 6, 48
	type key struct{ job, name string }
	want := make(map[key][]byte)
	for _, j := range jobs {
		for f := 0; f < files; f++ {
			n := fmt.Sprintf("File%d.ndjson", f)
			want[key{j, n}] = content(j, n, chunks+f)
		}
	}

	var writers, readers sync.WaitGroup
	done := make(chan struct{})
	// Readers poll while the writers work: every listed file must be
	// complete.
	for _, j := range jobs {
		readers.Add(1)
		go func() {
			defer readers.Done()
			for {
				select {
				case <-done:
					return
				default:
				}
				names, err := s.List(ctx, j)
				if err != nil {
					t.Errorf("List(%q) during writes: %v", j, err)
					return
				}
				if !slices.IsSorted(names) {
					t.Errorf("List(%q) = %q, not sorted", j, names)
				}
				for _, n := range names {
					w, ok := want[key{j, n}]
					if !ok {
						t.Errorf("List(%q) during writes shows %q, never written", j, n)
						continue
					}
					r, err := s.Open(ctx, j, n)
					if err != nil {
						t.Errorf("Open(%q, %q) of a listed file: %v", j, n, err)
						continue
					}
					got, err := io.ReadAll(r)
					r.Close()
					if err != nil || !bytes.Equal(got, w) {
						t.Errorf("%s/%s read during writes: %s, %v; want all of %s", j, n, abbrev(got), err, abbrev(w))
					}
				}
			}
		}()
	}
	for k, data := range want {
		writers.Add(1)
		go func() {
			defer writers.Done()
			w, err := s.Create(ctx, k.job, k.name)
			if err != nil {
				t.Errorf("Create(%q, %q): %v", k.job, k.name, err)
				return
			}
			for off := 0; off < len(data); off += 1024 {
				if _, err := w.Write(data[off : off+1024]); err != nil {
					t.Errorf("Write %s/%s: %v", k.job, k.name, err)
					_ = w.Abort()
					return
				}
			}
			if err := w.Commit(); err != nil {
				t.Errorf("Commit %s/%s: %v", k.job, k.name, err)
			}
		}()
	}
	writers.Wait()
	close(done)
	readers.Wait()

	for _, j := range jobs {
		var names []string
		for f := 0; f < files; f++ {
			names = append(names, fmt.Sprintf("File%d.ndjson", f))
		}
		wantList(t, s, j, names...)
		for _, n := range names {
			wantContent(t, s, j, n, want[key{j, n}])
		}
	}
}

func testConcurrentReplace(t *testing.T, s bulkexport.Storage) {
	const writers = 8
	versions := make([][]byte, writers)
	for i := range versions {
		versions[i] = content("job1", fmt.Sprintf("v%d", i), 16+4*i)
	}
	isVersion := func(b []byte) bool {
		return slices.ContainsFunc(versions, func(v []byte) bool { return bytes.Equal(v, b) })
	}
	put(t, s, "job1", "f.ndjson", versions[0])

	var wg, rg sync.WaitGroup
	done := make(chan struct{})
	rg.Add(1)
	go func() {
		defer rg.Done()
		for {
			select {
			case <-done:
				return
			default:
			}
			r, err := s.Open(ctx, "job1", "f.ndjson")
			if err != nil {
				t.Errorf("Open during replaces: %v", err)
				return
			}
			got, err := io.ReadAll(r)
			r.Close()
			if err != nil || !isVersion(got) {
				t.Errorf("read during replaces: %s, %v; want one whole version", abbrev(got), err)
				return
			}
		}
	}()
	for i := 0; i < writers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w, err := s.Create(ctx, "job1", "f.ndjson")
			if err != nil {
				t.Errorf("Create: %v", err)
				return
			}
			data := versions[i]
			for off := 0; off < len(data); off += 1024 {
				if _, err := w.Write(data[off : off+1024]); err != nil {
					t.Errorf("Write: %v", err)
					_ = w.Abort()
					return
				}
			}
			if err := w.Commit(); err != nil {
				t.Errorf("Commit: %v", err)
			}
		}()
	}
	wg.Wait()
	close(done)
	rg.Wait()
	wantList(t, s, "job1", "f.ndjson")
	if got := read(t, s, "job1", "f.ndjson"); !isVersion(got) {
		t.Errorf("after concurrent replaces: %s, want one whole version", abbrev(got))
	}
}

func testLargeFile(t *testing.T, s bulkexport.Storage) {
	const chunk, size = 1 << 10, 8 << 20
	w, err := s.Create(ctx, "job1", "large.ndjson")
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	line := make([]byte, chunk) // after the loop, the last chunk
	h := sha256.New()
	for i := 0; i < size/chunk; i++ {
		for j := range line[:chunk-1] {
			line[j] = byte('a' + (i*7+j)%26)
		}
		copy(line, fmt.Sprintf("%08d", i))
		line[chunk-1] = '\n'
		h.Write(line)
		if n, err := w.Write(line); err != nil || n != chunk {
			_ = w.Abort()
			t.Fatalf("Write chunk %d = %d, %v", i, n, err)
		}
	}
	if err := w.Commit(); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	wantSum := h.Sum(nil)

	r := open(t, s, "job1", "large.ndjson")
	defer r.Close()
	if r.Size() != size {
		t.Errorf("Size() = %d, want %d", r.Size(), size)
	}
	h.Reset()
	n, err := io.Copy(h, r)
	if err != nil || n != size {
		t.Fatalf("reading: %d bytes, %v; want %d", n, err, size)
	}
	if !bytes.Equal(h.Sum(nil), wantSum) {
		t.Errorf("content differs from what was written")
	}
	seekTo(t, r, -chunk, io.SeekEnd, size-chunk)
	readN(t, r, line)
	seekTo(t, r, size/2, io.SeekStart, size/2)
	readN(t, r, []byte(fmt.Sprintf("%08d", size/2/chunk)))
}

// testFencedNames: the files that two claims of one job write, under the
// names bulkexport.FileName gives them, are distinct files; committing
// one never changes the other, and each reads back with the size its
// writer wrote (the engine checks that size before it completes a job).
func testFencedNames(t *testing.T, s bulkexport.Storage) {
	old := bulkexport.FileName("Patient", 1, 3)
	newer := bulkexport.FileName("Patient", 1, 5)
	put(t, s, "job-f", newer, lines("new", 3))
	put(t, s, "job-f", old, lines("old", 1))
	wantContent(t, s, "job-f", newer, lines("new", 3))
	wantContent(t, s, "job-f", old, lines("old", 1))
	wantList(t, s, "job-f", old, newer)
}

// testDeleteFile: a Storage that implements bulkexport.FileDeleter
// removes exactly the named file; the job's other files stay as they
// were, and removing a missing file is not an error.
func testDeleteFile(t *testing.T, s bulkexport.Storage) {
	fd, ok := s.(bulkexport.FileDeleter)
	if !ok {
		t.Skip("the Storage does not implement bulkexport.FileDeleter")
	}
	a, b := bulkexport.FileName("Patient", 1, 2), bulkexport.FileName("Patient", 2, 2)
	put(t, s, "job-d", a, lines("a", 2))
	put(t, s, "job-d", b, lines("b", 2))
	put(t, s, "job-e", a, lines("e", 2))
	if err := fd.DeleteFile(ctx, "job-d", a); err != nil {
		t.Fatalf("DeleteFile: %v", err)
	}
	wantMissing(t, s, "job-d", a)
	wantContent(t, s, "job-d", b, lines("b", 2))
	wantContent(t, s, "job-e", a, lines("e", 2))
	if err := fd.DeleteFile(ctx, "job-d", a); err != nil {
		t.Fatalf("DeleteFile of a missing file: %v", err)
	}
}

// testSweepTempKeepsCommitted: a Storage that implements
// bulkexport.TempSweeper leaves every committed file alone when it sweeps
// a job's temporary files, and a file being written when a sweep runs
// either commits whole or fails to commit; it is never listed short.
func testSweepTempKeepsCommitted(t *testing.T, s bulkexport.Storage) {
	ts, ok := s.(bulkexport.TempSweeper)
	if !ok {
		t.Skip("the Storage does not implement bulkexport.TempSweeper")
	}
	done := bulkexport.FileName("Patient", 1, 4)
	put(t, s, "job-s", done, lines("done", 5))
	w, err := s.Create(ctx, "job-s", bulkexport.FileName("Patient", 2, 4))
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	write(t, w, lines("half", 2))
	if err := ts.SweepTemp(ctx, "job-s"); err != nil {
		t.Fatalf("SweepTemp: %v", err)
	}
	wantContent(t, s, "job-s", done, lines("done", 5))
	if err := w.Commit(); err == nil {
		wantContent(t, s, "job-s", bulkexport.FileName("Patient", 2, 4), lines("half", 2))
	} else {
		wantMissing(t, s, "job-s", bulkexport.FileName("Patient", 2, 4))
		_ = w.Abort()
	}
}

// syncedOpener returns s as a bulkexport.SyncedOpener, or skips the test
// when s does not implement it.
func syncedOpener(t *testing.T, s bulkexport.Storage) bulkexport.SyncedOpener {
	t.Helper()
	so, ok := s.(bulkexport.SyncedOpener)
	if !ok {
		t.Skip("the Storage does not implement bulkexport.SyncedOpener")
	}
	return so
}

// syncWriter returns w as a bulkexport.SyncWriter: the writers of a
// SyncedOpener must be.
func syncWriter(t *testing.T, w bulkexport.FileWriter) bulkexport.SyncWriter {
	t.Helper()
	sw, ok := w.(bulkexport.SyncWriter)
	if !ok {
		t.Fatalf("the Storage is a bulkexport.SyncedOpener, but its FileWriter %T is no bulkexport.SyncWriter", w)
	}
	return sw
}

// createSynced creates a file in job, writes data, syncs it and returns the
// writer and the handle.
func createSynced(t *testing.T, s bulkexport.Storage, jobID string, data []byte) (bulkexport.FileWriter, string) {
	t.Helper()
	w, err := s.Create(ctx, jobID, bulkexport.FileName("Patient", 1, 1))
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	write(t, w, data)
	h, err := syncWriter(t, w).Sync()
	if err != nil {
		t.Fatalf("Sync: %v", err)
	}
	return w, h
}

// testSyncedOpenCopiesPrefix: OpenSynced starts a new file with exactly
// the synced prefix asked for; what the old writer writes and syncs later
// is not in it (it is a copy); the old writer can still be aborted, and
// the new file is then unharmed.
func testSyncedOpenCopiesPrefix(t *testing.T, s bulkexport.Storage) {
	so := syncedOpener(t, s)
	head, tail := lines("head", 20), lines("tail", 3)
	w, h := createSynced(t, s, "job-y", head)
	h2, err := syncWriter(t, w).Sync()
	if err != nil || h2 != h {
		t.Fatalf("a second Sync = %q, %v; want the same handle %q", h2, err, h)
	}
	write(t, w, lines("unsynced", 4))
	name := bulkexport.FileName("Patient", 1, 2)
	nw, err := so.OpenSynced(ctx, "job-y", h, int64(len(head)), name)
	if err != nil {
		t.Fatalf("OpenSynced: %v", err)
	}
	syncWriter(t, nw) // the new writer syncs too, for the next checkpoint
	wantList(t, s, "job-y")
	// The old writer goes on: the copy does not see it.
	write(t, w, lines("stale", 5))
	if _, err := syncWriter(t, w).Sync(); err != nil {
		t.Fatalf("Sync of the old writer: %v", err)
	}
	write(t, nw, tail)
	if _, err := syncWriter(t, nw).Sync(); err != nil {
		t.Fatalf("Sync of the new writer: %v", err)
	}
	if err := w.Abort(); err != nil {
		t.Fatalf("Abort of the old writer: %v", err)
	}
	if err := nw.Commit(); err != nil {
		t.Fatalf("Commit of the new writer: %v", err)
	}
	wantList(t, s, "job-y", name)
	wantContent(t, s, "job-y", name, append(slices.Clone(head), tail...))

	// A prefix shorter than what was synced is a prefix too.
	w, h = createSynced(t, s, "job-y2", head)
	defer w.Abort() //nolint:errcheck // only the copy matters
	nw, err = so.OpenSynced(ctx, "job-y2", h, 7, name)
	if err != nil {
		t.Fatalf("OpenSynced of 7 bytes: %v", err)
	}
	if err := nw.Commit(); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	wantContent(t, s, "job-y2", name, head[:7])
}

// testSyncedOpenAfterRelease: a released writer leaves its synced file for
// OpenSynced; it can no longer commit.
func testSyncedOpenAfterRelease(t *testing.T, s bulkexport.Storage) {
	so := syncedOpener(t, s)
	head := lines("head", 10)
	w, h := createSynced(t, s, "job-r", head)
	if err := syncWriter(t, w).Release(); err != nil {
		t.Fatalf("Release: %v", err)
	}
	if err := w.Commit(); err == nil {
		t.Errorf("Commit after Release succeeded, want an error")
	}
	if err := w.Abort(); err != nil {
		t.Errorf("Abort after Release: %v, want a no-op", err)
	}
	wantList(t, s, "job-r")
	name := bulkexport.FileName("Patient", 1, 2)
	nw, err := so.OpenSynced(ctx, "job-r", h, int64(len(head)), name)
	if err != nil {
		t.Fatalf("OpenSynced after Release: %v", err)
	}
	if err := nw.Commit(); err != nil {
		t.Fatalf("Commit: %v", err)
	}
	wantContent(t, s, "job-r", name, head)
}

// testSyncedOpenMissing: the handle of an aborted writer, or of another
// job, names no file: OpenSynced fails with an error wrapping
// fs.ErrNotExist, and creates nothing.
func testSyncedOpenMissing(t *testing.T, s bulkexport.Storage) {
	so := syncedOpener(t, s)
	w, h := createSynced(t, s, "job-m", lines("gone", 3))
	name := bulkexport.FileName("Patient", 1, 2)
	if nw, err := so.OpenSynced(ctx, "job-other", h, 1, name); !errors.Is(err, fs.ErrNotExist) {
		if err == nil {
			_ = nw.Abort()
		}
		t.Errorf("OpenSynced of another job's handle = %v, want an error wrapping fs.ErrNotExist", err)
	}
	if err := w.Abort(); err != nil {
		t.Fatalf("Abort: %v", err)
	}
	if nw, err := so.OpenSynced(ctx, "job-m", h, 1, name); !errors.Is(err, fs.ErrNotExist) {
		if err == nil {
			_ = nw.Abort()
		}
		t.Errorf("OpenSynced of an aborted writer's handle = %v, want an error wrapping fs.ErrNotExist", err)
	}
	wantList(t, s, "job-m")
	wantList(t, s, "job-other")
}

// testSyncedOpenShort: asking for more bytes than were written fails with
// an error wrapping bulkexport.ErrSyncedShort, and creates nothing; the
// old writer still commits.
func testSyncedOpenShort(t *testing.T, s bulkexport.Storage) {
	so := syncedOpener(t, s)
	head := lines("head", 10)
	w, h := createSynced(t, s, "job-t", head)
	name := bulkexport.FileName("Patient", 1, 2)
	if nw, err := so.OpenSynced(ctx, "job-t", h, int64(len(head))+1, name); !errors.Is(err, bulkexport.ErrSyncedShort) {
		if err == nil {
			_ = nw.Abort()
		}
		t.Errorf("OpenSynced of %d bytes of %d = %v, want an error wrapping bulkexport.ErrSyncedShort", len(head)+1, len(head), err)
	}
	wantList(t, s, "job-t")
	if err := w.Commit(); err != nil {
		t.Fatalf("Commit of the old writer: %v", err)
	}
	wantContent(t, s, "job-t", bulkexport.FileName("Patient", 1, 1), head)
}

// urlSigner returns s as a bulkexport.URLSigner, or skips the test when s
// does not implement it, or implements it but cannot sign in its
// configuration (its SignedURL error wraps errors.ErrUnsupported, as the
// contract asks).
func urlSigner(t *testing.T, s bulkexport.Storage) bulkexport.URLSigner {
	t.Helper()
	us, ok := s.(bulkexport.URLSigner)
	if !ok {
		t.Skip("the Storage does not implement bulkexport.URLSigner")
	}
	if _, err := us.SignedURL(ctx, "job-probe", "probe.ndjson", time.Minute); errors.Is(err, errors.ErrUnsupported) {
		t.Skipf("the Storage implements bulkexport.URLSigner but cannot sign in this configuration: %v", err)
	}
	return us
}

// signURL signs a URL that must be made, and checks that it is an
// absolute http or https URL.
func signURL(t *testing.T, us bulkexport.URLSigner, jobID, name string, expiry time.Duration) string {
	t.Helper()
	raw, err := us.SignedURL(ctx, jobID, name, expiry)
	if err != nil {
		t.Fatalf("SignedURL(%q, %q, %v): %v", jobID, name, expiry, err)
	}
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatalf("SignedURL(%q, %q) = %q, not a URL: %v", jobID, name, raw, err)
	}
	if !u.IsAbs() || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		t.Fatalf("SignedURL(%q, %q) = %q, want an absolute http or https URL (clients fetch it as is)", jobID, name, raw)
	}
	return raw
}

// fetchClient fetches signed URLs as a client of the export does: a plain
// client, with no credentials and no cookies.
var fetchClient = &http.Client{Timeout: time.Minute}

// fetch GETs u, with a Range header when rng is not empty, and returns
// the status and the body.
func fetch(t *testing.T, u, rng string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		t.Fatalf("request for %s: %v", u, err)
	}
	if rng != "" {
		req.Header.Set("Range", rng)
	}
	resp, err := fetchClient.Do(req)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: reading the body: %v", u, err)
	}
	return resp.StatusCode, body
}

// wantServes checks that a GET of u answers 200 with exactly want.
func wantServes(t *testing.T, u string, want []byte) {
	t.Helper()
	code, body := fetch(t, u, "")
	if code != http.StatusOK {
		t.Errorf("GET %s = %d %s, want 200", u, code, abbrev(body))
		return
	}
	if !bytes.Equal(body, want) {
		t.Errorf("GET %s served %s, want %s", u, abbrev(body), abbrev(want))
	}
}

// wantNotServed checks that a GET of u does not succeed.
func wantNotServed(t *testing.T, what, u string) {
	t.Helper()
	if code, body := fetch(t, u, ""); code >= 200 && code < 300 {
		t.Errorf("%s: GET %s = %d %s, want an error status", what, u, code, abbrev(body))
	}
}

// testSignedURL: a Storage that implements bulkexport.URLSigner signs, for
// a committed file, an absolute http(s) URL that a plain client, with no
// credentials, fetches the file's exact bytes from, whole or by Range.
// Each URL serves its own file, and a long expiry works as a short one.
// (That a URL stops working once expiry has passed is not checked: that
// would take sleeping.)
func testSignedURL(t *testing.T, s bulkexport.Storage) {
	us := urlSigner(t, s)
	a, b := bulkexport.FileName("Patient", 1, 3), bulkexport.FileName("Patient", 2, 3)
	data := pattern(10000)
	put(t, s, "job-u", a, data)
	put(t, s, "job-u", b, lines("b", 3))
	put(t, s, "job-u2", a, lines("other-job", 2))

	ua := signURL(t, us, "job-u", a, time.Minute)
	wantServes(t, ua, data)
	ub := signURL(t, us, "job-u", b, time.Minute)
	wantServes(t, ub, lines("b", 3))
	u2 := signURL(t, us, "job-u2", a, time.Minute)
	wantServes(t, u2, lines("other-job", 2))
	if ua == ub || ua == u2 || ub == u2 {
		t.Errorf("three files share a signed URL: %q, %q, %q", ua, ub, u2)
	}

	// A Range request gets that range (DownloadRedirect: clients resend
	// their Range header to the signed URL).
	code, body := fetch(t, ua, "bytes=100-199")
	if code != http.StatusPartialContent || !bytes.Equal(body, data[100:200]) {
		t.Errorf("GET %s with Range bytes=100-199 = %d %s, want 206 %s", ua, code, abbrev(body), abbrev(data[100:200]))
	}

	wantServes(t, signURL(t, us, "job-u", a, 24*time.Hour), data)
	wantServes(t, signURL(t, us, "job-u", b, 2*time.Minute), lines("b", 3))

	// An empty file is served empty.
	put(t, s, "job-u", "empty.ndjson", nil)
	wantServes(t, signURL(t, us, "job-u", "empty.ndjson", time.Minute), nil)
}

// testSignedURLMissing: the signature of a file that does not exist is an
// error or a URL that serves nothing, and a URL signed for a file stops
// serving it once the file is deleted (Delete, and DeleteFile when the
// Storage implements bulkexport.FileDeleter).
func testSignedURLMissing(t *testing.T, s bulkexport.Storage) {
	us := urlSigner(t, s)
	name := bulkexport.FileName("Patient", 1, 2)
	if u, err := us.SignedURL(ctx, "no-such-job", name, time.Minute); err == nil {
		wantNotServed(t, "a URL signed for a job that does not exist", u)
	}
	put(t, s, "job-m", name, lines("m", 2))
	if u, err := us.SignedURL(ctx, "job-m", "Observation.c2.ndjson", time.Minute); err == nil {
		wantNotServed(t, "a URL signed for a file that does not exist", u)
	}

	u := signURL(t, us, "job-m", name, time.Minute)
	wantServes(t, u, lines("m", 2))
	if err := s.Delete(ctx, "job-m"); err != nil {
		t.Fatalf("Delete: %v", err)
	}
	wantNotServed(t, "a URL signed before the job was deleted", u)

	fd, ok := s.(bulkexport.FileDeleter)
	if !ok {
		return
	}
	put(t, s, "job-m", name, lines("again", 2))
	u = signURL(t, us, "job-m", name, time.Minute)
	wantServes(t, u, lines("again", 2))
	if err := fd.DeleteFile(ctx, "job-m", name); err != nil {
		t.Fatalf("DeleteFile: %v", err)
	}
	wantNotServed(t, "a URL signed before DeleteFile", u)
}

// testSignedURLRefusals: SignedURL refuses an expiry that is not positive
// and the names and job ids that Create and Open refuse, so that a URL
// never reaches outside its job.
func testSignedURLRefusals(t *testing.T, s bulkexport.Storage) {
	us := urlSigner(t, s)
	name := bulkexport.FileName("Patient", 1, 2)
	put(t, s, "job-r", name, lines("r", 1))
	for _, expiry := range []time.Duration{0, -time.Second, -time.Hour} {
		if u, err := us.SignedURL(ctx, "job-r", name, expiry); err == nil {
			t.Errorf("SignedURL with expiry %v = %q, want an error", expiry, u)
		}
	}
	for _, bad := range invalidNames {
		if u, err := us.SignedURL(ctx, "job-r", bad, time.Minute); err == nil {
			t.Errorf("SignedURL(job-r, %q) = %q, want an error", bad, u)
		}
		if u, err := us.SignedURL(ctx, bad, name, time.Minute); err == nil {
			t.Errorf("SignedURL(%q, %s) = %q, want an error", bad, name, u)
		}
	}
}
